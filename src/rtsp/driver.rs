//! The RTSP layer of a stream: forwards an RTSP connection between a TCP socket and a QUIC
//! stream like [`splice`](crate::tunnel::splice) does, but reads it as RTSP (`protocol::rtsp`) so that:
//!
//! - a SETUP asking for RTP over UDP gets a UDP port pair on both peers, joined by QUIC
//!   datagrams ([`media`](crate::media)); the client keeps its transport. Or, in refuse mode,
//!   the client-facing peer answers `461 Unsupported Transport` and the client falls back to
//!   interleaved TCP at once. Multicast is always answered 461;
//! - absolute URLs in responses that name another host (the camera's LAN address) are
//!   rewritten to the URL the client used, so it stays on the tunnel;
//! - sessions' flows are released on TEARDOWN, when the session times out, and with the
//!   connection. Requests otherwise pass byte for byte (Digest authentication keeps working),
//!   and so do interleaved `$` frames.
//!
//! The same code runs on both peers; [`Facing`] says which end of the RTSP conversation the
//! local socket is. Pure logic lives in `protocol::rtsp` and `session::rtsp`; this module is
//! the driver. Documented in `docs/rtsp.md`.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::media::{MediaFlow, MediaMux, MEDIA_PRIORITY};
use crate::protocol::header::RtspUdp;
use crate::protocol::rtsp::{
    format_ports, frame, rebase_head, rebase_sdp, reply, url_base, Carriage, FrameError, Head,
    Item, TransportSpec,
};
use crate::rtsp::sessions::Sessions;
use crate::stats::{GaugeGuard, Stats};
use crate::tunnel::splice::{
    abandoned, cut_short, delivered, first_payload, ignore_not_connected, write_tcp, Abort,
    Downstream, Report,
};

/// The header that carries a flow's channel id from the client-facing peer to the
/// server-facing one, inside a forwarded SETUP. Removed before the server sees it.
const CHANNEL_HEADER: &str = "X-Tunnel-Channel";
/// How often silent sessions are looked for.
const EXPIRY_CHECK: Duration = Duration::from_secs(5);
/// Most bytes read from an input at a time.
const READ: usize = 64 * 1024;

/// Which end of the RTSP conversation the local socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Facing {
    /// The connecting side: the socket is the RTSP client (ffplay, VLC).
    Client,
    /// The exposing side: the socket is the RTSP server (the camera).
    Server,
}

/// What the layer needs besides the socket and the stream.
pub struct RtspCtx {
    pub facing: Facing,
    pub udp: RtspUdp,
    pub mux: Arc<MediaMux>,
    pub stats: Arc<Stats>,
}

/// A flow and what its SETUP answer needs.
struct Flow {
    media: MediaFlow,
    /// The SETUP's `client_port` value as the client wrote it (restored in the answer).
    client_port: Option<String>,
}

struct State {
    sessions: Sessions<Flow>,
    /// `rtsp://host:port` as the client wrote it: where rewritten URLs point.
    base: Option<String>,
    /// One unit on the node's session gauge per session here.
    live: Vec<GaugeGuard>,
}

/// Where a piece of output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum To {
    Socket,
    Stream,
}

impl To {
    /// Where what travels toward `self` came from (and where answers to it go).
    fn back(self) -> To {
        match self {
            To::Socket => To::Stream,
            To::Stream => To::Socket,
        }
    }
}

/// What to do with one message.
enum Action {
    /// Forward the bytes as they came.
    Pass,
    /// Forward these instead.
    Replace(Vec<u8>),
    /// Forward nothing; answer the sender with this.
    Reply(Vec<u8>),
}

struct Layer<'a> {
    ctx: RtspCtx,
    tcp: &'a TcpStream,
    /// The socket's own address and its peer's: where flows bind, whom they accept.
    local_ip: IpAddr,
    near_ip: IpAddr,
    /// Serialises whole messages written to the socket (both directions may write to it).
    tcp_lock: tokio::sync::Mutex<()>,
    send: tokio::sync::Mutex<&'a mut SendStream>,
    state: Mutex<State>,
}

