//! The TCP link: UDP datagrams carried over one TLS-over-TCP connection between a peer and
//! the rendezvous host, for networks that drop UDP (`multipath::link`, `nat::link`).
//!
//! ```text
//! frame:   len:u16 | port:u16 | datagram (len bytes, 1..=MAX_DATAGRAM)
//! ```
//!
//! `port` is a UDP port of the rendezvous host: where the datagram goes (peer → rendezvous:
//! its QUIC endpoint or a relay port), or where it comes from (rendezvous → peer). So the link
//! is a virtual UDP path between the peer and the rendezvous host's ports; the datagrams are
//! the QUIC packets and relay binds that would have gone over UDP, unchanged (the rendezvous
//! reads none of a relayed connection's). The TLS connection negotiates ALPN [`ALPN`] and
//! authenticates both ends by key as the QUIC one does.
//!
//! Echo probes tell a peer on the link when UDP to the rendezvous works again: a request sent
//! over UDP to the rendezvous's port is answered at once with a reply of the same length
//! (no amplification), echoing the nonce.
//!
//! ```text
//! echo request: "\0TUNNEL-ECHO?" | nonce (8)
//! echo reply:   "\0TUNNEL-ECHO!" | nonce (8)
//! ```

/// ALPN of the TCP link.
pub const ALPN: &[u8] = b"tunnel-link/1";
/// Bytes before each datagram.
pub const HEADER: usize = 4;
/// The largest datagram a frame carries (what a UDP socket of ours sends at most).
pub const MAX_DATAGRAM: usize = 65_527;

/// Why a frame is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("an empty datagram on the link")]
    Empty,
    #[error("a {0}-byte datagram on the link (at most {MAX_DATAGRAM})")]
    TooLong(usize),
}

/// The header of a frame carrying `len` bytes for `port`.
pub fn header(port: u16, len: usize) -> Result<[u8; HEADER], LinkError> {
    check(len)?;
    let l = (len as u16).to_be_bytes();
    let p = port.to_be_bytes();
    Ok([l[0], l[1], p[0], p[1]])
}

fn check(len: usize) -> Result<(), LinkError> {
    match len {
        0 => Err(LinkError::Empty),
        n if n > MAX_DATAGRAM => Err(LinkError::TooLong(n)),
        _ => Ok(()),
    }
}

/// A whole frame: its header and the datagram.
pub fn encode(port: u16, datagram: &[u8]) -> Result<Vec<u8>, LinkError> {
    let mut out = Vec::with_capacity(HEADER + datagram.len());
    out.extend_from_slice(&header(port, datagram.len())?);
    out.extend_from_slice(datagram);
    Ok(out)
}

/// The frame at the start of `buf`: its port and the datagram's range in `buf`, and the
/// bytes it takes. `Ok(None)`: more bytes are needed.
pub fn decode(buf: &[u8]) -> Result<Option<(u16, std::ops::Range<usize>)>, LinkError> {
    let Some(h) = buf.get(..HEADER) else {
        return Ok(None);
    };
    let len = u16::from_be_bytes([h[0], h[1]]) as usize;
    check(len)?;
    let port = u16::from_be_bytes([h[2], h[3]]);
    if buf.len() < HEADER + len {
        return Ok(None);
    }
    Ok(Some((port, HEADER..HEADER + len)))
}

pub const ECHO_REQUEST: &[u8] = b"\0TUNNEL-ECHO?";
pub const ECHO_REPLY: &[u8] = b"\0TUNNEL-ECHO!";
/// Length of every echo packet.
pub const ECHO_LEN: usize = 13 + 8;

/// An echo packet, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    Request(u64),
    Reply(u64),
}

impl Echo {
    pub fn encode(&self) -> [u8; ECHO_LEN] {
        let (prefix, nonce) = match self {
            Echo::Request(n) => (ECHO_REQUEST, n),
            Echo::Reply(n) => (ECHO_REPLY, n),
        };
        let mut p = [0u8; ECHO_LEN];
        p[..13].copy_from_slice(prefix);
        p[13..].copy_from_slice(&nonce.to_be_bytes());
        p
    }

    /// The echo in `packet`, if it is one (cheap to reject: the length and first byte).
    pub fn parse(packet: &[u8]) -> Option<Echo> {
        if packet.len() != ECHO_LEN || packet[0] != 0 {
            return None;
        }
        let nonce = u64::from_be_bytes(packet[13..].try_into().ok()?);
        match &packet[..13] {
            p if p == ECHO_REQUEST => Some(Echo::Request(nonce)),
            p if p == ECHO_REPLY => Some(Echo::Reply(nonce)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn too_long_and_empty_frames_are_refused_and_partial_ones_wait() {
        assert_eq!(encode(1, &[]), Err(LinkError::Empty));
        assert_eq!(
            encode(1, &vec![0; MAX_DATAGRAM + 1]),
            Err(LinkError::TooLong(MAX_DATAGRAM + 1))
        );
        assert_eq!(decode(&[0xff, 0xff, 0, 1]), Err(LinkError::TooLong(65_535)));
        assert_eq!(decode(&[0, 0, 0, 1]), Err(LinkError::Empty));
        assert_eq!(decode(&[0, 3, 0]), Ok(None));
        assert_eq!(decode(&[0, 3, 0, 1, 9, 9]), Ok(None));
        assert_eq!(decode(&[0, 3, 0, 1, 9, 9, 9, 7]), Ok(Some((1, 4..7))));
    }

    #[test]
    fn echoes_are_not_quic_and_other_packets_are_not_echoes() {
        for e in [Echo::Request(7), Echo::Reply(u64::MAX)] {
            let p = e.encode();
            assert_eq!(p[0], 0, "a QUIC endpoint drops it");
            assert_eq!(Echo::parse(&p), Some(e));
        }
        assert_eq!(Echo::parse(b"\0TUNNEL-ECHO?1234567"), None);
        assert_eq!(Echo::parse(&[0u8; ECHO_LEN]), None);
    }

    proptest! {
        #[test]
        fn frames_round_trip_back_to_back(
            frames in proptest::collection::vec((any::<u16>(), proptest::collection::vec(any::<u8>(), 1..3000)), 1..8),
            cut in 0usize..4,
        ) {
            let mut wire = Vec::new();
            for (port, d) in &frames {
                wire.extend(encode(*port, d).unwrap());
            }
            let mut at = 0;
            for (port, d) in &frames {
                // A frame cut short is "more bytes", never an error.
                let end = (at + HEADER + d.len()).saturating_sub(cut);
                if end > at && cut > 0 {
                    prop_assert_eq!(decode(&wire[at..end]), Ok(None));
                }
                let (p, range) = decode(&wire[at..]).unwrap().unwrap();
                prop_assert_eq!(p, *port);
                prop_assert_eq!(&wire[at..][range.clone()], &d[..]);
                at += range.end;
            }
            prop_assert_eq!(at, wire.len());
        }

        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(Some((_, range))) = decode(&bytes) {
                prop_assert!(range.end <= bytes.len());
            }
            let _ = Echo::parse(&bytes);
        }
    }
}
