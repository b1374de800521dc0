//! The benchmark suite: `tunnel` side by side with direct TCP and peer tunnels on loopback.
//! Not a test, not run by CI. Run it with `bench/run.sh` (installs the peers, then runs
//! `cargo bench --bench suite` and draws the charts). Writes docs/bench/report.{md,json}.
//!
//! Every figure is measured in the same run as its baseline (direct TCP), the systems
//! alternate within each round, and each figure is the median of the rounds.

#[path = "../tests/common/process.rs"]
#[allow(dead_code)]
mod process;
#[path = "suite/quinn_probe.rs"]
mod quinn_probe;
#[path = "suite/veth.rs"]
mod veth;
#[path = "suite/wan.rs"]
mod wan;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use process::{command_in, free_port, start_pair_at, tunnel_bin, wait_connectable, Proc, TempDir};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GIB: u64 = 1 << 30;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One system under test: the address clients use for the bulk/echo service and for the
/// greeting service, and the processes that make it (killed on drop).
struct System {
    name: String,
    bulk: SocketAddr,
    greet: SocketAddr,
    /// Processes of the tunnel itself (for memory and CPU), with their role.
    pids: Vec<(String, u32)>,
    _procs: Vec<Proc>,
    _dir: Option<TempDir>,
}

impl System {
    /// The pids of its own processes.
    fn pids(&self) -> Vec<u32> {
        self.pids.iter().map(|(_, p)| *p).collect()
    }
}

/// Where a system's two sides run: the side next to the target servers in network namespace
/// `server_netns` (or here) at `server_ip`, the side next to the clients here at `client_ip`.
/// On loopback both are 127.0.0.1 here; on the veth path (`veth.rs`) two namespaces.
#[derive(Clone)]
struct Place {
    server_netns: Option<String>,
    server_ip: IpAddr,
    client_ip: IpAddr,
}

impl Place {
    fn loopback() -> Place {
        let lo = IpAddr::from([127, 0, 0, 1]);
        Place {
            server_netns: None,
            server_ip: lo,
            client_ip: lo,
        }
    }

    fn ns(&self) -> Option<&str> {
        self.server_netns.as_deref()
    }

    /// `program` on the servers' side.
    fn server_cmd(&self, program: &str) -> Command {
        command_in(self.ns(), program)
    }
}

/// Target servers in this process on `ip`: `bulk` (first byte U = sink and report, D + u64 =
/// send that many bytes, E = echo) and `greet` (says hello at once, then holds the connection).
async fn start_targets(ip: IpAddr) -> (SocketAddr, SocketAddr) {
    let bulk = TcpListener::bind((ip, 0)).await.unwrap();
    let greet = TcpListener::bind((ip, 0)).await.unwrap();
    let (b, g) = (bulk.local_addr().unwrap(), greet.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = bulk.accept().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let mut op = [0u8; 1];
                if tcp.read_exact(&mut op).await.is_err() {
                    return;
                }
                match op[0] {
                    b'U' => {
                        let mut buf = vec![0u8; 256 * 1024];
                        let mut n = 0u64;
                        while let Ok(k) = tcp.read(&mut buf).await {
                            if k == 0 {
                                break;
                            }
                            n += k as u64;
                        }
                        let _ = tcp.write_all(&n.to_be_bytes()).await;
                    }
                    b'D' => {
                        let mut len = [0u8; 8];
                        if tcp.read_exact(&mut len).await.is_err() {
                            return;
                        }
                        let mut left = u64::from_be_bytes(len);
                        let buf = vec![0x5au8; 256 * 1024];
                        while left > 0 {
                            let k = left.min(buf.len() as u64) as usize;
                            if tcp.write_all(&buf[..k]).await.is_err() {
                                return;
                            }
                            left -= k as u64;
                        }
                        let _ = tcp.shutdown().await;
                    }
                    _ => {
                        let (mut r, mut w) = tcp.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                }
            });
        }
    });
    tokio::spawn(serve_greet(greet));
    (b, g)
}

/// The greeting service: says hello at once, then holds the connection until the client ends.
async fn serve_greet(greet: TcpListener) {
    {
        loop {
            let Ok((mut tcp, _)) = greet.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                if tcp.write_all(b"hello\n").await.is_ok() {
                    let mut sink = [0u8; 64];
                    while let Ok(n) = tcp.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                }
            });
        }
    }
}

fn direct(bulk: SocketAddr, greet: SocketAddr) -> System {
    System {
        name: "direct TCP".into(),
        bulk,
        greet,
        pids: vec![],
        _procs: vec![],
        _dir: None,
    }
}

fn tunnel(bulk: SocketAddr, greet: SocketAddr) -> System {
    tunnel_of(tunnel_bin(), "tunnel", &Place::loopback(), bulk, greet)
}

/// Another build of the tunnel (`BENCH_BASELINE_BIN`, e.g. the last commit before a refactor),
/// measured in the same rounds, so a change is judged against its own same-run baseline.
fn tunnel_baseline(place: &Place, bulk: SocketAddr, greet: SocketAddr) -> Option<System> {
    let bin = std::env::var("BENCH_BASELINE_BIN").ok()?;
    let label = std::env::var("BENCH_BASELINE_LABEL").unwrap_or_else(|_| "baseline".into());
    Some(tunnel_of(
        &bin,
        &format!("tunnel ({label})"),
        place,
        bulk,
        greet,
    ))
}

fn tunnel_of(bin: &str, name: &str, place: &Place, bulk: SocketAddr, greet: SocketAddr) -> System {
    let pair = start_pair_at(
        bin,
        place.ns(),
        &SocketAddr::new(place.server_ip, 0).to_string(),
        &[("bulk", &bulk.to_string()), ("greet", &greet.to_string())],
        &["--eager"],
    );
    let pids = vec![
        ("expose".into(), pair.expose.pid()),
        ("connect".into(), pair.connect.pid()),
    ];
    System {
        name: name.into(),
        bulk: pair.locals[0].parse().unwrap(),
        greet: pair.locals[1].parse().unwrap(),
        pids,
        _procs: vec![pair.expose, pair.connect],
        _dir: Some(pair.dir),
    }
}

fn bore(place: &Place, bulk: SocketAddr, greet: SocketAddr) -> Option<System> {
    if !process::have("bore") {
        return None;
    }
    let client_ip = place.client_ip.to_string();
    let server = Proc::spawn(
        "bore server",
        Command::new("bore").args([
            "server",
            "--bind-addr",
            &client_ip,
            "--min-port",
            "20000",
            "--max-port",
            "40000",
        ]),
    );
    wait_connectable(&format!("{client_ip}:7835"));
    let mut procs = vec![];
    let mut pids = vec![("server".to_string(), server.pid())];
    let mut addrs = vec![];
    for target in [bulk, greet] {
        let port = 20000 + (free_port() % 20000);
        let p = Proc::spawn(
            "bore local",
            place
                .server_cmd("bore")
                .args([
                    "local",
                    &target.port().to_string(),
                    "--local-host",
                    &target.ip().to_string(),
                ])
                .args(["--to", &client_ip, "--port", &port.to_string()]),
        );
        let addr = SocketAddr::new(place.client_ip, port);
        wait_connectable(&addr.to_string());
        pids.push(("local".to_string(), p.pid()));
        procs.push(p);
        addrs.push(addr);
    }
    procs.push(server);
    Some(System {
        name: "bore 0.6".into(),
        bulk: addrs[0],
        greet: addrs[1],
        pids,
        _procs: procs,
        _dir: None,
    })
}

