//! Any bytes as a rendezvous control stream (either direction) and as a packet reaching a
//! relay port. Must never panic; a decoded frame re-encodes to one that decodes the same, and
//! a bind packet's token makes the same bind packet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel::protocol::rendezvous::{
    decode, encode, parse_relay_bind, relay_bind_packet, ClientMsg, ServerMsg, MAX_FRAME,
};

/// Every frame at the start of `data`, as `$t`: decoded, re-encoded, decoded the same.
macro_rules! round_trip {
    ($t:ty, $data:expr) => {{
        let mut rest: &[u8] = $data;
        while let Ok(Some((msg, used))) = decode::<$t>(rest) {
            assert!(used > 0 && used <= rest.len() && used <= MAX_FRAME + 4);
            let again = decode::<$t>(&encode(&msg)).unwrap().map(|(m, _)| m);
            assert_eq!(again.as_ref(), Some(&msg));
            rest = &rest[used..];
        }
    }};
}

fuzz_target!(|data: &[u8]| {
    round_trip!(ClientMsg, data);
    round_trip!(ServerMsg, data);
    if let Some(token) = parse_relay_bind(data) {
        assert_eq!(parse_relay_bind(&relay_bind_packet(&token)), Some(token));
    }
});
