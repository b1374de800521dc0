//! The control socket: a Unix socket (mode 0600) on which `tunnel status` and `tunnel
//! reload` talk to a running process (`protocol::control`: one JSON request line, one JSON
//! answer line). A client that sends garbage, sends nothing, or goes away mid-answer costs a
//! task for at most the read timeout and changes nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use super::Node;
use crate::protocol::control::{decode_request, encode_answer, Command, MAX_REQUEST};
use crate::runtime::NodeCtx;

/// How long a client has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the control socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "control socket {0}: another tunnel process is using it; give this one --control PATH"
    )]
    InUse(PathBuf),
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds `path`: a socket file left by a process that is gone is replaced; one that answers
/// belongs to a live process and is left alone. The socket is made under a private name,
/// set to mode 0600, and only then linked to `path` (`link` fails rather than replace), so
/// no client ever finds it at `path` with the umask's wider mode.
fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let mut private = path.as_os_str().to_owned();
    private.push(format!(".{}.tmp", std::process::id()));
    let private = PathBuf::from(private);
    let _ = std::fs::remove_file(&private);
    let l = std::os::unix::net::UnixListener::bind(&private).map_err(io)?;
    let linked = std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| link_once_stale_removed(&private, path));
    let _ = std::fs::remove_file(&private);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(ControlError::InUse(path.to_owned()))
        }
        Err(e) => return Err(io(e)),
    }
    l.set_nonblocking(true).map_err(io)?;
    UnixListener::from_std(l).map_err(io)
}

/// Links `from` to `to`; a file at `to` that no process answers on is removed first (once).
/// `AddrInUse` when a live process answers at `to`.
fn link_once_stale_removed(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(from, to) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        other => return other,
    }
    if std::os::unix::net::UnixStream::connect(to).is_ok() {
        return Err(std::io::ErrorKind::AddrInUse.into());
    }
    std::fs::remove_file(to)?;
    std::fs::hard_link(from, to)
}

impl Node {
    /// Serves the control socket at `path` until the node stops, then removes it. `role`
    /// names the process in status answers.
    pub fn serve_control(&self, path: PathBuf, role: &'static str) -> Result<(), ControlError> {
        let listener = bind(&path)?;
        info!(path = %path.display(), "control socket: `tunnel status` and `tunnel reload` talk here");
        let ctx = self.ctx.clone();
        let node = self.control_view(role);
        self.ctx.tasks.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = ctx.stop.cancelled() => break,
                };
                match accepted {
                    Ok((stream, _)) => {
                        let node = node.clone();
                        ctx.tasks.spawn(async move { node.answer(stream).await });
                    }
                    Err(e) => {
                        warn!("control socket: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            let _ = std::fs::remove_file(&path);
        });
        Ok(())
    }

    pub(super) fn control_view(&self, role: &'static str) -> ControlView {
        ControlView {
            ctx: self.ctx.clone(),
            role,
            started: self.started,
            reloader: self.reloader.clone(),
            names: self.names.clone(),
            rendezvous: self.rendezvous_role.get().cloned(),
        }
    }
}

/// What a control client may see and do.
#[derive(Clone)]
pub(super) struct ControlView {
    ctx: NodeCtx,
    role: &'static str,
    started: std::time::Instant,
    reloader: super::Reloader,
    names: super::Names,
    rendezvous: Option<std::sync::Arc<crate::nat::server::Rendezvous>>,
}

impl ControlView {
    async fn answer(self, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut line = Vec::new();
        let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
        let read = tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
        let result = match read {
            Err(_) => Err(format!("no request within {READ_TIMEOUT:?}")),
            Ok(Err(e)) => Err(format!("reading the request: {e}")),
            Ok(Ok(_)) if !line.ends_with(b"\n") => Err(format!(
                "no request line (at most {MAX_REQUEST} bytes, ending in a newline)"
            )),
            Ok(Ok(_)) => decode_request(&line[..line.len() - 1]).and_then(|cmd| self.run(cmd)),
        };
        if let Err(e) = &result {
            debug!("control request refused: {e}");
        }
        // A client that left mid-answer is no concern of ours.
        let _ = write.write_all(&encode_answer(result)).await;
        let _ = write.shutdown().await;
    }

