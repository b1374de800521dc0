#!/usr/bin/env bash
# The benchmark suite, in one command (not run by CI; about 30 minutes on 2 cores, plus the
# first installs). Writes docs/bench/report.md, report.json and PNG charts.
# Needs root for the NAT lab and for dumbpipe's lo-only network namespace.
set -euo pipefail
cd "$(dirname "$0")/.."

# Peer tunnels, from crates.io (rathole's lock file does not build with this rustc).
command -v bore >/dev/null || cargo install --locked bore-cli
command -v rathole >/dev/null || cargo install rathole
command -v dumbpipe >/dev/null || cargo install --locked dumbpipe
# Real programs for the media part and the NAT lab.
need=()
for pkg in ffmpeg gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 python3-gi gstreamer1.0-plugins-ugly \
           gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-libav curl iproute2 nftables ethtool \
           chromium nginx-light; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install -q matplotlib

# 10,000 idle streams need file descriptors.
ulimit -n "$(ulimit -Hn)"
cargo bench --bench suite
# Connection setup, direct and relayed: the NAT lab, three times, one scenario at a time.
: > docs/bench/natlab.log
for _ in 1 2 3; do
  cargo test --release --test natlab -- --nocapture --test-threads 1 2>/dev/null | grep -o 'natlab [a-z]*: A=.*' >> docs/bench/natlab.log
done
# Path types and path changes, A's link delayed 20 ms: time to first byte per path type and
# the longest gap of a live download and an RTSP stream when the path changes (an ignored
# test; about 90 s a run), three runs (docs/bench/README.md, "Path types and path changes").
: > docs/bench/paths.log
for _ in 1 2 3; do
  cargo test --release --test natlab -- --ignored --nocapture --test-threads 1 bench_path_types 2>/dev/null | grep -o 'natlab bench: .*' >> docs/bench/paths.log
done
# RTSP: first frame per client and mode (docs/bench/rtsp.md).
cargo build --release
python3 bench/rtsp_bench.py target/release/tunnel
# Web: a 60-asset page in headless Chromium over 20 ms + 1% loss: direct, --http, a byte
# service, rathole (docs/bench/http.md).
python3 bench/http_bench.py target/release/tunnel
# Churn at full scale (1,000 QUIC connections, 1,000 ffmpeg plays, 200 relayed sessions,
# 200 registrations; CI runs a tenth): figures in docs/bench/churn.log (docs/bench/churn.md).
TUNNEL_CHURN_SCALE=1 cargo test --test churn -- --nocapture --test-threads 1 2>&1 \
  | grep -E '^(test |[0-9]+ |.*(before|after|rss):)' > docs/bench/churn.log
# Every fuzz target, 10 million executions each (docs/protocol.md, "Fuzzing").
# (rtsp_stream needs about 45 minutes for its 10 M: the cap is raised to 60.)
FUZZ_MAX_TIME=3600 bash fuzz/run.sh 10000000 | tee docs/bench/fuzz.log
python3 bench/charts.py
echo "report: docs/bench/report.md"