/// Forwards until both directions ended or one aborted; `cancel` aborts.
pub async fn splice_rtsp(
    tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    downstream: Downstream,
    ctx: RtspCtx,
    cancel: CancellationToken,
) -> Report {
    let _ = send.set_priority(MEDIA_PRIORITY);
    let (local_ip, near_ip) = match (tcp.local_addr(), tcp.peer_addr()) {
        (Ok(l), Ok(p)) => (l.ip(), p.ip()),
        (Err(e), _) | (_, Err(e)) => {
            return abandoned(Abort::Local(e), &tcp, &mut send, &mut recv);
        }
    };
    let stats = ctx.stats.clone();
    let (mut up, mut down) = (0u64, 0u64);
    let result = {
        let layer = Layer {
            ctx,
            tcp: &tcp,
            local_ip,
            near_ip,
            tcp_lock: tokio::sync::Mutex::new(()),
            send: tokio::sync::Mutex::new(&mut send),
            state: Mutex::new(State {
                sessions: Sessions::default(),
                base: None,
                live: Vec::new(),
            }),
        };
        let both = async {
            tokio::try_join!(
                layer.socket_to_stream(&mut up),
                layer.stream_to_socket(&mut recv, downstream, &mut down),
            )?;
            let mut send = layer.send.lock().await;
            delivered(&mut send).await
        };
        let r = tokio::select! {
            biased;
            r = both => r,
            () = cancel.cancelled() => Err(Abort::Shutdown),
            () = layer.expire_forever() => unreachable!("never ends"),
        };
        let st = layer.state.into_inner().unwrap_or_else(|p| p.into_inner());
        debug!(
            sessions = st.sessions.sessions(),
            flows = st.sessions.flows(),
            "rtsp connection ended: releasing its sessions and media flows"
        );
        r
    };
    if let Some(abort) = result.as_ref().err() {
        cut_short(abort, &tcp, &mut send, &mut recv);
    }
    debug!(
        sessions_live = stats.rtsp_sessions.get(),
        flows_live = stats.media_flows.get(),
        "rtsp released"
    );
    Report {
        up,
        down,
        abort: result.err(),
    }
}

