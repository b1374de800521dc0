//! Running a node until SIGINT/SIGTERM, then draining it: one copy for every role.

use std::time::Duration;

use tracing::info;

use super::Node;

/// Exit status of a process stopped by a second signal during the drain.
pub const SECOND_SIGNAL_EXIT: i32 = 130;

impl Node {
    /// Runs until SIGINT or SIGTERM, then drops `handles` (a role's sessions, so their
    /// connections close with the rest) and drains (`Node::shutdown`). A second signal during
    /// the drain exits at once with code 130.
    pub async fn run_until_signal<H>(self, drain: Duration, handles: H) {
        wait_for_signal().await;
        info!("shutting down");
        drop(handles);
        tokio::select! {
            () = self.shutdown(drain) => {}
            () = wait_for_signal() => {
                eprintln!("second signal: exiting now");
                std::process::exit(SECOND_SIGNAL_EXIT);
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
