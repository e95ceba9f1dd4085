#!/usr/bin/env bash
# Envoy stats at scale (needs root): what the stats inclusion list in envoy-configs/*.yaml
# (docs/envoy-stats.md) saves, in the same run, on a vehicle Envoy holding a whole
# 3,000-service mesh, and what Envoy's other per-cluster switches do.
#
#   bench/envoy_stats.sh [--services N] [--starts K] [--settle S] [--edge] [--keep]
#
# misaki-cp (--release) serves the policy of bench/lib/config_scale_policy.py (N cloud
# services, default 3,000, plus 4 vehicle services); Envoy 1.40 (--concurrency 1
# --disable-hot-restart) is started from variants of the shipped bootstraps, K times per
# variant (default 3; interleaved: round 1 of every variant, then round 2, ...):
#
#   vehicle (envoy-configs/vehicle-sidecar.yaml, SotW from misaki-cp; 3,005 clusters):
#     old          the bootstrap without its stats_config (as shipped before the list)
#     new          as shipped: the inclusion list
#     old+deferred old + deferred_stat_options.enable_deferred_creation_stats: true
#     new+deferred new + the same, and the pattern docs/envoy-stats.md adds with it
#     new-tags     new + stats_config.use_all_default_tags: false
#     new+dcc      new + cluster_manager.enable_deferred_cluster_creation: true
#     nomatch      new with a per-cluster pattern that matches nothing
#     floor        new without its per-cluster pattern: no stat of a service cluster
#   with --edge, also vehicle via edge-netd (envoy-configs/vehicle-sidecar-edge.yaml, fed
#     by edge-netd's local tier, cross_uplink_retry: its default): old, new, new+deferred.
#     Whole-mesh (edge-netd compiling every cluster eagerly) that is 9,005 clusters and
#     ~1.5 minutes more; with on-demand clusters for delta sidecars it is a handful.
#   cloud (envoy-configs/cloud-sidecar.yaml; 3,001 clusters): old, new
#
# Per start: spawn → ready (admin /ready LIVE and, in one /stats read, listeners active
# ≥ 1, none warming, no cluster warming, every RDS route configuration updated; polled
# every 10 ms inside the namespace) and Envoy's CPU to ready; the first K-1 rounds stop
# there. The last round then waits S s (default 11: two of Envoy's stats flushes, every
# 5 s by default, after ready; the first flushes allocate for every histogram, so RSS
# read before them is low by up to 9 MiB without the list) and reads VmRSS, how many
# stats /stats lists, and how many of them belong to one cluster nobody sent a request to.
#
# Topology (bench/lib/lab.sh, unshaped, as bench/config_scale.sh): a vehicle namespace
# with wlan0/wwan0 veths to a cloud namespace whose lo has 198.18.0.1: misaki-cp (gRPC
# :50051, admin :8080) and, with --edge, a second misaki-cp as edge-netd's probe echo
# (:7007). Every Envoy (and edge-netd) runs in the vehicle namespace; the misaki-cp-fed
# bootstraps are pointed at 198.18.0.1:50051. Nothing binds on the host's own network.
#
# Environment: SKIP_BUILD=1 uses the binaries already built; MISAKI_ENVOY overrides the
# Envoy binary. Prints Markdown on stdout (progress on stderr) and writes it, with the
# command line, date, commit and machine, to bench/results-envoy-stats.md. Takes about
# 4 minutes (--edge, whole-mesh: ~1.5 more). A watchdog ends the run after 9 minutes; on
# exit every process started here is killed and the namespaces are deleted.
set -euo pipefail
CMDLINE="bench/envoy_stats.sh${*:+ $*}"
cd "$(dirname "$0")/.."
ROOT=$PWD
N=3000 STARTS=3 SETTLE_S=11 EDGE= KEEP=
while (($#)); do
  case $1 in
    --services) N=$2; shift ;;
    --starts) STARTS=$2; shift ;;
    --settle) SETTLE_S=$2; shift ;;
    --edge) EDGE=1 ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,46p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 64 ;;
  esac
  shift
