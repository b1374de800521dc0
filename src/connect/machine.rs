//! The connecting role's decisions for one remote peer, as a pure state machine in the
//! quinn-proto manner: events and `now` in, [`Action`]s and the next deadline
//! ([`Machine::poll_timeout`]) out. No sockets, no clock, no tasks: the driver
//! (`connect::driver`) owns the dials and connections, reads tokio's clock, and does what the
//! actions say.
//!
//! What it decides:
//! - when to dial (the first client, or at start with `eager`), and that clients arriving
//!   meanwhile queue behind that one dial, answered all at once when it ends or by its
//!   deadline (`connect_timeout`);
//! - to reuse an existing connection with the peer (one it dialled) and to move new streams to
//!   the peer table's preferred connection when that changes;
//! - relayed: to let the path layer (`multipath`) probe the introduction's candidates for
//!   [`DIRECT_LATER`], then to ask for a new introduction and punch again every
//!   [`UPGRADE_EVERY`]; when the path layer moves the connection to a direct path, its
//!   streams go with it, and when the direct path dies and the relay takes over, punching
//!   resumes;
//! - the idle grace: the connection closes once, when the grace after its last stream runs out
//!   (unless the peer still has streams on it);
//! - `eager`: redial with backoff when the connection is lost or a dial fails.
//!
//! Connections are the driver's handles `C`; leases carry the generation of the connection
//! they were granted on, so the end of a stream on a replaced connection changes nothing.

use std::time::{Duration, Instant};

use quinn::VarInt;

use super::idle::IdleGrace;
use super::ConnectError;
use crate::identity::PeerId;
use crate::protocol::close_code;
use crate::quic::path::Path;
use crate::time::backoff::Backoff;

/// Without a direct path by then, the relay is tried as well (inside one dial).
pub const DIRECT_DEADLINE: Duration = Duration::from_millis(600);
/// How long the path layer probes the candidates of a dial the relay won before the first
/// new introduction is due: the punch window (3 s) and a few probe intervals.
pub const DIRECT_LATER: Duration = Duration::from_secs(5);
/// While relayed, how often to try punching a direct path again.
pub const UPGRADE_EVERY: Duration = Duration::from_secs(10);
/// Reconnect backoff of an eager session.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What the machine needs to know about the session.
#[derive(Debug, Clone)]
pub struct Settings {
    pub peer: PeerId,
    /// The peer is dialled at an address (else through the rendezvous).
    pub by_address: bool,
    pub idle_grace: Duration,
    pub connect_timeout: Duration,
    pub eager: bool,
    pub force_relay: bool,
}

/// How a dial or an upgrade attempt ended.
pub type Outcome<T> = Result<T, ConnectError>;

/// A client waiting for the connection, named by the driver.
pub type WaiterId = u64;

/// A connection as the machine sees it.
#[derive(Debug, Clone)]
pub struct Conn<C> {
    /// Unique per connection (quinn's `stable_id`).
    pub id: usize,
    pub path: Path,
    /// This session dialled it (it closes it at shutdown); else it was adopted.
    pub dialled: bool,
    pub handle: C,
}

/// What a finished dial brought.
#[derive(Debug)]
pub struct Dialled<C> {
    pub conn: Conn<C>,
    /// The relay won and the dial's direct handshakes go on (the driver keeps them as the
    /// upgrade attempt, reported with [`Machine::upgraded`]).
    pub direct_later: bool,
}

/// What the driver must do after an event, in order.
pub type Actions<C> = Vec<Action<C>>;

/// One thing the driver must do.
#[derive(Debug)]
pub enum Action<C> {
    /// Start a dial (with the relay as a fallback); report it with [`Machine::dialled`].
    Dial,
    /// Drop the dial in flight: its deadline passed.
    CancelDial,
    /// Ask for a new introduction and punch for a direct path again (the path layer moves
    /// the connection when one answers); report it with [`Machine::upgraded`].
    Upgrade,
    /// Drop the upgrade attempt in flight.
    CancelUpgrade,
    /// Hand `waiter` this connection with a lease of `generation`.
    Grant {
        waiter: WaiterId,
        conn: C,
        generation: u64,
    },
    /// Tell `waiter` there is no connection for it.
    Fail {
        waiter: WaiterId,
        error: ConnectError,
    },
    /// Close this connection.
    Close {
        conn: C,
        code: VarInt,
        reason: &'static [u8],
    },
    /// Something worth a log line.
    Note(Note),
}

