//! The rendezvous's end of TCP links (`protocol::link`): peers on networks that drop UDP
//! reach its QUIC endpoint and their relay ports through one TLS-over-TCP connection each.
//! The TLS handshake authenticates the peer by key (as QUIC does); the socket layer
//! (`multipath::link`) gives each link an address of its own that quinn and the relay use
//! as if it were UDP, so the registration, its quotas and the relay work unchanged. A link
//! counts against `max_peers_per_ip` for its source address, and a handshake has 10 s.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, Instrument};

use super::Rendezvous;
use crate::identity::PeerId;
use crate::multipath::link::LINK_QUEUE;
use crate::nat::link::pump;
use crate::protocol::link;
use crate::quic::tls;

/// How long a link has for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Links per source address, held while each lives.
#[derive(Debug, Default)]
pub(crate) struct LinkCount(Mutex<HashMap<IpAddr, usize>>);

/// One link's place in the count; given back when dropped.
struct Held<'a> {
    count: &'a LinkCount,
    ip: IpAddr,
}

impl LinkCount {
    fn hold(&self, ip: IpAddr, max: usize) -> Option<Held<'_>> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Held { count: self, ip })
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut m = self.count.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
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
            let Some(_held) = self
                .links
                .hold(from.ip(), self.config.limits.max_peers_per_ip)
            else {
                self.node.stats.rendezvous_refused.add(1);
                info!(
                    reason = "address_full",
                    "TCP link refused: {} links from this address already",
                    self.config.limits.max_peers_per_ip
                );
                return;
            };
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
            let peer = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| PeerId::from_certificate(c).ok());
            if let Some(peer) = peer {
                tracing::Span::current().record("peer", tracing::field::display(peer));
            }
            let links = self.node.transport.paths().links().clone();
            let (tx, rx) = mpsc::channel(LINK_QUEUE);
            let addr = links.add_link(from, tx);
            info!("TCP link up (a peer whose network drops UDP)");
            let l = links.clone();
            let end = tokio::select! {
                e = pump(stream, rx, move |port, d| l.from_link(addr, port, d)) => e,
                () = self.node.abort.cancelled() => "shutting down".into(),
            };
            links.remove_link(addr);
            info!("TCP link ended: {end}");
        }
        .instrument(span)
        .await
    }
}
