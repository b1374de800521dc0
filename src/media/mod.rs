//! RTP and RTCP across the tunnel: a UDP port pair on each peer (facing the RTSP client on
//! one, the RTSP server on the other), joined by QUIC datagrams.
//!
//! - A flow is named by a channel id that the client-facing peer allocates; every datagram
//!   starts with a tag naming the flow (`protocol::media` has every wire format here). Each
//!   peer tells its own ids from the other's on a connection that carries streams both ways;
//!   an id the other peer reuses while its flow is open is refused, not taken over. A control
//!   datagram carries the flow's loss repair (below), not media.
//! - Loss repair, both in control datagrams: the sending peer follows each video frame (or
//!   each 8 RTP packets) with an XOR parity, from which the receiving peer rebuilds one lost
//!   packet at once ([`fec`]); and it keeps its last RTP packets, which the receiving
//!   peer, seeing a gap in the sequence numbers, asks for at once (again after about a round
//!   trip, three times at most) and gets resent as they were ([`repair`]). Nothing
//!   waits for either: the client's jitter buffer puts a mended packet in its place.
//! - A packet larger than the connection's datagram limit is not dropped: it goes on a
//!   unidirectional stream of its flow (the tag, then length-prefixed frames), opened when
//!   the first such packet comes. Order across the two paths is not kept; RTP
//!   receivers reorder by sequence number.
//! - Only packets from the expected host (the RTSP client's or server's address) enter a
//!   flow; a flow sends to the ports the SETUP exchange named, or to the first sender's.
//! - [`MediaMux`] is one per QUIC connection: it reads datagrams and accepts those streams.
//!   Dropping a [`MediaFlow`] closes its sockets and stops its task.
//! - Datagrams go out before stream data in every QUIC packet (quinn writes DATAGRAM frames
//!   first), and the overflow streams have a raised priority: media goes ahead of bulk.

pub mod fec;
pub mod repair;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use quinn::{Connection, RecvStream, SendDatagramError, SendStream};
use tokio::net::UdpSocket;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::protocol::media::{
    decode_overflow_head, decode_request, encode_overflow, encode_request, rtp_id, Kind, Parity,
    Tag, MAX_ID, OVERFLOW_HEAD, PARITY, REQUEST, TAG_LEN,
};
use crate::protocol::stream_code;
use crate::stats::{GaugeGuard, MediaCounters, Stats};
use crate::time::now;
use repair::{Gaps, History};

/// Send priority of overflow streams (RTSP streams use the same; bulk streams go below 0).
pub const MEDIA_PRIORITY: i32 = 1;
/// Largest UDP payload.
const MAX_PACKET: usize = 65_535;

/// A flow's key on one peer: (allocated here, id).
type Key = (bool, u32);

struct Sink {
    /// The flow's RTP tag as this peer sends it.
    tag: Tag,
    sockets: [Arc<UdpSocket>; 2],
    /// Where packets from the other peer go: the client's or the server's ports.
    remote: Mutex<[Option<SocketAddr>; 2]>,
    /// RTP this peer sent as datagrams, for resending.
    sent: Mutex<History>,
    /// RTP from the other peer that has not arrived.
    gaps: Mutex<Gaps>,
    /// Parity of the RTP block this peer is sending.
    fec_tx: Mutex<fec::Encoder>,
    /// RTP and parities from the other peer, for rebuilding a lost packet.
    fec_rx: Mutex<fec::Decoder>,
    /// The figures of the RTSP connection the flow belongs to.
    counters: Arc<MediaCounters>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sink {
    fn remote(&self, kind: Kind) -> Option<SocketAddr> {
        lock(&self.remote)[kind]
    }

    fn deliver(&self, kind: Kind, packet: &[u8]) {
        if let Some(to) = self.remote(kind) {
            // UDP: a full socket buffer drops, as the network would.
            if self.sockets[kind].try_send_to(packet, to).is_ok() {
                self.counters.delivered.add(1);
            }
        }
    }
}

/// The media side of one QUIC connection.
pub struct MediaMux {
    conn: Connection,
    flows: Mutex<HashMap<Key, Arc<Sink>>>,
    next_id: AtomicU32,
    tasks: TaskTracker,
    stats: Arc<Stats>,
    /// Ends the mux, its overflow readers and every flow's pump (a child of the node's abort).
    cancel: CancellationToken,
}

impl MediaMux {
    /// The media side of `conn`; its tasks go to `tasks` and end with `cancel`.
    pub fn new(
        conn: Connection,
        tasks: TaskTracker,
        stats: Arc<Stats>,
        cancel: CancellationToken,
    ) -> Arc<MediaMux> {
        Arc::new(MediaMux {
            conn,
            flows: Mutex::default(),
            next_id: AtomicU32::new(1),
            tasks,
            stats,
            cancel,
        })
    }

