//! The connecting role: local TCP listeners whose sockets become streams of one QUIC
//! connection to the remote peer, made lazily and kept through an idle grace period.
//!
//! A [`Session`] is a handle to one task per remote peer ([`driver`]), which owns the
//! connection; what it does is decided by a pure state machine ([`machine`]): it dials when
//! the first client arrives (or at start with `eager`), hands the connection to every later
//! client, counts live streams with an [`idle::IdleGrace`] and closes the connection when the
//! grace runs out. Dropping every handle ends the task and closes the connection.
//!
//! This module holds the handle and the local listeners: each accepted socket becomes a
//! stream; it writes the header, and `runtime::forward` picks the layer the answer names.

mod driver;
pub mod idle;
pub mod machine;
pub mod router;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn, Instrument};

use crate::config::{PeerAddr, ServiceName};
use crate::http;
use crate::http::proxy::{HttpCtx, Key, OpenFailure, Routed, Upstream, Upstreams};
use crate::identity::PeerId;
use crate::nat::client::RendezvousClient;
use crate::protocol::catalog::{self, Catalog};
use crate::protocol::header::{
    encode_request, HttpService, Op, OpenRequest, OpenResponse, Protocol, Status,
};
use crate::protocol::stream_code;
use crate::quic::close::describe_close;
use crate::quic::path::Path;
use crate::rtsp::policy::Facing;
use crate::runtime::forward::{forward, Named};
use crate::runtime::peers::PeerConn;
use crate::runtime::NodeCtx;
use crate::stats::GaugeGuard;
use crate::tunnel::splice::{abandoned, read_response, Abort, Downstream, Report};

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
    #[error("no path to {peer} within {limit:?}: the rendezvous has not introduced it; is `tunnel expose` running there with the same --rendezvous, and does it allow this peer's id?")]
    NoPath { peer: PeerId, limit: Duration },
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
    /// What the user calls the peer (`--peer NAME=ID`), for pages and logs.
    name: Arc<str>,
    config: Arc<SessionConfig>,
    requests: mpsc::Sender<Reply>,
    node: NodeCtx,
    path: tokio::sync::watch::Receiver<Option<Path>>,
    /// What each service speaks, as the exposing side last answered.
    known: Arc<std::sync::Mutex<HashMap<ServiceName, Known>>>,
}

/// What the exposing side last said a service speaks: its protocol, and for an HTTP service
/// how to speak to its device (later streams then send their first request at once).
#[derive(Debug, Clone)]
struct Known {
    protocol: Protocol,
    http: Option<HttpService>,
}

impl Session {
    pub(crate) fn start(
        peer: PeerAddr,
        config: SessionConfig,
        node: NodeCtx,
        rendezvous: Arc<OnceLock<RendezvousClient>>,
    ) -> Session {
        let (tx, rx) = mpsc::channel(1024);
        let (path_tx, path) = tokio::sync::watch::channel(None);
        let driver = driver::Driver {
            peer: Arc::new(peer.clone()),
            config: config.clone(),
            node: node.clone(),
            rendezvous,
            path: path_tx,
        };
        let span = tracing::info_span!("session", peer = %peer.id);
        node.tasks.spawn(driver.run(rx).instrument(span));
        Session {
            name: peer.id.to_string().into(),
            peer: Arc::new(peer),
            config: Arc::new(config),
            requests: tx,
            node,
            path,
            known: Arc::default(),
        }
    }

    /// The path new streams take now, or `None` when there is no connection.
    pub fn path(&self) -> Option<Path> {
        *self.path.borrow()
    }

    pub fn peer(&self) -> &PeerAddr {
        &self.peer
    }

    /// Names the peer (`--peer NAME=ID`) in pages and logs.
    pub fn with_name(mut self, name: &str) -> Session {
        self.name = name.into();
        self
    }

