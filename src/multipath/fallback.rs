//! When a peer sends its rendezvous traffic over the TCP link instead of UDP, as a pure state
//! machine: events and `now` in, actions and the next deadline out (`nat::link` is the driver
//! that owns the TCP connection, the echo timer and the clock).
//!
//! - The registration's QUIC handshake got no answer for a second ([`Fallback::stalled`]): UDP
//!   may be blocked, so the link is opened (it costs one TCP connection; nothing moves onto it
//!   unless UDP stays silent).
//! - While the link is open, an echo request goes over UDP to the rendezvous every
//!   [`ECHO_EVERY`]. Traffic for the rendezvous host takes the link ([`Fallback::via_tcp`])
//!   while no echo reply came for [`UDP_DEAD_AFTER`], and UDP again from the first reply: a
//!   network that lets UDP through again gets it back within a second.
//! - UDP answering for [`CLOSE_AFTER`] in a row closes the link. A link that fails while it
//!   is needed is opened again after a backoff (1 s doubling to 10 s).

use std::time::{Duration, Instant};

/// How often an echo goes out over UDP while the link is open.
pub const ECHO_EVERY: Duration = Duration::from_secs(1);
/// No echo reply for this long: UDP to the rendezvous does not work.
pub const UDP_DEAD_AFTER: Duration = Duration::from_millis(3_500);
/// UDP working this long in a row: the link is closed.
pub const CLOSE_AFTER: Duration = Duration::from_secs(30);
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// What the driver must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Open the TCP link (report [`Fallback::link_up`] or [`Fallback::link_down`]).
    Open,
    /// Close the link.
    Close,
    /// Send an echo request over UDP to the rendezvous.
    Echo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Closed; opened again at `retry` if set.
    Down {
        retry: Option<Instant>,
    },
    Opening,
    Up,
}

#[derive(Debug)]
pub struct Fallback {
    link: Link,
    /// The last echo reply.
    last_reply: Option<Instant>,
    /// When UDP is declared dead unless another reply comes: a deadline until `poll` passes it.
    dead_at: Option<Instant>,
    /// Since when UDP has answered without a gap.
    udp_since: Option<Instant>,
    next_echo: Option<Instant>,
    backoff: Duration,
}

impl Default for Fallback {
    fn default() -> Self {
        Fallback {
            link: Link::Down { retry: None },
            last_reply: None,
            dead_at: None,
            udp_since: None,
            next_echo: None,
            backoff: RETRY_FIRST,
        }
    }
}

impl Fallback {
    /// Whether UDP to the rendezvous answered lately.
    fn udp_alive(&self, now: Instant) -> bool {
        self.last_reply
            .is_some_and(|t| now.saturating_duration_since(t) < UDP_DEAD_AFTER)
    }

    /// Whether traffic for the rendezvous host goes over the link now.
    pub fn via_tcp(&self, now: Instant) -> bool {
        self.link == Link::Up && !self.udp_alive(now)
    }

    /// Whether the link is open.
    pub fn is_up(&self) -> bool {
        self.link == Link::Up
    }

    /// The registration's handshake has had no answer for a while. With the link down, it
    /// is opened; with the link carrying the rendezvous's traffic, that link carries nothing
    /// (a TCP path that went silent): a new one replaces it.
    pub fn stalled(&mut self, now: Instant) -> Vec<Action> {
        if self.udp_alive(now) {
            return vec![];
        }
        match self.link {
            Link::Down { .. } | Link::Up => {
                self.link = Link::Opening;
                self.next_echo.get_or_insert(now);
                vec![Action::Open]
            }
            Link::Opening => vec![],
        }
    }

    pub fn link_up(&mut self, now: Instant) {
        self.link = Link::Up;
        self.backoff = RETRY_FIRST;
        self.next_echo.get_or_insert(now);
    }

    /// The link failed to open, or broke. It is opened again after the backoff while UDP
    /// does not answer.
    pub fn link_down(&mut self, now: Instant) {
        let retry = (!self.udp_alive(now)).then_some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
        self.link = Link::Down { retry };
        if retry.is_none() {
            self.next_echo = None;
        }
    }

