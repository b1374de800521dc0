#!/usr/bin/python3
"""Web page load benchmark (part of bench/run.sh; as root): headless Chromium loading a page
with 60 assets (scripts of 10 KB each, fetched in parallel by Chromium's preload scanner, six
connections per host) from nginx, over a link of 20 ms each way with 1% loss each way
(tests/natlab/delay.py in a namespace between the two sides: this kernel has no netem).

Systems, alternating in every round, a fresh Chromium profile (cold cache, new connections)
each load, the tunnel and rathole already connected:
- direct: Chromium in the client namespace straight to nginx across the link (the baseline);
- tunnel --http: http://web.peer.localhost:PORT/ (the HTTP layer, one QUIC connection);
- tunnel byte service: a --local port of a tcp service (the same stream per socket, no HTTP layer);
- rathole: its visitor port (each socket a new TCP connection from its client to its server).

The load time is the page's own `loadEventStart` (navigation start to the load event), read
from the DOM Chromium dumps. Writes docs/bench/http.md and docs/bench/http.json.
Usage: http_bench.py [TUNNEL_BINARY] [ROUNDS]"""
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
    # Warm every path once (the tunnel's connection, rathole's control channel, nginx's cache).
    for url in systems.values():
        load(c, work, url)
    return c, work, systems


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
        where, work, systems = setup()
        names = list(systems)
        times = {n: [] for n in names}
        failed = {n: 0 for n in names}
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
    out = {"date": time.strftime("%Y-%m-%d"), "link": f"{DELAY_MS} ms each way, {LOSS_PCT}% loss each way",
           "rtt_ms": rtt, "assets": ASSETS, "asset_bytes": ASSET_BYTES, "rounds": ROUNDS, "rows": rows}
    os.makedirs(os.path.join(ROOT, "docs/bench"), exist_ok=True)
    with open(os.path.join(ROOT, "docs/bench/http.json"), "w") as f:
        json.dump(out, f, indent=2)
    md = [f"# Page load through the tunnel ({out['date']}, `bench/http_bench.py`)", "",
          f"Headless Chromium, a page with {ASSETS} scripts of {ASSET_BYTES // 1000} KB from nginx, "
          f"over {out['link']} (round trip {rtt} ms); {ROUNDS} rounds, the systems alternating, a "
          "cold profile per load; the page's own `loadEventStart`. Target: the tunnel's `--http` "
          f"within one round trip ({rtt} ms) of direct.", "",
          "| system | median ms | min | max | vs direct | loads (failed) |", "|---|---|---|---|---|---|"]
    for row in rows:
        if row["median_ms"] is None:
            md.append(f"| {row['system']} | — | — | — | — | 0 ({row['failed']}) |")
            continue
        md.append(f"| {row['system']} | {row['median_ms']:.0f} | {row['min_ms']:.0f} | {row['max_ms']:.0f} | "
                  f"{row['vs_direct_ms']:+.0f} ms | {row['loads']} ({row['failed']}) |")
    with open(os.path.join(ROOT, "docs/bench/http.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
