//! Churn against the real binary: many short lives of connections, RTSP players, relayed
//! sessions and registrations, and what each `tunnel` process holds before and after (open
//! descriptors, UDP sockets, threads, RSS from /proc; tasks, connections, streams, relays and
//! registrations from its SIGUSR1 `counters` line). The "before" is read after a warm-up
//! cycle, so lazily made resources (an epoll, a catalog, a pool thread) are already there.
//!
//! `TUNNEL_CHURN_SCALE` (a float, default 0.1) scales every cycle count: 1.0 runs the full
//! counts named in each test. Tests here run one at a time: they count and time processes on
//! a 2-core machine, and the RTSP one encodes and decodes video.

mod common;
#[path = "common/procstat.rs"]
mod procstat;

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

/// Waits until `needle` occurs at least `n` times in `proc`'s stderr (at most [`SETTLE`]).
fn wait_logged(proc: &Proc, needle: &str, n: usize) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let log = proc.stderr();
        if log.matches(needle).count() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {needle:?} logged fewer than {n} times:\n{}",
            proc.name,
            tail(&log)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// 1,000 (scaled) clients one after the other through `connect --idle-grace 0`, each moving
/// 4 KiB through an echo target and closing: every client opens one QUIC connection and its
/// end closes it. Nothing either process holds grows.
#[test]
fn a_thousand_quic_connections_one_after_another_leak_nothing() {
    let _one = one_at_a_time();
    let n = cycles(1000, 10);
    let echo = Target::echo();
    let pair = start_pair(&[("echo", &echo.addr.to_string())], &["--idle-grace", "0"]);
    let local = pair.locals[0].clone();
    let data = pattern(0, 4096);
    // Warm-up: one whole cycle, its connection closed on both sides.
    echo_cycle(&local, &data).unwrap();
    const CLOSED: &str = "closing the connection: idle";
    wait_logged(&pair.connect, CLOSED, 1);
    settle(&pair.connect, "the warm-up", no_connections);
    settle(&pair.expose, "the warm-up", no_connections);
    echo.wait_idle();
    let before = (figures(&pair.expose), figures(&pair.connect));

    let started = Instant::now();
    let mut warm = (0, 0);
    for i in 0..n {
        if i == n / 4 {
            warm = (rss_kib(&pair.expose), rss_kib(&pair.connect));
        }
        echo_cycle(&local, &data).unwrap_or_else(|e| {
            panic!(
                "cycle {i}: {e}\nconnect:\n{}\nexpose:\n{}",
                tail(&pair.connect.stderr()),
                tail(&pair.expose.stderr())
            )
        });
        // The connection is gone before the next client comes, so that client dials anew
        // (it would reuse a connection still closing).
        wait_logged(&pair.connect, CLOSED, i + 2);
    }
    let took = started.elapsed();
    println!(
        "{n} QUIC connection cycles in {took:?} ({:?} each)",
        took / n as u32
    );

    echo.wait_idle();
    let zero = ["connections", "streams"];
    let after = (
        settled_figures(&pair.expose, &before.0, &zero),
        settled_figures(&pair.connect, &before.1, &zero),
    );
    assert_no_growth("expose", &before.0, warm.0, &after.0, &zero);
    assert_no_growth("connect", &before.1, warm.1, &after.1, &zero);
    for (name, b, a) in [
        ("expose", &before.0, &after.0),
        ("connect", &before.1, &after.1),
    ] {
        let opened =
            get(&a.counters, "connections_opened") - get(&b.counters, "connections_opened");
        assert_eq!(opened, n as u64, "{name}: one connection per cycle");
        let streams = get(&a.counters, "streams_opened") - get(&b.counters, "streams_opened");
        assert_eq!(streams, n as u64, "{name}: one stream per cycle");
    }
}

