#!/usr/bin/python3
"""Web page load and bulk download benchmark (part of bench/run.sh; as root): headless Chromium
loading a page with 60 assets (scripts of 10 KB each, fetched in parallel by Chromium's preload
scanner, six connections per host) from nginx, and curl downloading one large file (one
stream) from the same nginx, over a link of 20 ms each way with 1% loss each way
(tests/natlab/delay.py in a namespace between the two sides: this kernel has no netem).

Systems, alternating in every round, a fresh Chromium profile (cold cache, new connections)
each load, the tunnel and rathole already connected:
- direct: Chromium in the client namespace straight to nginx across the link (the baseline);
- tunnel --http: http://web.peer.localhost:PORT/ (the HTTP layer, one QUIC connection);
- tunnel byte service: a --local port of a tcp service (the same stream per socket, no HTTP layer);
- rathole: its visitor port (each socket a new TCP connection from its client to its server).

The load time is the page's own `loadEventStart` (navigation start to the load event), read
from the DOM Chromium dumps. Each round then downloads the bulk file once through every
system, in the same order: Mbit/s = bytes / curl's time_total (connect to last byte). While it
runs, the sender's view of the link is sampled every 0.5 s: `ss -ti` of the busiest TCP
socket in the server's namespace (nginx's for direct, rathole client's data channel), or the
exposing tunnel's `tunnel status --json` (QUIC's lost and sent packets over the download).

Writes docs/bench/http.md and docs/bench/http.json (HTTP_BENCH_OUT=DIR: there instead); the
section of http.md from "## What limits the figures" on is written by hand and kept.
Environment: TUNNEL_CONGESTION=cubic (read by both tunnel processes; default bbr),
HTTP_BENCH_TCP_CC=cubic (the kernel's TCP congestion control across the link, set on the
route in both namespaces; default what new namespaces inherit from the host).
Usage: http_bench.py [TUNNEL_BINARY] [ROUNDS] [BULK_MIB]"""
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNNEL = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/tunnel")
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 9
BULK_MIB = int(sys.argv[3]) if len(sys.argv) > 3 else 64
OUT = os.environ.get("HTTP_BENCH_OUT", os.path.join(ROOT, "docs/bench"))
TCP_CC = os.environ.get("HTTP_BENCH_TCP_CC")
QUIC_CC = os.environ.get("TUNNEL_CONGESTION", "bbr")
NOTES = "## What limits the figures"
DELAY = os.path.join(ROOT, "tests/natlab/delay.py")
TAG = f"hb{os.getpid() % 10000}"
DELAY_MS, LOSS_PCT = 20, 1
ASSETS, ASSET_BYTES = 60, 10_000
CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"]
procs, namespaces, dirs = [], [], []


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


def ns(name, *args):
    return ["ip", "netns", "exec", name, *args]


def spawn(args, log=None, **kw):
    err = open(log, "w") if log else subprocess.DEVNULL
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, **kw)
    if log:
        err.close()
    procs.append(p)
    return p


def line(p, pred):
    for ln in p.stdout:
        if pred(ln):
            return ln
    raise SystemExit("process ended early")


def netns(name):
    sh("ip", "netns", "add", name)
    namespaces.append(name)
    sh("ip", "-n", name, "link", "set", "lo", "up")


def no_offloads(name, dev):
    for f in ("tx", "gro", "gso", "tso", "tx-udp-segmentation"):
        sh("ip", "netns", "exec", name, "ethtool", "-K", dev, f, "off", check=False)


def addr(name, dev, cidr):
    sh("ip", "-n", name, "addr", "add", cidr, "dev", dev)
    sh("ip", "-n", name, "link", "set", dev, "up")


def wait_port(where, host, port):
    for _ in range(200):
        if sh(*ns(where, "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"), check=False).returncode == 0:
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {host}:{port} in {where}")


