//! Before anything is restored: does this host's KVM offer everything the snapshot's guest uses?

use std::collections::BTreeSet;

use crate::cpuid::template::Register as TemplateRegister;
use crate::cpuid::CpuTemplate;

use super::error::{Incompatible, Missing};
use super::{CpuidEntry, HostCaps, VcpuState};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Register {
    fn get(self, entry: &CpuidEntry) -> u32 {
        match self {
            Register::Eax => entry.eax,
            Register::Ebx => entry.ebx,
            Register::Ecx => entry.ecx,
            Register::Edx => entry.edx,
        }
    }

    fn get_mut(self, entry: &mut CpuidEntry) -> &mut u32 {
        match self {
            Register::Eax => &mut entry.eax,
            Register::Ebx => &mut entry.ebx,
            Register::Ecx => &mut entry.ecx,
            Register::Edx => &mut entry.edx,
        }
    }

    fn of_template(register: TemplateRegister) -> Register {
        match register {
            TemplateRegister::Eax => Register::Eax,
            TemplateRegister::Ebx => Register::Ebx,
            TemplateRegister::Ecx => Register::Ecx,
            TemplateRegister::Edx => Register::Edx,
        }
    }
}

/// The feature registers compared: (leaf, subleaf for leaves indexed by ECX, registers).
const CHECKED: &[(u32, Option<u32>, &[Register])] = &[
    (0x1, None, &[Register::Ecx, Register::Edx]),
    (0x7, Some(0), &[Register::Ebx, Register::Ecx, Register::Edx]),
    (0x8000_0001, None, &[Register::Ecx, Register::Edx]),
    (0xd, Some(1), &[Register::Eax]),
];

/// Bits a VMM or KVM itself sets beyond KVM_GET_SUPPORTED_CPUID, never asked of the host: the
/// hypervisor bit and HTT (carve's [`crate::cpuid::normalize`]), OSXSAVE and OSPKE (KVM mirrors
/// CR4 into them as the guest runs). The TSC-deadline timer counts when KVM emulates it
/// (KVM_CAP_TSC_DEADLINE_TIMER), as [`crate::cpuid::announce_emulated`] offers it.
fn vmm_owned(leaf: u32, register: Register, bit: u8, caps: &HostCaps) -> bool {
    matches!(
        (leaf, register, bit),
        (0x1, Register::Ecx, 31)
            | (0x1, Register::Ecx, 27)
            | (0x1, Register::Edx, 28)
            | (0x7, Register::Ecx, 4)
    ) || (leaf, register, bit) == (0x1, Register::Ecx, 24) && caps.tsc_deadline_timer
}

