# The network-namespace lab of the link benchmarks, sourced by bench/edge_links.sh,
# bench/vehicle_loop.sh, bench/config_scale.sh and bench/envoy_stats.sh (the topology of tests/src/netns.rs):
#
#   vehicle namespace $V                          cloud namespace $C
#   wlan0 198.18.1.1/30 (tbf 50mbit) ── veth ──  cwlan0 198.18.1.2/30
#   wwan0 198.18.2.1/30 (tbf 10mbit) ── veth ──  cwwan0 198.18.2.2/30
#   dsrc0 198.18.3.1/30 (tbf  2mbit) ── veth ──  cdsrc0 198.18.3.2/30
#                                                lo 198.18.0.1: the fleet (misaki-cp,
#                                                gRPC :50051, admin :8080), probe echo :7007
#
# The vehicle routes 198.18.0.1 over all three (metrics 10, 20, 30) and ignores routes
# whose link is down. edge-netd's API is 127.0.0.1:9470 in the vehicle namespace.
#
# The sourcing script sets, before calling these: V and C (namespace names), DIR (its
# scratch dir), the array PIDS (every background process it starts, for lab_kill_pids),
# CP (the misaki-cp binary) and NETD (the edge-netd binary).

# Create both namespaces, the uplinks and the routes over them. Each argument is one
# uplink, "IFACE PEER OCTET [TBF_RATE]" (no rate: unshaped); none: the three above.
lab_up() {
  local n=0 k spec
  [ $# -gt 0 ] || set -- "wlan0 cwlan0 1 50mbit" "wwan0 cwwan0 2 10mbit" "dsrc0 cdsrc0 3 2mbit"
  ip netns add $V; ip netns add $C
  ip -n $V link set lo up; ip -n $C link set lo up
  ip -n $C addr add 198.18.0.1/32 dev lo
  for k in all default; do
    ip netns exec $V sysctl -q -w net.ipv4.conf.$k.ignore_routes_with_linkdown=1 net.ipv4.conf.$k.rp_filter=0
  done
  for spec in "$@"; do
    set -- $spec; n=$((n+1))
    ip link add $1 netns $V type veth peer name $2 netns $C
    ip -n $V addr add 198.18.$3.1/30 dev $1; ip -n $C addr add 198.18.$3.2/30 dev $2
    ip netns exec $V sysctl -q -w net.ipv4.conf.$1.ignore_routes_with_linkdown=1 net.ipv4.conf.$1.rp_filter=0
    ip -n $V link set $1 up; ip -n $C link set $2 up
    [ -z "${4:-}" ] || ip netns exec $V tc qdisc add dev $1 root tbf rate $4 burst 32kbit latency 50ms
    ip -n $V route add 198.18.0.1/32 via 198.18.$3.2 dev $1 metric $((n*10))
  done
}

# Set ENVOY to the Envoy executable itself (PyPI's .venv/bin/envoy is a Python script
# that execs it, which would add the interpreter's start to every timing) and
# ENVOY_VERSION. ROOT is the repository.
lab_envoy() {
  ENVOY=${MISAKI_ENVOY:-$ROOT/.venv/bin/envoy}
  [ -e "$ENVOY" ] || { echo "no Envoy at $ENVOY: run scripts/setup.sh or set MISAKI_ENVOY" >&2; exit 1; }
  if [ "$(head -c2 "$ENVOY")" = '#!' ]; then
    ENVOY=$(ls "$(dirname "$ENVOY")"/../lib/python*/site-packages/envoy/_bin/envoy 2>/dev/null | head -1)
    [ -x "$ENVOY" ] || { echo "cannot find the Envoy executable behind the .venv script" >&2; exit 1; }
  fi
  ENVOY_VERSION=$("$ENVOY" --version | sed -n 's/.*version: [^/]*\/\([^/]*\)\/.*/\1/p')
}

# ---- cleanup (for the sourcing script's EXIT trap) -------------------------------------
# SIGTERM every process in PIDS.
lab_kill_pids() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
# SIGKILL anything still running in the two namespaces (only this run starts processes
# there, e.g. children of a client killed by its timeout).
lab_kill_ns() {
  local ns p
  for ns in $V $C; do
    for p in $(ip netns pids $ns 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  done
}
# Delete both namespaces (their veths go with them).
lab_down() {
  ip netns del $V 2>/dev/null || true
  ip netns del $C 2>/dev/null || true
}

# ---- configs ---------------------------------------------------------------------------
# The lab policy's uplinks and classes (a policy document up to its `services:`).
lab_policy_head() {
  cat <<'YAML'
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
}

# edge-netd's config for the lab (vehicle bench-car, probes every 100 ms): $1 = state dir;
# every further argument is appended as a line.
lab_netd_config() {
  local state=$1; shift
  _lab_netd_yaml bench-car "$state" "" 3 "$@"
}

# edge-netd's config for the unshaped two-uplink lab of bench/config_scale.sh and
# bench/envoy_stats.sh (wifi on wlan0, lte on wwan0; local xDS tier on 127.0.0.1:15010):
# $1 = vehicle id, $2 = state dir; every further argument is appended as a line.
lab_netd_config_xds() {
  local id=$1 state=$2; shift 2
  _lab_netd_yaml "$id" "$state" 127.0.0.1:15010 2 "$@"
}

# $1 = vehicle id, $2 = state dir, $3 = local xDS address ("": no `xds:`), $4 = how many
# of the uplinks wifi, lte, dsrc; every further argument is appended as a line.
_lab_netd_yaml() {
  local id=$1 state=$2 xds=$3 n=$4 l; shift 4
  cat <<YAML
vehicle_id: $id
control_plane: http://198.18.0.1:50051
api: 127.0.0.1:9470
state_dir: $state
YAML
  [ -z "$xds" ] || echo "xds: $xds"
  echo "heartbeat_interval: 1s"
  echo "uplinks:"
  echo "  - { name: wifi, interface: wlan0, kind: wifi, cost: 1 }"
  echo "  - { name: lte, interface: wwan0, kind: lte, cost: 5, metered: true }"
  [ "$n" -lt 3 ] || echo "  - { name: dsrc, interface: dsrc0, kind: dsrc, cost: 2 }"
  cat <<YAML
probe:
  targets: ["198.18.0.1:7007"]
  interval: 100ms
  timeout: 200ms
selection:
  blackhole_after: 3
  dwell: 1s
YAML
  for l in "$@"; do echo "$l"; done
}

# The nftables ruleset (table inet bh) that silently drops everything arriving on cwlan0,
# for `ip netns exec $C nft -f`; undone by `nft delete table inet bh`.
lab_blackhole_nft() {
  printf 'table inet bh {\n chain input {\n  type filter hook input priority 0; policy accept;\n  iifname "cwlan0" drop\n }\n}\n'
}

# ---- processes -------------------------------------------------------------------------
# Start, in the cloud namespace, the probe echo and the fleet (each a misaki-cp serving
# $DIR/mesh.yaml; logs $DIR/echo.log and $DIR/fleet.log). Sets CP_PID (the fleet's).
lab_start_cloud() {
  ip netns exec $C "$CP" serve --policy "$DIR/mesh.yaml" --probe-addr 198.18.0.1:7007 >"$DIR/echo.log" 2>&1 & PIDS+=($!)
  ip netns exec $C "$CP" serve --policy "$DIR/mesh.yaml" --xds-addr 198.18.0.1:50051 --admin-addr 198.18.0.1:8080 >"$DIR/fleet.log" 2>&1 & CP_PID=$!; PIDS+=($CP_PID)
}

# Start edge-netd in the vehicle namespace with config $1 (default $DIR/netd.yaml), log
# $2 (default $DIR/netd.log). Sets NETD_PID.
lab_start_netd() {
  local config=${1:-$DIR/netd.yaml} log=${2:-$DIR/netd.log}
  ip netns exec $V env RUST_LOG=info NO_COLOR=1 "$NETD" --config "$config" >"$log" 2>&1 & NETD_PID=$!; PIDS+=($NETD_PID)
}

# $1 = port, $2 = path: GET http://127.0.0.1:$1$2 from the vehicle namespace (2 s at most).
lab_vget() { ip netns exec $V curl -s --max-time 2 "http://127.0.0.1:$1$2"; }

# $1 = pid → its utime+stime in clock ticks.
lab_ticks() { awk '{print $14+$15}' /proc/$1/stat; }
# $1 = pid → its VmRSS in KiB.
lab_rss_kib() { awk '/^VmRSS/{print $2}' /proc/$1/status; }

# ---- run scaffolding (bench/config_scale.sh, bench/envoy_stats.sh) ---------------------
# Start the watchdog that ends the run (SIGTERM to this shell) after $2 s: $1 = the
# script's name for the message. Sets WATCHDOG; lab_stop_all stops it.
lab_watchdog() {
  ( sleep "$2" & echo $! >"$DIR/watchdog.sleep"; wait $!; echo "$1: watchdog: $(($2 / 60)) minutes, giving up" >&2; kill -TERM $$ ) & WATCHDOG=$!
}
# For the sourcing script's EXIT trap: stop the watchdog, every process in PIDS and
# anything left in the namespaces, then delete the namespaces.
lab_stop_all() {
  [ -n "${WATCHDOG:-}" ] && kill "$WATCHDOG" 2>/dev/null
  [ -f "$DIR/watchdog.sleep" ] && kill "$(cat "$DIR/watchdog.sleep")" 2>/dev/null
  lab_kill_pids
  sleep 0.2
  lab_kill_ns
  wait 2>/dev/null
  lab_down
}

# curl inside the vehicle / cloud namespace, LAB_CURL_TIMEOUT s at most (default 5).
vcurl() { ip netns exec $V curl -s --max-time "${LAB_CURL_TIMEOUT:-5}" "$@"; }
ccurl() { ip netns exec $C curl -s --max-time "${LAB_CURL_TIMEOUT:-5}" "$@"; }
CPA=http://198.18.0.1:8080      # misaki-cp admin (cloud namespace)
NDA=http://127.0.0.1:9470       # edge-netd API (vehicle namespace)
now_ms() { date +%s%3N; }
TCK=$(getconf CLK_TCK)
# $1 = clock ticks → ms.
tick_ms() { echo $(( $1 * 1000 / TCK )); }
# $1 = KiB → MiB, one decimal.
mib() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }
# $1 = pid: SIGTERM it and reap it.
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
# $1 = space-separated numbers → their median.
med() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
# $1 = space-separated samples → "median (samples)", or the median alone when STARTS is 1.
cell() { local m; m=$(med "$1"); if [ "$STARTS" -gt 1 ]; then echo "$m (${1% })"; else echo "$m"; fi; }

# ---- machine and limits (bench/mtls.sh) ------------------------------------------------
# "N cores (CPU model), M GiB, Linux R": the machine line of a results file.
lab_machine() {
  local model mem
  model=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
  mem=$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)
  echo "$(nproc) cores (${model:-unknown CPU}), $mem, Linux $(uname -r)"
}
# Raise this shell's open-file limit to $1 (default 65536), or to the hard limit if that
# is lower (containers cap it), and print the limit in force: one descriptor per
# connection on each side, so 10,000 connections need more than 10,000.
lab_nofile() {
  ulimit -n "${1:-65536}" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
  ulimit -n
}

