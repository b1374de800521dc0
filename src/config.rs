//! `proxy-rules.toml` and the command-line forms of the same rules.
//!
//! Strict: unknown keys are errors, every value is parsed into its type while reading, so an
//! error names the file, the line and the key. `cli` merges the file with the flags (flags add
//! to lists and override single values) and validates the result.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::identity::PeerId;
use crate::protocol::header::{check_service_name, HttpService, Protocol, RtspUdp};

/// Problems with the rules file or the flags.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read rules file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("rules file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// The whole rules file. Both sections are optional; one file may serve both roles.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    /// Identity file (key and certificate).
    pub identity: Option<PathBuf>,
    /// How long live streams may take to finish at shutdown.
    pub drain_timeout: Option<Dur>,
    /// The rendezvous server (HOST:PORT) both roles register with, for NAT traversal.
    pub rendezvous: Option<RendezvousAddr>,
    pub expose: Option<ExposeRules>,
    pub connect: Option<ConnectRules>,
    pub rendezvous_server: Option<RendezvousRules>,
}

impl RulesFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses the text of a rules file; the error text names the line and the key.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }
}

/// `[expose]`: what this host serves, and to whom.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExposeRules {
    /// UDP address of the QUIC endpoint.
    pub listen: Option<SocketAddr>,
    /// Service name → the address of the real server.
    #[serde(default)]
    pub services: BTreeMap<ServiceName, Target>,
    /// Peer ids allowed to connect.
    #[serde(default)]
    pub authorized_peers: Vec<PeerId>,
    /// Allow any peer at all. Logged loudly.
    #[serde(default)]
    pub allow_any: bool,
    /// Proxied sockets at once, over all peers; more are answered "busy".
    pub max_streams: Option<usize>,
    /// How long to wait for a real server to accept a connection.
    pub dial_timeout: Option<Dur>,
    /// `[[expose.peer]]`: what each listed peer may use (a listed peer is allowed in).
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerRule>,
}

/// One `[[expose.peer]]`: a peer's access to this host's services.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerRule {
    pub id: PeerId,
    /// What to call it in logs.
    pub name: Option<String>,
    /// The services it may use; absent: all of them. Any other service is, to this peer,
    /// one that does not exist.
    pub services: Option<Vec<ServiceName>>,
    /// Its proxied sockets at once (besides the node's `max_streams`).
    pub max_streams: Option<usize>,
}

/// `[rendezvous_server]`: what `tunnel rendezvous` admits, and its limits (flags override).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RendezvousRules {
    /// UDP and TCP address to listen on.
    pub listen: Option<SocketAddr>,
    /// More TCP addresses for peers whose network drops UDP (e.g. `[::]:443`).
    #[serde(default)]
    pub listen_tcp: Vec<SocketAddr>,
    /// Relay for peers that cannot punch (default true).
    pub relay: Option<bool>,
    /// Only these ids may register (with `allow_file`); absent both: anyone.
    #[serde(default)]
    pub allow: Vec<PeerId>,
    /// A file of ids that may register, one per line (`#` comments); read again on SIGHUP.
    pub allow_file: Option<PathBuf>,
    /// Registered peers at once.
    pub max_peers: Option<usize>,
    /// Registered peers at once from one source address.
    pub max_peers_per_ip: Option<usize>,
    /// Registrations per source address: `N/s`, `N/min` or `N/h`.
    pub register_rate: Option<crate::time::rate::Rate>,
    /// Introduction requests per source address.
    pub connect_rate: Option<crate::time::rate::Rate>,
    /// Relay allocations one identity may hold at once.
    pub max_relays_per_peer: Option<usize>,
    /// Relay allocations the peers at one source address may hold at once.
    pub max_relays_per_ip: Option<usize>,
    /// A relay allocation with nothing to forward for this long is released.
    pub relay_idle: Option<Dur>,
    /// Any relay allocation is released this long after it was made.
    pub relay_lifetime: Option<Dur>,
    /// Each relay allocation forwards at most this much, both ways together: `100Mbit/s`,
    /// `12MB/s`, `500kB/s`.
    pub relay_rate: Option<ByteRate>,
}