    /// The services this peer lets us use, asked on a stream of their own.
    pub(crate) async fn catalog(&self) -> Result<Catalog, String> {
        let (pc, _lease) = self
            .acquire_peer_conn()
            .await
            .map_err(|e| format!("cannot reach it: {e}"))?;
        let request = OpenRequest {
            service: String::new(),
            client_addr: None,
            op: Op::Catalog,
        };
        let (mut send, mut recv) = self.open_with(&pc, &request).await?;
        let _ = send.finish();
        let (_, first) = read_response(&mut recv, self.config.open_timeout)
            .await
            .map_err(|e| match e {
                Abort::Refused {
                    status: Status::BadRequest,
                    ..
                } => "its version cannot list services (upgrade it)".to_owned(),
                other => other.to_string(),
            })?;
        let rest = recv
            .read_to_end(catalog::MAX_CATALOG.saturating_sub(first.len()))
            .await
            .map_err(|e| format!("reading its catalog: {e}"))?;
        let mut all = first.to_vec();
        all.extend_from_slice(&rest);
        catalog::decode(&all).map_err(|e| e.to_string())
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
        info!(local = %listen_addr(&listener), %service, "listening");
        let node = self.node.clone();
        accept_clients(listener, &node, |tcp, client| {
            let id = NEXT_LOCAL_ID.fetch_add(1, Ordering::Relaxed);
            let span = tracing::info_span!("client", local_id = id, %client, %service, stream = tracing::field::Empty);
            let this = self.clone();
            node.tasks
                .spawn(this.serve_client(tcp, client, service.clone()).instrument(span));
        })
        .await;
    }

    async fn serve_client(self, tcp: TcpStream, client: SocketAddr, service: ServiceName) {
        let _live = self.node.stats.stream();
        let _ = tcp.set_nodelay(true);
        let known = self.known().get(&service).map(|k| k.protocol);
        if known == Some(Protocol::Http) {
            // Streams are opened per request by the HTTP layer.
            return self.serve_http(tcp, client, service, None).await;
        }
        // Answered by the session's dial deadline at the latest (`connect_timeout`).
        let (pc, lease) = match self.acquire_peer_conn().await {
            Ok(pair) => pair,
            Err(e) => return warn!("closing the client: cannot reach peer {}: {e}", self.peer),
        };
        let (mut send, mut recv) = match self.open_bi(&pc, &service, client).await {
            Ok(pair) => pair,
            Err(e) => return warn!("closing the client: {e}"),
        };
        let limit = self.config.open_timeout;
        // The service's protocol picks the layer: known from an earlier stream, the
        // response is read alongside; else it is read before the client's bytes are.
        let (protocol, downstream) = match known {
            Some(expect) => (expect, Downstream::AwaitResponse { limit, expect }),
            None => match read_response(&mut recv, limit).await {
                Ok((response, first)) => {
                    self.learn(&service, &response);
                    if let (Protocol::Http, Some(http)) = (response.protocol, response.http) {
                        let upstream = Upstream {
                            send,
                            recv,
                            first,
                            http,
                            hold: Box::new(lease),
                            unconfirmed: None,
                        };
                        return self.serve_http(tcp, client, service, Some(upstream)).await;
                    }
                    (response.protocol, Downstream::Payload(first))
                }
                Err(abort) => {
                    answer_http_client(&tcp, &abort).await;
                    let report = abandoned(abort, &tcp, &mut send, &mut recv);
                    return self.log_report(&service, report);
                }
            },
        };
        let stream = (tcp, send, recv);
        let usage = self
            .node
            .stats
            .services
            .get(&self.name, service.as_str())
            .begin();
        let report = forward(
            protocol,
            Facing::Client,
            stream,
            downstream,
            &pc.media,
            &self.node,
            Named {
                service: service.as_str(),
                routed: None,
            },
        )
        .await;
        drop(lease);
        usage.end(report.up, report.down, report.abort.is_none());
        self.log_report(&service, report);
    }

    /// Opens a stream on `pc` and writes its header for `service`. Waits while the peer's
    /// limit of concurrent streams is reached: backpressure.
    async fn open_bi(
        &self,
        pc: &PeerConn,
        service: &ServiceName,
        client: SocketAddr,
    ) -> Result<(SendStream, RecvStream), String> {
        let request = OpenRequest {
            service: service.as_str().to_owned(),
            client_addr: Some(client.to_string()),
            op: Op::Open,
        };
        self.open_with(pc, &request).await
    }

    /// Opens a stream on `pc` and writes `request` as its header.
    async fn open_with(
        &self,
        pc: &PeerConn,
        request: &OpenRequest,
    ) -> Result<(SendStream, RecvStream), String> {
        let (mut send, recv) = pc.conn.open_bi().await.map_err(|e| describe_close(&e))?;
        tracing::Span::current().record("stream", u64::from(send.id()));
        // Service names are validated when the rules are read; a catalog names none.
        let header = encode_request(request).expect("a request of valid names encodes");
        send.write_chunk(Bytes::from(header))
            .await
            .map_err(|e| format!("stream failed: {e}"))?;
        Ok((send, recv))
    }

