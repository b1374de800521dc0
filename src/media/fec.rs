//! Forward error correction for RTP carried as QUIC datagrams: one XOR parity per block of
//! consecutive packets, as pure state.
//!
//! Asking again for a lost packet ([`super::repair`]) costs a round trip between the peers,
//! and the client shows nothing new until the packet comes (its jitter buffer waits): a
//! freeze of a round trip and a frame at each loss. A parity packet lets the receiving peer
//! rebuild one lost packet of its block as soon as the parity arrives, right after the
//! block's last packet, so a single loss costs no round trip. A block ends at the end of a
//! video frame (the RTP marker bit) or after [`BLOCK`] packets, so a parity follows every
//! frame at once, and the overhead is one packet per frame or per [`BLOCK`] packets.
//! Two losses in one block fall back to asking again.
//!
//! The parity of packets `p1..pn` is the XOR of each `len(p) as u16 | p`, zero-padded to the
//! longest: XORing it with all but one rebuilds the missing one, length included.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::protocol::media::{marker, rtp_id, xor_into, xor_packet, Parity, MAX_BLOCK};

/// Packets per block at most (the most a parity may cover on the wire).
pub const BLOCK: usize = MAX_BLOCK;
/// Received packets kept for rebuilding (a block's worth several times over).
const KEPT: usize = 64;
/// Parities kept that could not be used yet (two packets of their block missing).
const PARITIES_KEPT: usize = 8;
/// Nothing older is rebuilt: the client has given up on it.
const MAX_AGE: Duration = Duration::from_secs(1);

/// The sending peer's side: the parity of the block being sent.
#[derive(Debug, Default)]
pub struct Encoder {
    ssrc: u32,
    first: u16,
    count: u8,
    xor: Vec<u8>,
}

impl Encoder {
    /// An RTP packet went out as a datagram; returns the block's parity when it ends here.
    pub fn sent(&mut self, packet: &[u8]) -> Option<Parity> {
        let (ssrc, seq) = rtp_id(packet)?;
        let follows = self.count > 0
            && ssrc == self.ssrc
            && seq == self.first.wrapping_add(u16::from(self.count));
        if !follows {
            self.ssrc = ssrc;
            self.first = seq;
            self.count = 0;
            self.xor.clear();
        }
        xor_into(&mut self.xor, packet);
        self.count += 1;
        if !marker(packet) && usize::from(self.count) < BLOCK {
            return None;
        }
        let parity = Parity {
            ssrc,
            first: self.first,
            count: self.count,
            xor: std::mem::take(&mut self.xor),
        };
        self.count = 0;
        Some(parity)
    }

    /// A packet of the stream did not go out as a datagram (it took the overflow stream):
    /// the block ends without a parity.
    pub fn skipped(&mut self) {
        self.count = 0;
        self.xor.clear();
    }
}

/// The receiving peer's side: recent packets and parities; rebuilds a lost packet.
#[derive(Debug, Default)]
pub struct Decoder {
    ssrc: Option<u32>,
    packets: VecDeque<(u16, Instant, Bytes)>,
    parities: VecDeque<(Instant, Parity)>,
}

impl Decoder {
    /// An RTP packet arrived; returns packets rebuilt thanks to it (with kept parities), or
    /// `None` when it is one of the last packets already here (rebuilt, or resent twice):
    /// the client need not get it again.
    pub fn arrived(&mut self, packet: Bytes, now: Instant) -> Option<Vec<Bytes>> {
        let Some((ssrc, seq)) = rtp_id(&packet) else {
            return Some(Vec::new());
        };
        self.stream(ssrc);
        if self.has(seq) {
            return None;
        }
        self.keep(seq, now, packet);
        self.expire(now);
        let mut out = Vec::new();
        let waiting = std::mem::take(&mut self.parities);
        for (at, parity) in waiting {
            let offset = seq.wrapping_sub(parity.first);
            if offset < u16::from(parity.count) {
                match self.rebuild(&parity, now) {
                    Rebuilt::One(p) => out.push(p),
                    Rebuilt::Nothing => {}
                    Rebuilt::NotYet => self.parities.push_back((at, parity)),
                }
            } else {
                self.parities.push_back((at, parity));
            }
        }
        Some(out)
    }

