//! The relay: when two peers cannot punch a direct path, their QUIC packets go through a pair
//! of UDP ports on the rendezvous host, unchanged. The relay sees only encrypted QUIC packets:
//! it can drop them but can neither read nor forge them (QUIC authenticates every packet, and
//! the peers still pin each other's keys).
//!
//! An allocation has two sides, one per peer, each with its own port and secret token (handed
//! out over the authenticated rendezvous connection). A side is *latched* to the address that
//! sent a bind packet with its token; only packets from the latched address are forwarded, and
//! only to the other side's latched address. An allocation with no traffic for `idle`
//! expires, and any allocation ends at its `lifetime`; an optional byte rate polices what it
//! forwards (packets over the rate are dropped, as a congested link would).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::multipath::link::LinkHub;
use crate::protocol::rendezvous::parse_relay_bind;
use crate::time::now;
use crate::time::rate::{Bucket, Rate};

/// The limits of one allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Released after this long with nothing forwarded.
    pub idle: Duration,
    /// Released this long after it was made, whatever it carries.
    pub lifetime: Duration,
    /// Bytes per second it forwards, both ways together, at most (`None`: no cap).
    pub bytes_per_sec: Option<u32>,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            idle: Duration::from_secs(60),
            lifetime: Duration::from_secs(12 * 3600),
            bytes_per_sec: None,
        }
    }
}

/// Why an allocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Idle,
    Lifetime,
}

/// What to do with a packet that reached side `side` of an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send it, unchanged, from the other side's port to `dest`.
    Forward { dest: SocketAddr },
    /// It was a valid bind: the side is now latched to its source (new or moved).
    Latched,
    /// A valid bind from the address the side is latched to already (a peer's periodic one).
    Bound,
    /// Drop it (unknown source, wrong token, or the other side is not latched yet).
    Drop,
    /// Drop it: over the allocation's byte rate.
    Policed,
}

/// The pure forwarding state of one allocation.
#[derive(Debug)]
pub struct Latch {
    tokens: [[u8; 16]; 2],
    addrs: [Option<SocketAddr>; 2],
    last_activity: Instant,
    created: Instant,
    limits: RelayLimits,
    /// The byte-rate bucket, when capped.
    bucket: Option<(Bucket, Rate)>,
}

impl Latch {
    pub fn new(tokens: [[u8; 16]; 2], limits: RelayLimits, now: Instant) -> Self {
        let bucket = limits.bytes_per_sec.map(|b| {
            let rate = Rate {
                count: b,
                per: Duration::from_secs(1),
            };
            (Bucket::full(rate, now), rate)
        });
        Latch {
            tokens,
            addrs: [None, None],
            last_activity: now,
            created: now,
            limits,
            bucket,
        }
    }

    pub fn on_packet(&mut self, side: usize, src: SocketAddr, data: &[u8], now: Instant) -> Action {
        if let Some(token) = parse_relay_bind(data) {
            if token != self.tokens[side] {
                return Action::Drop;
            }
            self.last_activity = now;
            if self.addrs[side] == Some(src) {
                return Action::Bound;
            }
            self.addrs[side] = Some(src);
            return Action::Latched;
        }
        if self.addrs[side] != Some(src) {
            return Action::Drop;
        }
        let Some(dest) = self.addrs[1 - side] else {
            return Action::Drop;
        };
        if let Some((bucket, rate)) = &mut self.bucket {
            if !bucket.take(data.len() as f64, *rate, now) {
                return Action::Policed;
            }
        }
        self.last_activity = now;
        Action::Forward { dest }
    }

    /// Whether the allocation has ended by `now`, and why.
    pub fn expired(&self, now: Instant) -> Option<Expiry> {
        if now.saturating_duration_since(self.created) >= self.limits.lifetime {
            Some(Expiry::Lifetime)
        } else if now.saturating_duration_since(self.last_activity) >= self.limits.idle {
            Some(Expiry::Idle)
        } else {
            None
        }
    }

    /// When [`expired`](Self::expired) can next become true.
    pub fn next_deadline(&self) -> Instant {
        (self.created + self.limits.lifetime).min(self.last_activity + self.limits.idle)
    }
}

/// Random tokens for the two sides.
pub fn new_tokens() -> [[u8; 16]; 2] {
    use ring::rand::SecureRandom;
    let mut t = [[0u8; 16]; 2];
    let rng = ring::rand::SystemRandom::new();
    for side in &mut t {
        rng.fill(side).expect("system randomness");
    }
    t
}

