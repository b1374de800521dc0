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
use crate::protocol::header::{check_service_name, Protocol, RtspUdp};

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
}

/// `[connect]`: the remote peer and the local listeners.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectRules {
    /// `<peer-id>@<host:port>`.
    pub peer: Option<PeerAddr>,
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
/// for RTSP, `rtsp://HOST:PORT?udp=refuse` to refuse UDP SETUPs (see `docs/rtsp.md`).
/// In the rules file a table works too: `{ target = "rtsp://HOST:PORT", rtsp_udp = "refuse" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    addr: String,
    pub protocol: Protocol,
}

impl Target {
    /// `HOST:PORT`, to dial.
    pub fn as_str(&self) -> &str {
        &self.addr
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol {
            Protocol::Tcp => f.write_str(&self.addr),
            Protocol::Rtsp(RtspUdp::Datagram) => write!(f, "rtsp://{}", self.addr),
            Protocol::Rtsp(RtspUdp::Refuse) => write!(f, "rtsp://{}?udp=refuse", self.addr),
        }
    }
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let invalid = |why: &str| {
            format!(
                "invalid target {s:?}: {why}; expected HOST:PORT or rtsp://HOST:PORT, \
                 e.g. 127.0.0.1:8080 or rtsp://127.0.0.1:554"
            )
        };
        let (protocol, rest) = match s.split_once("://") {
            None => (Protocol::Tcp, s),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("tcp") => (Protocol::Tcp, rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("rtsp") => {
                (Protocol::Rtsp(RtspUdp::Datagram), rest)
            }
            Some((scheme, _)) => {
                return Err(invalid(&format!(
                    "unknown scheme {scheme:?} (this build knows tcp and rtsp)"
                )))
            }
        };
        let (addr, query) = match rest.split_once('?') {
            Some((addr, query)) => (addr.trim_end_matches('/'), Some(query)),
            None => (rest.trim_end_matches('/'), None),
        };
        let protocol = match (protocol, query) {
            (p, None) => p,
            (Protocol::Rtsp(_), Some(q)) => Protocol::Rtsp(
                q.strip_prefix("udp=")
                    .ok_or_else(|| invalid("the only option is ?udp=datagram or ?udp=refuse"))?
                    .parse()?,
            ),
            (Protocol::Tcp, Some(_)) => return Err(invalid("options are for rtsp:// only")),
        };
        check_host_port(addr).map_err(invalid)?;
        Ok(Target {
            addr: addr.to_owned(),
            protocol,
        })
    }
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
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            Table(Table),
        }
        let form = Form::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected \"HOST:PORT\", \"rtsp://HOST:PORT\" or \
                 { target = \"rtsp://HOST:PORT\", rtsp_udp = \"datagram\" | \"refuse\" }",
            )
        })?;
        match form {
            Form::Text(s) => s.parse().map_err(serde::de::Error::custom),
            Form::Table(t) => {
                let mut target: Target = t.target.parse().map_err(serde::de::Error::custom)?;
                if let Some(mode) = t.rtsp_udp {
                    let mode: RtspUdp = mode.parse().map_err(serde::de::Error::custom)?;
                    match target.protocol {
                        Protocol::Rtsp(_) => target.protocol = Protocol::Rtsp(mode),
                        Protocol::Tcp => {
                            return Err(serde::de::Error::custom(
                                "rtsp_udp is only for rtsp:// targets",
                            ))
                        }
                    }
                }
                Ok(target)
            }
        }
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

/// A local listener: TCP `listen` address → the remote `service`. CLI form `ADDR=SERVICE`.
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
deserialize_via_from_str!(ServiceName, PeerAddr, Dur, RendezvousAddr);

#[cfg(test)]
mod tests {
    use super::*;

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
        let err = "http://h:1".parse::<Target>().unwrap_err();
        assert!(err.contains("unknown scheme"), "{err}");
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
