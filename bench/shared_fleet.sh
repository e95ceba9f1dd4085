#!/usr/bin/env bash
# misaki-cp replicas sharing the fleet through etcd (issue 11): "3 replicas × 10,000
# streams on this machine: fleet-view convergence across replicas after a link change
# (aim p99 ≤ 1 s); etcd writes/s and db size at 30,000 vehicles with one link change
# per vehicle per minute".
#
#   bench/shared_fleet.sh [--vehicles 30000] [--replicas 3] [--trials 100] [--steady-secs 60] [--mode delta|sotw] [--keep]
#
# Builds misaki-loadgen and misaki-cp (release) and runs `misaki-loadgen shared-fleet`:
# a real etcd and N misaki-cp replicas (`serve --store`, default lease TTL 5 s) on
# loopback ports, simulated vehicles reporting over the real FleetService spread evenly
# over the replicas (64 shared HTTP/2 connections per replica, a heartbeat every 20 s).
# Measured: until every replica lists every vehicle online; per trial, one vehicle's
# link change sent to its replica until every other replica's /fleet/{vehicle} shows it
# (distinct vehicles, after the 1 s write coalescing window); then a steady load of one
# change per vehicle per minute: etcd's puts/s and database size, each replica's CPU.
# Each vehicle also holds an ADS stream (delta by default) to its replica. Last, replica
# 0 is killed with SIGKILL: its vehicles' report streams reconnect to the others at
# once, their ADS streams each after a delay drawn over 500 ms (Envoy's first retry),
# and per vehicle the time from the kill until its ADS stream has every type answered
# is taken (back on config).
#
# Writes Markdown to stdout (progress on stderr) and, with the command line, date,
# commit, machine and load average, to bench/results-shared-fleet.md. Loopback only,
# no root. About 3 minutes with the defaults on 2 cores (plus the build).
set -euo pipefail
CMDLINE="bench/shared_fleet.sh${*:+ $*}"
cd "$(dirname "$0")/.."

VEHICLES=30000 REPLICAS=3 TRIALS=100 STEADY=60 MODE=delta KEEP=0
while (($#)); do
  case $1 in
    --vehicles) VEHICLES=$2; shift ;;
    --replicas) REPLICAS=$2; shift ;;
    --trials) TRIALS=$2; shift ;;
    --steady-secs) STEADY=$2; shift ;;
    --mode) MODE=$2; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 64 ;;
  esac
  shift
done
. bench/lib/lab.sh   # lab_machine, lab_nofile, lab_loadgen_traps, lab_loadgen

echo "fd limit: $(lab_nofile 65536)" >&2
cargo build --release -p misaki-loadgen -p misaki-control-plane >&2
COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- control-plane common 2>/dev/null || echo ' (with uncommitted changes)')
BIN=${CARGO_TARGET_DIR:-target}/release/misaki-loadgen

WORK=$(mktemp -d /tmp/misaki-shared-fleet.XXXXXX)
PIDFILE=$WORK/pids LG= LAB_KEEP=$KEEP LAB_PROCS='misaki-cp|etcd'
lab_loadgen_traps

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
START=$SECONDS
ARGS=(shared-fleet --out-dir "$WORK" --vehicles "$VEHICLES" --replicas "$REPLICAS" --trials "$TRIALS" --steady-secs "$STEADY" --mode "$MODE")
lab_loadgen "${ARGS[@]}" >"$WORK/table.md"

{
  echo "## misaki-cp replicas sharing the fleet through etcd (issue 11)"
  echo
  echo "Run \`$CMDLINE\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT;"
  echo "$(lab_machine), $(etcd --version | head -1); load average (1, 5, 15 min) at start $LOAD0, at the end $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "Took $((SECONDS - START)) s. misaki-cp and misaki-loadgen \`--release\`; the load generator runs \`misaki-loadgen ${ARGS[*]/#$WORK/DIR}\`."
  echo "Everything (etcd, the replicas, the load generator and its simulated vehicles) shares the machine's cores."
  echo
  cat "$WORK/table.md"
} | tee bench/results-shared-fleet.md
echo "written to bench/results-shared-fleet.md" >&2
