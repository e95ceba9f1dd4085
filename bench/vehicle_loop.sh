#!/usr/bin/env bash
# Vehicle-loop benchmark (needs root): the figures of the vehicle loop (app → vehicle
# Envoy fed by edge-netd's local xDS tier → the uplink edge-netd selected → cloud), all
# in one run, in the network-namespace lab of bench/edge_links.sh:
#
#   1. failover through the real Envoy, in both of edge-netd's failover modes (route:
#      a request stays on the uplink it started on; retry: `cross_uplink_retry: true`,
#      a failed try crosses to the class's next uplink inside Envoy), one after the
#      other, edge-netd and Envoy restarted between: an app sends GET /maps to the
#      vehicle Envoy (127.0.0.1:15001) every 2 ms with a 250 ms deadline, a second one
#      every 10 ms with a 7 s deadline (longer than the class timeout); event (carrier
#      loss: the cloud-side peer of wlan0 goes down; silent blackhole: nft drops
#      everything arriving on it) → first 200 that came over lte, the requests that
#      failed in between, and how the long-deadline requests caught by the event ended;
#   2. offline boot: no cloud at all, edge-netd with `factory_policy:` and an empty
#      state dir, started together with Envoy → first 200 for GET /diagnostics (a
#      vehicle-hosted service) through Envoy;
#   3. edge-netd idle RSS/CPU (10 s, 3 uplinks probed every 100 ms, Envoy connected to
#      its xDS tier) and binary size, vehicle profile, now and at 47b1e03 (the last
#      commit before the xDS tier; there misaki-cp feeds the Envoy);
#   4. the vehicle Envoy's idle RSS fed by misaki-cp (unbound clusters) vs by edge-netd
#      (uplink-bound clusters; in mode retry also aggregate clusters), and edge-netd +
#      Envoy together.
#
#   bench/vehicle_loop.sh [TRIALS]     (default 20)
#
# Environment: SKIP_BUILD=1 uses the binaries already built; BEFORE_DIR (default
# /tmp/before) is the git worktree of BEFORE_REV (default 47b1e03), created and built
# (`--profile vehicle` edge-netd, `--release` misaki-cp, target dir of its own) when
# missing; NO_BEFORE=1 skips it; MISAKI_ENVOY overrides the Envoy binary;
# FIRST_MODE=retry runs mode retry's failover trials first (default: route first).
#
# Prints Markdown on stdout (progress on stderr) and writes it, with the command line
# and the date, to bench/results-vehicle-loop.md. Every wait is bounded; on exit
# (also on failure or Ctrl-C) every process started here, and any process left in the
# two namespaces it created, is killed and the namespaces are deleted.
set -euo pipefail
TRIALS=${1:-20}
CMDLINE="bench/vehicle_loop.sh${*:+ $*}"
cd "$(dirname "$0")/.."
ROOT=$PWD
. bench/lib/lab.sh
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, veth pairs, nftables)" >&2; exit 1; }
for t in ip tc nft curl jq awk cargo git; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }; done
case "$TRIALS" in ''|*[!0-9]*|0) echo "usage: bench/vehicle_loop.sh [TRIALS]" >&2; exit 2;; esac
case "${FIRST_MODE:-route}" in
  route) MODES=(route retry);;
  retry) MODES=(retry route);;
  *) echo "FIRST_MODE is route or retry" >&2; exit 2;;
esac

BEFORE_REV=${BEFORE_REV:-47b1e03}
BEFORE_DIR=${BEFORE_DIR:-/tmp/before}
log() { echo "== $*" >&2; }

# ---- binaries -------------------------------------------------------------------------
if [ -z "${SKIP_BUILD:-}" ]; then
  log "building (edge-netd: --profile vehicle; misaki-cp, vehicle-loop: --release)"
  cargo build --profile vehicle -q -p misaki-edge-netd --bin edge-netd
  cargo build --release -q -p misaki-control-plane --bin misaki-cp
  cargo build --release -q -p misaki-bench --bin vehicle-loop
fi
NETD=$ROOT/target/vehicle/edge-netd
CP=$ROOT/target/release/misaki-cp
VL=$ROOT/target/release/vehicle-loop
for b in "$NETD" "$CP" "$VL"; do [ -x "$b" ] || { echo "$b is not built (run without SKIP_BUILD)" >&2; exit 1; }; done

