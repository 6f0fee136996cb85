#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test.
#   scripts/test.sh            everything (as root, the end-to-end tests in network namespaces too)
#   scripts/test.sh -- NAME    cargo test's own filters and flags after --
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

if [ "${1:-}" = "--" ]; then shift; fi
cargo test --all-targets "$@"
