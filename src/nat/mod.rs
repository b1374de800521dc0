//! NAT traversal: the rendezvous server role, its relay, and the peer side (registration,
//! introductions, punching, the direct-or-relay dial). The design is in
//! `docs/nat-traversal.md`; the messages in `protocol::rendezvous`; the pure schedules in
//! [`punch`].

pub mod client;
pub mod dial;
pub mod link;
pub mod punch;
pub mod relay;
pub mod server;

use bytes::BytesMut;
use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc;

use crate::protocol::rendezvous::{decode, encode, FrameError, MAX_FRAME};
use crate::tunnel::framed::{self, ReadFrameError};

/// Reads one rendezvous message; `Ok(None)` when the stream finished cleanly between frames.
pub(crate) async fn read_frame<T: for<'de> serde::Deserialize<'de>>(
    recv: &mut RecvStream,
    buf: &mut BytesMut,
) -> Result<Option<T>, ReadFrameError<FrameError>> {
    framed::read_frame(recv, buf, MAX_FRAME, decode::<T>).await
}

/// Writes every message from `rx` as a frame until `rx` closes, then finishes the stream.
pub(crate) async fn write_frames<T: serde::Serialize>(
    mut send: SendStream,
    mut rx: mpsc::Receiver<T>,
) {
    while let Some(msg) = rx.recv().await {
        if send.write_all(&encode(&msg)).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}
