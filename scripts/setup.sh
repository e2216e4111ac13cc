#!/usr/bin/env bash
# Installs what building and testing llm-router needs, and nothing when it is all there.
# Called by scripts/demo.sh and scripts/test.sh; safe to run again.
set -euo pipefail
log() { printf '[setup] %s\n' "$*" >&2; }

if ! command -v cargo > /dev/null; then
  log "cargo not found: install the Rust toolchain (https://rustup.rs), then run this again"
  exit 1
fi
if command -v rustup > /dev/null; then
  for component in rustfmt clippy; do
    if ! rustup component list --installed 2> /dev/null | grep -q "^$component"; then
      log "rustup component add $component"
      rustup component add "$component"
    fi
  done
fi
# A C compiler links the Rust binaries; chattr (e2fsprogs) lets a test make the history database
# read-only under the running router. Debian-based machines get both from apt.
packages=()
command -v cc > /dev/null || packages+=(gcc libc6-dev)
command -v chattr > /dev/null || packages+=(e2fsprogs)
if [ ${#packages[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  log "apt-get install ${packages[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${packages[@]}"
fi
