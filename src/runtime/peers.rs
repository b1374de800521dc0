//! One connection per pair of peers, whoever dialled it.
//!
//! Every connection with a peer, incoming (accepted by the expose role) or outgoing (dialled
//! by a session), is recorded here. A session first looks for an existing connection with its
//! peer and dials only when there is none, and every connection carries streams both ways. If
//! both peers dialled at once there are two: both sides then prefer the one dialled by the
//! lower peer id ([`pick`]), new streams go there, and the other is closed by the peer that
//! dialled it as soon as no stream is left on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use quinn::Connection;
use tokio::sync::watch;
use tracing::info;

use crate::identity::PeerId;
use crate::media::MediaMux;
use crate::protocol::close_code;
use crate::quic::path::Path;
use crate::runtime::NodeCtx;
use crate::stats::Gauge;

/// What an introduction told this node about a peer it punched for: the peer's candidates
/// and this node's relay side (port and bind token).
#[derive(Debug, Clone)]
pub(crate) struct Intro {
    pub peer: PeerId,
    pub candidates: Vec<std::net::SocketAddr>,
    pub relay: Option<(std::net::SocketAddr, [u8; 16])>,
}

/// A connection with a peer.
#[derive(Clone)]
pub(crate) struct PeerConn {
    pub conn: Connection,
    /// Who dialled it.
    pub initiator: PeerId,
    /// The path its handshake completed on.
    path: Path,
    /// Its paths, when it was introduced (`multipath`): the active one may change.
    pub route: Option<Arc<crate::multipath::Entry>>,
    /// Streams on it now, in both directions (each end counts every stream).
    pub streams: Gauge,
    /// RTP/RTCP flows carried on it as datagrams.
    pub media: Arc<MediaMux>,
    /// Order of registration here.
    seq: u64,
    /// When it was recorded here.
    pub opened: std::time::Instant,
    /// One sample a second, the last [`HISTORY`] of them (status page charts).
    pub history: Arc<Mutex<std::collections::VecDeque<Sample>>>,
}

/// Samples kept per connection: two minutes.
pub const HISTORY: usize = 120;
/// How often a connection is sampled.
pub const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A connection's figures at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub rtt_ms: f64,
    /// UDP bytes so far, each way.
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

/// What the node knows of a peer it had to do with: when a connection with it was last up,
/// and the last failure to reach it.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub last_up: Option<std::time::Instant>,
    pub last_failure: Option<(std::time::Instant, String)>,
}

/// Peers remembered in [`Seen`] at most (the oldest go first).
const SEEN_KEPT: usize = 1024;

impl PeerConn {
    /// The path its packets take now.
    pub fn path(&self) -> Path {
        self.route.as_ref().map_or(self.path, |r| r.path())
    }

    /// Records the connection's figures now: its RTT into the node's histogram, and a
    /// sample into its history.
    fn sample(&self, stats: &crate::stats::Stats) {
        let st = self.conn.stats();
        stats.rtt.observe(st.path.rtt);
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(Sample {
            rtt_ms: st.path.rtt.as_secs_f64() * 1000.0,
            sent_bytes: st.udp_tx.bytes,
            received_bytes: st.udp_rx.bytes,
        });
    }
}

/// Which of a peer's connections new streams should use: the ones dialled by the lower peer
/// id first (both ends agree on that), then the most recent. Pure.
pub fn pick(me: PeerId, peer: PeerId, conns: &[(PeerId, u64)]) -> Option<usize> {
    let preferred = me.min(peer);
    conns
        .iter()
        .enumerate()
        .max_by_key(|(_, (initiator, seq))| (*initiator == preferred, *seq))
        .map(|(i, _)| i)
}

#[derive(Default)]
struct Inner {
    conns: HashMap<PeerId, Vec<PeerConn>>,
    seq: u64,
}

pub(crate) struct PeerTable {
    me: PeerId,
    inner: Mutex<Inner>,
    /// The introductions this node punched for lately, the newest last: an accepted
    /// connection from a relay port is known to be relayed, and gets the introduction's
    /// other paths.
    intros: Mutex<std::collections::VecDeque<Arc<Intro>>>,
    changed: watch::Sender<u64>,
    seen: Mutex<HashMap<PeerId, Seen>>,
}

