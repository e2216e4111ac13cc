#!/usr/bin/env bash
# Two router builds in alternating closed loops, for changes of a few percent that the drift
# between runs hides (see overhead-ab.sh): a pair runs A then B back to back, so both see the
# same phase of the machine.
#
#   scripts/ab-pairs.sh BIN_A BIN_B [PAIRS] [SECONDS] [CONFIG]    defaults: 8 pairs of 8 s
#
# Each loop starts the binary on 127.0.0.1:18200 in front of the shared bench's two mock nodes
# (default stack, log level warn, 256 slots a node) with CONFIG, or by default with the history
# on in a scratch database emptied before each loop; oha keeps 64 connections busy after 2 s of
# warm-up, and each process's user and system CPU comes from /proc. Prints every loop, then per
# pair B's throughput over A's and B's CPU a request minus A's, and their medians with how many
# pairs went B's way. Copy the two builds aside first, for example:
#
#   cargo build --release -p llm-router --bin llm-router && cp target/release/llm-router /tmp/b
#
# Needs oha (../shared/bench/setup.sh). Starts the mock nodes if they are not up, and stops them
# again if it started them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -lt 2 ]; then
  echo "usage: scripts/ab-pairs.sh BIN_A BIN_B [PAIRS] [SECONDS] [CONFIG]" >&2
  exit 2
fi
bin_a=$(realpath "$1")
bin_b=$(realpath "$2")
pairs=${3:-8}
seconds=${4:-8}
config=${5:-}
port=18200
for bin in "$bin_a" "$bin_b"; do
  [ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 2; }
done
# shellcheck source=scripts/bench-common.sh
. scripts/bench-common.sh
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  stop_mocks
  rm -rf "$work"
}
trap cleanup EXIT
if [ -z "$config" ]; then
  config=$work/router.toml
  printf '[history]\npath = "%s/history.db"\n' "$work" > "$config"
fi

# loop NAME BIN: one closed loop of BIN, measured.
loop() {
  rm -f "$work"/history.db*
  LLM_ROUTER_LOG=warn "$2" --config "$config" --listen "127.0.0.1:$port" --upstream "$nodes" \
    --max-concurrency 256 >"$work/router.log" 2>&1 &
  pid=$!
  wait_ready || { cat "$work/router.log" >&2; exit 1; }
  measure "$1" "$pid"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  wait_port_free
}

for _ in $(seq "$pairs"); do
  wait_port_free
  loop a "$bin_a"
  loop b "$bin_b"
done

python3 - "$work/rows" "$bin_a" "$bin_b" <<'PY'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1])]
rows = [(r[0], int(r[1]), float(r[2]), float(r[3])) for r in rows]
pairs = [(rows[i], rows[i + 1]) for i in range(0, len(rows) - 1, 2)]
print(f"\nA = {sys.argv[2]}\nB = {sys.argv[3]}\n")
print("| pair | A req/s | B req/s | B / A | A CPU µs/req | B CPU µs/req | B − A CPU | B − A user |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|")
ratios, cpu, user = [], [], []
for i, (a, b) in enumerate(pairs, 1):
    ratios.append(b[1] / a[1])
    cpu.append((b[2] + b[3]) - (a[2] + a[3]))
    user.append(b[2] - a[2])
    print(f"| {i} | {a[1]:,} | {b[1]:,} | {ratios[-1]:.3f} | {a[2] + a[3]:.1f} | {b[2] + b[3]:.1f} | {cpu[-1]:+.1f} | {user[-1]:+.1f} |")
print(f"\nmedian B / A throughput {st.median(ratios):.3f} (B faster in {sum(r > 1 for r in ratios)} of {len(ratios)});")
print(f"median B − A CPU {st.median(cpu):+.2f} µs a request (B lower in {sum(c < 0 for c in cpu)}),"
      f" of which user {st.median(user):+.2f}.")
PY
