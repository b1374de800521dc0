//! Any bytes as a TCP link's stream (either direction) and as an echo packet. Must never
//! panic; every decoded frame re-encodes to the same bytes, and an echo to the same echo.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel::protocol::link::{decode, encode, Echo, HEADER, MAX_DATAGRAM};

fuzz_target!(|data: &[u8]| {
    let mut rest: &[u8] = data;
    while let Ok(Some((port, range))) = decode(rest) {
        assert!(range.start == HEADER && range.end <= rest.len());
        assert!(range.len() >= 1 && range.len() <= MAX_DATAGRAM);
        let again = encode(port, &rest[range.clone()]).unwrap();
        assert_eq!(&again[..], &rest[..range.end]);
        rest = &rest[range.end..];
    }
    if let Some(e) = Echo::parse(data) {
        assert_eq!(Echo::parse(&e.encode()), Some(e));
    }
});
