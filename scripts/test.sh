#!/usr/bin/env bash
# carve's whole test suite: unit tests, guests on the real /dev/kvm, and the Linux smoke test
# (its kernel is built once by scripts/build-linux.sh and cached outside the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
CARVE_LINUX_KERNEL=$(scripts/build-linux.sh)
export CARVE_LINUX_KERNEL
cargo test --workspace --locked
