//! Shared by carve's integration tests: running the binary and finding guests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

#[allow(unused_imports)]
pub use carve_guest_images::{path as guest, Format};

/// Whether /dev/kvm can be used here. Tests that need it print a clear SKIPPED line otherwise.
pub fn kvm_usable(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED {test}: /dev/kvm is not usable here ({e})");
            false
        }
    }
}

pub fn carve(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_carve")).args(args).output().expect("carve runs")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the guest test passed (debug-exit 0, process status 1) and shows its output if not.
pub fn assert_guest_passed(out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "guest test failed:\n--- serial ---\n{}\n--- stderr ---\n{}",
        stdout(out),
        stderr(out)
    );
    assert!(!stdout(out).contains("FAIL"), "{}", stdout(out));
}

pub fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("carve-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// FNV-1a, as the guest runtime computes it.
pub fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

/// Deterministic pseudo-random bytes.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
