//! The session's task: owns the dial, the upgrade attempt and the connection's handles,
//! reads tokio's clock, and does what [`Machine`] decides. Thin on purpose: every decision
//! (when to dial, whom to answer, when to close) is the machine's and tested there.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use quinn::Connection;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::machine::{
    Action, Conn, Dialled, Machine, Note, Settings, DIRECT_DEADLINE, DIRECT_LATER,
};
use super::{ConnectError, Reply, SessionConfig, StreamLease};
use crate::config::PeerAddr;
use crate::identity::PeerId;
use crate::multipath::Entry;
use crate::nat::client::{Introduction, RendezvousClient};
use crate::nat::dial::dial_introduced;
use crate::protocol::close_code;
use crate::quic::close::describe_close;
use crate::quic::path::Path;
use crate::quic::Transport;
use crate::runtime::peers::PeerConn;
use crate::runtime::NodeCtx;
use crate::stats::GaugeGuard;
use crate::time::{now, sleep_until_opt};

/// The driver's handle on a connection: the peer table's entry, and, when this session
/// dialled it, its unit on the node's connection gauge (released with the last clone).
#[derive(Clone)]
struct Handle {
    pc: PeerConn,
    _dialled: Option<Arc<GaugeGuard>>,
}

type Boxed<T> = Pin<Box<dyn Future<Output = Result<T, ConnectError>> + Send>>;

/// A dial's connection, and the introduction it came of (its relay side and the peer's
/// candidates become the connection's other paths).
struct Outcome {
    conn: Connection,
    path: Path,
    intro: Option<Arc<Introduction>>,
}

pub(super) struct Driver {
    pub peer: Arc<PeerAddr>,
    pub config: SessionConfig,
    pub node: NodeCtx,
    pub rendezvous: Arc<OnceLock<RendezvousClient>>,
    pub path: watch::Sender<Option<Path>>,
}

/// What the loop holds besides the machine.
struct Io {
    replies: HashMap<u64, Reply>,
    dial: Option<Boxed<Outcome>>,
    /// When the dial in progress started (its time goes into the node's histogram).
    dial_started: Option<std::time::Instant>,
    upgrade: Option<Boxed<()>>,
    ended: mpsc::UnboundedSender<u64>,
}