impl Layer<'_> {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Releases sessions silent past their timeout, every [`EXPIRY_CHECK`].
    async fn expire_forever(&self) {
        let mut tick = tokio::time::interval(EXPIRY_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut st = self.state();
            let gone = st
                .sessions
                .expire(Instant::now(), |f| f.media.last_activity());
            if !gone.is_empty() {
                info!(
                    flows = gone.len(),
                    "an RTSP session timed out (no request or media from the client): released"
                );
            }
            drop(gone);
            self.count_sessions(&mut st);
        }
    }

    fn count_sessions(&self, st: &mut State) {
        let n = st.sessions.sessions();
        st.live.truncate(n);
        while st.live.len() < n {
            st.live.push(self.ctx.stats.rtsp_sessions.hold());
        }
    }

    /// Where requests come from, and where their answers go.
    fn client_side(&self) -> To {
        match self.ctx.facing {
            Facing::Client => To::Socket,
            Facing::Server => To::Stream,
        }
    }

    /// Writes whole; toward the stream the bytes are handed to quinn as they are (no copy).
    async fn write(&self, to: To, data: Bytes) -> Result<(), Abort> {
        match to {
            To::Socket => {
                let _whole = self.tcp_lock.lock().await;
                write_tcp(self.tcp, &data).await
            }
            To::Stream => {
                let mut send = self.send.lock().await;
                send.write_chunk(data).await.map_err(Abort::from_write)
            }
        }
    }

    /// Ends what `to` carries in this direction: FIN.
    async fn finish(&self, to: To) -> Result<(), Abort> {
        match to {
            To::Socket => socket2::SockRef::from(self.tcp)
                .shutdown(std::net::Shutdown::Write)
                .or_else(ignore_not_connected)
                .map_err(Abort::Local),
            To::Stream => {
                let _ = self.send.lock().await.finish();
                Ok(())
            }
        }
    }

    async fn socket_to_stream(&self, count: &mut u64) -> Result<(), Abort> {
        let mut buf = BytesMut::new();
        loop {
            self.drain(&mut buf, To::Stream, count).await?;
            self.tcp.readable().await.map_err(Abort::Local)?;
            buf.reserve(READ);
            match self.tcp.try_read_buf(&mut buf) {
                Ok(0) => return self.end_of_input(&buf, To::Stream).await,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Abort::Local(e)),
            }
        }
    }

    async fn stream_to_socket(
        &self,
        recv: &mut RecvStream,
        downstream: Downstream,
        count: &mut u64,
    ) -> Result<(), Abort> {
        let mut buf = BytesMut::from(&first_payload(recv, downstream).await?[..]);
        loop {
            self.drain(&mut buf, To::Socket, count).await?;
            match recv.read_chunk(READ, true).await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                Ok(None) => return self.end_of_input(&buf, To::Socket).await,
                Err(e) => return Err(Abort::from_read(e)),
            }
        }
    }

    async fn end_of_input(&self, left: &[u8], to: To) -> Result<(), Abort> {
        if !left.is_empty() {
            debug!(bytes = left.len(), "the input ended inside an RTSP message");
        }
        self.finish(to).await
    }

    /// Handles every complete item at the start of `buf`, writing toward `to`. Runs of
    /// items that pass unchanged (interleaved media, most messages) go out in one write.
    async fn drain(&self, buf: &mut BytesMut, to: To, count: &mut u64) -> Result<(), Abort> {
        let mut run = 0;
        loop {
            let item = match frame(&buf[run..]) {
                Ok(Some(item)) if buf.len() - run >= item.wire_len() => item,
                Ok(_) => break,
                Err(e) => {
                    self.flush(buf, &mut run, to, count).await?;
                    return Err(self.malformed(to, e).await);
                }
            };
            let action = match item {
                Item::Data { .. } | Item::Blank { .. } => Action::Pass,
                Item::Message { head, body } => {
                    let at = run;
                    match self.message(to, &buf[at..at + head], &buf[at + head..at + head + body]) {
                        Ok(action) => action,
                        Err(e) => {
                            self.flush(buf, &mut run, to, count).await?;
                            return Err(self.malformed(to, e).await);
                        }
                    }
                }
            };
            match action {
                Action::Pass => run += item.wire_len(),
                Action::Replace(bytes) => {
                    self.flush(buf, &mut run, to, count).await?;
                    let _ = buf.split_to(item.wire_len());
                    let n = bytes.len() as u64;
                    self.write(to, bytes.into()).await?;
                    *count += n;
                }
                Action::Reply(bytes) => {
                    self.flush(buf, &mut run, to, count).await?;
                    let _ = buf.split_to(item.wire_len());
                    self.write(to.back(), bytes.into()).await?;
                }
            }
        }
        self.flush(buf, &mut run, to, count).await
    }

    async fn flush(
        &self,
        buf: &mut BytesMut,
        run: &mut usize,
        to: To,
        count: &mut u64,
    ) -> Result<(), Abort> {
        if *run > 0 {
            let bytes: Bytes = buf.split_to(*run).freeze();
            *run = 0;
            let n = bytes.len() as u64;
            self.write(to, bytes).await?;
            *count += n;
        }
        Ok(())
    }

    /// Bad RTSP: from the client, it is answered `400 Bad Request`; either way the
    /// connection ends.
    async fn malformed(&self, to: To, e: FrameError) -> Abort {
        let from = to.back();
        let who = match (self.ctx.facing, from) {
            (Facing::Client, To::Socket) => "the RTSP client",
            (Facing::Server, To::Socket) => "the RTSP server",
            (_, To::Stream) => "the peer",
        };
        warn!("closing the RTSP connection: {who} sent malformed RTSP: {e}");
        if self.ctx.facing == Facing::Client && from == To::Socket {
            let bad = Bytes::from_static(b"RTSP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            let _ = self.write(To::Socket, bad).await;
        }
        Abort::BadPayload(format!("{who} sent malformed RTSP: {e}"))
    }

    /// One complete message travelling toward `to`.
    fn message(&self, to: To, raw: &[u8], body: &[u8]) -> Result<Action, FrameError> {
        let mut head = Head::parse(raw)?;
        let toward_server = to != self.client_side();
        if head.method().is_some() {
            if toward_server {
                return Ok(self.request(&mut head));
            }
            // A request from the server (ANNOUNCE, GET_PARAMETER...): as it is.
            return Ok(Action::Pass);
        }
        if toward_server {
            // The client answering a server's request.
            return Ok(Action::Pass);
        }
        Ok(self.response(&mut head, body))
    }

    fn request(&self, head: &mut Head) -> Action {
        let mut st = self.state();
        let now = Instant::now();
        if let Some((session, _)) = head.session() {
            st.sessions.touch(session, now);
        }
        if self.ctx.facing == Facing::Client {
            if let crate::protocol::rtsp::StartLine::Request { uri, .. } = &head.start {
                if let Some(base) = url_base(uri) {
                    st.base = Some(base.to_owned());
                }
            }
        }
        let method = head.method().unwrap_or_default().to_ascii_uppercase();
        let action = match method.as_str() {
            "TEARDOWN" => {
                if let Some((session, _)) = head.session() {
                    let gone = st.sessions.teardown(session);
                    debug!(flows = gone.len(), "TEARDOWN: media flows released");
                }
                Action::Pass
            }
            "SETUP" => match self.ctx.facing {
                Facing::Client => self.setup_from_client(&mut st, head),
                Facing::Server => self.setup_toward_server(&mut st, head),
            },
            _ => Action::Pass,
        };
        self.count_sessions(&mut st);
        action
    }

    /// The client-facing peer: keep, refuse or carry a UDP SETUP.
    fn setup_from_client(&self, st: &mut State, head: &mut Head) -> Action {
        let Some(value) = head.get("Transport") else {
            return Action::Pass;
        };
        let specs = TransportSpec::parse_list(value);
        let tcp: Vec<TransportSpec> = specs
            .iter()
            .filter(|s| s.carriage() == Carriage::Tcp)
            .cloned()
            .collect();
        if tcp.len() == specs.len() {
            return Action::Pass;
        }
        let unsupported = |why: &str| {
            info!("SETUP answered 461 Unsupported Transport: {why}");
            Action::Reply(reply(head, 461, "Unsupported Transport"))
        };
        let udp = specs
            .iter()
            .find(|s| s.carriage() == Carriage::UdpUnicast && s.ports("client_port").is_some());
        let udp = match (self.ctx.udp, udp) {
            (RtspUdp::Datagram, Some(udp)) => udp.clone(),
            _ if !tcp.is_empty() => {
                // Offer the server only the interleaved alternatives.
                head.set("Transport", TransportSpec::encode_list(&tcp));
                return Action::Replace(head.encode());
            }
            (RtspUdp::Refuse, _) => {
                return unsupported("UDP is refused for this service (interleaved TCP only)")
            }
            (RtspUdp::Datagram, None) => {
                return unsupported("multicast, or UDP without client_port, is not carried")
            }
        };
        let (rtp, rtcp) = udp.ports("client_port").expect("filtered above");
        let rtcp = rtcp.unwrap_or(rtp.saturating_add(1));
        let id = self.ctx.mux.allocate();
        let media = match self.open_flow(st, head, id, true) {
            Ok(m) => m,
            Err(refusal) => return refusal,
        };
        media.set_remote(
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
        st.sessions.setup_sent(
            head.cseq(),
            Flow {
                media,
                client_port: None,
            },
        );
        Action::Replace(head.encode())
    }

    /// The server-facing peer: give a carried SETUP this peer's ports toward the server.
    fn setup_toward_server(&self, st: &mut State, head: &mut Head) -> Action {
        let Some(channel) = head.remove(CHANNEL_HEADER) else {
            return Action::Pass;
        };
        let Ok(id) = channel.trim().parse::<u32>() else {
            warn!("SETUP with a malformed {CHANNEL_HEADER}: {channel:?}");
            return Action::Reply(reply(head, 400, "Bad Request"));
        };
        let mut specs = TransportSpec::parse_list(head.get("Transport").unwrap_or_default());
        let Some(udp) = specs
            .iter_mut()
            .find(|s| s.carriage() == Carriage::UdpUnicast)
        else {
            return Action::Replace(head.encode());
        };
        let media = match self.open_flow(st, head, id, false) {
            Ok(m) => m,
            Err(refusal) => return refusal,
        };
        let client_port = udp.get("client_port").map(str::to_owned);
        let (a, b) = media.ports();
        udp.set("client_port", format_ports(a, b));
        head.set("Transport", TransportSpec::encode_list(&specs));
        st.sessions
            .setup_sent(head.cseq(), Flow { media, client_port });
        Action::Replace(head.encode())
    }

    /// A new flow for the SETUP in `head`, or the answer that refuses it (at a limit, or no
    /// port pair could be bound).
    fn open_flow(
        &self,
        st: &State,
        head: &Head,
        id: u32,
        allocated_here: bool,
    ) -> Result<MediaFlow, Action> {
        if let Err(limit) = st.sessions.can_add() {
            warn!("SETUP refused: {limit}");
            return Err(Action::Reply(reply(head, 453, "Not Enough Bandwidth")));
        }
        MediaFlow::open(
            &self.ctx.mux,
            id,
            allocated_here,
            self.local_ip,
            self.near_ip,
            self.ctx.stats.media_flows.hold(),
        )
        .map_err(|e| {
            warn!(
                "SETUP refused: cannot bind a UDP port pair on {}: {e}",
                self.local_ip
            );
            Action::Reply(reply(head, 500, "Internal Server Error"))
        })
    }

    /// A response travelling toward the client.
    fn response(&self, head: &mut Head, body: &[u8]) -> Action {
        let mut st = self.state();
        let mut changed = false;
        let pending = head.cseq().and_then(|c| st.sessions.answered(Some(c)));
        if let Some(flow) = pending {
            changed |= self.answer_setup(&mut st, head, flow);
        }
        self.count_sessions(&mut st);
        let mut new_body = None;
        if self.ctx.facing == Facing::Client {
            if let Some(base) = st.base.clone() {
                changed |= rebase_head(head, &base);
                let sdp = head
                    .get("Content-Type")
                    .is_some_and(|t| t.to_ascii_lowercase().starts_with("application/sdp"));
                if sdp {
                    new_body = rebase_sdp(body, &base);
                }
            }
        }
        drop(st);
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
    fn answer_setup(&self, st: &mut State, head: &mut Head, flow: Flow) -> bool {
        let ok = head.status().is_some_and(|s| (200..300).contains(&s));
        let mut specs = TransportSpec::parse_list(head.get("Transport").unwrap_or_default());
        let chosen = specs
            .iter_mut()
            .find(|s| s.carriage() == Carriage::UdpUnicast);
        let (Some(spec), true) = (chosen, ok) else {
            // Refused, or the server chose interleaved: the flow goes.
            return false;
        };
        match self.ctx.facing {
            Facing::Server => {
                let server_ip = spec
                    .get("source")
                    .and_then(|s| s.parse::<IpAddr>().ok())
                    .unwrap_or(self.near_ip);
                if let Some((rtp, rtcp)) = spec.ports("server_port") {
                    let rtcp = rtcp.unwrap_or(rtp.saturating_add(1));
                    flow.media.set_remote(
                        Some(SocketAddr::new(server_ip, rtp)),
                        Some(SocketAddr::new(server_ip, rtcp)),
                    );
                }
                if let Some(orig) = &flow.client_port {
                    spec.set("client_port", orig.clone());
                }
            }
            Facing::Client => {
                let (a, b) = flow.media.ports();
                spec.set("server_port", format_ports(a, b));
                spec.remove("source");
            }
        }
        head.set("Transport", TransportSpec::encode_list(&specs));
        let (session, timeout) = head.session().unwrap_or(("", None));
        let session = session.to_owned();
        st.sessions.attach(&session, timeout, flow, Instant::now());
        true
    }
}
