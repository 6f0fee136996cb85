#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test.
#   scripts/test.sh            everything; as root, the end-to-end tests in network namespaces too
#   scripts/test.sh -- NAME    cargo test's own filters after --
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

filters=()
if [ "${1:-}" = "--" ]; then shift; filters=("$@"); fi

scripts/check-deploy.sh
# The Dockerfile's build stage copies what cargo needs (an operator's `docker build`).
scripts/image.sh check-sources

if [ "$(id -u)" -eq 0 ]; then
  # The end-to-end tests (real iptables in network namespaces) are #[ignore]d for plain
  # `cargo test` because they need root; here they run with the rest, the agent as the
  # image's container: the Dockerfile's runtime stage around this very build of iamlet.
  cargo test --workspace --lib --tests --no-run
  scripts/image.sh build "${CARGO_TARGET_DIR:-target}/debug/iamlet" localhost/iamlet:test
  IAMLET_IMAGE=localhost/iamlet:test cargo test --workspace --lib --tests -- --include-ignored "${filters[@]}"
elif [ "${CI:-}" = "true" ]; then
  echo "scripts/test.sh: CI must run as root: the end-to-end tests need network namespaces and iptables" >&2
  exit 1
else
  echo "scripts/test.sh: not root: the end-to-end tests (tests/it/e2e_*.rs) are ignored; run as root for all tests" >&2
  cargo test --workspace --lib --tests -- "${filters[@]}"
fi
