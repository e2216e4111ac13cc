#!/usr/bin/env bash
# Closed-loop overhead against nginx, measured in alternation.
#
#   scripts/overhead-ab.sh [ROUNDS] [SECONDS]     defaults: 6 rounds of 8 s per target
#
# Each round runs nginx (as the shared bench configures it), the router (default stack, history
# on, log level warn), the same router built with profile-guided optimization
# (scripts/build-pgo.sh), the router with its history off, the floor proxy
# (router/examples/floor_proxy.rs), the raw-head experiment (router/examples/raw_head_proxy.rs:
# the pump plus HTTP over the bytes as they came, no `http` types), the same with the router's
# own work per request (RAW_HEAD_WORK: JSON probe, node pool, metrics, SQLite history) and the
# byte pump (router/examples/byte_pump.rs: tokio and the kernel alone) one after another on
# 127.0.0.1:18200, in front of the shared bench's two mock nodes, with oha keeping 64
# connections busy, and reads each target's user and system CPU time from /proc. The ratio to
# nginx is taken within each round, then the median over rounds: on this project's 2-core
# machine the throughput of any one target drifts by about 10% over minutes, and the shared
# bench (../shared/bench/run.sh), which runs each target's three repeats back to back, catches
# nginx and the router in different phases of that drift.
#
# The report also fits the CPU budget: with both cores busy, each target's throughput is
# inversely proportional to REST + its own CPU time per request, where REST stands for what the
# rest of the machine (oha, the mock nodes, the kernel's own threads) spends per request, the
# same for every target. REST is fitted over all rounds; the report prints it, each target's
# predicted ratio beside the measured one, and so the CPU a request may cost the router for it
# to match nginx: nginx's own. Each round starts the router on an empty history database, so
# the history's cost is that of writing to a small table.
#
# The PGO build is made first (about 15 minutes), unless PGO_BIN names one already built from
# this checkout's sources (its `--version` must say so, and that it is a PGO build).
#
# Needs nginx and oha (../shared/bench/setup.sh installs them). Starts the mock nodes
# (../shared/bench/mock-nodes.sh) if they are not up, and stops them again if it started them.
# Writes loadtest/results/overhead-ab-DATE-COMMIT.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-6}
seconds=${2:-8}
port=18200
command -v nginx >/dev/null || { echo "needs nginx: run ../shared/bench/setup.sh" >&2; exit 1; }
# shellcheck source=scripts/bench-common.sh
. scripts/bench-common.sh
trap stop_all EXIT

cargo build --release -q -p llm-router --bin llm-router --example floor_proxy \
  --example raw_head_proxy --example byte_pump
if [ -z "${PGO_BIN:-}" ]; then
  scripts/build-pgo.sh
  PGO_BIN=target/pgo/release/llm-router
fi
pgo_built=$(built_from_checkout "$PGO_BIN" pgo) || exit 1
# The report is named after the checkout as the binaries were checked against it, so edits
# made while this runs do not rename it.
checkout=$(git describe --always --dirty)

write_nginx_conf
printf '[history]\npath = "%s/history.db"\n' "$work" > "$work/router.toml"
cp "$work/router.toml" "$work/router-pgo.toml"
printf '[history]\nenabled = false\n' > "$work/router-nohistory.toml"

# measure_example NAME EXAMPLE [VAR=VALUE...]: starts router/examples/EXAMPLE on the port, with
# those variables in its environment, measures it, stops it.
measure_example() {
  env "${@:3}" target/release/examples/"$2" "127.0.0.1:$port" "$nodes" >"$work/$1.log" 2>&1 &
  pid=$!
  wait_ready || { cat "$work/$1.log" >&2; exit 1; }
  measure "$1" "$pid"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
}

for round in $(seq "$rounds"); do
  echo "round $round of $rounds"
  wait_port_free
  nginx -p "$work" -c "$work/nginx.conf"
  wait_ready
  workers=$(pgrep -P "$(cat "$work/nginx.pid")" | tr '\n' ' ')
  measure nginx $workers
  kill "$(cat "$work/nginx.pid")"
  wait_port_free

  for variant in router router-pgo router-nohistory; do
    rm -f "$work"/history.db*
    binary=target/release/llm-router
    [ "$variant" = router-pgo ] && binary=$PGO_BIN
    LLM_ROUTER_LOG=warn "$binary" --config "$work/$variant.toml" \
      --listen "127.0.0.1:$port" --upstream "$nodes" --max-concurrency 256 >"$work/router.log" 2>&1 &
    pid=$!
    wait_ready || { cat "$work/router.log" >&2; exit 1; }
    measure "$variant" "$pid"
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
    wait_port_free
  done

  measure_example floor floor_proxy
  wait_port_free
  measure_example raw-head raw_head_proxy
  wait_port_free
  rm -f "$work"/raw-work.db*
  measure_example raw-work raw_head_proxy RAW_HEAD_WORK="$work/raw-work.db"
  wait_port_free
  measure_example pump byte_pump
done

