#!/usr/bin/env bash
# Installs what iamlet's tests need on a Debian/Ubuntu machine: Debian packages (as root)
# and a Python virtualenv in .venv with moto's server and botocore. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# A run from a clean clone writes about 9 GiB (cargo's debug build, the image's layers in
# podman's vfs storage, the rootfs): say so up front rather than fail on "no space left on
# device" twenty minutes in.
avail_kib=$(df --output=avail -k . | tail -1)
if [ "$avail_kib" -lt $((10 * 1024 * 1024)) ]; then
  echo "install-test-deps: warning: only $((avail_kib / 1024 / 1024)) GiB free here; a run from a clean clone needs about 10 GiB" >&2
fi

need_apt=()
command -v iptables >/dev/null 2>&1 || need_apt+=(iptables)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v kubectl >/dev/null 2>&1 || need_apt+=(kubernetes-client)
command -v setpriv >/dev/null 2>&1 || need_apt+=(util-linux)
command -v conntrack >/dev/null 2>&1 || need_apt+=(conntrack)
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
command -v objcopy >/dev/null 2>&1 || need_apt+=(binutils)
# The image (scripts/image.sh): podman with runc (crun refuses these kernels' hybrid
# cgroups), and debootstrap for the base. Only as root: the end-to-end tests run it.
if [ "$(id -u)" -eq 0 ]; then
  command -v podman >/dev/null 2>&1 || need_apt+=(podman containernetworking-plugins)
  command -v runc >/dev/null 2>&1 || need_apt+=(runc)
  command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: need root to install: ${need_apt[*]}" >&2
    exit 1
  fi
  echo "install-test-deps: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-test-deps: cargo not found: install the Rust toolchain (https://rustup.rs) first" >&2
  exit 1
fi

# venv DIR REQUIREMENTS: (re)creates DIR when the pinned requirements change.
venv() {
  local stamp=$1/.requirements
  if [ ! -x "$1/bin/python" ] || ! cmp -s "$2" "$stamp"; then
    echo "install-test-deps: installing $2 into $1"
    python3 -m venv "$1"
    "$1/bin/pip" install --quiet --disable-pip-version-check -r "$2"
    cp "$2" "$stamp"
  fi
}
venv .venv tests/requirements.txt
venv .venv-deploy tests/requirements-deploy.txt
