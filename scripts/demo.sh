#!/usr/bin/env bash
# carve's main job, end to end: build the demo enclave image, boot it as Nitro does (EIF copied
# to 8 MiB, NSM with the image's PCRs, vsock over Unix sockets), ask the enclave for an
# attestation document over vsock port 5006 with a fresh nonce, and verify the document against
# carve's root and the image's measurements.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet -p carve-cli
carve=$PWD/target/release/carve
work=$(mktemp -d)
vm=
cleanup() {
    [[ -n $vm ]] && kill "$vm" 2>/dev/null && wait "$vm" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

echo "== carve build-enclave --demo"
"$carve" build-enclave --demo --output-file "$work/demo.eif" >"$work/measurements.json"
cat "$work/measurements.json"
pcr() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['Measurements'][sys.argv[2]])" "$work/measurements.json" "$1"; }

echo "== carve vm run --eif demo.eif (not debug mode: no console; the image's PCRs are measured)"
"$carve" vm run --eif "$work/demo.eif" --memory 128 --vsock "cid=16,uds=$work/vsock" --cmdline echo_sessions=1 &
vm=$!

nonce=$(python3 -c "import os; print(os.urandom(32).hex())")
echo "== asking the enclave for an attestation document (vsock port 5006, nonce $nonce)"
python3 - "$work/vsock" "$nonce" "$work/attestation.cose" <<'PY'
import socket, struct, sys, time
path, nonce, out = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3]
deadline = time.time() + 60
while True:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.05)
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
wait "$vm"
vm=

echo "== carve attestation verify (pinned: carve's root; expected: the nonce and PCR0/1/2)"
"$carve" attestation verify --doc "$work/attestation.cose" --nonce "$nonce" \
    --pcr "0=$(pcr PCR0)" --pcr "1=$(pcr PCR1)" --pcr "2=$(pcr PCR2)"
echo "== the demo enclave's attestation verified"
