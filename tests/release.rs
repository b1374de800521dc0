//! Resource release, alone in its own test binary so that no other test opens or closes file
//! descriptors in this process while it counts them.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;

/// The tests count this process's file descriptors: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// 500 sequential open/transfer/close cycles over one connection release everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_cycles_leak_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let echo = echo_server().await;
    let pair = pair()
        .service("echo", echo.addr)
        .session(|s| s.idle_grace = Duration::from_secs(600))
        .build();
    let local = pair.local("echo").await;
    // Warm up: the connection and its lazily made resources exist before counting.
    echo_round_trip(local, b"warm up").await;
    assert!(
        pair.client
            .stats()
            .streams
            .wait_for(WAIT, |n| *n == 0)
            .await
    );
    assert!(
        pair.server
            .stats()
            .streams
            .wait_for(WAIT, |n| *n == 0)
            .await
    );
    assert!(echo.live.wait_for(WAIT, |n| *n == 0).await);
    let fds_before = open_fds();
    let data = Arc::new(random_bytes(4096));
    for _ in 0..500 {
        echo_round_trip(local, &data).await;
    }
    assert!(
        pair.client
            .stats()
            .streams
            .wait_for(WAIT, |n| *n == 0)
            .await,
        "client streams"
    );
    assert!(
        pair.server
            .stats()
            .streams
            .wait_for(WAIT, |n| *n == 0)
            .await,
        "server streams"
    );
    assert!(
        echo.live.wait_for(WAIT, |n| *n == 0).await,
        "target connections"
    );
    assert_eq!(open_fds(), fds_before, "file descriptors");
    assert_eq!(pair.client.stats().connections_opened(), 1);
    assert_eq!(pair.client.stats().streams_opened(), 501);
    assert_eq!(pair.server.stats().streams_opened(), 501);
    pair.shutdown().await;
}

/// A minimal HTTP/1.1 device: answers each request `200` with a 64-byte body, keep-alive
/// until the client asks to close or closes.
async fn http_device() -> TestServer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    server(|mut tcp| async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                buf.drain(..end + 4);
                let close = head.contains("connection: close");
                let body = [b'x'; 64];
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{}\r\n",
                    body.len(),
                    if close { "Connection: close\r\n" } else { "" }
                );
                if tcp.write_all(answer.as_bytes()).await.is_err()
                    || tcp.write_all(&body).await.is_err()
                {
                    return;
                }
                if close {
                    let _ = tcp.shutdown().await;
                    return;
                }
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
}

/// 300 browser-like connections through `--http`, each asking for one service and then the
/// other (a stream opened, one retired), leave no stream, device connection or descriptor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_http_connections_across_two_services_leak_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let device = http_device().await;
    let target = format!("http://{}", device.addr);
    let pair = pair()
        .service_url("a", &target)
        .service_url("b", &target)
        .session(|s| s.idle_grace = Duration::from_secs(600))
        .build();
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = tunnel::connect::router::Router::new(vec![("peer".into(), pair.session.clone())]);
    pair.client.serve_http(Arc::new(router), listener);
    let visit = || async {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let both = format!(
            "GET /1 HTTP/1.1\r\nHost: a.peer.localhost:{port}\r\n\r\n\
             GET /2 HTTP/1.1\r\nHost: b.localhost:{port}\r\nConnection: close\r\n\r\n"
        );
        tcp.write_all(both.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tcp.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    };
    // Warm up: the connection, the catalog and lazily made resources exist before counting.
    visit().await;
    let settled = |what: &'static str| {
        let (c, s, d) = (
            pair.client.stats().streams.clone(),
            pair.server.stats().streams.clone(),
            device.live.clone(),
        );
        async move {
            assert!(
                c.wait_for(WAIT, |n| *n == 0).await,
                "{what}: client streams"
            );
            assert!(
                s.wait_for(WAIT, |n| *n == 0).await,
                "{what}: server streams"
            );
            assert!(
                d.wait_for(WAIT, |n| *n == 0).await,
                "{what}: device connections"
            );
        }
    };
    settled("after the warm-up").await;
    let fds_before = open_fds();
    let opened_before = pair.server.stats().streams_opened();
    for _ in 0..300 {
        visit().await;
    }
    settled("after 300 connections").await;
    assert_eq!(open_fds(), fds_before, "file descriptors");
    assert_eq!(pair.client.stats().connections_opened(), 1);
    // Two streams per connection (one per service), nothing more; the catalog was cached.
    let opened = pair.server.stats().streams_opened() - opened_before;
    assert!((600..=602).contains(&opened), "streams opened: {opened}");
    pair.shutdown().await;
}