def setup():
    s, c, m = f"{TAG}-s", f"{TAG}-c", f"{TAG}-m"
    for n in (s, c, m):
        netns(n)
    tcp_cc = TCP_CC or sh(*ns(s, "sysctl", "-n", "net.ipv4.tcp_congestion_control")).stdout.strip()
    sh("ip", "link", "add", f"{TAG}a", "netns", s, "type", "veth", "peer", "name", f"{TAG}am", "netns", m)
    sh("ip", "link", "add", f"{TAG}b", "netns", c, "type", "veth", "peer", "name", f"{TAG}bm", "netns", m)
    for dev in (f"{TAG}am", f"{TAG}bm"):
        sh("ip", "-n", m, "link", "set", dev, "up")
        no_offloads(m, dev)
    no_offloads(s, f"{TAG}a")
    no_offloads(c, f"{TAG}b")
    relay = spawn(ns(m, "python3", "-u", DELAY, f"{TAG}am", f"{TAG}bm", str(DELAY_MS), str(LOSS_PCT)))
    line(relay, lambda l: l.startswith("ready"))
    addr(s, f"{TAG}a", "198.51.100.1/24")
    addr(c, f"{TAG}b", "198.51.100.2/24")
    if TCP_CC:
        # Per route: a namespace's own default may not be set here (EPERM).
        for n, dev, ip in ((s, f"{TAG}a", "198.51.100.1"), (c, f"{TAG}b", "198.51.100.2")):
            sh("ip", "-n", n, "route", "replace", "198.51.100.0/24", "dev", dev, "src", ip, "congctl", TCP_CC)
    work = f"/tmp/{TAG}"
    www = f"{work}/www"
    os.makedirs(www, exist_ok=True)
    dirs.append(work)
    page = ["<!doctype html><html><head><title>loading</title></head><body>"]
    for i in range(ASSETS):
        with open(f"{www}/a{i}.js", "w") as f:
            f.write("/*" + "x" * (ASSET_BYTES - 40) + "*/\nwindow.n=(window.n||0)+1;\n")
        page.append(f'<script src="a{i}.js"></script>')
    page.append("<script>addEventListener('load',()=>{const e=performance.getEntriesByType"
                "('navigation')[0];document.title='loaded '+e.loadEventStart.toFixed(1)+' '+window.n;});"
                "</script></body></html>")
    with open(f"{www}/index.html", "w") as f:
        f.write("\n".join(page))
    with open(f"{www}/bulk.bin", "wb") as f:
        for _ in range(BULK_MIB):
            f.write(os.urandom(1 << 20))
    conf = f"{work}/nginx.conf"
    with open(conf, "w") as f:
        f.write(f"daemon off;\nmaster_process off;\npid {work}/nginx.pid;\nerror_log stderr;\n"
                f"events {{ worker_connections 256; }}\nhttp {{\n access_log off;\n"
                f" client_body_temp_path {work}/body;\n proxy_temp_path {work}/proxy;\n"
                f" fastcgi_temp_path {work}/fcgi;\n uwsgi_temp_path {work}/uwsgi;\n scgi_temp_path {work}/scgi;\n"
                f" types {{ text/html html; application/javascript js; }}\n"
                f" server {{ listen 198.51.100.1:8080; listen 127.0.0.1:8080; root {www}; }}\n}}\n")
    spawn(ns(s, "nginx", "-c", conf, "-p", work), log=f"{work}/nginx.log")
    wait_port(s, "127.0.0.1", 8080)
    # The tunnel: a web service and the same server as bytes.
    cid = sh(TUNNEL, "id", "--identity", f"{work}/c.pem").stdout.strip()
    env = dict(os.environ, NO_COLOR="1", RUST_LOG="warn")
    exp = spawn(ns(s, TUNNEL, "expose", "--listen", "198.51.100.1:0", "--allow", cid,
                   "--identity", f"{work}/e.pem", "--service", "web=http://127.0.0.1:8080",
                   "--service", "raw=127.0.0.1:8080"), log=f"{work}/expose.log", env=env)
    peer = line(exp, lambda l: l.strip().startswith("tunnel connect")).split()[2]
    con = spawn(ns(c, TUNNEL, "connect", peer, "--eager", "--identity", f"{work}/c.pem",
                   "--http", "127.0.0.1:18080", "--local", "127.0.0.1:18081=raw"),
                log=f"{work}/connect.log", env=env)
    line(con, lambda l: "-> http:" in l)
    # rathole: its server on the client's side (where visitors connect), its client next to
    # nginx; each visitor socket makes the client open a new TCP connection to the server.
    with open(f"{work}/rs.toml", "w") as f:
        f.write('[server]\nbind_addr = "198.51.100.2:2333"\n[server.services.web]\n'
                'token = "bench"\nbind_addr = "127.0.0.1:18082"\n')
    with open(f"{work}/rc.toml", "w") as f:
        f.write('[client]\nremote_addr = "198.51.100.2:2333"\n[client.services.web]\n'
                'token = "bench"\nlocal_addr = "127.0.0.1:8080"\n')
    spawn(ns(c, "rathole", "--server", f"{work}/rs.toml"), log=f"{work}/rathole-server.log")
    wait_port(c, "198.51.100.2", 2333)
    spawn(ns(s, "rathole", "--client", f"{work}/rc.toml"), log=f"{work}/rathole-client.log")
    wait_port(c, "127.0.0.1", 18082)
    systems = {
        "direct": "http://198.51.100.1:8080/index.html",
        "tunnel --http": "http://web.peer.localhost:18080/index.html",
        "tunnel byte service": "http://127.0.0.1:18081/index.html",
        "rathole": "http://127.0.0.1:18082/index.html",
    }
    # curl does not resolve *.localhost by itself in every version: say where it is.
    bulk_args = {
        "direct": ["http://198.51.100.1:8080/bulk.bin"],
        "tunnel --http": ["--resolve", "web.peer.localhost:18080:127.0.0.1",
                          "http://web.peer.localhost:18080/bulk.bin"],
        "tunnel byte service": ["http://127.0.0.1:18081/bulk.bin"],
        "rathole": ["http://127.0.0.1:18082/bulk.bin"],
    }
    # Warm every path once (the tunnel's connection, rathole's control channel, nginx's cache).
    for url in systems.values():
        load(c, work, url)
    return s, c, work, systems, bulk_args, tcp_cc


