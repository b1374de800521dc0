//! Loss repair for RTP carried as QUIC datagrams, as pure state with time as input.
//!
//! QUIC datagrams are not retransmitted, so a packet lost between the peers is lost to the
//! RTSP client: a concealed or dropped frame (ffmpeg), or a stall until the next keyframe
//! (GStreamer). The two tunnel peers are one round trip apart, usually far less than the
//! client's jitter buffer (ffmpeg waits 100 ms for a missing packet, rtspsrc 2 s), so the
//! receiving peer asks again for what it missed and the sending peer resends it from a short
//! history, before the client gives up on it. Later packets are not held back (as a QUIC
//! stream would hold them): the client's jitter buffer puts the resent one in its place.
//!
//! - [`History`] (sending peer): the last packets sent as datagrams, by RTP sequence number,
//!   bounded by count and age.
//! - [`Gaps`] (receiving peer): which sequence numbers are missing; says which to ask for
//!   now (at once when a gap appears, again after a retry interval, a bounded number of
//!   times, and never for packets older than the client would wait for).
//!
//! Only RTP is repaired (RTCP reports are periodic and loss-tolerant). The RTP fields read
//! are the version, sequence number and SSRC (RFC 3550 §5.1): a twelve-byte header, read by
//! hand rather than with an RTP crate for three fields.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Packets kept for resending, per flow (about 0.7 MB of 1,400-byte packets).
pub const HISTORY_PACKETS: usize = 512;
/// Older packets are not resent: no client waits that long for a missing one.
pub const MAX_AGE: Duration = Duration::from_secs(1);
/// A jump larger than this is a new stream (a seek, a restarted sender), not a gap.
pub const MAX_GAP: u64 = 128;
/// How many times one missing packet is asked for.
pub const MAX_TRIES: u32 = 3;
/// Sequence numbers in one request (a datagram of 2 + 4 + 2 x 64 bytes).
pub const MAX_PER_REQUEST: usize = 64;
/// Missing packets tracked at most; the oldest are given up first.
const MAX_MISSING: usize = 256;

/// The packets a peer sent lately, ready to send again as they were.
#[derive(Debug, Default)]
pub struct History {
    ssrc: Option<u32>,
    packets: VecDeque<(u16, Instant, Bytes)>,
}

impl History {
    /// Records a sent packet (`datagram` as it went out, tag included).
    pub fn sent(&mut self, ssrc: u32, seq: u16, now: Instant, datagram: Bytes) {
        if self.ssrc != Some(ssrc) {
            self.ssrc = Some(ssrc);
            self.packets.clear();
        }
        while self.packets.len() >= HISTORY_PACKETS
            || self
                .packets
                .front()
                .is_some_and(|(_, at, _)| now.duration_since(*at) > MAX_AGE)
        {
            self.packets.pop_front();
        }
        self.packets.push_back((seq, now, datagram));
    }

    /// The packet to send again for `seq` of `ssrc`, if still kept and young enough.
    pub fn resend(&self, ssrc: u32, seq: u16, now: Instant) -> Option<Bytes> {
        if self.ssrc != Some(ssrc) {
            return None;
        }
        self.packets
            .iter()
            .rev()
            .find(|(s, at, _)| *s == seq && now.duration_since(*at) <= MAX_AGE)
            .map(|(_, _, d)| d.clone())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.packets.len()
    }
}

#[derive(Debug, Clone, Copy)]
struct Missing {
    noticed: Instant,
    due: Instant,
    tries: u32,
}

/// What the receiving peer does with an arriving packet.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Arrival {
    /// The packet filled a gap (a resent or late one).
    pub filled: bool,
    /// Sequence numbers to ask the sender for now.
    pub request: Vec<u16>,
}

/// The missing sequence numbers of one flow's RTP, on the receiving peer.
#[derive(Debug, Default)]
pub struct Gaps {
    ssrc: Option<u32>,
    /// Highest sequence number seen, extended past 16 bits.
    highest: u64,
    /// Extended sequence number -> state.
    missing: BTreeMap<u64, Missing>,
}

