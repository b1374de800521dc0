#!/usr/bin/env bash
# Runs every fuzz target for RUNS executions each (default 100,000; the benchmark runner
# uses 10,000,000), from the seeds in fuzz/seeds/TARGET (real traffic: fuzz/seed.sh) into a
# fresh corpus in a temporary directory, and fails on the first crash. cargo-fuzz needs a nightly compiler's -Z flags: RUSTC_BOOTSTRAP=1 lets
# the machine's stable toolchain accept them. Prints each target's executions and time.
set -euo pipefail
cd "$(dirname "$0")"
runs="${1:-100000}"
# Seconds a target may run at most (a slow one stops there): FUZZ_MAX_TIME, default 600.
max_time="${FUZZ_MAX_TIME:-600}"
# Longest input: 4 KiB, as libFuzzer takes with no seeds. The recorded seeds run to 64 KiB
# (interleaved RTP); at that length rtsp_stream ran 1,000 inputs a second instead of 9,000.
# A longer seed is cut to this length.
max_len="${FUZZ_MAX_LEN:-4096}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
cargo fuzz build
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# FUZZ_TARGETS (space-separated) runs only those.
for target in ${FUZZ_TARGETS:-$(cargo fuzz list)}; do
  mkdir -p "$work/$target"
  start=$SECONDS
  # A target's dictionary (fuzz/TARGET.dict: the tokens its decoder branches on) lets the
  # fuzzer reach the rules behind them; without one, http_head never spells Content-Length.
  dict=()
  [ -f "$target.dict" ] && dict=(-dict="$PWD/$target.dict")
  # -max_total_time bounds a slow target; a crash exits non-zero and stops the script.
  seeds=()
  [ -d "seeds/$target" ] && seeds=("$PWD/seeds/$target")
  cargo fuzz run "$target" "$work/$target" "${seeds[@]}" -- -runs="$runs" -max_total_time="$max_time" -max_len="$max_len" "${dict[@]}" \
    > "$work/$target.log" 2>&1 || { tail -40 "$work/$target.log"; exit 1; }
  took=$((SECONDS - start))
  done_line=$(grep -E '^Done [0-9]+ runs' "$work/$target.log" | tail -1)
  echo "fuzz $target: ${done_line:-no summary} (${took} s with start-up), no crash"
done
