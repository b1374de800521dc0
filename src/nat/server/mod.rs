//! The rendezvous role (`tunnel rendezvous`): peers register over QUIC, authenticated by their
//! identity key; the server records each one's observed (reflexive) and local addresses,
//! introduces two peers to each other (each other's candidates and a common start time) only
//! when the one asked for accepts the one asking, and allocates relays within quotas. The
//! decisions are in [`broker`] (pure, with its limits in [`limits`]); this is its driver.

pub mod broker;
pub mod limits;
pub mod link;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use quinn::Connection;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::identity::PeerId;
use crate::nat::relay::RelayLimits;
use crate::nat::{read_frame, relay, write_frames};
use crate::protocol::close_code;
use crate::protocol::rendezvous::{
    token_from_hex, token_hex, ClientMsg, RelayGrant, ServerMsg, MAX_LOCAL_ADDRS,
};
use crate::quic::accept::Serve;
use crate::quic::tls;
use crate::runtime::NodeCtx;
use crate::time::{now, sleep_until_opt};

use broker::{Action, Admission, Broker, Limits, Refusal, RelayTicket};

/// Limits and switches of the rendezvous server.
#[derive(Debug, Clone)]
pub struct RendezvousConfig {
    /// Registrations, requests and relay quotas.
    pub limits: Limits,
    /// Each relay allocation's idle timeout, lifetime and byte rate.
    pub relay: RelayLimits,
    /// Who may register.
    pub admission: Admission,
    /// How long a peer has to register after connecting.
    pub register_timeout: Duration,
    /// A TCP link that brings no frame for this long is closed (a registered peer's QUIC
    /// keep-alives, every 10 s, keep its link busy).
    pub link_idle: Duration,
}

impl Default for RendezvousConfig {
    fn default() -> Self {
        RendezvousConfig {
            limits: Limits::default(),
            relay: RelayLimits::default(),
            admission: Admission::Open,
            register_timeout: Duration::from_secs(10),
            link_idle: Duration::from_secs(60),
        }
    }
}

/// What a refused registration is told: why, and what to do.
fn registration_refused(refusal: Refusal, peer: &PeerId, limits: &Limits) -> String {
    match refusal {
        Refusal::NotListed => format!(
            "this rendezvous admits only the peers it lists, and {peer} is not one: ask its operator to add this id"
        ),
        Refusal::Full => format!(
            "the rendezvous is full ({} peers registered): try again later",
            limits.max_peers
        ),
        Refusal::AddressFull => format!(
            "{} peers are registered from your address already, the most this rendezvous takes: stop one, or try again later",
            limits.max_peers_per_ip
        ),
        Refusal::RegisterRate => format!(
            "too many registrations from your address (the limit is {}): retrying later",
            limits.register_rate
        ),
        other => other.reason().to_string(),
    }
}

struct Entry {
    /// `stable_id` of the connection this registration belongs to.
    conn_id: usize,
    conn: Connection,
    tx: mpsc::Sender<ServerMsg>,
    observed: SocketAddr,
    local_addrs: Vec<SocketAddr>,
    rtt: Duration,
}

struct Inner {
    broker: Broker,
    entries: HashMap<PeerId, Entry>,
    /// Each live relay allocation under both its sides' tokens: the side's peer, and what
    /// ends the allocation.
    allocations: HashMap<[u8; 16], (PeerId, CancellationToken)>,
}

impl Inner {
    fn send(&self, to: &PeerId, msg: ServerMsg) {
        if let Some(entry) = self.entries.get(to) {
            // A peer that does not read its control stream loses messages rather than
            // making the server buffer without end.
            if entry.tx.try_send(msg).is_err() {
                warn!(peer = %to, "control stream full: message dropped");
            }
        }
    }
}

impl Serve for Rendezvous {
    fn serve(self: Arc<Self>, conn: Connection) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(self.serve_peer(conn))
    }
}

pub(crate) struct Rendezvous {
    config: RendezvousConfig,
    inner: Mutex<Inner>,
    node: NodeCtx,
    relay_ip: IpAddr,
    /// Wakes the timer when a request adds a deadline.
    wake: Notify,
    /// TCP links per source address, and their TLS configuration.
    links: link::LinkCount,
    link_tls: Arc<rustls::ServerConfig>,
}

