//! Connection close reasons as sentences for logs.

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
