#!/usr/bin/env bash
# Records the seed corpus of the fuzz targets that read third-party protocols from real
# programs talking to real servers through fuzz/capture.py (a recording TCP proxy):
#   seeds/rtsp_stream  ffmpeg (UDP, TCP, audio+video, Digest) and GStreamer's rtspsrc against
#                      gst-rtsp-server (tests/fixtures/rtsp_server.py)
#   seeds/http_head    curl (GET, HEAD, chunked and sized uploads with 100-continue, a
#                      chunked download, Server-Sent Events) and headless Chromium against
#                      the HTTP test device (tests/fixtures/http_device.py)
# The tunnel's own formats (stream_header, rendezvous_frame, media_wire) travel inside QUIC;
# their seeds are the bytes its encoders write (`cargo test --lib fuzz_seeds` keeps them and
# checks they decode). Run from anywhere; needs ffmpeg, gst-launch-1.0, curl, chromium.
set -euo pipefail
cd "$(dirname "$0")"
fixtures=../tests/fixtures
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT

# start NAME CMD...: runs CMD in the background, waits for its "ready PORT", sets $port.
start() {
  local log
  log=$(mktemp)
  "$@" > "$log" 2>/dev/null &
  pids+=($!)
  for _ in $(seq 100); do
    port=$(sed -n 's/^ready \([0-9]*\)$/\1/p' "$log" | head -1)
    [ -n "$port" ] && return 0
    sleep 0.1
  done
  echo "no 'ready' from $*" >&2
  exit 1
}

rm -rf seeds/rtsp_stream seeds/http_head
mkdir -p seeds/rtsp_stream seeds/http_head

start /usr/bin/python3 "$fixtures/rtsp_server.py" 0
start python3 capture.py "$port" seeds/rtsp_stream
rtsp="rtsp://127.0.0.1:$port"
t=(timeout 20)
"${t[@]}" ffmpeg -nostdin -loglevel error -i "$rtsp/test" -frames:v 10 -f null - || true
"${t[@]}" ffmpeg -nostdin -loglevel error -rtsp_transport tcp -i "$rtsp/av" -frames:v 10 -f null - || true
"${t[@]}" ffmpeg -nostdin -loglevel error -rtsp_transport tcp -i "rtsp://viewer:s3cret@127.0.0.1:$port/secure" -frames:v 5 -f null - || true
"${t[@]}" gst-launch-1.0 -q rtspsrc location="$rtsp/test" protocols=udp ! fakesink num-buffers=10 || true
"${t[@]}" gst-launch-1.0 -q rtspsrc location="$rtsp/test" protocols=tcp ! fakesink num-buffers=10 || true

# The device takes a fixed port (it names itself by it): a free one.
dev=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start python3 "$fixtures/http_device.py" "$dev" seeds
start python3 capture.py "$dev" seeds/http_head
web="http://127.0.0.1:$port"
c=(curl -sS -o /dev/null --max-time 20)
"${c[@]}" "$web/" || echo "a curl failed: "${c[@]}" "$web/"" >&2
"${c[@]}" -I "$web/whoami" || echo "a curl failed: "${c[@]}" -I "$web/whoami"" >&2
"${c[@]}" -X PUT --data-binary @capture.py -H "Expect: 100-continue" "$web/upload" || echo "a curl failed: "${c[@]}" -X PUT --data-binary @capture.py -H "Expect: 100-continue" "$web/upload"" >&2
"${c[@]}" -X PUT -H "Transfer-Encoding: chunked" --data-binary @run.sh "$web/upload" || echo "a curl failed: "${c[@]}" -X PUT -H "Transfer-Encoding: chunked" --data-binary @run.sh "$web/upload"" >&2
"${c[@]}" -X POST -H "Origin: http://127.0.0.1:$dev" -d "x=1" "$web/guarded" || echo "a curl failed: "${c[@]}" -X POST -H "Origin: http://127.0.0.1:$dev" -d "x=1" "$web/guarded"" >&2
"${c[@]}" "$web/bytes?n=3000&chunked=1" || echo "a curl failed: "${c[@]}" "$web/bytes?n=3000&chunked=1"" >&2
"${c[@]}" "$web/events" || echo "a curl failed: "${c[@]}" "$web/events"" >&2
timeout 30 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --dump-dom "$web/whoami.html" > /dev/null 2>&1 || true
sleep 0.5
# Empty files (a side that sent nothing) are no seeds.
find seeds -type f -empty -delete
# The own formats' seeds wrap RTP from the new RTSP recordings: written again.
(cd .. && TUNNEL_WRITE_SEEDS=1 cargo test -q --lib fuzz_seeds)
for d in seeds/*; do
  echo "$d: $(ls "$d" | wc -l) files, $(du -sk "$d" | cut -f1) KiB"
done
