#!/usr/bin/env bash
# Fixed-rate latency against nginx, measured in alternation.
#
#   scripts/fixed-rate-ab.sh [ROUNDS] [SECONDS]     defaults: 8 rounds of 10 s per target
#
# The shared bench (../shared/bench/run.sh) reads one p99 a target from three 10 s loops run
# back to back. On this project's 2-core machine the p99 of one binary spreads over about 1 to
# 5 ms from one loop to the next, so one run's comparison says little about the target (p99
# within 0.2 ms of nginx's). This runs nginx and the router in turns instead: in each round each
# target is started, warmed up as the shared bench leaves it (a closed loop of 64 connections
# for SECONDS, which also fills the router's history), then offered 1,000 requests a second over
# 64 connections for SECONDS (oha with latency correction, as the shared bench does). Which
# target goes first alternates between rounds. The report gives every round's percentiles, the
# router's p99 minus nginx's in each round, the medians over rounds, and in how many rounds the
# router was within 0.2 ms of nginx or better.
#
# The router is target/release/llm-router (built here), or PGO_BIN if set (scripts/build-pgo.sh
# makes one in target/pgo/release/llm-router), with the default stack, its history on in a
# scratch database emptied before each round (HISTORY=off turns it off, to see what the history
# costs the tail), log level warn and 256 slots a node, on 127.0.0.1:18200 in front of the
# shared bench's two mock nodes (18001, 18002). A PGO_BIN binary must be a PGO build of this
# checkout's sources, which its `--version` tells (router/build.rs); the report names both.
#
# TWICE=1 runs each target twice in a row in each round (a fresh start each time), to see
# whether a loop reads worse for coming second: the report then also gives each target's second
# p99 minus its first, and compares the first loops.
#
# Needs nginx and oha (../shared/bench/setup.sh installs them). Starts the mock nodes if they are
# not up, and stops them again if it started them. Writes
# loadtest/results/fixed-rate-ab-DATE-COMMIT.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-8}
seconds=${2:-10}
port=18200
case "${HISTORY:-on}" in on | off) ;; *) echo "HISTORY must be on or off" >&2; exit 2 ;; esac
case "${TWICE:-0}" in 0 | 1) ;; *) echo "TWICE must be 0 or 1" >&2; exit 2 ;; esac
command -v nginx >/dev/null || { echo "needs nginx: run ../shared/bench/setup.sh" >&2; exit 1; }
# shellcheck source=scripts/bench-common.sh
. scripts/bench-common.sh
trap stop_all EXIT

if [ -n "${PGO_BIN:-}" ]; then
  router=$(realpath "$PGO_BIN")
  kind=pgo
else
  cargo build --release -q -p llm-router --bin llm-router
  router=$PWD/target/release/llm-router
  kind=plain
fi
built=$(built_from_checkout "$router" "$kind") || exit 1
if [ "$kind" = pgo ]; then build="PGO build ($PGO_BIN, $built)"; else build="plain release build ($built)"; fi
# The report is named after the checkout as the binaries were checked against it, so edits
# made while this runs do not rename it.
checkout=$(git describe --always --dirty)
write_nginx_conf
if [ "${HISTORY:-on}" = off ]; then
  printf '[history]\nenabled = false\n' > "$work/router.toml"
  build="$build, history off"
else
  printf '[history]\npath = "%s/history.db"\n' "$work" > "$work/router.toml"
fi

# fixed_rate ROUND NAME: the warm-up closed loop, then the fixed-rate loop; appends
# "round name p50 p95 p99 p99.9" (ms) to $work/rows.
fixed_rate() {
  "$oha" --no-tui -z "${seconds}s" -c 64 -m POST -T application/json -d "$body" "$url" >/dev/null
  local json
  json=$("$oha" --no-tui --output-format json -z "${seconds}s" -q 1000 --latency-correction -w \
    -c 64 -m POST -T application/json -d "$body" "$url")
  python3 - "$1" "$2" "$json" >> "$work/rows" <<'PY'
import json, sys
round_, name, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
codes = out["statusCodeDistribution"]
if set(codes) != {"200"} or out.get("errorDistribution"):
    sys.exit(f"{name}: not every request answered 200: {codes} {out.get('errorDistribution')}")
p = out["latencyPercentiles"]
print(round_, name, *(f"{p[k] * 1000:.3f}" for k in ("p50", "p95", "p99", "p99.9")))
PY
  tail -1 "$work/rows"
}

# run_nginx ROUND [NAME], run_router ROUND [NAME]: one start, loop and stop of the target.
run_nginx() {
  nginx -p "$work" -c "$work/nginx.conf"
  wait_ready
  fixed_rate "$1" "${2:-nginx}"
  kill "$(cat "$work/nginx.pid")"
  wait_port_free
}

