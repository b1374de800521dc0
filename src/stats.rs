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
    /// Each service's streams and bytes.
    pub services: Services,
    /// The RTSP connections alive now, with their media figures.
    pub rtsp: RtspList,
    /// Smoothed RTT of every live connection, sampled once a second.
    pub rtt: Histogram,
    /// Time to get a connection to a peer (a dial: handshake, punching or relay included).
    pub dial_time: Histogram,
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

/// A histogram over fixed upper bounds (seconds): one atomic per bucket, so observing takes
/// no lock. Read as Prometheus reads one: counts per bucket (the last is `+Inf`), the sum and
/// the count.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, then `+Inf`.
    counts: Box<[AtomicU64]>,
    /// The sum of every observation, in microseconds.
    sum_us: AtomicU64,
}

/// The bounds of time histograms (stream open, dial, RTT): 0.5 ms to 10 s.
pub const TIME_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(TIME_BOUNDS)
    }
}

/// What a histogram held when read.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound, observations in this bucket only)`; the last bound is `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl HistogramSnapshot {
    /// The upper bound of the bucket that holds quantile `q` (0..=1) of the observations;
    /// `None` when there are none.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bound, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return Some(*bound);
            }
        }
        self.buckets.last().map(|(b, _)| *b)
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
            sum: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// The figures of one service (per peer name on the connecting side): streams open now and
/// done, bytes each way, how long opens took.
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Streams open now.
    pub open: std::sync::atomic::AtomicUsize,
    /// Streams that ended cleanly, and ones that ended with an error.
    pub done: Counter,
    pub failed: Counter,
    /// Bytes of ended streams from the client toward the service, and back.
    pub bytes_up: Counter,
    pub bytes_down: Counter,
    /// HTTP responses forwarded (the connecting side's HTTP layer).
    pub requests: Counter,
    /// Time to open: on the exposing side from the stream's arrival to the service's
    /// socket connected and the answer sent.
    pub open_time: Histogram,
}

impl ServiceStats {
    /// Counts a stream as open until the returned use ends (or is dropped: failed).
    pub fn begin(self: &Arc<Self>) -> ServiceUse {
        self.open.fetch_add(1, Ordering::Relaxed);
        ServiceUse {
            stats: self.clone(),
            ended: false,
        }
    }
}

/// One stream of a service, counted open until it ends.
#[derive(Debug)]
pub struct ServiceUse {
    stats: Arc<ServiceStats>,
    ended: bool,
}

impl ServiceUse {
    pub fn stats(&self) -> &ServiceStats {
        &self.stats
    }

    /// The stream ended having moved `up` and `down` bytes; `ok`: cleanly.
    pub fn end(mut self, up: u64, down: u64, ok: bool) {
        self.stats.bytes_up.add(up);
        self.stats.bytes_down.add(down);
        if ok {
            self.stats.done.add(1);
        } else {
            self.stats.failed.add(1);
        }
        self.ended = true;
    }
}

