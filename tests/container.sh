#!/usr/bin/env bash
# Container smoke test (run as root by .ci/run): builds the repository's Dockerfile unchanged
# with a real Docker engine, then runs `expose` and `connect` in two containers in front of a
# real HTTP server on the host, and checks: a file fetched through them byte for byte, the
# processes run as non-root, the identity on the volume survives `docker restart`, and
# `docker stop` ends the container by its drain well before Docker's 10 s kill.
#
# No registry is reachable here: the two base images the Dockerfile names are made locally
# (../shared/CONTAINER.md). dockerd runs without a bridge or firewall rules; containers use
# --network host on loopback addresses. Everything made here is removed on exit, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

log() { printf '[container] %s\n' "$*"; }
fail() { printf '[container] FAIL: %s\n' "$*" >&2; exit 1; }

work=$(mktemp -d /tmp/tunnel-container.XXXXXX)
prefix="tunnel-ci-$$"
dockerd_pid=""
http_pid=""

cleanup() {
  set +e
  if [ -n "$dockerd_pid" ]; then
    docker rm -f "$prefix-expose" "$prefix-connect" >/dev/null 2>&1
    docker volume rm "$prefix-expose" "$prefix-connect" >/dev/null 2>&1
  fi
  [ -n "$http_pid" ] && kill "$http_pid" 2>/dev/null
  if [ -n "$dockerd_pid" ]; then
    kill "$dockerd_pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$dockerd_pid" 2>/dev/null
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# 1. Tools.
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER=$(command -v docker)
docker() { "$DOCKER" "$@"; }

# 2. The engine: no bridge (it would take a private range), no firewall rules.
dockerd --bridge=none --iptables=false --ip6tables=false \
  --pidfile "$work/dockerd.pid" >"$work/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 100); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
docker info >/dev/null 2>&1 || { cat "$work/dockerd.log"; fail "dockerd did not start"; }
log "dockerd up (pid $dockerd_pid)"

# 3. Base images, made locally and named as the Dockerfile expects.
if ! docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1)
  [ -n "$mirror" ] || fail "no Debian mirror found in /etc/apt/sources.list.d"
  log "debootstrap bookworm (minbase)"
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log"; fail "debootstrap"; }
  rm -rf "$work"/rootfs/var/lib/apt/lists/* "$work"/rootfs/var/cache/apt/* \
         "$work"/rootfs/usr/share/doc/* "$work"/rootfs/usr/share/man/* "$work"/rootfs/usr/share/locale/*
  tar -C "$work/rootfs" -c . | docker import - debian:bookworm-slim >/dev/null
  rm -rf "$work/rootfs"
fi
if ! docker image inspect rust:1-bookworm >/dev/null 2>&1; then
  log "making rust:1-bookworm from this machine's toolchain"
  ctx="$work/rust-image"
  mkdir -p "$ctx/rust" "$ctx/certs"
  sysroot=$(rustc --print sysroot)
  for d in bin lib libexec etc; do [ -e "$sysroot/$d" ] && cp -a "$sysroot/$d" "$ctx/rust/"; done
  cp /usr/local/share/ca-certificates/*.crt "$ctx/certs/" 2>/dev/null || true
  cat >"$ctx/Dockerfile" <<'EOF'
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends build-essential ca-certificates pkg-config git \
 && rm -rf /var/lib/apt/lists/*
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
COPY rust/ /usr/local/rust/
ENV PATH=/usr/local/rust/bin:/usr/local/cargo/bin:$PATH CARGO_HOME=/usr/local/cargo
EOF
  DOCKER_BUILDKIT=0 docker build --network host -q -t rust:1-bookworm "$ctx" >/dev/null \
    || fail "building rust:1-bookworm"
  rm -rf "$ctx"
fi

# 4. The repository's Dockerfile, unchanged.
log "docker build -t tunnel ."
start=$(date +%s)
DOCKER_BUILDKIT=0 docker build --network host -t "$prefix" "$repo" >"$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log"; fail "docker build"; }
size=$(docker image inspect -f '{{.Size}}' "$prefix")
log "built in $(( $(date +%s) - start )) s, image $(( size / 1000000 )) MB"
[ "$size" -le 90000000 ] || fail "image is $size bytes, over 90 MB"

# 5. A real HTTP server on the host, and a file to fetch.
mkdir -p "$work/www"
head -c 3000000 /dev/urandom >"$work/www/blob.bin"
want=$(sha256sum "$work/www/blob.bin" | cut -d' ' -f1)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port=$(free_port); quic_port=$(free_port); local_port=$(free_port)
python3 -m http.server "$http_port" --bind 127.0.0.1 --directory "$work/www" >/dev/null 2>&1 &
http_pid=$!

# (Through a file: `docker logs | grep -q` under pipefail fails when grep stops reading early.)
logs_have() { # container, pattern
  docker logs "$1" >"$work/logs.txt" 2>&1 || true
  grep -q -- "$2" "$work/logs.txt"
}
wait_log() { # container, pattern
  for _ in $(seq 150); do
    logs_have "$1" "$2" && return 0
    sleep 0.2
  done
  tail -20 "$work/logs.txt"
  fail "$1 never logged: $2"
}

# 6. Two containers: connect's id first (from its volume), then expose, then connect.
connect_id=$(docker run --rm --network host -v "$prefix-connect:/data" "$prefix" id)
log "connect side id $connect_id"
docker run -d --name "$prefix-expose" --network host -v "$prefix-expose:/data" "$prefix" \
  expose --listen "127.0.0.1:$quic_port" --service "web=127.0.0.1:$http_port" --allow "$connect_id" >/dev/null
wait_log "$prefix-expose" "tunnel connect "
peer=$(docker logs "$prefix-expose" 2>/dev/null | sed -n 's/^ *tunnel connect \([^ ]*\).*/\1/p' | head -1)
expose_id=${peer%@*}
log "expose side says: tunnel connect $peer"
docker run -d --name "$prefix-connect" --network host -v "$prefix-connect:/data" "$prefix" \
  connect "$peer" --local "127.0.0.1:$local_port=web" >/dev/null