/// Decisions the driver logs.
#[derive(Debug, Clone)]
pub enum Note {
    /// New streams use another existing connection with the peer.
    Switched(Path),
    /// The live connection's packets take another path (its streams go on).
    PathChanged { now: Path, was: Path },
    /// The last stream ended; the grace starts.
    LastStreamEnded,
    /// The grace ran out.
    IdleClose,
    /// An attempt at a direct path failed; another comes in [`UPGRADE_EVERY`].
    StillRelayed(ConnectError),
}

struct Live<C> {
    conn: Conn<C>,
    grace: IdleGrace,
    generation: u64,
}

/// The decisions of one session.
pub struct Machine<C> {
    settings: Settings,
    live: Option<Live<C>>,
    generation: u64,
    waiters: Vec<WaiterId>,
    /// A dial is in flight until this deadline.
    dial_until: Option<Instant>,
    /// An upgrade attempt is in flight until this deadline.
    upgrade_until: Option<Instant>,
    upgrade_at: Option<Instant>,
    /// A new introduction is due although the connection is direct (this host's addresses
    /// changed).
    renew: bool,
    redial_at: Option<Instant>,
    backoff: Backoff,
    stopping: bool,
}

impl<C: Clone> Machine<C> {
    pub fn new(settings: Settings) -> Self {
        Machine {
            settings,
            live: None,
            generation: 0,
            waiters: Vec::new(),
            dial_until: None,
            upgrade_until: None,
            upgrade_at: None,
            renew: false,
            redial_at: None,
            backoff: Backoff::new(BACKOFF_MIN, BACKOFF_MAX),
            stopping: false,
        }
    }

    /// The session starts.
    pub fn start(&mut self, now: Instant) -> Actions<C> {
        let mut out = Vec::new();
        if self.settings.eager {
            self.dial(now, &mut out);
        }
        out
    }

    /// A client asks for the connection; `preferred` is the peer table's preferred connection
    /// with the peer now, used only when this session has none (so a driver may pass `None`
    /// while [`Machine::live`] is some).
    pub fn request(
        &mut self,
        now: Instant,
        waiter: WaiterId,
        preferred: Option<Conn<C>>,
    ) -> Actions<C> {
        let mut out = Vec::new();
        if self.live.is_none() {
            if let Some(conn) = preferred {
                self.adopt(now, conn);
            }
        }
        if let Some(grant) = self.grant(waiter) {
            out.push(grant);
        } else if self.stopping {
            out.push(Action::Fail {
                waiter,
                error: ConnectError::ShuttingDown,
            });
        } else {
            self.waiters.push(waiter);
            if self.dial_until.is_none() {
                self.redial_at = None;
                self.dial(now, &mut out);
            }
        }
        out
    }

    /// A stream granted with a lease of `generation` ended.
    pub fn stream_ended(&mut self, now: Instant, generation: u64) -> Actions<C> {
        let mut out = Vec::new();
        if let Some(l) = self.live.as_mut().filter(|l| l.generation == generation) {
            l.grace.stream_ended(now);
            if l.grace.active() == 0 && !self.settings.eager {
                out.push(Action::Note(Note::LastStreamEnded));
            }
        }
        out
    }

    /// The peer table changed; `preferred` is its preferred connection with the peer now.
    pub fn table_changed(&mut self, now: Instant, preferred: Option<Conn<C>>) -> Actions<C> {
        let mut out = Vec::new();
        if let (Some(l), Some(p)) = (&self.live, preferred) {
            if l.conn.id != p.id {
                out.push(Action::Note(Note::Switched(p.path)));
                self.adopt(now, p);
            }
        }
        out
    }

