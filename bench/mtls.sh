#!/usr/bin/env bash
# What mutual TLS on misaki-cp's gRPC port costs (issue 10), against plaintext in the
# same run with the same load generator.
#
#   bench/mtls.sh [--vehicles N] [--modes sotw,delta] [--reconnects K] [--keep]
#
# Builds misaki-loadgen and misaki-cp (release) and runs `misaki-loadgen mtls --probe`:
# N simulated vehicles (default 10,000; `car-0` …), each on its own HTTP/2 connection
# as an Envoy connects, over mTLS each with its own client certificate
# (spiffe://misaki.local/vehicle/car-i, issued in process by misaki-cp's CA code before
# anything is timed; client session resumption off, and misaki-cp resumes nothing, so
# every connection is a full handshake). misaki-cp runs as docs/security.md sets a fleet
# up (--tls-cert --tls-key --client-ca --crl --ca). Per ADS mode, a plaintext row then
# an mTLS row, each on a fresh misaki-cp:
#   1. connect: all N dial at once the just-started misaki-cp (a fleet after a
#      control-plane restart) until every vehicle has its config (CDS/EDS/LDS/RDS
#      answered): wall time, misaki-cp CPU (/proc utime+stime) and per 1,000 vehicles,
#      the load generator's CPU (same cores);
#   2. RSS per vehicle (misaki-cp VmRSS over idle, 2 s after all have their config);
#   3. reconnect, K times (default 2): every vehicle drops its connection; once
#      misaki-cp has closed them all, all N dial again at once (misaki-cp warm).
# Then a bare server (no misaki-cp, no HTTP/2), plaintext and rustls with misaki-cp's
# server configuration, holding N connections that each got a reply of the size
# misaki-cp pushed: what TLS alone costs per connection, in memory and CPU.
# The 1-minute load average is printed with every phase: the machine is shared.
#
# Writes Markdown to stdout (progress on stderr) and, with the command line, date,
# commit, machine and load average, to bench/results-mtls.md. Needs no root; loopback
# only (one source address: 2 × N connections per misaki-cp fit the ephemeral range).
# About 3 minutes with the defaults on 2 cores (plus the build). Bounded: the load
# generator gives up after 9 minutes and kills what it started, also on failure and
# Ctrl-C; this script's trap kills whatever is left from the pid file.
set -euo pipefail
CMDLINE="bench/mtls.sh${*:+ $*}"
cd "$(dirname "$0")/.."

N=10000 MODES=sotw,delta RECONNECTS=2 KEEP=0
while (($#)); do
  case $1 in
    --vehicles) N=$2; shift ;;
    --modes) MODES=$2; shift ;;
    --reconnects) RECONNECTS=$2; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 64 ;;
  esac
  shift
done
. bench/lib/lab.sh   # lab_machine, lab_nofile

# One descriptor per connection on each side (the load generator, misaki-cp, the bare
# server), and during a reconnect the old ones are closed before the new ones dial.
NOFILE=$(lab_nofile 65536)
echo "fd limit: $NOFILE" >&2
if ((NOFILE < N + 1000)); then
  echo "the fd limit ($NOFILE) is too low for $N connections" >&2
  exit 1
fi

cargo build --release -p misaki-loadgen -p misaki-control-plane >&2
COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- control-plane 2>/dev/null || echo ' (with uncommitted changes)')
BIN=${CARGO_TARGET_DIR:-target}/release/misaki-loadgen

WORK=$(mktemp -d /tmp/misaki-mtls.XXXXXX)
PIDFILE=$WORK/pids LG= LAB_KEEP=$KEEP LAB_PROCS='misaki-cp|misaki-loadgen probe-server'
lab_loadgen_traps

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
START=$SECONDS
ARGS=(mtls --out-dir "$WORK" --vehicles "$N" --modes "$MODES" --reconnects "$RECONNECTS" --probe --deadline-secs 540)
lab_loadgen "${ARGS[@]}" >"$WORK/tables.md"

{
  echo "## Mutual TLS on misaki-cp's gRPC port: cost against plaintext (issue 10)"
  echo
  echo "Run \`$CMDLINE\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT;"
  echo "$(lab_machine), shared with other builds: load average (1, 5, 15 min) at start $LOAD0, at the end $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "Took $((SECONDS - START)) s. misaki-cp and misaki-loadgen \`--release\`; the load generator runs \`misaki-loadgen ${ARGS[*]/#$WORK/DIR}\`."
  echo
  echo "$N simulated vehicles, each on its own HTTP/2 connection (as an Envoy), node id = vehicle id \`car-i\`;"
  echo "over mTLS each presents its own certificate (\`spiffe://misaki.local/vehicle/car-i\`, ECDSA P-256, issued"
  echo "before the timing by misaki-cp's CA code) and misaki-cp runs with \`--tls-cert --tls-key --client-ca --crl --ca\`"
  echo "(default \`--max-handshakes 512\`, \`--handshake-timeout 10s\`). Session resumption is off on the client, and"
  echo "misaki-cp resumes nothing, so every connection is a full TLS 1.3 handshake with a client certificate check."
  echo "Policy: the fleet benchmark's (quickstart + 20 cloud services)."
  echo
  cat "$WORK/tables.md"
  echo
  echo "- *connect*: all vehicles dial a misaki-cp that has just started (a fleet after a control-plane restart);"
  echo "  *reconnect*: the connected fleet drops every connection, and once misaki-cp has closed them all, every"
  echo "  vehicle dials again at once (misaki-cp warm). *All have their config*: from the first dial to the last"
  echo "  vehicle having every type it subscribes to answered. CPU: utime+stime from /proc around the phase."
  echo "- Wall times are bound by this machine's 2 cores, which misaki-cp shares with the load generator (its"
  echo "  CPU column: the client side of the same handshakes) and other builds (the load average)."
  echo "- A vehicle's dial times out after 10 s, TCP connect and TLS handshake together (as Envoy's cluster"
  echo "  \`connect_timeout\` covers the handshake), and is retried with jittered backoff: *stream retries*; the"
  echo "  handshakes misaki-cp saw fail are by \`misaki_tls_handshakes_total\` result (\`io\`: the connection broke, e.g. the client gave up)."
  echo "- Bare server: what TLS alone costs per connection, without misaki-cp, tonic or HTTP/2 around it; the"
  echo "  mTLS rows' excess over plaintext in misaki-cp, minus the bare server's, is what misaki-cp adds per TLS"
  echo "  connection (its list of live connections with each client certificate, the verified identity each"
  echo "  connection carries) and allocator effects."
  echo "- RSS per vehicle: misaki-cp VmRSS over idle, divided by the vehicles, 2 s after the last one got its"
  echo "  config. After a reconnect the figure is higher because the allocator keeps freed memory; it levels off"
  echo "  after a few waves (it is not a per-connection leak: the same rise with MALLOC_ARENA_MAX=1)."
} | tee bench/results-mtls.md
echo "written to bench/results-mtls.md" >&2
