//! Rates and token buckets, pure: the rendezvous's limits per address and the relay's byte
//! cap. Time is a parameter.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// A rate: `count` events per `per`, with bursts of up to `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    pub const fn per_minute(count: u32) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(60),
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.per.as_secs() {
            1 => write!(f, "{}/s", self.count),
            60 => write!(f, "{}/min", self.count),
            3600 => write!(f, "{}/h", self.count),
            _ => write!(f, "{}/{:?}", self.count, self.per),
        }
    }
}

impl FromStr for Rate {
    type Err = String;

    /// `N/s`, `N/min` or `N/h`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid rate {s:?}: expected N/s, N/min or N/h, e.g. 60/min");
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "min" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(format!("invalid rate {s:?}: 0 would refuse everything"));
        }
        Ok(Rate { count, per })
    }
}

/// A token bucket holding up to `rate.count` tokens, refilled continuously.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            tokens: rate.count as f64,
            last: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        let per_sec = rate.count as f64 / rate.per.as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_sec).min(rate.count as f64);
        self.last = now;
    }

    /// Takes `n` tokens if there are that many.
    pub fn take(&mut self, n: f64, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    pub fn is_full(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        self.tokens >= rate.count as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_print() {
        for text in ["60/min", "10/s", "1000/h"] {
            assert_eq!(text.parse::<Rate>().unwrap().to_string(), text);
        }
        for bad in ["60", "0/s", "x/s", "5/day", "-1/s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bucket_refills_continuously_up_to_its_size() {
        let t0 = Instant::now();
        let rate = Rate {
            count: 100,
            per: Duration::from_secs(1),
        };
        let mut b = Bucket::full(rate, t0);
        assert!(b.take(100.0, rate, t0));
        assert!(!b.take(1.0, rate, t0));
        assert!(b.take(50.0, rate, t0 + Duration::from_millis(500)));
        assert!(b.is_full(rate, t0 + Duration::from_secs(60)));
        assert!(
            !b.take(101.0, rate, t0 + Duration::from_secs(60)),
            "never over its size"
        );
    }
}