/// Reads an allow file: one peer id per line; blank lines and `#` comments are skipped. An
/// error names the file and the line.
pub fn read_allow_file(path: &Path) -> Result<Vec<PeerId>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_allow_list(&text).map_err(|message| ConfigError::Parse {
        path: path.to_owned(),
        message,
    })
}

fn parse_allow_list(text: &str) -> Result<Vec<PeerId>, String> {
    let mut ids = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let id = line.split('#').next().unwrap_or("").trim();
        if id.is_empty() {
            continue;
        }
        ids.push(
            id.parse::<PeerId>()
                .map_err(|e| format!("line {}: {e}", n + 1))?,
        );
    }
    Ok(ids)
}

/// Bytes per second, written `100Mbit/s`, `12MB/s`, `500kB/s` or `800000B/s` (k, M, G are
/// powers of 1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRate(pub u32);

impl FromStr for ByteRate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid rate {s:?}: write e.g. 100Mbit/s, 12MB/s or 500kB/s");
        let t = s.trim().strip_suffix("/s").ok_or_else(bad)?;
        let (t, bits) = if let Some(t) = t.strip_suffix("bit") {
            (t, true)
        } else if let Some(t) = t.strip_suffix('B') {
            (t, false)
        } else {
            return Err(bad());
        };
        let (t, scale) = match t.chars().last() {
            Some('k') => (&t[..t.len() - 1], 1e3),
            Some('M') => (&t[..t.len() - 1], 1e6),
            Some('G') => (&t[..t.len() - 1], 1e9),
            _ => (t, 1.0),
        };
        let n: f64 = t.trim().parse().map_err(|_| bad())?;
        let bytes = n * scale / if bits { 8.0 } else { 1.0 };
        if !(1.0..=u32::MAX as f64).contains(&bytes) {
            return Err(format!(
                "invalid rate {s:?}: between 1 B/s and 4 GB/s, e.g. 100Mbit/s"
            ));
        }
        Ok(ByteRate(bytes as u32))
    }
}

/// `[connect]`: the remote peers and the local listeners.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectRules {
    /// `<peer-id>@<host:port>`: one peer, named `peer`.
    pub peer: Option<PeerAddr>,
    /// Named peers: `home = "<peer-id>"` (with a rendezvous) or `"<peer-id>@<host:port>"`.
    #[serde(default)]
    pub peers: BTreeMap<PeerName, PeerAddr>,
    /// One listener for every web service of every peer, routed by name (`docs/http.md`).
    pub http: Option<SocketAddr>,
    /// One listener for every RTSP service of every peer, routed by the URL's first path
    /// segment (`rtsp://ADDR/SERVICE[.PEER]/...`).
    pub rtsp: Option<SocketAddr>,
    /// Local UDP address of the QUIC endpoint (default: any address, any port).
    pub bind: Option<SocketAddr>,
    #[serde(default)]
    pub local: Vec<LocalRule>,
    /// How long an unused connection stays up after its last stream.
    pub idle_grace: Option<Dur>,
    /// How long a client waits for the connection to come up.
    pub connect_timeout: Option<Dur>,
    /// Connect at start and stay connected, instead of on the first client.
    #[serde(default)]
    pub eager: bool,
}

/// A service name: 1 to 64 of `a-z A-Z 0-9 . _ -`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName(String);

impl ServiceName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ServiceName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        check_service_name(s).map_err(|e| format!("invalid service name {s:?}: {e}"))?;
        Ok(ServiceName(s.to_owned()))
    }
}

/// A real server: its address `HOST:PORT` (a name or an IP; `[v6]:port`) and what it speaks,
/// written as the scheme: `HOST:PORT` or `tcp://HOST:PORT` for bytes, `rtsp://HOST:PORT`
/// for RTSP, `rtsp://HOST:PORT?udp=refuse` to refuse UDP SETUPs (see `docs/rtsp.md`),
/// `http://HOST[:PORT]` and `https://HOST[:PORT]` for a web UI (see `docs/http.md`), with
/// options `?tls_verify=false`, `?pin=sha256:HEX`, `?host_header=NAME`, `?forwarded=true`.
/// In the rules file a table works too:
/// `{ target = "https://192.168.1.10", tls_verify = false, host_header = "nas.lan" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    addr: String,
    pub protocol: Protocol,
    /// How to reach an `http://` or `https://` target's device (`None` for other schemes).
    pub http: Option<HttpTarget>,
}

