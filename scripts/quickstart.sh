#!/usr/bin/env bash
# The main job on the embedded quickstart: misaki-cp serving examples/quickstart/mesh.yaml,
# a real Envoy vehicle sidecar fed by it over ADS, and a demo upstream standing in for
# the cloud services — then a request routed through the mesh so you can see it work.
#   scripts/quickstart.sh          # runs until Ctrl-C
#   scripts/quickstart.sh --once   # demo request, then stop
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build -q -p misaki-control-plane --bin misaki-cp

for port in 18000 19000 19901 15001 15006 18081; do
  if ss -ltnH "sport = :$port" | grep -q .; then
    echo "quickstart: port $port is taken (Envoy binds with SO_REUSEPORT and would silently share it); stop what holds it:" >&2
    ss -ltnp "sport = :$port" >&2
    exit 1
  fi
done

run=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$run"; }
trap cleanup EXIT INT TERM

# Demo upstream for maps/telemetry/hazard-alerts (all on 127.0.0.1:18081 in the policy).
python3 - >"$run/upstream.log" 2>&1 <<'PY' &
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"demo upstream: {self.path} (class {self.headers.get('x-misaki-class')})\n".encode()
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    do_POST = do_GET
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", 18081), H).serve_forever()
PY
pids+=($!)

target/debug/misaki-cp serve >"$run/misaki-cp.log" 2>&1 &
pids+=($!)
.venv/bin/envoy -c envoy-configs/vehicle-sidecar.yaml --disable-hot-restart --concurrency 1 \
  -l warn >"$run/envoy.log" 2>&1 &
pids+=($!)

for _ in $(seq 100); do
  curl -fs 127.0.0.1:19901/ready >/dev/null 2>&1 && break
  sleep 0.1
done
echo "== misaki-cp admin: http://127.0.0.1:19000/{policy,nodes,metrics}; Envoy admin: http://127.0.0.1:19901"
echo "== request: curl 127.0.0.1:15001/maps/tile/42   (app -> vehicle Envoy -> maps)"
curl -fsS 127.0.0.1:15001/maps/tile/42
echo "== request: curl 127.0.0.1:15001/hazards/ahead  (critical class: HIGH priority, 2s timeout, 3 retries)"
curl -fsS 127.0.0.1:15001/hazards/ahead
echo "== what the sidecar ACKed:"
curl -fsS 127.0.0.1:19000/nodes | python3 -c 'import json,sys; [print(" ", s["node_id"], s["kind"], {t: v["last_acked_version"] for t, v in s["types"].items()}) for s in json.load(sys.stdin)["streams"]]'
if [ "${1:-}" = "--once" ]; then exit 0; fi
echo "== running; Ctrl-C to stop (logs in $run)"
wait
