#!/usr/bin/env bash
# Runs `systemd-analyze verify` on systemd/bynder-usage-sync.service and on an instance of the
# template systemd/bynder-usage-sync@.service (bynder-usage-sync@example.service), with ExecStart
# pointed at a built binary (verify checks that the command exists). Fails on any message,
# warnings included. Then checks that the two units differ only in what is per instance, so the
# hardening, restart and reload settings of one cannot drift from the other's.
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

# verify UNIT_FILE_IN_DIR LABEL: fails on a non-zero exit and on any output.
verify() {
    local out
    out="$(systemd-analyze verify "$1" 2>&1)" || {
        echo "$2: systemd-analyze verify failed:" >&2
        echo "$out" >&2
        exit 1
    }
    if [ -n "$out" ]; then
        echo "$2: systemd-analyze verify reported:" >&2
        echo "$out" >&2
        exit 1
    fi
    echo "$2: systemd-analyze verify passed"
}

for unit in bynder-usage-sync.service bynder-usage-sync@.service; do
    sed "s#/usr/local/bin/bynder-usage-sync#${binary}#" "systemd/$unit" >"$dir/$unit"
done
verify "$dir/bynder-usage-sync.service" systemd/bynder-usage-sync.service
# A template cannot be verified by itself: an instance name beside it loads it with %i set.
verify "$dir/bynder-usage-sync@example.service" "systemd/bynder-usage-sync@.service (as bynder-usage-sync@example.service)"

# Everything but the per-instance keys must be the same in both units.
shared() {
    grep -vE '^[[:space:]]*(#|$)' "$1" |
        grep -vE '^(Description|ExecStart|StateDirectory|Environment|LoadCredential)='
}
if ! drift="$(diff <(shared systemd/bynder-usage-sync.service) <(shared systemd/bynder-usage-sync@.service))"; then
    echo "systemd/bynder-usage-sync@.service differs from systemd/bynder-usage-sync.service beyond" >&2
    echo "the per-instance keys (Description, ExecStart, StateDirectory, Environment, LoadCredential):" >&2
    echo "$drift" >&2
    exit 1
fi
echo "systemd units: the template shares every setting of the single unit but the per-instance ones"