/// The HTTP options of a web UI target.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpTarget {
    /// The device speaks HTTPS: the exposing side holds the TLS session to it.
    pub tls: bool,
    /// How the device's certificate is checked (https only).
    pub verify: DeviceVerify,
    /// The `Host` the device is sent, instead of the target's own `HOST[:PORT]`.
    pub host_header: Option<String>,
    /// Add `X-Forwarded-For/-Proto/-Host` to requests.
    pub forwarded: bool,
}

/// How an https device's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceVerify {
    /// Against the system's trusted roots, for the target's host name (the default).
    #[default]
    Roots,
    /// Not at all (`tls_verify = false`): for self-signed devices on a trusted LAN.
    Off,
    /// Only this certificate, by the SHA-256 of its DER (`pin = "sha256:..."`, what
    /// `openssl x509 -noout -fingerprint -sha256` prints); names and dates are not checked.
    Pin([u8; 32]),
}

impl Target {
    /// `HOST:PORT`, to dial.
    pub fn as_str(&self) -> &str {
        &self.addr
    }

    /// The host part of the address (an IPv6 address without its brackets).
    pub fn host(&self) -> &str {
        let host = self.addr.rsplit_once(':').map_or(&*self.addr, |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }

    /// What the connecting side needs to speak to an HTTP target's device.
    pub fn http_service(&self) -> Option<HttpService> {
        let http = self.http.as_ref()?;
        let default_port = if http.tls { ":443" } else { ":80" };
        let host = http.host_header.clone().unwrap_or_else(|| {
            self.addr
                .strip_suffix(default_port)
                .unwrap_or(&self.addr)
                .to_owned()
        });
        Some(HttpService {
            target: self.addr.clone(),
            host,
            tls: http.tls,
            forwarded: http.forwarded,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.protocol, &self.http) {
            (Protocol::Tcp, _) => f.write_str(&self.addr),
            (Protocol::Rtsp(RtspUdp::Datagram), _) => write!(f, "rtsp://{}", self.addr),
            (Protocol::Rtsp(RtspUdp::Refuse), _) => write!(f, "rtsp://{}?udp=refuse", self.addr),
            (Protocol::Http, http) => {
                let http = http.clone().unwrap_or_default();
                let scheme = if http.tls { "https" } else { "http" };
                write!(f, "{scheme}://{}", self.addr)?;
                let mut sep = '?';
                let mut opt = |f: &mut fmt::Formatter<'_>, text: String| {
                    let r = write!(f, "{sep}{text}");
                    sep = '&';
                    r
                };
                match http.verify {
                    DeviceVerify::Roots => {}
                    DeviceVerify::Off => opt(f, "tls_verify=false".into())?,
                    DeviceVerify::Pin(pin) => opt(
                        f,
                        format!("pin=sha256:{}", data_encoding::HEXLOWER.encode(&pin)),
                    )?,
                }
                if let Some(host) = &http.host_header {
                    opt(f, format!("host_header={host}"))?;
                }
                if http.forwarded {
                    opt(f, "forwarded=true".into())?;
                }
                Ok(())
            }
        }
    }
}

const TARGET_FORMS: &str = "expected HOST:PORT, rtsp://HOST:PORT, http://HOST[:PORT] or \
                            https://HOST[:PORT], e.g. 127.0.0.1:8080 or rtsp://127.0.0.1:554";

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let invalid = |why: &str| format!("invalid target {s:?}: {why}; {TARGET_FORMS}");
        let (scheme, rest) = match s.split_once("://") {
            None => ("tcp".to_owned(), s),
            Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        };
        let (addr, query) = match rest.split_once('?') {
            Some((addr, query)) => (addr, Some(query)),
            None => (rest, None),
        };
        let addr = addr.strip_suffix('/').unwrap_or(addr);
        if addr.contains('/') {
            return Err(invalid("a path is not part of a target (only HOST:PORT)"));
        }
        let default_port = match scheme.as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        };
        let addr = match default_port {
            Some(port)
                if check_host_port(addr).is_err()
                    && check_host_port(&format!("{addr}:{port}")).is_ok() =>
            {
                format!("{addr}:{port}")
            }
            _ => addr.to_owned(),
        };
        check_host_port(&addr).map_err(invalid)?;
        let mut target = match scheme.as_str() {
            "tcp" => Target {
                addr,
                protocol: Protocol::Tcp,
                http: None,
            },
            "rtsp" => Target {
                addr,
                protocol: Protocol::Rtsp(RtspUdp::Datagram),
                http: None,
            },
            "http" | "https" => Target {
                addr,
                protocol: Protocol::Http,
                http: Some(HttpTarget {
                    tls: scheme == "https",
                    ..HttpTarget::default()
                }),
            },
            other => {
                return Err(invalid(&format!(
                    "unknown scheme {other:?} (this build knows tcp, rtsp, http and https)"
                )))
            }
        };
        for option in query.into_iter().flat_map(|q| q.split('&')) {
            let (key, value) = option.split_once('=').unwrap_or((option, ""));
            target.set_option(key, value).map_err(|e| invalid(&e))?;
        }
        target.check()
    }
}

