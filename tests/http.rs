//! The HTTP layer through the real binaries, driven by curl against a device's web UI
//! (tests/fixtures/http_device.py, on Python's own HTTP/1.1 server) and nginx: names rewritten
//! both ways, bodies streamed (chunked, Content-Length, 100-continue, 1 GiB each way), Server-
//! Sent Events, https devices with self-signed certificates, routing by Host on `--http`
//! across services and peers, and every error page. Chromium is in tests/browser.rs.
//! Skipped loudly when a program is missing, except with TUNNEL_REQUIRE_TOOLS=1 (CI).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::process::*;
use common::web::*;

fn tools() -> bool {
    have("curl") && have(PYTHON)
}

#[test]
fn a_web_ui_on_a_local_port_keeps_the_browser_on_the_tunnel() {
    if !tools() {
        return;
    }
    let (_device, port) = device("nas", None);
    let target = format!("http://127.0.0.1:{port}");
    let pair = start_pair(&[("nas", &target)], &[]);
    let local = &pair.locals[0];
    let logs = || format!("{}\n{}", pair.connect.stderr(), pair.expose.stderr());

    // A redirect to the device's own address comes back naming the local port.
    let r = curl(&[&format!("http://{local}/")]);
    assert_eq!(status(&r), 302, "{r}\n{}", logs());
    assert_eq!(
        header(&r, "location"),
        Some(&*format!("http://{local}/login?next=%2F"))
    );
    // Following it stays on the tunnel; the cookie is host-only on the local name.
    let r = curl(&["-L", &format!("http://{local}/")]);
    assert!(body(&r).contains("nas login"), "{r}");
    let r = curl(&[&format!("http://{local}/login")]);
    let cookie = header(&r, "set-cookie").unwrap();
    assert!(!cookie.to_ascii_lowercase().contains("domain"), "{cookie}");
    assert!(cookie.contains("session=nas") && cookie.contains("HttpOnly"));
    assert_eq!(
        header(&r, "content-location"),
        Some(&*format!("http://{local}/login"))
    );
    assert_eq!(
        header(&r, "refresh"),
        Some(&*format!("30; url=http://{local}/"))
    );

    // The device sees its own name in Host, Origin and Referer.
    let r = curl(&[
        "-H",
        &format!("Origin: http://{local}"),
        "-H",
        &format!("Referer: http://{local}/settings?tab=1"),
        &format!("http://{local}/whoami"),
    ]);
    let seen: serde_json::Value = serde_json::from_str(body(&r)).unwrap();
    assert_eq!(seen["Host"], format!("127.0.0.1:{port}"));
    assert_eq!(seen["Origin"], format!("http://127.0.0.1:{port}"));
    assert_eq!(
        seen["Referer"],
        format!("http://127.0.0.1:{port}/settings?tab=1")
    );
    assert!(seen["X-Forwarded-For"].is_null(), "not asked for: {seen}");

    // A CSRF guard passes what the browser sends from the tunnel's page, and still refuses
    // another site's (that Origin is not rewritten).
    let post = |origin: &str| {
        curl(&[
            "-H",
            &format!("Origin: {origin}"),
            "--data-binary",
            "x=1",
            &format!("http://{local}/guarded"),
        ])
    };
    let r = post(&format!("http://{local}"));
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(body(&r), "accepted x=1");
    assert_eq!(status(&post("http://evil.example")), 403);

    // Another site's name pointed at 127.0.0.1 (DNS rebinding) gets nowhere.
    let r = curl(&[
        "-H",
        "Host: evil.example",
        &format!("http://{local}/whoami"),
    ]);
    assert_eq!(status(&r), 421, "{r}");

    // Keep-alive: several requests, one client connection (one stream).
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{num_connects} ",
        ])
        .arg(format!("http://{local}/whoami"))
        .arg(format!("http://{local}/login"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1 0 ");

    // Server-Sent Events arrive, and the stream's end closes the response.
    let r = curl(&["-N", &format!("http://{local}/events")]);
    assert_eq!(body(&r).matches("data: event").count(), 3, "{r}");
}

#[test]
fn bodies_stream_both_ways_chunked_and_sized_with_100_continue() {
    if !tools() {
        return;
    }
    let (_device, port) = device("nas", None);
    let pair = start_pair(&[("nas", &format!("http://127.0.0.1:{port}"))], &[]);
    let local = pair.locals[0].clone();
    let n: usize = 64 << 20;
    for chunked in ["0", "1"] {
        let (len, digest) = download(&format!("http://{local}/bytes?n={n}&chunked={chunked}"));
        assert_eq!((len, digest), (n as u64, pattern_sha256(n as u64)));
    }
    for extra in [
        &["-H", "Transfer-Encoding: chunked"][..],
        &["-H", "Expect: 100-continue"],
    ] {
        let answer = upload(&format!("http://{local}/upload"), n as u64, extra);
        assert_eq!(answer["len"], n as u64, "{extra:?}");
        assert_eq!(
            answer["sha256"],
            hex(&pattern_sha256(n as u64)),
            "{extra:?}"
        );
    }
}

#[test]
fn a_gibibyte_each_way_is_byte_exact() {
    if !tools() {
        return;
    }
    let (_device, port) = device("nas", None);
    let pair = start_pair(&[("nas", &format!("http://127.0.0.1:{port}"))], &[]);
    let local = pair.locals[0].clone();
    let n: u64 = 1 << 30;
    let (len, digest) = download(&format!("http://{local}/bytes?n={n}&chunked=1"));
    assert_eq!((len, digest), (n, pattern_sha256(n)));
    let answer = upload(
        &format!("http://{local}/upload"),
        n,
        &["-H", "Transfer-Encoding: chunked"],
    );
    assert_eq!(answer["len"], n);
    assert_eq!(answer["sha256"], hex(&pattern_sha256(n)));
}

/// The device's test pattern: a 1 MiB block from Python's `random.Random(7)`, repeated. Read
/// once from the fixture itself so both sides agree byte for byte.
fn block() -> &'static [u8] {
    static BLOCK: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BLOCK.get_or_init(|| {
        let out = Command::new(PYTHON)
            .args([
                "-c",
                "import random,sys; sys.stdout.buffer.write(random.Random(7).randbytes(1<<20))",
            ])
            .output()
            .unwrap();
        assert_eq!(out.stdout.len(), 1 << 20);
        out.stdout
    })
}

