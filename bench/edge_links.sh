#!/usr/bin/env bash
# edge-netd link benchmark (needs root): failover time after carrier loss and after a
# silent blackhole, time from a link change to the fleet registry showing it, and
# edge-netd's idle RSS/CPU with three uplinks probed every 100 ms.
#
#   bench/edge_links.sh [TRIALS]        (default 20; builds release binaries first,
#                                        unless SKIP_BUILD=1)
#
# Topology as in tests/src/netns.rs: vehicle namespace with wlan0/wwan0/dsrc0 (veth,
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
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del $V 2>/dev/null || true
  ip netns del $C 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

ip netns add $V; ip netns add $C
ip -n $V link set lo up; ip -n $C link set lo up
ip -n $C addr add 198.18.0.1/32 dev lo
for k in all default; do
  ip netns exec $V sysctl -q -w net.ipv4.conf.$k.ignore_routes_with_linkdown=1 net.ipv4.conf.$k.rp_filter=0
done
n=0
for spec in "wlan0 cwlan0 1 50mbit" "wwan0 cwwan0 2 10mbit" "dsrc0 cdsrc0 3 2mbit"; do
  set -- $spec; n=$((n+1))
  ip link add $1 netns $V type veth peer name $2 netns $C
  ip -n $V addr add 198.18.$3.1/30 dev $1; ip -n $C addr add 198.18.$3.2/30 dev $2
  ip netns exec $V sysctl -q -w net.ipv4.conf.$1.ignore_routes_with_linkdown=1 net.ipv4.conf.$1.rp_filter=0
  ip -n $V link set $1 up; ip -n $C link set $2 up
  ip netns exec $V tc qdisc add dev $1 root tbf rate $4 burst 32kbit latency 50ms
  ip -n $V route add 198.18.0.1/32 via 198.18.$3.2 dev $1 metric $((n*10))
done

cat >"$DIR/mesh.yaml" <<YAML
version: 1
uplinks:
  - { name: wifi, kind: wifi, cost: 1 }
  - { name: lte, kind: lte, metered: true, cost: 5 }
  - { name: dsrc, kind: dsrc, cost: 2 }
classes:
  - { name: critical, timeout: 5s, retries: 1, uplinks: [wifi, lte, dsrc], max_loss_percent: 50 }
  - { name: standard, timeout: 5s, retries: 1, uplinks: [wifi, lte], max_loss_percent: 50 }
  - { name: bulk, timeout: 5s, retries: 1, uplinks: [wifi], deferrable: true, max_loss_percent: 50 }
YAML
# The probe echo runs in a misaki-cp of its own (xDS/admin on the namespace's loopback).
ip netns exec $C $CP serve --policy "$DIR/mesh.yaml" --probe-addr 198.18.0.1:7007 >"$DIR/echo.log" 2>&1 & PIDS+=($!)
ip netns exec $C $CP serve --policy "$DIR/mesh.yaml" --xds-addr 198.18.0.1:50051 --admin-addr 198.18.0.1:8080 >"$DIR/fleet.log" 2>&1 & PIDS+=($!)
cat >"$DIR/netd.yaml" <<YAML
vehicle_id: bench-car
control_plane: http://198.18.0.1:50051
api: 127.0.0.1:9470
state_dir: $DIR/state
heartbeat_interval: 1s
uplinks:
  - { name: wifi, interface: wlan0, kind: wifi, cost: 1 }
  - { name: lte, interface: wwan0, kind: lte, cost: 5, metered: true }
  - { name: dsrc, interface: dsrc0, kind: dsrc, cost: 2 }
probe:
  targets: ["198.18.0.1:7007"]
  interval: 100ms
  timeout: 200ms
selection:
  blackhole_after: 3
  dwell: 1s
YAML
sleep 0.5
ip netns exec $V env RUST_LOG=info NO_COLOR=1 $NETD --config "$DIR/netd.yaml" >"$DIR/netd.log" 2>&1 & NETD_PID=$!; PIDS+=($NETD_PID)

vget() { ip netns exec $V curl -s --max-time 2 "http://127.0.0.1:9470$1"; }
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
  else printf 'table inet bh {\n chain input {\n  type filter hook input priority 0; policy accept;\n  iifname "cwlan0" drop\n }\n}\n' | ip netns exec $C nft -f -; fi
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
read -r _ _ _ _ _ _ _ _ _ _ _ _ _ ut0 st0 _ < /proc/$NETD_PID/stat
sleep 10
read -r _ _ _ _ _ _ _ _ _ _ _ _ _ ut1 st1 _ < /proc/$NETD_PID/stat
TCK=$(getconf CLK_TCK)
CPU=$(python3 -c "print(round(($ut1+$st1-$ut0-$st0)/$TCK/10*100,2))")
RSS=$(awk '/VmRSS/{print $2}' /proc/$NETD_PID/status)

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
