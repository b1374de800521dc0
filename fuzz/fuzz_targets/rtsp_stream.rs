//! Any byte stream through the RTSP layer's pure parts, as the tunnel reads it from a
//! client, a server or the peer: framing, heads, Transport headers, URL and SDP rewriting.
//! Must never panic, never loop, and framing must always make progress or ask for more.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel::protocol::rtsp::{frame, rebase_head, rebase_sdp, Head, Item, TransportSpec};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(item)) = frame(rest) {
        let len = item.wire_len();
        assert!(len > 0, "an item always consumes bytes");
        if len > rest.len() {
            break; // incomplete: a reader waits for more
        }
        if let Item::Message { head, body } = item {
            if let Ok(mut h) = Head::parse(&rest[..head]) {
                if let Some(t) = h.get("Transport") {
                    let specs = TransportSpec::parse_list(t);
                    for s in &specs {
                        let _ = (s.carriage(), s.ports("client_port"), s.ports("server_port"));
                    }
                    let encoded = TransportSpec::encode_list(&specs);
                    let _ = TransportSpec::parse_list(&encoded);
                }
                let _ = h.session();
                rebase_head(&mut h, "rtsp://127.0.0.1:8554");
                let again = h.encode();
                // What the layer writes after a rewrite frames again as one message.
                assert!(matches!(frame(&again), Ok(Some(Item::Message { .. }))));
                let _ = rebase_sdp(&rest[head..head + body], "rtsp://127.0.0.1:8554");
            }
        }
        rest = &rest[len..];
    }
});
