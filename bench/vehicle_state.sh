#!/usr/bin/env bash
# One vehicle's state change at fleet scale (issue 13): "at 10,000 streams, one
# vehicle's state change → its dependants have the new config, p99 (aim ≤ 50 ms), and
# misaki-cp CPU for it".
#
#   bench/vehicle_state.sh [--streams 1000,10000] [--modes sotw,delta] [--trials N] [--keep]
#
# Builds misaki-loadgen and misaki-cp (release) and runs `misaki-loadgen vehicle-state`:
# per fleet size a fresh misaki-cp on a policy with a vehicle gateway
# (`vehicle_gateways: [127.0.0.1]`, tunnel class) and a vehicle service with
# `cloud_replica` and `on_low_power: cloud` (plus the fleet benchmark's 20 cloud
# services); every vehicle car-0 … reports over the real FleetService (Hello, LinkState,
# a Heartbeat every 20 s) and holds an ADS stream (simulated Envoy), and 4 cloud
# sidecars (node.cluster cloud) hold ADS streams subscribed to SRDS. Per ADS mode (one
# after the other on the same misaki-cp), 4 batches of N trials (default 100), one
# vehicle at a time: power LOW, power ON again, report stream closed (offline), new
# report stream (online). Each is timed until every cloud stream has received and
# ACKed the new SRDS and, for power, the vehicle's own stream its new RDS; every other
# vehicle stream's responses are counted (must be 0); misaki-cp CPU per change.
#
# Writes Markdown to stdout (progress on stderr) and, with the command line, date,
# commit, machine and load average, to bench/results-vehicle-state.md. Loopback only,
# no root. About 4 minutes with the defaults on 2 cores (plus the build). Bounded: the
# load generator gives up after 9 minutes and kills what it started, also on failure
# and Ctrl-C; this script's trap kills whatever is left from the pid file.
set -euo pipefail
CMDLINE="bench/vehicle_state.sh${*:+ $*}"
cd "$(dirname "$0")/.."

STREAMS=1000,10000 MODES=sotw,delta TRIALS=100 KEEP=0
while (($#)); do
  case $1 in
    --streams) STREAMS=$2; shift ;;
    --modes) MODES=$2; shift ;;
    --trials) TRIALS=$2; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 64 ;;
  esac
  shift
done
. bench/lib/lab.sh   # lab_machine, lab_nofile, lab_loadgen_traps, lab_loadgen

# 64 shared connections for the ADS streams and 64 for the report streams, one per
# cloud stream: a few hundred descriptors; raise the limit anyway.
echo "fd limit: $(lab_nofile 65536)" >&2

cargo build --release -p misaki-loadgen -p misaki-control-plane >&2
COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- control-plane 2>/dev/null || echo ' (with uncommitted changes)')
BIN=${CARGO_TARGET_DIR:-target}/release/misaki-loadgen

WORK=$(mktemp -d /tmp/misaki-vehicle-state.XXXXXX)
PIDFILE=$WORK/pids LG= LAB_KEEP=$KEEP LAB_PROCS='misaki-cp'
lab_loadgen_traps

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
START=$SECONDS
ARGS=(vehicle-state --out-dir "$WORK" --streams "$STREAMS" --modes "$MODES" --trials "$TRIALS" --quiet-ms 30 --deadline-secs 540)
lab_loadgen "${ARGS[@]}" >"$WORK/tables.md"

{
  echo "## One vehicle's state change at fleet scale (issue 13)"
  echo
  echo "Run \`$CMDLINE\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT;"
  echo "$(lab_machine), shared with other builds: load average (1, 5, 15 min) at start $LOAD0, at the end $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "Took $((SECONDS - START)) s. misaki-cp and misaki-loadgen \`--release\`; the load generator runs \`misaki-loadgen ${ARGS[*]/#$WORK/DIR}\`."
  echo
  echo "Policy: the fleet benchmark's (quickstart + 20 cloud services) with \`vehicle_gateways: [127.0.0.1]\`,"
  echo "\`vehicle_tunnel_class: standard\`, a vehicle service \`diag\` with \`cloud_replica\` and \`on_low_power: cloud\`"
  echo "and one (\`cam\`) without a replica. Every vehicle \`car-i\` reports over FleetService (Hello holding the"
  echo "current policy, LinkState with power ON, a Heartbeat every 20 s; 64 shared HTTP/2 connections) and holds one"
  echo "ADS stream (simulated Envoy, 64 shared connections); 4 cloud sidecars (\`node.cluster: cloud\`, one connection"
  echo "each) subscribe to SRDS through their \`vehicle_gateway\` listener (scoped routes over SRDS, wildcard) and to"
  echo "the scopes' route tables over RDS. Both ADS modes run one after the other on the same misaki-cp and report"
  echo "streams (absorbing the fleet's first reports costs misaki-cp CPU: second table)."
  echo
  cat "$WORK/tables.md"
} | tee bench/results-vehicle-state.md
echo "written to bench/results-vehicle-state.md (add the analysis by hand)" >&2
