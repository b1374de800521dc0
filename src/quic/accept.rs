//! The endpoint's ONE accept loop. Every role that accepts connections (expose, the
//! rendezvous) registers a [`Serve`] for its ALPN with [`Transport::serve`]; the server
//! configuration offers every registered ALPN, and each connection, once its handshake is
//! done, goes to the role whose ALPN it negotiated. A node that exposes and serves as a
//! rendezvous at once serves both (tested in `tests/rendezvous.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, Instrument};

use super::Transport;
use crate::protocol::close_code;

/// How long an incoming handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A role's side of an accepted connection: runs until the role is done with it.
pub trait Serve: Send + Sync + 'static {
    fn serve(self: Arc<Self>, conn: quinn::Connection) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Accepts until `abort`; after `stop` every new connection is refused. Each handshake and
/// each connection's service is a task in `tasks`.
pub async fn accept_loop(
    transport: Transport,
    tasks: TaskTracker,
    stop: CancellationToken,
    abort: CancellationToken,
) {
    let endpoint = transport.endpoint().clone();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            () = abort.cancelled() => return,
        };
        let Some(incoming) = incoming else { return };
        if stop.is_cancelled() {
            incoming.refuse();
            continue;
        }
        let span = tracing::info_span!(
            "conn",
            remote = %incoming.remote_address(),
            peer = tracing::field::Empty
        );
        let transport = transport.clone();
        let abort = abort.clone();
        tasks.spawn(
            async move {
                tokio::select! {
                    () = handshake(transport, incoming) => {}
                    () = abort.cancelled() => {}
                }
            }
            .instrument(span),
        );
    }
}

/// Completes the handshake, then hands the connection to the role of its ALPN.
async fn handshake(transport: Transport, incoming: quinn::Incoming) {
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        transport.accept(incoming)?.await
    })
    .await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return debug!("handshake failed: {e}"),
        Err(_) => return debug!("handshake timed out"),
    };
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    match alpn.as_deref().and_then(|a| transport.route(a)) {
        Some(role) => role.serve(conn).await,
        // rustls refuses an ALPN it does not offer; this is a role removed meanwhile.
        None => conn.close(close_code::PROTOCOL_ERROR, b"no such protocol here"),
    }
}
