#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: a measure of the router's own CPU that
# does not drift with the machine, for changes too small to show in a throughput run.
#
#   scripts/instructions.sh [REQUESTS]           default 2000 (after 3000 of warm-up)
#   scripts/instructions.sh --no-history [REQUESTS]
#                                                the router with its history off
#   scripts/instructions.sh --floor [REQUESTS]   the same for router/examples/floor_proxy.rs
#   scripts/instructions.sh --example NAME [REQUESTS]
#                                                the same for router/examples/NAME.rs (floor_proxy,
#                                                raw_head_proxy, byte_pump); for the last two, whose
#                                                one worker is the program, all threads count
#
# Runs the profiling build (`cargo build --profile profiling`) under valgrind with one connection
# worker and the history on (in a temporary directory), in front of the shared bench's mock
# nodes, and prints instructions per request: in all, on the request path (the connection
# worker), on sqlx's SQLite thread (the history writer's before e57c602, 0 since) and in the
# history writer (a task before e57c602, its own thread since); then the router's own functions
# with the most inclusive instructions. Compare two commits by running it on each: the request
# path's count repeats within 1%, SQLite's moves by up to a third with where its checkpoints fall.
# With INSTRUCTIONS_KEEP=DIR the callgrind file is copied there (for callgrind_annotate, or to
# compare two builds function by function).
#
# Needs valgrind (apt package) and oha (../shared/bench/setup.sh). Starts the mock nodes
# (../shared/bench/mock-nodes.sh) if they are not up, and stops them again if it started them.
set -euo pipefail
cd "$(dirname "$0")/.."
target=router
# The router stops on SIGINT; the examples have no handler, and a background job ignores SIGINT.
stop_signal=INT
example=
history=on
if [ "${1:-}" = "--no-history" ]; then
  history=off
  shift
elif [ "${1:-}" = "--floor" ]; then
  example=floor_proxy
  shift
elif [ "${1:-}" = "--example" ]; then
  example=${2:?--example needs a name}
  shift 2
fi
if [ -n "$example" ]; then
  target=$example
  stop_signal=TERM
fi
requests=${1:-2000}
port=18201
command -v valgrind >/dev/null && command -v callgrind_annotate >/dev/null || {
  echo "needs valgrind: apt-get install valgrind" >&2
  exit 1
}
# shellcheck source=scripts/bench-common.sh
. scripts/bench-common.sh
cleanup() {
  [ -n "$pid" ] && kill "-$stop_signal" "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  stop_mocks
  rm -rf "$work"
}
trap cleanup EXIT

if [ -n "$example" ]; then
  cargo build --profile profiling -q -p llm-router --example "$example"
  command=(target/profiling/examples/"$example" "127.0.0.1:$port" "$nodes" 1)
else
  cargo build --profile profiling -q -p llm-router --bin llm-router
  if [ "$history" = on ]; then
    printf '[limits]\nworkers = 1\n[history]\npath = "%s/history.db"\n' "$work" > "$work/router.toml"
  else
    printf '[limits]\nworkers = 1\n[history]\nenabled = false\n' > "$work/router.toml"
  fi
  command=(target/profiling/llm-router --config "$work/router.toml" --listen "127.0.0.1:$port"
    --upstream "$nodes" --max-concurrency 256)
fi

LLM_ROUTER_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p" "${command[@]}" \
  >"$work/router.log" 2>&1 &
pid=$!
for _ in $(seq 600); do
  curl -s -o /dev/null -X POST -H 'content-type: application/json' -d "$body" "$url" && break
  sleep 0.1
done
# Warm-up at 64 connections: every INSERT size gets prepared, buffers reach their size.
"$oha" --no-tui -n 3000 -c 64 -m POST -T application/json -d "$body" "$url" >/dev/null
# callgrind takes a command when the program next runs, and the examples have no timers to wake it:
# one request wakes it. That request is counted, so the counts are divided by REQUESTS + 1.
nudge() {
  callgrind_control "$1" "$pid" >/dev/null &
  local control=$!
  sleep 0.5
  curl -s -o /dev/null -X POST -H 'content-type: application/json' -d "$body" "$url"
  wait "$control"
}
nudge -z
"$oha" --no-tui --output-format json -n "$requests" -c 4 -m POST -T application/json -d "$body" "$url" \
  > "$work/oha.json"
nudge -d
sleep 1
kill "-$stop_signal" "$pid"; wait "$pid" 2>/dev/null || true; pid=

dump=$(ls "$work"/cg.*.1 | head -1)
if [ -n "${INSTRUCTIONS_KEEP:-}" ]; then
  mkdir -p "$INSTRUCTIONS_KEEP"
  cp "$dump" "$INSTRUCTIONS_KEEP/"
fi
python3 - "$work/oha.json" "$requests" <<'PY'
import json, sys
codes = json.load(open(sys.argv[1]))["statusCodeDistribution"]
if set(codes) != {"200"}:
    sys.exit(f"not every request answered 200: {codes}")
PY
callgrind_annotate --inclusive=yes --threshold=100 "$dump" 2>/dev/null \
  | sed -E "s#$PWD/##; s#/root/.cargo/registry/src/[^/]+/##; s#/rustc/[0-9a-f]+/##; s# \[[^]]*\]\$##" \
  > "$work/inclusive.txt"
python3 - "$work/inclusive.txt" "$requests" "$(git rev-parse --short HEAD)" "$target" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
n = int(sys.argv[2]) + 1
def cost(pattern):
    for l in lines:
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)", l)
        if m and re.search(pattern, m[2]):
            return int(m[1].replace(",", ""))
    return 0
closure = r"\{\{closure\}\}"
parts = [
    ("all threads", cost(r"PROGRAM TOTALS")),
    # The pump and the raw-head experiment are their one worker: all of them is the path.
    ("request path", cost(r"PROGRAM TOTALS") if sys.argv[4] in ("byte_pump", "raw_head_proxy")
        else cost(r"listen\.rs:router::listen::spawn_worker::" + "::".join([closure] * 3) + "$")),
    ("SQLite thread", cost(r"ConnectionWorker::establish::" + closure + "::" + closure + "$")),
    # The writer's thread since e57c602, the writer task's future before.
    ("history writer", cost(r"history\.rs:router::history::writer(::" + closure + ")?$")),
]
print(f"commit {sys.argv[3]}, {sys.argv[4]}: {n} requests, instructions per request")
for name, value in parts:
    print(f"  {name:<15} {value / n:9,.0f}")
print("  the router's and the layers' functions with the most (inclusive):")
seen = 0
for l in lines:
    m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S+?\.rs):(.*)", l)
    if not m or not m[2].startswith(("router/src", "layers/src")):
        continue
    if re.search(r"spawn_worker|ResponseFuture|Oneshot|writer|Batch::|__rust_begin_short_backtrace", m[3]):
        continue
    print(f"    {int(m[1].replace(',', '')) / n:8,.0f}  {(m[2] + ':' + m[3])[:120]}")
    seen += 1
    if seen == 15:
        break
PY
