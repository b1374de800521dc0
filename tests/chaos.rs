//! Chaos against the real binary: a peer killed with SIGKILL mid-stream, the rendezvous
//! killed under a live direct session, and a thousand streams closed from both ends at the
//! same moment. Timings are printed, never asserted (the machine is noisy); behaviour is.

mod common;
#[path = "common/procstat.rs"]
mod procstat;

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::process::*;
use procstat::*;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a download through the tunnel ended.
#[derive(Debug)]
struct Download {
    got: usize,
    /// The read that ended it: `None` for a clean EOF.
    error: Option<std::io::ErrorKind>,
    took: Duration,
}

/// Reads from `tcp` until it ends, checking every byte against [`pattern`] from `offset`;
/// `on_progress(total)` is called after each read. A read that blocks for `hang` counts as
/// hung (panics).
fn download(
    tcp: &mut TcpStream,
    offset: usize,
    hang: Duration,
    mut on_progress: impl FnMut(usize),
) -> Download {
    tcp.set_read_timeout(Some(hang)).unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => {
                return Download {
                    got,
                    error: None,
                    took: started.elapsed(),
                }
            }
            Ok(n) => {
                assert!(
                    buf[..n] == pattern(offset + got, n)[..],
                    "wrong bytes at {}",
                    offset + got
                );
                got += n;
                on_progress(got);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "the client socket hung: no byte and no close for {hang:?} after {got} bytes"
                )
            }
            Err(e) => {
                return Download {
                    got,
                    error: Some(e.kind()),
                    took: started.elapsed(),
                }
            }
        }
    }
}

