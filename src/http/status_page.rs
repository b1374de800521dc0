//! The status page: the status object (`docs/status.md`) as server-rendered HTML tables, with
//! a chart of each connection's RTT and throughput over the last two minutes drawn as inline
//! SVG. No external resource, readable with JavaScript off; the one script only fetches the
//! page's status section again every 2 s and swaps it in, so the charts move.
//!
//! Pure: a JSON value in, HTML out. Served at `/` of `--metrics` and under the index of
//! `--http` (`/status`, also linked from it); `status.json` beside it is the same object.

use std::fmt::Write;

use serde_json::Value;

use super::pages::escape;

/// How often the script refreshes the section.
const REFRESH_MS: u32 = 2000;

/// The whole page: the section, and the script that keeps it live from `refresh` (a path on
/// the same listener that answers with a page holding a fresh section).
pub fn page(status: &Value, refresh: &str) -> String {
    let mut body = section(status, refresh);
    body.push_str(&script());
    super::pages::html("tunnel status", &body)
}

/// The script: refetches `data-refresh` of `#status` and replaces the section with the
/// fresh one, every [`REFRESH_MS`] while the page is visible.
pub fn script() -> String {
    format!(
        "<script>\n(function(){{var busy=false;setInterval(function(){{\
var old=document.getElementById('status');if(busy||document.hidden||!old)return;busy=true;\
fetch(old.getAttribute('data-refresh'),{{cache:'no-store'}}).then(function(r){{return r.ok?r.text():null}})\
.then(function(t){{if(!t)return;var d=new DOMParser().parseFromString(t,'text/html');\
var n=d.getElementById('status');if(n)old.replaceWith(n);}}).catch(function(){{}})\
.then(function(){{busy=false}});}},{REFRESH_MS});}})();\n</script>\n<noscript><p>Reload the page to refresh it.</p></noscript>\n"
    )
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => escape(s),
        Value::Null => "-".into(),
        other => escape(&other.to_string()),
    }
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// Bytes for a person: B, KiB, MiB, GiB.
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut n = n;
    let mut unit = 0;
    while n >= 1024.0 && unit < UNITS.len() - 1 {
        n /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n:.0} B")
    } else {
        format!("{n:.1} {}", UNITS[unit])
    }
}

/// A rate for a person, in bits per second.
fn bits_per_second(bytes_per_second: f64) -> String {
    let bits = bytes_per_second * 8.0;
    match bits {
        b if b >= 1e9 => format!("{:.2} Gbit/s", b / 1e9),
        b if b >= 1e6 => format!("{:.1} Mbit/s", b / 1e6),
        b if b >= 1e3 => format!("{:.0} kbit/s", b / 1e3),
        b => format!("{b:.0} bit/s"),
    }
}

