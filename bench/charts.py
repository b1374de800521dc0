#!/usr/bin/env python3
"""Draws docs/bench/*.png from docs/bench/report.json, and adds the NAT lab's connection
setup times (docs/bench/natlab.log, written by bench/run.sh) and the RTSP figures
(docs/bench/rtsp.json, from bench/rtsp_bench.py) to report.md and report.json."""
import json
import re
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

bench = Path(__file__).resolve().parent.parent / "docs" / "bench"
report = json.loads((bench / "report.json").read_text())
med = report["median"]
SYSTEMS = ["direct TCP", "quinn 0.11 alone (memory to memory)", "tunnel", "bore 0.6",
           "rathole 0.5 (tcp, no encryption)", "rathole 0.5 (noise)", "dumbpipe 0.40 (QUIC)"]
order = [n for n in SYSTEMS if n in med]


def bars(metrics, labels, title, ylabel, path, systems, log=False, med=med):
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(metrics)
    for i, (metric, label) in enumerate(zip(metrics, labels)):
        xs = [j + i * width for j in range(len(systems))]
        ax.bar(xs, [med[s].get(metric, 0) for s in systems], width, label=label)
    ax.set_xticks([j + width * (len(metrics) - 1) / 2 for j in range(len(systems))])
    ax.set_xticklabels([s.replace(" (", "\n(") for s in systems], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(bench / path, dpi=110)
    plt.close(fig)


bars(["upload_1_gbit", "download_1_gbit", "download_8_gbit", "download_64_gbit"],
     ["upload, 1 stream", "download, 1 stream", "8 streams", "64 streams"],
     "Throughput on loopback (median of rounds)", "Gbit/s", "throughput.png", order)
veth = (report.get("veth") or {}).get("median") or {}
if veth:
    bars(["upload_1_gbit", "download_1_gbit", "download_8_gbit", "download_64_gbit"],
         ["upload, 1 stream", "download, 1 stream", "8 streams", "64 streams"],
         "Throughput on the 1500-byte-MTU path (veth, median of rounds)", "Gbit/s",
         "throughput-1500.png", [n for n in SYSTEMS if n in veth], med=veth)
    cpu = [n for n in SYSTEMS if n in veth and "cpu_s_per_gib_down" in veth[n]]
    bars(["cpu_s_per_gib_up", "cpu_s_per_gib_down"], ["upload", "download"],
         "CPU-seconds per GiB moved, both processes (1500-byte-MTU path)", "CPU-s / GiB",
         "cpu-per-gib.png", cpu, med=veth)
bars(["rtt_p50_us", "rtt_p99_us", "open_p50_us"],
     ["round trip p50", "round trip p99", "stream open p50"],
     "Latency: 100 B request/reply and stream open", "µs (log)", "latency.png", order, log=True)

scale = report.get("scale") or {}
if scale:
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(scale)
    worst = [max(scale[n]["rss_kib_per_stream"].values()) for n in names]
    ax.bar(range(len(names)), worst, color="tab:purple")
    ax.axhline(16, color="red", linestyle="--", label="target 16 KiB")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylabel("KiB per idle stream (worst side)")
    ax.set_title(f"Memory per idle stream ({list(scale.values())[0]['streams']} streams)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(bench / "idle-memory.png", dpi=110)
    plt.close(fig)

media = report.get("media") or {}
if media.get("alone"):
    fig, ax = plt.subplots(figsize=(8, 4))
    cases = [("alone", "alone"), ("with_paced_bulk", "400 Mbit/s download"), ("with_bulk", "CPU-bound download")]
    cases = [(k, label) for k, label in cases if media.get(k)]
    ax.bar([c[1] for c in cases], [media[k]["jitter_p99_ms"] for k, _ in cases], color="tab:green")
    ax.set_ylabel("frame jitter p99 (ms)")
    ax.set_title("RTSP through the tunnel, sharing the connection")
    fig.tight_layout()
    fig.savefig(bench / "media-jitter.png", dpi=110)
    plt.close(fig)

# The NAT lab's setup times, measured by bench/run.sh in the same session.
log = bench / "natlab.log"
if log.exists():
    pat = re.compile(r"natlab (\w+): A=(\w+) B=(\w+) loss=(\d+)% delay=(\d+)ms -> path=(\w+), first byte ([\d.]+)(ms|µs|s)")
    runs = {}
    for m in pat.finditer(log.read_text()):
        tag, a, b, loss, delay, path, value, unit = m.groups()
        ms = float(value) * {"ms": 1.0, "µs": 0.001, "s": 1000.0}[unit]
        runs.setdefault((tag, a, b, loss, delay), []).append((path, ms))
    if runs:
        rows = []
        lines = ["", "## Connection setup in the NAT lab", "",
                 "Time to first byte of an HTTP fetch through a connection made on demand "
                 "(rendezvous introduction, punching, handshake), from `cargo test --release --test natlab`; "
                 "median of the runs. Ratio: to the cone/cone direct case.", "",
                 "| scenario | path | runs | first byte, median (ms) | ratio |", "|---|---|---|---|---|"]
        base = None
        for (tag, a, b, loss, delay), vals in sorted(runs.items()):
            if (a, b, loss, delay) == ("cone", "cone", "0", "0"):
                base = statistics.median(v for _, v in vals)
        for (tag, a, b, loss, delay), vals in sorted(runs.items()):
            m = statistics.median(v for _, v in vals)
            paths = "/".join(sorted({p for p, _ in vals}))
            name = f"A {a}, B {b}" + (f", {loss}% loss" if loss != "0" else "") + (f", {delay} ms delay" if delay != "0" else "")
            ratio = f"{m / base:.1f}×" if base else "—"
            lines.append(f"| {name} | {paths} | {len(vals)} | {m:.0f} | {ratio} |")
            rows.append({"scenario": name, "path": paths, "runs": len(vals), "first_byte_ms": m})
        md = (bench / "report.md").read_text()
        md = md.split("\n## Connection setup in the NAT lab")[0].rstrip("\n") + "\n" + "\n".join(lines) + "\n"
        (bench / "report.md").write_text(md)
        report["natlab_setup"] = rows
        (bench / "report.json").write_text(json.dumps(report, indent=2))
# RTSP: first frame and playback over a lossy link (bench/rtsp_bench.py, same session).
rtsp = bench / "rtsp.json"
if rtsp.exists():
    data = json.loads(rtsp.read_text())
    report["rtsp"] = data
    (bench / "report.json").write_text(json.dumps(report, indent=2))
    rows = [r for r in data["lossy"]["rows"] if r.get("longest_freeze_ms") is not None]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{r.get('congestion', '')}\n{r['client']}\n{r['path'].replace('tunnel, ', '')}" for r in rows]
        ax.bar(labels, [r["longest_freeze_ms"] for r in rows], color="tab:purple")
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel("longest freeze, median of runs (ms)")
        ax.set_title(f"RTSP over {data['lossy']['delay_ms']} ms + {data['lossy']['loss_pct']}% loss each way")
        fig.tight_layout()
        fig.savefig(bench / "rtsp-loss.png", dpi=110)
        plt.close(fig)
    md = (bench / "report.md").read_text()
    md = md.split("\n## RTSP (from rtsp.md)")[0].rstrip("\n")
    body = (bench / "rtsp.md").read_text().split("\n", 1)[1].replace("\n## ", "\n### ")
    md += "\n\n## RTSP (from rtsp.md)\n" + body + "\n![longest freeze](rtsp-loss.png)\n"
    (bench / "report.md").write_text(md)
print("charts written to", bench, file=sys.stderr)
