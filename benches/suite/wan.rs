//! The long path: a 100 ms round trip through a 1 Gbit/s bottleneck, 1500-byte MTU: can one
//! stream fill a fast link far away (flow-control windows against the bandwidth-delay
//! product, 12.5 MB here), and what the others get on the same link.
//!
//! Three network namespaces: A (the clients' side, 198.51.100.1), M (the link) and B (the
//! servers' side, 198.51.100.2), a veth pair between A and M and another between M and B,
//! MTU 1500. This kernel has no netem, so in M a link emulator (this binary,
//! `--link-emulator`) reads every frame from one veth with a packet socket and writes it to
//! the other 50 ms later, each way; `tbf` on M's two veths (1 Gbit/s, a queue of 50 ms) is the
//! bottleneck, dropping what overflows it. Segmentation offload stays on: a 64 KB TCP or UDP
//! super-frame crosses the emulator as one frame with its offload header (with offloads off,
//! one emulator thread per direction saturated a core at ~0.77 Gbit/s of 1,514-byte frames;
//! with them, ~14% of a core at 0.95). The worker
//! (`--worker-wan`) runs in A like the veth path's: the target servers and the exposing
//! halves in B, one stream up and one down per system, with the CPU it took.
//!
//! Neither A nor B has a route anywhere else, so dumbpipe runs here as the others do.

use std::collections::VecDeque;
use std::ffi::CString;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::process::{command_in, Proc};
use crate::veth::{ip, Netns};
use crate::{env_num, factories, medians, push_all, wanted, Place, Results, QUINN};

const CLIENT_IP: [u8; 4] = [198, 51, 100, 1];
const SERVER_IP: [u8; 4] = [198, 51, 100, 2];
/// One way; the round trip is twice this.
pub const DELAY_MS: u64 = 50;
/// The bottleneck, as `tc` reads it, and its queue (`tbf latency`).
pub const RATE: &str = "1gbit";
const RATE_LABEL: &str = "1 Gbit/s";
pub const QUEUE: &str = "50ms";

/// `BENCH_WAN_TCP_BUFFER`: how far kernel TCP's buffers may grow in A and B (None: Linux's
/// defaults, 6 MB to receive and 4 MB to send at most).
fn tcp_buffer() -> Option<u64> {
    std::env::var("BENCH_WAN_TCP_BUFFER").ok()?.parse().ok()
}

/// The three namespaces, the emulator in M (killed with M) and what joins them.
struct Lab {
    _emulator: Proc,
    a: Netns,
    b: Netns,
    m: Netns,
    /// M's veths, whose queues are the bottleneck each way.
    toward_a: String,
    toward_b: String,
}