fn duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        s if s >= 86400 => format!("{}d {}h", s / 86400, s % 86400 / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// Rates per second from cumulative counts sampled every `interval` seconds.
pub fn rates(cumulative: &[f64], interval: f64) -> Vec<f64> {
    cumulative
        .windows(2)
        .map(|w| (w[1] - w[0]).max(0.0) / interval.max(1e-3))
        .collect()
}

/// A small line chart of `values` (oldest first) as inline SVG, scaled to their maximum,
/// with that maximum and the last value written beside it.
pub fn chart(values: &[f64], label: &str, unit: impl Fn(f64) -> String, class: &str) -> String {
    const W: f64 = 240.0;
    const H: f64 = 40.0;
    let max = values.iter().copied().fold(0.0, f64::max);
    let last = values.last().copied();
    let n = values.len();
    let mut points = String::new();
    for (i, v) in values.iter().enumerate() {
        let x = if n > 1 {
            W * i as f64 / (n - 1) as f64
        } else {
            W
        };
        let y = if max > 0.0 { H - H * v / max } else { H };
        let _ = write!(points, "{x:.1},{y:.1} ");
    }
    format!(
        "<figure class=\"chart {class}\" style=\"display:inline-block;margin:0 1.5em .8em 0\"><svg width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{label}\">\
<rect width=\"{W}\" height=\"{H}\" fill=\"#f4f4f4\"/><polyline fill=\"none\" stroke=\"#036\" stroke-width=\"1.5\" points=\"{points}\"/></svg>\
<figcaption>{label}: {} (max {})</figcaption></figure>",
        last.map_or_else(|| "-".into(), &unit),
        unit(max),
    )
}

/// The status section: `<section id="status">`, refreshed from `refresh`.
pub fn section(s: &Value, refresh: &str) -> String {
    let mut out = String::new();
    let c = &s["counters"];
    let _ = writeln!(
        out,
        "<section id=\"status\" data-refresh=\"{}\">\n<p id=\"whoami\"><b>{}</b> <code>{}</code>, up {}: {} connection(s), {} stream(s) open ({} opened), {} RTSP session(s).</p>",
        escape(refresh),
        text(&s["role"]),
        text(&s["peer_id"]),
        duration(num(&s["uptime_s"])),
        c["connections"],
        c["streams"],
        c["streams_opened"],
        c["rtsp_sessions"],
    );

    out.push_str("<h2>Peers</h2>\n");
    let peers = s["peers"].as_array().map_or(&[][..], Vec::as_slice);
    if peers.is_empty() {
        out.push_str("<p>No peer yet.</p>\n");
    } else {
        out.push_str("<table id=\"status-peers\"><tr><th>peer</th><th>id</th><th>presence</th><th>path</th></tr>\n");
        for p in peers {
            let presence = p["presence"].as_str().unwrap_or("unknown");
            let detail = match presence {
                "unreachable" => format!(": {}", text(&p["last_error"])),
                "seen" => format!(", {} ago", duration(num(&p["last_seen_s"]))),
                _ => String::new(),
            };
            let class = if presence == "connected" { "on" } else { "off" };
            let _ = writeln!(
                out,
                "<tr class=\"peer\" data-peer=\"{name}\" data-presence=\"{presence}\" data-path=\"{path}\"><td>{name}</td><td><code>{id}</code></td><td class=\"{class}\">{presence}{detail}</td><td>{path}</td></tr>",
                name = text(&p["name"]),
                id = text(&p["id"]),
                path = text(&p["path"]),
            );
        }
        out.push_str("</table>\n");
    }

    out.push_str("<h2>Connections</h2>\n");
    let conns = s["connections"].as_array().map_or(&[][..], Vec::as_slice);
    if conns.is_empty() {
        out.push_str("<p>No connection now.</p>\n");
    } else {
        out.push_str("<table id=\"connections\"><tr><th>peer</th><th>path</th><th>address</th><th>RTT</th><th>cwnd</th><th>lost</th><th>sent</th><th>received</th><th>streams</th><th>up</th></tr>\n");
        for conn in conns {
            let h = &conn["history"];
            let interval = h["interval_s"].as_f64().unwrap_or(1.0);
            let series = |key: &str| -> Vec<f64> {
                h[key].as_array().into_iter().flatten().map(num).collect()
            };
            let rtt = series("rtt_ms");
            let sent = rates(&series("sent_bytes"), interval);
            let received = rates(&series("received_bytes"), interval);
            let name = match conn["name"].as_str() {
                Some(n) => escape(n),
                None => format!("<code>{}</code>", text(&conn["peer"])),
            };
            let _ = writeln!(
                out,
                "<tr class=\"connection\" data-peer=\"{peer}\" data-path=\"{path}\"><td>{name}</td><td class=\"path\">{path}</td><td>{remote} (IPv{ipv})</td><td>{rtt_now:.1} ms</td><td>{cwnd}</td><td>{lost}</td><td>{tx}</td><td>{rx}</td><td>{streams}</td><td>{up}</td></tr>\n<tr class=\"charts\"><td></td><td colspan=\"9\">{c1}{c2}{c3}</td></tr>",
                peer = text(&conn["peer"]),
                path = text(&conn["path"]),
                remote = text(&conn["remote"]),
                ipv = conn["ip_version"],
                rtt_now = num(&conn["rtt_ms"]),
                cwnd = bytes(num(&conn["cwnd_bytes"])),
                lost = conn["lost_packets"],
                tx = bytes(num(&conn["sent_bytes"])),
                rx = bytes(num(&conn["received_bytes"])),
                streams = conn["streams"],
                up = duration(num(&conn["uptime_s"])),
                c1 = chart(&rtt, "RTT", |v| format!("{v:.1} ms"), "rtt"),
                c2 = chart(&received, "received", bits_per_second, "received"),
                c3 = chart(&sent, "sent", bits_per_second, "sent"),
            );
        }
        out.push_str("</table>\n");
    }

    let services = s["services"].as_array().map_or(&[][..], Vec::as_slice);
    if !services.is_empty() {
        out.push_str("<h2>Services</h2>\n<table id=\"services\"><tr><th>service</th><th>open</th><th>done</th><th>failed</th><th>requests</th><th>up</th><th>down</th><th>open time p50 / p99 (exposing side)</th></tr>\n");
        for svc in services {
            let name = match svc["peer"].as_str() {
                Some(peer) => format!("{}.{}", text(&svc["service"]), escape(peer)),
                None => text(&svc["service"]),
            };
            let open = &svc["open_seconds"];
            let quantiles = match (open["p50_le"].as_f64(), open["p99_le"].as_f64()) {
                (Some(a), Some(b)) => format!("≤ {} ms / ≤ {} ms", a * 1000.0, b * 1000.0),
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "<tr class=\"service\" data-service=\"{name}\"><td>{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{quantiles}</td></tr>",
                svc["open"],
                svc["done"],
                svc["failed"],
                svc["requests"],
                bytes(num(&svc["bytes_up"])),
                bytes(num(&svc["bytes_down"])),
            );
        }
        out.push_str("</table>\n");
    }

    let rtsp = s["rtsp"].as_array().map_or(&[][..], Vec::as_slice);
    if !rtsp.is_empty() {
        out.push_str("<h2>RTSP</h2>\n<table id=\"rtsp\"><tr><th>service</th><th>side</th><th>sessions</th><th>flows</th><th>datagrams sent</th><th>delivered</th><th>repaired</th><th>resent</th><th>up</th></tr>\n");
        for r in rtsp {
            let _ = writeln!(
                out,
                "<tr class=\"rtsp\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                text(&r["service"]),
                text(&r["facing"]),
                r["sessions"],
                r["flows"],
                r["datagrams_sent"],
                r["delivered"],
                r["rtp_repaired"],
                r["rtp_resent"],
                duration(num(&r["uptime_s"])),
            );
        }
        out.push_str("</table>\n");
    }

    let h = &s["histograms"];
    let summary = |v: &Value, what: &str| match (v["p50_le"].as_f64(), v["p99_le"].as_f64()) {
        (Some(a), Some(b)) => format!(
            "{what} p50 ≤ {} ms, p99 ≤ {} ms ({} samples)",
            a * 1000.0,
            b * 1000.0,
            v["count"]
        ),
        _ => format!("{what}: no sample yet"),
    };
    let _ = writeln!(
        out,
        "<p id=\"histograms\">{}; {}.</p>",
        summary(&h["rtt_seconds"], "RTT"),
        summary(&h["dial_seconds"], "time to connect")
    );
    if let Some(rz) = s.get("rendezvous") {
        let _ = writeln!(
            out,
            "<h2>Rendezvous</h2>\n<p id=\"rendezvous\">{} peer(s) registered, {} relay allocation(s).</p>",
            rz["registered"], rz["relays"]
        );
    }
    out.push_str("<p class=\"links\"><a href=\"status.json\">status.json</a></p>\n</section>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Value {
        serde_json::json!({
            "role": "connect", "peer_id": "me", "uptime_s": 75.0,
            "counters": {"connections": 1, "streams": 2, "streams_opened": 9, "rtsp_sessions": 0},
            "peers": [
                {"name": "home", "id": "abc", "connected": true, "path": "direct", "presence": "connected"},
                {"name": "<shop>", "id": "def", "connected": false, "path": null,
                 "presence": "unreachable", "last_error": "no answer within 10 s"},
            ],
            "connections": [{"peer": "abc", "name": "home", "path": "direct", "remote": "127.0.0.1:1",
                "ip_version": 4, "rtt_ms": 1.5, "cwnd_bytes": 12000, "lost_packets": 0,
                "sent_bytes": 3000, "received_bytes": 2100000, "streams": 2, "uptime_s": 61.0,
                "history": {"interval_s": 1.0, "rtt_ms": [1.0, 2.0, 1.5],
                            "sent_bytes": [0, 1000, 3000], "received_bytes": [0, 100000, 2100000]}}],
            "services": [{"peer": "home", "service": "nas", "open": 1, "done": 4, "failed": 0,
                "requests": 12, "bytes_up": 100, "bytes_down": 2000000,
                "open_seconds": {"count": 0, "sum": 0.0, "p50_le": null, "p99_le": null, "buckets": []}}],
            "rtsp": [],
        })
    }

    #[test]
    fn the_page_has_every_peer_and_connection_with_its_path_escaped() {
        let page = page(&status(), "/status");
        assert!(
            page.contains("data-peer=\"home\" data-presence=\"connected\" data-path=\"direct\"")
        );
        assert!(page.contains("&lt;shop&gt;"), "names are escaped");
        assert!(!page.contains("<shop>"));
        assert!(page.contains("unreachable: no answer within 10 s"));
        assert!(page.contains("class=\"connection\" data-peer=\"abc\" data-path=\"direct\""));
        assert!(page.contains("data-service=\"nas.home\""));
        assert!(page.contains("data-refresh=\"/status\""));
        // The last second moved 2,000,000 bytes: 16 Mbit/s.
        assert!(page.contains("received: 16.0 Mbit/s"), "{page}");
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "no external resource"
        );
    }

    #[test]
    fn rates_come_from_cumulative_samples_and_never_go_negative() {
        assert_eq!(rates(&[0.0, 10.0, 30.0, 5.0], 2.0), vec![5.0, 10.0, 0.0]);
        assert!(rates(&[7.0], 1.0).is_empty());
    }

    #[test]
    fn a_chart_of_nothing_is_still_a_chart() {
        let svg = chart(&[], "RTT", |v| format!("{v} ms"), "rtt");
        assert!(svg.contains("<svg") && svg.contains("RTT: - (max 0 ms)"));
    }
}
