#!/usr/bin/env bash
# The README's performance scenarios, with their own sim nodes and a release router. Not part of
# scripts/test.sh. Reports go to loadtest/results/<scenario>.{md,json,svg}.
#
#   scripts/bench.sh [overhead|streaming|fleet|overload|all] [flags of `llm-loadtest scenario`]
#   e.g. scripts/bench.sh fleet --duration 20
#
# The side-by-side table against nginx (and sglang-router, vllm-router, LiteLLM) comes from the
# shared bench instead; see the README's Performance section.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p llm-router --bin llm-router -p llm-loadtest --bin llm-loadtest
# 10,000 streams need about that many descriptors in the router and in the load generator.
ulimit -n "$(ulimit -Hn)"
exec target/release/llm-loadtest --out loadtest/results scenario "${1:-all}" "${@:2}"
