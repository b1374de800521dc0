//! The media wire formats, pure: how RTP/RTCP flows travel between the peers as QUIC
//! datagrams (and overflow streams), the loss-repair control messages, and the few RTP
//! header fields the repair reads. Documented in `docs/protocol.md` ("Media").
//!
//! - Every datagram, and the start of every overflow stream, is a 4-byte [`Tag`]:
//!   `id << 3 | control << 2 | allocated_by_sender << 1 | rtcp`, big endian. The id is a
//!   29-bit channel id allocated by the client-facing peer; `allocated_by_sender` lets each
//!   peer tell its own ids from the other's on a connection that carries streams both ways.
//! - A media datagram is the tag and one RTP or RTCP packet. A control datagram (control bit
//!   set) is the tag and one control message: a resend request ([`REQUEST`]) or a parity
//!   ([`PARITY`]).
//! - An overflow stream (for packets above the datagram limit) is the tag, then frames of
//!   `rtcp:u8 | len:u16be | packet`.
//! - A parity's XOR covers `len:u16be | packet` of each packet of its block, so XORing
//!   all but one of them out leaves the missing one, length included ([`xor_packet`]).
//! - The channel id of a flow reaches the server-facing peer in the forwarded SETUP, in the
//!   header `protocol::rtsp::CHANNEL_HEADER`.

/// Bytes of the tag in front of every datagram and at the start of an overflow stream.
pub const TAG_LEN: usize = 4;
/// Largest channel id (29 bits).
pub const MAX_ID: u32 = (1 << 29) - 1;

/// `0` RTP, `1` RTCP: the first and second port of a pair.
pub type Kind = usize;

/// What a datagram or overflow stream starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub id: u32,
    /// The sender of the datagram allocated `id` (it is the client-facing peer).
    pub allocated_by_sender: bool,
    /// A loss-repair message about the flow's `kind` packets, not a packet.
    pub control: bool,
    pub kind: Kind,
}

impl Tag {
    pub fn encode(self) -> [u8; TAG_LEN] {
        ((self.id & MAX_ID) << 3
            | u32::from(self.control) << 2
            | u32::from(self.allocated_by_sender) << 1
            | (self.kind as u32 & 1))
            .to_be_bytes()
    }

    pub fn decode(buf: &[u8]) -> Option<Tag> {
        let v = u32::from_be_bytes(buf.get(..TAG_LEN)?.try_into().ok()?);
        Some(Tag {
            id: v >> 3,
            control: v & 4 != 0,
            allocated_by_sender: v & 2 != 0,
            kind: (v & 1) as Kind,
        })
    }
}

/// Bytes in front of each packet on an overflow stream.
pub const OVERFLOW_HEAD: usize = 3;

/// One overflow frame: `rtcp:u8 | len:u16be | packet`. `packet` is a UDP payload, so at most
/// 65,535 bytes.
pub fn encode_overflow(kind: Kind, packet: &[u8]) -> Vec<u8> {
    debug_assert!(packet.len() <= usize::from(u16::MAX));
    let mut frame = Vec::with_capacity(OVERFLOW_HEAD + packet.len());
    frame.push(kind as u8 & 1);
    frame.extend_from_slice(&(packet.len() as u16).to_be_bytes());
    frame.extend_from_slice(packet);
    frame
}

/// The kind and length of the packet an overflow frame's head announces.
pub fn decode_overflow_head(head: [u8; OVERFLOW_HEAD]) -> (Kind, usize) {
    (
        Kind::from(head[0] & 1),
        usize::from(u16::from_be_bytes([head[1], head[2]])),
    )
}

/// The SSRC and sequence number of an RTP packet (version 2, full header), else `None`.
/// RFC 3550 §5.1: read by hand rather than with an RTP crate, for three fields.
pub fn rtp_id(packet: &[u8]) -> Option<(u32, u16)> {
    if packet.len() < 12 || packet[0] >> 6 != 2 {
        return None;
    }
    let seq = u16::from_be_bytes([packet[2], packet[3]]);
    let ssrc = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
    Some((ssrc, seq))
}

/// Whether an RTP packet ends a video frame (marker bit).
pub fn marker(packet: &[u8]) -> bool {
    packet.get(1).is_some_and(|b| b & 0x80 != 0)
}

/// The first byte of a resend request (the control message type).
pub const REQUEST: u8 = 1;

/// A request for resending: `0x01 | ssrc:u32 | seq:u16 ...`.
pub fn encode_request(ssrc: u32, seqs: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + 2 * seqs.len());
    out.push(REQUEST);
    out.extend_from_slice(&ssrc.to_be_bytes());
    for s in seqs {
        out.extend_from_slice(&s.to_be_bytes());
    }
    out
}

/// The SSRC and sequence numbers of a request; `None` if it is not one.
pub fn decode_request(buf: &[u8]) -> Option<(u32, impl Iterator<Item = u16> + '_)> {
    if buf.len() < 5 || buf[0] != REQUEST || (buf.len() - 5) % 2 != 0 {
        return None;
    }
    let ssrc = u32::from_be_bytes(buf[1..5].try_into().ok()?);
    Some((
        ssrc,
        buf[5..]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]])),
    ))
}

