#!/usr/bin/env bash
# Config at scale (needs root): what a vehicle's Envoy gets, and what one edit costs,
# with a realistic policy of N cloud services (default 3,000) on today's code — the
# baseline for "a vehicle gets only what it uses, and only what changed". The 4-service
# lab policy runs first, for reference. For each policy:
#
#   1. the vehicle Envoy 1.40 (--concurrency 1 --disable-hot-restart): time from its
#      start to ready and VmRSS after ready + IDLE s, in four setups:
#        (a) fed by misaki-cp directly, SotW  (envoy-configs/vehicle-sidecar.yaml)
#        (b) fed by misaki-cp directly, delta (envoy-configs/vehicle-sidecar-delta.yaml)
#        (c) fed by edge-netd's local xDS tier (envoy-configs/vehicle-sidecar-edge.yaml),
#            edge-netd getting the policy from misaki-cp over its fleet stream, its
#            config without `cross_uplink_retry:` (edge-netd's default);
#        (d) the same with `cross_uplink_retry: false` (route-only: uplink clusters);
#   2. the bytes one edit of one service sends (endpoint, route prefix, the timeout of
#      the class a third of the services use, one service's class): misaki-cp's
#      misaki_xds_push_bytes_total per type for (a)/(b); for (c)/(d) misaki-cp's
#      misaki_fleet_policy_bytes_total (the PolicyUpdate, encoded before zstd), its
#      zstd -3 size, and edge-netd's local misaki_xds_push_bytes_total (loopback);
#   3. misaki-cp (a fresh one per setup): start → ready (wall, CPU, RSS), the CPU of its
#      client's first config (compile + push), RSS with the one client connected, CPU
#      per edit; edge-netd's RSS and CPU in (c)/(d).
#
#   bench/config_scale.sh [--services N] [--consumes C] [--idle S] [--starts K] [--keep]
#
# --consumes C: the vehicle services declare `consumes` of C cloud services (the edit
# target among them), so every vehicle sidecar holds only those; without it nothing is
# declared and delta Envoys ((b), and (d) whose local tier has no aggregates) take
# services on demand.
#
# Each Envoy is started K times (default 3, fresh process each time, same control plane):
# times are the median and every sample; RSS is the last start's, after IDLE s (default 5).
#
# Topology: vehicle namespace with two uplinks, wlan0 (198.18.1.1/30) and wwan0
# (198.18.2.1/30), veths to a cloud namespace (cwlan0/cwwan0) whose lo has 198.18.0.1:
# misaki-cp (gRPC :50051, admin :8080) and a second misaki-cp as the probe echo (:7007),
# as in bench/lib/lab.sh but without dsrc and without traffic shaping. Every Envoy runs
# in the vehicle namespace; the cp-fed ones reach misaki-cp over wlan0.
#
# Environment: SKIP_BUILD=1 uses the binaries already built; MISAKI_ENVOY overrides the
# Envoy binary. Prints Markdown on stdout (progress on stderr) and writes it, with the
# command line, date, commit and machine, to bench/results-config-scale.md.
# Bounded: every wait has a deadline and a watchdog ends the run after 9 minutes; on
# exit (also on failure or Ctrl-C) every process started here, and anything left in
# the two namespaces, is killed and the namespaces are deleted.
set -euo pipefail
CMDLINE="bench/config_scale.sh${*:+ $*}"
cd "$(dirname "$0")/.."
ROOT=$PWD
N=3000 IDLE_S=5 STARTS=3 KEEP= CONSUMES=()
while (($#)); do
  case $1 in
    --services) N=$2; shift ;;
    --consumes) CONSUMES=(--consumes "$2"); shift ;;
    --idle) IDLE_S=$2; shift ;;
    --starts) STARTS=$2; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 64 ;;
  esac
  shift
done
case "$N$IDLE_S$STARTS" in ''|*[!0-9]*) echo "--services, --idle and --starts take integers" >&2; exit 64;; esac
[ "$STARTS" -ge 1 ] || { echo "--starts must be at least 1" >&2; exit 64; }
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, veth pairs)" >&2; exit 1; }
for t in ip curl jq awk python3 zstd cargo git; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }; done
. bench/lib/lab.sh   # lab_up, lab_stop_all, lab_watchdog, lab_envoy, lab_ticks, lab_rss_kib, helpers
GEN=$ROOT/bench/lib/config_scale_policy.py
log() { echo "== $*" >&2; }

# ---- binaries -------------------------------------------------------------------------
if [ -z "${SKIP_BUILD:-}" ]; then
  log "building (misaki-cp: --release; edge-netd: --profile vehicle)"
  cargo build --release -q -p misaki-control-plane --bin misaki-cp
  cargo build --profile vehicle -q -p misaki-edge-netd --bin edge-netd
