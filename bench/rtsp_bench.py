#!/usr/bin/python3
"""RTSP benchmark (part of bench/run.sh; as root). Two parts, each in its own network
namespaces (198.51.100.0/24), with the real binaries, gst-rtsp-server, ffmpeg and gst-launch-1.0:

1. First frame: time to the first decoded frame per client and mode, against the same client
   on the camera's own host and a plain byte forward; a veth between the two namespaces.
2. Lossy link: 20 ms each way and 1% loss each way (tests/natlab/delay.py in a third namespace
   between them: this kernel has no netem), a 1.5 Mbit/s camera played for PLAY_S seconds per
   run: frames decoded, decoder errors, RTP packets the client saw missing, longest freeze
   (longest gap between two decoded frames), datagram mode vs refuse (interleaved) mode.

Writes docs/bench/rtsp.md and docs/bench/rtsp.json (bench/charts.py adds it to report.json).
Usage: rtsp_bench.py [TUNNEL_BINARY]"""
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNNEL = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/tunnel")
SERVER = os.path.join(ROOT, "tests/fixtures/rtsp_server.py")
DELAY = os.path.join(ROOT, "tests/natlab/delay.py")
TAG = f"rb{os.getpid() % 10000}"
RUNS = 5
LOSSY_RUNS = 3
PLAY_S = 20
# Bytes of the bulk download over the lossy link (per controller, twice).
BULK_BYTES = 4 << 20
DELAY_MS, LOSS_PCT = 20, 1
# One decoded frame, as the measuring clients write it: 16x16 grey.
FRAME = 16 * 16
procs, namespaces, dirs = [], [], []


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


def ns(name, *args):
    return ["ip", "netns", "exec", name, *args]


def spawn(args, log=None, **kw):
    """A process whose stdout is read; its stderr goes to `log` (a path), else nowhere."""
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
    """MTU-sized frames with real checksums, as on a wire (delay.py forwards frames as read)."""
    for f in ("tx", "gro", "gso", "tso", "tx-udp-segmentation"):
        sh("ip", "netns", "exec", name, "ethtool", "-K", dev, f, "off", check=False)


def addr(name, dev, cidr):
    sh("ip", "-n", name, "addr", "add", cidr, "dev", dev)
    sh("ip", "-n", name, "link", "set", dev, "up")