done
case "$N$STARTS$SETTLE_S" in ''|*[!0-9]*) echo "--services, --starts and --settle take integers" >&2; exit 64;; esac
[ "$N" -ge 2 ] && [ "$STARTS" -ge 1 ] || { echo "--services must be at least 2, --starts at least 1" >&2; exit 64; }
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, veth pairs)" >&2; exit 1; }
for t in ip curl awk python3 cargo git ${EDGE:+jq}; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }; done
. bench/lib/lab.sh   # lab_up, lab_stop_all, lab_watchdog, lab_envoy, lab_ticks, lab_rss_kib, helpers
GEN=$ROOT/bench/lib/config_scale_policy.py
log() { echo "== $*" >&2; }

if [ -z "${SKIP_BUILD:-}" ]; then
  log "building (misaki-cp: --release; edge-netd: --profile vehicle)"
  cargo build --release -q -p misaki-control-plane --bin misaki-cp
  [ -z "$EDGE" ] || cargo build --profile vehicle -q -p misaki-edge-netd --bin edge-netd
fi
CP=$ROOT/target/release/misaki-cp
NETD=$ROOT/target/vehicle/edge-netd
for b in "$CP" ${EDGE:+"$NETD"}; do [ -x "$b" ] || { echo "$b is not built (run without SKIP_BUILD)" >&2; exit 1; }; done
# What was measured: the commit, and whether the bootstraps or the crates behind the
# binaries had uncommitted changes (as of now; with SKIP_BUILD the binaries may be older).
COMMIT=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- envoy-configs 2>/dev/null || COMMIT+=" (envoy-configs with uncommitted changes)"
git diff --quiet HEAD -- control-plane edge-netd proto Cargo.lock 2>/dev/null || COMMIT+=" (control-plane/edge-netd/proto with uncommitted changes)"
[ -z "${SKIP_BUILD:-}" ] || COMMIT+=" (SKIP_BUILD: binaries as built before)"
lab_envoy

