//! The control socket of running processes: `tunnel status` (text and JSON) and `tunnel
//! reload`, against real `expose` and `connect` processes; hostile clients of the socket.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::process::*;
use common::random_bytes;

/// `tunnel ARGS`: exit code, stdout, stderr.
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(tunnel_bin()).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status_json(identity: &Path) -> serde_json::Value {
    let (code, out, err) = run(&["status", "--json", "--identity", identity.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Polls the status until `pred` holds; bounded.
fn status_until(
    identity: &Path,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status_json(identity);
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never {what}: {s:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One request to the socket, raw; the answer line.
fn raw(socket: &Path, send: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(send).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A download through a real pair, then `tunnel status --json` on both sides: one direct
/// connection each, bytes that cover what moved, streams back to 0; the text form says the
/// same for a person.
#[test]
fn status_reports_the_connection_its_path_and_bytes_and_streams_back_to_zero() {
    let body = random_bytes(4 << 20);
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = target.local_addr().unwrap().to_string();
    let served = body.clone();
    std::thread::spawn(move || {
        for tcp in target.incoming().take(1) {
            let mut tcp = tcp.unwrap();
            let _ = tcp.write_all(&served);
        }
    });
    let pair = start_pair(&[("blob", &addr)], &[]);
    let mut tcp = std::net::TcpStream::connect(&pair.locals[0]).unwrap();
    let mut got = Vec::new();
    tcp.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), body.len());
    drop(tcp);
    let (e_id, c_id) = (pair.dir.path("expose.pem"), pair.dir.path("connect.pem"));
    let moved = body.len() as u64;
    for (identity, role, bytes_key) in [
        (&c_id, "connect", "received_bytes"),
        (&e_id, "expose", "sent_bytes"),
    ] {
        let s = status_until(identity, "streams back to 0", |s| {
            s["counters"]["streams"] == 0
                && s["connections"].as_array().is_some_and(|c| c.len() == 1)
        });
        assert_eq!(s["role"], role);
        assert_eq!(s["peer_id"].as_str().unwrap(), peer_id(identity));
        let conn = &s["connections"][0];
        assert_eq!(conn["path"], "direct", "{s:#}");
        assert_eq!(conn["ip_version"], 4);
        let bytes = conn[bytes_key].as_u64().unwrap();
        // UDP bytes: the body plus QUIC's headers, acks and, toward loopback, the MTU
        // probes (padded packets of up to 64 KB): at least the body, not a quarter more.
        assert!(
            bytes >= moved && bytes < moved + moved / 4,
            "{role} {bytes_key} {bytes} for {moved}"
        );
        assert_eq!(s["counters"]["streams_opened"], 1);
        if role == "connect" {
            // The positional peer's name, connected, with its path.
            assert_eq!(s["peers"][0]["name"], "peer", "{s:#}");
            assert_eq!(s["peers"][0]["connected"], true);
            assert_eq!(s["peers"][0]["path"], "direct");
            assert_eq!(conn["name"], "peer");
        }
        assert!(conn["rtt_ms"].as_f64().unwrap() > 0.0);
        // The service's own figures: the stream ended cleanly, its bytes exact (they are
        // the application's, not UDP's), and the connection sampled at least once.
        let svc = &s["services"][0];
        assert_eq!(svc["service"], "blob", "{s:#}");
        assert_eq!(
            (&svc["open"], &svc["done"], &svc["failed"]),
            (&0.into(), &1.into(), &0.into()),
            "{s:#}"
        );
        assert_eq!(svc["bytes_down"].as_u64(), Some(moved), "{s:#}");
        assert!(
            s["histograms"]["rtt_seconds"]["count"].as_u64().unwrap() >= 1,
            "{s:#}"
        );
        assert!(
            !conn["history"]["rtt_ms"].as_array().unwrap().is_empty(),
            "{s:#}"
        );
        if role == "connect" {
            assert_eq!(svc["peer"], "peer");
            assert_eq!(s["peers"][0]["presence"], "connected");
            assert_eq!(s["histograms"]["dial_seconds"]["count"], 1, "{s:#}");
        } else {
            assert_eq!(svc["peer"], serde_json::Value::Null);
            assert_eq!(svc["open_seconds"]["count"], 1, "{s:#}");
        }
    }
    // The connecting side said it was ready, with the service's way in.
    let ready = pair.connect.line_matching(|l| l.starts_with("ready: "));
    assert_eq!(
        ready,
        format!("ready: tcp://{}  (blob of peer peer)", pair.locals[0]),
        "{ready}"
    );
    // --watch asks again and again: one JSON object per line.
    let watch = Proc::spawn(
        "status --watch",
        Command::new(tunnel_bin())
            .args(["status", "--watch", "--json", "--identity"])
            .arg(&c_id),
    );
    for _ in 0..2 {
        let line = watch.line_matching(|l| l.starts_with('{'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["role"], "connect");
    }
    drop(watch);
    let (code, text, err) = run(&["status", "--identity", c_id.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(text.starts_with("connect "), "{text}");
    assert!(
        text.contains("  peer peer ") && text.contains("connected, direct"),
        "{text}"
    );
    assert!(
        text.contains(" direct 127.0.0.1:") && text.contains("streams 0"),
        "{text}"
    );
}

/// `tunnel reload` does what SIGHUP does (here: grants a second peer), says when a broken
/// file keeps the old rules, and a process with nothing to reload says so.
#[test]
fn reload_over_the_control_socket_grants_and_reports_a_broken_file() {
    let dir = TempDir::new("ctl-reload");
    let (e_pem, c_pem) = (dir.path("expose.pem"), dir.path("connect.pem"));
    let c_id = peer_id(&c_pem);
    let rules = dir.path("rules.toml");
    std::fs::write(&rules, "[expose]\nlisten = \"127.0.0.1:0\"\nallow_any = false\nauthorized_peers = []\n[expose.services]\necho = \"127.0.0.1:9\"\n").unwrap();
    let expose = Proc::spawn(
        "expose",
        Command::new(tunnel_bin())
            .args([
                "expose",
                "--allow",
                &peer_id(&dir.path("someone.pem")),
                "--config",
            ])
            .arg(&rules)
            .arg("--identity")
            .arg(&e_pem),
    );
    expose.line_matching(|l| l.trim_start().starts_with("tunnel connect "));
    let socket = dir.path("expose.expose.sock");
    let deadline = Instant::now() + WAIT;
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "no control socket: {}",
            expose.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&rules, format!("[expose]\nlisten = \"127.0.0.1:0\"\nauthorized_peers = [\"{c_id}\"]\n[expose.services]\necho = \"127.0.0.1:9\"\n")).unwrap();
    let e = e_pem.to_str().unwrap();
    let (code, out, err) = run(&["reload", "--identity", e]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("rules reloaded, 0 peer(s) disconnected"),
        "{out}"
    );
    std::fs::write(&rules, "[expose]\nlisten = \"127.0.0.1:0\"\nservise = 1\n").unwrap();
    let (code, _, err) = run(&["reload", "--identity", e]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("the old ones stay") && err.contains("servise"),
        "{err}"
    );
    // A connect has no rules to reload; the control socket says so.
    let connect = Proc::spawn(
        "connect",
        Command::new(tunnel_bin())
            .args([
                "connect",
                &format!("{}@127.0.0.1:9", peer_id(&e_pem)),
                "--local",
                "127.0.0.1:0=echo",
                "--identity",
            ])
            .arg(&c_pem),
    );
    connect.line_matching(|l| l.contains(" -> echo on "));
    let c = c_pem.to_str().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, _, err) = run(&["reload", "--identity", c]);
        if err.contains("has no rules to reload") {
            assert_eq!(code, Some(1));
            break;
        }
        assert!(Instant::now() < deadline, "{err}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Garbage, another version, silence, a client gone mid-answer and a second process on the
/// same socket path: each is answered or refused, and the process keeps answering.
#[test]
fn hostile_control_clients_do_not_harm_the_process() {
    let dir = TempDir::new("ctl-hostile");
    let pem = dir.path("rz.pem");
    let rz = Proc::spawn(
        "rendezvous",
        Command::new(tunnel_bin())
            .args(["rendezvous", "--listen", "127.0.0.1:0", "--identity"])
            .arg(&pem),
    );
    rz.line_matching(|l| l.starts_with("rendezvous listening"));
    let socket = dir.path("rz.rendezvous.sock");
    let deadline = Instant::now() + WAIT;
    while !socket.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "only its owner may talk to it");
    let answer = raw(&socket, b"\x00\xffnot json\n");
    assert!(
        answer.contains("\"ok\":false") && answer.contains("not a JSON request"),
        "{answer}"
    );
    let answer = raw(&socket, b"{\"v\":9,\"cmd\":\"status\"}\n");
    assert!(answer.contains("version 9"), "{answer}");
    let answer = raw(&socket, &[b'x'; 10_000]);
    assert!(answer.contains("\"ok\":false"), "{answer}");
    // Silent clients, and clients that ask and leave at once: none holds the others up.
    let silent: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    for _ in 0..20 {
        let mut s = UnixStream::connect(&socket).unwrap();
        let _ = s.write_all(b"{\"v\":1,\"cmd\":\"status\"}\n");
        drop(s);
    }
    let s = status_json(&pem);
    assert_eq!(s["role"], "rendezvous");
    assert_eq!(s["rendezvous"]["registered"], 0);
    drop(silent);
    // A second rendezvous with the same identity keeps running, without the socket.
    let second = Proc::spawn(
        "second rendezvous",
        Command::new(tunnel_bin())
            .args(["rendezvous", "--listen", "127.0.0.1:0", "--identity"])
            .arg(&pem),
    );
    second.line_matching(|l| l.starts_with("rendezvous listening"));
    let deadline = Instant::now() + WAIT;
    while !second
        .stderr()
        .contains("another tunnel process is using it")
    {
        assert!(Instant::now() < deadline, "{}", second.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        status_json(&pem)["role"],
        "rendezvous",
        "the first still answers"
    );
    // At its end the process removes its socket.
    rz.signal("TERM");
    let deadline = Instant::now() + WAIT;
    while socket.exists() {
        assert!(Instant::now() < deadline, "socket left behind");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real Prometheus (Debian's) scrapes `--metrics` of a connect while a download runs
/// through it; its HTTP API then has the series, with the bytes the download moved.
#[test]
fn a_real_prometheus_scrapes_the_metrics() {
    if !have("prometheus") {
        return;
    }
    let body = random_bytes(3 << 20);
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = target.local_addr().unwrap().to_string();
    let served = body.clone();
    std::thread::spawn(move || {
        for tcp in target.incoming().take(1) {
            let _ = tcp.unwrap().write_all(&served);
        }
    });
    let pair = start_pair(&[("blob", &addr)], &["--metrics", "127.0.0.1:0"]);
    let line = pair
        .connect
        .stderr()
        .lines()
        .find(|l| l.contains("metrics: http://"))
        .map(str::to_owned);
    let line = line.unwrap_or_else(|| {
        pair.connect.wait_log("metrics: http://");
        pair.connect.stderr()
    });
    let metrics = line
        .split("metrics: http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_owned();
    // Bytes through the tunnel, then Prometheus.
    let mut tcp = std::net::TcpStream::connect(&pair.locals[0]).unwrap();
    let mut got = Vec::new();
    tcp.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), body.len());
    // Both directions end: the stream ends, and its bytes are added to its service.
    drop(tcp);
    let dir = TempDir::new("prometheus");
    let web = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        dir.path("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tunnel\n    static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let _prometheus = Proc::spawn(
        "prometheus",
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path("data").display()
            ))
            .arg(format!("--web.listen-address={web}")),
    );
    let query = |q: &str| -> Option<f64> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "--get", "--data-urlencode"])
            .arg(format!("query={q}"))
            .arg(format!("http://{web}/api/v1/query"))
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let received = loop {
        if let Some(v) =
            query("sum(tunnel_connection_received_bytes_total{peer=\"peer\",path=\"direct\"})")
        {
            break v;
        }
        assert!(Instant::now() < deadline, "Prometheus never had the series");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        received >= body.len() as f64,
        "{received} bytes for {}",
        body.len()
    );
    assert_eq!(query("tunnel_streams_opened_total"), Some(1.0));
    // The service's bytes are the application's: exactly what moved (added when the stream
    // ends, which may be a scrape after the client had its last byte).
    let service = "tunnel_service_bytes_down_total{service=\"blob\",peer=\"peer\"}";
    let deadline = Instant::now() + Duration::from_secs(30);
    while query(service) != Some(body.len() as f64) {
        assert!(
            Instant::now() < deadline,
            "{service} is {:?}, not {}",
            query(service),
            body.len()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(query("tunnel_dial_seconds_count"), Some(1.0));
    assert!(query("tunnel_rtt_seconds_count").is_some_and(|n| n >= 1.0));
    assert!(query("histogram_quantile(0.5, tunnel_rtt_seconds_bucket)")
        .is_some_and(|s| s > 0.0 && s <= 0.1));
    assert_eq!(query("tunnel_peer_connected{peer=\"peer\"}"), Some(1.0));
    assert_eq!(
        query("up{job=\"tunnel\"}"),
        Some(1.0),
        "the scrape itself succeeded"
    );
}
