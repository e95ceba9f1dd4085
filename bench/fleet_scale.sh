#!/usr/bin/env bash
# Control plane at fleet scale: misaki-cp with thousands of ADS streams.
#
#   bench/fleet_scale.sh [--quick] [--no-envoys] [--big N] [--keep]
#
# Builds misaki-loadgen and misaki-cp (release), then prints two Markdown tables on
# stdout (progress on stderr):
#   1. simulated vehicles (misaki-loadgen, behaving like Envoy's ADS client):
#      1,000 and 10,000 streams, SotW and delta, over 64 shared HTTP/2 connections,
#      plus 10,000 with one connection per stream (as real Envoys connect), plus
#      --big N streams (default 30,000; skipped if memory is short): misaki-cp RSS per
#      stream, fleet-wide change latency (p50/p99/max), a new vehicle's time to full
#      config (p50/p99), misaki-cp CPU per phase;
#   2. real Envoy 1.40 sidecars (16) against the same number of simulated streams:
#      policy edit → every stream ACKed on misaki-cp's /nodes.
# --quick: 1,000 and 10,000 over shared connections only, no big row, fewer trials.
# --keep: keep policies and logs (the directory is printed).
#
# Bounded: the load generator stops itself (deadline) and kills everything it
# started, on failure and on SIGINT/SIGTERM too; this script's trap kills whatever is
# left from the pid file. Loopback only; misaki-cp and Envoy admin ports are
# ephemeral, the policy's sidecar ports 25001/25006/25443.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0 envoys=1 big=30000 keep=0
while (($#)); do
    case $1 in
    --quick) quick=1 ;;
    --no-envoys) envoys=0 ;;
    --big) big=$2; shift ;;
    --keep) keep=1 ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 64 ;;
    esac
    shift
done

# One fd per connection on each side; 10,000 per-stream connections need >10,000.
# Containers may cap the hard limit below 65536: take what is allowed.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "fd limit: $(ulimit -n)" >&2

cargo build --release -p misaki-loadgen -p misaki-control-plane >&2
BIN=${CARGO_TARGET_DIR:-target}/release/misaki-loadgen

WORK=$(mktemp -d /tmp/misaki-fleet-scale.XXXXXX)
. bench/lib/lab.sh   # lab_loadgen_traps, lab_loadgen
PIDFILE=$WORK/pids LG= LAB_KEEP=$keep LAB_PROCS='misaki-cp|envoy'
lab_loadgen_traps
run() { lab_loadgen "$@"; }

common=(--out-dir "$WORK")
if ((quick)); then
    run bench "${common[@]}" --streams 1000,10000 --conns 64 --edits 3 --trials 20 --deadline-secs 900
else
    echo "## Simulated vehicles, 64 shared HTTP/2 connections"
    run bench "${common[@]}" --streams 1000,10000 --conns 64 --edits 5 --trials 50 --deadline-secs 1200
    echo
    echo "## Simulated vehicles, one HTTP/2 connection per stream (as Envoy connects)"
    run bench "${common[@]}" --streams 10000 --conns 0 --edits 5 --trials 50 --deadline-secs 1200
    if ((big > 0)); then
        echo
        echo "## Simulated vehicles, $big streams over 64 connections"
        # run_row refuses (with a message) if MemAvailable cannot hold it.
        run bench "${common[@]}" --streams "$big" --conns 64 --edits 5 --trials 50 --deadline-secs 1200 ||
            echo "($big streams: not measured, see stderr)"
    fi
fi
if ((envoys)); then
    echo
    echo "## Real Envoy sidecars vs. simulated, same misaki-cp setup"
    run envoys "${common[@]}" --count 16 --edits 10 --deadline-secs 900
fi
