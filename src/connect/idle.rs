//! The idle grace timer of a connection, as a pure state machine with time as input.
//!
//! A connection with no open stream stays up for a grace period, so a client that reconnects
//! (VLC does, often) finds it still there. The driver reports streams opening and ending and
//! asks for the deadline; it closes the connection when [`IdleGrace::expired`] says so.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct IdleGrace {
    grace: Duration,
    active: usize,
    /// When the stream count last fell to zero (or the connection came up with none).
    idle_since: Option<Instant>,
}

impl IdleGrace {
    /// A connection that came up at `now` with no stream yet.
    pub fn new(grace: Duration, now: Instant) -> Self {
        IdleGrace {
            grace,
            active: 0,
            idle_since: Some(now),
        }
    }

    /// A stream began.
    pub fn stream_opened(&mut self) {
        self.active += 1;
        self.idle_since = None;
    }

    /// A stream ended at `now`.
    pub fn stream_ended(&mut self, now: Instant) {
        debug_assert!(self.active > 0, "stream_ended without stream_opened");
        self.active = self.active.saturating_sub(1);
        if self.active == 0 {
            self.idle_since = Some(now);
        }
    }

    pub fn active(&self) -> usize {
        self.active
    }

    /// When the connection should close if nothing happens, or `None` while streams are open.
    pub fn deadline(&self) -> Option<Instant> {
        self.idle_since.map(|t| t + self.grace)
    }

    /// Whether the grace period has run out at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(30);

    #[test]
    fn a_fresh_connection_with_no_stream_expires_after_the_grace() {
        let t0 = Instant::now();
        let g = IdleGrace::new(GRACE, t0);
        assert_eq!(g.deadline(), Some(t0 + GRACE));
        assert!(!g.expired(t0 + GRACE - Duration::from_millis(1)));
        assert!(g.expired(t0 + GRACE));
    }

    #[test]
    fn open_streams_hold_the_connection_and_the_last_end_starts_the_grace() {
        let t0 = Instant::now();
        let mut g = IdleGrace::new(GRACE, t0);
        g.stream_opened();
        g.stream_opened();
        assert_eq!(g.deadline(), None);
        assert!(!g.expired(t0 + GRACE * 10));
        g.stream_ended(t0 + Duration::from_secs(5));
        assert_eq!(g.deadline(), None, "one stream is still open");
        let t_last = t0 + Duration::from_secs(100);
        g.stream_ended(t_last);
        assert_eq!(g.active(), 0);
        assert_eq!(g.deadline(), Some(t_last + GRACE));
    }

    #[test]
    fn a_stream_inside_the_grace_cancels_it_and_a_later_end_restarts_it() {
        let t0 = Instant::now();
        let mut g = IdleGrace::new(GRACE, t0);
        g.stream_opened();
        g.stream_ended(t0);
        g.stream_opened(); // reuse inside the grace
        assert!(!g.expired(t0 + GRACE * 2));
        let t1 = t0 + Duration::from_secs(40);
        g.stream_ended(t1);
        assert!(!g.expired(t0 + GRACE));
        assert!(g.expired(t1 + GRACE));
    }
}