impl Target {
    /// Sets one option, as named in a URL's query or in the rules file's table form.
    fn set_option(&mut self, key: &str, value: &str) -> Result<(), String> {
        let bool_value = || match value {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(format!("{key} is true or false, not {value:?}")),
        };
        match (key, &mut self.protocol, self.http.as_mut()) {
            ("udp" | "rtsp_udp", Protocol::Rtsp(mode), _) => *mode = value.parse()?,
            ("tls_verify", _, Some(http)) => {
                if matches!(http.verify, DeviceVerify::Pin(_)) {
                    return Err("give tls_verify or pin, not both".into());
                }
                http.verify = if bool_value()? {
                    DeviceVerify::Roots
                } else {
                    DeviceVerify::Off
                };
            }
            ("pin", _, Some(http)) => {
                if http.verify == DeviceVerify::Off {
                    return Err("give tls_verify or pin, not both".into());
                }
                http.verify = DeviceVerify::Pin(parse_pin(value)?);
            }
            ("host_header", _, Some(http)) => {
                check_host_port(value)
                    .or_else(|_| check_host_port(&format!("{value}:1")))
                    .map_err(|why| format!("invalid host_header {value:?}: {why}"))?;
                http.host_header = Some(value.to_owned());
            }
            ("forwarded", _, Some(http)) => http.forwarded = bool_value()?,
            ("udp" | "rtsp_udp", ..) => {
                return Err(format!("{key} is for rtsp:// targets only"));
            }
            ("tls_verify" | "pin" | "host_header" | "forwarded", ..) => {
                return Err(format!("{key} is for http:// and https:// targets only"));
            }
            _ => {
                return Err(format!(
                    "unknown option {key:?} (rtsp:// has udp; http(s):// has tls_verify, pin, \
                     host_header, forwarded)"
                ))
            }
        }
        Ok(())
    }

    /// Checks the options against each other once all are set.
    fn check(self) -> Result<Self, String> {
        if let Some(http) = &self.http {
            if !http.tls && http.verify != DeviceVerify::Roots {
                return Err(format!(
                    "invalid target {self}: tls_verify and pin are for https:// targets only"
                ));
            }
        }
        Ok(self)
    }
}

/// `sha256:HEX` (64 hex digits, `:` between bytes allowed, any case).
fn parse_pin(value: &str) -> Result<[u8; 32], String> {
    let explain = || {
        format!(
            "invalid pin {value:?}: write sha256: and the certificate's 64 hex digits, as \
             `openssl x509 -noout -fingerprint -sha256` prints them"
        )
    };
    let hex = value
        .strip_prefix("sha256:")
        .or_else(|| value.strip_prefix("SHA256:"))
        .ok_or_else(explain)?
        .replace(':', "")
        .to_ascii_lowercase();
    let bytes = data_encoding::HEXLOWER
        .decode(hex.as_bytes())
        .map_err(|_| explain())?;
    bytes.try_into().map_err(|_| explain())
}

