//! A running VM's control socket: pause, resume and describe, against the `persist` guest,
//! which checks its clock, TSC, memory and application processors at every tick.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn ticks(serial: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("tick "))
        .map(String::from)
        .collect()
}

fn wait_for_ticks(serial: &std::path::Path, count: usize) {
    let start = Instant::now();
    while ticks(serial).len() < count {
        assert!(start.elapsed() < TIMEOUT, "no tick {count} in time: {:?}", std::fs::read_to_string(serial));
        std::thread::sleep(Duration::from_millis(20));
    }
}

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
        .args(["--cmdline", "ticks=8 period_ms=100 pattern_kib=256 expect_cpus=2", "--serial"])
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
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(ticks(&serial).len(), at_pause, "the guest went on while paused");
    let described = stdout(&carve(&["vm", "describe", "--control", control]));
    let description: serde_json::Value = serde_json::from_str(&described).unwrap();
    assert_eq!(description["state"], "paused", "{described}");
    assert!(description["paused_ms"].as_u64().unwrap() >= 900, "{described}");
    assert_eq!(description["vcpus"], 2, "{described}");
    assert!(description["exits"]["pio"].as_u64().unwrap() > 0, "{described}");
    // Pausing twice is harmless, as in Firecracker.
    assert!(carve(&["vm", "pause", "--control", control]).status.success());

    let out = carve(&["vm", "resume", "--control", control]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = vm.wait();
    assert_guest_passed(&out);
    let all = ticks(&serial);
    assert_eq!(all.len(), 8, "{all:?}");
    // The KVM clock runs on while a VM is paused (as the host's monotonic clock does): one
    // tick after the pause shows the time the guest did not run (the pause may fall inside the
    // printing of a tick, whose line then completes after the resume).
    let long: Vec<usize> = (0..all.len()).filter(|&i| gap_ms(&all[i]) >= 900).collect();
    assert_eq!(long.len(), 1, "{all:?}");
    assert!(long[0] >= at_pause, "{all:?}");
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