/// 1,000 idle byte streams, each open end to end (one byte echoed through it, then left
/// open), cost each `tunnel` process at most 16 KiB apiece. The task of a plain byte stream
/// must not carry the RTSP or HTTP layer's state: when it did (their futures inline in every
/// stream's), the connecting side held 22 KiB per idle stream (benchmark: 10,000 streams).
#[test]
fn an_idle_byte_stream_costs_each_side_at_most_16_kib() {
    use std::io::{Read, Write};
    let _one = one_at_a_time();
    const STREAMS: usize = 1000;
    let echo = Target::echo();
    let pair = start_pair(&[("echo", &echo.addr.to_string())], &["--eager"]);
    let local = pair.locals[0].clone();
    let open = || {
        let mut tcp = std::net::TcpStream::connect(&local).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        tcp.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).unwrap();
        tcp
    };
    // Warm-up: lazily made state (the connection's stream maps, the allocator's arenas) exists
    // before the count, and goes back to idle.
    drop((0..100).map(|_| open()).collect::<Vec<_>>());
    echo.wait_idle();
    std::thread::sleep(Duration::from_millis(500));
    let before = (rss_kib(&pair.expose), rss_kib(&pair.connect));
    let held: Vec<_> = (0..STREAMS).map(|_| open()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let after = (rss_kib(&pair.expose), rss_kib(&pair.connect));
    // A process that died reads as 0 KiB: that must not pass as "no growth".
    assert!(
        after.0 > 0 && after.1 > 0,
        "a tunnel process is gone: {after:?}"
    );
    for (side, b, a) in [
        ("expose", before.0, after.0),
        ("connect", before.1, after.1),
    ] {
        let per = a.saturating_sub(b) as f64 / STREAMS as f64;
        println!("{side}: {per:.2} KiB per idle stream ({b} -> {a} KiB)");
        assert!(
            per <= 16.0,
            "{side}: {per:.2} KiB per idle stream ({b} -> {a} KiB for {STREAMS} streams)"
        );
    }
    drop(held);
}

const RTSP_SERVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rtsp_server.py");

/// Frames a normal player decodes before it stops by itself.
const PLAYER_FRAMES: u32 = 10;

/// ffmpeg (its default transport, RTP over UDP) in namespace "c", playing `url`; run
/// without `timeout`, so that the guard's SIGKILL reaches ffmpeg itself (the waits below
/// bound it).
fn player(ns: &Netns, url: &str, name: &str, killed: bool) -> Proc {
    let mut cmd = ns.cmd("c", "ffmpeg");
    cmd.args(["-nostdin", "-hide_banner", "-stats_period", "0.1"])
        .args(["-i", url]);
    if !killed {
        cmd.args(["-frames:v", &PLAYER_FRAMES.to_string()]);
    }
    cmd.args(["-f", "null", "-"]);
    Proc::spawn(name, &mut cmd)
}

