//! HTTP/1.x as pure data: message heads (parsed with `httparse`, capped, re-encoded) and body
//! framing (RFC 9112 §6), so the connecting side can rewrite each head and still forward every
//! body byte for byte. No I/O.
//!
//! Why `httparse` and not a parser of our own as for RTSP: it is the parser under hyper, fuzzed
//! and hardened against the usual request-line and header tricks. It has no size limit and no
//! body framing; those are here. Heads are re-encoded (CRLF, `Name: value`), because the
//! rewrite changes them; bodies never are.
//!
//! [`parse_request`] and [`parse_response`] return `Ok(None)` for "need more bytes", which is
//! different from `Err` (these bytes can never become a valid head). [`BodyTracker`] finds
//! where a body ends in a stream split at any byte, so the next message's head can be read.

use std::fmt;

/// Longest head, from the start line (and the empty lines before it) through the blank line.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (size and extensions, with its line end).
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Most hex digits in a chunk size: 15 cannot overflow a `u64`.
const MAX_CHUNK_DIGITS: u8 = 15;

/// One header field, as received: the name keeps its case; the value is raw bytes (obs-text
/// is kept), without the whitespace around it.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

impl Header {
    fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }
}

/// Credentials and cookies are masked, so a logged head leaks no session.
impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SECRET: [&str; 4] = [
            "authorization",
            "proxy-authorization",
            "cookie",
            "set-cookie",
        ];
        if SECRET.iter().any(|s| self.is(s)) {
            write!(f, "{}: <redacted>", self.name)
        } else {
            write!(
                f,
                "{}: {:?}",
                self.name,
                String::from_utf8_lossy(&self.value)
            )
        }
    }
}

/// Header fields in the order received, repeats kept. Names compare case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Headers(pub Vec<Header>);

impl Headers {
    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|h| h.is(name))
            .map(|h| h.value.as_slice())
    }

    /// The first value of `name`, if it is UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
        self.0
            .iter()
            .filter(move |h| h.is(name))
            .map(|h| h.value.as_slice())
    }

    /// Makes `value` the only value of `name`, where the first one was, or at the end.
    pub fn set(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        let header = Header {
            name: name.to_owned(),
            value: value.into(),
        };
        let Some(first) = self.0.iter().position(|h| h.is(name)) else {
            self.0.push(header);
            return;
        };
        let mut i = 0;
        self.0.retain(|h| {
            let keep = i == first || !h.is(name);
            i += 1;
            keep
        });
        self.0[first] = header;
    }

    /// Adds a field at the end, after any others of that name.
    pub fn append(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        self.0.push(Header {
            name: name.to_owned(),
            value: value.into(),
        });
    }

    /// Removes every field `name`.
    pub fn remove(&mut self, name: &str) {
        self.0.retain(|h| !h.is(name));
    }

    /// Whether the comma-separated lists of every `name` field hold `token`
    /// (case-insensitive, trimmed): `Connection: keep-alive, Upgrade`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        list(self.get_all(name)).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
    }
}

/// The non-empty, trimmed elements of comma-separated list values.
fn list<'a>(values: impl Iterator<Item = &'a [u8]>) -> impl Iterator<Item = &'a [u8]> {
    values
        .flat_map(|v| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// A request's start line and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// As sent: origin-form `/x?y`, absolute-form `http://h/x`, authority-form or `*`.
    pub target: String,
    /// The `m` of `HTTP/1.m`.
    pub minor: u8,
    pub headers: Headers,
}

/// A response's status line and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The `m` of `HTTP/1.m`.
    pub minor: u8,
    pub status: u16,
    /// May be empty; obs-text is kept lossily.
    pub reason: String,
    pub headers: Headers,
}

/// Why bytes are not an acceptable HTTP/1.x head or body. These never become valid with more
/// bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Answer 431.
    #[error("message head longer than {MAX_HEAD} bytes")]
    TooLarge,
    /// Answer 431.
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    /// Answer 400 (or, for a response, 502).
    #[error("malformed HTTP message: {0}")]
    Invalid(String),
}

fn invalid(why: &str) -> HeadError {
    HeadError::Invalid(why.to_owned())
}

/// Maps the outcome of an `httparse` parse over at most [`MAX_HEAD`] bytes of `buf`.
fn head_len(buf: &[u8], parsed: httparse::Result<usize>) -> Result<Option<usize>, HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyHeaders),
        Err(e) => Err(HeadError::Invalid(e.to_string())),
    }
}

