#!/usr/bin/env bash
# Builds llm-router with profile-guided optimization: an instrumented build serves a training
# load, and the release build is made again with the profile it recorded, so the compiler lays
# out and inlines the request path for the way it runs.
#
#   scripts/build-pgo.sh        the binary lands in target/pgo/release/llm-router
#
# The training load runs on 127.0.0.1 only, against two of this repo's sim nodes (no delays):
# closed loops of plain and streamed chat completions with the default stack and the history on,
# then a few of each other route and of the errors a client can cause. It never touches the
# shared bench's mock nodes, so the profile is not fitted to the benchmark's one request.
# Takes two release builds (about 11 minutes on two cores). Needs the toolchain's llvm-tools
# component for llvm-profdata, which it adds with rustup when missing.
#
# target/release/llm-router stays the plain build: the PGO build has its own target directory,
# since the compiler flags it needs would make cargo rebuild the plain one. Both builds name the
# host as `--target`, so that the flags reach the router's crates and not the build scripts and
# proc macros that run while it is built (rustc's book on PGO); the binary is then copied to
# target/pgo/release/llm-router.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
log() { printf '[build-pgo] %s\n' "$*" >&2; }
command -v python3 >/dev/null || { log "needs python3 (to pick free ports and read the load's reports)"; exit 1; }

sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
profdata=$sysroot/lib/rustlib/$host/bin/llvm-profdata
if [ ! -x "$profdata" ]; then
  log "rustup component add llvm-tools"
  rustup component add llvm-tools
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

log "building the sim nodes, the load driver and the instrumented router"
cargo build --release -q -p llm-loadtest --bin llm-sim-node --bin llm-loadtest
RUSTFLAGS="-Cprofile-generate=$work/profiles" cargo build --release -q --target "$host" \
  --target-dir target/pgo-generate -p llm-router --bin llm-router

# Ports chosen by the OS: bind port 0, read what it gave, let go.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() {
  for _ in $(seq 200); do curl -s -o /dev/null "$1" && return 0; sleep 0.05; done
  log "nothing answers at $1"
  return 1
}
nodes=()
for _ in 1 2; do
  port=$(free_port)
  target/release/llm-sim-node --listen "127.0.0.1:$port" --models sim-model,sim-embed \
    --ttft-ms 0 --itl-ms 0 --tokens 16 >"$work/node-$port.log" 2>&1 &
  pids+=($!)
  nodes+=("http://127.0.0.1:$port")
  wait_up "http://127.0.0.1:$port/v1/models"
done
port=$(free_port)
router=http://127.0.0.1:$port
printf '[history]\npath = "%s/history.db"\n' "$work" >"$work/router.toml"
LLM_ROUTER_LOG=warn "target/pgo-generate/$host/release/llm-router" --config "$work/router.toml" \
  --listen "127.0.0.1:$port" --upstream "$(IFS=,; echo "${nodes[*]}")" --max-concurrency 256 \
  >"$work/router.log" 2>&1 &
router_pid=$!
pids+=("$router_pid")
wait_up "$router/v1/models" || { cat "$work/router.log" >&2; exit 1; }

log "training: closed loops of plain and streamed chat completions"
# load NAME ARGS...: one llm-loadtest run; a load that was not answered whole means the profile
# would be of error paths, so it stops the build.
load() {
  local name=$1; shift
  local failed=no
  target/release/llm-loadtest --out "$work/reports" run --url "$router" --name "$name" "$@" \
    >"$work/$name.log" 2>&1 || failed=yes
  [ "$failed" = no ] && python3 - "$work/reports/$name.json" <<'PY' || failed=yes
import json, sys
def results(node):
    if isinstance(node, dict):
        if "succeeded" in node and "requests" in node:
            yield node
        for value in node.values():
            yield from results(value)
    elif isinstance(node, list):
        for value in node:
            yield from results(value)
found = list(results(json.load(open(sys.argv[1]))))
sys.exit(0 if found and all(r["requests"] > 0 and r["succeeded"] == r["requests"] for r in found) else 1)
PY
  if [ "$failed" = yes ]; then
    log "training load $name failed"
    cat "$work/$name.log" "$work/router.log" >&2
    exit 1
  fi
}
load plain --connections 64 --duration 10
load streamed --connections 64 --duration 5 --stream
load few --connections 4 --duration 2
log "training: the other routes and some errors"
post() { curl -s -o /dev/null -H 'content-type: application/json' -d "$2" "$router$1"; }
for _ in $(seq 200); do
  post /v1/completions '{"model":"sim-model","prompt":"hi","max_tokens":8}'
  post /v1/embeddings '{"model":"sim-embed","input":"hi"}'
  curl -s -o /dev/null "$router/v1/models"
  post /v1/chat/completions '{"model":"no-such-model","messages":[]}'
  post /v1/chat/completions '{"model":'
  curl -s -o /dev/null "$router/health"
done
kill -INT "$router_pid"
wait "$router_pid" || { log "the instrumented router did not stop cleanly"; cat "$work/router.log" >&2; exit 1; }

"$profdata" merge -o "$work/merged.profdata" "$work/profiles"
log "building the router with the profile"
RUSTFLAGS="-Cprofile-use=$work/merged.profdata" cargo build --release -q --target "$host" \
  --target-dir target/pgo -p llm-router --bin llm-router
mkdir -p target/pgo/release
cp "target/pgo/$host/release/llm-router" target/pgo/release/llm-router
log "done: target/pgo/release/llm-router"
