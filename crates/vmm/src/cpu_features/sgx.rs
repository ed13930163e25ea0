//! SGX for guests: virtual EPC sections from /dev/sgx_vepc placed after RAM, described to the
//! guest in CPUID leaf 0x12 (sub-leaves 2 and on), and the PROVISIONKEY attribute where
//! /dev/sgx_provision grants it (KVM_CAP_SGX_ATTRIBUTE).

use std::fs::File;

use kvm_bindings::CpuId;

use super::{clear_bit, HostProbe, Leaves, Offer, Reg};

pub const VEPC_PATH: &str = "/dev/sgx_vepc";
pub const PROVISION_PATH: &str = "/dev/sgx_provision";
/// KVM_ENABLE_CAP on the VM with an SGX attribute file's descriptor (api.rst 7.24).
pub const KVM_CAP_SGX_ATTRIBUTE: u32 = 196;

/// CPUID.(7,0):EBX bit 2.
const SGX: (u32, Reg, u32) = (0x7, Reg::Ebx, 2);
/// CPUID.(7,0):ECX bit 30: flexible launch control (the guest's own LE hash MSRs).
const SGX_LC: (u32, Reg, u32) = (0x7, Reg::Ecx, 30);
pub const LEAF_SGX: u32 = 0x12;
/// CPUID.(0x12,1):EAX bit 4: ECREATE may set SECS.ATTRIBUTES.PROVISIONKEY.
const ATTRIBUTE_PROVISIONKEY: u32 = 4;

/// One `--sgx-epc SIZE[,prefault]` section as asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpcSection {
    pub size: u64,
    /// Populate the EPC pages at start instead of on first touch.
    pub prefault: bool,
}

/// An EPC section at its guest-physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlacedSection {
    pub base: u64,
    pub size: u64,
}

pub fn open_vepc() -> std::io::Result<File> {
    File::options().read(true).write(true).open(VEPC_PATH)
}

pub fn open_provision() -> std::io::Result<File> {
    File::open(PROVISION_PATH)
}

fn has(cpuid: &Leaves<'_>, (function, register, bit): (u32, Reg, u32)) -> bool {
    cpuid.bit(function, 0, register, bit)
}

pub(super) fn offer(cpuid: &Leaves<'_>, probe: &HostProbe) -> Offer {
    if !has(cpuid, SGX) {
        return Offer::no("KVM_GET_SUPPORTED_CPUID offers no SGX (CPUID 7.0 EBX bit 2)");
    }
    if !has(cpuid, SGX_LC) {
        return Offer::no("KVM_GET_SUPPORTED_CPUID offers no SGX launch control (CPUID 7.0 ECX bit 30)");
    }
    match &probe.sgx_vepc {
        Ok(()) => Offer::yes("SGX with launch control; virtual EPC from /dev/sgx_vepc"),
        Err(why) => Offer::no(why.clone()),
    }
}

pub(super) fn provision_offer(cpuid: &Leaves<'_>, probe: &HostProbe) -> Offer {
    if !has(cpuid, SGX) {
        return Offer::no("no SGX (CPUID 7.0 EBX bit 2)");
    }
    if !cpuid.bit(LEAF_SGX, 1, Reg::Eax, ATTRIBUTE_PROVISIONKEY) {
        return Offer::no(
            "KVM_GET_SUPPORTED_CPUID offers no PROVISIONKEY attribute (CPUID 0x12.1 EAX bit 4)",
        );
    }
    if !probe.sgx_attribute_cap {
        return Offer::no("KVM does not report KVM_CAP_SGX_ATTRIBUTE (196)");
    }
    match &probe.sgx_provision {
        Ok(()) => Offer::yes("PROVISIONKEY through /dev/sgx_provision and KVM_CAP_SGX_ATTRIBUTE"),
        Err(why) => Offer::no(why.clone()),
    }
}

/// Hides SGX when no EPC section was placed.
pub(super) fn shape(cpuid: &mut CpuId, placed: &[PlacedSection]) {
    if placed.is_empty() {
        for (function, register, bit) in [SGX, SGX_LC] {
            clear_bit(cpuid, function, 0, register, bit);
        }
        cpuid.retain(|e| e.function != LEAF_SGX);
    }
}
