//! The rendezvous, in process on loopback: registration, presence, introduction, relay,
//! and a rendezvous restart. (Real NATs are in tests/natlab.rs.)

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tunnel::config::PeerAddr;
use tunnel::connect::{Session, SessionConfig};
use tunnel::expose::{Authorized, ExposeConfig};
use tunnel::identity::Identity;
use tunnel::nat::server::RendezvousConfig;
use tunnel::node::Node;
use tunnel::quic::Tuning;

fn rendezvous_at(addr: SocketAddr) -> Node {
    let node = Node::bind(addr, identity(), Tuning::default()).unwrap();
    node.serve_rendezvous(RendezvousConfig::default()).unwrap();
    node
}

/// `node` exposes `echo` (as service "echo") to `allowed`.
fn expose_echo(node: &Node, echo: SocketAddr, allowed: tunnel::identity::PeerId) {
    let services = [("echo".parse().unwrap(), echo.to_string().parse().unwrap())].into();
    node.expose(ExposeConfig::new(
        services,
        Authorized::Only([allowed].into()),
    ))
    .unwrap();
}

/// A node exposing `echo` to `allowed`, registered with the rendezvous at `rz`.
fn exposer(rz: SocketAddr, echo: SocketAddr, allowed: tunnel::identity::PeerId) -> Node {
    let node = Node::bind(loopback(), identity(), Tuning::default()).unwrap();
    expose_echo(&node, echo, allowed);
    node.register(rz.to_string());
    node
}

/// A local listener of `node` whose sockets go to the service "echo" through `session`.
async fn listen_through(node: &Node, session: &Session) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let local = listener.local_addr().unwrap();
    node.serve_local(session, listener, "echo".parse().unwrap());
    local
}

/// A node that reaches `peer` (by id only) through the rendezvous at `rz`.
async fn connector(
    identity: Arc<Identity>,
    rz: SocketAddr,
    peer: tunnel::identity::PeerId,
    config: SessionConfig,
) -> (Node, Session, SocketAddr) {
    let node = Node::bind(loopback(), identity, Tuning::default()).unwrap();
    node.register(rz.to_string());
    let session = node.connect(
        PeerAddr {
            id: peer,
            addr: None,
        },
        config,
    );
    let local = listen_through(&node, &session).await;
    (node, session, local)
}

