#!/usr/bin/env bash
# Runs a command as on a freshly booted host, as root: in a private mount namespace where
# /run is an empty tmpfs (no xtables lock, no network namespaces, no podman state) and the
# image store of scripts/image.sh's podman starts empty. Nothing an earlier run or another program left there
# can then be assumed: the README's two commands must pass this way, and CI runs them so.
#
#   scripts/fresh-host.sh scripts/demo.sh
#   scripts/fresh-host.sh scripts/test.sh [-- FILTERS]
#
# What a boot itself puts in /run is kept: the resolver's configuration, when
# /etc/resolv.conf points into /run (systemd-resolved). Caches that only save downloads
# stay: cargo's, pip's and the debootstrap root filesystem in /var/cache/iamlet.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "fresh-host: run as root (it mounts a new /run in a private mount namespace)" >&2
  exit 1
fi
if [ $# -eq 0 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi

storage=$(mktemp -d /var/tmp/iamlet-fresh-host.XXXXXX)
trap 'rm -rf "$storage"' EXIT
podman_root=${IAMLET_PODMAN_ROOT:-/var/lib/iamlet/podman}
mkdir -p "$podman_root"
resolv=$(readlink -f /etc/resolv.conf || true)
case "$resolv" in /run/*) cp "$resolv" "$storage/resolv.conf" ;; *) resolv= ;; esac

status=0
# The inner script expands its own arguments, inside the new mount namespace.
# shellcheck disable=SC2016
unshare --mount --propagation private -- bash -euo pipefail -c '
  storage=$1 resolv=$2 podman_root=$3
  shift 3
  mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
  mkdir -p "$storage/podman"
  mount --bind "$storage/podman" "$podman_root"
  if [ -n "$resolv" ]; then
    mkdir -p "$(dirname "$resolv")"
    cp "$storage/resolv.conf" "$resolv"
  fi
  echo "fresh-host: /run is empty and podman has no images; running $*" >&2
  exec "$@"
' fresh-host "$storage" "$resolv" "$podman_root" "$@" || status=$?
exit "$status"
