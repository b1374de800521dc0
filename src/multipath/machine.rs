//! The paths of one connection, as a pure state machine: events and `now` in, actions and the
//! next deadline out. No sockets, no clock (the driver, `multipath::driver`, owns them).
//!
//! A connection has one *active* path, where the socket layer sends its QUIC packets, and
//! any number of others: the relay, the peer's candidates from the introduction, and
//! addresses the peer's pings came from (peer-reflexive). Every path is probed:
//! - a path not yet confirmed is pinged on the punch schedule (every 50 ms for a second,
//!   then every 250 ms up to 3 s): the pings are punches too;
//! - a confirmed path (a pong came back on it) is pinged every [`PROBE_EVERY`]; a relay
//!   path's ping goes behind a relay bind, so a relay side follows a NAT that rebound.
//!
//! The switch rule: a path is *alive* while its last pong is at most [`DEAD_AFTER`] old.
//! A direct path that is alive beats the relay; among direct paths the active one stays
//! while it is alive, else the lowest RTT wins. When nothing is alive the active path stays
//! (quinn's idle timeout decides that the connection is gone). So a relayed connection moves
//! to the direct path within a round trip of the first pong there, and a dead direct path
//! hands over to the relay within `DEAD_AFTER` plus a probe interval.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::path::Path;
use super::schedule::PunchSchedule;
use crate::protocol::probe::Probe;

/// How often a confirmed path is pinged.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A path whose last pong is older than this is dead.
pub const DEAD_AFTER: Duration = Duration::from_millis(3_000);
/// A confirmed direct path dead this long is forgotten (the relay never is).
const FORGET_AFTER: Duration = Duration::from_secs(30);
/// Pings remembered per path (a pong echoes one of them).
const OUTSTANDING: usize = 8;
/// Paths a connection keeps at most (candidates and peer-reflexive addresses).
const MAX_PATHS: usize = 16;

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this packet to `to` from the connection's socket.
    Send { to: SocketAddr, packet: Vec<u8> },
    /// The active path changed: the socket layer now sends there. Logged once.
    Switched {
        from: Path,
        to: Path,
        from_rtt: Option<Duration>,
        to_rtt: Option<Duration>,
    },
}

/// One path as the status shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PathView {
    pub path: Path,
    pub active: bool,
    pub alive: bool,
    pub rtt: Option<Duration>,
    pub pongs: u64,
}

#[derive(Debug)]
struct Entry {
    path: Path,
    /// A relay side's bind token (sent before each ping).
    token: Option<[u8; 16]>,
    /// Pings sent and not answered yet: (nonce, when).
    sent: VecDeque<(u64, Instant)>,
    last_pong: Option<Instant>,
    rtt: Option<Duration>,
    pongs: u64,
    /// While unconfirmed: the punch schedule of its pings.
    trying: Option<PunchSchedule>,
    next_ping: Option<Instant>,
}

impl Entry {
    fn new(path: Path, token: Option<[u8; 16]>, now: Instant) -> Self {
        Entry {
            path,
            token,
            sent: VecDeque::new(),
            last_pong: None,
            rtt: None,
            pongs: 0,
            trying: Some(PunchSchedule::new(now)),
            next_ping: None,
        }
    }

    fn alive(&self, now: Instant) -> bool {
        self.last_pong
            .is_some_and(|t| now.saturating_duration_since(t) <= DEAD_AFTER)
    }

    fn deadline(&self) -> Option<Instant> {
        match &self.trying {
            Some(s) => s.next_deadline(),
            None => self.next_ping,
        }
    }
}

/// The paths of one connection.
#[derive(Debug)]
pub struct PathSet {
    tag: [u8; 16],
    /// `--force-relay`: no path but the ones given, and no answer on any other address.
    fixed: bool,
    entries: Vec<Entry>,
    active: usize,
    next_nonce: u64,
}

impl PathSet {
    /// A connection whose handshake just completed on `active` (alive now).
    pub fn new(tag: [u8; 16], active: Path, token: Option<[u8; 16]>, now: Instant) -> Self {
        let mut first = Entry::new(active, token, now);
        first.trying = None;
        first.last_pong = Some(now);
        first.next_ping = Some(now + PROBE_EVERY);
        PathSet {
            tag,
            fixed: false,
            entries: vec![first],
            active: 0,
            // Different per connection, so a pong to an older connection's ping never matches.
            next_nonce: Probe::first_nonce(&tag),
        }
    }

    /// Keeps to the paths given (the relay, with `--force-relay`): a ping from any other
    /// address is not answered, so the peer finds no other path either.
    pub fn fixed(mut self) -> Self {
        self.fixed = true;
        self
    }