impl FromStr for RtspUdp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "datagram" => Ok(RtspUdp::Datagram),
            "refuse" => Ok(RtspUdp::Refuse),
            _ => Err(format!(
                "invalid rtsp_udp {s:?}: write \"datagram\" (carry RTP over UDP as QUIC \
                 datagrams) or \"refuse\" (answer 461 so clients use interleaved TCP)"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            target: String,
            rtsp_udp: Option<String>,
            tls_verify: Option<bool>,
            pin: Option<String>,
            host_header: Option<String>,
            forwarded: Option<bool>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            Table(Table),
        }
        let form = Form::deserialize(d).map_err(|_| {
            serde::de::Error::custom(format!(
                "{TARGET_FORMS}; or a table {{ target = \"...\", rtsp_udp = \"refuse\" }} \
                 (rtsp) or {{ target = \"https://...\", tls_verify = false, pin = \"sha256:...\", \
                 host_header = \"...\", forwarded = true }} (http, https)"
            ))
        })?;
        let table = match form {
            Form::Text(s) => return s.parse().map_err(serde::de::Error::custom),
            Form::Table(t) => t,
        };
        let mut target: Target = table.target.parse().map_err(serde::de::Error::custom)?;
        let text = |b: bool| b.to_string();
        let options = [
            ("rtsp_udp", table.rtsp_udp),
            ("tls_verify", table.tls_verify.map(text)),
            ("pin", table.pin),
            ("host_header", table.host_header),
            ("forwarded", table.forwarded.map(text)),
        ];
        for (key, value) in options {
            if let Some(value) = value {
                target
                    .set_option(key, &value)
                    .map_err(serde::de::Error::custom)?;
            }
        }
        target.check().map_err(serde::de::Error::custom)
    }
}

fn check_host_port(s: &str) -> Result<(), &'static str> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return match addr.port() {
            0 => Err("the port must be 1 to 65535"),
            _ => Ok(()),
        };
    }
    let (host, port) = s.rsplit_once(':').ok_or("no port")?;
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err("the port must be 1 to 65535"),
        Ok(_) => {}
    }
    let valid_host = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !valid_host {
        return Err("the host must be an IP address or a host name");
    }
    Ok(())
}

/// Which peer to reach, and where: `<peer-id>@<host:port>` to dial it directly, or just
/// `<peer-id>` to find it through the rendezvous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    pub id: PeerId,
    pub addr: Option<String>,
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.addr {
            Some(addr) => write!(f, "{}@{addr}", self.id),
            None => write!(f, "{}", self.id),
        }
    }
}

impl FromStr for PeerAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (id, addr) = match s.split_once('@') {
            Some((id, addr)) => (id, Some(addr)),
            None => (s, None),
        };
        let id = id.parse::<PeerId>().map_err(|e| {
            format!(
                "{e}; a peer is <peer-id>@<host:port> (direct) or <peer-id> (with --rendezvous)"
            )
        })?;
        if let Some(addr) = addr {
            check_host_port(addr).map_err(|why| format!("invalid peer address {addr:?}: {why}"))?;
        }
        Ok(PeerAddr {
            id,
            addr: addr.map(str::to_owned),
        })
    }
}

/// What the user calls a peer: 1 to 63 of `a-z 0-9 -`, not starting or ending with `-` (a
/// DNS label: it is part of host names like `nas.home.localhost`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerName(String);

impl PeerName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for PeerName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let valid = (1..=63).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-');
        if !valid {
            return Err(format!(
                "invalid peer name {s:?}: 1 to 63 of a-z 0-9 - (it becomes part of host names \
                 like nas.{s}.localhost), e.g. home"
            ));
        }
        Ok(PeerName(s.to_owned()))
    }
}

/// `--peer NAME=PEER_ID[@HOST:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPeer {
    pub name: PeerName,
    pub peer: PeerAddr,
}

impl FromStr for NamedPeer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, peer) = s.split_once('=').ok_or_else(|| {
            format!("invalid peer {s:?}: expected NAME=PEER_ID or NAME=PEER_ID@HOST:PORT, e.g. home=<id printed by tunnel id>")
        })?;
        Ok(NamedPeer {
            name: name.parse()?,
            peer: peer.parse()?,
        })
    }
}

/// The address of a rendezvous server: `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousAddr(pub String);

impl FromStr for RendezvousAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        check_host_port(s).map_err(|why| format!("invalid rendezvous address {s:?}: {why}; expected HOST:PORT, e.g. rendezvous.example.net:3478"))?;
        Ok(RendezvousAddr(s.to_owned()))
    }
}

/// A local listener: TCP `listen` address → the remote `service`. CLI form `ADDR=SERVICE`;
/// with several peers `SERVICE.PEER` names the peer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalRule {
    pub listen: SocketAddr,
    pub service: ServiceName,
}