fn rathole(place: &Place, bulk: SocketAddr, greet: SocketAddr, noise: bool) -> Option<System> {
    if !process::have("rathole") {
        return None;
    }
    let dir = TempDir::new("rathole");
    let control = free_port();
    let (pb, pg) = (free_port(), free_port());
    let client_ip = place.client_ip;
    let (server_noise, client_noise) = if noise {
        let out = Command::new("rathole").arg("--genkey").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let keys: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains(':'))
            .collect();
        let (private, public) = (keys[0].trim(), keys[1].trim());
        (
            format!("[server.transport]\ntype = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{private}\"\n"),
            format!("[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{public}\"\n"),
        )
    } else {
        (String::new(), String::new())
    };
    std::fs::write(
        dir.path("server.toml"),
        format!(
            "[server]\nbind_addr = \"{client_ip}:{control}\"\n{server_noise}\
             [server.services.bulk]\ntoken = \"t\"\nbind_addr = \"127.0.0.1:{pb}\"\n\
             [server.services.greet]\ntoken = \"t\"\nbind_addr = \"127.0.0.1:{pg}\"\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path("client.toml"),
        format!(
            "[client]\nremote_addr = \"{client_ip}:{control}\"\n{client_noise}\
             [client.services.bulk]\ntoken = \"t\"\nlocal_addr = \"{bulk}\"\n\
             [client.services.greet]\ntoken = \"t\"\nlocal_addr = \"{greet}\"\n"
        ),
    )
    .unwrap();
    let server = Proc::spawn(
        "rathole server",
        Command::new("rathole")
            .arg("--server")
            .arg(dir.path("server.toml")),
    );
    let client = Proc::spawn(
        "rathole client",
        place
            .server_cmd("rathole")
            .arg("--client")
            .arg(dir.path("client.toml")),
    );
    let (b, g): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{pb}").parse().unwrap(),
        format!("127.0.0.1:{pg}").parse().unwrap(),
    );
    wait_connectable(&b.to_string());
    wait_connectable(&g.to_string());
    // The data channel comes up with the first visitor: warm it.
    let pids = vec![
        ("server".into(), server.pid()),
        ("client".into(), client.pid()),
    ];
    let name = if noise {
        "rathole 0.5 (noise)"
    } else {
        "rathole 0.5 (tcp, no encryption)"
    };
    Some(System {
        name: name.into(),
        bulk: b,
        greet: g,
        pids,
        _procs: vec![server, client],
        _dir: Some(dir),
    })
}

/// Bytes per second moving `total` bytes over `streams` parallel connections.
async fn bulk(addr: SocketAddr, total: u64, streams: u64, upload: bool) -> f64 {
    bulk_timed(addr, total, streams, upload).await.0
}

/// Bytes moved so far over all of a transfer's streams, and when the first half was done.
struct Progress {
    half: u64,
    moved: std::sync::atomic::AtomicU64,
    halfway: std::sync::OnceLock<Instant>,
}

impl Progress {
    fn new(total: u64) -> std::sync::Arc<Progress> {
        std::sync::Arc::new(Progress {
            half: total / 2,
            moved: Default::default(),
            halfway: Default::default(),
        })
    }

    fn add(&self, n: u64) {
        let moved = self
            .moved
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed)
            + n;
        if moved >= self.half {
            self.halfway.get_or_init(Instant::now);
        }
    }

    /// Bytes/s over the whole transfer of `total` bytes begun at `start`, and over its
    /// second half (the ramp-up left out).
    fn rates(&self, start: Instant, total: u64) -> (f64, f64) {
        let end = Instant::now();
        let all = total as f64 / (end - start).as_secs_f64();
        let second = self.halfway.get().map_or(f64::NAN, |h| {
            (total - self.half) as f64 / (end - *h).as_secs_f64()
        });
        (all, second)
    }
}

/// As [`bulk`], and the rate of the transfer's second half (bytes/s), which leaves out the
/// ramp-up: what a long path carries once the sender found its rate.
async fn bulk_timed(addr: SocketAddr, total: u64, streams: u64, upload: bool) -> (f64, f64) {
    let per = total / streams;
    let progress = Progress::new(per * streams);
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let progress = progress.clone();
        set.spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            if upload {
                tcp.write_all(b"U").await.unwrap();
                let buf = vec![0xa5u8; 256 * 1024];
                let mut left = per;
                while left > 0 {
                    let k = left.min(buf.len() as u64) as usize;
                    tcp.write_all(&buf[..k]).await.unwrap();
                    left -= k as u64;
                    progress.add(k as u64);
                }
                tcp.shutdown().await.unwrap();
                let mut n = [0u8; 8];
                tcp.read_exact(&mut n).await.unwrap();
                assert_eq!(u64::from_be_bytes(n), per, "all bytes arrived");
            } else {
                tcp.write_all(b"D").await.unwrap();
                tcp.write_all(&per.to_be_bytes()).await.unwrap();
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    let k = tcp.read(&mut buf).await.unwrap();
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                    progress.add(k as u64);
                }
                assert_eq!(n, per, "all bytes arrived");
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    progress.rates(start, per * streams)
}

/// Round trips of 100-byte request / 100-byte reply on one connection, in µs, sorted.
async fn ping_pong(addr: SocketAddr, count: usize) -> Vec<f64> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.write_all(b"E").await.unwrap();
    let msg = [7u8; 100];
    let mut buf = [0u8; 100];
    for _ in 0..100 {
        tcp.write_all(&msg).await.unwrap();
        tcp.read_exact(&mut buf).await.unwrap();
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        tcp.write_all(&msg).await.unwrap();
        tcp.read_exact(&mut buf).await.unwrap();
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out.sort_by(f64::total_cmp);
    out
}

/// Client connect → first byte of the server's greeting, in µs, sorted.
async fn open_latency(addr: SocketAddr, count: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.unwrap();
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out.sort_by(f64::total_cmp);
    out
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) the processes `pids` have used so far.
fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_ticks(*p)).sum::<u64>() as f64 / 100.0
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// Opens `n` idle connections to the greeting service through `sys`; memory per stream on
/// each side and CPU while idle.
async fn scale(sys: &System, n: usize) -> Value {
    let before: Vec<u64> = sys.pids.iter().map(|(_, p)| rss_kib(*p)).collect();
    let t = Instant::now();
    let mut conns = Vec::with_capacity(n);
    let mut failed = 0usize;
    let mut first_error = None;
    for _ in 0..n {
        let opened = async {
            let mut tcp = TcpStream::connect(sys.greet).await?;
            let mut b = [0u8; 6];
            tcp.read_exact(&mut b).await?;
            Ok::<_, std::io::Error>(tcp)
        };
        match tokio::time::timeout(Duration::from_secs(3), opened).await {
            Ok(Ok(tcp)) => conns.push(tcp),
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
            Err(_) => {
                failed += 1;
                first_error.get_or_insert("timed out".into());
            }
        }
    }
    if failed > 0 {
        eprintln!(
            "{}: {failed} of {n} idle streams failed to open (first: {first_error:?})",
            sys.name
        );
    }
    let n = conns.len().max(1);
    let opened = t.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after: Vec<u64> = sys.pids.iter().map(|(_, p)| rss_kib(*p)).collect();
    let ticks0: u64 = sys.pids.iter().map(|(_, p)| cpu_ticks(*p)).sum();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ticks1: u64 = sys.pids.iter().map(|(_, p)| cpu_ticks(*p)).sum();
    let conns_opened = conns.len();
    drop(conns);
    let per: BTreeMap<String, f64> = sys
        .pids
        .iter()
        .zip(before.iter().zip(&after))
        .map(|((role, _), (b, a))| (role.clone(), a.saturating_sub(*b) as f64 / n as f64))
        .collect();
    json!({
        "streams": conns_opened,
        "failed": failed,
        "first_error": first_error,
        "open_seconds": opened.as_secs_f64(),
        "rss_kib_per_stream": per,
        "idle_cpu_percent": (ticks1 - ticks0) as f64 / 5.0, // 100 ticks/s = 100% of one core
    })
}