    /// A parity arrived; returns the packet it rebuilds, if one of its block is missing.
    pub fn parity(&mut self, parity: Parity, now: Instant) -> Option<Bytes> {
        self.stream(parity.ssrc);
        self.expire(now);
        match self.rebuild(&parity, now) {
            Rebuilt::One(p) => Some(p),
            Rebuilt::Nothing => None,
            Rebuilt::NotYet => {
                if self.parities.len() == PARITIES_KEPT {
                    self.parities.pop_front();
                }
                self.parities.push_back((now, parity));
                None
            }
        }
    }

    fn stream(&mut self, ssrc: u32) {
        if self.ssrc != Some(ssrc) {
            self.ssrc = Some(ssrc);
            self.packets.clear();
            self.parities.clear();
        }
    }

    fn has(&self, seq: u16) -> bool {
        self.packets.iter().any(|(s, _, _)| *s == seq)
    }

    fn keep(&mut self, seq: u16, now: Instant, packet: Bytes) {
        if self.packets.len() == KEPT {
            self.packets.pop_front();
        }
        self.packets.push_back((seq, now, packet));
    }

    fn expire(&mut self, now: Instant) {
        let old = |at: &Instant| now.duration_since(*at) > MAX_AGE;
        while self.packets.front().is_some_and(|(_, at, _)| old(at)) {
            self.packets.pop_front();
        }
        self.parities.retain(|(at, _)| !old(at));
    }

    fn rebuild(&mut self, parity: &Parity, now: Instant) -> Rebuilt {
        let mut missing = None;
        let mut acc = parity.xor.clone();
        for i in 0..u16::from(parity.count) {
            let seq = parity.first.wrapping_add(i);
            match self.packets.iter().find(|(s, _, _)| *s == seq) {
                Some((_, _, p)) => xor_into(&mut acc, p),
                None if missing.is_some() => return Rebuilt::NotYet,
                None => missing = Some(seq),
            }
        }
        let Some(seq) = missing else {
            return Rebuilt::Nothing;
        };
        let Some(packet) = xor_packet(&acc) else {
            return Rebuilt::Nothing;
        };
        let packet = Bytes::copy_from_slice(packet);
        // A parity that does not fit what arrived (garbage from the network) rebuilds
        // nothing: the result must be the missing packet.
        if rtp_id(&packet) != Some((parity.ssrc, seq)) {
            return Rebuilt::Nothing;
        }
        self.keep(seq, now, packet.clone());
        Rebuilt::One(packet)
    }
}

enum Rebuilt {
    One(Bytes),
    /// Nothing missing, or the parity does not fit.
    Nothing,
    /// Two or more missing: maybe later.
    NotYet,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::media::PARITY;
    use proptest::prelude::*;

