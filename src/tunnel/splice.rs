//! Byte-exact forwarding between a TCP socket and a QUIC bidirectional stream, both ways.
//!
//! - A FIN from either end reaches the other end as a FIN (`finish` / `shutdown(Write)`),
//!   while the other direction keeps flowing.
//! - An abort on either side (TCP RST or error, QUIC reset, stop or connection loss) resets
//!   the QUIC stream, stops its receive side and aborts the TCP socket with an RST, so each
//!   end sees an abort and never a clean end.
//! - Backpressure, not buffering: at most one read chunk per direction is held here; QUIC flow
//!   control and the TCP socket buffers do the rest. An idle stream holds no copy buffer.
//! - Interactive before bulk: a stream moving more than 64 Mbit/s drops to a lower QUIC send
//!   priority (`session::priority`), so media and requests are not queued behind downloads.
//! - A clean end waits until the peer acknowledged every byte sent, so "stream ended" means
//!   "delivered", and closing the connection afterwards loses nothing.

use std::io;
use std::net::Shutdown;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{ReadError, RecvStream, SendStream, VarInt, WriteError};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::protocol::header::{
    decode_response, HeaderError, OpenResponse, Protocol, Status, MAX_RESPONSE_LEN,
};
use crate::protocol::stream_code;
use crate::tunnel::framed::{read_first, ReadFrameError};
use crate::tunnel::priority::BulkDetector;

/// Bytes read from a socket at a time, and the largest chunk read from a stream.
pub const CHUNK: usize = 256 * 1024;
/// Received chunks written to the socket per vectored write.
const BATCH: usize = 64;
/// A read buffer with less room than this is replaced by a fresh one.
const MIN_READ_ROOM: usize = 16 * 1024;

/// What the QUIC → TCP direction starts with.
#[derive(Debug)]
pub enum Downstream {
    /// Payload; these bytes (already read past the header) go to the socket first.
    Payload(Bytes),
    /// The opener's side: the exposing side's response header comes first, within `limit`,
    /// and names the protocol this side already assumed (`expect`).
    AwaitResponse { limit: Duration, expect: Protocol },
}

/// Why a splice was cut short.
#[derive(Debug, thiserror::Error)]
pub enum Abort {
    #[error("local socket failed: {0}")]
    Local(io::Error),
    #[error("peer reset the stream (code {0})")]
    PeerReset(VarInt),
    #[error("peer stopped reading (code {0})")]
    PeerStopped(VarInt),
    #[error("connection lost: {0}")]
    ConnectionLost(quinn::ConnectionError),
    #[error("shutting down")]
    Shutdown,
    #[error("open refused: {status}: {message}")]
    Refused { status: Status, message: String },
    #[error("bad response header: {0}")]
    BadResponse(HeaderError),
    #[error("no response within {0:?}")]
    ResponseTimeout(Duration),
    #[error("stream error: {0}")]
    Stream(String),
    #[error("the service's protocol changed from {was} to {now}; the client should retry")]
    ProtocolChanged { was: Protocol, now: Protocol },
    #[error("{0}")]
    BadPayload(String),
}

impl Abort {
    pub(crate) fn from_read(e: ReadError) -> Self {
        match e {
            ReadError::Reset(code) => Abort::PeerReset(code),
            ReadError::ConnectionLost(e) => Abort::ConnectionLost(e),
            other => Abort::Stream(other.to_string()),
        }
    }

    pub(crate) fn from_write(e: WriteError) -> Self {
        match e {
            WriteError::Stopped(code) => Abort::PeerStopped(code),
            WriteError::ConnectionLost(e) => Abort::ConnectionLost(e),
            other => Abort::Stream(other.to_string()),
        }
    }

    /// The code to reset/stop the QUIC stream with.
    pub(crate) fn code(&self) -> VarInt {
        match self {
            Abort::BadPayload(_) => stream_code::BAD_PAYLOAD,
            Abort::Shutdown => stream_code::SHUTDOWN,
            Abort::Refused { .. } => stream_code::REFUSED,
            Abort::BadResponse(_) => stream_code::BAD_HEADER,
            Abort::ResponseTimeout(_) => stream_code::TIMEOUT,
            _ => stream_code::ABORTED,
        }
    }
}

