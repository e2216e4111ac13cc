#!/usr/bin/env bash
# The shared bench, nginx against the router, run many times in alternating order.
#
#   scripts/shared-bench-series.sh BINARY [RUNS]     default: 8 runs
#
# Each run is one `../shared/bench/run.sh nginx ours` (odd runs) or `run.sh ours nginx` (even
# runs): per target a start, a warm-up, then repeats of a closed loop and a fixed rate, by the
# bench's defaults (5 s, three of 10 s with 64 connections, 1,000 req/s; its DURATION, CONNS,
# RATE, WARMUP and REPEAT variables pass through when given on the command line or exported,
# and the report says what ran). One run's median of three moves by a quarter on this
# project's 2-core machine (the same binary's CPU a request moves that much between 10 s
# loops), so a single run cannot tell two targets within that apart;
# this reports the distribution over runs instead:
#   - closed loop: the ratio of the two targets' medians in each run, and each repeat's ratio
#     to the other target's repeat of the same number in the same run;
#   - fixed rate: the router's p99 less nginx's, by run and by repeat, and how many are at most
#     0.2 ms slower;
#   - both split by which target went first;
#   - each target's CPU time a request (median over runs);
#   - the share of the whole machine's time the hypervisor took (steal, /proc/stat) over each
#     run, both targets with their starts and warm-ups.
#
# BINARY must be built from this checkout's sources (its `--version` names the commit; see
# built_from_checkout in scripts/bench-common.sh): a PGO build from scripts/build-pgo.sh, or
# target/release/llm-router. It runs with the command line of README.md's performance section
# (log level warn), its history in the bench folder's llm-router.db, removed before each run.
#
# Needs nginx and oha (../shared/bench/setup.sh). Writes
# loadtest/results/shared-bench-series-DATE-COMMIT.md, named after the checkout as it was at
# the start. Each run's two results and /proc/stat readings are kept in
# ../shared/bench/results/series-TIME/ as they come, so a series that stops keeps its earlier
# runs and the failed result.
set -euo pipefail
usage="usage: scripts/shared-bench-series.sh BINARY [RUNS]"
binary=$(realpath -e "${1:?$usage}") || exit 1 # before the cd: relative to the caller
runs=${2:-8}
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "RUNS must be a whole number above 0; $usage" >&2; exit 1; }
cd "$(dirname "$0")/.."
# For built_from_checkout, the scratch directory and stop_all (which stops the mock nodes if
# this started them; run.sh would start them too). bench-common.sh wants a port; the shared
# bench picks its own.
port=18200
# shellcheck source=scripts/bench-common.sh
. scripts/bench-common.sh
trap stop_all EXIT
built=$(built_from_checkout "$binary") || exit 1
checkout=$(git describe --always --dirty)
report=loadtest/results/shared-bench-series-$(date -u +%Y-%m-%d)-$checkout.md
kept="$shared/results/series-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$kept"
ours_cmd="env LLM_ROUTER_LOG=warn $(printf %q "$binary") --listen 127.0.0.1:{PORT} --upstream {NODES} --max-concurrency 256"

for run in $(seq "$runs"); do
  order=(nginx ours)
  if [ $((run % 2)) -eq 0 ]; then order=(ours nginx); fi
  echo "run $run of $runs: ${order[*]}"
  rm -f "$shared"/llm-router.db*
  before=$(ls "$shared/results")
  head -1 /proc/stat > "$kept/$run-cpu"
  (cd "$shared" && OURS_VERSION="$built" OURS_CMD="$ours_cmd" ./run.sh "${order[@]}" \
    >"$work/run-$run.log" 2>&1) || { tail -20 "$work/run-$run.log" >&2; exit 1; }
  head -1 /proc/stat >> "$kept/$run-cpu"
  # The two results this run wrote (the bench names them DATE-TARGET.json). The bench goes on
  # past a target that failed, with "status": "failed" in its file: stop at the first.
  for target in nginx ours; do
    file=$(comm -13 <(echo "$before") <(ls "$shared/results") | grep -- "-$target\.json$" || true)
    [ "$(wc -l <<<"$file")" = 1 ] && [ -n "$file" ] || { echo "run $run: no single $target result" >&2; exit 1; }
    cp "$shared/results/$file" "$kept/$run-$target.json"
    python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); r.get("status") == "ok" or sys.exit("%s: %s: %s" % (sys.argv[1], r.get("status"), r.get("error")))' \
      "$kept/$run-$target.json" || { tail -20 "$work/run-$run.log" >&2; exit 1; }
  done
done
rm -f "$shared"/llm-router.db*

python3 - "$kept" "$runs" "$checkout" "$built" "$(uname -r)" > "$work/report.md" <<'PY'
import collections, json, statistics as st, sys
folder, runs, checkout, built, kernel = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]

def load(run, target):
    # Only results with "status": "ok" were kept.
    return json.load(open(f"{folder}/{run}-{target}.json"))

def steal_pct(run):
    # /proc/stat's first line before and after the run: user nice system idle iowait irq
    # softirq steal ...
    a, b = ([int(x) for x in line.split()[1:9]] for line in open(f"{folder}/{run}-cpu"))
    total = sum(b) - sum(a)
    return 100.0 * (b[7] - a[7]) / total if total else 0.0

def rps_each(r):
    return r["closed"].get("rps_2xx_each", [r["closed"]["rps_2xx"]])

def p99_each(r):
    raw = r["raw"]["fixed"]
    raw = raw if isinstance(raw, list) else [raw]
    return [o["latencyPercentiles"]["p99"] * 1000 for o in raw]