class World:
    """Camera side S (RTSP server and `tunnel expose`) and client side C (`tunnel connect`),
    joined by a veth, or, when `impaired`, through delay.py in a namespace M between them."""

    def __init__(self, tag, impaired, congestion="cubic"):
        s, c = f"{tag}-s", f"{tag}-c"
        self.s, self.c = s, c
        netns(s)
        netns(c)
        if not impaired:
            sh("ip", "link", "add", f"{tag}a", "netns", s, "type", "veth", "peer", "name", f"{tag}b", "netns", c)
        else:
            m = f"{tag}-m"
            netns(m)
            sh("ip", "link", "add", f"{tag}a", "netns", s, "type", "veth", "peer", "name", f"{tag}am", "netns", m)
            sh("ip", "link", "add", f"{tag}b", "netns", c, "type", "veth", "peer", "name", f"{tag}bm", "netns", m)
            for dev in (f"{tag}am", f"{tag}bm"):
                sh("ip", "-n", m, "link", "set", dev, "up")
                no_offloads(m, dev)
            no_offloads(s, f"{tag}a")
            no_offloads(c, f"{tag}b")
            relay = spawn(ns(m, "python3", "-u", DELAY, f"{tag}am", f"{tag}bm", str(DELAY_MS), str(LOSS_PCT)))
            line(relay, lambda l: l.startswith("ready"))
        addr(s, f"{tag}a", "198.51.100.1/24")
        addr(c, f"{tag}b", "198.51.100.2/24")
        srv = spawn(ns(s, "/usr/bin/python3", SERVER, "0"))
        self.port = int(line(srv, lambda l: l.startswith("ready")).split()[1])
        ident = f"/tmp/{tag}"
        os.makedirs(ident, exist_ok=True)
        dirs.append(ident)
        cid = sh(TUNNEL, "id", "--identity", f"{ident}/c.pem").stdout.strip()
        env = dict(os.environ, NO_COLOR="1")
        exp = spawn(ns(s, TUNNEL, "expose", "--listen", "198.51.100.1:0", "--allow", cid,
                       "--identity", f"{ident}/e.pem", "--service", f"cam=rtsp://127.0.0.1:{self.port}",
                       "--service", f"camr=rtsp://127.0.0.1:{self.port}?udp=refuse",
                       "--service", f"raw=127.0.0.1:{self.port}", "--service", "web=127.0.0.1:8000",
                       "--congestion", congestion), log=f"{ident}/expose.log", env=env)
        peer = line(exp, lambda l: l.strip().startswith("tunnel connect")).split()[2]
        con = spawn(ns(c, TUNNEL, "connect", peer, "--eager", "--identity", f"{ident}/c.pem",
                       "--local", "127.0.0.1:18554=cam", "--local", "127.0.0.1:18555=camr",
                       "--local", "127.0.0.1:18556=raw", "--local", "127.0.0.1:18080=web",
                       "--congestion", congestion), log=f"{ident}/connect.log", env=env)
        self.logs = (f"{ident}/expose.log", f"{ident}/connect.log")
        self.tunnels = (exp, con)
        for _ in range(4):
            line(con, lambda l: " -> " in l)
        # Bulk for comparison: a file served on the camera's host.
        www = f"{ident}/www"
        os.makedirs(www, exist_ok=True)
        with open(f"{www}/blob", "wb") as f:
            f.write(os.urandom(BULK_BYTES))
        web = spawn(ns(s, "python3", "-u", "-m", "http.server", "8000", "--bind", "127.0.0.1",
                       "--directory", www), log=f"{ident}/http.log")
        time.sleep(0.5)
        time.sleep(1)

    def stop(self):
        """Stops both tunnel processes; returns their `stopping` log lines (media counters)."""
        for p in self.tunnels:
            p.send_signal(signal.SIGTERM)
        for p in self.tunnels:
            p.wait(timeout=20)
        lines = []
        for path in self.logs:
            with open(path) as f:
                lines += [l.strip() for l in f if " stopping" in l]
        return lines

    def modes(self, mount):
        return {
            "direct (client on the camera's host)": (self.s, f"rtsp://127.0.0.1:{self.port}/{mount}"),
            "tunnel, datagram mode": (self.c, f"rtsp://127.0.0.1:18554/{mount}"),
            "tunnel, refuse mode": (self.c, f"rtsp://127.0.0.1:18555/{mount}"),
            "byte forward (tcp service)": (self.c, f"rtsp://127.0.0.1:18556/{mount}"),
        }


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


def player(client, url):
    """A client with its default settings writing each decoded frame, scaled to 16x16 grey,
    to stdout as soon as it is decoded; its stderr carries its loss and decoder reports."""
    if client == "ffmpeg":
        return ["ffmpeg", "-nostdin", "-v", "warning", "-i", url, "-an", "-vf", "scale=16:16",
                "-pix_fmt", "gray", "-fps_mode", "passthrough", "-f", "rawvideo",
                "-flush_packets", "1", "pipe:1"]
    return ["gst-launch-1.0", "-q", "rtspsrc", f"location={url}", "!", "rtph264depay", "!",
            "h264parse", "!", "avdec_h264", "!", "videoscale", "!", "videoconvert", "!",
            "video/x-raw,width=16,height=16,format=GRAY8", "!", "fdsink", "fd=1", "sync=false"]


