//! The HTTP layer's own answers, in process with a virtual clock: a slow client gets 408
//! after the head timeout (no real 30 s wait), a failed open gets a page naming the peer and
//! the reason, and an idle keep-alive connection ends cleanly when the node stops.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tunnel::http::proxy::{serve, HttpCtx, Key, OpenFailure, Routed, Upstream, Upstreams};

/// Routes everything to one service whose peer cannot be reached.
struct Unreachable;

impl Upstreams for Unreachable {
    async fn route(&self, _host: Option<&str>, _target: &str) -> Routed {
        Routed::To(Key {
            peer: "home".into(),
            service: "nas".into(),
        })
    }

    async fn open(&self, key: &Key, _client: SocketAddr) -> Result<Upstream, OpenFailure> {
        Err(OpenFailure {
            status: 504,
            message: format!("cannot reach peer {}: no connection within 10s", key.peer),
        })
    }
}

/// Answers every request with a page of its own (what the index does).
struct Pages;

impl Upstreams for Pages {
    async fn route(&self, _host: Option<&str>, _target: &str) -> Routed {
        Routed::Page(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec())
    }

    async fn open(&self, _key: &Key, _client: SocketAddr) -> Result<Upstream, OpenFailure> {
        unreachable!("pages open nothing")
    }
}

/// One HTTP-layer connection served by `upstreams`; the client's socket and the context.
async fn connection<U: Upstreams>(upstreams: U) -> (TcpStream, Arc<HttpCtx>, TaskTracker) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (tcp, addr) = listener.accept().await.unwrap();
    let tasks = TaskTracker::new();
    let ctx = Arc::new(HttpCtx {
        stop: CancellationToken::new(),
        abort: CancellationToken::new(),
        tasks: tasks.clone(),
        stats: Arc::default(),
    });
    let ctx2 = ctx.clone();
    tasks.spawn(async move { serve(tcp, addr, Arc::new(upstreams), None, &ctx2).await });
    (client, ctx, tasks)
}

async fn read_all(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(start_paused = true)]
async fn a_head_that_stalls_gets_408_after_the_head_timeout() {
    let (mut client, _ctx, tasks) = connection(Pages).await;
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    let page = read_all(&mut client).await;
    assert!(
        page.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{page}"
    );
    assert!(start.elapsed() >= tunnel::http::proxy::HEAD_TIMEOUT);
    tasks.close();
    tasks.wait().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_open_is_a_page_naming_the_peer_and_the_reason() {
    let (mut client, _ctx, tasks) = connection(Unreachable).await;
    client
        .write_all(b"GET /x HTTP/1.1\r\nHost: nas.home.localhost:8080\r\n\r\n")
        .await
        .unwrap();
    let page = read_all(&mut client).await;
    assert!(
        page.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"),
        "{page}"
    );
    assert!(page.contains("cannot reach peer home"), "{page}");
    assert!(page.contains("Connection: close"));
    tasks.close();
    tasks.wait().await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_connection_ends_cleanly_when_the_node_stops() {
    let (mut client, ctx, tasks) = connection(Pages).await;
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 40];
    let n = client.read(&mut first).await.unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200 OK"));
    // Kept alive: nothing more comes until the node stops; then a clean end (FIN).
    ctx.stop.cancel();
    let rest = read_all(&mut client).await;
    assert!(rest.ends_with("ok") || rest.is_empty(), "{rest:?}");
    tasks.close();
    tasks.wait().await;
}

#[tokio::test(start_paused = true)]
async fn a_head_request_gets_our_page_without_its_body_and_the_connection_goes_on() {
    let (mut client, _ctx, tasks) = connection(Pages).await;
    client
        .write_all(
            b"HEAD / HTTP/1.1\r\nHost: localhost\r\n\r\nGET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let all = read_all(&mut client).await;
    assert_eq!(
        all,
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    );
    tasks.close();
    tasks.wait().await;
}

#[tokio::test(start_paused = true)]
async fn a_client_fin_after_a_stray_line_still_gets_its_answer_and_a_clean_end() {
    let (mut client, _ctx, tasks) = connection(Pages).await;
    // RFC 9112 2.2 allows empty lines between requests; then the client half-closes.
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n\r\nGE")
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    // The answer, then FIN (read_to_end fails on a reset).
    let all = read_all(&mut client).await;
    assert!(all.ends_with("\r\n\r\nok"), "{all:?}");
    tasks.close();
    tasks.wait().await;
}