/// How a splice went.
#[derive(Debug)]
pub struct Report {
    /// Bytes from the socket into the stream.
    pub up: u64,
    /// Bytes from the stream into the socket.
    pub down: u64,
    /// `None` for a clean end both ways.
    pub abort: Option<Abort>,
}

/// Forwards until both directions ended or one aborted; `cancel` aborts (forced shutdown).
pub async fn splice(
    tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    downstream: Downstream,
    cancel: CancellationToken,
) -> Report {
    let (mut up, mut down) = (0u64, 0u64);
    let result = {
        let both = async {
            tokio::try_join!(
                tcp_to_quic(&tcp, &mut send, &mut up),
                quic_to_tcp(&mut recv, &tcp, downstream, &mut down),
            )?;
            // Delivered, not only sent: wait for the peer's acknowledgement of our FIN.
            delivered(&mut send).await
        };
        tokio::select! {
            biased;
            r = both => r,
            () = cancel.cancelled() => Err(Abort::Shutdown),
        }
    };
    let abort = result.err();
    if let Some(abort) = &abort {
        cut_short(abort, &tcp, &mut send, &mut recv);
    }
    Report { up, down, abort }
}

/// [`splice`] over any byte stream (the TLS session to an https device): the same FIN and
/// abort rules, with `shutdown` (TLS close_notify, then FIN) for a FIN; an abort drops the
/// stream. Copies through one read buffer per direction.
pub async fn splice_io<S>(
    io: S,
    mut send: SendStream,
    mut recv: RecvStream,
    downstream: Downstream,
    cancel: CancellationToken,
) -> Report
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut up, mut down) = (0u64, 0u64);
    let (mut reader, mut writer) = tokio::io::split(io);
    let result = {
        let both = async {
            let io_to_quic = async {
                let mut buf = BytesMut::new();
                loop {
                    if buf.capacity() < MIN_READ_ROOM {
                        buf = BytesMut::with_capacity(CHUNK);
                    }
                    match reader.read_buf(&mut buf).await {
                        // A TLS peer that closes without close_notify (many devices do) ends
                        // its direction like a FIN: HTTP frames its own messages.
                        Ok(0) => {
                            let _ = send.finish();
                            return Ok(());
                        }
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            let _ = send.finish();
                            return Ok(());
                        }
                        Ok(n) => {
                            up += n as u64;
                            send.write_chunk(buf.split().freeze())
                                .await
                                .map_err(Abort::from_write)?;
                        }
                        Err(e) => return Err(Abort::Local(e)),
                    }
                }
            };
            let quic_to_io = async {
                // Each write is flushed: a TLS stream holds what it encrypted until then.
                let first = first_payload(&mut recv, downstream).await?;
                writer.write_all(&first).await.map_err(Abort::Local)?;
                writer.flush().await.map_err(Abort::Local)?;
                down += first.len() as u64;
                loop {
                    match recv.read_chunk(CHUNK, true).await {
                        Ok(Some(chunk)) => {
                            writer.write_all(&chunk.bytes).await.map_err(Abort::Local)?;
                            writer.flush().await.map_err(Abort::Local)?;
                            down += chunk.bytes.len() as u64;
                        }
                        Ok(None) => {
                            writer
                                .shutdown()
                                .await
                                .or_else(ignore_not_connected)
                                .map_err(Abort::Local)?;
                            return Ok(());
                        }
                        Err(e) => return Err(Abort::from_read(e)),
                    }
                }
            };
            tokio::try_join!(io_to_quic, quic_to_io)?;
            delivered(&mut send).await
        };
        tokio::select! {
            biased;
            r = both => r,
            () = cancel.cancelled() => Err(Abort::Shutdown),
        }
    };
    if let Err(abort) = &result {
        let _ = send.reset(abort.code());
        let _ = recv.stop(abort.code());
    }
    Report {
        up,
        down,
        abort: result.err(),
    }
}

