//! Nested virtualisation (AMD SVM) inside a carve VM, through a snapshot and a restore: the
//! `nested` guest runs a tiny L2 guest of its own over and over, ticking on the KVM clock. Where
//! KVM offers no SVM to its guests (our nested build hosts) the guest says so and the test checks
//! only that; on the real KVM host (CARVE_REAL_KVM=1) SVM is required, a snapshot taken mid-run
//! must carry KVM's nested state, and the restored guest must go on running L2.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use carve_vmm::snapshot::VmSnapshot;
use common::*;

/// The guest's exit code when CPUID offers no SVM (guests/src/bin/nested.rs: `NO_SVM`), as the
/// process status debug-exit gives it.
const NO_SVM_STATUS: i32 = 0x3c << 1 | 1;
/// struct kvm_nested_state: flags (u16), format (u16), size (u32), then the header union.
const KVM_STATE_NESTED_FORMAT_SVM: u16 = 1;
const KVM_STATE_NESTED_GUEST_MODE: u16 = 1 << 0;
const KVM_STATE_NESTED_RUN_PENDING: u16 = 1 << 1;
const KVM_STATE_NESTED_GIF_SET: u16 = 1 << 8;
const TICKS: usize = 40;
/// Snapshots taken before one catches the vCPU in L2 (on the emulated KVM host about three in
/// four do; the others catch it in L1, between runs of L2).
const SNAPSHOT_ATTEMPTS: usize = 3;

fn tick_number(tick: &str) -> usize {
    tick.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a tick number")
}

fn l2_runs(tick: &str) -> u64 {
    let runs = tick.split_whitespace().find_map(|w| w.strip_prefix("l2_runs=")).expect("l2_runs");
    runs.parse().unwrap()
}

/// (flags, format) of a saved nested state.
fn nested_header(bytes: &[u8]) -> (u16, u16) {
    (u16::from_le_bytes([bytes[0], bytes[1]]), u16::from_le_bytes([bytes[2], bytes[3]]))
}