fn main() {
    // The tunnels' own logs at warn only: logging is not what is measured.
    std::env::set_var("RUST_LOG", "warn");
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if arg(1).starts_with("--quinn-") {
        // quinn alone runs as the tunnel does: one runtime thread (`tunnel --threads`).
        rt.worker_threads(1);
    }
    let rt = rt.enable_all().build().unwrap();
    if std::env::args().any(|a| a == "--serve-greet") {
        // Child mode: the greeting service alone, so 10,000 idle streams need 10,000 file
        // descriptors here and 10,000 in the parent, not 20,000 in one process.
        rt.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            println!("{}", l.local_addr().unwrap());
            serve_greet(l).await;
        });
        return;
    }
    match arg(1) {
        "--worker-dumbpipe" => rt.block_on(dumbpipe_worker()),
        "--worker-veth" => rt.block_on(veth::worker(arg(2), arg(3))),
        "--worker-wan" => {
            let rest: Vec<&str> = args[2..].iter().map(String::as_str).collect();
            rt.block_on(wan::worker(&rest))
        }
        "--link-emulator" => wan::emulate(arg(2), arg(3), arg(4).parse().unwrap()),
        "--serve-targets" => rt.block_on(async {
            let (b, g) = start_targets(arg(2).parse().unwrap()).await;
            println!("targets {b} {g}");
            std::future::pending::<()>().await;
        }),
        "--quinn-server" => rt.block_on(quinn_probe::serve(arg(2).parse().unwrap())),
        "--quinn-client" => rt.block_on(quinn_probe::client(
            arg(2).parse().unwrap(),
            arg(3).parse().unwrap(),
        )),
        // report.md again from report.json (after a change to the report's layout).
        "--rewrite-report" => {
            let json = std::fs::read_to_string(out_dir().join("report.json")).unwrap();
            write_report(&serde_json::from_str(&json).unwrap());
        }
        _ => rt.block_on(suite()),
    }
}

/// Inside a network namespace whose only interface is `lo` (dumbpipe looks for public
/// relays and discovery; there it can reach none): targets, `dumbpipe listen-tcp` and
/// `connect-tcp` for each, then one JSON line of measurements per line read on stdin.
async fn dumbpipe_worker() {
    let size = env_num("BENCH_BYTES", GIB);
    let (bulk_addr, _) = start_targets(IpAddr::from([127, 0, 0, 1])).await;
    let greet = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let greet_addr = greet.local_addr().unwrap();
    tokio::spawn(serve_greet(greet));
    let Some(sys) = dumbpipe(&Place::loopback(), bulk_addr, greet_addr) else {
        return;
    };
    bulk(sys.bulk, 8 << 20, 1, false).await;
    println!("ready");
    let pids = sys.pids();
    let mut line = String::new();
    while std::io::stdin()
        .read_line(&mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        line.clear();
        let m = measure(sys.bulk, sys.greet, size, &pids).await;
        println!("{}", serde_json::to_string(&m).unwrap());
    }
}

/// The ticket `dumbpipe listen-tcp` prints once it is up (after its relay look-ups time out).
fn dumbpipe_ticket(listen: &Proc) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(t) = listen
            .stderr()
            .lines()
            .find_map(|l| l.strip_prefix("dumbpipe connect-tcp ").map(str::to_owned))
        {
            return t.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "no ticket: {}", listen.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// dumbpipe with its listening side in the servers' namespace (only where that namespace
/// and this one have no route out: it looks for public relays).
fn dumbpipe(place: &Place, bulk: SocketAddr, greet: SocketAddr) -> Option<System> {
    if !process::have("dumbpipe") {
        return None;
    }
    let mut procs = Vec::new();
    let mut pids = Vec::new();
    let mut addrs = Vec::new();
    for target in [bulk, greet] {
        let listen = Proc::spawn(
            "dumbpipe listen-tcp",
            place.server_cmd("dumbpipe").args([
                "listen-tcp",
                "--host",
                &target.to_string(),
                "--ipv4-addr",
                &SocketAddr::new(place.server_ip, 0).to_string(),
            ]),
        );
        let ticket = dumbpipe_ticket(&listen);
        let local = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), free_port());
        let connect = Proc::spawn(
            "dumbpipe connect-tcp",
            Command::new("dumbpipe").args([
                "connect-tcp",
                "--addr",
                &local.to_string(),
                "--ipv4-addr",
                &SocketAddr::new(place.client_ip, 0).to_string(),
                &ticket,
            ]),
        );
        wait_connectable(&local.to_string());
        pids.push(("listen".to_string(), listen.pid()));
        pids.push(("connect".to_string(), connect.pid()));
        procs.push(listen);
        procs.push(connect);
        addrs.push(local);
    }
    Some(System {
        name: DUMBPIPE.into(),
        bulk: addrs[0],
        greet: addrs[1],
        pids,
        _procs: procs,
        _dir: None,
    })
}

/// The per-round measurements of one system; `pids` are its processes, whose CPU time per
/// GiB moved is measured over the one-stream transfers.
async fn measure(
    bulk_addr: SocketAddr,
    greet_addr: SocketAddr,
    size: u64,
    pids: &[u32],
) -> BTreeMap<String, f64> {
    let gbit = |bps: f64| bps * 8.0 / 1e9;
    let mut r = one_stream(bulk_addr, size, pids).await;
    r.insert(
        "download_8_gbit".into(),
        gbit(bulk(bulk_addr, size, 8, false).await),
    );
    r.insert(
        "download_64_gbit".into(),
        gbit(bulk(bulk_addr, size, 64, false).await),
    );
    let pp = ping_pong(bulk_addr, 5000).await;
    r.insert("rtt_p50_us".into(), pct(&pp, 0.5));
    r.insert("rtt_p99_us".into(), pct(&pp, 0.99));
    let open = open_latency(greet_addr, 300).await;
    r.insert("open_p50_us".into(), pct(&open, 0.5));
    r.insert("open_p99_us".into(), pct(&open, 0.99));
    r
}

/// One stream up, then one down, `size` bytes each: Gbit/s, and the CPU-seconds per GiB the
/// processes `pids` took for each.
async fn one_stream(bulk_addr: SocketAddr, size: u64, pids: &[u32]) -> BTreeMap<String, f64> {
    let mut r = BTreeMap::new();
    for upload in [true, false] {
        r.extend(one_way(bulk_addr, size, pids, upload).await);
    }
    r
}

/// One stream of `size` bytes up or down: Gbit/s and the CPU-seconds per GiB of `pids`.
async fn one_way(addr: SocketAddr, size: u64, pids: &[u32], upload: bool) -> Vec<(String, f64)> {
    let cpu = cpu_seconds(pids);
    let (bps, second_half) = bulk_timed(addr, size, 1, upload).await;
    let (key, dir) = if upload {
        ("upload_1", "up")
    } else {
        ("download_1", "down")
    };
    let mut r = vec![
        (format!("{key}_gbit"), bps * 8.0 / 1e9),
        (format!("{key}_second_half_gbit"), second_half * 8.0 / 1e9),
    ];
    if !pids.is_empty() {
        let gib = size as f64 / GIB as f64;
        r.push((
            format!("cpu_s_per_gib_{dir}"),
            (cpu_seconds(pids) - cpu) / gib,
        ));
    }
    r
}

