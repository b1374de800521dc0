//! The wire protocol, as pure data: ALPN, the stream header codec and the QUIC error codes.
//! Documented in `docs/protocol.md`; nothing here does I/O.

pub mod catalog;
pub mod header;
pub mod http;
pub mod media;
pub mod rendezvous;
pub mod rtsp;

use quinn::VarInt;

/// ALPN protocol id: names the protocol and its major version. A peer speaking another
/// version fails the TLS handshake with "no application protocol".
pub const ALPN: &[u8] = b"tunnel/1";

/// Application error codes carried by QUIC `RESET_STREAM` and `STOP_SENDING` frames.
pub mod stream_code {
    use super::VarInt;
    /// The socket at the other end was reset or failed; the stream is cut short.
    pub const ABORTED: VarInt = VarInt::from_u32(1);
    /// The stream header was malformed or oversized.
    pub const BAD_HEADER: VarInt = VarInt::from_u32(2);
    /// The open was refused (the status says why); no payload will be read.
    pub const REFUSED: VarInt = VarInt::from_u32(3);
    /// The process shut down before the stream finished draining.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(4);
    /// The header did not arrive in time.
    pub const TIMEOUT: VarInt = VarInt::from_u32(5);
    /// The service protocol's layer found the payload malformed or oversized (e.g. RTSP).
    pub const BAD_PAYLOAD: VarInt = VarInt::from_u32(6);
}

/// Application error codes carried by QUIC `CONNECTION_CLOSE` frames.
pub mod close_code {
    use super::VarInt;
    /// The idle grace period ended with no stream open.
    pub const IDLE: VarInt = VarInt::from_u32(0);
    /// The peer is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(1);
    /// The peer's id is not in the exposing side's allow list.
    pub const NOT_AUTHORISED: VarInt = VarInt::from_u32(2);
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: VarInt = VarInt::from_u32(3);

    /// A short name for a close code, for logs.
    pub fn name(code: VarInt) -> &'static str {
        match code.into_inner() {
            0 => "idle",
            1 => "shutdown",
            2 => "not authorised",
            3 => "protocol error",
            _ => "unknown",
        }
    }
}