#[test]
fn a_nested_guest_runs_l2_and_goes_on_after_a_restore() {
    let name = "a_nested_guest_runs_l2_and_goes_on_after_a_restore";
    if !kvm_usable(name) {
        return;
    }
    let dir = fresh_dir("nested");
    let (serial, control) = (dir.join("serial"), dir.join("control"));
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_carve"))
        // 32 MiB: the snapshot's memory is written in about 2.5 s on the emulated KVM host (128 MiB:
        // 10 s).
        .args(["vm", "run", "--nested", "--memory", "32", "--kernel"])
        .arg(guest("nested", Format::Multiboot))
        .args(["--cmdline", &format!("ticks={TICKS} period_ms=100 l2_spin=200000"), "--serial"])
        .arg(format!("file:{}", serial.display()))
        .arg("--control")
        .arg(&control)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vm = Vm(Some(child));

    // Three ticks, or carve's refusal where KVM offers its guests no SVM.
    while ticks(&serial).len() < 3 {
        if vm.0.as_mut().unwrap().try_wait().unwrap().is_some() {
            let out = vm.wait();
            let text = std::fs::read_to_string(&serial).unwrap_or_default();
            let err = stderr(&out);
            assert!(
                out.status.code() == Some(4)
                    && err.lines().count() == 1
                    && err.contains("this host cannot give the guest nested virtualisation: ")
                    && err.contains("CPUID 0x8000_0001 ECX bit 2"),
                "the nested guest ended before its third tick ({:?}):\n--- serial ---\n{text}\n--- stderr ---\n{err}",
                out.status
            );
            assert!(
                !real_kvm_required(),
                "{name}: the real KVM host offers its guests no SVM (kvm_amd nested=1?): {err}"
            );
            eprintln!("{name}: this host's KVM offers its guests no SVM; carve refused --nested: {err}");
            return;
        }
        assert!(started.elapsed() < TIMEOUT, "no tick 3 in time: {:?}", std::fs::read_to_string(&serial));
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{name}: tick 3 after {:?}", started.elapsed());

    // Snapshots, a tick apart, until one catches the vCPU in L2 (most do: L2 holds it most of
    // the time). The guest keeps L1's GIF clear, so one taken in L1 carries nested state too.
    let mut snapshots: Vec<Snapshot> = Vec::new();
    for attempt in 1..=SNAPSHOT_ATTEMPTS {
        let snapshot = match take_snapshot(name, &dir, attempt) {
            Ok(snapshot) => snapshot,
            // A later snapshot may come too late on a slow host: the guest passed meanwhile.
            Err(_) if attempt > 1 && ended_within(&mut vm, Duration::from_secs(5)) => {
                eprintln!("{name}: the VM ended before snapshot {attempt}");
                break;
            }
            Err(error) => {
                let out = vm.wait_after_kill();
                panic!(
                    "snapshot {attempt} failed: {error}\n--- serial ---\n{}\n--- carve vm run's stderr ({:?}) ---\n{}",
                    std::fs::read_to_string(&serial).unwrap_or_default(),
                    out.status,
                    stderr(&out)
                );
            }
        };
        let in_l2 = snapshot.in_l2;
        let no_nested_state = snapshot.nested_bytes == 0;
        snapshots.push(snapshot);
        if in_l2 || no_nested_state {
            break;
        }
        if !wait_for_tick(&mut vm, &serial, ticks(&serial).len() + 1) {
            break;
        }
    }

    // The VM runs on after its snapshots, and ends as it would have.
    let out = vm.wait();
    let text = std::fs::read_to_string(&serial).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}\n--- stderr ---\n{}", stderr(&out));
    assert!(text.contains(&format!("nested: {TICKS} ticks")) && !text.contains("FAIL"), "{text}");
    eprintln!("{name}: the original guest passed after {:?}", started.elapsed());

    if snapshots.iter().any(|s| s.nested_bytes == 0) {
        eprintln!("{name}: without nested state a restore would lose L2; not tried");
        return;
    }
    // Restored: the snapshot taken in L2, and the first one taken in L1.
    let in_l2 = snapshots.iter().find(|s| s.in_l2);
    let in_l1 = snapshots.iter().find(|s| !s.in_l2);
    if in_l2.is_none() {
        eprintln!("{name}: no snapshot of {SNAPSHOT_ATTEMPTS} caught the vCPU in L2");
    }
    for snapshot in in_l2.into_iter().chain(in_l1) {
        restore_and_check(name, snapshot);
    }
}

/// A snapshot taken while the serial showed `before` ticks and, when it was done, `after`.
struct Snapshot {
    dir: PathBuf,
    before: usize,
    after: usize,
    nested_bytes: usize,
    in_l2: bool,
}

/// SVM is the guest's only when asked for: without `--nested` the same guest finds none, on a
/// host whose KVM offers it (the real KVM host, which applies the CPUID carve sets) as on one
/// that does not.
#[test]
fn without_nested_the_guest_sees_no_svm() {
    let name = "without_nested_the_guest_sees_no_svm";
    if !kvm_usable(name) {
        return;
    }
    let dir = fresh_dir("no-nested");
    let serial = dir.join("serial");
    let out = Command::new(env!("CARGO_BIN_EXE_carve"))
        .args(["vm", "run", "--memory", "32", "--kernel"])
        .arg(guest("nested", Format::Multiboot))
        .args(["--cmdline", "ticks=3 period_ms=10 l2_spin=1000", "--serial"])
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(out.status.code(), Some(NO_SVM_STATUS), "{text}\n--- stderr ---\n{}", stderr(&out));
    assert!(text.contains("nested: no SVM"), "{text}");
}

