//! The rendezvous's limits, pure: token buckets per source address, and counts held against a
//! cap. Time is a parameter; nothing here reads a clock.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::Instant;

pub use crate::time::rate::{Bucket, Rate};

/// What a rate limit says of one more event from an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Over the rate. `first` for the first refusal since the address was last allowed: the
    /// one worth a log line (a flood is logged once, not per packet).
    Refused {
        first: bool,
    },
}

/// Addresses tracked at most; beyond it, addresses whose bucket is full again are forgotten
/// (they would start full anyway), so the map cannot grow without end.
const MAX_TRACKED: usize = 16_384;

/// One token bucket per source address.
#[derive(Debug)]
pub struct PerAddress {
    rate: Rate,
    buckets: HashMap<IpAddr, (Bucket, bool)>,
}

impl PerAddress {
    pub fn new(rate: Rate) -> Self {
        PerAddress {
            rate,
            buckets: HashMap::new(),
        }
    }

    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Verdict {
        if self.buckets.len() >= MAX_TRACKED && !self.buckets.contains_key(&ip) {
            let rate = self.rate;
            self.buckets.retain(|_, (b, _)| !b.is_full(rate, now));
        }
        let (bucket, refused) = self
            .buckets
            .entry(ip)
            .or_insert_with(|| (Bucket::full(self.rate, now), false));
        if bucket.take(1.0, self.rate, now) {
            *refused = false;
            Verdict::Allowed
        } else {
            let first = !*refused;
            *refused = true;
            Verdict::Refused { first }
        }
    }

    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

/// Counts of things held per key (relays per identity, registrations per address), each
/// under a cap.
#[derive(Debug)]
pub struct Counts<K: Hash + Eq>(HashMap<K, usize>);

impl<K: Hash + Eq> Default for Counts<K> {
    fn default() -> Self {
        Counts(HashMap::new())
    }
}

impl<K: Hash + Eq + Copy> Counts<K> {
    pub fn get(&self, k: &K) -> usize {
        self.0.get(k).copied().unwrap_or(0)
    }

    pub fn add(&mut self, k: K) {
        *self.0.entry(k).or_default() += 1;
    }

    pub fn remove(&mut self, k: &K) {
        if let Some(n) = self.0.get_mut(k) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(k);
            }
        }
    }

    /// Keys with a count above zero.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let rate = Rate::per_minute(6); // one every 10 s
        let ip: IpAddr = [203, 0, 113, 7].into();
        let mut limit = PerAddress::new(rate);
        for _ in 0..6 {
            assert_eq!(limit.check(ip, t0), Verdict::Allowed);
        }
        assert_eq!(limit.check(ip, t0), Verdict::Refused { first: true });
        assert_eq!(
            limit.check(ip, t0 + Duration::from_secs(5)),
            Verdict::Refused { first: false },
            "a flood is logged once"
        );
        assert_eq!(
            limit.check(ip, t0 + Duration::from_secs(10)),
            Verdict::Allowed
        );
        assert_eq!(
            limit.check(ip, t0 + Duration::from_secs(10)),
            Verdict::Refused { first: true },
            "a new episode after an allowed event"
        );
        // Another address has its own bucket.
        let other: IpAddr = [198, 51, 100, 7].into();
        assert_eq!(limit.check(other, t0), Verdict::Allowed);
    }

    #[test]
    fn the_map_of_addresses_stays_bounded() {
        let t0 = Instant::now();
        let mut limit = PerAddress::new(Rate::per_minute(60));
        for i in 0..(MAX_TRACKED as u32 + 10) {
            let ip: IpAddr = std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | i as u128).into();
            // Each address's one event is refilled a second later.
            limit.check(ip, t0 + Duration::from_secs(i as u64 / 1000));
        }
        assert!(limit.tracked() <= MAX_TRACKED, "{}", limit.tracked());
    }

    #[test]
    fn counts_go_back_to_nothing() {
        let mut c = Counts::default();
        c.add(1u8);
        c.add(1u8);
        c.remove(&1);
        assert_eq!(c.get(&1), 1);
        c.remove(&1);
        c.remove(&1);
        assert!(c.is_empty());
    }
}
