#!/usr/bin/env bash
# Starts llm-router with two built-in simulated nodes (models demo-small and demo-large).
# Extra arguments go to llm-router, e.g. scripts/demo.sh --listen 127.0.0.1:9000
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --quiet --release -p llm-router --bin llm-router -- --demo "$@"