    /// The dial in flight ended.
    pub fn dialled(&mut self, now: Instant, result: Outcome<Dialled<C>>) -> Actions<C> {
        let mut out = Vec::new();
        if self.dial_until.take().is_none() {
            // Not ours (cancelled): a connection it made is not wanted.
            if let Ok(d) = result {
                out.push(close(d.conn.handle, b"not needed"));
            }
            return out;
        }
        match result {
            Ok(Dialled { conn, direct_later }) => {
                self.backoff.succeeded();
                let relayed = conn.path.is_relay();
                self.replace_live(now, conn);
                for waiter in std::mem::take(&mut self.waiters) {
                    out.extend(self.grant(waiter));
                }
                self.upgrade_at = None;
                if direct_later {
                    self.upgrade_until = Some(now + DIRECT_LATER);
                } else if relayed {
                    self.upgrade_at = Some(now + UPGRADE_EVERY);
                }
            }
            Err(error) => self.dial_failed(now, error, &mut out),
        }
        out
    }

    /// The upgrade attempt in flight ended: `Err` when the connection is still relayed.
    pub fn upgraded(&mut self, now: Instant, result: Outcome<()>) -> Actions<C> {
        let mut out = Vec::new();
        if self.upgrade_until.take().is_none() {
            return out;
        }
        if let Err(e) = result {
            out.push(Action::Note(Note::StillRelayed(e)));
            self.upgrade_at = Some(now + UPGRADE_EVERY);
        }
        out
    }

    /// The live connection `id` moved to `path` (the path layer switched: same connection,
    /// same streams). Relayed again (its direct path died): punching resumes.
    pub fn path_changed(&mut self, now: Instant, id: usize, path: Path) -> Actions<C> {
        let mut out = Vec::new();
        let Some(live) = self.live.as_mut().filter(|l| l.conn.id == id) else {
            return out;
        };
        if live.conn.path == path {
            return out;
        }
        let was = std::mem::replace(&mut live.conn.path, path);
        out.push(Action::Note(Note::PathChanged { now: path, was }));
        if path.is_relay() {
            if self.upgrade_until.is_none() && !self.settings.force_relay {
                self.upgrade_at = Some(now + UPGRADE_EVERY);
            }
        } else {
            self.upgrade_at = None;
            self.drop_upgrade(&mut out);
        }
        out
    }

    /// This host's addresses changed under the live connection (a new address on a laptop
    /// that changed network, UDP back after the TCP link): a new introduction and punch are
    /// due now, not at the next interval, relayed or not, so the peer learns (and punches
    /// toward) the new addresses before the old path's death is noticed. An attempt in
    /// flight, made with the old addresses, is dropped.
    pub fn network_changed(&mut self, now: Instant) -> Actions<C> {
        let mut out = Vec::new();
        if self.live.is_none() || self.settings.force_relay {
            return out;
        }
        if self.upgrade_until.take().is_some() {
            out.push(Action::CancelUpgrade);
        }
        self.renew = true;
        self.upgrade_at = Some(now);
        out
    }

    /// Connection `id` closed (lost, refused, or closed by either side).
    pub fn closed(&mut self, now: Instant, id: usize) -> Actions<C> {
        let mut out = Vec::new();
        if self.live.as_ref().is_none_or(|l| l.conn.id != id) {
            return out;
        }
        self.live = None;
        self.drop_upgrade(&mut out);
        if self.settings.eager && !self.stopping {
            self.redial_at = Some(now + self.backoff.failed());
        }
        out
    }

    /// The node stops accepting: no new dials.
    pub fn stop(&mut self) {
        self.stopping = true;
        self.redial_at = None;
    }

