//! CPU templates and normalisation as KVM receives them (KVM_GET_CPUID2 reads back what each
//! vCPU was given). In-guest checks live in the `cpuid` test guest.

use carve_vmm::cpuid::CpuTemplate;
use carve_vmm::{KernelSpec, SerialSink, Vm, VmConfig};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;

fn kvm_usable() -> bool {
    let usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !usable {
        eprintln!("SKIPPED: /dev/kvm is not usable here");
    }
    usable
}

fn boot_cpuid(template: &str, vcpus: u32) -> kvm_bindings::CpuId {
    let mut config =
        VmConfig::new(KernelSpec::Embedded { name: "demo", image: carve_guest_images::DEMO_ELF });
    config.cpu_template = CpuTemplate::named(template).unwrap();
    config.vcpus = vcpus;
    config.serial = SerialSink::None;
    let vm = Vm::build(config, Vec::new()).unwrap();
    vm.boot_vcpu().get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap()
}

fn leaf(cpuid: &kvm_bindings::CpuId, function: u32, index: u32) -> Option<kvm_bindings::kvm_cpuid_entry2> {
    cpuid.as_slice().iter().find(|e| e.function == function && e.index == index).copied()
}

#[test]
fn baseline_reaches_kvm_without_xsave_popcnt_smep_smap() {
    if !kvm_usable() {
        return;
    }
    let cpuid = boot_cpuid("baseline", 2);
    let leaf1 = leaf(&cpuid, 1, 0).unwrap();
    assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");
    assert_eq!((leaf1.ebx >> 16) & 0xff, 2, "logical processor count");
    assert_eq!(leaf1.ebx >> 24, 0, "APIC ID of vCPU 0");
    if overrides_feature_bits(&leaf1) {
        eprintln!(
            "NOTE: this host's KVM replaces guest CPUID feature leaves (1, 7, 0xd) with the \
             host's own; template masking is checked by the unit tests only here"
        );
        return;
    }
    assert_eq!(leaf1.ecx & (1 << 26 | 1 << 27 | 1 << 23 | 1 << 28), 0, "xsave, osxsave, popcnt, avx");
    let leaf7 = leaf(&cpuid, 7, 0).unwrap();
    assert_eq!(leaf7.ebx & (1 << 7 | 1 << 20), 0, "smep, smap");
    assert!(cpuid.as_slice().iter().all(|e| e.function != 0xd), "xsave leaf removed");
}

#[test]
fn host_template_keeps_what_kvm_supports() {
    if !kvm_usable() {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let cpuid = boot_cpuid("host", 1);
    let supported_leaf1 = leaf(&supported, 1, 0).unwrap();
    let leaf1 = leaf(&cpuid, 1, 0).unwrap();
    if overrides_feature_bits(&leaf1) {
        eprintln!("NOTE: this host's KVM replaces guest CPUID feature leaves with the host's own");
        return;
    }
    assert_eq!(leaf1.ecx & !(1 << 31 | 1 << 27), supported_leaf1.ecx & !(1 << 31 | 1 << 27));
    assert_eq!(
        cpuid.as_slice().iter().any(|e| e.function == 0xd),
        supported.as_slice().iter().any(|e| e.function == 0xd)
    );
    if let Some(topology) = leaf(&cpuid, 0xb, 1) {
        assert_eq!((topology.ebx, topology.ecx >> 8 & 0xff), (1, 2), "one core at the core level");
    }
}

/// Some nested hosts (ours) hand every guest the host's own feature leaves, whatever
/// KVM_SET_CPUID2 said: KVM then reads back features it did not even offer as supported.
fn overrides_feature_bits(guest_leaf1: &kvm_bindings::kvm_cpuid_entry2) -> bool {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let offered = leaf(&supported, 1, 0).unwrap().ecx;
    let features = !(1u32 << 31 | 1 << 27); // hypervisor and OSXSAVE are set by carve and KVM
    guest_leaf1.ecx & features & !offered != 0
}
