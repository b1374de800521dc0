//! What the churn and chaos tests read about a running `tunnel` process, and the little
//! they run around it:
//! - [`Figures`]: its open descriptors, UDP sockets, threads and RSS (from /proc) and the
//!   counters it logs on SIGUSR1 ([`counters`]), with bounded waits for them to settle;
//! - blocking target servers on 127.0.0.1:0 (an echo, a paced download);
//! - [`Netns`]: throwaway network namespaces, deleted (with their processes) on drop.
//!
//! Declared with `#[path]` from the test files, beside `mod common;`.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::process::Proc;

/// How long a figure may take to come back to its baseline once the load is gone.
pub const SETTLE: Duration = Duration::from_secs(20);

/// The `key=value` pairs of one SIGUSR1 `counters` line.
pub type Counters = HashMap<String, u64>;

/// Sends SIGUSR1 and returns the `counters` line it answers with (waits at most 10 s).
pub fn counters(proc: &Proc) -> Counters {
    let seen = proc.stderr().matches(" counters ").count();
    proc.signal("USR1");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = proc.stderr();
        if log.matches(" counters ").count() > seen {
            let line = log.lines().rfind(|l| l.contains(" counters ")).unwrap();
            return line
                .split(" counters ")
                .nth(1)
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "{}: no counters line after SIGUSR1:\n{}",
            proc.name,
            tail(&log)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One counter (0 when the line does not have it).
pub fn get(c: &Counters, key: &str) -> u64 {
    c.get(key).copied().unwrap_or(0)
}

/// Polls the counters until `idle` holds for them (at most [`SETTLE`]); the last ones read.
pub fn settle(proc: &Proc, what: &str, idle: impl Fn(&Counters) -> bool) -> Counters {
    let deadline = Instant::now() + SETTLE;
    loop {
        let c = counters(proc);
        if idle(&c) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {what} never settled: {c:?}\n{}",
            proc.name,
            tail(&proc.stderr())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Idle: no connection and no stream (what expose and connect hold between clients).
pub fn no_connections(c: &Counters) -> bool {
    get(c, "connections") == 0 && get(c, "streams") == 0
}

/// The last lines of a log, for failure messages.
pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// What a process holds at one moment.
#[derive(Debug, Clone)]
pub struct Figures {
    pub fds: usize,
    pub udp_sockets: usize,
    pub threads: usize,
    pub rss_kib: u64,
    pub counters: Counters,
}

/// Reads `proc`'s figures: /proc first, then the counters.
pub fn figures(proc: &Proc) -> Figures {
    let pid = proc.pid();
    let inodes: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("{}: /proc/{pid}/fd: {e}", proc.name))
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|target| {
            let t = target.to_string_lossy();
            t.strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        })
        .collect();
    // The namespace's UDP sockets (of every process in it): ours are those we hold an fd of.
    let mut udp: HashSet<u64> = HashSet::new();
    for table in ["udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            if let Some(inode) = line.split_whitespace().nth(9).and_then(|n| n.parse().ok()) {
                udp.insert(inode);
            }
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Figures {
        fds: inodes.len(),
        udp_sockets: inodes.iter().filter(|i| udp.contains(i)).count(),
        threads: field("Threads:") as usize,
        rss_kib: field("VmRSS:"),
        counters: counters(proc),
    }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = |k| get(&self.counters, k);
        write!(
            f,
            "fds={} udp={} threads={} rss={}KiB tasks={} connections={} streams={} \
             rtsp_sessions={} media_flows={} relays={} rendezvous_peers={} \
             connections_opened={} streams_opened={}",
            self.fds,
            self.udp_sockets,
            self.threads,
            self.rss_kib,
            c("tasks"),
            c("connections"),
            c("streams"),
            c("rtsp_sessions"),
            c("media_flows"),
            c("relays"),
            c("rendezvous_peers"),
            c("connections_opened"),
            c("streams_opened"),
        )
    }
}

/// How much a figure may grow across a churn run, and why it may grow at all.
pub struct Bounds {
    /// Descriptors and UDP sockets: an epoll or timer fd made lazily, a socket in its close.
    pub fds: usize,
    /// Tokio tasks: a supervisor task that outlives one cycle by a poll (one per role).
    pub tasks: u64,
    /// Threads: tokio's blocking pool grows and shrinks on its own (name lookups, file reads).
    pub threads: usize,
    /// RSS from a quarter into the run to its end: the allocator keeps freed pages, but a
    /// leak of 11 KiB per cycle over 750 cycles shows.
    pub rss_kib: u64,
}

pub const BOUNDS: Bounds = Bounds {
    fds: 2,
    tasks: 2,
    threads: 8,
    rss_kib: 8 * 1024,
};

/// Resident memory of `proc` now, KiB.
pub fn rss_kib(proc: &Proc) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", proc.pid()))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Prints both figures of `name` and checks the after against the before: descriptors and
/// UDP sockets within `BOUNDS.fds`, tasks within `BOUNDS.tasks`, threads within
/// `BOUNDS.threads`, and every gauge in `zero` at 0. RSS is judged against `warm_rss`, read a
/// quarter into the run: after one warm-up cycle it still climbs to a plateau (the
/// allocator keeps the high-water mark of the connections that were closing at once, and
/// quinn keeps a closed connection draining for 3 PTOs), which is no leak; what grows after
/// the plateau is. Both growths are printed.
pub fn assert_no_growth(
    name: &str,
    before: &Figures,
    warm_rss: u64,
    after: &Figures,
    zero: &[&str],
) {
    println!("{name} before: {before}");
    println!("{name} after:  {after}");
    let grew = |a: u64, b: u64| a as i64 - b as i64;
    println!(
        "{name} rss: {:+} KiB since the warm-up cycle, {:+} KiB since a quarter of the run",
        grew(after.rss_kib, before.rss_kib),
        grew(after.rss_kib, warm_rss)
    );
    let mut wrong = Vec::new();
    if after.fds > before.fds + BOUNDS.fds {
        wrong.push(format!("fds {} -> {}", before.fds, after.fds));
    }
    if after.udp_sockets > before.udp_sockets + BOUNDS.fds {
        wrong.push(format!(
            "udp sockets {} -> {}",
            before.udp_sockets, after.udp_sockets
        ));
    }
    if after.threads > before.threads + BOUNDS.threads {
        wrong.push(format!("threads {} -> {}", before.threads, after.threads));
    }
    if grew(after.rss_kib, warm_rss) > BOUNDS.rss_kib as i64 {
        wrong.push(format!(
            "rss {warm_rss} KiB (a quarter into the run) -> {} KiB",
            after.rss_kib
        ));
    }
    let (tb, ta) = (
        get(&before.counters, "tasks"),
        get(&after.counters, "tasks"),
    );
    if ta > tb + BOUNDS.tasks {
        wrong.push(format!("tasks {tb} -> {ta}"));
    }
    for gauge in zero {
        if get(&after.counters, gauge) != 0 {
            wrong.push(format!(
                "{gauge} = {} when idle",
                get(&after.counters, gauge)
            ));
        }
    }
    assert!(wrong.is_empty(), "{name} grew: {}", wrong.join("; "));
}

/// Reads the figures until the descriptors and tasks are back within bounds of `before` and
/// the gauges in `zero` are 0 (closes finish a moment after the last client), at most
/// [`SETTLE`]; the last figures read, which [`assert_no_growth`] then judges.
pub fn settled_figures(proc: &Proc, before: &Figures, zero: &[&str]) -> Figures {
    let deadline = Instant::now() + SETTLE;
    loop {
        let f = figures(proc);
        let ok = f.fds <= before.fds + BOUNDS.fds
            && f.udp_sockets <= before.udp_sockets + BOUNDS.fds
            && get(&f.counters, "tasks") <= get(&before.counters, "tasks") + BOUNDS.tasks
            && zero.iter().all(|g| get(&f.counters, g) == 0);
        if ok || Instant::now() >= deadline {
            return f;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The churn scale: `TUNNEL_CHURN_SCALE` (a float; 1.0 = the full counts), default 0.1.
pub fn scale() -> f64 {
    std::env::var("TUNNEL_CHURN_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| *s > 0.0)
        .unwrap_or(0.1)
}

/// `full` cycles at the scale, at least `min`.
pub fn cycles(full: usize, min: usize) -> usize {
    ((full as f64 * scale()).round() as usize).max(min)
}

/// A blocking TCP server on 127.0.0.1:0, a thread per connection; counts its live
/// connections; stops accepting when dropped.
pub struct Target {
    pub addr: SocketAddr,
    pub live: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

impl Target {
    pub fn serve(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let live = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (live.clone(), stop.clone());
        let handler = Arc::new(handler);
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(tcp) = tcp else { continue };
                let (l, h) = (l.clone(), handler.clone());
                l.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    h(tcp);
                    l.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Target { addr, live, stop }
    }

    /// Echoes every byte; answers the client's FIN with its own.
    pub fn echo() -> Target {
        Target::serve(|mut tcp| {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match tcp.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tcp.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = tcp.shutdown(std::net::Shutdown::Write);
        })
    }

    /// Sends `total` bytes of [`pattern`], `chunk` at a time every `every`, then closes:
    /// a download that takes about `total / chunk * every`.
    pub fn paced(total: usize, chunk: usize, every: Duration) -> Target {
        Target::serve(move |mut tcp| {
            let mut sent = 0;
            while sent < total {
                let n = chunk.min(total - sent);
                if tcp.write_all(&pattern(sent, n)).is_err() {
                    return;
                }
                sent += n;
                std::thread::sleep(every);
            }
        })
    }

    /// Waits (at most [`SETTLE`]) until no connection to this target is open.
    pub fn wait_idle(&self) {
        let deadline = Instant::now() + SETTLE;
        while self.live.load(Ordering::SeqCst) != 0 {
            assert!(
                Instant::now() < deadline,
                "{} target connections still open",
                self.live.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Bytes `offset..offset + n` of an endless, position-dependent pattern (so a lost, doubled
/// or reordered chunk shows in a comparison).
pub fn pattern(offset: usize, n: usize) -> Vec<u8> {
    (offset..offset + n)
        .map(|i| (i as u64).wrapping_mul(2_654_435_761).rotate_right(13) as u8)
        .collect()
}

/// Sends `data` through `addr` (to an echo target), half-closes, and checks the echo and the
/// FIN; bounded by a 20 s socket timeout.
pub fn echo_cycle(addr: &str, data: &[u8]) -> Result<(), String> {
    let mut tcp = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    tcp.write_all(data).map_err(|e| format!("write: {e}"))?;
    tcp.shutdown(std::net::Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut got = Vec::with_capacity(data.len());
    tcp.read_to_end(&mut got)
        .map_err(|e| format!("read after {} bytes: {e}", got.len()))?;
    if got != data {
        return Err(format!(
            "echoed {} of {} bytes, or wrong",
            got.len(),
            data.len()
        ));
    }
    Ok(())
}

/// Whether this machine can make network namespaces (root, `ip`, and `nft` when asked for):
/// false (said loudly) when not, except under TUNNEL_REQUIRE_TOOLS=1 (CI), where it fails.
pub fn can_make_namespaces(with_nft: bool) -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let tools =
        crate::common::process::have("ip") && (!with_nft || crate::common::process::have("nft"));
    if root && tools {
        return true;
    }
    assert_ne!(
        std::env::var("TUNNEL_REQUIRE_TOOLS").as_deref(),
        Ok("1"),
        "this test needs root, iproute2 and nftables (TUNNEL_REQUIRE_TOOLS=1)"
    );
    eprintln!("SKIPPED: this test needs root, iproute2 and nftables to make network namespaces");
    false
}

/// Network namespaces `<tag>-<name>`, made on demand; on drop every process in them is
/// killed and each is deleted, also when the test failed. Only 198.51.100.0/24 and
/// 203.0.113.0/24 addresses go in them.
pub struct Netns {
    pub tag: String,
    made: Vec<String>,
}

impl Netns {
    /// `tag` gets this test process's pid appended, so parallel runs do not collide.
    pub fn new(tag: &str) -> Netns {
        Netns {
            tag: format!("{tag}{}", std::process::id() % 100_000),
            made: Vec::new(),
        }
    }

    pub fn name(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    /// A namespace with only `lo`, up.
    pub fn add(&mut self, name: &str) -> String {
        let ns = self.name(name);
        ip(&["netns", "add", &ns]);
        self.made.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// Namespaces `a` and `b` joined by a veth pair with addresses `addr_a` and `addr_b`
    /// (CIDR, from the documentation ranges).
    pub fn pair(&mut self, a: &str, addr_a: &str, b: &str, addr_b: &str) {
        let (na, nb) = (self.add(a), self.add(b));
        let (va, vb) = (format!("{}{a}", self.tag), format!("{}{b}", self.tag));
        ip(&[
            "link", "add", &va, "netns", &na, "type", "veth", "peer", "name", &vb, "netns", &nb,
        ]);
        for (ns, dev, addr) in [(&na, &va, addr_a), (&nb, &vb, addr_b)] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
    }

    /// `program` run inside namespace `name`, without colours in its logs.
    pub fn cmd(&self, name: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name(name), program]);
        c.env("NO_COLOR", "1");
        c
    }

    /// Runs `nft -f -` with `script` in namespace `name`.
    pub fn nft(&self, name: &str, script: &str) {
        let mut child = self
            .cmd(name, "nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "nft in {name}: {script}");
    }

    /// The packet count of the nft counter named `counter` in table `inet <table>`.
    pub fn nft_packets(&self, name: &str, table: &str, counter: &str) -> u64 {
        let out = self
            .cmd(name, "nft")
            .args(["list", "counter", "inet", table, counter])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.split("packets ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no counter {counter}: {text}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            let pids = Command::new("ip").args(["netns", "pids", ns]).output();
            if let Ok(out) = pids {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