    /// Time passed: acts on every deadline at or before `now`. `busy` says whether a
    /// connection still carries streams (the peer's, when it dialled or exposes too).
    pub fn timeout(&mut self, now: Instant, busy: impl Fn(&C) -> bool) -> Actions<C> {
        let mut out = Vec::new();
        if self.dial_until.is_some_and(|d| now >= d) {
            self.dial_until = None;
            out.push(Action::CancelDial);
            let limit = self.settings.connect_timeout;
            let error = if self.settings.by_address {
                ConnectError::Timeout(limit)
            } else {
                ConnectError::NoPath {
                    peer: self.settings.peer,
                    limit,
                }
            };
            self.dial_failed(now, error, &mut out);
        }
        if self.upgrade_until.is_some_and(|d| now >= d) {
            self.upgrade_until = None;
            out.push(Action::CancelUpgrade);
            self.upgrade_at = Some(now + UPGRADE_EVERY);
        }
        if self.upgrade_at.is_some_and(|d| now >= d) && self.upgrade_until.is_none() {
            self.upgrade_at = None;
            let relayed = self.live.as_ref().is_some_and(|l| l.conn.path.is_relay());
            let renew = std::mem::take(&mut self.renew) && self.live.is_some();
            if (relayed || renew) && !self.settings.force_relay {
                self.upgrade_until = Some(now + self.settings.connect_timeout);
                out.push(Action::Upgrade);
            }
        }
        if let Some(deadline) = self.idle_deadline() {
            if now >= deadline {
                let l = self.live.as_mut().expect("a deadline needs a connection");
                if busy(&l.conn.handle) {
                    l.grace = IdleGrace::new(self.settings.idle_grace, now);
                } else {
                    let l = self.live.take().expect("checked");
                    out.push(Action::Note(Note::IdleClose));
                    out.push(Action::Close {
                        conn: l.conn.handle,
                        code: close_code::IDLE,
                        reason: b"idle",
                    });
                    self.drop_upgrade(&mut out);
                }
            }
        }
        if self.redial_at.is_some_and(|d| now >= d) {
            self.redial_at = None;
            if self.dial_until.is_none() && self.live.is_none() {
                self.dial(now, &mut out);
            }
        }
        out
    }

    /// The session ends (shutdown, or every handle dropped): a connection it dialled closes,
    /// every waiter is told.
    pub fn finish(&mut self) -> Actions<C> {
        let mut out = Vec::new();
        if let Some(l) = self.live.take() {
            if l.conn.dialled {
                out.push(Action::Close {
                    conn: l.conn.handle,
                    code: close_code::SHUTDOWN,
                    reason: b"shutting down",
                });
            }
        }
        for waiter in std::mem::take(&mut self.waiters) {
            out.push(Action::Fail {
                waiter,
                error: ConnectError::ShuttingDown,
            });
        }
        self.dial_until = None;
        self.upgrade_until = None;
        self.upgrade_at = None;
        self.redial_at = None;
        out
    }

    /// The next deadline [`Machine::timeout`] must see, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let upgrade_at = self.upgrade_at.filter(|_| self.upgrade_until.is_none());
        [
            self.dial_until,
            self.upgrade_until,
            upgrade_at,
            self.idle_deadline(),
            self.redial_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The path new streams take now, or `None` when there is no connection.
    pub fn path(&self) -> Option<Path> {
        self.live.as_ref().map(|l| l.conn.path)
    }

    /// The connection new streams use now (the driver watches it close).
    pub fn live(&self) -> Option<&Conn<C>> {
        self.live.as_ref().map(|l| &l.conn)
    }

    /// Whether the node stopped accepting ([`Machine::stop`]).
    pub fn stopping(&self) -> bool {
        self.stopping
    }

    /// Clients queued for the dial in flight.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    fn idle_deadline(&self) -> Option<Instant> {
        match &self.live {
            Some(l) if !self.settings.eager => l.grace.deadline(),
            _ => None,
        }
    }

    fn dial(&mut self, now: Instant, out: &mut Actions<C>) {
        self.dial_until = Some(now + self.settings.connect_timeout);
        out.push(Action::Dial);
    }

    fn dial_failed(&mut self, now: Instant, error: ConnectError, out: &mut Actions<C>) {
        for waiter in std::mem::take(&mut self.waiters) {
            out.push(Action::Fail {
                waiter,
                error: error.clone(),
            });
        }
        if self.settings.eager && !self.stopping {
            self.redial_at = Some(now + self.backoff.failed());
        }
    }

    fn drop_upgrade(&mut self, out: &mut Actions<C>) {
        if self.upgrade_until.take().is_some() {
            out.push(Action::CancelUpgrade);
        }
        self.upgrade_at = None;
    }

    fn adopt(&mut self, now: Instant, conn: Conn<C>) {
        self.replace_live(
            now,
            Conn {
                dialled: false,
                ..conn
            },
        );
    }

    fn replace_live(&mut self, now: Instant, conn: Conn<C>) {
        self.generation += 1;
        self.live = Some(Live {
            conn,
            grace: IdleGrace::new(self.settings.idle_grace, now),
            generation: self.generation,
        });
    }

