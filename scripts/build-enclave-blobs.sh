#!/usr/bin/env bash
# Builds carve's enclave blobs, in nitro-cli's blobs layout, into a cache outside the repository:
# bzImage and bzImage.config (the enclave kernel, from Debian's linux-source-6.12 and
# guests/linux/enclave.config; the NSM driver is built in, so there is no nsm.ko), cmdline, and
# init (carve-init, built for musl). Prints the path of the directory, which
# $cache/enclave-blobs then names. The kernel is cached by
# package version and config hash; init is rebuilt (incrementally) and copied in on every run.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
fragment="$repo/guests/linux/enclave.config"
cache=${CARVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/carve}
package=${CARVE_ENCLAVE_LINUX_SOURCE:-linux-source-6.12}
target=x86_64-unknown-linux-musl
cmdline='reboot=k panic=30 pci=off console=ttyS0 random.trust_cpu=on'
required=(CONFIG_NSM CONFIG_VIRTIO_VSOCKETS CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES CONFIG_SERIAL_8250_CONSOLE)

need=()
dpkg -s "$package" >/dev/null 2>&1 || need+=("$package")
for tool in make gcc flex bison bc; do command -v "$tool" >/dev/null || need+=("$tool"); done
command -v xz >/dev/null || need+=(xz-utils)
dpkg -s libelf-dev >/dev/null 2>&1 || need+=(libelf-dev)
if ((${#need[@]})); then
    if [[ $(id -u) != 0 ]]; then
        echo "build-enclave-blobs: missing Debian packages ${need[*]} (apt-get install ${need[*]})" >&2
        exit 1
    fi
    echo "build-enclave-blobs: installing ${need[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" build-essential >&2
fi
command -v cargo >/dev/null || { echo "build-enclave-blobs: cargo not found (install Rust with rustup)" >&2; exit 1; }
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target" >&2
fi

tarball=$(ls /usr/src/"$package".tar.* | head -n1)
version=$(dpkg-query -W -f='${Version}' "$package")
key=$(sha256sum <"$fragment" | cut -c1-12)
out="$cache/enclave-blobs-$version-$key"

if [[ ! -f "$out/bzImage" ]]; then
    mkdir -p "$cache"
    work=$(mktemp -d "$cache/build.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    echo "build-enclave-blobs: building $package $version (a few minutes on 2 cores)" >&2
    tar -xf "$tarball" -C "$work"
    src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)
    # Fixed build identity, so a rebuild of the same config gives the same bzImage (and PCR0).
    export KBUILD_BUILD_USER=carve KBUILD_BUILD_HOST=carve KBUILD_BUILD_TIMESTAMP="$(date -u -r "$tarball")"
    make -C "$src" -s tinyconfig >&2
    "$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$fragment" >/dev/null
    make -C "$src" -s olddefconfig >&2
    make -C "$src" -s -j"$(nproc)" bzImage >&2
    for option in "${required[@]}"; do
        grep -qx "$option=y" "$src/.config" || {
            echo "build-enclave-blobs: $option=y is not in the built kernel's .config (check $fragment)" >&2
            exit 1
        }
    done
    mkdir -p "$out"
    cp "$src/.config" "$out/bzImage.config"
    cp "$src/arch/x86/boot/bzImage" "$out/bzImage.partial"
    mv -f "$out/bzImage.partial" "$out/bzImage"
fi
printf '%s\n' "$cmdline" >"$out/cmdline"

(cd "$repo" && cargo build --release --locked --target "$target" -p carve-init) >&2
install -m 0755 "${CARGO_TARGET_DIR:-$repo/target}/$target/release/carve-init" "$out/init.partial"
mv -f "$out/init.partial" "$out/init"
# Where `carve build-enclave` looks for carve's blobs.
ln -sfn "$out" "$cache/enclave-blobs"
echo "$out"
