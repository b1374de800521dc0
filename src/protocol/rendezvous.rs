//! Messages between a peer and the rendezvous server, and their framing. Pure: no I/O.
//!
//! A peer opens one QUIC connection to the rendezvous (ALPN [`ALPN`]) from the same UDP socket
//! that carries its tunnel, so the address the rendezvous observes is the NAT mapping the
//! other peer punches through. On it, the peer opens one bidirectional stream; both ways it
//! carries frames `len:u32be | JSON`, each at most [`MAX_FRAME`] bytes. The peer is
//! authenticated by its TLS client certificate: its peer id is never sent, it is derived.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::identity::PeerId;

/// ALPN of the rendezvous protocol. Version 2: introductions by consent (version 1 introduced
/// any two registered peers and told anyone the presence of any id).
pub const ALPN: &[u8] = b"tunnel-rendezvous/2";
/// Largest frame payload.
pub const MAX_FRAME: usize = 16 * 1024;
/// Most local addresses a peer may register.
pub const MAX_LOCAL_ADDRS: usize = 16;

/// Peer → rendezvous.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMsg {
    /// I am online; these are my local (LAN) addresses. Sent first, and again after changes.
    Register { local_addrs: Vec<SocketAddr> },
    /// Introduce me to `peer`. The rendezvous asks `peer` (now, or when it comes online) and
    /// introduces us only if it accepts; until then the answer is `Unavailable`, the same for
    /// an offline, unknown or refusing peer. The request stays open while I am registered.
    Connect { peer: PeerId, relay: bool },
    /// My answer to `Ask { peer }`: whether `peer` may be introduced to me.
    Answer { peer: PeerId, accept: bool },
    /// I am done with the relay allocation whose grant (my side's) carried `token`: release
    /// it now rather than at its idle timeout (its quota is free again at once).
    Release { token: String },
}

/// Rendezvous → peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerMsg {
    /// Registration accepted; `observed` is your address as the rendezvous sees it.
    Registered { observed: SocketAddr },
    /// `peer` asks to be introduced to you: answer with `Answer`. It learns nothing of you
    /// (not even that you are online) unless you accept.
    Ask { peer: PeerId },
    /// No introduction to `peer` now (it is offline, unknown, or does not accept you: the
    /// same answer, after the same delay). Your request stays open while you are registered.
    Unavailable { peer: PeerId },
    /// Punch toward `peer` now (after `start_in_ms`), at these candidates. `relay` is your end
    /// of a relay allocation, when one was asked for.
    Introduce {
        peer: PeerId,
        candidates: Vec<SocketAddr>,
        start_in_ms: u64,
        relay: Option<RelayGrant>,
    },
    /// A request was refused; the text says why.
    Error { message: String },
}

/// One side of a relay allocation: send a bind packet carrying `token` to `port` on the
/// rendezvous host, then QUIC packets to the same port reach the other side unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayGrant {
    pub port: u16,
    /// Hex of 16 random bytes.
    pub token: String,
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLong(usize),
    #[error("bad message: {0}")]
    Json(String),
}

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let json = serde_json::to_vec(msg).expect("messages always serialize");
    let mut out = Vec::with_capacity(4 + json.len());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out
}

/// Decodes one frame from the start of `buf`: the message and the bytes used, or `Ok(None)`
/// when more bytes are needed.
pub fn decode<T: for<'de> Deserialize<'de>>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    let Some(body) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let msg = serde_json::from_slice(body).map_err(|e| FrameError::Json(e.to_string()))?;
    Ok(Some((msg, 4 + len)))
}

/// The bind packet a peer sends to its relay port: this prefix and the token's 16 bytes.
pub const RELAY_BIND_PREFIX: &[u8] = b"\0TUNNEL-RELAY-BIND";
/// A punch packet: opens this side's NAT toward a candidate. Its first byte has the QUIC
/// fixed bit clear, so a QUIC endpoint that receives it drops it (our endpoints never grease
/// that bit), and it is too short to provoke a stateless reset.
pub const PUNCH: &[u8] = b"\0TUNNEL-PUNCH";

