//! The HTTP layer of one client connection on the connecting side: reads every request head,
//! routes it (a keep-alive connection may ask for different services in turn), opens or
//! reuses a stream to the service's device, rewrites names both ways (`rewrite`), and streams
//! bodies without buffering them (`protocol::http::BodyTracker` finds where each ends).
//!
//! Two halves run at once, so uploads and `Expect: 100-continue` flow while responses do:
//! - requests (client → stream) reads heads, routes, writes heads and bodies; it tells the
//!   other half, in order, what to expect: a switch to another stream, a response to a
//!   request (its method), a page of our own (an error, the index);
//! - responses (stream → client) follows those orders one by one, so the client gets its
//!   answers in request order whatever stream they come from.
//!
//! After a `101 Switching Protocols` (WebSocket) both directions become raw bytes with
//! half-close intact. The client connection ends when the device's connection does (its
//! close is mirrored: the browser retries on a fresh one, as it would with the device itself).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::rewrite::{rewrite_request, rewrite_response, Names};
use super::{pages, route};
use crate::protocol::header::{HttpService, Protocol};
use crate::protocol::http::{
    is_upgrade, keeps_alive_request, keeps_alive_response, parse_request, parse_response,
    request_body, response_body, BodyKind, BodyTracker, HeadError, RequestHead, MAX_HEAD,
};
use crate::protocol::stream_code;
use crate::stats::{ServiceStats, ServiceUse, Stats};
use crate::tunnel::splice::{
    ignore_not_connected, linger, read_response, reset_tcp, write_tcp, Abort, CHUNK,
};

/// How long a request head may take from its first byte to its last.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a closed connection waits for the client's FIN, reading what it still sends.
const LINGER: Duration = Duration::from_secs(2);
/// Orders the request half may be ahead of the response half (pipelined requests, pages).
const PENDING: usize = 16;
/// How long a retired stream may take to end after its last response.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which service of which peer a request is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// The peer's name, as the user gave it.
    pub peer: String,
    pub service: String,
}

/// Where a request goes.
pub enum Routed {
    To(Key),
    /// Answer with this page ourselves (the index, or a 404 listing what exists).
    Page(Vec<u8>),
}

/// An open stream to a device, its response header read.
pub struct Upstream {
    pub send: SendStream,
    pub recv: RecvStream,
    /// Payload read past the response header.
    pub first: Bytes,
    pub http: HttpService,
    /// Held while the stream lives (the connection's idle count).
    pub hold: Box<dyn Send + Sync>,
    /// The response header is not read yet (`http` is what an earlier stream said): requests
    /// go out at once, and it is read, within this limit, before the first response.
    pub unconfirmed: Option<Duration>,
}

/// Why a stream could not be opened: the status and text of the page the browser gets.
#[derive(Debug, Clone)]
pub struct OpenFailure {
    pub status: u16,
    pub message: String,
}

/// What the layer needs from the connecting role: routes and streams.
pub trait Upstreams: Send + Sync + 'static {
    /// Where a request with this `Host` (if any) and request target goes.
    fn route(
        &self,
        host: Option<&str>,
        target: &str,
    ) -> impl std::future::Future<Output = Routed> + Send;
    /// Opens a stream to `key`'s service and reads its response header.
    fn open(
        &self,
        key: &Key,
        client: SocketAddr,
    ) -> impl std::future::Future<Output = Result<Upstream, OpenFailure>> + Send;
    /// What was known of `key`'s service proved wrong (an unconfirmed stream was refused, or
    /// the service changed): look again next time.
    fn forget(&self, _key: &Key) {}
}

/// What the layer shares with its node.
pub struct HttpCtx {
    /// Ends idle keep-alive connections (the node is stopping).
    pub stop: CancellationToken,
    /// Aborts everything (the drain deadline passed).
    pub abort: CancellationToken,
    /// Where retired streams finish.
    pub tasks: TaskTracker,
    /// The node's gauges: a retired stream still finishing counts as a live stream, so the
    /// drain waits for it.
    pub stats: Arc<Stats>,
}

