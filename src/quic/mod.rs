//! QUIC: one UDP socket and one quinn endpoint per process, serving every role (it accepts
//! connections for `expose` and the rendezvous, dials them for `connect`, and sends the punch
//! and relay-bind packets), the TLS pinning, paths and close reasons.

pub mod accept;
pub mod close;
/// Paths live with the path layer below; `quic::path` names them here too.
pub use crate::multipath::path;
pub mod tls;

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, VarInt};

use crate::identity::{Identity, PeerId};
use crate::multipath::{PathSocket, PathTable};
use accept::Serve;

/// An ALPN and the role that serves it.
type Route = (Vec<u8>, Weak<dyn Serve>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Largest UDP payload this endpoint sends or accepts (what MTU discovery may reach).
pub const MAX_UDP_PAYLOAD: u16 = 65_527;

/// Flow control and liveness settings of every connection. The defaults favour throughput:
/// windows far above quinn's, so one stream can fill a fast link with a 100 ms round trip.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Concurrent bidirectional streams a peer may open on one connection.
    pub max_streams: u32,
    /// Per-stream receive window.
    pub stream_window: u32,
    /// Per-connection receive window.
    pub connection_window: u32,
    /// Bytes in flight per connection.
    pub send_window: u64,
    /// PING interval that keeps NAT mappings and the idle timer alive (well under the 30 s
    /// that many NATs keep an idle UDP mapping).
    pub keep_alive: Duration,
    /// A connection that hears nothing for this long is dead: how fast a dead path is noticed.
    pub idle_timeout: Duration,
    /// Requested UDP socket buffer size (the kernel may cap it at net.core.[rw]mem_max).
    pub socket_buffer: usize,
    /// The congestion controller of every connection this node makes or accepts.
    pub congestion: Congestion,
}

/// quinn's congestion controllers that a user may choose (docs/architecture.md, "Congestion
/// control", has the measurements).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Congestion {
    /// quinn's BBR: paces at the measured bandwidth and does not take random loss for
    /// congestion. Over 20 ms + 1% loss: bulk 99 Mbit/s against Cubic's 2.9, and a camera's
    /// frames go out at once. quinn marks it experimental.
    #[default]
    Bbr,
    /// quinn's default, RFC 9438. Halves (x0.7) at every loss and never regrows while the
    /// sender is application-limited (a camera), so on a lossy path its window shrinks to a
    /// few packets and frames queue behind it.
    Cubic,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            max_streams: 16_384,
            stream_window: 16 << 20,
            connection_window: 64 << 20,
            send_window: 64 << 20,
            keep_alive: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            socket_buffer: 8 << 20,
            congestion: Congestion::default(),
        }
    }
}

impl Tuning {
    /// The transport configuration of a connection; `loopback` for a peer on this host. (Public
    /// for the benchmark's quinn-only probe, which measures quinn under the same settings.)
    pub fn transport_config(&self, loopback: bool) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_streams))
            // Overflow streams of media flows (RTP packets above the datagram limit).
            .max_concurrent_uni_streams(VarInt::from_u32(1024))
            .datagram_receive_buffer_size(Some(4 << 20))
            .datagram_send_buffer_size(1 << 20)
            .stream_receive_window(VarInt::from_u32(self.stream_window))
            .receive_window(VarInt::from_u32(self.connection_window))
            .send_window(self.send_window)
            .keep_alive_interval(Some(self.keep_alive))
            // Before the first RTT sample: retransmit a lost Initial (a punch that arrived
            // before the peer's NAT opened) after ~300 ms instead of ~1 s.
            .initial_rtt(Duration::from_millis(100))
            .max_idle_timeout(Some(
                IdleTimeout::try_from(self.idle_timeout).expect("idle timeout fits a varint"),
            ));
        if self.congestion == Congestion::Bbr {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        if loopback {
            // On loopback MTU discovery may go up to 64 KB packets: quinn's sender is
            // CPU-bound per packet, so that is most of the throughput there
            // (../shared/PERF-NOTES.md); segmentation offload off, or discovery fell back
            // to 1200-byte packets. Not on other paths: probing far above a 1500-byte MTU
            // delayed connection set-up through NATs by ~140 ms (measured in the NAT lab).
            let mut mtu = quinn::MtuDiscoveryConfig::default();
            mtu.upper_bound(MAX_UDP_PAYLOAD);
            t.mtu_discovery_config(Some(mtu))
                .enable_segmentation_offload(false);
        }
        t
    }
}

/// Errors setting up the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("QUIC configuration: {0}")]
    Quic(String),
}

