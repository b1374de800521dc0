//! One connection, many paths: the socket layer under quinn that sends each peer
//! connection's packets on its best working path, in the manner of iroh's magicsock.
//!
//! quinn sees one fixed remote address per connection: the one its handshake completed on
//! (a candidate of the peer, or a relay port), the connection's *alias*. Under it,
//! [`PathSocket`] (our quinn `AsyncUdpSocket`, wrapping quinn's own UDP socket):
//! - sends what quinn addresses to an alias to the connection's active path instead;
//! - shows quinn every datagram that came from any path of a connection as coming from its
//!   alias, so the move from relay to direct, or back, is invisible to QUIC: no migration,
//!   no new connection, no stream reset (a quinn client drops packets from any address but
//!   its server's, so a rebinding-style migration could not serve the dialling side);
//! - answers path probes (`protocol::probe`) at once, in the receive path.
//!
//! The decisions (which paths to probe, when a path is dead, which one is active) are the
//! pure [`machine::PathSet`]; [`attach`] starts the thin per-connection driver that runs its
//! timers. Only connections made through an introduction get paths; every other packet
//! passes through unchanged.

pub mod fallback;
pub mod link;
pub mod machine;
pub mod path;
pub mod schedule;

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::protocol::link::Echo;
use crate::protocol::probe::{Probe, TAG_LABEL};
use crate::time::{now, sleep_until_opt};
use link::LinkHub;
use machine::{Action, PathSet, PathView};
use path::{canonical, for_socket, Path};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The paths of one live connection, shared by its driver and the socket.
#[derive(Debug)]
pub struct Entry {
    /// The address quinn knows the peer by (in the socket's form).
    alias: SocketAddr,
    /// The peer, for the log.
    peer: Option<crate::identity::PeerId>,
    seq: u64,
    set: Mutex<PathSet>,
    /// Wakes the driver when a probe changed the deadlines.
    wake: Notify,
    path: watch::Sender<Path>,
}

impl Entry {
    /// The active path (canonical addresses).
    pub fn path(&self) -> Path {
        *self.path.borrow()
    }

    /// Follows the active path.
    pub fn watch(&self) -> watch::Receiver<Path> {
        self.path.subscribe()
    }

    /// Every path with its figures, for the status.
    pub fn view(&self) -> Vec<PathView> {
        let mut v = lock(&self.set).view(now());
        for p in &mut v {
            p.path = canonical_path(p.path);
        }
        v
    }

    /// Tries these candidates (from a new introduction) as direct paths.
    pub fn add_candidates(&self, table: &PathTable, candidates: &[SocketAddr]) {
        {
            let mut set = lock(&self.set);
            for c in candidates {
                set.add(Path::Direct(table.socket_form(*c)), None, now());
            }
        }
        table.rebuild();
        self.wake.notify_one();
    }
}

fn canonical_path(p: Path) -> Path {
    match p {
        Path::Direct(a) => Path::Direct(canonical(a)),
        Path::Relay(a) => Path::Relay(canonical(a)),
    }
}

/// Where the socket sends and what it shows quinn; rebuilt whenever a path set changes.
#[derive(Debug, Default)]
struct Routes {
    /// Alias → the active path's address.
    send: HashMap<SocketAddr, SocketAddr>,
    /// A path's address → its connection's alias.
    recv: HashMap<SocketAddr, SocketAddr>,
    /// Tag → entry.
    tags: HashMap<[u8; 16], Arc<Entry>>,
}

/// Every live connection's paths, and the socket they go out of.
#[derive(Debug)]
pub struct PathTable {
    inner: Arc<dyn AsyncUdpSocket>,
    /// The socket's address, read once (its family decides how IPv4 is written).
    local: SocketAddr,
    routes: RwLock<Routes>,
    next_seq: std::sync::atomic::AtomicU64,
    /// Path changes so far (all connections).
    pub switches: std::sync::atomic::AtomicU64,
    /// TCP links: where datagrams go when UDP cannot carry them.
    links: Arc<LinkHub>,
    /// Counts the times this host's addresses toward peers changed (a new local address, or
    /// the rendezvous's traffic back from the TCP link to UDP): live connections punch again.
    network: watch::Sender<u64>,
}

impl PathTable {
    pub fn new(inner: Arc<dyn AsyncUdpSocket>) -> io::Result<Arc<Self>> {
        let local = inner.local_addr()?;
        Ok(Arc::new(PathTable {
            inner,
            local,
            routes: RwLock::default(),
            next_seq: Default::default(),
            switches: Default::default(),
            links: Arc::new(LinkHub::new(local)),
            network: watch::Sender::new(0),
        }))
    }

    /// Changes each time this host's addresses toward peers change.
    pub fn network_changes(&self) -> watch::Receiver<u64> {
        self.network.subscribe()
    }

    /// This host's addresses toward peers changed.
    pub fn note_network_change(&self) {
        self.network.send_modify(|n| *n += 1);
    }

    /// The TCP links under this socket.
    pub fn links(&self) -> &Arc<LinkHub> {
        &self.links
    }