/// Names for bits the baseline CPU template does not name (it names the ones it hides).
const NAMES: &[(u32, Option<u32>, Register, u8, &str)] = &[
    (0x1, None, Register::Ecx, 0, "sse3"),
    (0x1, None, Register::Ecx, 1, "pclmulqdq"),
    (0x1, None, Register::Ecx, 9, "ssse3"),
    (0x1, None, Register::Ecx, 13, "cx16"),
    (0x1, None, Register::Ecx, 17, "pcid"),
    (0x1, None, Register::Ecx, 19, "sse4_1"),
    (0x1, None, Register::Ecx, 20, "sse4_2"),
    (0x1, None, Register::Ecx, 21, "x2apic"),
    (0x1, None, Register::Ecx, 22, "movbe"),
    (0x1, None, Register::Ecx, 24, "tsc_deadline_timer"),
    (0x1, None, Register::Ecx, 25, "aes"),
    (0x1, None, Register::Ecx, 30, "rdrand"),
    (0x1, None, Register::Ecx, 31, "hypervisor"),
    (0x1, None, Register::Edx, 0, "fpu"),
    (0x1, None, Register::Edx, 4, "tsc"),
    (0x1, None, Register::Edx, 5, "msr"),
    (0x1, None, Register::Edx, 6, "pae"),
    (0x1, None, Register::Edx, 8, "cx8"),
    (0x1, None, Register::Edx, 9, "apic"),
    (0x1, None, Register::Edx, 11, "sep"),
    (0x1, None, Register::Edx, 12, "mtrr"),
    (0x1, None, Register::Edx, 13, "pge"),
    (0x1, None, Register::Edx, 15, "cmov"),
    (0x1, None, Register::Edx, 16, "pat"),
    (0x1, None, Register::Edx, 19, "clflush"),
    (0x1, None, Register::Edx, 23, "mmx"),
    (0x1, None, Register::Edx, 24, "fxsr"),
    (0x1, None, Register::Edx, 25, "sse"),
    (0x1, None, Register::Edx, 26, "sse2"),
    (0x1, None, Register::Edx, 28, "htt"),
    (0x7, Some(0), Register::Ebx, 0, "fsgsbase"),
    (0x7, Some(0), Register::Ebx, 1, "tsc_adjust"),
    (0x7, Some(0), Register::Ebx, 3, "bmi1"),
    (0x7, Some(0), Register::Ebx, 8, "bmi2"),
    (0x7, Some(0), Register::Ebx, 9, "erms"),
    (0x7, Some(0), Register::Ebx, 10, "invpcid"),
    (0x7, Some(0), Register::Ebx, 18, "rdseed"),
    (0x7, Some(0), Register::Ebx, 19, "adx"),
    (0x7, Some(0), Register::Ebx, 23, "clflushopt"),
    (0x7, Some(0), Register::Ebx, 24, "clwb"),
    (0x7, Some(0), Register::Ebx, 29, "sha_ni"),
    (0x7, Some(0), Register::Ecx, 2, "umip"),
    (0x7, Some(0), Register::Ecx, 8, "gfni"),
    (0x7, Some(0), Register::Ecx, 22, "rdpid"),
    (0x7, Some(0), Register::Edx, 4, "fsrm"),
    (0x7, Some(0), Register::Edx, 10, "md_clear"),
    (0x7, Some(0), Register::Edx, 26, "spec_ctrl"),
    (0x7, Some(0), Register::Edx, 27, "stibp"),
    (0x7, Some(0), Register::Edx, 28, "flush_l1d"),
    (0x7, Some(0), Register::Edx, 29, "arch_capabilities"),
    (0x7, Some(0), Register::Edx, 31, "ssbd"),
    (0x8000_0001, None, Register::Ecx, 0, "lahf_lm"),
    (0x8000_0001, None, Register::Ecx, 8, "prefetchw"),
    (0x8000_0001, None, Register::Edx, 11, "syscall"),
    (0x8000_0001, None, Register::Edx, 20, "nx"),
    (0x8000_0001, None, Register::Edx, 26, "pdpe1gb"),
    (0x8000_0001, None, Register::Edx, 27, "rdtscp"),
    (0x8000_0001, None, Register::Edx, 29, "lm"),
    (0xd, Some(1), Register::Eax, 0, "xsaveopt"),
    (0xd, Some(1), Register::Eax, 1, "xsavec"),
    (0xd, Some(1), Register::Eax, 2, "xgetbv1"),
    (0xd, Some(1), Register::Eax, 3, "xsaves"),
    (0xd, Some(1), Register::Eax, 4, "xfd"),
];

/// The feature's name: from the baseline CPU template's table (crates/vmm/cpu-templates), else
/// from the small table above.
pub(super) fn feature_name(leaf: u32, subleaf: Option<u32>, register: Register, bit: u8) -> Option<String> {
    let from_template = CpuTemplate::named("baseline").ok().and_then(|template| {
        template
            .clear_bits
            .iter()
            .find(|c| {
                c.leaf == leaf
                    && c.subleaf.unwrap_or(0) == subleaf.unwrap_or(0)
                    && Register::of_template(c.register) == register
                    && c.bit == bit
            })
            .map(|c| c.feature.clone())
    });
    from_template.or_else(|| {
        NAMES.iter().find(|n| (n.0, n.1, n.2, n.3) == (leaf, subleaf, register, bit)).map(|n| n.4.to_string())
    })
}

/// The CPUID feature bits `guest` uses that `offered` lacks, into `missing`.
fn missing_cpuid(
    caps: &HostCaps,
    offered: &[CpuidEntry],
    guest: &[CpuidEntry],
    missing: &mut BTreeSet<Missing>,
) {
    for &(leaf, subleaf, registers) in CHECKED {
        let Some(entry) = find(guest, leaf, subleaf) else { continue };
        let offered = find(offered, leaf, subleaf);
        for &register in registers {
            let used = register.get(entry);
            let host = offered.map_or(0, |o| register.get(o));
            for bit in (0..32u8).filter(|b| used & !host & (1 << b) != 0) {
                if !vmm_owned(leaf, register, bit, caps) {
                    missing.insert(Missing::Cpuid { leaf, subleaf, register, bit });
                }
            }
        }
    }
}

