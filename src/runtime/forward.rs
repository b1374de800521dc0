//! The one splice-or-layer dispatch both roles use once a stream is open: the service's
//! protocol (the target's scheme on the exposing side, the response on the connecting side)
//! picks the byte splice or the RTSP layer.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;
use tokio_util::either::Either;

use super::NodeCtx;
use crate::media::MediaMux;
use crate::protocol::header::Protocol;
use crate::rtsp::driver::{splice_rtsp, RtspCtx};
use crate::rtsp::policy::Facing;
use crate::tunnel::splice::{splice, Downstream, Report};

/// Forwards between `tcp` and the stream until both directions end or one aborts (or the
/// node aborts). `facing` says which end of the conversation `tcp` is; `media` is the
/// connection's media mux (for RTSP's UDP flows); `routed` is the RTSP layer's routing
/// prefix on `--rtsp` and the bytes read from `tcp` to route it (the client-facing side only).
///
/// Not an `async fn`: the future it returns is the layer's own (in an `Either`), so an idle
/// stream's task holds no second copy of the sockets. An `async fn` wrapper keeps its
/// arguments beside the future it awaits: measured with 10,000 idle streams, 6.79 / 6.45 KiB
/// per stream (connect / expose) against 6.62 / 6.31 before the wrapper; as it is now,
/// 6.64 / 6.41 against 6.65 / 6.41 (docs/bench/layout-refactor.md).
/// The service a stream is for (status figures), and on `--rtsp` the routing prefix with the
/// bytes read to route it.
pub(crate) struct Named<'a> {
    pub service: &'a str,
    pub routed: Option<(String, Bytes)>,
}

pub(crate) fn forward(
    protocol: Protocol,
    facing: Facing,
    (tcp, send, recv): (TcpStream, SendStream, RecvStream),
    downstream: Downstream,
    media: &Arc<MediaMux>,
    node: &NodeCtx,
    Named { service, routed }: Named<'_>,
) -> impl Future<Output = Report> {
    let cancel = node.abort.clone();
    match protocol {
        // HTTP is read on the connecting side only (`http::proxy`); toward the device it is bytes.
        Protocol::Tcp | Protocol::Http => Either::Left(splice(tcp, send, recv, downstream, cancel)),
        Protocol::Rtsp(udp) => {
            let (prefix, leading) = match routed {
                Some((prefix, leading)) => (Some(prefix), leading),
                None => (None, Bytes::new()),
            };
            let ctx = RtspCtx {
                facing,
                prefix,
                leading,
                udp,
                mux: media.clone(),
                stats: node.stats.clone(),
                listed: node.stats.rtsp.add(
                    service,
                    match facing {
                        Facing::Client => "client",
                        Facing::Server => "server",
                    },
                ),
            };
            // Boxed: the RTSP layer's future is several times the splice's, and an `Either`
            // is as big as its bigger side, so unboxed every plain TCP stream's task would
            // carry it (10,000 idle streams: 22.1 KiB per stream on the connecting side
            // instead of ~6).
            Either::Right(Box::pin(splice_rtsp(
                tcp, send, recv, downstream, ctx, cancel,
            )))
        }
    }
}
