#!/usr/bin/env bash
# What on-demand configuration adds to a vehicle's first request to a service.
#
#   bench/on_demand_first_request.sh [--services N] [--requests K]
#
# misaki-cp on loopback serves a policy of N cloud services (default 3,000, nothing
# declared: bench/lib/config_scale_policy.py) to a vehicle Envoy 1.40 on delta xDS
# (envoy-configs/vehicle-sidecar-delta.yaml, --concurrency 1); every service's endpoint
# is one local HTTP upstream. For K services (default 30) never requested before, it
# times (curl time_total) the first request — the Envoy fetches the service's scope
# routes (RDS), its cluster (ODCDS) and the cluster's endpoints (EDS) — and then a
# second request to the same service, and counts the xDS responses misaki-cp sent for
# those first requests. On loopback the difference is the control plane's and Envoy's
# own work; straight to misaki-cp over an uplink each fetch adds one round trip of that
# uplink, with edge-netd's local tier it stays on the vehicle's loopback.
#
# Writes Markdown to stdout and to bench/results-on-demand.md. Needs no root.
set -euo pipefail
CMDLINE="bench/on_demand_first_request.sh${*:+ $*}"
cd "$(dirname "$0")/.."
ROOT=$PWD
N=3000 K=30
while (($#)); do
  case $1 in
    --services) N=$2; shift ;;
    --requests) K=$2; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 64 ;;
  esac
  shift
done
. bench/lib/lab.sh   # lab_envoy
[ -z "${SKIP_BUILD:-}" ] && cargo build --release -q -p misaki-control-plane --bin misaki-cp
CP=$PWD/target/release/misaki-cp
lab_envoy
DIR=$(mktemp -d /tmp/on-demand.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
# Unusual ports, checked free.
XDS=28610 ADMIN=28611 EADMIN=28612 UP=28613 OUT=28614 IN=28615 CLOUD=28616
for p in $XDS $ADMIN $EADMIN $UP $OUT $IN $CLOUD; do
  ! ss -ltn | awk '{print $4}' | grep -q ":$p\$" || { echo "port $p is in use" >&2; exit 1; }
done
python3 -m http.server "$UP" --bind 127.0.0.1 >/dev/null 2>&1 & PIDS+=($!)
python3 bench/lib/config_scale_policy.py --services "$N" |
  sed -E "s/endpoints: \[[^]]*\]/endpoints: [\"127.0.0.1:$UP\"]/" |
  sed "s/^services:/mesh: { vehicle_outbound_port: $OUT, vehicle_inbound_port: $IN, cloud_inbound_port: $CLOUD }\nservices:/" >"$DIR/mesh.yaml"
"$CP" serve --policy "$DIR/mesh.yaml" --xds-addr 127.0.0.1:$XDS --admin-addr 127.0.0.1:$ADMIN >"$DIR/cp.log" 2>&1 & PIDS+=($!)
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null && break; sleep 0.1; done
sed -e "s/port_value: 18000/port_value: $XDS/" -e "s/port_value: 19903/port_value: $EADMIN/" \
  envoy-configs/vehicle-sidecar-delta.yaml >"$DIR/envoy.yaml"
"$ENVOY" -c "$DIR/envoy.yaml" --disable-hot-restart --concurrency 1 -l warning >"$DIR/envoy.log" 2>&1 & PIDS+=($!)
for _ in $(seq 300); do [ "$(curl -s "http://127.0.0.1:$EADMIN/ready")" = LIVE ] && break; sleep 0.1; done
sleep 1
responses() { curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '/^misaki_xds_pushes_total/ {s += $2} END {print s+0}'; }
t() { curl -s -o /dev/null -w '%{http_code} %{time_total}\n' "http://127.0.0.1:$OUT/svc-$1/x"; }
FIRST=() SECOND=() r0=$(responses)
for i in $(seq 0 $((K - 1))); do
  svc=$(( (i * 97) % N ))
  read -r c1 t1 < <(t "$svc"); read -r c2 t2 < <(t "$svc")
  [ "$c1" = 404 ] && [ "$c2" = 404 ] || { echo "svc-$svc: HTTP $c1/$c2 (the upstream answers 404 for these paths; anything else is a routing failure)" >&2; exit 1; }
  FIRST+=("$t1"); SECOND+=("$t2")
done
r1=$(responses)
stats() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1*1000} END {printf "%.2f | %.2f | %.2f", v[int((NR+1)/2)], v[int(NR*0.95+0.5)], v[NR]}'; }
{
  echo "# On-demand first request (delta Envoy straight to misaki-cp, loopback)"
  echo
  echo "\`$CMDLINE\` — $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD), $(nproc) cores, Envoy $ENVOY_VERSION"
  echo
  echo "| request to a service never used before ($K services of $N) | median ms | p95 ms | max ms |"
  echo "|---|---|---|---|"
  echo "| first (scope routes, cluster, endpoints fetched) | $(stats "${FIRST[@]}") |"
  echo "| second (all held) | $(stats "${SECOND[@]}") |"
  echo
  echo "xDS responses misaki-cp sent for the $K first requests: $((r1 - r0)) ($(awk -v a=$((r1 - r0)) -v k="$K" 'BEGIN{printf "%.1f", a/k}') per service: each is one round trip to the control plane)."
} | tee bench/results-on-demand.md
