//! The `tunnel` binary: expose and connect as two processes, exit codes and messages.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::process::*;
use common::{random_bytes, sha256};

/// A minimal HTTP/1.1 server on a thread: answers every request with `body`, then closes.
fn http_server(body: Vec<u8>) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = std::thread::spawn(move || {
        // Serves a bounded number of requests, then ends by itself.
        for stream in listener.incoming().take(4) {
            let Ok(mut tcp) = stream else { return };
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match tcp.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = tcp.write_all(head.as_bytes());
            let _ = tcp.write_all(&body);
        }
    });
    (addr, handle)
}

fn http_get(addr: &str) -> (String, Vec<u8>) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.write_all(b"GET /file HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = Vec::new();
    tcp.read_to_end(&mut resp).unwrap();
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header");
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    (head, resp[split + 4..].to_vec())
}

#[test]
fn an_http_fetch_crosses_expose_and_connect_processes() {
    let body = random_bytes(2 << 20);
    let (target, _server) = http_server(body.clone());
    let pair = start_pair(&[("web", &target)], &[]);
    for _ in 0..2 {
        let (head, got) = http_get(&pair.locals[0]);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(sha256(&got), sha256(&body));
    }
}

#[test]
fn sigterm_drains_and_exits_promptly() {
    let (target, _server) = http_server(b"ok".to_vec());
    let mut pair = start_pair(&[("web", &target)], &[]);
    let (_, got) = http_get(&pair.locals[0]);
    assert_eq!(got, b"ok");
    pair.connect.signal("TERM");
    assert_eq!(
        pair.connect.wait_exit(Duration::from_secs(5)),
        Some(0),
        "{}",
        pair.connect.stderr()
    );
    pair.expose.signal("TERM");
    assert_eq!(
        pair.expose.wait_exit(Duration::from_secs(5)),
        Some(0),
        "{}",
        pair.expose.stderr()
    );
    assert!(pair.expose.stderr().contains("shutting down"));
}

#[test]
fn the_expose_banner_gives_the_exact_connect_command() {
    let dir = TempDir::new("banner");
    let allowed = peer_id(&dir.path("other.pem"));
    let own = peer_id(&dir.path("me.pem"));
    let expose = Proc::spawn(
        "tunnel expose",
        Command::new(tunnel_bin())
            .args(["expose", "--listen", "127.0.0.1:0", "--allow", &allowed])
            .args([
                "--service",
                "cam=127.0.0.1:554",
                "--service",
                "web=127.0.0.1:8080",
            ])
            .arg("--identity")
            .arg(dir.path("me.pem")),
    );
    let id_line = expose.line_matching(|l| l.starts_with("peer id: "));
    assert_eq!(id_line, format!("peer id: {own}"));
    let cmd = expose.line_matching(|l| l.trim_start().starts_with("tunnel connect "));
    assert!(cmd.contains(&format!("{own}@127.0.0.1:")), "{cmd}");
    assert!(cmd.contains("--local 127.0.0.1:8554=cam"), "{cmd}");
    assert!(cmd.contains("--local 127.0.0.1:8080=web"), "{cmd}");
}