fn window(buf: &[u8]) -> &[u8] {
    &buf[..buf.len().min(MAX_HEAD)]
}

fn headers(parsed: &[httparse::Header<'_>]) -> Headers {
    Headers(
        parsed
            .iter()
            .map(|h| Header {
                name: h.name.to_owned(),
                value: h.value.to_vec(),
            })
            .collect(),
    )
}

/// Parses a request head at the start of `buf`, skipping empty lines before it
/// (RFC 9112 §2.2). Returns the head and the bytes it took, blank lines included.
pub fn parse_request(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let parsed = req.parse(window(buf));
    let Some(len) = head_len(buf, parsed)? else {
        return Ok(None);
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(invalid("incomplete request line"));
    };
    let head = RequestHead {
        method: method.to_owned(),
        target: target.to_owned(),
        minor,
        headers: headers(req.headers),
    };
    Ok(Some((head, len)))
}

/// Parses a response head at the start of `buf`. Returns the head and the bytes it took.
pub fn parse_response(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let parsed = resp.parse(window(buf));
    let Some(len) = head_len(buf, parsed)? else {
        return Ok(None);
    };
    let (Some(minor), Some(status)) = (resp.version, resp.code) else {
        return Err(invalid("incomplete status line"));
    };
    let head = ResponseHead {
        minor,
        status,
        reason: reason(&buf[..len]),
        headers: headers(resp.headers),
    };
    Ok(Some((head, len)))
}

/// The reason phrase of a head `httparse` accepted, read here because `httparse` gives an
/// empty one when it holds obs-text.
fn reason(head: &[u8]) -> String {
    let start = head
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(head.len());
    let line = head[start..]
        .split(|&b| b == b'\n')
        .next()
        .unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // "HTTP/1.1 200" is 12 bytes; the reason follows one space.
    String::from_utf8_lossy(line.get(13..).unwrap_or_default()).into_owned()
}

fn encode_headers(out: &mut Vec<u8>, headers: &Headers) {
    for h in &headers.0 {
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(&h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

impl RequestHead {
    /// `METHOD target HTTP/1.m`, the fields, the blank line; CRLF line ends.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            format!("{} {} HTTP/1.{}\r\n", self.method, self.target, self.minor).into_bytes();
        encode_headers(&mut out, &self.headers);
        out
    }
}

impl ResponseHead {
    /// `HTTP/1.m status reason`, the fields, the blank line; CRLF line ends.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.{} {:03} {}\r\n",
            self.minor, self.status, self.reason
        )
        .into_bytes();
        encode_headers(&mut out, &self.headers);
        out
    }
}

/// How the body after a head is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body: the next message starts right after the head.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding, through the last chunk and trailers.
    Chunked,
    /// Everything until the connection closes.
    UntilClose,
}

/// Whether the last transfer coding is `chunked`.
fn chunked_last(headers: &Headers) -> bool {
    list(headers.get_all("transfer-encoding"))
        .last()
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
}

/// The Content-Length, if any; `Err` when a value is not digits or two values differ.
fn content_length(headers: &Headers) -> Result<Option<u64>, HeadError> {
    let mut length = None;
    for value in headers
        .get_all("content-length")
        .flat_map(|v| v.split(|&b| b == b','))
    {
        let n = decimal(value.trim_ascii()).ok_or_else(|| invalid("bad Content-Length"))?;
        if length.is_some_and(|l| l != n) {
            return Err(invalid("conflicting Content-Length values"));
        }
        length = Some(n);
    }
    Ok(length)
}

fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// The body framing of a request. Refuses what a server behind us could frame differently
/// (request smuggling): Transfer-Encoding with Content-Length, a Transfer-Encoding not
/// ending in chunked, HTTP/1.0 with Transfer-Encoding, conflicting or malformed lengths.
pub fn request_body(head: &RequestHead) -> Result<BodyKind, HeadError> {
    let headers = &head.headers;
    if headers.get("transfer-encoding").is_some() {
        if head.minor == 0 {
            return Err(invalid("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if headers.get("content-length").is_some() {
            return Err(invalid("both Transfer-Encoding and Content-Length"));
        }
        if !chunked_last(headers) {
            return Err(invalid("Transfer-Encoding does not end in chunked"));
        }
        return Ok(BodyKind::Chunked);
    }
    Ok(match content_length(headers)? {
        Some(n) => BodyKind::Length(n),
        None => BodyKind::None,
    })
}

/// The body framing of a response to a request with `method`. A response we cannot frame
/// runs until the connection closes.
pub fn response_body(method: &str, head: &ResponseHead) -> BodyKind {
    let status = head.status;
    if method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
        return BodyKind::None;
    }
    if method == "CONNECT" && (200..300).contains(&status) {
        return BodyKind::UntilClose;
    }
    if head.headers.get("transfer-encoding").is_some() {
        return if chunked_last(&head.headers) {
            BodyKind::Chunked
        } else {
            BodyKind::UntilClose
        };
    }
    match content_length(&head.headers) {
        Ok(Some(n)) => BodyKind::Length(n),
        Ok(None) | Err(_) => BodyKind::UntilClose,
    }
}

/// Whether the request asks to switch protocols (WebSocket): `Connection: upgrade` and an
/// `Upgrade` field.
pub fn is_upgrade(head: &RequestHead) -> bool {
    head.headers.has_token("connection", "upgrade") && head.headers.get("upgrade").is_some()
}

fn keeps_alive(minor: u8, headers: &Headers) -> bool {
    !headers.has_token("connection", "close")
        && (minor >= 1 || headers.has_token("connection", "keep-alive"))
}

/// Whether the connection may carry another request after this one: HTTP/1.1 unless
/// `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`.
pub fn keeps_alive_request(head: &RequestHead) -> bool {
    keeps_alive(head.minor, &head.headers)
}

/// The same rule as [`keeps_alive_request`], for a response.
pub fn keeps_alive_response(head: &ResponseHead) -> bool {
    keeps_alive(head.minor, &head.headers)
}

/// What one [`BodyTracker::feed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// Bytes at the start of the data that belong to the body.
    pub used: usize,
    /// The body's last byte is in.
    pub done: bool,
}

/// Finds where a body ends in a byte stream fed in pieces of any size, without changing the
/// bytes (they are forwarded as they are).
#[derive(Debug, Clone)]
pub struct BodyTracker {
    state: State,
    /// The last byte was a CR of a chunked framing line: the next must be LF.
    cr: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Body bytes still to come.
    Length(u64),
    UntilClose,
    Chunked(Chunk),
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// In a chunk-size line, `len` bytes into it.
    Size {
        size: u64,
        digits: u8,
        part: SizePart,
        len: usize,
    },
    /// Chunk data bytes still to come.
    Data(u64),
    /// The line end after chunk data.
    DataEnd,
    /// In the trailer section, `len` bytes into it; `blank` while the current line is empty.
    Trailer { len: usize, blank: bool },
}

/// Where a chunk-size line is: `1a ;name=value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizePart {
    Digits,
    /// Whitespace after the digits.
    Space,
    /// From the `;`: extensions, not interpreted.
    Ext,
}

const SIZE_LINE: Chunk = Chunk::Size {
    size: 0,
    digits: 0,
    part: SizePart::Digits,
    len: 0,
};

impl BodyTracker {
    pub fn new(kind: BodyKind) -> Self {
        let state = match kind {
            BodyKind::None | BodyKind::Length(0) => State::Done,
            BodyKind::Length(n) => State::Length(n),
            BodyKind::Chunked => State::Chunked(SIZE_LINE),
            BodyKind::UntilClose => State::UntilClose,
        };
        BodyTracker { state, cr: false }
    }