/// Orders from the request half to the response half, carried out in order.
enum Order {
    /// Later responses come from this stream; retire the previous one (and FIN its send).
    Switch(Box<Switch>),
    /// A response to this request comes next.
    Respond(Pending),
    /// Write this page; close the connection after it if `close`.
    Page { page: Vec<u8>, close: bool },
    /// The client sent its last request: FIN this send, and the client once answered.
    End(Option<SendStream>),
}

struct Switch {
    recv: RecvStream,
    first: Bytes,
    hold: Box<dyn Send + Sync>,
    key: Key,
    names: Names,
    http: HttpService,
    unconfirmed: Option<Duration>,
    /// The previous stream's send half, to FIN once its last response is out.
    retired: Option<SendStream>,
    /// Told when the response half takes the new stream (every earlier answer is out).
    taken: oneshot::Sender<()>,
    /// The stream counted open on its service until it is retired.
    usage: ServiceUse,
}

struct Pending {
    method: String,
    path: String,
    /// The request asked for an upgrade: tells the request half whether it got one.
    upgrade: Option<oneshot::Sender<bool>>,
    started: Instant,
    /// The request's body ended the connection's requests (no keep-alive).
    last: bool,
}

/// Serves one client connection until it ends; `first` is a stream already open for its key.
pub async fn serve<U: Upstreams>(
    tcp: TcpStream,
    client: SocketAddr,
    upstreams: Arc<U>,
    first: Option<(Key, Upstream)>,
    ctx: &HttpCtx,
) {
    let local = tcp
        .local_addr()
        .map_or_else(|_| "localhost".to_owned(), |a| a.to_string());
    let (orders, inbox) = mpsc::channel(PENDING);
    // Ends the request half at its next head: the node stops, or the connection closes.
    let closing = ctx.stop.child_token();
    let requests = Requests {
        tcp: &tcp,
        client,
        local,
        upstreams: &*upstreams,
        orders,
        stop: &closing,
        stats: &ctx.stats,
    };
    let responses = Responses {
        tcp: &tcp,
        tasks: &ctx.tasks,
        stats: &ctx.stats,
        current: None,
        closing: &closing,
        upstreams: &*upstreams,
    };
    let responses = responses.run(inbox);
    tokio::pin!(responses);
    let result = tokio::select! {
        biased;
        () = ctx.abort.cancelled() => Err(Abort::Shutdown),
        r = &mut responses => r,
        r = async { requests.run(first).await?; std::future::pending().await } => match r {
            Err(Abort::Local(e)) => Err(Abort::Local(e)),
            // The way to the device failed as a request went out (its connection lost, say):
            // the response half, whose orders end here, answers what is pending (a page
            // saying why, when nothing was sent for it yet) before the connection closes,
            // instead of the client seeing a reset.
            Err(e) => tokio::select! {
                biased;
                () = ctx.abort.cancelled() => Err(Abort::Shutdown),
                r = tokio::time::timeout(CLOSE_GRACE, &mut responses) => r.unwrap_or(Err(e)),
            },
            Ok(()) => Ok(()),
        },
    };
    match result {
        Ok(()) => {
            // Our FIN is out: let the client read it all before the socket goes.
            linger(&tcp, LINGER).await;
            debug!("http connection closed");
        }
        Err(Abort::Local(e)) => {
            debug!("http client went away: {e}");
            reset_tcp(&tcp);
        }
        Err(e) => {
            info!("http connection aborted: {e}");
            reset_tcp(&tcp);
        }
    }
}

/// A send stream that is reset if dropped while still held (an abort).
struct Sending(Option<SendStream>);

impl Sending {
    fn take(&mut self) -> Option<SendStream> {
        self.0.take()
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        if let Some(send) = &mut self.0 {
            let _ = send.reset(stream_code::ABORTED);
        }
    }
}

