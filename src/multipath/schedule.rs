//! When punch packets (and the path layer's pings to a path not yet confirmed) go out: a pure
//! schedule with time as input.

use std::time::{Duration, Instant};

/// When punch packets go out after the common start time: every 50 ms for the first second
/// (the peer's packets are expected within a round trip), then every 250 ms up to 3 s.
#[derive(Debug, Clone)]
pub struct PunchSchedule {
    start: Instant,
    sent: u32,
}

const FAST_ROUNDS: u32 = 20;
const FAST: Duration = Duration::from_millis(50);
const SLOW: Duration = Duration::from_millis(250);
const TOTAL: Duration = Duration::from_secs(3);

impl PunchSchedule {
    pub fn new(start: Instant) -> Self {
        PunchSchedule { start, sent: 0 }
    }

    fn due(&self, round: u32) -> Duration {
        if round <= FAST_ROUNDS {
            FAST * round
        } else {
            FAST * FAST_ROUNDS + SLOW * (round - FAST_ROUNDS)
        }
    }

    /// Whether a round of punches is due at `now` (and if so, counts it as sent).
    pub fn poll(&mut self, now: Instant) -> bool {
        let due = self.due(self.sent);
        if due > TOTAL || now < self.start + due {
            return false;
        }
        self.sent += 1;
        true
    }

    /// When the next round is due, or `None` once the schedule is over.
    pub fn next_deadline(&self) -> Option<Instant> {
        let due = self.due(self.sent);
        (due <= TOTAL).then(|| self.start + due)
    }

    /// Whether relay bind packets go out with the next round (ask before `poll` counts it):
    /// the first five rounds (a bind lost to the network is repeated within 250 ms).
    pub fn with_relay_bind(&self) -> bool {
        self.sent < 5
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punches_fast_then_slow_then_stop() {
        let t0 = Instant::now();
        let mut s = PunchSchedule::new(t0);
        let mut now = t0;
        let mut times = Vec::new();
        while let Some(deadline) = s.next_deadline() {
            now = now.max(deadline);
            assert!(s.poll(now));
            assert!(!s.poll(now), "one round per deadline");
            times.push(now.duration_since(t0).as_millis());
        }
        assert_eq!(&times[..3], &[0, 50, 100]);
        assert_eq!(times[FAST_ROUNDS as usize], 1000);
        assert_eq!(times[FAST_ROUNDS as usize + 1], 1250);
        assert_eq!(*times.last().unwrap(), 3000);
        assert_eq!(times.len(), 21 + 8);
        assert!(!s.poll(t0 + Duration::from_secs(60)));
    }

    #[test]
    fn relay_binds_go_with_the_first_five_rounds_only() {
        let t0 = Instant::now();
        let mut s = PunchSchedule::new(t0);
        let mut binds = 0;
        while let Some(at) = s.next_deadline() {
            let bind = s.with_relay_bind();
            assert!(s.poll(at));
            binds += usize::from(bind);
        }
        assert_eq!(binds, 5);
    }

    #[test]
    fn nothing_before_the_start_time() {
        let t0 = Instant::now();
        let mut s = PunchSchedule::new(t0 + Duration::from_millis(40));
        assert!(!s.poll(t0));
        assert!(s.with_relay_bind());
        assert!(s.poll(t0 + Duration::from_millis(40)));
    }
}
