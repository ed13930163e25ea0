#!/usr/bin/env bash
# carve's whole test suite: unit tests, guests on the real /dev/kvm, the Linux smoke test (its
# kernel is built once by scripts/build-linux.sh and cached outside the repository), a brief
# run of every fuzz target, and the README's main job (scripts/demo.sh) with the shipped static
# binary, which the cargo tests (glibc builds) do not run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
CARVE_LINUX_KERNEL=$(scripts/build-linux.sh)
export CARVE_LINUX_KERNEL
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
scripts/fuzz-smoke.sh
demo_log=$(mktemp)
if scripts/demo.sh >"$demo_log" 2>&1; then
    echo "carve demo (shipped static binary): booted, attested, terminated"
else
    cat "$demo_log"
    echo "carve demo (shipped static binary): FAILED" >&2
    exit 1
fi
rm -f "$demo_log"
awk '/^test result:/ { p += $4; f += $6 } END { printf "carve tests: %d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' "$log"
