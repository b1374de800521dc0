//! The one splice-or-layer dispatch both roles use once a stream is open: the service's
//! protocol (the target's scheme on the exposing side, the response on the connecting side)
//! picks the byte splice or the RTSP layer.

use std::sync::Arc;

use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;

use super::NodeCtx;
use crate::media::MediaMux;
use crate::protocol::header::Protocol;
use crate::rtsp::driver::{splice_rtsp, RtspCtx};
use crate::rtsp::policy::Facing;
use crate::tunnel::splice::{splice, Downstream, Report};

/// Forwards between `tcp` and the stream until both directions end or one aborts (or the
/// node aborts). `facing` says which end of the conversation `tcp` is; `media` is the
/// connection's media mux (for RTSP's UDP flows).
pub(crate) async fn forward(
    protocol: Protocol,
    facing: Facing,
    (tcp, send, recv): (TcpStream, SendStream, RecvStream),
    downstream: Downstream,
    media: &Arc<MediaMux>,
    node: &NodeCtx,
) -> Report {
    let cancel = node.abort.clone();
    match protocol {
        Protocol::Tcp => splice(tcp, send, recv, downstream, cancel).await,
        Protocol::Rtsp(udp) => {
            let ctx = RtspCtx {
                facing,
                udp,
                mux: media.clone(),
                stats: node.stats.clone(),
            };
            splice_rtsp(tcp, send, recv, downstream, ctx, cancel).await
        }
    }
}
