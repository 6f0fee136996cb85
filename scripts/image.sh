#!/usr/bin/env bash
# iamlet's image on a machine without a Docker engine: podman (vfs storage, runc, cgroupfs)
# and a Debian base made with debootstrap, standing in for debian:bookworm-slim. As root.
#
#   scripts/image.sh base                  the stand-in base image (cached; see below)
#   scripts/image.sh build [BINARY] [TAG]  the Dockerfile's runtime stage around BINARY
#                                          (default target/debug/iamlet, the tests' build),
#                                          tagged TAG (default localhost/iamlet:test)
#   scripts/image.sh check-sources         the Dockerfile's build stage sees what cargo needs
#   scripts/image.sh size [TAG]            the image's size in bytes
#   scripts/image.sh run-flags [--host-path MOUNT=HOST]...
#                                          `podman run` flags for the DaemonSet's container as
#                                          the rendered base manifest has it: security
#                                          context and host mounts, one per line, the host
#                                          paths made ready as kubelet makes them by type
#   scripts/image.sh podman ARGS...        podman with the flags this machine needs
#
# The base root filesystem is cached in $IAMLET_IMAGE_CACHE (default /var/cache/iamlet) and
# rebuilt with debootstrap (about 70 s) when the cache is absent.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=docker.io/library/debian:bookworm-slim
# Bumped whenever make_rootfs changes: the cached root filesystem and image are rebuilt.
BASE_VERSION=3
CACHE=${IAMLET_IMAGE_CACHE:-/var/cache/iamlet}
# Debian's mirror as apt's sources on this machine name it (deb.debian.org otherwise).
MIRROR=$(sed -n 's|^URIs: *\(http[^ ]*/debian\)/*$|\1|p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=$(sed -n 's|^URIs: *\(http[^ ]*/debian-security\)/*$|\1|p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
SECURITY=${SECURITY:-http://deb.debian.org/debian-security}

# podman as these machines allow: vfs storage (no overlay on this kernel), runc (crun refuses
# its hybrid cgroups), cgroupfs (no systemd session), explicit ulimits. Its own store
# ($IAMLET_PODMAN_ROOT, default /var/lib/iamlet/podman; state in /run/iamlet-podman): a store
# that a plain `podman` made with another driver refuses vfs ("database configuration
# mismatch"), and this one is never that.
PODMAN_ROOT=${IAMLET_PODMAN_ROOT:-/var/lib/iamlet/podman}
pm() {
  podman --root="$PODMAN_ROOT" --runroot=/run/iamlet-podman --storage-driver=vfs --runtime=runc \
    --cgroup-manager=cgroupfs "$@"
}

need() {
  local missing=()
  for tool in podman runc debootstrap; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "image: missing ${missing[*]}: run scripts/install-test-deps.sh (as root)" >&2
    exit 1
  fi
}

# A bookworm root filesystem like debian:bookworm-slim's: minbase, the same apt sources, the
# same dpkg filters (no documentation, manual pages or translations) and the same apt
# settings (downloaded packages and caches deleted after every install).
make_rootfs() {
  local dir=$1
  debootstrap --variant=minbase bookworm "$dir" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 || {
    tail -20 "$CACHE/debootstrap.log" >&2
    return 1
  }
  cat >"$dir/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  cat >"$dir/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' >"$dir/etc/apt/apt.conf.d/docker-no-languages"
  echo 'Acquire::GzipIndexes "true";' >"$dir/etc/apt/apt.conf.d/docker-gzip-indexes"
  echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$dir/etc/apt/apt.conf.d/docker-autoremove-suggests"
  rm -f "$dir/etc/apt/sources.list"
  cat >"$dir/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  find "$dir/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
  rm -rf "$dir/usr/share/man"/* "$dir/usr/share/locale"/* "$dir/usr/share/info"/* \
    "$dir/var/cache/apt"/*.bin "$dir/var/cache/apt/archives"/*.deb "$dir/var/lib/apt/lists"/* "$dir/var/log"/*.log
}

base() {
  need
  if pm image exists "$BASE" &&
    [ "$(pm image inspect --format '{{index .Labels "io.iamlet.base-version"}}' "$BASE")" = "$BASE_VERSION" ]; then
    echo "image: base $BASE present"
    return
  fi
  mkdir -p "$CACHE"
  local tarball=$CACHE/bookworm-slim-rootfs-v$BASE_VERSION.tar
  if [ ! -s "$tarball" ]; then
    echo "image: no cached base: debootstrap bookworm (minbase) from $MIRROR"
    local dir
    dir=$(mktemp -d)
    make_rootfs "$dir"
    tar -C "$dir" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$dir"
  fi
  pm import --change 'CMD ["bash"]' --change "LABEL io.iamlet.base-version=$BASE_VERSION" "$tarball" "$BASE" >/dev/null
  echo "image: base $BASE imported from $tarball"
}

build() {
  local binary=${1:-${CARGO_TARGET_DIR:-target}/debug/iamlet} tag=${2:-localhost/iamlet:test}
  base
  [ -x "$binary" ] || { echo "image: no binary at $binary: build it first (cargo build --bin iamlet)" >&2; exit 1; }
  local context
  context=$(mktemp -d)
  # Debug information is not the image's business: the same build, without it.
  objcopy --strip-debug "$binary" "$context/iamlet"
  pm build --quiet --pull=never --network=host --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 \
    --build-arg BINARY=prebuilt -f Dockerfile -t "$tag" "$context" >"$context.log" 2>&1 || {
    cat "$context.log" >&2
    exit 1
  }
  rm -f "$context.log"
  rm -rf "$context"
  echo "image: built $tag ($(size "$tag") bytes) from $binary"
}

size() {
  pm image inspect --format '{{.Size}}' "${1:-localhost/iamlet:test}"
}

# Copies what the Dockerfile's build stage copies (from a clean checkout: the files git
# tracks) into an empty directory, and asks cargo to check the binary there, as the stage's
# `cargo build` would see it: a source the Dockerfile forgets fails here, not at an
# operator's first `docker build`.
check_sources() {
  local dir stage=0 copied=()
  dir=$(mktemp -d)
  while read -r instruction rest; do
    case "$instruction" in
      FROM) if [[ "$rest" == *" AS build" ]]; then stage=1; else stage=0; fi ;;
      COPY)
        [ "$stage" -eq 1 ] || continue
        local words
        read -r -a words <<<"$rest"
        local dest=$dir/${words[-1]#./} sources=("${words[@]:0:${#words[@]}-1}")
        for source in "${sources[@]}"; do
          copy_tracked "$source" "$dest" "${#sources[@]}"
          copied+=("$source")
        done
        ;;
    esac
  done < <(grep -E '^(FROM|COPY) ' Dockerfile)
  echo "image: the build stage copies ${copied[*]}"
  local status=0
  CARGO_TARGET_DIR="$PWD/target/image-sources" cargo check --quiet --locked --bin iamlet \
    --manifest-path "$dir/Cargo.toml" || status=$?
  rm -rf "$dir"
  if [ "$status" -ne 0 ]; then
    echo "image: the Dockerfile's build stage does not copy everything cargo needs (see above)" >&2
    exit 1
  fi
  echo "image: cargo checks the binary from exactly what the build stage copies"
}

# COPY's rules, for files git tracks: a directory's content goes into DEST; a file goes to
# DEST, or into it when DEST ends with / or several sources are copied.
copy_tracked() {
  local source=${1%/} dest=$2 count=$3 file
  if [ -d "$source" ]; then
    git ls-files -z -- "$source" | while IFS= read -r -d '' file; do
      install -D -m 0644 "$file" "${dest%/}/${file#"$source"/}"
    done
  elif [[ "$dest" == */ ]] || [ "$count" -gt 1 ]; then
    install -D -m 0644 "$source" "${dest%/}/$(basename "$source")"
  else
    install -D -m 0644 "$source" "$dest"
  fi
}

# The iamlet container of the base manifest's DaemonSet, as podman flags (security context
# and hostPath mounts, one per line), its host paths made ready by their types as kubelet
# makes them: scripts/podman-flags.py, the one place that does this. ARGS are its
# `--host-path MOUNT_PATH=HOST_PATH` overrides.
run_flags() {
  [ -x .venv-deploy/bin/python ] || { echo "image: run scripts/install-test-deps.sh first" >&2; exit 1; }
  local manifest
  manifest=$(kubectl kustomize --load-restrictor=LoadRestrictionsNone manifests/base)
  .venv-deploy/bin/python scripts/podman-flags.py "$@" <<<"$manifest"
}

case "${1:-}" in
  base) base ;;
  build) shift; build "$@" ;;
  size) shift; size "$@" ;;
  check-sources) check_sources ;;
  run-flags) shift; run_flags "$@" ;;
  podman) shift; pm "$@" ;;
  *) sed -n '2,16p' "$0" >&2; exit 2 ;;
esac