/// Why a name gave no address to dial.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot read this endpoint's address: {0}")]
    Socket(std::io::Error),
    #[error("cannot resolve {0}: {1}")]
    Lookup(String, std::io::Error),
    #[error("{0} has no address this socket ({1}) can reach")]
    Unreachable(String, SocketAddr),
}

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// Another key answered at `addr` (the pinned id is not the one there).
    #[error("refusing {addr}: {wrong}")]
    WrongPeer {
        addr: SocketAddr,
        wrong: tls::WrongPeer,
    },
    /// The handshake or the connection failed.
    #[error("{}", close::describe_close(.0))]
    Connection(quinn::ConnectionError),
    #[error(transparent)]
    Setup(#[from] TransportError),
}

impl From<rustls::Error> for DialError {
    fn from(e: rustls::Error) -> Self {
        DialError::Setup(TransportError::Tls(e))
    }
}

/// The process's single QUIC endpoint and what it needs to make connections.
#[derive(Clone)]
pub struct Transport {
    endpoint: quinn::Endpoint,
    identity: Arc<Identity>,
    tuning: Arc<Tuning>,
    /// The server configuration for peers on this host (see `Tuning::transport_config`).
    loopback_server: Arc<Mutex<Option<Arc<quinn::ServerConfig>>>>,
    /// The role serving each ALPN this endpoint accepts (`accept`). Weak: the node owns its
    /// roles, and a role holds this transport.
    routes: Arc<Mutex<Vec<Route>>>,
    /// The path layer under quinn (`multipath`): each introduced connection's paths, and the
    /// socket the few non-QUIC packets (punches, relay binds, probes) go out of.
    paths: Arc<PathTable>,
}

