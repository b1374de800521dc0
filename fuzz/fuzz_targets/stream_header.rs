//! Any bytes as the first bytes of a stream, read as either header: the request the exposing
//! side reads, the response the connecting side reads. Must never panic; a decoded header
//! stays within its cap and survives a re-encode unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel::protocol::header::{
    decode_request, decode_response, encode_request, encode_response, MAX_REQUEST_LEN,
    MAX_RESPONSE_LEN,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((req, used))) = decode_request(data) {
        assert!(used <= data.len() && used <= MAX_REQUEST_LEN);
        let wire = encode_request(&req).expect("a decoded request encodes");
        assert_eq!(decode_request(&wire).unwrap().map(|(r, _)| r), Some(req));
    }
    if let Ok(Some((resp, used))) = decode_response(data) {
        assert!(used <= data.len() && used <= MAX_RESPONSE_LEN);
        let wire = encode_response(&resp);
        assert_eq!(decode_response(&wire).unwrap().map(|(r, _)| r), Some(resp));
    }
});
