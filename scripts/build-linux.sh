#!/usr/bin/env bash
# Builds the small x86-64 Linux kernel carve's smoke test boots, from Debian's linux-source
# package and guests/linux/carve.config, into a cache outside the repository. Prints the path of
# the resulting vmlinux (a PVH ELF). Cached by kernel version and config hash.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
fragment="$repo/guests/linux/carve.config"
cache=${CARVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/carve}
package=${CARVE_LINUX_SOURCE:-linux-source-6.1}

need=()
dpkg -s "$package" >/dev/null 2>&1 || need+=("$package")
for tool in make gcc flex bison bc; do command -v "$tool" >/dev/null || need+=("$tool"); done
dpkg -s libelf-dev >/dev/null 2>&1 || need+=(libelf-dev)
if ((${#need[@]})); then
    echo "build-linux: installing ${need[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" build-essential >&2
fi

tarball=$(ls /usr/src/"$package".tar.* | head -n1)
version=$(dpkg-query -W -f='${Version}' "$package")
key=$(cat "$fragment" | sha256sum | cut -c1-12)
out="$cache/linux-$version-$key"
if [[ -f "$out/vmlinux" ]]; then
    echo "$out/vmlinux"
    exit 0
fi

work=$(mktemp -d "$cache.build.XXXXXX" 2>/dev/null || { mkdir -p "$cache"; mktemp -d "$cache/build.XXXXXX"; })
trap 'rm -rf "$work"' EXIT
echo "build-linux: building $package $version (a few minutes on 2 cores)" >&2
tar -xf "$tarball" -C "$work"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)
make -C "$src" -s tinyconfig >&2
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$fragment" >/dev/null
make -C "$src" -s olddefconfig >&2
make -C "$src" -s -j"$(nproc)" vmlinux >&2
mkdir -p "$out"
cp "$src/vmlinux" "$src/.config" "$out/"
echo "$out/vmlinux"
