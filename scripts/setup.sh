#!/usr/bin/env bash
# Installs what building and testing carve needs on a Debian/Ubuntu machine with rustup: the
# bare-metal target its test guests are built for, musl for the static binary it ships, and
# clippy (the suite lints first).
set -euo pipefail
rustup target add x86_64-unknown-none x86_64-unknown-linux-musl >/dev/null
rustup component add clippy >/dev/null
if [[ ! -r /dev/kvm ]]; then
    echo "setup: /dev/kvm is not usable here; KVM tests will say SKIPPED" >&2
fi
