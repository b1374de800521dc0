//! Interactive traffic goes ahead of bulk on a shared connection, as a pure state machine
//! with time as input. A stream that moves more than `bulk_bytes` within one `window` is bulk
//! and drops to a lower QUIC send priority; one that then stays under a tenth of that for a
//! whole window is interactive again. Quinn sends higher-priority streams' data first, so a
//! camera's frames and a web page's requests are not queued behind a large download.

use std::time::{Duration, Instant};

/// Send priority of interactive streams.
pub const INTERACTIVE: i32 = 0;
/// Send priority of bulk streams.
pub const BULK: i32 = -1;

#[derive(Debug, Clone)]
pub struct BulkDetector {
    window: Duration,
    bulk_bytes: u64,
    window_start: Instant,
    in_window: u64,
    priority: i32,
}

impl BulkDetector {
    pub fn new(now: Instant) -> Self {
        BulkDetector {
            window: Duration::from_secs(1),
            // 64 Mbit/s: far above any camera stream, far below a download on a LAN.
            bulk_bytes: 8 << 20,
            window_start: now,
            in_window: 0,
            priority: INTERACTIVE,
        }
    }

    /// `bytes` were sent at `now`; the new priority if it changed.
    pub fn sent(&mut self, bytes: u64, now: Instant) -> Option<i32> {
        if now.duration_since(self.window_start) >= self.window {
            let quiet = self.in_window < self.bulk_bytes / 10;
            self.window_start = now;
            self.in_window = 0;
            if quiet && self.priority == BULK {
                self.priority = INTERACTIVE;
                self.in_window = bytes;
                return Some(INTERACTIVE);
            }
        }
        self.in_window += bytes;
        if self.in_window > self.bulk_bytes && self.priority == INTERACTIVE {
            self.priority = BULK;
            return Some(BULK);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_camera_stream_stays_interactive() {
        let t0 = Instant::now();
        let mut d = BulkDetector::new(t0);
        // 8 Mbit/s in 25 frames a second, for a minute.
        for i in 0..1500u32 {
            assert_eq!(d.sent(40_000, t0 + MS * 40 * i), None);
        }
    }

    #[test]
    fn a_download_becomes_bulk_and_a_quiet_stream_comes_back() {
        let t0 = Instant::now();
        let mut d = BulkDetector::new(t0);
        let mut changes = Vec::new();
        // 256 KiB every 10 ms (200 Mbit/s) for 2 s.
        for i in 0..200u32 {
            if let Some(p) = d.sent(256 << 10, t0 + MS * 10 * i) {
                changes.push((i, p));
            }
        }
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].1, BULK);
        assert!(
            changes[0].0 < 40,
            "demoted within the first 400 ms: {changes:?}"
        );
        // Then a request now and then: interactive again after a quiet window.
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(
            d.sent(500, t1 + Duration::from_secs(1)),
            None,
            "the busy window ends"
        );
        assert_eq!(d.sent(500, t1 + Duration::from_secs(2)), Some(INTERACTIVE));
    }
}
