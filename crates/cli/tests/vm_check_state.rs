//! `carve vm check-state`, `--dump-state` and `--load-state` through the binary.

mod common;

use std::path::PathBuf;

use common::*;

/// vCPU 0's initial state for `guest` in `format`, as `--dump-state` writes it.
fn dumped_state(name: &str, format: Format) -> (PathBuf, String) {
    let file = temp_path(&format!("{name}-{format:?}.state.json"));
    let out = run_demo(format, "--dump-state", &file);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = std::fs::read_to_string(&file).unwrap();
    (file, text)
}

/// Runs the demo guest in `format` with one state-file flag.
fn run_demo(format: Format, flag: &str, file: &std::path::Path) -> std::process::Output {
    let kernel = guest("demo", format);
    carve(&[
        "vm",
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--serial",
        "none",
        flag,
        file.to_str().unwrap(),
    ])
}

fn check_state(file: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["vm", "check-state", "--state", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    carve(&args)
}

#[test]
fn dumped_states_check_clean_in_the_modes_they_can_enter() {
    if !kvm_usable("dumped_states_check_clean_in_the_modes_they_can_enter") {
        return;
    }
    let (long, text) = dumped_state("clean", Format::BzImage);
    for key in ["\"cs\"", "\"ldt\"", "\"gdt\"", "\"idt\"", "\"efer\"", "\"rflags\"", "\"unusable\""] {
        assert!(text.contains(key), "{key} missing from {text}");
    }
    for mode in ["true", "false"] {
        let out = check_state(&long, &["--unrestricted-guest", mode]);
        assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), ""), "{}", stderr(&out));
    }
    let (flat, _) = dumped_state("clean", Format::Pvh);
    assert_eq!(check_state(&flat, &["--unrestricted-guest", "true"]).status.code(), Some(0));
    let out = check_state(&flat, &["--unrestricted-guest", "false"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out).lines().count(), 1, "{}", stdout(&out));
    assert!(stdout(&out).starts_with("cr0.pe_pg = 0x1: without unrestricted guest, CR0.PE and CR0.PG"));
}

#[test]
fn each_broken_rule_gets_a_line_and_status_1() {
    if !kvm_usable("each_broken_rule_gets_a_line_and_status_1") {
        return;
    }
    let (file, text) = dumped_state("broken", Format::BzImage);
    let broken =
        text.replacen("\"selector\": 32", "\"selector\": 36", 1).replacen("\"db\": 0", "\"db\": 1", 1);
    std::fs::write(&file, broken).unwrap();
    let out = check_state(&file, &["--unrestricted-guest", "true"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("tr.selector = 0x24: the TI flag (bit 2) must be 0 [S1"), "{lines:?}");
    assert!(
        lines[1].starts_with("cs.db = 0x1: in IA-32e mode with CS.L = 1, CS.D/B must be 0 [A11"),
        "{lines:?}"
    );
}

#[test]
fn loaded_states_are_checked_before_the_vm_starts() {
    if !kvm_usable("loaded_states_are_checked_before_the_vm_starts") {
        return;
    }
    let (file, text) = dumped_state("load", Format::BzImage);
    let run = |state: &std::path::Path| run_demo(Format::BzImage, "--load-state", state);
    let out = run(&file);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    std::fs::write(&file, text.replacen("\"selector\": 32", "\"selector\": 36", 1)).unwrap();
    let out = run(&file);
    let err = stderr(&out);
    if cfg!(debug_assertions) {
        assert_eq!(out.status.code(), Some(4), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("carve: error: vCPU 0's state breaks 1 VM-entry rule(s): tr.selector = 0x24"),
            "{err}"
        );
    } else {
        assert!(err.starts_with("carve: warning: vCPU 0 state breaks a VM-entry rule: tr.selector"), "{err}");
    }
}

/// A valid long-mode state written by hand (no KVM needed).
fn hand_made_state() -> String {
    let segment = |selector: u16, type_: u8, s: u8, l: u8, g: u8, limit: u32| {
        format!(
            r#"{{"base": 0, "limit": {limit}, "selector": {selector}, "type": {type_}, "present": 1, "dpl": 0,
            "db": 0, "s": {s}, "l": {l}, "g": {g}, "avl": 0, "unusable": 0}}"#
        )
    };
    let data = segment(0x18, 3, 1, 0, 1, u32::MAX);
    format!(
        r#"{{"cs": {}, "ds": {data}, "es": {data}, "fs": {data}, "gs": {data}, "ss": {data}, "tr": {},
        "ldt": {{"base": 0, "limit": 0, "selector": 0, "type": 0, "present": 0, "dpl": 0, "db": 0, "s": 0,
                "l": 0, "g": 0, "avl": 0, "unusable": 1}},
        "gdt": {{"base": 1280, "limit": 39}}, "idt": {{"base": "0x520", "limit": 7}},
        "cr0": "0x80000011", "cr3": 36864, "cr4": 32, "efer": 1280, "rflags": 2}}"#,
        segment(0x10, 11, 1, 1, 1, u32::MAX),
        segment(0x20, 11, 0, 0, 0, 0x67)
    )
}

