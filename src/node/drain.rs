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
        self.report_on_sigusr1();
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

impl Node {
    /// On every SIGUSR1, logs one `counters` line: the node's live tasks, connections, streams,
    /// RTSP sessions, media flows, rendezvous registrations and relay allocations (for churn
    /// tests and for a person asking a running process what it holds).
    fn report_on_sigusr1(&self) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut usr1 = match signal(SignalKind::user_defined1()) {
            Ok(s) => s,
            Err(e) => return tracing::warn!("cannot watch SIGUSR1, no counters on demand: {e}"),
        };
        let ctx = self.ctx.clone();
        self.ctx.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = usr1.recv() => {}
                    () = ctx.stop.cancelled() => return,
                }
                let s = &ctx.stats;
                info!(
                    tasks = ctx.tasks.len(),
                    connections = s.connections.get(),
                    streams = s.streams.get(),
                    rtsp_sessions = s.rtsp_sessions.get(),
                    media_flows = s.media_flows.get(),
                    rendezvous_peers = s
                        .rendezvous_peers
                        .load(std::sync::atomic::Ordering::Relaxed),
                    relays = s.relays.get(),
                    refused = s.rendezvous_refused.get(),
                    connections_opened = s.connections_opened(),
                    streams_opened = s.streams_opened(),
                    "counters"
                );
            }
        });
    }
}