    pub fn echo_reply(&mut self, now: Instant) {
        if !self.udp_alive(now) {
            self.udp_since = Some(now);
        }
        self.last_reply = Some(now);
        self.dead_at = Some(now + UDP_DEAD_AFTER);
    }

    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.udp_alive(now) {
            self.udp_since = None;
        }
        if self.dead_at.is_some_and(|d| now >= d) {
            self.dead_at = None;
        }
        match self.link {
            Link::Down { retry: Some(at) } if now >= at => {
                if self.udp_alive(now) {
                    self.link = Link::Down { retry: None };
                } else {
                    self.link = Link::Opening;
                    out.push(Action::Open);
                }
            }
            Link::Up if self.udp_since.is_some_and(|s| now >= s + CLOSE_AFTER) => {
                self.link = Link::Down { retry: None };
                self.next_echo = None;
                out.push(Action::Close);
            }
            _ => {}
        }
        let probing = !matches!(self.link, Link::Down { retry: None });
        if !probing {
            self.next_echo = None;
        } else if self.next_echo.is_none_or(|t| now >= t) {
            self.next_echo = Some(now + ECHO_EVERY);
            out.push(Action::Echo);
        }
        out
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        let retry = match self.link {
            Link::Down { retry } => retry,
            _ => None,
        };
        let dead = self.dead_at;
        let close = match self.link {
            Link::Up => self.udp_since.map(|s| s + CLOSE_AFTER),
            _ => None,
        };
        [self.next_echo, retry, dead, close]
            .into_iter()
            .flatten()
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A machine whose registration stalled at `t0` and whose link came up at once.
    fn on_the_link(t0: Instant) -> Fallback {
        let mut f = Fallback::default();
        f.stalled(t0);
        f.link_up(t0);
        f
    }

    /// Runs the machine from deadline to deadline until `until` (or until it has none),
    /// handing each action to `react`; every deadline after a poll must be ahead of it.
    /// Returns the actions and the time it stopped at.
    fn step(
        f: &mut Fallback,
        from: Instant,
        until: Instant,
        mut react: impl FnMut(&mut Fallback, Instant, Action),
    ) -> (Vec<(Instant, Action)>, Instant) {
        let mut t = from;
        let mut log = Vec::new();
        while t <= until {
            for a in f.poll(t) {
                log.push((t, a));
                react(f, t, a);
            }
            let Some(next) = f.next_deadline() else {
                break;
            };
            assert!(next > t, "a deadline in the past after poll({t:?}): {f:?}");
            t = next;
        }
        (log, t)
    }

    /// [`step`], answering echoes when `udp(t)` says UDP works then, the link up at once.
    fn run(
        f: &mut Fallback,
        from: Instant,
        until: Instant,
        udp: impl Fn(Instant) -> bool,
    ) -> Vec<(Instant, Action)> {
        step(f, from, until, |f, t, a| match a {
            Action::Echo if udp(t) => f.echo_reply(t + ms(5)),
            Action::Open => f.link_up(t + ms(10)),
            _ => {}
        })
        .0
    }

    #[test]
    fn blocked_udp_moves_to_the_link_and_back_when_udp_answers_then_closes_it() {
        let t0 = Instant::now();
        let mut f = Fallback::default();
        assert_eq!(f.poll(t0), vec![], "nothing while UDP is not known to fail");
        assert_eq!(f.stalled(t0), vec![Action::Open]);
        assert_eq!(f.stalled(t0 + ms(100)), vec![], "one open at a time");
        assert!(!f.via_tcp(t0), "not before the link is up");
        f.link_up(t0 + ms(50));
        assert!(
            f.via_tcp(t0 + ms(50)),
            "no echo reply yet: the link carries it"
        );
        let opened_udp = t0 + Duration::from_secs(20);
        let log = run(
            &mut f,
            t0 + ms(50),
            opened_udp + Duration::from_secs(40),
            |t| t >= opened_udp,
        );
        let echoes = log
            .iter()
            .filter(|(t, a)| *a == Action::Echo && *t < opened_udp);
        assert!(echoes.count() >= 19, "an echo a second while on the link");
        assert!(f.via_tcp(opened_udp - ms(1)) || !f.is_up());
        let closed = log.iter().find(|(_, a)| *a == Action::Close).unwrap().0;
        assert!(
            closed >= opened_udp + CLOSE_AFTER
                && closed <= opened_udp + CLOSE_AFTER + ECHO_EVERY * 2
        );
        assert!(!f.via_tcp(closed));
        assert!(
            !log.iter().any(|(t, a)| *a == Action::Echo && *t > closed),
            "no echo once closed"
        );
    }

