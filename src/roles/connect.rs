//! The connecting role: local TCP listeners whose sockets become streams of one QUIC
//! connection to the remote peer, made lazily and kept through an idle grace period.
//!
//! A [`Session`] is a handle to one actor task per remote peer, which owns the connection:
//! it dials when the first client arrives (or at start with `eager`), hands the connection
//! to every later client, counts live streams with an [`IdleGrace`] and closes the connection
//! when the grace runs out. Dropping every handle ends the actor and closes the connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::Connection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, error, info, warn, Instrument};

use crate::config::{PeerAddr, ServiceName};
use crate::identity::PeerId;
use crate::node::NodeCtx;
use crate::protocol::close_code;
use crate::protocol::header::{encode_request, OpenRequest, Protocol};
use crate::roles::peers::PeerConn;
use crate::roles::{describe_close, sleep_until_opt};
use crate::session::backoff::Backoff;
use crate::session::idle::IdleGrace;
use crate::session::punch::Path;
use crate::stats::GaugeGuard;
use crate::transport::rtsp::{splice_rtsp, Facing, RtspCtx};
use crate::transport::splice::{abandoned, read_response, splice, Abort, Downstream, Report};

/// The connecting role's settings for one remote peer.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// How long an unused connection stays up after its last stream ends.
    pub idle_grace: Duration,
    /// How long a client waits for the connection (the handshake is bounded by it too).
    pub connect_timeout: Duration,
    /// How long to wait for the exposing side's answer to a stream header.
    pub open_timeout: Duration,
    /// Connect at start and stay connected (reconnect with backoff), ignoring the grace.
    pub eager: bool,
    /// Through the rendezvous, use only the relay (diagnosis; never punch).
    pub force_relay: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            idle_grace: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(20),
            eager: false,
            force_relay: false,
        }
    }
}

/// Why a client could not get a connection.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Failed(Arc<str>),
    #[error(
        "no connection within {0:?}: is `tunnel expose` running there, and does UDP reach it?"
    )]
    Timeout(Duration),
    #[error("shutting down")]
    ShuttingDown,
}

type Reply = oneshot::Sender<Result<(PeerConn, StreamLease), ConnectError>>;

/// Holds one stream on a connection's idle count (and on its count of streams in both
/// directions); dropping it reports the stream's end.
#[derive(Debug)]
pub struct StreamLease {
    generation: u64,
    ended: mpsc::UnboundedSender<u64>,
    _on_conn: GaugeGuard,
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        let _ = self.ended.send(self.generation);
    }
}

/// A handle to the connection with one remote peer. Cloning is cheap.
#[derive(Clone)]
pub struct Session {
    peer: Arc<PeerAddr>,
    config: Arc<SessionConfig>,
    requests: mpsc::Sender<Reply>,
    node: NodeCtx,
    path: tokio::sync::watch::Receiver<Option<Path>>,
    /// Each service's protocol, as the exposing side last answered.
    protocols: Arc<std::sync::Mutex<HashMap<ServiceName, Protocol>>>,
}

impl Session {
    pub(crate) fn start(peer: PeerAddr, config: SessionConfig, node: NodeCtx) -> Session {
        let (tx, rx) = mpsc::channel(1024);
        let (path_tx, path) = tokio::sync::watch::channel(None);
        let actor = Actor {
            peer: peer.clone(),
            config: config.clone(),
            node: node.clone(),
            path: path_tx,
        };
        let span = tracing::info_span!("session", peer = %peer.id);
        node.tasks.spawn(actor.run(rx).instrument(span));
        Session {
            peer: Arc::new(peer),
            config: Arc::new(config),
            requests: tx,
            node,
            path,
            protocols: Arc::default(),
        }
    }

    /// The path new streams take now, or `None` when there is no connection.
    pub fn path(&self) -> Option<Path> {
        *self.path.borrow()
    }

    pub fn peer(&self) -> &PeerAddr {
        &self.peer
    }

    /// The live connection (dialled now if there is none) and a lease on its idle count.
    pub async fn acquire(&self) -> Result<(Connection, StreamLease), ConnectError> {
        let (pc, lease) = self.acquire_peer_conn().await?;
        Ok((pc.conn, lease))
    }

