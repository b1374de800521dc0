//! Hole punching as pure state machines with time as input: when to send punch packets and
//! relay binds, and which path a session should use.

use std::time::{Duration, Instant};

/// The punch schedule lives with the path layer, whose pings to new paths are punches too.
pub use crate::multipath::schedule::PunchSchedule;

/// Chooses among connection attempts: direct candidates first; the relay only once the
/// direct deadline passed without a direct success; while relayed, a retry to go direct
/// every `retry`.
#[derive(Debug, Clone)]
pub struct PathChoice {
    started: Instant,
    direct_deadline: Duration,
    relay_started: bool,
}

impl PathChoice {
    pub fn new(started: Instant, direct_deadline: Duration) -> Self {
        PathChoice {
            started,
            direct_deadline,
            relay_started: false,
        }
    }

    /// Whether to start the relayed attempt now (once).
    pub fn start_relay(&mut self, now: Instant, relay_available: bool) -> bool {
        if self.relay_started || !relay_available || now < self.started + self.direct_deadline {
            return false;
        }
        self.relay_started = true;
        true
    }

    /// When the relayed attempt is due, if it has not started.
    pub fn relay_deadline(&self) -> Option<Instant> {
        (!self.relay_started).then(|| self.started + self.direct_deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_starts_once_at_the_direct_deadline() {
        let t0 = Instant::now();
        let mut c = PathChoice::new(t0, Duration::from_millis(800));
        assert_eq!(c.relay_deadline(), Some(t0 + Duration::from_millis(800)));
        assert!(!c.start_relay(t0 + Duration::from_millis(799), true));
        assert!(
            !c.start_relay(t0 + Duration::from_secs(1), false),
            "no relay granted"
        );
        assert!(c.start_relay(t0 + Duration::from_secs(1), true));
        assert!(
            !c.start_relay(t0 + Duration::from_secs(2), true),
            "only once"
        );
        assert_eq!(c.relay_deadline(), None);
    }
}