/// dumbpipe in a lo-only namespace, driven through a worker process (see `dumbpipe_worker`).
struct DumbpipeWorker {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    /// Dropped after the worker: everything in it is killed, then it is deleted.
    _netns: veth::Netns,
}

impl DumbpipeWorker {
    fn start() -> Option<Self> {
        use std::io::BufRead;
        if !process::have("dumbpipe") {
            return None;
        }
        let Some(netns) = veth::Netns::add(format!("tbench{}", std::process::id())) else {
            eprintln!("dumbpipe: cannot make a lo-only network namespace (not root?): skipped");
            return None;
        };
        let mut child = Command::new("ip")
            .args(["netns", "exec", &netns.0])
            .arg(std::env::current_exe().unwrap())
            .arg("--worker-dumbpipe")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        eprintln!("dumbpipe: starting in a lo-only namespace (its relay look-ups time out first)");
        match lines.next() {
            Some(Ok(l)) if l == "ready" => Some(DumbpipeWorker {
                child,
                stdin,
                lines,
                _netns: netns,
            }),
            other => {
                eprintln!("dumbpipe worker failed to start: {other:?}");
                // Its namespace goes with it (Drop does the same for a started worker).
                drop(DumbpipeWorker {
                    child,
                    stdin,
                    lines,
                    _netns: netns,
                });
                None
            }
        }
    }

    fn measure(&mut self) -> Option<BTreeMap<String, f64>> {
        use std::io::Write;
        if let Err(e) = writeln!(self.stdin, "go").and_then(|()| self.stdin.flush()) {
            eprintln!("dumbpipe worker: {e}");
            return None;
        }
        let line = self.lines.next();
        match line
            .as_ref()
            .map(|l| l.as_ref().map(|t| serde_json::from_str(t)))
        {
            Some(Ok(Ok(m))) => Some(m),
            other => {
                eprintln!("dumbpipe worker: bad answer {line:?}: {other:?}");
                None
            }
        }
    }
}

impl Drop for DumbpipeWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Factory = Box<dyn Fn() -> Option<System>>;
/// System -> metric -> its values over the rounds.
type Results = BTreeMap<String, BTreeMap<String, Vec<f64>>>;

const QUINN: &str = "quinn 0.11 alone (memory to memory)";
const DUMBPIPE: &str = "dumbpipe 0.40 (QUIC)";

/// Whether `name` is measured under `BENCH_ONLY` (direct TCP always is: every figure's
/// baseline).
fn wanted(name: &str) -> bool {
    std::env::var("BENCH_ONLY")
        .ok()
        .is_none_or(|o| name.contains(&o) || name == "direct TCP")
}

/// The systems measured on `place` with the target servers `bulk` and `greet`.
fn factories(place: &Place, bulk: SocketAddr, greet: SocketAddr) -> Vec<(&'static str, Factory)> {
    let at = || place.clone();
    let mut f: Vec<(&str, Factory)> = vec![
        ("direct TCP", Box::new(move || Some(direct(bulk, greet)))),
        ("tunnel", {
            let p = at();
            Box::new(move || Some(tunnel_of(tunnel_bin(), "tunnel", &p, bulk, greet)))
        }),
        ("bore 0.6", {
            let p = at();
            Box::new(move || bore(&p, bulk, greet))
        }),
        ("rathole 0.5 (tcp, no encryption)", {
            let p = at();
            Box::new(move || rathole(&p, bulk, greet, false))
        }),
        ("rathole 0.5 (noise)", {
            let p = at();
            Box::new(move || rathole(&p, bulk, greet, true))
        }),
    ];
    if std::env::var_os("BENCH_BASELINE_BIN").is_some() {
        let p = at();
        f.insert(
            2,
            (
                "tunnel (baseline)",
                Box::new(move || tunnel_baseline(&p, bulk, greet)),
            ),
        );
    }
    // Between two namespaces with no route out, dumbpipe runs as the others do; on loopback
    // it needs a worker in a namespace of its own (`DumbpipeWorker`).
    if place.server_netns.is_some() {
        let p = at();
        f.push((DUMBPIPE, Box::new(move || dumbpipe(&p, bulk, greet))));
    }
    f
}

/// `rounds` rounds of every wanted system on `place`, in turn, then the quinn-only probe.
async fn run_rounds(
    place: &Place,
    factories: &[(&str, Factory)],
    rounds: usize,
    size: u64,
    mut dumbpipe: Option<&mut DumbpipeWorker>,
) -> Results {
    let mut results = Results::new();
    for round in 0..rounds {
        if let Some(worker) = dumbpipe.as_deref_mut() {
            eprintln!("round {}/{rounds}: dumbpipe", round + 1);
            if let Some(m) = worker.measure() {
                push_all(results.entry(DUMBPIPE.into()).or_default(), m);
            }
        }
        let round = format!("round {}/{rounds}", round + 1);
        for (name, make) in factories {
            let Some(sys) = start_system(name, make, &round).await else {
                continue;
            };
            let pids = sys.pids();
            let m = measure(sys.bulk, sys.greet, size, &pids).await;
            push_all(results.entry(sys.name.clone()).or_default(), m);
        }
        if wanted(QUINN) {
            eprintln!("{round}: {QUINN}");
            if let Some(mut probe) = quinn_probe::Probe::start(place.ns(), place.server_ip) {
                if let Some(m) = tokio::task::block_in_place(|| probe.measure(size)) {
                    push_all(results.entry(QUINN.into()).or_default(), m);
                }
            }
        }
    }
    results
}

/// `name`'s system, made and warmed up (its connections and lazily made state exist before
/// timing), or None when it is not wanted (`BENCH_ONLY`) or not installed.
async fn start_system(name: &str, make: &Factory, round: &str) -> Option<System> {
    if !wanted(name) {
        return None;
    }
    let Some(sys) = make() else {
        eprintln!("{name}: not installed, skipped");
        return None;
    };
    eprintln!("{round}: {}", sys.name);
    bulk(sys.bulk, 8 << 20, 1, false).await;
    Some(sys)
}

/// Adds one round's figures `m` to a system's figures `r`.
fn push_all(r: &mut BTreeMap<String, Vec<f64>>, m: impl IntoIterator<Item = (String, f64)>) {
    for (k, v) in m {
        r.entry(k).or_default().push(v);
    }
}

fn medians(results: &Results) -> BTreeMap<String, BTreeMap<String, f64>> {
    results
        .iter()
        .map(|(n, m)| {
            (
                n.clone(),
                m.iter()
                    .map(|(k, v)| (k.clone(), median(v.clone())))
                    .collect(),
            )
        })
        .collect()
}