    async fn acquire_peer_conn(&self) -> Result<(PeerConn, StreamLease), ConnectError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(tx)
            .await
            .map_err(|_| ConnectError::ShuttingDown)?;
        rx.await.map_err(|_| ConnectError::ShuttingDown)?
    }

    /// Serves a bound local listener: each accepted socket becomes a stream to `service`.
    /// Runs until the node stops accepting; the listener is closed when it returns.
    pub(crate) async fn serve_local(self, listener: TcpListener, service: ServiceName) {
        static NEXT_LOCAL_ID: AtomicU64 = AtomicU64::new(1);
        let local = listener
            .local_addr()
            .map_or_else(|e| e.to_string(), |a| a.to_string());
        info!(%local, %service, "listening");
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                () = self.node.stop.cancelled() => break,
            };
            match accepted {
                Ok((tcp, client)) => {
                    let id = NEXT_LOCAL_ID.fetch_add(1, Ordering::Relaxed);
                    let span = tracing::info_span!("client", local_id = id, %client, %service, stream = tracing::field::Empty);
                    let this = self.clone();
                    let service = service.clone();
                    self.node
                        .tasks
                        .spawn(this.serve_client(tcp, client, service).instrument(span));
                }
                Err(e) => {
                    // Typically out of file descriptors: back off rather than spin.
                    error!(%local, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        debug!(%local, "listener closed");
    }

    async fn serve_client(self, tcp: TcpStream, client: SocketAddr, service: ServiceName) {
        let _live = self.node.stats.stream();
        let _ = tcp.set_nodelay(true);
        let acquired =
            tokio::time::timeout(self.config.connect_timeout, self.acquire_peer_conn()).await;
        let (pc, _lease) = match acquired {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return warn!("closing the client: cannot reach peer {}: {e}", self.peer),
            Err(_) => {
                let e = ConnectError::Timeout(self.config.connect_timeout);
                return warn!("closing the client: cannot reach peer {}: {e}", self.peer);
            }
        };
        // Waits while the peer's limit of concurrent streams is reached: backpressure.
        let (mut send, mut recv) = match pc.conn.open_bi().await {
            Ok(pair) => pair,
            Err(e) => return warn!("closing the client: {}", describe_close(&e)),
        };
        tracing::Span::current().record("stream", u64::from(send.id()));
        let header = encode_request(&OpenRequest {
            service: service.as_str().to_owned(),
            client_addr: Some(client.to_string()),
        })
        .expect("service names are validated when the rules are read");
        if let Err(e) = send.write_chunk(Bytes::from(header)).await {
            return warn!("closing the client: stream failed: {e}");
        }
        let limit = self.config.open_timeout;
        // The service's protocol picks the layer: known from an earlier stream, the
        // response is read alongside; else it is read before the client's bytes are.
        let known = self.protocols().get(&service).copied();
        let (protocol, downstream) = match known {
            Some(expect) => (expect, Downstream::AwaitResponse { limit, expect }),
            None => match read_response(&mut recv, limit).await {
                Ok((protocol, first)) => {
                    self.protocols().insert(service.clone(), protocol);
                    (protocol, Downstream::Payload(first))
                }
                Err(abort) => {
                    let report = abandoned(abort, &tcp, &mut send, &mut recv);
                    return self.log_report(&service, report);
                }
            },
        };
        let cancel = self.node.abort.clone();
        let report = match protocol {
            Protocol::Tcp => splice(tcp, send, recv, downstream, cancel).await,
            Protocol::Rtsp(udp) => {
                let ctx = RtspCtx {
                    facing: Facing::Client,
                    udp,
                    mux: pc.media.clone(),
                    stats: self.node.stats.clone(),
                };
                splice_rtsp(tcp, send, recv, downstream, ctx, cancel).await
            }
        };
        self.log_report(&service, report);
    }

    /// Each service's protocol, as the exposing side last answered.
    fn protocols(&self) -> std::sync::MutexGuard<'_, HashMap<ServiceName, Protocol>> {
        self.protocols.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn log_report(&self, service: &ServiceName, report: Report) {
        match report.abort {
            None => debug!(up = report.up, down = report.down, "stream closed"),
            Some(Abort::ProtocolChanged { now, .. }) => {
                warn!(
                    "the service's protocol is now {now}; the client was closed and should retry"
                );
                self.protocols().insert(service.clone(), now);
            }
            Some(Abort::Refused { status, message }) => {
                warn!("the peer refused the stream ({status}): {message}")
            }
            Some(Abort::ConnectionLost(e)) => warn!(
                up = report.up,
                down = report.down,
                "stream aborted: {}",
                describe_close(&e)
            ),
            Some(abort) => info!(
                up = report.up,
                down = report.down,
                "stream aborted: {abort}"
            ),
        }
    }
}

/// The task that owns the connection to one peer.
struct Actor {
    peer: PeerAddr,
    config: SessionConfig,
    node: NodeCtx,
    path: tokio::sync::watch::Sender<Option<Path>>,
}

struct Live {
    pc: PeerConn,
    grace: IdleGrace,
    generation: u64,
    /// Counted in the node's connections when this session dialled it (an adopted incoming
    /// connection is counted by the expose role).
    dialled: Option<GaugeGuard>,
}

impl Live {
    fn lease(&mut self, ended: &mpsc::UnboundedSender<u64>) -> (PeerConn, StreamLease) {
        self.grace.stream_opened();
        let lease = StreamLease {
            generation: self.generation,
            ended: ended.clone(),
            _on_conn: self.pc.streams.hold(),
        };
        (self.pc.clone(), lease)
    }
}

type Dial =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Dialled, ConnectError>> + Send>>;

/// A dial's connection, and the direct handshakes still under way when the relay won.
struct Dialled {
    conn: Connection,
    path: Path,
    direct_later: Option<Dial>,
}

/// Without a direct path by then, the relay is tried as well.
const DIRECT_DEADLINE: Duration = Duration::from_millis(600);
/// How long the direct handshakes of a dial the relay won may still complete: the punch
/// window (3 s) and quinn's Initial retransmissions within it.
const DIRECT_LATER: Duration = Duration::from_secs(5);
/// While relayed, how often to try punching a direct path again.
const UPGRADE_EVERY: Duration = Duration::from_secs(10);

impl Actor {
    async fn run(self, mut requests: mpsc::Receiver<Reply>) {
        let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<u64>();
        let mut table = self.node.peers.subscribe();
        let mut live: Option<Live> = None;
        let mut dial: Option<Dial> = None;
        let mut upgrade: Option<Dial> = None;
        let mut upgrade_at: Option<Instant> = None;
        let mut waiters: Vec<Reply> = Vec::new();
        let mut generation = 0u64;
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut redial_at: Option<Instant> = None;
        if self.config.eager {
            dial = Some(self.dial(true));
        }
        loop {
            let idle_deadline = match &live {
                Some(l) if !self.config.eager => l.grace.deadline().map(Instant::from_std),
                _ => None,
            };
            tokio::select! {
                request = requests.recv() => {
                    let Some(reply) = request else { break };
                    if live.is_none() {
                        live = self.adopt(&mut generation);
                    }
                    match &mut live {
                        Some(l) => {
                            let _ = reply.send(Ok(l.lease(&ended_tx)));
                        }
                        None => {
                            if self.node.stop.is_cancelled() {
                                let _ = reply.send(Err(ConnectError::ShuttingDown));
                                continue;
                            }
                            waiters.push(reply);
                            if dial.is_none() {
                                redial_at = None;
                                dial = Some(self.dial(true));
                            }
                        }
                    }
                }
                Some(ended) = ended_rx.recv() => {
                    if let Some(l) = live.as_mut().filter(|l| l.generation == ended) {
                        l.grace.stream_ended(std::time::Instant::now());
                        if l.grace.active() == 0 && !self.config.eager {
                            debug!("last stream ended; closing in {:?} unless a client comes", self.config.idle_grace);
                        }
                    }
                }
                changed = table.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    // Another connection with the peer became the preferred one (the peer
                    // dialled too, or a direct path replaced the relay): new streams go there.
                    let preferred = self.node.peers.preferred(&self.peer.id);
                    if let (Some(l), Some(p)) = (&live, &preferred) {
                        if l.pc.conn.stable_id() != p.conn.stable_id() {
                            info!(path = %p.path.kind(), remote = %p.path.addr(), "switching to the preferred connection with this peer");
                            live = self.adopt(&mut generation);
                        }
                    }
                }
                result = async { dial.as_mut().expect("guarded").await }, if dial.is_some() => {
                    dial = None;
                    match result {
                        Ok(Dialled { conn, path, direct_later }) => {
                            backoff.succeeded();
                            info!(path = %path.kind(), remote = %path.addr(), "connected");
                            let mut l = self.register(conn, path, &mut generation);
                            for reply in waiters.drain(..) {
                                // A client that gave up drops the lease with the reply.
                                let _ = reply.send(Ok(l.lease(&ended_tx)));
                            }
                            // Relayed: the direct handshakes of this dial go on; without
                            // them, a fresh punch later.
                            upgrade_at = None;
                            if direct_later.is_some() {
                                upgrade = direct_later;
                            } else if path.is_relay() {
                                upgrade_at = Some(Instant::now() + UPGRADE_EVERY);
                            }
                            live = Some(l);
                        }
                        Err(e) => {
                            warn!("cannot connect to {}: {e}", self.peer);
                            for reply in waiters.drain(..) {
                                let _ = reply.send(Err(e.clone()));
                            }
                            if self.config.eager && !self.node.stop.is_cancelled() {
                                redial_at = Some(Instant::now() + backoff.failed());
                            }
                        }
                    }
                }
                () = sleep_until_opt(upgrade_at), if upgrade.is_none() => {
                    upgrade_at = None;
                    if live.as_ref().is_some_and(|l| l.pc.path.is_relay()) && !self.config.force_relay {
                        debug!("relayed: trying to punch a direct path");
                        upgrade = Some(self.dial(false));
                    }
                }
                result = async { upgrade.as_mut().expect("guarded").await }, if upgrade.is_some() => {
                    upgrade = None;
                    match (result, live.take()) {
                        (Ok(Dialled { conn, path, .. }), Some(old)) => {
                            info!(path = %path.kind(), remote = %path.addr(), was = %old.pc.path.kind(), "path changed: new streams use the direct path");
                            let mut l = self.register(conn, path, &mut generation);
                            // The relayed connection is no longer preferred: the peer table
                            // closes it when its last stream ends. The idle clock carries over.
                            if old.grace.active() == 0 {
                                l.grace = old.grace.clone();
                            }
                            live = Some(l);
                        }
                        (Ok(Dialled { conn, .. }), None) => conn.close(close_code::IDLE, b"not needed"),
                        (Err(e), old) => {
                            debug!("still no direct path: {e}");
                            live = old;
                            upgrade_at = Some(Instant::now() + UPGRADE_EVERY);
                        }
                    }
                }
                () = sleep_until_opt(idle_deadline) => {
                    if let Some(mut l) = live.take() {
                        if l.pc.streams.get() > 0 {
                            // The peer still has streams on it (it dialled, or it exposes too).
                            l.grace = IdleGrace::new(self.config.idle_grace, std::time::Instant::now());
                            live = Some(l);
                        } else {
                            info!("closing the connection: idle for {:?}", self.config.idle_grace);
                            l.pc.conn.close(close_code::IDLE, b"idle");
                            upgrade = None;
                            upgrade_at = None;
                        }
                    }
                }
                reason = async { live.as_ref().expect("guarded").pc.conn.closed().await }, if live.is_some() => {
                    live = None;
                    upgrade = None;
                    upgrade_at = None;
                    match &reason {
                        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == close_code::NOT_AUTHORISED => {
                            error!("{}; give the peer's owner this side's id (`tunnel id`) to add with --allow", describe_close(&reason));
                        }
                        _ => warn!("connection lost: {}", describe_close(&reason)),
                    }
                    if self.config.eager && !self.node.stop.is_cancelled() {
                        redial_at = Some(Instant::now() + backoff.failed());
                    }
                }
                () = sleep_until_opt(redial_at) => {
                    redial_at = None;
                    if dial.is_none() && live.is_none() {
                        dial = Some(self.dial(true));
                    }
                }
                () = self.node.abort.cancelled() => break,
            }
            let now = live.as_ref().map(|l| l.pc.path);
            self.path
                .send_if_modified(|p| std::mem::replace(p, now) != now);
        }
        self.path.send_replace(None);
        if let Some(l) = live {
            if l.dialled.is_some() {
                l.pc.conn.close(close_code::SHUTDOWN, b"shutting down");
            }
        }
        for reply in waiters {
            let _ = reply.send(Err(ConnectError::ShuttingDown));
        }
    }

    /// The preferred existing connection with the peer, if any (e.g. one the peer dialled).
    fn adopt(&self, generation: &mut u64) -> Option<Live> {
        let pc = self.node.peers.preferred(&self.peer.id)?;
        *generation += 1;
        debug!(remote = %pc.conn.remote_address(), "using an existing connection with this peer");
        Some(Live {
            pc,
            grace: IdleGrace::new(self.config.idle_grace, std::time::Instant::now()),
            generation: *generation,
            dialled: None,
        })
    }

    /// Records a connection this session dialled; it carries the peer's streams too when
    /// this node exposes to it.
    fn register(&self, conn: Connection, path: Path, generation: &mut u64) -> Live {
        *generation += 1;
        let me = self.node.transport.identity().peer_id();
        let pc = self
            .node
            .peers
            .add(&self.node, self.peer.id, conn, me, path);
        match self.node.expose.get().and_then(|w| w.upgrade()) {
            Some(expose) => expose.serve_outgoing(pc.clone(), self.peer.id),
            None => pc
                .conn
                .set_max_concurrent_bi_streams(quinn::VarInt::from_u32(0)),
        }
        Live {
            pc,
            grace: IdleGrace::new(self.config.idle_grace, std::time::Instant::now()),
            generation: *generation,
            dialled: Some(self.node.stats.connection()),
        }
    }

    /// Dials the peer: at its address if it has one, else through the rendezvous (with a
    /// relay as a fallback when `relay`).
    fn dial(&self, relay: bool) -> Dial {
        let node = self.node.clone();
        let peer = self.peer.clone();
        let limit = self.config.connect_timeout;
        let direct = !self.config.force_relay;
        Box::pin(async move {
            let attempt = async {
                match &peer.addr {
                    Some(addr) => dial_address(node.transport.clone(), peer.id, addr).await,
                    None => dial_rendezvous(&node, peer.id, relay, direct).await,
                }
            };
            tokio::time::timeout(limit, attempt).await.map_err(|_| match peer.addr {
                Some(_) => ConnectError::Timeout(limit),
                None => ConnectError::Failed(
                    format!("no path to {} within {limit:?}: is `tunnel expose` running there with the same --rendezvous?", peer.id).into(),
                ),
            })?
        })
    }
}

