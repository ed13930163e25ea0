//! Nested virtualisation: SVM (AMD) or VMX (Intel) in the guest's CPUID, where KVM offers it
//! (kvm_amd or kvm_intel loaded with `nested=1`; KVM then lists the bit in its supported CPUID).
//! Hidden unless asked for: a guest that never runs guests of its own gains only attack surface.

use kvm_bindings::CpuId;

use super::{clear_bit, Leaves, Offer, Reg, Vendor};

/// CPUID.1:ECX bit 5.
pub(crate) const VMX: (u32, Reg, u32) = (0x1, Reg::Ecx, 5);
/// CPUID.8000_0001:ECX bit 2.
pub(crate) const SVM: (u32, Reg, u32) = (0x8000_0001, Reg::Ecx, 2);
/// SVM's revision, ASIDs and features (NRIPS, nested paging, …): meaningless without SVM.
const LEAF_SVM_FEATURES: u32 = 0x8000_000a;

pub(super) fn offer(cpuid: &Leaves<'_>, vendor: Vendor) -> Offer {
    let has = |(function, register, bit): (u32, Reg, u32)| cpuid.bit(function, 0, register, bit);
    match vendor {
        Vendor::Amd if has(SVM) => {
            let asids = cpuid.get(LEAF_SVM_FEATURES, 0).map_or(0, |e| e.ebx);
            Offer::yes(format!("SVM (CPUID 0x8000_0001 ECX bit 2), {asids} ASIDs"))
        }
        Vendor::Amd => Offer::no(
            "KVM_GET_SUPPORTED_CPUID offers no SVM (CPUID 0x8000_0001 ECX bit 2): load kvm_amd with \
             nested=1 on a host whose CPU has SVM",
        ),
        Vendor::Intel if has(VMX) => Offer::yes("VMX (CPUID 0x1 ECX bit 5)"),
        Vendor::Intel => Offer::no(
            "KVM_GET_SUPPORTED_CPUID offers no VMX (CPUID 0x1 ECX bit 5): load kvm_intel with \
             nested=1 on a host whose CPU has VMX",
        ),
        Vendor::Other => Offer::no("the host CPU is neither Intel nor AMD: no VMX or SVM to offer"),
    }
}

pub(super) fn shape(cpuid: &mut CpuId, enabled: bool) {
    if enabled {
        return;
    }
    for (function, register, bit) in [VMX, SVM] {
        clear_bit(cpuid, function, 0, register, bit);
    }
    cpuid.retain(|e| e.function != LEAF_SVM_FEATURES);
}