/// Before a migration moves any memory: the CPUID feature bits a guest uses (its vCPU 0's
/// table) that this host's KVM, narrowed by `template` (a destination's `--cpu-template`), does
/// not offer.
pub fn check_cpuid(
    caps: &HostCaps,
    template: Option<&CpuTemplate>,
    guest: &[CpuidEntry],
) -> Result<(), Incompatible> {
    let mut offered = caps.offered_cpuid.clone();
    if let Some(template) = template {
        offered.retain(|e| !template.remove_leaves.iter().any(|r| r.leaf == e.function));
        for clear in &template.clear_bits {
            let register = Register::of_template(clear.register);
            for entry in offered.iter_mut().filter(|e| e.function == clear.leaf) {
                if clear.subleaf.is_none_or(|s| s == entry.index) {
                    *register.get_mut(entry) &= !(1u32 << clear.bit);
                }
            }
        }
    }
    let mut missing = BTreeSet::new();
    missing_cpuid(caps, &offered, guest, &mut missing);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Incompatible { missing: missing.into_iter().collect() })
    }
}

/// CPUID.(7,0):ECX bit 7, as [`check_host`] names a missing CPUID bit.
const SHSTK: Missing = Missing::Cpuid { leaf: 0x7, subleaf: Some(0), register: Register::Ecx, bit: 7 };

fn find(cpuid: &[CpuidEntry], leaf: u32, subleaf: Option<u32>) -> Option<&CpuidEntry> {
    cpuid.iter().find(|e| e.function == leaf && subleaf.is_none_or(|s| e.index == s))
}

/// Everything the snapshot's vCPUs use that this host's KVM lacks: CPUID feature bits (leaves 1
/// ECX/EDX, 7.0 EBX/ECX/EDX, 0x80000001 ECX/EDX, 0xD.1 EAX) outside KVM_GET_SUPPORTED_CPUID and
/// KVM_GET_EMULATED_CPUID, shadow stacks for a saved SSP, MSRs outside KVM_GET_MSR_INDEX_LIST
/// (the CET MSRs among them: KVM lists them only where it offers CET), nested state without
/// KVM_CAP_NESTED_STATE (or larger than it), XSAVE state beyond KVM_CAP_XSAVE2's area. All of
/// them in one error, checked before anything is restored.
pub fn check_host(caps: &HostCaps, state: &[VcpuState]) -> Result<(), Incompatible> {
    let mut missing = BTreeSet::new();
    let host_shstk = find(&caps.offered_cpuid, 0x7, Some(0)).is_some_and(|e| e.ecx & (1 << 7) != 0);
    for vcpu in state {
        missing_cpuid(caps, &caps.offered_cpuid, &vcpu.cpuid, &mut missing);
        for msr in &vcpu.msrs {
            if !caps.msr_index_list.contains(&msr.index) {
                missing.insert(Missing::Msr(msr.index));
            }
        }
        if let Some(nested) = &vcpu.nested {
            if caps.nested_state_size == 0 {
                missing.insert(Missing::NestedState);
            } else if nested.len() > caps.nested_state_size {
                missing
                    .insert(Missing::NestedStateSize { saved: nested.len(), host: caps.nested_state_size });
            }
        }
        let host_words = caps.xsave_size.div_ceil(4);
        if vcpu.xsave.iter().skip(host_words).any(|&w| w != 0) {
            missing.insert(Missing::Xsave { saved_bytes: vcpu.xsave.len() * 4, host_bytes: caps.xsave_size });
        }
    }
    // A saved SSP needs SHSTK here (KVM refuses its ONE_REG otherwise): named as the feature.
    if state.iter().any(|vcpu| vcpu.ssp.is_some()) && !host_shstk {
        missing.remove(&SHSTK);
        missing.insert(Missing::ShadowStack);
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Incompatible { missing: missing.into_iter().collect() })
    }
}