/// What reading a request head gave.
enum Head {
    Request(RequestHead),
    /// The client ended (or the node stops) between requests.
    End,
    /// A head we cannot take: the status to answer and why.
    Bad(u16, String),
}

struct Requests<'a, U> {
    tcp: &'a TcpStream,
    client: SocketAddr,
    /// The listener's address: the local name when a request has no `Host`.
    local: String,
    upstreams: &'a U,
    orders: mpsc::Sender<Order>,
    stop: &'a CancellationToken,
    stats: &'a Stats,
}

impl<U: Upstreams> Requests<'_, U> {
    /// Serves the client's requests until it ends, or the connection closes; then hands the
    /// current stream to the response half, which ends it once every answer is out. (On an
    /// abort the stream is reset instead, as `Sending` drops.)
    async fn run(self, ready: Option<(Key, Upstream)>) -> Result<(), Abort> {
        let mut send = Sending(None);
        match self.requests(ready, &mut send).await {
            Ok(()) => {}
            // An unconfirmed stream was refused (the exposing side stops reading with
            // REFUSED): the response half answers with a page saying why and closes; this
            // half ends with it, cleanly.
            Err(Abort::PeerStopped(code)) if code == stream_code::REFUSED => {
                self.stop.cancelled().await
            }
            // The device stopped taking the request (it answered early, e.g. 413, and
            // closed): no more requests; its answer may still come, and goes out.
            Err(Abort::PeerStopped(_) | Abort::PeerReset(_) | Abort::Stream(_)) => {
                if let Some(mut stream) = send.take() {
                    let _ = stream.reset(stream_code::ABORTED);
                }
                self.stop.cancelled().await;
            }
            Err(e) => return Err(e),
        }
        self.order(Order::End(send.take())).await;
        Ok(())
    }

    async fn requests(
        &self,
        mut ready: Option<(Key, Upstream)>,
        send: &mut Sending,
    ) -> Result<(), Abort> {
        let mut buf = BytesMut::new();
        // The stream requests go to now, for which key and local name.
        let mut current: Option<(Key, Names, Arc<ServiceStats>)> = None;
        loop {
            let mut head = match self.read_head(&mut buf).await? {
                Head::Request(head) => head,
                Head::End => return Ok(()),
                Head::Bad(status, why) => {
                    debug!(status, "bad request from the client: {why}");
                    self.order(Order::Page {
                        page: pages::error(status, &why),
                        close: true,
                    })
                    .await;
                    return Ok(());
                }
            };
            let body = match request_body(&head) {
                Ok(kind) => kind,
                Err(e) => {
                    self.order(Order::Page {
                        page: answer(&head, pages::error(400, &e.to_string())),
                        close: true,
                    })
                    .await;
                    return Ok(());
                }
            };
            let host = head.headers.get_str("host").map(str::to_owned);
            if !route::is_local(host.as_deref()) {
                let why = format!(
                    "this port answers only to localhost names, not {:?} (a guard against DNS rebinding)",
                    host.unwrap_or_default()
                );
                self.order(Order::Page {
                    page: answer(&head, pages::error(421, &why)),
                    close: true,
                })
                .await;
                return Ok(());
            }
            let key = match &ready {
                Some((key, _)) => key.clone(),
                None => match self.upstreams.route(host.as_deref(), &head.target).await {
                    Routed::To(key) => key,
                    Routed::Page(page) => {
                        // Our own pages have no use for a body: close rather than read it.
                        let close = !keeps_alive_request(&head) || body != BodyKind::None;
                        let page = answer(&head, page);
                        self.order(Order::Page { page, close }).await;
                        if close {
                            return Ok(());
                        }
                        continue;
                    }
                },
            };
            let local = host.unwrap_or_else(|| self.local.clone());
            let same = |(k, n, _): &(Key, Names, _)| *k == key && n.local == local;
            if !current.as_ref().is_some_and(same) {
                let upstream = match ready.take() {
                    Some((_, upstream)) => upstream,
                    None => match self.upstreams.open(&key, self.client).await {
                        Ok(upstream) => upstream,
                        Err(failure) => {
                            warn!(peer = %key.peer, service = %key.service, status = failure.status, "{}", failure.message);
                            self.order(Order::Page {
                                page: answer(&head, pages::error(failure.status, &failure.message)),
                                close: true,
                            })
                            .await;
                            return Ok(());
                        }
                    },
                };
                let names = Names::new(
                    local,
                    upstream.http.target.clone(),
                    upstream.http.tls,
                    Some(upstream.http.host.clone()),
                    upstream.http.forwarded,
                );
                let retired = std::mem::replace(send, Sending(Some(upstream.send))).take();
                let (taken, took) = oneshot::channel();
                let service = self.stats.services.get(&key.peer, &key.service);
                self.order(Order::Switch(Box::new(Switch {
                    usage: service.begin(),
                    recv: upstream.recv,
                    first: upstream.first,
                    hold: upstream.hold,
                    key: key.clone(),
                    names: names.clone(),
                    http: upstream.http,
                    unconfirmed: upstream.unconfirmed,
                    retired,
                    taken,
                })))
                .await;
                // Requests go to the new stream once the old one's answers are all out: its
                // answers would wait unread meanwhile, holding connection-wide flow control
                // (a pipelined download on the old stream could then never finish).
                let _ = took.await;
                current = Some((key, names, service));
            }
            let (Some((_, names, service)), Some(stream)) = (&current, send.0.as_mut()) else {
                unreachable!("a stream is open once a request was routed")
            };
            let service = service.clone();
            rewrite_request(&mut head, names, self.client.ip());
            let upgrade = is_upgrade(&head);
            let last = !keeps_alive_request(&head);
            let (tell, told) = match upgrade {
                true => {
                    let (tx, rx) = oneshot::channel();
                    (Some(tx), Some(rx))
                }
                false => (None, None),
            };
            self.order(Order::Respond(Pending {
                method: head.method.clone(),
                // Without the query: it may carry tokens, and logs are kept.
                path: head.target.split('?').next().unwrap_or_default().to_owned(),
                upgrade: tell,
                started: crate::time::now(),
                last,
            }))
            .await;
            let encoded = Bytes::from(head.encode());
            service.bytes_up.add(encoded.len() as u64);
            stream
                .write_chunk(encoded)
                .await
                .map_err(Abort::from_write)?;
            let sent = self.forward_body(&mut buf, body, stream).await?;
            service.bytes_up.add(sent);
            if let Some(told) = told {
                if told.await.unwrap_or(false) {
                    return self.raw(&mut buf, send, &service).await;
                }
            }
            if last {
                // The client's last request (`Connection: close`): the device gets its FIN
                // once the response half closed the connection after the answer.
                self.stop.cancelled().await;
                return Ok(());
            }
        }
    }
}

