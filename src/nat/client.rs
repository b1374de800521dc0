//! The peer side of the rendezvous: stays registered (reconnecting with backoff when the
//! rendezvous restarts or the network drops), asks for introductions, and hands the
//! introductions other peers asked for to the node (which punches back when it exposes to
//! the peer). The punching and the direct-or-relay dial are in `nat::dial`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use bytes::BytesMut;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn, Instrument};

use crate::identity::PeerId;
use crate::nat::{read_frame, write_frames};
use crate::protocol::rendezvous::{token_from_hex, token_hex, ClientMsg, ServerMsg};
use crate::quic::close::describe_close;
use crate::quic::Transport;
use crate::runtime::NodeCtx;
use crate::time::backoff::Backoff;

/// An introduction to a peer: where to punch, when, and our end of a relay.
#[derive(Debug, Clone)]
pub struct Introduction {
    pub peer: PeerId,
    pub candidates: Vec<SocketAddr>,
    pub start_in: Duration,
    /// The relay port to send to, and our bind token.
    pub relay: Option<(SocketAddr, [u8; 16])>,
}

type Reply = oneshot::Sender<Introduction>;

/// Whether this node accepts an introduction to a peer (asked by the rendezvous when that
/// peer asks for us): the exposing role's rules.
pub type Consent = Arc<dyn Fn(&PeerId) -> bool + Send + Sync>;

enum Cmd {
    Connect {
        peer: PeerId,
        relay: bool,
        reply: Reply,
    },
    Release {
        token: [u8; 16],
    },
}

/// A handle to the node's rendezvous registration.
#[derive(Clone)]
pub struct RendezvousClient {
    cmds: mpsc::Sender<Cmd>,
    registered: watch::Receiver<Option<SocketAddr>>,
}

impl RendezvousClient {
    /// Starts registering with the rendezvous at `server` (HOST:PORT). A peer that asks for
    /// us is introduced only if `consent` accepts it; those introductions arrive on the
    /// returned receiver.
    pub(crate) fn start(
        server: String,
        node: NodeCtx,
        consent: Consent,
    ) -> (Self, mpsc::Receiver<Introduction>) {
        let (cmds, rx) = mpsc::channel(64);
        let (incoming_tx, incoming_rx) = mpsc::channel(64);
        let (registered_tx, registered) = watch::channel(None);
        let actor = Actor {
            server: server.clone(),
            node: node.clone(),
            pending: HashMap::new(),
            consent,
            incoming: incoming_tx,
            registered: registered_tx,
            link: crate::nat::link::LinkDriver::start(node.clone()),
        };
        let span = tracing::info_span!("rendezvous", server = %server);
        node.tasks.spawn(actor.run(rx).instrument(span));
        (RendezvousClient { cmds, registered }, incoming_rx)
    }

    /// Asks to be introduced to `peer`; waits while it is offline.
    pub async fn introduce(&self, peer: PeerId, relay: bool) -> Option<Introduction> {
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Connect { peer, relay, reply })
            .await
            .ok()?;
        rx.await.ok()
    }

    /// Tells the rendezvous that the relay allocation of our grant `token` is no longer
    /// needed (the dial went direct, or the relayed connection closed). Best effort: an
    /// allocation not released ends at its idle timeout.
    pub fn release(&self, token: [u8; 16]) {
        if self.cmds.try_send(Cmd::Release { token }).is_err() {
            debug!("relay release not sent: the rendezvous client is busy or gone");
        }
    }

    /// Waits until registered; our address as the rendezvous observes it.
    pub async fn registered(&self) -> Option<SocketAddr> {
        let mut rx = self.registered.clone();
        let r = rx.wait_for(|r| r.is_some()).await.ok()?;
        *r
    }
}

struct Actor {
    server: String,
    node: NodeCtx,
    pending: HashMap<PeerId, Vec<(bool, Reply)>>,
    consent: Consent,
    incoming: mpsc::Sender<Introduction>,
    registered: watch::Sender<Option<SocketAddr>>,
    /// The TCP link for networks that drop UDP: told when a handshake goes unanswered.
    link: crate::nat::link::LinkDriver,
}

