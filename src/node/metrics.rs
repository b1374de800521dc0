//! `--metrics ADDR`: the node's status in Prometheus's exposition format, at `/metrics` over
//! plain HTTP. The figures are the status answer's (`docs/status.md`), read when scraped
//! (atomics and quinn's `Connection::stats()`: nothing on the data path), encoded by the
//! `prometheus-client` crate. Labels name peers by their names, never by their keys.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::info;

use super::control::ControlView;
use super::Node;
use crate::protocol::http::parse_request;

/// How long a scraper has to send its request, and the most it may send.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REQUEST: usize = 8 * 1024;

impl Node {
    /// Serves `/metrics` on `listener` until the node stops.
    pub fn serve_metrics(&self, listener: TcpListener, role: &'static str) {
        let view = self.control_view(role);
        let ctx = self.ctx.clone();
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "metrics: http://{addr}/metrics");
        }
        let tasks = self.ctx.tasks.clone();
        self.ctx.tasks.spawn(async move {
            crate::connect::accept_clients(listener, &ctx, |tcp, _| {
                tasks.spawn(answer(tcp, view.clone()));
            })
            .await
        });
    }
}

async fn answer(mut tcp: TcpStream, view: ControlView) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    let head = loop {
        let read = tokio::time::timeout(READ_TIMEOUT, tcp.read(&mut chunk)).await;
        let Ok(Ok(n)) = read else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_request(&buf) {
            Ok(Some((head, _))) => break head,
            Ok(None) if buf.len() < MAX_REQUEST => continue,
            _ => return respond(&mut tcp, "400 Bad Request", "text/plain", b"bad request\n").await,
        }
    };
    let path = head.target.split('?').next().unwrap_or_default();
    match (head.method.as_str(), path) {
        ("GET", "/metrics") => {
            let body = exposition(&view.status());
            respond(
                &mut tcp,
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body.as_bytes(),
            )
            .await
        }
        ("GET", _) => respond(&mut tcp, "404 Not Found", "text/plain", b"see /metrics\n").await,
        _ => {
            respond(
                &mut tcp,
                "405 Method Not Allowed",
                "text/plain",
                b"GET only\n",
            )
            .await
        }
    }
}

async fn respond(tcp: &mut TcpStream, status: &str, kind: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = tcp.write_all(head.as_bytes()).await;
    let _ = tcp.write_all(body).await;
    let _ = tcp.shutdown().await;
}

type Labels = Vec<(String, String)>;