def quartiles(xs, signed=False):
    q = st.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    f = (lambda x: f"{x:+.2f}") if signed else (lambda x: f"{x:.2f}")
    return f"{f(q[1])} (quartiles {f(q[0])} to {f(q[2])}, range {f(min(xs))} to {f(max(xs))})"

Run = collections.namedtuple("Run", "number first nginx ours ratio repeat_ratios diff repeat_diffs")
rows = []
for run in range(1, runs + 1):
    n, o = load(run, "nginx"), load(run, "ours")
    rows.append(Run(
        number=run,
        first="nginx" if run % 2 else "ours",
        nginx=n,
        ours=o,
        ratio=o["closed"]["rps_2xx"] / n["closed"]["rps_2xx"],
        repeat_ratios=[a / b for a, b in zip(rps_each(o), rps_each(n))],
        diff=o["fixed"]["latency_ms"]["p99"] - n["fixed"]["latency_ms"]["p99"],
        repeat_diffs=[a - b for a, b in zip(p99_each(o), p99_each(n))],
    ))
repeat_ratios = [x for r in rows for x in r.repeat_ratios]
repeat_diffs = [x for r in rows for x in r.repeat_diffs]

p = rows[0].ours["params"]
print(f"# The shared bench in a series: nginx against the router (checkout {checkout})\n")
print(f"`scripts/shared-bench-series.sh BINARY {runs}`, the router {built}, kernel {kernel}, 2 cores.")
print(f"{runs} runs of `../shared/bench/run.sh`, odd ones `nginx ours`, even ones `ours nginx`. Per target")
print(f"a {p['warmup_s']} s warm-up, then {p['repeat']} repeats of a {p['duration_s']} s closed loop of "
      f"{p['connections']} connections and")
print(f"a {p['duration_s']} s fixed {p['rate']:,} req/s. Throughput in requests a second (2xx), latency in ms, CPU in µs of")
print("the target's own user and system time a request (closed loop, median of the repeats).\n")
print("| run | first | nginx req/s (repeats) | router req/s (repeats) | ratio of medians | nginx / router CPU | nginx p99 | router p99 | router − nginx p99 | steal % |")
print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|")
each = lambda r: f"{r['closed']['rps_2xx']:,.0f} ({', '.join(f'{x:,.0f}' for x in rps_each(r))})"
cpu = lambda r: r["closed"].get("proxy_cpu_us_per_req") or float("nan")
for r in rows:
    n, o = r.nginx, r.ours
    print(f"| {r.number} | {'router' if r.first == 'ours' else r.first} | {each(n)} | {each(o)} | {r.ratio:.2f} | "
          f"{cpu(n):.1f} / {cpu(o):.1f} | {n['fixed']['latency_ms']['p99']:.2f} | "
          f"{o['fixed']['latency_ms']['p99']:.2f} | {r.diff:+.2f} | {steal_pct(r.number):.1f} |")

ratios = [r.ratio for r in rows]
diffs = [r.diff for r in rows]
# Counted as printed, to two decimals.
within = lambda xs: sum(round(x, 2) <= 0.2 for x in xs)
at_least_one = lambda xs: sum(round(x, 2) >= 1 for x in xs)
print("\n## Closed-loop throughput, router over nginx\n")
print(f"- Ratio of each run's medians (what one run reports): median {quartiles(ratios)}; "
      f"{at_least_one(ratios)} of {len(ratios)} runs at 1.00 or more.")
print(f"- Each repeat against nginx's same repeat: median {quartiles(repeat_ratios)}; "
      f"{at_least_one(repeat_ratios)} of {len(repeat_ratios)} at 1.00 or more.")
pooled = {t: [x for r in rows for x in rps_each(getattr(r, t))] for t in ("nginx", "ours")}
print(f"- All repeats pooled: nginx median {st.median(pooled['nginx']):,.0f}, router {st.median(pooled['ours']):,.0f} "
      f"req/s, a ratio of {st.median(pooled['ours']) / st.median(pooled['nginx']):.2f}.")
cpu_n = [r.nginx["closed"].get("proxy_cpu_us_per_req") for r in rows]
cpu_o = [r.ours["closed"].get("proxy_cpu_us_per_req") for r in rows]
if all(cpu_n) and all(cpu_o):
    print(f"- CPU a request, median over runs: nginx {st.median(cpu_n):.1f} µs, router {st.median(cpu_o):.1f} µs.")
for first, label in (("nginx", "nginx first"), ("ours", "router first")):
    xs = [r.ratio for r in rows if r.first == first]
    if xs:
        print(f"- Runs with {label}: median ratio {st.median(xs):.2f} over {len(xs)}.")
print("\n## Fixed-rate p99, router less nginx (target: within 0.2 ms)\n")
print(f"- By run (medians of the repeats): median {quartiles(diffs, True)} ms; {within(diffs)} of {len(diffs)} runs "
      "at most 0.2 ms slower.")
print(f"- By repeat: median {quartiles(repeat_diffs, True)} ms; {within(repeat_diffs)} of {len(repeat_diffs)} at most "
      "0.2 ms slower.")
for first, label in (("nginx", "nginx first"), ("ours", "router first")):
    xs = [r.diff for r in rows if r.first == first]
    if xs:
        print(f"- Runs with {label}: median {st.median(xs):+.2f} ms over {len(xs)}.")
rss = [r.ours.get("peak_rss_kb") for r in rows]
if all(rss):
    print(f"\nRouter peak RSS: {min(rss) / 1024:.1f} to {max(rss) / 1024:.1f} MiB over the runs.")
PY
mv "$work/report.md" "$report"
cat "$report"
echo "wrote $report (the runs' data: $kept)"