impl Lab {
    fn new() -> Option<Lab> {
        let tag = std::process::id();
        let made = Netns::add(format!("twa{tag}")).and_then(|a| {
            let m = Netns::add(format!("twm{tag}"))?;
            Some((a, m, Netns::add(format!("twb{tag}"))?))
        });
        let Some((a, m, b)) = made else {
            eprintln!("wan: cannot make three network namespaces (not root?): skipped");
            return None;
        };
        let (wa, wma, wb, wmb) = (
            format!("wa{tag}"),
            format!("wma{tag}"),
            format!("wb{tag}"),
            format!("wmb{tag}"),
        );
        let joined = ip(&[
            "link", "add", &wa, "netns", &a.0, "type", "veth", "peer", "name", &wma, "netns", &m.0,
        ]) && ip(&[
            "link", "add", &wb, "netns", &b.0, "type", "veth", "peer", "name", &wmb, "netns", &m.0,
        ]) && ip(&["-n", &a.0, "addr", "add", "198.51.100.1/24", "dev", &wa])
            && ip(&["-n", &b.0, "addr", "add", "198.51.100.2/24", "dev", &wb])
            && [(&a.0, &wa), (&m.0, &wma), (&m.0, &wmb), (&b.0, &wb)]
                .iter()
                .all(|(ns, dev)| ip(&["-n", ns, "link", "set", dev, "mtu", "1500", "up"]));
        let shaped = joined
            && [&wma, &wmb].iter().all(|dev| {
                Command::new("tc")
                    .args(["-n", &m.0, "qdisc", "add", "dev", dev, "root", "tbf"])
                    .args(["rate", RATE, "burst", "256k", "latency", QUEUE])
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            });
        if !shaped {
            eprintln!("wan: cannot build the link (needs root, ip, tc and tbf): skipped");
            return None;
        }
        // `BENCH_WAN_TCP_BUFFER=BYTES`: kernel TCP's buffers may grow that far in A and B
        // (Linux's default, 6 MB, caps one TCP connection near 0.2 Gbit/s at 100 ms).
        if let Some(max) = tcp_buffer() {
            for ns in [&a.0, &b.0] {
                for key in ["net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"] {
                    let set = Command::new("ip")
                        .args(["netns", "exec", ns, "sysctl", "-qw"])
                        .arg(format!("{key}=4096 131072 {max}"))
                        .status()
                        .is_ok_and(|s| s.success());
                    assert!(set, "wan: cannot set {key} in {ns}");
                }
            }
        }
        let exe = std::env::current_exe().unwrap();
        let emulator = Proc::spawn(
            "link emulator",
            command_in(Some(&m.0), exe.to_str().unwrap()).args([
                "--link-emulator",
                &wma,
                &wmb,
                &DELAY_MS.to_string(),
            ]),
        );
        emulator.line_matching(|l| l == "ready");
        Some(Lab {
            a,
            b,
            m,
            _emulator: emulator,
            toward_a: wma,
            toward_b: wmb,
        })
    }
}

/// The long path's rounds: `{ "raw": …, "median": …, "rtt_ms": 100, "rate": "1gbit" }`, or
/// null when the namespaces cannot be made.
pub fn run() -> Value {
    let Some(lab) = Lab::new() else {
        return Value::Null;
    };
    eprintln!(
        "wan: {} ms round trip, {RATE} bottleneck between namespaces {} and {} (link in {})",
        2 * DELAY_MS,
        lab.a.0,
        lab.b.0,
        lab.m.0
    );
    // Bounded: a stalled transfer must not hold the suite (and the namespaces) forever. One
    // round of 1 GiB takes ~10 minutes (the TCP tunnels move ~0.22 Gbit/s, dumbpipe ~0.09).
    let gib = env_num("BENCH_WAN_BYTES", 1 << 30)
        .div_ceil(crate::GIB)
        .max(1);
    let limit = 2400 * env_num("BENCH_WAN_ROUNDS", 1).max(1) * gib;
    let out = crate::veth::run_worker(
        limit,
        &lab.a.0,
        &[
            "--worker-wan",
            &lab.a.0,
            &lab.b.0,
            &lab.m.0,
            &lab.toward_a,
            &lab.toward_b,
        ],
    );
    drop(lab);
    out.unwrap_or_else(|| {
        eprintln!("wan: the worker gave no results");
        Value::Null
    })
}