def load(where, work, url):
    """One cold page load in a fresh profile: ms to the load event, or None."""
    profile = f"{work}/profile"
    shutil.rmtree(profile, ignore_errors=True)
    r = subprocess.run(ns(where, "timeout", "60", *CHROMIUM, f"--user-data-dir={profile}",
                          "--dump-dom", url), capture_output=True, text=True)
    m = re.search(r"<title>loaded ([0-9.]+) (\d+)</title>", r.stdout)
    if not m or int(m.group(2)) != ASSETS:
        return None
    return float(m.group(1))


def tcp_sample(sender):
    """The busiest established TCP socket toward the client in the server's namespace, from
    `ss -ti`: its congestion control, cwnd and retransmitted share so far."""
    out = sh(*ns(sender, "ss", "-tinH", "state", "established", "dst", "198.51.100.2"), check=False).stdout
    best = None
    for info in (ln for ln in out.splitlines() if ln[:1].isspace()):
        f = dict(kv.split(":", 1) for kv in info.split() if ":" in kv)
        acked = int(f.get("bytes_acked", 0))
        if best is None or acked > best["acked"]:
            cc = next((w for w in info.split() if w in ("bbr", "cubic", "reno")), "?")
            sent = int(f.get("bytes_sent", 0))
            best = {"cc": cc, "acked": acked, "cwnd_kib": int(f.get("cwnd", 0)) * int(f.get("mss", 0)) / 1024,
                    "rtt_ms": float(f.get("rtt", "0/0").split("/")[0]),
                    "loss_pct": 100 * int(f.get("bytes_retrans", 0)) / sent if sent else 0.0}
    return best