    fn flows(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Sink>>> {
        lock(&self.flows)
    }

    /// A new channel id, allocated by this peer.
    pub fn allocate(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed) & MAX_ID
    }

    fn sink(&self, key: Key) -> Option<Arc<Sink>> {
        self.flows().get(&key).cloned()
    }

    /// Routes the other peer's datagrams and overflow streams to their flows, until the
    /// connection closes or the mux is cancelled.
    pub async fn run(self: Arc<Self>) {
        let cancel = self.cancel.clone();
        loop {
            tokio::select! {
                d = self.conn.read_datagram() => match d {
                    Ok(d) => self.datagram(d),
                    Err(_) => break,
                },
                s = self.conn.accept_uni() => match s {
                    Ok(recv) => {
                        let this = self.clone();
                        let cancel = cancel.clone();
                        self.tasks.spawn(async move {
                            tokio::select! {
                                () = this.overflow(recv) => {}
                                () = cancel.cancelled() => {}
                            }
                        });
                    }
                    Err(_) => break,
                },
                () = cancel.cancelled() => break,
            }
        }
        self.flows().clear();
        let path = self.conn.stats().path;
        debug!(
            lost_packets = path.lost_packets,
            congestion_events = path.congestion_events,
            cwnd = path.cwnd,
            rtt = ?path.rtt,
            "media mux done"
        );
    }

    fn datagram(&self, d: Bytes) {
        let Some(tag) = Tag::decode(&d) else {
            return debug!("datagram shorter than its tag");
        };
        let Some(sink) = self.sink((!tag.allocated_by_sender, tag.id)) else {
            return;
        };
        let body = d.slice(TAG_LEN..);
        match (tag.control, body.first()) {
            (true, Some(&REQUEST)) => self.resend(&sink, &body),
            (true, Some(&PARITY)) => self.parity(&sink, &body),
            (true, _) => debug!("unknown media control message"),
            (false, _) => self.received(&sink, tag.kind, body),
        }
    }

    /// A media packet from the other peer (datagram or overflow stream): to the near host;
    /// RTP also to loss repair, with any packet its arrival lets the FEC decoder rebuild.
    /// An RTP packet already delivered (rebuilt, then resent too) is not delivered again.
    /// The decoder keeps `packet` itself (a view of the received datagram), not a copy.
    fn received(&self, sink: &Sink, kind: Kind, packet: Bytes) {
        if kind != 0 {
            return sink.deliver(kind, &packet);
        }
        let fresh = lock(&sink.fec_rx).arrived(packet.clone(), now());
        let Some(rebuilt) = fresh else {
            return;
        };
        sink.deliver(kind, &packet);
        self.arrived(sink, &packet);
        for p in rebuilt {
            self.rebuilt(sink, &p);
        }
    }

    /// A parity from the other peer: rebuilds the one packet of its block that is missing.
    fn parity(&self, sink: &Sink, body: &[u8]) {
        let Some(parity) = Parity::decode(body) else {
            return debug!("malformed parity");
        };
        let rebuilt = lock(&sink.fec_rx).parity(parity, now());
        if let Some(p) = rebuilt {
            self.rebuilt(sink, &p);
        }
    }

    fn rebuilt(&self, sink: &Sink, packet: &[u8]) {
        self.stats.rtp_rebuilt.add(1);
        sink.counters.rtp_rebuilt.add(1);
        sink.deliver(0, packet);
        self.arrived(sink, packet);
    }

    /// An RTP packet from the other peer was delivered: ask for what is missing before it.
    fn arrived(&self, sink: &Sink, packet: &[u8]) {
        let Some((ssrc, seq)) = rtp_id(packet) else {
            return;
        };
        let rtt = self.conn.rtt();
        let retry = rtt + rtt / 4 + Duration::from_millis(5);
        let arrival = lock(&sink.gaps).arrived(ssrc, seq, now(), retry);
        if arrival.filled {
            self.stats.rtp_repaired.add(1);
            sink.counters.rtp_repaired.add(1);
        }
        if arrival.request.is_empty() {
            return;
        }
        self.stats.rtp_requested.add(arrival.request.len() as u64);
        sink.counters
            .rtp_requested
            .add(arrival.request.len() as u64);
        let tag = Tag {
            control: true,
            ..sink.tag
        };
        let mut d = BytesMut::from(&tag.encode()[..]);
        d.put_slice(&encode_request(ssrc, &arrival.request));
        // Lost or refused: the next packet asks again.
        let _ = self.conn.send_datagram(d.freeze());
    }