/// A registration handshake unanswered this long may mean UDP is blocked: the TCP link is
/// opened (`nat::link`), and the handshake goes on over it.
const STALL_AFTER: Duration = Duration::from_secs(1);
/// How often this host's own addresses are looked at again.
const ADDRESSES_EVERY: Duration = Duration::from_secs(2);
/// How long a registration handshake may take in all (over the TCP link too).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Actor {
    async fn run(mut self, mut cmds: mpsc::Receiver<Cmd>) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
        let abort = self.node.abort.clone();
        loop {
            let outcome = tokio::select! {
                r = self.session(&mut cmds, &mut backoff) => r,
                () = abort.cancelled() => return,
            };
            self.registered.send_replace(None);
            match outcome {
                Ok(()) => return, // every handle dropped
                Err(e) => {
                    let delay = backoff.failed();
                    warn!("rendezvous unavailable ({e}); retrying in {delay:?}");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = abort.cancelled() => return,
                    }
                }
            }
        }
    }

    /// One registration: connect, register, serve until the connection fails.
    async fn session(
        &mut self,
        cmds: &mut mpsc::Receiver<Cmd>,
        backoff: &mut Backoff,
    ) -> anyhow::Result<()> {
        let transport = &self.node.transport;
        let addr = transport.resolve(&self.server).await?;
        let mut connecting = transport.connect_rendezvous(addr)?;
        let mut on_link = transport.paths().links().watch_via_tcp();
        let handshake = async {
            tokio::select! {
                c = &mut connecting => return c,
                () = tokio::time::sleep(STALL_AFTER) => self.link.stalled(addr),
            }
            let on_tcp = tokio::select! {
                c = &mut connecting => return c,
                on = async { on_link.wait_for(|on| *on).await.is_ok() } => on,
            };
            // The link carries it now: a new handshake goes out at once (quinn would resend
            // the stalled one only at its next, doubling, timeout), and the stalled one is
            // dropped.
            match on_tcp.then(|| transport.connect_rendezvous(addr)) {
                Some(Ok(again)) => {
                    drop(connecting);
                    again.await
                }
                _ => connecting.await,
            }
        };
        let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| {
                anyhow!("no answer within {HANDSHAKE_TIMEOUT:?}, over UDP or a TCP link (is {addr} a rendezvous, reachable from here?)")
            })?
            .map_err(|e| anyhow!(describe_close(&e)))?;
        let (send, mut recv) = conn.open_bi().await?;
        let (tx, rx) = mpsc::channel::<ClientMsg>(64);
        // The writer is one of the node's tasks, and ends with this registration.
        let writer_stop = self.node.abort.child_token();
        let _writer = writer_stop.clone().drop_guard();
        self.node.tasks.spawn(async move {
            tokio::select! {
                () = write_frames(send, rx) => {}
                () = writer_stop.cancelled() => {}
            }
        });
        let mut local_addrs = local_candidates(transport, addr);
        let send = |msg: ClientMsg| {
            let tx = tx.clone();
            async move {
                tx.send(msg)
                    .await
                    .map_err(|_| anyhow!("control stream closed"))
            }
        };
        send(ClientMsg::Register {
            local_addrs: local_addrs.clone(),
        })
        .await?;
        // This host's addresses, looked at again every few seconds (a laptop that changed
        // network keeps its socket, but its packets now leave from elsewhere).
        let mut look = tokio::time::interval(ADDRESSES_EVERY);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = BytesMut::new();
        // Requests made while unregistered are sent now (those still waited for).
        self.pending.retain(|_, waiters| {
            waiters.retain(|(_, reply)| !reply.is_closed());
            !waiters.is_empty()
        });
        for (peer, waiters) in &self.pending {
            let relay = waiters.iter().any(|(r, _)| *r);
            send(ClientMsg::Connect { peer: *peer, relay }).await?;
        }
        loop {
            tokio::select! {
                _ = look.tick() => {
                    let now = local_candidates(transport, addr);
                    if now != local_addrs {
                        info!(was = ?local_addrs, now = ?now, "this host's addresses changed: registering them; live connections punch again");
                        local_addrs = now;
                        transport.paths().note_network_change();
                        send(ClientMsg::Register { local_addrs: local_addrs.clone() }).await?;
                    }
                }
                cmd = cmds.recv() => {
                    match cmd {
                        None => return Ok(()),
                        Some(Cmd::Connect { peer, relay, reply }) => {
                            self.pending.entry(peer).or_default().push((relay, reply));
                            send(ClientMsg::Connect { peer, relay }).await?;
                        }
                        Some(Cmd::Release { token }) => {
                            send(ClientMsg::Release { token: token_hex(&token) }).await?;
                        }
                    }
                }
                msg = read_frame::<ServerMsg>(&mut recv, &mut buf) => {
                    // A stream that fails because the connection closed: the close's reason.
                    let msg = match msg {
                        Err(e) => return Err(conn.close_reason().map_or_else(|| anyhow!(e), |r| anyhow!(describe_close(&r)))),
                        Ok(m) => m,
                    };
                    let msg = msg.ok_or_else(|| anyhow!(conn.close_reason().map_or("the rendezvous closed the control stream".into(), |r| describe_close(&r))))?;
                    match msg {
                        ServerMsg::Registered { observed } => {
                            backoff.succeeded();
                            info!(%observed, "registered with the rendezvous");
                            self.registered.send_replace(Some(observed));
                        }
                        ServerMsg::Ask { peer } => {
                            let accept = (self.consent)(&peer);
                            if accept {
                                debug!(%peer, "asked for by a peer we allow: accepting");
                            } else {
                                info!(%peer, "a peer this node does not allow asked for an introduction: refused");
                            }
                            send(ClientMsg::Answer { peer, accept }).await?;
                        }
                        ServerMsg::Unavailable { peer } => {
                            if self.pending.contains_key(&peer) {
                                info!(%peer, "not introduced yet: the peer is offline, or does not allow this one; waiting");
                            }
                        }
                        ServerMsg::Introduce { peer, candidates, start_in_ms, relay } => {
                            let relay = relay.and_then(|g| Some((SocketAddr::new(addr.ip(), g.port), token_from_hex(&g.token)?)));
                            let intro = Introduction {
                                peer,
                                candidates,
                                start_in: Duration::from_millis(start_in_ms.min(2_000)),
                                relay,
                            };
                            debug!(?intro, "introduced");
                            let mut answered = false;
                            for (_, reply) in self.pending.remove(&peer).into_iter().flatten() {
                                answered |= reply.send(intro.clone()).is_ok();
                            }
                            if !answered && self.incoming.try_send(intro).is_err() {
                                warn!(%peer, "introduction dropped: too many at once");
                            }
                        }
                        ServerMsg::Error { message } => warn!("the rendezvous refused a request: {message}"),
                    }
                }
                r = conn.closed() => return Err(anyhow!(describe_close(&r))),
            }
        }
    }
}