run_router() {
  rm -f "$work"/history.db*
  LLM_ROUTER_LOG=warn "$router" --config "$work/router.toml" --listen "127.0.0.1:$port" \
    --upstream "$nodes" --max-concurrency 256 >"$work/router.log" 2>&1 &
  pid=$!
  wait_ready || { cat "$work/router.log" >&2; exit 1; }
  fixed_rate "$1" "${2:-router}"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  wait_port_free
}

# nginx_turn ROUND, router_turn ROUND: the target's loop, and with TWICE=1 its second one.
nginx_turn() {
  run_nginx "$1"
  if [ "${TWICE:-0}" = 1 ]; then run_nginx "$1" nginx-again; fi
}
router_turn() {
  run_router "$1"
  if [ "${TWICE:-0}" = 1 ]; then run_router "$1" router-again; fi
}

wait_port_free
for round in $(seq "$rounds"); do
  echo "round $round of $rounds"
  if [ $((round % 2)) -eq 1 ]; then
    nginx_turn "$round"; router_turn "$round"
  else
    router_turn "$round"; nginx_turn "$round"
  fi
done

twice=
if [ "${TWICE:-0}" = 1 ]; then twice=-twice; fi
report=loadtest/results/fixed-rate-ab-$(date -u +%Y-%m-%d)-$checkout${HISTORY:+-history-$HISTORY}$twice.md
python3 - "$work/rows" "$rounds" "$seconds" "$checkout" "$build" "$(uname -r)" "$twice" > "$report" <<'PY'
import statistics as st, sys
rows, rounds, seconds, commit, build, kernel, twice = sys.argv[1:8]
by_round = {}
for line in open(rows):
    r, name, *ms = line.split()
    by_round.setdefault(int(r), {})[name] = [float(x) for x in ms]
print(f"# Fixed-rate latency in alternation: nginx and the router (checkout {commit})\n")
print(f"`scripts/fixed-rate-ab.sh {rounds} {seconds}`, the router's {build}, kernel {kernel}, 2 cores:")
print(f"{rounds} rounds; in each, each target is warmed by a {seconds} s closed loop of 64 connections, then")
print(f"offered 1,000 requests a second over 64 connections for {seconds} s (oha, latency correction).")
print("Odd rounds run nginx first, even rounds the router." + (" Each target runs twice in a row (`TWICE=1`): the\nfirst loops are compared here, the second ones below." if twice else "") + " Latency in ms.\n")
print("| round | nginx p50 / p95 / p99 / p99.9 | router p50 / p95 / p99 / p99.9 | router p99 − nginx p99 |")
print("|---:|---:|---:|---:|")
diffs = []
for r in sorted(by_round):
    n, o = by_round[r]["nginx"], by_round[r]["router"]
    diffs.append(o[2] - n[2])
    print(f"| {r} | {' / '.join(f'{x:.2f}' for x in n)} | {' / '.join(f'{x:.2f}' for x in o)} | {o[2] - n[2]:+.2f} |")
med = lambda name, k: st.median(by_round[r][name][k] for r in by_round)
print("\n| target | median p50 | median p95 | median p99 | median p99.9 |")
print("|---|---:|---:|---:|---:|")
for name in ("nginx", "router"):
    print(f"| {name} | " + " | ".join(f"{med(name, k):.2f}" for k in range(4)) + " |")
within = sum(d <= 0.2 for d in diffs)
print(f"\nMedian of the router's p99 minus nginx's, round by round: {st.median(diffs):+.2f} ms; the router")
print(f"was within 0.2 ms of nginx's p99 or better in {within} of {len(diffs)} rounds. The spread of nginx's")
print(f"own p99 over the rounds: {min(by_round[r]['nginx'][2] for r in by_round):.2f}-{max(by_round[r]['nginx'][2] for r in by_round):.2f} ms.")
by_first = {first: [d for r, d in zip(sorted(by_round), diffs) if r % 2 == parity] for first, parity in (("nginx", 1), ("router", 0))}
if all(by_first.values()):
    print(f"By who went first: {st.median(by_first['nginx']):+.2f} ms (median) in the rounds nginx went first,")
    print(f"{st.median(by_first['router']):+.2f} in those the router went first.")
if twice:
    print("\nEach target's second loop against its first (p99, ms):\n")
    print("| round | nginx first / second | second − first | router first / second | second − first |")
    print("|---:|---:|---:|---:|---:|")
    again = {"nginx": [], "router": []}
    for r in sorted(by_round):
        cells = []
        for name in ("nginx", "router"):
            first, second = by_round[r][name][2], by_round[r][f"{name}-again"][2]
            again[name].append(second - first)
            cells += [f"{first:.2f} / {second:.2f}", f"{second - first:+.2f}"]
        print(f"| {r} | " + " | ".join(cells) + " |")
    for name, d in again.items():
        worse = sum(x > 0 for x in d)
        print(f"\n{name}: median second − first {st.median(d):+.2f} ms; the second loop read worse in {worse} of {len(d)} rounds.", end="")
    print()
PY
cat "$report"
echo "written: $report"
