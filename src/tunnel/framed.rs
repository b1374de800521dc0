//! The one framed reader: reads a QUIC stream until a pure decoder finds a whole frame, in
//! the manner of mini-redis's `Connection::read_frame`. The decoders live in `protocol/`
//! (stream header, rendezvous messages); each caps its frame, so this buffers at most one
//! frame and one chunk. "Need more bytes" (`Ok(None)` from the decoder) is not "invalid".

use bytes::{Bytes, BytesMut};
use quinn::{ReadError, RecvStream};

/// Why no frame came.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError<E> {
    /// The decoder refused the bytes.
    #[error("{0}")]
    Invalid(E),
    /// The stream finished inside a frame.
    #[error("the stream ended inside a frame")]
    Truncated,
    #[error("{0}")]
    Read(ReadError),
}

/// The next frame at the start of `buf`, reading more from `recv` (at most `chunk` bytes at
/// a time) until `decode` finds one; its bytes are taken from `buf`, what follows stays there.
/// `Ok(None)` when the stream finished cleanly between frames. Cancel-safe: bytes read
/// before a cancellation stay in `buf`.
pub async fn read_frame<T, E>(
    recv: &mut RecvStream,
    buf: &mut BytesMut,
    chunk: usize,
    decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, E>,
) -> Result<Option<T>, ReadFrameError<E>> {
    loop {
        if let Some((frame, used)) = decode(buf).map_err(ReadFrameError::Invalid)? {
            let _ = buf.split_to(used);
            return Ok(Some(frame));
        }
        match recv.read_chunk(chunk, true).await {
            Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
            Ok(None) if buf.is_empty() => return Ok(None),
            Ok(None) => return Err(ReadFrameError::Truncated),
            Err(e) => return Err(ReadFrameError::Read(e)),
        }
    }
}

/// The frame a stream starts with (a stream header), and the bytes read past it (the start
/// of the payload). A stream that ends before a whole frame is `Truncated`, whether or not
/// any byte came.
pub async fn read_first<T, E>(
    recv: &mut RecvStream,
    chunk: usize,
    decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, E>,
) -> Result<(T, Bytes), ReadFrameError<E>> {
    let mut buf = BytesMut::new();
    match read_frame(recv, &mut buf, chunk, decode).await? {
        Some(frame) => Ok((frame, buf.freeze())),
        None => Err(ReadFrameError::Truncated),
    }
}