    pub fn tag(&self) -> &[u8; 16] {
        &self.tag
    }

    pub fn active(&self) -> Path {
        self.entries[self.active].path
    }

    /// Every address the peer's packets may come from on this connection.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.entries.iter().map(|e| e.path.addr())
    }

    pub fn view(&self, now: Instant) -> Vec<PathView> {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| PathView {
                path: e.path,
                active: i == self.active,
                alive: e.alive(now),
                rtt: e.rtt,
                pongs: e.pongs,
            })
            .collect()
    }

    /// Adds a path to try (a candidate from an introduction, or the relay), or tries a known
    /// one that is not alive again from the start of the punch schedule.
    pub fn add(&mut self, path: Path, token: Option<[u8; 16]>, now: Instant) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.path == path) {
            if token.is_some() {
                e.token = token;
            }
            if !e.alive(now) {
                e.trying = Some(PunchSchedule::new(now));
            }
            return;
        }
        if self.entries.len() >= MAX_PATHS {
            return;
        }
        self.entries.push(Entry::new(path, token, now));
    }

    /// A ping from `from` with our tag: answer it; an address we did not know is a path of
    /// the peer's (peer-reflexive), tried at once.
    pub fn on_ping(&mut self, from: SocketAddr, nonce: u64, now: Instant) -> Vec<Action> {
        if !self.entries.iter().any(|e| e.path.addr() == from) {
            if self.fixed {
                return Vec::new();
            }
            self.add(Path::Direct(from), None, now);
        }
        let pong = Probe::Pong {
            tag: self.tag,
            nonce,
        };
        vec![Action::Send {
            to: from,
            packet: pong.encode().to_vec(),
        }]
    }

    /// A pong from `from`: when it answers a ping sent there, the path is alive.
    pub fn on_pong(&mut self, from: SocketAddr, nonce: u64, now: Instant) -> Vec<Action> {
        let Some(e) = self.entries.iter_mut().find(|e| e.path.addr() == from) else {
            return Vec::new();
        };
        let Some(at) = e.sent.iter().position(|(n, _)| *n == nonce) else {
            return Vec::new();
        };
        let (_, sent) = e.sent.remove(at).expect("found");
        e.sent.retain(|(n, _)| *n > nonce);
        let sample = now.saturating_duration_since(sent);
        e.rtt = Some(match e.rtt {
            Some(rtt) => (rtt * 7 + sample) / 8,
            None => sample,
        });
        e.last_pong = Some(now);
        e.pongs += 1;
        if e.trying.take().is_some() {
            e.next_ping = Some(now + PROBE_EVERY);
        }
        self.choose(now)
    }

    /// Time passed: the pings due, and a switch if the active path died.
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        for e in &mut self.entries {
            let due = match &mut e.trying {
                Some(s) => {
                    if s.next_deadline().is_none() {
                        // Its schedule ended unanswered: probed again only when added again.
                        continue;
                    }
                    s.poll(now)
                }
                None => {
                    let due = e.next_ping.is_some_and(|t| now >= t);
                    if due {
                        e.next_ping = Some(now + PROBE_EVERY);
                    }
                    due
                }
            };
            if !due {
                continue;
            }
            if let (Path::Relay(addr), Some(token)) = (e.path, e.token) {
                out.push(Action::Send {
                    to: addr,
                    packet: crate::protocol::rendezvous::relay_bind_packet(&token),
                });
            }
            let nonce = self.next_nonce;
            self.next_nonce = self.next_nonce.wrapping_add(1);
            if e.sent.len() == OUTSTANDING {
                e.sent.pop_front();
            }
            e.sent.push_back((nonce, now));
            let ping = Probe::Ping {
                tag: self.tag,
                nonce,
            };
            out.push(Action::Send {
                to: e.path.addr(),
                packet: ping.encode().to_vec(),
            });
        }
        // Forget confirmed direct paths long dead (never the active one or the relay).
        let active_path = self.entries[self.active].path;
        self.entries.retain(|e| {
            e.path == active_path
                || e.path.is_relay()
                || e.trying
                    .as_ref()
                    .is_some_and(|s| s.next_deadline().is_some())
                || e.last_pong
                    .is_some_and(|t| now.saturating_duration_since(t) < FORGET_AFTER)
        });
        self.active = self
            .entries
            .iter()
            .position(|e| e.path == active_path)
            .expect("the active path is kept");
        out.extend(self.choose(now));
        out
    }

    /// When [`poll`](Self::poll) has something to do next.
    pub fn next_deadline(&self) -> Option<Instant> {
        let pings = self.entries.iter().filter_map(Entry::deadline);
        // The active path's death is a deadline too.
        let death = self.entries[self.active]
            .last_pong
            .map(|t| t + DEAD_AFTER + Duration::from_millis(1));
        pings.chain(death).min()
    }

    fn choose(&mut self, now: Instant) -> Vec<Action> {
        let current = &self.entries[self.active];
        let current_ok = current.alive(now) && !current.path.is_relay();
        if current_ok {
            return Vec::new();
        }
        let best = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.alive(now))
            .min_by_key(|(_, e)| (e.path.is_relay(), e.rtt.unwrap_or(Duration::MAX)))
            .map(|(i, _)| i);
        match best {
            Some(i) if i != self.active => {
                let from = &self.entries[self.active];
                let to = &self.entries[i];
                // A relay that is alive is left only for a direct path.
                if from.alive(now) && to.path.is_relay() {
                    return Vec::new();
                }
                let action = Action::Switched {
                    from: from.path,
                    to: to.path,
                    from_rtt: from.rtt,
                    to_rtt: to.rtt,
                };
                self.active = i;
                vec![action]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 7], port))
    }

    const TAG: [u8; 16] = [9; 16];
    const TOKEN: [u8; 16] = [5; 16];

    fn pings(actions: &[Action]) -> Vec<(SocketAddr, u64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { to, packet } => match Probe::parse(packet) {
                    Some(Probe::Ping { nonce, .. }) => Some((*to, nonce)),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    fn switches(actions: &[Action]) -> Vec<(Path, Path)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Switched { from, to, .. } => Some((*from, *to)),
                _ => None,
            })
            .collect()
    }

    /// Runs the machine from `from` to `to` (1 ms steps), answering every ping to an address
    /// in `answering` after `rtt`; returns every action.
    fn run(
        s: &mut PathSet,
        from: Instant,
        to: Instant,
        answering: &[SocketAddr],
        rtt: Duration,
    ) -> Vec<Action> {
        let mut all = Vec::new();
        let mut pending: Vec<(Instant, SocketAddr, u64)> = Vec::new();
        let mut now = from;
        while now <= to {
            pending.sort_by_key(|p| p.0);
            while pending.first().is_some_and(|p| p.0 <= now) {
                let (_, a, n) = pending.remove(0);
                all.extend(s.on_pong(a, n, now));
            }
            if s.next_deadline().is_some_and(|d| d <= now) {
                let out = s.poll(now);
                for (a, n) in pings(&out) {
                    if answering.contains(&a) {
                        pending.push((now + rtt, a, n));
                    }
                }
                all.extend(out);
            }
            now += Duration::from_millis(1);
        }
        all
    }

    #[test]
    fn a_relayed_connection_moves_to_the_first_direct_path_that_answers() {
        let t0 = Instant::now();
        let relay = Path::Relay(addr(40_000));
        let mut s = PathSet::new(TAG, relay, Some(TOKEN), t0);
        s.add(Path::Direct(addr(1)), None, t0);
        s.add(Path::Direct(addr(2)), None, t0);
        let ms = Duration::from_millis;
        // Nothing answers on the direct candidates for 2 s: relayed, punched on schedule.
        let out = run(&mut s, t0, t0 + ms(2000), &[addr(40_000)], ms(30));
        assert!(switches(&out).is_empty());
        assert_eq!(s.active(), relay);
        let to_1 = pings(&out).iter().filter(|(a, _)| *a == addr(1)).count();
        assert_eq!(to_1, 21 + 4, "the punch schedule's rounds up to 2 s");
        // The relay is pinged every second behind its bind.
        let binds = out
            .iter()
            .filter(|a| matches!(a, Action::Send { packet, .. } if packet.starts_with(crate::protocol::rendezvous::RELAY_BIND_PREFIX)))
            .count();
        assert_eq!(binds, 2);
        // Candidate 2 answers from now on: the switch comes one round trip after its next ping.
        let out = run(
            &mut s,
            t0 + ms(2001),
            t0 + ms(2600),
            &[addr(2), addr(40_000)],
            ms(10),
        );
        assert_eq!(switches(&out), vec![(relay, Path::Direct(addr(2)))]);
        assert_eq!(s.active(), Path::Direct(addr(2)));
        let at = out
            .iter()
            .position(|a| matches!(a, Action::Switched { .. }))
            .unwrap();
        assert!(matches!(&out[at], Action::Switched { to_rtt: Some(r), .. } if *r == ms(10)));
        // Confirmed: pinged once a second, not on the punch schedule any more.
        let out = run(
            &mut s,
            t0 + ms(2601),
            t0 + ms(5600),
            &[addr(2), addr(40_000)],
            ms(10),
        );
        let to_2 = pings(&out).iter().filter(|(a, _)| *a == addr(2)).count();
        assert_eq!(to_2, 3);
        assert!(switches(&out).is_empty(), "it stays while it answers");
        // Candidate 1's schedule ended unanswered at 3 s: no more pings to it.
        let after = run(
            &mut s,
            t0 + ms(5601),
            t0 + ms(9000),
            &[addr(2), addr(40_000)],
            ms(10),
        );
        assert!(pings(&after).iter().all(|(a, _)| *a != addr(1)));
    }

    #[test]
    fn a_dead_direct_path_hands_over_to_the_relay_within_the_dead_time_and_comes_back() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let direct = Path::Direct(addr(1));
        let relay = Path::Relay(addr(40_000));
        let mut s = PathSet::new(TAG, direct, None, t0);
        s.add(relay, Some(TOKEN), t0);
        let both = [addr(1), addr(40_000)];
        let out = run(&mut s, t0, t0 + ms(5000), &both, ms(5));
        assert!(switches(&out).is_empty());
        // The direct path stops answering at 5 s.
        let out = run(
            &mut s,
            t0 + ms(5001),
            t0 + ms(12_000),
            &[addr(40_000)],
            ms(5),
        );
        let at = out
            .iter()
            .position(|a| matches!(a, Action::Switched { .. }))
            .expect("a switch");
        assert_eq!(switches(&out), vec![(direct, relay)]);
        // Its last pong came at ~4.005 s: dead 3 s later, so the switch is before 5 s + 3 s.
        let pings_before = pings(&out[..at]).len();
        assert!(pings_before <= 8, "switched within {pings_before} pings");
        assert_eq!(s.active(), relay);
        // It answers again: back to direct.
        let out = run(&mut s, t0 + ms(12_001), t0 + ms(14_000), &both, ms(5));
        assert_eq!(switches(&out), vec![(relay, direct)]);
    }

    #[test]
    fn a_ping_from_a_new_address_is_answered_and_that_address_tried() {
        let t0 = Instant::now();
        let mut s = PathSet::new(TAG, Path::Relay(addr(40_000)), None, t0);
        let out = s.on_ping(addr(7), 77, t0);
        assert_eq!(
            out,
            vec![Action::Send {
                to: addr(7),
                packet: Probe::Pong {
                    tag: TAG,
                    nonce: 77
                }
                .encode()
                .to_vec()
            }]
        );
        let out = s.poll(t0);
        assert_eq!(pings(&out).iter().filter(|(a, _)| *a == addr(7)).count(), 1);
        // With the paths fixed (`--force-relay`), another address gets no answer.
        let mut fixed = PathSet::new(TAG, Path::Relay(addr(40_000)), None, t0).fixed();
        assert!(fixed.on_ping(addr(8), 1, t0).is_empty());
        assert_eq!(fixed.addrs().count(), 1);
        // A pong that echoes no ping of ours changes nothing.
        assert!(s.on_pong(addr(7), 12345, t0).is_empty());
        let (_, nonce) = pings(&out)[0];
        let out = s.on_pong(addr(7), nonce, t0 + Duration::from_millis(3));
        assert_eq!(switches(&out).len(), 1);
        assert_eq!(s.active(), Path::Direct(addr(7)));
    }

    #[test]
    fn among_direct_paths_the_active_one_stays_while_alive() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let lan = Path::Direct(addr(1));
        let mut s = PathSet::new(TAG, lan, None, t0);
        s.add(Path::Direct(addr(2)), None, t0);
        // The other answers faster, but the active one is alive: no flapping.
        let out = run(&mut s, t0, t0 + ms(4000), &[addr(1), addr(2)], ms(20));
        assert!(switches(&out).is_empty(), "{out:?}");
        assert!(s.view(t0 + ms(4000)).iter().all(|v| v.alive));
        // When nothing answers, whatever died last stays active: quinn's idle timeout
        // decides whether the connection is gone.
        run(&mut s, t0 + ms(4001), t0 + ms(7_500), &[], ms(20));
        let last = s.active();
        let out = run(&mut s, t0 + ms(7_501), t0 + ms(20_000), &[], ms(20));
        assert!(switches(&out).is_empty());
        assert_eq!(s.active(), last);
        assert!(s.view(t0 + ms(20_000)).iter().all(|v| !v.alive));
    }
}
