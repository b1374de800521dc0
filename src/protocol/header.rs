//! The stream header: the first bytes of every QUIC bidirectional stream.
//!
//! Pure codec over byte slices, no I/O. Decoders return `Ok(None)` when they need more bytes,
//! which is different from `Err` (the bytes can never become a valid header). Every length is
//! capped, so a hostile peer cannot make a reader buffer more than [`MAX_REQUEST_LEN`] or
//! [`MAX_RESPONSE_LEN`] bytes. The layout is documented in `docs/protocol.md`.
//!
//! ```text
//! request  = version:u8 | name_len:u8 | service:name_len | ext_len:u16be | ext:ext_len
//! response = version:u8 | status:u8   | msg_len:u16be    | message:msg_len | ext_len:u16be | ext
//! ext      = *( type:u8 | len:u16be | value:len )     unknown types are skipped
//! ```

use std::fmt;

/// Version written in the first byte of every header.
pub const VERSION: u8 = 1;
/// Longest service name.
pub const MAX_SERVICE_LEN: usize = 64;
/// Longest extension area of a request or response.
pub const MAX_EXT_LEN: usize = 1024;
/// Longest human-readable message in a response.
pub const MAX_MESSAGE_LEN: usize = 512;
/// Longest encoded request.
pub const MAX_REQUEST_LEN: usize = 2 + MAX_SERVICE_LEN + 2 + MAX_EXT_LEN;
/// Longest encoded response.
pub const MAX_RESPONSE_LEN: usize = 2 + 2 + MAX_MESSAGE_LEN + 2 + MAX_EXT_LEN;

/// Request extension: the local client's socket address, as text, for the exposing side's logs.
const EXT_CLIENT_ADDR: u8 = 1;
/// Request extension: what the request asks for, `op:u8` ([`Op`]); absent means [`Op::Open`].
const EXT_OP: u8 = 2;
/// Response extension: the service's protocol, `kind:u8 | rtsp_udp:u8` (see [`Protocol`]).
const EXT_PROTOCOL: u8 = 1;
/// Response extension of an HTTP service ([`HttpService`]):
/// `flags:u8 | target_len:u8 | target | host_len:u8 | host`, flags bit 0 = TLS, bit 1 = forwarded.
const EXT_HTTP: u8 = 2;

/// What a service speaks, declared on the exposing side and learned by the connecting side
/// from the response: it picks the layer between the socket and the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// Bytes, copied unchanged.
    #[default]
    Tcp,
    /// RTSP 1.0 (`docs/rtsp.md`): UDP SETUPs are carried as QUIC datagrams or refused.
    Rtsp(RtspUdp),
    /// HTTP/1.1 (`docs/http.md`): the connecting side reads every request and response head
    /// and rewrites names; the response's [`HttpService`] says how.
    Http,
}

/// What the RTSP layer does with a SETUP that asks for RTP over UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RtspUdp {
    /// Keep the client's UDP: RTP and RTCP cross the tunnel as QUIC datagrams.
    #[default]
    Datagram,
    /// Answer `461 Unsupported Transport`, so the client falls back to interleaved TCP.
    Refuse,
}

impl Protocol {
    fn encode(self) -> [u8; 2] {
        match self {
            Protocol::Tcp => [0, 0],
            Protocol::Rtsp(RtspUdp::Datagram) => [1, 0],
            Protocol::Rtsp(RtspUdp::Refuse) => [1, 1],
            Protocol::Http => [2, 0],
        }
    }

    /// A kind this build does not know is carried as bytes.
    fn decode(value: &[u8]) -> Protocol {
        match value {
            [1, 1, ..] => Protocol::Rtsp(RtspUdp::Refuse),
            [1, ..] => Protocol::Rtsp(RtspUdp::Datagram),
            [2, ..] => Protocol::Http,
            _ => Protocol::Tcp,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Tcp => f.write_str("tcp"),
            Protocol::Rtsp(RtspUdp::Datagram) => f.write_str("rtsp (udp as datagrams)"),
            Protocol::Rtsp(RtspUdp::Refuse) => f.write_str("rtsp (udp refused)"),
            Protocol::Http => f.write_str("http"),
        }
    }
}

/// How the connecting side speaks to an HTTP service's device, sent with every open of one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HttpService {
    /// The device's authority as the exposing side's rules name it (`192.168.1.10:80`):
    /// responses that point the browser there are rewritten to the local name.
    pub target: String,
    /// The `Host` the device is sent (the target's, or the rules' `host_header`).
    pub host: String,
    /// The device speaks HTTPS (the exposing side holds the TLS session).
    pub tls: bool,
    /// Add `X-Forwarded-For/-Proto/-Host` to requests.
    pub forwarded: bool,
}

