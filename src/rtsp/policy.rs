//! The RTSP layer's decisions for one RTSP connection, as a pure state machine in the manner
//! of `connect::machine`: a parsed [`Head`], its body and `now` in, an [`Action`] (forward the
//! message, forward a rewritten copy, or answer it here) and maybe a [`Note`] worth a log line
//! out. No sockets, no clock, no tokio: the driver (`rtsp::driver`) reads and writes, frames
//! and parses, holds the locks and the expiry timer, logs the notes, and lends the policy a
//! [`Flows`] through which media flows are opened (binding ports is I/O).
//!
//! What it decides (docs/rtsp.md, "What the layer does"):
//! - a client's UDP SETUP, on the client-facing peer: carried (a flow, the channel header,
//!   no `destination=`), answered 461 (refuse mode, multicast, UDP without `client_port`), or
//!   narrowed to its interleaved TCP alternatives;
//! - that SETUP on the server-facing peer: a flow of its own and its ports as `client_port`;
//! - the SETUP's answer: whether the flow stays (the server chose UDP) and which ports each
//!   side sees;
//! - absolute URLs in responses that name another host, rebased to the one the client used;
//! - when flows go: TEARDOWN, a failed SETUP, a silent session ([`Policy::expire`]), or with
//!   the policy itself (dropping a flow handle releases its ports).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use crate::protocol::header::RtspUdp;
use crate::protocol::rtsp::{
    format_ports, rebase_head, rebase_sdp, reply, url_base, Carriage, Head, StartLine,
    TransportSpec, CHANNEL_HEADER,
};
use crate::rtsp::sessions::{Limit, Sessions};

/// Which end of the RTSP conversation the local socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Facing {
    /// The connecting side: the socket is the RTSP client (ffplay, VLC).
    Client,
    /// The exposing side: the socket is the RTSP server (the camera).
    Server,
}

/// Which way a message travels, whatever the local socket is: requests travel toward the
/// server, so this (with the message's kind) says who sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toward {
    Server,
    Client,
}

/// What to do with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Forward the bytes as they came.
    Pass,
    /// Forward these instead.
    Replace(Vec<u8>),
    /// Forward nothing; answer the sender with this.
    Reply(Vec<u8>),
}

/// A decision the driver logs (the policy has no logger: what is worth a line, and at which
/// level, is the driver's business; the tests read these instead).
#[derive(Debug)]
pub enum Note {
    /// A TEARDOWN released its session's flows (maybe none).
    TornDown { flows: usize },
    /// A UDP SETUP was answered `461 Unsupported Transport`.
    Unsupported(Unsupported),
    /// A carried SETUP's [`CHANNEL_HEADER`] is not a channel id (the value): answered 400.
    BadChannel(String),
    /// A SETUP was refused at a limit: answered 453.
    AtLimit(Limit),
    /// No UDP port pair could be bound for a SETUP: answered 500.
    BindFailed(io::Error),
}

/// Why a UDP SETUP was answered 461.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    #[error("UDP is refused for this service (interleaved TCP only)")]
    Refused,
    #[error("multicast, or UDP without client_port, is not carried")]
    NotCarried,
}

/// The outcome of one message.
#[derive(Debug)]
pub struct Decision {
    pub action: Action,
    pub note: Option<Note>,
}

impl From<Action> for Decision {
    fn from(action: Action) -> Decision {
        Decision { action, note: None }
    }
}

impl Decision {
    /// Answer the sender with `status reason`, and say why.
    fn reply(head: &Head, status: u16, reason: &str, note: Note) -> Decision {
        Decision {
            action: Action::Reply(reply(head, status, reason)),
            note: Some(note),
        }
    }
}

/// What the policy needs of an open media flow. Dropping the handle releases the flow.
pub trait FlowHandle {
    /// The local (RTP, RTCP) ports.
    fn ports(&self) -> (u16, u16);
    /// Where the flow sends what comes from the other peer; `None` keeps the current value.
    fn set_remote(&self, rtp: Option<SocketAddr>, rtcp: Option<SocketAddr>);
    /// When the near host (the RTSP client or server) last sent a packet into the flow.
    fn last_activity(&self) -> Option<Instant>;
}

/// How the policy gets media flows: allocating ids and binding port pairs are the driver's.
pub trait Flows {
    type Flow: FlowHandle;
    /// A fresh channel id, on the client-facing peer (which allocates them).
    fn allocate(&mut self) -> u32;
    /// Binds a port pair for channel `id`; `allocated_here`: this peer allocated `id`.
    fn open(&mut self, id: u32, allocated_here: bool) -> io::Result<Self::Flow>;
}

/// A flow and what its SETUP answer needs.
struct Flow<F> {
    handle: F,
    /// The SETUP's `client_port` value as the client wrote it (restored in the answer).
    client_port: Option<String>,
}

/// The decisions of one RTSP connection, on either peer; `F` is the driver's flow handle.
pub struct Policy<F> {
    facing: Facing,
    udp: RtspUdp,
    /// The socket's peer (the RTSP client or server): whom the flows send to by default.
    near_ip: IpAddr,
    sessions: Sessions<Flow<F>>,
    /// `rtsp://host:port` as the client wrote it (with the routing prefix, if any): where
    /// rewritten URLs point.
    base: Option<String>,
    /// The client-facing peer's routing prefix (`/cam.shop` on `--rtsp`): taken off request
    /// URLs before the server sees them, put back into the URLs of its answers.
    prefix: Option<String>,
}

