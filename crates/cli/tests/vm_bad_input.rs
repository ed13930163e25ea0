//! Bad input to `carve vm run`: one clear line naming the problem, the documented status, no
//! panic.

mod common;

use common::*;

fn assert_one_line_error(args: &[&str], status: i32, expected: &str) {
    let out = carve(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(status), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(err.contains(expected), "{args:?}: expected '{expected}' in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn unusable_kernels_and_initrds_are_named() {
    if !kvm_usable("unusable_kernels_and_initrds_are_named") {
        return;
    }
    let text = temp_path("not-a-kernel.txt");
    std::fs::write(&text, "hello, I am not a kernel\n".repeat(100)).unwrap();
    let huge = temp_path("huge-kernel");
    std::fs::write(&huge, bytes(9 << 20, 3)).unwrap();
    let demo = guest("demo", Format::Pvh);
    let demo = demo.to_str().unwrap();
    let big_initrd = temp_path("big-initrd");
    std::fs::write(&big_initrd, bytes(12 << 20, 5)).unwrap();

    assert_one_line_error(
        &["vm", "run", "--kernel", "/nonexistent/vmlinux"],
        4,
        "cannot read kernel /nonexistent/vmlinux: No such file",
    );
    assert_one_line_error(&["vm", "run", "--kernel", "/tmp"], 4, "cannot read kernel /tmp");
    assert_one_line_error(
        &["vm", "run", "--kernel", text.to_str().unwrap()],
        4,
        "unrecognised kernel format",
    );
    assert_one_line_error(
        &["vm", "run", "--kernel", huge.to_str().unwrap(), "--memory", "8"],
        4,
        "is larger than guest memory",
    );
    assert_one_line_error(
        &["vm", "run", "--kernel", demo, "--initrd", "/nonexistent/initrd"],
        4,
        "cannot read initrd /nonexistent/initrd",
    );
    assert_one_line_error(
        &["vm", "run", "--kernel", demo, "--memory", "8", "--initrd", big_initrd.to_str().unwrap()],
        4,
        "does not fit in guest memory above the kernel",
    );
}

#[test]
fn unusable_machine_shapes_are_named() {
    if !kvm_usable("unusable_machine_shapes_are_named") {
        return;
    }
    assert_one_line_error(&["vm", "run", "--demo", "--memory", "4"], 4, "guest memory of 4 MiB is too small");
    assert_one_line_error(
        &["vm", "run", "--demo", "--vcpus", "5000"],
        4,
        "5000 vCPUs requested, but this host's KVM allows at most",
    );
    assert_one_line_error(&["vm", "run", "--demo", "--vcpus", "0"], 4, "at least one vCPU");
    assert_one_line_error(
        &["vm", "run", "--demo", "--cpu-template", "c3"],
        4,
        "unknown CPU template 'c3' (available: host, baseline)",
    );
    assert_one_line_error(
        &["vm", "run", "--demo", "--serial", "file:/nonexistent/dir/log"],
        4,
        "cannot open the serial output",
    );
    assert_one_line_error(&["vm", "run", "--demo", "--memory", "99999999999"], 4, "cannot map");
}

#[test]
fn command_line_misuse_is_a_usage_error() {
    for args in [
        &["vm", "run"][..],
        &["vm", "run", "--demo", "--kernel", "x"],
        &["vm", "run", "--demo", "--serial", "tcp:1"],
        &["vm", "run", "--demo", "--memory", "lots"],
    ] {
        let out = carve(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn kvm_without_permission_is_named() {
    if !kvm_usable("kvm_without_permission_is_named") {
        return;
    }
    // Only meaningful as root with /dev/kvm closed to others (as on our hosts).
    let meta = std::fs::metadata("/dev/kvm").unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || meta.permissions().mode() & 0o006 != 0 || meta.uid() != 0 {
        eprintln!("SKIPPED kvm_without_permission_is_named: needs root and a /dev/kvm closed to others");
        return;
    }
    let binary = temp_path("carve-unprivileged");
    std::fs::copy(env!("CARGO_BIN_EXE_carve"), &binary).unwrap();
    std::fs::set_permissions(binary.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&binary)
        .args(["vm", "run", "--demo"])
        .output()
        .expect("setpriv runs");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("cannot open /dev/kvm: Permission denied"), "{err}");
    assert!(err.contains("kvm' group"), "{err}");
}

#[test]
fn missing_kvm_is_named() {
    // A private mount namespace whose /dev is empty: a host without KVM, as root sees it.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED missing_kvm_is_named: needs root for a private mount namespace");
        return;
    }
    let script = format!("mount -t tmpfs none /dev && exec {} vm run --demo", env!("CARGO_BIN_EXE_carve"));
    let out = std::process::Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .output()
        .expect("unshare runs");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot open /dev/kvm: No such file or directory"), "{err}");
    assert!(err.contains("kvm module loaded"), "{err}");
}
