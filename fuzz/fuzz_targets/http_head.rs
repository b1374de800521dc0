//! Any bytes as the start of an HTTP/1.x connection, read as either head: the request the
//! connecting side reads from the browser, the response it reads from the device. Must never
//! panic; a decoded head stays within its cap and re-encodes to one that parses back equal;
//! the body tracker, fed the rest in two pieces, takes what it takes in one, never more.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel::protocol::http::{
    parse_request, parse_response, request_body, response_body, BodyKind, BodyTracker, HeadError,
    MAX_HEAD,
};

/// Feeds `pieces` in turn; returns the bytes taken and whether the body ended.
fn track(kind: BodyKind, pieces: &[&[u8]]) -> Result<(usize, bool), HeadError> {
    let mut tracker = BodyTracker::new(kind);
    let mut used = 0;
    for piece in pieces {
        let fed = tracker.feed(piece)?;
        assert!(fed.used <= piece.len());
        assert!(fed.done || fed.used == piece.len());
        used += fed.used;
    }
    Ok((used, tracker.is_done()))
}

/// The body in one piece, and split where `seed` says.
fn check_body(kind: BodyKind, rest: &[u8], seed: usize) {
    let (a, b) = rest.split_at(seed % (rest.len() + 1));
    assert_eq!(track(kind, &[a, b]), track(kind, &[rest]));
}

fuzz_target!(|data: &[u8]| {
    let seed = data.iter().fold(0usize, |h, &b| {
        h.wrapping_mul(31).wrapping_add(usize::from(b))
    });
    check_body(BodyKind::Chunked, data, seed);
    match parse_request(data) {
        Ok(Some((head, used))) => {
            assert!(used <= data.len() && used <= MAX_HEAD);
            let wire = head.encode();
            // Re-encoding writes CRLF and ": ", so a head near the cap may outgrow it.
            if wire.len() <= MAX_HEAD {
                assert_eq!(parse_request(&wire), Ok(Some((head.clone(), wire.len()))));
            }
            if let Ok(kind) = request_body(&head) {
                check_body(kind, &data[used..], seed);
            }
        }
        Ok(None) => assert!(data.len() < MAX_HEAD),
        Err(_) => {}
    }
    match parse_response(data) {
        Ok(Some((head, used))) => {
            assert!(used <= data.len() && used <= MAX_HEAD);
            let wire = head.encode();
            if wire.len() <= MAX_HEAD {
                assert_eq!(parse_response(&wire), Ok(Some((head.clone(), wire.len()))));
            }
            check_body(response_body("GET", &head), &data[used..], seed);
        }
        Ok(None) => assert!(data.len() < MAX_HEAD),
        Err(_) => {}
    }
});