    /// The other peer asks for RTP packets again.
    fn resend(&self, sink: &Sink, request: &[u8]) {
        let Some((ssrc, seqs)) = decode_request(request) else {
            return debug!("malformed repair request");
        };
        let now = now();
        let again: Vec<Bytes> = {
            let sent = lock(&sink.sent);
            seqs.filter_map(|seq| sent.resend(ssrc, seq, now)).collect()
        };
        for d in again {
            if self.conn.send_datagram(d).is_ok() {
                self.stats.rtp_resent.add(1);
                sink.counters.rtp_resent.add(1);
            }
        }
    }

    /// One flow's overflow stream: frames until it ends or the flow is gone.
    async fn overflow(&self, mut recv: RecvStream) {
        let mut tag = [0u8; TAG_LEN];
        if recv.read_exact(&mut tag).await.is_err() {
            return;
        }
        let Some(tag) = Tag::decode(&tag) else {
            return;
        };
        let key = (!tag.allocated_by_sender, tag.id);
        loop {
            let mut head = [0u8; OVERFLOW_HEAD];
            if recv.read_exact(&mut head).await.is_err() {
                return;
            }
            let (kind, len) = decode_overflow_head(head);
            // Read straight into the packet's own buffer: the FEC decoder keeps it.
            let mut packet = vec![0u8; len];
            if recv.read_exact(&mut packet).await.is_err() {
                return;
            }
            match self.sink(key) {
                Some(sink) => self.received(&sink, kind, packet.into()),
                None => {
                    let _ = recv.stop(stream_code::ABORTED);
                    return;
                }
            }
        }
    }
}

/// A UDP port pair on this peer, joined to its twin on the other peer. Dropping it closes
/// the sockets, stops its task and unregisters it.
pub struct MediaFlow {
    mux: Arc<MediaMux>,
    key: Key,
    sink: Arc<Sink>,
    ports: (u16, u16),
    last_rx: Arc<Mutex<Option<Instant>>>,
    _task: DropGuard,
    _live: GaugeGuard,
}

impl MediaFlow {
    /// Binds a port pair (RTP on an even port when one is free) on `local` and starts
    /// forwarding what `near` (the client's or server's host) sends to it.
    /// `allocated_here`: this peer allocated `id` (it is the client-facing one).
    pub fn open(
        mux: &Arc<MediaMux>,
        id: u32,
        allocated_here: bool,
        local: IpAddr,
        near: IpAddr,
        live: GaugeGuard,
        counters: Arc<MediaCounters>,
    ) -> io::Result<MediaFlow> {
        let (a, b) = bind_pair(local)?;
        let ports = (a.local_addr()?.port(), b.local_addr()?.port());
        let tag = Tag {
            id,
            allocated_by_sender: allocated_here,
            control: false,
            kind: 0,
        };
        let sink = Arc::new(Sink {
            tag,
            sockets: [Arc::new(a), Arc::new(b)],
            remote: Mutex::new([None, None]),
            sent: Mutex::default(),
            gaps: Mutex::default(),
            fec_tx: Mutex::default(),
            fec_rx: Mutex::default(),
            counters,
        });
        let key = (allocated_here, id);
        match mux.flows().entry(key) {
            // The other peer chose an id its open flow already has: refused, or the older
            // flow's release would take the newer one's entry with it.
            Entry::Occupied(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("media channel {id} is already open on this connection"),
                ))
            }
            Entry::Vacant(v) => {
                v.insert(sink.clone());
            }
        }
        let cancel = mux.cancel.child_token();
        let last_rx = Arc::new(Mutex::new(None));
        let pump = Pump {
            conn: mux.conn.clone(),
            stats: mux.stats.clone(),
            sink: sink.clone(),
            near,
            overflow: None,
            last_rx: last_rx.clone(),
        };
        let stop = cancel.clone();
        mux.tasks.spawn(async move {
            tokio::select! {
                () = pump.run() => {}
                () = stop.cancelled() => {}
            }
        });
        Ok(MediaFlow {
            mux: mux.clone(),
            key,
            sink,
            ports,
            last_rx,
            _task: cancel.drop_guard(),
            _live: live,
        })
    }

    /// The local (RTP, RTCP) ports.
    pub fn ports(&self) -> (u16, u16) {
        self.ports
    }

    /// Where to send what comes from the other peer; `None` keeps the current value (set
    /// from the first packet the near host sends).
    pub fn set_remote(&self, rtp: Option<SocketAddr>, rtcp: Option<SocketAddr>) {
        let mut remote = lock(&self.sink.remote);
        remote[0] = rtp.or(remote[0]);
        remote[1] = rtcp.or(remote[1]);
    }

    /// When the near host last sent a packet.
    pub fn last_activity(&self) -> Option<Instant> {
        *lock(&self.last_rx)
    }
}

