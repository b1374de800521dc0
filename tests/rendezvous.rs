//! The rendezvous, in process on loopback: registration, presence, introduction, relay,
//! and a rendezvous restart. (Real NATs are in tests/natlab.rs.)

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::process::{peer_id, tunnel_bin, Proc, TempDir};
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
    // A short idle grace, so the connection closes soon after the client is done.
    let config = SessionConfig {
        idle_grace: Duration::from_secs(2),
        ..SessionConfig::default()
    };
    let (cli, session, local) = connector(client_id, rz_addr, exp.peer_id(), config).await;
    echo_round_trip(local, &random_bytes(1 << 20)).await;
    let path = session.path().expect("connected");
    assert_eq!(path.kind(), "direct");
    assert_eq!(
        path.addr(),
        exp.local_addr().unwrap(),
        "straight to the exposing node"
    );
    assert_eq!(rz.rendezvous_peers(), 2);
    // The relay allocated with the introduction stays while the connection lives: it is
    // the path a dead direct path hands over to.
    assert_eq!(
        rz.stats().relays.get(),
        1,
        "the relay is kept as the fallback path"
    );
    // The idle grace ends and the connection closes: the allocation is released then, not
    // at the relay's idle timeout a minute later.
    assert!(
        rz.stats().relays.wait_for(WAIT, |n| *n == 0).await,
        "the relay allocation was released with the connection"
    );
    assert_eq!(session.path(), None, "the connection closed");
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

/// `tunnel rendezvous` as a process on 127.0.0.1 (identity `rz.pem` in `dir`) with `args`;
/// its address once it listens.
fn rendezvous_process(dir: &TempDir, args: &[&str]) -> (Proc, SocketAddr) {
    let rz = Proc::spawn(
        "rendezvous",
        std::process::Command::new(tunnel_bin())
            .args(["rendezvous", "--listen", "127.0.0.1:0"])
            .args(args)
            .arg("--identity")
            .arg(dir.path("rz.pem")),
    );
    let line = rz.line_matching(|l| l.starts_with("rendezvous listening on "));
    let addr = line.rsplit(' ').next().unwrap().trim().parse().unwrap();
    (rz, addr)
}

fn rendezvous_with(config: RendezvousConfig) -> Node {
    let node = Node::bind(loopback(), identity(), Tuning::default()).unwrap();
    node.serve_rendezvous(config).unwrap();
    node
}

/// Waits until `pred` holds, polling; bounded by `WAIT`.
async fn until(what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !pred() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client through `local` that the tunnel could not serve: the socket is closed on it with
/// nothing sent back.
async fn refused(local: SocketAddr) {
    let mut tcp = TcpStream::connect(local).await.unwrap();
    let _ = tcp.write_all(b"x").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut out))
        .await
        .expect("the client was closed, not left hanging");
    assert!(out.is_empty());
}

/// A peer the exposing node does not allow asks the rendezvous for it: it is never
/// introduced (the exposing node sees no connection, not even an attempt), the rendezvous
/// counts the refusal, and an allowed peer asking at the same time is introduced at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_is_never_introduced_and_an_allowed_peer_is() {
    let echo = echo_server().await;
    let rz = rendezvous_at(loopback());
    let rz_addr = rz.local_addr().unwrap();
    let friend = identity();
    let exp = exposer(rz_addr, echo.addr, friend.peer_id());
    let short = SessionConfig {
        connect_timeout: Duration::from_secs(3),
        ..SessionConfig::default()
    };
    let (stranger, s_session, s_local) =
        connector(identity(), rz_addr, exp.peer_id(), short.clone()).await;
    // A fourth id nobody holds, asked for the same way.
    let (lost, l_session, l_local) =
        connector(identity(), rz_addr, identity().peer_id(), short).await;
    let (cli, session, local) =
        connector(friend, rz_addr, exp.peer_id(), SessionConfig::default()).await;
    let (a, b, ()) = tokio::join!(
        refused(s_local),
        refused(l_local),
        echo_round_trip(local, b"friends only")
    );
    let _ = (a, b);
    assert_eq!(session.path().map(|p| p.kind()), Some("direct"));
    assert_eq!(s_session.path(), None, "the stranger has no path");
    assert_eq!(l_session.path(), None);
    assert_eq!(
        exp.stats().connections_opened(),
        1,
        "the exposing node saw the friend's connection and no other"
    );
    until("the refusal counted", || {
        rz.stats().rendezvous_refused.get() >= 1
    })
    .await;
    drop((session, s_session, l_session));
    stop(vec![cli, stranger, lost, exp, rz]).await;
}