# ---- misaki-loadgen runs (bench/fleet_scale.sh, bench/mtls.sh) -------------------------
# The sourcing script sets WORK (its scratch dir), PIDFILE (where misaki-loadgen writes
# the pids of what it starts), LG (the load generator's pid while it runs, else empty),
# LAB_KEEP (1: keep WORK) and LAB_PROCS (grep -E pattern of the command lines misaki-loadgen
# starts), then calls lab_loadgen_traps. On exit the load generator is stopped, and
# whatever it started is killed if it still is that program (pids get reused).
lab_loadgen_cleanup() {
  local p
  if [[ -n $LG ]] && kill -0 "$LG" 2>/dev/null; then
    kill -TERM "$LG" 2>/dev/null || true
    wait "$LG" 2>/dev/null || true
  fi
  if [[ -f $PIDFILE ]]; then
    while read -r p; do
      if [[ -r /proc/$p/cmdline ]] && tr '\0' ' ' </proc/"$p"/cmdline | grep -qE "$LAB_PROCS"; then
        kill -KILL "$p" 2>/dev/null || true
      fi
    done <"$PIDFILE"
  fi
  if ((LAB_KEEP)); then echo "logs kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
lab_loadgen_traps() {
  trap lab_loadgen_cleanup EXIT
  trap 'exit 130' INT TERM
}
# Run misaki-loadgen ($BIN) with the arguments, in the background so a signal reaches
# the trap at once; its stdout goes where the caller's goes.
lab_loadgen() {
  "$BIN" --pidfile "$PIDFILE" "$@" &
  LG=$!
  wait "$LG"
  LG=
}
