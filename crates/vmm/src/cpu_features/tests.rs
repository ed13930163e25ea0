//! The feature seam judged against recorded hosts (tests/fixtures/cpuid/).

use kvm_bindings::CpuId;

use super::*;

pub(crate) const INTEL: &str = include_str!("../../tests/fixtures/cpuid/intel-sapphire-rapids.json");
pub(crate) const AMD: &str = include_str!("../../tests/fixtures/cpuid/amd-zen5.json");

/// A recorded host, with its device nodes and capabilities as given.
pub(crate) fn probe(fixture: &str, sgx_devices: bool) -> HostProbe {
    let devices =
        |path: &str| if sgx_devices { Ok(()) } else { Err(format!("cannot open {path}: No such file")) };
    HostProbe {
        supported: parse_cpuid_table(fixture).unwrap(),
        nested_state_size: 0x4080,
        sgx_attribute_cap: sgx_devices,
        sgx_vepc: devices(sgx::VEPC_PATH),
        sgx_provision: devices(sgx::PROVISION_PATH),
    }
}

pub(crate) fn table(fixture: &str) -> CpuId {
    CpuId::from_entries(&parse_cpuid_table(fixture).unwrap()).unwrap()
}

fn leaf(cpuid: &CpuId, function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
    cpuid.as_slice().iter().find(|e| e.function == function && e.index == index).copied()
}

#[test]
fn an_intel_cet_sgx_host_offers_everything() {
    let host = HostFeatures::from_probe(&probe(INTEL, true));
    assert_eq!(host.vendor, Vendor::Intel);
    assert_eq!(host.cet, Offer::yes("SHSTK and IBT"));
    assert!(host.sgx.available, "{:?}", host.sgx);
    assert!(host.sgx_provision_key.available, "{:?}", host.sgx_provision_key);
    assert_eq!(host.nested, Offer::yes("VMX (CPUID 0x1 ECX bit 5)"));
    let all = CpuFeatures {
        cet: true,
        nested: true,
        sgx_epc: vec![sgx::EpcSection { size: 1 << 20, prefault: false }],
    };
    assert_eq!(check(&all, &host), Ok(()));
}

#[test]
fn an_amd_host_offers_shadow_stacks_and_svm_but_no_sgx() {
    let host = HostFeatures::from_probe(&probe(AMD, false));
    assert_eq!(host.vendor, Vendor::Amd);
    assert_eq!(host.cet, Offer::yes("SHSTK (KVM offers no IBT here, as on AMD)"));
    assert_eq!(host.nested, Offer::yes("SVM (CPUID 0x8000_0001 ECX bit 2), 8 ASIDs"));
    let sgx = CpuFeatures {
        sgx_epc: vec![sgx::EpcSection { size: 1 << 20, prefault: false }],
        ..Default::default()
    };
    let refused = check(&sgx, &host).unwrap_err();
    assert_eq!(
        refused.to_string(),
        "this host cannot give the guest SGX: KVM_GET_SUPPORTED_CPUID offers no SGX (CPUID 7.0 EBX bit 2)"
    );
}

#[test]
fn sgx_without_its_device_node_is_refused_naming_the_node() {
    let host = HostFeatures::from_probe(&probe(INTEL, false));
    assert_eq!(host.sgx.detail, "cannot open /dev/sgx_vepc: No such file");
    assert!(!host.sgx_provision_key.available);
}

#[test]
fn a_host_without_cet_or_nesting_refuses_them_naming_the_cpuid_bits() {
    let mut supported = parse_cpuid_table(AMD).unwrap();
    for e in &mut supported {
        match e.function {
            0x7 => e.ecx &= !(1 << 7),
            0x8000_0001 => e.ecx &= !(1 << 2),
            _ => {}
        }
    }
    let host = HostFeatures::from_probe(&HostProbe { supported, ..probe(AMD, false) });
    let cet = check(&CpuFeatures { cet: true, ..Default::default() }, &host).unwrap_err();
    assert!(cet.to_string().starts_with("this host cannot give the guest CET: KVM_GET_SUPPORTED_CPUID offers neither SHSTK (CPUID 7.0 ECX bit 7) nor IBT (CPUID 7.0 EDX bit 20)"), "{cet}");
    let nested = check(&CpuFeatures { nested: true, ..Default::default() }, &host).unwrap_err();
    assert!(nested.to_string().contains("no SVM (CPUID 0x8000_0001 ECX bit 2)"), "{nested}");
    assert_eq!(check(&CpuFeatures::default(), &host), Ok(()));
}