if [ -z "${NO_BEFORE:-}" ]; then
  if [ ! -e "$BEFORE_DIR/.git" ]; then
    log "creating the worktree $BEFORE_DIR at $BEFORE_REV"
    git worktree add --detach "$BEFORE_DIR" "$BEFORE_REV" >&2
  fi
  [ "$(git -C "$BEFORE_DIR" rev-parse HEAD)" = "$(git rev-parse "$BEFORE_REV^{commit}")" ] ||
    { echo "$BEFORE_DIR is not at $BEFORE_REV" >&2; exit 1; }
  if [ ! -x "$BEFORE_DIR/target/vehicle/edge-netd" ] || [ ! -x "$BEFORE_DIR/target/release/misaki-cp" ]; then
    log "building $BEFORE_REV in $BEFORE_DIR (its own target dir; takes a few minutes once)"
    (cd "$BEFORE_DIR" && CARGO_TARGET_DIR=$BEFORE_DIR/target cargo build --profile vehicle -q -p misaki-edge-netd --bin edge-netd &&
      CARGO_TARGET_DIR=$BEFORE_DIR/target cargo build --release -q -p misaki-control-plane --bin misaki-cp)
  fi
  B_NETD=$BEFORE_DIR/target/vehicle/edge-netd
  B_CP=$BEFORE_DIR/target/release/misaki-cp
fi

lab_envoy