/// The first byte of a parity message (the control message type).
pub const PARITY: u8 = 2;
/// Packets one parity covers at most.
pub const MAX_BLOCK: usize = 8;

/// A parity message: `0x02 | ssrc:u32 | first seq:u16 | count:u8 | xor of len|packet`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parity {
    pub ssrc: u32,
    pub first: u16,
    pub count: u8,
    pub xor: Vec<u8>,
}

impl Parity {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.xor.len());
        out.push(PARITY);
        out.extend_from_slice(&self.ssrc.to_be_bytes());
        out.extend_from_slice(&self.first.to_be_bytes());
        out.push(self.count);
        out.extend_from_slice(&self.xor);
        out
    }

    /// `None` unless it is a parity of 1 to [`MAX_BLOCK`] packets with at least a length.
    pub fn decode(buf: &[u8]) -> Option<Parity> {
        if buf.len() < 10 || buf[0] != PARITY {
            return None;
        }
        let count = buf[7];
        if count == 0 || usize::from(count) > MAX_BLOCK {
            return None;
        }
        Some(Parity {
            ssrc: u32::from_be_bytes(buf[1..5].try_into().ok()?),
            first: u16::from_be_bytes([buf[5], buf[6]]),
            count,
            xor: buf[8..].to_vec(),
        })
    }
}

/// Adds `len(packet) as u16 | packet` into a parity's XOR, zero-padded to the longest.
pub fn xor_into(acc: &mut Vec<u8>, packet: &[u8]) {
    let len = (packet.len() as u16).to_be_bytes();
    if acc.len() < 2 + packet.len() {
        acc.resize(2 + packet.len(), 0);
    }
    acc[0] ^= len[0];
    acc[1] ^= len[1];
    for (a, b) in acc[2..].iter_mut().zip(packet) {
        *a ^= b;
    }
}

/// The packet an XOR of exactly one `len | packet` holds, if its length fits.
pub fn xor_packet(acc: &[u8]) -> Option<&[u8]> {
    let len = usize::from(u16::from_be_bytes([*acc.first()?, *acc.get(1)?]));
    acc.get(2..2 + len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_xor_of_one_packet_is_that_packet() {
        let mut acc = Vec::new();
        xor_into(&mut acc, b"abc");
        xor_into(&mut acc, b"longer one");
        xor_into(&mut acc, b"longer one");
        assert_eq!(xor_packet(&acc), Some(&b"abc"[..]));
        assert_eq!(xor_packet(&[0, 9, 1]), None, "a length past the end");
        assert_eq!(xor_packet(&[0]), None);
    }

    #[test]
    fn short_tags_and_other_messages_are_refused() {
        assert_eq!(Tag::decode(&[1, 2, 3]), None);
        assert!(decode_request(&[PARITY, 0, 0, 0, 1]).is_none());
        assert!(
            decode_request(&[REQUEST, 0, 0, 0, 1, 9]).is_none(),
            "half a seq"
        );
        assert!(Parity::decode(&encode_request(1, &[2, 3])).is_none());
    }

    proptest! {
        #[test]
        fn tags_round_trip(id in 0..=MAX_ID, by: bool, control: bool, kind in 0usize..2) {
            let tag = Tag { id, allocated_by_sender: by, control, kind };
            prop_assert_eq!(Tag::decode(&tag.encode()), Some(tag));
        }

        #[test]
        fn requests_round_trip(ssrc: u32, seqs in proptest::collection::vec(any::<u16>(), 0..64)) {
            let wire = encode_request(ssrc, &seqs);
            let (got, back) = decode_request(&wire).unwrap();
            prop_assert_eq!(got, ssrc);
            prop_assert_eq!(back.collect::<Vec<_>>(), seqs);
        }

        #[test]
        fn parities_round_trip(
            ssrc: u32,
            first: u16,
            count in 1u8..=MAX_BLOCK as u8,
            xor in proptest::collection::vec(any::<u8>(), 2..300),
        ) {
            let p = Parity { ssrc, first, count, xor };
            prop_assert_eq!(Parity::decode(&p.encode()), Some(p));
        }

        #[test]
        fn overflow_frames_round_trip(kind in 0usize..2, packet in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let frame = encode_overflow(kind, &packet);
            let (k, len) = decode_overflow_head(frame[..OVERFLOW_HEAD].try_into().unwrap());
            prop_assert_eq!((k, len), (kind, packet.len()));
            prop_assert_eq!(&frame[OVERFLOW_HEAD..], &packet[..]);
        }

        #[test]
        fn arbitrary_control_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Tag::decode(&bytes);
            let _ = Parity::decode(&bytes);
            if let Some((_, seqs)) = decode_request(&bytes) {
                prop_assert_eq!(seqs.count(), (bytes.len() - 5) / 2);
            }
        }
    }
}