async fn suite() {
    let rounds = env_num("BENCH_ROUNDS", 3) as usize;
    let size = env_num("BENCH_BYTES", GIB);
    let scale_n = env_num("BENCH_IDLE_STREAMS", 10_000) as usize;
    let (bulk_addr, _) = start_targets(IpAddr::from([127, 0, 0, 1])).await;
    let greeter = Proc::spawn(
        "greet server",
        Command::new(std::env::current_exe().unwrap()).arg("--serve-greet"),
    );
    let greet_addr: SocketAddr = greeter
        .line_matching(|l| l.contains(':'))
        .trim()
        .parse()
        .unwrap();
    let only = std::env::var("BENCH_ONLY").ok();
    let loopback = Place::loopback();
    let factories = factories(&loopback, bulk_addr, greet_addr);
    let on_loopback = env_num("BENCH_LOOPBACK", 1) == 1;
    let mut dumbpipe = if on_loopback && wanted(DUMBPIPE) && only.as_deref() != Some("direct TCP") {
        DumbpipeWorker::start()
    } else {
        None
    };
    let results = if on_loopback {
        run_rounds(&loopback, &factories, rounds, size, dumbpipe.as_mut()).await
    } else {
        Results::new()
    };
    drop(dumbpipe);
    let medians = medians(&results);
    // One report, written again as each part ends, so a later failure loses nothing before it.
    let mut report = json!({
        "machine": machine(), "rounds": rounds, "bytes_per_transfer": size,
        "raw": results, "median": medians, "scale": {}, "media": null, "media_runs": [],
        "veth": null, "wan": null,
    });
    write_report(&report);
    // The 1500-byte-MTU path between two namespaces (`veth.rs`).
    if env_num("BENCH_VETH", 1) == 1 {
        report["veth"] = veth::run();
        write_report(&report);
    }
    // A 100 ms round trip through a 1 Gbit/s bottleneck (`wan.rs`).
    if env_num("BENCH_WAN", 1) == 1 {
        report["wan"] = wan::run();
        write_report(&report);
    }
    eprintln!("scale: {scale_n} idle streams");
    let mut scale_results = BTreeMap::new();
    for (name, make) in &factories[1..] {
        if scale_n == 0 || only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        if let Some(sys) = make() {
            bulk(sys.bulk, 1 << 20, 1, false).await;
            scale_results.insert(sys.name.clone(), scale(&sys, scale_n).await);
        }
    }

    let media_wanted =
        only.as_deref().is_none_or(|o| "tunnel".contains(o)) && env_num("BENCH_MEDIA", 1) == 1;
    let media = if media_wanted {
        media_under_load(&loopback, bulk_addr, tunnel).await
    } else {
        Value::Null
    };
    // With a baseline build: media runs of both builds in ABBA order (`BENCH_MEDIA_ROUNDS`
    // pairs, default 2): one run each is too noisy to tell a regression from the machine, and
    // a fixed order would hand the later, quieter slot to one build.
    let mut media_runs = Vec::new();
    if media_wanted && std::env::var_os("BENCH_BASELINE_BIN").is_some() {
        for round in 0..env_num("BENCH_MEDIA_ROUNDS", 2) {
            let order = if round % 2 == 0 {
                ["baseline", "tunnel"]
            } else {
                ["tunnel", "baseline"]
            };
            for build in order {
                eprintln!("media round {}: {build}", round + 1);
                let m = if build == "tunnel" {
                    media_under_load(&loopback, bulk_addr, tunnel).await
                } else {
                    media_under_load(&loopback, bulk_addr, |b, g| {
                        tunnel_baseline(&Place::loopback(), b, g)
                            .expect("BENCH_BASELINE_BIN is set")
                    })
                    .await
                };
                media_runs.push(json!({"build": build, "media": m}));
            }
        }
    }
    report["scale"] = json!(scale_results);
    report["media"] = media;
    report["media_runs"] = json!(media_runs);
    write_report(&report);
}

