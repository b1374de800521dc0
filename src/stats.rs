//! Live counters of a node: connections and streams, for logs, the drain at shutdown and tests
//! that check every resource is released.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// A count of live things that can be awaited (e.g. "until zero"). Each [`GaugeGuard`] holds
/// one unit and gives it back when dropped, so a count cannot leak on an early return.
#[derive(Debug, Clone)]
pub struct Gauge(Arc<watch::Sender<usize>>);

impl Default for Gauge {
    fn default() -> Self {
        Gauge(Arc::new(watch::Sender::new(0)))
    }
}

impl Gauge {
    pub fn get(&self) -> usize {
        *self.0.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.0.subscribe()
    }

    /// Adds one until the guard is dropped.
    pub fn hold(&self) -> GaugeGuard {
        self.0.send_modify(|n| *n += 1);
        GaugeGuard(self.clone())
    }

    /// Waits until `pred` holds for the count, at most `limit`. Returns whether it held.
    pub async fn wait_for(&self, limit: Duration, pred: impl FnMut(&usize) -> bool) -> bool {
        let mut rx = self.0.subscribe();
        let waited = tokio::time::timeout(limit, rx.wait_for(pred)).await;
        waited.is_ok()
    }
}

#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0 .0.send_modify(|n| *n -= 1);
    }
}

/// A count that only goes up (events: packets sent, repaired...).
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The counters of one node (one QUIC endpoint), shared by every role it plays.
#[derive(Debug, Default)]
pub struct Stats {
    /// QUIC connections up now, either direction.
    pub connections: Gauge,
    /// Proxied streams alive now, either role.
    pub streams: Gauge,
    /// RTSP sessions with UDP media carried as datagrams, alive now.
    pub rtsp_sessions: Gauge,
    /// Media flows (a UDP port pair each) alive now.
    pub media_flows: Gauge,
    /// QUIC connections ever established (handshake done), either direction.
    pub connections_opened: AtomicU64,
    /// Streams ever opened or accepted.
    pub streams_opened: AtomicU64,
    /// Media packets (RTP and RTCP) this node sent as QUIC datagrams.
    pub media_datagrams: Counter,
    /// Media packets this node sent on a flow's overflow stream (larger than a datagram).
    pub media_overflow: Counter,
    /// RTP packets this node asked the other peer to resend (loss repair).
    pub rtp_requested: Counter,
    /// RTP packets this node resent when asked.
    pub rtp_resent: Counter,
    /// Gaps in received RTP that a later packet filled (a resent, rebuilt or late one).
    pub rtp_repaired: Counter,
    /// Parity packets (FEC) this node sent.
    pub rtp_parities: Counter,
    /// Lost RTP packets this node rebuilt from a parity.
    pub rtp_rebuilt: Counter,
    /// Relay allocations of this node's rendezvous role alive now.
    pub relays: Gauge,
    /// Requests this node's rendezvous role refused (registrations, introductions, relays).
    pub rendezvous_refused: Counter,
    /// Peers registered with this node's rendezvous role now.
    pub rendezvous_peers: std::sync::atomic::AtomicUsize,
}

impl Stats {
    pub fn connections_opened(&self) -> u64 {
        self.connections_opened.load(Ordering::Relaxed)
    }

    pub fn streams_opened(&self) -> u64 {
        self.streams_opened.load(Ordering::Relaxed)
    }

    pub(crate) fn connection(&self) -> GaugeGuard {
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        self.connections.hold()
    }

    pub(crate) fn stream(&self) -> GaugeGuard {
        self.streams_opened.fetch_add(1, Ordering::Relaxed);
        self.streams.hold()
    }
}
