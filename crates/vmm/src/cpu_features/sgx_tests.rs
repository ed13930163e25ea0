//! SGX judged against the recorded Intel host (tests/fixtures/cpuid/intel-sapphire-rapids.json),
//! and its refusal on this host for real.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES};

use super::*;
use crate::cpu_features::tests::{probe, table, INTEL};
use crate::cpu_features::{check, parse_cpuid_table, shape as shape_all, CpuFeatures, HostFeatures};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn section(size: u64) -> EpcSection {
    EpcSection { size, prefault: false }
}

fn leaf(cpuid: &CpuId, function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
    cpuid.as_slice().iter().find(|e| e.function == function && e.index == index).copied()
}

fn registers(e: &kvm_cpuid_entry2) -> [u32; 4] {
    [e.eax, e.ebx, e.ecx, e.edx]
}

/// Two sections above 4 GiB, the second larger than 4 GiB so its size's high half shows.
fn two_sections() -> Vec<PlacedSection> {
    place(&[section(64 * MIB), section(4 * GIB + 2 * MIB)], 0x2_4000_0000).unwrap()
}

fn shaped(fixture: &str, sgx: &SgxGuest) -> CpuId {
    let mut cpuid = table(fixture);
    shape_all(&mut cpuid, &CpuFeatures::default(), sgx).unwrap();
    cpuid
}

#[test]
fn sizes_are_bytes_or_binary_units_with_an_optional_prefault() {
    for (text, size, prefault) in [
        ("64M", 64 * MIB, false),
        ("32MiB", 32 * MIB, false),
        ("1G", GIB, false),
        ("2gib,prefault", 2 * GIB, true),
        ("4096", 4096, false),
        ("8K", 8192, false),
        (" 16M , prefault ", 16 * MIB, true),
    ] {
        assert_eq!(parse_section(text), Ok(EpcSection { size, prefault }), "{text}");
        assert_eq!(text.parse::<EpcSection>(), Ok(EpcSection { size, prefault }), "{text}");
    }
}

#[test]
fn empty_unaligned_or_unreadable_sizes_are_refused_in_one_line() {
    for (text, expected) in [
        ("0", "an EPC section cannot be empty"),
        ("0M", "an EPC section cannot be empty"),
        ("1000", "the EPC section size 1000 (1000 bytes) is not a whole number of 4 KiB pages"),
        ("4097", "is not a whole number of 4 KiB pages"),
        ("64M,bogus", "unknown EPC section option 'bogus' (expected SIZE or SIZE,prefault)"),
        ("64M,prefault,", "unknown EPC section option ''"),
        ("", "'' is not a size"),
        ("lots", "'lots' is not a size: give bytes or K, M, G (64M, 32MiB, 1G, 4096)"),
        ("64X", "'64X' is not a size"),
        ("-4096", "'-4096' is not a size"),
        ("4096T", "beyond what CPUID leaf 0x12 describes"),
        ("99999999999999999999", "'99999999999999999999' is not a size"),
        ("99999999999G", "beyond what CPUID leaf 0x12 describes"),
    ] {
        let error = parse_section(text).unwrap_err();
        assert!(error.contains(expected), "{text:?}: {error}");
        assert_eq!(error.lines().count(), 1, "{error}");
    }
}

#[test]
fn sections_below_the_mmio_gap_go_to_4_gib() {
    let sections = [section(64 * MIB), section(32 * MIB)];
    // 128 MiB of RAM, and RAM that fills everything below the gap: never in the gap.
    for ram_end in [128 * MIB, crate::layout::MMIO_GAP_START] {
        assert_eq!(
            place(&sections, ram_end).unwrap(),
            [
                PlacedSection { base: 4 * GIB, size: 64 * MIB },
                PlacedSection { base: 4 * GIB + 64 * MIB, size: 32 * MIB }
            ]
        );
    }
}

#[test]
fn sections_above_4_gib_follow_ram_on_a_page_boundary_back_to_back() {
    let ram_end = crate::memory::ram_regions(5 * GIB).last().unwrap().end();
    assert_eq!(ram_end, 6 * GIB);
    let placed = place(&[section(4096), section(8 * MIB), section(64 * MIB)], ram_end).unwrap();
    assert_eq!(
        placed,
        [
            PlacedSection { base: 6 * GIB, size: 4096 },
            PlacedSection { base: 6 * GIB + 4096, size: 8 * MIB },
            PlacedSection { base: 6 * GIB + 4096 + 8 * MIB, size: 64 * MIB }
        ]
    );
    assert_eq!(region(&placed), Some(RamRange { base: 6 * GIB, size: 4096 + 72 * MIB }));
    assert_eq!(place(&[section(4096)], 6 * GIB + 0x800).unwrap()[0].base, 6 * GIB + 0x1000);
    assert_eq!(region(&[]), None);
    assert_eq!(SgxGuest::default().region(), None);
}

