#!/usr/bin/env bash
# Linux enclave benchmarks, side by side in one run, on the software KVM host (Linux user space
# needs real KVM):
#
#   cargo dist && scripts/build-enclave-blobs.sh && scripts/kvm-host.sh scripts/bench-linux-enclave.sh
#
# Rows (median of RUNS, default 5): build-enclave of the example attest app's image against
# reading and writing the same bytes (cat); run-enclave → heartbeat of that image (development
# mode, 1 vCPU, 128 MiB) against `carve vm run --eif` of the same EIF, whose carve-init finds
# no vsock device, so the VM ends right after the kernel reached init. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
carve=$PWD/target/x86_64-unknown-linux-musl/dist/carve
[[ -x $carve ]] || { echo "bench-linux-enclave: build the shipped binary first (cargo dist)" >&2; exit 1; }
attest=$(ls -t target/debug/build/carve-guest-images-*/out/attest 2>/dev/null | head -n1)
[[ -n $attest ]] || { echo "bench-linux-enclave: build the tests first (cargo test --no-run)" >&2; exit 1; }
work=$(mktemp -d)
export CARVE_RUN_DIR=$work/run CARVE_STATE_DIR=$work/state
trap '"$carve" terminate-enclave --all >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

python3 - "$work/attest.tar" "$attest" <<'PY'
import io, json, sys, tarfile
def add(tar, name, data=b"", kind=tarfile.REGTYPE, mode=0o644, link=""):
    info = tarfile.TarInfo(name); info.type, info.mode, info.mtime, info.linkname = kind, mode, 1700000000, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
layer = io.BytesIO()
with tarfile.open(fileobj=layer, mode="w") as t:
    add(t, "bin", kind=tarfile.DIRTYPE, mode=0o755)
    add(t, "bin/busybox", open("/bin/busybox", "rb").read(), mode=0o755)
    add(t, "bin/attest", open(sys.argv[2], "rb").read(), mode=0o755)
config = {"architecture": "amd64", "os": "linux", "created": "2026-12-01T00:00:00Z",
          "config": {"Cmd": ["/bin/attest"], "Env": ["PATH=/bin"]}}
manifest = [{"Config": "config.json", "RepoTags": ["attest:1"], "Layers": ["layer.tar"]}]
with tarfile.open(sys.argv[1], "w") as t:
    add(t, "manifest.json", json.dumps(manifest).encode())
    add(t, "config.json", json.dumps(config).encode())
    add(t, "layer.tar", layer.getvalue())
PY
echo "development: true" >"$work/dev.yaml"
"$carve" allocator --config "$work/dev.yaml" >/dev/null

now() { date +%s%N; }
# Median of $runs runs of "$@", in milliseconds.
median_ms() {
    local samples=() start
    for _ in $(seq "$runs"); do
        start=$(now)
        "$@" >/dev/null 2>&1 || true
        samples+=($((($(now) - start) / 1000)))
    done
    printf '%s\n' "${samples[@]}" | sort -n | awk '{ a[NR] = $1 } END { printf "%.1f", a[int((NR + 1) / 2)] / 1000 }'
}
build() { "$carve" build-enclave --oci-archive "$work/attest.tar" --docker-uri attest:1 --output-file "$work/attest.eif"; }
copy() { cat "$work/attest.tar" >"$work/copy.tar"; }
heartbeat() {
    local start
    start=$(now)
    "$carve" run-enclave --eif-path "$work/attest.eif" --cpu-count 1 --memory 128 >"$work/run.json" 2>&1
    echo $((($(now) - start) / 1000)) >>"$work/heartbeat.us"
    "$carve" terminate-enclave --all >/dev/null 2>&1
}
vm_run() { "$carve" vm run --eif "$work/attest.eif" --memory 128; }

build >/dev/null 2>&1
size=$(stat -c %s "$work/attest.tar")
eif_size=$(stat -c %s "$work/attest.eif")
build_ms=$(median_ms build)
copy_ms=$(median_ms copy)
for _ in $(seq "$runs"); do heartbeat; done
heartbeat_ms=$(sort -n "$work/heartbeat.us" | awk '{ a[NR] = $1 } END { printf "%.1f", a[int((NR + 1) / 2)] / 1000 }')
vm_ms=$(median_ms vm_run)

echo "| row (median of $runs) | carve | floor |"
echo "|---|---|---|"
echo "| build-enclave, $((size >> 10)) KiB image archive → $((eif_size >> 10)) KiB EIF (ms) | $build_ms | $copy_ms (cat of the archive) |"
echo "| run-enclave → heartbeat, Linux 6.12 enclave, 1 vCPU, 128 MiB (ms) | $heartbeat_ms | $vm_ms (vm run --eif to init and reboot) |"