/// Longest [`HttpService`] name field.
pub const MAX_HTTP_NAME: usize = 255;

impl HttpService {
    fn encode(&self) -> Vec<u8> {
        let flags = u8::from(self.tls) | u8::from(self.forwarded) << 1;
        let target = clip(&self.target, MAX_HTTP_NAME);
        let host = clip(&self.host, MAX_HTTP_NAME);
        let mut out = vec![flags, target.len() as u8];
        out.extend_from_slice(target.as_bytes());
        out.push(host.len() as u8);
        out.extend_from_slice(host.as_bytes());
        out
    }

    fn decode(value: &[u8]) -> Result<HttpService, HeaderError> {
        let mut cur = Cursor { buf: value, pos: 0 };
        let text = |cur: &mut Cursor<'_>| {
            let len = cur.u8().ok_or(HeaderError::MalformedExtensions)?;
            let bytes = cur
                .bytes(len as usize)
                .ok_or(HeaderError::MalformedExtensions)?;
            std::str::from_utf8(bytes)
                .map(str::to_owned)
                .map_err(|_| HeaderError::NotUtf8)
        };
        let flags = cur.u8().ok_or(HeaderError::MalformedExtensions)?;
        let target = text(&mut cur)?;
        let host = text(&mut cur)?;
        Ok(HttpService {
            target,
            host,
            tls: flags & 1 != 0,
            forwarded: flags & 2 != 0,
        })
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Op {
    /// A stream to the service: payload follows the response.
    #[default]
    Open,
    /// The list of services this peer may use (`protocol::catalog`), then the end of the
    /// stream. The service name is empty.
    Catalog,
}

/// What the opener of a stream asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRequest {
    /// The service name, as named in the exposing side's rules.
    pub service: String,
    /// The address of the client socket on the connecting side, for logs only.
    pub client_addr: Option<String>,
    pub op: Op,
}

/// How the exposing side answers an [`OpenRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The target is connected; payload follows.
    Ok,
    /// No service of that name is exposed.
    UnknownService,
    /// The target refused the connection, was unreachable or timed out.
    TargetRefused,
    /// This peer may not use this service.
    NotAuthorised,
    /// The exposing side is at its limit of proxied sockets or is shutting down.
    Busy,
    /// The request could not be decoded (malformed, oversized or an unknown version).
    BadRequest,
    /// A status code this version does not know.
    Other(u8),
}

impl Status {
    pub fn code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::UnknownService => 1,
            Status::TargetRefused => 2,
            Status::NotAuthorised => 3,
            Status::Busy => 4,
            Status::BadRequest => 5,
            Status::Other(c) => c,
        }
    }

    pub fn from_code(code: u8) -> Self {
        match code {
            0 => Status::Ok,
            1 => Status::UnknownService,
            2 => Status::TargetRefused,
            3 => Status::NotAuthorised,
            4 => Status::Busy,
            5 => Status::BadRequest,
            c => Status::Other(c),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Ok => f.write_str("ok"),
            Status::UnknownService => f.write_str("unknown service"),
            Status::TargetRefused => f.write_str("target refused"),
            Status::NotAuthorised => f.write_str("not authorised"),
            Status::Busy => f.write_str("busy"),
            Status::BadRequest => f.write_str("bad request"),
            Status::Other(c) => write!(f, "status {c}"),
        }
    }
}

/// The exposing side's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenResponse {
    pub status: Status,
    /// Human-readable detail, logged by the connecting side. Empty when `status` is `Ok`.
    pub message: String,
    /// The service's protocol (meaningful when `status` is `Ok`).
    pub protocol: Protocol,
    /// How to speak to the device of an HTTP service (with `Protocol::Http`).
    pub http: Option<HttpService>,
}

/// Why bytes are not a valid header. These never become valid with more bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("unsupported header version {0} (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("service name is empty")]
    EmptyService,
    #[error("service name is {0} bytes, the limit is {MAX_SERVICE_LEN}")]
    ServiceTooLong(usize),
    #[error("service name has characters outside a-z A-Z 0-9 . _ -")]
    InvalidService,
    #[error("extension area is {0} bytes, the limit is {MAX_EXT_LEN}")]
    ExtensionsTooLong(usize),
    #[error("extension area is malformed")]
    MalformedExtensions,
    #[error("message is {0} bytes, the limit is {MAX_MESSAGE_LEN}")]
    MessageTooLong(usize),
    #[error("text is not UTF-8")]
    NotUtf8,
}

