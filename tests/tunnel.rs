//! The core tunnel, in process on loopback: two nodes, real QUIC, real TCP sockets.

mod common;

use std::io::ErrorKind;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tunnel::connect::{ConnectError, Session};
use tunnel::protocol::close_code;
use tunnel::protocol::header::{
    decode_response, encode_request, OpenRequest, OpenResponse, Status, VERSION,
};

/// Opens a raw stream on the session's connection, writes `header`, reads the response.
async fn raw_open(
    session: &Session,
    header: &[u8],
) -> (quinn::SendStream, quinn::RecvStream, OpenResponse) {
    let (conn, _lease) = session.acquire().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(header).await.unwrap();
    let mut buf = Vec::new();
    loop {
        let chunk = recv
            .read_chunk(4096, true)
            .await
            .unwrap()
            .expect("response before FIN");
        buf.extend_from_slice(&chunk.bytes);
        if let Some((resp, _)) = decode_response(&buf).unwrap() {
            return (send, recv, resp);
        }
    }
}

fn request(service: &str) -> Vec<u8> {
    encode_request(&OpenRequest {
        service: service.into(),
        client_addr: None,
        op: Default::default(),
    })
    .unwrap()
}

async fn read_to_end(tcp: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_each_way_byte_exact() {
    let echo = echo_server().await;
    let pair = pair().service("echo", echo.addr).build();
    let local = pair.local("echo").await;
    echo_round_trip(local, &random_bytes(1 << 20)).await;
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_each_way_byte_exact() {
    let echo = echo_server().await;
    let pair = pair().service("echo", echo.addr).build();
    let local = pair.local("echo").await;
    echo_round_trip(local, &random_bytes(100 << 20)).await;
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams_share_one_connection() {
    let echo = echo_server().await;
    let pair = pair().service("echo", echo.addr).build();
    let local = pair.local("echo").await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200usize {
        tasks.spawn(async move {
            let data = random_bytes(16 * 1024 + i);
            echo_round_trip(local, &data).await;
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(
        pair.client.stats().connections_opened(),
        1,
        "one QUIC connection"
    );
    assert_eq!(pair.client.stats().streams_opened(), 200);
    pair.shutdown().await;
}

/// The client half-closes; the server answers after it saw the FIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_the_client_keeps_the_reply_flowing() {
    let target = server(|mut tcp| async move {
        let got = read_to_end(&mut tcp).await.unwrap();
        // Only after EOF: reply with what we got, reversed, then close.
        let reply: Vec<u8> = got.iter().rev().copied().collect();
        tcp.write_all(&reply).await.unwrap();
        tcp.shutdown().await.unwrap();
    })
    .await;
    let pair = pair().service("rev", target.addr).build();
    let mut tcp = TcpStream::connect(pair.local("rev").await).await.unwrap();
    tcp.write_all(b"hello, half-closed world").await.unwrap();
    tcp.shutdown().await.unwrap();
    let reply = read_to_end(&mut tcp).await.unwrap();
    assert_eq!(reply, b"dlrow desolc-flah ,olleh");
    pair.shutdown().await;
}

/// The server half-closes first; the client keeps sending and everything arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_the_server_keeps_the_upload_flowing() {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let target = server(move |mut tcp| {
        let tx = tx.clone();
        async move {
            tcp.write_all(b"greeting").await.unwrap();
            tcp.shutdown().await.unwrap();
            let got = read_to_end(&mut tcp).await.unwrap();
            tx.send(got).unwrap();
        }
    })
    .await;
    let pair = pair().service("up", target.addr).build();
    let mut tcp = TcpStream::connect(pair.local("up").await).await.unwrap();
    let greeting = read_to_end(&mut tcp).await.unwrap();
    assert_eq!(greeting, b"greeting", "the server's FIN arrived as EOF");
    let upload = random_bytes(3 << 20);
    tcp.write_all(&upload).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut rx = rx;
    let got = rx.recv().await.unwrap();
    assert_eq!(sha256(&got), sha256(&upload));
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_aborts_the_server_socket() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let target = server(move |mut tcp| {
        let tx = tx.clone();
        async move {
            let mut buf = [0u8; 1024];
            let mut total = 0;
            let end = loop {
                match tcp.read(&mut buf).await {
                    Ok(0) => break Ok(total),
                    Ok(n) => total += n,
                    Err(e) => break Err(e.kind()),
                }
            };
            tx.send(end).unwrap();
        }
    })
    .await;
    let pair = pair().service("t", target.addr).build();
    let tcp = TcpStream::connect(pair.local("t").await).await.unwrap();
    let mut tcp = tcp;
    tcp.write_all(b"some bytes").await.unwrap();
    // Wait until the server side is connected, then abort with RST.
    assert!(target.live.wait_for(WAIT, |n| *n == 1).await);
    socket2::SockRef::from(&tcp)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(tcp);
    let end = rx.recv().await.unwrap();
    assert_eq!(
        end,
        Err(ErrorKind::ConnectionReset),
        "the server saw an abort, not a clean end"
    );
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_reset_aborts_the_client_socket() {
    let target = server(|mut tcp| async move {
        let mut buf = [0u8; 5];
        tcp.read_exact(&mut buf).await.unwrap();
        tcp.write_all(b"partial").await.unwrap();
        socket2::SockRef::from(&tcp)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(tcp);
    })
    .await;
    let pair = pair().service("t", target.addr).build();
    let mut tcp = TcpStream::connect(pair.local("t").await).await.unwrap();
    tcp.write_all(b"hello").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    let end = loop {
        match tcp.read(&mut buf).await {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break Err(e.kind()),
        }
    };
    assert_eq!(
        end,
        Err(ErrorKind::ConnectionReset),
        "the client saw an abort, not a clean end"
    );
    assert!(b"partial".starts_with(&got));
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_is_refused_with_a_status() {
    let echo = echo_server().await;
    let pair = pair().service("echo", echo.addr).build();
    let (_s, _r, resp) = raw_open(&pair.session, &request("nope")).await;
    assert_eq!(resp.status, Status::UnknownService);
    assert!(
        resp.message.contains("echo"),
        "lists what is exposed: {}",
        resp.message
    );
    // Through a local listener, the client's socket is closed (FIN, not RST) with no data,
    // even though it sent something first...
    let local = pair.local("nope").await;
    let mut tcp = TcpStream::connect(local).await.unwrap();
    tcp.write_all(b"hello\r\n").await.unwrap();
    assert_eq!(read_to_end(&mut tcp).await.unwrap(), b"");
    // ...unless that was an HTTP request: a browser gets a page saying why.
    let mut tcp = TcpStream::connect(local).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let page = String::from_utf8(read_to_end(&mut tcp).await.unwrap()).unwrap();
    assert!(page.starts_with("HTTP/1.1 404 "), "{page}");
    assert!(page.contains("no service named"), "{page}");
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_target_is_reported() {
    let closed = {
        let l = tokio::net::TcpListener::bind(loopback()).await.unwrap();
        l.local_addr().unwrap()
    };
    let pair = pair().service("gone", closed).build();
    let (_s, _r, resp) = raw_open(&pair.session, &request("gone")).await;
    assert_eq!(resp.status, Status::TargetRefused);
    assert!(resp.message.contains("refused"), "{}", resp.message);
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthorised_peer_is_closed_with_a_reason() {
    let echo = echo_server().await;
    let pair = pair().service("echo", echo.addr).unauthorised().build();
    let (conn, _lease) = pair.session.acquire().await.unwrap();
    let reason = conn.closed().await;
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, close_code::NOT_AUTHORISED);
            assert!(String::from_utf8_lossy(&c.reason).contains("not authorised"));
        }
        other => panic!("expected an application close, got {other}"),
    }
    // A client through the listener gets its socket closed, and nothing reached the target.
    let mut tcp = TcpStream::connect(pair.local("echo").await).await.unwrap();
    let _ = tcp.write_all(b"x").await;
    let _ = read_to_end(&mut tcp).await;
    assert_eq!(pair.server.stats().streams_opened(), 0);
    assert_eq!(echo.live.get(), 0);
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pinned_id_is_refused_with_a_clear_error() {
    let echo = echo_server().await;
    let other = tunnel::identity::Identity::generate().unwrap().peer_id();
    let pair = pair().service("echo", echo.addr).pin(other).build();
    let err = pair.session.acquire().await.unwrap_err();
    let ConnectError::Failed(msg) = &err else {
        panic!("{err}")
    };
    assert!(
        msg.contains(&other.to_string()) && msg.contains("not the pinned"),
        "{msg}"
    );
    assert_eq!(pair.server.stats().connections_opened(), 0);
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_inside_the_idle_grace_reuses_the_connection() {
    let echo = echo_server().await;
    let pair = pair()
        .service("echo", echo.addr)
        .session(|s| s.idle_grace = Duration::from_secs(60))
        .build();
    let local = pair.local("echo").await;
    for _ in 0..3 {
        echo_round_trip(local, b"again").await;
        // The stream has fully ended on the client side before the next one.
        assert!(
            pair.client
                .stats()
                .streams
                .wait_for(WAIT, |n| *n == 0)
                .await
        );
    }
    assert_eq!(pair.client.stats().connections_opened(), 1);
    assert_eq!(
        pair.client.stats().connections.get(),
        1,
        "still up inside the grace"
    );
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_closes_on_both_sides_after_the_idle_grace() {
    let echo = echo_server().await;
    let pair = pair()
        .service("echo", echo.addr)
        .session(|s| s.idle_grace = Duration::from_millis(300))
        .build();
    let local = pair.local("echo").await;
    echo_round_trip(local, b"first").await;
    assert!(
        pair.client
            .stats()
            .connections
            .wait_for(WAIT, |n| *n == 0)
            .await,
        "client closed it"
    );
    assert!(
        pair.server
            .stats()
            .connections
            .wait_for(WAIT, |n| *n == 0)
            .await,
        "server saw it close"
    );
    // The next client gets a new connection.
    echo_round_trip(local, b"second").await;
    assert_eq!(pair.client.stats().connections_opened(), 2);
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_headers_are_refused_without_harm() {
    let echo = echo_server().await;
    let pair = pair().service("echo", echo.addr).build();
    // A service name length over the limit.
    let (_s, _r, resp) = raw_open(&pair.session, &[VERSION, 200, b'a', b'b']).await;
    assert_eq!(resp.status, Status::BadRequest);
    assert!(resp.message.contains("limit"), "{}", resp.message);
    // An extension area over the limit.
    let (_s, _r, resp) = raw_open(&pair.session, &[VERSION, 1, b'a', 0xff, 0xff]).await;
    assert_eq!(resp.status, Status::BadRequest);
    // An unknown version.
    let (_s, _r, resp) = raw_open(&pair.session, &[42, 1, b'a', 0, 0]).await;
    assert_eq!(resp.status, Status::BadRequest);
    assert!(resp.message.contains("version"), "{}", resp.message);
    // The connection is still good for real traffic.
    echo_round_trip(pair.local("echo").await, b"still fine").await;
    // (The echo server counts its connection down just after its FIN reached us.)
    assert!(echo.live.wait_for(WAIT, |n| *n == 0).await);
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_that_never_completes_times_out() {
    let echo = echo_server().await;
    let pair = pair()
        .service("echo", echo.addr)
        .expose(|c| c.header_timeout = Duration::from_millis(200))
        .build();
    let (conn, _lease) = pair.session.acquire().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[VERSION, 4, b'e']).await.unwrap();
    let err = recv.read_chunk(64, true).await.unwrap_err();
    assert_eq!(
        err,
        quinn::ReadError::Reset(tunnel::protocol::stream_code::TIMEOUT)
    );
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_peer_limit_wait_for_a_free_slot() {
    let echo = echo_server().await;
    let pair = pair()
        .service("echo", echo.addr)
        .tuning(|t| t.max_streams = 4)
        .build();
    let mut held = Vec::new();
    for _ in 0..4 {
        let (s, r, resp) = raw_open(&pair.session, &request("echo")).await;
        assert_eq!(resp.status, Status::Ok);
        held.push((s, r));
    }
    let (conn, _lease) = pair.session.acquire().await.unwrap();
    let fifth = conn.open_bi();
    tokio::pin!(fifth);
    // The peer's limit holds the fifth open; it is not refused, it waits.
    assert!(tokio::time::timeout(Duration::from_millis(300), &mut fifth)
        .await
        .is_err());
    let (mut s, _r) = held.pop().unwrap();
    s.finish().unwrap();
    drop(_r);
    let (send, _recv) = tokio::time::timeout(WAIT, fifth).await.unwrap().unwrap();
    drop(send);
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_socket_limit_the_peer_answers_busy() {
    let echo = echo_server().await;
    let pair = pair()
        .service("echo", echo.addr)
        .expose(|c| c.max_streams = 1)
        .build();
    let (_s1, _r1, first) = raw_open(&pair.session, &request("echo")).await;
    assert_eq!(first.status, Status::Ok);
    let (_s2, _r2, second) = raw_open(&pair.session, &request("echo")).await;
    assert_eq!(second.status, Status::Busy);
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_live_stream_finish_then_resets_what_outlives_the_drain() {
    // A server that sends 2 MiB slowly enough to still be going when the drain starts.
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let target = server(move |mut tcp| {
        let mut release = release_rx.clone();
        async move {
            tcp.write_all(b"start").await.unwrap();
            let _ = release.wait_for(|r| *r).await;
            let _ = tcp.write_all(&vec![7u8; 2 << 20]).await;
            let _ = tcp.shutdown().await;
        }
    })
    .await;
    let first = pair().service("slow", target.addr).build();
    let local = first.local("slow").await;
    let mut tcp = TcpStream::connect(local).await.unwrap();
    let mut start = [0u8; 5];
    tcp.read_exact(&mut start).await.unwrap();
    let Pair {
        server,
        client,
        session,
    } = first;
    drop(session);
    let drain = tokio::spawn(async move {
        client.shutdown(Duration::from_secs(20)).await;
    });
    // The drain has begun once the local listener is closed; the stream is still live.
    while TcpStream::connect(local).await.is_ok() {
        tokio::task::yield_now().await;
    }
    release_tx.send(true).unwrap();
    let rest = read_to_end(&mut tcp).await.unwrap();
    assert_eq!(
        rest.len(),
        2 << 20,
        "the live stream finished during the drain"
    );
    tcp.shutdown().await.unwrap();
    // Both directions ended: the drain ends with the stream, long before its deadline.
    tokio::time::timeout(Duration::from_secs(15), drain)
        .await
        .expect("the drain ended with the stream")
        .unwrap();

    // Now a stream that never ends: the drain deadline resets it.
    let hang = server_that_hangs().await;
    let pair2 = pair().service("hang", hang.addr).build();
    let mut tcp = TcpStream::connect(pair2.local("hang").await).await.unwrap();
    tcp.write_all(b"x").await.unwrap();
    assert!(hang.live.wait_for(WAIT, |n| *n == 1).await);
    let Pair {
        server: s2,
        client: c2,
        session: sess2,
    } = pair2;
    drop(sess2);
    c2.shutdown(Duration::from_millis(200)).await;
    let mut buf = [0u8; 16];
    let end = tcp.read(&mut buf).await.map_err(|e| e.kind());
    assert_eq!(
        end,
        Err(ErrorKind::ConnectionReset),
        "cut off at the deadline with an abort"
    );
    tokio::join!(
        server.shutdown(Duration::from_secs(1)),
        s2.shutdown(Duration::from_secs(1))
    );
}

async fn server_that_hangs() -> TestServer {
    server(|mut tcp| async move {
        let mut buf = [0u8; 64];
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
}

/// Two nodes that expose `echo` to each other and each hold a session to the other; each
/// session is served by a local listener. Returns the nodes and the listeners' addresses.
async fn two_nodes_exposing_to_each_other(
    echo: std::net::SocketAddr,
    config: tunnel::connect::SessionConfig,
) -> (
    tunnel::node::Node,
    tunnel::node::Node,
    std::net::SocketAddr,
    std::net::SocketAddr,
) {
    use tunnel::config::PeerAddr;
    use tunnel::expose::{Authorized, ExposeConfig};
    use tunnel::node::Node;
    use tunnel::quic::Tuning;

    let (ia, ib) = (identity(), identity());
    let a = Node::bind(loopback(), ia.clone(), Tuning::default()).unwrap();
    let b = Node::bind(loopback(), ib.clone(), Tuning::default()).unwrap();
    for (node, other) in [(&a, ib.peer_id()), (&b, ia.peer_id())] {
        let services = [("echo".parse().unwrap(), echo.to_string().parse().unwrap())].into();
        node.expose(ExposeConfig::new(
            services,
            Authorized::Only([other].into()),
        ))
        .unwrap();
    }
    let mut locals = Vec::new();
    for (from, to) in [(&a, &b), (&b, &a)] {
        let peer = PeerAddr {
            id: to.peer_id(),
            addr: Some(to.local_addr().unwrap().to_string()),
        };
        let session = from.connect(peer, config.clone());
        let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
        locals.push(listener.local_addr().unwrap());
        from.serve_local(&session, listener, "echo".parse().unwrap());
    }
    (a, b, locals[0], locals[1])
}

/// One node exposes and connects on its single endpoint; two such nodes reach each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_both_exposes_and_connects() {
    let echo = echo_server().await;
    let (a, b, addr_a, addr_b) =
        two_nodes_exposing_to_each_other(echo.addr, Default::default()).await;
    echo_round_trip(addr_a, b"a to b").await;
    echo_round_trip(addr_b, b"b to a").await;
    // A dialled first; B's session found that connection and used it: one connection
    // carries both directions, on one UDP socket per node.
    assert_eq!(a.connections_with(&b.peer_id()), [a.peer_id()]);
    assert_eq!(b.connections_with(&a.peer_id()), [a.peer_id()]);
    let opened = a.stats().connections_opened() + b.stats().connections_opened();
    assert_eq!(opened, 2, "one dial, one accept");
    tokio::join!(
        a.shutdown(Duration::from_secs(1)),
        b.shutdown(Duration::from_secs(1))
    );
}

/// Both peers dial each other at the same moment: they end with one connection, the one
/// dialled by the lower peer id, and traffic flows both ways on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_dialling_each_other_at_once_keep_one_connection() {
    let echo = echo_server().await;
    // Both sessions dial at start, at once.
    let eager = tunnel::connect::SessionConfig {
        eager: true,
        ..Default::default()
    };
    let (a, b, addr_a, addr_b) = two_nodes_exposing_to_each_other(echo.addr, eager).await;
    let low = a.peer_id().min(b.peer_id());
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.connections_with(&b.peer_id()) != [low] || b.connections_with(&a.peer_id()) != [low] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "did not converge: a sees {:?}, b sees {:?}",
            a.connections_with(&b.peer_id()),
            b.connections_with(&a.peer_id())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    echo_round_trip(addr_a, b"a to b").await;
    echo_round_trip(addr_b, b"b to a").await;
    assert_eq!(
        a.connections_with(&b.peer_id()),
        [low],
        "still one connection"
    );
    let opened = a.stats().connections_opened() + b.stats().connections_opened();
    assert_eq!(
        opened, 4,
        "both dialled (2 dials + 2 accepts); the duplicate was closed"
    );
    tokio::join!(
        a.shutdown(Duration::from_secs(1)),
        b.shutdown(Duration::from_secs(1))
    );
}
