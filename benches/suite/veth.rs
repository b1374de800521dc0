//! The 1500-byte-MTU path: two network namespaces joined by a veth pair (MTU 1500, what an
//! Ethernet or Wi-Fi link carries; loopback lets QUIC use 64 KB packets, which no WAN path
//! does). The client side (load generator, `tunnel connect`, the peers' client halves) runs in
//! namespace A at 198.51.100.1, the target servers and the exposing halves in namespace B at
//! 198.51.100.2. Neither namespace has a route anywhere else, so dumbpipe runs here as the
//! others do.
//!
//! `run` (as root, from the suite) makes the namespaces and starts this bench binary in A as a
//! worker (`--worker-veth A B`), which runs the rounds and prints its results as one JSON
//! line; the namespaces and every process in them go when `Lab` drops, also on failure.

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::process::{command_in, Proc};
use crate::{env_num, factories, medians, run_rounds, Place, GIB};

const CLIENT_IP: [u8; 4] = [198, 51, 100, 1];
const SERVER_IP: [u8; 4] = [198, 51, 100, 2];
const MTU: &str = "1500";

/// A network namespace with only `lo` up, made by the suite; on drop every process in it is
/// killed and it is deleted (also when the suite fails).
pub struct Netns(pub String);

impl Netns {
    pub fn add(name: String) -> Option<Netns> {
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]).then_some(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(o) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        ip(&["netns", "del", &self.0]);
    }
}

/// Two namespaces and the veth pair between them (it goes with them).
struct Lab {
    a: Netns,
    b: Netns,
}

/// `ip ARGS`, and whether it succeeded.
pub fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl Lab {
    fn new() -> Option<Lab> {
        let tag = std::process::id();
        let made = Netns::add(format!("tbva{tag}"))
            .zip(Netns::add(format!("tbvb{tag}")))
            .map(|(a, b)| Lab { a, b });
        let (va, vb) = (format!("tva{tag}"), format!("tvb{tag}"));
        let lab = made.filter(|lab| {
            let (a, b) = (&lab.a.0, &lab.b.0);
            ip(&[
                "link", "add", &va, "netns", a, "type", "veth", "peer", "name", &vb, "netns", b,
            ]) && ip(&["-n", a, "addr", "add", "198.51.100.1/24", "dev", &va])
                && ip(&["-n", b, "addr", "add", "198.51.100.2/24", "dev", &vb])
                && ip(&["-n", a, "link", "set", &va, "mtu", MTU, "up"])
                && ip(&["-n", b, "link", "set", &vb, "mtu", MTU, "up"])
        });
        if lab.is_none() {
            eprintln!("veth: cannot make two network namespaces (not root?): skipped");
        }
        lab
    }
}

/// The veth rounds: `{ "raw": …, "median": …, "mtu": 1500 }`, or null when the namespaces
/// cannot be made.
pub fn run() -> Value {
    let Some(lab) = Lab::new() else {
        return Value::Null;
    };
    eprintln!(
        "veth: 1500-byte MTU path between namespaces {} and {}",
        lab.a.0, lab.b.0
    );
    // Bounded: a stalled transfer must not hold the suite (and the namespaces) forever.
    let out = run_worker(3600, &lab.a.0, &["--worker-veth", &lab.a.0, &lab.b.0]);
    drop(lab);
    out.unwrap_or_else(|| {
        eprintln!("veth: the worker gave no results");
        Value::Null
    })
}

/// This bench binary with `args` in namespace `ns`, killed after `limit_s` seconds: the JSON
/// objects it printed, one per line, merged (what it printed before a failure is kept), or
/// None if it printed none.
pub fn run_worker(limit_s: u64, ns: &str, args: &[&str]) -> Option<Value> {
    let out = Command::new("timeout")
        .arg(limit_s.to_string())
        .args(["ip", "netns", "exec", ns])
        .arg(std::env::current_exe().unwrap())
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
    let mut merged = serde_json::Map::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(line) {
            merged.extend(m);
        }
    }
    (!merged.is_empty()).then_some(Value::Object(merged))
}

/// The target servers (bulk, greeting) in namespace `ns` on `ip`: their process and
/// addresses.
pub fn targets_in(ns: &str, ip: IpAddr) -> (Proc, Vec<SocketAddr>) {
    let exe = std::env::current_exe().unwrap();
    let targets = Proc::spawn(
        "target servers",
        command_in(Some(ns), exe.to_str().unwrap()).args(["--serve-targets", &ip.to_string()]),
    );
    let line = targets.line_matching(|l| l.starts_with("targets "));
    let addrs = line
        .split_whitespace()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    (targets, addrs)
}

/// In namespace A: the target servers in B, then every system's rounds.
pub async fn worker(_a: &str, b: &str) {
    let rounds = env_num("BENCH_ROUNDS", 3) as usize;
    let size = env_num("BENCH_BYTES", GIB);
    let (_targets, addrs) = targets_in(b, IpAddr::from(SERVER_IP));
    let place = Place {
        server_netns: Some(b.to_owned()),
        server_ip: IpAddr::from(SERVER_IP),
        client_ip: IpAddr::from(CLIENT_IP),
    };
    let factories = factories(&place, addrs[0], addrs[1]);
    let results = run_rounds(&place, &factories, rounds, size, None).await;
    println!(
        "{}",
        json!({ "mtu": 1500, "raw": results, "median": medians(&results) })
    );
    let media = if env_num("BENCH_MEDIA", 1) == 1 && crate::wanted("tunnel") {
        let p = place.clone();
        crate::media_under_load(&place, addrs[0], move |b, g| {
            crate::tunnel_of(crate::process::tunnel_bin(), "tunnel", &p, b, g)
        })
        .await
    } else {
        Value::Null
    };
    println!("{}", json!({ "media": media }));
}
