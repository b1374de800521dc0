//! The peer's TCP link to the rendezvous, for networks that drop UDP: the driver of
//! `multipath::fallback` (when to open the link, when traffic takes it, when to close it),
//! the TLS-over-TCP connection itself, and the frame pump both ends share. The frames are
//! `protocol::link`'s; the socket layer (`multipath::link`) decides per datagram.
//!
//! The registration reports a stall ([`LinkDriver::stalled`]) when its QUIC handshake has had
//! no answer for a second. The link is then dialled at the rendezvous's own port over TCP
//! and, 250 ms later, at port 443 (networks that let only HTTPS out); the first TLS handshake
//! to complete wins. From then on the rendezvous host's traffic (the registration, relay
//! binds, a relayed connection) goes over it until UDP echoes come back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::multipath::fallback::{Action, Fallback};
use crate::multipath::link::LINK_QUEUE;
use crate::protocol::link;
use crate::quic::tls;
use crate::runtime::NodeCtx;
use crate::time::{now, sleep_until_opt};

/// The port tried after the rendezvous's own: what networks that block UDP still let out.
pub const HTTPS_PORT: u16 = 443;
/// How long a link has to connect and finish its TLS handshake.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The second port is tried this long after the first.
const SECOND_PORT_AFTER: Duration = Duration::from_millis(250);

/// A handle to the node's link driver.
#[derive(Clone)]
pub(crate) struct LinkDriver {
    stalls: mpsc::Sender<SocketAddr>,
}

impl LinkDriver {
    /// Starts the driver (it does nothing until a stall is reported).
    pub(crate) fn start(node: NodeCtx) -> Self {
        let (stalls, rx) = mpsc::channel(4);
        let span = tracing::info_span!("link");
        node.tasks.spawn(run(node.clone(), rx).instrument(span));
        LinkDriver { stalls }
    }

    /// The registration with the rendezvous at `server` has had no answer for a while.
    pub(crate) fn stalled(&self, server: SocketAddr) {
        let _ = self.stalls.try_send(server);
    }
}

enum Event {
    Up(u64),
    Down(u64),
}

async fn run(node: NodeCtx, mut stalls: mpsc::Receiver<SocketAddr>) {
    let links = node.transport.paths().links().clone();
    let mut machine = Fallback::default();
    let mut server: Option<SocketAddr> = None;
    let (events_tx, mut events) = mpsc::channel::<Event>(8);
    // The link in use: its number (events of older ones are ignored) and what stops it.
    let mut generation = 0u64;
    let mut current: Option<CancellationToken> = None;
    let mut via_tcp = false;
    let mut pending: Vec<Action> = Vec::new();
    loop {
        let t = now();
        pending.extend(machine.poll(t));
        for action in pending.drain(..) {
            let Some(server) = server else { continue };
            match action {
                Action::Open => {
                    generation += 1;
                    let stop = node.abort.child_token();
                    if let Some(old) = current.replace(stop.clone()) {
                        old.cancel();
                    }
                    let task = open(node.clone(), server, events_tx.clone(), generation, stop);
                    node.tasks.spawn(task.in_current_span());
                }
                Action::Close => {
                    if let Some(old) = current.take() {
                        old.cancel();
                    }
                    links.clear_client();
                    info!(%server, "UDP to the rendezvous works again: TCP link closed");
                }
                Action::Echo => node.transport.paths().send_udp(server, &links.next_echo()),
            }
        }
        let tcp = machine.via_tcp(now());
        if tcp != via_tcp {
            via_tcp = tcp;
            links.set_via_tcp(tcp);
            match tcp {
                true => {
                    info!(server = ?server, "UDP to the rendezvous gets no answer: its traffic (registration, relay) goes over the TCP link")
                }
                false if machine.is_up() => {
                    info!(server = ?server, "UDP to the rendezvous answers: its traffic goes over UDP again");
                    // Our addresses toward peers are new (UDP mappings): live connections
                    // punch again.
                    node.transport.paths().note_network_change();
                }
                false => {
                    info!(server = ?server, "the TCP link is down: the rendezvous's traffic goes over UDP until it is back")
                }
            }
        }
        tokio::select! {
            () = sleep_until_opt(machine.next_deadline()) => {}
            s = stalls.recv() => {
                let Some(s) = s else {
                    if let Some(link) = current.take() {
                        link.cancel();
                    }
                    links.clear_client();
                    return;
                };
                server = Some(s);
                pending.extend(machine.stalled(now()));
            }
            () = links.echo_replied.notified() => machine.echo_reply(now()),
            e = events.recv() => match e {
                Some(Event::Up(g)) if g == generation => machine.link_up(now()),
                Some(Event::Down(g)) if g == generation => {
                    current = None;
                    links.clear_client();
                    machine.link_down(now());
                }
                _ => {}
            },
            () = node.abort.cancelled() => {
                links.clear_client();
                return;
            }
        }
    }
}

