//! A node: one process's QUIC endpoint, the roles it plays, their tasks, and the drain.
//!
//! Every task a node starts lives in its [`TaskTracker`]. Two tokens order the shutdown
//! (see `docs/architecture.md`): `stop` ends accepting (listeners close, new streams are
//! answered "busy", new connections refused), then live streams get until the drain deadline
//! to finish, then `abort` resets what is left, the endpoint closes every connection with a
//! reason, and the node waits for its tasks and for the close to reach the peers.

mod control;
mod drain;
mod metrics;

pub use control::ControlError;

/// What reloads the rules (SIGHUP, `tunnel reload`): how many peers it disconnected, or why
/// nothing changed.
type Reloader = Arc<std::sync::Mutex<Option<Box<dyn FnMut() -> Result<usize, String> + Send>>>>;

/// Peer names by id, in the order the role gave them.
type Names = Arc<std::sync::Mutex<Vec<(PeerId, String)>>>;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::config::{PeerAddr, ServiceName};
use crate::connect::router::Router;
use crate::connect::{Session, SessionConfig};
use crate::expose::{Authorized, Expose, ExposeConfig};
use crate::identity::{Identity, PeerId};
use crate::nat::client::{Consent, RendezvousClient};
use crate::nat::dial::punch;
use crate::nat::server::broker::Admission;
use crate::nat::server::{Rendezvous, RendezvousConfig};
use crate::protocol::close_code;
use crate::quic::accept::{accept_loop, Serve};
use crate::quic::{Transport, TransportError, Tuning};
use crate::runtime::peers::PeerTable;
use crate::runtime::{NodeCtx, StreamServer};
use crate::stats::Stats;

/// One endpoint and the roles played on it.
pub struct Node {
    ctx: NodeCtx,
    /// Set when the node registers with a rendezvous; sessions dial through it.
    rendezvous: Arc<OnceLock<RendezvousClient>>,
    /// The roles that accept connections (the endpoint routes to them by ALPN, weakly).
    roles: std::sync::Mutex<Vec<Arc<dyn Serve>>>,
    /// The exposing role, when this node exposes (for reloads).
    exposing: OnceLock<Arc<Expose>>,
    /// The rendezvous role, when this node is one (for reloads).
    rendezvous_role: OnceLock<Arc<Rendezvous>>,
    /// The role's reload, once it has one.
    reloader: Reloader,
    /// What the role calls its peers (connect's `--peer NAME=`, expose's rules), for status.
    names: Names,
    started: std::time::Instant,
}

impl Node {
    /// Binds the node's one UDP socket.
    pub fn bind(
        addr: SocketAddr,
        identity: Arc<Identity>,
        tuning: Tuning,
    ) -> Result<Self, TransportError> {
        let me = identity.peer_id();
        let transport = Transport::bind(addr, identity, tuning)?;
        let node = Node {
            ctx: NodeCtx {
                transport,
                stats: Arc::new(Stats::default()),
                stop: CancellationToken::new(),
                abort: CancellationToken::new(),
                tasks: TaskTracker::new(),
                server: Arc::default(),
                peers: Arc::new(PeerTable::new(me)),
            },
            rendezvous: Arc::default(),
            roles: Default::default(),
            exposing: OnceLock::new(),
            rendezvous_role: OnceLock::new(),
            reloader: Reloader::default(),
            names: Names::default(),
            started: std::time::Instant::now(),
        };
        node.ctx.tasks.spawn(accept_loop(
            node.ctx.transport.clone(),
            node.ctx.tasks.clone(),
            node.ctx.stop.clone(),
            node.ctx.abort.clone(),
        ));
        Ok(node)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.ctx.transport.local_addr()
    }

    pub fn peer_id(&self) -> PeerId {
        self.ctx.transport.identity().peer_id()
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.ctx.stats
    }

    /// Starts serving allowed peers' streams to the services in `config`.
    pub fn expose(&self, config: ExposeConfig) -> Result<(), TransportError> {
        if matches!(config.authorized, Authorized::Any) {
            tracing::warn!(
                "--allow-any: ANY peer that can reach this port may use every exposed service"
            );
        }
        let expose = Expose::new(config, self.ctx.clone())
            .map_err(|e| TransportError::Quic(e.to_string()))?;
        let server: Arc<dyn StreamServer> = expose.clone();
        if self.ctx.server.set(Arc::downgrade(&server)).is_err() {
            return Err(TransportError::Quic("this node exposes already".into()));
        }
        let _ = self.exposing.set(expose.clone());
        self.accept(crate::protocol::ALPN, expose)
    }