/// Binds the two ports of an allocation on `ip`.
pub async fn bind_pair(ip: std::net::IpAddr) -> std::io::Result<[Arc<UdpSocket>; 2]> {
    let a = UdpSocket::bind((ip, 0)).await?;
    let b = UdpSocket::bind((ip, 0)).await?;
    Ok([Arc::new(a), Arc::new(b)])
}

/// What an allocation did, when it ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct Forwarded {
    pub packets: u64,
    pub bytes: u64,
    /// Packets dropped for the byte rate.
    pub policed: u64,
    /// Why it ended (`None`: cancelled).
    pub expiry: Option<Expiry>,
}

/// Forwards between the two ports until the allocation expires or `cancel` fires. The
/// sockets are closed when this returns. A side may be reached over a TCP link (`links`):
/// its datagrams come from the link's inbox for that port, and go back onto the link.
pub async fn run(
    sockets: [Arc<UdpSocket>; 2],
    tokens: [[u8; 16]; 2],
    limits: RelayLimits,
    links: Arc<LinkHub>,
    cancel: CancellationToken,
) -> Forwarded {
    let ports = [
        sockets[0].local_addr().map_or(0, |a| a.port()),
        sockets[1].local_addr().map_or(0, |a| a.port()),
    ];
    let mut inboxes = Inboxes {
        rx: [links.register_port(ports[0]), links.register_port(ports[1])],
        ports,
        links: links.clone(),
    };
    let [inbox0, inbox1] = &mut inboxes.rx;
    let mut latch = Latch::new(tokens, limits, now());
    let mut bufs = [vec![0u8; 65536], vec![0u8; 65536]];
    let mut done = Forwarded::default();
    loop {
        let [buf0, buf1] = &mut bufs;
        // Checked at most a quarter of the idle timeout late (traffic moves the deadline).
        let check = latch
            .next_deadline()
            .min(now() + limits.idle / 4)
            .max(now());
        let got = tokio::select! {
            r = sockets[0].recv_from(buf0) => match r { Ok((n, src)) => Got::Udp(0, n, src), Err(_) => continue },
            r = sockets[1].recv_from(buf1) => match r { Ok((n, src)) => Got::Udp(1, n, src), Err(_) => continue },
            Some((src, d)) = inbox0.recv() => Got::Link(0, src, d),
            Some((src, d)) = inbox1.recv() => Got::Link(1, src, d),
            () = tokio::time::sleep_until(check.into()) => {
                if let Some(expiry) = latch.expired(now()) {
                    debug!(?expiry, packets = done.packets, "relay allocation ended");
                    done.expiry = Some(expiry);
                    return done;
                }
                continue;
            }
            () = cancel.cancelled() => return done,
        };
        let (side, src, data): (usize, SocketAddr, &[u8]) = match &got {
            Got::Udp(side, len, src) => (*side, *src, &bufs[*side][..*len]),
            Got::Link(side, src, d) => (*side, *src, &d[..]),
        };
        match latch.on_packet(side, src, data, now()) {
            Action::Forward { dest } => {
                done.packets += 1;
                done.bytes += data.len() as u64;
                // UDP: a full socket buffer drops the packet, as the network would; a link
                // with a full queue drops it too.
                if !links.send_to_link(dest, ports[1 - side], data) {
                    let _ = sockets[1 - side].try_send_to(data, dest);
                }
            }
            Action::Latched => {
                let over = match crate::multipath::link::is_link_addr(src) {
                    true => "tcp",
                    false => "udp",
                };
                info!(side, src = %links.real(src).unwrap_or(src), over, "relay side bound")
            }
            Action::Bound | Action::Drop => {}
            Action::Policed => done.policed += 1,
        }
    }
}

enum Got {
    Udp(usize, usize, SocketAddr),
    Link(usize, SocketAddr, bytes::Bytes),
}

/// The two ports' inboxes for datagrams from TCP links; unregistered when dropped.
struct Inboxes {
    rx: [tokio::sync::mpsc::Receiver<crate::multipath::link::Datagram>; 2],
    ports: [u16; 2],
    links: Arc<LinkHub>,
}