impl Rendezvous {
    pub(crate) fn new(config: RendezvousConfig, node: NodeCtx) -> std::io::Result<Arc<Self>> {
        let relay_ip = node.transport.local_addr()?.ip();
        let link_tls =
            link::server_tls(node.transport.identity()).map_err(std::io::Error::other)?;
        // Peers on the TCP link ask over UDP whether UDP works again.
        node.transport.paths().links().answer_echoes();
        let broker = Broker::new(config.limits.clone(), config.admission.clone());
        let this = Arc::new(Rendezvous {
            config,
            inner: Mutex::new(Inner {
                broker,
                entries: HashMap::new(),
                allocations: HashMap::new(),
            }),
            node,
            relay_ip,
            wake: Notify::new(),
            links: link::LinkCount::default(),
            link_tls,
        });
        this.node.tasks.spawn(this.clone().answer_due());
        Ok(this)
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers requests that came to nothing, on the broker's deadlines.
    async fn answer_due(self: Arc<Self>) {
        loop {
            let next = self.inner().broker.next_deadline();
            tokio::select! {
                () = sleep_until_opt(next) => {
                    let actions = self.inner().broker.poll(now());
                    self.run(actions);
                }
                () = self.wake.notified() => {}
                () = self.node.abort.cancelled() => return,
            }
        }
    }

    /// Carries out the broker's actions.
    fn run(self: &Arc<Self>, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send { to, msg } => self.inner().send(&to, msg),
                Action::Introduce {
                    asker,
                    target,
                    relay,
                } => {
                    let this = self.clone();
                    self.node
                        .tasks
                        .spawn(async move { this.introduce(asker, target, relay).await });
                }
                Action::Refused {
                    refusal,
                    peer,
                    ip,
                    log,
                } => {
                    self.node.stats.rendezvous_refused.add(1);
                    if log {
                        info!(reason = refusal.reason(), %peer, %ip, "refused");
                    }
                }
                Action::Disconnect { peer } => {
                    if let Some(entry) = self.inner().entries.get(&peer) {
                        info!(%peer, "no longer admitted: disconnecting");
                        entry.conn.close(
                            close_code::REFUSED,
                            b"no longer admitted by this rendezvous",
                        );
                    }
                }
            }
        }
    }

    /// New admission rules (a reload); peers no longer admitted are disconnected. Returns
    /// how many.
    pub(crate) fn set_admission(self: &Arc<Self>, admission: Admission) -> usize {
        let actions = self.inner().broker.set_admission(admission);
        let n = actions.len();
        self.run(actions);
        n
    }

    /// Refusals so far, by reason (for status).
    pub(crate) fn refusals(&self) -> serde_json::Map<String, serde_json::Value> {
        self.inner()
            .broker
            .refusals()
            .map(|(r, n)| (r.reason().to_string(), n.into()))
            .collect()
    }

    fn count_peers(&self, inner: &Inner) {
        self.node.stats.rendezvous_peers.store(
            inner.broker.registered(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    async fn serve_peer(self: Arc<Self>, conn: Connection) {
        let Some(peer) = tls::peer_id_of(&conn) else {
            conn.close(close_code::PROTOCOL_ERROR, b"no peer certificate");
            return;
        };
        tracing::Span::current().record("peer", tracing::field::display(peer));
        let (send, mut recv) =
            match tokio::time::timeout(self.config.register_timeout, conn.accept_bi()).await {
                Ok(Ok(pair)) => pair,
                _ => {
                    conn.close(close_code::PROTOCOL_ERROR, b"no control stream");
                    return;
                }
            };
        let (tx, rx) = mpsc::channel(256);
        let writer = self.node.tasks.spawn(write_frames(send, rx));
        let mut buf = BytesMut::new();
        let mut registered = false;
        let mut refused = None;
        // A peer on a TCP link counts at the link's real address.
        let Some(ip) = self.real_addr(conn.remote_address()).map(|a| a.ip()) else {
            conn.close(close_code::PROTOCOL_ERROR, b"its TCP link is gone");
            return;
        };
        let end = loop {
            let msg = tokio::select! {
                m = read_frame::<ClientMsg>(&mut recv, &mut buf) => m,
                () = self.node.abort.cancelled() => break "shutting down".to_string(),
                r = conn.closed() => break crate::quic::close::describe_close(&r),
            };
            let msg = match msg {
                Ok(Some(msg)) => msg,
                Ok(None) => break "control stream finished".into(),
                Err(e) => {
                    let e = e.to_string();
                    conn.close(close_code::PROTOCOL_ERROR, e.as_bytes());
                    break e;
                }
            };
            match msg {
                ClientMsg::Register { mut local_addrs } => {
                    // A link address is no place to punch to.
                    local_addrs.retain(|a| !crate::multipath::link::is_link_addr(*a));
                    local_addrs.truncate(MAX_LOCAL_ADDRS);
                    if let Err(message) = self.register(peer, &conn, &tx, local_addrs) {
                        let _ = tx.try_send(ServerMsg::Error {
                            message: message.clone(),
                        });
                        refused = Some(message.clone());
                        break message;
                    }
                    registered = true;
                }
                ClientMsg::Connect {
                    peer: target,
                    relay,
                } => {
                    if !registered {
                        let _ = tx.try_send(ServerMsg::Error {
                            message: "register first".into(),
                        });
                        continue;
                    }
                    let actions = self.inner().broker.connect(peer, target, relay, ip, now());
                    self.run(actions);
                    self.wake.notify_one();
                }
                ClientMsg::Answer {
                    peer: asker,
                    accept,
                } => {
                    let actions = self.inner().broker.answer(peer, asker, accept);
                    self.run(actions);
                }
                ClientMsg::Release { token } => {
                    // Only a side of the allocation may end it.
                    let inner = self.inner();
                    let side = token_from_hex(&token).and_then(|t| inner.allocations.get(&t));
                    match side {
                        Some((owner, end)) if *owner == peer => end.cancel(),
                        _ => {
                            debug!("release of a relay allocation that is not this peer's: ignored")
                        }
                    }
                }
            }
        };
        info!("peer left: {end}");
        self.unregister(peer, conn.stable_id());
        drop(tx);
        let _ = writer.await;
        if let Some(why) = refused {
            // After the error frame went out; the close carries the reason too.
            conn.close(close_code::REFUSED, why.as_bytes());
        }
    }

    /// Registers `peer`; `Err` is what to tell it.
    fn register(
        self: &Arc<Self>,
        peer: PeerId,
        conn: &Connection,
        tx: &mpsc::Sender<ServerMsg>,
        local_addrs: Vec<SocketAddr>,
    ) -> Result<(), String> {
        let observed = self
            .real_addr(conn.remote_address())
            .ok_or_else(|| "its TCP link is gone: connect again".to_string())?;
        let actions = {
            let mut inner = self.inner();
            let actions = match inner
                .broker
                .register(peer, conn.stable_id(), observed.ip(), now())
            {
                Ok(actions) => actions,
                Err((refusal, action)) => {
                    let message = registration_refused(refusal, &peer, &self.config.limits);
                    drop(inner);
                    self.run(vec![action]);
                    return Err(message);
                }
            };
            if let Some(was) = inner
                .entries
                .get(&peer)
                .filter(|e| e.conn_id == conn.stable_id() && e.observed != observed)
            {
                info!(%peer, was = %was.observed, now = %observed, "a registered peer's address changed (a NAT rebinding or a new network)");
            }
            let entry = Entry {
                conn_id: conn.stable_id(),
                conn: conn.clone(),
                tx: tx.clone(),
                observed,
                local_addrs,
                rtt: conn.rtt(),
            };
            inner.entries.insert(peer, entry);
            self.count_peers(&inner);
            actions
        };
        let _ = tx.try_send(ServerMsg::Registered { observed });
        info!(%observed, "peer registered");
        self.run(actions);
        Ok(())
    }

    /// Where a connection really comes from: a TCP link's address for a peer on one.
    fn real_addr(&self, addr: SocketAddr) -> Option<SocketAddr> {
        self.node.transport.paths().links().real(addr)
    }

    fn unregister(&self, peer: PeerId, conn_id: usize) {
        let mut inner = self.inner();
        inner.broker.unregister(peer, conn_id);
        if inner
            .entries
            .get(&peer)
            .is_some_and(|e| e.conn_id == conn_id)
        {
            inner.entries.remove(&peer);
        }
        self.count_peers(&inner);
    }

    /// Introduces two peers the target accepted: each gets the other's candidates, a start
    /// time, and its end of a relay when the ticket holds one.
    async fn introduce(
        self: Arc<Self>,
        asker: PeerId,
        target: PeerId,
        ticket: Option<RelayTicket>,
    ) {
        let planned = {
            let mut inner = self.inner();
            let links = self.node.transport.paths().links().clone();
            for peer in [asker, target] {
                if let Some(entry) = inner.entries.get_mut(&peer) {
                    refresh_observed(&peer, entry, &links);
                }
            }
            match (inner.entries.get(&asker), inner.entries.get(&target)) {
                (Some(a), Some(b)) => {
                    // Both start at the same moment: the nearer peer waits for the farther
                    // one's message to arrive (half the difference of their round trips).
                    let (ha, hb) = (a.rtt / 2, b.rtt / 2);
                    let start_a = hb.saturating_sub(ha).as_millis() as u64;
                    let start_b = ha.saturating_sub(hb).as_millis() as u64;
                    Some((candidates(a), candidates(b), start_a, start_b))
                }
                _ => None,
            }
        };
        let Some((asker_cands, target_cands, start_asker, start_target)) = planned else {
            if let Some(ticket) = ticket {
                self.inner().broker.release_relay(&ticket);
            }
            return;
        };
        let grants = match ticket {
            Some(ticket) => self.allocate_relay(ticket).await,
            None => None,
        };
        let (grant_asker, grant_target) = match grants {
            Some((a, b)) => (Some(a), Some(b)),
            None => (None, None),
        };
        let inner = self.inner();
        info!(%asker, %target, relay = grant_asker.is_some(), "introducing");
        inner.send(
            &asker,
            ServerMsg::Introduce {
                peer: target,
                candidates: target_cands,
                start_in_ms: start_asker,
                relay: grant_asker,
            },
        );
        inner.send(
            &target,
            ServerMsg::Introduce {
                peer: asker,
                candidates: asker_cands,
                start_in_ms: start_target,
                relay: grant_target,
            },
        );
    }

    /// Binds the two ports of a relay allocation and forwards on them until it ends, holding
    /// `ticket`'s quota meanwhile.
    async fn allocate_relay(
        self: &Arc<Self>,
        ticket: RelayTicket,
    ) -> Option<(RelayGrant, RelayGrant)> {
        let [a, b] = ticket.peers;
        let sockets = match relay::bind_pair(self.relay_ip).await {
            Ok(s) => s,
            Err(e) => {
                warn!("cannot bind relay ports: {e}");
                self.inner().broker.release_relay(&ticket);
                return None;
            }
        };
        let ports = match (sockets[0].local_addr(), sockets[1].local_addr()) {
            (Ok(x), Ok(y)) => [x.port(), y.port()],
            _ => {
                self.inner().broker.release_relay(&ticket);
                return None;
            }
        };
        let tokens = relay::new_tokens();
        let limits = self.config.relay;
        let cancel = self.node.abort.child_token();
        {
            let mut inner = self.inner();
            inner.allocations.insert(tokens[0], (a, cancel.clone()));
            inner.allocations.insert(tokens[1], (b, cancel.clone()));
        }
        let span = tracing::info_span!("relay", a = %a, b = %b, ports = ?ports);
        let held = self.node.stats.relays.hold();
        let this = self.clone();
        self.node.tasks.spawn(
            async move {
                let _held = held;
                let done = relay::run(
                    sockets,
                    tokens,
                    limits,
                    this.node.transport.paths().links().clone(),
                    cancel,
                )
                .await;
                {
                    let mut inner = this.inner();
                    for t in &tokens {
                        inner.allocations.remove(t);
                    }
                }
                info!(
                    packets = done.packets,
                    bytes = done.bytes,
                    policed = done.policed,
                    ended = done.expiry.map_or("released", |e| match e {
                        relay::Expiry::Idle => "idle",
                        relay::Expiry::Lifetime => "lifetime",
                    }),
                    "relay released"
                );
                this.inner().broker.release_relay(&ticket);
            }
            .instrument(span),
        );
        Some((
            RelayGrant {
                port: ports[0],
                token: token_hex(&tokens[0]),
            },
            RelayGrant {
                port: ports[1],
                token: token_hex(&tokens[1]),
            },
        ))
    }
}

/// Takes the address `peer`'s registration connection has now as its observed one: quinn
/// follows a NAT rebinding or an address change of the client (the keep-alives carry it),
/// so an introduction never hands out a mapping that is gone.
fn refresh_observed(peer: &PeerId, entry: &mut Entry, links: &crate::multipath::link::LinkHub) {
    let remote = entry.conn.remote_address();
    // A link that is gone leaves the last address known (the connection goes with it).
    let Some(now) = links.real(remote) else {
        return;
    };
    if now != entry.observed {
        info!(%peer, was = %entry.observed, %now, "a registered peer's address changed (a NAT rebinding or a new network)");
        entry.observed = now;
    }
}

/// Where a registered peer can be reached: its observed address (not a TCP link's: nothing
/// reaches a peer over UDP there), then its own local ones.
fn candidates(entry: &Entry) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    if !crate::multipath::link::is_link_addr(entry.conn.remote_address()) {
        out.push(entry.observed);
    }
    for addr in &entry.local_addrs {
        if !out.contains(addr) {
            out.push(*addr);
        }
    }
    out
}