report=loadtest/results/overhead-ab-$(date -u +%Y-%m-%d)-$checkout.md
python3 - "$work/rows" "$rounds" "$seconds" "$checkout" "$pgo_built" > "$report" <<'PY'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1])]
rows = [(r[0], int(r[1]), float(r[2]), float(r[3])) for r in rows]
names = ["nginx", "router", "router-pgo", "router-nohistory", "floor", "raw-head", "raw-work", "pump"]
rounds = [rows[i:i + len(names)] for i in range(0, len(rows), len(names))]
print(f"# Overhead in alternation: nginx, router (plain and PGO builds), router without history, floor, raw head (without and with the router's work), pump (commit {sys.argv[4]})\n")
print(f"`scripts/overhead-ab.sh {sys.argv[2]} {sys.argv[3]}`: {sys.argv[2]} rounds; in each, one {sys.argv[3]} s closed loop")
print("of 64 connections (oha, after 2 s of warm-up) per target, on 127.0.0.1 in front of the shared")
print("bench's two mock nodes. CPU is the target's own user and system time per request. router-pgo is")
print(f"the router built by scripts/build-pgo.sh (profile-guided, trained on this repo's sim nodes; {sys.argv[5]}). The floor is")
print("the router's HTTP stack without its layers, history and metrics (router/examples/floor_proxy.rs);")
print("raw-head does the same HTTP over the bytes as they came, without `http`'s types")
print("(router/examples/raw_head_proxy.rs), raw-work the same with the router's own work per request")
print("(`RAW_HEAD_WORK`: JSON probe, node pool, metrics, SQLite history); the pump forwards bytes")
print("with tokio and no HTTP library (router/examples/byte_pump.rs).\n")
print("| round | " + " | ".join(f"{n} req/s" for n in names) + " | " + " | ".join(f"{n} / nginx" for n in names[1:]) + " |")
print("|---:|" + "---:|" * (2 * len(names) - 1))
for i, r in enumerate(rounds, 1):
    print(f"| {i} | " + " | ".join(f"{x[1]:,}" for x in r) + " | " + " | ".join(f"{x[1] / r[0][1]:.2f}" for x in r[1:]) + " |")
print("\n| target | median req/s | median user µs/req | median system µs/req | median ratio to nginx |")
print("|---|---:|---:|---:|---:|")
for k, name in enumerate(names):
    v = [r[k] for r in rounds]
    ratio = st.median(r[k][1] / r[0][1] for r in rounds)
    print(f"| {name} | {st.median(x[1] for x in v):,.0f} | {st.median(x[2] for x in v):.1f} | {st.median(x[3] for x in v):.1f} | {ratio:.2f} |")

# The CPU budget: within a round, req/s x (REST + cpu) is the same for every target.
def misfit(rest):
    error = 0.0
    for r in rounds:
        products = [x[1] * (rest + x[2] + x[3]) for x in r]
        mean = sum(products) / len(products)
        error += sum((p / mean - 1) ** 2 for p in products)
    return error
rest = min((tenth / 10 for tenth in range(0, 1000)), key=misfit)
rms = (misfit(rest) / len(rows)) ** 0.5
def worst(rest):
    out = 0.0
    for r in rounds:
        products = [x[1] * (rest + x[2] + x[3]) for x in r]
        mean = sum(products) / len(products)
        out = max(out, *(abs(p / mean - 1) for p in products))
    return out
cpu = {name: st.median(r[k][2] + r[k][3] for r in rounds) for k, name in enumerate(names)}
print(f"\n## CPU budget\n")
print(f"Fitted over all rounds: the rest of the machine (oha, the mock nodes, the kernel's threads) costs")
print(f"REST = {rest:.1f} µs of CPU per request;")
print(f"throughput = constant / (REST + the target's CPU per request) fits the loops with an rms error")
print(f"of {100 * rms:.1f}% (largest {100 * worst(rest):.1f}%), each round's constant its own.\n")
print("| target | median of user + system per loop, µs/req | predicted ratio to nginx | median measured |")
print("|---|---:|---:|---:|")
for k, name in enumerate(names):
    measured = st.median(r[k][1] / r[0][1] for r in rounds)
    print(f"| {name} | {cpu[name]:.1f} | {(rest + cpu['nginx']) / (rest + cpu[name]):.2f} | {measured:.2f} |")
print(f"\nTo match nginx the router may spend what nginx does: {cpu['nginx']:.1f} µs a request, against its")
print(f"{cpu['router']:.1f} now ({cpu['router-pgo']:.1f} built with PGO; {cpu['router-nohistory']:.1f} with the history off: history on minus off,")
print(f"{cpu['router'] - cpu['router-nohistory']:.1f} µs, a difference of medians of runs that vary by about 2 µs). The pump,")
print(f"which parses nothing, spends {cpu['pump']:.1f}; the floor {cpu['floor']:.1f} and the raw-head experiment")
print(f"{cpu['raw-head']:.1f}, so forwarding heads as bytes instead of `http`'s types would save about")
print(f"{cpu['floor'] - cpu['raw-head']:.1f} µs a request of the router's HTTP stack. With the router's own work on the raw")
print(f"path it spends {cpu['raw-work']:.1f}, against nginx's {cpu['nginx']:.1f}.")
PY
cat "$report"
echo "written: $report"