/// A stranger on another address (127.0.0.2) registers as many identities as the
/// rendezvous takes from one address and holds every relay allocation its address may: an
/// allowed pair on 127.0.0.1 still registers, and still gets a relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_exhausting_its_quotas_does_not_stop_an_allowed_pair() {
    let mut config = RendezvousConfig::default();
    config.limits.max_peers_per_ip = 2;
    config.limits.max_relays_per_ip = 1;
    let rz = rendezvous_with(config);
    let rz_addr = rz.local_addr().unwrap();
    let echo = echo_server().await;
    let elsewhere: SocketAddr = "127.0.0.2:0".parse().unwrap();
    // The stranger's two identities, one exposing to the other, take its relay.
    let (s1_id, s2_id) = (identity(), identity());
    let s1 = Node::bind(elsewhere, s1_id, Tuning::default()).unwrap();
    expose_echo(&s1, echo.addr, s2_id.peer_id());
    s1.register(rz_addr.to_string()).registered().await.unwrap();
    let s2 = Node::bind(elsewhere, s2_id, Tuning::default()).unwrap();
    s2.register(rz_addr.to_string());
    let relayed = SessionConfig {
        force_relay: true,
        ..SessionConfig::default()
    };
    let s_session = s2.connect(
        PeerAddr {
            id: s1.peer_id(),
            addr: None,
        },
        relayed.clone(),
    );
    let s_local = listen_through(&s2, &s_session).await;
    echo_round_trip(s_local, b"the stranger's own relay").await;
    assert_eq!(rz.stats().relays.get(), 1);
    // A third identity from the same address is refused.
    let s3 = Node::bind(elsewhere, identity(), Tuning::default()).unwrap();
    s3.register(rz_addr.to_string());
    until("the third registration refused", || {
        rz.stats().rendezvous_refused.get() >= 1
    })
    .await;
    assert_eq!(rz.rendezvous_peers(), 2);

    // The allowed pair, on 127.0.0.1: registered, introduced, relayed.
    let friend = identity();
    let exp = exposer(rz_addr, echo.addr, friend.peer_id());
    let (cli, session, local) = connector(friend, rz_addr, exp.peer_id(), relayed).await;
    echo_round_trip(local, &random_bytes(256 << 10)).await;
    assert_eq!(session.path().map(|p| p.kind()), Some("relay"));
    assert_eq!(rz.stats().relays.get(), 2);
    assert_eq!(rz.rendezvous_peers(), 4);
    drop((session, s_session));
    stop(vec![cli, exp, s3, s2, s1, rz]).await;
}

/// `tunnel rendezvous --allow-file`: an id not in the file is refused with a message that
/// says so; SIGHUP after adding it admits it (the peer retries by itself) and its tunnel
/// works; SIGHUP after removing the other peer's id disconnects that peer with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_file_admits_and_a_reload_grants_and_revokes() {
    let echo = echo_server().await;
    let dir = TempDir::new("rz-allow");
    let (e_pem, c_pem) = (dir.path("expose.pem"), dir.path("connect.pem"));
    let (e_id, c_id) = (peer_id(&e_pem), peer_id(&c_pem));
    let allow = dir.path("allowed-peers");
    std::fs::write(
        &allow,
        format!("# who may register\n{e_id}  # the camera host\n"),
    )
    .unwrap();
    let allow_file = allow.to_str().unwrap();
    let (rz, rz_addr) = rendezvous_process(&dir, &["--allow-file", allow_file]);
    let rz_addr = rz_addr.to_string();
    let expose = Proc::spawn(
        "expose",
        std::process::Command::new(tunnel_bin())
            .args([
                "expose",
                "--listen",
                "127.0.0.1:0",
                "--rendezvous",
                &rz_addr,
            ])
            .args(["--allow", &c_id, "--service"])
            .arg(format!("echo={}", echo.addr))
            .arg("--identity")
            .arg(&e_pem),
    );
    expose.line_matching(|l| l.trim_start().starts_with("tunnel connect "));
    let connect = Proc::spawn(
        "connect",
        std::process::Command::new(tunnel_bin())
            .args(["connect", &e_id, "--rendezvous", &rz_addr])
            .args(["--local", "127.0.0.1:0=echo", "--identity"])
            .arg(&c_pem),
    );
    let line = connect.line_matching(|l| l.contains(" -> echo on "));
    let local: SocketAddr = line.split_whitespace().next().unwrap().parse().unwrap();
    connect.wait_log("admits only the peers it lists");
    rz.wait_log("reason=\"not_listed\"");

    std::fs::write(&allow, format!("{e_id}\n{c_id}\n")).unwrap();
    rz.signal("HUP");
    rz.wait_log("rules reloaded disconnected=0");
    // The connecting side registers again by itself (backoff of at most 5 s); a client that
    // comes meanwhile waits for the connection (up to its 10 s), so it gets through.
    echo_round_trip(local, b"admitted").await;

    std::fs::write(&allow, format!("{c_id}\n")).unwrap();
    rz.signal("HUP");
    rz.wait_log("rules reloaded disconnected=1");
    expose.wait_log("no longer admitted by this rendezvous");
    // A broken file is reported with its line, and the old list stays.
    std::fs::write(&allow, format!("{c_id}\nnot-an-id\n")).unwrap();
    rz.signal("HUP");
    rz.wait_log("line 2: invalid peer id");
}

