//! The peer side of the rendezvous: stays registered (reconnecting with backoff when the
//! rendezvous restarts or the network drops), asks for introductions, and hands the
//! introductions other peers asked for to the expose role. It also holds the punching and
//! the direct-or-relay dial, so both roles share one implementation.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::identity::PeerId;
use crate::node::NodeCtx;
use crate::protocol::rendezvous::{relay_bind_packet, token_from_hex, ClientMsg, ServerMsg, PUNCH};
use crate::rendezvous::{read_frame, write_frames};
use crate::session::backoff::Backoff;
use crate::session::punch::{Path, PathChoice, PunchSchedule};
use crate::transport::Transport;

/// An introduction to a peer: where to punch, when, and our end of a relay.
#[derive(Debug, Clone)]
pub struct Introduction {
    pub peer: PeerId,
    pub candidates: Vec<SocketAddr>,
    pub start_in: Duration,
    /// The relay port to send to, and our bind token.
    pub relay: Option<(SocketAddr, [u8; 16])>,
}

type Reply = oneshot::Sender<Introduction>;

enum Cmd {
    Connect {
        peer: PeerId,
        relay: bool,
        reply: Reply,
    },
}

/// A handle to the node's rendezvous registration.
#[derive(Clone)]
pub struct RendezvousClient {
    cmds: mpsc::Sender<Cmd>,
    registered: watch::Receiver<Option<SocketAddr>>,
}

impl RendezvousClient {
    /// Starts registering with the rendezvous at `server` (HOST:PORT). Introductions that
    /// other peers asked for arrive on the returned receiver.
    pub(crate) fn start(server: String, node: NodeCtx) -> (Self, mpsc::Receiver<Introduction>) {
        let (cmds, rx) = mpsc::channel(64);
        let (incoming_tx, incoming_rx) = mpsc::channel(64);
        let (registered_tx, registered) = watch::channel(None);
        let actor = Actor {
            server: server.clone(),
            node: node.clone(),
            pending: HashMap::new(),
            incoming: incoming_tx,
            registered: registered_tx,
        };
        let span = tracing::info_span!("rendezvous", server = %server);
        node.tasks.spawn(actor.run(rx).instrument(span));
        (RendezvousClient { cmds, registered }, incoming_rx)
    }

    /// Asks to be introduced to `peer`; waits while it is offline.
    pub async fn introduce(&self, peer: PeerId, relay: bool) -> Option<Introduction> {
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Connect { peer, relay, reply })
            .await
            .ok()?;
        rx.await.ok()
    }

    /// Waits until registered; our address as the rendezvous observes it.
    pub async fn registered(&self) -> Option<SocketAddr> {
        let mut rx = self.registered.clone();
        let r = rx.wait_for(|r| r.is_some()).await.ok()?;
        *r
    }
}

struct Actor {
    server: String,
    node: NodeCtx,
    pending: HashMap<PeerId, Vec<(bool, Reply)>>,
    incoming: mpsc::Sender<Introduction>,
    registered: watch::Sender<Option<SocketAddr>>,
}