V=es-v-$$ C=es-c-$$ DIR=$(mktemp -d /tmp/envoy-stats.XXXXXX)
PIDS=() WATCHDOG=
cleanup() {
  local rc=$?
  set +e
  lab_stop_all
  if [ -n "$KEEP" ] || [ $rc != 0 ]; then echo "files kept in $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
lab_watchdog envoy_stats.sh 540

log "lab: namespaces $V (vehicle: wlan0, wwan0) and $C (cloud), files in $DIR"
lab_up "wlan0 cwlan0 1" "wwan0 cwwan0 2"   # unshaped: this measures config, not links
# vcurl, ccurl (5 s), CPA, NDA, now_ms, tick_ms, mib, stop: bench/lib/lab.sh

# ---- bootstrap variants -----------------------------------------------------------------
# The shipped file without its top-level stats_config block (its comment lines stay).
strip_stats() { awk '/^stats_config:/ {skip=1; next} skip && /^[^ #]/ {skip=0} !skip' "$1"; }
# The shipped file without the per-cluster pattern (the `- safe_regex:` and its regex line).
strip_cluster_pattern() { awk '/^ *- safe_regex:/ {getline; next} {print}' "$1"; }
DEFERRED=$'deferred_stat_options:\n  enable_deferred_creation_stats: true'
DCC=$'cluster_manager:\n  enable_deferred_cluster_creation: true'
# With deferred creation the list keeps the gauge that carries a cluster's traffic stats
# over a CDS update (docs/envoy-stats.md).
INITIALIZED='        - suffix: ".ClusterTrafficStats.initialized"'
mkvariant() { # $1 = variant, $2 = shipped bootstrap → the variant's bootstrap on stdout
  case $1 in
    old) strip_stats "$2" ;;
    new) cat "$2" ;;
    old+deferred) strip_stats "$2"; echo "$DEFERRED" ;;
    new+deferred) awk -v l="$INITIALIZED" '{print} /^      patterns:$/ {print l}' "$2"; echo "$DEFERRED" ;;
    new-tags) sed 's/^stats_config:$/stats_config:\n  use_all_default_tags: false/' "$2" ;;
    new+dcc) cat "$2"; echo "$DCC" ;;
    nomatch) sed "s/^\( *regex: \).*/\1'^\$'/" "$2" ;;
    floor) strip_cluster_pattern "$2" ;;
  esac
}
check_variant() { # $1 = variant, $2 = its file: the change is really there (or not)
  local f=$2 ok=1 m=0 r=0
  grep -q '^ *inclusion_list:' "$f" && m=1
  grep -q '^ *regex:' "$f" && r=1
  case $1 in
    old|old+deferred) [ $m = 0 ] || ok=0 ;;
    floor) [ $m = 1 ] && [ $r = 0 ] || ok=0 ;;
    *) [ $m = 1 ] && [ $r = 1 ] || ok=0 ;;
  esac
  case $1 in *deferred) grep -q '^  enable_deferred_creation_stats: true' "$f" || ok=0 ;; esac
  case $1 in new+deferred) grep -qF "$INITIALIZED" "$f" || ok=0 ;; esac
  case $1 in nomatch) grep -q "^ *regex: '^\$'$" "$f" || ok=0 ;; esac
  case $1 in new-tags) grep -q '^  use_all_default_tags: false' "$f" || ok=0 ;; esac
  case $1 in new+dcc) grep -q '^  enable_deferred_cluster_creation: true' "$f" || ok=0 ;; esac
  [ $ok = 1 ] || { echo "variant $1: $f is not what it should be" >&2; exit 1; }
}
SETUPS=()   # "sidecar/variant"
declare -A SHIPPED=([vehicle]=envoy-configs/vehicle-sidecar.yaml [edge]=envoy-configs/vehicle-sidecar-edge.yaml [cloud]=envoy-configs/cloud-sidecar.yaml)
declare -A ADMIN=([vehicle]=19901 [edge]=19904 [cloud]=19902)
declare -A IDLE_CLUSTER=([vehicle]='out|svc-1' [edge]='out|svc-1|wifi' [cloud]='in|svc-1')
for v in old new old+deferred new+deferred new-tags new+dcc nomatch floor; do SETUPS+=("vehicle/$v"); done
[ -z "$EDGE" ] || for v in old new new+deferred; do SETUPS+=("edge/$v"); done
for v in old new; do SETUPS+=("cloud/$v"); done
for s in "${SETUPS[@]}"; do
  f="$DIR/${s/\//-}.yaml"
  # The misaki-cp-fed ones pointed at the cloud's misaki-cp; the edge one as shipped.
  mkvariant "${s#*/}" "${SHIPPED[${s%%/*}]}" |
    sed 's/address: 127.0.0.1, port_value: 18000/address: 198.18.0.1, port_value: 50051/' >"$f"
  check_variant "${s#*/}" "$f"
  grep -q "port_value: ${ADMIN[${s%%/*}]} }" "$f" || { echo "$f: admin is not :${ADMIN[${s%%/*}]}" >&2; exit 1; }
  case ${s%%/*} in
    edge) grep -q 'port_value: 15010 }' "$f" ;;
    *) grep -q 'address: 198.18.0.1, port_value: 50051' "$f" ;;
  esac || { echo "$f: cannot point it at its control plane" >&2; exit 1; }
  "$ENVOY" --mode validate -c "$f" --disable-hot-restart >"$DIR/validate.log" 2>&1 ||
    { cat "$DIR/validate.log" >&2; echo "variant $s does not validate" >&2; exit 1; }
done

# ---- misaki-cp (and edge-netd) ----------------------------------------------------------
# $1 = seconds, $2... = command: until it succeeds (50 ms apart), or fail.
wait_until() {
  local end=$((SECONDS + $1)); shift
  until "$@"; do [ $SECONDS -lt $end ] || return 1; sleep 0.05; done
}
python3 "$GEN" --services "$N" >"$DIR/mesh.yaml"
log "misaki-cp: $(wc -c <"$DIR/mesh.yaml") bytes of policy ($N cloud + 4 vehicle services)"
ip netns exec $C env NO_COLOR=1 "$CP" serve --policy "$DIR/mesh.yaml" --xds-addr 198.18.0.1:50051 \
  --admin-addr 198.18.0.1:8080 >"$DIR/cp.log" 2>&1 & PIDS+=($!)
cp_ready() { [ "$(ccurl $CPA/readyz)" = ready ]; }
wait_until 60 cp_ready || { tail "$DIR/cp.log" >&2; echo "misaki-cp never ready" >&2; exit 1; }
if [ -n "$EDGE" ]; then
  python3 "$GEN" --services 0 >"$DIR/echo-mesh.yaml"
  ip netns exec $C "$CP" serve --policy "$DIR/echo-mesh.yaml" --probe-addr 198.18.0.1:7007 >"$DIR/echo.log" 2>&1 & PIDS+=($!)
  lab_netd_config_xds es-car "$DIR/netd-state" >"$DIR/netd.yaml"
  BASE=$(ccurl $CPA/policy | jq -r .version)
  log "edge-netd (policy $BASE over the fleet stream)"
  lab_start_netd "$DIR/netd.yaml" "$DIR/netd.log"
  netd_ready() { vcurl -f $NDA/readyz >/dev/null && [ "$(vcurl $NDA/links | jq -r .policy_version)" = "$BASE" ]; }
  wait_until 60 netd_ready || { tail "$DIR/netd.log" >&2; echo "edge-netd never ready with policy $BASE" >&2; exit 1; }
fi

# ---- one Envoy start ----------------------------------------------------------------------
# Inside the namespace: poll until ready (see the top); print the time (ms) of the
# /stats answer that showed it, then active_clusters.
ENVOY_READY='
port=$1; end=$(( $(date +%s) + $2 ))
re="^(listener_manager[.]total_listeners_(active|warming)|cluster_manager[.](warming|active)_clusters|http[.][a-z_]+[.]rds[.][a-z_]+[.]update_success)\$"
while :; do
  if [ "$(curl -s -m 1 http://127.0.0.1:$port/ready)" = LIVE ]; then
    s=$(curl -gs -m 2 "http://127.0.0.1:$port/stats?filter=$re"); t=$(date +%s%3N)
    if echo "$s" | awk -F": " "
        /total_listeners_active/ {a=\$2} /total_listeners_warming/ {w=\$2} /warming_clusters/ {wc=\$2}
        /rds[.].*update_success/ {n++; if (\$2 < 1) bad=1}
        END {exit !(a >= 1 && w == 0 && wc == 0 && n >= 1 && !bad)}"; then
      echo "$t"; echo "$s" | awk -F": " "/active_clusters/ {print \$2}"; exit 0
    fi
  fi
  [ "$(date +%s)" -lt "$end" ] || exit 1
  sleep 0.01
done'
# $1 = setup, $2 = round. Sets R_MS, R_CPU_MS, R_CLUSTERS; in the last round, after
# SETTLE_S s, also R_RSS (KiB), R_STATS (lines of /stats) and R_IDLE (lines of one idle
# cluster's stats).
start_envoy() {
  local s=$1 k=$2 sc=${1%%/*} f="$DIR/${1/\//-}.yaml" t0 out pid
  t0=$(now_ms)
  ip netns exec $V "$ENVOY" -c "$f" --disable-hot-restart --concurrency 1 -l info \
    >"$DIR/envoy-${s/\//-}-$k.log" 2>&1 & pid=$!; PIDS+=($pid)
  out=$(ip netns exec $V bash -c "$ENVOY_READY" _ "${ADMIN[$sc]}" 120) ||
    { tail -20 "$DIR/envoy-${s/\//-}-$k.log" >&2; echo "Envoy ($s) never ready" >&2; return 1; }
  R_MS=$(( $(head -1 <<<"$out") - t0 ))
  R_CLUSTERS=$(sed -n 2p <<<"$out")
  R_CPU_MS=$(tick_ms "$(lab_ticks "$pid")")
  if [ "$k" = "$STARTS" ]; then
    sleep "$SETTLE_S"
    R_RSS=$(lab_rss_kib "$pid")
    R_STATS=$(vcurl "http://127.0.0.1:${ADMIN[$sc]}/stats" | grep -c .)
    R_IDLE=$(vcurl -G --data-urlencode "filter=^cluster[.]${IDLE_CLUSTER[$sc]//|/[|]}[.]" "http://127.0.0.1:${ADMIN[$sc]}/stats" | grep -c . || true)
  fi
  stop "$pid"
}

# Warm-up (not measured): misaki-cp (edge-netd) compiles each compile key's snapshot for
# its first stream; every measured start then finds it cached.
for sc in vehicle ${EDGE:+edge} cloud; do
  log "warm-up: $sc sidecar"
  start_envoy "$sc/new" 0 || exit 1
done

declare -A MS=() CPU=() RSS=() STATS=() IDLE=() CLUSTERS=()
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
T0=$SECONDS
for k in $(seq 1 "$STARTS"); do
  for s in "${SETUPS[@]}"; do
    log "round $k/$STARTS: $s"
    start_envoy "$s" "$k" || exit 1
    MS[$s]+="$R_MS "; CPU[$s]+="$R_CPU_MS "; CLUSTERS[$s]=$R_CLUSTERS
    [ "$k" = "$STARTS" ] && { RSS[$s]=$(mib "$R_RSS"); STATS[$s]=$R_STATS; IDLE[$s]=$R_IDLE; }
    sleep 0.3
  done
done
ELAPSED=$((SECONDS - T0))

# ---- report -------------------------------------------------------------------------------
# (med, cell: bench/lib/lab.sh)
declare -A WHAT=(
  [old]="no \`stats_config\` (before)"
  [new]="**as shipped: the inclusion list**"
  [old+deferred]="no list; \`deferred_stat_options.enable_deferred_creation_stats: true\`"
  [new+deferred]="the list + \`enable_deferred_creation_stats: true\` (and its \`.ClusterTrafficStats.initialized\` pattern)"
  [new-tags]="the list + \`stats_config.use_all_default_tags: false\`"
  [new+dcc]="the list + \`cluster_manager.enable_deferred_cluster_creation: true\`"
  [nomatch]="the list with a per-cluster pattern that matches nothing"
  [floor]="the list without its per-cluster pattern (no service-cluster stats at all)"
)
declare -A SIDECAR=([vehicle]="vehicle, misaki-cp" [edge]="vehicle, edge-netd" [cloud]="cloud")
CPU_MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
MEM=$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)
{
  echo "## Envoy stats: what the inclusion list saves per cluster"
  echo
  echo "Run \`$CMDLINE\` (as root) on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT;"
  echo "$(nproc) cores ($CPU_MODEL), $MEM, Linux $(uname -r), load average at start $LOAD0, at the end $(cut -d' ' -f1-3 /proc/loadavg);"
  echo "Envoy $ENVOY_VERSION (\`--concurrency 1 --disable-hot-restart\`), misaki-cp \`--release\`; $STARTS starts per variant,"
  echo "interleaved, ${ELAPSED} s of measuring."
  echo
  echo "Policy: \`bench/lib/config_scale_policy.py --services $N\` ($N cloud services, 4 vehicle services),"
  echo "served by one misaki-cp. *vehicle, misaki-cp*: \`envoy-configs/vehicle-sidecar.yaml\` (state of"
  echo "the world from misaki-cp), a cluster per service (\`out|svc-i\`, \`in|vsvc-k\`) plus its xDS"
  echo "cluster."
  [ -z "$EDGE" ] || {
    echo "*vehicle, edge-netd*: \`envoy-configs/vehicle-sidecar-edge.yaml\` fed by edge-netd's local"
    echo "tier (\`--profile vehicle\`; it got the policy over its fleet stream; \`cross_uplink_retry:\` its"
    echo "default), the setup vehicles run: whole-mesh, a cluster per cloud service and uplink its class"
    echo "allows (\`out|svc-i|wifi\`, \`out|svc-i|lte\`) and an aggregate per service and first uplink"
    echo "(\`agg|svc-i|wifi\`); fewer where edge-netd leaves clusters to on-demand discovery."
  }
  echo "*cloud*: \`envoy-configs/cloud-sidecar.yaml\`, a cluster per cloud service."
  echo "Each Envoy runs in the vehicle namespace of the lab (bench/lib/lab.sh: two unshaped uplinks,"
  echo "misaki-cp behind them on 198.18.0.1); a warm-up start per sidecar, not measured, made the"
  echo "control plane compile first."
  echo
  echo "| sidecar | bootstrap | clusters | stats in \`/stats\` | stats of one idle cluster | start → ready (ms) | Envoy CPU to ready (ms) | RSS after ready + ${SETTLE_S} s (MiB) | RSS vs old |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
  for s in "${SETUPS[@]}"; do
    sc=${s%%/*} v=${s#*/}
    old=${RSS[$sc/old]} m=${RSS[$s]}
    if [ "$v" = old ]; then d="—"; else
      d=$(awk -v a="$old" -v b="$m" -v c="${CLUSTERS[$s]}" 'BEGIN{printf "%+.1f MiB (%+.0f %%, %+.1f KiB per cluster)", b-a, (b-a)/a*100, (b-a)*1024/c}')
    fi
    echo "| ${SIDECAR[$sc]} | ${WHAT[$v]} | ${CLUSTERS[$s]} | ${STATS[$s]} | ${IDLE[$s]} | $(cell "${MS[$s]}") | $(cell "${CPU[$s]}") | ${RSS[$s]} | $d |"
  done
  echo
  echo "Times: the median and, in parentheses, every sample in round order (each start a fresh"
  echo "Envoy process). *Start → ready*: from just before the spawn to the first poll (every"
  echo "10 ms, inside the namespace) at which admin \`/ready\` answers \`LIVE\` and one \`/stats\` read"
  echo "shows \`listener_manager.total_listeners_active\` ≥ 1, \`total_listeners_warming\` = 0,"
  echo "\`cluster_manager.warming_clusters\` = 0 and \`update_success\` ≥ 1 for every"
  echo "\`http.*.rds.<route config>\` (as in bench/config_scale.sh). *Envoy CPU*: utime + stime at"
  echo "that moment (tick $((1000 / TCK)) ms). The last round's start then ran ${SETTLE_S} s more before"
  echo "*RSS* (\`VmRSS\`) was read: two of Envoy's stats flushes (every 5 s); the first ones allocate for"
  echo "every histogram, so without the list RSS read before them is ~9 MiB lower (3,005 clusters)."
  echo "*Stats*: lines of \`/stats\` (counters, gauges, text readouts, histograms) at that moment;"
  echo "*one idle cluster*: those of"
  echo "a cluster no request was sent to: \`cluster.${IDLE_CLUSTER[vehicle]}.\` (misaki-cp), \`cluster.${IDLE_CLUSTER[cloud]}.\` (cloud)$(
    [ -z "$EDGE" ] || echo ", \`cluster.${IDLE_CLUSTER[edge]}.\` (edge-netd)")."
  echo "*Per cluster*: the RSS difference divided by the clusters."
  echo
  echo "Variants are made from the shipped bootstraps by the script: *no \`stats_config\`* is the"
  echo "shipped file with its \`stats_config:\` block cut out, i.e. the bootstrap before the list;"
  echo "the others add one setting to the shipped file, or change its per-cluster \`safe_regex\`"
  echo "pattern: *matches nothing* (\`'^\$'\`) refuses every service-cluster stat after running it; *floor*"
  echo "drops it, so that every service-cluster stat is refused by the prefix test on the symbolised"
  echo "name alone. Envoy remembers a name refused after a pattern ran (a per-cluster set of"
  echo "refused names), not one refused by the prefix test: no list − floor is what all stats of"
  echo "the service clusters cost; matches nothing − floor what remembering the refusals costs; the"
  echo "list − matches nothing what the ~20 kept per cluster cost."
} >"$DIR/report.md"
cat "$DIR/report.md"
cp "$DIR/report.md" bench/results-envoy-stats.md
log "written to bench/results-envoy-stats.md"
