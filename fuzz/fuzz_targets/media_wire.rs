//! Any bytes as what arrives on a media flow: a datagram (tag, then a packet or a control
//! message), an overflow frame, a parity's XOR. Must never panic; every control message the
//! decoders accept is canonical (it re-encodes to the same bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel::protocol::media::{
    decode_overflow_head, decode_request, encode_overflow, encode_request, rtp_id, xor_packet,
    Parity, Tag, OVERFLOW_HEAD, TAG_LEN,
};

fuzz_target!(|data: &[u8]| {
    if let Some(tag) = Tag::decode(data) {
        assert_eq!(Tag::decode(&tag.encode()), Some(tag));
        let body = &data[TAG_LEN..];
        if let Some((ssrc, seqs)) = decode_request(body) {
            let seqs: Vec<u16> = seqs.collect();
            assert_eq!(encode_request(ssrc, &seqs), body);
        }
        if let Some(parity) = Parity::decode(body) {
            assert_eq!(parity.encode(), body);
            let _ = xor_packet(&parity.xor);
        }
        let _ = rtp_id(body);
    }
    if let Some(head) = data.get(..OVERFLOW_HEAD) {
        let (kind, len) = decode_overflow_head(head.try_into().unwrap());
        assert!(kind <= 1);
        if let Some(packet) = data.get(OVERFLOW_HEAD..OVERFLOW_HEAD + len) {
            let frame = encode_overflow(kind, packet);
            assert_eq!(
                decode_overflow_head(frame[..OVERFLOW_HEAD].try_into().unwrap()),
                (kind, len)
            );
            assert_eq!(&frame[OVERFLOW_HEAD..], packet);
        }
    }
});