impl Actor {
    async fn run(mut self, mut cmds: mpsc::Receiver<Cmd>) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
        let abort = self.node.abort.clone();
        loop {
            let outcome = tokio::select! {
                r = self.session(&mut cmds, &mut backoff) => r,
                () = abort.cancelled() => return,
            };
            self.registered.send_replace(None);
            match outcome {
                Ok(()) => return, // every handle dropped
                Err(e) => {
                    let delay = backoff.failed();
                    warn!("rendezvous unavailable ({e}); retrying in {delay:?}");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = abort.cancelled() => return,
                    }
                }
            }
        }
    }

    /// One registration: connect, register, serve until the connection fails.
    async fn session(
        &mut self,
        cmds: &mut mpsc::Receiver<Cmd>,
        backoff: &mut Backoff,
    ) -> Result<(), String> {
        let transport = &self.node.transport;
        let addr = resolve(&self.server, transport).await?;
        let connecting = transport
            .connect_rendezvous(addr)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(Duration::from_secs(5), connecting)
            .await
            .map_err(|_| "no answer within 5 s".to_string())?
            .map_err(|e| crate::roles::describe_close(&e))?;
        let (send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel::<ClientMsg>(64);
        let _writer = AbortOnDrop(tokio::spawn(write_frames(send, rx)));
        let local_addrs = local_candidates(transport, addr);
        let send = |msg: ClientMsg| {
            let tx = tx.clone();
            async move {
                tx.send(msg)
                    .await
                    .map_err(|_| "control stream closed".to_string())
            }
        };
        send(ClientMsg::Register { local_addrs }).await?;
        let mut buf = BytesMut::new();
        // Requests made while unregistered are sent now.
        for (peer, waiters) in &self.pending {
            let relay = waiters.iter().any(|(r, _)| *r);
            send(ClientMsg::Connect { peer: *peer, relay }).await?;
        }
        loop {
            tokio::select! {
                cmd = cmds.recv() => {
                    let Some(Cmd::Connect { peer, relay, reply }) = cmd else { return Ok(()) };
                    self.pending.entry(peer).or_default().push((relay, reply));
                    send(ClientMsg::Connect { peer, relay }).await?;
                }
                msg = read_frame::<ServerMsg>(&mut recv, &mut buf) => {
                    let msg = msg?.ok_or_else(|| "the rendezvous closed the control stream".to_string())?;
                    match msg {
                        ServerMsg::Registered { observed } => {
                            backoff.succeeded();
                            info!(%observed, "registered with the rendezvous");
                            self.registered.send_replace(Some(observed));
                        }
                        ServerMsg::Presence { peer, online } => {
                            info!(%peer, online, "presence");
                            if online {
                                if let Some(waiters) = self.pending.get(&peer) {
                                    let relay = waiters.iter().any(|(r, _)| *r);
                                    send(ClientMsg::Connect { peer, relay }).await?;
                                }
                            }
                        }
                        ServerMsg::Introduce { peer, candidates, start_in_ms, relay } => {
                            let relay = relay.and_then(|g| Some((SocketAddr::new(addr.ip(), g.port), token_from_hex(&g.token)?)));
                            let intro = Introduction {
                                peer,
                                candidates,
                                start_in: Duration::from_millis(start_in_ms.min(2_000)),
                                relay,
                            };
                            debug!(?intro, "introduced");
                            let mut answered = false;
                            for (_, reply) in self.pending.remove(&peer).into_iter().flatten() {
                                answered |= reply.send(intro.clone()).is_ok();
                            }
                            if !answered && self.incoming.try_send(intro).is_err() {
                                warn!(%peer, "introduction dropped: too many at once");
                            }
                        }
                        ServerMsg::Error { message } => warn!("the rendezvous refused a request: {message}"),
                    }
                }
                r = conn.closed() => return Err(crate::roles::describe_close(&r)),
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// This host's LAN candidate: the address of the endpoint's socket, or, when it is bound
/// to a wildcard, the source address the kernel picks for the route toward the rendezvous
/// (found by connecting a throwaway UDP socket, which sends nothing).
fn local_candidates(transport: &Transport, rendezvous: SocketAddr) -> Vec<SocketAddr> {
    let Ok(bound) = transport.local_addr() else {
        return Vec::new();
    };
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let unspecified: SocketAddr = if rendezvous.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    std::net::UdpSocket::bind(unspecified)
        .and_then(|probe| {
            probe.connect(rendezvous)?;
            probe.local_addr()
        })
        .map(|local| vec![SocketAddr::new(local.ip(), bound.port())])
        .unwrap_or_default()
}

async fn resolve(server: &str, transport: &Transport) -> Result<SocketAddr, String> {
    let local = transport.local_addr().map_err(|e| e.to_string())?;
    tokio::net::lookup_host(server)
        .await
        .map_err(|e| format!("cannot resolve {server}: {e}"))?
        .find(|a| local.is_ipv6() || a.is_ipv4())
        .ok_or_else(|| format!("{server} has no address this socket ({local}) can reach"))
}

/// When the handshake attempts to each direct candidate start, after the common start time:
/// the first just after this side's first punch, the second in case that one was lost.
const DIRECT_ATTEMPTS: [Duration; 2] = [Duration::from_millis(20), Duration::from_millis(220)];

/// The direct attempts (and the punches) left after the relay won: the first direct
/// handshake to complete, or the last error once all have failed.
fn first_direct(
    mut tasks: JoinSet<Option<(Path, Result<quinn::Connection, String>)>>,
    mut last_error: String,
) -> DirectLater {
    Box::pin(async move {
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Some((path, Ok(conn)))) => return Ok((conn, path)),
                Ok(Some((_, Err(e)))) => last_error = e,
                Ok(None) | Err(_) => {}
            }
        }
        Err(last_error)
    })
}

/// Sends the punch packets (and relay binds) of an introduction on its schedule.
/// Bounded: about 3 s and 30 rounds.
pub async fn punch(transport: Transport, intro: Arc<Introduction>) {
    let mut schedule = PunchSchedule::new(std::time::Instant::now() + intro.start_in);
    while let Some(deadline) = schedule.next_deadline() {
        tokio::time::sleep_until(Instant::from_std(deadline)).await;
        let bind = schedule.with_relay_bind();
        if !schedule.poll(std::time::Instant::now()) {
            continue;
        }
        for c in &intro.candidates {
            transport.send_raw(*c, PUNCH);
        }
        if let (true, Some((relay, token))) = (bind, &intro.relay) {
            transport.send_raw(*relay, &relay_bind_packet(token));
        }
    }
}

/// Direct handshakes still under way when the relay won; resolves to the first that completes.
pub type DirectLater = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(quinn::Connection, Path), String>> + Send>,
>;

/// Dials `peer` after an introduction: QUIC handshakes to every candidate at once while the
/// punches go out, and, if none succeeds by `direct_deadline`, through the relay as well.
/// The first handshake to complete wins. When that is the relay's, the direct handshakes
/// and the punches go on (a lost Initial costs a retransmission, about a second): they come
/// back as [`DirectLater`] so the caller can move to the direct path as soon as it exists.
///
/// With `direct` false (diagnosis: `--force-relay`), only the relay is tried.
pub async fn dial_introduced(
    transport: Transport,
    intro: Introduction,
    direct_deadline: Duration,
    direct: bool,
) -> Result<(quinn::Connection, Path, Option<DirectLater>), String> {
    if !direct && intro.relay.is_none() {
        return Err("the rendezvous granted no relay (is it running with --no-relay?)".into());
    }
    let intro = Arc::new(intro);
    let mut tasks = JoinSet::new();
    tasks.spawn({
        let (t, i) = (transport.clone(), intro.clone());
        async move {
            punch(t, i).await;
            None
        }
    });
    tokio::time::sleep(intro.start_in).await;
    let attempt = |path: Path| {
        let transport = transport.clone();
        let peer = intro.peer;
        async move {
            let result = transport.connect(path.addr(), peer).await;
            Some((path, result))
        }
    };
    if direct {
        // Staggered handshakes per candidate: an Initial that reaches the peer's NAT before
        // the peer's punch opened it is lost, and quinn would resend it only after ~300 ms;
        // a second attempt 200 ms later is cheaper than waiting (the loser is dropped).
        for delay in DIRECT_ATTEMPTS {
            for c in &intro.candidates {
                let a = attempt(Path::Direct(*c));
                tasks.spawn(async move {
                    tokio::time::sleep(delay).await;
                    a.await
                });
            }
        }
    }
    let deadline = if direct {
        direct_deadline
    } else {
        Duration::ZERO
    };
    let mut choice = PathChoice::new(std::time::Instant::now(), deadline);
    let mut last_error = String::from("no candidate answered");
    loop {
        let relay_at = choice
            .relay_deadline()
            .filter(|_| intro.relay.is_some())
            .map(Instant::from_std);
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(Ok(Some((path @ Path::Relay(_), Ok(conn))))) => {
                    let later = direct.then(|| first_direct(tasks, last_error));
                    return Ok((conn, path, later));
                }
                Some(Ok(Some((path, Ok(conn))))) => return Ok((conn, path, None)),
                Some(Ok(Some((path, Err(e))))) => {
                    debug!(path = path.kind(), addr = %path.addr(), "attempt failed: {e}");
                    last_error = e;
                }
                Some(Ok(None)) | Some(Err(_)) => {}
                None => return Err(last_error),
            },
            () = crate::roles::sleep_until_opt(relay_at) => {
                if choice.start_relay(std::time::Instant::now(), true) {
                    if let Some((relay, _)) = intro.relay {
                        debug!(%relay, "no direct path yet: trying the relay too");
                        tasks.spawn(attempt(Path::Relay(relay)));
                    }
                }
            }
        }
    }
}