impl Transport {
    /// Binds the UDP socket at `addr` and starts the endpoint (as a client only until a role
    /// is served with [`Transport::serve`]).
    pub fn bind(
        addr: SocketAddr,
        identity: Arc<Identity>,
        tuning: Tuning,
    ) -> Result<Self, TransportError> {
        let (addr, socket) = match bind_udp(addr, tuning.socket_buffer) {
            Ok(socket) => (addr, socket),
            // `[::]` (every role's default, dual-stack) on a host without IPv6: IPv4 only.
            Err(e) if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED && no_ipv6(&e) => {
                let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, addr.port()));
                tracing::info!("no IPv6 on this host ({e}): binding {v4}, IPv4 only");
                let socket = bind_udp(v4, tuning.socket_buffer)
                    .map_err(|source| TransportError::Bind { addr: v4, source })?;
                (v4, socket)
            }
            Err(source) => return Err(TransportError::Bind { addr, source }),
        };
        let runtime = quinn::default_runtime()
            .ok_or_else(|| TransportError::Quic("no async runtime".into()))?;
        let bind_error = |source| TransportError::Bind { addr, source };
        let inner = runtime.wrap_udp_socket(socket).map_err(bind_error)?;
        let paths = PathTable::new(inner.clone()).map_err(bind_error)?;
        let socket = Arc::new(PathSocket::new(inner, paths.clone()));
        // The stateless-reset key comes from the identity, so after a restart this endpoint
        // answers its old connections' packets with a reset the peers accept: they learn at
        // once that the connection is gone instead of waiting for the idle timeout.
        let reset_key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &identity.derive_secret("quic stateless reset"),
        );
        let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
        // So are the connection ids: quinn drops a packet whose id its generator did not
        // make before it would answer with a reset, and the default generator's key is new
        // in every process (measured: a restarted rendezvous took 37 s to be found again).
        let cid_secret = identity.derive_secret("quic connection id");
        let cid_key = u64::from_le_bytes(cid_secret[..8].try_into().expect("8 bytes"));
        config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        config
            .max_udp_payload_size(MAX_UDP_PAYLOAD)
            .expect("a valid UDP payload size");
        // Every QUIC packet keeps the fixed bit set, so our own packets (first byte 0) on the
        // same socket can never be mistaken for QUIC.
        config.grease_quic_bit(false);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(config, None, socket, runtime)
            .map_err(bind_error)?;
        Ok(Transport {
            endpoint,
            identity,
            tuning: Arc::new(tuning),
            loopback_server: Arc::default(),
            routes: Arc::default(),
            paths,
        })
    }

    /// Accepts connections that negotiate `alpn` and hands them to `role` (through the one
    /// accept loop, `accept::accept_loop`) while the caller keeps `role`. Each ALPN has one role.
    pub fn serve(&self, alpn: &[u8], role: &Arc<dyn Serve>) -> Result<(), TransportError> {
        let mut routes = lock(&self.routes);
        if routes.iter().any(|(a, _)| a == alpn) {
            return Err(TransportError::Quic(format!(
                "{} is already served on this endpoint",
                String::from_utf8_lossy(alpn)
            )));
        }
        let mut alpns: Vec<&[u8]> = routes.iter().map(|(a, _)| a.as_slice()).collect();
        alpns.push(alpn);
        let tls = tls::server_config(&self.identity, &alpns)?;
        let quic =
            QuicServerConfig::try_from(tls).map_err(|e| TransportError::Quic(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::new(self.tuning.transport_config(false)));
        let mut loopback = config.clone();
        loopback.transport_config(Arc::new(self.tuning.transport_config(true)));
        *lock(&self.loopback_server) = Some(Arc::new(loopback));
        self.endpoint.set_server_config(Some(config));
        routes.push((alpn.to_vec(), Arc::downgrade(role)));
        Ok(())
    }

    /// The role that serves `alpn`.
    pub(crate) fn route(&self, alpn: &[u8]) -> Option<Arc<dyn Serve>> {
        lock(&self.routes)
            .iter()
            .find(|(a, _)| a == alpn)
            .and_then(|(_, r)| r.upgrade())
    }

    /// Accepts an incoming connection with the configuration that suits where it comes from.
    pub fn accept(
        &self,
        incoming: quinn::Incoming,
    ) -> Result<quinn::Connecting, quinn::ConnectionError> {
        let loopback = lock(&self.loopback_server).clone();
        match loopback {
            Some(config)
                if path::canonical(incoming.remote_address())
                    .ip()
                    .is_loopback() =>
            {
                incoming.accept_with(config)
            }
            _ => incoming.accept(),
        }
    }

    /// Connects to `addr`, accepting only the peer whose id is `expected`. The error says
    /// plainly when another peer answered.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: PeerId,
    ) -> Result<quinn::Connection, DialError> {
        let wrong = tls::WrongPeerSlot::default();
        let tls = tls::client_config(
            &self.identity,
            Some(expected),
            wrong.clone(),
            crate::protocol::ALPN,
        )?;
        let connecting = self.connect_with(tls, addr)?;
        connecting.await.map_err(
            |e| match wrong.lock().unwrap_or_else(|p| p.into_inner()).take() {
                Some(wrong) => DialError::WrongPeer { addr, wrong },
                None => DialError::Connection(e),
            },
        )
    }

    /// An address of `host_port` this endpoint's socket can reach (DNS is asked each time: a
    /// peer's address may change). An IPv4 socket cannot reach IPv6 addresses; a dual-stack
    /// IPv6 socket reaches both, and takes a name's IPv4 address when it has one (a server
    /// named so may listen on IPv4 only, as `localhost`'s often does), else its IPv6 one.
    pub async fn resolve(&self, host_port: &str) -> Result<SocketAddr, ResolveError> {
        let local = self.local_addr().map_err(ResolveError::Socket)?;
        let all: Vec<SocketAddr> = tokio::net::lookup_host(host_port)
            .await
            .map_err(|e| ResolveError::Lookup(host_port.to_owned(), e))?
            .collect();
        all.iter()
            .find(|a| a.is_ipv4())
            .or_else(|| all.iter().find(|_| local.is_ipv6()))
            .copied()
            .ok_or_else(|| ResolveError::Unreachable(host_port.to_owned(), local))
    }

    /// Starts a connection to a rendezvous server at `addr` (any server key).
    pub fn connect_rendezvous(
        &self,
        addr: SocketAddr,
    ) -> Result<quinn::Connecting, TransportError> {
        let tls = tls::client_config(
            &self.identity,
            None,
            tls::WrongPeerSlot::default(),
            crate::protocol::rendezvous::ALPN,
        )?;
        self.connect_with(tls, addr)
    }

    fn connect_with(
        &self,
        tls: rustls::ClientConfig,
        addr: SocketAddr,
    ) -> Result<quinn::Connecting, TransportError> {
        let quic =
            QuicClientConfig::try_from(tls).map_err(|e| TransportError::Quic(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(
            self.tuning.transport_config(addr.ip().is_loopback()),
        ));
        self.endpoint
            .connect_with(config, addr, tls::SERVER_NAME)
            .map_err(|e| TransportError::Quic(e.to_string()))
    }

    /// Sends one non-QUIC datagram (a punch or a relay bind) from the endpoint's socket.
    /// Best effort, like the network: a full socket buffer drops it.
    pub fn send_raw(&self, to: SocketAddr, packet: &[u8]) {
        self.paths.send_raw(to, packet);
    }

    /// The path layer: introduced connections get their paths from it (`multipath::attach`).
    pub fn paths(&self) -> &Arc<PathTable> {
        &self.paths
    }

    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }
}

/// Whether binding an IPv6 socket failed for want of IPv6 (disabled or not built in).
pub(crate) fn no_ipv6(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
    )
}

/// A UDP socket bound at `addr` (dual-stack for `[::]`) with `buffer`-byte send and receive
/// buffers as far as the kernel allows; public for the benchmark's quinn-only probe.
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    // Best effort: the kernel caps these at net.core.rmem_max / wmem_max.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