# ---- lab (bench/lib/lab.sh) ------------------------------------------------------------
V=vl-v-$$; C=vl-c-$$; DIR=$(mktemp -d /tmp/vehicle-loop.XXXXXX)
PIDS=()
cleanup() {
  local rc=$?
  set +e
  lab_kill_pids
  sleep 0.2
  lab_kill_ns
  wait 2>/dev/null
  lab_down
  if [ -n "${KEEP_LOGS:-}" ] || [ $rc != 0 ]; then echo "logs kept in $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "lab: namespaces $V (vehicle) and $C (cloud), logs in $DIR"
lab_up
# The app opens a connection per request (hundreds a second to the loopback listener).
ip netns exec $V sysctl -q -w net.ipv4.tcp_tw_reuse=1

# Quickstart-like lab policy: a cloud, an edge and a vehicle-hosted service, a deferrable
# one; every cloud/edge service at the cloud echo 198.18.0.1:18080.
{ lab_policy_head; cat <<'YAML'; } >"$DIR/mesh.yaml"
services:
  - { name: maps, location: cloud, port: 18080, endpoints: ["198.18.0.1:18080"], routes: [/maps], class: standard }
  - { name: telemetry, location: cloud, port: 18080, endpoints: ["198.18.0.1:18080"], routes: [/telemetry], class: bulk }
  - { name: hazard-alerts, location: edge, port: 18080, endpoints: ["198.18.0.1:18080"], routes: [/hazards], class: critical }
  - { name: diagnostics, location: vehicle, port: 18090, routes: [/diagnostics], class: standard }
YAML
# The two failover modes: edge-netd's config differs only in `cross_uplink_retry`.
lab_netd_config "$DIR/state" "cross_uplink_retry: false" >"$DIR/netd-route.yaml"
lab_netd_config "$DIR/state" "cross_uplink_retry: true" >"$DIR/netd-retry.yaml"
lab_netd_config "$DIR/boot-state" "factory_policy: $DIR/mesh.yaml" >"$DIR/netd-boot.yaml"
# misaki-cp-fed Envoy: the delta bootstrap pointed at the lab's fleet address.
fleet_bootstrap() { # $1 = source yaml, $2 = output
  sed 's/address: 127.0.0.1, port_value: 18000/address: 198.18.0.1, port_value: 50051/' "$1" >"$2"
  grep -q 'address: 198.18.0.1, port_value: 50051' "$2" || { echo "cannot rewrite $1 to the lab fleet" >&2; exit 1; }
}
fleet_bootstrap envoy-configs/vehicle-sidecar-delta.yaml "$DIR/envoy-cp.yaml"
cp envoy-configs/vehicle-sidecar-edge.yaml "$DIR/envoy-edge.yaml"
lab_blackhole_nft >"$DIR/bh.nft"

sel() { lab_vget 9470 /links | jq -r '.selections.standard.uplink // "none"' 2>/dev/null || true; }
# until CMD... succeeds, at most $1 seconds (20 ms apart)
wait_until() {
  local limit=$1; shift
  local end=$((SECONDS + limit))
  until "$@"; do [ $SECONDS -lt $end ] || return 1; sleep 0.02; done
}
is_sel() { [ "$(sel)" = "$1" ]; }
envoy_live() { [ "$(lab_vget "$1" /ready 2>/dev/null)" = LIVE ]; }
maps_via() { lab_vget 15001 /maps/check 2>/dev/null | grep -q "^from=$1 "; }
diag() { # $1 = what failed; dumps what helps to find out why
  {
    echo "---- $1"
    echo "-- /links:"; lab_vget 9470 /links || true; echo
    for a in 19904 19903; do echo "-- Envoy :$a /clusters (outbound):"; lab_vget $a /clusters 2>/dev/null | grep -E '::(cx_active|cx_connect_fail|rq_error|rq_timeout|health_flags)::' | head -40 || true; done
    for f in "$DIR"/*.log; do echo "-- tail $f"; tail -15 "$f"; done
  } >&2
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
IDLE_S=10
TCK=$(getconf CLK_TCK)
# Sleep 2 s, then measure $IDLE_S s; sets CPU_<i> (percent of one core) and RSS_<i> (KiB)
# for each pid given.
idle() {
  sleep 2
  local i=0 t0=() t1=()
  for p in "$@"; do t0+=("$(lab_ticks "$p")"); done
  local w0; w0=$(date +%s.%N)
  sleep $IDLE_S
  local w1; w1=$(date +%s.%N)
  for p in "$@"; do
    t1=$(lab_ticks "$p")
    printf -v "CPU_$i" '%s' "$(awk -v a="${t0[$i]}" -v b="$t1" -v w0="$w0" -v w1="$w1" -v t="$TCK" 'BEGIN{printf "%.2f", (b-a)/t/(w1-w0)*100}')"
    printf -v "RSS_$i" '%s' "$(lab_rss_kib "$p")"
    i=$((i+1))
  done
}
mib() { awk -v k="$1" 'BEGIN{printf "%.1f MiB", k/1024}'; }
active_clusters() { lab_vget "$1" '/stats?filter=^cluster_manager.active_clusters$' 2>/dev/null | awk '{print $2}'; }

ROWS=(); NOTES=()
# Run a client in the background and wait for it, so that a signal to this script is
# handled at once (bash runs traps only between foreground commands).
client() { "$@" & local p=$!; PIDS+=($p); wait $p; }
client_rows() { # collect the client's stdout: `| ...` rows and `note: ...` lines
  local line
  while IFS= read -r line; do
    case "$line" in
      "|"*) ROWS+=("$line");;
      note:*) NOTES+=("${line#note: }");;
    esac
  done <"$1"
}

# ---- 2. offline boot (first: nothing runs in the cloud yet) ---------------------------
ip netns exec $V "$VL" echo --listen 127.0.0.1:18090 >"$DIR/diagnostics.log" 2>&1 & PIDS+=($!)
sleep 0.2
log "offline boot: $TRIALS trials (no cloud; factory policy; empty state dir)"
if ! client timeout 300 ip netns exec $V "$VL" boot --trials "$TRIALS" --path /diagnostics \
    --netd "$NETD" --netd-config "$DIR/netd-boot.yaml" --state-dir "$DIR/boot-state" \
    --envoy "$ENVOY" --envoy-config "$DIR/envoy-edge.yaml" --log-dir "$DIR/boot" \
    >"$DIR/boot.out"; then
  NOTES+=("offline boot: the client failed (see stderr above; logs in $DIR/boot)")
  KEEP_LOGS=1
fi
client_rows "$DIR/boot.out"

# ---- the fleet and the cloud service ---------------------------------------------------
log "starting the fleet (misaki-cp), the probe echo and the cloud service"
lab_start_cloud
ip netns exec $C "$VL" echo --listen 198.18.0.1:18080 >"$DIR/cloud-service.log" 2>&1 & PIDS+=($!)
sleep 0.5

# ---- per mode: edge-netd, the Envoy it feeds, idle, failover ---------------------------
LONG_INTERVAL_MS=10 LONG_TIMEOUT_MS=7000 LONG_LEAD_MS=100
declare -A CMP=() CLUSTERS=() ROUTE_ACTION=() MAX_RETRIES=() SWITCHES=()
CMP_KEYS=()
client_cmp() { # collect the client's `cmp` lines: CMP[mode|measurement] = n|median|p95|max
  local line _ m k n med p95 max
  while IFS= read -r line; do
    case "$line" in
      cmp$'\t'*)
        IFS=$'\t' read -r _ m k n med p95 max <<<"$line"
        [ -n "${CMP["route|$k"]+x}${CMP["retry|$k"]+x}" ] || CMP_KEYS+=("$k")
        CMP["$m|$k"]="$n|$med|$p95|$max";;
    esac
  done <"$1"
}
# The counters of maps' clusters that tell how caught requests ended, as `name value`.
MAPS_COUNTERS='^cluster\.(agg|out)\|maps\|[a-z]+\.(upstream_rq_retry|upstream_rq_retry_success|upstream_rq_retry_overflow|upstream_rq_per_try_timeout|upstream_rq_timeout|upstream_cx_connect_timeout|upstream_cx_connect_fail|upstream_rq_pending_overflow|upstream_rq_pending_failure_eject|upstream_cx_destroy_with_active_rq)$'
counters() {
  { ip netns exec $V curl -s --max-time 2 -G --data-urlencode "filter=$MAPS_COUNTERS" http://127.0.0.1:19904/stats || true; } | sed 's/: / /'
}
counters_delta() { # $1, $2 = two `counters` outputs → "`name` +delta; ..." (nonzero only)
  awk 'NR==FNR {a[$1]=$2; next} $2-a[$1] != 0 {printf "%s`%s` +%d", sep, $1, $2-a[$1]; sep="; "} END {if (sep == "") printf "none moved"}' "$1" "$2"
}
# The counters in the summary table, summed over maps' clusters (agg|… and out|…).
SUM_COUNTERS=(upstream_rq_retry upstream_rq_retry_success upstream_rq_retry_overflow upstream_rq_per_try_timeout upstream_rq_timeout upstream_rq_pending_failure_eject upstream_cx_connect_timeout)
declare -A CNT=()
counters_sum() { # $1 = mode|label, $2, $3 = two `counters` outputs: sets CNT[$1|counter]
  local c
  for c in "${SUM_COUNTERS[@]}"; do
    CNT["$1|$c"]=$(awk -v c="$c" 'NR==FNR {a[$1]=$2; next} {n=split($1, p, "."); if (p[n] == c) d += $2-a[$1]} END {print d+0}' "$2" "$3")
  done
}
# A fresh edge-netd (state dir wiped) with the mode's config and a fresh Envoy fed by it;
# checks that the Envoy runs the mode's routes. Sets NETD_PID, ENVOY_PID, CLUSTERS[mode],
# ROUTE_ACTION[mode], MAX_RETRIES[mode].
start_mode() {
  local m=$1 nacks aggs
  log "mode $m: starting edge-netd (xDS tier$([ "$m" = retry ] && echo ', cross_uplink_retry: true')) and the vehicle Envoy it feeds"
  rm -rf "$DIR/state"
  lab_start_netd "$DIR/netd-$m.yaml" "$DIR/netd-$m.log"
  wait_until 20 is_sel wifi || { diag "mode $m: edge-netd never selected wifi for class standard"; exit 1; }
  ip netns exec $V "$ENVOY" -c "$DIR/envoy-edge.yaml" --disable-hot-restart --concurrency 1 -l info >"$DIR/envoy-edge-$m.log" 2>&1 & ENVOY_PID=$!; PIDS+=($ENVOY_PID)
  wait_until 30 envoy_live 19904 || { diag "mode $m: the vehicle Envoy fed by edge-netd never went LIVE"; exit 1; }
  wait_until 30 maps_via 198.18.1.1 || { diag "mode $m: GET /maps never came over wifi through the edge-fed Envoy"; exit 1; }
  CLUSTERS[$m]=$(active_clusters 19904)
  # What GET /maps runs in this Envoy: its route's cluster and retry policy.
  ROUTE_ACTION[$m]=$(lab_vget 19904 '/config_dump?resource=dynamic_route_configs' |
    jq -c 'first(.. | objects | select(.match?.prefix? == "/maps") | .route | {cluster, timeout, retry_policy: (.retry_policy | {retry_on, num_retries, per_try_timeout, retry_priority: .retry_priority.name?})})' 2>/dev/null || true)
  aggs=$({ lab_vget 19904 /clusters | grep -o '^agg|maps|[a-z]*' || true; } | sort -u | wc -l)
  nacks=$(lab_vget 9470 /xds | jq '[.streams[].types[] | select(.last_nack != null)] | length' 2>/dev/null || echo '?')
  local want_agg=0 want_cluster='out|maps|wifi' cluster
  if [ "$m" = retry ]; then want_agg=2; want_cluster='agg|maps|wifi'; fi
  cluster=$(jq -r .cluster <<<"${ROUTE_ACTION[$m]:-null}" 2>/dev/null || true)
  # The route's cluster's retry circuit breaker (Envoy's default unless the config sets one).
  MAX_RETRIES[$m]=$(lab_vget 19904 /clusters | awk -F'::' -v c="$want_cluster" '$1 == c && $2 == "default_priority" && $3 == "max_retries" {print $4}')
  if [ "$aggs" != "$want_agg" ] || [ "$nacks" != 0 ] || [ "$cluster" != "$want_cluster" ]; then
    diag "mode $m: the vehicle Envoy does not run the mode's routes ($aggs aggregate clusters for maps, want $want_agg; $nacks NACKs; GET /maps → ${ROUTE_ACTION[$m]:-nothing})"
    { echo "-- edge-netd /xds:"; lab_vget 9470 /xds; echo; } >&2
    exit 1
  fi
}
failover() { # $1 = mode, $2 = label, $3 = down command, $4 = up command, $5/$6 = aim median/max ms
  local out="$DIR/failover-$1-${2// /-}.out"
  log "mode $1, failover ($2): $TRIALS trials"
  counters >"$out.c0"
  if ! client timeout $((60 + 15 * TRIALS)) ip netns exec $V "$VL" failover --mode "$1" --label "$2" --trials "$TRIALS" \
      --path /maps --interval-ms 2 --timeout-ms 250 --from-ip 198.18.1.1 --to-ip 198.18.2.1 \
      --long-interval-ms $LONG_INTERVAL_MS --long-timeout-ms $LONG_TIMEOUT_MS --long-lead-ms $LONG_LEAD_MS \
      --down "$3" --up "$4" --settle-ms 1500 --give-up-s 10 \
      --aim-median-ms "$5" --aim-max-ms "$6" >"$out"; then
    NOTES+=("$2, mode $1: the client failed (see stderr; diagnostics printed there)")
    diag "mode $1: $2 failover"
    KEEP_LOGS=1
    $4 2>/dev/null || true
  fi
  counters >"$out.c1"
  client_rows "$out"
  client_cmp "$out"
  counters_sum "$1|$2" "$out.c0" "$out.c1"
  NOTES+=("$2, mode $1: the vehicle Envoy's counters of maps' clusters over these trials (both apps): $(counters_delta "$out.c0" "$out.c1").")
}
for MODE in "${MODES[@]}"; do
  start_mode "$MODE"
  # ---- 3./4. idle: edge-netd and the Envoy it feeds (before the failover trials) -----
  log "mode $MODE: idle ${IDLE_S}s: edge-netd + Envoy fed by edge-netd"
  idle "$NETD_PID" "$ENVOY_PID"
  if [ "$MODE" = route ]; then
    NETD_CPU=$CPU_0; NETD_RSS=$RSS_0; ENVOY_EDGE_RSS=$RSS_1; ENVOY_EDGE_CPU=$CPU_1
  else
    R_NETD_CPU=$CPU_0; R_NETD_RSS=$RSS_0; R_ENVOY_RSS=$RSS_1; R_ENVOY_CPU=$CPU_1
  fi
  # ---- 1. failover through the real Envoy --------------------------------------------
  failover "$MODE" "carrier loss" "ip -n $C link set cwlan0 down" "ip -n $C link set cwlan0 up" 50 300
  failover "$MODE" "silent blackhole" "ip netns exec $C nft -f $DIR/bh.nft" "ip netns exec $C nft delete table inet bh" 600 1000
  SWITCHES[$MODE]=$(grep -c 'uplink selection switched class=standard ' "$DIR/netd-$MODE.log" || true)
  stop "$ENVOY_PID"; stop "$NETD_PID"
done

# ---- 4. the Envoy fed by misaki-cp -----------------------------------------------------
log "idle ${IDLE_S}s: Envoy fed by misaki-cp"
ip netns exec $V "$ENVOY" -c "$DIR/envoy-cp.yaml" --disable-hot-restart --concurrency 1 -l info >"$DIR/envoy-cp.log" 2>&1 & ENVOY_CP_PID=$!; PIDS+=($ENVOY_CP_PID)
ENVOY_CP_RSS="not measured"; CP_CLUSTERS="?"
if wait_until 30 envoy_live 19903 && wait_until 30 maps_via 198.18.1.1; then
  CP_CLUSTERS=$(active_clusters 19903)
  idle "$ENVOY_CP_PID"; ENVOY_CP_RSS=$RSS_0; ENVOY_CP_CPU=$CPU_0
else
  diag "the vehicle Envoy fed by misaki-cp"; NOTES+=("Envoy fed by misaki-cp: never LIVE or never answered GET /maps"); KEEP_LOGS=1
fi
stop "$ENVOY_CP_PID"

# ---- 3. before the xDS tier ------------------------------------------------------------
B_DONE=""
if [ -z "${NO_BEFORE:-}" ]; then
  log "idle ${IDLE_S}s: edge-netd at $BEFORE_REV, Envoy fed by misaki-cp at $BEFORE_REV"
  stop "$NETD_PID"; stop "$CP_PID"
  ip netns exec $C "$B_CP" serve --policy "$DIR/mesh.yaml" --xds-addr 198.18.0.1:50051 --admin-addr 198.18.0.1:8080 --probe-addr 198.18.0.1:7008 >"$DIR/before-fleet.log" 2>&1 & B_CP_PID=$!; PIDS+=($B_CP_PID)
  sed 's/"198.18.0.1:7007"/"198.18.0.1:7008"/' "$DIR/netd-route.yaml" | sed "s|state_dir: .*|state_dir: $DIR/before-state|" >"$DIR/before-netd.yaml"
  fleet_bootstrap "$BEFORE_DIR/envoy-configs/vehicle-sidecar-delta.yaml" "$DIR/before-envoy.yaml"
  sleep 0.5
  ip netns exec $V env RUST_LOG=info NO_COLOR=1 "$B_NETD" --config "$DIR/before-netd.yaml" >"$DIR/before-netd.log" 2>&1 & B_NETD_PID=$!; PIDS+=($B_NETD_PID)
  ip netns exec $V "$ENVOY" -c "$DIR/before-envoy.yaml" --disable-hot-restart --concurrency 1 -l info >"$DIR/before-envoy.log" 2>&1 & B_ENVOY_PID=$!; PIDS+=($B_ENVOY_PID)
  if wait_until 20 is_sel wifi && wait_until 30 envoy_live 19903 && wait_until 30 maps_via 198.18.1.1; then
    idle "$B_NETD_PID" "$B_ENVOY_PID"
    B_NETD_CPU=$CPU_0; B_NETD_RSS=$RSS_0; B_ENVOY_RSS=$RSS_1; B_DONE=1
  else
    diag "the $BEFORE_REV setup"; NOTES+=("$BEFORE_REV: edge-netd never selected wifi, or its Envoy never served GET /maps"); KEEP_LOGS=1
  fi
fi

# ---- report ----------------------------------------------------------------------------
size() { stat -c %s "$1" | awk '{printf "%.2f MB", $1/1e6}'; }
met() { awk -v r="$1" -v c="$2" 'BEGIN{print (r/1024 <= 10 && c <= 0.5) ? "yes" : "**no**"}'; }
cmp_cells() { # $1 = mode|measurement → "n | median | p95 | max"
  local v=${CMP["$1"]:-—|—|—|—}
  echo "${v//|/ | }"
}
{
  echo "## Vehicle loop: failover through the real Envoy (mode route vs mode retry), offline boot, footprint"
  echo
  echo "Run \`$CMDLINE\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (with uncommitted changes)'); $(nproc) cores, Linux $(uname -r), Envoy $ENVOY_VERSION (\`--concurrency 1 --disable-hot-restart\`)."
  echo "Failover modes, one after the other in this run: **mode ${MODES[0]} first**, then mode ${MODES[1]}."
  echo
  echo "| measurement | n | median | p95 | max | aim | met |"
  echo "|---|---:|---:|---:|---:|---|---|"
  for r in "${ROWS[@]}"; do echo "$r"; done
  echo
  echo "### Failover: mode route vs mode retry"
  echo
  echo "| measurement | route: n | median | p95 | max | retry: n | median | p95 | max |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  for k in "${CMP_KEYS[@]}"; do echo "| $k | $(cmp_cells "route|$k") | $(cmp_cells "retry|$k") |"; done
  echo
  echo "The vehicle Envoy's counters over all $TRIALS trials (both apps; summed over maps' clusters):"
  echo
  echo "| counter | carrier loss: route | retry | silent blackhole: route | retry |"
  echo "|---|---:|---:|---:|---:|"
  for c in "${SUM_COUNTERS[@]}"; do
    echo "| \`$c\` | ${CNT["route|carrier loss|$c"]:-—} | ${CNT["retry|carrier loss|$c"]:-—} | ${CNT["route|silent blackhole|$c"]:-—} | ${CNT["retry|silent blackhole|$c"]:-—} |"
  done
  echo
  echo "edge-netd: probes every 100 ms, timeout 200 ms, \`blackhole_after: 3\`, \`dwell: 1s\`;"
  echo "lab policy: \`maps\` is class \`standard\` [wifi, lte] (timeout 5 s, 1 retry)."
  echo "**Mode route** (\`cross_uplink_retry: false\`): \`GET /maps\` → ${ROUTE_ACTION[route]:-?}: the"
  echo "selected uplink's cluster; a request stays on the uplink it started on."
  echo "**Mode retry** (\`cross_uplink_retry: true\`, edge-netd's default): \`GET /maps\` → ${ROUTE_ACTION[retry]:-?}:"
  echo "an aggregate cluster (the selected uplink's cluster at priority 0, lte's after it),"
  echo "a retry moves down a priority; the bound clusters' connect timeout is the try's share"
  echo "(2.5 s) too. Circuit breakers: \`agg|maps|wifi\` allows"
  echo "\`max_retries\` = ${MAX_RETRIES[retry]:-?} retries at once (mode route's \`out|maps|wifi\`: ${MAX_RETRIES[route]:-?})."
  echo "Between modes, edge-netd (state dir wiped) and the Envoy are restarted with the other"
  echo "config; everything else is the same."
  echo
  echo "Two apps (\`vehicle-loop failover\`, one process in the vehicle namespace) send \`GET"
  echo "/maps\` to 127.0.0.1:15001, open loop (a thread per request, never waiting for an"
  echo "earlier one), each request on a **new connection** with \`connection: close\`: one every"
  echo "2 ms with a **250 ms** deadline (the figures as in earlier runs), one every ${LONG_INTERVAL_MS} ms with a"
  echo "**$((LONG_TIMEOUT_MS / 1000)) s** deadline, longer than the class timeout, so that Envoy's own handling"
  echo "ends every request the event catches. A thread per request: at ${LONG_INTERVAL_MS} ms and $((LONG_TIMEOUT_MS / 1000)) s at most"
  echo "$((LONG_TIMEOUT_MS / LONG_INTERVAL_MS)) of them can be waiting at once (at 2 ms it would be 3,500; each app is also"
  echo "capped at 1,000 running requests: one due beyond it is not sent and counts as failed,"
  echo "\`not sent\` in the notes). The cloud service at 198.18.0.1:18080 answers with the client IP"
  echo "(198.18.1.1 = wifi, 198.18.2.1 = lte). Time: from just before the same process spawns"
  echo "the triggering command (\`ip -n CLOUD link set cwlan0 down\`; \`nft\` drop on cwlan0 in"
  echo "the cloud namespace) to the end of the first 200 from 198.18.2.1 (CLOCK_MONOTONIC),"
  echo "seen by the 2 ms app. Failed in between = its requests sent before that 200 and"
  echo "finished after the event without a 200 (timeouts, 503s, resets). **Caught** = the"
  echo "$((LONG_TIMEOUT_MS / 1000)) s app's requests sent in [event − ${LONG_LEAD_MS} ms, that first 200]; answered 200 ="
  echo "eventually, over either uplink (those sent before the event mostly over wifi at once);"
  echo "over the new uplink = sent after edge-netd's route change reached Envoy, or rescued by a"
  echo "retry (\`upstream_rq_retry_success\` below); failed = any other status, reset, or no"
  echo "answer in $((LONG_TIMEOUT_MS / 1000)) s; latency = sent → answer (or deadline), pooled over all trials. The event is held"
  echo "until every caught request has finished (restored earlier, a request hanging on wifi"
  echo "could still get through over it by a retransmitted SYN or segment). Then it is undone"
  echo "and traffic must be back on wifi (25 answers in a row of the 2 ms app; edge-netd's"
  echo "dwell 1 s; after a blackhole held for seconds also the refill of edge-netd's probe"
  echo "window, 20 probes at \`max_loss_percent: 50\`), then 1.5 s pause (the kernel's"
  echo "linkwatch batches carrier events per second)."
  echo
  echo "Envoy counters (in the table above and, per cluster, in the notes): \`upstream_rq_retry_success\`"
  echo "= retried requests that got an answer; \`upstream_rq_retry_overflow\` = retries refused by"
  echo "the \`max_retries\` circuit breaker (the request then ends with the failed try's answer);"
  echo "\`upstream_rq_per_try_timeout\` / \`upstream_rq_timeout\` = a try's / the route's timeout"
  echo "fired; \`upstream_rq_pending_failure_eject\` = requests failed while queued because a"
  echo "connection attempt of their pool failed (Envoy then fails every request pending in that"
  echo "pool, not only the one that opened the connection); \`upstream_cx_connect_timeout\` ="
  echo "connection attempts that timed out."
  echo
  echo "Offline boot: nothing runs in the cloud namespace; edge-netd (\`factory_policy:\`,"
  echo "state dir wiped before each trial, mode route) is spawned, then at once the Envoy"
  echo "(\`envoy-configs/vehicle-sidecar-edge.yaml\`); a new connection every 2 ms asks"
  echo "\`GET /diagnostics\` (vehicle-hosted service on 127.0.0.1:18090); both are killed"
  echo "after each trial."
  for n in "${NOTES[@]}"; do echo; echo "Note: $n"; done
  echo
  echo "### Footprint (idle ${IDLE_S} s: 3 uplinks probed every 100 ms, Envoy connected, no traffic)"
  echo
  echo "| process | setup | RSS | CPU (% of one core) | binary | aim | met |"
  echo "|---|---|---:|---:|---:|---|---|"
  echo "| edge-netd (vehicle profile) | now: xDS tier serving the Envoy, mode route | $(mib "$NETD_RSS") | $NETD_CPU | $(size "$NETD") | ≤ 10 MiB, ≤ 0.5 % | $(met "$NETD_RSS" "$NETD_CPU") |"
  echo "| edge-netd (vehicle profile) | now: xDS tier serving the Envoy, mode retry | $(mib "$R_NETD_RSS") | $R_NETD_CPU | $(size "$NETD") | ≤ 10 MiB, ≤ 0.5 % | $(met "$R_NETD_RSS" "$R_NETD_CPU") |"
  if [ -n "$B_DONE" ]; then
    echo "| edge-netd (vehicle profile) | $BEFORE_REV: no xDS tier, Envoy fed by misaki-cp | $(mib "$B_NETD_RSS") | $B_NETD_CPU | $(size "$B_NETD") | ≤ 10 MiB, ≤ 0.5 % | $(met "$B_NETD_RSS" "$B_NETD_CPU") |"
  fi
  echo "| vehicle Envoy | fed by edge-netd, mode route: uplink-bound clusters (${CLUSTERS[route]} active) | $(mib "$ENVOY_EDGE_RSS") | $ENVOY_EDGE_CPU | — | — | — |"
  echo "| vehicle Envoy | fed by edge-netd, mode retry: uplink-bound + aggregate clusters (${CLUSTERS[retry]} active) | $(mib "$R_ENVOY_RSS") | $R_ENVOY_CPU | — | — | — |"
  if [ "$ENVOY_CP_RSS" != "not measured" ]; then
    echo "| vehicle Envoy | fed by misaki-cp: unbound clusters ($CP_CLUSTERS active) | $(mib "$ENVOY_CP_RSS") | $ENVOY_CP_CPU | — | — | — |"
  fi
  echo "| edge-netd + Envoy | now, mode route (Envoy fed by edge-netd) | $(mib $((NETD_RSS + ENVOY_EDGE_RSS))) | — | — | — | — |"
  echo "| edge-netd + Envoy | now, mode retry (Envoy fed by edge-netd) | $(mib $((R_NETD_RSS + R_ENVOY_RSS))) | — | — | — | — |"
  if [ -n "$B_DONE" ]; then
    echo "| edge-netd + Envoy | $BEFORE_REV (Envoy fed by misaki-cp) | $(mib $((B_NETD_RSS + B_ENVOY_RSS))) | — | — | — | — |"
  fi
  echo "| k3s agent (for comparison) | as cited in the paper | ~275 MB | — | — | — | — |"
  echo
  echo "RSS is \`VmRSS\`; CPU is utime+stime over the ${IDLE_S} s window. Each Envoy is a fresh"
  echo "process that answered one \`GET /maps\` and then idled 2 s + ${IDLE_S} s; the policy is"
  echo "the lab's quickstart-like one (maps, telemetry, hazard-alerts, diagnostics). Each"
  echo "mode's edge-netd and Envoy were measured just after their start, before that mode's"
  echo "failover trials. Over its trials edge-netd switched class \`standard\` ${SWITCHES[route]} times in mode"
  echo "route and ${SWITCHES[retry]} times in mode retry (1 initial + 2 per failover trial = $((1 + 4 * TRIALS)) expected each)."
  echo "CPU resolution: one clock tick ($((1000 / TCK)) ms) over ${IDLE_S} s = $(awk -v t="$TCK" -v s="$IDLE_S" 'BEGIN{printf "%.2g", 100/t/s}') %."
} >"$DIR/report.md"
cat "$DIR/report.md"
cp "$DIR/report.md" bench/results-vehicle-loop.md
log "written to bench/results-vehicle-loop.md (run took $((SECONDS / 60)) min $((SECONDS % 60)) s)"
