#!/usr/bin/env bash
# The part of carve's suite that needs real KVM, run on the software KVM host by scripts/test.sh:
#   scripts/kvm-host.sh scripts/real-kvm-tests.sh LIST
# LIST names the test executables cargo built (one "package target path" per line; see
# scripts/test.sh). Ignored tests — those our nested build hosts cannot run, such as Linux user
# space — run here too, and CARVE_REAL_KVM=1 makes tests require what real KVM must do.
set -uo pipefail
cd "$(dirname "$0")/.."
list=$1
export CARVE_REAL_KVM=1
failed=0
while read -r package target path; do
    started=$SECONDS
    echo "== real KVM: $package --test $target"
    # cargo runs a package's tests from its directory; so do we.
    # Two Linux enclaves at once starve each other on the emulated host's two CPUs (one has
    # stalled for minutes there); their tests take turns.
    threads=()
    [[ $target == linux_enclave ]] && threads=(--test-threads 1)
    (cd "crates/${package#carve-}" && "$path" --include-ignored --color never "${threads[@]}") || failed=1
    echo "== real KVM: $package --test $target took $((SECONDS - started)) s"
done <"$list"
exit $failed