    fn run(&self, cmd: Command) -> Result<serde_json::Value, String> {
        match cmd {
            Command::Status => Ok(self.status()),
            Command::Reload => {
                let mut reloader = self.reloader.lock().unwrap_or_else(|p| p.into_inner());
                let reload = reloader
                    .as_mut()
                    .ok_or_else(|| format!("this {} has no rules to reload", self.role))?;
                info!("control socket: reading the rules again");
                match reload() {
                    Ok(n) => {
                        info!(disconnected = n, "rules reloaded");
                        Ok(serde_json::json!({ "reloaded": true, "disconnected": n }))
                    }
                    Err(e) => {
                        tracing::error!("rules not reloaded, the old ones stay: {e}");
                        Err(format!("rules not reloaded, the old ones stay: {e}"))
                    }
                }
            }
        }
    }

    /// The status answer (`docs/status.md`).
    pub(super) fn status(&self) -> serde_json::Value {
        let s = &self.ctx.stats;
        let names = self.names.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let name_of = |peer: &crate::identity::PeerId| {
            names
                .iter()
                .find(|(id, _)| id == peer)
                .map(|(_, n)| n.clone())
        };
        let live = self.ctx.peers.snapshot();
        let table = self.ctx.transport.paths().clone();
        let peer_entry = |id: &crate::identity::PeerId, name: Option<&str>| {
            let conn = live.iter().find(|(p, _)| p == id);
            let seen = self.ctx.peers.seen(id);
            let ago = |at: std::time::Instant| at.elapsed().as_secs_f64();
            // A failure newer than the last connection is what is known now.
            let failed_last = match (&seen.last_failure, seen.last_up) {
                (Some((at, _)), Some(up)) => *at > up,
                (Some(_), None) => true,
                _ => false,
            };
            let presence = match () {
                () if conn.is_some() => "connected",
                () if failed_last => "unreachable",
                () if seen.last_up.is_some() => "seen",
                () => "unknown",
            };
            serde_json::json!({
                "name": name,
                "id": id.to_string(),
                "connected": conn.is_some(),
                "path": conn.map(|(_, pc)| table.kind_of(pc.path())),
                "presence": presence,
                "last_seen_s": seen.last_up.map(ago),
                "last_error": seen.last_failure.as_ref().filter(|_| failed_last).map(|(_, why)| why.clone()),
            })
        };
        // Every named peer, connected or not; then any other peer with a connection.
        let mut peers: Vec<serde_json::Value> = names
            .iter()
            .map(|(id, name)| peer_entry(id, Some(name)))
            .collect();
        for (peer, _) in &live {
            if name_of(peer).is_none() && !peers.iter().any(|p| p["id"] == peer.to_string()) {
                peers.push(peer_entry(peer, None));
            }
        }
        let connections: Vec<serde_json::Value> = live
            .into_iter()
            .map(|(peer, pc)| {
                let st = pc.conn.stats();
                // Where its packets go now (the active path), not the address quinn keeps.
                let path = pc.path();
                let remote = path.addr();
                let paths: Vec<serde_json::Value> = pc
                    .route
                    .as_ref()
                    .map(|r| r.view())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|v| {
                        serde_json::json!({
                            "path": table.kind_of(v.path),
                            "remote": v.path.addr().to_string(),
                            "active": v.active,
                            "alive": v.alive,
                            "rtt_ms": v.rtt.map(|r| r.as_secs_f64() * 1000.0),
                            "pongs": v.pongs,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "peer": peer.to_string(),
                    "name": name_of(&peer),
                    "dialled_by_us": pc.initiator != peer,
                    "path": table.kind_of(path),
                    "remote": remote.to_string(),
                    "paths": paths,
                    "ip_version": if remote.is_ipv4() { 4 } else { 6 },
                    "rtt_ms": st.path.rtt.as_secs_f64() * 1000.0,
                    "cwnd_bytes": st.path.cwnd,
                    "lost_packets": st.path.lost_packets,
                    "sent_packets": st.path.sent_packets,
                    "sent_bytes": st.udp_tx.bytes,
                    "received_bytes": st.udp_rx.bytes,
                    "streams": pc.streams.get(),
                    "uptime_s": pc.opened.elapsed().as_secs_f64(),
                    "history": history_json(&pc.history),
                })
            })
            .collect();
        let mut status = serde_json::json!({
            "role": self.role,
            "peer_id": self.ctx.transport.identity().peer_id().to_string(),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "counters": {
                "tasks": self.ctx.tasks.len(),
                "connections": s.connections.get(),
                "connections_opened": s.connections_opened(),
                "path_switches": self.ctx.transport.paths().switches.load(std::sync::atomic::Ordering::Relaxed),
                "tcp_links": self.ctx.transport.paths().links().count(),
                "streams": s.streams.get(),
                "streams_opened": s.streams_opened(),
                "rtsp_sessions": s.rtsp_sessions.get(),
                "media_flows": s.media_flows.get(),
                "media_datagrams": s.media_datagrams.get(),
                "rtp_requested": s.rtp_requested.get(),
                "rtp_resent": s.rtp_resent.get(),
                "rtp_repaired": s.rtp_repaired.get(),
                "rtp_rebuilt": s.rtp_rebuilt.get(),
            },
            "rendezvous_via_tcp": self.ctx.transport.paths().links().via_tcp(),
            "peers": peers,
            "connections": connections,
            "services": services_json(s),
            "rtsp": rtsp_json(s),
            "histograms": {
                "rtt_seconds": histogram_json(&s.rtt.snapshot()),
                "dial_seconds": histogram_json(&s.dial_time.snapshot()),
            },
        });
        if let Some(rz) = &self.rendezvous {
            status["rendezvous"] = serde_json::json!({
                "registered": s.rendezvous_peers.load(Ordering::Relaxed),
                "relays": s.relays.get(),
                "refused": rz.refusals(),
            });
        }
        status
    }
}

/// A histogram as Prometheus reads one: cumulative counts per upper bound (`+Inf` is the
/// total, `count`), the sum, and the bucket bounds holding the median and the 99th percentile.
pub(super) fn histogram_json(h: &crate::stats::HistogramSnapshot) -> serde_json::Value {
    let mut cumulative = 0;
    let buckets: Vec<serde_json::Value> = h
        .buckets
        .iter()
        .filter(|(le, _)| le.is_finite())
        .map(|(le, n)| {
            cumulative += n;
            serde_json::json!({ "le": le, "count": cumulative })
        })
        .collect();
    serde_json::json!({
        "count": h.count,
        "sum": h.sum,
        "p50_le": h.quantile_bound(0.5).filter(|b| b.is_finite()),
        "p99_le": h.quantile_bound(0.99).filter(|b| b.is_finite()),
        "buckets": buckets,
    })
}

/// A connection's samples, oldest first, as one array per figure.
fn history_json(
    history: &std::sync::Mutex<std::collections::VecDeque<crate::runtime::peers::Sample>>,
) -> serde_json::Value {
    let history = history.lock().unwrap_or_else(|p| p.into_inner());
    serde_json::json!({
        "interval_s": crate::runtime::peers::SAMPLE_EVERY.as_secs_f64(),
        "rtt_ms": history.iter().map(|s| (s.rtt_ms * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
        "sent_bytes": history.iter().map(|s| s.sent_bytes).collect::<Vec<_>>(),
        "received_bytes": history.iter().map(|s| s.received_bytes).collect::<Vec<_>>(),
    })
}

fn services_json(s: &crate::stats::Stats) -> Vec<serde_json::Value> {
    s.services
        .snapshot()
        .into_iter()
        .map(|((peer, service), st)| {
            serde_json::json!({
                "peer": (!peer.is_empty()).then_some(peer),
                "service": service,
                "open": st.open.load(Ordering::Relaxed),
                "done": st.done.get(),
                "failed": st.failed.get(),
                "requests": st.requests.get(),
                "bytes_up": st.bytes_up.get(),
                "bytes_down": st.bytes_down.get(),
                "open_seconds": histogram_json(&st.open_time.snapshot()),
            })
        })
        .collect()
}

fn rtsp_json(s: &crate::stats::Stats) -> Vec<serde_json::Value> {
    s.rtsp
        .snapshot()
        .into_iter()
        .map(|e| {
            let m = &e.media;
            serde_json::json!({
                "service": e.service,
                "facing": e.facing,
                "uptime_s": e.started.elapsed().as_secs_f64(),
                "sessions": e.sessions.load(Ordering::Relaxed),
                "flows": e.flows.load(Ordering::Relaxed),
                "datagrams_sent": m.datagrams_sent.get(),
                "overflow_sent": m.overflow_sent.get(),
                "delivered": m.delivered.get(),
                "rtp_requested": m.rtp_requested.get(),
                "rtp_resent": m.rtp_resent.get(),
                "rtp_repaired": m.rtp_repaired.get(),
                "rtp_rebuilt": m.rtp_rebuilt.get(),
            })
        })
        .collect()
}