impl<U> Requests<'_, U> {
    /// Waits while [`PENDING`] orders are not carried out yet: a client pipelining requests
    /// faster than they are answered is held back, not queued without end.
    async fn order(&self, order: Order) {
        // The response half is gone only when the connection ends: nothing left to tell.
        let _ = self.orders.send(order).await;
    }

    /// Reads the next request head: the end between requests (client FIN, or the node
    /// stopping while idle), a head, or why it cannot be taken (431, 400, 408).
    async fn read_head(&self, buf: &mut BytesMut) -> Result<Head, Abort> {
        let mut deadline = None;
        loop {
            match parse_request(buf) {
                Ok(Some((head, used))) => {
                    let _ = buf.split_to(used);
                    return Ok(Head::Request(head));
                }
                Ok(None) => {}
                Err(e @ (HeadError::TooLarge | HeadError::TooManyHeaders)) => {
                    return Ok(Head::Bad(431, e.to_string()))
                }
                Err(e) => return Ok(Head::Bad(400, e.to_string())),
            }
            if !buf.is_empty() && deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + HEAD_TIMEOUT);
            }
            let idle = buf.is_empty();
            let read = async {
                match deadline {
                    Some(at) => tokio::time::timeout_at(at, read_some(self.tcp, buf))
                        .await
                        .ok(),
                    None => Some(read_some(self.tcp, buf).await),
                }
            };
            let got = tokio::select! {
                r = read => r,
                () = self.stop.cancelled(), if idle => return Ok(Head::End),
            };
            match got {
                None => {
                    return Ok(Head::Bad(
                        408,
                        format!("the request head did not arrive within {HEAD_TIMEOUT:?}"),
                    ))
                }
                // A head cut short by the client's FIN can never complete: no more requests
                // (the answers to earlier ones still go out).
                Some(Ok(0)) => return Ok(Head::End),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(Abort::Local(e)),
            }
        }
    }

    /// Sends the request body (what `buf` holds of it first), as it arrives.
    async fn forward_body(
        &self,
        buf: &mut BytesMut,
        kind: BodyKind,
        stream: &mut SendStream,
    ) -> Result<u64, Abort> {
        let mut body = BodyTracker::new(kind);
        let mut sent = 0u64;
        while !body.is_done() {
            if buf.is_empty() && read_some(self.tcp, buf).await.map_err(Abort::Local)? == 0 {
                return Err(Abort::Local(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let fed = body
                .feed(buf)
                .map_err(|e| Abort::BadPayload(format!("request body: {e}")))?;
            if fed.used > 0 {
                sent += fed.used as u64;
                stream
                    .write_chunk(buf.split_to(fed.used).freeze())
                    .await
                    .map_err(Abort::from_write)?;
            }
        }
        Ok(sent)
    }

    /// After a `101`: the rest of the client's bytes go to the stream as they are; its FIN
    /// becomes the stream's.
    async fn raw(
        &self,
        buf: &mut BytesMut,
        send: &mut Sending,
        service: &ServiceStats,
    ) -> Result<(), Abort> {
        let Some(stream) = send.0.as_mut() else {
            return Ok(());
        };
        loop {
            if !buf.is_empty() {
                service.bytes_up.add(buf.len() as u64);
                stream
                    .write_chunk(buf.split().freeze())
                    .await
                    .map_err(Abort::from_write)?;
            }
            if read_some(self.tcp, buf).await.map_err(Abort::Local)? == 0 {
                let _ = stream.finish();
                return Ok(());
            }
        }
    }
}

/// One of our pages as the answer to `request`: without its body for a `HEAD`.
fn answer(request: &RequestHead, page: Vec<u8>) -> Vec<u8> {
    match request.method.eq_ignore_ascii_case("HEAD") {
        true => pages::head_only(page),
        false => page,
    }
}

/// Reads what the socket has (up to [`CHUNK`]) onto the end of `buf`; 0 at EOF.
async fn read_some(tcp: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(CHUNK.min(buf.len().max(16 * 1024)));
    }
    loop {
        tcp.readable().await?;
        match tcp.try_read_buf(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// The stream responses come from now.
struct Current {
    recv: RecvStream,
    /// Received bytes not yet written to the client.
    buf: BytesMut,
    key: Key,
    names: Names,
    hold: Box<dyn Send + Sync>,
    /// The stream ended (FIN): the device closed its connection.
    ended: bool,
    /// Responses it carried.
    answered: u32,
    /// What the requests were rewritten with.
    http: HttpService,
    /// The response header is still to be read, within this limit.
    unconfirmed: Option<Duration>,
    /// Counted open on its service until it is retired.
    usage: ServiceUse,
}

struct Responses<'a, U> {
    tcp: &'a TcpStream,
    tasks: &'a TaskTracker,
    stats: &'a Stats,
    current: Option<Current>,
    /// Tells the request half the connection is closing: it stops at the next head.
    closing: &'a CancellationToken,
    upstreams: &'a U,
}

/// How long the request half may take to hand back its stream once the connection closes.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

impl<U: Upstreams> Responses<'_, U> {
    async fn run(mut self, mut inbox: mpsc::Receiver<Order>) -> Result<(), Abort> {
        let mut send_of_current: Option<SendStream> = None;
        let mut raw = false;
        loop {
            let order = tokio::select! {
                biased;
                order = inbox.recv() => order,
                // Idle: the device may close its connection; the client's goes with it.
                ended = idle_end(&mut self.current) => {
                    ended?;
                    break;
                }
            };
            match order {
                Some(Order::Switch(switch)) => {
                    let Switch {
                        recv,
                        first,
                        hold,
                        key,
                        names,
                        http,
                        unconfirmed,
                        retired,
                        taken,
                        usage,
                    } = *switch;
                    let _ = taken.send(());
                    if let Some(old) = self.current.take() {
                        self.retire(old, retired);
                    }
                    debug!(peer = %key.peer, service = %key.service, stream = u64::from(recv.id()), "requests go to a new stream");
                    self.current = Some(Current {
                        recv,
                        buf: BytesMut::from(&first[..]),
                        key,
                        names,
                        hold,
                        ended: false,
                        answered: 0,
                        http,
                        unconfirmed,
                        usage,
                    });
                    send_of_current = None;
                }
                Some(Order::Respond(pending)) => match self.respond(pending).await? {
                    Next::More => {}
                    Next::Close => break,
                    Next::Raw => {
                        self.raw().await?;
                        raw = true;
                        break;
                    }
                },
                Some(Order::Page { page, close }) => {
                    write_tcp(self.tcp, &page).await?;
                    if close {
                        break;
                    }
                }
                Some(Order::End(send)) => {
                    send_of_current = send;
                    break;
                }
                None => break,
            }
        }
        // Closing: the client gets a FIN once every answer is out; the request half hands
        // back its stream (or ends) so the device's connection is closed cleanly too.
        socket2::SockRef::from(self.tcp)
            .shutdown(std::net::Shutdown::Write)
            .or_else(ignore_not_connected)
            .map_err(Abort::Local)?;
        self.closing.cancel();
        if send_of_current.is_none() {
            let wait = async {
                while let Some(order) = inbox.recv().await {
                    if let Order::End(send) = order {
                        return send;
                    }
                }
                None
            };
            // After an upgrade the client's direction may go on after ours ended (half-close).
            send_of_current = match raw {
                true => wait.await,
                false => tokio::time::timeout(CLOSE_GRACE, wait).await.ok().flatten(),
            };
        }
        if let Some(current) = self.current.take() {
            self.retire(current, send_of_current);
        }
        Ok(())
    }

    /// Ends a stream no more requests go to: FIN, then its rest read and dropped (bounded),
    /// so the device's connection closes cleanly.
    fn retire(&self, mut old: Current, send: Option<SendStream>) {
        let live = self.stats.stream();
        self.tasks.spawn(async move {
            let _live = live;
            let _hold = old.hold;
            let mut send = send;
            if let Some(send) = &mut send {
                let _ = send.finish();
            }
            let drain = async { while let Ok(Some(_)) = old.recv.read_chunk(CHUNK, true).await {} };
            if !old.ended && tokio::time::timeout(RETIRE_TIMEOUT, drain).await.is_err() {
                let _ = old.recv.stop(stream_code::ABORTED);
                if let Some(send) = &mut send {
                    let _ = send.reset(stream_code::ABORTED);
                }
                return;
            }
            old.usage.end(0, 0, true);
        });
    }

    /// Forwards the response (interim ones first) to one request.
    async fn respond(&mut self, pending: Pending) -> Result<Next, Abort> {
        if let Some(page) = self.confirm().await {
            write_tcp(self.tcp, &page).await?;
            return Ok(Next::Close);
        }
        let Some(cur) = self.current.as_mut() else {
            return Err(Abort::Stream("a response without a stream".into()));
        };
        let (head, status) = loop {
            let mut head = loop {
                match parse_response(&cur.buf) {
                    Ok(Some((head, used))) => {
                        let _ = cur.buf.split_to(used);
                        break head;
                    }
                    Ok(None) if cur.ended && cur.answered > 0 => {
                        // The device closed a reused connection as the request went out:
                        // close the client's too, unanswered, and it retries on a new one
                        // (what it does with the device itself).
                        return Ok(Next::Close);
                    }
                    Ok(None) if cur.ended => {
                        let page =
                            pages::error(502, "the device closed the connection without an answer");
                        write_tcp(self.tcp, &page).await?;
                        return Ok(Next::Close);
                    }
                    Ok(None) => match cur.fill().await {
                        Ok(()) => {}
                        // Nothing of this answer went to the client yet, and it is the first
                        // on this connection (a later one is closed unanswered, above): a
                        // page says why there is none.
                        Err(e) if cur.answered == 0 => {
                            let (status, why) = pages::refusal(&e);
                            warn!(peer = %cur.key.peer, service = %cur.key.service, status, "{why}");
                            write_tcp(self.tcp, &pages::error(status, &why)).await?;
                            return Ok(Next::Close);
                        }
                        Err(e) => return Err(e),
                    },
                    Err(e) => {
                        warn!(peer = %cur.key.peer, service = %cur.key.service, "bad response from the device: {e}");
                        let page = pages::error(
                            502,
                            &format!("the device's response is not valid HTTP: {e}"),
                        );
                        write_tcp(self.tcp, &page).await?;
                        return Ok(Next::Close);
                    }
                }
            };
            rewrite_response(&mut head, &cur.names);
            let encoded = head.encode();
            write_tcp(self.tcp, &encoded).await?;
            cur.usage.stats().bytes_down.add(encoded.len() as u64);
            let status = head.status;
            if (100..200).contains(&status) && status != 101 {
                continue; // 100 Continue, 103 Early Hints: the real answer follows.
            }
            break (head, status);
        };
        let upgraded = status == 101 && pending.upgrade.is_some();
        if let Some(tell) = pending.upgrade {
            let _ = tell.send(upgraded);
        }
        let kind = response_body(&pending.method, &head);
        let mut body = BodyTracker::new(if upgraded { BodyKind::None } else { kind });
        let mut bytes = 0u64;
        loop {
            let fed = body
                .feed(&cur.buf)
                .map_err(|e| Abort::BadPayload(format!("response body: {e}")))?;
            if fed.used > 0 {
                let part = cur.buf.split_to(fed.used);
                write_tcp(self.tcp, &part).await?;
                bytes += part.len() as u64;
            }
            if body.is_done() {
                break;
            }
            if cur.ended {
                if kind == BodyKind::UntilClose {
                    break;
                }
                return Err(Abort::Stream("the device's response was cut short".into()));
            }
            // The buffer is all fed: body bytes go from the received chunk to the socket
            // without a copy; only what follows the body is kept.
            let Some(chunk) = cur.next_chunk().await? else {
                continue;
            };
            let fed = body
                .feed(&chunk)
                .map_err(|e| Abort::BadPayload(format!("response body: {e}")))?;
            write_tcp(self.tcp, &chunk[..fed.used]).await?;
            bytes += fed.used as u64;
            cur.buf.extend_from_slice(&chunk[fed.used..]);
        }
        cur.answered += 1;
        let service = cur.usage.stats();
        service.bytes_down.add(bytes);
        service.requests.add(1);
        info!(
            target: "tunnel::http",
            peer = %cur.key.peer,
            service = %cur.key.service,
            method = %pending.method,
            path = %pending.path,
            status,
            bytes,
            ms = pending.started.elapsed().as_millis() as u64,
            "request"
        );
        if upgraded {
            return Ok(Next::Raw);
        }
        if kind == BodyKind::UntilClose || pending.last || !keeps_alive_response(&head) {
            return Ok(Next::Close);
        }
        Ok(Next::More)
    }

    /// Reads the response header of a stream opened without waiting for it; `None` when it
    /// says the stream is what the requests assumed, else the page to answer with (the
    /// service is forgotten, so the next request opens it the slow way).
    async fn confirm(&mut self) -> Option<Vec<u8>> {
        let cur = self.current.as_mut()?;
        let limit = cur.unconfirmed.take()?;
        let failure = match read_response(&mut cur.recv, limit).await {
            Ok((response, first)) => {
                cur.buf.extend_from_slice(&first);
                if response.protocol == Protocol::Http && response.http.as_ref() == Some(&cur.http)
                {
                    return None;
                }
                if response.protocol == Protocol::Http {
                    // Rewritten with old names (the rules changed): answered all the same,
                    // and the next stream learns the new ones.
                    self.upstreams.forget(&cur.key);
                    return None;
                }
                (
                    502,
                    format!(
                        "the service now speaks {}; reload the page",
                        response.protocol
                    ),
                )
            }
            Err(abort) => pages::refusal(&abort),
        };
        let cur = self.current.as_mut()?;
        self.upstreams.forget(&cur.key);
        let (status, why) = failure;
        warn!(peer = %cur.key.peer, service = %cur.key.service, status, "{why}");
        let message = format!(
            "service {} of peer {}: {why}",
            cur.key.service, cur.key.peer
        );
        Some(pages::error(status, &message))
    }

    /// After a `101`: the stream's bytes go to the client as they are, its FIN too.
    async fn raw(&mut self) -> Result<(), Abort> {
        let Some(cur) = self.current.as_mut() else {
            return Ok(());
        };
        let held = cur.buf.split();
        write_tcp(self.tcp, &held).await?;
        cur.usage.stats().bytes_down.add(held.len() as u64);
        while let Some(chunk) = cur.next_chunk().await? {
            write_tcp(self.tcp, &chunk).await?;
            cur.usage.stats().bytes_down.add(chunk.len() as u64);
        }
        Ok(())
    }
}

/// What follows a response.
enum Next {
    /// More requests on this connection.
    More,
    /// The connection ends after it.
    Close,
    /// Raw bytes both ways (an upgrade).
    Raw,
}

impl Current {
    /// Reads more of the stream into `buf` (heads); marks `ended` at its FIN.
    async fn fill(&mut self) -> Result<(), Abort> {
        if let Some(chunk) = self.next_chunk().await? {
            self.buf.extend_from_slice(&chunk);
        }
        Ok(())
    }

    /// The next chunk received (`None` at the FIN, which marks `ended`).
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, Abort> {
        if self.ended {
            return Ok(None);
        }
        match self.recv.read_chunk(CHUNK, true).await {
            Ok(Some(chunk)) => Ok(Some(chunk.bytes)),
            Ok(None) => {
                self.ended = true;
                Ok(None)
            }
            Err(e) => Err(Abort::from_read(e)),
        }
    }
}

/// Resolves when the idle stream ends (the device closed its connection between
/// responses); pending while there is none. Bytes it sends unasked are kept for later.
async fn idle_end(current: &mut Option<Current>) -> Result<(), Abort> {
    match current {
        // Its first bytes are the response header, which `confirm` reads.
        Some(cur) if cur.unconfirmed.is_some() => std::future::pending().await,
        Some(cur) if !cur.ended => {
            // Unasked bytes (e.g. a 408 before the device closes) are held for the close that
            // usually follows; a device that keeps talking unasked is cut off at MAX_HEAD.
            while !cur.ended && cur.buf.len() < MAX_HEAD {
                cur.fill().await?;
            }
            Ok(())
        }
        Some(_) => Ok(()),
        None => std::future::pending().await,
    }
}