pub fn relay_bind_packet(token: &[u8; 16]) -> Vec<u8> {
    let mut p = RELAY_BIND_PREFIX.to_vec();
    p.extend_from_slice(token);
    p
}

/// The token of a bind packet, if `packet` is one.
pub fn parse_relay_bind(packet: &[u8]) -> Option<[u8; 16]> {
    packet.strip_prefix(RELAY_BIND_PREFIX)?.try_into().ok()
}

pub fn token_hex(token: &[u8; 16]) -> String {
    data_encoding::HEXLOWER.encode(token)
}

pub fn token_from_hex(text: &str) -> Option<[u8; 16]> {
    data_encoding::HEXLOWER_PERMISSIVE
        .decode(text.as_bytes())
        .ok()?
        .try_into()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port)))
    }

    fn any_peer() -> impl Strategy<Value = PeerId> {
        any::<[u8; 32]>().prop_map(|b| PeerId::from_spki(&b))
    }

    fn any_server_msg() -> impl Strategy<Value = ServerMsg> {
        prop_oneof![
            any_addr().prop_map(|observed| ServerMsg::Registered { observed }),
            any_peer().prop_map(|peer| ServerMsg::Ask { peer }),
            any_peer().prop_map(|peer| ServerMsg::Unavailable { peer }),
            (
                any_peer(),
                proptest::collection::vec(any_addr(), 0..8),
                any::<u64>(),
                proptest::option::of((any::<u16>(), any::<[u8; 16]>()))
            )
                .prop_map(|(peer, candidates, start_in_ms, relay)| {
                    ServerMsg::Introduce {
                        peer,
                        candidates,
                        start_in_ms,
                        relay: relay.map(|(port, t)| RelayGrant {
                            port,
                            token: token_hex(&t),
                        }),
                    }
                }),
            ".{0,200}".prop_map(|message| ServerMsg::Error { message }),
        ]
    }

    proptest! {
        #[test]
        fn server_messages_round_trip(msg in any_server_msg(), extra in proptest::collection::vec(any::<u8>(), 0..16)) {
            let mut bytes = encode(&msg);
            let len = bytes.len();
            bytes.extend_from_slice(&extra);
            let (back, used) = decode::<ServerMsg>(&bytes).unwrap().unwrap();
            prop_assert_eq!(back, msg);
            prop_assert_eq!(used, len);
            for cut in 0..len {
                prop_assert_eq!(decode::<ServerMsg>(&bytes[..cut]), Ok(None));
            }
        }

        #[test]
        fn client_messages_round_trip(addrs in proptest::collection::vec(any_addr(), 0..8), peer in any_peer(), relay in any::<bool>()) {
            for msg in [ClientMsg::Register { local_addrs: addrs.clone() }, ClientMsg::Connect { peer, relay }, ClientMsg::Answer { peer, accept: relay }, ClientMsg::Release { token: token_hex(&[relay as u8; 16]) }] {
                let (back, _) = decode::<ClientMsg>(&encode(&msg)).unwrap().unwrap();
                prop_assert_eq!(back, msg);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<ClientMsg>(&bytes);
            let _ = decode::<ServerMsg>(&bytes);
        }
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        let mut big = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        big.push(b'{');
        assert_eq!(
            decode::<ClientMsg>(&big),
            Err(FrameError::TooLong(MAX_FRAME + 1))
        );
        let junk = encode(&serde_json::json!({"type": "register", "local_addrs": [], "evil": 1}));
        assert!(matches!(
            decode::<ClientMsg>(&junk),
            Err(FrameError::Json(_))
        ));
    }

    #[test]
    fn bind_packets_carry_the_token() {
        let token = [7u8; 16];
        assert_eq!(parse_relay_bind(&relay_bind_packet(&token)), Some(token));
        assert_eq!(parse_relay_bind(PUNCH), None);
        assert_eq!(parse_relay_bind(&relay_bind_packet(&token)[..20]), None);
        assert_eq!(token_from_hex(&token_hex(&token)), Some(token));
        assert_eq!(PUNCH[0] & 0x40, 0, "not a QUIC v1 packet");
    }
}