async fn stop(nodes: Vec<Node>) {
    let all = nodes
        .into_iter()
        .map(|n| n.shutdown(Duration::from_secs(1)));
    for f in all {
        f.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_known_only_by_id_meet_through_the_rendezvous() {
    let echo = echo_server().await;
    let rz = rendezvous_at(loopback());
    let rz_addr = rz.local_addr().unwrap();
    let client_id = identity();
    let exp = exposer(rz_addr, echo.addr, client_id.peer_id());
    let (cli, session, local) =
        connector(client_id, rz_addr, exp.peer_id(), SessionConfig::default()).await;
    echo_round_trip(local, &random_bytes(1 << 20)).await;
    let path = session.path().expect("connected");
    assert_eq!(path.kind(), "direct");
    assert_eq!(
        path.addr(),
        exp.local_addr().unwrap(),
        "straight to the exposing node"
    );
    assert_eq!(rz.rendezvous_peers(), 2);
    drop(session);
    stop(vec![cli, exp, rz]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_started_first_waits_for_the_peer_to_come_online() {
    let echo = echo_server().await;
    let rz = rendezvous_at(loopback());
    let rz_addr = rz.local_addr().unwrap();
    let client_id = identity();
    // The exposing identity exists, but its node is not up yet.
    let exp_identity = identity();
    let config = SessionConfig {
        connect_timeout: Duration::from_secs(30),
        ..SessionConfig::default()
    };
    let (cli, session, local) =
        connector(client_id.clone(), rz_addr, exp_identity.peer_id(), config).await;
    let client = tokio::spawn(async move { echo_round_trip(local, b"waited for you").await });
    // The client is waiting; now the peer comes online and presence brings them together.
    tokio::task::yield_now().await;
    let exp = Node::bind(loopback(), exp_identity, Tuning::default()).unwrap();
    expose_echo(&exp, echo.addr, client_id.peer_id());
    exp.register(rz_addr.to_string());
    tokio::time::timeout(WAIT, client).await.unwrap().unwrap();
    drop(session);
    stop(vec![cli, exp, rz]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_carries_the_connection_byte_for_byte() {
    let echo = echo_server().await;
    let rz = rendezvous_at(loopback());
    let rz_addr = rz.local_addr().unwrap();
    let client_id = identity();
    let exp = exposer(rz_addr, echo.addr, client_id.peer_id());
    let config = SessionConfig {
        force_relay: true,
        ..SessionConfig::default()
    };
    let (cli, session, local) = connector(client_id, rz_addr, exp.peer_id(), config).await;
    echo_round_trip(local, &random_bytes(4 << 20)).await;
    let path = session.path().expect("connected");
    assert_eq!(path.kind(), "relay");
    assert_eq!(path.addr().ip(), rz_addr.ip());
    assert_ne!(
        path.addr().port(),
        rz_addr.port(),
        "a relay port, not the rendezvous port"
    );
    drop(session);
    stop(vec![cli, exp, rz]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rendezvous_restart_leaves_live_streams_alone_and_registration_recovers() {
    let echo = echo_server().await;
    let rz = rendezvous_at(loopback());
    let rz_addr = rz.local_addr().unwrap();
    let client_id = identity();
    let exp = exposer(rz_addr, echo.addr, client_id.peer_id());
    let (cli, session, local) = connector(
        client_id.clone(),
        rz_addr,
        exp.peer_id(),
        SessionConfig::default(),
    )
    .await;
    // A live stream across the restart.
    let mut live = TcpStream::connect(local).await.unwrap();
    live.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    live.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"before");

    rz.shutdown(Duration::from_millis(100)).await;
    // The old socket closes as the endpoint's last handle goes: wait for the port.
    let port_deadline = tokio::time::Instant::now() + WAIT;
    let rz2 = loop {
        match Node::bind(rz_addr, identity(), Tuning::default()) {
            Ok(node) => break node,
            Err(e) => {
                assert!(tokio::time::Instant::now() < port_deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    rz2.serve_rendezvous(RendezvousConfig::default()).unwrap();
    // Both nodes register again by themselves (backoff up to 5 s).
    let deadline = tokio::time::Instant::now() + WAIT;
    while rz2.rendezvous_peers() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "registration did not recover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    live.write_all(b"after!").await.unwrap();
    live.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!", "the live stream never noticed");

    // A new peer reaches the exposing node through the new rendezvous.
    let other_id = identity();
    drop((live, session));
    let (cli2, session2, local2) =
        connector(other_id, rz_addr, exp.peer_id(), SessionConfig::default()).await;
    let mut refused = TcpStream::connect(local2).await.unwrap();
    refused.write_all(b"x").await.unwrap();
    let mut out = Vec::new();
    let _ = refused.read_to_end(&mut out).await;
    assert!(
        out.is_empty(),
        "an id the exposing node does not allow gets nothing"
    );
    drop(session2);
    stop(vec![cli2, cli, exp, rz2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_serves_as_rendezvous_and_exposes_on_one_endpoint() {
    // Both roles accept on the same UDP port; the accept loop routes by ALPN, so neither
    // replaces the other's server configuration.
    let echo = echo_server().await;
    let client_id = identity();
    let both = Node::bind(loopback(), identity(), Tuning::default()).unwrap();
    both.serve_rendezvous(RendezvousConfig::default()).unwrap();
    expose_echo(&both, echo.addr, client_id.peer_id());
    let addr = both.local_addr().unwrap();
    // A peer reaches its expose role at its address...
    let cli = Node::bind(loopback(), client_id, Tuning::default()).unwrap();
    let session = cli.connect(
        PeerAddr {
            id: both.peer_id(),
            addr: Some(addr.to_string()),
        },
        SessionConfig::default(),
    );
    let local = listen_through(&cli, &session).await;
    echo_round_trip(local, &random_bytes(64 << 10)).await;
    // ...and another registers with its rendezvous role, on the same port.
    let other = Node::bind(loopback(), identity(), Tuning::default()).unwrap();
    let registration = other.register(addr.to_string());
    let observed = tokio::time::timeout(WAIT, registration.registered()).await;
    assert_eq!(observed.ok().flatten(), Some(other.local_addr().unwrap()));
    assert_eq!(both.rendezvous_peers(), 1);
    echo_round_trip(local, b"still served").await;
    drop(session);
    stop(vec![cli, other, both]).await;
}
