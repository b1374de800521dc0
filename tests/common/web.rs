//! Shared by the web tests (tests/http.rs, tests/browser.rs): the device fixture, the
//! `--http` pair, and curl with its answer read apart.

use std::path::Path;
use std::process::Command;

use super::process::*;

pub const PYTHON: &str = "/usr/bin/python3";

/// A device web UI (tests/fixtures/http_device.py) on a free port: `(process, port)`.
pub fn device(name: &str, tls: Option<(&Path, &Path)>) -> (Proc, u16) {
    let port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/http_device.py");
    let mut cmd = Command::new(PYTHON);
    cmd.arg(script).arg(port.to_string()).arg(name);
    if let Some((cert, key)) = tls {
        cmd.arg("--tls").arg(cert).arg(key);
    }
    let proc = Proc::spawn(name, &mut cmd);
    proc.line_matching(|l| l.starts_with("ready"));
    (proc, port)
}

/// `tunnel connect --http 127.0.0.1:0` (and `extra`) next to one `expose` of `services`: the
/// process pair and the `--http` port.
pub fn http_pair(services: &[(&str, &str)], extra: &[&str]) -> (TunnelPair, u16) {
    let mut args = vec!["--http", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let pair = start_pair(services, &args);
    let line = pair.connect.line_matching(|l| l.contains("-> http:"));
    let port = http_port(&line);
    (pair, port)
}

/// The port of connect's `ADDR -> http: ...` line.
pub fn http_port(line: &str) -> u16 {
    line.split_whitespace()
        .next()
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"))
}

/// curl's status line and headers (`-D -`) and body for `args`.
pub fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "-D", "-"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

pub fn status(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

pub fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}