#[test]
fn by_default_the_guest_sees_no_cet_sgx_or_nesting() {
    for fixture in [INTEL, AMD] {
        let mut cpuid = table(fixture);
        shape(&mut cpuid, &CpuFeatures::default(), &sgx::SgxGuest::default()).unwrap();
        let l7 = leaf(&cpuid, 7, 0).unwrap();
        assert_eq!(l7.ecx & (1 << 7 | 1 << 30), 0, "SHSTK, SGX_LC hidden");
        assert_eq!(l7.edx & (1 << 20), 0, "IBT hidden");
        assert_eq!(l7.ebx & (1 << 2), 0, "SGX hidden");
        assert_eq!(leaf(&cpuid, 0xd, 1).unwrap().ecx & 0x1800, 0, "no CET XSS components");
        assert!(leaf(&cpuid, 0xd, 11).is_none() && leaf(&cpuid, 0xd, 12).is_none());
        assert!(cpuid.as_slice().iter().all(|e| e.function != 0x12 && e.function != 0x8000_000a));
        assert_eq!(leaf(&cpuid, 1, 0).unwrap().ecx & (1 << 5), 0, "VMX hidden");
        assert_eq!(leaf(&cpuid, 0x8000_0001, 0).unwrap().ecx & (1 << 2), 0, "SVM hidden");
        // What is not a feature of these stays.
        assert_ne!(leaf(&cpuid, 1, 0).unwrap().ecx & (1 << 26), 0, "XSAVE stays");
        assert_ne!(leaf(&cpuid, 0xd, 1).unwrap().eax & 0x8, 0, "XSAVES stays");
    }
}

#[test]
fn asked_for_the_guest_sees_what_the_host_offers() {
    let mut intel = table(INTEL);
    shape(
        &mut intel,
        &CpuFeatures { cet: true, nested: true, ..Default::default() },
        &sgx::SgxGuest::default(),
    )
    .unwrap();
    let l7 = leaf(&intel, 7, 0).unwrap();
    assert_ne!(l7.ecx & (1 << 7), 0, "SHSTK");
    assert_ne!(l7.edx & (1 << 20), 0, "IBT");
    assert_eq!(leaf(&intel, 0xd, 1).unwrap().ecx & 0x1800, 0x1800);
    assert_eq!(leaf(&intel, 0xd, 11).map(|e| (e.eax, e.ecx)), Some((16, 1)));
    assert_eq!(leaf(&intel, 0xd, 12).map(|e| (e.eax, e.ecx)), Some((24, 1)));
    assert_ne!(leaf(&intel, 1, 0).unwrap().ecx & (1 << 5), 0, "VMX");

    let mut amd = table(AMD);
    shape(
        &mut amd,
        &CpuFeatures { cet: true, nested: true, ..Default::default() },
        &sgx::SgxGuest::default(),
    )
    .unwrap();
    let l7 = leaf(&amd, 7, 0).unwrap();
    assert_ne!(l7.ecx & (1 << 7), 0, "SHSTK");
    assert_eq!(l7.edx & (1 << 20), 0, "no IBT where KVM offers none");
    assert_ne!(leaf(&amd, 0x8000_0001, 0).unwrap().ecx & (1 << 2), 0, "SVM");
    assert_eq!(leaf(&amd, 0x8000_000a, 0).map(|e| e.ebx), Some(8));
}

#[test]
fn cet_sub_leaves_are_completed_where_kvm_leaves_them_out() {
    let mut supported = parse_cpuid_table(INTEL).unwrap();
    supported.retain(|e| !(e.function == 0xd && e.index >= 11));
    let mut cpuid = CpuId::from_entries(&supported).unwrap();
    shape(&mut cpuid, &CpuFeatures { cet: true, ..Default::default() }, &sgx::SgxGuest::default()).unwrap();
    assert_eq!(leaf(&cpuid, 0xd, 11).map(|e| (e.eax, e.ecx, e.flags)), Some((16, 1, 1)));
    assert_eq!(leaf(&cpuid, 0xd, 12).map(|e| (e.eax, e.ecx, e.flags)), Some((24, 1, 1)));
}

#[test]
fn feature_names_are_checked() {
    let mut features = CpuFeatures::default();
    features.enable("cet").unwrap();
    features.enable("nested").unwrap();
    assert!(features.cet && features.nested);
    assert_eq!(features.enable("avx9").unwrap_err(), "unknown CPU feature 'avx9' (available: cet, nested)");
    assert!(features.enable("sgx").unwrap_err().contains("--sgx-epc"));
}

#[test]
fn fixtures_must_be_well_formed() {
    assert!(parse_cpuid_table(r#"{"host":"x","entries":[{"function":"7"}]}"#)
        .unwrap_err()
        .contains("must start with 0x"));
    assert!(parse_cpuid_table(r#"{"host":"x","entries":[{"function":"0x7","exx":"0x1"}]}"#).is_err());
}

#[test]
fn a_template_that_takes_a_requested_feature_away_is_named() {
    let request = CpuFeatures { cet: true, nested: true, ..Default::default() };
    for fixture in [INTEL, AMD] {
        let mut shaped = table(fixture);
        shape(&mut shaped, &request, &sgx::SgxGuest::default()).unwrap();
        let mut host = shaped.clone();
        crate::cpuid::CpuTemplate::named("host").unwrap().apply(&mut host);
        assert!(removed_by_template(&request, &shaped, &host).is_empty());
        let mut baseline = shaped.clone();
        crate::cpuid::CpuTemplate::named("baseline").unwrap().apply(&mut baseline);
        assert_eq!(removed_by_template(&request, &shaped, &baseline), ["CET", "nested virtualisation"]);
        assert!(removed_by_template(&CpuFeatures::default(), &shaped, &baseline).is_empty());
    }
}
