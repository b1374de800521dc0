//! Running the real `tunnel` binary and third-party programs from tests: every child is
//! killed and reaped when its guard drops, also when the test fails.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const WAIT: Duration = Duration::from_secs(30);

/// A child process whose stdout lines arrive on a channel, and whose stderr is kept.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Proc {
            name: name.into(),
            child,
            lines: rx,
            stderr,
        }
    }

    /// The next stdout line that satisfies `pred`, waiting at most `WAIT`.
    pub fn line_matching(&self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "{}: no matching line on stdout; stderr:\n{}",
                    self.name,
                    self.stderr()
                ),
            }
        }
    }

    /// Every stdout line received so far and not yet taken.
    pub fn lines_so_far(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until the stderr so far satisfies `pred`, at most `limit`.
    pub fn wait_stderr_for(&self, limit: Duration, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + limit;
        while !pred(&self.stderr()) {
            assert!(
                Instant::now() < deadline,
                "{} never logged what was expected:\n{}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the stderr so far contains `text`, at most `WAIT`.
    pub fn wait_log(&self, text: &str) {
        self.wait_stderr_for(WAIT, |log| log.contains(text))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the exit, at most `limit`; the exit code (None if it did not end).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tunnel_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tunnel")
}

/// A fresh directory for one test, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tunnel-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The peer id of the identity at `path` (created if needed), from `tunnel id`.
pub fn peer_id(identity: &Path) -> String {
    let out = Command::new(tunnel_bin())
        .args(["id", "--identity"])
        .arg(identity)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// `tunnel expose` and `tunnel connect` as two processes, ready: returns them and the local
/// address of each `--local` listener, in order.
pub struct TunnelPair {
    pub expose: Proc,
    pub connect: Proc,
    pub locals: Vec<String>,
    pub dir: TempDir,
}

pub fn start_pair(services: &[(&str, &str)], extra_connect: &[&str]) -> TunnelPair {
    start_pair_of(tunnel_bin(), services, extra_connect)
}

/// [`start_pair`] with another build of the binary (the benchmark's same-run baseline).
pub fn start_pair_of(bin: &str, services: &[(&str, &str)], extra_connect: &[&str]) -> TunnelPair {
    start_pair_at(bin, None, "127.0.0.1:0", services, extra_connect)
}

/// `program` run in network namespace `netns` (`ip netns exec`, which execs it: the child's
/// pid is the program's), or here.
pub fn command_in(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns, program]);
            cmd
        }
        None => Command::new(program),
    }
}

/// As [`start_pair_of`], with `expose` in network namespace `expose_netns` listening on
/// `listen`; `connect` runs here.
pub fn start_pair_at(
    bin: &str,
    expose_netns: Option<&str>,
    listen: &str,
    services: &[(&str, &str)],
    extra_connect: &[&str],
) -> TunnelPair {
    let dir = TempDir::new("pair");
    let (id_e, id_c) = (dir.path("expose.pem"), dir.path("connect.pem"));
    let connect_id = peer_id(&id_c);
    let mut cmd = command_in(expose_netns, bin);
    cmd.args([
        "expose",
        "--listen",
        listen,
        "--allow",
        &connect_id,
        "--identity",
    ])
    .arg(&id_e);
    for (name, target) in services {
        cmd.arg("--service").arg(format!("{name}={target}"));
    }
    let expose = Proc::spawn("tunnel expose", &mut cmd);
    let line = expose.line_matching(|l| l.trim_start().starts_with("tunnel connect "));
    let peer = line.split_whitespace().nth(2).unwrap().to_owned();
    let mut cmd = Command::new(bin);
    cmd.args(["connect", &peer, "--identity"]).arg(&id_c);
    for (name, _) in services {
        cmd.arg("--local").arg(format!("127.0.0.1:0={name}"));
    }
    cmd.args(extra_connect);
    let connect = Proc::spawn("tunnel connect", &mut cmd);
    let locals = services
        .iter()
        .map(|(name, _)| {
            let line = connect.line_matching(|l| l.contains(&format!(" -> {name} on ")));
            line.split_whitespace().next().unwrap().to_owned()
        })
        .collect();
    TunnelPair {
        expose,
        connect,
        locals,
        dir,
    }
}

/// Whether `program` is installed. When it is not, tests that need it are skipped loudly,
/// unless TUNNEL_REQUIRE_TOOLS=1 (as in CI), where they fail.
pub fn have(program: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("TUNNEL_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("{program} is required (TUNNEL_REQUIRE_TOOLS=1) but not installed");
        }
        eprintln!("SKIPPED: {program} is not installed (install it, or run .ci/run)");
    }
    found
}

/// Whether GStreamer's RTSP server for python3-gi (the RTSP test camera,
/// tests/fixtures/rtsp_server.py) is installed; as [`have`] when it is not.
pub fn have_gst_rtsp_server() -> bool {
    let found = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import gi; gi.require_version('GstRtspServer', '1.0')",
        ])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("TUNNEL_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("gst-rtsp-server for python3-gi is required (TUNNEL_REQUIRE_TOOLS=1) but not installed");
        }
        eprintln!(
            "SKIPPED: gst-rtsp-server for python3-gi (gir1.2-gst-rtsp-server-1.0) is not installed"
        );
    }
    found
}

/// Waits until something accepts TCP on `addr`: for third-party servers that cannot say
/// when they are ready. Bounded by `WAIT`.
pub fn wait_connectable(addr: &str) {
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing ever accepted on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on 127.0.0.1, for third-party servers that cannot report theirs.
pub fn free_port() -> u16 {
    unused_port()
}

/// A free UDP port on 127.0.0.1, for a `tunnel` whose address a peer must know beforehand.
pub fn free_udp_port() -> u16 {
    unused_port()
}

/// A port of 127.0.0.1 free for both TCP and UDP, taken below the kernel's ephemeral range:
/// a port the kernel hands out (bind to port 0) can be taken again by any outgoing connection
/// of a test running alongside before the server that was given it binds it. Numbers go up
/// from a start drawn from the pid and the clock, so the tests of one binary get different
/// ones.
fn unused_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral < LOW + 1_000 {
        // No room below the range: a port the kernel picks, as before.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let span = ephemeral - LOW;
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        std::process::id().wrapping_mul(7_919).wrapping_add(nanos)
    });
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + start.wrapping_add(n) % span) as u16;
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no port of 127.0.0.1 below {ephemeral} is free for TCP and UDP")
}

/// The last `frame=N` ffmpeg reported in its log.
pub fn ffmpeg_frames(log: &str) -> u32 {
    log.rsplit("frame=")
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
