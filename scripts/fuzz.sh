#!/usr/bin/env bash
# Fuzzes request parsing (`model`, `stream`), the HTTP/1 request reader and config parsing with
# cargo-fuzz (libFuzzer) for a bounded time per target. Not part of scripts/test.sh.
#
#   scripts/fuzz.sh [seconds per target, default 60] [target...]
#
# The machine has one (stable) toolchain; RUSTC_BOOTSTRAP=1 lets it take the sanitizer flags
# cargo-fuzz passes. Seeds come from fuzz/seeds/<target>. A crash is saved under
# fuzz/artifacts/<target>/: fix it, then copy the input to fuzz/regressions/<target>/, where
# router/tests/fuzz_regressions.rs runs it in the default test command from then on.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(request_info config http1_request)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cd fuzz
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  cp -n "seeds/$target"/* "corpus/$target"/ 2>/dev/null || true
  cp -n "regressions/$target"/* "corpus/$target"/ 2>/dev/null || true
  echo "fuzzing $target for ${seconds}s"
  RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -print_final_stats=1 2>&1 | grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb|==|.*panicked|.*crash)" || true
  if compgen -G "artifacts/$target/crash-*" >/dev/null; then
    echo "$target: crashes in fuzz/artifacts/$target" >&2
    exit 1
  fi
done
