#!/usr/bin/env bash
# edge-netd link benchmark (needs root): failover time after carrier loss and after a
# silent blackhole, time from a link change to the fleet registry showing it, and
# edge-netd's idle RSS/CPU with three uplinks probed every 100 ms.
#
#   bench/edge_links.sh [TRIALS]        (default 20; builds release binaries first,
#                                        unless SKIP_BUILD=1)
#
# Topology (bench/lib/lab.sh) as in tests/src/netns.rs: vehicle namespace with wlan0/wwan0/dsrc0 (veth,
# tbf-shaped) to a cloud namespace running the fleet server and the probe echo.
# Failover time = from just before the `ip`/`nft` command to the timestamp of
# edge-netd's "uplink selection switched" log line for class critical (no polling
# error). Registry time = from the same instant until GET /fleet/<id> (polled every
# 5 ms) shows the new selection. Between trials wifi is restored and we wait for the
# selection to come back (dwell 1 s) plus 1.5 s, so the kernel's linkwatch (which
# batches carrier events to one per second per device) starts each trial idle.
set -euo pipefail
TRIALS=${1:-20}
cd "$(dirname "$0")/.."
. bench/lib/lab.sh
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
for t in ip tc nft curl jq python3; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }; done

if [ -z "${SKIP_BUILD:-}" ]; then   # SKIP_BUILD=1: use the release binaries already built
  # edge-netd as vehicles get it: the `vehicle` profile (size-optimised, LTO, stripped).
  cargo build --profile vehicle -q -p misaki-edge-netd --bin edge-netd
  cargo build --release -q -p misaki-control-plane --bin misaki-cp
fi
NETD=target/vehicle/edge-netd
CP=target/release/misaki-cp

V=bv-$$; C=bc-$$; DIR=$(mktemp -d)
PIDS=()
cleanup() {
  lab_kill_pids
  wait 2>/dev/null || true
  lab_down
  rm -rf "$DIR"
}
trap cleanup EXIT

lab_up
lab_policy_head >"$DIR/mesh.yaml"
# The probe echo runs in a misaki-cp of its own (xDS/admin on the namespace's loopback).
lab_start_cloud
lab_netd_config "$DIR/state" >"$DIR/netd.yaml"
sleep 0.5
lab_start_netd

vget() { lab_vget 9470 "$1"; }
fget() { ip netns exec $C curl -s --max-time 2 "http://198.18.0.1:8080$1"; }
sel() { vget /links | jq -r '.selections.critical.uplink // "none"' 2>/dev/null; }
wait_sel() { for _ in $(seq 1 600); do [ "$(sel)" = "$1" ] && return 0; sleep 0.02; done; echo "timeout waiting for $1" >&2; tail -20 "$DIR/netd.log" >&2; exit 1; }
now() { date +%s.%N; }

wait_sel wifi
for _ in $(seq 1 250); do [ "$(fget /fleet/bench-car | jq -r '.selections.critical.uplink' 2>/dev/null)" = wifi ] && break; sleep 0.02; done

# time of the Nth "switched class=critical" line in the log, as epoch seconds
switch_time() {
  grep 'uplink selection switched class=critical' "$DIR/netd.log" | sed -n "${1}p" |
    python3 -c 'import sys,datetime; l=sys.stdin.read().split()[0]; print(datetime.datetime.fromisoformat(l.replace("Z","+00:00")).timestamp())'
}
count_switches() { grep -c 'uplink selection switched class=critical' "$DIR/netd.log" || true; }

trial() { # $1 = carrier|blackhole ; prints "failover_ms registry_ms"
  local before t0 t1 t2
  before=$(count_switches)
  t0=$(now)
  if [ "$1" = carrier ]; then ip -n $C link set cwlan0 down
  else lab_blackhole_nft | ip netns exec $C nft -f -; fi
  for _ in $(seq 1 500); do [ "$(count_switches)" -gt "$before" ] && break; sleep 0.005; done
  t1=$(switch_time $((before+1)))
  for _ in $(seq 1 2000); do [ "$(fget /fleet/bench-car | jq -r '.selections.critical.uplink' 2>/dev/null)" = lte ] && break; sleep 0.005; done
  t2=$(now)
  if [ "$1" = carrier ]; then ip -n $C link set cwlan0 up; else ip netns exec $C nft delete table inet bh; fi
  wait_sel wifi
  sleep 1.5
  python3 -c "print(round(($t1-$t0)*1000,1), round(($t2-$t0)*1000,1))"
}

stats() { python3 -c '
import sys,statistics
xs=sorted(float(x) for x in sys.argv[2:])
p95=xs[min(len(xs)-1, int(round(0.95*(len(xs)-1))))]
print(f"| {sys.argv[1]:<38} | {len(xs):>3} | {statistics.median(xs):>8.1f} | {p95:>8.1f} | {max(xs):>8.1f} |")' "$@"; }

sleep 1.5
declare -a CF CR BF BR
for i in $(seq 1 "$TRIALS"); do read -r f r < <(trial carrier); CF+=("$f"); CR+=("$r"); done
for i in $(seq 1 "$TRIALS"); do read -r f r < <(trial blackhole); BF+=("$f"); BR+=("$r"); done

# Idle: 10 s with all links stable.
sleep 2
T0=$(lab_ticks $NETD_PID)
sleep 10
T1=$(lab_ticks $NETD_PID)
TCK=$(getconf CLK_TCK)
CPU=$(python3 -c "print(round(($T1-$T0)/$TCK/10*100,2))")
RSS=$(lab_rss_kib $NETD_PID)

echo
echo "edge-netd link benchmark: $TRIALS trials each; probes every 100 ms, timeout 200 ms, blackhole after 3 lost"
echo "| measurement                            |   n | median ms |  p95 ms  |  max ms  |"
echo "|----------------------------------------|-----|----------|----------|----------|"
stats "carrier loss -> new selection" "${CF[@]}"
stats "carrier loss -> registry shows it" "${CR[@]}"
stats "blackhole -> new selection" "${BF[@]}"
stats "blackhole -> registry shows it" "${BR[@]}"
echo
echo "edge-netd idle (3 uplinks probed, 10 s): RSS ${RSS} KiB, CPU ${CPU} % of one core"