impl Drop for MediaFlow {
    fn drop(&mut self) {
        let mut flows = self.mux.flows();
        if flows
            .get(&self.key)
            .is_some_and(|s| Arc::ptr_eq(s, &self.sink))
        {
            flows.remove(&self.key);
        }
    }
}

/// Reads both sockets of a flow and sends to the other peer.
struct Pump {
    conn: Connection,
    sink: Arc<Sink>,
    near: IpAddr,
    overflow: Option<SendStream>,
    last_rx: Arc<Mutex<Option<Instant>>>,
    stats: Arc<Stats>,
}

impl Pump {
    async fn run(mut self) {
        let (mut rtp_buf, mut rtcp_buf) = (vec![0u8; MAX_PACKET], vec![0u8; MAX_PACKET]);
        let [rtp, rtcp] = self.sink.sockets.clone();
        loop {
            let (kind, got) = tokio::select! {
                r = rtp.recv_from(&mut rtp_buf) => (0, r),
                r = rtcp.recv_from(&mut rtcp_buf) => (1, r),
            };
            let (n, from) = match got {
                Ok(v) => v,
                // ICMP port unreachable from an earlier send, and the like: keep going.
                Err(_) => continue,
            };
            if canonical(from.ip()) != canonical(self.near) {
                continue;
            }
            *lock(&self.last_rx) = Some(now());
            {
                let mut remote = lock(&self.sink.remote);
                remote[kind].get_or_insert(from);
            }
            let packet = if kind == 0 {
                &rtp_buf[..n]
            } else {
                &rtcp_buf[..n]
            };
            if self.send(kind, packet).await.is_err() {
                return;
            }
        }
    }

    /// As a datagram if it fits, else on the overflow stream. Err: the connection is gone.
    async fn send(&mut self, kind: Kind, packet: &[u8]) -> Result<(), ()> {
        let fits = self
            .conn
            .max_datagram_size()
            .is_some_and(|max| TAG_LEN + packet.len() <= max);
        if fits {
            let mut d = BytesMut::with_capacity(TAG_LEN + packet.len());
            d.put_slice(
                &Tag {
                    kind,
                    ..self.sink.tag
                }
                .encode(),
            );
            d.put_slice(packet);
            let d = d.freeze();
            match self.conn.send_datagram(d.clone()) {
                Ok(()) => {
                    self.stats.media_datagrams.add(1);
                    self.sink.counters.datagrams_sent.add(1);
                    if let (0, Some((ssrc, seq))) = (kind, rtp_id(packet)) {
                        lock(&self.sink.sent).sent(ssrc, seq, now(), d);
                        self.send_parity(packet);
                    }
                    return Ok(());
                }
                Err(SendDatagramError::ConnectionLost(_)) => return Err(()),
                // Too large after all (the path MTU shrank), or datagrams are off: stream.
                Err(_) => {}
            }
        }
        if kind == 0 {
            lock(&self.sink.fec_tx).skipped();
        }
        if self.overflow.is_none() {
            let mut s = self.conn.open_uni().await.map_err(|_| ())?;
            let _ = s.set_priority(MEDIA_PRIORITY);
            s.write_all(&self.sink.tag.encode()).await.map_err(|_| ())?;
            self.overflow = Some(s);
        }
        let stream = self.overflow.as_mut().expect("opened above");
        let frame = encode_overflow(kind, packet);
        self.stats.media_overflow.add(1);
        self.sink.counters.overflow_sent.add(1);
        if stream.write_chunk(Bytes::from(frame)).await.is_err() {
            // The other peer stopped it (its flow is gone): open another next time.
            self.overflow = None;
        }
        Ok(())
    }
}

