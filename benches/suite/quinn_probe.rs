//! quinn alone, memory to memory: the ceiling for the tunnel on a path. Two processes (a
//! server and a client), quinn 0.11 with the tunnel's own transport settings
//! (`Tuning::transport_config`: windows, BBR, MTU discovery), its TLS configuration (same
//! cipher suites, same keys) and its socket buffers, but no TCP hops, no splice, no path
//! layer: what is left between this and the tunnel's figure is the tunnel's own cost.
//!
//! Server: `--quinn-server IP` prints `quinn ADDR PEER-ID`. Client: `--quinn-client ADDR
//! PEER-ID` connects, warms up, prints `ready`, then for each stdin line `U|D BYTES STREAMS`
//! (upload / download over that many parallel streams), `E COUNT` (100-byte echoes on one
//! stream) or `O COUNT` (a new stream per 1-byte request) prints one JSON line.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use serde_json::json;
use tunnel::identity::{Identity, PeerId};
use tunnel::quic::{tls, Tuning};

const ALPN: &[u8] = b"bench-quinn";
const CHUNK: usize = 256 * 1024;

/// A UDP socket as the tunnel binds its own (`quic::bind_udp`, the same buffer sizes).
fn socket(ip: IpAddr) -> UdpSocket {
    tunnel::quic::bind_udp(SocketAddr::new(ip, 0), Tuning::default().socket_buffer).unwrap()
}

/// As the tunnel's endpoint: packets up to 64 KB may be sent where MTU discovery finds them.
fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    c.max_udp_payload_size(tunnel::quic::MAX_UDP_PAYLOAD)
        .unwrap();
    c
}

pub async fn serve(ip: IpAddr) {
    let identity = Identity::generate().unwrap();
    let tls = tls::server_config(&identity, &[ALPN]).unwrap();
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).unwrap()));
    server.transport_config(Arc::new(
        Tuning::default().transport_config(ip.is_loopback()),
    ));
    let ep = quinn::Endpoint::new(
        endpoint_config(),
        Some(server),
        socket(ip),
        quinn::default_runtime().unwrap(),
    )
    .unwrap();
    println!("quinn {} {}", ep.local_addr().unwrap(), identity.peer_id());
    let data = Bytes::from(vec![0x5au8; CHUNK]);
    while let Some(incoming) = ep.accept().await {
        let data = data.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else {
                return;
            };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(serve_stream(send, recv, data.clone()));
            }
        });
    }
}