    #[test]
    fn the_first_echo_reply_takes_udp_back_and_silence_returns_to_the_link() {
        let t0 = Instant::now();
        let mut f = on_the_link(t0);
        assert!(f.via_tcp(t0));
        f.echo_reply(t0 + ms(1000));
        assert!(!f.via_tcp(t0 + ms(1000)), "UDP again at the first reply");
        assert!(!f.via_tcp(t0 + ms(1000) + UDP_DEAD_AFTER - ms(1)));
        assert!(
            f.via_tcp(t0 + ms(1000) + UDP_DEAD_AFTER),
            "silent UDP: the link again"
        );
        assert_eq!(
            f.next_deadline()
                .map(|d| d <= t0 + ms(1000) + UDP_DEAD_AFTER),
            Some(true)
        );
    }

    #[test]
    fn a_broken_link_is_opened_again_with_backoff_while_udp_is_silent() {
        let t0 = Instant::now();
        let mut f = Fallback::default();
        f.stalled(t0);
        f.link_down(t0 + ms(100));
        assert!(!f.via_tcp(t0 + ms(100)));
        let mut opens = Vec::new();
        let (_, t) = step(
            &mut f,
            t0 + ms(100),
            t0 + Duration::from_secs(40),
            |f, t, a| {
                if a == Action::Open {
                    opens.push(t);
                    f.link_down(t);
                }
            },
        );
        let gaps: Vec<u64> = opens.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
        assert_eq!(&gaps[..4], &[2, 4, 8, 10], "doubling to 10 s: {gaps:?}");
        // UDP answers: no more attempts.
        f.echo_reply(t);
        f.poll(t + RETRY_MAX);
        assert!(f.poll(t + ms(1)).iter().all(|a| *a != Action::Open));
    }

    #[test]
    fn after_poll_no_deadline_is_in_the_past() {
        // UDP answered once, then went quiet for good, with the link closed and open.
        for open in [false, true] {
            let t0 = Instant::now();
            let mut f = match open {
                true => on_the_link(t0),
                false => Fallback::default(),
            };
            f.echo_reply(t0);
            let (_, t) = step(&mut f, t0, t0 + Duration::from_secs(200), |_, _, _| {});
            assert!(t >= t0 + UDP_DEAD_AFTER, "time moved on");
            assert_eq!(f.via_tcp(t), open);
        }
    }

    #[test]
    fn a_stall_on_a_link_that_carries_nothing_replaces_it() {
        let t0 = Instant::now();
        let mut f = on_the_link(t0);
        assert!(f.via_tcp(t0));
        assert_eq!(f.stalled(t0 + ms(12_000)), vec![Action::Open]);
        assert!(
            !f.via_tcp(t0 + ms(12_000)),
            "nothing over it until the new one is up"
        );
        assert_eq!(f.stalled(t0 + ms(12_100)), vec![], "one open at a time");
        f.link_up(t0 + ms(12_200));
        assert!(f.via_tcp(t0 + ms(12_200)));
    }

    #[test]
    fn a_stall_while_udp_answers_opens_nothing() {
        let t0 = Instant::now();
        let mut f = on_the_link(t0);
        f.echo_reply(t0);
        let log = run(&mut f, t0, t0 + CLOSE_AFTER + ms(2000), |_| true);
        assert!(log.iter().any(|(_, a)| *a == Action::Close));
        assert_eq!(
            f.stalled(t0 + CLOSE_AFTER + ms(2100)),
            vec![],
            "UDP answers: a slow handshake is not a block"
        );
    }
}