/// Dials the link, serves it until it breaks or `stop`, and reports both.
async fn open(
    node: NodeCtx,
    server: SocketAddr,
    events: mpsc::Sender<Event>,
    generation: u64,
    stop: CancellationToken,
) {
    let links = node.transport.paths().links().clone();
    let dialled = tokio::select! {
        r = tokio::time::timeout(OPEN_TIMEOUT, dial(&node, server)) => r.unwrap_or_else(|_| Err(format!("no TCP link within {OPEN_TIMEOUT:?}"))),
        () = stop.cancelled() => return,
    };
    let (stream, via) = match dialled {
        Ok(s) => s,
        Err(e) => {
            warn!(%server, "TCP link to the rendezvous failed: {e}");
            let _ = events.send(Event::Down(generation)).await;
            return;
        }
    };
    if stop.is_cancelled() {
        return; // replaced while it dialled: the route is the newer link's
    }
    let (tx, rx) = mpsc::channel(LINK_QUEUE);
    links.set_client(server.ip(), tx);
    info!(%server, %via, "TCP link to the rendezvous up");
    let _ = events.send(Event::Up(generation)).await;
    let ip = server.ip();
    let l = links.clone();
    let end = tokio::select! {
        e = pump(stream, rx, None, move |port, d| l.from_rendezvous(ip, port, d)) => e,
        () = stop.cancelled() => "closed".into(),
    };
    info!(%server, "TCP link ended: {end}");
    let _ = events.send(Event::Down(generation)).await;
}

/// TCP to the rendezvous's port, and to 443 a little later; TLS on the first that connects.
async fn dial(
    node: &NodeCtx,
    server: SocketAddr,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, SocketAddr), String> {
    let mut ports = vec![server.port()];
    if server.port() != HTTPS_PORT {
        ports.push(HTTPS_PORT);
    }
    let config = tls::client_config(
        node.transport.identity(),
        None,
        tls::WrongPeerSlot::default(),
        link::ALPN,
    )
    .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    // The attempts are this future's: dropping it (the driver's timeout) drops them.
    let mut attempts = tokio::task::JoinSet::new();
    for (i, port) in ports.into_iter().enumerate() {
        let to = SocketAddr::new(server.ip(), port);
        let delay = SECOND_PORT_AFTER * i as u32;
        let connector = connector.clone();
        attempts.spawn(async move {
            tokio::time::sleep(delay).await;
            let tcp = TcpStream::connect(to)
                .await
                .map_err(|e| format!("TCP {to}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            watch_liveness(&tcp);
            let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME)
                .map_err(|e| e.to_string())?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS {to}: {e}"))?;
            Ok::<_, String>((tls, to))
        });
    }
    let mut errors = Vec::new();
    while let Some(r) = attempts.join_next().await {
        match r {
            Ok(Ok(won)) => return Ok(won),
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(errors.join("; "))
}

/// How long a TCP link may leave data unacknowledged, and how often an idle one is probed:
/// a link over a path that went silent breaks in about 10 s (not the kernel's ~15 min), so
/// its peer opens a new one while its relayed connections still live.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
const KEEPALIVE: Duration = Duration::from_secs(5);

/// Sets a link's TCP socket to notice a dead path (keep-alive probes, a user timeout).
pub(crate) fn watch_liveness(tcp: &TcpStream) {
    let s = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE)
        .with_interval(KEEPALIVE)
        .with_retries(2);
    let _ = s.set_tcp_keepalive(&keepalive);
    let _ = s.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT));
}

/// Carries frames both ways on a link until it ends: each frame read is handed to `on_frame`
/// (port, datagram), each one from `rx` is written (several per write when they queue).
/// `idle`: the link ends when no frame came for that long. Returns why it ended.
pub(crate) async fn pump<S>(
    stream: S,
    mut rx: mpsc::Receiver<Bytes>,
    idle: Option<Duration>,
    mut on_frame: impl FnMut(u16, Bytes),
) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut read, write) = tokio::io::split(stream);
    let reader = async {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut last_frame = now();
        loop {
            loop {
                match link::decode(&buf) {
                    Ok(Some((port, range))) => {
                        // A copy: a slice would keep the whole read buffer alive while the
                        // datagram waits in a queue.
                        on_frame(port, Bytes::copy_from_slice(&buf[range.clone()]));
                        let _ = buf.split_to(range.end);
                        last_frame = now();
                    }
                    Ok(None) => break,
                    Err(e) => return format!("bad frame: {e}"),
                }
            }
            buf.reserve(link::HEADER + link::MAX_DATAGRAM);
            let read = read.read_buf(&mut buf);
            let read = match idle {
                Some(idle) => match tokio::time::timeout_at((last_frame + idle).into(), read).await
                {
                    Ok(r) => r,
                    Err(_) => return format!("no frame for {idle:?}"),
                },
                None => read.await,
            };
            match read {
                Ok(0) => return "the other end closed it".to_string(),
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
        }
    };
    let writer = async {
        let mut w = BufWriter::with_capacity(64 * 1024, write);
        while let Some(frame) = rx.recv().await {
            if let Err(e) = w.write_all(&frame).await {
                return e.to_string();
            }
            while let Ok(frame) = rx.try_recv() {
                if let Err(e) = w.write_all(&frame).await {
                    return e.to_string();
                }
            }
            if let Err(e) = w.flush().await {
                return e.to_string();
            }
        }
        debug!("link sender dropped");
        let _ = w.shutdown().await;
        "closed".to_string()
    };
    tokio::select! {
        e = reader => e,
        e = writer => e,
    }
}
