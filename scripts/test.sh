#!/usr/bin/env bash
# Run every test: unit, protocol, property, real-Envoy end-to-end and network-namespace
# tests. Installs what it needs first (scripts/setup.sh). The namespace tests need root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export MISAKI_ENVOY="$PWD/.venv/bin/envoy"
cargo build --workspace --bins --examples
cargo test --workspace --no-fail-fast "$@"