#[test]
fn more_sections_than_a_guest_reads_or_beyond_52_bits_are_refused() {
    let nine = vec![section(4096); MAX_SECTIONS + 1];
    assert_eq!(
        place(&nine, 0).unwrap_err().to_string(),
        "at most 8 EPC sections can be given (what a Linux guest reads); 9 were asked for"
    );
    assert!(place(&nine[..MAX_SECTIONS], 0).is_ok());
    let big = section(ADDRESS_LIMIT - 4096);
    assert!(matches!(place(&[big], 0), Err(EpcError::TooLarge { .. })));
    assert!(place(&[section(ADDRESS_LIMIT - 8 * GIB)], 4 * GIB).is_ok());
}

#[test]
fn each_section_is_a_sub_leaf_from_2_then_an_all_zero_one_ends_the_list() {
    let sections = two_sections();
    assert_eq!(sections[0].base, 0x2_4000_0000);
    assert_eq!(sections[1].base, 0x2_4400_0000);
    let cpuid = shaped(INTEL, &SgxGuest { sections, provision_key: false });
    let sub = |index| leaf(&cpuid, LEAF_SGX, index).unwrap_or_else(|| panic!("0x12.{index}"));
    // EAX: base bits 31:12 | type 1; EBX: base bits 51:32; ECX: size bits 31:12 | property 1
    // (confidentiality and integrity); EDX: size bits 51:32.
    assert_eq!(registers(&sub(2)), [0x4000_0001, 0x2, 0x0400_0001, 0x0]);
    assert_eq!(registers(&sub(3)), [0x4400_0001, 0x2, 0x0020_0001, 0x1]);
    assert_eq!(registers(&sub(4)), [0; 4], "the terminator");
    assert!(leaf(&cpuid, LEAF_SGX, 5).is_none());
    let sgx_leaves: Vec<_> = cpuid.as_slice().iter().filter(|e| e.function == LEAF_SGX).collect();
    assert_eq!(sgx_leaves.len(), 5);
    assert!(sgx_leaves.iter().all(|e| e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0));
    // Leaf 7 keeps SGX and SGX_LC as KVM offers them.
    let l7 = leaf(&cpuid, 7, 0).unwrap();
    assert_ne!(l7.ebx & (1 << 2), 0, "SGX");
    assert_ne!(l7.ecx & (1 << 30), 0, "SGX_LC");
}

#[test]
fn sub_leaves_0_and_1_are_kvms_without_provisionkey_unless_granted() {
    let kvm = table(INTEL);
    let (kvm0, kvm1) = (leaf(&kvm, LEAF_SGX, 0).unwrap(), leaf(&kvm, LEAF_SGX, 1).unwrap());
    assert_ne!(kvm1.eax & (1 << 4), 0, "the fixture offers PROVISIONKEY");

    let denied = shaped(INTEL, &SgxGuest { sections: two_sections(), provision_key: false });
    assert_eq!(registers(&leaf(&denied, LEAF_SGX, 0).unwrap()), registers(&kvm0));
    assert_eq!(registers(&leaf(&denied, LEAF_SGX, 1).unwrap()), [0x4a6, 0, 0x602e7, 0]);

    let granted = shaped(INTEL, &SgxGuest { sections: two_sections(), provision_key: true });
    assert_eq!(registers(&leaf(&granted, LEAF_SGX, 0).unwrap()), registers(&kvm0));
    assert_eq!(registers(&leaf(&granted, LEAF_SGX, 1).unwrap()), registers(&kvm1));
}

#[test]
fn sub_leaves_0_and_1_are_never_widened() {
    // A KVM that offers no PROVISIONKEY and fewer SGX leaves: a grant adds nothing.
    let mut supported = parse_cpuid_table(INTEL).unwrap();
    for e in supported.iter_mut().filter(|e| e.function == LEAF_SGX) {
        match e.index {
            0 => e.eax = 0x1,
            _ => e.eax &= !(1 << 4),
        }
    }
    let kvm = CpuId::from_entries(&supported).unwrap();
    let mut cpuid = kvm.clone();
    shape_all(
        &mut cpuid,
        &CpuFeatures::default(),
        &SgxGuest { sections: two_sections(), provision_key: true },
    )
    .unwrap();
    for index in [0, 1] {
        let (before, after) = (leaf(&kvm, LEAF_SGX, index).unwrap(), leaf(&cpuid, LEAF_SGX, index).unwrap());
        for (b, a) in registers(&before).iter().zip(registers(&after)) {
            assert_eq!(a & !b, 0, "0x12.{index}: {a:#x} has bits KVM's {b:#x} lacks");
        }
    }
    assert_eq!(leaf(&cpuid, LEAF_SGX, 1).unwrap().eax & (1 << 4), 0);

    // And what KVM does not list is not made up.
    supported.retain(|e| !(e.function == LEAF_SGX && e.index <= 1));
    let mut cpuid = CpuId::from_entries(&supported).unwrap();
    shape_all(
        &mut cpuid,
        &CpuFeatures::default(),
        &SgxGuest { sections: two_sections(), provision_key: true },
    )
    .unwrap();
    assert!(leaf(&cpuid, LEAF_SGX, 0).is_none() && leaf(&cpuid, LEAF_SGX, 1).is_none());
}