impl Drop for ServiceUse {
    fn drop(&mut self) {
        if !self.ended {
            self.stats.failed.add(1);
        }
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Services kept apart at most; the rest are counted together as `other`.
const MAX_SERVICES: usize = 256;

/// The figures of each service, by (peer name, service); the peer is empty on the exposing
/// side. The lock is taken once per stream, never per packet.
#[derive(Debug, Default)]
pub struct Services(
    std::sync::Mutex<std::collections::BTreeMap<(String, String), Arc<ServiceStats>>>,
);

impl Services {
    pub fn get(&self, peer: &str, service: &str) -> Arc<ServiceStats> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = (peer.to_owned(), service.to_owned());
        if let Some(s) = map.get(&key) {
            return s.clone();
        }
        let key = if map.len() >= MAX_SERVICES {
            (String::new(), "other".to_owned())
        } else {
            key
        };
        map.entry(key).or_default().clone()
    }

    pub fn snapshot(&self) -> Vec<((String, String), Arc<ServiceStats>)> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// What one RTSP connection's media did (its flows count here as well as in [`Stats`]).
#[derive(Debug, Default)]
pub struct MediaCounters {
    /// Media packets sent to the other peer as datagrams, and on an overflow stream.
    pub datagrams_sent: Counter,
    pub overflow_sent: Counter,
    /// Media packets from the other peer delivered to the local socket.
    pub delivered: Counter,
    pub rtp_requested: Counter,
    pub rtp_resent: Counter,
    pub rtp_repaired: Counter,
    pub rtp_rebuilt: Counter,
}

/// One RTSP connection through this node, for status.
#[derive(Debug)]
pub struct RtspEntry {
    pub service: String,
    /// `client` when this node faces the player, `server` when it faces the camera.
    pub facing: &'static str,
    pub started: std::time::Instant,
    pub sessions: std::sync::atomic::AtomicUsize,
    pub flows: std::sync::atomic::AtomicUsize,
    pub media: Arc<MediaCounters>,
}

/// RTSP connections alive now, most recent last; the lock is taken when one starts or ends.
#[derive(Debug, Default)]
pub struct RtspList(Arc<std::sync::Mutex<Listed>>);

/// The last id given, and the entries by id.
type Listed = (u64, std::collections::BTreeMap<u64, Arc<RtspEntry>>);

/// An RTSP connection's place in the list; dropping it takes it out.
#[derive(Debug)]
pub struct RtspListed {
    list: RtspList,
    id: u64,
    pub entry: Arc<RtspEntry>,
}

impl RtspList {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, (u64, std::collections::BTreeMap<u64, Arc<RtspEntry>>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add(&self, service: &str, facing: &'static str) -> RtspListed {
        let entry = Arc::new(RtspEntry {
            service: service.to_owned(),
            facing,
            started: std::time::Instant::now(),
            sessions: Default::default(),
            flows: Default::default(),
            media: Arc::default(),
        });
        let mut list = self.lock();
        list.0 += 1;
        let id = list.0;
        list.1.insert(id, entry.clone());
        RtspListed {
            list: RtspList(self.0.clone()),
            id,
            entry,
        }
    }

    pub fn snapshot(&self) -> Vec<Arc<RtspEntry>> {
        self.lock().1.values().cloned().collect()
    }
}

impl Drop for RtspListed {
    fn drop(&mut self) {
        self.list.lock().1.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_observation_in_the_first_bucket_that_holds_it() {
        let h = Histogram::default();
        for ms in [0, 1, 2, 700, 60_000] {
            h.observe(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert!((s.sum - 60.703).abs() < 1e-9, "{}", s.sum);
        let n = |le: f64| s.buckets.iter().find(|(b, _)| *b == le).unwrap().1;
        assert_eq!((n(0.0005), n(0.001), n(0.0025), n(1.0)), (1, 1, 1, 1));
        assert_eq!(n(f64::INFINITY), 1);
        assert_eq!(s.quantile_bound(0.5), Some(0.0025));
        assert_eq!(s.quantile_bound(1.0), Some(f64::INFINITY));
        assert_eq!(Histogram::default().snapshot().quantile_bound(0.5), None);
    }

    #[test]
    fn a_service_use_dropped_before_it_ends_counts_as_failed_and_never_leaks_open() {
        let services = Services::default();
        let nas = services.get("home", "nas");
        let a = nas.begin();
        let b = nas.begin();
        assert_eq!(nas.open.load(Ordering::Relaxed), 2);
        a.end(10, 2000, true);
        drop(b);
        assert_eq!(nas.open.load(Ordering::Relaxed), 0);
        assert_eq!((nas.done.get(), nas.failed.get()), (1, 1));
        assert_eq!((nas.bytes_up.get(), nas.bytes_down.get()), (10, 2000));
        assert!(Arc::ptr_eq(&nas, &services.get("home", "nas")));
    }

    #[test]
    fn services_past_the_cap_are_counted_together() {
        let services = Services::default();
        for i in 0..MAX_SERVICES + 10 {
            services.get("", &format!("s{i}")).done.add(1);
        }
        let all = services.snapshot();
        assert_eq!(all.len(), MAX_SERVICES + 1);
        let other = all.iter().find(|((_, s), _)| s == "other").unwrap();
        assert_eq!(other.1.done.get(), 10);
    }

    #[test]
    fn an_rtsp_connection_is_listed_while_it_lives() {
        let list = RtspList::default();
        let a = list.add("cam", "client");
        let b = list.add("door", "server");
        assert_eq!(list.snapshot().len(), 2);
        drop(a);
        let left = list.snapshot();
        assert_eq!((left.len(), left[0].service.as_str()), (1, "door"));
        drop(b);
        assert!(list.snapshot().is_empty());
    }
}