fn ended_within(vm: &mut Vm, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if vm.0.as_mut().unwrap().try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Waits for tick `count`; false if the VM ended first.
fn wait_for_tick(vm: &mut Vm, serial: &Path, count: usize) -> bool {
    let start = Instant::now();
    while ticks(serial).len() < count {
        if vm.0.as_mut().unwrap().try_wait().unwrap().is_some() {
            return false;
        }
        assert!(start.elapsed() < TIMEOUT, "no tick {count} in time: {:?}", std::fs::read_to_string(serial));
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// `carve vm snapshot` to `dir/snapshot-ATTEMPT`, its nested state checked; its error otherwise.
fn take_snapshot(name: &str, dir: &Path, attempt: usize) -> Result<Snapshot, String> {
    let (serial, control) = (dir.join("serial"), dir.join("control"));
    let snapshot = dir.join(format!("snapshot-{attempt}"));
    let before = ticks(&serial).len();
    let taken = Instant::now();
    let out = carve(&["vm", "snapshot", "--control", path(&control), "--to", path(&snapshot)]);
    if !out.status.success() {
        return Err(stderr(&out));
    }
    let after = ticks(&serial).len();
    let saved = VmSnapshot::read(&snapshot).expect("the snapshot's state reads back");
    let Some(bytes) = saved.kvm.vcpus[0].nested.as_deref() else {
        assert!(
            !real_kvm_required(),
            "{name}: the snapshot of a guest running L2 holds no nested state on the real KVM host"
        );
        eprintln!("{name}: this host's KVM saved no nested state (no KVM_CAP_NESTED_STATE?)");
        return Ok(Snapshot { dir: snapshot, before, after, nested_bytes: 0, in_l2: false });
    };
    let (flags, format) = nested_header(bytes);
    assert_eq!(format, KVM_STATE_NESTED_FORMAT_SVM, "nested state of format {format}");
    let in_l2 = flags & KVM_STATE_NESTED_GUEST_MODE != 0;
    // The guest keeps L1's GIF clear; only L2 runs with it set.
    assert_eq!(
        flags & KVM_STATE_NESTED_GIF_SET != 0,
        in_l2,
        "nested state flags {flags:#x}: GIF set outside L2 or clear inside it"
    );
    eprintln!(
        "{name}: snapshot {attempt} (ticks {before} to {after}, {:?}) holds {} bytes of nested state, \
         flags {flags:#x}: the vCPU was in {}{}",
        taken.elapsed(),
        bytes.len(),
        if in_l2 { "L2" } else { "L1 with GIF clear" },
        if flags & KVM_STATE_NESTED_RUN_PENDING != 0 { ", its VMRUN pending" } else { "" }
    );
    Ok(Snapshot { dir: snapshot, before, after, nested_bytes: bytes.len(), in_l2 })
}

/// Restores `snapshot` and checks the guest went on from there, running L2, to its end.
fn restore_and_check(name: &str, snapshot: &Snapshot) {
    let serial = snapshot.dir.with_extension("restored");
    let restoring = Instant::now();
    let out = carve_within(
        TIMEOUT,
        &["vm", "restore", "--from", path(&snapshot.dir), "--serial", &format!("file:{}", path(&serial))],
    );
    let restored = std::fs::read_to_string(&serial).unwrap_or_default();
    let label = format!("{} ({})", snapshot.dir.display(), if snapshot.in_l2 { "in L2" } else { "in L1" });
    assert_eq!(
        out.status.code(),
        Some(1),
        "{label}: the restored guest failed:\n--- serial ---\n{restored}\n--- stderr ---\n{}",
        stderr(&out)
    );
    eprintln!("{name}: restored {label}, passed after {:?}", restoring.elapsed());
    assert!(!restored.contains("FAIL"), "{label}: {restored}");
    assert!(!restored.contains("nested: started"), "{label}: the guest booted again:\n{restored}");
    assert!(restored.contains(&format!("nested: {TICKS} ticks")), "{label}: {restored}");
    let restored_ticks = ticks(&serial);
    let first = tick_number(&restored_ticks[0]);
    assert!(
        (snapshot.before..=snapshot.after + 1).contains(&first),
        "{label}: restored from tick {first}, the snapshot was taken between ticks {} and {}:\n{restored}",
        snapshot.before,
        snapshot.after
    );
    assert_eq!(tick_number(restored_ticks.last().unwrap()), TICKS, "{label}: {restored}");
    // L2 went on running after the restore (the guest requires a run of L2 between ticks).
    let runs: Vec<u64> = restored_ticks.iter().map(|t| l2_runs(t)).collect();
    assert!(runs.windows(2).all(|w| w[0] < w[1]), "{label}: {restored}");
}