impl FromStr for LocalRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (listen, service) = s.split_once('=').ok_or_else(|| {
            format!("invalid local rule {s:?}: expected ADDR=SERVICE, e.g. 127.0.0.1:8554=cam")
        })?;
        let listen = listen.parse().map_err(|_| {
            format!("invalid listen address {listen:?}: expected IP:PORT, e.g. 127.0.0.1:8554")
        })?;
        Ok(LocalRule {
            listen,
            service: service.parse()?,
        })
    }
}

/// A service rule from the command line: `NAME=HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRule {
    pub name: ServiceName,
    pub target: Target,
}

impl FromStr for ServiceRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, target) = s.split_once('=').ok_or_else(|| {
            format!(
                "invalid service {s:?}: expected NAME=HOST:PORT or NAME=rtsp://HOST:PORT, \
                 e.g. cam=rtsp://127.0.0.1:554"
            )
        })?;
        Ok(ServiceRule {
            name: name.parse()?,
            target: target.parse()?,
        })
    }
}

/// A duration written like `30s`, `500ms` or `2m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s)
            .map(Dur)
            .map_err(|e| format!("invalid duration {s:?} ({e}): write e.g. 30s, 500ms or 2m"))
    }
}

fn from_str<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: FromStr<Err = String>,
{
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

macro_rules! deserialize_via_from_str {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                from_str(d)
            }
        }
    )*};
}
deserialize_via_from_str!(
    ServiceName,
    PeerAddr,
    PeerName,
    Dur,
    RendezvousAddr,
    ByteRate
);