impl Driver {
    pub(super) async fn run(self, mut requests: mpsc::Receiver<Reply>) {
        let (ended, mut ended_rx) = mpsc::unbounded_channel::<u64>();
        let mut table = self.node.peers.subscribe();
        let mut machine = Machine::<Handle>::new(Settings {
            peer: self.peer.id,
            by_address: self.peer.addr.is_some(),
            idle_grace: self.config.idle_grace,
            connect_timeout: self.config.connect_timeout,
            eager: self.config.eager,
            force_relay: self.config.force_relay,
        });
        let mut io = Io {
            replies: HashMap::new(),
            dial_started: None,
            dial: None,
            upgrade: None,
            ended,
        };
        let mut next_waiter = 0u64;
        // This host's addresses changed (a new address, UDP back after the TCP link): the
        // live connection punches again at once.
        let mut network = self.node.transport.paths().network_changes();
        let stop = self.node.stop.clone();
        let actions = machine.start(now());
        self.apply(&mut io, actions);
        loop {
            let deadline = machine.poll_timeout();
            let live = machine.live().map(|c| (c.id, c.handle.pc.conn.clone()));
            // The live connection's path layer: its moves are the machine's to know.
            let route = machine
                .live()
                .and_then(|c| c.handle.pc.route.clone().map(|r| (c.id, r)));
            let mut route_rx = route.as_ref().map(|(_, r)| r.watch());
            if let Some((id, r)) = &route {
                if machine.path() != Some(r.path()) {
                    let actions = machine.path_changed(now(), *id, r.path());
                    self.apply(&mut io, actions);
                    continue;
                }
            }
            let actions = tokio::select! {
                changed = network.changed() => match changed {
                    Ok(()) => machine.network_changed(now()),
                    Err(_) => Vec::new(),
                },
                request = requests.recv() => {
                    let Some(reply) = request else { break };
                    next_waiter += 1;
                    io.replies.insert(next_waiter, reply);
                    // The table is read only when the machine would adopt from it.
                    let preferred = if machine.live().is_none() { self.preferred() } else { None };
                    machine.request(now(), next_waiter, preferred)
                }
                Some(generation) = ended_rx.recv() => machine.stream_ended(now(), generation),
                changed = table.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    machine.table_changed(now(), self.preferred())
                }
                result = async { io.dial.as_mut().expect("guarded").await }, if io.dial.is_some() => {
                    io.dial = None;
                    if let (Ok(_), Some(started)) = (&result, io.dial_started.take()) {
                        self.node.stats.dial_time.observe(started.elapsed());
                    }
                    let result = result.map(|o| {
                        info!(path = %self.node.transport.paths().kind_of(o.path), remote = %o.path.addr(), "connected");
                        let conn = self.register(o.conn, o.path, o.intro);
                        // Relayed: the path layer probes the candidates meanwhile.
                        let direct_later = o.path.is_relay() && !self.config.force_relay;
                        if let (true, Some(route)) = (direct_later, &conn.handle.pc.route) {
                            io.upgrade = Some(Box::pin(wait_direct(route.clone(), DIRECT_LATER)));
                        }
                        Dialled { conn, direct_later }
                    });
                    if let Err(e) = &result {
                        warn!("cannot connect to {}: {e}", self.peer);
                        self.node.peers.note_failure(self.peer.id, e.to_string());
                    }
                    machine.dialled(now(), result)
                }
                result = async { io.upgrade.as_mut().expect("guarded").await }, if io.upgrade.is_some() => {
                    io.upgrade = None;
                    machine.upgraded(now(), result)
                }
                changed = async { route_rx.as_mut().expect("guarded").changed().await }, if route_rx.is_some() => {
                    match (changed, &route) {
                        (Ok(()), Some((id, r))) => machine.path_changed(now(), *id, r.path()),
                        // The path layer is gone with its connection: its close comes next.
                        _ => {
                            route_rx = None;
                            Vec::new()
                        }
                    }
                }
                reason = async { live.as_ref().expect("guarded").1.closed().await }, if live.is_some() => {
                    match &reason {
                        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == close_code::NOT_AUTHORISED => {
                            error!("{}; give the peer's owner this side's id (`tunnel id`) to add with --allow", describe_close(&reason));
                        }
                        _ => warn!("connection lost: {}", describe_close(&reason)),
                    }
                    machine.closed(now(), live.as_ref().expect("guarded").0)
                }
                () = sleep_until_opt(deadline) => {
                    machine.timeout(now(), |h| h.pc.streams.get() > 0)
                }
                () = stop.cancelled(), if !machine.stopping() => {
                    machine.stop();
                    Vec::new()
                }
                () = self.node.abort.cancelled() => break,
            };
            self.apply(&mut io, actions);
            let path = machine.path();
            self.path
                .send_if_modified(|p| std::mem::replace(p, path) != path);
        }
        let actions = machine.finish();
        self.apply(&mut io, actions);
        self.path.send_replace(None);
    }

    fn apply(&self, io: &mut Io, actions: Vec<Action<Handle>>) {
        for action in actions {
            match action {
                Action::Dial => {
                    io.dial = Some(self.dial(true));
                    io.dial_started = Some(now());
                }
                Action::CancelDial => io.dial = None,
                Action::Upgrade => {
                    debug!("relayed: trying to punch a direct path");
                    io.upgrade = Some(self.upgrade());
                }
                Action::CancelUpgrade => io.upgrade = None,
                Action::Grant {
                    waiter,
                    conn,
                    generation,
                } => {
                    if let Some(reply) = io.replies.remove(&waiter) {
                        let lease = StreamLease {
                            generation,
                            ended: io.ended.clone(),
                            _on_conn: conn.pc.streams.hold(),
                        };
                        // A client that gave up drops the lease with the reply.
                        let _ = reply.send(Ok((conn.pc, lease)));
                    }
                }
                Action::Fail { waiter, error } => {
                    if let Some(reply) = io.replies.remove(&waiter) {
                        let _ = reply.send(Err(error));
                    }
                }
                Action::Close { conn, code, reason } => conn.pc.conn.close(code, reason),
                Action::Note(note) => match note {
                    Note::Switched(path) => {
                        info!(path = %path.kind(), remote = %path.addr(), "switching to the preferred connection with this peer")
                    }
                    // The path layer logged it (once, with both RTTs); the same connection.
                    Note::PathChanged { now, was } => {
                        debug!(path = %now.kind(), remote = %now.addr(), was = %was.kind(), "the session's connection moved")
                    }
                    Note::LastStreamEnded => debug!(
                        "last stream ended; closing in {:?} unless a client comes",
                        self.config.idle_grace
                    ),
                    Note::IdleClose => info!(
                        "closing the connection: idle for {:?}",
                        self.config.idle_grace
                    ),
                    Note::StillRelayed(e) => debug!("still no direct path: {e}"),
                },
            }
        }
    }

    /// The peer table's preferred connection with the peer (e.g. one the peer dialled).
    fn preferred(&self) -> Option<Conn<Handle>> {
        let pc = self.node.peers.preferred(&self.peer.id)?;
        Some(Conn {
            id: pc.conn.stable_id(),
            path: pc.path(),
            dialled: false,
            handle: Handle { pc, _dialled: None },
        })
    }

    /// Records a connection this session dialled; it carries the peer's streams too when
    /// this node exposes to it. Introduced, it gets its other paths (`multipath`).
    fn register(
        &self,
        conn: Connection,
        path: Path,
        intro: Option<Arc<Introduction>>,
    ) -> Conn<Handle> {
        let me = self.node.transport.identity().peer_id();
        let id = conn.stable_id();
        let fixed = self.config.force_relay;
        let route = intro.and_then(|i| {
            let candidates: &[std::net::SocketAddr] = if fixed { &[] } else { &i.candidates };
            crate::multipath::attach(
                self.node.transport.paths(),
                &conn,
                path,
                i.relay,
                candidates,
                Some(self.peer.id),
                fixed,
                self.node.abort.child_token(),
            )
        });
        let pc = self
            .node
            .peers
            .add(&self.node, self.peer.id, conn, me, path, route);
        self.node.serve_dialled(&pc, self.peer.id);
        Conn {
            id,
            path,
            dialled: true,
            handle: Handle {
                pc,
                _dialled: Some(Arc::new(self.node.stats.connection())),
            },
        }
    }

    /// While relayed, or after this host's addresses changed: a new introduction (no relay),
    /// whose candidates the live connection's path layer probes, with punches (the peer
    /// punches toward our new addresses); done when the connection is on a direct path.
    fn upgrade(&self) -> Boxed<()> {
        let node = self.node.clone();
        let peer = self.peer.id;
        let rendezvous = self.rendezvous.get().cloned();
        let route = self.node.peers.preferred(&peer).and_then(|pc| pc.route);
        Box::pin(async move {
            let (Some(rendezvous), Some(route)) = (rendezvous, route) else {
                return Err(ConnectError::Failed(
                    "this connection has no other path to try".into(),
                ));
            };
            let intro = rendezvous
                .introduce(peer, false)
                .await
                .ok_or(ConnectError::ShuttingDown)?;
            route.add_candidates(node.transport.paths(), &intro.candidates);
            node.tasks.spawn(crate::nat::dial::punch(
                node.transport.clone(),
                Arc::new(intro),
            ));
            wait_direct(route, DIRECT_LATER).await
        })
    }

    /// Dials the peer: at its address if it has one, else through the rendezvous (with a
    /// relay as a fallback when `relay`). Unbounded: the machine's deadline drops it.
    fn dial(&self, relay: bool) -> Boxed<Outcome> {
        let node = self.node.clone();
        let peer = self.peer.clone();
        let rendezvous = self.rendezvous.get().cloned();
        let direct = !self.config.force_relay;
        Box::pin(async move {
            match &peer.addr {
                Some(addr) => dial_address(&node.transport, peer.id, addr).await,
                None => dial_rendezvous(&node, rendezvous, peer.id, relay, direct).await,
            }
        })
    }
}

