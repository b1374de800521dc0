//! Path probes: the small non-QUIC packets two peers exchange on every path of a connection
//! (`multipath`) to learn which paths work and how fast they are.
//!
//! ```text
//! ping: "\0TUNNEL-PING" | tag (16) | nonce (8)
//! pong: "\0TUNNEL-PONG" | tag (16) | nonce (8, the ping's)
//! ```
//!
//! The tag names the connection: both ends derive it from the connection's TLS keys (a
//! keying-material exporter), so only the peer can make a ping that is answered, or a pong
//! that is believed (a pong must also echo a nonce sent on that path). Like the punch
//! packets, they start with a zero byte: a QUIC endpoint that receives one drops it, and at
//! 36 bytes they are too short to provoke a stateless reset.

/// The exporter label the tag is derived from.
pub const TAG_LABEL: &[u8] = b"tunnel path probe v1";

pub const PING_PREFIX: &[u8] = b"\0TUNNEL-PING";
pub const PONG_PREFIX: &[u8] = b"\0TUNNEL-PONG";
/// Length of every probe packet.
pub const LEN: usize = 12 + 16 + 8;

/// A probe, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Ping { tag: [u8; 16], nonce: u64 },
    Pong { tag: [u8; 16], nonce: u64 },
}

impl Probe {
    pub fn tag(&self) -> &[u8; 16] {
        match self {
            Probe::Ping { tag, .. } | Probe::Pong { tag, .. } => tag,
        }
    }

    /// Where a connection's nonces start (from its tag, so they differ per connection).
    pub fn first_nonce(tag: &[u8; 16]) -> u64 {
        u64::from_be_bytes(tag[..8].try_into().expect("8 bytes"))
    }

    pub fn encode(&self) -> [u8; LEN] {
        let (prefix, tag, nonce) = match self {
            Probe::Ping { tag, nonce } => (PING_PREFIX, tag, nonce),
            Probe::Pong { tag, nonce } => (PONG_PREFIX, tag, nonce),
        };
        let mut p = [0u8; LEN];
        p[..12].copy_from_slice(prefix);
        p[12..28].copy_from_slice(tag);
        p[28..].copy_from_slice(&nonce.to_be_bytes());
        p
    }

    /// The probe in `packet`, if it is one (cheap to reject: the length and first byte).
    pub fn parse(packet: &[u8]) -> Option<Probe> {
        if packet.len() != LEN || packet[0] != 0 {
            return None;
        }
        let tag: [u8; 16] = packet[12..28].try_into().ok()?;
        let nonce = u64::from_be_bytes(packet[28..].try_into().ok()?);
        match &packet[..12] {
            p if p == PING_PREFIX => Some(Probe::Ping { tag, nonce }),
            p if p == PONG_PREFIX => Some(Probe::Pong { tag, nonce }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn probes_round_trip_and_are_not_quic() {
        let ping = Probe::Ping {
            tag: [7; 16],
            nonce: 42,
        };
        let bytes = ping.encode();
        assert_eq!(Probe::parse(&bytes), Some(ping));
        assert_eq!(bytes[0] & 0x40, 0, "the QUIC fixed bit is clear");
        let pong = Probe::Pong {
            tag: [7; 16],
            nonce: 42,
        };
        assert_eq!(Probe::parse(&pong.encode()), Some(pong));
        assert_eq!(Probe::parse(&bytes[..LEN - 1]), None);
        assert_eq!(Probe::parse(super::super::rendezvous::PUNCH), None);
    }

    proptest! {
        #[test]
        fn any_packet_parses_without_panic(p in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Some(probe) = Probe::parse(&p) {
                prop_assert_eq!(&probe.encode()[..], &p[..]);
            }
        }
    }
}