/// Arrival times of decoded frames: ffmpeg plays `url` (RTSP interleaved over TCP) for
/// `frames` frames; each `showinfo` line is stamped as it arrives on ffmpeg's stderr.
fn frame_arrivals(url: &str, frames: u32) -> Vec<Instant> {
    use std::io::BufRead;
    let mut child = Command::new("ffmpeg")
        .args([
            "-nostdin",
            "-hide_banner",
            "-fflags",
            "nobuffer",
            "-flags",
            "low_delay",
        ])
        .args(["-rtsp_transport", "tcp", "-i", url])
        .args([
            "-frames:v",
            &frames.to_string(),
            "-vf",
            "showinfo",
            "-f",
            "null",
            "-",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ffmpeg");
    let stderr = child.stderr.take().unwrap();
    let mut out = Vec::new();
    for line in std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
    {
        if line.contains("Parsed_showinfo") && line.contains(" n:") {
            out.push(Instant::now());
        }
    }
    let _ = child.wait();
    out
}

/// Jitter of frame arrivals: percentiles of |inter-arrival − median inter-arrival|, in ms.
fn jitter(arrivals: &[Instant]) -> Value {
    // The first frames arrive in a burst (the key frame and the decoder's start): skip them.
    let gaps: Vec<f64> = arrivals
        .windows(2)
        .skip(10)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
        .collect();
    if gaps.len() < 10 {
        return json!({ "frames": arrivals.len() });
    }
    let mut sorted = gaps.clone();
    sorted.sort_by(f64::total_cmp);
    let med = pct(&sorted, 0.5);
    let mut dev: Vec<f64> = gaps.iter().map(|g| (g - med).abs()).collect();
    dev.sort_by(f64::total_cmp);
    json!({
        "frames": arrivals.len(),
        "interarrival_median_ms": med,
        "jitter_p50_ms": pct(&dev, 0.5),
        "jitter_p99_ms": pct(&dev, 0.99),
        "longest_gap_ms": sorted.last().copied().unwrap_or(0.0),
    })
}

/// Downloads at most `rate` bytes a second (the reader paces; TCP and QUIC flow control
/// carry the back-pressure to the sender) until `stop`; the Gbit/s achieved.
async fn paced_download(
    addr: SocketAddr,
    rate: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> f64 {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"D").await.unwrap();
    tcp.write_all(&u64::MAX.to_be_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let t = Instant::now();
    let mut got = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let n = tcp.read(&mut buf).await.unwrap();
        got += n as u64;
        let due = Duration::from_secs_f64(got as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(t.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    got as f64 * 8.0 / 1e9 / t.elapsed().as_secs_f64()
}

/// A real RTSP stream through the tunnel, alone and then sharing the connection with a bulk
/// download.
async fn media_under_load(
    place: &Place,
    bulk_addr: SocketAddr,
    make: impl Fn(SocketAddr, SocketAddr) -> System,
) -> Value {
    if !process::have("ffmpeg") {
        return Value::Null;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rtsp_server.py");
    // The camera beside the exposing side (it listens on that namespace's loopback).
    let server = Proc::spawn(
        "rtsp server",
        place.server_cmd("/usr/bin/python3").arg(script).arg("0"),
    );
    let port = server
        .line_matching(|l| l.starts_with("ready "))
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    let cam: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let sys = make(bulk_addr, cam); // its "greet" service is the camera here
    let url = format!("rtsp://{}/test", sys.greet);
    let frames = 250;
    eprintln!("media: {frames} frames alone");
    let alone = tokio::task::spawn_blocking({
        let url = url.clone();
        move || frame_arrivals(&url, frames)
    })
    .await
    .unwrap();
    eprintln!("media: {frames} frames with a bulk download on the same connection");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn({
        let (stop, addr) = (stop.clone(), sys.bulk);
        async move {
            let mut moved = 0u64;
            let t = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                bulk(addr, 256 << 20, 1, false).await;
                moved += 256 << 20;
            }
            moved as f64 * 8.0 / 1e9 / t.elapsed().as_secs_f64()
        }
    });
    let loaded = tokio::task::spawn_blocking({
        let url = url.clone();
        move || frame_arrivals(&url, frames)
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let load_gbit = load.await.unwrap();
    // A download limited by its reader to 400 Mbit/s, as a link would limit it: load on the
    // connection without taking every CPU cycle of this 2-core machine.
    eprintln!("media: {frames} frames with a 400 Mbit/s download on the same connection");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let paced = tokio::spawn({
        let (stop, addr) = (stop.clone(), sys.bulk);
        async move { paced_download(addr, 50_000_000, stop).await }
    });
    let capped = tokio::task::spawn_blocking(move || frame_arrivals(&url, frames))
        .await
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let paced_gbit = paced.await.unwrap();
    json!({
        "alone": jitter(&alone),
        "with_bulk": jitter(&loaded),
        "bulk_gbit_meanwhile": load_gbit,
        "with_paced_bulk": jitter(&capped),
        "paced_gbit_meanwhile": paced_gbit,
    })
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    json!({ "cpu": cpu, "cores": cores, "date": String::from_utf8_lossy(&Command::new("date").arg("-u").arg("+%Y-%m-%d %H:%M UTC").output().map(|o| o.stdout).unwrap_or_default()).trim() })
}

/// Where the report goes: docs/bench, or `BENCH_OUT` (a partial run, e.g. one build against
/// another, must not overwrite the full report).
fn out_dir() -> PathBuf {
    std::env::var_os("BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/bench"))
}

/// The systems in the order the tables list them.
const ORDER: [&str; 8] = [
    "direct TCP",
    QUINN,
    "tunnel",
    "tunnel (baseline)",
    "bore 0.6",
    "rathole 0.5 (tcp, no encryption)",
    "rathole 0.5 (noise)",
    DUMBPIPE,
];

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The systems of `obj`, in the report's order (`ORDER`, then the others).
fn in_order(obj: &serde_json::Map<String, Value>) -> Vec<String> {
    let others = obj.keys().filter(|n| !ORDER.contains(&n.as_str()));
    ORDER
        .iter()
        .map(|n| n.to_string())
        .chain(others.cloned())
        .filter(|n| obj.contains_key(n))
        .collect()
}

/// Throughput of every system with its ratio to direct TCP, and its CPU per GiB.
fn throughput_table(md: &mut String, obj: &serde_json::Map<String, Value>) {
    md.push_str("| system | upload, 1 stream | download, 1 stream | 8 streams | 64 streams | CPU-s/GiB up | CPU-s/GiB down |\n|---|---|---|---|---|---|---|\n");
    let direct = obj.get("direct TCP").cloned().unwrap_or(Value::Null);
    for name in in_order(obj) {
        let m = &obj[&name];
        let cell = |k: &str| {
            format!(
                "{:.2} ({:.0}%)",
                num(&m[k]),
                100.0 * num(&m[k]) / num(&direct[k])
            )
        };
        let cpu = |k: &str| {
            m.get(k)
                .map(|v| format!("{:.2}", num(v)))
                .unwrap_or_else(|| "—".into())
        };
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} | {} |\n",
            cell("upload_1_gbit"),
            cell("download_1_gbit"),
            cell("download_8_gbit"),
            cell("download_64_gbit"),
            cpu("cpu_s_per_gib_up"),
            cpu("cpu_s_per_gib_down"),
        ));
    }
}

/// The long path: one stream each way of every system with its ratio to direct TCP, its CPU
/// per GiB, and what crossed the bottleneck for it.
fn wan_table(md: &mut String, obj: &serde_json::Map<String, Value>) {
    md.push_str("| system | upload, 1 stream: whole (second half) | download, 1 stream: whole (second half) | CPU-s/GiB up / down | bottleneck bytes per payload byte, up / down | packets dropped there, up / down |\n|---|---|---|---|---|---|\n");
    for name in in_order(obj) {
        let m = &obj[&name];
        let cell = |k: &str| {
            format!(
                "{:.3} ({:.3})",
                num(&m[format!("{k}_gbit")]),
                num(&m[format!("{k}_second_half_gbit")]),
            )
        };
        let pair = |k: &str, digits: usize| {
            let one = |dir: &str| {
                m.get(format!("{k}_{dir}"))
                    .map(|v| format!("{:.*}", digits, num(v)))
                    .unwrap_or_else(|| "—".into())
            };
            format!("{} / {}", one("up"), one("down"))
        };
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} |\n",
            cell("upload_1"),
            cell("download_1"),
            pair("cpu_s_per_gib", 2),
            pair("link_bytes_per_byte", 3),
            pair("dropped", 0),
        ));
    }
}