async fn dial_rendezvous(
    node: &NodeCtx,
    rendezvous: Option<RendezvousClient>,
    peer: PeerId,
    relay: bool,
    direct: bool,
) -> Result<Outcome, ConnectError> {
    let rendezvous = rendezvous.ok_or_else(|| {
        ConnectError::Failed(
            "the peer has no address: give PEER_ID@HOST:PORT, or --rendezvous HOST:PORT".into(),
        )
    })?;
    let intro = rendezvous
        .introduce(peer, relay)
        .await
        .ok_or(ConnectError::ShuttingDown)?;
    // The relay allocation is kept while the connection lives, whichever path won: it is
    // the path a dead direct one hands over to. It is released as soon as it is not needed:
    // at once when the dial failed, else when the connection closes (its quota is free
    // again then, not a minute later at the relay's idle timeout).
    let relay_token = intro.relay.map(|(_, token)| token);
    let intro = Arc::new(intro);
    let dialled = dial_introduced(
        node.transport.clone(),
        (*intro).clone(),
        DIRECT_DEADLINE,
        direct,
    )
    .await;
    if let Some(token) = relay_token {
        match &dialled {
            Ok((conn, _)) => {
                let conn = conn.clone();
                node.tasks.spawn(async move {
                    conn.closed().await;
                    // The close's own packets cross the relay first (or the peer would
                    // wait for its idle timeout): a few round trips, then the release.
                    let linger =
                        (conn.rtt() * 3 + Duration::from_millis(20)).min(Duration::from_secs(2));
                    tokio::time::sleep(linger).await;
                    rendezvous.release(token);
                });
            }
            _ => rendezvous.release(token),
        }
    }
    let (conn, path) = dialled.map_err(|e| ConnectError::Failed(e.to_string().into()))?;
    Ok(Outcome {
        conn,
        path,
        intro: Some(intro),
    })
}

async fn dial_address(
    transport: &Transport,
    peer: PeerId,
    host_port: &str,
) -> Result<Outcome, ConnectError> {
    let failed = |msg: String| ConnectError::Failed(msg.into());
    let addr = transport
        .resolve(host_port)
        .await
        .map_err(|e| failed(e.to_string()))?;
    debug!(%addr, "dialling");
    let conn = transport
        .connect(addr, peer)
        .await
        .map_err(|e| failed(e.to_string()))?;
    Ok(Outcome {
        conn,
        path: Path::Direct(addr),
        intro: None,
    })
}

/// Done when the connection's path layer moved it to a direct path, within `limit`.
async fn wait_direct(route: Arc<Entry>, limit: Duration) -> Result<(), ConnectError> {
    let mut rx = route.watch();
    let direct = tokio::time::timeout(limit, async {
        rx.wait_for(|p| !p.is_relay()).await.is_ok()
    })
    .await;
    match direct {
        Ok(true) => Ok(()),
        _ => Err(ConnectError::Failed(
            format!("no direct candidate answered within {limit:?}").into(),
        )),
    }
}