/// This host's own candidates: the address of the endpoint's socket, or, when it is bound
/// to a wildcard, the IPv4 source address the kernel picks for the route toward the
/// rendezvous (found by connecting a throwaway UDP socket, which sends nothing) and, on a
/// dual-stack socket, this host's routable IPv6 addresses (no NAT: the peer can reach them
/// once both sides' firewalls were punched).
fn local_candidates(transport: &Transport, rendezvous: SocketAddr) -> Vec<SocketAddr> {
    let Ok(bound) = transport.local_addr() else {
        return Vec::new();
    };
    let bound = crate::quic::path::canonical(bound);
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let rendezvous = crate::quic::path::canonical(rendezvous);
    let mut out = Vec::new();
    if rendezvous.is_ipv4() {
        let route =
            std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).and_then(|probe| {
                probe.connect(rendezvous)?;
                probe.local_addr()
            });
        if let Ok(local) = route {
            out.push(SocketAddr::new(local.ip(), bound.port()));
        }
    }
    if bound.is_ipv6() {
        let interfaces: Vec<std::net::IpAddr> = if_addrs::get_if_addrs()
            .map(|all| all.into_iter().map(|i| i.ip()).collect())
            .unwrap_or_default();
        out.extend(ipv6_candidates(&interfaces, bound.port()));
    }
    out
}

/// IPv6 candidates kept at most (a host may hold many temporary addresses).
const MAX_IPV6_CANDIDATES: usize = 4;

/// The addresses among `interfaces` a peer elsewhere may reach: IPv6 global unicast and
/// unique-local ones, not loopback, link-local (they need a zone), multicast or mapped. Pure.
pub fn ipv6_candidates(interfaces: &[std::net::IpAddr], port: u16) -> Vec<SocketAddr> {
    interfaces
        .iter()
        .filter_map(|ip| match ip {
            std::net::IpAddr::V6(v6) => Some(*v6),
            std::net::IpAddr::V4(_) => None,
        })
        .filter(|v6| {
            let first = v6.segments()[0];
            !v6.is_loopback()
                && !v6.is_unspecified()
                && !v6.is_multicast()
                && (first & 0xffc0) != 0xfe80
                && v6.to_ipv4_mapped().is_none()
        })
        .take(MAX_IPV6_CANDIDATES)
        .map(|v6| SocketAddr::new(v6.into(), port))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_routable_ipv6_addresses_become_candidates() {
        let ips: Vec<std::net::IpAddr> = [
            "127.0.0.1",
            "203.0.113.2",
            "::1",
            "fe80::1",
            "ff02::1",
            "::ffff:198.51.100.1",
            "2001:db8:1::2",
            "fd00::7",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let got = ipv6_candidates(&ips, 4433);
        let want: Vec<SocketAddr> = ["[2001:db8:1::2]:4433", "[fd00::7]:4433"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
        let many: Vec<std::net::IpAddr> = (1..10)
            .map(|i| format!("2001:db8::{i}").parse().unwrap())
            .collect();
        assert_eq!(ipv6_candidates(&many, 1).len(), MAX_IPV6_CANDIDATES);
    }
}