impl Gaps {
    /// A packet arrived at `now`; `retry`: how long to wait for an asked-for packet before
    /// asking again (a round trip and some).
    pub fn arrived(&mut self, ssrc: u32, seq: u16, now: Instant, retry: Duration) -> Arrival {
        let mut out = Arrival::default();
        if self.ssrc != Some(ssrc) {
            self.ssrc = Some(ssrc);
            self.highest = u64::from(seq) + (1 << 16);
            self.missing.clear();
            return out;
        }
        let delta = i64::from(seq.wrapping_sub(self.highest as u16) as i16);
        let ext = self.highest.saturating_add_signed(delta);
        if delta > 0 {
            let jump = delta as u64;
            if jump > MAX_GAP {
                self.missing.clear();
            } else {
                for lost in self.highest + 1..ext {
                    self.missing.insert(
                        lost,
                        Missing {
                            noticed: now,
                            due: now,
                            tries: 0,
                        },
                    );
                }
            }
            self.highest = ext;
        } else if self.missing.remove(&ext).is_some() {
            out.filled = true;
        }
        out.request = self.due(now, retry);
        out
    }

    /// The missing packets to ask for at `now` (each counted as asked), oldest first;
    /// forgets those asked for too often or too old.
    fn due(&mut self, now: Instant, retry: Duration) -> Vec<u16> {
        self.missing.retain(|_, m| {
            now.duration_since(m.noticed) <= MAX_AGE && (m.tries < MAX_TRIES || now < m.due)
        });
        while self.missing.len() > MAX_MISSING {
            self.missing.pop_first();
        }
        let mut request = Vec::new();
        for (ext, m) in self.missing.iter_mut() {
            if request.len() == MAX_PER_REQUEST {
                break;
            }
            if m.tries < MAX_TRIES && m.due <= now {
                m.tries += 1;
                m.due = now + retry;
                request.push(*ext as u16);
            }
        }
        request
    }

