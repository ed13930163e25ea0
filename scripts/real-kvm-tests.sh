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
    # The emulated host is slow and has stalls of its own (QEMU's TCG; docs/kvm-host.md): an
    # executable gets 6 minutes, and one that fails or stalls runs once more, said loudly. Two
    # failures fail the phase.
    # (A retried attempt's summary is relabelled, so scripts/test.sh counts only the last.)
    for attempt in 1 2; do
        output=$(mktemp)
        (cd "crates/${package#carve-}" &&
            timeout --kill-after=10 360 "$path" --include-ignored --color never "${threads[@]}") </dev/null >"$output" 2>&1
        status=$?
        if ((status == 0 || attempt == 2)); then
            cat "$output"
            rm -f "$output"
            ((status == 0)) || { failed=1; echo "== real KVM: $package --test $target FAILED (status $status)"; }
            break
        fi
        sed 's/^test result:/retried: test result:/' "$output"
        rm -f "$output"
        echo "== real KVM: $package --test $target failed or stalled (status $status); running it once more"
    done
    echo "== real KVM: $package --test $target took $((SECONDS - started)) s"
done <"$list"
exit $failed
