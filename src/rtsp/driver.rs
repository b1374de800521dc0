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
//! local socket is. The decisions above are `rtsp::policy` (pure, time as an input) and the
//! wire format is `protocol::rtsp`; this module is the I/O around them: it reads the socket
//! and the stream, frames and parses what it reads, asks the policy, writes what the policy
//! says, opens media flows for it, runs the session expiry timer, keeps the session gauge,
//! and logs. Documented in `docs/rtsp.md`.

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
use crate::protocol::rtsp::{frame, FrameError, Head, Item, CHANNEL_HEADER};
use crate::rtsp::policy::{Action, Decision, Facing, FlowHandle, Flows, Note, Policy, Toward};
use crate::stats::{GaugeGuard, Stats};
use crate::tunnel::splice::{
    abandoned, cut_short, delivered, first_payload, ignore_not_connected, write_tcp, Abort,
    Downstream, Report,
};

/// How often silent sessions are looked for.
const EXPIRY_CHECK: Duration = Duration::from_secs(5);
/// Most bytes read from an input at a time.
const READ: usize = 64 * 1024;

/// What the layer needs besides the socket and the stream.
pub struct RtspCtx {
    pub facing: Facing,
    /// The client-facing peer's routing prefix on `--rtsp` (`/cam.shop`), if any.
    pub prefix: Option<String>,
    /// Bytes already read from the socket (the first request, read to route it).
    pub leading: Bytes,
    pub udp: RtspUdp,
    pub mux: Arc<MediaMux>,
    pub stats: Arc<Stats>,
    /// This connection's line in the node's RTSP list (status), while it lasts.
    pub listed: crate::stats::RtspListed,
}

struct State {
    policy: Policy<MediaFlow>,
    /// One unit on the node's session gauge per session the policy holds.
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
    let (facing, udp, prefix) = (ctx.facing, ctx.udp, ctx.prefix.clone());
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
                policy: Policy::new(facing, udp, near_ip).with_prefix(prefix),
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
            sessions = st.policy.sessions(),
            flows = st.policy.flows(),
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
            let flows = st.policy.expire(crate::time::now());
            if flows > 0 {
                info!(
                    flows,
                    "an RTSP session timed out (no request or media from the client): released"
                );
            }
            self.count_sessions(&mut st);
        }
    }

    fn count_sessions(&self, st: &mut State) {
        let n = st.policy.sessions();
        let entry = &self.ctx.listed.entry;
        entry
            .sessions
            .store(n, std::sync::atomic::Ordering::Relaxed);
        entry
            .flows
            .store(st.policy.flows(), std::sync::atomic::Ordering::Relaxed);
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
        let mut buf = BytesMut::from(&self.ctx.leading[..]);
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

    /// One complete message travelling toward `to`: parsed here, decided by the policy.
    fn message(&self, to: To, raw: &[u8], body: &[u8]) -> Result<Action, FrameError> {
        let head = Head::parse(raw)?;
        let toward = if to == self.client_side() {
            Toward::Client
        } else {
            Toward::Server
        };
        let mut flows = MuxFlows {
            ctx: &self.ctx,
            local_ip: self.local_ip,
            near_ip: self.near_ip,
        };
        let now = crate::time::now();
        let mut st = self.state();
        let Decision { action, note } = st.policy.message(toward, head, body, now, &mut flows);
        self.count_sessions(&mut st);
        drop(st);
        if let Some(note) = note {
            self.log(note);
        }
        Ok(action)
    }

    fn log(&self, note: Note) {
        match note {
            Note::TornDown { flows } => debug!(flows, "TEARDOWN: media flows released"),
            Note::Unsupported(why) => info!("SETUP answered 461 Unsupported Transport: {why}"),
            Note::BadChannel(channel) => {
                warn!("SETUP with a malformed {CHANNEL_HEADER}: {channel:?}")
            }
            Note::AtLimit(limit) => warn!("SETUP refused: {limit}"),
            Note::BindFailed(e) => warn!(
                "SETUP refused: cannot bind a UDP port pair on {}: {e}",
                self.local_ip
            ),
        }
    }
}

/// The policy's way to media flows: channel ids from the connection's mux, port pairs bound
/// on the address the socket uses, each flow counted on the node's gauge.
struct MuxFlows<'a> {
    ctx: &'a RtspCtx,
    local_ip: IpAddr,
    near_ip: IpAddr,
}

impl Flows for MuxFlows<'_> {
    type Flow = MediaFlow;

    fn allocate(&mut self) -> u32 {
        self.ctx.mux.allocate()
    }

    fn open(&mut self, id: u32, allocated_here: bool) -> std::io::Result<MediaFlow> {
        MediaFlow::open(
            &self.ctx.mux,
            id,
            allocated_here,
            self.local_ip,
            self.near_ip,
            self.ctx.stats.media_flows.hold(),
            self.ctx.listed.entry.media.clone(),
        )
    }
}

impl FlowHandle for MediaFlow {
    fn ports(&self) -> (u16, u16) {
        MediaFlow::ports(self)
    }

    fn set_remote(&self, rtp: Option<SocketAddr>, rtcp: Option<SocketAddr>) {
        MediaFlow::set_remote(self, rtp, rtcp);
    }

    fn last_activity(&self) -> Option<Instant> {
        MediaFlow::last_activity(self)
    }
}
