//! The rendezvous's end of TCP links (`protocol::link`): peers on networks that drop UDP
//! reach its QUIC endpoint and their relay ports through one TLS-over-TCP connection each.
//! The TLS handshake authenticates the peer by key (as QUIC does); the socket layer
//! (`multipath::link`) gives each link an address of its own that quinn and the relay use
//! as if it were UDP, so the registration, its quotas and the relay work unchanged. Limits:
//! `max_peers_per_ip` links per source address (an IPv6 one counted per /64, what one host
//! holds), `max_peers` in all, 10 s for the TLS handshake, and `link_idle` (60 s) without a
//! frame.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, Instrument};

use super::Rendezvous;
use crate::multipath::link::LINK_QUEUE;
use crate::nat::link::pump;
use crate::protocol::link;
use crate::quic::tls;

/// How long a link has for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Links per source address (IPv6 per /64), and in all, held while each lives.
#[derive(Debug, Default)]
pub(crate) struct LinkCount(Mutex<(HashMap<IpAddr, usize>, usize)>);

/// One link's place in the count; given back when dropped.
struct Held<'a> {
    count: &'a LinkCount,
    key: IpAddr,
}

/// What one host holds: an IPv4 address, an IPv6 /64.
fn host_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Why a link gets no place.
#[derive(Debug, PartialEq, Eq)]
enum Full {
    Address,
    All,
}

impl LinkCount {
    fn hold(&self, ip: IpAddr, per_host: usize, all: usize) -> Result<Held<'_>, Full> {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (m, total) = &mut *guard;
        if *total >= all {
            return Err(Full::All);
        }
        let key = host_key(ip);
        let n = m.entry(key).or_default();
        if *n >= per_host {
            return Err(Full::Address);
        }
        *n += 1;
        *total += 1;
        Ok(Held { count: self, key })
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut guard = self.count.0.lock().unwrap_or_else(|p| p.into_inner());
        let (m, total) = &mut *guard;
        *total -= 1;
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// The TLS configuration of the rendezvous's link listeners.
pub(crate) fn server_tls(
    identity: &crate::identity::Identity,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    Ok(Arc::new(tls::server_config(identity, &[link::ALPN])?))
}

impl Rendezvous {
    /// Serves one accepted TCP connection as a link until it ends or the node stops.
    pub(crate) async fn serve_link(self: Arc<Self>, tcp: TcpStream, from: SocketAddr) {
        let from = crate::quic::path::canonical(from);
        let span = tracing::info_span!("link", %from, peer = tracing::field::Empty);
        async move {
            let limits = &self.config.limits;
            let _held = match self.links.hold(from.ip(), limits.max_peers_per_ip, limits.max_peers) {
                Ok(held) => held,
                Err(full) => {
                    self.node.stats.rendezvous_refused.add(1);
                    match full {
                        Full::Address => info!(
                            reason = "address_full",
                            "TCP link refused: {} links from this address already",
                            limits.max_peers_per_ip
                        ),
                        Full::All => info!(
                            reason = "full",
                            "TCP link refused: {} links open already", limits.max_peers
                        ),
                    }
                    return;
                }
            };
            crate::nat::link::watch_liveness(&tcp);
            let acceptor = tokio_rustls::TlsAcceptor::from(self.link_tls.clone());
            let accepted = tokio::select! {
                r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => r,
                () = self.node.abort.cancelled() => return,
            };
            let stream = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return debug!("TCP link handshake failed: {e}"),
                Err(_) => return debug!("TCP link handshake took over {HANDSHAKE_TIMEOUT:?}"),
            };
            let peer = stream.get_ref().1.peer_certificates().and_then(tls::peer_id_in);
            if let Some(peer) = peer {
                tracing::Span::current().record("peer", tracing::field::display(peer));
            }
            let links = self.node.transport.paths().links().clone();
            let (tx, rx) = mpsc::channel(LINK_QUEUE);
            let addr = links.add_link(from, tx);
            info!("TCP link up (a peer whose network drops UDP)");
            let l = links.clone();
            let end = tokio::select! {
                e = pump(stream, rx, Some(self.config.link_idle), move |port, d| l.from_link(addr, port, d)) => e,
                () = self.node.abort.cancelled() => "shutting down".into(),
            };
            links.remove_link(addr);
            info!("TCP link ended: {end}");
        }
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_counted_per_host_and_in_all_and_given_back() {
        let c = LinkCount::default();
        let a: IpAddr = "198.51.100.10".parse().unwrap();
        let b: IpAddr = "198.51.100.20".parse().unwrap();
        let h1 = c.hold(a, 2, 3).unwrap();
        let _h2 = c.hold(a, 2, 3).unwrap();
        assert_eq!(c.hold(a, 2, 3).err(), Some(Full::Address));
        let _h3 = c.hold(b, 2, 3).unwrap();
        assert_eq!(c.hold(b, 2, 3).err(), Some(Full::All));
        drop(h1);
        assert!(c.hold(b, 2, 3).is_ok(), "a place given back");
        // One IPv6 host: every address of its /64 counts together.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let c = LinkCount::default();
        let _x = c.hold(v6("2001:db8:1:2::1"), 1, 10).unwrap();
        assert_eq!(
            c.hold(v6("2001:db8:1:2::ffff"), 1, 10).err(),
            Some(Full::Address)
        );
        assert!(c.hold(v6("2001:db8:1:3::1"), 1, 10).is_ok());
    }
}
