#!/usr/bin/env bash
# Runs `systemd-analyze verify` on systemd/bynder-usage-sync.service, with ExecStart pointed at a
# built binary (verify checks that the command exists). Fails on any message, warnings included.
# Usage: scripts/verify-systemd-unit.sh [path/to/bynder-usage-sync]
set -euo pipefail
cd "$(dirname "$0")/.."
binary="${1:-${CARGO_TARGET_DIR:-target}/debug/bynder-usage-sync}"
if [ ! -x "$binary" ]; then
    cargo build --locked --bin bynder-usage-sync
fi
binary="$(realpath "$binary")"
command -v systemd-analyze >/dev/null || {
    echo "systemd-analyze not found: apt-get install -y --no-install-recommends systemd" >&2
    exit 1
}
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
sed "s#/usr/local/bin/bynder-usage-sync#${binary}#" systemd/bynder-usage-sync.service \
    >"$dir/bynder-usage-sync.service"
out="$(systemd-analyze verify "$dir/bynder-usage-sync.service" 2>&1)" || {
    echo "$out" >&2
    exit 1
}
if [ -n "$out" ]; then
    echo "systemd-analyze verify reported:" >&2
    echo "$out" >&2
    exit 1
fi
echo "systemd/bynder-usage-sync.service: systemd-analyze verify passed"
