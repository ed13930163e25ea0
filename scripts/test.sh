#!/usr/bin/env bash
# carve's whole test suite: unit tests, guests on the real /dev/kvm, the Linux smoke test (its
# kernel is built once by scripts/build-linux.sh and cached outside the repository), and a brief
# run of every fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
CARVE_LINUX_KERNEL=$(scripts/build-linux.sh)
export CARVE_LINUX_KERNEL
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
scripts/fuzz-smoke.sh
awk '/^test result:/ { p += $4; f += $6 } END { printf "carve tests: %d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' "$log"
