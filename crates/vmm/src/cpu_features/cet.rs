//! Control-flow enforcement (CET): shadow stacks (SHSTK) and indirect-branch tracking (IBT).
//!
//! KVM offers them from Linux 6.18 on CET hardware (Intel: both; AMD: SHSTK only). The guest
//! sees them in CPUID leaf 7, with their supervisor XSAVE components (CET_U, bit 11; CET_S,
//! bit 12) in IA32_XSS's supported bits (leaf 0xD.1 ECX) and sub-leaves 0xD.11 and 0xD.12.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use super::{clear_bit, Leaves, Offer, Reg};

/// CPUID.(7,0):ECX bit 7.
pub(crate) const SHSTK: (u32, u32, Reg, u32) = (0x7, 0, Reg::Ecx, 7);
/// CPUID.(7,0):EDX bit 20.
pub(crate) const IBT: (u32, u32, Reg, u32) = (0x7, 0, Reg::Edx, 20);
/// IA32_XSS components in CPUID.(0xD,1):ECX.
pub const XSS_CET_U: u32 = 11;
pub const XSS_CET_S: u32 = 12;
/// Sizes of the CET XSAVE components: CET_U = {U_CET, PL3_SSP}, CET_S = {PL0..PL2_SSP}.
pub const CET_U_SIZE: u32 = 16;
pub const CET_S_SIZE: u32 = 24;
/// The supervisor CET MSRs VM entry checks (the others only move with snapshots).
pub(crate) const MSR_IA32_S_CET: u32 = 0x6a2;
pub(crate) const MSR_IA32_INT_SSP_TAB: u32 = 0x6a8;
/// The current shadow-stack pointer is no MSR: KVM_GET/SET_ONE_REG's KVM_REG_GUEST_SSP
/// (0x2030_0003_0000_0000, Linux 6.18), which KVM refuses (EINVAL) without SHSTK in CPUID.
pub(crate) const GUEST_SSP_REG: u64 = kvm_bindings::kvm_x86_reg_kvm(kvm_bindings::KVM_REG_GUEST_SSP);

const LEAF_XSAVE: u32 = 0xd;

fn has(cpuid: &Leaves<'_>, (function, index, register, bit): (u32, u32, Reg, u32)) -> bool {
    cpuid.bit(function, index, register, bit)
}

pub(super) fn offer(cpuid: &Leaves<'_>) -> Offer {
    let (shstk, ibt) = (has(cpuid, SHSTK), has(cpuid, IBT));
    let xss = [XSS_CET_U, XSS_CET_S].iter().all(|&bit| cpuid.bit(LEAF_XSAVE, 1, Reg::Ecx, bit));
    match (shstk, ibt) {
        (false, false) => Offer::no(
            "KVM_GET_SUPPORTED_CPUID offers neither SHSTK (CPUID 7.0 ECX bit 7) nor IBT (CPUID 7.0 \
             EDX bit 20): guest CET needs CET hardware and Linux 6.18's KVM",
        ),
        _ if !xss => Offer::no(
            "KVM_GET_SUPPORTED_CPUID lists CET but not its XSAVE components (CPUID 0xD.1 ECX bits 11 \
             and 12, IA32_XSS)",
        ),
        (true, true) => Offer::yes("SHSTK and IBT"),
        (true, false) => Offer::yes("SHSTK (KVM offers no IBT here, as on AMD)"),
        (false, true) => Offer::yes("IBT (KVM offers no SHSTK here)"),
    }
}

/// Keeps what KVM offers of CET when `enabled` (adding sub-leaves 0xD.11 and 0xD.12 where KVM
/// left them out), hides all of it otherwise.
pub(super) fn shape(cpuid: &mut CpuId, enabled: bool) {
    let leaves = Leaves(cpuid.as_slice());
    let offered = has(&leaves, SHSTK) || has(&leaves, IBT);
    if enabled && offered {
        for (index, size) in [(XSS_CET_U, CET_U_SIZE), (XSS_CET_S, CET_S_SIZE)] {
            cpuid.retain(|e| !(e.function == LEAF_XSAVE && e.index == index));
            // ECX bit 0: a supervisor (IA32_XSS) component. A full table only loses the size.
            let _ = cpuid.push(kvm_cpuid_entry2 {
                function: LEAF_XSAVE,
                index,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: size,
                ecx: 1,
                ..Default::default()
            });
        }
        return;
    }
    for (function, index, register, bit) in [SHSTK, IBT] {
        clear_bit(cpuid, function, index, register, bit);
    }
    for bit in [XSS_CET_U, XSS_CET_S] {
        clear_bit(cpuid, LEAF_XSAVE, 1, Reg::Ecx, bit);
    }
    cpuid.retain(|e| !(e.function == LEAF_XSAVE && (e.index == XSS_CET_U || e.index == XSS_CET_S)));
}