async fn serve_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, data: Bytes) {
    let mut op = [0u8; 1];
    if recv.read_exact(&mut op).await.is_err() {
        return;
    }
    match op[0] {
        b'D' => {
            let mut len = [0u8; 8];
            if recv.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut left = u64::from_be_bytes(len);
            while left > 0 {
                let k = left.min(CHUNK as u64) as usize;
                if send.write_chunk(data.slice(..k)).await.is_err() {
                    return;
                }
                left -= k as u64;
            }
        }
        b'U' => {
            let mut got = 0u64;
            while let Ok(Some(c)) = recv.read_chunk(usize::MAX, true).await {
                got += c.bytes.len() as u64;
            }
            let _ = send.write_all(&got.to_be_bytes()).await;
        }
        b'O' => {
            let _ = send.write_all(b"h").await;
        }
        _ => {
            let mut buf = [0u8; 100];
            while recv.read_exact(&mut buf).await.is_ok() {
                if send.write_all(&buf).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = send.finish();
    let _ = send.stopped().await;
}

pub async fn client(addr: SocketAddr, peer: PeerId) {
    use std::io::BufRead;
    let identity = Identity::generate().unwrap();
    let local = if addr.is_ipv4() {
        IpAddr::from([0, 0, 0, 0])
    } else {
        IpAddr::from([0u16; 8])
    };
    let mut ep = quinn::Endpoint::new(
        endpoint_config(),
        None,
        socket(local),
        quinn::default_runtime().unwrap(),
    )
    .unwrap();
    let tls = tls::client_config(&identity, Some(peer), Default::default(), ALPN).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    config.transport_config(Arc::new(
        Tuning::default().transport_config(addr.ip().is_loopback()),
    ));
    ep.set_default_client_config(config);
    let conn = ep.connect(addr, "peer").unwrap().await.unwrap();
    // Warm up as the tunnel is warmed: MTU discovery and the congestion window.
    transfer(&conn, false, 8 << 20, 1).await;
    println!("ready");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| w.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(1);
        let out = match w.first().copied() {
            Some(op @ ("U" | "D")) => {
                let (bps, second) = transfer(&conn, op == "U", num(1), num(2)).await;
                json!({ "gbit": bps * 8.0 / 1e9, "second_half_gbit": second * 8.0 / 1e9 })
            }
            Some("E") => json!({ "us": echo(&conn, num(1) as usize).await }),
            Some("O") => json!({ "us": open(&conn, num(1) as usize).await }),
            _ => break,
        };
        println!("{out}");
    }
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
}

/// Moves `total` bytes over `streams` parallel streams of `conn`: bytes/s over the whole
/// transfer and over its second half (`crate::Progress`).
async fn transfer(conn: &quinn::Connection, upload: bool, total: u64, streams: u64) -> (f64, f64) {
    let per = total / streams;
    let progress = crate::Progress::new(per * streams);
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let conn = conn.clone();
        let progress = progress.clone();
        set.spawn(async move {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            if upload {
                send.write_all(b"U").await.unwrap();
                let data = Bytes::from(vec![0xa5u8; CHUNK]);
                let mut left = per;
                while left > 0 {
                    let k = left.min(CHUNK as u64) as usize;
                    send.write_chunk(data.slice(..k)).await.unwrap();
                    left -= k as u64;
                    progress.add(k as u64);
                }
                send.finish().unwrap();
                let mut n = [0u8; 8];
                recv.read_exact(&mut n).await.unwrap();
                assert_eq!(u64::from_be_bytes(n), per, "all bytes arrived");
            } else {
                send.write_all(b"D").await.unwrap();
                send.write_all(&per.to_be_bytes()).await.unwrap();
                let mut n = 0u64;
                while let Some(c) = recv.read_chunk(usize::MAX, true).await.unwrap() {
                    n += c.bytes.len() as u64;
                    progress.add(c.bytes.len() as u64);
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

/// Round trips of 100 bytes each way on one stream, in µs, sorted.
async fn echo(conn: &quinn::Connection, count: usize) -> Vec<f64> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"E").await.unwrap();
    let msg = [7u8; 100];
    let mut buf = [0u8; 100];
    let mut out = Vec::with_capacity(count);
    for i in 0..count + 100 {
        let t = Instant::now();
        send.write_all(&msg).await.unwrap();
        recv.read_exact(&mut buf).await.unwrap();
        if i >= 100 {
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    out.sort_by(f64::total_cmp);
    out
}

/// A new stream per request: open, 1 byte, the server's 1-byte answer; in µs, sorted.
async fn open(conn: &quinn::Connection, count: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"O").await.unwrap();
        let mut b = [0u8; 1];
        recv.read_exact(&mut b).await.unwrap();
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out.sort_by(f64::total_cmp);
    out
}

/// The probe's two processes, driven from the suite: the server in `server_netns` (or here)
/// on `server_ip`, the client here.
pub struct Probe {
    server: crate::process::Proc,
    client: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Probe {
    pub fn start(server_netns: Option<&str>, server_ip: IpAddr) -> Option<Probe> {
        use std::io::BufRead;
        let exe = std::env::current_exe().unwrap();
        let server = crate::process::Proc::spawn(
            "quinn probe server",
            crate::process::command_in(server_netns, exe.to_str().unwrap())
                .args(["--quinn-server", &server_ip.to_string()]),
        );
        let line = server.line_matching(|l| l.starts_with("quinn "));
        let w: Vec<&str> = line.split_whitespace().collect();
        let mut client = std::process::Command::new(&exe)
            .args(["--quinn-client", w[1], w[2]])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = client.stdin.take().unwrap();
        let mut lines = std::io::BufReader::new(client.stdout.take().unwrap()).lines();
        match lines.next() {
            Some(Ok(l)) if l == "ready" => Some(Probe {
                server,
                client,
                stdin,
                lines,
            }),
            other => {
                eprintln!("quinn probe did not start: {other:?}; {}", server.stderr());
                None
            }
        }
    }

    /// The client's answer to `line`, or None (said on stderr) if it failed: a failed probe
    /// costs its own figures, not the suite's.
    fn ask(&mut self, line: &str) -> Option<serde_json::Value> {
        use std::io::Write;
        let sent = writeln!(self.stdin, "{line}").and_then(|()| self.stdin.flush());
        let answer = sent
            .ok()
            .and_then(|()| self.lines.next())
            .and_then(Result::ok);
        let value = answer.as_deref().and_then(|a| serde_json::from_str(a).ok());
        if value.is_none() {
            eprintln!("quinn probe: no answer to {line:?} ({answer:?}); its figures are left out");
        }
        value
    }

    /// The suite's per-round figures (`measure` in suite.rs), memory to memory; None if the
    /// probe failed.
    pub fn measure(&mut self, size: u64) -> Option<std::collections::BTreeMap<String, f64>> {
        self.transfers(
            size,
            &[
                ("upload_1", "U", 1),
                ("download_1", "D", 1),
                ("download_8", "D", 8),
                ("download_64", "D", 64),
            ],
        )
        .and_then(|r| self.latency(r))
    }

    /// `(key, U|D, streams)` transfers of `size` bytes: Gbit/s each, and CPU-seconds per GiB
    /// for the one-stream ones.
    pub fn transfers(
        &mut self,
        size: u64,
        which: &[(&str, &str, u32)],
    ) -> Option<std::collections::BTreeMap<String, f64>> {
        let mut r = std::collections::BTreeMap::new();
        // Both processes, read here from /proc around each transfer (the client's warm-up
        // is before `ready`).
        let pids = [self.server.pid(), self.client.id()];
        for &(key, op, streams) in which {
            let cpu0 = crate::cpu_seconds(&pids);
            let a = self.ask(&format!("{op} {size} {streams}"))?;
            let cpu = crate::cpu_seconds(&pids) - cpu0;
            r.insert(format!("{key}_gbit"), a["gbit"].as_f64()?);
            if let Some(second) = a["second_half_gbit"].as_f64() {
                r.insert(format!("{key}_second_half_gbit"), second);
            }
            if streams == 1 {
                let dir = if op == "U" { "up" } else { "down" };
                r.insert(
                    format!("cpu_s_per_gib_{dir}"),
                    cpu / (size as f64 / crate::GIB as f64),
                );
            }
        }
        Some(r)
    }

    /// Adds the echo and stream-open latencies to `r`.
    fn latency(
        &mut self,
        mut r: std::collections::BTreeMap<String, f64>,
    ) -> Option<std::collections::BTreeMap<String, f64>> {
        let sorted = |v: &serde_json::Value| -> Option<Vec<f64>> {
            let v: Vec<f64> = v["us"]
                .as_array()?
                .iter()
                .filter_map(|x| x.as_f64())
                .collect();
            (!v.is_empty()).then_some(v)
        };
        let echo = sorted(&self.ask("E 5000")?)?;
        r.insert("rtt_p50_us".into(), crate::pct(&echo, 0.5));
        r.insert("rtt_p99_us".into(), crate::pct(&echo, 0.99));
        let open = sorted(&self.ask("O 300")?)?;
        r.insert("open_p50_us".into(), crate::pct(&open, 0.5));
        r.insert("open_p99_us".into(), crate::pct(&open, 0.99));
        Some(r)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.client.kill();
        let _ = self.client.wait();
    }
}