    /// Sequence numbers missing now.
    #[cfg(test)]
    fn missing(&self) -> usize {
        self.missing.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::media::{decode_request, encode_request, rtp_id};
    use proptest::prelude::*;

    const RETRY: Duration = Duration::from_millis(30);

    fn rtp(ssrc: u32, seq: u16) -> Vec<u8> {
        let mut p = vec![0x80, 96];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0]);
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(b"payload");
        p
    }

    #[test]
    fn reads_rtp_ids_and_refuses_what_is_not_rtp() {
        assert_eq!(rtp_id(&rtp(7, 65535)), Some((7, 65535)));
        assert_eq!(rtp_id(&rtp(7, 1)[..11]), None);
        let mut v1 = rtp(7, 1);
        v1[0] = 0x40;
        assert_eq!(rtp_id(&v1), None);
    }

    #[test]
    fn a_gap_is_asked_for_at_once_then_again_after_the_retry_then_given_up() {
        let t0 = Instant::now();
        let mut g = Gaps::default();
        assert_eq!(g.arrived(1, 10, t0, RETRY), Arrival::default());
        let a = g.arrived(1, 13, t0, RETRY);
        assert_eq!(a.request, vec![11, 12]);
        // Not again before the retry interval.
        assert!(g.arrived(1, 14, t0 + RETRY / 2, RETRY).request.is_empty());
        // 11 comes; 12 is asked for again.
        let a = g.arrived(1, 11, t0 + RETRY, RETRY);
        assert!(a.filled);
        assert_eq!(a.request, vec![12]);
        assert_eq!(g.arrived(1, 15, t0 + RETRY * 2, RETRY).request, vec![12]);
        // Three tries, then it is given up.
        assert!(g.arrived(1, 16, t0 + RETRY * 3, RETRY).request.is_empty());
        assert_eq!(g.missing(), 0);
    }

    #[test]
    fn wraps_around_and_treats_a_big_jump_as_a_new_start() {
        let t0 = Instant::now();
        let mut g = Gaps::default();
        g.arrived(1, 65534, t0, RETRY);
        assert_eq!(g.arrived(1, 1, t0, RETRY).request, vec![65535, 0]);
        let mut g = Gaps::default();
        g.arrived(1, 100, t0, RETRY);
        assert!(g.arrived(1, 100 + 1000, t0, RETRY).request.is_empty());
        assert_eq!(g.missing(), 0);
        // A new SSRC starts over.
        g.arrived(1, 5, t0, RETRY);
        assert!(g.arrived(2, 9, t0, RETRY).request.is_empty());
    }

    #[test]
    fn old_gaps_are_forgotten() {
        let t0 = Instant::now();
        let mut g = Gaps::default();
        g.arrived(1, 1, t0, RETRY);
        g.arrived(1, 3, t0, RETRY);
        g.arrived(1, 4, t0 + MAX_AGE + RETRY, RETRY);
        assert_eq!(g.missing(), 0);
    }

    #[test]
    fn history_resends_only_recent_packets_of_the_same_stream() {
        let t0 = Instant::now();
        let mut h = History::default();
        for seq in 0..(HISTORY_PACKETS as u16 + 10) {
            h.sent(9, seq, t0, Bytes::from(rtp(9, seq)));
        }
        assert_eq!(h.len(), HISTORY_PACKETS);
        assert!(h.resend(9, 5, t0).is_none(), "pushed out by count");
        assert_eq!(h.resend(9, 20, t0), Some(Bytes::from(rtp(9, 20))));
        assert!(h.resend(8, 20, t0).is_none(), "another SSRC");
        assert!(h.resend(9, 20, t0 + MAX_AGE * 2).is_none(), "too old");
    }

    #[test]
    fn requests_round_trip_and_garbage_is_refused() {
        let wire = encode_request(0xdead_beef, &[1, 65535]);
        let (ssrc, seqs) = decode_request(&wire).unwrap();
        assert_eq!(
            (ssrc, seqs.collect::<Vec<_>>()),
            (0xdead_beef, vec![1, 65535])
        );
        assert!(decode_request(&wire[..6]).is_none());
        assert!(decode_request(&[2, 0, 0, 0, 0]).is_none());
    }

    proptest! {
        /// Whatever is lost (each send and each resend by its own count), every packet lost
        /// at most MAX_TRIES times arrives, and nothing is asked for after it arrived.
        /// Packets go out every 5 ms; a resend asked for arrives 5 ms later, before the next
        /// packet; the stream goes on (without loss) long enough to reveal a gap at its end.
        #[test]
        fn every_packet_arrives_through_loss_and_repair(
            lost in proptest::collection::vec(0u32..=MAX_TRIES + 1, 1..300),
            start in any::<u16>(),
        ) {
            let step = Duration::from_millis(5);
            let retry = Duration::from_millis(4);
            let t0 = Instant::now();
            let (mut g, mut h) = (Gaps::default(), History::default());
            let mut budget = lost.clone();
            budget[0] = 0; // a stream starts when a packet arrives
            let n = budget.len();
            let tail = n + 2 * MAX_TRIES as usize;
            let mut got = std::collections::HashSet::new();
            let mut asked: Vec<u16> = Vec::new();
            for i in 0..tail {
                let now = t0 + step * i as u32;
                let mut arriving: Vec<u16> = Vec::new();
                for s in asked.drain(..) {
                    let j = s.wrapping_sub(start) as usize;
                    prop_assert!(h.resend(3, s, now).is_some(), "{s} still kept");
                    if budget[j] == 0 { arriving.push(s) } else { budget[j] -= 1 }
                }
                let seq = start.wrapping_add(i as u16);
                h.sent(3, seq, now, Bytes::from(rtp(3, seq)));
                if i >= n || budget[i] == 0 {
                    arriving.push(seq);
                } else {
                    budget[i] -= 1;
                }
                for s in arriving {
                    got.insert(s);
                    for r in g.arrived(3, s, now, retry).request {
                        prop_assert!(!got.contains(&r), "asked for {r}, which arrived");
                        asked.push(r);
                    }
                }
            }
            for (i, l) in lost.iter().enumerate().skip(1) {
                if *l <= MAX_TRIES {
                    prop_assert!(got.contains(&start.wrapping_add(i as u16)), "packet {i}, lost {l} times, never arrived");
                }
            }
        }
    }
}
