//! A running VM's control socket: pause, resume and describe, against the `persist` guest,
//! which checks its clock, TSC, memory and application processors at every tick.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn gap_ms(tick: &str) -> u64 {
    let gap = tick.split_whitespace().find_map(|w| w.strip_prefix("gap_ms=")).expect("a gap");
    gap.parse().unwrap()
}

#[test]
fn a_paused_vm_stops_at_once_and_resumes_where_it_stopped() {
    if !kvm_usable("a_paused_vm_stops_at_once_and_resumes_where_it_stopped") {
        return;
    }
    let dir = fresh_dir("vm-control");
    let (serial, control) = (dir.join("serial"), dir.join("control"));
    let child = Command::new(env!("CARGO_BIN_EXE_carve"))
        .args(["vm", "run", "--vcpus", "2", "--kernel"])
        .arg(guest("persist", Format::Multiboot))
        .args(["--cmdline", "ticks=30 period_ms=100 pattern_kib=128 expect_cpus=2", "--serial"])
        .arg(format!("file:{}", serial.display()))
        .arg("--control")
        .arg(&control)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let vm = Vm(Some(child));
    wait_for_ticks(&serial, 2);

    let control = control.to_str().unwrap();
    let out = carve(&["vm", "pause", "--control", control]);
    assert!(out.status.success(), "{}", stderr(&out));
    let at_pause = ticks(&serial).len();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(ticks(&serial).len(), at_pause, "the guest went on while paused");
    let described = stdout(&carve(&["vm", "describe", "--control", control]));
    let description: serde_json::Value = serde_json::from_str(&described).unwrap();
    assert_eq!(description["state"], "paused", "{described}");
    assert!(description["paused_ms"].as_u64().unwrap() >= 1400, "{described}");
    assert_eq!(description["vcpus"], 2, "{described}");
    assert!(description["exits"]["pio"].as_u64().unwrap() > 0, "{described}");
    // Pausing twice is harmless, as in Firecracker.
    assert!(carve(&["vm", "pause", "--control", control]).status.success());

    // This first pause is hidden from the guest: its clocks go on from their values at the pause.
    let out = carve(&["vm", "resume", "--control", control, "--time", "frozen"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for_ticks(&serial, at_pause + 3);

    // The second is not (the default): the KVM clock runs on while a VM is paused, as the host's
    // monotonic clock does.
    assert!(carve(&["vm", "pause", "--control", control]).status.success());
    let at_second_pause = ticks(&serial).len();
    std::thread::sleep(Duration::from_millis(1500));
    let out = carve(&["vm", "resume", "--control", control]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = vm.wait();
    assert_guest_passed(&out);
    let all = ticks(&serial);
    assert_eq!(all.len(), 30, "{all:?}");
    // One tick after the second pause shows the time the guest did not run (a pause may fall
    // inside the printing of a tick, whose line then completes after the resume); none after the
    // first.
    let long: Vec<usize> = (0..all.len()).filter(|&i| gap_ms(&all[i]) >= 1400).collect();
    assert_eq!(long.len(), 1, "{all:?}");
    assert!(long[0] >= at_second_pause, "the hidden pause showed: {all:?}");
}

#[test]
fn control_requests_without_a_vm_fail_with_one_line() {
    let dir = fresh_dir("vm-control-none");
    let missing = dir.join("nothing-here");
    let out = carve(&["vm", "pause", "--control", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach a VM's control socket at"), "{err}");
}

/// `carve vm run` of the persist guest on `vcpus` vCPUs, with its serial in `dir/serial` and
/// its control socket at `dir/control`.
fn start_persist(dir: &std::path::Path, vcpus: u32, cmdline: &str) -> Vm {
    let child = Command::new(env!("CARGO_BIN_EXE_carve"))
        .args(["vm", "run", "--vcpus", &vcpus.to_string(), "--kernel"])
        .arg(guest("persist", Format::Multiboot))
        .args(["--cmdline", &format!("{cmdline} expect_cpus={vcpus}"), "--serial"])
        .arg(format!("file:{}", dir.join("serial").display()))
        .arg("--control")
        .arg(dir.join("control"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Vm(Some(child))
}

#[test]
fn a_restored_vm_continues_from_its_snapshot_on_every_vcpu() {
    if !kvm_usable("a_restored_vm_continues_from_its_snapshot_on_every_vcpu") {
        return;
    }
    let dir = fresh_dir("vm-snapshot");
    let vm = start_persist(&dir, 2, "ticks=30 period_ms=100 pattern_kib=512");
    wait_for_ticks(&dir.join("serial"), 3);
    let snapshot = dir.join("snapshot");
    let out = carve(&["vm", "snapshot", "--control", path(&dir.join("control")), "--to", path(&snapshot)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let saved_ticks = ticks(&dir.join("serial")).len();
    // The VM runs on after its snapshot, and ends as it would have.
    assert_guest_passed(&vm.wait());

    // Time on disk is invisible with --time frozen (the default) and visible with elapsed.
    std::thread::sleep(Duration::from_millis(1500));
    for (policy, on_disk_visible) in [("frozen", false), ("elapsed", true)] {
        let serial = dir.join(format!("restored-{policy}"));
        let out = carve_within(
            TIMEOUT,
            &[
                "vm",
                "restore",
                "--from",
                path(&snapshot),
                "--time",
                policy,
                "--serial",
                &format!("file:{}", path(&serial)),
            ],
        );
        assert_guest_passed(&out);
        let text = std::fs::read_to_string(&serial).unwrap();
        assert!(text.contains("persist: 30 ticks, all checks passed"), "{text}");
        let restored = ticks(&serial);
        let first: u64 = restored[0].split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(
            first as usize >= saved_ticks,
            "{policy}: restored from tick {first}, saved after {saved_ticks}"
        );
        assert!(!text.contains("persist: started"), "{policy}: the guest booted again:\n{text}");
        let longest = restored.iter().map(|t| gap_ms(t)).max().unwrap();
        assert_eq!(longest >= 1500, on_disk_visible, "{policy}: {restored:?}");
    }
}

#[test]
fn snapshots_that_cannot_be_restored_are_one_line_and_status_4() {
    if !kvm_usable("snapshots_that_cannot_be_restored_are_one_line_and_status_4") {
        return;
    }
    let dir = fresh_dir("vm-snapshot-bad");
    let vm = start_persist(&dir, 1, "ticks=40 period_ms=100 pattern_kib=64");
    wait_for_ticks(&dir.join("serial"), 1);
    let good = dir.join("good");
    let control = dir.join("control");
    let out = carve(&["vm", "snapshot", "--control", path(&control), "--to", path(&good)]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A snapshot never overwrites one.
    let out = carve(&["vm", "snapshot", "--control", path(&control), "--to", path(&good)]);
    assert_eq!(out.status.code(), Some(4));
    assert!(stderr(&out).contains("is not empty; carve does not overwrite snapshots"), "{}", stderr(&out));
    drop(vm);

    let state = std::fs::read(good.join("state")).unwrap();
    let variant = |name: &str, edit: &dyn Fn(&mut Vec<u8>)| {
        let copy = dir.join(name);
        std::fs::create_dir_all(&copy).unwrap();
        let mut bytes = state.clone();
        edit(&mut bytes);
        std::fs::write(copy.join("state"), bytes).unwrap();
        std::fs::copy(good.join("memory"), copy.join("memory")).unwrap();
        copy
    };
    let cases: Vec<(std::path::PathBuf, &str)> = vec![
        (variant("corrupted", &|b| *b.last_mut().unwrap() ^= 1), "is corrupted: its checksum does not match"),
        (variant("truncated", &|b| b.truncate(b.len() / 2)), "is truncated"),
        (variant("foreign", &|b| b[16] = 9), "snapshot format version 9"),
        (variant("alien", &|b| b[0] = b'X'), "is not a carve snapshot"),
        (dir.join("missing"), "missing/state"),
    ];
    let short_memory = variant("short-memory", &|_| {});
    std::fs::File::options().write(true).open(short_memory.join("memory")).unwrap().set_len(4096).unwrap();
    for (snapshot, expected) in
        cases.iter().map(|(p, e)| (p.as_path(), *e)).chain([(short_memory.as_path(), "holds 4096 bytes")])
    {
        let out = carve(&["vm", "restore", "--from", path(snapshot), "--serial", "none"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(4), "{}: {err}", snapshot.display());
        assert_eq!(err.lines().count(), 1, "{}: {err}", snapshot.display());
        assert!(err.contains(expected), "{}: expected '{expected}' in {err}", snapshot.display());
    }
}
