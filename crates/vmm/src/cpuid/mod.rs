//! The guest CPUID: what KVM supports, normalised for a carve VM (hypervisor bit, APIC IDs and
//! topology, TSC frequency), then masked by a CPU template.

pub mod template;

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

pub use template::{CpuTemplate, TemplateError};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMETERS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
/// VMware/KVM convention: EAX = TSC kHz, EBX = local APIC bus kHz.
const LEAF_TIMING: u32 = 0x4000_0010;
const LEAF_EXT_ADDRESS_SIZES: u32 = 0x8000_0008;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const APIC_BUS_KHZ: u32 = 1_000_000;

/// Announces what KVM emulates but leaves out of KVM_GET_SUPPORTED_CPUID for user space to
/// offer: the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER), as QEMU and Firecracker do.
/// Without it Linux calibrates the local APIC timer against the PIT, which fails where vCPUs
/// are descheduled for long (KVM re-injects missed PIT ticks, not missed APIC timer ticks), and
/// then has no per-CPU timer at all: every sleep in the guest hangs.
pub fn announce_emulated(cpuid: &mut CpuId, tsc_deadline: bool) {
    for entry in cpuid.as_mut_slice() {
        if entry.function == LEAF_FEATURES && tsc_deadline {
            entry.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

/// Shapes the CPUID for vCPU `index` of `count` (one socket, `count` cores, one thread each).
pub fn normalize(cpuid: &mut CpuId, index: u8, count: u8, tsc_khz: Option<u32>) {
    let core_bits = (count as u32).next_power_of_two().trailing_zeros();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ecx |= ECX_HYPERVISOR;
                entry.ebx =
                    (entry.ebx & 0xffff) & !0xff00 | (8 << 8) | (count as u32) << 16 | (index as u32) << 24;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMETERS => {
                let shared_by_all = (entry.eax >> 5) & 0x7 == 3;
                let sharing = if shared_by_all { count as u32 - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((count as u32 - 1) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                entry.edx = index as u32;
                let (shift, processors, level_type) = match entry.index {
                    0 => (0, 1, 1),                    // SMT: one thread per core
                    1 => (core_bits, count as u32, 2), // core: every vCPU
                    _ => (0, 0, 0),
                };
                entry.eax = shift;
                entry.ebx = processors;
                entry.ecx = (level_type << 8) | (entry.index & 0xff);
            }
            LEAF_KVM_SIGNATURE if tsc_khz.is_some() => entry.eax = entry.eax.max(LEAF_TIMING),
            LEAF_EXT_ADDRESS_SIZES => {
                entry.ecx = (entry.ecx & !0xff) | (count as u32 - 1);
            }
            _ => {}
        }
    }
    if let Some(khz) = tsc_khz {
        cpuid.retain(|e| e.function != LEAF_TIMING);
        let timing =
            kvm_cpuid_entry2 { function: LEAF_TIMING, eax: khz, ebx: APIC_BUS_KHZ, ..Default::default() };
        // A full table only loses the timing leaf; guests then calibrate the TSC themselves.
        let _ = cpuid.push(timing);
    }
    for entry in cpuid.as_mut_slice() {
        if matches!(entry.function, LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 | LEAF_CACHE_PARAMETERS) {
            entry.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CpuId {
        let e = |function, index| kvm_cpuid_entry2 { function, index, ..Default::default() };
        CpuId::from_entries(&[e(1, 0), e(0xb, 0), e(0xb, 1), e(0xb, 2), e(LEAF_KVM_SIGNATURE, 0)]).unwrap()
    }

    #[test]
    fn sets_hypervisor_bit_apic_id_and_counts() {
        let mut cpuid = base();
        normalize(&mut cpuid, 2, 4, Some(2_000_000));
        let leaf1 = cpuid.as_slice()[0];
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(leaf1.ebx >> 24, 2);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf_describes_one_socket_of_single_thread_cores() {
        let mut cpuid = base();
        normalize(&mut cpuid, 3, 3, None);
        let leaves = cpuid.as_slice();
        assert_eq!((leaves[1].eax, leaves[1].ebx, leaves[1].ecx >> 8, leaves[1].edx), (0, 1, 1, 3));
        assert_eq!((leaves[2].eax, leaves[2].ebx, leaves[2].ecx >> 8), (2, 3, 2));
        assert_eq!((leaves[3].ebx, leaves[3].ecx >> 8), (0, 0));
    }

    #[test]
    fn announces_the_tsc_deadline_timer_only_when_kvm_emulates_it() {
        let mut cpuid = base();
        announce_emulated(&mut cpuid, false);
        assert_eq!(cpuid.as_slice()[0].ecx & ECX_TSC_DEADLINE, 0);
        announce_emulated(&mut cpuid, true);
        assert_ne!(cpuid.as_slice()[0].ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn adds_the_tsc_frequency_leaf() {
        let mut cpuid = base();
        normalize(&mut cpuid, 0, 1, Some(2_500_000));
        let timing = cpuid.as_slice().iter().find(|e| e.function == LEAF_TIMING).unwrap();
        assert_eq!((timing.eax, timing.ebx), (2_500_000, APIC_BUS_KHZ));
        let signature = cpuid.as_slice().iter().find(|e| e.function == LEAF_KVM_SIGNATURE).unwrap();
        assert!(signature.eax >= LEAF_TIMING);
    }
}
