#!/usr/bin/env bash
# Vehicle-loop benchmark (needs root): the figures of the vehicle loop (app → vehicle
# Envoy fed by edge-netd's local xDS tier → the uplink edge-netd selected → cloud), all
# in one run, in the network-namespace lab of bench/edge_links.sh:
#
#   1. failover through the real Envoy: an app sends GET /maps to the vehicle Envoy
#      (127.0.0.1:15001) every 2 ms; event (carrier loss: the cloud-side peer of wlan0
#      goes down; silent blackhole: nft drops everything arriving on it) → first 200
#      that came over lte, and the requests that failed in between;
#   2. offline boot: no cloud at all, edge-netd with `factory_policy:` and an empty
#      state dir, started together with Envoy → first 200 for GET /diagnostics (a
#      vehicle-hosted service) through Envoy;
#   3. edge-netd idle RSS/CPU (10 s, 3 uplinks probed every 100 ms, Envoy connected to
#      its xDS tier) and binary size, vehicle profile, now and at 47b1e03 (the last
#      commit before the xDS tier; there misaki-cp feeds the Envoy);
#   4. the vehicle Envoy's idle RSS fed by misaki-cp (unbound clusters) vs by edge-netd
#      (uplink-bound clusters), and edge-netd + Envoy together.
#
#   bench/vehicle_loop.sh [TRIALS]     (default 20)
#
# Environment: SKIP_BUILD=1 uses the binaries already built; BEFORE_DIR (default
# /tmp/before) is the git worktree of BEFORE_REV (default 47b1e03), created and built
# (`--profile vehicle` edge-netd, `--release` misaki-cp, target dir of its own) when
# missing; NO_BEFORE=1 skips it; MISAKI_ENVOY overrides the Envoy binary.
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

# The Envoy executable itself: PyPI's .venv/bin/envoy is a Python script that execs it,
# which would add the interpreter's start to the boot time.
ENVOY=${MISAKI_ENVOY:-$ROOT/.venv/bin/envoy}
[ -e "$ENVOY" ] || { echo "no Envoy at $ENVOY: run scripts/setup.sh or set MISAKI_ENVOY" >&2; exit 1; }
if [ "$(head -c2 "$ENVOY")" = '#!' ]; then
  ENVOY=$(ls "$(dirname "$ENVOY")"/../lib/python*/site-packages/envoy/_bin/envoy 2>/dev/null | head -1)
  [ -x "$ENVOY" ] || { echo "cannot find the Envoy executable behind the .venv script" >&2; exit 1; }
fi
ENVOY_VERSION=$("$ENVOY" --version | sed -n 's/.*version: [^/]*\/\([^/]*\)\/.*/\1/p')

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
lab_netd_config "$DIR/state" >"$DIR/netd.yaml"
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

# ---- the fleet, the cloud service, edge-netd and the Envoy it feeds -------------------
log "starting the fleet (misaki-cp), the probe echo and the cloud service"
lab_start_cloud
ip netns exec $C "$VL" echo --listen 198.18.0.1:18080 >"$DIR/cloud-service.log" 2>&1 & PIDS+=($!)
sleep 0.5
log "starting edge-netd (xDS tier) and the vehicle Envoy it feeds"
lab_start_netd
wait_until 20 is_sel wifi || { diag "edge-netd never selected wifi for class standard"; exit 1; }
ip netns exec $V "$ENVOY" -c "$DIR/envoy-edge.yaml" --disable-hot-restart --concurrency 1 -l info >"$DIR/envoy-edge.log" 2>&1 & ENVOY_PID=$!; PIDS+=($ENVOY_PID)
wait_until 30 envoy_live 19904 || { diag "the vehicle Envoy fed by edge-netd never went LIVE"; exit 1; }
wait_until 30 maps_via 198.18.1.1 || { diag "GET /maps never came over wifi through the edge-fed Envoy"; exit 1; }
EDGE_CLUSTERS=$(active_clusters 19904)

# ---- 3./4. idle: edge-netd (now) and the Envoy it feeds -------------------------------
log "idle ${IDLE_S}s: edge-netd + Envoy fed by edge-netd"
idle "$NETD_PID" "$ENVOY_PID"
NETD_CPU=$CPU_0; NETD_RSS=$RSS_0; ENVOY_EDGE_RSS=$RSS_1; ENVOY_EDGE_CPU=$CPU_1

# ---- 1. failover through the real Envoy ------------------------------------------------
failover() { # $1 = label, $2 = down command, $3 = up command, $4/$5 = aim median/max ms
  log "failover ($1): $TRIALS trials"
  if ! client timeout 240 ip netns exec $V "$VL" failover --label "$1" --trials "$TRIALS" \
      --path /maps --interval-ms 2 --timeout-ms 250 --from-ip 198.18.1.1 --to-ip 198.18.2.1 \
      --down "$2" --up "$3" --settle-ms 1500 --give-up-s 10 \
      --aim-median-ms "$4" --aim-max-ms "$5" >"$DIR/failover.out"; then
    NOTES+=("$1: the client failed (see stderr; diagnostics printed there)")
    diag "$1 failover"
    KEEP_LOGS=1
    $3 2>/dev/null || true
  fi
  client_rows "$DIR/failover.out"
}
failover "carrier loss" "ip -n $C link set cwlan0 down" "ip -n $C link set cwlan0 up" 50 300
failover "silent blackhole" "ip netns exec $C nft -f $DIR/bh.nft" "ip netns exec $C nft delete table inet bh" 600 1000
SWITCHES=$(grep -c 'uplink selection switched class=standard ' "$DIR/netd.log" || true)