/// 1,000 (scaled) ffmpeg players, 4 at a time, through `connect --local` to the GStreamer
/// fixture; every 10th is killed (SIGKILL) once it has decoded video, the others decode
/// their frames and stop. As in tests/rtsp.rs the camera and the players are in two
/// namespaces, so no RTP can reach a player except through the tunnel.
#[test]
fn a_thousand_rtsp_plays_and_kills_leak_nothing() {
    let _one = one_at_a_time();
    if !(have("ffmpeg") && have_gst_rtsp_server()) {
        return;
    }
    if !can_make_namespaces(false) {
        return;
    }
    let n = cycles(1000, 20);
    // Locals drop in reverse order: the processes, then the files, then the namespaces.
    let mut ns = Netns::new("chr");
    ns.pair("s", "198.51.100.1/24", "c", "198.51.100.2/24");
    let dir = TempDir::new("churn-rtsp");
    let mut cmd = ns.cmd("s", "/usr/bin/python3");
    cmd.args([RTSP_SERVER, "0"]);
    let camera = Proc::spawn("rtsp server", &mut cmd);
    let port: u16 = camera.line_matching(|l| l.starts_with("ready "))[6..]
        .trim()
        .parse()
        .unwrap();
    let (expose, connect) = rtsp_pair(&ns, &dir, port);
    let line = connect.line_matching(|l| l.contains(" -> cam on "));
    // One pipeline per client: gst-rtsp-server's shared media fails under killed clients.
    let url = format!("rtsp://{}/own", line.split_whitespace().next().unwrap());
    let logs = || {
        format!(
            "--- expose ---\n{}\n--- connect ---\n{}",
            tail(&expose.stderr()),
            tail(&connect.stderr())
        )
    };
    let idle = |c: &Counters| {
        get(c, "streams") == 0 && get(c, "rtsp_sessions") == 0 && get(c, "media_flows") == 0
    };

    // Warm-up: one player plays to its end; the session and its media flows are gone.
    let mut warm_up = player(&ns, &url, "warm-up player", false);
    assert_eq!(
        warm_up.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        warm_up.stderr()
    );
    settle(&connect, "the warm-up", idle);
    settle(&expose, "the warm-up", idle);
    let before = (figures(&expose), figures(&connect));

    let started = Instant::now();
    let (mut played, mut killed) = (0, 0);
    let mut warm = (0, 0);
    for batch in (0..n).collect::<Vec<_>>().chunks(4) {
        if batch.contains(&(n / 4)) {
            warm = (rss_kib(&expose), rss_kib(&connect));
        }
        let players: Vec<(usize, Proc)> = batch
            .iter()
            .map(|&i| (i, player(&ns, &url, &format!("ffmpeg {i}"), i % 10 == 9)))
            .collect();
        for (i, mut p) in players {
            if i % 10 == 9 {
                // Mid-stream: once it has decoded video, SIGKILL (no TEARDOWN).
                let deadline = Instant::now() + Duration::from_secs(60);
                while ffmpeg_frames(&p.stderr()) < 3 {
                    assert!(
                        Instant::now() < deadline,
                        "{} never played:\n{}\n{}",
                        p.name,
                        p.stderr(),
                        logs()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                p.signal("KILL");
                assert!(p.wait_exit(Duration::from_secs(10)).is_some());
                killed += 1;
            } else {
                let code = p.wait_exit(Duration::from_secs(60));
                let frames = ffmpeg_frames(&p.stderr());
                assert!(
                    code == Some(0) && frames >= PLAYER_FRAMES,
                    "{}: exit {code:?}, {frames} frames:\n{}\n{}",
                    p.name,
                    p.stderr(),
                    logs()
                );
                played += 1;
            }
        }
    }
    let took = started.elapsed();
    println!(
        "{n} RTSP cycles ({played} played {PLAYER_FRAMES} frames, {killed} killed mid-stream), \
         4 at a time, in {took:?} ({:?} each)",
        took / n as u32
    );

    let zero = ["streams", "rtsp_sessions", "media_flows"];
    let after = (
        settled_figures(&expose, &before.0, &zero),
        settled_figures(&connect, &before.1, &zero),
    );
    assert_no_growth("expose (rtsp)", &before.0, warm.0, &after.0, &zero);
    assert_no_growth("connect (rtsp)", &before.1, warm.1, &after.1, &zero);
    drop((expose, connect, camera));
}

/// `tunnel expose` in "s" in front of the camera at `port` (service `cam`), and `tunnel
/// connect` in "c" with `--local 127.0.0.1:0=cam`.
fn rtsp_pair(ns: &Netns, dir: &TempDir, port: u16) -> (Proc, Proc) {
    let (id_e, id_c) = (dir.path("expose.pem"), dir.path("connect.pem"));
    let mut cmd = ns.cmd("s", tunnel_bin());
    cmd.args([
        "expose",
        "--listen",
        "198.51.100.1:0",
        "--allow",
        &peer_id(&id_c),
    ])
    .arg("--identity")
    .arg(&id_e)
    .args(["--service", &format!("cam=rtsp://127.0.0.1:{port}")]);
    let expose = Proc::spawn("tunnel expose", &mut cmd);
    let peer = expose_peer(&expose);
    let mut cmd = ns.cmd("c", tunnel_bin());
    cmd.args(["connect", &peer, "--local", "127.0.0.1:0=cam", "--identity"])
        .arg(&id_c);
    (expose, Proc::spawn("tunnel connect", &mut cmd))
}

/// The `<peer-id>[@addr]` an expose process prints for its peers.
fn expose_peer(expose: &Proc) -> String {
    let line = expose.line_matching(|l| l.trim_start().starts_with("tunnel connect "));
    line.split_whitespace().nth(2).unwrap().to_owned()
}

/// A `tunnel rendezvous` on 127.0.0.1:0; ready; and its address. Every churning peer comes
/// from 127.0.0.1, faster than any real site registers and asks: the per-address rates are
/// raised to let them (the defaults are 60 registrations and 600 requests a minute).
fn rendezvous(identity: &Path) -> (Proc, String) {
    let mut cmd = Command::new(tunnel_bin());
    cmd.env("NO_COLOR", "1")
        .args(["rendezvous", "--listen", "127.0.0.1:0"])
        .args([
            "--register-rate",
            "100/s",
            "--connect-rate",
            "100/s",
            "--identity",
        ])
        .arg(identity);
    let rz = Proc::spawn("tunnel rendezvous", &mut cmd);
    let line = rz.line_matching(|l| l.starts_with("rendezvous listening on "));
    let addr = line.rsplit(' ').next().unwrap().to_owned();
    (rz, addr)
}

/// `tunnel expose --rendezvous rz` of `services`, allowing `allow` (or any peer).
fn expose_at(rz: &str, identity: &Path, allow: Option<&str>, services: &[String]) -> Proc {
    let mut cmd = Command::new(tunnel_bin());
    cmd.env("NO_COLOR", "1")
        .args(["expose", "--listen", "127.0.0.1:0", "--rendezvous", rz])
        .arg("--identity")
        .arg(identity);
    match allow {
        Some(id) => cmd.args(["--allow", id]),
        None => cmd.arg("--allow-any"),
    };
    for s in services {
        cmd.args(["--service", s]);
    }
    Proc::spawn("tunnel expose", &mut cmd)
}

/// Relayed sessions one after another: expose and connect both `--rendezvous`, connect
/// `--force-relay --idle-grace 0`, each client a new QUIC connection through a new relay
/// allocation, released by connect when its connection closes (a peer may hold 8 at once:
/// without the release, the ninth session within a minute got no relay). Expose, connect
/// and the rendezvous come back to their baseline, with no allocation left.
#[test]
fn relayed_sessions_one_after_another_leak_nothing() {
    let _one = one_at_a_time();
    let n = cycles(200, 5);
    let echo = Target::echo();
    let dir = TempDir::new("churn-relay");
    let (rz, rz_addr) = rendezvous(&dir.path("rz.pem"));
    let id_c = dir.path("connect.pem");
    let expose = expose_at(
        &rz_addr,
        &dir.path("expose.pem"),
        Some(&peer_id(&id_c)),
        &[format!("echo={}", echo.addr)],
    );
    let peer = expose_peer(&expose);
    let peer = peer.split('@').next().unwrap();
    let connect = Proc::spawn(
        "tunnel connect",
        Command::new(tunnel_bin())
            .env("NO_COLOR", "1")
            .args(["connect", peer, "--rendezvous", &rz_addr, "--force-relay"])
            .args([
                "--idle-grace",
                "0",
                "--local",
                "127.0.0.1:0=echo",
                "--identity",
            ])
            .arg(&id_c),
    );
    let line = connect.line_matching(|l| l.contains(" -> echo on "));
    let local = line.split_whitespace().next().unwrap().to_owned();
    wait_logged(&expose, "registered with the rendezvous", 1);
    wait_logged(&connect, "registered with the rendezvous", 1);
    let data = pattern(0, 4096);

    const RELAYED: &str = "connected path=relay";
    const CLOSED: &str = "closing the connection: idle";
    echo_cycle(&local, &data).unwrap();
    wait_logged(&connect, CLOSED, 1);
    settle(&connect, "the warm-up", no_connections);
    settle(&expose, "the warm-up", no_connections);
    let before = (figures(&rz), figures(&expose), figures(&connect));

    let started = Instant::now();
    let mut warm = (0, 0);
    for i in 0..n {
        if i == n / 4 {
            warm = (rss_kib(&expose), rss_kib(&connect));
        }
        echo_cycle(&local, &data).unwrap_or_else(|e| {
            panic!(
                "relayed cycle {i}: {e}\nconnect:\n{}\nrendezvous:\n{}",
                tail(&connect.stderr()),
                tail(&rz.stderr())
            )
        });
        wait_logged(&connect, CLOSED, i + 2);
    }
    println!("{n} relayed sessions in {:?}", started.elapsed());
    assert_eq!(
        connect.stderr().matches(RELAYED).count(),
        n + 1,
        "every session went through the relay:\n{}",
        tail(&connect.stderr())
    );

    echo.wait_idle();
    let zero = ["connections", "streams"];
    let after = (
        figures(&rz),
        settled_figures(&expose, &before.1, &zero),
        settled_figures(&connect, &before.2, &zero),
    );
    assert_no_growth("expose (relayed)", &before.1, warm.0, &after.1, &zero);
    assert_no_growth("connect (relayed)", &before.2, warm.1, &after.2, &zero);
    // Every allocation released: the rendezvous is back at its baseline.
    let after_rz = settled_figures(&rz, &before.0, &["relays"]);
    println!("rendezvous before: {}", before.0);
    println!("rendezvous after:  {after_rz}");
    assert_eq!(get(&after_rz.counters, "relays"), 0, "allocations left");
    assert_no_growth(
        "rendezvous (relayed)",
        &before.0,
        before.0.rss_kib,
        &after_rz,
        &["relays"],
    );
    assert!(
        !rz.stderr().contains("relay_peer_quota"),
        "a quota was reached:\n{}",
        tail(&rz.stderr())
    );
}

/// 200 (scaled) `tunnel expose --rendezvous` processes, one after another, each with a
/// fresh identity, registered and then stopped with SIGTERM: the rendezvous comes back to
/// its baseline.
#[test]
fn two_hundred_registrations_and_unregistrations_leak_nothing() {
    let _one = one_at_a_time();
    let n = cycles(200, 10);
    let dir = TempDir::new("churn-register");
    let (rz, rz_addr) = rendezvous(&dir.path("rz.pem"));
    let services = ["web=127.0.0.1:9".to_owned()];
    let life = |i: usize| {
        let mut e = expose_at(&rz_addr, &dir.path(&format!("e{i}.pem")), None, &services);
        wait_logged(&e, "registered with the rendezvous", 1);
        e.signal("TERM");
        assert_eq!(
            e.wait_exit(Duration::from_secs(10)),
            Some(0),
            "expose {i} did not stop on SIGTERM:\n{}",
            e.stderr()
        );
    };
    let idle = |c: &Counters| get(c, "rendezvous_peers") == 0 && get(c, "connections") == 0;
    life(0);
    settle(&rz, "the warm-up", idle);
    let before = figures(&rz);
    let started = Instant::now();
    let mut warm = 0;
    for i in 1..=n {
        if i == n / 4 {
            warm = rss_kib(&rz);
        }
        life(i);
    }
    let took = started.elapsed();
    println!(
        "{n} register/unregister cycles in {took:?} ({:?} each)",
        took / n as u32
    );
    let zero = ["rendezvous_peers", "connections", "streams", "relays"];
    let after = settled_figures(&rz, &before, &zero);
    assert_no_growth("rendezvous", &before, warm, &after, &zero);
}