def play(where, client, url):
    """Plays for PLAY_S seconds from the first decoded frame (at most 30 s to get one):
    frames, longest gap between frames, decoder error lines, packets reported missing."""
    env = dict(os.environ, GST_DEBUG="rtpjitterbuffer:3,libav:2,avdec_h264:2", GST_DEBUG_NO_COLOR="1")
    err_path = f"/tmp/{TAG}-player.err"
    with open(err_path, "w") as err:
        p = subprocess.Popen(ns(where, *player(client, url)), stdout=subprocess.PIPE, stderr=err, env=env)
    start = time.monotonic()
    times, pending = [], 0
    deadline = start + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                break
            pending += len(chunk)
            now = time.monotonic()
            while pending >= FRAME:
                pending -= FRAME
                if not times:
                    deadline = now + PLAY_S
                times.append(now)
    finally:
        p.kill()
        p.wait()
    with open(err_path, errors="replace") as f:
        log = f.read()
    os.unlink(err_path)
    if client == "ffmpeg":
        # libavformat's RTP: "RTP: missed N packets"; the h264 decoder: "[h264 @ ...] ...".
        missed = sum(int(n) for n in re.findall(r"RTP: missed (\d+) packets", log))
        decode_errors = sum(1 for l in log.splitlines() if "[h264 @" in l)
    else:
        # rtpjitterbuffer reports each packet it gives up on; libav the decoder's complaints.
        missed = sum(1 for l in log.splitlines() if "rtpjitterbuffer" in l and "lost" in l.lower())
        decode_errors = sum(1 for l in log.splitlines() if "libav" in l or "avdec_h264" in l)
    if not times:
        return None
    gaps = [b - a for a, b in zip(times, times[1:])]
    if os.environ.get("RTSP_BENCH_VERBOSE"):
        print("gaps > 80 ms (at s: ms):", [(round(a - times[0], 2), round(1000 * (b - a))) for a, b in zip(times, times[1:]) if b - a > 0.08])
    return {
        "first_frame_s": times[0] - start,
        "frames": len(times),
        "longest_freeze_ms": 1000 * max(gaps) if gaps else None,
        "decode_errors": decode_errors,
        "missed_packets": missed,
    }


def first_frame_part():
    world = World(f"{TAG}f", impaired=False)
    rows = []
    for client in ("ffmpeg", "ffmpeg-tcp", "gstreamer"):
        for mode, (where, url) in world.modes("own").items():
            times = [first_frame(where, client, url) for _ in range(RUNS)]
            ok = [t for t in times if t is not None]
            med = statistics.median(ok) if ok else None
            rows.append({"client": client, "path": mode, "median_s": med, "ok": len(ok), "runs": RUNS})
            print(client, mode, med, len(ok), flush=True)
    return rows


def bulk_mbits(where):
    """Mbit/s of one download of the bulk file through the tunnel, or None."""
    r = subprocess.run(ns(where, "curl", "-sS", "--fail", "--max-time", "120", "-o", "/dev/null",
                          "-w", "%{speed_download}", "http://127.0.0.1:18080/blob"),
                       capture_output=True, text=True)
    return float(r.stdout) * 8 / 1e6 if r.returncode == 0 else None


def lossy_part():
    """Both congestion controllers, each in its own lossy world: playback rows, bulk rows and
    the tunnels' counters."""
    rows, bulk, counters = [], [], {}
    for congestion in ("cubic", "bbr"):
        world = World(f"{TAG}l{congestion[0]}", impaired=True, congestion=congestion)
        modes = world.modes("busy")
        for client in ("ffmpeg", "gstreamer"):
            for mode in ("tunnel, datagram mode", "tunnel, refuse mode"):
                where, url = modes[mode]
                runs = [play(where, client, url) for _ in range(LOSSY_RUNS)]
                ok = [r for r in runs if r is not None]
                row = {"congestion": congestion, "client": client, "path": mode, "ok": len(ok),
                       "runs": LOSSY_RUNS, "each": ok}
                for key in ("frames", "decode_errors", "missed_packets", "longest_freeze_ms", "first_frame_s"):
                    values = [r[key] for r in ok if r[key] is not None]
                    row[key] = statistics.median(values) if values else None
                row["worst_freeze_ms"] = max((r["longest_freeze_ms"] or 0 for r in ok), default=None)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "each"}), flush=True)
        speeds = [bulk_mbits(world.c) for _ in range(2)]
        ok = [v for v in speeds if v is not None]
        bulk.append({"congestion": congestion, "mbit_s": statistics.median(ok) if ok else None,
                     "each": speeds})
        print(json.dumps(bulk[-1]), flush=True)
        counters[congestion] = world.stop()
    return rows, bulk, counters