fn pattern_sha256(n: u64) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut left = n;
    while left > 0 {
        let k = left.min(block().len() as u64) as usize;
        ctx.update(&block()[..k]);
        left -= k as u64;
    }
    ctx.finish().as_ref().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// GETs `url` with curl; the length and SHA-256 of the body.
fn download(url: &str) -> (u64, Vec<u8>) {
    let mut child = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "300", url])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        len += n as u64;
    }
    assert!(child.wait().unwrap().success(), "curl {url} failed");
    (len, ctx.finish().as_ref().to_vec())
}

/// PUTs `n` bytes of the pattern from curl's stdin; the device's JSON answer.
fn upload(url: &str, n: u64, extra: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "--max-time", "300", "-T", "-"])
        .args(extra);
    if !extra.contains(&"Transfer-Encoding: chunked") {
        // curl sends stdin chunked unless told the length (and told not to).
        cmd.args([
            "-H",
            "Transfer-Encoding:",
            "-H",
            &format!("Content-Length: {n}"),
        ]);
    }
    let mut child = cmd
        .arg(url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let mut left = n;
        while left > 0 {
            let k = left.min(block().len() as u64) as usize;
            input.write_all(&block()[..k]).unwrap();
            left -= k as u64;
        }
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "curl upload to {url} failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn an_https_device_is_verified_pinned_or_trusted_as_its_rules_say() {
    if !tools() || !have("openssl") {
        return;
    }
    let dir = TempDir::new("https");
    let (cert, key) = (dir.path("cert.pem"), dir.path("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=camera.lan"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let fp = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    let fp = String::from_utf8_lossy(&fp.stdout);
    let pin = fp.trim().split('=').nth(1).unwrap().to_owned();
    let (_device, port) = device("cam", Some((&cert, &key)));
    let base = format!("https://127.0.0.1:{port}");
    let wrong = format!("sha256:{}", "00".repeat(32));
    let pair = start_pair(
        &[
            ("strict", &base),
            ("pinned", &format!("{base}?pin=sha256:{pin}")),
            ("loose", &format!("{base}?tls_verify=false")),
            ("wrong", &format!("{base}?pin={wrong}")),
        ],
        &[],
    );
    let logs = || format!("{}\n{}", pair.connect.stderr(), pair.expose.stderr());
    // Verified against the system's roots: refused, and the page says how to pin it.
    let r = curl(&[&format!("http://{}/whoami", pair.locals[0])]);
    assert_eq!(status(&r), 502, "{r}\n{}", logs());
    let expected_pin = format!("sha256:{}", pin.replace(':', "").to_ascii_lowercase());
    assert!(body(&r).contains(&expected_pin), "{r}");
    // Pinned and unverified: the device answers, over TLS, with its own https origin.
    for local in [&pair.locals[1], &pair.locals[2]] {
        let r = curl(&[
            "-H",
            &format!("Origin: http://{local}"),
            &format!("http://{local}/whoami"),
        ]);
        assert_eq!(status(&r), 200, "{r}\n{}", logs());
        let seen: serde_json::Value = serde_json::from_str(body(&r)).unwrap();
        assert_eq!(seen["Origin"], format!("https://127.0.0.1:{port}"));
        // Its https redirect to itself comes back as the local http name.
        let r = curl(&[&format!("http://{local}/")]);
        assert_eq!(
            header(&r, "location"),
            Some(&*format!("http://{local}/login?next=%2F"))
        );
    }
    // Bodies both ways over the device's TLS session, byte-exact (every TLS write flushed).
    let n: u64 = 32 << 20;
    let answer = upload(
        &format!("http://{}/upload", pair.locals[1]),
        n,
        &["-H", "Transfer-Encoding: chunked"],
    );
    assert_eq!(answer["sha256"], hex(&pattern_sha256(n)));
    let (len, digest) = download(&format!("http://{}/bytes?n={n}&chunked=1", pair.locals[2]));
    assert_eq!((len, digest), (n, pattern_sha256(n)));
    let r = curl(&[&format!("http://{}/whoami", pair.locals[3])]);
    assert_eq!(status(&r), 502);
    assert!(body(&r).contains("not the pinned one"), "{r}");
}

/// Sends `raw` on one connection and reads until the server closes it (or `limit`).
fn exchange(port: u16, raw: &[u8], limit: Duration) -> String {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(limit)).unwrap();
    tcp.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn one_http_port_routes_by_host_keeps_cookies_apart_and_answers_errors_with_pages() {
    if !tools() {
        return;
    }
    let (_nas, nas_port) = device("nas", None);
    let (_web, web_port) = device("web", None);
    let raw_port = free_port();
    let (pair, port) = http_pair(
        &[
            ("nas", &format!("http://127.0.0.1:{nas_port}")),
            ("web", &format!("http://127.0.0.1:{web_port}")),
            ("raw", &format!("127.0.0.1:{raw_port}")),
        ],
        &[],
    );
    let logs = || format!("{}\n{}", pair.connect.stderr(), pair.expose.stderr());
    let at = |host: &str, path: &str| {
        curl(&[
            "--resolve",
            &format!("{host}:{port}:127.0.0.1"),
            &format!("http://{host}:{port}{path}"),
        ])
    };
    // By SERVICE.PEER and by SERVICE alone (unique); any case.
    let r = at("nas.peer.localhost", "/whoami");
    assert_eq!(status(&r), 200, "{r}\n{}", logs());
    let seen: serde_json::Value = serde_json::from_str(body(&r)).unwrap();
    assert_eq!(seen["name"], "nas");
    assert_eq!(seen["Host"], format!("127.0.0.1:{nas_port}"));
    let r = at("WEB.localhost", "/whoami");
    let seen: serde_json::Value = serde_json::from_str(body(&r)).unwrap();
    assert_eq!(seen["name"], "web", "{r}");
    // Redirects land on the name the browser used.
    let r = at("nas.peer.localhost", "/");
    assert_eq!(
        header(&r, "location"),
        Some(&*format!("http://nas.peer.localhost:{port}/login?next=%2F"))
    );

    // The same cookie name from two services: each host keeps its own (curl's cookie jar
    // scopes by host as a browser does; Domain= is gone, so neither is refused).
    let jar = pair.dir.path("cookies.txt");
    let jar = jar.to_str().unwrap();
    for host in ["nas.peer.localhost", "web.peer.localhost"] {
        curl(&[
            "-c",
            jar,
            "-b",
            jar,
            "--resolve",
            &format!("{host}:{port}:127.0.0.1"),
            &format!("http://{host}:{port}/login"),
        ]);
    }
    for (host, name) in [("nas.peer.localhost", "nas"), ("web.peer.localhost", "web")] {
        let r = curl(&[
            "-b",
            jar,
            "--resolve",
            &format!("{host}:{port}:127.0.0.1"),
            &format!("http://{host}:{port}/whoami"),
        ]);
        let seen: serde_json::Value = serde_json::from_str(body(&r)).unwrap();
        assert_eq!(seen["Cookie"], format!("session={name}"), "{r}");
    }

    // Keep-alive requests to two services on one client connection, answered in order.
    let both = format!(
        "GET /whoami HTTP/1.1\r\nHost: nas.peer.localhost:{port}\r\n\r\n\
         GET /whoami HTTP/1.1\r\nHost: web.peer.localhost:{port}\r\nConnection: close\r\n\r\n"
    );
    let r = exchange(port, both.as_bytes(), Duration::from_secs(20));
    let nas = r.find("\"name\": \"nas\"").expect(&r);
    let web = r.find("\"name\": \"web\"").expect(&r);
    assert!(nas < web, "{r}");

    // The index lists the peer and links its web services.
    let r = at("localhost", "/");
    assert_eq!(status(&r), 200);
    assert!(
        body(&r).contains(&format!("href=\"http://nas.peer.localhost:{port}/\"")),
        "{r}"
    );
    assert!(body(&r).contains("online"));
    assert!(body(&r).contains("raw (bytes"), "{r}");

    // Errors are pages: an unknown name (with the index), a byte service, a head too large,
    // a malformed request.
    let r = at("nope.localhost", "/");
    assert_eq!(status(&r), 404);
    assert!(body(&r).contains("no peer has a web service named") && body(&r).contains("nas"));
    let r = at("raw.peer.localhost", "/");
    assert_eq!(status(&r), 404, "a byte service is not a web service: {r}");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: nas.peer.localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let r = exchange(port, big.as_bytes(), Duration::from_secs(20));
    assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    let r = exchange(
        port,
        b"BLAH\x01 / HTTP/1.1\r\n\r\n",
        Duration::from_secs(20),
    );
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
}

#[test]
fn an_offline_peer_gets_a_page_naming_it_and_the_others_still_work() {
    if !tools() {
        return;
    }
    let (_nas, nas_port) = device("nas", None);
    // A peer that is not there: a valid id at a port nothing listens on.
    let dead_id = "a".repeat(32);
    let dead = format!("dead={dead_id}@127.0.0.1:{}", free_udp_port());
    let (pair, port) = http_pair(
        &[("nas", &format!("http://127.0.0.1:{nas_port}"))],
        &["--peer", &dead, "--connect-timeout", "2s"],
    );
    let at = |host: &str| {
        curl(&[
            "--resolve",
            &format!("{host}:{port}:127.0.0.1"),
            &format!("http://{host}:{port}/whoami"),
        ])
    };
    let r = at("nas.dead.localhost");
    assert!([502, 504].contains(&status(&r)), "{r}");
    assert!(body(&r).contains("peer dead"), "{r}");
    let r = at("nas.peer.localhost");
    assert_eq!(status(&r), 200, "{r}\n{}", pair.connect.stderr());
    let r = at("localhost");
    assert!(body(&r).contains("offline"), "{r}");
}

/// `tunnel expose` of `services` on a fixed UDP port with a fixed identity, allowing `allow`.
fn expose_on(dir: &TempDir, port: u16, allow: &str, services: &[(&str, &str)]) -> Proc {
    expose_with(dir, port, allow, services, &[])
}

/// [`expose_on`] with more flags.
fn expose_with(
    dir: &TempDir,
    port: u16,
    allow: &str,
    services: &[(&str, &str)],
    extra: &[&str],
) -> Proc {
    let mut cmd = Command::new(tunnel_bin());
    cmd.args([
        "expose",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--allow",
        allow,
    ])
    .args(extra)
    .arg("--identity")
    .arg(dir.path("expose.pem"));
    for (name, target) in services {
        cmd.arg("--service").arg(format!("{name}={target}"));
    }
    let proc = Proc::spawn("tunnel expose", &mut cmd);
    proc.line_matching(|l| l.trim_start().starts_with("tunnel connect "));
    proc
}

#[test]
fn a_service_that_went_away_since_the_last_stream_gets_a_page_not_a_reset() {
    if !tools() {
        return;
    }
    let (_nas, nas_port) = device("nas", None);
    let dir = TempDir::new("gone");
    let udp = free_udp_port();
    let connect_id = peer_id(&dir.path("connect.pem"));
    let nas = format!("http://127.0.0.1:{nas_port}");
    let mut expose = expose_on(&dir, udp, &connect_id, &[("nas", &nas)]);
    let expose_id = peer_id(&dir.path("expose.pem"));
    let (connect, port, _) = connect_http(
        &dir.path("connect.pem"),
        &format!("{expose_id}@127.0.0.1:{udp}"),
        &[],
    );
    let at = || {
        curl(&[
            "--resolve",
            &format!("nas.peer.localhost:{port}:127.0.0.1"),
            &format!("http://nas.peer.localhost:{port}/whoami"),
        ])
    };
    // Twice: the second stream goes out without waiting for its answer (the service is known).
    for _ in 0..2 {
        let r = at();
        assert_eq!(status(&r), 200, "{r}\n{}", connect.stderr());
    }
    // The exposing side comes back without `nas`: the stream sent on what was known is
    // refused, and the browser gets a page saying so; after it, the service is asked afresh.
    expose.signal("TERM");
    expose.wait_exit(Duration::from_secs(10));
    let _expose = expose_on(&dir, udp, &connect_id, &[("web", &nas)]);
    let r = at();
    assert_eq!(status(&r), 404, "{r}\n{}", connect.stderr());
    assert!(
        body(&r).contains("no service named &quot;nas&quot; here; exposed: web"),
        "{r}"
    );
    // Asked afresh: the peer's new catalog says what it has now, on the index.
    let r = at();
    assert_eq!(status(&r), 404, "{r}");
    assert!(
        body(&r).contains("peer peer has no web service named &quot;nas&quot;"),
        "{r}"
    );
    assert!(
        body(&r).contains("href=\"http://web.peer.localhost:"),
        "{r}"
    );
}

#[test]
fn a_peer_at_its_stream_limit_gets_a_503_page_and_the_held_connection_still_works() {
    if !tools() {
        return;
    }
    let (_nas, nas_port) = device("nas", None);
    let dir = TempDir::new("busy");
    let udp = free_udp_port();
    let connect_id = peer_id(&dir.path("connect.pem"));
    let nas = format!("http://127.0.0.1:{nas_port}");
    let _expose = expose_with(
        &dir,
        udp,
        &connect_id,
        &[("nas", &nas)],
        &["--max-streams", "1"],
    );
    let expose_id = peer_id(&dir.path("expose.pem"));
    let (connect, port, _) = connect_http(
        &dir.path("connect.pem"),
        &format!("{expose_id}@127.0.0.1:{udp}"),
        &[],
    );
    // A keep-alive browser connection holds the peer's one stream slot.
    let mut held = TcpStream::connect(("127.0.0.1", port)).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let get = format!("GET /whoami HTTP/1.1\r\nHost: nas.peer.localhost:{port}\r\n\r\n");
    held.write_all(get.as_bytes()).unwrap();
    let answer = whole_json_answer(&mut held);
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    // Another connection is refused by the peer: a page saying so, not a reset.
    let r = curl(&[
        "--resolve",
        &format!("nas.peer.localhost:{port}:127.0.0.1"),
        &format!("http://nas.peer.localhost:{port}/whoami"),
    ]);
    assert_eq!(status(&r), 503, "{r}\n{}", connect.stderr());
    assert!(body(&r).contains("limit of 1 proxied sockets"), "{r}");
    // The held connection goes on.
    held.write_all(get.as_bytes()).unwrap();
    let answer = whole_json_answer(&mut held);
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
}

/// Reads one `/whoami` answer whole (its JSON body ends with `}`).
fn whole_json_answer(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.ends_with(b"}") {
        let n = tcp.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `tunnel expose` run from a rules file (in `dir`, listening on 127.0.0.1 at a free UDP
/// port) whose `[expose.services]` are `services` and whose peers part `write` rewrites (for
/// a SIGHUP).
struct RulesExpose {
    expose: Proc,
    path: std::path::PathBuf,
    head: String,
    /// `ID@127.0.0.1:UDP`, to connect to.
    peer: String,
}

impl RulesExpose {
    fn start(dir: &TempDir, services: &str, peers: &str) -> RulesExpose {
        let udp = free_udp_port();
        let path = dir.path("rules.toml");
        let head = format!("[expose]\nlisten = \"127.0.0.1:{udp}\"\n[expose.services]\n{services}");
        std::fs::write(&path, format!("{head}{peers}")).unwrap();
        let expose = Proc::spawn(
            "tunnel expose",
            Command::new(tunnel_bin())
                .args(["expose", "--config"])
                .arg(&path)
                .arg("--identity")
                .arg(dir.path("expose.pem")),
        );
        expose.line_matching(|l| l.trim_start().starts_with("tunnel connect "));
        let peer = format!("{}@127.0.0.1:{udp}", peer_id(&dir.path("expose.pem")));
        RulesExpose {
            expose,
            path,
            head,
            peer,
        }
    }

    fn write(&self, peers: &str) {
        std::fs::write(&self.path, format!("{}{peers}", self.head)).unwrap();
    }
}

/// `tunnel connect ID@127.0.0.1:UDP --http 127.0.0.1:0` with `identity` and more flags: the
/// process and its `--http` port.
fn connect_http(
    identity: &std::path::Path,
    peer: &str,
    extra: &[&str],
) -> (Proc, u16, Vec<String>) {
    let connect = Proc::spawn(
        "tunnel connect",
        Command::new(tunnel_bin())
            .args(["connect", peer, "--http", "127.0.0.1:0"])
            .args(extra)
            .arg("--identity")
            .arg(identity),
    );
    // Its stdout lines up to the --http one (the --local lines come first).
    let lines = std::cell::RefCell::new(Vec::new());
    let line = connect.line_matching(|l| {
        lines.borrow_mut().push(l.to_owned());
        l.contains("-> http:")
    });
    let lines = lines.into_inner();
    let port = http_port(&line);
    (connect, port, lines)
}

#[test]
fn per_peer_rules_give_each_peer_only_its_services_and_its_own_cap() {
    if !tools() {
        return;
    }
    let (_nas, nas_port) = device("nas", None);
    let (_web, web_port) = device("web", None);
    let dir = TempDir::new("peers");
    let (dad, kid) = (dir.path("dad.pem"), dir.path("kid.pem"));
    let rules = RulesExpose::start(
        &dir,
        &format!("nas = \"http://127.0.0.1:{nas_port}\"\nweb = \"http://127.0.0.1:{web_port}\"\n"),
        &format!(
            "[[expose.peer]]\nid = \"{}\"\nname = \"dad\"\nservices = [\"nas\"]\n\
             [[expose.peer]]\nid = \"{}\"\nname = \"kid\"\nservices = [\"web\"]\nmax_streams = 1\n",
            peer_id(&dad),
            peer_id(&kid)
        ),
    );
    let expose_id = rules.peer.clone();
    let (dad_c, dad_port, dad_lines) = connect_http(
        &dad,
        &expose_id,
        &["--local", "127.0.0.1:0=web", "--local", "127.0.0.1:0=nope"],
    );
    let (_kid_c, kid_port, _) = connect_http(&kid, &expose_id, &[]);
    let at = |port: u16, service: &str| {
        let host = format!("{service}.peer.localhost");
        curl(&[
            "--resolve",
            &format!("{host}:{port}:127.0.0.1"),
            &format!("http://{host}:{port}/whoami"),
        ])
    };
    // Each reaches its own service, and not the other's: the index shows only its own.
    assert_eq!(status(&at(dad_port, "nas")), 200, "{}", dad_c.stderr());
    assert_eq!(status(&at(kid_port, "web")), 200);
    for (port, hidden, own) in [(dad_port, "web", "nas"), (kid_port, "nas", "web")] {
        let r = at(port, hidden);
        assert_eq!(status(&r), 404, "{r}");
        assert!(
            !body(&r).contains(&format!(">{hidden}<")),
            "{hidden} is not listed: {r}"
        );
        assert!(body(&r).contains(&format!(">{own}<")), "{r}");
    }
    // Asked for by name, a hidden service is answered exactly as one that does not exist.
    let local = |service: &str| {
        let line = dad_lines
            .iter()
            .find(|l| l.contains(&format!(" -> {service} on ")))
            .unwrap();
        line.split_whitespace().next().unwrap().to_owned()
    };
    let hidden = curl(&[&format!("http://{}/", local("web"))]);
    let unknown = curl(&[&format!("http://{}/", local("nope"))]);
    assert_eq!(status(&hidden), 404, "{hidden}");
    assert!(
        body(&hidden).contains("no service named &quot;web&quot; here; exposed: nas"),
        "{hidden}"
    );
    assert_eq!(
        body(&hidden).replace("web", "nope"),
        body(&unknown),
        "nothing tells them apart"
    );

    // The kid's cap of one stream: a held connection takes it; the next gets 503; the dad
    // is not limited by it.
    let mut held = TcpStream::connect(("127.0.0.1", kid_port)).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    held.write_all(
        format!("GET /whoami HTTP/1.1\r\nHost: web.peer.localhost:{kid_port}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    assert!(whole_json_answer(&mut held).starts_with("HTTP/1.1 200 OK"));
    let r = at(kid_port, "web");
    assert_eq!(status(&r), 503, "{r}");
    assert!(
        body(&r).contains("this peer is at its limit of 1 proxied sockets here"),
        "{r}"
    );
    assert_eq!(status(&at(dad_port, "nas")), 200);
}

#[test]
fn sighup_reloads_the_rules_granting_and_revoking_and_a_broken_file_keeps_the_old() {
    if !tools() {
        return;
    }
    let (_nas, nas_port) = device("nas", None);
    let (_web, web_port) = device("web", None);
    let dir = TempDir::new("reload");
    let (dad, kid) = (dir.path("dad.pem"), dir.path("kid.pem"));
    let (dad_id, kid_id) = (peer_id(&dad), peer_id(&kid));
    let rules = RulesExpose::start(
        &dir,
        &format!("nas = \"http://127.0.0.1:{nas_port}\"\nweb = \"http://127.0.0.1:{web_port}\"\n"),
        &format!(
            "[[expose.peer]]\nid = \"{dad_id}\"\nservices = [\"nas\"]\n\
             [[expose.peer]]\nid = \"{kid_id}\"\nservices = [\"web\"]\n"
        ),
    );
    let (expose, peer) = (&rules.expose, &rules.peer);
    let (_dad_c, dad_port, _) = connect_http(&dad, peer, &[]);
    let (kid_c, kid_port, _) = connect_http(&kid, peer, &[]);
    let at = |port: u16, service: &str| {
        let host = format!("{service}.peer.localhost");
        curl(&[
            "--resolve",
            &format!("{host}:{port}:127.0.0.1"),
            &format!("http://{host}:{port}/whoami"),
        ])
    };
    assert_eq!(status(&at(dad_port, "nas")), 200);
    assert_eq!(status(&at(dad_port, "web")), 404);
    assert_eq!(status(&at(kid_port, "web")), 200);

    // The dad gets web too; the kid is no longer listed: disconnected with a reason.
    rules.write(&format!(
        "[[expose.peer]]\nid = \"{dad_id}\"\nservices = [\"nas\", \"web\"]\n"
    ));
    expose.signal("HUP");
    expose.wait_log("rules reloaded");
    kid_c.wait_log("access revoked by the rules");
    let r = at(kid_port, "web");
    assert!([502, 504].contains(&status(&r)), "{r}");
    assert!(body(&r).contains("not authorised"), "{r}");
    // A name the dad's catalog did not list a moment ago is looked up again.
    let r = at(dad_port, "web");
    assert_eq!(status(&r), 200, "{r}\n{}", expose.stderr());
    assert_eq!(status(&at(dad_port, "nas")), 200);

    // A broken file is reported with its line, and the rules in force stay.
    std::fs::write(&rules.path, "[expose]\nlisten = 5\n").unwrap();
    expose.signal("HUP");
    expose.wait_log("rules not reloaded, the old ones stay");
    assert!(expose.stderr().contains("line 2"), "{}", expose.stderr());
    assert_eq!(status(&at(dad_port, "web")), 200);
}

/// The connection to the exposing side is lost while a request waits for its answer (here:
/// the device never answers, and the peer's access is revoked meanwhile): the browser gets a
/// page saying why, not a reset connection.
#[test]
fn a_connection_lost_while_a_request_waits_gets_a_page_not_a_reset() {
    if !tools() {
        return;
    }
    // A device that accepts and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for tcp in silent.incoming().flatten() {
            held.push(tcp);
        }
    });
    let dir = TempDir::new("lost");
    let kid = dir.path("kid.pem");
    let kid_id = peer_id(&kid);
    let rules = RulesExpose::start(
        &dir,
        &format!("slow = \"http://127.0.0.1:{silent_port}\"\n"),
        &format!("[[expose.peer]]\nid = \"{kid_id}\"\nservices = [\"slow\"]\n"),
    );
    let (expose, peer) = (&rules.expose, &rules.peer);
    let (kid_c, kid_port, _) = connect_http(&kid, peer, &[]);
    let host = format!("slow.peer.localhost:{kid_port}");
    let mut tcp = TcpStream::connect(("127.0.0.1", kid_port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(tcp, "GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    // The request is on its way to the device (which holds it) before access is revoked.
    expose.wait_stderr_for(WAIT, |log| {
        log.contains("stream open") || log.contains("peer connected")
    });
    std::thread::sleep(Duration::from_millis(300));
    // Another peer only (rules allowing nobody are refused).
    let other_id = peer_id(&dir.path("other.pem"));
    rules.write(&format!(
        "[[expose.peer]]\nid = \"{other_id}\"\nservices = [\"slow\"]\n"
    ));
    expose.signal("HUP");
    expose.wait_log("rules reloaded");
    kid_c.wait_log("access revoked by the rules");
    let mut answer = Vec::new();
    let read = tcp.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        read.is_ok(),
        "the client's connection was reset ({read:?}); it read {answer:?}\n{}",
        kid_c.stderr()
    );
    assert!(
        answer.starts_with("HTTP/1.1 502"),
        "{answer}\n{}",
        kid_c.stderr()
    );
    assert!(answer.contains("access revoked by the rules"), "{answer}");
}