fi
CP=$ROOT/target/release/misaki-cp
NETD=$ROOT/target/vehicle/edge-netd
# What was measured: the commit, and whether the crates behind the binaries had
# uncommitted changes, as of the build (not of the report: the tree may move meanwhile).
COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- control-plane edge-netd proto Cargo.lock 2>/dev/null || echo ' (with uncommitted changes in control-plane/edge-netd/proto)')
for b in "$CP" "$NETD"; do [ -x "$b" ] || { echo "$b is not built (run without SKIP_BUILD)" >&2; exit 1; }; done
lab_envoy

# ---- lab ------------------------------------------------------------------------------
V=cs-v-$$; C=cs-c-$$; DIR=$(mktemp -d /tmp/config-scale.XXXXXX)
PIDS=() WATCHDOG=
ROWS_READY=() ROWS_EDIT=() ROWS_CP=() NOTES=()
cleanup() {
  local rc=$?
  set +e
  lab_stop_all
  if [ $rc != 0 ] && [ ${#ROWS_READY[@]} -gt 0 ]; then
    echo "---- failed (status $rc); rows measured so far:" >&2
    printf '%s\n' "${ROWS_READY[@]}" "${ROWS_EDIT[@]}" "${ROWS_CP[@]}" >&2
  fi
  if [ -n "$KEEP" ] || [ $rc != 0 ]; then echo "logs kept in $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Watchdog: the whole run stays bounded even if something hangs between waits.
lab_watchdog config_scale.sh 540

log "lab: namespaces $V (vehicle: wlan0, wwan0) and $C (cloud), files in $DIR"
lab_up "wlan0 cwlan0 1" "wwan0 cwwan0 2"   # unshaped: this measures config, not links

LAB_CURL_TIMEOUT=3   # vcurl, ccurl, CPA, NDA, now_ms, tick_ms, mib, stop: bench/lib/lab.sh

# Bootstraps: the cp-fed ones pointed at the cloud's misaki-cp; the edge one as shipped.
for v in sotw:vehicle-sidecar delta:vehicle-sidecar-delta; do
  sed 's/address: 127.0.0.1, port_value: 18000/address: 198.18.0.1, port_value: 50051/' \
    "envoy-configs/${v#*:}.yaml" >"$DIR/envoy-${v%%:*}.yaml"
  grep -q 'address: 198.18.0.1, port_value: 50051' "$DIR/envoy-${v%%:*}.yaml" ||
    { echo "cannot rewrite envoy-configs/${v#*:}.yaml to misaki-cp's port" >&2; exit 1; }
done
cp envoy-configs/vehicle-sidecar-edge.yaml "$DIR/envoy-edge.yaml"
declare -A EADMIN=([sotw]=19901 [delta]=19903 [edge]=19904)
for s in sotw delta edge; do
  grep -q "port_value: ${EADMIN[$s]} }" "$DIR/envoy-$s.yaml" || { echo "envoy-$s.yaml: admin is not :${EADMIN[$s]}" >&2; exit 1; }
done

# The probe echo: its own misaki-cp (as in the lab), serving a small policy, never measured.
python3 "$GEN" --services 0 >"$DIR/echo-mesh.yaml"
ip netns exec $C "$CP" serve --policy "$DIR/echo-mesh.yaml" --probe-addr 198.18.0.1:7007 >"$DIR/echo.log" 2>&1 & PIDS+=($!)

# ---- helpers --------------------------------------------------------------------------
# Inside a namespace, poll until an HTTP check passes; print the time (ms) it did.
# $1 = namespace, $2 = deadline s, $3 = bash condition (may use curl).
ns_wait() {
  ip netns exec "$1" bash -c '
    end=$(( $(date +%s) + $1 ))
    until eval "$2"; do [ "$(date +%s)" -lt "$end" ] || exit 1; sleep 0.005; done
    date +%s%3N' _ "$2" "$3"
}
# Envoy ready, run inside the vehicle namespace (no `ip netns exec` per poll): admin
# /ready says LIVE, then one /stats read shows listener_manager.total_listeners_active
# >= 1, total_listeners_warming = 0, cluster_manager.warming_clusters = 0 and every RDS
# route configuration (vehicle_outbound, and vehicle_inbound when there) with
# update_success >= 1. Prints the time of that /stats answer (ms), then the stats.
ENVOY_READY='
port=$1; end=$(( $(date +%s) + $2 ))
re="^(listener_manager[.]total_listeners_(active|warming)|cluster_manager[.](warming|active)_clusters|http[.][a-z_]+[.](scoped_)?rds[.][a-z_]+[.]update_success)\$"
while :; do
  if [ "$(curl -s -m 1 http://127.0.0.1:$port/ready)" = LIVE ]; then
    s=$(curl -gs -m 2 "http://127.0.0.1:$port/stats?filter=$re"); t=$(date +%s%3N)
    if echo "$s" | awk -F": " "
        /total_listeners_active/ {a=\$2} /total_listeners_warming/ {w=\$2} /warming_clusters/ {wc=\$2}
        /rds[.]vehicle_outbound[.]update_success/ {o=\$2} /rds[.].*update_success/ && \$2 < 1 {bad=1}
        END {exit !(a >= 1 && w == 0 && wc == 0 && o >= 1 && !bad)}"; then
      echo "$t"; echo "$s"; exit 0
    fi
  fi
  [ "$(date +%s)" -lt "$end" ] || exit 1
  sleep 0.01
done'

# From a /metrics text on stdin: misaki_xds_push_bytes_total per type (cds eds lds rds),
# misaki_fleet_policy_bytes_total (misaki-cp only, else 0), misaki_xds_pushes_total per
# type (cds eds lds rds): nine numbers.
counters() {
  # SRDS (scopes, on-demand Envoys) is counted with RDS: both are route configuration.
  awk 'match($0, /^misaki_xds_push(es|_bytes)_total\{type="(cds|eds|lds|s?rds)"\} /) {
         split($1, a, "\""); t = (a[2] == "srds" ? "rds" : a[2]); v[($1 ~ /^misaki_xds_pushes/ ? "p" : "b") t] += $2 }
       /^misaki_fleet_policy_bytes_total / {f=$2}
       END {printf "%d %d %d %d %d %d %d %d %d\n", v["bcds"], v["beds"], v["blds"], v["brds"], f, v["pcds"], v["peds"], v["plds"], v["prds"]}'
}
cp_counters() { ccurl $CPA/metrics | counters; }
netd_counters() { vcurl $NDA/metrics | counters; }
cp_version() { ccurl $CPA/policy | jq -r .version; }
netd_version() { vcurl $NDA/links | jq -r '.policy_version // ""'; }
# A /nodes or /xds document → "sent versions US types not ACKed US streams US NACKs"
# (US = \x1f, not whitespace, so empty fields survive `read`).
US=$'\x1f'
XDS_SIG='[([.streams[].types[] | .last_sent_version // "-"] | join(",")),
  ([.streams[].types[] | select(.last_sent_version != .last_acked_version)] | length | tostring),
  (.streams | length | tostring),
  ([.streams[] | .types | to_entries[] | select(.value.last_nack != null)
     | "\(.key) v=\(.value.last_nack.version): \(.value.last_nack.message)"] | join("; "))] | join("\u001f")'
xds_sig() { # $1 = cp|netd
  if [ "$1" = cp ]; then ccurl $CPA/nodes; else vcurl $NDA/xds; fi | jq -r "$XDS_SIG"
}

# Put policy step $1 in force: write a temp file, rename it over mesh.yaml.
put_policy() {
  python3 "$GEN" "${CONSUMES[@]}" --services "$NSVC" --step "$1" >"$DIR/.mesh.yaml.tmp"
  mv "$DIR/.mesh.yaml.tmp" "$DIR/mesh.yaml"
}
wait_cp_version_not() { # $1 = old version; prints the new one
  local end=$((SECONDS + 30)) v
  while :; do
    v=$(cp_version 2>/dev/null || true)
    [ -n "$v" ] && [ "$v" != "$1" ] && { echo "$v"; return 0; }
    [ $SECONDS -lt $end ] || return 1
    sleep 0.01
  done
}

diag() { # $1 = what failed; dumps what helps to find out why
  {
    echo "---- $1"
    echo "-- misaki-cp /policy:"; ccurl $CPA/policy || true
    echo "-- misaki-cp /nodes:"; ccurl $CPA/nodes | jq -c '.streams[] | {node_id, kind, types}' || true
    echo "-- edge-netd /xds:"; vcurl $NDA/xds || true; echo
    echo "-- edge-netd /links:"; vcurl $NDA/links | jq -c '{ready, policy_version, control_plane_connected, selections}' || true
    for p in 19901 19903 19904; do
      echo "-- Envoy :$p stats (cds/lds/rds rejections, listeners, clusters):"
      vcurl "http://127.0.0.1:$p/stats?filter=(update_rejected|update_failure|total_listeners|warming_clusters|active_clusters)" || true
    done
    for f in "$DIR"/*.log; do echo "-- tail $f"; tail -8 "$f" | cut -c1-400; done
  } >&2
}

# One edit: put step $1 in force and wait until it is ACKed. $2 = cp|netd (whose xDS
# streams to follow). Sets E_MS (rename → every stream ACKed the last push, first seen;
# polled), E_CP_CPU_MS, E_ND_CPU_MS (edge-netd, with netd), E_NACK, E_PUSHED (0: no
# xDS push at all) and the counter deltas E_CP (misaki-cp) and E_ND (edge-netd), each
# as `counters` prints them.
edit() {
  local step=$1 who=$2 v0 v1 sig0 sent0 c0 n0 t0 tk0 end tpol first="" last="" s sent pend nstreams nack cnt
  v0=$(cp_version); sig0=$(xds_sig "$who"); sent0=${sig0%%$US*}
  c0=$(cp_counters); n0=$( [ "$who" = netd ] && netd_counters || echo "0 0 0 0 0 0 0 0 0")
  tk0=$(lab_ticks "$CP_PID"); E_ND_CPU_MS="—"
  local ntk0; [ "$who" = netd ] && ntk0=$(lab_ticks "$NETD_PID")
  python3 "$GEN" "${CONSUMES[@]}" --services "$NSVC" --step "$step" >"$DIR/.mesh.yaml.tmp"
  t0=$(now_ms)
  mv "$DIR/.mesh.yaml.tmp" "$DIR/mesh.yaml"
  v1=$(wait_cp_version_not "$v0") || { diag "edit ${STEPS[$step]}: misaki-cp never put a new policy in force"; return 1; }
  if [ "$who" = netd ]; then
    end=$((SECONDS + 30))
    until [ "$(netd_version)" = "$v1" ]; do
      [ $SECONDS -lt $end ] || { diag "edit ${STEPS[$step]}: edge-netd never took policy $v1"; return 1; }
      sleep 0.01
    done
  fi
  tpol=$(now_ms); end=$((SECONDS + 60)); E_PUSHED=1
  while :; do
    s=$(xds_sig "$who")
    IFS=$US read -r sent pend nstreams nack <<<"$s" || true
    cnt=$( [ "$who" = cp ] && cp_counters || netd_counters )
    if [ "$nstreams" != 1 ]; then diag "edit ${STEPS[$step]}: $nstreams xDS streams"; return 1; fi
    if [ "$sent" != "$sent0" ] && [ "$pend" = 0 ]; then
      if [ -z "$first" ] || [ "$s $cnt" != "$last" ]; then first=$(now_ms); last="$s $cnt"
      elif [ $(( $(now_ms) - first )) -ge 1000 ]; then break; fi
    elif [ "$sent" = "$sent0" ] && [ $(( $(now_ms) - tpol )) -ge 5000 ]; then
      E_PUSHED=0; first=$tpol; break
    else
      first=""
    fi
    [ $SECONDS -lt $end ] || { diag "edit ${STEPS[$step]}: never ACKed"; return 1; }
    sleep 0.02
  done
  E_MS=$((first - t0)); E_NACK=$nack
  E_CP_CPU_MS=$(tick_ms $(( $(lab_ticks "$CP_PID") - tk0 )))
  E_CP=$(cdelta "$c0" "$(cp_counters)")
  if [ "$who" = netd ]; then
    E_ND=$(cdelta "$n0" "$(netd_counters)")
    E_ND_CPU_MS=$(tick_ms $(( $(lab_ticks "$NETD_PID") - ntk0 )))
  else E_ND="0 0 0 0 0 0 0 0 0"; fi
}
STEPS=(base endpoint route class svc-class)
EDIT_DESC=([1]="endpoint of one service" [2]="route prefix of one service" [3]="timeout of class standard (1/3 of services)" [4]="one service standard → bulk")

# Start an Envoy ($1 = sotw|delta|edge) in the vehicle namespace; wait until ready.
# Sets ENVOY_PID, R_MS (spawn → ready, see ENVOY_READY), R_LOG_MS (Envoy's own log:
# "initializing epoch 0" → "starting workers"), R_CLUSTERS, R_ENVOY_CPU_MS.
start_envoy() {
  local s=$1 t0 out
  t0=$(now_ms)
  ip netns exec $V "$ENVOY" -c "$DIR/envoy-$s.yaml" --disable-hot-restart --concurrency 1 -l info \
    >"$DIR/envoy-$s-$NSVC.log" 2>&1 & ENVOY_PID=$!; PIDS+=($ENVOY_PID)
  out=$(ip netns exec $V bash -c "$ENVOY_READY" _ "${EADMIN[$s]}" 120) ||
    { diag "Envoy ($s) never ready"; return 1; }
  R_MS=$(( $(head -1 <<<"$out") - t0 ))
  R_ENVOY_CPU_MS=$(tick_ms "$(lab_ticks "$ENVOY_PID")")
  R_CLUSTERS=$(awk -F': ' '/active_clusters/ {print $2}' <<<"$out")
  R_LOG_MS=$(awk '
    function ms(l,  d, t) { d = substr(l, 2, 23); split(substr(d, 12), t, /[:.]/); return ((t[1]*60 + t[2])*60 + t[3])*1000 + t[4] }
    /initializing epoch 0/ && !a {a = ms($0)} /starting workers/ && !b {b = ms($0)}
    END {if (a && b) print b - a; else print "?"}' "$DIR/envoy-$s-$NSVC.log")
}

# Start the Envoy of setup $1 (sotw|delta|edge) STARTS times, fed by $2 (cp|netd); the
# last one keeps running (ENVOY_PID). Sets S_MS, S_LOG, S_CPU ("median (samples)" of
# R_MS, R_LOG_MS, R_ENVOY_CPU_MS), and from the first start, whose connection makes the
# server compile: S_COMP (the server's CPU from spawn to ready, ms) and S_INIT (xDS bytes
# pushed from spawn to 1 s after ready, all types).
# (med, cell: bench/lib/lab.sh)
envoy_starts() {
  local s=$1 who=$2 k pid c0 tk0 ms="" lg="" cpu=""
  pid=$( [ "$who" = cp ] && echo "$CP_PID" || echo "$NETD_PID" )
  for k in $(seq 1 "$STARTS"); do
    [ "$k" = 1 ] && { c0=$( [ "$who" = cp ] && cp_counters || netd_counters ); tk0=$(lab_ticks "$pid"); }
    start_envoy "$s" || return 1
    if [ "$k" = 1 ]; then
      S_COMP=$(tick_ms $(( $(lab_ticks "$pid") - tk0 )))
      sleep 1
      S_INIT=$(sum4 "$(cdelta "$c0" "$( [ "$who" = cp ] && cp_counters || netd_counters )")")
    fi
    ms+="$R_MS "; lg+="$R_LOG_MS "; cpu+="$R_ENVOY_CPU_MS "
    [ "$k" = "$STARTS" ] || { stop "$ENVOY_PID"; sleep 0.5; }
  done
  S_MS=$(cell "$ms"); S_LOG=$(cell "$lg"); S_CPU=$(cell "$cpu")
}

# ---- one policy, three setups ----------------------------------------------------------
# Start a fresh misaki-cp on the base policy (step 0). Sets CP_PID, CP_READY_MS (spawn →
# /readyz 200), CP_READY_CPU_MS, CP_READY_RSS, BASE (policy version).
start_cp() {
  local t0 tr
  put_policy 0
  t0=$(now_ms)
  ip netns exec $C env NO_COLOR=1 "$CP" serve --policy "$DIR/mesh.yaml" --xds-addr 198.18.0.1:50051 \
    --admin-addr 198.18.0.1:8080 >"$DIR/cp-$NSVC-$1.log" 2>&1 & CP_PID=$!; PIDS+=($CP_PID)
  tr=$(ns_wait $C 60 "curl -sf -m 1 $CPA/readyz >/dev/null") || { diag "misaki-cp never ready"; return 1; }
  CP_READY_CPU_MS=$(tick_ms "$(lab_ticks "$CP_PID")"); CP_READY_RSS=$(lab_rss_kib "$CP_PID")
  CP_READY_MS=$((tr - t0))
  BASE=$(cp_version)
}
# Counter deltas: $1, $2 = "cds eds lds rds fleet pcds peds plds prds" lines → same, differences.
cdelta() { paste -d' ' <(tr ' ' '\n' <<<"$1") <(tr ' ' '\n' <<<"$2") | awk 'NF == 2 {printf "%d ", $2-$1}'; }
sum4() { awk '{print $1+$2+$3+$4}' <<<"$1"; }
pushes() { awk '{printf "%d/%d/%d/%d", $6, $7, $8, $9}' <<<"$1"; }

run_policy() { # $1 = number of cloud services (0: the 4-service lab policy)
  NSVC=$1
  local label st tag c0 tk0 init rss rss_cp rss_cp_after sig nk step ec ee el er ef pp
  if [ "$NSVC" = 0 ]; then label="lab (4 services)"; else label="$NSVC cloud + 4 vehicle services"; fi
  python3 "$GEN" "${CONSUMES[@]}" --services "$NSVC" >"$DIR/base.yaml"
  local yaml_bytes; yaml_bytes=$(wc -c <"$DIR/base.yaml")
  # (a), (b): Envoy fed by misaki-cp
  for st in sotw delta; do
    tag=$( [ $st = sotw ] && echo "(a) misaki-cp, SotW" || echo "(b) misaki-cp, delta")
    log "[$label] $tag: misaki-cp ($yaml_bytes bytes of YAML), then the Envoy"
    start_cp $st || return 1
    sleep 1
    envoy_starts $st cp || return 1
    local comp=$S_COMP
    sleep "$IDLE_S"
    rss=$(lab_rss_kib "$ENVOY_PID"); rss_cp=$(lab_rss_kib "$CP_PID")
    sig=$(xds_sig cp); nk=${sig##*$US}
    ROWS_READY+=("| $label | $tag | $R_CLUSTERS | $S_INIT | — | $S_MS | $S_LOG | $S_CPU | $(mib "$rss") | ${nk:-none} |")
    for step in 1 2 3 4; do
      log "[$label] $tag: edit ${STEPS[$step]}"
      edit $step cp || return 1
      read -r ec ee el er ef <<<"$E_CP"
      ROWS_EDIT+=("| $label | $tag | ${EDIT_DESC[$step]} | $ec | $ee | $el | $er | **$((ec+ee+el+er))** | $(pushes "$E_CP") | — | — | $E_MS | $E_CP_CPU_MS | — | ${E_NACK:-none} |")
      [ "$E_PUSHED" = 1 ] || NOTES+=("$label $tag, ${STEPS[$step]}: no xDS push at all within 5 s of the policy in force.")
    done
    rss_cp_after=$(lab_rss_kib "$CP_PID")
    ROWS_CP+=("| $label | $tag | $CP_READY_MS | $CP_READY_CPU_MS | $(mib "$CP_READY_RSS") | $comp | $(mib "$rss_cp") | $(mib "$rss_cp_after") | — | — | — | — |")
    stop "$ENVOY_PID"; stop "$CP_PID"
  done

  run_edge "$label" "" || return 1
  run_edge "$label" false || return 1
}

# (c)/(d): edge-netd's local tier, the policy over the fleet stream. $1 = label, $2 = the
# `cross_uplink_retry:` value written in edge-netd's config ("": none, edge-netd's default).
run_edge() {
  local label=$1 xr=$2 tag c0 tk0 rss rss_cp rss_cp_after sig nk step ec ee el er ef
  if [ -z "$xr" ]; then tag="(c) edge-netd local tier, delta; cross_uplink_retry: default"
  else tag="(d) edge-netd local tier, delta; cross_uplink_retry: $xr"; fi
  log "[$label] $tag: misaki-cp, then edge-netd (policy over the fleet stream)"
  start_cp "edge${xr:+-$xr}" || return 1
  sleep 1
  lab_netd_config_xds cs-car "$DIR/state-$NSVC" ${xr:+"cross_uplink_retry: $xr"} >"$DIR/netd-$NSVC${xr:+-$xr}.yaml"
  rm -rf "$DIR/state-$NSVC"
  c0=$(cp_counters); tk0=$(lab_ticks "$CP_PID")
  local t0 nd_ready; t0=$(now_ms)
  ip netns exec $V env RUST_LOG=info NO_COLOR=1 "$NETD" --config "$DIR/netd-$NSVC${xr:+-$xr}.yaml" >"$DIR/netd-$NSVC${xr:+-$xr}.log" 2>&1 & NETD_PID=$!; PIDS+=($NETD_PID)
  nd_ready=$(ns_wait $V 60 "curl -sf -m 1 $NDA/readyz >/dev/null && [ \"\$(curl -s -m 1 $NDA/links | jq -r .policy_version)\" = $BASE ]") ||
    { diag "edge-netd never ready with policy $BASE"; return 1; }
  nd_ready=$((nd_ready - t0))
  local cp_fleet_cpu; cp_fleet_cpu=$(tick_ms $(( $(lab_ticks "$CP_PID") - tk0 )))
  local ppb; ppb=$(awk '{print $5}' <<<"$(cdelta "$c0" "$(cp_counters)")")
  local pz; pz=$(zstd -3 --no-check -c "$DIR/state-$NSVC/policy.pb" | wc -c)
  local pbsize; pbsize=$(stat -c %s "$DIR/state-$NSVC/policy.pb")
  [ "$pbsize" = "$ppb" ] || NOTES+=("$label: stored policy.pb is $pbsize bytes, misaki_fleet_policy_bytes_total grew by $ppb at connect.")
  local nd_rss0; nd_rss0=$(lab_rss_kib "$NETD_PID")
  log "[$label] $tag: the Envoy"
  envoy_starts edge netd || return 1
  local nd_comp=$S_COMP
  sleep "$IDLE_S"
  rss=$(lab_rss_kib "$ENVOY_PID"); rss_cp=$(lab_rss_kib "$CP_PID")
  local nd_rss; nd_rss=$(lab_rss_kib "$NETD_PID")
  sig=$(xds_sig netd); nk=${sig##*$US}
  local sel; sel=$(vcurl $NDA/links | jq -r '[.selections | to_entries[] | "\(.key)→\(.value.uplink // "none")"] | join(", ")')
  # Aggregate clusters (cross_uplink_retry): agg|<service>|<first uplink>.
  local agg; agg=$(vcurl "http://127.0.0.1:19904/stats?filter=^cluster[.]agg[|].*[.]upstream_cx_total\$" -g | grep -c . || true)
  ROWS_READY+=("| $label | $tag | $R_CLUSTERS ($agg aggregate) | $S_INIT | $ppb ($pz zstd) | $S_MS | $S_LOG | $S_CPU | $(mib "$rss") | ${nk:-none} |")
  for step in 1 2 3 4; do
    log "[$label] $tag: edit ${STEPS[$step]}"
    edit $step netd || return 1
    read -r ec ee el er ef <<<"$E_ND"
    local fz; fz=$(zstd -3 --no-check -c "$DIR/state-$NSVC/policy.pb" | wc -c)
    local fb; fb=$(awk '{print $5}' <<<"$E_CP")
    ROWS_EDIT+=("| $label | $tag | ${EDIT_DESC[$step]} | $ec | $ee | $el | $er | $((ec+ee+el+er)) | $(pushes "$E_ND") | **$fb** | $fz | $E_MS | $E_CP_CPU_MS | $E_ND_CPU_MS | ${E_NACK:-none} |")
    [ "$E_PUSHED" = 1 ] || NOTES+=("$label ${tag%% *}, ${STEPS[$step]}: no local xDS push within 5 s of edge-netd taking the policy.")
  done
  rss_cp_after=$(lab_rss_kib "$CP_PID")
  local nd_rss_after; nd_rss_after=$(lab_rss_kib "$NETD_PID")
  ROWS_CP+=("| $label | $tag | $CP_READY_MS | $CP_READY_CPU_MS | $(mib "$CP_READY_RSS") | $cp_fleet_cpu | $(mib "$rss_cp") | $(mib "$rss_cp_after") | $nd_ready | $(mib "$nd_rss0") / $(mib "$nd_rss") | $nd_comp | $(mib "$nd_rss_after") |")
  NOTES+=("$label ${tag%% *}: edge-netd's selections at the end: $sel.")
  stop "$ENVOY_PID"; stop "$NETD_PID"; stop "$CP_PID"
}

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
run_policy 0
run_policy "$N"

# ---- report ----------------------------------------------------------------------------
CPU_MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
MEM=$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)
{
  echo "## Config at scale: what the vehicle's Envoy gets, and what one edit sends"
  echo
  echo "Run \`$CMDLINE\` (as root) on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT at the build;"
  echo "$(nproc) cores ($CPU_MODEL), $MEM, Linux $(uname -r), load average at start $LOAD0, at the end $(cut -d' ' -f1-3 /proc/loadavg);"
  echo "Envoy $ENVOY_VERSION (\`--concurrency 1 --disable-hot-restart\`), misaki-cp \`--release\`, edge-netd \`--profile vehicle\`."
  echo
  echo "Policy (\`bench/lib/config_scale_policy.py\`): uplinks wifi, lte; classes as in bench/lib/lab.sh"
  echo "without dsrc — critical [wifi, lte], standard [wifi, lte], bulk [wifi] (deferrable), all 5 s, 1 retry."
  echo "The scale policy has $N cloud services \`svc-i\` (class i % 3: a third each; route \`/svc-i\`;"
  echo "one endpoint 198.18.0.x, every 4th a second one on 127.0.0.1; so EDS clusters) and 4 vehicle"
  echo "services. The reference is the lab's 4 services (maps, telemetry, hazard-alerts at the edge,"
  echo "diagnostics on the vehicle)."
  echo
  echo "### 1. The vehicle Envoy: initial config, time to ready, memory"
  echo
  echo "| policy | setup | clusters (Envoy \`active_clusters\`) | initial xDS bytes to Envoy | initial PolicyUpdate to edge-netd (encoded, zstd -3) | start → ready (ms) | Envoy log: epoch 0 → starting workers (ms) | Envoy CPU to ready (ms) | Envoy RSS after ready + ${IDLE_S}+1 s (MiB) | NACKs |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
  for r in "${ROWS_READY[@]}"; do echo "$r"; done
  echo
  echo "Each Envoy was started $STARTS times (a fresh process each time, same control plane): the three"
  echo "time columns are the median and, in parentheses, every sample in order. The first start"
  echo "is the compile key's first stream, so it also waits for the server's compile; later starts"
  echo "find the snapshot cached. Initial bytes are the first start's; RSS is the last start's."
  echo
  echo "*Start → ready*: from just before the Envoy process is spawned to the first poll (every"
  echo "10 ms, from inside the vehicle namespace) at which admin \`/ready\` answers \`LIVE\` and one"
  echo "\`/stats\` read shows \`listener_manager.total_listeners_active\` ≥ 1,"
  echo "\`total_listeners_warming\` = 0, \`cluster_manager.warming_clusters\` = 0 and"
  echo "\`http.*.rds.<route config>.update_success\` ≥ 1 for every RDS route configuration"
  echo "(\`vehicle_outbound\` must be among them). Envoy warms a listener until its RDS answer"
  echo "arrives, so this is \"every cluster warm, every listener serving with its routes\"."
  echo "Clusters include Envoy's static xDS cluster; \"aggregate\" counts the \`agg|<service>|<uplink>\`"
  echo "clusters of cross-uplink retry. (c) runs edge-netd's config without \`cross_uplink_retry:\`,"
  echo "i.e. its default at this commit; (d) with \`cross_uplink_retry: false\`."
  echo "*Initial xDS bytes*: the sum over types of"
  echo "\`misaki_xds_push_bytes_total\` (misaki-cp's for (a)/(b), edge-netd's for (c)/(d)) from"
  echo "before the spawn to 1 s after ready. In (c)/(d) edge-netd already held the policy"
  echo "before its Envoy started; its PolicyUpdate is the \`misaki_fleet_policy_bytes_total\`"
  echo "delta at connect, and \`zstd -3 --no-check\` of the same bytes (edge-netd stores the"
  echo "received PolicyUpdate as \`policy.pb\`) approximates what crossed the uplink (tonic's"
  echo "zstd, level 3, per message)."
  echo
  echo "### 2. One edit: bytes sent"
  echo
  echo "| policy | setup | edit | CDS | EDS | LDS | RDS+SRDS | xDS total | responses C/E/L/R | PolicyUpdate to vehicle (encoded) | same, zstd -3 | rename → ACKed (ms) | misaki-cp CPU (ms) | edge-netd CPU (ms) | NACKs |"
  echo "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"
  for r in "${ROWS_EDIT[@]}"; do echo "$r"; done
  echo
  echo "Edits are cumulative (each is one change against the previous policy), to service"
  echo "\`svc-1\` (lab: \`maps\`), class standard: its first endpoint → 198.18.0.250:9999; its"
  echo "route prefix gets \`-v2\`; class standard's timeout 5 s → 7 s (legitimately touches every"
  echo "standard service: a third); the service moves standard → bulk. Each is written to a"
  echo "temp file and renamed over the policy misaki-cp watches. For (a)/(b) the byte columns"
  echo "are misaki-cp's \`misaki_xds_push_bytes_total{type}\` deltas (one Envoy connected);"
  echo "for (c)/(d) they are edge-netd's local ones (loopback, not the uplink), and what crossed"
  echo "the uplink is the PolicyUpdate (\`misaki_fleet_policy_bytes_total\` delta; the whole"
  echo "policy each time). Counters are read once misaki-cp (and in (c)/(d) edge-netd's \`/links\`)"
  echo "has the new policy version and the stream's \`last_acked_version\` equals"
  echo "\`last_sent_version\` for every type, with at least one changed, stable for 1 s."
  echo "*Rename → ACKed*: from just before the rename to the first poll that saw that state; each"
  echo "poll is a few \`ip netns exec curl\` + \`jq\` calls from the host, so this is ≈ 60 ms coarse"
  echo "and includes that overhead (the lab policy's figures are mostly it)."
  echo "*misaki-cp CPU*, *edge-netd CPU*: utime+stime over the edit (tick $((1000 / TCK)) ms); in (c)/(d)"
  echo "misaki-cp parses the policy and encodes the PolicyUpdate but compiles no xDS (edge-netd does)."
  echo "*responses C/E/L/R*: \`misaki_xds_pushes_total{type}\` deltas (CDS/EDS/LDS/RDS responses sent)."
  echo "What the byte counter counts (\`misaki-xds\` \`sotw.rs\`/\`delta.rs\` \`commit\`): the sum of the"
  echo "sent resources' encoded \`Any\` (\`Resource::wire\`), not the whole response: the envelope"
  echo "(version, nonce, type URL), delta's per-resource name/version wrapper and delta's"
  echo "\`removed_resources\` are not counted, so a removal-only delta response counts 0 bytes."
  echo
  echo "### 3. misaki-cp and edge-netd"
  echo
  echo "| policy | setup | misaki-cp start → ready (ms) | misaki-cp CPU to ready (ms) | misaki-cp RSS at ready (MiB) | misaki-cp CPU: its client's first config (ms) | misaki-cp RSS, client connected, idle (MiB) | misaki-cp RSS after the 4 edits (MiB) | edge-netd start → ready with the policy (ms) | edge-netd RSS before / with its Envoy (MiB) | edge-netd CPU: compile + push to Envoy (ms) | edge-netd RSS after the 4 edits (MiB) |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for r in "${ROWS_CP[@]}"; do echo "$r"; done
  echo
  echo "A fresh misaki-cp per setup, on the base policy (YAML: $(python3 "$GEN" --services 0 | wc -c) bytes for the lab,"
  echo "$(python3 "$GEN" "${CONSUMES[@]}" --services "$N" | wc -c) bytes for $N services). Its ready (\`/readyz\`, polled every 5 ms) means parsed,"
  echo "validated and listening: it compiles a snapshot only when the first stream of a compile key"
  echo "arrives. *Its client's first config*: misaki-cp's CPU from the spawn of the Envoy to the"
  echo "Envoy's first ready in (a)/(b) (compile, encode, serve); in (c)/(d) from the spawn of edge-netd to"
  echo "edge-netd ready with the policy (the fleet stream, the PolicyUpdate). The edge-netd"
  echo "compile column is edge-netd's CPU from its Envoy's first spawn to that Envoy's ready."
  echo "RSS is \`VmRSS\`; \"client connected, idle\" is read when the Envoy has been ready for"
  echo "${IDLE_S}+1 s, before the edits."
  for n in "${NOTES[@]}"; do echo; echo "Note: $n"; done
} >"$DIR/report.md"
cat "$DIR/report.md"
OUT=bench/results-config-scale${CONSUMES[1]:+-consumes-${CONSUMES[1]}}.md
cp "$DIR/report.md" "$OUT"
log "written to $OUT"
