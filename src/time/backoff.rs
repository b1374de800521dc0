//! Reconnect backoff as a pure state machine: exponential from `min` to `max`, reset by a
//! success. The driver asks for the next delay after each failure.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt, after a failure; doubles up to `max`.
    pub fn failed(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// An attempt succeeded: the next failure waits `min` again.
    pub fn succeeded(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets_on_success() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
        let delays: Vec<_> = (0..6).map(|_| b.failed().as_millis()).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 4000, 4000]);
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_millis(500));
    }
}