/// `tunnel expose` on 127.0.0.1:`port` with `identity`, allowing `allow`, of `service`.
fn expose_on(
    port: u16,
    identity: &Path,
    allow: &str,
    service: &str,
    rendezvous: Option<&str>,
) -> Proc {
    let mut cmd = Command::new(tunnel_bin());
    cmd.env("NO_COLOR", "1")
        .args(["expose", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--allow", allow, "--service", service, "--identity"])
        .arg(identity);
    if let Some(rz) = rendezvous {
        cmd.args(["--rendezvous", rz]);
    }
    Proc::spawn("tunnel expose", &mut cmd)
}

/// The `<peer-id>@<addr>` an expose process prints for its peers.
fn expose_peer(expose: &Proc) -> String {
    let line = expose.line_matching(|l| l.trim_start().starts_with("tunnel connect "));
    line.split_whitespace().nth(2).unwrap().to_owned()
}

/// The gist of what connect tells a person when its peer dies: the connection is lost
/// because the peer stopped answering, and the stream that was running is aborted.
fn assert_peer_loss_explained(connect: &Proc) {
    let log = connect.stderr();
    assert!(
        log.contains("connection lost") && log.contains("stopped answering"),
        "connect did not say the connection was lost:\n{}",
        tail(&log)
    );
    assert!(
        log.contains("stream aborted"),
        "connect did not say the stream was aborted:\n{}",
        tail(&log)
    );
}

/// SIGKILL of expose during a long download: connect says so, the client's socket is
/// closed (not left hanging), and once expose is started again (same identity, same port)
/// the next client gets through.
#[test]
fn expose_killed_mid_stream_closes_the_client_and_a_restart_serves_the_next() {
    let _one = one_at_a_time();
    // 64 MiB at about 6 MiB/s: still running when expose dies.
    let target = Target::paced(64 << 20, 64 << 10, Duration::from_millis(10));
    let pair = start_pair(&[("dl", &target.addr.to_string())], &[]);
    let mut expose = pair.expose;
    let connect = pair.connect;
    let local = pair.locals[0].clone();
    let port = expose_port(&connect);

    let mut tcp = TcpStream::connect(&local).unwrap();
    let mut killed_at = None;
    // Past QUIC's idle timeout (30 s), which connect's keep-alive PING (every 10 s)
    // restarts once after the last packet from the dead peer: only a socket nobody ever
    // closes waits this long.
    let hang = Duration::from_secs(60);
    let end = download(&mut tcp, 0, hang, |got| {
        if got >= 1 << 20 && killed_at.is_none() {
            expose.signal("KILL");
            killed_at = Some(Instant::now());
        }
    });
    let killed_at = killed_at.expect("expose was killed");
    assert_eq!(expose.wait_exit(Duration::from_secs(5)), Some(-1));
    println!(
        "expose killed after 1 MiB: the client read {} bytes, then {:?} ({:?} after the kill)",
        end.got,
        end.error.map_or("EOF".into(), |k| format!("{k:?}")),
        killed_at.elapsed()
    );
    assert!(end.got < 64 << 20, "the download cannot have completed");
    // The stream's abort and the connection's loss are logged by two tasks, in either order.
    connect.wait_stderr_for(SETTLE, |l| {
        l.contains("stream aborted") && l.contains("connection lost")
    });
    assert_peer_loss_explained(&connect);
    settle(&connect, "after the peer died", no_connections);

    // The same identity on the same port: the next client is served by the new process.
    let id_c = pair.dir.path("connect.pem");
    let expose = expose_on(
        port,
        &pair.dir.path("expose.pem"),
        &peer_id(&id_c),
        &format!("dl={}", target.addr),
        None,
    );
    expose_peer(&expose);
    let mut tcp = TcpStream::connect(&local).unwrap();
    let mut first = vec![0u8; 1 << 20];
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    tcp.read_exact(&mut first).unwrap_or_else(|e| {
        panic!(
            "the next client got nothing: {e}\n{}",
            tail(&connect.stderr())
        )
    });
    assert!(first == pattern(0, 1 << 20), "the next client's bytes");
    println!(
        "after the restart the next client got its first MiB; {:.1} s from kill to served",
        killed_at.elapsed().as_secs_f64()
    );
}

/// Expose killed and started again at once (same identity, same port): the old
/// connection's next packet (at the latest connect's keep-alive PING, 10 s) reaches the new
/// process, which answers with a stateless reset whose key derives from the identity
/// (src/quic/mod.rs): connect learns at once that the connection is gone ("reset by peer")
/// instead of after the idle timeout, and the client's socket closes then.
/// (It failed until the connection ids, too, were keyed from the identity: quinn dropped the
/// old packets as foreign ids, and connect waited for the idle timeout, about 40 s.)
#[test]
fn a_restarted_expose_resets_the_old_connection_at_once() {
    let _one = one_at_a_time();
    let target = Target::paced(64 << 20, 64 << 10, Duration::from_millis(10));
    let pair = start_pair(&[("dl", &target.addr.to_string())], &[]);
    let (mut old, connect, local) = (pair.expose, pair.connect, pair.locals[0].clone());
    let port = expose_port(&connect);
    let allow = peer_id(&pair.dir.path("connect.pem"));
    let service = format!("dl={}", target.addr);
    let mut new = None;
    let mut killed_at = None;
    let mut tcp = TcpStream::connect(&local).unwrap();
    let end = download(&mut tcp, 0, Duration::from_secs(60), |got| {
        if got >= 1 << 20 && new.is_none() {
            old.signal("KILL");
            assert_eq!(old.wait_exit(Duration::from_secs(5)), Some(-1));
            killed_at = Some(Instant::now());
            let e = expose_on(port, &pair.dir.path("expose.pem"), &allow, &service, None);
            expose_peer(&e);
            new = Some(e);
        }
    });
    println!(
        "expose killed and restarted after 1 MiB: the client read {} bytes, then {:?}, {:?} \
         after the kill",
        end.got,
        end.error,
        killed_at.map(|t| t.elapsed())
    );
    connect.wait_stderr_for(SETTLE, |l| l.contains("connection lost"));
    let log = connect.stderr();
    let lost = log.lines().find(|l| l.contains("connection lost")).unwrap();
    assert!(
        lost.contains("reset"),
        "the restarted expose did not reset the old connection: {lost}"
    );
}

/// The UDP port expose listens on, from connect's argument (`<id>@127.0.0.1:PORT`).
fn expose_port(connect: &Proc) -> u16 {
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", connect.pid())).unwrap();
    String::from_utf8_lossy(&cmdline)
        .split('\0')
        .find_map(|arg| arg.split_once('@'))
        .and_then(|(_, addr)| addr.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok())
        .expect("connect was given <id>@<addr>")
}

/// SIGKILL of the rendezvous while a direct (punched, on loopback) session downloads: the
/// download finishes byte-exact; after the rendezvous is started again on the same port
/// (same identity), a new peer dials the exposing one through it.
#[test]
fn the_rendezvous_killed_under_a_direct_session_leaves_it_running_and_dials_recover() {
    let _one = one_at_a_time();
    // 16 MiB at about 6 MiB/s: a few seconds, the rendezvous dies in the middle.
    const TOTAL: usize = 16 << 20;
    let target = Target::paced(TOTAL, 64 << 10, Duration::from_millis(10));
    let dir = TempDir::new("chaos-rz");
    let rz_identity = dir.path("rz.pem");
    let (mut rz, rz_addr) = rendezvous(&rz_identity, "127.0.0.1:0");
    let (id_1, id_2) = (dir.path("c1.pem"), dir.path("c2.pem"));
    let mut cmd = Command::new(tunnel_bin());
    cmd.env("NO_COLOR", "1")
        .args([
            "expose",
            "--listen",
            "127.0.0.1:0",
            "--rendezvous",
            &rz_addr,
        ])
        .args(["--allow", &peer_id(&id_1), "--allow", &peer_id(&id_2)])
        .args(["--service", &format!("dl={}", target.addr), "--identity"])
        .arg(dir.path("e.pem"));
    let expose = Proc::spawn("tunnel expose", &mut cmd);
    let peer = expose_peer(&expose);
    let peer = peer.split('@').next().unwrap().to_owned();
    let registered = "registered with the rendezvous";
    expose.wait_stderr_for(SETTLE, |l| l.contains(registered));
    let (c1, local) = connect_via(&rz_addr, &peer, &id_1, "c1");

    let mut tcp = TcpStream::connect(&local).unwrap();
    let mut killed = false;
    let end = download(&mut tcp, 0, Duration::from_secs(30), |got| {
        if got >= 1 << 20 && !killed {
            rz.signal("KILL");
            killed = true;
        }
    });
    assert!(killed);
    assert_eq!(rz.wait_exit(Duration::from_secs(5)), Some(-1));
    assert_eq!(
        (end.got, end.error),
        (TOTAL, None),
        "the live download, to its end and FIN:\n{}",
        tail(&c1.stderr())
    );
    assert!(
        c1.stderr().contains("connected path=direct"),
        "the session was direct:\n{}",
        tail(&c1.stderr())
    );
    println!(
        "rendezvous killed 1 MiB into a 16 MiB direct download: it finished byte-exact in {:?}",
        end.took
    );

    // The rendezvous again, same port, same identity: its stateless resets tell the peers
    // their old connections are gone; they register again and a new peer dials through it.
    let restarted = Instant::now();
    let (rz2, _) = rendezvous(&rz_identity, &rz_addr);
    expose.wait_stderr_for(Duration::from_secs(60), |l| {
        l.matches(registered).count() >= 2
    });
    println!(
        "expose registered again {:.1} s after the restart",
        restarted.elapsed().as_secs_f64()
    );
    let (c2, local2) = connect_via(&rz_addr, &peer, &id_2, "c2");
    let mut tcp = TcpStream::connect(&local2).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut first = vec![0u8; 256 << 10];
    tcp.read_exact(&mut first).unwrap_or_else(|e| {
        panic!(
            "a new dial after the restart failed: {e}\n--- c2 ---\n{}\n--- rendezvous ---\n{}",
            tail(&c2.stderr()),
            tail(&rz2.stderr())
        )
    });
    assert!(first == pattern(0, 256 << 10));
    assert!(
        c2.stderr().contains("connected path=direct"),
        "{}",
        tail(&c2.stderr())
    );
}

/// A `tunnel rendezvous` on `listen` with `identity`; ready; and its address.
fn rendezvous(identity: &Path, listen: &str) -> (Proc, String) {
    // The old socket may linger a moment after a SIGKILL: retry the bind, bounded.
    let deadline = Instant::now() + SETTLE;
    loop {
        let mut cmd = Command::new(tunnel_bin());
        cmd.env("NO_COLOR", "1")
            .args(["rendezvous", "--listen", listen, "--identity"])
            .arg(identity);
        let mut rz = Proc::spawn("tunnel rendezvous", &mut cmd);
        let deadline_line = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = rz
                .lines_so_far()
                .into_iter()
                .find(|l| l.starts_with("rendezvous listening on "))
            {
                let addr = line.rsplit(' ').next().unwrap().to_owned();
                return (rz, addr);
            }
            if let Some(code) = rz.wait_exit(Duration::from_millis(20)) {
                assert!(
                    Instant::now() < deadline,
                    "the rendezvous cannot start (exit {code}):\n{}",
                    rz.stderr()
                );
                break;
            }
            assert!(Instant::now() < deadline_line, "{}", rz.stderr());
        }
    }
}

/// `tunnel connect <peer> --rendezvous rz --local 127.0.0.1:0=dl`: the process and its
/// local address.
fn connect_via(rz: &str, peer: &str, identity: &Path, name: &str) -> (Proc, String) {
    let mut cmd = Command::new(tunnel_bin());
    cmd.env("NO_COLOR", "1")
        .args(["connect", peer, "--rendezvous", rz])
        .args(["--local", "127.0.0.1:0=dl", "--identity"])
        .arg(identity);
    let c = Proc::spawn(&format!("tunnel connect {name}"), &mut cmd);
    let line = c.line_matching(|l| l.contains(" -> dl on "));
    let local = line.split_whitespace().next().unwrap().to_owned();
    (c, local)
}

const STORM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/close_storm.py");

/// 1,000 TCP clients through one QUIC connection to a target that closes its end of each
/// at the same moment the client closes its own (tests/fixtures/close_storm.py does both).
/// Everything runs in a throwaway namespace (only its `lo`), so nftables there can count
/// the UDP packets each way between connect and expose's port.
///
/// The bound: each stream's close is, on each side, one FIN on its send half and the
/// acknowledgement of the peer's FIN; even with no two frames ever sharing a packet that
/// is 2 packets per stream per direction. An error storm (resets answered by resets,
/// retransmissions of refused frames) goes past it; QUIC's packing normally stays far below.
#[test]
fn a_thousand_streams_closed_from_both_ends_at_once_end_quietly() {
    let _one = one_at_a_time();
    if !can_make_namespaces(true) {
        return;
    }
    const N: usize = 1000;
    const EXPOSE: u16 = 4433;
    const TARGET: u16 = 9000;
    const LOCAL: u16 = 8000;
    let mut ns = Netns::new("chs");
    ns.add("x");
    ns.nft(
        "x",
        &format!(
            "table inet storm {{\n\
             counter to_expose {{}}\n counter from_expose {{}}\n\
             chain out {{ type filter hook output priority 0; policy accept;\n\
               udp dport {EXPOSE} counter name \"to_expose\"\n\
               udp sport {EXPOSE} counter name \"from_expose\"\n }}\n}}\n"
        ),
    );
    let dir = TempDir::new("chaos-storm");
    let id_c = dir.path("connect.pem");
    let mut cmd = ns.cmd("x", tunnel_bin());
    cmd.args(["expose", "--listen", &format!("127.0.0.1:{EXPOSE}")])
        .args(["--allow", &peer_id(&id_c)])
        .args([
            "--service",
            &format!("storm=127.0.0.1:{TARGET}"),
            "--identity",
        ])
        .arg(dir.path("expose.pem"));
    let expose = Proc::spawn("tunnel expose", &mut cmd);
    let peer = expose_peer(&expose);
    let mut cmd = ns.cmd("x", tunnel_bin());
    cmd.args([
        "connect",
        &peer,
        "--local",
        &format!("127.0.0.1:{LOCAL}=storm"),
    ])
    .arg("--identity")
    .arg(&id_c);
    let connect = Proc::spawn("tunnel connect", &mut cmd);
    connect.line_matching(|l| l.contains(" -> storm on "));

    let go = dir.path("go");
    let mut cmd = ns.cmd("x", "/usr/bin/python3");
    cmd.args([
        STORM,
        &N.to_string(),
        &TARGET.to_string(),
        &LOCAL.to_string(),
    ])
    .arg(&go);
    let storm = Proc::spawn("close storm", &mut cmd);
    storm.line_matching(|l| l == "ready");
    let logs = || {
        format!(
            "--- storm ---\n{}\n--- expose ---\n{}\n--- connect ---\n{}",
            storm.stderr(),
            tail(&expose.stderr()),
            tail(&connect.stderr())
        )
    };
    let opened = Instant::now();
    let line = storm.line_matching(|l| l.starts_with("open ") || l.starts_with("closed"));
    assert_eq!(line, format!("open {N}"), "{}", logs());
    println!("{N} streams open in {:?}", opened.elapsed());
    for p in [&expose, &connect] {
        let c = counters(p);
        assert_eq!(get(&c, "streams"), N as u64, "{}: {c:?}", p.name);
        assert_eq!(
            get(&c, "connections"),
            1,
            "{}: one connection: {c:?}",
            p.name
        );
    }
    let packets = || {
        (
            ns.nft_packets("x", "storm", "to_expose"),
            ns.nft_packets("x", "storm", "from_expose"),
        )
    };
    let before = packets();

    std::fs::write(&go, b"").unwrap();
    let closing = Instant::now();
    let line = storm.line_matching(|l| l.starts_with("closed"));
    let ended = |c: &Counters| get(c, "streams") == 0;
    let (e, c) = (
        settle(&expose, "the closed streams", ended),
        settle(&connect, "the closed streams", ended),
    );
    let took = closing.elapsed();
    let after = packets();
    let (to, from) = (after.0 - before.0, after.1 - before.1);
    println!(
        "{N} streams closed from both ends ({line}); all ended in {took:?}; UDP packets in the \
         close: {to} to expose, {from} from expose ({:.2} and {:.2} per stream); bound {} each way",
        to as f64 / N as f64,
        from as f64 / N as f64,
        2 * N
    );
    assert!(to <= 2 * N as u64 && from <= 2 * N as u64, "{}", logs());
    // The connection itself stays: a stream's end is not a connection's.
    assert_eq!(get(&e, "connections"), 1, "{e:?}");
    assert_eq!(get(&c, "connections"), 1, "{c:?}");
    let errors = |p: &Proc| {
        p.stderr()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .count()
    };
    println!(
        "warnings and errors logged: expose {}, connect {}",
        errors(&expose),
        errors(&connect)
    );
    assert_eq!(errors(&expose) + errors(&connect), 0, "{}", logs());
}
