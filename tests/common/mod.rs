//! Shared by the in-process tests: two nodes on loopback (one exposes, one connects), target
//! servers, and helpers. Everything binds port 0; nothing sleeps to wait for a start.
#![allow(dead_code)]

pub mod process;
pub mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnel::config::{PeerAddr, ServiceName, Target};
use tunnel::connect::{Session, SessionConfig};
use tunnel::expose::{Authorized, ExposeConfig};
use tunnel::identity::Identity;
use tunnel::node::Node;
use tunnel::quic::Tuning;
use tunnel::stats::Gauge;

pub const WAIT: Duration = Duration::from_secs(20);

pub fn identity() -> Arc<Identity> {
    Arc::new(Identity::generate().unwrap())
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A node that exposes `services` to `client_id`, and a node with a session to it.
pub struct Pair {
    pub server: Node,
    pub client: Node,
    pub session: Session,
}

pub struct PairBuilder {
    services: Vec<(String, String)>,
    session: SessionConfig,
    tuning: Tuning,
    expose: Box<dyn FnOnce(&mut ExposeConfig)>,
    allow_client: bool,
    pin: Option<tunnel::identity::PeerId>,
}

pub fn pair() -> PairBuilder {
    PairBuilder {
        services: Vec::new(),
        session: SessionConfig::default(),
        tuning: Tuning::default(),
        expose: Box::new(|_| {}),
        allow_client: true,
        pin: None,
    }
}

impl PairBuilder {
    pub fn service(mut self, name: &str, target: SocketAddr) -> Self {
        self.services.push((name.into(), target.to_string()));
        self
    }

    /// A service written as in the rules (`http://HOST:PORT`, `rtsp://...`).
    pub fn service_url(mut self, name: &str, target: &str) -> Self {
        self.services.push((name.into(), target.into()));
        self
    }

    pub fn session(mut self, f: impl FnOnce(&mut SessionConfig)) -> Self {
        f(&mut self.session);
        self
    }

    pub fn tuning(mut self, f: impl FnOnce(&mut Tuning)) -> Self {
        f(&mut self.tuning);
        self
    }

    pub fn expose(mut self, f: impl FnOnce(&mut ExposeConfig) + 'static) -> Self {
        self.expose = Box::new(f);
        self
    }

    /// The server allows some other peer, not the client.
    pub fn unauthorised(mut self) -> Self {
        self.allow_client = false;
        self
    }

    /// The client pins this id instead of the server's.
    pub fn pin(mut self, id: tunnel::identity::PeerId) -> Self {
        self.pin = Some(id);
        self
    }

    pub fn build(self) -> Pair {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let client_identity = identity();
        let allowed = if self.allow_client {
            client_identity.peer_id()
        } else {
            Identity::generate().unwrap().peer_id()
        };
        let server = Node::bind(loopback(), identity(), self.tuning.clone()).unwrap();
        let services = self
            .services
            .into_iter()
            .map(|(n, t)| {
                (
                    n.parse::<ServiceName>().unwrap(),
                    t.parse::<Target>().unwrap(),
                )
            })
            .collect();
        let mut config = ExposeConfig::new(services, Authorized::Only([allowed].into()));
        (self.expose)(&mut config);
        server.expose(config).unwrap();
        let client = Node::bind(loopback(), client_identity, self.tuning).unwrap();
        let peer = PeerAddr {
            id: self.pin.unwrap_or(server.peer_id()),
            addr: Some(server.local_addr().unwrap().to_string()),
        };
        let session = client.connect(peer, self.session);
        Pair {
            server,
            client,
            session,
        }
    }
}

impl Pair {
    /// A local listener on 127.0.0.1:0 that forwards to the remote `service`.
    pub async fn local(&self, service: &str) -> SocketAddr {
        let listener = TcpListener::bind(loopback()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        self.client
            .serve_local(&self.session, listener, service.parse().unwrap());
        addr
    }

    pub async fn shutdown(self) {
        drop(self.session);
        tokio::join!(
            self.client.shutdown(Duration::from_secs(2)),
            self.server.shutdown(Duration::from_secs(2))
        );
    }
}

/// A TCP server for tests; counts its live connections; stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    pub live: Gauge,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves each connection with `handler`.
pub async fn server<F, Fut>(handler: F) -> TestServer
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let live = Gauge::default();
    let counted = live.clone();
    let handler = Arc::new(handler);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let guard = counted.hold();
            let handler = handler.clone();
            tokio::spawn(async move {
                handler(tcp).await;
                drop(guard);
            });
        }
    });
    TestServer { addr, live, task }
}

/// Echoes every byte; answers the client's FIN with a FIN once everything is echoed.
pub async fn echo_server() -> TestServer {
    server(|mut tcp| async move {
        let (mut r, mut w) = tcp.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    use ring::rand::SecureRandom;
    let mut v = vec![0u8; n];
    ring::rand::SystemRandom::new().fill(&mut v).unwrap();
    v
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// Sends `data` through `addr` to an echo server and checks the echo byte for byte
/// (by SHA-256, hashed as it arrives), then checks the FIN came back.
pub async fn echo_round_trip(addr: SocketAddr, data: &[u8]) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = tcp.into_split();
    let expected_hash = sha256(data);
    let len = data.len();
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(64 * 1024) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
        w
    });
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        got += n;
    }
    let _w = writer.await.unwrap();
    assert_eq!(got, len, "echoed length");
    assert_eq!(
        ctx.finish().as_ref(),
        expected_hash.as_slice(),
        "echoed bytes"
    );
}

/// Number of open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}
