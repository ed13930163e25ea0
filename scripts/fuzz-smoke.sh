#!/usr/bin/env bash
# Builds every cargo-fuzz target and runs each briefly (FUZZ_SECONDS, default 20), so CI catches
# targets that no longer build and shallow crashes. Needs a nightly toolchain and cargo-fuzz.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${FUZZ_SECONDS:-20}
if ! cargo +nightly --version >/dev/null 2>&1 || ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz smoke: SKIPPED (needs a nightly toolchain and cargo-fuzz)" >&2
    exit 0
fi
cargo +nightly fuzz build
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in $(cargo +nightly fuzz list); do
    if ! cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -max_len=65536 >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "fuzz smoke: $target FAILED" >&2
        exit 1
    fi
    echo "fuzz smoke: $target: $(grep -E '^Done' "$log")"
done
echo "fuzz smoke: all targets ran clean"