/// Whether `name` is a valid service name: 1 to 64 of `a-z A-Z 0-9 . _ -`.
pub fn check_service_name(name: &str) -> Result<(), HeaderError> {
    if name.is_empty() {
        return Err(HeaderError::EmptyService);
    }
    if name.len() > MAX_SERVICE_LEN {
        return Err(HeaderError::ServiceTooLong(name.len()));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(HeaderError::InvalidService);
    }
    Ok(())
}

/// A reader over a byte slice that distinguishes "need more" (`None`) from a value.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn u8(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        let bytes = self.bytes(2)?;
        Some(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let out = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(out)
    }
}

/// Returns early with `Ok(None)` when the cursor ran out of bytes.
macro_rules! need {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}

fn parse_extensions(ext: &[u8]) -> Result<Vec<(u8, &[u8])>, HeaderError> {
    let mut cur = Cursor { buf: ext, pos: 0 };
    let mut out = Vec::new();
    while cur.pos < ext.len() {
        let kind = cur.u8().ok_or(HeaderError::MalformedExtensions)?;
        let len = cur.u16().ok_or(HeaderError::MalformedExtensions)?;
        let value = cur
            .bytes(len as usize)
            .ok_or(HeaderError::MalformedExtensions)?;
        out.push((kind, value));
    }
    Ok(out)
}

fn read_ext<'a>(cur: &mut Cursor<'a>) -> Result<Option<&'a [u8]>, HeaderError> {
    let len = need!(cur.u16()) as usize;
    if len > MAX_EXT_LEN {
        return Err(HeaderError::ExtensionsTooLong(len));
    }
    Ok(Some(need!(cur.bytes(len))))
}

