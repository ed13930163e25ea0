//! CPU features beyond the template and `carve host`, which reports them: each (CET, nesting,
//! SGX's `--sgx-epc SIZE[,prefault]`) works where this host's KVM offers it and is refused before
//! the VM starts, in one line with status 4, where it does not; EPC sizes are checked as read.

mod common;

use common::*;

/// Whether this host has the virtual EPC device a guest's SGX needs.
fn host_has_vepc() -> bool {
    std::path::Path::new("/dev/sgx_vepc").exists()
}

/// `carve vm run --demo ARGS` on a host without SGX: status 4 and one line naming what is missing.
fn assert_sgx_refused(args: &[&str]) {
    let out = carve(&[&["vm", "run", "--demo", "--serial", "none"], args].concat());
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(err.starts_with("carve: error: this host cannot give the guest SGX: "), "{args:?}: {err}");
    // The missing piece by name: KVM's CPUID bit, or the device node.
    assert!(
        err.contains("CPUID 7.0 EBX bit 2")
            || err.contains("CPUID 7.0 ECX bit 30")
            || err.contains("/dev/sgx_vepc"),
        "{args:?}: {err}"
    );
    assert!(stdout(&out).is_empty(), "the guest ran: {}", stdout(&out));
}

#[test]
fn sgx_epc_on_a_host_without_sgx_is_refused_naming_the_missing_capability() {
    let name = "sgx_epc_on_a_host_without_sgx_is_refused_naming_the_missing_capability";
    if !kvm_usable(name) {
        return;
    }
    if host_has_vepc() {
        // An SGX host: the same guest boots and runs to its end with its EPC.
        let out = carve(&["vm", "run", "--demo", "--serial", "none", "--sgx-epc", "64M"]);
        let err = stderr(&out);
        assert!(
            out.status.code() == Some(0) || err.contains("this host cannot give the guest SGX: "),
            "{err}"
        );
        eprintln!("{name}: this host has /dev/sgx_vepc; the demo ran with --sgx-epc 64M ({:?})", out.status);
        return;
    }
    assert_sgx_refused(&["--sgx-epc", "64M"]);
}

#[test]
fn every_accepted_section_form_reaches_the_host_check() {
    if !kvm_usable("every_accepted_section_form_reaches_the_host_check") {
        return;
    }
    for args in
        [&["--sgx-epc", "32MiB,prefault", "--sgx-epc", "4096", "--sgx-epc", "1G"][..], &["--sgx-epc", "8k"]]
    {
        if host_has_vepc() {
            let out = carve(&[&["vm", "run", "--demo", "--serial", "none"], args].concat());
            assert_ne!(out.status.code(), Some(2), "{args:?} read as a usage error: {}", stderr(&out));
        } else {
            assert_sgx_refused(args);
        }
    }
}

#[test]
fn bad_epc_sizes_are_one_clear_usage_error() {
    for (value, expected) in [
        ("0", "an EPC section cannot be empty"),
        ("1000", "the EPC section size 1000 (1000 bytes) is not a whole number of 4 KiB pages"),
        ("64M,bogus", "unknown EPC section option 'bogus'"),
        ("lots", "'lots' is not a size"),
        ("", "'' is not a size"),
    ] {
        let out = carve(&["vm", "run", "--demo", "--sgx-epc", value]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{value:?}: {err}");
        // clap's line, then only its pointer to --help.
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 2, "{value:?}: {err}");
        assert!(lines[0].starts_with(&format!("error: invalid value '{value}' for '--sgx-epc")), "{err}");
        assert!(lines[0].contains(expected), "{value:?}: expected '{expected}' in: {err}");
        assert_eq!(lines[1], "For more information, try '--help'.", "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

fn host_report() -> serde_json::Value {
    let out = carve(&["host", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("carve host --json prints one JSON object")
}

#[test]
fn carve_host_reports_every_feature_with_a_reason() {
    if !kvm_usable("carve_host_reports_every_feature_with_a_reason") {
        return;
    }
    let report = host_report();
    assert!(["intel", "amd", "other"].contains(&report["vendor"].as_str().unwrap()), "{report}");
    let text = stdout(&carve(&["host"]));
    for feature in ["cet", "sgx", "sgx_provision_key", "nested", "nested_state"] {
        let offer = &report[feature];
        assert!(offer["available"].is_boolean(), "{feature}: {report}");
        let detail = offer["detail"].as_str().unwrap();
        assert!(!detail.is_empty(), "{feature}: {report}");
        let row = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&feature.replace('_', "-")))
            .unwrap_or_else(|| panic!("no row for {feature}:\n{text}"));
        let verdict = if offer["available"].as_bool().unwrap() { "yes" } else { "no" };
        assert_eq!(row.split_whitespace().nth(1), Some(verdict), "{row}");
        assert!(row.ends_with(detail), "{row}");
    }
}

/// `carve vm run --demo` with `flags`: it runs where the host offers `feature`, and is refused
/// with the host's reason where it does not.
fn runs_or_is_refused(feature: &str, name: &str, flags: &[&str]) {
    let offer = &host_report()[feature];
    let mut args = vec!["vm", "run", "--demo", "--serial", "none"];
    args.extend_from_slice(flags);
    let out = carve(&args);
    if offer["available"].as_bool().unwrap() {
        assert_eq!(out.status.code(), Some(0), "{flags:?} on a host that offers it: {}", stderr(&out));
    } else {
        let expected = format!(
            "carve: error: this host cannot give the guest {name}: {}\n",
            offer["detail"].as_str().unwrap()
        );
        assert_eq!((out.status.code(), stderr(&out)), (Some(4), expected), "{flags:?}");
    }
}

#[test]
fn cet_runs_where_the_host_offers_it_and_is_refused_elsewhere() {
    if kvm_usable("cet_runs_where_the_host_offers_it_and_is_refused_elsewhere") {
        runs_or_is_refused("cet", "CET", &["--cpu-features", "cet"]);
    }
}

#[test]
fn nesting_runs_where_the_host_offers_it_and_is_refused_elsewhere() {
    if !kvm_usable("nesting_runs_where_the_host_offers_it_and_is_refused_elsewhere") {
        return;
    }
    runs_or_is_refused("nested", "nested virtualisation", &["--nested"]);
    runs_or_is_refused("nested", "nested virtualisation", &["--cpu-features", "nested"]);
    if real_kvm_required() {
        assert_eq!(
            host_report()["nested"]["available"],
            true,
            "the real KVM host runs kvm_amd with nested=1"
        );
    }
    if host_report()["nested"]["available"] == true {
        // A template that takes the asked-for feature away again is named, not obeyed silently.
        let out =
            carve(&["vm", "run", "--demo", "--serial", "none", "--nested", "--cpu-template", "baseline"]);
        assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
        assert_eq!(
            stderr(&out),
            "carve: error: CPU template 'baseline' removes nested virtualisation, which the VM asks for: use \
             another template\n"
        );
    }
}

#[test]
fn an_unknown_feature_is_one_line() {
    let out = carve(&["vm", "run", "--demo", "--cpu-features", "cet,avx9"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert_eq!(stderr(&out), "carve: error: unknown CPU feature 'avx9' (available: cet, nested)\n");
}
