//! The relay: when two peers cannot punch a direct path, their QUIC packets go through a pair
//! of UDP ports on the rendezvous host, unchanged. The relay sees only encrypted QUIC packets:
//! it can drop them but can neither read nor forge them (QUIC authenticates every packet, and
//! the peers still pin each other's keys).
//!
//! An allocation has two sides, one per peer, each with its own port and secret token (handed
//! out over the authenticated rendezvous connection). A side is *latched* to the address that
//! sent a bind packet with its token; only packets from the latched address are forwarded, and
//! only to the other side's latched address. An allocation with no traffic for `idle` expires.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::protocol::rendezvous::parse_relay_bind;
use crate::time::now;

/// What to do with a packet that reached side `side` of an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send it, unchanged, from the other side's port to `dest`.
    Forward { dest: SocketAddr },
    /// It was a valid bind: the side is now latched to its source.
    Latched,
    /// Drop it (unknown source, wrong token, or the other side is not latched yet).
    Drop,
}

/// The pure forwarding state of one allocation.
#[derive(Debug)]
pub struct Latch {
    tokens: [[u8; 16]; 2],
    addrs: [Option<SocketAddr>; 2],
    last_activity: Instant,
}

impl Latch {
    pub fn new(tokens: [[u8; 16]; 2], now: Instant) -> Self {
        Latch {
            tokens,
            addrs: [None, None],
            last_activity: now,
        }
    }

    pub fn on_packet(&mut self, side: usize, src: SocketAddr, data: &[u8], now: Instant) -> Action {
        if let Some(token) = parse_relay_bind(data) {
            if token != self.tokens[side] {
                return Action::Drop;
            }
            self.addrs[side] = Some(src);
            self.last_activity = now;
            return Action::Latched;
        }
        if self.addrs[side] != Some(src) {
            return Action::Drop;
        }
        match self.addrs[1 - side] {
            Some(dest) => {
                self.last_activity = now;
                Action::Forward { dest }
            }
            None => Action::Drop,
        }
    }

    pub fn expired(&self, now: Instant, idle: Duration) -> bool {
        now.duration_since(self.last_activity) >= idle
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

/// Forwards between the two ports until the allocation is idle for `idle` or `cancel` fires.
/// The sockets are closed when this returns. Returns the number of packets forwarded.
pub async fn run(
    sockets: [Arc<UdpSocket>; 2],
    tokens: [[u8; 16]; 2],
    idle: Duration,
    cancel: CancellationToken,
) -> u64 {
    let mut latch = Latch::new(tokens, now());
    let mut bufs = [vec![0u8; 65536], vec![0u8; 65536]];
    let mut forwarded = 0u64;
    let mut check = tokio::time::interval(idle / 4);
    loop {
        let [buf0, buf1] = &mut bufs;
        let (side, len, src) = tokio::select! {
            r = sockets[0].recv_from(buf0) => match r { Ok((n, src)) => (0, n, src), Err(_) => continue },
            r = sockets[1].recv_from(buf1) => match r { Ok((n, src)) => (1, n, src), Err(_) => continue },
            _ = check.tick() => {
                if latch.expired(now(), idle) {
                    debug!(forwarded, "relay allocation expired");
                    return forwarded;
                }
                continue;
            }
            () = cancel.cancelled() => return forwarded,
        };
        match latch.on_packet(side, src, &bufs[side][..len], now()) {
            Action::Forward { dest } => {
                forwarded += 1;
                // UDP: a full socket buffer drops the packet, as the network would.
                let _ = sockets[1 - side].try_send_to(&bufs[side][..len], dest);
            }
            Action::Latched => info!(side, %src, "relay side bound"),
            Action::Drop => {}
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
        let mut l = Latch::new(tokens, t0);
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
        let mut l = Latch::new(tokens, t0);
        l.on_packet(0, addr(1), &relay_bind_packet(&tokens[0]), t0);
        l.on_packet(1, addr(2), &relay_bind_packet(&tokens[1]), t0);
        let t1 = t0 + Duration::from_secs(20);
        l.on_packet(0, addr(1), b"keepalive", t1);
        assert!(!l.expired(t0 + Duration::from_secs(40), idle));
        assert!(l.expired(t1 + idle, idle));
        // Dropped packets do not keep it alive.
        l.on_packet(0, addr(9), b"noise", t1 + Duration::from_secs(29));
        assert!(l.expired(t1 + idle, idle));
    }
}