fn check_version(cur: &mut Cursor<'_>) -> Result<Option<()>, HeaderError> {
    let version = need!(cur.u8());
    if version != VERSION {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    Ok(Some(()))
}

/// Decodes a request from the start of `buf`. On success returns it and the bytes it used;
/// what follows is payload.
pub fn decode_request(buf: &[u8]) -> Result<Option<(OpenRequest, usize)>, HeaderError> {
    let mut cur = Cursor { buf, pos: 0 };
    need!(check_version(&mut cur)?);
    let name_len = need!(cur.u8()) as usize;
    if name_len > MAX_SERVICE_LEN {
        return Err(HeaderError::ServiceTooLong(name_len));
    }
    let name = need!(cur.bytes(name_len));
    let service = std::str::from_utf8(name).map_err(|_| HeaderError::InvalidService)?;
    let ext = need!(read_ext(&mut cur)?);
    let mut client_addr = None;
    let mut op = Op::Open;
    for (kind, value) in parse_extensions(ext)? {
        match kind {
            EXT_CLIENT_ADDR => {
                let text = std::str::from_utf8(value).map_err(|_| HeaderError::NotUtf8)?;
                client_addr = Some(text.to_owned());
            }
            EXT_OP => op = Op::decode(value)?,
            _ => {}
        }
    }
    check_name_for(op, service)?;
    Ok(Some((
        OpenRequest {
            service: service.to_owned(),
            client_addr,
            op,
        },
        cur.pos,
    )))
}

/// Encodes a request. Fails if a field is over its limit, so nothing sent is undecodable.
pub fn encode_request(req: &OpenRequest) -> Result<Vec<u8>, HeaderError> {
    check_name_for(req.op, &req.service)?;
    let mut ext = Vec::new();
    if let Some(addr) = &req.client_addr {
        push_ext(&mut ext, EXT_CLIENT_ADDR, addr.as_bytes());
    }
    if req.op != Op::Open {
        push_ext(&mut ext, EXT_OP, &[req.op.code()]);
    }
    if ext.len() > MAX_EXT_LEN {
        return Err(HeaderError::ExtensionsTooLong(ext.len()));
    }
    let mut out = Vec::with_capacity(4 + req.service.len() + ext.len());
    out.push(VERSION);
    out.push(req.service.len() as u8);
    out.extend_from_slice(req.service.as_bytes());
    out.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    out.extend_from_slice(&ext);
    Ok(out)
}

/// An open names a valid service; a catalog request names none.
fn check_name_for(op: Op, service: &str) -> Result<(), HeaderError> {
    match op {
        Op::Open => check_service_name(service),
        Op::Catalog if service.is_empty() => Ok(()),
        Op::Catalog => Err(HeaderError::MalformedExtensions),
    }
}

impl Op {
    fn code(self) -> u8 {
        match self {
            Op::Open => 0,
            Op::Catalog => 1,
        }
    }

    /// An operation this build does not know is refused, not guessed at.
    fn decode(value: &[u8]) -> Result<Op, HeaderError> {
        match value {
            [0] => Ok(Op::Open),
            [1] => Ok(Op::Catalog),
            _ => Err(HeaderError::MalformedExtensions),
        }
    }
}

fn push_ext(ext: &mut Vec<u8>, kind: u8, value: &[u8]) {
    let len = value.len().min(u16::MAX as usize);
    ext.push(kind);
    ext.extend_from_slice(&(len as u16).to_be_bytes());
    ext.extend_from_slice(&value[..len]);
}

/// Decodes a response from the start of `buf`; what follows is payload.
pub fn decode_response(buf: &[u8]) -> Result<Option<(OpenResponse, usize)>, HeaderError> {
    let mut cur = Cursor { buf, pos: 0 };
    need!(check_version(&mut cur)?);
    let status = Status::from_code(need!(cur.u8()));
    let msg_len = need!(cur.u16()) as usize;
    if msg_len > MAX_MESSAGE_LEN {
        return Err(HeaderError::MessageTooLong(msg_len));
    }
    let message = std::str::from_utf8(need!(cur.bytes(msg_len)))
        .map_err(|_| HeaderError::NotUtf8)?
        .to_owned();
    let ext = need!(read_ext(&mut cur)?);
    let mut protocol = Protocol::Tcp;
    let mut http = None;
    for (kind, value) in parse_extensions(ext)? {
        match kind {
            EXT_PROTOCOL => protocol = Protocol::decode(value),
            EXT_HTTP => http = Some(HttpService::decode(value)?),
            _ => {}
        }
    }
    Ok(Some((
        OpenResponse {
            status,
            message,
            protocol,
            http,
        },
        cur.pos,
    )))
}

/// Encodes a response. A message over the limit is cut at a character boundary.
pub fn encode_response(resp: &OpenResponse) -> Vec<u8> {
    let message = clip(&resp.message, MAX_MESSAGE_LEN).as_bytes();
    let mut out = Vec::with_capacity(6 + message.len());
    out.push(VERSION);
    out.push(resp.status.code());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
    let mut ext = Vec::new();
    if resp.protocol != Protocol::Tcp {
        push_ext(&mut ext, EXT_PROTOCOL, &resp.protocol.encode());
    }
    if let Some(http) = &resp.http {
        push_ext(&mut ext, EXT_HTTP, &http.encode());
    }
    out.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    out.extend_from_slice(&ext);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn service_name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._-]{1,64}"
    }

    proptest! {
        #[test]
        fn request_round_trips(service in service_name(),
                               client_addr in proptest::option::of(".{0,60}"),
                               payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let req = OpenRequest { service, client_addr, op: Op::Open };
            let mut bytes = encode_request(&req).unwrap();
            let header_len = bytes.len();
            bytes.extend_from_slice(&payload);
            let (decoded, used) = decode_request(&bytes).unwrap().unwrap();
            prop_assert_eq!(decoded, req);
            prop_assert_eq!(used, header_len);
            // Every strict prefix asks for more bytes rather than failing.
            for cut in 0..header_len {
                prop_assert_eq!(decode_request(&bytes[..cut]), Ok(None));
            }
        }

        #[test]
        fn response_round_trips(code in any::<u8>(), message in ".{0,100}", proto in 0u8..4,
                                http in proptest::option::of((".{0,80}", ".{0,80}", any::<bool>(), any::<bool>()))) {
            let protocol = [Protocol::Tcp, Protocol::Rtsp(RtspUdp::Datagram), Protocol::Rtsp(RtspUdp::Refuse), Protocol::Http][proto as usize];
            let http = http.map(|(target, host, tls, forwarded)| HttpService { target, host, tls, forwarded });
            let resp = OpenResponse { status: Status::from_code(code), message, protocol, http };
            let bytes = encode_response(&resp);
            let (decoded, used) = decode_response(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(decoded.status.code(), code);
            prop_assert_eq!(decoded.protocol, protocol);
            prop_assert_eq!(decoded, resp);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            if let Ok(Some((_, used))) = decode_request(&bytes) {
                prop_assert!(used <= bytes.len() && used <= MAX_REQUEST_LEN);
            }
            if let Ok(Some((_, used))) = decode_response(&bytes) {
                prop_assert!(used <= bytes.len() && used <= MAX_RESPONSE_LEN);
            }
        }
    }

    #[test]
    fn oversized_fields_are_errors_not_incomplete() {
        assert_eq!(
            decode_request(&[VERSION, 200]),
            Err(HeaderError::ServiceTooLong(200))
        );
        let mut req = vec![VERSION, 3, b'c', b'a', b'm'];
        req.extend_from_slice(&(MAX_EXT_LEN as u16 + 1).to_be_bytes());
        assert_eq!(
            decode_request(&req),
            Err(HeaderError::ExtensionsTooLong(MAX_EXT_LEN + 1))
        );
        assert_eq!(
            decode_response(&[VERSION, 0, 0xff, 0xff]),
            Err(HeaderError::MessageTooLong(0xffff))
        );
        assert_eq!(
            decode_request(&[9, 1, b'a', 0, 0]),
            Err(HeaderError::UnsupportedVersion(9))
        );
    }

    #[test]
    fn bad_service_names_are_refused() {
        assert_eq!(
            decode_request(&[VERSION, 0, 0, 0]),
            Err(HeaderError::EmptyService)
        );
        assert_eq!(
            decode_request(&[VERSION, 2, b'a', b'/', 0, 0]),
            Err(HeaderError::InvalidService)
        );
        let long = OpenRequest {
            service: "x".repeat(65),
            client_addr: None,
            op: Op::Open,
        };
        assert_eq!(encode_request(&long), Err(HeaderError::ServiceTooLong(65)));
    }

    #[test]
    fn unknown_extensions_are_skipped_and_truncated_ones_refused() {
        let mut req = vec![VERSION, 1, b'a'];
        let ext = [7u8, 0, 2, 0xaa, 0xbb, EXT_CLIENT_ADDR, 0, 1, b'x'];
        req.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        req.extend_from_slice(&ext);
        let (decoded, _) = decode_request(&req).unwrap().unwrap();
        assert_eq!(decoded.client_addr.as_deref(), Some("x"));

        let mut bad = vec![VERSION, 1, b'a', 0, 3, 7, 0, 9];
        assert_eq!(decode_request(&bad), Err(HeaderError::MalformedExtensions));
        bad.truncate(5);
        assert_eq!(decode_request(&bad), Ok(None));
    }

    #[test]
    fn a_catalog_request_names_no_service_and_an_open_one_must() {
        let catalog = OpenRequest {
            service: String::new(),
            client_addr: None,
            op: Op::Catalog,
        };
        let wire = encode_request(&catalog).unwrap();
        assert_eq!(decode_request(&wire).unwrap().unwrap().0, catalog);
        let named = OpenRequest {
            service: "cam".into(),
            ..catalog.clone()
        };
        assert!(encode_request(&named).is_err());
        // An unknown operation is refused, not taken for an open.
        let mut bad = vec![VERSION, 0, 0, 4, EXT_OP, 0, 1, 9];
        assert_eq!(decode_request(&bad), Err(HeaderError::MalformedExtensions));
        bad[7] = 0;
        assert_eq!(decode_request(&bad), Err(HeaderError::EmptyService));
    }

    #[test]
    fn http_names_longer_than_the_field_are_clipped() {
        let http = HttpService {
            target: "t".repeat(300),
            host: "é".repeat(200),
            tls: true,
            forwarded: false,
        };
        let resp = OpenResponse {
            status: Status::Ok,
            message: String::new(),
            protocol: Protocol::Http,
            http: Some(http),
        };
        let wire = encode_response(&resp);
        assert!(wire.len() <= MAX_RESPONSE_LEN);
        let got = decode_response(&wire).unwrap().unwrap().0.http.unwrap();
        assert_eq!(got.target.len(), MAX_HTTP_NAME);
        assert_eq!(got.host, "é".repeat(127));
        assert!(got.tls && !got.forwarded);
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let resp = OpenResponse {
            status: Status::TargetRefused,
            message: "é".repeat(400),
            protocol: Protocol::Tcp,
            http: None,
        };
        let (decoded, _) = decode_response(&encode_response(&resp)).unwrap().unwrap();
        assert_eq!(decoded.message, "é".repeat(256));
    }
}