# ---- 4. the Envoy fed by misaki-cp -----------------------------------------------------
stop "$ENVOY_PID"
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
  sed 's/"198.18.0.1:7007"/"198.18.0.1:7008"/' "$DIR/netd.yaml" | sed "s|state_dir: .*|state_dir: $DIR/before-state|" >"$DIR/before-netd.yaml"
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
{
  echo "## Vehicle loop: failover through the real Envoy, offline boot, footprint"
  echo
  echo "Run \`$CMDLINE\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (with uncommitted changes)'); $(nproc) cores, Linux $(uname -r), Envoy $ENVOY_VERSION (\`--concurrency 1 --disable-hot-restart\`)."
  echo
  echo "| measurement | n | median | p95 | max | aim | met |"
  echo "|---|---:|---:|---:|---:|---|---|"
  for r in "${ROWS[@]}"; do echo "$r"; done
  echo
  echo "edge-netd: probes every 100 ms, timeout 200 ms, \`blackhole_after: 3\`, \`dwell: 1s\`;"
  echo "lab policy: \`maps\` is class \`standard\` [wifi, lte] (Envoy: timeout 5 s, 1 retry)."
  echo "The app (\`vehicle-loop failover\`, in the vehicle namespace) sends \`GET /maps\` to"
  echo "127.0.0.1:15001 every 2 ms, open loop (a thread per request, never waiting for an"
  echo "earlier one), each on a **new connection** with \`connection: close\` and a 250 ms"
  echo "deadline; the cloud service at 198.18.0.1:18080 answers with the client IP"
  echo "(198.18.1.1 = wifi, 198.18.2.1 = lte). Time: from just before the same process"
  echo "spawns the triggering command (\`ip -n CLOUD link set cwlan0 down\`; \`nft\` drop on"
  echo "cwlan0 in the cloud namespace) to the end of the first 200 from 198.18.2.1 (CLOCK_MONOTONIC)."
  echo "Failed = requests sent before that 200 and finished after the event without a"
  echo "200 (timeouts, 503s, resets). Between trials the event is undone and traffic must"
  echo "be back on wifi (25 answers in a row; edge-netd's dwell 1 s), then 1.5 s pause"
  echo "(the kernel's linkwatch batches carrier events per second)."
  echo "Offline boot: nothing runs in the cloud namespace; edge-netd (\`factory_policy:\`,"
  echo "state dir wiped before each trial) is spawned, then at once the Envoy"
  echo "(\`envoy-configs/vehicle-sidecar-edge.yaml\`); a new connection every 2 ms asks"
  echo "\`GET /diagnostics\` (vehicle-hosted service on 127.0.0.1:18090); both are killed"
  echo "after each trial."
  for n in "${NOTES[@]}"; do echo; echo "Note: $n"; done
  echo
  echo "### Footprint (idle ${IDLE_S} s: 3 uplinks probed every 100 ms, Envoy connected, no traffic)"
  echo
  echo "| process | setup | RSS | CPU (% of one core) | binary | aim | met |"
  echo "|---|---|---:|---:|---:|---|---|"
  echo "| edge-netd (vehicle profile) | now: xDS tier serving the Envoy | $(mib "$NETD_RSS") | $NETD_CPU | $(size "$NETD") | ≤ 10 MiB, ≤ 0.5 % | $(met "$NETD_RSS" "$NETD_CPU") |"
  if [ -n "$B_DONE" ]; then
    echo "| edge-netd (vehicle profile) | $BEFORE_REV: no xDS tier, Envoy fed by misaki-cp | $(mib "$B_NETD_RSS") | $B_NETD_CPU | $(size "$B_NETD") | ≤ 10 MiB, ≤ 0.5 % | $(met "$B_NETD_RSS" "$B_NETD_CPU") |"
  fi
  echo "| vehicle Envoy | fed by edge-netd: uplink-bound clusters ($EDGE_CLUSTERS active) | $(mib "$ENVOY_EDGE_RSS") | $ENVOY_EDGE_CPU | — | — | — |"
  if [ "$ENVOY_CP_RSS" != "not measured" ]; then
    echo "| vehicle Envoy | fed by misaki-cp: unbound clusters ($CP_CLUSTERS active) | $(mib "$ENVOY_CP_RSS") | $ENVOY_CP_CPU | — | — | — |"
  fi
  echo "| edge-netd + Envoy | now (Envoy fed by edge-netd) | $(mib $((NETD_RSS + ENVOY_EDGE_RSS))) | — | — | — | — |"
  if [ -n "$B_DONE" ]; then
    echo "| edge-netd + Envoy | $BEFORE_REV (Envoy fed by misaki-cp) | $(mib $((B_NETD_RSS + B_ENVOY_RSS))) | — | — | — | — |"
  fi
  echo "| k3s agent (for comparison) | as cited in the paper | ~275 MB | — | — | — | — |"
  echo
  echo "RSS is \`VmRSS\`; CPU is utime+stime over the ${IDLE_S} s window. Each Envoy is a fresh"
  echo "process that answered one \`GET /maps\` and then idled 2 s + ${IDLE_S} s; the policy is"
  echo "the lab's quickstart-like one (maps, telemetry, hazard-alerts, diagnostics)."
  echo "edge-netd \"now\" was measured before the failover trials. Over the whole run it"
  echo "switched class \`standard\` $SWITCHES times (1 initial + 2 per failover trial = $((1 + 4 * TRIALS)) expected)."
  echo "CPU resolution: one clock tick ($((1000 / TCK)) ms) over ${IDLE_S} s = $(awk -v t="$TCK" -v s="$IDLE_S" 'BEGIN{printf "%.2g", 100/t/s}') %."
} >"$DIR/report.md"
cat "$DIR/report.md"
cp "$DIR/report.md" bench/results-vehicle-loop.md
log "written to bench/results-vehicle-loop.md"