    /// What a path is called in logs and the status: `relay-tcp` for a relay path the TCP
    /// link carries now.
    pub fn kind_of(&self, path: Path) -> &'static str {
        match path {
            Path::Relay(a) if self.links.carries(a) => "relay-tcp",
            p => p.kind(),
        }
    }

    fn socket_form(&self, addr: SocketAddr) -> SocketAddr {
        for_socket(addr, self.local)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Sends one non-QUIC datagram (a punch, a relay bind, a probe). Best effort, like the
    /// network: a full socket buffer drops it.
    pub fn send_raw(&self, to: SocketAddr, packet: &[u8]) {
        let to = self.socket_form(to);
        if self.links.route(to, packet, None) {
            return;
        }
        self.send_udp(to, packet);
    }

    /// Sends one datagram over UDP, whatever the links carry (an echo request).
    pub fn send_udp(&self, to: SocketAddr, packet: &[u8]) {
        let to = self.socket_form(to);
        let t = Transmit {
            destination: to,
            ecn: None,
            contents: packet,
            segment_size: None,
            src_ip: None,
        };
        if let Err(e) = self.inner.try_send(&t) {
            tracing::debug!(%to, "raw send failed: {e}");
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Routes> {
        self.routes.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Recomputes the routes from every entry (rare: a path added, a switch).
    fn rebuild(&self) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let mut entries: Vec<Arc<Entry>> = routes.tags.values().cloned().collect();
        entries.sort_by_key(|e| e.seq);
        let aliases: std::collections::HashSet<SocketAddr> =
            entries.iter().map(|e| e.alias).collect();
        routes.send.clear();
        routes.recv.clear();
        for e in &entries {
            let set = lock(&e.set);
            routes.send.insert(e.alias, set.active().addr());
            for addr in set.addrs() {
                // Another connection's own address is left to it (both peers then have two
                // connections, and the peer table closes one).
                if addr != e.alias && !aliases.contains(&addr) {
                    routes.recv.entry(addr).or_insert(e.alias);
                }
            }
        }
    }

    /// Does what a path set decided.
    fn apply(&self, entry: &Entry, actions: Vec<Action>) {
        let mut switched = false;
        for action in actions {
            match action {
                Action::Send { to, packet } => self.send_raw(to, &packet),
                Action::Switched {
                    from,
                    to,
                    from_rtt,
                    to_rtt,
                } => {
                    switched = true;
                    let (from, to) = (canonical_path(from), canonical_path(to));
                    let ms = |r: Option<Duration>| {
                        r.map_or("-".to_owned(), |r| format!("{:.1}", r.as_secs_f64() * 1e3))
                    };
                    let peer = entry.peer.map(|p| p.to_string()).unwrap_or_default();
                    info!(
                        %peer,
                        from = %self.kind_of(from), from_addr = %from.addr(), from_rtt_ms = %ms(from_rtt),
                        to = %self.kind_of(to), to_addr = %to.addr(), to_rtt_ms = %ms(to_rtt),
                        "path changed"
                    );
                    self.switches
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    entry.path.send_replace(to);
                }
            }
        }
        if switched {
            self.rebuild();
        }
    }

    /// Probes and addresses of the datagrams quinn is about to read; `udp`: they came over
    /// UDP (not a TCP link), where echoes are answered and counted.
    fn on_received(&self, bufs: &[IoSliceMut<'_>], meta: &mut [RecvMeta], udp: bool) {
        let mut events: Vec<(Arc<Entry>, SocketAddr, Probe)> = Vec::new();
        {
            let routes = self.read();
            let paths = !routes.tags.is_empty();
            for (buf, m) in bufs.iter().zip(meta.iter_mut()) {
                let data = &buf[..m.len.min(buf.len())];
                // Ours start with a zero byte; QUIC's never do.
                if data.first() == Some(&0) {
                    for datagram in data.chunks(m.stride.max(1)) {
                        if let Some(p) = Probe::parse(datagram).filter(|_| paths) {
                            if let Some(e) = routes.tags.get(p.tag()) {
                                events.push((e.clone(), m.addr, p));
                            }
                        } else if let Some(e) = Echo::parse(datagram).filter(|_| udp) {
                            if let Some(reply) = self.links.on_echo(e, m.addr) {
                                self.send_udp(m.addr, &reply);
                            }
                        }
                    }
                }
                if let Some(alias) = routes.recv.get(&m.addr).filter(|_| paths) {
                    m.addr = *alias;
                }
            }
        }
        for (entry, from, probe) in events {
            let (actions, grew) = {
                let mut set = lock(&entry.set);
                let before = set.addrs().count();
                let actions = match probe {
                    Probe::Ping { nonce, .. } => set.on_ping(from, nonce, now()),
                    Probe::Pong { nonce, .. } => set.on_pong(from, nonce, now()),
                };
                (actions, set.addrs().count() != before)
            };
            if grew {
                self.rebuild();
            }
            self.apply(&entry, actions);
            entry.wake.notify_one();
        }
    }

    fn remove(&self, tag: &[u8; 16]) {
        let removed = {
            let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
            routes.tags.remove(tag).is_some()
        };
        if removed {
            self.rebuild();
        }
    }
}

/// Gives `conn` (whose handshake completed on `active`) its other paths — the relay side
/// `relay` and the peer's `candidates` — and probes them until the connection closes or
/// `abort` fires. `fixed` (`--force-relay`): no path but these, none learnt from the peer. The connection then goes wherever its paths work best.
pub fn attach(
    table: &Arc<PathTable>,
    conn: &quinn::Connection,
    active: Path,
    relay: Option<(SocketAddr, [u8; 16])>,
    candidates: &[SocketAddr],
    peer: Option<crate::identity::PeerId>,
    fixed: bool,
    abort: CancellationToken,
) -> Option<Arc<Entry>> {
    let mut tag = [0u8; 16];
    conn.export_keying_material(&mut tag, TAG_LABEL, b"").ok()?;
    let t = now();
    let alias = conn.remote_address();
    let form = |p: Path| match p {
        Path::Direct(a) => Path::Direct(table.socket_form(a)),
        Path::Relay(a) => Path::Relay(table.socket_form(a)),
    };
    let active = form(active);
    let token = relay.and_then(|(a, token)| (form(Path::Relay(a)) == active).then_some(token));
    let mut set = PathSet::new(tag, active, token, t);
    if fixed {
        set = set.fixed();
    }
    if let Some((addr, token)) = relay {
        set.add(form(Path::Relay(addr)), Some(token), t);
    }
    for c in candidates {
        set.add(form(Path::Direct(*c)), None, t);
    }
    let entry = Arc::new(Entry {
        alias,
        peer,
        seq: table
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        set: Mutex::new(set),
        wake: Notify::new(),
        path: watch::Sender::new(canonical_path(active)),
    });
    {
        let mut routes = table.routes.write().unwrap_or_else(|p| p.into_inner());
        routes.tags.insert(tag, entry.clone());
    }
    table.rebuild();
    let (table, e, conn) = (table.clone(), entry.clone(), conn.clone());
    tokio::spawn(async move {
        loop {
            let (actions, deadline) = {
                let mut set = lock(&e.set);
                let actions = set.poll(now());
                (actions, set.next_deadline())
            };
            table.apply(&e, actions);
            tokio::select! {
                () = sleep_until_opt(deadline) => {}
                () = e.wake.notified() => {}
                _ = conn.closed() => break,
                () = abort.cancelled() => break,
            }
        }
        table.remove(&tag);
    });
    Some(entry)
}

/// quinn's UDP socket with the path layer in front of it.
#[derive(Debug)]
pub struct PathSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    table: Arc<PathTable>,
    /// Which source `poll_recv` reads first this time (the UDP socket or the links) while
    /// both have datagrams, so neither starves the other.
    links_first: std::sync::atomic::AtomicBool,
}

impl PathSocket {
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, table: Arc<PathTable>) -> Self {
        PathSocket {
            inner,
            table,
            links_first: Default::default(),
        }
    }

    /// Datagrams the TCP links brought, one per buffer.
    fn poll_links(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<usize> {
        let mut i = 0;
        let max = bufs.len().min(meta.len());
        self.table
            .links
            .poll_injected(cx, max, |(from, data)| {
                let buf = &mut bufs[i];
                if data.len() > buf.len() {
                    return; // larger than quinn reads: dropped, as the kernel would truncate
                }
                buf[..data.len()].copy_from_slice(&data);
                meta[i] = RecvMeta {
                    addr: from,
                    len: data.len(),
                    stride: data.len(),
                    ecn: None,
                    dst_ip: None,
                };
                i += 1;
            })
            .map(|_| i)
    }
}

impl AsyncUdpSocket for PathSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let to = self.table.read().send.get(&transmit.destination).copied();
        let dest = to.unwrap_or(transmit.destination);
        if self
            .table
            .links
            .route(dest, transmit.contents, transmit.segment_size)
        {
            return Ok(());
        }
        match to {
            Some(to) if to != transmit.destination => self.inner.try_send(&Transmit {
                destination: to,
                ecn: transmit.ecn,
                contents: transmit.contents,
                segment_size: transmit.segment_size,
                // The local address quinn saw the alias on may be of the other family.
                src_ip: None,
            }),
            _ => self.inner.try_send(transmit),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // The links are looked at first every other call while they have datagrams, and
        // whenever the UDP socket has none (which also registers the waker for them).
        let links_first = self.table.links.has_injected()
            && !self
                .links_first
                .fetch_xor(true, std::sync::atomic::Ordering::Relaxed);
        if links_first {
            if let Poll::Ready(n) = self.poll_links(cx, bufs, meta) {
                self.table.on_received(&bufs[..n], &mut meta[..n], false);
                return Poll::Ready(Ok(n));
            }
        }
        let (n, udp) = match self.inner.poll_recv(cx, bufs, meta) {
            Poll::Ready(Ok(n)) => (n, true),
            Poll::Pending if !links_first => match self.poll_links(cx, bufs, meta) {
                Poll::Ready(n) => (n, false),
                Poll::Pending => return Poll::Pending,
            },
            other => return other,
        };
        self.table.on_received(&bufs[..n], &mut meta[..n], udp);
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
