//! `carve host` and the CPU features it reports: each works where this host's KVM offers it and
//! is refused before the VM starts, in one line with status 4, where it does not.

mod common;

use common::*;

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
}

#[test]
fn an_unknown_feature_is_one_line() {
    let out = carve(&["vm", "run", "--demo", "--cpu-features", "cet,avx9"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(stderr(&out), "carve: error: unknown CPU feature 'avx9' (available: cet, nested)\n");
}