/// In namespace A: the target servers in B, then one stream up and down through every
/// system (`BENCH_WAN_BYTES` each, default 1 GiB; `BENCH_WAN_ROUNDS`, default 1), with what
/// crossed the bottleneck for it (`tc`'s counters of M's veth toward the receiver).
pub async fn worker(args: &[&str]) {
    let [_a, b, m, toward_a, toward_b] = args else {
        panic!("--worker-wan A B M DEV-TOWARD-A DEV-TOWARD-B");
    };
    let rounds = env_num("BENCH_WAN_ROUNDS", 1) as usize;
    let size = env_num("BENCH_WAN_BYTES", 1 << 30);
    let (_targets, addrs) = crate::veth::targets_in(b, IpAddr::from(SERVER_IP));
    let place = Place {
        server_netns: Some(b.to_string()),
        server_ip: IpAddr::from(SERVER_IP),
        client_ip: IpAddr::from(CLIENT_IP),
    };
    let mut systems = factories(&place, addrs[0], addrs[1]);
    // The tunnel with quinn's Cubic instead of its default (BBR) on both sides: a script that
    // runs the same binary with TUNNEL_CONGESTION=cubic.
    let scripts = crate::process::TempDir::new("wan-cubic");
    let cubic = scripts.path("tunnel-cubic");
    std::fs::write(
        &cubic,
        format!(
            "#!/bin/sh\nTUNNEL_CONGESTION=cubic exec {} \"$@\"\n",
            crate::process::tunnel_bin()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cubic, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let p = place.clone();
    let (bulk_addr, greet_addr) = (addrs[0], addrs[1]);
    systems.insert(
        2,
        (
            CUBIC,
            Box::new(move || {
                let bin = cubic.to_str().unwrap();
                Some(crate::tunnel_of(bin, CUBIC, &p, bulk_addr, greet_addr))
            }),
        ),
    );
    let link = Link {
        ns: m.to_string(),
        toward_a: toward_a.to_string(),
        toward_b: toward_b.to_string(),
    };
    let mut results = Results::new();
    for round in 0..rounds {
        let round = format!("wan round {}/{rounds}", round + 1);
        for (name, make) in &systems {
            let Some(sys) = crate::start_system(name, make, &round).await else {
                continue;
            };
            let pids = sys.pids();
            let r = results.entry(sys.name.clone()).or_default();
            for upload in [true, false] {
                let before = link.counters(upload);
                push_all(r, crate::one_way(sys.bulk, size, &pids, upload).await);
                push_all(r, link.since(before, upload, size));
            }
        }
        if wanted(QUINN) {
            eprintln!("{round}: {QUINN}");
            if let Some(mut probe) = crate::quinn_probe::Probe::start(place.ns(), place.server_ip) {
                let r = results.entry(QUINN.into()).or_default();
                for (upload, which) in [
                    (true, ("upload_1", "U", 1)),
                    (false, ("download_1", "D", 1)),
                ] {
                    let before = link.counters(upload);
                    let Some(m) = tokio::task::block_in_place(|| probe.transfers(size, &[which]))
                    else {
                        break;
                    };
                    push_all(r, m);
                    push_all(r, link.since(before, upload, size));
                }
            }
        }
    }
    println!(
        "{}",
        json!({
            "rtt_ms": 2 * DELAY_MS, "rate": RATE, "rate_label": RATE_LABEL, "queue": QUEUE,
            "mtu": 1500, "tcp_buffer": tcp_buffer(),
            "bytes_per_transfer": size, "rounds": rounds,
            "raw": results, "median": medians(&results),
        })
    );
}

/// The tunnel with Cubic (`--congestion cubic` on both sides).
const CUBIC: &str = "tunnel, --congestion cubic";

/// The bottleneck's two queues (`tbf` on M's veths), read with `tc`.
struct Link {
    ns: String,
    toward_a: String,
    toward_b: String,
}

impl Link {
    /// Bytes sent and packets dropped so far by the queue a transfer's data crosses (toward B
    /// for an upload). Segmentation super-frames count as one packet.
    fn counters(&self, upload: bool) -> Option<(f64, f64)> {
        let dev = if upload {
            &self.toward_b
        } else {
            &self.toward_a
        };
        let out = Command::new("tc")
            .args(["-n", &self.ns, "-s", "qdisc", "show", "dev", dev])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        let after = |w: &str| {
            let i = words.iter().position(|x| *x == w)?;
            words.get(i + 1)?.trim_end_matches(',').parse::<f64>().ok()
        };
        Some((after("Sent")?, after("(dropped")?))
    }

    /// What crossed the bottleneck for one transfer of `size` bytes since `before`: bytes per
    /// payload byte (headers and every retransmission) and packets it dropped.
    fn since(&self, before: Option<(f64, f64)>, upload: bool, size: u64) -> Vec<(String, f64)> {
        let dir = if upload { "up" } else { "down" };
        match (before, self.counters(upload)) {
            (Some((s0, d0)), Some((s1, d1))) => vec![
                (
                    format!("link_bytes_per_byte_{dir}"),
                    (s1 - s0) / size as f64,
                ),
                (format!("dropped_{dir}"), d1 - d0),
            ],
            _ => Vec::new(),
        }
    }
}

/// The link emulator (in M): every frame that arrives on `a` leaves on `b` `delay_ms` later,
/// and the other way round; one thread per direction.
pub fn emulate(a: &str, b: &str, delay_ms: u64) {
    let delay = Duration::from_millis(delay_ms);
    let (fa, fb) = (packet_socket(a), packet_socket(b));
    println!("ready");
    std::thread::spawn(move || forward(fa, fb, delay));
    forward(fb, fa, delay);
}

/// A raw packet socket on interface `name` that does not see its own sends.
fn packet_socket(name: &str) -> RawFd {
    const PACKET_VNET_HDR: libc::c_int = 15;
    const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket calls on a descriptor made here; every pointer is to a local of
    // the size passed with it.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto));
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let cname = CString::new(name).unwrap();
        let index = libc::if_nametoindex(cname.as_ptr());
        assert!(index != 0, "no interface {name}");
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        let bound = libc::bind(
            fd,
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert!(
            bound == 0,
            "bind to {name}: {}",
            std::io::Error::last_os_error()
        );
        let one: libc::c_int = 1;
        let size: libc::c_int = 32 << 20;
        for (level, opt, value) in [
            (libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, &one),
            // Frames come with the kernel's offload header (segmentation, checksum) and go
            // out with it unchanged: a 64 KB TCP or UDP super-frame crosses as one, as it
            // crosses a veth, and is cut into MTU-sized packets where a real NIC would.
            (libc::SOL_PACKET, PACKET_VNET_HDR, &one),
            (libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &size),
            (libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &size),
        ] {
            let set = libc::setsockopt(
                fd,
                level,
                opt,
                std::ptr::from_ref(value).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
            assert!(
                set == 0,
                "socket option {opt} on {name}: {}",
                std::io::Error::last_os_error()
            );
        }
        fd
    }
}

/// Frames from `from` to `to`, each held for `delay` (arrival order kept: the delay is the
/// same for all). What the bottleneck's queue cannot take is dropped there (`tbf`, counted
/// by `tc`); any other failure to take or give a frame is said on stderr, so a report of no
/// drops means none.
fn forward(from: RawFd, to: RawFd, delay: Duration) {
    let failed = |what: &str| {
        let e = std::io::Error::last_os_error();
        eprintln!("link emulator: {what} failed: {e} (a frame lost outside the bottleneck)");
    };
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    // An offload header and a frame of up to 64 KB (a segmentation super-frame).
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let wait = queue.front().map_or(Duration::from_secs(1), |(due, _)| {
            due.saturating_duration_since(Instant::now())
        });
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(wait.subsec_nanos() as i32),
        };
        let mut pfd = libc::pollfd {
            fd: from,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd and a timespec, both locals.
        unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        // At most 256 frames before the due ones go out, so a flood cannot delay them much.
        for _ in 0..256 {
            // SAFETY: `buf` is writable for its length.
            let n =
                unsafe { libc::recv(from, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                let again =
                    std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock;
                if !again {
                    failed("recv");
                }
                break;
            }
            queue.push_back((Instant::now() + delay, buf[..n as usize].to_vec()));
        }
        let now = Instant::now();
        while queue.front().is_some_and(|(due, _)| *due <= now) {
            let (_, frame) = queue.pop_front().unwrap();
            // SAFETY: `frame` is readable for its length. A full bottleneck queue refuses
            // the frame (ENOBUFS): dropped, as a router would, and counted by `tc`.
            let sent = unsafe { libc::send(to, frame.as_ptr().cast(), frame.len(), 0) };
            if sent < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOBUFS) {
                failed("send");
            }
        }
    }
}