/// The targets of issue 16 (speed on real paths), each with its same-run baseline.
fn targets_16(
    md: &mut String,
    lo: &serde_json::Map<String, Value>,
    veth: Option<&serde_json::Map<String, Value>>,
    wan: Option<&serde_json::Map<String, Value>>,
    media: [(&str, &Value); 2],
) {
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    md.push_str("\n## Targets of issue 16 (speed on real paths)\n\n| target | measured (same run) | verdict |\n|---|---|---|\n");
    let row = |md: &mut String, target: &str, measured: String, ok: Option<bool>| {
        md.push_str(&format!(
            "| {target} | {measured} | {} |\n",
            ok.map(met).unwrap_or("not measured")
        ));
    };
    let get = |m: Option<&serde_json::Map<String, Value>>, name: &str, k: &str| {
        m.and_then(|m| m.get(name)).map(|s| num(&s[k]))
    };
    // One stream on the 1500-byte path, each direction against the same direction.
    let vs = |md: &mut String, target: &str, peer: &str, factor: f64| {
        let mut text = Vec::new();
        let mut ok = Some(true);
        for (dir, k) in [("up", "upload_1_gbit"), ("down", "download_1_gbit")] {
            match (get(veth, "tunnel", k), get(veth, peer, k)) {
                (Some(t), Some(p)) => {
                    text.push(format!("{dir} {t:.2} vs {p:.2} Gbit/s ({:.2}×)", t / p));
                    ok = ok.map(|o| o && t >= factor * p);
                }
                _ => ok = None,
            }
        }
        row(md, target, text.join("; "), ok);
    };
    vs(
        md,
        "1500-MTU path, 1 stream ≥ 2× rathole+noise",
        "rathole 0.5 (noise)",
        2.0,
    );
    vs(md, "1500-MTU path, 1 stream ≥ 2.5× dumbpipe", DUMBPIPE, 2.5);
    vs(
        md,
        "1500-MTU path, 1 stream ≥ 70% of quinn alone",
        QUINN,
        0.7,
    );
    let (up, down) = (
        get(veth, "tunnel", "cpu_s_per_gib_up"),
        get(veth, "tunnel", "cpu_s_per_gib_down"),
    );
    let shown = |v: Option<f64>| v.map_or("not measured".into(), |c| format!("{c:.2}"));
    row(
        md,
        "1500-MTU path, ≤ 3 CPU-seconds per GiB, both processes",
        format!("{} up, {} down", shown(up), shown(down)),
        up.zip(down).map(|(u, d)| u <= 3.0 && d <= 3.0),
    );
    for n in [8, 64] {
        let k = format!("download_{n}_gbit");
        let (many, one) = (
            get(veth, "tunnel", &k),
            get(veth, "tunnel", "download_1_gbit"),
        );
        row(
            md,
            &format!("1500-MTU path, {n} streams aggregate ≥ 1 stream"),
            format!(
                "{:.2} vs {:.2} Gbit/s",
                many.unwrap_or(f64::NAN),
                one.unwrap_or(f64::NAN)
            ),
            many.zip(one).map(|(m, o)| m >= o),
        );
    }
    // The flow-control windows against a long fat path: a 100 ms round trip, 1 Gbit/s.
    // The link carries at most ~0.95 Gbit/s of payload (headers); the ramp-up is left out.
    // Judged on the download, timed where the bytes arrive; an upload's halfway point is
    // timed by the sender's writes, early by what the buffers hold (below the figure).
    let mut text = Vec::new();
    let mut ok = None;
    for (dir, k) in [("down", "download_1"), ("up", "upload_1")] {
        if let (Some(second), Some(whole)) = (
            get(wan, "tunnel", &format!("{k}_second_half_gbit")),
            get(wan, "tunnel", &format!("{k}_gbit")),
        ) {
            text.push(format!(
                "{dir} {second:.3} Gbit/s over the second half ({whole:.3} over the whole transfer)"
            ));
            if dir == "down" {
                ok = Some(second >= 0.9);
            }
        }
    }
    row(
        md,
        "100 ms round trip through a 1 Gbit/s link: 1 download fills it (≥ 0.9 Gbit/s once up to speed)",
        if text.is_empty() {
            "not measured in this run".into()
        } else {
            text.join("; ")
        },
        ok,
    );
    let lo = Some(lo);
    let added = |k: &str| {
        get(lo, "tunnel", k)
            .zip(get(lo, "direct TCP", k))
            .map(|(t, d)| t - d)
    };
    let quinn = |k: &str| {
        get(lo, QUINN, k)
            .zip(get(lo, "direct TCP", k))
            .map(|(q, d)| format!(" (quinn alone adds {:.0} µs)", q - d))
            .unwrap_or_default()
    };
    for (p, k, limit) in [("p50", "rtt_p50_us", 90.0), ("p99", "rtt_p99_us", 200.0)] {
        let a = added(k);
        row(
            md,
            &format!("loopback, added round trip {p} ≤ {limit:.0} µs"),
            format!("{:.0} µs{}", a.unwrap_or(f64::NAN), quinn(k)),
            a.map(|a| a <= limit),
        );
    }
    let open = get(lo, "tunnel", "open_p50_us");
    let rtt = get(lo, "tunnel", "rtt_p50_us");
    let connect = get(lo, "direct TCP", "open_p50_us");
    row(
        md,
        "loopback, stream open ≤ one tunnel round trip + the target's connect",
        format!(
            "open p50 {:.0} µs vs round trip p50 {:.0} + direct open p50 {:.0} µs",
            open.unwrap_or(f64::NAN),
            rtt.unwrap_or(f64::NAN),
            connect.unwrap_or(f64::NAN)
        ),
        open.zip(rtt).zip(connect).map(|((o, r), c)| o <= r + c),
    );
    for (path, media) in media {
        let target = format!(
            "{path}, media jitter p99 under a paced 400 Mbit/s download within 10% of unloaded"
        );
        match (media.get("alone"), media.get("with_paced_bulk")) {
            (Some(a), Some(p)) => {
                let (ja, jp) = (num(&a["jitter_p99_ms"]), num(&p["jitter_p99_ms"]));
                let measured = ja.is_finite() && jp.is_finite();
                row(
                    md,
                    &target,
                    format!("{jp:.2} ms vs {ja:.2} ms"),
                    measured.then_some(jp <= ja * 1.1),
                );
            }
            _ => row(md, &target, "not measured in this run".into(), None),
        }
    }
}

/// Round trip and stream-open latency of every system, "added" over direct TCP.
fn latency_table(md: &mut String, obj: &serde_json::Map<String, Value>) {
    let f = num;
    let direct = obj.get("direct TCP").cloned().unwrap_or(Value::Null);
    for name in ORDER.iter().filter(|n| obj.contains_key(**n)) {
        let m = &obj[*name];
        md.push_str(&format!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            f(&m["rtt_p50_us"]),
            f(&m["rtt_p99_us"]),
            f(&m["rtt_p50_us"]) - f(&direct["rtt_p50_us"]),
            f(&m["rtt_p99_us"]) - f(&direct["rtt_p99_us"]),
            f(&m["open_p50_us"]),
            f(&m["open_p99_us"])
        ));
    }
}

/// The media-under-load table of one path (`media_under_load`'s result), if measured.
fn media_table(md: &mut String, media: &Value, title: &str, intro: &str) {
    let f = num;
    let report = json!({ "media": media });
    if let (Some(a), Some(l)) = (
        report["media"].get("alone"),
        report["media"].get("with_bulk"),
    ) {
        md.push_str(&format!(
            "\n{title}\n\n{intro}A live 25 fps H.264 RTSP stream (gst-rtsp-server) played by ffmpeg over RTSP-interleaved TCP through the tunnel, alone and while a bulk download shares the QUIC connection ({:.2} Gbit/s meanwhile). Jitter = |frame inter-arrival − median inter-arrival|.\n\n| | frames | median inter-arrival (ms) | jitter p50 (ms) | jitter p99 (ms) | longest gap (ms) |\n|---|---|---|---|---|---|\n| alone | {} | {:.1} | {:.2} | {:.2} | {:.1} |\n| with bulk | {} | {:.1} | {:.2} | {:.2} | {:.1} |\n",
            f(&report["media"]["bulk_gbit_meanwhile"]),
            a["frames"], f(&a["interarrival_median_ms"]), f(&a["jitter_p50_ms"]), f(&a["jitter_p99_ms"]), f(&a["longest_gap_ms"]),
            l["frames"], f(&l["interarrival_median_ms"]), f(&l["jitter_p50_ms"]), f(&l["jitter_p99_ms"]), f(&l["longest_gap_ms"]),
        ));
        if let Some(p) = report["media"].get("with_paced_bulk") {
            md.push_str(&format!(
                "| with a {:.2} Gbit/s download (paced by its reader) | {} | {:.1} | {:.2} | {:.2} | {:.1} |\n",
                f(&report["media"]["paced_gbit_meanwhile"]),
                p["frames"], f(&p["interarrival_median_ms"]), f(&p["jitter_p50_ms"]), f(&p["jitter_p99_ms"]), f(&p["longest_gap_ms"]),
            ));
        }
    }
}