#[test]
fn bad_state_files_name_the_field() {
    let valid = hand_made_state();
    let good = temp_path("good-state.json");
    std::fs::write(&good, &valid).unwrap();
    let out = check_state(&good, &["--unrestricted-guest", "false"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));

    let cases = [
        ("{ nope".to_string(), "not a JSON state: key must be a string at line 1 column 3"),
        ("42".to_string(), "not a JSON state: expected a JSON object"),
        (valid.replace("\"rflags\": 2", "\"rflag\": 2"), "field rflag: unknown field `rflag`"),
        (valid.replace(", \"cr3\": 36864", ""), "not a JSON state: missing field `cr3`"),
        (valid.replacen("\"dpl\": 0", "\"dpl\": 9", 1), "field cs.dpl: 9 is out of range (0-3)"),
        (valid.replacen("\"limit\": 4294967295,", "", 1), "field cs: missing field `limit`"),
        (
            valid.replacen("\"type\": 11", "\"type\": \"eleven\"", 1),
            "field cs.type: \"eleven\" is not a number",
        ),
        (
            valid.replacen("\"selector\": 16", "\"selector\": 70000", 1),
            "field cs.selector: 0x11170 is larger than 0xffff",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let file = temp_path(&format!("bad-state-{i}.json"));
        std::fs::write(&file, text).unwrap();
        let out = check_state(&file, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(4), "{text}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(expected), "expected '{expected}' in: {err}");
        assert!(err.contains(file.to_str().unwrap()), "{err}");
    }
    let out = carve(&["vm", "check-state", "--state", "/nonexistent/state.json"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(stderr(&out).contains("cannot read state file /nonexistent/state.json: No such file"));
    let out = carve(&["vm", "check-state", "--state", "x.json", "--unrestricted-guest", "maybe"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// CET state in a state file loads only into a VM with CET: without it, one line says so (on a
/// host without CET that is every VM, since `--cpu-features cet` is refused there).
#[test]
fn cet_state_needs_a_vm_with_cet() {
    if !kvm_usable("cet_state_needs_a_vm_with_cet") {
        return;
    }
    let (file, text) = dumped_state("cet", Format::BzImage);
    assert!(!text.contains("\"cet\""), "a VM without CET dumps no CET state: {text}");
    let with_cet = text.trim_end().trim_end_matches('}').trim_end().to_string()
        + r#", "cet": {"s_cet": 0, "ssp": 0, "interrupt_ssp_table": 0}}"#;
    std::fs::write(&file, with_cet).unwrap();
    let out = run_demo(Format::BzImage, "--load-state", &file);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "carve: error: the state file holds CET state, but the VM has no CET (add --cpu-features cet)\n"
    );
}