impl Pump {
    /// Sends the parity of the block `packet` ends, if it ends one and the parity fits in
    /// a datagram (else that block goes without: loss repair still asks again).
    fn send_parity(&self, packet: &[u8]) {
        let Some(parity) = lock(&self.sink.fec_tx).sent(packet) else {
            return;
        };
        let wire = parity.encode();
        if self
            .conn
            .max_datagram_size()
            .is_some_and(|max| TAG_LEN + wire.len() <= max)
        {
            let tag = Tag {
                control: true,
                ..self.sink.tag
            };
            let mut d = BytesMut::with_capacity(TAG_LEN + wire.len());
            d.put_slice(&tag.encode());
            d.put_slice(&wire);
            if self.conn.send_datagram(d.freeze()).is_ok() {
                self.stats.rtp_parities.add(1);
            }
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        if let Some(s) = &mut self.overflow {
            let _ = s.reset(stream_code::ABORTED);
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Two UDP sockets on `ip`, on ports P and P+1 with P even when such a pair is free
/// (RFC 3550's convention; some clients expect it), else any two ports.
fn bind_pair(ip: IpAddr) -> io::Result<(UdpSocket, UdpSocket)> {
    let tokio_socket = |s: std::net::UdpSocket| {
        s.set_nonblocking(true)?;
        UdpSocket::from_std(s)
    };
    for _ in 0..32 {
        let a = std::net::UdpSocket::bind((ip, 0))?;
        let port = a.local_addr()?.port();
        if port % 2 != 0 || port == u16::MAX {
            continue;
        }
        if let Ok(b) = std::net::UdpSocket::bind((ip, port + 1)) {
            return Ok((tokio_socket(a)?, tokio_socket(b)?));
        }
    }
    let a = std::net::UdpSocket::bind((ip, 0))?;
    let b = std::net::UdpSocket::bind((ip, 0))?;
    Ok((tokio_socket(a)?, tokio_socket(b)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pairs_are_adjacent_and_even_when_possible() {
        let (a, b) = bind_pair("127.0.0.1".parse().unwrap()).unwrap();
        let (pa, pb) = (
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port(),
        );
        assert_eq!((pa % 2, pb), (0, pa + 1));
    }

    /// A connection between two endpoints on loopback, as the accepting side sees it.
    async fn connection() -> (Connection, Connection, impl Sized) {
        use crate::identity::Identity;
        use crate::quic::accept::{accept_loop, Serve};
        use crate::quic::{Transport, Tuning};
        use std::future::Future;
        use std::pin::Pin;

        struct Keep(tokio::sync::mpsc::UnboundedSender<Connection>);
        impl Serve for Keep {
            fn serve(
                self: Arc<Self>,
                conn: Connection,
            ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
                let _ = self.0.send(conn);
                Box::pin(async {})
            }
        }
        let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let server_id = Arc::new(Identity::generate().unwrap());
        let peer = server_id.peer_id();
        let server = Transport::bind(lo, server_id, Tuning::default()).unwrap();
        let client = Transport::bind(
            lo,
            Arc::new(Identity::generate().unwrap()),
            Tuning::default(),
        )
        .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let keep: Arc<dyn Serve> = Arc::new(Keep(tx));
        server.serve(crate::protocol::ALPN, &keep).unwrap();
        let abort = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(accept_loop(
            server.clone(),
            tasks.clone(),
            CancellationToken::new(),
            abort.clone(),
        ));
        let dialled = client
            .connect(server.local_addr().unwrap(), peer)
            .await
            .unwrap();
        let accepted = rx.recv().await.unwrap();
        (accepted, dialled, (keep, abort.drop_guard()))
    }

    #[tokio::test]
    async fn a_channel_id_the_peer_reuses_is_refused_and_the_open_flow_keeps_its_entry() {
        let (conn, _other, _keep) = connection().await;
        let stats = Arc::new(Stats::default());
        let mux = MediaMux::new(
            conn,
            TaskTracker::new(),
            stats.clone(),
            CancellationToken::new(),
        );
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let open = |id| {
            MediaFlow::open(
                &mux,
                id,
                false,
                lo,
                lo,
                stats.media_flows.hold(),
                Arc::default(),
            )
        };
        let first = open(7).unwrap();
        let again = open(7);
        assert_eq!(
            again.as_ref().err().map(io::Error::kind),
            Some(io::ErrorKind::AddrInUse),
            "a second flow under the same id is refused"
        );
        drop(again);
        let routed = mux
            .sink((false, 7))
            .expect("the first flow is still routed");
        assert!(Arc::ptr_eq(&routed, &first.sink));
        // Once the first flow is gone, the id is free again; an old flow's release never
        // takes a newer flow's entry.
        drop(first);
        assert!(mux.sink((false, 7)).is_none());
        let newer = open(7).unwrap();
        let newest_other = open(8).unwrap();
        drop(newest_other);
        assert!(mux
            .sink((false, 7))
            .is_some_and(|s| Arc::ptr_eq(&s, &newer.sink)));
        assert_eq!(stats.media_flows.get(), 1);
    }
}