#[test]
fn section_sub_leaves_kvm_lists_are_replaced() {
    let mut supported = parse_cpuid_table(INTEL).unwrap();
    for index in 2..12 {
        supported.push(kvm_cpuid_entry2 {
            function: LEAF_SGX,
            index,
            eax: 0xdead_0001,
            ..Default::default()
        });
    }
    let mut cpuid = CpuId::from_entries(&supported).unwrap();
    let one = place(&[section(64 * MIB)], 0).unwrap();
    shape_all(&mut cpuid, &CpuFeatures::default(), &SgxGuest { sections: one, provision_key: false })
        .unwrap();
    assert_eq!(registers(&leaf(&cpuid, LEAF_SGX, 2).unwrap()), [0x1, 0x1, 0x0400_0001, 0]);
    assert_eq!(registers(&leaf(&cpuid, LEAF_SGX, 3).unwrap()), [0; 4]);
    assert!((4..12).all(|index| leaf(&cpuid, LEAF_SGX, index).is_none()));
}

#[test]
fn without_sections_sgx_is_hidden_even_on_an_sgx_host() {
    let cpuid = shaped(INTEL, &SgxGuest { sections: Vec::new(), provision_key: true });
    let l7 = leaf(&cpuid, 7, 0).unwrap();
    assert_eq!((l7.ebx & (1 << 2), l7.ecx & (1 << 30)), (0, 0));
    assert!(cpuid.as_slice().iter().all(|e| e.function != LEAF_SGX));
}

#[test]
fn a_cpuid_table_without_room_for_the_sections_is_an_error_and_left_as_it_was() {
    let mut supported = parse_cpuid_table(INTEL).unwrap();
    let mut filler = 0x4000_0100;
    while supported.len() < KVM_MAX_CPUID_ENTRIES {
        supported.push(kvm_cpuid_entry2 { function: filler, ..Default::default() });
        filler += 1;
    }
    let mut cpuid = CpuId::from_entries(&supported).unwrap();
    let error = shape(&mut cpuid, &SgxGuest { sections: two_sections(), provision_key: false })
        .unwrap_err()
        .to_string();
    assert_eq!(
        error,
        format!(
            "the vCPU's CPUID has no room for 3 more leaf 0x12 sub-leaves (KVM takes at most \
             {KVM_MAX_CPUID_ENTRIES} entries)"
        )
    );
    assert_eq!(cpuid.as_slice(), supported.as_slice());
}

#[test]
fn remove_all_is_io_a4_04() {
    assert_eq!(SGX_IOC_VEPC_REMOVE_ALL, 0xa404);
}

#[test]
fn the_recorded_sgx_host_offers_what_a_guest_needs() {
    let host = HostFeatures::from_probe(&probe(INTEL, true));
    let request = CpuFeatures { sgx_epc: vec![section(64 * MIB)], ..Default::default() };
    assert_eq!(check(&request, &host), Ok(()));
    assert!(host.sgx_provision_key.available);
    let without = HostFeatures::from_probe(&probe(INTEL, false));
    assert_eq!(
        check(&request, &without).unwrap_err().to_string(),
        "this host cannot give the guest SGX: cannot open /dev/sgx_vepc: No such file"
    );
}

/// On this host, for real: without /dev/sgx_vepc no section is mapped and the error names the
/// node; without /dev/sgx_provision no PROVISIONKEY is granted. On an SGX host, a page of EPC
/// maps, registers after RAM and is removed again.
#[test]
fn this_hosts_vepc_and_provisioning_are_used_or_refused_by_name() {
    let kvm = kvm_ioctls::Kvm::new().expect("these tests need /dev/kvm");
    let vm = kvm.create_vm().expect("create a VM");
    let mem = crate::memory::create(8, crate::memory::MemoryBacking::Anonymous).unwrap();
    crate::memory::register(&vm, &mem).unwrap();
    let slot = crate::memory::first_free_slot(&mem);
    let sections = [EpcSection { size: 4096, prefault: true }];
    if !std::path::Path::new(PROVISION_PATH).exists() {
        assert!(!grant_provision_key(&vm));
    }
    let ram_end = crate::memory::ram_end(&mem);
    match open_vepc() {
        Err(_) => {
            let error = Epc::new(&vm, &sections, ram_end, slot, true).err().expect("no vEPC here");
            assert!(matches!(error, EpcError::Open { index: 0, .. }), "{error}");
            assert!(
                error.to_string().starts_with("cannot open /dev/sgx_vepc for EPC section 0: "),
                "{error}"
            );
        }
        Ok(_) => {
            let epc = Epc::new(&vm, &sections, ram_end, slot, false).unwrap();
            assert_eq!(epc.guest().sections, [PlacedSection { base: 4 * GIB, size: 4096 }]);
            assert!(!epc.guest().provision_key, "not asked for");
            assert_eq!(epc.remove_all().unwrap(), 0);
        }
    }
}
