#!/usr/bin/env bash
# carve's main job, end to end, as a nitro-cli user would do it: run the built-in demo enclave
# (its EIF copied into enclave memory at 8 MiB, NSM with the image's PCRs, vsock over Unix
# sockets), wait for its boot heartbeat, ask it for an attestation document over vsock port 5006
# with a fresh nonce, verify the document against carve's root and the image's measurements,
# and terminate it.
#
# The demo runs in development mode in a private run directory, so it neither needs nor touches
# a CPU pool or hugepages (`carve allocator` sets those up for real enclaves; see docs/enclaves.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The binary carve ships: static musl (`cargo dist`, see Cargo.toml's [profile.dist]).
cargo dist --quiet
carve=$PWD/target/x86_64-unknown-linux-musl/dist/carve
work=$(mktemp -d)
export CARVE_RUN_DIR=$work/run
cleanup() {
    "$carve" terminate-enclave --all >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
json() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval('d'+sys.argv[2]))" "$@"; }

echo "development: true" >"$work/allocator.yaml"
"$carve" allocator --config "$work/allocator.yaml"

echo "== carve build-enclave --demo (the image's measurements)"
"$carve" build-enclave --demo --output-file "$work/demo.eif" >"$work/measurements.json"
cat "$work/measurements.json"

echo "== carve run-enclave --eif-path demo.eif --cpu-count 1 --memory 64"
"$carve" run-enclave --eif-path "$work/demo.eif" --cpu-count 1 --memory 64 | tee "$work/enclave.json"
id=$(json "$work/enclave.json" "['EnclaveID']")

echo "== carve describe-enclaves"
"$carve" describe-enclaves

nonce=$(python3 -c "import os; print(os.urandom(32).hex())")
echo "== asking the enclave for an attestation document (vsock port 5006, nonce $nonce)"
python3 - "$CARVE_RUN_DIR/$id.vsock" "$nonce" "$work/attestation.cose" <<'PY'
import socket, struct, sys
path, nonce, out = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_UNIX)
s.settimeout(60)
s.connect(path)
s.sendall(b"CONNECT 5006\n")
line = b""
while not line.endswith(b"\n"):
    line += s.recv(1) or sys.exit("the enclave refused the connection")
s.sendall(struct.pack(">I", len(nonce)) + nonce)
def take(n):
    data = b""
    while len(data) < n:
        data += s.recv(n - len(data)) or sys.exit("the enclave closed the connection")
    return data
document = take(struct.unpack(">I", take(4))[0])
open(out, "wb").write(document)
print(f"received a {len(document)}-byte COSE_Sign1 document")
PY

echo "== carve attestation verify (pinned: carve's root; expected: the nonce and PCR0/1/2)"
pcr() { json "$work/measurements.json" "['Measurements']['$1']"; }
"$carve" attestation verify --doc "$work/attestation.cose" --nonce "$nonce" \
    --pcr "0=$(pcr PCR0)" --pcr "1=$(pcr PCR1)" --pcr "2=$(pcr PCR2)"

echo "== carve terminate-enclave"
"$carve" terminate-enclave --enclave-id "$id"
echo "== the demo enclave booted, attested and was terminated"