    fn rtp(ssrc: u32, seq: u16, marker: bool, len: usize) -> Bytes {
        let mut p = vec![0x80, 96 | if marker { 0x80 } else { 0 }];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0]);
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend((0..len).map(|i| (i as u8) ^ (seq as u8)));
        Bytes::from(p)
    }

    #[test]
    fn a_block_ends_at_a_marker_or_after_block_packets() {
        let mut e = Encoder::default();
        assert!(e.sent(&rtp(1, 10, false, 5)).is_none());
        let p = e.sent(&rtp(1, 11, true, 50)).unwrap();
        assert_eq!((p.first, p.count, p.xor.len()), (10, 2, 2 + 12 + 50));
        let mut last = None;
        for seq in 12..12 + BLOCK as u16 {
            last = e.sent(&rtp(1, seq, false, 9));
        }
        assert_eq!(last.map(|p| (p.first, p.count)), Some((12, BLOCK as u8)));
    }

    #[test]
    fn one_lost_packet_is_rebuilt_when_the_parity_arrives() {
        let t = Instant::now();
        let (mut e, mut d) = (Encoder::default(), Decoder::default());
        let packets: Vec<Bytes> = (0..4)
            .map(|i| rtp(7, 65534u16.wrapping_add(i), i == 3, 100 + 300 * i as usize))
            .collect();
        let mut parity = None;
        for p in &packets {
            parity = e.sent(p);
        }
        for (i, p) in packets.iter().enumerate() {
            if i != 1 {
                assert_eq!(d.arrived(p.clone(), t), Some(vec![]));
            }
        }
        let parity = Parity::decode(&parity.unwrap().encode()).unwrap();
        assert_eq!(d.parity(parity.clone(), t), Some(packets[1].clone()));
        // Nothing missing any more.
        assert_eq!(d.parity(parity, t), None);
        // The resent copy that follows is a duplicate: not delivered again.
        assert_eq!(d.arrived(packets[1].clone(), t), None);
    }

    #[test]
    fn two_lost_wait_until_one_comes_another_way() {
        let t = Instant::now();
        let (mut e, mut d) = (Encoder::default(), Decoder::default());
        let packets: Vec<Bytes> = (0..4).map(|i| rtp(7, i, i == 3, 40)).collect();
        let parity = packets.iter().filter_map(|p| e.sent(p)).last().unwrap();
        d.arrived(packets[0].clone(), t);
        d.arrived(packets[3].clone(), t);
        assert_eq!(d.parity(parity, t), None);
        // Packet 1 is resent (asked for again): 2 is rebuilt.
        assert_eq!(
            d.arrived(packets[1].clone(), t),
            Some(vec![packets[2].clone()])
        );
    }

    #[test]
    fn garbage_parities_rebuild_nothing() {
        let t = Instant::now();
        let mut d = Decoder::default();
        d.arrived(rtp(7, 1, false, 10), t);
        let bogus = Parity {
            ssrc: 7,
            first: 1,
            count: 2,
            xor: vec![0xff; 30],
        };
        assert_eq!(d.parity(bogus, t), None);
        assert!(
            Parity::decode(&[2, 0, 0, 0, 7, 0, 1, 0, 0, 0]).is_none(),
            "count 0"
        );
        assert!(
            Parity::decode(&[2, 0, 0, 0, 7, 0, 1, 9, 0, 0]).is_none(),
            "count > BLOCK"
        );
        assert!(Parity::decode(&[1, 2, 3]).is_none());
    }

    proptest! {
        /// Whatever a peer sends as a parity, decoding and using it never panics, and what
        /// it rebuilds is a packet of the stream's SSRC with a sequence number of its block.
        #[test]
        fn any_parity_bytes_are_harmless(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            kept in proptest::collection::vec(0u16..12, 0..8),
        ) {
            let t = Instant::now();
            let mut d = Decoder::default();
            for seq in kept {
                d.arrived(rtp(7, seq, false, 20), t);
            }
            let mut wire = vec![PARITY];
            wire.extend_from_slice(&bytes);
            if let Some(p) = Parity::decode(&wire) {
                let (first, count) = (p.first, p.count);
                if let Some(rebuilt) = d.parity(p, t) {
                    let (ssrc, seq) = rtp_id(&rebuilt).unwrap();
                    prop_assert_eq!(ssrc, 7);
                    prop_assert!(seq.wrapping_sub(first) < u16::from(count));
                }
            }
        }

        /// Any stream of packets, any single loss per block: every lost packet is rebuilt
        /// byte for byte, and nothing else is produced.
        #[test]
        fn single_losses_are_rebuilt_exactly(
            lens in proptest::collection::vec((0usize..1400, any::<bool>(), any::<bool>()), 1..80),
            start in any::<u16>(),
        ) {
            let t = Instant::now();
            let (mut e, mut d) = (Encoder::default(), Decoder::default());
            let mut block_lost = false;
            let mut lost = Vec::new();
            let mut rebuilt = Vec::new();
            for (i, (len, mark, lose)) in lens.iter().enumerate() {
                let p = rtp(3, start.wrapping_add(i as u16), *mark, *len);
                let parity = e.sent(&p);
                if *lose && !block_lost {
                    block_lost = true;
                    lost.push(p);
                } else {
                    rebuilt.extend(d.arrived(p, t).into_iter().flatten());
                }
                if let Some(parity) = parity {
                    rebuilt.extend(d.parity(parity, t));
                    block_lost = false;
                }
            }
            // The last block may have no parity yet: its loss is not rebuilt.
            let n = rebuilt.len();
            prop_assert_eq!(&rebuilt[..], &lost[..n]);
            prop_assert!(lost.len() - n <= 1);
        }
    }
}
