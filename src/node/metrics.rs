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
    let page = matches!(path, "/" | "/status" | "/status.json");
    if page && !addressed_to_us(head.headers.get_str("host")) {
        // A name that resolves to this port but is not ours: a page of another site after
        // DNS rebinding. Scrapers of /metrics may use any name.
        return respond(
            &mut tcp,
            "421 Misdirected Request",
            "text/plain",
            b"the status page answers to localhost or an IP address\n",
        )
        .await;
    }
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
        ("GET", "/" | "/status") => {
            let page = crate::http::status_page::page(&view.status(), path);
            respond(
                &mut tcp,
                "200 OK",
                "text/html; charset=utf-8",
                page.as_bytes(),
            )
            .await
        }
        ("GET", "/status.json") => {
            let body = format!("{}\n", view.status());
            respond(&mut tcp, "200 OK", "application/json", body.as_bytes()).await
        }
        ("GET", _) => {
            respond(
                &mut tcp,
                "404 Not Found",
                "text/plain",
                b"see / (status page), /status.json or /metrics\n",
            )
            .await
        }
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

/// Whether `Host` names this machine's loopback, or is an IP address (a rebinding attack
/// needs a name of its own).
fn addressed_to_us(host: Option<&str>) -> bool {
    if crate::http::route::is_local(host) {
        return true;
    }
    let Some(host) = host.map(str::trim) else {
        return true;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.parse::<std::net::IpAddr>().is_ok()
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
        "tcp_links",
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
        ("path_switches", "path_switches"),
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
    // Peers are labelled by a name the role gave them, never by their key.
    let named: Vec<&str> = status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .collect();
    let service_labels = |svc: &serde_json::Value| -> Labels {
        let mut labels = vec![(
            "service".to_owned(),
            svc["service"].as_str().unwrap_or("?").to_owned(),
        )];
        if let Some(peer) = svc["peer"].as_str() {
            let peer = if named.contains(&peer) { peer } else { "other" };
            labels.push(("peer".into(), peer.to_owned()));
        }
        labels
    };
    let open = Family::<Labels, Gauge>::default();
    let done = Family::<Labels, Counter>::default();
    let failed = Family::<Labels, Counter>::default();
    let requests = Family::<Labels, Counter>::default();
    let up = Family::<Labels, Counter>::default();
    let down = Family::<Labels, Counter>::default();
    let open_time = Family::<Labels, Histogram>::default();
    for svc in status["services"].as_array().into_iter().flatten() {
        let labels = service_labels(svc);
        open.get_or_create(&labels).inc_by(num(&svc["open"]) as i64);
        done.get_or_create(&labels).inc_by(num(&svc["done"]) as u64);
        failed
            .get_or_create(&labels)
            .inc_by(num(&svc["failed"]) as u64);
        requests
            .get_or_create(&labels)
            .inc_by(num(&svc["requests"]) as u64);
        up.get_or_create(&labels)
            .inc_by(num(&svc["bytes_up"]) as u64);
        down.get_or_create(&labels)
            .inc_by(num(&svc["bytes_down"]) as u64);
        open_time.get_or_create(&labels).add(&svc["open_seconds"]);
    }
    reg.register(
        "service_open_streams",
        "streams open now, per service",
        open,
    );
    reg.register(
        "service_done",
        "streams that ended cleanly, per service",
        done,
    );
    reg.register(
        "service_failed",
        "streams that ended with an error, per service",
        failed,
    );
    reg.register(
        "service_requests",
        "HTTP responses forwarded, per service",
        requests,
    );
    reg.register(
        "service_bytes_up",
        "bytes from clients toward each service (ended streams; HTTP as it goes)",
        up,
    );
    reg.register(
        "service_bytes_down",
        "bytes from each service toward clients (ended streams; HTTP as it goes)",
        down,
    );
    reg.register(
        "service_open_seconds",
        "exposing side: from a stream's arrival to the service's socket connected",
        open_time,
    );
    let rtsp_sessions = Family::<Labels, Gauge>::default();
    let rtsp_delivered = Family::<Labels, Counter>::default();
    let rtsp_sent = Family::<Labels, Counter>::default();
    let rtsp_repaired = Family::<Labels, Counter>::default();
    let rtsp_resent = Family::<Labels, Counter>::default();
    for r in status["rtsp"].as_array().into_iter().flatten() {
        let labels: Labels = vec![(
            "service".into(),
            r["service"].as_str().unwrap_or("?").to_owned(),
        )];
        rtsp_sessions
            .get_or_create(&labels)
            .inc_by(num(&r["sessions"]) as i64);
        rtsp_sent
            .get_or_create(&labels)
            .inc_by(num(&r["datagrams_sent"]) as u64);
        rtsp_delivered
            .get_or_create(&labels)
            .inc_by(num(&r["delivered"]) as u64);
        rtsp_repaired
            .get_or_create(&labels)
            .inc_by(num(&r["rtp_repaired"]) as u64);
        rtsp_resent
            .get_or_create(&labels)
            .inc_by(num(&r["rtp_resent"]) as u64);
    }
    reg.register(
        "rtsp_live_sessions",
        "RTSP sessions live now, per service",
        rtsp_sessions,
    );
    reg.register(
        "rtsp_datagrams_sent",
        "media packets sent as datagrams by live RTSP connections, per service",
        rtsp_sent,
    );
    reg.register(
        "rtsp_delivered",
        "media packets delivered to local sockets by live RTSP connections, per service",
        rtsp_delivered,
    );
    reg.register(
        "rtsp_repaired",
        "RTP gaps filled on live RTSP connections, per service",
        rtsp_repaired,
    );
    reg.register(
        "rtsp_resent",
        "RTP packets resent on live RTSP connections, per service",
        rtsp_resent,
    );
    for (key, name, help) in [
        (
            "rtt_seconds",
            "rtt_seconds",
            "smoothed RTT of every live connection, sampled once a second",
        ),
        (
            "dial_seconds",
            "dial_seconds",
            "time to get a connection to a peer (punching, relay included)",
        ),
    ] {
        let h = Histogram::default();
        h.add(&status["histograms"][key]);
        reg.register(name, help, h);
    }
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

/// A histogram read from the status object (cumulative buckets), encoded as Prometheus's
/// histogram type.
#[derive(Debug, Default)]
struct Histogram(std::sync::Mutex<Read>);

/// Sum, count, and (upper bound, count in that bucket only) per bucket.
type Read = (f64, u64, Vec<(f64, u64)>);

impl Histogram {
    /// Adds the status object's histogram `h` (`histogram_json`).
    fn add(&self, h: &serde_json::Value) {
        let mut me = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = h["count"].as_u64().unwrap_or(0);
        me.0 += h["sum"].as_f64().unwrap_or(0.0);
        me.1 += count;
        let mut below = 0;
        let mut i = 0;
        for b in h["buckets"].as_array().into_iter().flatten() {
            let (le, cum) = (
                b["le"].as_f64().unwrap_or(0.0),
                b["count"].as_u64().unwrap_or(0),
            );
            let n = cum.saturating_sub(below);
            below = cum;
            match me.2.get_mut(i) {
                Some(slot) => slot.1 += n,
                None => me.2.push((le, n)),
            }
            i += 1;
        }
        let rest = count.saturating_sub(below);
        match me.2.get_mut(i) {
            Some(slot) => slot.1 += rest,
            None => me.2.push((f64::MAX, rest)),
        }
    }
}

impl prometheus_client::metrics::TypedMetric for Histogram {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Histogram;
}

impl prometheus_client::encoding::EncodeMetric for Histogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let me = self.0.lock().unwrap_or_else(|p| p.into_inner());
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(me.0, me.1, &me.2, None)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
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

    #[test]
    fn the_status_page_answers_to_our_names_and_ip_literals_only() {
        for ours in [
            None,
            Some("localhost:9464"),
            Some("127.0.0.1:9464"),
            Some("[::1]:9464"),
            Some("198.51.100.7:9464"),
            Some("[2001:db8::1]:9464"),
        ] {
            assert!(addressed_to_us(ours), "{ours:?}");
        }
        for foreign in [Some("evil.example:9464"), Some("rebind.attacker.test")] {
            assert!(!addressed_to_us(foreign), "{foreign:?}");
        }
    }

    #[test]
    fn services_and_histograms_become_labelled_series_and_real_histograms() {
        let h = crate::stats::Histogram::default();
        for ms in [1, 3, 3, 40, 20_000] {
            h.observe(std::time::Duration::from_millis(ms));
        }
        let hist = super::super::control::histogram_json(&h.snapshot());
        let status = serde_json::json!({
            "peers": [{"name": "home", "id": "k".repeat(32), "connected": true}],
            "services": [
                {"peer": "home", "service": "nas", "open": 1, "done": 4, "failed": 1,
                 "requests": 9, "bytes_up": 10, "bytes_down": 5000, "open_seconds": hist},
                {"peer": "k".repeat(32), "service": "cam", "open": 0, "done": 1, "failed": 0,
                 "requests": 0, "bytes_up": 1, "bytes_down": 2, "open_seconds": {}},
            ],
            "histograms": {"rtt_seconds": hist, "dial_seconds": {}},
        });
        let text = exposition(&status);
        for line in [
            "tunnel_service_bytes_down_total{service=\"nas\",peer=\"home\"} 5000",
            "tunnel_service_open_streams{service=\"nas\",peer=\"home\"} 1",
            "tunnel_service_bytes_down_total{service=\"cam\",peer=\"other\"} 2",
            "tunnel_service_open_seconds_count{service=\"nas\",peer=\"home\"} 5",
            "tunnel_rtt_seconds_bucket{le=\"0.001\"} 1",
            "tunnel_rtt_seconds_bucket{le=\"0.005\"} 3",
            "tunnel_rtt_seconds_bucket{le=\"10.0\"} 4",
            "tunnel_rtt_seconds_bucket{le=\"+Inf\"} 5",
            "tunnel_rtt_seconds_count 5",
            "tunnel_dial_seconds_count 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains(&"k".repeat(32)), "a key became a label");
    }
}