    /// Of `data` (the bytes after those fed before), how many belong to the body; `done` once
    /// its last byte is in. Never more than `data.len()`. `UntilClose` takes everything and is
    /// never done; `None` takes nothing and is done.
    pub fn feed(&mut self, data: &[u8]) -> Result<Fed, HeadError> {
        let mut used = 0;
        while used < data.len() {
            let left = (data.len() - used) as u64;
            match self.state {
                State::Done => break,
                State::UntilClose => used = data.len(),
                State::Length(n) => {
                    let take = n.min(left);
                    used += take as usize;
                    self.state = match n - take {
                        0 => State::Done,
                        rest => State::Length(rest),
                    };
                }
                State::Chunked(Chunk::Data(n)) => {
                    let take = n.min(left);
                    used += take as usize;
                    self.state = State::Chunked(match n - take {
                        0 => Chunk::DataEnd,
                        rest => Chunk::Data(rest),
                    });
                }
                State::Chunked(chunk) => {
                    self.state = self.framing_byte(chunk, data[used])?;
                    used += 1;
                }
            }
        }
        Ok(Fed {
            used,
            done: self.is_done(),
        })
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// One byte of a chunk-size line, a chunk's line end or the trailer section.
    fn framing_byte(&mut self, chunk: Chunk, b: u8) -> Result<State, HeadError> {
        if self.cr && b != b'\n' {
            return Err(invalid("CR without LF in chunked framing"));
        }
        let eol = b == b'\n';
        self.cr = b == b'\r';
        let next = match chunk {
            Chunk::Size { len, .. } if len >= MAX_CHUNK_LINE => {
                return Err(invalid("chunk-size line too long"))
            }
            Chunk::Size { digits: 0, .. } if eol => return Err(invalid("missing chunk size")),
            Chunk::Size { size: 0, .. } if eol => Chunk::Trailer {
                len: 0,
                blank: true,
            },
            Chunk::Size { size, .. } if eol => Chunk::Data(size),
            Chunk::Size {
                size,
                digits,
                part,
                len,
            } => {
                let (size, digits, part) = if self.cr {
                    (size, digits, part)
                } else {
                    size_char(size, digits, part, b)?
                };
                Chunk::Size {
                    size,
                    digits,
                    part,
                    len: len + 1,
                }
            }
            Chunk::DataEnd if eol => SIZE_LINE,
            Chunk::DataEnd if self.cr => Chunk::DataEnd,
            Chunk::DataEnd => return Err(invalid("chunk data not followed by a line end")),
            Chunk::Trailer { len, .. } if len >= MAX_HEAD => {
                return Err(invalid("trailer section too long"))
            }
            Chunk::Trailer { blank: true, .. } if eol => return Ok(State::Done),
            Chunk::Trailer { len, blank } => Chunk::Trailer {
                len: len + 1,
                blank: eol || (blank && self.cr),
            },
            // Taken in bulk by `feed`.
            Chunk::Data(_) => chunk,
        };
        Ok(State::Chunked(next))
    }
}

/// One byte of a chunk-size line other than its line end.
fn size_char(
    size: u64,
    digits: u8,
    part: SizePart,
    b: u8,
) -> Result<(u64, u8, SizePart), HeadError> {
    match (part, (b as char).to_digit(16)) {
        (SizePart::Digits, Some(_)) if digits == MAX_CHUNK_DIGITS => {
            Err(invalid("chunk size too large"))
        }
        (SizePart::Digits, Some(d)) => Ok((size << 4 | u64::from(d), digits + 1, part)),
        (SizePart::Digits, None) if digits == 0 => Err(invalid("chunk size is not hex")),
        (SizePart::Ext, _) => Ok((size, digits, part)),
        _ if b == b';' => Ok((size, digits, SizePart::Ext)),
        _ if b == b' ' || b == b'\t' => Ok((size, digits, SizePart::Space)),
        _ => Err(invalid("junk after the chunk size")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(raw: &str) -> RequestHead {
        parse_request(raw.as_bytes()).unwrap().unwrap().0
    }

    fn resp(raw: &str) -> ResponseHead {
        parse_response(raw.as_bytes()).unwrap().unwrap().0
    }

    fn is_invalid<T: fmt::Debug>(r: Result<T, HeadError>) -> bool {
        matches!(r, Err(HeadError::Invalid(_)))
    }

    /// Feeds `whole` in pieces cut at `cuts` and checks the tracker takes exactly the first
    /// `end` bytes and is done from the first piece that holds byte `end - 1`.
    fn check_tracker(
        kind: BodyKind,
        whole: &[u8],
        end: usize,
        mut cuts: Vec<usize>,
    ) -> Result<(), TestCaseError> {
        cuts.push(0);
        cuts.push(whole.len());
        cuts.sort_unstable();
        let mut tracker = BodyTracker::new(kind);
        let (mut fed_len, mut used) = (0, 0);
        for w in cuts.windows(2) {
            let piece = &whole[w[0]..w[1]];
            let fed = tracker
                .feed(piece)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            fed_len += piece.len();
            used += fed.used;
            prop_assert!(fed.used <= piece.len());
            prop_assert_eq!(fed.done, fed_len >= end);
            prop_assert_eq!(used, fed_len.min(end));
        }
        prop_assert!(tracker.is_done());
        Ok(())
    }

    fn token() -> impl Strategy<Value = String> {
        "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}"
    }

    /// Field values as `httparse` returns them: no CR/LF, no whitespace at either end.
    fn value() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![0x21u8..=0x7e, 0x80u8..=0xff, Just(b' '), Just(b'\t')];
        proptest::collection::vec(byte, 0..24).prop_map(|v| v.trim_ascii().to_vec())
    }

    fn headers_strategy() -> impl Strategy<Value = Headers> {
        proptest::collection::vec((token(), value()), 0..8).prop_map(|fields| {
            Headers(
                fields
                    .into_iter()
                    .map(|(name, value)| Header { name, value })
                    .collect(),
            )
        })
    }

    fn request_head() -> impl Strategy<Value = RequestHead> {
        (
            token(),
            "[!-~\u{80}-\u{10ffff}]{1,30}",
            0u8..2,
            headers_strategy(),
        )
            .prop_map(|(method, target, minor, headers)| RequestHead {
                method,
                target,
                minor,
                headers,
            })
    }

    fn response_head() -> impl Strategy<Value = ResponseHead> {
        (
            0u8..2,
            100u16..1000,
            "[\t -~\u{80}-\u{10ffff}]{0,20}",
            headers_strategy(),
        )
            .prop_map(|(minor, status, reason, headers)| ResponseHead {
                minor,
                status,
                reason,
                headers,
            })
    }

    /// A chunk-size line end: CRLF or a bare LF.
    fn eol(lf_only: bool) -> &'static str {
        if lf_only {
            "\n"
        } else {
            "\r\n"
        }
    }

    type ChunkSpec = (Vec<u8>, Option<String>, usize, bool, bool);

    fn chunk_spec() -> impl Strategy<Value = ChunkSpec> {
        (
            proptest::collection::vec(any::<u8>(), 1..300),
            proptest::option::of(";[a-z]{1,5}(=[a-z0-9\"]{0,8})?"),
            0usize..3,
            any::<bool>(),
            any::<bool>(),
        )
    }

    /// The chunk-size line of a chunk of `len` bytes.
    fn size_line(len: usize, ext: &Option<String>, zeros: usize, upper: bool, lf: bool) -> String {
        let hex = if upper {
            format!("{len:X}")
        } else {
            format!("{len:x}")
        };
        let ext = ext.as_deref().unwrap_or_default();
        format!("{}{hex}{ext}{}", "0".repeat(zeros), eol(lf))
    }

    proptest! {
        #[test]
        fn request_heads_round_trip(
            head in request_head(),
            body in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let wire = head.encode();
            let mut buf = wire.clone();
            buf.extend_from_slice(&body);
            prop_assert_eq!(parse_request(&buf).unwrap(), Some((head, wire.len())));
            for cut in 0..wire.len() {
                prop_assert_eq!(parse_request(&wire[..cut]), Ok(None));
            }
        }

        #[test]
        fn response_heads_round_trip(
            head in response_head(),
            body in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let wire = head.encode();
            let mut buf = wire.clone();
            buf.extend_from_slice(&body);
            prop_assert_eq!(parse_response(&buf).unwrap(), Some((head, wire.len())));
            for cut in 0..wire.len() {
                prop_assert_eq!(parse_response(&wire[..cut]), Ok(None));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            if let Ok(Some((head, used))) = parse_request(&bytes) {
                prop_assert!(used <= bytes.len());
                let rest = &bytes[used..];
                if let Ok(Ok(fed)) = request_body(&head).map(|k| BodyTracker::new(k).feed(rest)) {
                    prop_assert!(fed.used <= rest.len());
                }
            }
            if let Ok(Some((_, used))) = parse_response(&bytes) {
                prop_assert!(used <= bytes.len());
            }
            if let Ok(fed) = BodyTracker::new(BodyKind::Chunked).feed(&bytes) {
                prop_assert!(fed.used <= bytes.len());
            }
        }

        #[test]
        fn chunked_bodies_end_exactly(
            chunks in proptest::collection::vec(chunk_spec(), 0..6),
            last in (proptest::option::of(";[a-z]{1,5}"), 0usize..3, any::<bool>()),
            trailers in proptest::collection::vec(
                ("[A-Za-z-]{1,10}", "[ -~]{0,20}", any::<bool>()),
                0..3,
            ),
            end_lf in any::<bool>(),
            next in proptest::collection::vec(any::<u8>(), 0..40),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut body = Vec::new();
            for (data, ext, zeros, upper, lf) in &chunks {
                body.extend_from_slice(size_line(data.len(), ext, *zeros, *upper, *lf).as_bytes());
                body.extend_from_slice(data);
                body.extend_from_slice(eol(*lf).as_bytes());
            }
            let (ext, zeros, lf) = last;
            body.extend_from_slice(size_line(0, &ext, zeros, false, lf).as_bytes());
            for (name, value, lf) in &trailers {
                body.extend_from_slice(format!("{name}: {value}{}", eol(*lf)).as_bytes());
            }
            body.extend_from_slice(eol(end_lf).as_bytes());
            let end = body.len();
            body.extend_from_slice(&next);
            let cuts = cuts.iter().map(|i| i.index(body.len() + 1)).collect();
            check_tracker(BodyKind::Chunked, &body, end, cuts)?;
        }

        #[test]
        fn length_bodies_end_exactly(
            body in proptest::collection::vec(any::<u8>(), 0..300),
            next in proptest::collection::vec(any::<u8>(), 0..40),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let end = body.len();
            let whole = [body, next].concat();
            let cuts = cuts.iter().map(|i| i.index(whole.len() + 1)).collect();
            check_tracker(BodyKind::Length(end as u64), &whole, end, cuts)?;
        }
    }

    #[test]
    fn leading_empty_lines_are_skipped_and_counted() {
        let raw = b"\r\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\nbody";
        let (head, used) = parse_request(raw).unwrap().unwrap();
        assert_eq!(used, raw.len() - 4);
        assert_eq!((head.method.as_str(), head.target.as_str()), ("GET", "/"));
        assert_eq!(parse_request(b"\r\n\r\n"), Ok(None));
    }

    #[test]
    fn reasons_may_be_empty_or_hold_obs_text() {
        assert_eq!(resp("HTTP/1.1 200\r\n\r\n").reason, "");
        assert_eq!(resp("HTTP/1.1 204 \r\n\r\n").reason, "");
        assert_eq!(resp("HTTP/1.0 404 Not  Found \n\n").reason, "Not  Found ");
        let head = parse_response(b"HTTP/1.1 200 Gr\xfc\xdfe\r\n\r\n")
            .unwrap()
            .unwrap()
            .0;
        assert_eq!(head.reason, "Gr\u{fffd}\u{fffd}e");
        let utf8 = resp("HTTP/1.1 200 Grüße\r\n\r\n");
        assert_eq!(utf8.reason, "Grüße");
        assert_eq!(utf8.encode(), "HTTP/1.1 200 Grüße\r\n\r\n".as_bytes());
    }

    #[test]
    fn values_keep_raw_bytes_and_names_their_case() {
        let raw = b"GET / HTTP/1.1\r\nX-Name:  caf\xe9 \t\r\nx-name: b\r\n\r\n";
        let head = parse_request(raw).unwrap().unwrap().0;
        assert_eq!(head.headers.0[0].name, "X-Name");
        assert_eq!(head.headers.get("X-NAME"), Some(&b"caf\xe9"[..]));
        assert_eq!(head.headers.get_str("x-name"), None);
        let all: Vec<_> = head.headers.get_all("x-name").collect();
        assert_eq!(all, [&b"caf\xe9"[..], b"b"]);
        assert_eq!(
            head.encode(),
            b"GET / HTTP/1.1\r\nX-Name: caf\xe9\r\nx-name: b\r\n\r\n"
        );
    }

    #[test]
    fn malformed_heads_are_invalid_not_incomplete() {
        for raw in [
            "GET  / HTTP/1.1\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\n folded: x\r\n\r\n",
            "GET / HTTP/1.1\rX",
        ] {
            assert!(is_invalid(parse_request(raw.as_bytes())), "{raw:?}");
        }
        assert!(is_invalid(parse_response(b"HTTP/1.1 20x OK\r\n\r\n")));
        assert!(is_invalid(parse_response(
            b"HTTP/1.1 200 OK\r\nA: b\x00c\r\n\r\n"
        )));
    }

    #[test]
    fn a_head_longer_than_the_limit_is_too_large() {
        let mut raw = b"GET / HTTP/1.1\r\nX: ".to_vec();
        raw.resize(MAX_HEAD - 1, b'a');
        assert_eq!(parse_request(&raw), Ok(None));
        raw.resize(MAX_HEAD + 1, b'a');
        assert_eq!(parse_request(&raw), Err(HeadError::TooLarge));
        raw.truncate(MAX_HEAD - 4);
        raw.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_request(&raw).unwrap().unwrap().1, MAX_HEAD);
        let mut raw = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        raw.resize(MAX_HEAD + 1, b'a');
        assert_eq!(parse_response(&raw), Err(HeadError::TooLarge));
    }

    #[test]
    fn more_than_max_headers_is_refused() {
        let head = |n: usize| {
            let mut raw = "GET / HTTP/1.1\r\n".to_owned();
            for i in 0..n {
                raw.push_str(&format!("X-{i}: {i}\r\n"));
            }
            raw + "\r\n"
        };
        assert_eq!(req(&head(MAX_HEADERS)).headers.0.len(), MAX_HEADERS);
        assert_eq!(
            parse_request(head(MAX_HEADERS + 1).as_bytes()),
            Err(HeadError::TooManyHeaders)
        );
        let resp = head(MAX_HEADERS + 1).replace("GET / HTTP/1.1", "HTTP/1.1 200 OK");
        assert_eq!(
            parse_response(resp.as_bytes()),
            Err(HeadError::TooManyHeaders)
        );
    }

    #[test]
    fn set_keeps_the_first_position_and_drops_the_rest() {
        let mut h = req("GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\na: 3\r\nC: 4\r\n\r\n").headers;
        h.set("a", "x");
        let names: Vec<_> = h.0.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a", "B", "C"]);
        assert_eq!(h.get("A"), Some(&b"x"[..]));
        h.set("D", "y");
        assert_eq!(h.0.last().map(|f| f.name.as_str()), Some("D"));
        h.append("b", "5");
        assert_eq!(h.get_all("B").collect::<Vec<_>>(), [b"2", b"5"]);
        h.remove("B");
        assert_eq!(h.get("b"), None);
        assert_eq!(h.0.len(), 3);
    }

    #[test]
    fn tokens_span_every_field_of_a_name() {
        let h =
            req("GET / HTTP/1.1\r\nConnection: keep-alive , Upgrade\r\nconnection: ,x,\r\n\r\n")
                .headers;
        assert!(h.has_token("connection", "upgrade"));
        assert!(h.has_token("Connection", "KEEP-ALIVE"));
        assert!(h.has_token("connection", "x"));
        assert!(!h.has_token("connection", "keep"));
        assert!(!h.has_token("connection", ""));
    }

    #[test]
    fn secrets_are_masked_in_debug() {
        let h = req("GET / HTTP/1.1\r\nCookie: session=s3cret\r\n\
                     Authorization: Basic eA==\r\nAccept: */*\r\n\r\n");
        let debug = format!("{h:?}");
        assert!(
            !debug.contains("s3cret") && !debug.contains("eA=="),
            "{debug}"
        );
        assert!(debug.contains("*/*"), "{debug}");
    }

    #[test]
    fn request_framing() {
        let body = |fields: &str| request_body(&req(&format!("POST / HTTP/1.1\r\n{fields}\r\n")));
        assert_eq!(body(""), Ok(BodyKind::None));
        assert_eq!(body("Content-Length: 5\r\n"), Ok(BodyKind::Length(5)));
        assert_eq!(body("Content-Length: 0\r\n"), Ok(BodyKind::Length(0)));
        assert_eq!(
            body("Content-Length: 5\r\nContent-Length: 5\r\n"),
            Ok(BodyKind::Length(5))
        );
        assert_eq!(body("Content-Length: 5, 5\r\n"), Ok(BodyKind::Length(5)));
        assert_eq!(
            body("Transfer-Encoding: chunked\r\n"),
            Ok(BodyKind::Chunked)
        );
        assert_eq!(
            body("Transfer-Encoding: gzip, CHUNKED\r\n"),
            Ok(BodyKind::Chunked)
        );
        assert_eq!(
            body("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"),
            Ok(BodyKind::Chunked)
        );
        for smuggling in [
            "Transfer-Encoding: chunked, gzip\r\n",
            "Transfer-Encoding: gzip\r\n",
            "Transfer-Encoding: \r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: 5, 6\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: 5x\r\n",
            "Content-Length: \r\n",
            "Content-Length: 0x5\r\n",
            "Content-Length: 99999999999999999999\r\n",
        ] {
            assert!(is_invalid(body(smuggling)), "{smuggling:?}");
        }
        let old = req("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(is_invalid(request_body(&old)));
    }

    #[test]
    fn response_framing() {
        let body = |method: &str, head: &str| response_body(method, &resp(head));
        let length = "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n";
        assert_eq!(body("GET", length), BodyKind::Length(7));
        assert_eq!(body("HEAD", length), BodyKind::None);
        for status in ["101", "103", "204", "304"] {
            let head = length.replace("200", status);
            assert_eq!(body("GET", &head), BodyKind::None, "{status}");
        }
        assert_eq!(body("CONNECT", length), BodyKind::UntilClose);
        assert_eq!(
            body("CONNECT", &length.replace("200", "407")),
            BodyKind::Length(7)
        );
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 7\r\n\r\n";
        assert_eq!(body("GET", chunked), BodyKind::Chunked);
        let gzip = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n";
        assert_eq!(body("GET", gzip), BodyKind::UntilClose);
        let bad = "HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 8\r\n\r\n";
        assert_eq!(body("GET", bad), BodyKind::UntilClose);
        assert_eq!(body("GET", "HTTP/1.0 200 OK\r\n\r\n"), BodyKind::UntilClose);
    }

    #[test]
    fn upgrades_and_keep_alive() {
        assert!(is_upgrade(&req(
            "GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )));
        assert!(!is_upgrade(&req(
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"
        )));
        assert!(!is_upgrade(&req(
            "GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n"
        )));

        assert!(keeps_alive_request(&req("GET / HTTP/1.1\r\n\r\n")));
        assert!(!keeps_alive_request(&req(
            "GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"
        )));
        assert!(!keeps_alive_request(&req("GET / HTTP/1.0\r\n\r\n")));
        assert!(keeps_alive_request(&req(
            "GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"
        )));
        assert!(keeps_alive_response(&resp("HTTP/1.1 200 OK\r\n\r\n")));
        assert!(!keeps_alive_response(&resp(
            "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
        )));
        assert!(!keeps_alive_response(&resp("HTTP/1.0 200 OK\r\n\r\n")));
        assert!(keeps_alive_response(&resp(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n"
        )));
    }

    #[test]
    fn trackers_for_none_and_until_close() {
        let mut none = BodyTracker::new(BodyKind::None);
        assert!(none.is_done());
        assert_eq!(
            none.feed(b"GET"),
            Ok(Fed {
                used: 0,
                done: true
            })
        );
        let mut all = BodyTracker::new(BodyKind::UntilClose);
        assert_eq!(
            all.feed(b"abc"),
            Ok(Fed {
                used: 3,
                done: false
            })
        );
        assert_eq!(
            all.feed(b""),
            Ok(Fed {
                used: 0,
                done: false
            })
        );
        let mut length = BodyTracker::new(BodyKind::Length(3));
        assert_eq!(
            length.feed(b"ab"),
            Ok(Fed {
                used: 2,
                done: false
            })
        );
        assert_eq!(
            length.feed(b"cde"),
            Ok(Fed {
                used: 1,
                done: true
            })
        );
        assert_eq!(
            length.feed(b"e"),
            Ok(Fed {
                used: 0,
                done: true
            })
        );
    }

    #[test]
    fn chunked_framing() {
        let ends = |raw: &[u8]| BodyTracker::new(BodyKind::Chunked).feed(raw);
        let raw = b"4;a=\"b\"\r\nWiki\r\n5 \r\npedia\r\n0\r\nX: y\r\n\r\nNEXT";
        assert_eq!(
            ends(raw),
            Ok(Fed {
                used: raw.len() - 4,
                done: true
            })
        );
        assert_eq!(
            ends(b"A\nabcdefghij\n0\n\n"),
            Ok(Fed {
                used: 16,
                done: true
            })
        );
        assert_eq!(
            ends(b"000\r\n\r\n"),
            Ok(Fed {
                used: 7,
                done: true
            })
        );
        assert_eq!(
            ends(b"fffffffffffffff\r\nab"),
            Ok(Fed {
                used: 19,
                done: false
            })
        );
        for bad in [
            &b"\r\n"[..],
            b";ext\r\n",
            b"g\r\n",
            b"0x5\r\n",
            b"5 6\r\n",
            b"1000000000000000\r\n",
            b"1\r\nab\r\n",
            b"1\r\na\rX",
            b"1\ra",
            b"0\r\nX: y\rZ",
        ] {
            assert!(is_invalid(ends(bad)), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn chunked_framing_lines_are_capped() {
        let mut line = b"1;".to_vec();
        line.resize(MAX_CHUNK_LINE - 2, b'x');
        line.extend_from_slice(b"\r\n");
        assert_eq!(
            BodyTracker::new(BodyKind::Chunked)
                .feed(&line)
                .map(|f| f.used),
            Ok(MAX_CHUNK_LINE)
        );
        line.insert(2, b'x');
        assert!(is_invalid(BodyTracker::new(BodyKind::Chunked).feed(&line)));

        let mut tracker = BodyTracker::new(BodyKind::Chunked);
        let mut trailers = b"0\r\n".to_vec();
        while trailers.len() < MAX_HEAD + 16 {
            trailers.extend_from_slice(b"X-Long: aaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(is_invalid(tracker.feed(&trailers)));
    }
}
