#!/usr/bin/env bash
# Runs a command on a real KVM host made in software, and returns its output and exit status.
#
#   scripts/kvm-host.sh [--timeout SECONDS] [--stall SECONDS] [--memory MIB] [--cpus N] [--] CMD [ARG…]
#
# QEMU's software CPU (TCG) emulates an AMD CPU with SVM and nested paging; Debian's stock
# kernel boots on it and loads kvm_amd (nested=1). This machine's root file system is shared
# read-only over 9p under a tmpfs overlay, so CMD runs as root in the same file tree (same
# paths, same binaries), with this shell's environment and working directory, on a /dev/kvm
# that is real KVM: Linux user space, nested state and vCPU TSC attributes work there. TCG has
# no CET, SGX or TSC scaling. See docs/kvm-host.md.
#
# CMD's standard output and error arrive on this script's standard output as it runs. Writes
# outside /tmp and /run are lost when the host powers off, except under $KVM_HOST_RESULTS (a
# directory shared read-write with this machine, given to CMD).
#
# The kernel (Debian's linux-image-*-amd64, unpacked, not installed) and the initramfs are
# cached in ~/.cache/carve. Exit status: CMD's own; 124 when it did not finish within the time
# limit, or showed no sign of life for the --stall time (the emulated host can freeze whole,
# where no timer inside it fires; the host is killed and its last console lines are shown); 125 when
# the host could not be set up or ended without running CMD to completion.
set -euo pipefail

timeout=${CARVE_KVM_HOST_TIMEOUT:-900}
stall=0
memory=${CARVE_KVM_HOST_MEMORY:-4096}
cpus=${CARVE_KVM_HOST_CPUS:-2}
while (($#)); do
    case $1 in
        --timeout) timeout=$2; shift 2 ;;
        --stall) stall=$2; shift 2 ;;
        --memory) memory=$2; shift 2 ;;
        --cpus) cpus=$2; shift 2 ;;
        --) shift; break ;;
        -*) echo "kvm-host: unknown option $1 (usage: kvm-host.sh [--timeout S] [--stall S] [--memory MIB] [--cpus N] CMD…)" >&2; exit 125 ;;
        *) break ;;
    esac
