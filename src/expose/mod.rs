//! The exposing role: accepts QUIC connections from allowed peers and, for each stream, dials
//! the real server named by the stream header's service, answers with a status, then splices.
//!
//! Only the targets in [`ExposeConfig::services`] are ever dialled: the header carries a service
//! name, never an address. Whether a stream is served is decided by [`admit`] (pure).

pub mod admit;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn, Instrument};

use crate::config::{ServiceName, Target};
use crate::http::device::{self, DeviceTlsError};
use crate::identity::PeerId;
use crate::media::MediaMux;
use crate::protocol::catalog::{self, Catalog, Entry};
use crate::protocol::header::{
    decode_request, encode_response, Op, OpenResponse, Protocol, Status, MAX_REQUEST_LEN,
};
use crate::protocol::{close_code, stream_code};
use crate::quic::accept::Serve;
use crate::quic::tls;
use crate::rtsp::policy::Facing;
use crate::runtime::forward::{forward, Named};
use crate::runtime::peers::PeerConn;
use crate::runtime::NodeCtx;
use crate::runtime::StreamServer;
use crate::tunnel::framed::{read_first, ReadFrameError};
use crate::tunnel::splice::{reset_tcp, splice_io, Downstream};

/// Who may connect.
#[derive(Debug, Clone)]
pub enum Authorized {
    /// Any peer at all (`--allow-any`).
    Any,
    /// Only these peer ids.
    Only(HashSet<PeerId>),
}

impl Authorized {
    pub fn allows(&self, id: &PeerId) -> bool {
        match self {
            Authorized::Any => true,
            Authorized::Only(ids) => ids.contains(id),
        }
    }
}

/// The exposing role's runtime configuration.
#[derive(Debug, Clone)]
pub struct ExposeConfig {
    pub services: BTreeMap<ServiceName, Target>,
    pub authorized: Authorized,
    /// Proxied sockets at once, over all peers; more are answered `Busy`.
    pub max_streams: usize,
    /// How long to wait for a real server to accept.
    pub dial_timeout: Duration,
    /// How long a peer may take to send a stream header.
    pub header_timeout: Duration,
    /// Per-peer rules (`[[expose.peer]]`); a peer not listed may use every service.
    pub peers: HashMap<PeerId, PeerAccess>,
}

/// What one peer may use here.
#[derive(Debug, Clone, Default)]
pub struct PeerAccess {
    /// What to call it in logs.
    pub name: Option<String>,
    /// The services it may use (`None`: all).
    pub services: Option<BTreeSet<ServiceName>>,
    /// Its proxied sockets at once.
    pub max_streams: Option<usize>,
}

impl ExposeConfig {
    pub fn new(services: BTreeMap<ServiceName, Target>, authorized: Authorized) -> Self {
        ExposeConfig {
            services,
            authorized,
            max_streams: 20_000,
            dial_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            peers: HashMap::new(),
        }
    }
}

pub(crate) struct Expose {
    /// The rules now; a reload replaces them whole (streams keep the ones they started with).
    rules: std::sync::RwLock<Arc<Rules>>,
    node: NodeCtx,
}

/// Everything made from one version of the rules.
struct Rules {
    config: ExposeConfig,
    limit: Arc<Semaphore>,
    /// The TLS settings of each `https://` service.
    device_tls: HashMap<String, Arc<rustls::ClientConfig>>,
    /// The stream slots of each peer with its own cap.
    peer_limits: HashMap<PeerId, Arc<Semaphore>>,
}

impl Rules {
    /// Fails when an `https://` service's certificate check cannot be set up (no system roots).
    fn new(config: ExposeConfig) -> Result<Rules, DeviceTlsError> {
        let mut device_tls = HashMap::new();
        for (name, target) in &config.services {
            if let Some(http) = target.http.as_ref().filter(|h| h.tls) {
                device_tls.insert(
                    name.as_str().to_owned(),
                    device::client_config(http.verify)?,
                );
            }
        }
        let peer_limits = config
            .peers
            .iter()
            .filter_map(|(id, access)| Some((*id, Arc::new(Semaphore::new(access.max_streams?)))))
            .collect();
        Ok(Rules {
            limit: Arc::new(Semaphore::new(config.max_streams)),
            config,
            device_tls,
            peer_limits,
        })
    }
}

