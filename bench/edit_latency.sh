#!/usr/bin/env bash
# Policy edit → new route live through one real Envoy: misaki (SotW, delta) against
# Envoy's own watched-file config and sovereign. Prints one Markdown table on stdout
# (progress on stderr).
#
#   bench/edit_latency.sh [--edits N] [--only misaki-sotw,misaki-delta,envoy-files,sovereign] [--help]
#
# Needs the real Envoy (scripts/setup.sh puts it in .venv/bin/envoy, or set
# MISAKI_ENVOY). Installs the peer control plane, PyPI `sovereign`, into
# bench/.venv-sovereign on first use; if that fails the table says so.
set -euo pipefail
cd "$(dirname "$0")/.."

SOVEREIGN_VERSION=0.32.12
venv=bench/.venv-sovereign
if [[ ! -x $venv/bin/sovereign ]]; then
    echo "installing sovereign $SOVEREIGN_VERSION into $venv" >&2
    { python3 -m venv "$venv" && "$venv/bin/pip" install -q "sovereign==$SOVEREIGN_VERSION"; } >&2 ||
        echo "warning: sovereign install failed; its row will say not measured" >&2
fi

# misaki-cp in release too: the benchmark starts the one beside its own binary.
cargo build --release -p misaki-bench -p misaki-control-plane >&2
exec "${CARGO_TARGET_DIR:-target}/release/edit-latency" "$@"
