#!/usr/bin/env bash
# Linux enclave benchmarks, side by side in one run, on the software KVM host (Linux user space
# needs real KVM):
#
#   cargo dist && scripts/build-enclave-blobs.sh && scripts/kvm-host.sh scripts/bench-linux-enclave.sh
#
# Rows (median of RUNS, default 5): build-enclave of the example attest app's image against
# reading and writing the same bytes (cat); build-enclave --docker-uri of a 50 MiB image from a
# local registry (Debian's docker-registry) against the sum of pulling its blobs (curl) and
# writing the EIF's bytes (cat), with skopeo's pull of the same image beside it; run-enclave →
# heartbeat of the attest image (development mode, 1 vCPU, 128 MiB) against `carve vm run
# --eif` of the same EIF, whose carve-init finds no vsock device, so the VM ends right after the
# kernel reached init. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
carve=$PWD/target/x86_64-unknown-linux-musl/dist/carve
[[ -x $carve ]] || { echo "bench-linux-enclave: build the shipped binary first (cargo dist)" >&2; exit 1; }
attest=$(ls -t target/debug/build/carve-guest-images-*/out/attest 2>/dev/null | head -n1)
[[ -n $attest ]] || { echo "bench-linux-enclave: build the tests first (cargo test --no-run)" >&2; exit 1; }
work=$(mktemp -d)
export CARVE_RUN_DIR=$work/run CARVE_STATE_DIR=$work/state
registry_pid=
trap '"$carve" terminate-enclave --all >/dev/null 2>&1 || true; [[ -z $registry_pid ]] || kill $registry_pid; rm -rf "$work"' EXIT

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
# The 50 MiB image: the attest app, busybox and 50 MiB of incompressible data, as an OCI layout
# (one gzip layer) pushed with skopeo to Debian's docker-registry on loopback.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$work/registry" "$port" >"$work/registry.yml"
docker-registry serve "$work/registry.yml" >/dev/null 2>&1 &
registry_pid=$!
big_blobs=$(python3 - "$work/layout" "$attest" <<'PY'
import gzip, hashlib, io, json, os, sys, tarfile
out = sys.argv[1]
os.makedirs(out + "/blobs/sha256")
def blob(data, media):
    digest = hashlib.sha256(data).hexdigest()
    open(f"{out}/blobs/sha256/{digest}", "wb").write(data)
    return {"mediaType": media, "digest": "sha256:" + digest, "size": len(data)}
layer = io.BytesIO()
with tarfile.open(fileobj=layer, mode="w") as t:
    for name, path in [("bin/busybox", "/bin/busybox"), ("bin/attest", sys.argv[2])]:
        data = open(path, "rb").read()
        info = tarfile.TarInfo(name); info.size, info.mode, info.mtime = len(data), 0o755, 1700000000
        t.addfile(info, io.BytesIO(data))
    data = os.urandom(50 << 20)
    info = tarfile.TarInfo("data/blob"); info.size, info.mtime = len(data), 1700000000
    t.addfile(info, io.BytesIO(data))
tar = layer.getvalue()
config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/attest"], "Env": ["PATH=/bin"]},
          "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]}}
manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
            "layers": [blob(gzip.compress(tar, 1), "application/vnd.oci.image.layer.v1.tar+gzip")]}
entry = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
entry["annotations"] = {"org.opencontainers.image.ref.name": "1"}
json.dump({"schemaVersion": 2, "manifests": [entry]}, open(out + "/index.json", "w"))
open(out + "/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
print(" ".join(x["digest"] for x in [manifest["config"]] + manifest["layers"]))
PY
)
for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
HOME=$work skopeo copy --quiet --insecure-policy --dest-tls-verify=false --preserve-digests \
    "oci:$work/layout:1" "docker://127.0.0.1:$port/big:1"
big=127.0.0.1:$port/big:1
pull_big() { "$carve" build-enclave --docker-uri "$big" --output-file "$work/big.eif"; }
curl_big() {
    for digest in $big_blobs; do curl -sf "http://127.0.0.1:$port/v2/big/blobs/$digest" -o "$work/blob"; done
}
write_big() { cat "$work/big.eif" >"$work/copy.eif"; }
skopeo_big() {
    rm -rf "$work/pulled"
    HOME=$work skopeo copy --quiet --insecure-policy --src-tls-verify=false "docker://$big" "oci:$work/pulled:1"
}

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
    "$carve" run-enclave --eif-path "$work/attest.eif" --cpu-count 1 --memory 128 >"$work/run.json" 2>&1 || { cat "$work/run.json" >&2; return 1; }
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
pull_big >/dev/null 2>&1
big_eif=$(stat -c %s "$work/big.eif")
big_ms=$(median_ms pull_big)
curl_ms=$(median_ms curl_big)
write_ms=$(median_ms write_big)
skopeo_ms=$(median_ms skopeo_big)

echo "| row (median of $runs) | carve | floor (and peer) |"
echo "|---|---|---|"
echo "| build-enclave, $((size >> 10)) KiB image archive → $((eif_size >> 10)) KiB EIF (ms) | $build_ms | $copy_ms (cat of the archive) |"
floor_ms=$(awk "BEGIN { printf \"%.1f\", $curl_ms + $write_ms }")
echo "| build-enclave --docker-uri, 50 MiB image from a loopback registry → $((big_eif >> 20)) MiB EIF (ms) | $big_ms | $floor_ms (curl of its blobs $curl_ms + cat of the EIF $write_ms); skopeo's pull alone $skopeo_ms |"
echo "| run-enclave → heartbeat, Linux 6.12 enclave, 1 vCPU, 128 MiB (ms) | $heartbeat_ms | $vm_ms (vm run --eif to init and reboot) |"
