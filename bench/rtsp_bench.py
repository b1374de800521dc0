#!/usr/bin/python3
"""RTSP benchmark (part of bench/run.sh; as root): time to first decoded frame per client and
mode, against the same client on the camera's own host and a plain byte forward. Two network namespaces joined by a veth
(198.51.100.0/24), the real binaries, gst-rtsp-server, ffmpeg and gst-launch-1.0.
Writes docs/bench/rtsp.md. Usage: rtsp_bench.py [TUNNEL_BINARY]"""
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNNEL = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/tunnel")
SERVER = os.path.join(ROOT, "tests/fixtures/rtsp_server.py")
TAG = f"rb{os.getpid() % 10000}"
S, C = f"{TAG}-s", f"{TAG}-c"
RUNS = 5
procs = []


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


def ns(name, *args):
    return ["ip", "netns", "exec", name, *args]


def spawn(args, **kw):
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, **kw)
    procs.append(p)
    return p


def line(p, pred):
    for ln in p.stdout:
        if pred(ln):
            return ln
    raise SystemExit("process ended early")


def setup():
    sh("ip", "netns", "add", S)
    sh("ip", "netns", "add", C)
    sh("ip", "link", "add", f"{TAG}a", "netns", S, "type", "veth", "peer", "name", f"{TAG}b", "netns", C)
    for n, dev, addr in ((S, f"{TAG}a", "198.51.100.1/24"), (C, f"{TAG}b", "198.51.100.2/24")):
        sh("ip", "-n", n, "addr", "add", addr, "dev", dev)
        sh("ip", "-n", n, "link", "set", dev, "up")
        sh("ip", "-n", n, "link", "set", "lo", "up")


def first_frame(where, client, url):
    if client == "ffmpeg":
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", url, "-frames:v", "1", "-f", "null", "-"]
    elif client == "ffmpeg-tcp":
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-rtsp_transport", "tcp", "-i", url,
               "-frames:v", "1", "-f", "null", "-"]
    else:
        cmd = ["gst-launch-1.0", "-q", "rtspsrc", f"location={url}", "latency=0", "!",
               "rtph264depay", "!", "h264parse", "!", "avdec_h264", "!", "identity",
               "eos-after=1", "!", "fakesink"]
    t0 = time.monotonic()
    r = subprocess.run(ns(where, "timeout", "30", *cmd), capture_output=True)
    dt = time.monotonic() - t0
    return dt if r.returncode == 0 else None


def main():
    setup()
    try:
        srv = spawn(ns(S, "/usr/bin/python3", SERVER, "0"))
        port = int(line(srv, lambda l: l.startswith("ready")).split()[1])
        ident = f"/tmp/{TAG}"
        os.makedirs(ident, exist_ok=True)
        cid = sh(TUNNEL, "id", "--identity", f"{ident}/c.pem").stdout.strip()
        env = dict(os.environ, NO_COLOR="1")
        exp = spawn(ns(S, TUNNEL, "expose", "--listen", "198.51.100.1:0", "--allow", cid,
                       "--identity", f"{ident}/e.pem", "--service", f"cam=rtsp://127.0.0.1:{port}",
                       "--service", f"camr=rtsp://127.0.0.1:{port}?udp=refuse",
                       "--service", f"raw=127.0.0.1:{port}"), env=env)
        peer = line(exp, lambda l: l.strip().startswith("tunnel connect")).split()[2]
        con = spawn(ns(C, TUNNEL, "connect", peer, "--eager", "--identity", f"{ident}/c.pem",
                       "--local", "127.0.0.1:18554=cam", "--local", "127.0.0.1:18555=camr",
                       "--local", "127.0.0.1:18556=raw"), env=env)
        for _ in range(3):
            line(con, lambda l: " -> " in l)
        time.sleep(1)
        modes = {
            "direct (client on the camera's host)": (S, f"rtsp://127.0.0.1:{port}/own"),
            "tunnel, datagram mode": (C, "rtsp://127.0.0.1:18554/own"),
            "tunnel, refuse mode": (C, "rtsp://127.0.0.1:18555/own"),
            "byte forward (tcp service)": (C, "rtsp://127.0.0.1:18556/own"),
        }
        rows = []
        for client in ("ffmpeg", "ffmpeg-tcp", "gstreamer"):
            for mode, (where, url) in modes.items():
                times = []
                for _ in range(RUNS):
                    t = first_frame(where, client, url)
                    times.append(t)
                ok = [t for t in times if t is not None]
                med = statistics.median(ok) if ok else None
                rows.append((client, mode, med, len(ok)))
                print(client, mode, med, len(ok), flush=True)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        sh("ip", "netns", "del", S, check=False)
        sh("ip", "netns", "del", C, check=False)
    out = ["# RTSP benchmark", "",
           f"`bench/rtsp_bench.py`, {time.strftime('%Y-%m-%d')}; two namespaces joined by a veth; "
           "gst-rtsp-server H.264 320x240 25 fps, keyframe every 25 frames (so a first frame "
           "waits up to 1 s for a keyframe, whatever the path); medians of "
           f"{RUNS} runs, wall time from starting the client to its first decoded frame "
           "(process start included); the median is over the runs that played (a run that did not "
           "play within 30 s is a failure).", "",
           "| client | path | first frame (s) | runs ok |", "|---|---|---|---|"]
    for client, mode, med, ok in rows:
        out.append(f"| {client} | {mode} | {'%.2f' % med if med is not None else 'never'} | {ok}/{RUNS} |")
    with open(os.path.join(ROOT, "docs/bench/rtsp.md"), "w") as f:
        f.write("\n".join(out) + "\n")
    print("\n".join(out))


main()