/// The real server's end of a stream: a socket, or a TLS session over one.
enum DeviceIo {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Serve for Expose {
    fn serve(self: Arc<Self>, conn: quinn::Connection) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(self.serve_connection(conn))
    }
}

impl StreamServer for Expose {
    fn allows(&self, peer: &PeerId) -> bool {
        self.rules().config.authorized.allows(peer)
    }

    /// Serves the streams `peer` opens on a connection this node dialled (one connection per
    /// peer pair carries streams both ways).
    fn serve_dialled(self: Arc<Self>, pc: PeerConn, peer: PeerId) {
        let span = tracing::info_span!("conn", remote = %pc.conn.remote_address(), peer = %peer);
        let tasks = self.node.tasks.clone();
        tasks.spawn(self.serve_streams(pc, peer).instrument(span));
    }
}

impl Expose {
    /// Fails when an `https://` service's certificate check cannot be set up (no system roots).
    pub(crate) fn new(config: ExposeConfig, node: NodeCtx) -> Result<Arc<Self>, DeviceTlsError> {
        Ok(Arc::new(Expose {
            rules: std::sync::RwLock::new(Arc::new(Rules::new(config)?)),
            node,
        }))
    }

    fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the rules: new streams follow them at once; streams already open keep going;
    /// connections of peers no longer allowed in are closed with a reason. The number of
    /// connections closed, or why the rules cannot be used (the old ones stay).
    pub(crate) fn reload(&self, config: ExposeConfig) -> Result<usize, DeviceTlsError> {
        let rules = Arc::new(Rules::new(config)?);
        let authorized = rules.config.authorized.clone();
        *self.rules.write().unwrap_or_else(|p| p.into_inner()) = rules;
        let reason = b"access revoked by the rules";
        Ok(self.node.peers.close_dialled_by(
            |peer| !authorized.allows(peer),
            close_code::NOT_AUTHORISED,
            reason,
        ))
    }

    /// An accepted connection (the handshake is done): an allowed peer's streams are served.
    async fn serve_connection(self: Arc<Self>, conn: quinn::Connection) {
        let Some(peer) = tls::peer_id_of(&conn) else {
            conn.close(close_code::PROTOCOL_ERROR, b"no peer certificate");
            return;
        };
        tracing::Span::current().record("peer", tracing::field::display(peer));
        if !self.rules().config.authorized.allows(&peer) {
            warn!("refused peer {peer}: not in the allow list (add it with --allow {peer})");
            let reason = format!("peer id {peer} is not authorised here");
            conn.close(close_code::NOT_AUTHORISED, reason.as_bytes());
            return;
        }
        let _live = self.node.stats.connection();
        info!("peer connected");
        let (path, intro) = self
            .node
            .peers
            .path_to(&peer, crate::quic::path::canonical(conn.remote_address()));
        // Introduced: the connection gets the introduction's other paths (its relay side,
        // the peer's candidates) and moves to the best one that works.
        let route = intro.and_then(|i| {
            crate::multipath::attach(
                self.node.transport.paths(),
                &conn,
                path,
                i.relay,
                &i.candidates,
                Some(peer),
                false,
                self.node.abort.child_token(),
            )
        });
        let pc = self
            .node
            .peers
            .add(&self.node, peer, conn, peer, path, route);
        self.serve_streams(pc, peer).await;
    }

    async fn serve_streams(self: Arc<Self>, pc: PeerConn, peer: PeerId) {
        loop {
            let (send, recv) = tokio::select! {
                r = pc.conn.accept_bi() => match r {
                    Ok(pair) => pair,
                    Err(e) => {
                        info!("peer disconnected: {}", crate::quic::close::describe_close(&e));
                        return;
                    }
                },
                () = self.node.abort.cancelled() => return,
            };
            let this = self.clone();
            let span = tracing::info_span!(
                "stream",
                stream = u64::from(send.id()),
                service = tracing::field::Empty
            );
            let on_conn = pc.streams.hold();
            let media = pc.media.clone();
            self.node.tasks.spawn(
                async move {
                    this.serve_stream(send, recv, media, peer).await;
                    drop(on_conn);
                }
                .instrument(span),
            );
        }
    }