impl PeerTable {
    pub(crate) fn new(me: PeerId) -> Self {
        PeerTable {
            me,
            inner: Mutex::default(),
            intros: Mutex::default(),
            changed: watch::Sender::new(0),
            seen: Mutex::default(),
        }
    }

    fn seen_mut(&self, peer: PeerId, update: impl FnOnce(&mut Seen)) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= SEEN_KEPT && !seen.contains_key(&peer) {
            let oldest = seen
                .iter()
                .min_by_key(|(_, s)| s.last_up.max(s.last_failure.as_ref().map(|f| f.0)))
                .map(|(p, _)| *p);
            if let Some(oldest) = oldest {
                seen.remove(&oldest);
            }
        }
        update(seen.entry(peer).or_default());
    }

    /// Records that `peer` could not be reached, and why.
    pub(crate) fn note_failure(&self, peer: PeerId, why: String) {
        self.seen_mut(peer, |s| s.last_failure = Some((crate::time::now(), why)));
    }

    /// What the node knows of `peer`'s presence.
    pub(crate) fn seen(&self, peer: &PeerId) -> Seen {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(peer).cloned().unwrap_or_default()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Introductions remembered: far more than a node holds connections being set up.
    const INTROS_KEPT: usize = 256;

    /// Remembers an introduction this node punched for; a live connection with that peer
    /// tries its candidates (a new introduction while relayed: the peer punches again).
    pub(crate) fn note_intro(&self, intro: Arc<Intro>, paths: &crate::multipath::PathTable) {
        for pc in self.inner().conns.get(&intro.peer).into_iter().flatten() {
            if let Some(route) = &pc.route {
                route.add_candidates(paths, &intro.candidates);
            }
        }
        let mut intros = self.intros.lock().unwrap_or_else(|p| p.into_inner());
        if intros.len() == Self::INTROS_KEPT {
            intros.pop_front();
        }
        intros.push_back(intro);
    }

    /// The path of a connection `peer` made from `remote`, and the introduction it came of:
    /// relayed when `remote` is a relay port this node was introduced to `peer` through,
    /// else direct.
    pub(crate) fn path_to(
        &self,
        peer: &PeerId,
        remote: std::net::SocketAddr,
    ) -> (Path, Option<Arc<Intro>>) {
        let intros = self.intros.lock().unwrap_or_else(|p| p.into_inner());
        let relayed = intros.iter().rev().find(|i| {
            i.relay
                .is_some_and(|(r, _)| crate::quic::path::canonical(r) == remote)
        });
        if let Some(i) = relayed {
            return (Path::Relay(remote), Some(i.clone()));
        }
        let latest = intros.iter().rev().find(|i| i.peer == *peer).cloned();
        (Path::Direct(remote), latest)
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Records `conn` with `peer` until it closes; the dialler closes it once it is a
    /// duplicate with no stream left.
    pub(crate) fn add(
        &self,
        node: &NodeCtx,
        peer: PeerId,
        conn: Connection,
        initiator: PeerId,
        path: Path,
        route: Option<Arc<crate::multipath::Entry>>,
    ) -> PeerConn {
        let pc = {
            let mut inner = self.inner();
            inner.seq += 1;
            let media = MediaMux::new(
                conn.clone(),
                node.tasks.clone(),
                node.stats.clone(),
                node.abort.child_token(),
            );
            let pc = PeerConn {
                media,
                conn,
                initiator,
                path,
                route,
                streams: Gauge::default(),
                seq: inner.seq,
                opened: crate::time::now(),
                history: Arc::default(),
            };
            inner.conns.entry(peer).or_default().push(pc.clone());
            pc
        };
        self.seen_mut(peer, |s| s.last_up = Some(crate::time::now()));
        self.changed.send_modify(|n| *n += 1);
        let watched = pc.clone();
        let node = node.clone();
        node.tasks.spawn(pc.media.clone().run());
        node.tasks.clone().spawn(async move {
            node.peers
                .supervise(peer, watched, node.stats.clone())
                .await;
        });
        pc
    }

    /// Closes, with `code` and `reason`, every live connection that a peer for which `which`
    /// holds dialled to this node; how many. (Connections this node dialled stay: the
    /// exposing role refuses the streams such a peer opens on them.)
    pub(crate) fn close_dialled_by(
        &self,
        which: impl Fn(&PeerId) -> bool,
        code: quinn::VarInt,
        reason: &[u8],
    ) -> usize {
        let inner = self.inner();
        let mut closed = 0;
        for (peer, conns) in inner.conns.iter().filter(|(p, _)| which(p)) {
            for pc in conns
                .iter()
                .filter(|pc| pc.initiator == *peer && pc.conn.close_reason().is_none())
            {
                pc.conn.close(code, reason);
                closed += 1;
            }
        }
        closed
    }

    /// Every live connection, with its peer (for status).
    pub(crate) fn snapshot(&self) -> Vec<(PeerId, PeerConn)> {
        let inner = self.inner();
        let mut out: Vec<(PeerId, PeerConn)> = inner
            .conns
            .iter()
            .flat_map(|(peer, conns)| conns.iter().map(|pc| (*peer, pc.clone())))
            .filter(|(_, pc)| pc.conn.close_reason().is_none())
            .collect();
        out.sort_by_key(|(peer, pc)| (*peer, pc.seq));
        out
    }

    /// The connection new streams with `peer` should use.
    pub(crate) fn preferred(&self, peer: &PeerId) -> Option<PeerConn> {
        let inner = self.inner();
        let live: Vec<&PeerConn> = inner
            .conns
            .get(peer)?
            .iter()
            .filter(|pc| pc.conn.close_reason().is_none())
            .collect();
        let keys: Vec<(PeerId, u64)> = live.iter().map(|pc| (pc.initiator, pc.seq)).collect();
        pick(self.me, *peer, &keys).map(|i| live[i].clone())
    }

    /// The dialler of each live connection with `peer`.
    pub(crate) fn initiators(&self, peer: &PeerId) -> Vec<PeerId> {
        let inner = self.inner();
        inner
            .conns
            .get(peer)
            .map(|v| {
                v.iter()
                    .filter(|pc| pc.conn.close_reason().is_none())
                    .map(|pc| pc.initiator)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn remove(&self, peer: &PeerId, seq: u64) {
        let mut inner = self.inner();
        if let Some(v) = inner.conns.get_mut(peer) {
            v.retain(|pc| pc.seq != seq);
            if v.is_empty() {
                inner.conns.remove(peer);
            }
        }
        drop(inner);
        self.seen_mut(*peer, |s| s.last_up = Some(crate::time::now()));
        self.changed.send_modify(|n| *n += 1);
    }

    /// Until `pc` closes: forgets it then; closes it first if this side dialled it, it is no
    /// longer preferred, and no stream is left on it.
    async fn supervise(&self, peer: PeerId, pc: PeerConn, stats: Arc<crate::stats::Stats>) {
        let mut changes = self.subscribe();
        let mut streams = pc.streams.subscribe();
        let mut sample = tokio::time::interval(SAMPLE_EVERY);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if pc.initiator == self.me && pc.streams.get() == 0 {
                let preferred = self.preferred(&peer).map(|p| p.seq);
                if preferred.is_some_and(|s| s != pc.seq) {
                    info!(%peer, "closing a duplicate connection (the peers keep the one dialled by the lower peer id)");
                    pc.conn.close(close_code::IDLE, b"duplicate connection");
                }
            }
            tokio::select! {
                _ = pc.conn.closed() => break,
                r = changes.changed() => if r.is_err() { break },
                r = streams.changed() => if r.is_err() { break },
                _ = sample.tick() => {
                    pc.sample(&stats);
                    continue;
                }
            }
        }
        self.remove(&peer, pc.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (PeerId, PeerId) {
        let a = PeerId::from_spki(b"a");
        let b = PeerId::from_spki(b"b");
        (a.min(b), a.max(b))
    }

    #[test]
    fn both_ends_prefer_the_connection_dialled_by_the_lower_id() {
        let (low, high) = ids();
        // Seen from each end, in different registration orders.
        let at_low = [(low, 1), (high, 2)];
        let at_high = [(high, 1), (low, 2)];
        assert_eq!(pick(low, high, &at_low), Some(0));
        assert_eq!(pick(high, low, &at_high), Some(1));
    }

    #[test]
    fn among_one_dialler_the_newest_wins_and_none_is_none() {
        let (low, high) = ids();
        assert_eq!(pick(low, high, &[(high, 3), (high, 7)]), Some(1));
        assert_eq!(pick(low, high, &[]), None);
    }
}
