#!/usr/bin/env bash
# The benchmark, from one command: installs nginx (the reference) and the test tools, builds
# release binaries, and runs benches/load.rs, which prints the table and writes
# target/bench/load.json. `scripts/bench.sh --quick` shortens every phase (the sustained load
# from 5 minutes to 20 s). The hot-path micro-benchmarks: `cargo bench --bench hot_path`.
set -euo pipefail
cd "$(dirname "$0")/.."

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
