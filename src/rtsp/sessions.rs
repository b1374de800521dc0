//! The RTSP session bookkeeping of one RTSP connection, as a pure state machine over `now`.
//!
//! A UDP SETUP creates a media flow (a port pair, owned by the caller as `F`) before it is
//! forwarded; the flow waits here, keyed by CSeq, until the SETUP is answered, then belongs to
//! the RTSP session the answer names. Flows leave (and the caller's `F` is dropped, which
//! releases its ports) on TEARDOWN, on a failed SETUP, when the session timed out, or when
//! the whole machine is dropped with its RTSP connection.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// SETUPs awaiting their answer at once; more is a misbehaving client.
pub const MAX_PENDING: usize = 16;
/// Media flows on one RTSP connection (each is a UDP port pair on both peers).
pub const MAX_FLOWS: usize = 32;
/// The server's session timeout when it names none (RFC 2326 §12.37).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// A session is forgotten after this many of its timeouts without a request or media from
/// the client: the server has long expired it by then.
const EXPIRY_FACTOR: u32 = 2;

struct Entry<F> {
    flows: Vec<F>,
    timeout: Duration,
    last: Instant,
}

/// Sessions and flows of one RTSP connection; `F` is the caller's handle on a flow.
pub struct Sessions<F> {
    pending: VecDeque<(Option<String>, F)>,
    sessions: HashMap<String, Entry<F>>,
}

impl<F> Default for Sessions<F> {
    fn default() -> Self {
        Sessions {
            pending: VecDeque::new(),
            sessions: HashMap::new(),
        }
    }
}

/// Why a new flow is not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Limit {
    #[error("{MAX_PENDING} SETUPs are already waiting for an answer")]
    Pending,
    #[error("{MAX_FLOWS} media flows are already open on this RTSP connection")]
    Flows,
}

impl<F> Sessions<F> {
    /// Whether one more SETUP may create a flow.
    pub fn can_add(&self) -> Result<(), Limit> {
        if self.pending.len() >= MAX_PENDING {
            return Err(Limit::Pending);
        }
        if self.flows() >= MAX_FLOWS {
            return Err(Limit::Flows);
        }
        Ok(())
    }

    /// A SETUP with `cseq` was forwarded with `flow`.
    pub fn setup_sent(&mut self, cseq: Option<&str>, flow: F) {
        self.pending.push_back((cseq.map(str::to_owned), flow));
    }

    /// The flow of the SETUP a response with `cseq` answers (the oldest if it has no CSeq).
    pub fn answered(&mut self, cseq: Option<&str>) -> Option<F> {
        let at = match cseq {
            Some(c) => self
                .pending
                .iter()
                .position(|(p, _)| p.as_deref() == Some(c))?,
            None if self.pending.is_empty() => return None,
            None => 0,
        };
        self.pending.remove(at).map(|(_, f)| f)
    }

    /// A successful SETUP's flow belongs to `session` from now on.
    pub fn attach(&mut self, session: &str, timeout: Option<u64>, flow: F, now: Instant) {
        let timeout = timeout
            .filter(|&t| t > 0)
            .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
        let entry = self
            .sessions
            .entry(session.to_owned())
            .or_insert_with(|| Entry {
                flows: Vec::new(),
                timeout,
                last: now,
            });
        entry.timeout = timeout;
        entry.last = now;
        entry.flows.push(flow);
    }

    /// A request named `session`: it is alive.
    pub fn touch(&mut self, session: &str, now: Instant) {
        if let Some(e) = self.sessions.get_mut(session) {
            e.last = now;
        }
    }

    /// TEARDOWN of `session`: its flows, to drop.
    pub fn teardown(&mut self, session: &str) -> Vec<F> {
        self.sessions
            .remove(session)
            .map(|e| e.flows)
            .unwrap_or_default()
    }

    /// Flows of sessions silent for [`EXPIRY_FACTOR`] timeouts; `activity` gives a flow's
    /// last packet from the client, which keeps a session alive as RTCP reports do.
    pub fn expire(&mut self, now: Instant, activity: impl Fn(&F) -> Option<Instant>) -> Vec<F> {
        let mut gone = Vec::new();
        self.sessions.retain(|_, e| {
            let last = e
                .flows
                .iter()
                .filter_map(&activity)
                .fold(e.last, Instant::max);
            if now < last + e.timeout * EXPIRY_FACTOR {
                return true;
            }
            gone.append(&mut e.flows);
            false
        });
        gone
    }

    /// When [`Sessions::expire`] should run next (ignoring media activity, which only
    /// postpones).
    pub fn next_check(&self) -> Option<Instant> {
        self.sessions
            .values()
            .map(|e| e.last + e.timeout * EXPIRY_FACTOR)
            .min()
    }

    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    pub fn flows(&self) -> usize {
        self.pending.len() + self.sessions.values().map(|e| e.flows.len()).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_match_setups_by_cseq_then_teardown_releases() {
        let now = Instant::now();
        let mut s = Sessions::default();
        s.setup_sent(Some("3"), "video");
        s.setup_sent(Some("4"), "audio");
        assert_eq!(s.flows(), 2);
        assert_eq!(s.answered(Some("4")), Some("audio"));
        assert_eq!(s.answered(Some("9")), None);
        s.attach("abc", Some(60), "audio", now);
        assert_eq!(s.answered(None), Some("video"));
        s.attach("abc", None, "video", now);
        assert_eq!((s.sessions(), s.flows()), (1, 2));
        assert_eq!(s.teardown("nope"), Vec::<&str>::new());
        assert_eq!(s.teardown("abc"), vec!["audio", "video"]);
        assert_eq!((s.sessions(), s.flows()), (0, 0));
    }

    #[test]
    fn silent_sessions_expire_and_requests_or_media_keep_them() {
        let t0 = Instant::now();
        let mut s = Sessions::default();
        s.attach("a", Some(10), 1, t0);
        s.attach("b", Some(10), 2, t0);
        assert_eq!(s.next_check(), Some(t0 + Duration::from_secs(20)));
        s.touch("a", t0 + Duration::from_secs(15));
        let none = |_: &i32| None;
        assert!(s.expire(t0 + Duration::from_secs(19), none).is_empty());
        assert_eq!(s.expire(t0 + Duration::from_secs(20), none), vec![2]);
        // Media from the client (RTCP receiver reports) counts as activity.
        let media = |_: &i32| Some(t0 + Duration::from_secs(30));
        assert!(s.expire(t0 + Duration::from_secs(40), media).is_empty());
        assert_eq!(s.expire(t0 + Duration::from_secs(50), media), vec![1]);
        assert_eq!((s.sessions(), s.flows()), (0, 0));
    }

    #[test]
    fn limits_on_pending_setups_and_flows() {
        let now = Instant::now();
        let mut s = Sessions::default();
        for i in 0..MAX_PENDING {
            assert_eq!(s.can_add(), Ok(()));
            s.setup_sent(Some(&i.to_string()), i);
        }
        assert_eq!(s.can_add(), Err(Limit::Pending));
        for i in 0..MAX_PENDING {
            let f = s.answered(Some(&i.to_string())).unwrap();
            s.attach("x", None, f, now);
        }
        for i in MAX_PENDING..MAX_FLOWS {
            s.attach("x", None, i, now);
        }
        assert_eq!(s.can_add(), Err(Limit::Flows));
    }
}