def fmt(v, pattern):
    return pattern % v if v is not None else "-"


def main():
    try:
        first = first_frame_part()
        lossy, bulk, counters = lossy_part()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for name in namespaces:
            sh("ip", "netns", "del", name, check=False)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    day = time.strftime("%Y-%m-%d")
    out = ["# RTSP benchmark", "",
           f"`bench/rtsp_bench.py`, {day}.", "",
           "## First frame", "",
           "Two namespaces joined by a veth; gst-rtsp-server H.264 320x240 25 fps, keyframe every "
           "25 frames (so a first frame waits up to 1 s for a keyframe, whatever the path); "
           f"medians of {RUNS} runs, wall time from starting the client to its first decoded frame "
           "(process start included); the median is over the runs that played (a run that did not "
           "play within 30 s is a failure).", "",
           "| client | path | first frame (s) | runs ok |", "|---|---|---|---|"]
    for r in first:
        out.append(f"| {r['client']} | {r['path']} | {fmt(r['median_s'], '%.2f') if r['median_s'] is not None else 'never'} | {r['ok']}/{r['runs']} |")
    out += ["", f"## Lossy link: {DELAY_MS} ms and {LOSS_PCT}% loss each way", "",
            f"The same two namespaces joined through a link emulator (tests/natlab/delay.py: {DELAY_MS} ms "
            f"each way, {LOSS_PCT}% of frames dropped at random each way, both directions "
            "independent). The camera is a 640x480 25 fps H.264 stream at about 1.5 Mbit/s (keyframe "
            f"every second). Each run plays {PLAY_S} s from the first decoded frame, client "
            "defaults; every decoded frame is written out as it is decoded and timed. Medians of "
            f"{LOSSY_RUNS} runs; *worst freeze* is the longest gap between two decoded frames "
            "over all runs (at 25 fps frames are 40 ms apart). *missed packets*: what the client "
            "reported lost (ffmpeg \"RTP: missed N packets\"; rtpjitterbuffer lost-packet lines); "
            "*decoder errors*: the H.264 decoder's error lines (concealed slices, missing "
            "references). Each congestion controller (`--congestion`, on both tunnels) in a "
            "fresh pair of namespaces.", "",
            "| controller | client | mode | frames | longest freeze (ms) | worst freeze (ms) | decoder errors | missed packets | first frame (s) | runs ok |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in lossy:
        out.append(f"| {r['congestion']} | {r['client']} | {r['path']} | {fmt(r['frames'], '%d')} | {fmt(r['longest_freeze_ms'], '%.0f')} | "
                   f"{fmt(r['worst_freeze_ms'], '%.0f')} | {fmt(r['decode_errors'], '%d')} | {fmt(r['missed_packets'], '%d')} | "
                   f"{fmt(r['first_frame_s'], '%.2f')} | {r['ok']}/{r['runs']} |")
    out += ["", f"Bulk over the same link: a {BULK_BYTES >> 20} MiB download with curl through a "
            "tcp service, median of 2.", "", "| controller | Mbit/s |", "|---|---|"]
    for b in bulk:
        out.append(f"| {b['congestion']} | {fmt(b['mbit_s'], '%.1f')} |")
    out += ["", "The tunnels' media counters per controller (both clients, both modes), as they "
            "logged them when stopped (expose first):", "", "```"]
    for congestion, lines in counters.items():
        out += [f"{congestion}: " + c.split("stopping ", 1)[-1] for c in lines]
    out += ["```"]
    with open(os.path.join(ROOT, "docs/bench/rtsp.md"), "w") as f:
        f.write("\n".join(out) + "\n")
    with open(os.path.join(ROOT, "docs/bench/rtsp.json"), "w") as f:
        json.dump({"date": day, "first_frame": first,
                   "lossy": {"delay_ms": DELAY_MS, "loss_pct": LOSS_PCT, "play_s": PLAY_S, "rows": lossy,
                             "bulk": bulk, "tunnel_counters": counters}}, f, indent=2)
    print("\n".join(out))


if __name__ == "__main__":
    main()