impl<F: FlowHandle> Policy<F> {
    pub fn new(facing: Facing, udp: RtspUdp, near_ip: IpAddr) -> Policy<F> {
        Policy {
            facing,
            udp,
            near_ip,
            sessions: Sessions::default(),
            base: None,
            prefix: None,
        }
    }

    /// Routes by path on the client-facing peer: the server sees its own paths, the client
    /// stays under `prefix` (`/SERVICE` or `/SERVICE.PEER`).
    pub fn with_prefix(mut self, prefix: Option<String>) -> Policy<F> {
        self.prefix = prefix;
        self
    }

    /// One complete message travelling `toward` one end: its parsed head, then its body.
    pub fn message(
        &mut self,
        toward: Toward,
        mut head: Head,
        body: &[u8],
        now: Instant,
        flows: &mut impl Flows<Flow = F>,
    ) -> Decision {
        match (head.method().is_some(), toward) {
            (true, Toward::Server) => self.request(&mut head, body, now, flows),
            (false, Toward::Client) => self.response(&mut head, body, now).into(),
            // A request from the server (ANNOUNCE, GET_PARAMETER...), or the client's answer
            // to one: as it is.
            (true, Toward::Client) | (false, Toward::Server) => Action::Pass.into(),
        }
    }

    /// Releases the flows of sessions silent for twice their timeout: no request naming
    /// them and no packet from the near host (RTCP reports count, as servers count them).
    /// How many flows went.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.sessions
            .expire(now, |f| f.handle.last_activity())
            .len()
    }

    /// Sessions with at least one flow here (what the node's session gauge counts).
    pub fn sessions(&self) -> usize {
        self.sessions.sessions()
    }

    /// Flows held, whether their SETUP was answered yet or not.
    pub fn flows(&self) -> usize {
        self.sessions.flows()
    }

    fn request(
        &mut self,
        head: &mut Head,
        body: &[u8],
        now: Instant,
        flows: &mut impl Flows<Flow = F>,
    ) -> Decision {
        let stripped = self.facing == Facing::Client && self.learn_base(head);
        let mut decision = self.decide_request(head, now, flows);
        if stripped && matches!(decision.action, Action::Pass) {
            let mut out = head.encode();
            out.extend_from_slice(body);
            decision.action = Action::Replace(out);
        }
        decision
    }

    /// Records the client's base from a request URL and takes the routing prefix off it;
    /// whether the URL changed.
    fn learn_base(&mut self, head: &mut Head) -> bool {
        let StartLine::Request { uri, .. } = &mut head.start else {
            return false;
        };
        let Some(base) = url_base(uri).map(str::to_owned) else {
            return false;
        };
        let Some(prefix) = &self.prefix else {
            self.base = Some(base);
            return false;
        };
        let rest = strip_path_prefix(&uri[base.len()..], prefix).map(|r| r.into_owned());
        self.base = Some(format!("{base}{prefix}"));
        match rest {
            Some(rest) => {
                *uri = format!("{base}{rest}");
                true
            }
            None => false,
        }
    }

    fn decide_request(
        &mut self,
        head: &mut Head,
        now: Instant,
        flows: &mut impl Flows<Flow = F>,
    ) -> Decision {
        if let Some((session, _)) = head.session() {
            self.sessions.touch(session, now);
        }
        let method = head.method().unwrap_or_default().to_ascii_uppercase();
        match method.as_str() {
            "TEARDOWN" => {
                let Some((session, _)) = head.session() else {
                    return Action::Pass.into();
                };
                let gone = self.sessions.teardown(session);
                Decision {
                    action: Action::Pass,
                    note: Some(Note::TornDown { flows: gone.len() }),
                }
            }
            "SETUP" => match self.facing {
                Facing::Client => self.setup_from_client(head, flows),
                Facing::Server => self.setup_toward_server(head, flows),
            },
            _ => Action::Pass.into(),
        }
    }

    /// The client-facing peer: keep, refuse or carry a UDP SETUP.
    fn setup_from_client(&mut self, head: &mut Head, flows: &mut impl Flows<Flow = F>) -> Decision {
        let Some(value) = head.get("Transport") else {
            return Action::Pass.into();
        };
        let specs = TransportSpec::parse_list(value);
        let tcp: Vec<TransportSpec> = specs
            .iter()
            .filter(|s| s.carriage() == Carriage::Tcp)
            .cloned()
            .collect();
        if tcp.len() == specs.len() {
            return Action::Pass.into();
        }
        let udp = specs
            .iter()
            .find(|s| s.carriage() == Carriage::UdpUnicast && s.ports("client_port").is_some());
        let udp = match (self.udp, udp) {
            (RtspUdp::Datagram, Some(udp)) => udp.clone(),
            _ if !tcp.is_empty() => {
                // Offer the server only the interleaved alternatives.
                head.set("Transport", TransportSpec::encode_list(&tcp));
                return Action::Replace(head.encode()).into();
            }
            (RtspUdp::Refuse, _) => return unsupported(head, Unsupported::Refused),
            (RtspUdp::Datagram, None) => return unsupported(head, Unsupported::NotCarried),
        };
        let (rtp, rtcp) = udp.ports("client_port").expect("filtered above");
        let rtcp = rtcp.unwrap_or(rtp.saturating_add(1));
        let id = flows.allocate();
        let handle = match self.open_flow(head, id, true, flows) {
            Ok(f) => f,
            Err(refusal) => return refusal,
        };
        handle.set_remote(
            Some(SocketAddr::new(self.near_ip, rtp)),
            Some(SocketAddr::new(self.near_ip, rtcp)),
        );
        let mut udp = udp;
        // The server must send to the other peer's ports, not somewhere the client named.
        udp.remove("destination");
        let mut offer = vec![udp];
        offer.extend(tcp);
        head.set("Transport", TransportSpec::encode_list(&offer));
        head.set(CHANNEL_HEADER, id.to_string());
        self.sessions.setup_sent(
            head.cseq(),
            Flow {
                handle,
                client_port: None,
            },
        );
        Action::Replace(head.encode()).into()
    }

    /// The server-facing peer: give a carried SETUP this peer's ports toward the server.
    fn setup_toward_server(
        &mut self,
        head: &mut Head,
        flows: &mut impl Flows<Flow = F>,
    ) -> Decision {
        let Some(channel) = head.remove(CHANNEL_HEADER) else {
            return Action::Pass.into();
        };
        let Ok(id) = channel.trim().parse::<u32>() else {
            return Decision::reply(head, 400, "Bad Request", Note::BadChannel(channel));
        };
        let mut specs = TransportSpec::parse_list(head.get("Transport").unwrap_or_default());
        let Some(udp) = specs
            .iter_mut()
            .find(|s| s.carriage() == Carriage::UdpUnicast)
        else {
            return Action::Replace(head.encode()).into();
        };
        let handle = match self.open_flow(head, id, false, flows) {
            Ok(f) => f,
            Err(refusal) => return refusal,
        };
        let client_port = udp.get("client_port").map(str::to_owned);
        let (a, b) = handle.ports();
        udp.set("client_port", format_ports(a, b));
        head.set("Transport", TransportSpec::encode_list(&specs));
        self.sessions.setup_sent(
            head.cseq(),
            Flow {
                handle,
                client_port,
            },
        );
        Action::Replace(head.encode()).into()
    }

    /// A new flow for the SETUP in `head`, or the answer that refuses it (at a limit, or no
    /// port pair could be bound).
    fn open_flow(
        &self,
        head: &Head,
        id: u32,
        allocated_here: bool,
        flows: &mut impl Flows<Flow = F>,
    ) -> Result<F, Decision> {
        if let Err(limit) = self.sessions.can_add() {
            return Err(Decision::reply(
                head,
                453,
                "Not Enough Bandwidth",
                Note::AtLimit(limit),
            ));
        }
        flows
            .open(id, allocated_here)
            .map_err(|e| Decision::reply(head, 500, "Internal Server Error", Note::BindFailed(e)))
    }

    /// A response travelling toward the client.
    fn response(&mut self, head: &mut Head, body: &[u8], now: Instant) -> Action {
        let mut changed = false;
        let pending = head.cseq().and_then(|c| self.sessions.answered(Some(c)));
        if let Some(flow) = pending {
            changed |= self.answer_setup(head, flow, now);
        }
        let mut new_body = None;
        if self.facing == Facing::Client {
            if let Some(base) = &self.base {
                changed |= rebase_head(head, base);
                let sdp = head
                    .get("Content-Type")
                    .is_some_and(|t| t.to_ascii_lowercase().starts_with("application/sdp"));
                if sdp {
                    new_body = rebase_sdp(body, base);
                }
            }
        }
        match new_body {
            Some(body) => {
                head.set("Content-Length", body.len().to_string());
                let mut out = head.encode();
                out.extend_from_slice(&body);
                Action::Replace(out)
            }
            None if changed => {
                let mut out = head.encode();
                out.extend_from_slice(body);
                Action::Replace(out)
            }
            None => Action::Pass,
        }
    }

    /// The answer to a carried SETUP: keeps the flow if the server chose UDP, fixes the
    /// ports the client sees. Whether the head changed.
    fn answer_setup(&mut self, head: &mut Head, flow: Flow<F>, now: Instant) -> bool {
        let ok = head.status().is_some_and(|s| (200..300).contains(&s));
        let mut specs = TransportSpec::parse_list(head.get("Transport").unwrap_or_default());
        let chosen = specs
            .iter_mut()
            .find(|s| s.carriage() == Carriage::UdpUnicast);
        let (Some(spec), true) = (chosen, ok) else {
            // Refused, or the server chose interleaved: the flow goes.
            return false;
        };
        match self.facing {
            Facing::Server => {
                let server_ip = spec
                    .get("source")
                    .and_then(|s| s.parse::<IpAddr>().ok())
                    .unwrap_or(self.near_ip);
                if let Some((rtp, rtcp)) = spec.ports("server_port") {
                    let rtcp = rtcp.unwrap_or(rtp.saturating_add(1));
                    flow.handle.set_remote(
                        Some(SocketAddr::new(server_ip, rtp)),
                        Some(SocketAddr::new(server_ip, rtcp)),
                    );
                }
                if let Some(orig) = &flow.client_port {
                    spec.set("client_port", orig.clone());
                }
            }
            Facing::Client => {
                let (a, b) = flow.handle.ports();
                spec.set("server_port", format_ports(a, b));
                spec.remove("source");
            }
        }
        head.set("Transport", TransportSpec::encode_list(&specs));
        let (session, timeout) = head.session().unwrap_or(("", None));
        let session = session.to_owned();
        self.sessions.attach(&session, timeout, flow, now);
        true
    }
}