    /// The HTTP layer for one client of an `http` service on a `--local` port.
    async fn serve_http(
        self,
        tcp: TcpStream,
        client: SocketAddr,
        service: ServiceName,
        first: Option<Upstream>,
    ) {
        let key = Key {
            peer: self.name.to_string(),
            service: service.as_str().to_owned(),
        };
        let ctx = HttpCtx {
            stop: self.node.stop.clone(),
            abort: self.node.abort.clone(),
            tasks: self.node.tasks.clone(),
            stats: self.node.stats.clone(),
        };
        let first = first.map(|u| (key.clone(), u));
        let route = Arc::new(OneService { session: self, key });
        // Boxed, as the RTSP layer is in `forward`: inline, the HTTP layer's state would make
        // the task of every byte stream (its caller, `serve_client`) as big as its own.
        Box::pin(http::proxy::serve(tcp, client, route, first, &ctx)).await;
    }

    /// A stream to an HTTP service, its response header read: what the HTTP layer asks for
    /// each time a request goes to another service.
    pub(crate) async fn open_http(
        &self,
        service: &str,
        client: SocketAddr,
    ) -> Result<Upstream, OpenFailure> {
        if let Some(upstream) = self.open_http_known(service, client).await {
            return upstream;
        }
        let mut opened = self.open_service(service, client).await?;
        match (opened.response.protocol, opened.response.http.take()) {
            (Protocol::Http, Some(http)) => Ok(Upstream {
                send: opened.send,
                recv: opened.recv,
                first: opened.first,
                http,
                hold: Box::new(opened.lease),
                unconfirmed: None,
            }),
            (other, _) => Err(opened.refuse(format!(
                "service {service} of peer {} speaks {other}, not http: declare it as \
                 http://HOST:PORT on the exposing side, or reach it with --local",
                self.name
            ))),
        }
    }

    /// A stream to an HTTP service already known (an earlier stream said how to speak to its
    /// device), opened without waiting for its response header: the first request goes out
    /// with the stream header, as bytes do. `None` when the service is not known.
    async fn open_http_known(
        &self,
        service: &str,
        client: SocketAddr,
    ) -> Option<Result<Upstream, OpenFailure>> {
        let name: ServiceName = service.parse().ok()?;
        let http = self.known().get(&name).and_then(|k| k.http.clone())?;
        let opened = self
            .open_stream(&name, client)
            .await
            .map(|(_, lease, send, recv)| Upstream {
                send,
                recv,
                first: Bytes::new(),
                http,
                hold: Box::new(lease),
                unconfirmed: Some(self.config.open_timeout),
            });
        Some(opened)
    }

    /// The connection (dialled if need be) and a stream on it with its header written; the
    /// failure as a page would say it.
    async fn open_stream(
        &self,
        name: &ServiceName,
        client: SocketAddr,
    ) -> Result<(PeerConn, StreamLease, SendStream, RecvStream), OpenFailure> {
        let (pc, lease) = self.acquire_peer_conn().await.map_err(|e| {
            let status = match e {
                ConnectError::Timeout(_) | ConnectError::NoPath { .. } => 504,
                _ => 502,
            };
            OpenFailure {
                status,
                message: format!("cannot reach peer {}: {e}", self.name),
            }
        })?;
        let (send, recv) = self
            .open_bi(&pc, name, client)
            .await
            .map_err(|e| OpenFailure {
                status: 502,
                message: format!("peer {}: {e}", self.name),
            })?;
        Ok((pc, lease, send, recv))
    }