impl Drop for Inboxes {
    fn drop(&mut self) {
        for p in self.ports {
            self.links.unregister_port(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::rendezvous::relay_bind_packet;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 2], port))
    }

    #[test]
    fn forwards_only_between_latched_addresses() {
        let t0 = Instant::now();
        let tokens = [[1u8; 16], [2u8; 16]];
        let bind = |side: usize| relay_bind_packet(&tokens[side]);
        let quic = b"quic".to_vec();
        let mut l = Latch::new(tokens, RelayLimits::default(), t0);
        // (side the packet reaches, its source, the packet, what the latch does, why)
        let script = [
            (
                0,
                1,
                quic.clone(),
                Action::Drop,
                "nothing before both sides are bound",
            ),
            (0, 1, bind(0), Action::Latched, "side 0 binds"),
            (0, 1, quic.clone(), Action::Drop, "other side not bound"),
            (
                1,
                2,
                bind(0),
                Action::Drop,
                "a side's token is not valid on the other side",
            ),
            (1, 2, bind(1), Action::Latched, "side 1 binds"),
            (
                0,
                1,
                quic.clone(),
                Action::Forward { dest: addr(2) },
                "0 to 1",
            ),
            (
                1,
                2,
                quic.clone(),
                Action::Forward { dest: addr(1) },
                "1 to 0",
            ),
            (
                0,
                9,
                quic.clone(),
                Action::Drop,
                "a stranger on a bound side",
            ),
            (
                0,
                3,
                bind(0),
                Action::Latched,
                "a rebinding with the token moves the latch",
            ),
            (
                0,
                3,
                bind(0),
                Action::Bound,
                "the same bind again changes nothing",
            ),
            (
                1,
                2,
                quic.clone(),
                Action::Forward { dest: addr(3) },
                "to the new address",
            ),
        ];
        for (side, from, packet, expected, why) in script {
            assert_eq!(
                l.on_packet(side, addr(from), &packet, t0),
                expected,
                "{why}"
            );
        }
    }

    #[test]
    fn expires_after_idle_and_traffic_keeps_it() {
        let t0 = Instant::now();
        let tokens = [[1u8; 16], [2u8; 16]];
        let idle = Duration::from_secs(30);
        let limits = RelayLimits {
            idle,
            lifetime: Duration::from_secs(100),
            bytes_per_sec: None,
        };
        let mut l = Latch::new(tokens, limits, t0);
        l.on_packet(0, addr(1), &relay_bind_packet(&tokens[0]), t0);
        l.on_packet(1, addr(2), &relay_bind_packet(&tokens[1]), t0);
        let t1 = t0 + Duration::from_secs(20);
        l.on_packet(0, addr(1), b"keepalive", t1);
        assert_eq!(l.expired(t0 + Duration::from_secs(40)), None);
        assert_eq!(l.next_deadline(), t1 + idle);
        assert_eq!(l.expired(t1 + idle), Some(Expiry::Idle));
        // Dropped packets do not keep it alive.
        l.on_packet(0, addr(9), b"noise", t1 + Duration::from_secs(29));
        assert_eq!(l.expired(t1 + idle), Some(Expiry::Idle));
        // Traffic does not outlive the lifetime.
        for s in (30..100).step_by(10) {
            let t = t0 + Duration::from_secs(s);
            assert!(matches!(
                l.on_packet(0, addr(1), b"q", t),
                Action::Forward { .. }
            ));
        }
        assert_eq!(l.next_deadline(), t0 + Duration::from_secs(100));
        assert_eq!(
            l.expired(t0 + Duration::from_secs(100)),
            Some(Expiry::Lifetime)
        );
    }

    #[test]
    fn a_byte_rate_polices_what_is_forwarded() {
        let t0 = Instant::now();
        let tokens = [[1u8; 16], [2u8; 16]];
        let limits = RelayLimits {
            bytes_per_sec: Some(10_000),
            ..RelayLimits::default()
        };
        let mut l = Latch::new(tokens, limits, t0);
        l.on_packet(0, addr(1), &relay_bind_packet(&tokens[0]), t0);
        l.on_packet(1, addr(2), &relay_bind_packet(&tokens[1]), t0);
        let packet = [0u8; 1000];
        let forwarded = (0..20)
            .filter(|_| matches!(l.on_packet(0, addr(1), &packet, t0), Action::Forward { .. }))
            .count();
        assert_eq!(forwarded, 10, "one second's worth at once");
        assert_eq!(
            l.on_packet(1, addr(2), &packet, t0),
            Action::Policed,
            "both ways share it"
        );
        let t1 = t0 + Duration::from_millis(500);
        let forwarded = (0..20)
            .filter(|_| matches!(l.on_packet(1, addr(2), &packet, t1), Action::Forward { .. }))
            .count();
        assert_eq!(forwarded, 5, "then the rate");
    }
}
