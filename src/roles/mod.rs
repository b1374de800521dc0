//! The roles a node plays on its one endpoint: `expose` (serve allowed peers' streams to the
//! real servers named in the rules) and `connect` (local listeners whose sockets become
//! streams to a remote peer). One node may play both.

pub mod connect;
pub mod expose;
pub mod peers;

use crate::protocol::close_code;

/// A connection error as a sentence for logs, with the peer's close reason when it gave one.
pub fn describe_close(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason);
            let name = close_code::name(c.error_code);
            if c.error_code == close_code::NOT_AUTHORISED {
                format!("the peer refused this side: {reason}")
            } else {
                format!("closed by the peer ({name}): {reason}")
            }
        }
        quinn::ConnectionError::LocallyClosed => "closed by this side".into(),
        quinn::ConnectionError::TimedOut => "the peer stopped answering (idle timeout)".into(),
        quinn::ConnectionError::TransportError(t) => format!("transport error: {t}"),
        quinn::ConnectionError::ConnectionClosed(c) => format!("closed by the peer: {c}"),
        other => other.to_string(),
    }
}

/// Sleeps until `deadline`, or forever when there is none (for `select!` arms).
pub(crate) async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