    /// Forgets what an earlier stream said of `service`: the next one asks again.
    pub(crate) fn forget(&self, service: &str) {
        if let Ok(name) = service.parse::<ServiceName>() {
            self.known().remove(&name);
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<ServiceName, Known>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what an `Ok` answer says `service` speaks.
    fn learn(&self, service: &ServiceName, response: &OpenResponse) {
        let http = match response.protocol {
            Protocol::Http => response.http.clone(),
            _ => None,
        };
        let known = Known {
            protocol: response.protocol,
            http,
        };
        self.known().insert(service.clone(), known);
    }

    /// A stream to `service`, its response header read (an `Ok` one); the failure says
    /// what a page or an RTSP answer tells the client (an HTTP-style status).
    pub(crate) async fn open_service(
        &self,
        service: &str,
        client: SocketAddr,
    ) -> Result<Opened, OpenFailure> {
        let name: ServiceName = service.parse().map_err(|e: String| OpenFailure {
            status: 404,
            message: e,
        })?;
        let (pc, lease, mut send, mut recv) = self.open_stream(&name, client).await?;
        let (response, first) = match read_response(&mut recv, self.config.open_timeout).await {
            Ok(pair) => pair,
            Err(abort) => {
                let _ = send.reset(abort.code());
                let _ = recv.stop(abort.code());
                let (status, why) = http::pages::refusal(&abort);
                return Err(OpenFailure {
                    status,
                    message: format!("service {service} of peer {}: {why}", self.name),
                });
            }
        };
        self.learn(&name, &response);
        Ok(Opened {
            pc,
            lease,
            send,
            recv,
            response,
            first,
        })
    }

    fn log_report(&self, service: &ServiceName, report: Report) {
        match report.abort {
            None => debug!(up = report.up, down = report.down, "stream closed"),
            Some(Abort::ProtocolChanged { now, .. }) => {
                warn!(
                    "the service's protocol is now {now}; the client was closed and should retry"
                );
                let known = Known {
                    protocol: now,
                    http: None,
                };
                self.known().insert(service.clone(), known);
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

/// An open stream to a service, its response header read.
pub(crate) struct Opened {
    pub pc: PeerConn,
    pub lease: StreamLease,
    pub send: SendStream,
    pub recv: RecvStream,
    pub response: OpenResponse,
    /// Payload read past the response header.
    pub first: Bytes,
}

impl Opened {
    /// Ends a stream that cannot be used after all (the service speaks another protocol):
    /// the failure to report.
    pub fn refuse(mut self, message: String) -> OpenFailure {
        let _ = self.send.reset(stream_code::REFUSED);
        let _ = self.recv.stop(stream_code::REFUSED);
        OpenFailure {
            status: 502,
            message,
        }
    }
}

/// The route of a `--local` port of an HTTP service: every request goes to it.
struct OneService {
    session: Session,
    key: Key,
}

impl Upstreams for OneService {
    async fn route(&self, _host: Option<&str>, _target: &str) -> Routed {
        Routed::To(self.key.clone())
    }

    async fn open(&self, key: &Key, client: SocketAddr) -> Result<Upstream, OpenFailure> {
        self.session.open_http(&key.service, client).await
    }

    fn forget(&self, key: &Key) {
        self.session.forget(&key.service);
    }
}

/// Serves `--http`: each accepted client gets the HTTP layer, routed by `router`. Runs until
/// the node stops accepting.
pub(crate) async fn serve_router(
    router: Arc<router::Router>,
    listener: TcpListener,
    node: NodeCtx,
) {
    info!(local = %listen_addr(&listener), "listening for web services");
    accept_clients(listener, &node, |tcp, client| {
        let router = router.clone();
        let ctx = HttpCtx {
            stop: node.stop.clone(),
            abort: node.abort.clone(),
            tasks: node.tasks.clone(),
            stats: node.stats.clone(),
        };
        let live = node.stats.stream();
        let span = tracing::info_span!("http", %client);
        node.tasks.spawn(
            async move {
                http::proxy::serve(tcp, client, router, None, &ctx).await;
                drop(live);
            }
            .instrument(span),
        );
    })
    .await;
}

/// Accepts on `listener` until the node stops accepting, handing each client (its socket
/// with `TCP_NODELAY`) to `on_client`; the listener is closed when it returns.
pub(crate) async fn accept_clients(
    listener: TcpListener,
    node: &NodeCtx,
    mut on_client: impl FnMut(TcpStream, SocketAddr),
) {
    let local = listen_addr(&listener);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = node.stop.cancelled() => break,
        };
        match accepted {
            Ok((tcp, client)) => {
                let _ = tcp.set_nodelay(true);
                on_client(tcp, client);
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

fn listen_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string())
}

/// When a refused or failed open leaves a client whose first bytes are an HTTP request (a
/// browser on the `--local` port of a service whose protocol is not known yet), answers it
/// with an error page saying why, instead of a bare close.
async fn answer_http_client(tcp: &TcpStream, abort: &Abort) {
    let mut buf = vec![0u8; 8192];
    let peeked = tokio::time::timeout(Duration::from_millis(200), tcp.peek(&mut buf)).await;
    let Ok(Ok(n)) = peeked else { return };
    if !matches!(crate::protocol::http::parse_request(&buf[..n]), Ok(Some(_))) {
        return;
    }
    let (status, why) = http::pages::refusal(abort);
    let _ = crate::tunnel::splice::write_tcp(tcp, &http::pages::error(status, &why)).await;
}
