//! TCP links in the socket layer: where datagrams that would have gone over UDP go over a
//! TLS-over-TCP connection to (or from) the rendezvous host instead (`protocol::link`).
//!
//! - On a peer, one *client route*: while [`LinkHub::via_tcp`] is on, every datagram for the
//!   rendezvous host's address (its QUIC endpoint, its relay ports) is framed onto the link,
//!   and what the link brings is shown to quinn as if it came over UDP from that host's port.
//! - On the rendezvous, each link is a peer known by a *link address* (`0.a.b.c:port`: the
//!   `0.0.0.0/8` block never appears as a real source) that quinn and the relay treat as a
//!   UDP address; what they send there is framed onto that link. [`LinkHub::real`] gives the
//!   link's real TCP address (quotas, logs). Datagrams a link brings for a relay port go to
//!   that allocation's inbox; any other port is the QUIC endpoint.
//!
//! The TCP connections themselves are owned by their drivers (`nat::link`, the rendezvous's
//! `nat::server::link`); this only holds their senders.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};

use super::path::{canonical, for_socket};
use crate::protocol::link::{self, Echo};

/// Datagrams queued for one link at most (a full queue drops, as a full UDP buffer does, and
/// QUIC's congestion control backs off).
pub const LINK_QUEUE: usize = 1024;
/// Datagrams that came from links and wait for quinn, at most.
const INJECT_QUEUE: usize = 4096;

/// A datagram that came over a link: its source (as the socket shows it) and its bytes.
pub type Datagram = (SocketAddr, Bytes);

/// The sending half of one link: whole frames.
pub type LinkTx = mpsc::Sender<Bytes>;

#[derive(Debug)]
struct ServerLink {
    real: SocketAddr,
    tx: LinkTx,
}

#[derive(Debug)]
struct ClientRoute {
    /// The rendezvous host (canonical).
    ip: IpAddr,
    tx: LinkTx,
}

/// Every link of this process.
#[derive(Debug)]
pub struct LinkHub {
    /// The socket's address (its family decides how addresses are shown to quinn).
    local: SocketAddr,
    client: RwLock<Option<ClientRoute>>,
    via_tcp: AtomicBool,
    /// Follows `via_tcp` (a registration stalled over UDP starts again once it is on).
    via_tcp_watch: tokio::sync::watch::Sender<bool>,
    /// Rendezvous side: link address (canonical) → link.
    links: RwLock<HashMap<SocketAddr, ServerLink>>,
    /// Rendezvous side: relay port → the allocation's inbox.
    ports: RwLock<HashMap<u16, mpsc::Sender<Datagram>>>,
    next_link: AtomicU64,
    inject_tx: mpsc::Sender<Datagram>,
    inject_rx: Mutex<mpsc::Receiver<Datagram>>,
    /// At least the datagrams waiting in `inject_rx`: while 0, the socket's busy receive
    /// path does not look at the links (one atomic load instead of a lock and a poll).
    injected: std::sync::atomic::AtomicUsize,
    /// Whether this process answers echo requests (the rendezvous does).
    answer_echo: AtomicBool,
    /// The nonce of the last echo request sent, and the replies' signal.
    echo_nonce: AtomicU64,
    pub echo_replied: Notify,
}

impl LinkHub {
    pub fn new(local: SocketAddr) -> Self {
        let (inject_tx, inject_rx) = mpsc::channel(INJECT_QUEUE);
        LinkHub {
            local,
            client: RwLock::new(None),
            via_tcp: AtomicBool::new(false),
            via_tcp_watch: tokio::sync::watch::Sender::new(false),
            links: RwLock::default(),
            ports: RwLock::default(),
            next_link: AtomicU64::new(1),
            inject_tx,
            inject_rx: Mutex::new(inject_rx),
            injected: Default::default(),
            answer_echo: AtomicBool::new(false),
            // Random, so that an off-path sender cannot guess the replies that count.
            echo_nonce: AtomicU64::new(random_start()),
            echo_replied: Notify::new(),
        }
    }