fn write_report(report: &Value) {
    let dir = out_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(report).unwrap(),
    )
    .unwrap();
    let med = &report["median"];
    let direct = &med["direct TCP"];
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let mut md = String::new();
    md.push_str(&format!(
        "# Benchmark report\n\nMachine: {} ({} cores), {}. Loopback; {} rounds, systems alternating within each round; medians. Transfers of {} MiB.\n\n",
        report["machine"]["cpu"].as_str().unwrap_or(""),
        report["machine"]["cores"],
        report["machine"]["date"].as_str().unwrap_or(""),
        report["rounds"],
        f(&report["bytes_per_transfer"]) / 1048576.0
    ));
    md.push_str("## Throughput (Gbit/s; ratio to direct TCP) and CPU per GiB\n\nCPU: user + system seconds of the system's own processes (both tunnel processes; quinn's server and client) per GiB moved, over the one-stream transfers.\n\n");
    let obj = med.as_object().cloned().unwrap_or_default();
    throughput_table(&mut md, &obj);
    let veth = report["veth"]["median"].as_object().cloned();
    if let Some(v) = &veth {
        md.push_str("\n## The 1500-byte-MTU path (Gbit/s; ratio to direct TCP) and CPU per GiB\n\nTwo network namespaces joined by a veth pair with MTU 1500: the load generator and the client halves in one (198.51.100.1), the target servers and the exposing halves in the other (198.51.100.2). QUIC's packets are at most 1,452 bytes here (quinn's default ceiling); TCP still hands 64 KB segments to the veth (segmentation offload), as it does to a real NIC. Same rounds, same transfers as above.\n\n");
        throughput_table(&mut md, v);
    }
    if let Some(w) = report["wan"]["median"].as_object() {
        md.push_str(&format!(
            "\n## A long path: {} ms round trip through a {} link (Gbit/s) and CPU per GiB\n\nThree namespaces: the clients' side, the link, the servers' side; 1500-byte MTU (TCP segments and QUIC packets sized for it; segmentation super-frames cross the link whole, as between veths). The link holds every frame {} ms each way (a link emulator, this kernel has no netem) and `tbf` on its way out is the bottleneck ({}, a {} queue; what overflows is dropped). One stream each way, {} MiB, {} round(s): the rate over the whole transfer (the ramp-up included) and, in brackets, over its second half (a download's timed where it arrives; an upload's halfway point is when the sender had written half, early by what the tunnel's and the kernel's buffers hold, so its second half reads low). The bandwidth-delay product is 12.5 MB: a stream's flow-control window must be at least that to fill the link. {} Bottleneck bytes per payload byte: what the link carried for the transfer (headers, ACKs excluded, every retransmission) over the bytes delivered; packets dropped: what its queue refused (a super-frame counts once).\n\n",
            report["wan"]["rtt_ms"],
            report["wan"]["rate_label"].as_str().unwrap_or(""),
            report["wan"]["rtt_ms"].as_u64().unwrap_or(0) / 2,
            report["wan"]["rate"].as_str().unwrap_or(""),
            report["wan"]["queue"].as_str().unwrap_or(""),
            f(&report["wan"]["bytes_per_transfer"]) / 1048576.0,
            report["wan"]["rounds"],
            match report["wan"]["tcp_buffer"].as_u64() {
                Some(max) => format!("Kernel TCP's buffers may grow to {} MB here (`BENCH_WAN_TCP_BUFFER`).", max >> 20),
                None => "Kernel TCP keeps Linux's default buffers (at most 6 MB to receive, 4 MB to send), which caps a TCP connection near 0.2 Gbit/s here.".into(),
            },
        ));
        wan_table(&mut md, w);
    }
    md.push_str("\n## Latency (µs)\n\n100-byte request / 100-byte reply on one connection (5,000 round trips), and stream open: client connect → first byte of the server's greeting (300 opens). \"added\" is over direct TCP in the same round. quinn alone: 100-byte echoes on one stream, and a new stream per 1-byte request (no TCP connect in it).\n\n| system | round trip p50 | p99 | added p50 | added p99 | open p50 | open p99 |\n|---|---|---|---|---|---|---|\n");
    latency_table(&mut md, &obj);
    if let Some(v) = &veth {
        md.push_str("\nOn the 1500-byte-MTU path (veth):\n\n| system | round trip p50 | p99 | added p50 | added p99 | open p50 | open p99 |\n|---|---|---|---|---|---|---|\n");
        latency_table(&mut md, v);
    }
    md.push_str("\n## Idle streams\n\n| system | streams | opened in (s) | RSS per stream (KiB) | CPU while idle (% of a core) |\n|---|---|---|---|---|\n");
    if let Some(scale) = report["scale"].as_object() {
        for (name, s) in scale {
            let per = s["rss_kib_per_stream"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k} {:.2}", f(v)))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            md.push_str(&format!(
                "| {name} | {} | {:.2} | {per} | {:.1} |\n",
                s["streams"],
                f(&s["open_seconds"]),
                f(&s["idle_cpu_percent"])
            ));
        }
    }
    media_table(&mut md, &report["media"], "## Media under load", "");
    media_table(
        &mut md,
        &report["veth"]["media"],
        "### On the 1500-byte-MTU path",
        "The same, with the camera and `tunnel expose` in the servers' namespace and ffmpeg and `tunnel connect` in the clients' (the veth above). ",
    );
    // Targets
    let t = &obj.get("tunnel").cloned().unwrap_or(Value::Null);
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let noise = obj
        .get("rathole 0.5 (noise)")
        .map(|m| f(&m["download_1_gbit"]).max(f(&m["upload_1_gbit"])));
    let one = f(&t["download_1_gbit"]).min(f(&t["upload_1_gbit"]));
    md.push_str("\n## Targets\n\n| target | measured | verdict |\n|---|---|---|\n");
    md.push_str(&format!(
        "| bulk, 1 stream ≥ 25% of direct TCP | {:.0}% | {} |\n",
        100.0 * one / f(&direct["download_1_gbit"]).min(f(&direct["upload_1_gbit"])),
        met(one >= 0.25 * f(&direct["download_1_gbit"]).min(f(&direct["upload_1_gbit"])))
    ));
    if let Some(nz) = noise {
        md.push_str(&format!(
            "| bulk, 1 stream ≥ rathole with encryption | {one:.2} vs {nz:.2} Gbit/s | {} |\n",
            met(one >= nz)
        ));
    }
    match obj.get("dumbpipe 0.40 (QUIC)") {
        Some(d) => {
            let dp = f(&d["download_1_gbit"]).max(f(&d["upload_1_gbit"]));
            md.push_str(&format!(
                "| bulk, 1 stream ≥ 2× dumbpipe | {one:.2} vs 2 × {dp:.2} Gbit/s | {} |\n",
                met(one >= 2.0 * dp)
            ));
        }
        None => md.push_str(
            "| bulk, 1 stream ≥ 2× dumbpipe | dumbpipe not measured in this run | not measured |\n",
        ),
    }
    md.push_str(&format!(
        "| 8 streams aggregate ≥ 1 stream | {:.2} vs {:.2} Gbit/s | {} |\n",
        f(&t["download_8_gbit"]),
        f(&t["download_1_gbit"]),
        met(f(&t["download_8_gbit"]) >= f(&t["download_1_gbit"]))
    ));
    // The added round trip's bounds, the stream open and the paced media row are issue
    // 16's now (below, tighter); this table keeps the looser p99 bound.
    let a99 = f(&t["rtt_p99_us"]) - f(&direct["rtt_p99_us"]);
    md.push_str(&format!(
        "| added latency p99 ≤ 1 ms | {a99:.0} µs | {} |\n",
        met(a99 <= 1000.0)
    ));
    if let Some(s) = report["scale"].get("tunnel") {
        let worst = s["rss_kib_per_stream"]
            .as_object()
            .map(|m| m.values().map(f).fold(0.0, f64::max))
            .unwrap_or(f64::NAN);
        md.push_str(&format!(
            "| ≤ 16 KiB per idle stream | {worst:.2} KiB (worst side) | {} |\n",
            met(worst <= 16.0)
        ));
    }
    match (report["media"].get("alone"), report["media"].get("with_bulk")) {
        (Some(a), Some(l)) => {
            let (ja, jl) = (f(&a["jitter_p99_ms"]), f(&l["jitter_p99_ms"]));
            md.push_str(&format!("| media jitter p99 under load within 10% of unloaded (download using every CPU cycle) | {jl:.2} ms vs {ja:.2} ms | {} |\n", met(jl <= ja * 1.1)));
        }
        _ => md.push_str("| media jitter p99 under load within 10% of unloaded | not measured in this run | not measured |\n"),
    }
    targets_16(
        &mut md,
        &obj,
        veth.as_ref(),
        report["wan"]["median"].as_object(),
        [
            ("loopback", &report["media"]),
            ("1500-MTU path", &report["veth"]["media"]),
        ],
    );
    std::fs::write(dir.join("report.md"), md).unwrap();
    eprintln!("wrote {}", dir.join("report.md").display());
}