    async fn serve_stream(
        self: Arc<Self>,
        mut send: SendStream,
        mut recv: RecvStream,
        media: Arc<MediaMux>,
        peer: PeerId,
    ) {
        let arrived = crate::time::now();
        let rules = self.rules();
        let (req, leftover) = match tokio::time::timeout(
            rules.config.header_timeout,
            read_first(&mut recv, MAX_REQUEST_LEN, decode_request),
        )
        .await
        {
            Ok(Ok(parsed)) => parsed,
            Ok(Err(ReadFrameError::Invalid(e))) => {
                warn!("bad stream header: {e}");
                refuse(&mut send, &mut recv, Status::BadRequest, &e.to_string()).await;
                let _ = recv.stop(stream_code::BAD_HEADER);
                return;
            }
            Ok(Err(e)) => return debug!("stream ended before its header: {e}"),
            Err(_) => {
                warn!("no stream header within {:?}", rules.config.header_timeout);
                let _ = send.reset(stream_code::TIMEOUT);
                let _ = recv.stop(stream_code::TIMEOUT);
                return;
            }
        };
        let access = rules.config.peers.get(&peer);
        let allowed = access.and_then(|a| a.services.as_ref());
        if req.op == Op::Catalog {
            let allowed = match rules.config.authorized.allows(&peer) {
                true => allowed,
                false => Some(&NONE),
            };
            return self
                .answer_catalog(&rules, &mut send, &mut recv, allowed)
                .await;
        }
        // A proxied stream from here on (a catalog request is not one).
        let _live = self.node.stats.stream();
        tracing::Span::current().record("service", req.service.as_str());
        let client = req.client_addr.as_deref().unwrap_or("?");
        let permit = rules.limit.clone().try_acquire_owned().ok();
        let peer_limit = rules.peer_limits.get(&peer);
        let peer_permit = peer_limit.map(|l| l.clone().try_acquire_owned().ok());
        let peer_full = match (&peer_permit, access.and_then(|a| a.max_streams)) {
            (Some(None), Some(cap)) => Some(cap),
            _ => None,
        };
        let admitted = admit::admit(
            &admit::Node {
                services: &rules.config.services,
                // A peer whose access was revoked (its connection is being closed) gets no
                // more: every service is, to it, one that does not exist.
                allowed: match rules.config.authorized.allows(&peer) {
                    true => allowed,
                    false => Some(&NONE),
                },
                stopping: self.node.stop.is_cancelled(),
                slot_free: permit.is_some(),
                max_streams: rules.config.max_streams,
                peer_full,
            },
            &req.service,
        );
        let target = match admitted {
            Ok(target) => target,
            Err(refusal) => {
                match refusal.status {
                    Status::UnknownService => warn!(client, "unknown service requested"),
                    Status::Busy if permit.is_none() => warn!(
                        client,
                        limit = rules.config.max_streams,
                        "at the limit of proxied sockets"
                    ),
                    Status::Busy if peer_full.is_some() => warn!(
                        client,
                        peer = access.and_then(|a| a.name.as_deref()).unwrap_or("?"),
                        limit = peer_full,
                        "the peer is at its own limit of proxied sockets"
                    ),
                    _ => {}
                }
                return refuse(&mut send, &mut recv, refusal.status, &refusal.message).await;
            }
        };
        let _permits = (permit, peer_permit);
        // Counted as failed unless it ends cleanly below.
        let usage = self
            .node
            .stats
            .services
            .get("", req.service.as_str())
            .begin();
        let connect = tokio::time::timeout(
            rules.config.dial_timeout,
            TcpStream::connect(target.as_str()),
        );
        let connected = tokio::select! {
            r = connect => r,
            () = self.node.abort.cancelled() => {
                let _ = send.reset(stream_code::SHUTDOWN);
                let _ = recv.stop(stream_code::SHUTDOWN);
                return debug!("shut down while connecting to the service");
            }
        };
        let tcp = match connected {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                warn!(client, %target, "cannot connect to the service: {e}");
                let msg = format!("the service {:?} refused the connection: {e}", req.service);
                return refuse(&mut send, &mut recv, Status::TargetRefused, &msg).await;
            }
            Err(_) => {
                warn!(client, %target, "the service did not accept within {:?}", rules.config.dial_timeout);
                let msg = format!("the service {:?} did not answer in time", req.service);
                return refuse(&mut send, &mut recv, Status::TargetRefused, &msg).await;
            }
        };
        let _ = tcp.set_nodelay(true);
        let io = match rules.device_tls.get(req.service.as_str()) {
            None => DeviceIo::Tcp(tcp),
            Some(tls) => {
                let handshake = Box::pin(device::connect(
                    tcp,
                    target.host(),
                    tls.clone(),
                    rules.config.dial_timeout,
                ));
                let done = tokio::select! {
                    r = handshake => r,
                    () = self.node.abort.cancelled() => {
                        let _ = send.reset(stream_code::SHUTDOWN);
                        let _ = recv.stop(stream_code::SHUTDOWN);
                        return debug!("shut down during the TLS handshake with the service");
                    }
                };
                match done {
                    Ok(tls) => DeviceIo::Tls(Box::new(tls)),
                    Err(e) => {
                        warn!(client, %target, "no TLS session with the service: {e}");
                        let msg = format!("the service {:?}: {e}", req.service);
                        return refuse(&mut send, &mut recv, Status::TargetRefused, &msg).await;
                    }
                }
            }
        };
        let ok = encode_response(&OpenResponse {
            status: Status::Ok,
            message: String::new(),
            protocol: target.protocol,
            http: target.http_service(),
        });
        if let Err(e) = send.write_chunk(Bytes::from(ok)).await {
            // The client is gone already: the real server sees an abort, as it would have.
            if let DeviceIo::Tcp(tcp) = &io {
                reset_tcp(tcp);
            }
            let _ = recv.stop(stream_code::ABORTED);
            return debug!("peer went away before the response: {e}");
        }
        usage.stats().open_time.observe(arrived.elapsed());
        debug!(client, %target, "stream open");
        let downstream = Downstream::Payload(leftover);
        let report = match io {
            DeviceIo::Tcp(tcp) => {
                forward(
                    target.protocol,
                    Facing::Server,
                    (tcp, send, recv),
                    downstream,
                    &media,
                    &self.node,
                    Named {
                        service: req.service.as_str(),
                        routed: None,
                    },
                )
                .await
            }
            // Boxed, as the RTSP layer is in `forward`: a TLS splice's future would otherwise
            // make every stream task as big as its own.
            DeviceIo::Tls(tls) => {
                Box::pin(splice_io(
                    tls,
                    send,
                    recv,
                    downstream,
                    self.node.abort.clone(),
                ))
                .await
            }
        };
        // Seen from the client: up is what it sent (the stream's bytes toward the service).
        usage.end(report.down, report.up, report.abort.is_none());
        match report.abort {
            None => debug!(up = report.down, down = report.up, "stream closed"),
            Some(abort) => info!(
                up = report.down,
                down = report.up,
                "stream aborted: {abort}"
            ),
        }
    }

    /// Answers a catalog request: the services this peer may use, then the end of the stream.
    async fn answer_catalog(
        &self,
        rules: &Rules,
        send: &mut SendStream,
        recv: &mut RecvStream,
        allowed: Option<&BTreeSet<ServiceName>>,
    ) {
        let catalog = Catalog {
            services: rules
                .config
                .services
                .iter()
                .filter(|(name, _)| allowed.is_none_or(|a| a.contains(*name)))
                .map(|(name, target)| Entry {
                    name: name.as_str().to_owned(),
                    protocol: target.protocol.into(),
                })
                .collect(),
        };
        let ok = encode_response(&OpenResponse {
            status: Status::Ok,
            message: String::new(),
            protocol: Protocol::Tcp,
            http: None,
        });
        let mut wire = ok;
        wire.extend_from_slice(&catalog::encode(&catalog));
        let _ = recv.stop(stream_code::REFUSED);
        if send.write_chunk(Bytes::from(wire)).await.is_ok() {
            let _ = send.finish();
        }
        debug!(services = catalog.services.len(), "catalog sent");
    }
}

/// No service at all: what a revoked peer may use.
static NONE: BTreeSet<ServiceName> = BTreeSet::new();

/// Answers a refusal and ends the stream: the status, a FIN, and no more reading.
async fn refuse(send: &mut SendStream, recv: &mut RecvStream, status: Status, message: &str) {
    let resp = encode_response(&OpenResponse {
        status,
        message: message.to_owned(),
        protocol: Protocol::Tcp,
        http: None,
    });
    if send.write_chunk(Bytes::from(resp)).await.is_ok() {
        let _ = send.finish();
    }
    let _ = recv.stop(stream_code::REFUSED);
}