/// The status object as metrics: the same names (`tunnel_` + the JSON key), counters for
/// what only grows, gauges for what is now.
pub fn exposition(status: &serde_json::Value) -> String {
    let mut reg = Registry::with_prefix("tunnel");
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let c = &status["counters"];
    for key in [
        "connections",
        "streams",
        "rtsp_sessions",
        "media_flows",
        "tasks",
    ] {
        let g = Gauge::<i64>::default();
        g.set(num(&c[key]) as i64);
        reg.register(key, format!("{key} now (status counters.{key})"), g);
    }
    for (key, name) in [
        ("connections_opened", "connections_opened"),
        ("streams_opened", "streams_opened"),
        ("media_datagrams", "media_datagrams"),
        ("rtp_requested", "rtp_requested"),
        ("rtp_resent", "rtp_resent"),
        ("rtp_repaired", "rtp_repaired"),
        ("rtp_rebuilt", "rtp_rebuilt"),
    ] {
        let counter = Counter::<u64>::default();
        counter.inc_by(num(&c[key]) as u64);
        reg.register(name, format!("{key} ever (status counters.{key})"), counter);
    }
    let uptime = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    uptime.set(num(&status["uptime_s"]));
    reg.register(
        "uptime_seconds",
        "seconds since the process started",
        uptime,
    );

    // Per connection, labelled by the peer's name and the path (peers without a name are
    // `other`: keys never become labels).
    let rtt = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let cwnd = Family::<Labels, Gauge>::default();
    let sent = Family::<Labels, Counter>::default();
    let received = Family::<Labels, Counter>::default();
    let lost = Family::<Labels, Counter>::default();
    let open = Family::<Labels, Gauge>::default();
    for conn in status["connections"].as_array().into_iter().flatten() {
        let labels: Labels = vec![
            (
                "peer".into(),
                conn["name"].as_str().unwrap_or("other").to_owned(),
            ),
            (
                "path".into(),
                conn["path"].as_str().unwrap_or("?").to_owned(),
            ),
        ];
        rtt.get_or_create(&labels)
            .set(num(&conn["rtt_ms"]) / 1000.0);
        cwnd.get_or_create(&labels)
            .set(num(&conn["cwnd_bytes"]) as i64);
        sent.get_or_create(&labels)
            .inc_by(num(&conn["sent_bytes"]) as u64);
        received
            .get_or_create(&labels)
            .inc_by(num(&conn["received_bytes"]) as u64);
        lost.get_or_create(&labels)
            .inc_by(num(&conn["lost_packets"]) as u64);
        open.get_or_create(&labels).inc();
    }
    reg.register(
        "connection_rtt_seconds",
        "smoothed RTT of each connection",
        rtt,
    );
    reg.register(
        "connection_cwnd_bytes",
        "congestion window of each connection",
        cwnd,
    );
    reg.register(
        "connection_sent_bytes",
        "UDP bytes sent on each connection",
        sent,
    );
    reg.register(
        "connection_received_bytes",
        "UDP bytes received on each connection",
        received,
    );
    reg.register(
        "connection_lost_packets",
        "packets lost on each connection",
        lost,
    );
    reg.register("connection_up", "live connections by peer and path", open);
    let peers = Family::<Labels, Gauge>::default();
    for p in status["peers"].as_array().into_iter().flatten() {
        if let Some(name) = p["name"].as_str() {
            let up = peers.get_or_create(&vec![("peer".into(), name.to_owned())]);
            up.set(i64::from(p["connected"].as_bool().unwrap_or(false)));
        }
    }
    reg.register(
        "peer_connected",
        "1 when a named peer has a connection",
        peers,
    );
    if let Some(rz) = status.get("rendezvous") {
        let registered = Gauge::<i64>::default();
        registered.set(num(&rz["registered"]) as i64);
        reg.register("rendezvous_registered", "peers registered now", registered);
        let relays = Gauge::<i64>::default();
        relays.set(num(&rz["relays"]) as i64);
        reg.register("rendezvous_relays", "relay allocations live now", relays);
        let refused = Family::<Labels, Counter>::default();
        for (reason, n) in rz["refused"].as_object().into_iter().flatten() {
            refused
                .get_or_create(&vec![("reason".into(), reason.clone())])
                .inc_by(n.as_u64().unwrap_or(0));
        }
        reg.register("rendezvous_refused", "refusals by reason", refused);
    }
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_becomes_named_metrics_without_peer_keys() {
        let status = serde_json::json!({
            "uptime_s": 12.5,
            "counters": {"connections": 1, "streams": 2, "streams_opened": 40, "tasks": 9},
            "peers": [{"name": "home", "id": "k".repeat(32), "connected": true, "path": "direct"}],
            "connections": [{"peer": "k".repeat(32), "name": "home", "path": "direct",
                             "rtt_ms": 20.0, "cwnd_bytes": 12000, "sent_bytes": 1000,
                             "received_bytes": 5000, "lost_packets": 3}],
            "rendezvous": {"registered": 2, "relays": 1, "refused": {"not_listed": 4}},
        });
        let text = exposition(&status);
        for line in [
            "tunnel_connections 1",
            "tunnel_streams_opened_total 40",
            "tunnel_connection_received_bytes_total{peer=\"home\",path=\"direct\"} 5000",
            "tunnel_connection_rtt_seconds{peer=\"home\",path=\"direct\"} 0.02",
            "tunnel_peer_connected{peer=\"home\"} 1",
            "tunnel_rendezvous_refused_total{reason=\"not_listed\"} 4",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains(&"k".repeat(32)), "a key became a label");
    }
}