#[test]
fn the_identity_is_created_once_and_kept() {
    let dir = TempDir::new("id");
    let path = dir.path("nested/identity.pem");
    let first = peer_id(&path);
    assert_eq!(first.len(), 32);
    assert_eq!(peer_id(&path), first);
}

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(tunnel_bin()).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_rules_file_names_file_line_and_key_and_exits_2() {
    let dir = TempDir::new("badcfg");
    let file = dir.path("rules.toml");
    std::fs::write(
        &file,
        "[expose]\nlisten = \"0.0.0.0:4433\"\nservise = { cam = \"127.0.0.1:554\" }\n",
    )
    .unwrap();
    let identity = dir.path("id.pem");
    let (code, err) = run(&[
        "expose",
        "--config",
        file.to_str().unwrap(),
        "--identity",
        identity.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(file.to_str().unwrap()),
        "names the file: {err}"
    );
    assert!(err.contains("line 3"), "names the line: {err}");
    assert!(err.contains("servise"), "names the key: {err}");

    std::fs::write(&file, "[expose.services]\ncam = \"127.0.0.1\"\n").unwrap();
    let (code, err) = run(&[
        "expose",
        "--config",
        file.to_str().unwrap(),
        "--identity",
        identity.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("line 2") && err.contains("HOST:PORT"), "{err}");
}

#[test]
fn missing_pieces_say_what_to_add() {
    let dir = TempDir::new("usage");
    let identity = dir.path("id.pem");
    let id = identity.to_str().unwrap();
    let (code, err) = run(&["expose", "--identity", id, "--service", "cam=127.0.0.1:554"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--allow"), "{err}");
    let (code, err) = run(&["expose", "--identity", id, "--allow-any"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--service"), "{err}");
    let (code, err) = run(&["connect", "--identity", id, "--local", "127.0.0.1:0=cam"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("PEER_ID@HOST:PORT") && err.contains("--rendezvous"),
        "{err}"
    );
    let (code, err) = run(&["connect", "nonsense", "--identity", id]);
    assert_eq!(code, Some(2), "clap rejects a bad peer: {err}");
    assert!(err.contains("<peer-id>@<host:port>"), "{err}");
    let bare = "a".repeat(32);
    let (code, err) = run(&[
        "connect",
        &bare,
        "--identity",
        id,
        "--local",
        "127.0.0.1:0=cam",
    ]);
    assert_eq!(code, Some(2), "a bare id needs a rendezvous: {err}");
    assert!(err.contains("--rendezvous"), "{err}");
    let (code, err) = run(&["expose", "--bogus-flag"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, err) = run(&["expose", "--congestion", "reno"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("bbr") && err.contains("cubic"),
        "names the choices: {err}"
    );
}

#[test]
fn a_local_port_in_use_is_reported_with_the_fix() {
    let dir = TempDir::new("inuse");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let peer = format!("{}@127.0.0.1:9", "a".repeat(32));
    let (code, err) = run(&[
        "connect",
        &peer,
        "--identity",
        dir.path("id.pem").to_str().unwrap(),
        "--local",
        &format!("{addr}=cam"),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&addr.to_string()) && err.contains("--local"),
        "{err}"
    );
}

#[test]
fn a_peer_rule_naming_a_service_not_exposed_is_refused_with_what_is() {
    let dir = TempDir::new("peerrule");
    let file = dir.path("rules.toml");
    let id = "a".repeat(32);
    std::fs::write(
        &file,
        format!(
            "[expose]\nlisten = \"127.0.0.1:0\"\n[expose.services]\ncam = \"127.0.0.1:554\"\n\
             [[expose.peer]]\nid = \"{id}\"\nname = \"dad\"\nservices = [\"nas\"]\n"
        ),
    )
    .unwrap();
    let identity = dir.path("id.pem");
    let (code, err) = run(&[
        "expose",
        "--config",
        file.to_str().unwrap(),
        "--identity",
        identity.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("[[expose.peer]] dad")
            && err.contains("service nas is not exposed here; exposed: cam"),
        "{err}"
    );
    std::fs::write(
        &file,
        format!(
            "[expose.services]\ncam = \"127.0.0.1:554\"\n[[expose.peer]]\nid = \"{id}\"\nservises = [\"cam\"]\n"
        ),
    )
    .unwrap();
    let (code, err) = run(&[
        "expose",
        "--config",
        file.to_str().unwrap(),
        "--identity",
        identity.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("line 5") && err.contains("servises"), "{err}");
}

#[test]
fn rendezvous_limits_that_cannot_work_are_refused_with_the_fix() {
    let dir = TempDir::new("rzflags");
    let id = dir.path("id.pem");
    let id = id.to_str().unwrap();
    let base = ["rendezvous", "--listen", "127.0.0.1:0", "--identity", id];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        run(&args)
    };
    let (code, err) = with(&["--register-rate", "60"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("N/s, N/min or N/h"), "{err}");
    let (code, err) = with(&["--relay-rate", "100Mbps"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("100Mbit/s"), "{err}");
    let (code, err) = with(&["--max-peers-per-ip", "0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("at least 1"), "{err}");
    let (code, err) = with(&["--relay-idle", "0s"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--no-relay"), "{err}");
    // An allow file that does not exist, or holds a bad id, is named with its line.
    let (code, err) = with(&["--allow-file", dir.path("nope").to_str().unwrap()]);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("nope"), "{err}");
    let bad = dir.path("allowed");
    std::fs::write(&bad, "# ids\nnot-an-id\n").unwrap();
    let (code, err) = with(&["--allow-file", bad.to_str().unwrap()]);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("line 2") && err.contains("allowed"), "{err}");
    // The same limits in the rules file: an unknown key is named.
    let rules = dir.path("rules.toml");
    std::fs::write(&rules, "[rendezvous_server]\nmax_peer = 5\n").unwrap();
    let (code, err) = with(&["--config", rules.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("max_peer") && err.contains("line 2"), "{err}");
}

#[test]
fn json_logs_are_one_object_per_line_with_the_span_fields() {
    let dir = TempDir::new("jsonlog");
    let id = dir.path("id.pem");
    let expose = Proc::spawn(
        "expose",
        Command::new(tunnel_bin())
            .args(["--log-format", "json", "expose", "--listen", "127.0.0.1:0"])
            .args(["--allow-any", "--service", "web=127.0.0.1:9", "--identity"])
            .arg(&id),
    );
    expose.line_matching(|l| l.trim_start().starts_with("tunnel connect "));
    expose.wait_log("control socket");
    let log = expose.stderr();
    let mut lines = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        lines += 1;
    }
    assert!(lines >= 3, "{log}");
    assert!(
        log.contains("\"message\":\"created a new identity\""),
        "{log}"
    );
    // The environment chooses it too, and a wrong name is a usage error naming the choices.
    let out = Command::new(tunnel_bin())
        .env("TUNNEL_LOG_FORMAT", "xml")
        .args(["id", "--identity"])
        .arg(&id)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("text") && err.contains("json"), "{err}");
}