    /// On every SIGHUP until the node stops, takes new exposing rules from `reload` (which
    /// reads the rules file again): new streams follow them at once, open streams keep going,
    /// peers no longer allowed are disconnected with a reason. Rules that cannot be read or
    /// used are reported, and the old ones stay.
    pub fn reload_on_sighup(
        &self,
        mut reload: impl FnMut() -> Result<ExposeConfig, String> + Send + 'static,
    ) {
        let Some(expose) = self.exposing.get().cloned() else {
            return;
        };
        self.on_sighup(move || {
            let closed = reload().and_then(|c| expose.reload(c).map_err(|e| e.to_string()))?;
            Ok(closed)
        });
    }

    /// On every SIGHUP until the node stops, takes the rendezvous's new admission rules from
    /// `reload` (the allow list read again): peers no longer admitted are disconnected. A
    /// list that cannot be read is reported, and the old one stays.
    pub fn reload_rendezvous_on_sighup(
        &self,
        mut reload: impl FnMut() -> Result<Admission, String> + Send + 'static,
    ) {
        let Some(server) = self.rendezvous_role.get().cloned() else {
            return;
        };
        self.on_sighup(move || Ok(server.set_admission(reload()?)));
    }

    /// Makes `apply` the node's reload, run on every SIGHUP until the node stops and on
    /// `tunnel reload`; it returns how many peers it disconnected, or why nothing changed.
    fn on_sighup(&self, apply: impl FnMut() -> Result<usize, String> + Send + 'static) {
        use tokio::signal::unix::{signal, SignalKind};
        *self.reloader.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(apply));
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => return tracing::error!("cannot watch SIGHUP, rules will not reload: {e}"),
        };
        let stop = self.ctx.stop.clone();
        let reloader = self.reloader.clone();
        self.ctx.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = hangup.recv() => {}
                    () = stop.cancelled() => return,
                }
                info!("SIGHUP: reading the rules again");
                let mut apply = reloader.lock().unwrap_or_else(|p| p.into_inner());
                let Some(apply) = apply.as_mut() else {
                    continue;
                };
                match apply() {
                    Ok(closed) => info!(disconnected = closed, "rules reloaded"),
                    Err(e) => tracing::error!("rules not reloaded, the old ones stay: {e}"),
                }
            }
        });
    }

    /// Registers with the rendezvous at `server` (HOST:PORT) and stays registered. When this
    /// node exposes, peers it allows can then reach it through their NATs: each introduction
    /// they ask for makes this node punch toward them.
    pub fn register(&self, server: String) -> RendezvousClient {
        let rules = self.ctx.clone();
        let consent: Consent =
            Arc::new(move |peer: &PeerId| rules.server().is_some_and(|s| s.allows(peer)));
        let (client, mut introductions) =
            RendezvousClient::start(server, self.ctx.clone(), consent);
        let _ = self.rendezvous.set(client.clone());
        let ctx = self.ctx.clone();
        self.ctx.tasks.spawn(async move {
            loop {
                let intro = tokio::select! {
                    i = introductions.recv() => i,
                    () = ctx.abort.cancelled() => return,
                };
                let Some(intro) = intro else { return };
                match ctx.server().map(|s| s.allows(&intro.peer)) {
                    Some(true) => {
                        info!(peer = %intro.peer, candidates = ?intro.candidates, relay = intro.relay.is_some(), "introduced: punching");
                        let noted = crate::runtime::peers::Intro {
                            peer: intro.peer,
                            candidates: intro.candidates.clone(),
                            relay: intro.relay,
                        };
                        ctx.peers.note_intro(Arc::new(noted), ctx.transport.paths());
                        let intro = Arc::new(intro);
                        ctx.tasks.spawn(punch(ctx.transport.clone(), intro));
                    }
                    // Accepted, then the rules changed (a reload) before the introduction came.
                    Some(false) => tracing::info!(peer = %intro.peer, "introduced to a peer no longer allowed here: ignored"),
                    None => tracing::debug!(peer = %intro.peer, "introduction ignored: this node exposes nothing"),
                }
            }
        });
        client
    }

    /// Serves as a rendezvous (and relay) for other nodes.
    pub fn serve_rendezvous(&self, config: RendezvousConfig) -> Result<(), TransportError> {
        let server = Rendezvous::new(config, self.ctx.clone())
            .map_err(|e| TransportError::Quic(e.to_string()))?;
        if self.rendezvous_role.set(server.clone()).is_err() {
            return Err(TransportError::Quic(
                "this node is a rendezvous already".into(),
            ));
        }
        self.accept(crate::protocol::rendezvous::ALPN, server)
    }

    /// Serves TCP links (for peers whose network drops UDP) on `listeners`; a rendezvous only.
    pub fn serve_links(&self, listeners: Vec<tokio::net::TcpListener>) {
        let Some(server) = self.rendezvous_role.get().cloned() else {
            return;
        };
        for listener in listeners {
            let (ctx, tasks, server) = (self.ctx.clone(), self.ctx.tasks.clone(), server.clone());
            self.ctx.tasks.spawn(async move {
                crate::connect::accept_clients(listener, &ctx, |tcp, from| {
                    tasks.spawn(server.clone().serve_link(tcp, from));
                })
                .await
            });
        }
    }

    /// Keeps `role` and routes the connections that negotiate `alpn` to it.
    fn accept(&self, alpn: &[u8], role: Arc<dyn Serve>) -> Result<(), TransportError> {
        self.ctx.transport.serve(alpn, &role)?;
        self.roles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(role);
        Ok(())
    }

    /// Names the role's peers for `tunnel status` (replacing earlier names).
    pub fn name_peers(&self, names: impl IntoIterator<Item = (PeerId, String)>) {
        *self.names.lock().unwrap_or_else(|p| p.into_inner()) = names.into_iter().collect();
    }

    /// Who dialled each live connection with `peer` (normally one).
    pub fn connections_with(&self, peer: &PeerId) -> Vec<PeerId> {
        self.ctx.peers.initiators(peer)
    }

    /// Peers registered with this node's rendezvous role now.
    pub fn rendezvous_peers(&self) -> usize {
        self.ctx
            .stats
            .rendezvous_peers
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A session with a remote peer; it connects on the first client (or now if `eager`).
    pub fn connect(&self, peer: PeerAddr, config: SessionConfig) -> Session {
        Session::start(peer, config, self.ctx.clone(), self.rendezvous.clone())
    }

    /// Serves a bound local TCP listener through `session` to the remote `service`.
    pub fn serve_local(&self, session: &Session, listener: TcpListener, service: ServiceName) {
        self.ctx
            .tasks
            .spawn(session.clone().serve_local(listener, service));
    }

    /// Serves `--http`: every web service of the router's peers on one listener.
    pub fn serve_http(&self, router: Arc<Router>, listener: TcpListener) {
        self.ctx.tasks.spawn(crate::connect::serve_router(
            router,
            listener,
            self.ctx.clone(),
        ));
    }

    /// Serves `--rtsp`: every RTSP service of the router's peers on one listener.
    pub fn serve_rtsp(&self, router: Arc<Router>, listener: TcpListener) {
        self.ctx.tasks.spawn(crate::connect::router::serve_rtsp(
            router,
            listener,
            self.ctx.clone(),
        ));
    }

    /// Prints a `ready:` line for each service of the router's peers once its peer answers.
    pub fn announce_ready(&self, router: Arc<Router>, at: crate::connect::router::Entrances) {
        self.ctx
            .tasks
            .spawn(router.announce_ready(at, self.ctx.stop.clone()));
    }

    /// The status object (`docs/status.md`) on demand, for pages that show it.
    pub fn status_source(&self, role: &'static str) -> crate::connect::router::StatusFn {
        let view = self.control_view(role);
        Arc::new(move || view.status())
    }

    /// Drains and stops: stop accepting, let live streams finish for up to `drain`, reset the
    /// rest, close every connection with a reason, and wait for every task.
    pub async fn shutdown(self, drain: Duration) {
        let ctx = self.ctx;
        ctx.stop.cancel();
        let live = ctx.stats.streams.get();
        info!(
            connections = ctx.stats.connections.get(),
            streams = live,
            rtsp_sessions = ctx.stats.rtsp_sessions.get(),
            media_flows = ctx.stats.media_flows.get(),
            media_datagrams = ctx.stats.media_datagrams.get(),
            media_overflow = ctx.stats.media_overflow.get(),
            rtp_requested = ctx.stats.rtp_requested.get(),
            rtp_resent = ctx.stats.rtp_resent.get(),
            rtp_repaired = ctx.stats.rtp_repaired.get(),
            rtp_parities = ctx.stats.rtp_parities.get(),
            rtp_rebuilt = ctx.stats.rtp_rebuilt.get(),
            "stopping"
        );
        if live > 0 {
            info!(
                live,
                "draining: waiting up to {drain:?} for live streams to finish"
            );
        }
        if !ctx.stats.streams.wait_for(drain, |n| *n == 0).await {
            info!(
                left = ctx.stats.streams.get(),
                "drain deadline reached: resetting what is left"
            );
        }
        ctx.abort.cancel();
        let endpoint = ctx.transport.endpoint().clone();
        endpoint.close(close_code::SHUTDOWN, b"shutting down");
        ctx.tasks.close();
        if tokio::time::timeout(Duration::from_secs(2), ctx.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not end within 2 s of the shutdown");
        }
        // Lets the CONNECTION_CLOSE frames go out, bounded.
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }
}