wait_log "$prefix-connect" "-> web on"

got=$(curl -sS --fail --max-time 30 "http://127.0.0.1:$local_port/blob.bin" | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "fetched file differs ($got != $want)"
log "fetched 3 MB through two containers, checksum ok"

# 7. Not root.
for c in expose connect; do
  pid=$(docker inspect -f '{{.State.Pid}}' "$prefix-$c")
  uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
  [ "$uid" != 0 ] || fail "$c runs as root"
  log "$c runs as uid $uid"
done

# 8. The identity lives on the volume: same peer id after a restart.
docker restart -t 10 "$prefix-expose" >/dev/null
for _ in $(seq 150); do
  docker logs "$prefix-expose" >"$work/logs.txt" 2>/dev/null || true
  [ "$(grep -c '^peer id: ' "$work/logs.txt")" -ge 2 ] && break
  sleep 0.2
done
ids=$(docker logs "$prefix-expose" 2>/dev/null | sed -n 's/^peer id: //p' | sort -u)
[ "$ids" = "$expose_id" ] || fail "peer id changed across the restart: $ids"
log "peer id kept across docker restart"
got=$(curl -sS --fail --max-time 30 "http://127.0.0.1:$local_port/blob.bin" | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "fetch after restart differs"

# 9. docker stop: SIGTERM to PID 1 drains and exits, well before the 10 s kill.
for c in connect expose; do
  t0=$(date +%s%N)
  docker stop -t 10 "$prefix-$c" >/dev/null
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  code=$(docker inspect -f '{{.State.ExitCode}}' "$prefix-$c")
  log "docker stop $c: ${ms} ms, exit code $code"
  [ "$ms" -lt 5000 ] || fail "docker stop $c took ${ms} ms"
  [ "$code" = 0 ] || fail "$c exited with $code after SIGTERM"
  logs_have "$prefix-$c" "shutting down" || fail "$c did not log its drain"
done

docker rmi -f "$prefix" >/dev/null
log "ok"
