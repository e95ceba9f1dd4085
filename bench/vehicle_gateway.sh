#!/usr/bin/env bash
# Cloud → vehicle through the reverse tunnel (issue 13), all figures in one run, on
# loopback: the real misaki-cp, the real edge-netd (uplink `lo`, a power file polled
# every 100 ms), the vehicle's Envoy fed by edge-netd and a cloud sidecar Envoy fed by
# misaki-cp (tests/src/gateway.rs). `diag` on the vehicle has a cloud replica and
# `on_low_power: cloud`; `cam` has no replica.
#
#   1. latency: N sequential keep-alive GETs to `diag` directly vs through the cloud
#      gateway (`x-misaki-target-vehicle: car-1`, down the tunnel the vehicle dialled);
#   2. offline: edge-netd killed (and frozen) → registry offline → gateway answers
#      503 vehicle-offline; and back online;
#   3. low power: `low` (and back `on`) written → registry knows → calls on the vehicle
#      and through the gateway both reach the replica (the vehicle).
#
#   bench/vehicle_gateway.sh [--requests 2000] [--warmup 200] [--trials 10] [--poll-ms 5] [--keep-logs]
#   SKIP_BUILD=1 bench/vehicle_gateway.sh     # reuse the release binaries
#
# Builds misaki-bench, misaki-cp and edge-netd in release mode; needs the real Envoy
# (scripts/setup.sh, or MISAKI_ENVOY). No root. Prints Markdown on stdout (progress on
# stderr) and writes it to bench/results-vehicle-gateway.md. ~20 s plus the build.
set -euo pipefail
CMDLINE="bench/vehicle_gateway.sh${*:+ $*}"
cd "$(dirname "$0")/.."
case "${1:-}" in
  -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
esac
if [ -z "${SKIP_BUILD:-}" ]; then
  # edge-netd and misaki-cp beside the benchmark: it starts the ones next to itself.
  cargo build --release -p misaki-bench -p misaki-control-plane -p misaki-edge-netd >&2
fi
BIN=${CARGO_TARGET_DIR:-target}/release/edit-latency
OUT=$(mktemp /tmp/vehicle-gateway.XXXXXX)
trap 'rm -f "$OUT"' EXIT
MISAKI_BENCH_CMDLINE="$CMDLINE" "$BIN" vehicle-gateway "$@" >"$OUT"
{
  echo "Run on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (with uncommitted changes)'), Linux $(uname -r), release build."
  echo
  cat "$OUT"
} >bench/results-vehicle-gateway.md
cat bench/results-vehicle-gateway.md
echo "written to bench/results-vehicle-gateway.md" >&2