    fn read_client(&self) -> std::sync::RwLockReadGuard<'_, Option<ClientRoute>> {
        self.client.read().unwrap_or_else(|p| p.into_inner())
    }

    // ---- the peer's side ----

    /// The link to the rendezvous host at `ip` is up: frames go to `tx` while
    /// [`set_via_tcp`](Self::set_via_tcp) is on.
    pub fn set_client(&self, ip: IpAddr, tx: LinkTx) {
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = Some(ClientRoute {
            ip: canonical(SocketAddr::new(ip, 0)).ip(),
            tx,
        });
    }

    pub fn clear_client(&self) {
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.set_via_tcp(false);
    }

    /// Sends the rendezvous host's traffic over the link (`true`) or over UDP.
    pub fn set_via_tcp(&self, on: bool) {
        self.via_tcp.store(on, Ordering::Release);
        self.via_tcp_watch
            .send_if_modified(|v| std::mem::replace(v, on) != on);
    }

    /// Follows whether the rendezvous's traffic goes over the link.
    pub fn watch_via_tcp(&self) -> tokio::sync::watch::Receiver<bool> {
        self.via_tcp_watch.subscribe()
    }

    /// Whether the rendezvous's traffic goes over the link now.
    pub fn via_tcp(&self) -> bool {
        self.via_tcp.load(Ordering::Acquire)
    }

    /// TCP links open: the peers' on a rendezvous, ours to it (0 or 1) on a peer.
    pub fn count(&self) -> usize {
        // One lock at a time.
        let theirs = self.links.read().unwrap_or_else(|p| p.into_inner()).len();
        let ours = usize::from(self.read_client().is_some());
        theirs + ours
    }

    /// Whether traffic for `addr` goes over the link now (a relay path that does is
    /// `relay-tcp`).
    pub fn carries(&self, addr: SocketAddr) -> bool {
        self.via_tcp.load(Ordering::Acquire)
            && self
                .read_client()
                .as_ref()
                .is_some_and(|c| c.ip == canonical(addr).ip())
    }

    /// A datagram from the rendezvous host's `port` came over the link.
    pub fn from_rendezvous(&self, ip: IpAddr, port: u16, datagram: Bytes) {
        let from = for_socket(SocketAddr::new(ip, port), self.local);
        self.inject((from, datagram));
    }

    /// Queues a datagram for quinn (dropped when the queue is full, as a UDP buffer would).
    fn inject(&self, d: Datagram) {
        self.injected.fetch_add(1, Ordering::AcqRel);
        if self.inject_tx.try_send(d).is_err() {
            self.injected.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether datagrams from links may be waiting for quinn.
    pub fn has_injected(&self) -> bool {
        self.injected.load(Ordering::Acquire) > 0
    }

    /// The echo request to send over UDP now.
    pub fn next_echo(&self) -> [u8; link::ECHO_LEN] {
        let nonce = self.echo_nonce.fetch_add(1, Ordering::AcqRel) + 1;
        Echo::Request(nonce).encode()
    }

    // ---- the rendezvous's side ----

    /// Answer echo requests (the rendezvous).
    pub fn answer_echoes(&self) {
        self.answer_echo.store(true, Ordering::Release);
    }

    /// A new link from `real`: the address quinn and the relay know it by (socket form).
    pub fn add_link(&self, real: SocketAddr, tx: LinkTx) -> SocketAddr {
        let n = self.next_link.fetch_add(1, Ordering::Relaxed);
        // 0.b.c.d (never 0.0.0.0) and a port: distinct for the first 2^40 links.
        // (An address below 2^24 is 0.b.c.d.)
        let low = (n % 0xff_ffff + 1) as u32;
        let port = (n / 0xff_ffff % 0xffff + 1) as u16;
        let addr = SocketAddr::new(Ipv4Addr::from(low).into(), port);
        self.links
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, ServerLink { real, tx });
        for_socket(addr, self.local)
    }

    pub fn remove_link(&self, addr: SocketAddr) {
        self.links
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&canonical(addr));
    }

    /// The real address behind a link address; any other address as it is (canonical).
    /// `None` for a link address whose link is gone (nothing may be counted under it).
    pub fn real(&self, addr: SocketAddr) -> Option<SocketAddr> {
        let addr = canonical(addr);
        if !is_link_addr(addr) {
            return Some(addr);
        }
        self.links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&addr)
            .map(|l| l.real)
    }

    /// The inbox of relay port `port`, for datagrams links bring to it; closed (removed) when
    /// the receiver is dropped and [`unregister_port`](Self::unregister_port) is called.
    pub fn register_port(&self, port: u16) -> mpsc::Receiver<Datagram> {
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        self.ports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(port, tx);
        rx
    }

    pub fn unregister_port(&self, port: u16) {
        self.ports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&port);
    }

    /// A datagram for `port` came over the link known as `from`.
    pub fn from_link(&self, from: SocketAddr, port: u16, datagram: Bytes) {
        let relay = self
            .ports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&port)
            .cloned();
        match relay {
            Some(inbox) => {
                let _ = inbox.try_send((from, datagram));
            }
            None => self.inject((from, datagram)),
        }
    }

    /// Sends `datagram` from this host's `port` to the link known as `to`: `false` when
    /// `to` is no link address (send it over UDP); a link address whose link is gone drops it.
    pub fn send_to_link(&self, to: SocketAddr, port: u16, datagram: &[u8]) -> bool {
        self.send_segments_to_link(to, port, std::iter::once(datagram))
    }

    /// [`send_to_link`](Self::send_to_link) for several datagrams, the link looked up once.
    fn send_segments_to_link<'a>(
        &self,
        to: SocketAddr,
        port: u16,
        datagrams: impl Iterator<Item = &'a [u8]>,
    ) -> bool {
        if !is_link_addr(to) {
            return false;
        }
        let links = self.links.read().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = links.get(&canonical(to)) {
            send_frames(&l.tx, port, datagrams);
        }
        true
    }

    // ---- both sides: the socket's send and receive paths ----

    /// Sends what quinn or the path layer addressed to `to` over a link, when one carries it.
    /// `segment`: the size of each datagram in `contents` (segmentation offload).
    pub fn route(&self, to: SocketAddr, contents: &[u8], segment: Option<usize>) -> bool {
        let segments = || contents.chunks(segment.unwrap_or(contents.len()).max(1));
        if self.send_segments_to_link(to, self.local.port(), segments()) {
            return true;
        }
        if !self.via_tcp.load(Ordering::Acquire) {
            return false;
        }
        let client = self.read_client();
        let Some(c) = client.as_ref().filter(|c| c.ip == canonical(to).ip()) else {
            return false;
        };
        send_frames(&c.tx, to.port(), segments());
        true
    }

    /// Handles an echo packet that came over UDP (never over a link) from `from`; the reply
    /// to send, if any. A reply counts only from the rendezvous host.
    pub fn on_echo(&self, echo: Echo, from: SocketAddr) -> Option<[u8; link::ECHO_LEN]> {
        match echo {
            Echo::Request(n) if self.answer_echo.load(Ordering::Acquire) => {
                Some(Echo::Reply(n).encode())
            }
            Echo::Reply(n) => {
                let ours = self
                    .read_client()
                    .as_ref()
                    .is_some_and(|c| c.ip == canonical(from).ip());
                if !ours {
                    return None;
                }
                // Only a reply to one of the last few requests counts.
                let sent = self.echo_nonce.load(Ordering::Acquire);
                if n <= sent && n.saturating_add(8) > sent {
                    self.echo_replied.notify_one();
                }
                None
            }
            Echo::Request(_) => None,
        }
    }

    /// Datagrams from links, for quinn: fills `out` (at most its length) and returns how
    /// many; `Pending` registers the waker.
    pub fn poll_injected(
        &self,
        cx: &mut std::task::Context<'_>,
        max: usize,
        mut take: impl FnMut(Datagram),
    ) -> std::task::Poll<usize> {
        let mut rx = self.inject_rx.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        while n < max {
            match rx.poll_recv(cx) {
                std::task::Poll::Ready(Some(d)) => {
                    self.injected.fetch_sub(1, Ordering::AcqRel);
                    take(d);
                    n += 1;
                }
                _ => break,
            }
        }
        if n == 0 {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(n)
        }
    }
}