async fn dial_rendezvous(
    node: &NodeCtx,
    peer: PeerId,
    relay: bool,
    direct: bool,
) -> Result<Dialled, ConnectError> {
    let rendezvous = node.rendezvous.get().cloned().ok_or_else(|| {
        ConnectError::Failed(
            "the peer has no address: give PEER_ID@HOST:PORT, or --rendezvous HOST:PORT".into(),
        )
    })?;
    let intro = rendezvous
        .introduce(peer, relay)
        .await
        .ok_or(ConnectError::ShuttingDown)?;
    let (conn, path, later) = crate::rendezvous::client::dial_introduced(
        node.transport.clone(),
        intro,
        DIRECT_DEADLINE,
        direct,
    )
    .await
    .map_err(|e| ConnectError::Failed(e.into()))?;
    let direct_later = later.map(|later| -> Dial {
        Box::pin(async move {
            match tokio::time::timeout(DIRECT_LATER, later).await {
                Ok(Ok((conn, path))) => Ok(Dialled {
                    conn,
                    path,
                    direct_later: None,
                }),
                Ok(Err(e)) => Err(ConnectError::Failed(e.into())),
                Err(_) => Err(ConnectError::Timeout(DIRECT_LATER)),
            }
        })
    });
    Ok(Dialled {
        conn,
        path,
        direct_later,
    })
}

async fn dial_address(
    transport: crate::transport::Transport,
    peer: PeerId,
    host_port: &str,
) -> Result<Dialled, ConnectError> {
    let failed = |msg: String| ConnectError::Failed(msg.into());
    let local = transport.local_addr().map_err(|e| failed(e.to_string()))?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(host_port)
        .await
        .map_err(|e| failed(format!("cannot resolve {host_port}: {e}")))?
        .collect();
    // An IPv4 socket cannot reach IPv6 addresses; a dual-stack IPv6 socket reaches both.
    let addr = addrs
        .iter()
        .find(|a| local.is_ipv6() || a.is_ipv4())
        .copied()
        .ok_or_else(|| {
            failed(format!(
                "{host_port} has no address this socket ({local}) can reach"
            ))
        })?;
    debug!(%addr, "dialling");
    let conn = transport.connect(addr, peer).await.map_err(failed)?;
    Ok(Dialled {
        conn,
        path: Path::Direct(addr),
        direct_later: None,
    })
}