/// The rendezvous's TCP link port (for networks that drop UDP) against hostile clients: one
/// that speaks no TLS is closed; of three silent clients from one address with
/// `--max-peers-per-ip 2`, one is closed at once while a real link from another address gets
/// in; an authenticated link that sends a frame the protocol forbids is closed, and the
/// process keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tcp_link_clients_are_closed_and_the_rendezvous_keeps_serving() {
    let dir = TempDir::new("rz-link");
    let (rz, addr) = rendezvous_process(&dir, &["--max-peers-per-ip", "2"]);
    // A TCP connection to the rendezvous from `from` (127.0.0.0/8 is all loopback).
    let from = |ip: &str| {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(ip, 0)).unwrap();
            socket.connect(addr).await.unwrap()
        }
    };
    // The read ends (EOF or reset): the rendezvous closed it.
    async fn closed_by_server(mut tcp: TcpStream) {
        let mut buf = [0u8; 256];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    }
    let mut garbage = from("127.0.0.3").await;
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(WAIT, closed_by_server(garbage))
        .await
        .expect("a client that speaks no TLS is closed");
    // Three silent clients from one address: one is closed at once; two hold its places.
    let mut silent = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let tcp = from("127.0.0.1").await;
        silent.spawn(closed_by_server(tcp));
    }
    tokio::time::timeout(WAIT, silent.join_next())
        .await
        .expect("one of three silent clients is closed at once");
    rz.wait_stderr_for(WAIT, |log| log.contains("TCP link refused"));
    // A real link (TLS with a peer key, ALPN tunnel-link/1) from another address gets in.
    let peer = identity();
    let config = tunnel::quic::tls::client_config(
        &peer,
        None,
        Default::default(),
        tunnel::protocol::link::ALPN,
    )
    .unwrap();
    let name = rustls::pki_types::ServerName::try_from("tunnel").unwrap();
    let mut link = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, from("127.0.0.2").await),
    )
    .await
    .expect("a link from another address is not held up")
    .unwrap();
    rz.wait_stderr_for(WAIT, |log| log.contains("TCP link up"));
    // A frame of length 0 is forbidden: the link is closed.
    link.write_all(&[0, 0, 0x0d, 0x96]).await.unwrap();
    link.flush().await.unwrap();
    let mut buf = [0u8; 64];
    let end = tokio::time::timeout(WAIT, link.read(&mut buf)).await;
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "the link was not closed"
    );
    rz.wait_stderr_for(WAIT, |log| log.contains("TCP link ended: bad frame"));
    // Still serving: `tunnel status` answers.
    let out = std::process::Command::new(tunnel_bin())
        .args(["status", "--json", "--identity"])
        .arg(dir.path("rz.pem"))
        .output()
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["role"], "rendezvous", "{s:#}");
    silent.abort_all();
}

/// A TCP link that completes its TLS handshake and then sends nothing is closed after the
/// rendezvous's link idle time (a registered peer's keep-alives keep a real one busy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tcp_link_is_closed_after_its_idle_time() {
    let node = rendezvous_with(RendezvousConfig {
        link_idle: Duration::from_millis(300),
        ..RendezvousConfig::default()
    });
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    node.serve_links(vec![listener]);
    let config = tunnel::quic::tls::client_config(
        &identity(),
        None,
        Default::default(),
        tunnel::protocol::link::ALPN,
    )
    .unwrap();
    let name = rustls::pki_types::ServerName::try_from("tunnel").unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut link = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let end = tokio::time::timeout(WAIT, link.read(&mut buf))
        .await
        .expect("a silent link is closed, not kept");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    stop(vec![node]).await;
}