/// `461 Unsupported Transport`: the client falls back to interleaved TCP at once.
fn unsupported(head: &Head, why: Unsupported) -> Decision {
    Decision::reply(head, 461, "Unsupported Transport", Note::Unsupported(why))
}

/// `path` without the leading `prefix` segment: `/cam.shop/s1` → `/s1`, `/cam.shop` → `/`,
/// `/cam.shop?x` → `/?x`; `None` when the path is not under it.
fn strip_path_prefix<'a>(path: &'a str, prefix: &str) -> Option<std::borrow::Cow<'a, str>> {
    let rest = path.strip_prefix(prefix)?;
    match rest.as_bytes().first() {
        None => Some("/".into()),
        Some(b'/') => Some(rest.into()),
        Some(b'?') => Some(format!("/{rest}").into()),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::rtsp::{frame, Item};
    use crate::rtsp::sessions::{MAX_FLOWS, MAX_PENDING};
    use std::cell::{Cell, RefCell};
    use std::net::Ipv4Addr;
    use std::rc::{Rc, Weak};
    use std::time::Duration;

    /// The RTSP client's host, as the client-facing peer's socket sees it.
    const PLAYER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
    /// The camera, as the server-facing peer's socket sees it.
    const CAMERA: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));

    /// A flow in memory: its ports, where it was told to send, and when it last heard from
    /// its near host (set by a test).
    #[derive(Debug)]
    struct FakeFlow {
        id: u32,
        allocated_here: bool,
        ports: (u16, u16),
        remote: RefCell<(Option<SocketAddr>, Option<SocketAddr>)>,
        activity: Cell<Option<Instant>>,
    }

    impl FlowHandle for Rc<FakeFlow> {
        fn ports(&self) -> (u16, u16) {
            self.ports
        }

        fn set_remote(&self, rtp: Option<SocketAddr>, rtcp: Option<SocketAddr>) {
            let mut remote = self.remote.borrow_mut();
            remote.0 = rtp.or(remote.0);
            remote.1 = rtcp.or(remote.1);
        }

        fn last_activity(&self) -> Option<Instant> {
            self.activity.get()
        }
    }

    /// Hands out ids and port pairs in order; keeps a weak reference to every flow, so a test
    /// sees which ones the policy still holds.
    struct FakeFlows {
        next_id: u32,
        next_port: u16,
        fail: bool,
        opened: Vec<Weak<FakeFlow>>,
    }

    impl Flows for FakeFlows {
        type Flow = Rc<FakeFlow>;

        fn allocate(&mut self) -> u32 {
            self.next_id += 1;
            self.next_id
        }

        fn open(&mut self, id: u32, allocated_here: bool) -> io::Result<Rc<FakeFlow>> {
            if self.fail {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "no free port pair",
                ));
            }
            let p = self.next_port;
            self.next_port += 2;
            let flow = Rc::new(FakeFlow {
                id,
                allocated_here,
                ports: (p, p + 1),
                remote: RefCell::default(),
                activity: Cell::default(),
            });
            self.opened.push(Rc::downgrade(&flow));
            Ok(flow)
        }
    }

    impl FakeFlows {
        fn live(&self) -> usize {
            self.opened.iter().filter(|f| f.strong_count() > 0).count()
        }

        fn last(&self) -> Rc<FakeFlow> {
            self.opened
                .last()
                .and_then(Weak::upgrade)
                .expect("a live flow")
        }
    }

    /// One peer's policy and its flows.
    struct Peer {
        policy: Policy<Rc<FakeFlow>>,
        flows: FakeFlows,
    }

    impl Peer {
        fn new(facing: Facing, udp: RtspUdp, near: IpAddr, first_port: u16) -> Peer {
            Peer {
                policy: Policy::new(facing, udp, near),
                flows: FakeFlows {
                    next_id: 0,
                    next_port: first_port,
                    fail: false,
                    opened: Vec::new(),
                },
            }
        }

        fn client_facing(udp: RtspUdp) -> Peer {
            Peer::new(Facing::Client, udp, PLAYER, 50000)
        }

        fn server_facing() -> Peer {
            Peer::new(Facing::Server, RtspUdp::Datagram, CAMERA, 40000)
        }

        fn send(&mut self, toward: Toward, msg: &[u8], now: Instant) -> Decision {
            let Ok(Some(Item::Message { head, body })) = frame(msg) else {
                panic!("not one message: {:?}", String::from_utf8_lossy(msg));
            };
            assert_eq!(head + body, msg.len(), "one whole message");
            let parsed = Head::parse(&msg[..head]).unwrap();
            self.policy
                .message(toward, parsed, &msg[head..], now, &mut self.flows)
        }

        /// A request from the client, or a message the server-facing peer gets from the
        /// client-facing one.
        fn request(&mut self, msg: &[u8], now: Instant) -> Decision {
            self.send(Toward::Server, msg, now)
        }

        fn response(&mut self, msg: &[u8], now: Instant) -> Decision {
            self.send(Toward::Client, msg, now)
        }

        /// A UDP SETUP for `session`'s track `n`, and its answer with `timeout`.
        fn carried_session(&mut self, session: &str, n: u32, timeout: u64, now: Instant) {
            let setup = format!(
                "SETUP rtsp://127.0.0.1:8554/cam/stream={n} RTSP/1.0\r\nCSeq: {n}\r\n\
                 Transport: RTP/AVP;unicast;client_port=5000-5001\r\n\r\n"
            );
            let forwarded = replaced(self.request(setup.as_bytes(), now));
            assert!(text(&forwarded).contains(CHANNEL_HEADER));
            let answer = format!(
                "RTSP/1.0 200 OK\r\nCSeq: {n}\r\nSession: {session};timeout={timeout}\r\n\
                 Transport: RTP/AVP;unicast;client_port=5000-5001;server_port=6970-6971\r\n\r\n"
            );
            replaced(self.response(answer.as_bytes(), now));
        }
    }

    /// Any instant will do: the policy reads no clock, so its time is `t0` plus durations.
    fn t0() -> Instant {
        crate::time::now()
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    fn replaced(d: Decision) -> Vec<u8> {
        match d.action {
            Action::Replace(bytes) => bytes,
            other => panic!("expected Replace, got {other:?} ({:?})", d.note),
        }
    }

    fn replied(d: &Decision) -> String {
        match &d.action {
            Action::Reply(bytes) => text(bytes),
            other => panic!("expected Reply, got {other:?}"),
        }
    }

    fn head_of(bytes: &[u8]) -> Head {
        let Ok(Some(Item::Message { head, .. })) = frame(bytes) else {
            panic!("not a message: {:?}", text(bytes));
        };
        Head::parse(&bytes[..head]).unwrap()
    }

    fn addr(ip: IpAddr, port: u16) -> Option<SocketAddr> {
        Some(SocketAddr::new(ip, port))
    }

    const UDP_SETUP: &[u8] = b"SETUP rtsp://127.0.0.1:8554/cam/stream=0 RTSP/1.0\r\nCSeq: 3\r\nSession: 12345678\r\nTransport: RTP/AVP;unicast;client_port=5000-5001;destination=203.0.113.9\r\n\r\n";

    #[test]
    fn a_udp_setup_is_carried_with_a_flow_on_each_peer_and_the_ports_each_side_needs() {
        let now = t0();
        let mut client = Peer::client_facing(RtspUdp::Datagram);
        let mut server = Peer::server_facing();

        // The client-facing peer: a flow toward the player's ports, the channel header, no
        // `destination=`.
        let forwarded = replaced(client.request(UDP_SETUP, now));
        let head = head_of(&forwarded);
        assert_eq!(
            head.get("Transport"),
            Some("RTP/AVP;unicast;client_port=5000-5001")
        );
        assert_eq!(head.get(CHANNEL_HEADER), Some("1"));
        let near = client.flows.last();
        assert_eq!((near.id, near.allocated_here), (1, true));
        assert_eq!(
            *near.remote.borrow(),
            (addr(PLAYER, 5000), addr(PLAYER, 5001))
        );
        assert_eq!((client.policy.flows(), client.policy.sessions()), (1, 0));

        // The server-facing peer: the header goes, its own ports become `client_port`.
        let toward_camera = replaced(server.request(&forwarded, now));
        let head = head_of(&toward_camera);
        assert_eq!(head.get(CHANNEL_HEADER), None);
        assert_eq!(
            head.get("Transport"),
            Some("RTP/AVP;unicast;client_port=40000-40001")
        );
        let far = server.flows.last();
        assert_eq!((far.id, far.allocated_here), (1, false));

        // The camera's answer: the server-facing peer learns where to send and restores the
        // client's `client_port`...
        let answer = b"RTSP/1.0 200 OK\r\nCSeq: 3\r\nSession: 12345678;timeout=30\r\nTransport: RTP/AVP;unicast;client_port=40000-40001;server_port=6970-6971;source=192.0.2.11\r\n\r\n";
        let back = replaced(server.response(answer, now));
        assert_eq!(
            head_of(&back).get("Transport"),
            Some("RTP/AVP;unicast;client_port=5000-5001;server_port=6970-6971;source=192.0.2.11")
        );
        let camera = "192.0.2.11".parse().unwrap();
        assert_eq!(
            *far.remote.borrow(),
            (addr(camera, 6970), addr(camera, 6971))
        );
        assert_eq!((server.policy.flows(), server.policy.sessions()), (1, 1));

        // ...and the client-facing peer names its own ports as `server_port`, without `source`.
        let to_player = replaced(client.response(&back, now));
        assert_eq!(
            head_of(&to_player).get("Transport"),
            Some("RTP/AVP;unicast;client_port=5000-5001;server_port=50000-50001")
        );
        assert_eq!((client.policy.flows(), client.policy.sessions()), (1, 1));
    }

    #[test]
    fn refuse_mode_answers_a_udp_setup_461_without_a_flow() {
        let mut client = Peer::client_facing(RtspUdp::Refuse);
        let d = client.request(UDP_SETUP, t0());
        assert_eq!(
            replied(&d),
            "RTSP/1.0 461 Unsupported Transport\r\nCSeq: 3\r\nSession: 12345678\r\n\r\n"
        );
        assert!(matches!(
            d.note,
            Some(Note::Unsupported(Unsupported::Refused))
        ));
        assert_eq!((client.flows.next_id, client.flows.opened.len()), (0, 0));
        assert_eq!(client.policy.flows(), 0);
    }

    #[test]
    fn multicast_or_udp_without_client_port_is_answered_461() {
        for transport in [
            "RTP/AVP;multicast;destination=224.2.0.1;port=3456-3457",
            "RTP/AVP;unicast",
        ] {
            let mut client = Peer::client_facing(RtspUdp::Datagram);
            let setup = format!(
                "SETUP rtsp://127.0.0.1:8554/cam RTSP/1.0\r\nCSeq: 4\r\nTransport: {transport}\r\n\r\n"
            );
            let d = client.request(setup.as_bytes(), t0());
            assert!(replied(&d).starts_with("RTSP/1.0 461 Unsupported Transport\r\nCSeq: 4\r\n"));
            assert!(
                matches!(d.note, Some(Note::Unsupported(Unsupported::NotCarried))),
                "{transport}: {:?}",
                d.note
            );
            assert_eq!(client.flows.opened.len(), 0);
        }
    }

    #[test]
    fn a_setup_offering_udp_and_tcp_keeps_only_tcp_when_udp_is_not_carried() {
        let cases = [
            (
                RtspUdp::Refuse,
                "RTP/AVP;unicast;client_port=5000-5001,RTP/AVP/TCP;unicast;interleaved=0-1",
            ),
            (
                RtspUdp::Datagram,
                "RTP/AVP;multicast,RTP/AVP/TCP;unicast;interleaved=0-1",
            ),
        ];
        for (udp, transport) in cases {
            let mut client = Peer::client_facing(udp);
            let setup = format!(
                "SETUP rtsp://127.0.0.1:8554/cam RTSP/1.0\r\nCSeq: 5\r\nTransport: {transport}\r\n\r\n"
            );
            let d = client.request(setup.as_bytes(), t0());
            assert!(d.note.is_none());
            let head = head_of(&replaced(d));
            assert_eq!(
                head.get("Transport"),
                Some("RTP/AVP/TCP;unicast;interleaved=0-1")
            );
            assert_eq!(head.get(CHANNEL_HEADER), None);
            assert_eq!(client.flows.opened.len(), 0);
        }
        // Interleaved only: the request passes byte for byte, in either mode.
        let tcp = b"SETUP rtsp://127.0.0.1:8554/cam RTSP/1.0\r\nCSeq: 6\r\nTransport: RTP/AVP/TCP;unicast;interleaved=0-1\r\n\r\n";
        for udp in [RtspUdp::Datagram, RtspUdp::Refuse] {
            let d = Peer::client_facing(udp).request(tcp, t0());
            assert_eq!(d.action, Action::Pass);
        }
    }

    #[test]
    fn the_server_facing_peer_checks_the_channel_header() {
        let mut server = Peer::server_facing();
        let bad = b"SETUP rtsp://cam/x RTSP/1.0\r\nCSeq: 7\r\nX-Tunnel-Channel: seven\r\nTransport: RTP/AVP;unicast;client_port=5000-5001\r\n\r\n";
        let d = server.request(bad, t0());
        assert_eq!(replied(&d), "RTSP/1.0 400 Bad Request\r\nCSeq: 7\r\n\r\n");
        assert!(matches!(&d.note, Some(Note::BadChannel(v)) if v == "seven"));
        assert_eq!(server.flows.opened.len(), 0);

        // Without the header (the client-facing peer kept the SETUP as it was): as it is.
        let plain = b"SETUP rtsp://cam/x RTSP/1.0\r\nCSeq: 8\r\nTransport: RTP/AVP/TCP;interleaved=0-1\r\n\r\n";
        assert_eq!(server.request(plain, t0()).action, Action::Pass);

        // The header with no unicast UDP left: the header goes, no flow.
        let odd = b"SETUP rtsp://cam/x RTSP/1.0\r\nCSeq: 9\r\nx-tunnel-channel: 3\r\nTransport: RTP/AVP/TCP;interleaved=0-1\r\n\r\n";
        let out = replaced(server.request(odd, t0()));
        assert_eq!(
            text(&out),
            "SETUP rtsp://cam/x RTSP/1.0\r\nCSeq: 9\r\nTransport: RTP/AVP/TCP;interleaved=0-1\r\n\r\n"
        );
        assert_eq!(server.flows.opened.len(), 0);
    }

    #[test]
    fn setups_past_the_limits_are_answered_453() {
        let now = t0();
        let mut client = Peer::client_facing(RtspUdp::Datagram);
        for n in 0..MAX_FLOWS as u32 {
            client.carried_session("s", n, 60, now);
        }
        assert_eq!(client.flows.live(), MAX_FLOWS);
        let d = client.request(UDP_SETUP, now);
        assert!(replied(&d).starts_with("RTSP/1.0 453 Not Enough Bandwidth\r\nCSeq: 3\r\n"));
        assert!(matches!(d.note, Some(Note::AtLimit(Limit::Flows))));
        assert_eq!(client.flows.live(), MAX_FLOWS);

        // SETUPs nobody answers.
        let mut client = Peer::client_facing(RtspUdp::Datagram);
        for _ in 0..MAX_PENDING {
            replaced(client.request(UDP_SETUP, now));
        }
        let d = client.request(UDP_SETUP, now);
        assert!(replied(&d).starts_with("RTSP/1.0 453 "));
        assert!(matches!(d.note, Some(Note::AtLimit(Limit::Pending))));
        assert_eq!(client.policy.flows(), MAX_PENDING);
    }

    #[test]
    fn a_failed_bind_is_answered_500() {
        let mut client = Peer::client_facing(RtspUdp::Datagram);
        client.flows.fail = true;
        let d = client.request(UDP_SETUP, t0());
        assert_eq!(
            replied(&d),
            "RTSP/1.0 500 Internal Server Error\r\nCSeq: 3\r\nSession: 12345678\r\n\r\n"
        );
        assert!(
            matches!(&d.note, Some(Note::BindFailed(e)) if e.kind() == io::ErrorKind::AddrInUse)
        );
        assert_eq!(client.policy.flows(), 0);

        let mut server = Peer::server_facing();
        server.flows.fail = true;
        let carried = b"SETUP rtsp://cam/x RTSP/1.0\r\nCSeq: 2\r\nTransport: RTP/AVP;unicast;client_port=5000-5001\r\nX-Tunnel-Channel: 1\r\n\r\n";
        let d = server.request(carried, t0());
        assert!(replied(&d).starts_with("RTSP/1.0 500 Internal Server Error\r\n"));
        assert!(matches!(d.note, Some(Note::BindFailed(_))));
    }

    #[test]
    fn teardown_releases_the_sessions_flows() {
        let now = t0();
        let mut client = Peer::client_facing(RtspUdp::Datagram);
        client.carried_session("a", 0, 60, now);
        client.carried_session("a", 1, 60, now);
        client.carried_session("b", 2, 60, now);
        assert_eq!((client.policy.sessions(), client.flows.live()), (2, 3));

        let teardown =
            b"TEARDOWN rtsp://127.0.0.1:8554/cam RTSP/1.0\r\nCSeq: 9\r\nSession: a\r\n\r\n";
        let d = client.request(teardown, now);
        assert_eq!(d.action, Action::Pass);
        assert!(matches!(d.note, Some(Note::TornDown { flows: 2 })));
        assert_eq!((client.policy.sessions(), client.flows.live()), (1, 1));
        // Only session b's flow is left.
        assert_eq!(client.flows.last().id, 3);
    }

    #[test]
    fn a_refused_or_interleaved_answer_releases_the_setups_flow() {
        let now = t0();
        for answer in [
            "RTSP/1.0 454 Session Not Found\r\nCSeq: 3\r\n\r\n",
            "RTSP/1.0 200 OK\r\nCSeq: 3\r\nSession: x\r\nTransport: RTP/AVP/TCP;unicast;interleaved=0-1\r\n\r\n",
        ] {
            let mut client = Peer::client_facing(RtspUdp::Datagram);
            replaced(client.request(UDP_SETUP, now));
            assert_eq!(client.flows.live(), 1);
            assert_eq!(client.response(answer.as_bytes(), now).action, Action::Pass);
            assert_eq!((client.flows.live(), client.policy.flows()), (0, 0));
            assert_eq!(client.policy.sessions(), 0);
        }
    }

    #[test]
    fn a_silent_session_expires_after_twice_its_timeout_and_media_keeps_one() {
        let t0 = t0();
        let mut client = Peer::client_facing(RtspUdp::Datagram);
        client.carried_session("quiet", 0, 30, t0);
        client.carried_session("busy", 1, 30, t0);
        let busy = client.flows.last();
        assert_eq!(client.policy.sessions(), 2);

        assert_eq!(client.policy.expire(t0 + secs(59)), 0);
        // The player's RTCP reports reach the busy session's flow.
        busy.activity.set(Some(t0 + secs(50)));
        drop(busy);
        assert_eq!(client.policy.expire(t0 + secs(60)), 1);
        assert_eq!((client.policy.sessions(), client.flows.live()), (1, 1));

        // A request naming it keeps it too (GET_PARAMETER as a keep-alive).
        let keepalive =
            b"GET_PARAMETER rtsp://127.0.0.1:8554/cam RTSP/1.0\r\nCSeq: 8\r\nSession: busy\r\n\r\n";
        assert_eq!(
            client.request(keepalive, t0 + secs(100)).action,
            Action::Pass
        );
        assert_eq!(client.policy.expire(t0 + secs(159)), 0);
        assert_eq!(client.policy.expire(t0 + secs(160)), 1);
        assert_eq!((client.policy.sessions(), client.flows.live()), (0, 0));
    }

    #[test]
    fn urls_are_rebased_to_the_clients_base_on_the_client_facing_peer_only() {
        let describe = b"DESCRIBE rtsp://127.0.0.1:8554/cam RTSP/1.0\r\nCSeq: 2\r\nAccept: application/sdp\r\n\r\n";
        let sdp = "v=0\r\na=control:rtsp://192.168.1.10:554/cam/\r\nm=video 0 RTP/AVP 96\r\na=control:rtsp://192.168.1.10:554/cam/trackID=1\r\n";
        let answer = format!(
            "RTSP/1.0 200 OK\r\nCSeq: 2\r\nContent-Base: rtsp://192.168.1.10:554/cam/\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        );

        let mut client = Peer::client_facing(RtspUdp::Datagram);
        // Requests pass byte for byte (Digest signs the URI).
        assert_eq!(client.request(describe, t0()).action, Action::Pass);
        let out = replaced(client.response(answer.as_bytes(), t0()));
        let head = head_of(&out);
        assert_eq!(head.get("Content-Base"), Some("rtsp://127.0.0.1:8554/cam/"));
        let body = "v=0\r\na=control:rtsp://127.0.0.1:8554/cam/\r\nm=video 0 RTP/AVP 96\r\na=control:rtsp://127.0.0.1:8554/cam/trackID=1\r\n";
        assert_eq!(head.get("Content-Length"), Some(&*body.len().to_string()));
        assert!(text(&out).ends_with(&format!("\r\n\r\n{body}")));
        // A response naming the client's own base passes.
        let same =
            b"RTSP/1.0 200 OK\r\nCSeq: 3\r\nContent-Base: rtsp://127.0.0.1:8554/cam/\r\n\r\n";
        assert_eq!(client.response(same, t0()).action, Action::Pass);

        // The server-facing peer rewrites nothing: the client-facing one knows the base.
        let mut server = Peer::server_facing();
        assert_eq!(server.request(describe, t0()).action, Action::Pass);
        assert_eq!(
            server.response(answer.as_bytes(), t0()).action,
            Action::Pass
        );
    }

    #[test]
    fn a_routing_prefix_is_taken_off_requests_and_put_back_into_answers() {
        let mut client = Peer::client_facing(RtspUdp::Datagram);
        client.policy = Policy::new(Facing::Client, RtspUdp::Datagram, PLAYER)
            .with_prefix(Some("/cam.shop".into()));
        let describe =
            b"DESCRIBE rtsp://127.0.0.1:8554/cam.shop/stream1 RTSP/1.0\r\nCSeq: 2\r\n\r\n";
        let out = replaced(client.request(describe, t0()));
        assert!(
            text(&out).starts_with("DESCRIBE rtsp://127.0.0.1:8554/stream1 RTSP/1.0\r\n"),
            "{}",
            text(&out)
        );
        // The camera answers with its own URL, or with the one it was sent: both come back
        // under the prefix.
        for base in [
            "rtsp://192.168.1.10:554/stream1/",
            "rtsp://127.0.0.1:8554/stream1/",
        ] {
            let answer = format!("RTSP/1.0 200 OK\r\nCSeq: 2\r\nContent-Base: {base}\r\n\r\n");
            let out = replaced(client.response(answer.as_bytes(), t0()));
            assert_eq!(
                head_of(&out).get("Content-Base"),
                Some("rtsp://127.0.0.1:8554/cam.shop/stream1/")
            );
        }
        // A body travels with its rewritten head; the bare prefix is the server's root.
        let set = b"SET_PARAMETER rtsp://127.0.0.1:8554/cam.shop RTSP/1.0\r\nCSeq: 3\r\nContent-Length: 4\r\n\r\nx: 1";
        let out = replaced(client.request(set, t0()));
        assert!(text(&out).starts_with("SET_PARAMETER rtsp://127.0.0.1:8554/ RTSP/1.0\r\n"));
        assert!(text(&out).ends_with("\r\n\r\nx: 1"));
        // A path outside the prefix and `*` pass as they are.
        let other = b"OPTIONS rtsp://127.0.0.1:8554/cam.shopping RTSP/1.0\r\nCSeq: 4\r\n\r\n";
        assert_eq!(client.request(other, t0()).action, Action::Pass);
        let star = b"OPTIONS * RTSP/1.0\r\nCSeq: 5\r\n\r\n";
        assert_eq!(client.request(star, t0()).action, Action::Pass);
    }

    #[test]
    fn the_servers_requests_and_the_clients_answers_pass() {
        let announce =
            b"ANNOUNCE rtsp://127.0.0.1:8554/cam RTSP/1.0\r\nCSeq: 1\r\nSession: a\r\n\r\n";
        let ok = b"RTSP/1.0 200 OK\r\nCSeq: 1\r\nSession: a\r\n\r\n";
        for mut peer in [
            Peer::client_facing(RtspUdp::Datagram),
            Peer::server_facing(),
        ] {
            let d = peer.send(Toward::Client, announce, t0());
            assert_eq!(d.action, Action::Pass);
            assert_eq!(peer.send(Toward::Server, ok, t0()).action, Action::Pass);
        }
    }
}
