#!/usr/bin/env bash
# The reliability soak: 10 minutes of mixed streamed and non-streamed load through a release
# router, with one of three sim nodes killed every minute and back 5 s later. Not part of
# scripts/test.sh. The report goes to loadtest/results/soak.{md,json,svg}: requests lost without
# an answer (must be 0), history rows against answered requests less counted drops (must be
# equal), and the router's RSS trend after warm-up.
#
#   scripts/soak.sh [flags of `llm-loadtest scenario soak`]
#   e.g. scripts/soak.sh --soak-duration 120 --kill-every 20
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p llm-router --bin llm-router -p llm-loadtest --bin llm-loadtest
exec target/release/llm-loadtest --out loadtest/results scenario soak "$@"