def quic_stats(work):
    """The exposing tunnel's one QUIC connection, from its control socket."""
    r = sh(TUNNEL, "status", "--json", "--identity", f"{work}/e.pem", check=False)
    try:
        st = json.loads(r.stdout)
        return (st.get("result") or st)["connections"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def bulk(where, sender, work, args, quic):
    """One download of the bulk file: (Mbit/s or None, the sender's figures or None)."""
    before = quic_stats(work) if quic else None
    p = spawn(ns(where, "curl", "-sS", "-o", "/dev/null", "--max-time", "600",
                 "-w", "%{http_code} %{size_download} %{time_total}", *args))
    sample, cwnds, rtts = None, [], []
    while True:
        try:
            out, _ = p.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if quic:
                st = quic_stats(work)
                if st:
                    cwnds.append(st["cwnd_bytes"] / 1024)
                    rtts.append(st["rtt_ms"])
            else:
                sample = tcp_sample(sender) or sample
    procs.remove(p)
    if quic:
        after = quic_stats(work)
        if before and after:
            sent = after["sent_packets"] - before["sent_packets"]
            sample = {"cc": QUIC_CC, "cwnd_kib": statistics.median(cwnds) if cwnds else after["cwnd_bytes"] / 1024,
                      "rtt_ms": statistics.median(rtts) if rtts else after["rtt_ms"],
                      "loss_pct": 100 * (after["lost_packets"] - before["lost_packets"]) / sent if sent else 0.0}
    parts = out.split()
    if p.returncode != 0 or len(parts) != 3 or parts[0] != "200" or int(parts[1]) != BULK_MIB << 20:
        return None, sample
    return int(parts[1]) * 8 / float(parts[2]) / 1e6, sample


def cleanup():
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    for n in namespaces:
        sh("ip", "netns", "del", n, check=False)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def main():
    try:
        sender, where, work, systems, bulk_args, tcp_cc = setup()
        names = list(systems)
        times = {n: [] for n in names}
        failed = {n: 0 for n in names}
        rates = {n: [] for n in names}
        bulk_failed = {n: 0 for n in names}
        senders = {n: [] for n in names}
        for r in range(ROUNDS):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                t = load(where, work, systems[n])
                if t is None:
                    failed[n] += 1
                else:
                    times[n].append(t)
            print(f"round {r + 1}/{ROUNDS}: " + ", ".join(
                f"{n} {times[n][-1]:.0f} ms" if times[n] else f"{n} -" for n in names), flush=True)
            for n in order:
                mbit, sample = bulk(where, sender, work, bulk_args[n], n.startswith("tunnel"))
                if mbit is None:
                    bulk_failed[n] += 1
                else:
                    rates[n].append(mbit)
                if sample:
                    senders[n].append(sample)
                print(f"  bulk {n}: " + (f"{mbit:.1f} Mbit/s" if mbit else "failed") + (
                    f" ({sample['cc']}, cwnd {sample['cwnd_kib']:.0f} KiB, rtt {sample['rtt_ms']:.0f} ms, "
                    f"lost {sample['loss_pct']:.2f}%)" if sample else ""), flush=True)
    finally:
        cleanup()
    rtt = 2 * DELAY_MS
    base = statistics.median(times["direct"])
    rows = []
    for n in names:
        t = sorted(times[n])
        med = statistics.median(t) if t else None
        rows.append({
            "system": n, "median_ms": med, "min_ms": t[0] if t else None, "max_ms": t[-1] if t else None,
            "loads": len(t), "failed": failed[n],
            "vs_direct_ms": None if med is None else med - base,
        })
    bulk_base = statistics.median(rates["direct"]) if rates["direct"] else None
    bulk_rows = []
    for n in names:
        v = sorted(rates[n])
        med = statistics.median(v) if v else None
        snd = senders[n]
        bulk_rows.append({
            "system": n, "median_mbit_s": med, "min_mbit_s": v[0] if v else None,
            "max_mbit_s": v[-1] if v else None, "downloads": len(v), "failed": bulk_failed[n],
            "vs_direct": med / bulk_base if med and bulk_base else None, "rounds_mbit_s": rates[n],
            "sender_cc": snd[0]["cc"] if snd else None,
            "sender_loss_pct": statistics.median(x["loss_pct"] for x in snd) if snd else None,
            "sender_cwnd_kib": statistics.median(x["cwnd_kib"] for x in snd) if snd else None,
            "sender_rtt_ms": statistics.median(x["rtt_ms"] for x in snd) if snd else None,
        })
    ratio = {}
    rh = next(b for b in bulk_rows if b["system"] == "rathole")["median_mbit_s"]
    for b in bulk_rows:
        if b["system"].startswith("tunnel") and b["median_mbit_s"] and rh:
            ratio[b["system"]] = b["median_mbit_s"] / rh
    commit = sh("git", "-C", ROOT, "rev-parse", "--short", "HEAD", check=False).stdout.strip()
    out = {"date": time.strftime("%Y-%m-%d"), "commit": commit,
           "link": f"{DELAY_MS} ms each way, {LOSS_PCT}% loss each way",
           "rtt_ms": rtt, "assets": ASSETS, "asset_bytes": ASSET_BYTES, "rounds": ROUNDS, "rows": rows,
           "bulk": {"mib": BULK_MIB, "tunnel_congestion": QUIC_CC, "tcp_congestion": tcp_cc,
                    "rows": bulk_rows, "tunnel_vs_rathole": ratio}}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "http.json"), "w") as f:
        json.dump(out, f, indent=2)
    md = [f"# Page load and bulk download through the tunnel ({out['date']}, commit {commit}, "
          "`bench/http_bench.py`)", "",
          f"Over {out['link']} (round trip {rtt} ms: `tests/natlab/delay.py` between two network "
          f"namespaces); {ROUNDS} rounds, in each every system once, the order rotating; the tunnel "
          "connects `--eager` and rathole's control channel is up before the first round.", "",
          "## Page load", "",
          f"Headless Chromium, a page with {ASSETS} scripts of {ASSET_BYTES // 1000} KB from nginx, "
          "a cold profile per load; the page's own `loadEventStart`. Target: the tunnel's `--http` "
          f"within one round trip ({rtt} ms) of direct.", "",
          "| system | median ms | min | max | vs direct | loads (failed) |", "|---|---|---|---|---|---|"]
    for row in rows:
        if row["median_ms"] is None:
            md.append(f"| {row['system']} | — | — | — | — | 0 ({row['failed']}) |")
            continue
        md.append(f"| {row['system']} | {row['median_ms']:.0f} | {row['min_ms']:.0f} | {row['max_ms']:.0f} | "
                  f"{row['vs_direct_ms']:+.0f} ms | {row['loads']} ({row['failed']}) |")
    md += ["", "## Bulk download, one stream", "",
           f"curl downloads a {BULK_MIB} MiB file from the same nginx once per system per round, "
           "right after that round's page loads; Mbit/s = bytes / curl's `time_total` (connect to "
           f"last byte). The tunnel's congestion control: {QUIC_CC} (`--congestion`, the default "
           f"unless TUNNEL_CONGESTION is set); the kernel's TCP (direct, rathole): {tcp_cc}. "
           "*Sender* is the sending side's view during each download, median over the rounds: "
           "for TCP `ss -ti` of the server-side socket (bytes retransmitted / sent, cwnd, smoothed "
           "RTT, at the last sample before the end), for the tunnel the exposing process's QUIC path "
           "(packets declared lost / sent over the download; cwnd and RTT sampled every 0.5 s).", "",
           "| system | median Mbit/s | min | max | vs direct | downloads (failed) | sender: lost | cwnd KiB | RTT ms |",
           "|---|---|---|---|---|---|---|---|---|"]
    for b in bulk_rows:
        snd = (f"{b['sender_loss_pct']:.2f}% | {b['sender_cwnd_kib']:.0f} | {b['sender_rtt_ms']:.0f}"
               if b["sender_loss_pct"] is not None else "— | — | —")
        if b["median_mbit_s"] is None:
            md.append(f"| {b['system']} | — | — | — | — | 0 ({b['failed']}) | {snd} |")
            continue
        md.append(f"| {b['system']} | {b['median_mbit_s']:.1f} | {b['min_mbit_s']:.1f} | {b['max_mbit_s']:.1f} | "
                  f"{b['vs_direct']:.2f}× | {b['downloads']} ({b['failed']}) | {snd} |")
    if ratio:
        md += ["", "Against rathole (medians): " + "; ".join(f"{n} {x:.2f}×" for n, x in ratio.items()) + "."]
    path = os.path.join(OUT, "http.md")
    try:
        old = open(path).read()
        notes = old[old.index(NOTES):] if NOTES in old else ""
    except OSError:
        notes = ""
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n" + ("\n" + notes if notes else ""))
    print("\n".join(md))


if __name__ == "__main__":
    main()