done
if (($# == 0)); then
    echo "kvm-host: no command given (usage: kvm-host.sh [--timeout S] [--stall S] [--memory MIB] [--cpus N] CMD…)" >&2
    exit 125
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${CARVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/carve}

# What the host is made of: QEMU, a static busybox, cpio, and Debian's kernel package.
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
[[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1 || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
if ((${#missing[@]})); then
    if [[ ${CI:-} == true && $(id -u) == 0 ]]; then
        echo "kvm-host: installing ${missing[*]}" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "kvm-host: missing Debian packages ${missing[*]} (apt-get install ${missing[*]})" >&2
        exit 125
    fi
fi
kernel_package() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }'; }
package=${CARVE_KVM_HOST_KERNEL:-$(kernel_package)}
if [[ -z $package && ${CI:-} == true && $(id -u) == 0 ]]; then
    apt-get update -qq >&2
    package=$(kernel_package)
fi
if [[ -z $package ]]; then
    echo "kvm-host: cannot name Debian's kernel package (run apt-get update, or set CARVE_KVM_HOST_KERNEL=linux-image-6.1.0-N-amd64)" >&2
    exit 125
fi

# Kernel modules for the initramfs, in dependency order: virtio transport, 9p, overlayfs, KVM.
modules="drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev
    drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci net/9p/9pnet net/9p/9pnet_virtio
    fs/netfs/netfs fs/fscache/fscache fs/9p/9p fs/overlayfs/overlay virt/lib/irqbypass
    drivers/crypto/ccp/ccp arch/x86/kvm/kvm arch/x86/kvm/kvm-amd drivers/net/veth net/sched/sch_tbf"

# Kernel and initramfs, cached by kernel package, init and module list.
key=$( (cat "$repo/scripts/kvm-host.init"; echo $modules) | sha256sum | cut -c1-12)
host="$cache/kvm-host-${package#linux-image-}-$key"
if [[ ! -f $host/initrd.img ]]; then
    mkdir -p "$cache"
    build=$(mktemp -d "$cache/kvm-host.build.XXXXXX")
    trap 'rm -rf "$build"' EXIT
    echo "kvm-host: preparing $package (once; cached in $host)" >&2
    (cd "$build" && apt-get download "$package" >/dev/null 2>"$build/apt.err") || {
        echo "kvm-host: could not download $package: $(tail -n1 "$build/apt.err")" >&2
        exit 125
    }
    dpkg-deb -x "$build"/*.deb "$build/kernel"
    release=$(basename "$build"/kernel/lib/modules/*)
    mkdir -p "$build/root"/{bin,dev,proc,sys,modules,host,results,overlay,newroot}
    cp /bin/busybox "$build/root/bin/busybox"
    for module in $modules; do
        cp "$build/kernel/lib/modules/$release/kernel/$module.ko" "$build/root/modules/"
    done
    cp "$repo/scripts/kvm-host.init" "$build/root/init"
    chmod +x "$build/root/init"
    (cd "$build/root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) >"$build/initrd.img"
    mkdir -p "$host"
    cp "$build/kernel/boot/vmlinuz-$release" "$host/vmlinuz"
    mv "$build/initrd.img" "$host/initrd.img"
    rm -rf "$build"
    # Hosts made for an older kernel package or init are not used again.
    # (An hour old at least: another checkout may be about to boot one.)
    find "$cache" -maxdepth 1 -name 'kvm-host-*' ! -name "${host##*/}" -mmin +60 -exec rm -rf {} +
    trap - EXIT
fi

# The command, its environment and working directory, for the host's init.
results=$(mktemp -d "${TMPDIR:-/tmp}/kvm-host.XXXXXX")
trap '[[ -n ${CARVE_KVM_HOST_KEEP:-} ]] || rm -rf "$results"' EXIT
{
    echo '#!/bin/bash'
    for name in $(compgen -e); do
        case $name in
            BASH* | SHLVL | PWD | OLDPWD | _ | SSH_* | DISPLAY | XDG_RUNTIME_DIR | DBUS_* | TMPDIR) continue ;;
        esac
        printf 'export %s=%q\n' "$name" "${!name}"
    done
    printf 'export KVM_HOST_RESULTS=%q\n' "$results"
    # The same open-file limits as here (the host's init would leave 1024/4096).
    printf 'ulimit -Hn %s && ulimit -Sn %s\n' "$(ulimit -Hn)" "$(ulimit -Sn)"
    printf 'cd %q || exit 125\n' "$PWD"
    # A living host says so every 10 s, through QEMU's 9p server, whatever CMD prints: --stall
    # tells a frozen host from a command that is quiet for a while.
    ((stall == 0)) || printf '(while :; do touch "$KVM_HOST_RESULTS/alive"; sleep 10; done) </dev/null >/dev/null 2>&1 &\n'
    printf 'exec'
    printf ' %q' "$@"
    echo
} >"$results/command.sh"

# Passes CMD's output on line by line; with --stall, kills the host when it has not touched
# $results/alive for that long (the file is made now, so booting counts against it too).
relay() {
    local line status
    touch "$results/alive"
    while :; do
        if ((stall == 0)); then
            IFS= read -r line
        else
            IFS= read -r -t 10 line
        fi
        status=$?
        if ((status == 0)); then
            printf '%s\n' "$line"
        elif ((status > 128)); then
            # (a line cut by the wait is passed on as it is; its rest follows)
            printf '%s' "$line"
            (($(date +%s) - $(stat -c %Y "$results/alive") > stall)) || continue
            echo
            touch "$results/stalled"
            local qemu_pid
            qemu_pid=$(cat "$results/qemu.pid")
            kill "$qemu_pid" 2>/dev/null
            # A QEMU too wedged to handle SIGTERM is killed outright.
            { sleep 10 && kill -KILL "$qemu_pid" 2>/dev/null; } &
            cat >/dev/null
            return
        else
            [[ -z $line ]] || printf '%s' "$line"
            return
        fi
    done
}

started=$SECONDS
set +e
timeout --kill-after=10 "$timeout" qemu-system-x86_64 -accel tcg -cpu max -smp "$cpus" -m "$memory" \
    -nodefaults -display none -no-reboot -pidfile "$results/qemu.pid" \
    -kernel "$host/vmlinuz" -initrd "$host/initrd.img" \
    -append "console=ttyS0 panic=-1 kvm_host_results=$results" \
    -chardev file,id=console,path="$results/console.log" -serial chardev:console \
    -chardev stdio,id=output,signal=off -serial chardev:output \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs local,path="$results",mount_tag=results,security_model=none,multidevs=remap \
    </dev/null | relay
qemu=${PIPESTATUS[0]}
set -e

last_lines() {
    echo "kvm-host: the host's last console lines:" >&2
    tail -n "${1:-25}" "$results/console.log" | sed 's/^/  | /' >&2
}
if [[ -f $results/status ]]; then
    exit "$(cat "$results/status")"
elif [[ -f $results/stalled ]]; then
    echo "kvm-host: the host showed no sign of life for ${stall} s (after $((SECONDS - started)) s, running '$*'); it was killed" >&2
    last_lines
    exit 124
elif ((qemu == 124 || qemu == 137)); then
    echo "kvm-host: '$*' did not finish within ${timeout} s; the host was killed" >&2
    last_lines
    exit 124
else
    echo "kvm-host: the host ended after $((SECONDS - started)) s without finishing '$*' (QEMU status $qemu)" >&2
    last_lines
    exit 125
fi