/// Tells both ends that a splice was cut short: resets and stops the QUIC stream; aborts the
/// socket with an RST, or closes it plainly (FIN) when it already got its answer (a refusal,
/// or an RTSP `400 Bad Request`).
pub(crate) fn cut_short(
    abort: &Abort,
    tcp: &TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
) {
    let code = abort.code();
    // Errors here mean the stream is already closed that way: nothing left to tell.
    let _ = send.reset(code);
    let _ = recv.stop(code);
    if matches!(abort, Abort::Refused { .. } | Abort::BadPayload(_)) {
        let _ = socket2::SockRef::from(tcp).shutdown(Shutdown::Write);
        discard_unread(tcp);
    } else {
        reset_tcp(tcp);
    }
}

/// The report of a splice that never started: both ends told ([`cut_short`]), nothing moved.
pub(crate) fn abandoned(
    abort: Abort,
    tcp: &TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Report {
    cut_short(&abort, tcp, send, recv);
    Report {
        up: 0,
        down: 0,
        abort: Some(abort),
    }
}

/// Waits until the peer acknowledged everything sent on `send`, FIN included.
pub(crate) async fn delivered(send: &mut SendStream) -> Result<(), Abort> {
    match send.stopped().await {
        Ok(None) => Ok(()),
        Ok(Some(code)) => Err(Abort::PeerStopped(code)),
        Err(quinn::StoppedError::ConnectionLost(e)) => Err(Abort::ConnectionLost(e)),
        Err(e) => Err(Abort::Stream(e.to_string())),
    }
}

/// A lingering close: after our FIN, reads and drops what the client still sends, until its
/// own FIN, at most `limit` long and 16 MiB, so that closing the socket does not make the
/// kernel send RST (which can destroy the answer the client has not read yet).
pub(crate) async fn linger(tcp: &TcpStream, limit: Duration) {
    // On the heap: an array here would sit in the state of every task that may linger (a
    // `--http` or `--rtsp` client's), idle or not.
    let mut buf = vec![0u8; 16 * 1024];
    let mut left: usize = 16 << 20;
    let drain = async {
        while left > 0 {
            if tcp.readable().await.is_err() {
                return;
            }
            match tcp.try_read(&mut buf) {
                Ok(0) => return,
                Ok(n) => left = left.saturating_sub(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(limit, drain).await;
}

/// Drops what the client already sent and nobody will read (at most 1 MiB): closing a
/// socket with unread data makes the kernel send RST instead of FIN.
fn discard_unread(tcp: &TcpStream) {
    let mut buf = [0u8; 4096];
    let mut left: usize = 1 << 20;
    while left > 0 {
        match tcp.try_read(&mut buf) {
            Ok(n) if n > 0 => left = left.saturating_sub(n),
            // EOF, nothing queued now, or an error: done.
            _ => return,
        }
    }
}

/// Makes the kernel answer with RST when the socket is dropped: the client sees an abort.
pub fn reset_tcp(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

async fn tcp_to_quic(tcp: &TcpStream, send: &mut SendStream, count: &mut u64) -> Result<(), Abort> {
    let mut buf = BytesMut::new();
    let mut detector = BulkDetector::new(crate::time::now());
    loop {
        tcp.readable().await.map_err(Abort::Local)?;
        if buf.capacity() < MIN_READ_ROOM {
            buf = BytesMut::with_capacity(CHUNK);
        }
        match tcp.try_read_buf(&mut buf) {
            Ok(0) => {
                // FIN from the socket: FIN on the stream; the other direction goes on.
                let _ = send.finish();
                return Ok(());
            }
            Ok(n) => {
                *count += n as u64;
                if let Some(priority) = detector.sent(n as u64, crate::time::now()) {
                    let _ = send.set_priority(priority);
                }
                match send.write_chunk(buf.split().freeze()).await {
                    Ok(()) => {}
                    // The exposing side refused the open: its response says why, and the
                    // other direction reports it.
                    Err(WriteError::Stopped(code)) if code == stream_code::REFUSED => return Ok(()),
                    Err(e) => return Err(Abort::from_write(e)),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Idle: give the buffer back rather than hold it while waiting.
                buf = BytesMut::new();
            }
            Err(e) => return Err(Abort::Local(e)),
        }
    }
}

async fn quic_to_tcp(
    recv: &mut RecvStream,
    tcp: &TcpStream,
    downstream: Downstream,
    count: &mut u64,
) -> Result<(), Abort> {
    let first = first_payload(recv, downstream).await?;
    write_tcp(tcp, &first).await?;
    *count += first.len() as u64;
    // Quinn hands out received data frame by frame (about one packet each): take up to
    // BATCH at once and give them to the socket in one vectored write, not one per packet.
    let mut chunks: Vec<Bytes> = Vec::new();
    loop {
        if chunks.len() != BATCH {
            chunks = vec![Bytes::new(); BATCH];
        }
        match recv.read_chunks(&mut chunks).await {
            Ok(Some(n)) => {
                *count += write_tcp_vectored(tcp, &mut chunks[..n]).await?;
                // Drop what was written now; an idle stream holds no received data.
                chunks.iter_mut().take(n).for_each(|c| *c = Bytes::new());
            }
            Ok(None) => {
                // FIN from the stream: FIN to the socket; the other direction goes on.
                socket2::SockRef::from(tcp)
                    .shutdown(Shutdown::Write)
                    .or_else(ignore_not_connected)
                    .map_err(Abort::Local)?;
                return Ok(());
            }
            Err(e) => return Err(Abort::from_read(e)),
        }
    }
}

pub(crate) fn ignore_not_connected(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotConnected {
        Ok(())
    } else {
        Err(e)
    }
}

/// The payload bytes that come first: given, or read past the response header.
pub(crate) async fn first_payload(
    recv: &mut RecvStream,
    downstream: Downstream,
) -> Result<Bytes, Abort> {
    match downstream {
        Downstream::Payload(first) => Ok(first),
        Downstream::AwaitResponse { limit, expect } => {
            let (response, first) = read_response(recv, limit).await?;
            let protocol = response.protocol;
            if protocol != expect {
                return Err(Abort::ProtocolChanged {
                    was: expect,
                    now: protocol,
                });
            }
            Ok(first)
        }
    }
}

/// Reads the response header within `limit`; returns it (its status is `Ok`) and the
/// payload bytes read past the header.
pub(crate) async fn read_response(
    recv: &mut RecvStream,
    limit: Duration,
) -> Result<(OpenResponse, Bytes), Abort> {
    tokio::time::timeout(limit, read_response_header(recv))
        .await
        .map_err(|_| Abort::ResponseTimeout(limit))?
}

async fn read_response_header(recv: &mut RecvStream) -> Result<(OpenResponse, Bytes), Abort> {
    let (response, first) = read_first(recv, MAX_RESPONSE_LEN, decode_response)
        .await
        .map_err(|e| match e {
            ReadFrameError::Invalid(e) => Abort::BadResponse(e),
            ReadFrameError::Read(e) => Abort::from_read(e),
            ReadFrameError::Truncated => {
                Abort::Stream("the peer ended the stream before its response header".into())
            }
        })?;
    match response {
        ok @ OpenResponse {
            status: Status::Ok, ..
        } => Ok((ok, first)),
        OpenResponse {
            status, message, ..
        } => Err(Abort::Refused { status, message }),
    }
}

/// Writes every chunk, in order, with as few syscalls as the socket allows; the bytes written.
async fn write_tcp_vectored(tcp: &TcpStream, chunks: &mut [Bytes]) -> Result<u64, Abort> {
    use bytes::Buf;
    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let mut first = 0;
    while first < chunks.len() {
        if chunks[first].is_empty() {
            first += 1;
            continue;
        }
        tcp.writable().await.map_err(Abort::Local)?;
        let mut slices = [io::IoSlice::new(&[]); BATCH];
        let n = (chunks.len() - first).min(BATCH);
        for (slice, chunk) in slices.iter_mut().zip(&chunks[first..first + n]) {
            *slice = io::IoSlice::new(chunk);
        }
        match tcp.try_write_vectored(&slices[..n]) {
            Ok(mut n) => {
                while n > 0 {
                    let c = &mut chunks[first];
                    let k = n.min(c.len());
                    c.advance(k);
                    n -= k;
                    if c.is_empty() {
                        first += 1;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Abort::Local(e)),
        }
    }
    Ok(total)
}

pub(crate) async fn write_tcp(tcp: &TcpStream, mut data: &[u8]) -> Result<(), Abort> {
    while !data.is_empty() {
        tcp.writable().await.map_err(Abort::Local)?;
        match tcp.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Abort::Local(e)),
        }
    }
    Ok(())
}