    fn grant(&mut self, waiter: WaiterId) -> Option<Action<C>> {
        let l = self.live.as_mut()?;
        l.grace.stream_opened();
        Some(Action::Grant {
            waiter,
            conn: l.conn.handle.clone(),
            generation: l.generation,
        })
    }
}

fn close<C>(conn: C, reason: &'static [u8]) -> Action<C> {
    Action::Close {
        conn,
        code: close_code::IDLE,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    const GRACE: Duration = Duration::from_secs(30);
    const LIMIT: Duration = Duration::from_secs(10);

    fn settings(eager: bool) -> Settings {
        Settings {
            peer: PeerId::from_spki(b"peer"),
            by_address: false,
            idle_grace: GRACE,
            connect_timeout: LIMIT,
            eager,
            force_relay: false,
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, 1], port))
    }

    fn conn(id: usize, path: Path) -> Conn<usize> {
        Conn {
            id,
            path,
            dialled: true,
            handle: id,
        }
    }

    fn direct(id: usize) -> Conn<usize> {
        conn(id, Path::Direct(addr(4433)))
    }

    fn relayed(id: usize) -> Conn<usize> {
        conn(id, Path::Relay(addr(40000)))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn dials(actions: &[Action<usize>]) -> usize {
        actions.iter().filter(|a| matches!(a, Action::Dial)).count()
    }

    /// What the actions of one kind carry, in order.
    fn pick<T>(actions: &[Action<usize>], f: impl Fn(&Action<usize>) -> Option<T>) -> Vec<T> {
        actions.iter().filter_map(f).collect()
    }

    fn grants(actions: &[Action<usize>]) -> Vec<(WaiterId, usize, u64)> {
        pick(actions, |a| match *a {
            Action::Grant {
                waiter,
                conn,
                generation,
            } => Some((waiter, conn, generation)),
            _ => None,
        })
    }

    fn failures(actions: &[Action<usize>]) -> Vec<(WaiterId, ConnectError)> {
        pick(actions, |a| match a {
            Action::Fail { waiter, error } => Some((*waiter, error.clone())),
            _ => None,
        })
    }

    fn closes(actions: &[Action<usize>]) -> Vec<(usize, VarInt)> {
        pick(actions, |a| match *a {
            Action::Close { conn, code, .. } => Some((conn, code)),
            _ => None,
        })
    }

    /// A session whose first client got `conn` at `t0`.
    fn connected(settings: Settings, conn: Conn<usize>) -> (Instant, Machine<usize>) {
        let t0 = Instant::now();
        let mut m = Machine::new(settings);
        m.request(t0, 1, None);
        m.dialled(t0, ok(conn));
        (t0, m)
    }

    fn never_busy(_: &usize) -> bool {
        false
    }

    fn ok(conn: Conn<usize>) -> Result<Dialled<usize>, ConnectError> {
        Ok(Dialled {
            conn,
            direct_later: false,
        })
    }

    fn failed() -> Result<Dialled<usize>, ConnectError> {
        Err(ConnectError::Failed("unreachable".into()))
    }

    #[test]
    fn an_eager_session_redials_with_doubling_backoff_reset_by_a_success() {
        let t0 = Instant::now();
        let mut m = Machine::new(settings(true));
        assert_eq!(dials(&m.start(t0)), 1);
        let mut now = t0 + ms(100);
        assert!(m.dialled(now, failed()).is_empty());
        for expected in [500, 1000, 2000, 4000] {
            assert_eq!(m.poll_timeout(), Some(now + ms(expected)));
            assert_eq!(dials(&m.timeout(now + ms(expected - 1), never_busy)), 0);
            now += ms(expected);
            assert_eq!(
                dials(&m.timeout(now, never_busy)),
                1,
                "redial after {expected} ms"
            );
            m.dialled(now, failed());
        }
        now += ms(8000);
        assert_eq!(dials(&m.timeout(now, never_busy)), 1);
        m.dialled(now, ok(direct(1)));
        assert_eq!(m.path(), Some(Path::Direct(addr(4433))));
        assert_eq!(m.poll_timeout(), None, "eager: no idle grace, no redial");
        // Lost: the backoff starts again from its minimum.
        m.closed(now, 1);
        assert_eq!(m.poll_timeout(), Some(now + ms(500)));
    }

    #[test]
    fn a_failed_dial_fails_its_waiters_and_a_lazy_session_does_not_redial() {
        let t0 = Instant::now();
        let mut m = Machine::<usize>::new(settings(false));
        assert!(m.start(t0).is_empty());
        assert_eq!(dials(&m.request(t0, 1, None)), 1);
        let out = m.dialled(t0 + ms(50), failed());
        assert_eq!(failures(&out).len(), 1);
        assert_eq!(m.poll_timeout(), None);
        // The next client dials again.
        assert_eq!(dials(&m.request(t0 + ms(60), 2, None)), 1);
    }

    #[test]
    fn clients_queue_behind_one_dial_and_time_out_together_at_its_deadline() {
        let t0 = Instant::now();
        let mut m = Machine::<usize>::new(settings(false));
        assert_eq!(dials(&m.request(t0, 1, None)), 1);
        assert_eq!(dials(&m.request(t0 + ms(4000), 2, None)), 0, "one dial");
        assert_eq!(m.waiting(), 2);
        assert_eq!(m.poll_timeout(), Some(t0 + LIMIT));
        assert!(m.timeout(t0 + LIMIT - ms(1), never_busy).is_empty());
        let out = m.timeout(t0 + LIMIT, never_busy);
        assert!(matches!(out[0], Action::CancelDial));
        let failed = failures(&out);
        assert_eq!(failed.iter().map(|f| f.0).collect::<Vec<_>>(), [1, 2]);
        assert!(matches!(failed[0].1, ConnectError::NoPath { .. }));
        assert_eq!(m.waiting(), 0);
        // A dial that completes after its deadline is not used.
        let late = m.dialled(t0 + LIMIT + ms(5), ok(direct(9)));
        assert_eq!(closes(&late), [(9, close_code::IDLE)]);
        assert_eq!(m.path(), None);
    }

    #[test]
    fn queued_clients_share_the_connection_the_dial_brings() {
        let t0 = Instant::now();
        let mut m = Machine::<usize>::new(settings(false));
        m.request(t0, 1, None);
        m.request(t0, 2, None);
        let out = m.dialled(t0 + ms(30), ok(direct(7)));
        assert_eq!(grants(&out), [(1, 7, 1), (2, 7, 1)]);
        // Later clients get it at once, no dial.
        let out = m.request(t0 + ms(40), 3, None);
        assert_eq!(grants(&out), [(3, 7, 1)]);
        assert_eq!(dials(&out), 0);
    }

    #[test]
    fn the_idle_grace_runs_out_exactly_once() {
        let (t0, mut m) = connected(settings(false), direct(1));
        assert_eq!(m.poll_timeout(), None, "a stream is open");
        let t1 = t0 + ms(5000);
        let out = m.stream_ended(t1, 1);
        assert!(matches!(out[..], [Action::Note(Note::LastStreamEnded)]));
        assert_eq!(m.poll_timeout(), Some(t1 + GRACE));
        assert!(closes(&m.timeout(t1 + GRACE - ms(1), never_busy)).is_empty());
        let out = m.timeout(t1 + GRACE, never_busy);
        assert_eq!(closes(&out), [(1, close_code::IDLE)]);
        assert_eq!(m.path(), None);
        assert_eq!(m.poll_timeout(), None);
        assert!(m.timeout(t1 + GRACE * 3, never_busy).is_empty(), "once");
    }

    #[test]
    fn a_client_inside_the_grace_keeps_the_connection() {
        let (t0, mut m) = connected(settings(false), direct(1));
        m.stream_ended(t0 + ms(10), 1);
        let out = m.request(t0 + GRACE - ms(1), 2, None);
        assert_eq!(grants(&out), [(2, 1, 1)]);
        assert!(m.timeout(t0 + GRACE * 2, never_busy).is_empty());
        m.stream_ended(t0 + GRACE * 2, 1);
        assert_eq!(m.poll_timeout(), Some(t0 + GRACE * 3));
    }

    #[test]
    fn a_connection_the_peer_still_uses_gets_another_grace() {
        let (t0, mut m) = connected(settings(false), direct(1));
        m.stream_ended(t0, 1);
        assert!(m.timeout(t0 + GRACE, |_| true).is_empty());
        assert_eq!(m.poll_timeout(), Some(t0 + GRACE * 2));
        assert_eq!(closes(&m.timeout(t0 + GRACE * 2, never_busy)).len(), 1);
    }

    #[test]
    fn relay_wins_then_the_same_connection_moves_to_the_direct_path_and_back() {
        let t0 = Instant::now();
        let mut m = Machine::<usize>::new(settings(false));
        m.request(t0, 1, None);
        let out = m.dialled(
            t0 + ms(700),
            Ok(Dialled {
                conn: relayed(1),
                direct_later: true,
            }),
        );
        assert_eq!(grants(&out), [(1, 1, 1)]);
        assert!(m.path().unwrap().is_relay());
        assert_eq!(m.poll_timeout(), Some(t0 + ms(700) + DIRECT_LATER));
        // The path layer found the direct path: same connection, same lease generation.
        let out = m.path_changed(t0 + ms(1500), 1, Path::Direct(addr(4433)));
        assert!(matches!(
            out[..],
            [
                Action::Note(Note::PathChanged {
                    was: Path::Relay(_),
                    now: Path::Direct(_)
                }),
                Action::CancelUpgrade
            ]
        ));
        assert_eq!(m.path(), Some(Path::Direct(addr(4433))));
        assert_eq!(m.poll_timeout(), None, "stream 1 is open; no upgrade due");
        // Another connection's path is not ours.
        assert!(m
            .path_changed(t0 + ms(1600), 9, Path::Relay(addr(1)))
            .is_empty());
        // The direct path died: relayed again, punching resumes after the interval.
        let t1 = t0 + ms(9000);
        let out = m.path_changed(t1, 1, Path::Relay(addr(40000)));
        assert!(matches!(out[..], [Action::Note(Note::PathChanged { .. })]));
        assert_eq!(m.poll_timeout(), Some(t1 + UPGRADE_EVERY));
        assert!(matches!(
            m.timeout(t1 + UPGRADE_EVERY, never_busy)[..],
            [Action::Upgrade]
        ));
        // The stream's end is counted on the connection it was granted on.
        m.stream_ended(t1 + UPGRADE_EVERY, 1);
        assert_eq!(
            m.poll_timeout(),
            Some((t1 + UPGRADE_EVERY + GRACE).min(t1 + UPGRADE_EVERY + LIMIT))
        );
    }

    #[test]
    fn relayed_without_direct_handshakes_punches_again_every_interval() {
        let (t0, mut m) = connected(settings(false), relayed(1));
        assert_eq!(m.poll_timeout(), Some(t0 + UPGRADE_EVERY));
        let out = m.timeout(t0 + UPGRADE_EVERY, never_busy);
        assert!(matches!(out[..], [Action::Upgrade]));
        let t1 = t0 + UPGRADE_EVERY + ms(3000);
        let out = m.upgraded(t1, Err(ConnectError::Failed("no answer".into())));
        assert!(matches!(out[..], [Action::Note(Note::StillRelayed(_))]));
        assert!(m.path().unwrap().is_relay());
        assert_eq!(m.poll_timeout(), Some(t1 + UPGRADE_EVERY));
        // An attempt that hangs is dropped at its deadline and retried later.
        m.timeout(t1 + UPGRADE_EVERY, never_busy);
        let hung = t1 + UPGRADE_EVERY + LIMIT;
        assert_eq!(m.poll_timeout(), Some(hung));
        let out = m.timeout(hung, never_busy);
        assert!(matches!(out[..], [Action::CancelUpgrade]));
        assert_eq!(m.poll_timeout(), Some(hung + UPGRADE_EVERY));
    }

    #[test]
    fn a_network_change_under_a_live_connection_punches_again_at_once() {
        let (t0, mut m) = connected(settings(false), relayed(1));
        let t1 = t0 + ms(2000);
        assert!(m.network_changed(t1).is_empty());
        assert_eq!(m.poll_timeout(), Some(t1));
        assert!(matches!(m.timeout(t1, never_busy)[..], [Action::Upgrade]));
        // Again while that attempt runs: it is dropped for a new one.
        let t2 = t1 + ms(500);
        assert!(matches!(m.network_changed(t2)[..], [Action::CancelUpgrade]));
        assert!(matches!(m.timeout(t2, never_busy)[..], [Action::Upgrade]));
        // A direct connection punches again too (the peer must learn the new addresses),
        // once.
        let (t0, mut d) = connected(settings(false), direct(2));
        assert!(d.network_changed(t0).is_empty());
        assert!(matches!(d.timeout(t0, never_busy)[..], [Action::Upgrade]));
        assert!(d.upgraded(t0 + ms(10), Ok(())).is_empty());
        assert_ne!(d.poll_timeout(), Some(t0 + ms(10)));
        // With no connection there is nothing to renew.
        let mut idle = Machine::<usize>::new(settings(false));
        assert!(idle.network_changed(t0).is_empty());
        assert_eq!(idle.poll_timeout(), None);
    }

    #[test]
    fn force_relay_never_tries_the_direct_path() {
        let t0 = Instant::now();
        let mut m = Machine::<usize>::new(Settings {
            force_relay: true,
            ..settings(false)
        });
        m.request(t0, 1, None);
        m.dialled(t0, ok(relayed(1)));
        assert!(m.timeout(t0 + UPGRADE_EVERY, never_busy).is_empty());
    }

    #[test]
    fn a_late_lease_from_an_old_generation_is_ignored() {
        let (t0, mut m) = connected(settings(false), direct(1));
        m.closed(t0 + ms(100), 1);
        assert_eq!(m.path(), None);
        m.request(t0 + ms(200), 2, None);
        assert_eq!(grants(&m.dialled(t0 + ms(250), ok(direct(2)))), [(2, 2, 2)]);
        assert!(m.stream_ended(t0 + ms(300), 1).is_empty());
        assert_eq!(
            m.poll_timeout(),
            None,
            "generation 2's stream is still open"
        );
        // A close of the old connection changes nothing either.
        m.closed(t0 + ms(400), 1);
        assert_eq!(m.live().map(|c| c.id), Some(2));
    }

    #[test]
    fn an_existing_connection_is_adopted_and_the_preferred_one_followed() {
        let t0 = Instant::now();
        let mut m = Machine::<usize>::new(settings(false));
        let out = m.request(t0, 1, Some(direct(5)));
        assert_eq!(grants(&out), [(1, 5, 1)]);
        assert_eq!(dials(&out), 0);
        let out = m.table_changed(t0, Some(direct(6)));
        assert!(matches!(out[..], [Action::Note(Note::Switched(_))]));
        assert_eq!(m.live().map(|c| c.id), Some(6));
        assert!(m.table_changed(t0, Some(direct(6))).is_empty());
        // Adopted connections are not this session's to close at shutdown.
        assert!(closes(&m.finish()).is_empty());
    }

    #[test]
    fn shutdown_refuses_new_dials_and_answers_every_waiter() {
        let t0 = Instant::now();
        let mut m = Machine::<usize>::new(settings(true));
        m.start(t0);
        m.request(t0, 1, None);
        m.stop();
        let out = m.request(t0, 2, None);
        assert_eq!(dials(&out), 0);
        assert!(matches!(
            failures(&out)[..],
            [(2, ConnectError::ShuttingDown)]
        ));
        assert_eq!(
            m.waiting(),
            1,
            "the dial in flight may still answer the first"
        );
        let out = m.finish();
        assert_eq!(failures(&out).len(), 1);
        assert!(failures(&out)
            .iter()
            .all(|(_, e)| matches!(e, ConnectError::ShuttingDown)));
        // After a lost connection while stopping: no redial, and new clients are refused.
        let mut m = Machine::<usize>::new(settings(true));
        m.start(t0);
        m.dialled(t0, ok(direct(1)));
        m.stop();
        m.closed(t0, 1);
        assert_eq!(m.poll_timeout(), None);
        let out = m.request(t0, 3, None);
        assert!(matches!(
            failures(&out)[..],
            [(3, ConnectError::ShuttingDown)]
        ));
        // A dialled connection is closed with the shutdown code when the session ends.
        let mut m = Machine::<usize>::new(settings(true));
        m.start(t0);
        m.dialled(t0, ok(direct(4)));
        assert_eq!(closes(&m.finish()), [(4, close_code::SHUTDOWN)]);
    }
}
