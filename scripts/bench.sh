#!/usr/bin/env bash
# The benchmark, from one command: installs nginx (the reference) and the test tools, builds
# release binaries, and runs benches/load.rs, which prints the table and writes
# target/bench/load.json. `scripts/bench.sh --quick` shortens every phase (the sustained load
# from 5 minutes to 20 s). The hot-path micro-benchmarks: `cargo bench --bench hot_path`.
#
# `scripts/bench.sh --fleet [ARGS]` runs the fleet simulation instead (examples/fleet.rs), at
# full size in each session scope: 5,000 nodes of 110 pods against one account's 600
# AssumeRole/s for 4 simulated hours (on one core about 28 minutes and 9.5 GB for `pod`
# scope, 7 minutes for each other). Each scope's JSON line goes to target/bench/fleet.jsonl;
# ARGS go to the example (`--nodes 50 --hours 1` for a run of seconds).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fleet" ]; then
  shift
  cargo build --release --example fleet
  out=${CARGO_TARGET_DIR:-target}/bench/fleet.jsonl
  mkdir -p "$(dirname "$out")"
  : >"$out"
  for scope in pod service-account role; do
    echo "fleet simulation, $scope scope:" >&2
    cargo run -q --release --example fleet -- --scope "$scope" "$@" | tail -n 1 | tee -a "$out"
  done
  echo "written: $out" >&2
  exit 0
fi

scripts/install-test-deps.sh
if ! command -v nginx >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bench: nginx is needed as the reference: install it (apt-get install nginx-light) or run as root" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
fi
exec cargo bench --bench load -- "$@"