/// Frames each datagram for `port` onto a link; a full queue drops it, as a full UDP buffer
/// would.
fn send_frames<'a>(tx: &LinkTx, port: u16, datagrams: impl Iterator<Item = &'a [u8]>) {
    for d in datagrams {
        if let Ok(frame) = link::encode(port, d) {
            let _ = tx.try_send(frame.into());
        }
    }
}

/// Where echo nonces start: random, well below where they could wrap.
fn random_start() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u64::from(u32::from_ne_bytes(b))
}

/// Whether `addr` (in either form) is a link address.
pub fn is_link_addr(addr: SocketAddr) -> bool {
    match canonical(addr).ip() {
        IpAddr::V4(v4) => v4.octets()[0] == 0 && !v4.is_unspecified(),
        IpAddr::V6(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `f` is ready at once.
    fn futures_now(f: impl std::future::Future) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        f.as_mut().poll(&mut cx).is_ready()
    }

    #[test]
    fn link_addresses_are_distinct_and_map_to_the_real_one() {
        let hub = LinkHub::new("[::]:3478".parse().unwrap());
        let (tx, _rx) = mpsc::channel(1);
        let real: SocketAddr = "198.51.100.10:40000".parse().unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let a = hub.add_link(real, tx.clone());
            assert!(is_link_addr(a), "{a}");
            assert!(seen.insert(a), "{a} twice");
            assert_eq!(hub.real(a), Some(real));
        }
        let other: SocketAddr = "198.51.100.20:1".parse().unwrap();
        assert_eq!(hub.real(other), Some(other));
        assert!(!is_link_addr(other));
        let gone = hub.add_link(real, tx.clone());
        hub.remove_link(gone);
        assert_eq!(
            hub.real(gone),
            None,
            "nothing is counted under a link that is gone"
        );
        assert!(!is_link_addr("0.0.0.0:0".parse().unwrap()));
    }

    #[test]
    fn the_client_route_carries_only_the_rendezvous_host_and_only_when_on() {
        let hub = LinkHub::new("[::]:4433".parse().unwrap());
        let (tx, mut rx) = mpsc::channel(8);
        let rz: SocketAddr = "198.51.100.1:3478".parse().unwrap();
        let relay: SocketAddr = "[::ffff:198.51.100.1]:50000".parse().unwrap();
        let peer: SocketAddr = "198.51.100.20:4433".parse().unwrap();
        hub.set_client(rz.ip(), tx);
        assert!(!hub.route(rz, b"x", None), "UDP until told otherwise");
        hub.set_via_tcp(true);
        assert!(hub.carries(relay) && !hub.carries(peer));
        assert!(
            hub.route(relay, b"abcdef", Some(4)),
            "a relay port of the host"
        );
        assert!(!hub.route(peer, b"x", None), "a peer is never carried");
        let f1 = rx.try_recv().unwrap();
        let f2 = rx.try_recv().unwrap();
        assert_eq!(link::decode(&f1).unwrap().unwrap().0, 50000);
        assert_eq!(&f1[4..], b"abcd", "segments are frames of their own");
        assert_eq!(&f2[4..], b"ef");
        hub.clear_client();
        assert!(!hub.route(relay, b"x", None));
    }

    #[test]
    fn echo_replies_count_only_for_recent_requests_and_only_the_rendezvous_answers() {
        let hub = LinkHub::new("0.0.0.0:1".parse().unwrap());
        let rz: SocketAddr = "198.51.100.1:3478".parse().unwrap();
        assert_eq!(hub.on_echo(Echo::Request(5), rz), None);
        hub.answer_echoes();
        assert_eq!(
            hub.on_echo(Echo::Request(5), rz),
            Some(Echo::Reply(5).encode())
        );
        let (tx, _rx) = mpsc::channel(1);
        hub.set_client(rz.ip(), tx);
        let req = Echo::parse(&hub.next_echo()).unwrap();
        let Echo::Request(n) = req else { panic!() };
        assert_eq!(hub.on_echo(Echo::Reply(n + 1), rz), None);
        assert!(
            !futures_now(hub.echo_replied.notified()),
            "a nonce not sent yet"
        );
        // Counted (a notification) only from the rendezvous host; never answered.
        hub.on_echo(Echo::Reply(n), "198.51.100.66:3478".parse().unwrap());
        let woke = futures_now(hub.echo_replied.notified());
        assert!(!woke, "a reply from elsewhere does not count");
        assert_eq!(
            hub.on_echo(Echo::Reply(n), rz),
            None,
            "replies are never answered"
        );
        assert!(futures_now(hub.echo_replied.notified()));
    }
}