impl<'de> Deserialize<'de> for crate::time::rate::Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_str(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_rates_and_allow_lists_parse() {
        assert_eq!("100Mbit/s".parse::<ByteRate>(), Ok(ByteRate(12_500_000)));
        assert_eq!("12MB/s".parse::<ByteRate>(), Ok(ByteRate(12_000_000)));
        assert_eq!("500kB/s".parse::<ByteRate>(), Ok(ByteRate(500_000)));
        assert_eq!("800B/s".parse::<ByteRate>(), Ok(ByteRate(800)));
        for bad in ["100", "100Mbit", "x MB/s", "0B/s", "9GB/s"] {
            assert!(bad.parse::<ByteRate>().is_err(), "{bad}");
        }
        let id = PeerId::from_spki(&[1; 32]);
        let text = format!("# friends\n{id}  # dad\n\n  {id}\n");
        assert_eq!(parse_allow_list(&text), Ok(vec![id, id]));
        let err = parse_allow_list(&format!("{id}\nnot-an-id\n")).unwrap_err();
        assert!(err.starts_with("line 2: invalid peer id"), "{err}");
    }

    #[test]
    fn the_shipped_rules_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy-rules.toml");
        let rules = RulesFile::load(&path).unwrap();
        let expose = rules.expose.expect("the example has an [expose] section");
        assert!(!expose.services.is_empty());
        let connect = rules.connect.expect("the example has a [connect] section");
        assert!(!connect.local.is_empty());
        for local in &connect.local {
            assert!(
                expose.services.contains_key(&local.service),
                "example local rule names a service the example exposes"
            );
        }
    }

    /// The shipped file's commented `[rendezvous_server]` block, uncommented, is valid.
    #[test]
    fn the_shipped_rendezvous_example_parses_uncommented() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy-rules.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let block: String = text
            .lines()
            .skip_while(|l| !l.starts_with("# [rendezvous_server]"))
            .take_while(|l| l.starts_with("# "))
            .map(|l| {
                l.trim_start_matches("# ")
                    .split("  #")
                    .next()
                    .unwrap()
                    .to_owned()
                    + "\n"
            })
            .collect::<String>()
            .replace("<peer-id>", &"a".repeat(32));
        let rules = RulesFile::parse(&block).unwrap_or_else(|e| panic!("{e}\n{block}"));
        let rz = rules.rendezvous_server.expect("the block");
        assert_eq!(rz.max_peers_per_ip, Some(64));
        assert_eq!(rz.relay_rate, Some(ByteRate(12_500_000)));
        assert_eq!(
            rz.register_rate.map(|r| r.to_string()).as_deref(),
            Some("60/min")
        );
        assert_eq!(rz.allow.len(), 1);
    }

    #[test]
    fn a_full_file_parses_into_types() {
        let id = "a".repeat(32);
        let text = format!(
            r#"
            identity = "/data/identity.pem"
            drain_timeout = "3s"
            [expose]
            listen = "0.0.0.0:4433"
            authorized_peers = ["{id}"]
            services = {{ cam = "127.0.0.1:554", web = "nas.lan:8080" }}
            [connect]
            peer = "{id}@example.net:4433"
            idle_grace = "500ms"
            [[connect.local]]
            listen = "127.0.0.1:8554"
            service = "cam"
            "#
        );
        let rules = RulesFile::parse(&text).unwrap();
        let expose = rules.expose.unwrap();
        assert_eq!(expose.services.len(), 2);
        assert_eq!(expose.authorized_peers[0].to_string(), id);
        let connect = rules.connect.unwrap();
        assert_eq!(connect.idle_grace, Some(Dur(Duration::from_millis(500))));
        assert_eq!(
            connect.peer.unwrap().addr.as_deref(),
            Some("example.net:4433")
        );
        assert_eq!(rules.drain_timeout, Some(Dur(Duration::from_secs(3))));
    }

    #[test]
    fn errors_name_the_line_and_the_key() {
        let err =
            RulesFile::parse("[expose]\nlisten = \"0.0.0.0:4433\"\nservise = 1\n").unwrap_err();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("servise"), "{err}");

        let err = RulesFile::parse("[expose.services]\ncam = \"127.0.0.1\"\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("no port"), "{err}");

        let err = RulesFile::parse(
            "[expose.services]\ncam = { target = \"127.0.0.1:1\", rtsp_udp = \"refuse\" }\n",
        )
        .unwrap_err();
        assert!(err.contains("line 2") && err.contains("rtsp://"), "{err}");
        let rules = RulesFile::parse(
            "[expose.services]\ncam = { target = \"rtsp://127.0.0.1:1\", rtsp_udp = \"refuse\" }\n",
        )
        .unwrap();
        let cam = &rules.expose.unwrap().services[&"cam".parse::<ServiceName>().unwrap()];
        assert_eq!(cam.protocol, Protocol::Rtsp(RtspUdp::Refuse));

        let err = RulesFile::parse("[connect]\nidle_grace = \"soon\"\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("30s"), "{err}");

        let err = RulesFile::parse("[expose]\nauthorized_peers = [\"nope\"]\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("peer id"), "{err}");
    }

    #[test]
    fn web_targets_take_default_ports_and_their_options() {
        let plain: Target = "http://192.168.1.10".parse().unwrap();
        assert_eq!(plain.as_str(), "192.168.1.10:80");
        assert_eq!(plain.protocol, Protocol::Http);
        let svc = plain.http_service().unwrap();
        assert_eq!((svc.host.as_str(), svc.tls), ("192.168.1.10", false));
        let tls: Target = "https://[fd00::5]/".parse().unwrap();
        assert_eq!(tls.as_str(), "[fd00::5]:443");
        assert_eq!(tls.host(), "fd00::5");
        assert_eq!(tls.http_service().unwrap().host, "[fd00::5]");
        let odd: Target =
            "https://cam.lan:8443?tls_verify=false&host_header=cam.lan&forwarded=true"
                .parse()
                .unwrap();
        let http = odd.http.clone().unwrap();
        assert_eq!(http.verify, DeviceVerify::Off);
        assert!(http.forwarded);
        assert_eq!(odd.http_service().unwrap().host, "cam.lan");
        assert_eq!(
            odd.to_string().parse::<Target>().unwrap(),
            odd,
            "Display round-trips"
        );
        let pin = format!("sha256:{}", "AB:".repeat(31) + "AB");
        let pinned: Target = format!("https://cam.lan?pin={pin}").parse().unwrap();
        assert_eq!(pinned.http.unwrap().verify, DeviceVerify::Pin([0xab; 32]));
        for (bad, says) in [
            ("http://cam.lan?tls_verify=false", "https"),
            ("https://cam.lan?pin=sha256:abcd", "64 hex"),
            (
                &*format!(
                    "https://cam.lan?pin={}&tls_verify=false",
                    "sha256:".to_owned() + &"ab".repeat(32)
                ),
                "not both",
            ),
            ("http://cam.lan/ui", "path"),
            ("http://cam.lan?udp=refuse", "rtsp"),
            ("rtsp://cam.lan:554?forwarded=true", "http"),
            ("http://cam.lan?color=red", "unknown option"),
        ] {
            let err = bad.parse::<Target>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let rules = RulesFile::parse(
            "[expose.services]\nnas = { target = \"https://10.0.0.2\", tls_verify = false, host_header = \"nas.lan\" }\n",
        )
        .unwrap();
        let nas = &rules.expose.unwrap().services[&"nas".parse::<ServiceName>().unwrap()];
        assert_eq!(nas.http.as_ref().unwrap().verify, DeviceVerify::Off);
        let err = RulesFile::parse(
            "[expose.services]\nnas = { target = \"10.0.0.2:80\", tls_verify = false }\n",
        )
        .unwrap_err();
        assert!(err.contains("line 2") && err.contains("https"), "{err}");
    }

    #[test]
    fn peers_are_named_as_host_name_labels() {
        let id = "a".repeat(32);
        let p: NamedPeer = format!("home={id}@example.net:4433").parse().unwrap();
        assert_eq!(p.name.as_str(), "home");
        assert_eq!(p.peer.addr.as_deref(), Some("example.net:4433"));
        for bad in ["Home", "-x", "x-", "a.b", ""] {
            let err = format!("{bad}={id}").parse::<NamedPeer>().unwrap_err();
            assert!(err.contains("peer name"), "{bad}: {err}");
        }
        assert!(id
            .parse::<NamedPeer>()
            .unwrap_err()
            .contains("NAME=PEER_ID"));
        let rules = RulesFile::parse(&format!(
            "[connect]\nhttp = \"127.0.0.1:8080\"\n[connect.peers]\nhome = \"{id}\"\nshop = \"{id}@h:1\"\n"
        ))
        .unwrap();
        let connect = rules.connect.unwrap();
        assert_eq!(connect.peers.len(), 2);
        assert_eq!(connect.http.unwrap().port(), 8080);
    }

    #[test]
    fn command_line_forms_parse_and_explain_mistakes() {
        let rule: LocalRule = "127.0.0.1:8554=cam".parse().unwrap();
        assert_eq!(rule.listen.port(), 8554);
        assert_eq!(rule.service.as_str(), "cam");
        assert!("127.0.0.1:8554"
            .parse::<LocalRule>()
            .unwrap_err()
            .contains("ADDR=SERVICE"));
        let svc: ServiceRule = "web=[::1]:8080".parse().unwrap();
        assert_eq!(svc.target.as_str(), "[::1]:8080");
        assert!("cam=127.0.0.1:0".parse::<ServiceRule>().is_err());
        assert!("c/m=127.0.0.1:1".parse::<ServiceRule>().is_err());
        let rtsp: ServiceRule = "cam=rtsp://127.0.0.1:554".parse().unwrap();
        assert_eq!(rtsp.target.as_str(), "127.0.0.1:554");
        assert_eq!(rtsp.target.protocol, Protocol::Rtsp(RtspUdp::Datagram));
        let refuse: Target = "rtsp://cam.lan:554/?udp=refuse".parse().unwrap();
        assert_eq!(refuse.protocol, Protocol::Rtsp(RtspUdp::Refuse));
        assert_eq!(refuse.to_string(), "rtsp://cam.lan:554?udp=refuse");
        assert_eq!(
            "tcp://h:1".parse::<Target>().unwrap().protocol,
            Protocol::Tcp
        );
        let err = "ftp://h:1".parse::<Target>().unwrap_err();
        assert!(
            err.contains("unknown scheme") && err.contains("https"),
            "{err}"
        );
        let err = "rtsp://h:1?udp=maybe".parse::<Target>().unwrap_err();
        assert!(err.contains("refuse"), "{err}");
        let err = "abc@host:1".parse::<PeerAddr>().unwrap_err();
        assert!(err.contains("tunnel id"), "{err}");
        let bare: PeerAddr = "a".repeat(32).parse().unwrap();
        assert_eq!(bare.addr, None, "a bare id is found through the rendezvous");
        let err = format!("{}@nohost", "a".repeat(32))
            .parse::<PeerAddr>()
            .unwrap_err();
        assert!(err.contains("no port"), "{err}");
    }
}
