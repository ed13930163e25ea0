//! VM-entry guest-state checks: which SDM rule a vCPU's state breaks, before the hardware
//! refuses it with nothing more than "invalid guest state" (exit reason 0x80000021).
//!
//! [`GuestState`] holds the fields as the hardware sees them (VMCS-format access rights);
//! [`GuestState::from_kvm`] builds it from `kvm_sregs` the way KVM writes the VMCS, and
//! [`CetState::read`] adds a live CET guest's supervisor CET state.
//! [`check`] returns every violated rule; [`file`] reads and writes the JSON state files of
//! `carve vm check-state` and `--dump-state`.

pub mod file;
mod rules;

use kvm_bindings::{kvm_cpuid_entry2, kvm_dtable, kvm_msr_entry, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

use crate::cpu_features::{cet, Leaves};

pub use rules::{check, Violation};

/// Access-rights bits of a segment in VMCS format (SDM Vol. 3C, "Guest Register State").
pub mod ar {
    pub const TYPE: u32 = 0xf;
    pub const ACCESSED: u32 = 1;
    pub const S: u32 = 1 << 4;
    pub const DPL_SHIFT: u32 = 5;
    pub const P: u32 = 1 << 7;
    pub const RESERVED_11_8: u32 = 0xf00;
    pub const AVL: u32 = 1 << 12;
    pub const L: u32 = 1 << 13;
    pub const DB: u32 = 1 << 14;
    pub const G: u32 = 1 << 15;
    pub const UNUSABLE: u32 = 1 << 16;
    pub const RESERVED_31_17: u32 = 0xfffe_0000;
}

/// One segment register as VM entry checks it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    pub access_rights: u32,
}

impl Segment {
    pub fn type_(&self) -> u32 {
        self.access_rights & ar::TYPE
    }
    pub fn s(&self) -> bool {
        self.access_rights & ar::S != 0
    }
    pub fn dpl(&self) -> u16 {
        ((self.access_rights >> ar::DPL_SHIFT) & 3) as u16
    }
    pub fn present(&self) -> bool {
        self.access_rights & ar::P != 0
    }
    pub fn usable(&self) -> bool {
        self.access_rights & ar::UNUSABLE == 0
    }
    pub fn l(&self) -> bool {
        self.access_rights & ar::L != 0
    }
    pub fn db(&self) -> bool {
        self.access_rights & ar::DB != 0
    }
    pub fn g(&self) -> bool {
        self.access_rights & ar::G != 0
    }
    pub fn rpl(&self) -> u16 {
        self.selector & 3
    }
    pub fn ti(&self) -> bool {
        self.selector & 4 != 0
    }

    /// The VMCS fields KVM writes for `seg` (vmx_segment_access_rights): a segment that is
    /// unusable or not present becomes AR = unusable only; with unrestricted guest KVM also
    /// sets the accessed bit of every register but LDTR (`accessed_fixup`).
    pub fn from_kvm(seg: &kvm_segment, accessed_fixup: bool) -> Segment {
        let access_rights = if seg.unusable != 0 || seg.present == 0 {
            ar::UNUSABLE
        } else {
            let type_ = u32::from(seg.type_ & 0xf) | if accessed_fixup { ar::ACCESSED } else { 0 };
            let bit = |value: u8, mask: u32| if value & 1 != 0 { mask } else { 0 };
            type_
                | bit(seg.s, ar::S)
                | (u32::from(seg.dpl & 3) << ar::DPL_SHIFT)
                | ar::P
                | bit(seg.avl, ar::AVL)
                | bit(seg.l, ar::L)
                | bit(seg.db, ar::DB)
                | bit(seg.g, ar::G)
        };
        Segment { selector: seg.selector, base: seg.base, limit: seg.limit, access_rights }
    }
}

/// GDTR or IDTR. The VMCS limit field is 32 bits wide (KVM's is 16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u32,
}

impl From<&kvm_dtable> for DescriptorTable {
    fn from(table: &kvm_dtable) -> Self {
        DescriptorTable { base: table.base, limit: table.limit.into() }
    }
}

/// The CET state VM entry loads when its "load CET state" control is 1, as KVM sets it for a
/// guest with SHSTK or IBT. Registers the guest lacks (the SSP and the interrupt SSP table
/// without SHSTK) are 0, as KVM leaves their VMCS fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CetState {
    pub s_cet: u64,
    pub ssp: u64,
    pub interrupt_ssp_table: u64,
}

impl CetState {
    /// A live vCPU's CET state, when `cpuid` (what KVM_SET_CPUID2 gave it) has SHSTK or IBT:
    /// IA32_S_CET and IA32_INT_SSP_TAB by KVM_GET_MSRS, the SSP by KVM_GET_ONE_REG (both need
    /// SHSTK). An MSR KVM will not read is reported as EINVAL.
    pub fn read(fd: &VcpuFd, cpuid: &[kvm_cpuid_entry2]) -> Result<Option<CetState>, kvm_ioctls::Error> {
        let has = |(function, index, register, bit)| Leaves(cpuid).bit(function, index, register, bit);
        let shstk = has(cet::SHSTK);
        if !shstk && !has(cet::IBT) {
            return Ok(None);
        }
        let indices: &[u32] = match shstk {
            true => &[cet::MSR_IA32_S_CET, cet::MSR_IA32_INT_SSP_TAB],
            false => &[cet::MSR_IA32_S_CET],
        };
        let entries: Vec<kvm_msr_entry> =
            indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).expect("two MSRs fit kvm_msrs");
        if fd.get_msrs(&mut msrs)? != indices.len() {
            return Err(kvm_ioctls::Error::new(libc::EINVAL));
        }
        let value = |index| msrs.as_slice().iter().find(|e| e.index == index).map_or(0, |e| e.data);
        let mut ssp = [0u8; 8];
        if shstk {
            fd.get_one_reg(cet::GUEST_SSP_REG, &mut ssp)?;
        }
        Ok(Some(CetState {
            s_cet: value(cet::MSR_IA32_S_CET),
            ssp: u64::from_le_bytes(ssp),
            interrupt_ssp_table: value(cet::MSR_IA32_INT_SSP_TAB),
        }))
    }

    /// Loads this state into a vCPU whose `cpuid` has SHSTK or IBT (`--load-state`): the MSRs by
    /// KVM_SET_MSRS, the SSP by KVM_SET_ONE_REG (both only with SHSTK, as [`CetState::read`]).
    pub fn write(&self, fd: &VcpuFd, cpuid: &[kvm_cpuid_entry2]) -> Result<(), kvm_ioctls::Error> {
        let shstk = Leaves(cpuid).bit(cet::SHSTK.0, cet::SHSTK.1, cet::SHSTK.2, cet::SHSTK.3);
        let mut entries =
            vec![kvm_msr_entry { index: cet::MSR_IA32_S_CET, data: self.s_cet, ..Default::default() }];
        if shstk {
            let table = self.interrupt_ssp_table;
            entries.push(kvm_msr_entry {
                index: cet::MSR_IA32_INT_SSP_TAB,
                data: table,
                ..Default::default()
            });
        }
        let msrs = Msrs::from_entries(&entries).expect("two MSRs fit kvm_msrs");
        if fd.set_msrs(&msrs)? != entries.len() {
            return Err(kvm_ioctls::Error::new(libc::EINVAL));
        }
        if shstk {
            fd.set_one_reg(cet::GUEST_SSP_REG, &self.ssp.to_le_bytes())?;
        }
        Ok(())
    }
}

/// The guest state VM entry checks (segment, descriptor-table and control registers, RFLAGS,
/// and CET state for a CET guest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestState {
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub rflags: u64,
    /// `None`: "load CET state" is 0 (a guest without SHSTK and IBT), no CET rule applies.
    pub cet: Option<CetState>,
}

impl GuestState {
    /// The state KVM enters for these special registers and RFLAGS on `platform`, without CET
    /// state (add [`CetState::read`]'s for a CET guest).
    pub fn from_kvm(sregs: &kvm_sregs, rflags: u64, platform: &Platform) -> GuestState {
        let fixup = platform.unrestricted_guest && platform.vendor == CpuVendor::Intel;
        let seg = |s: &kvm_segment| Segment::from_kvm(s, fixup);
        GuestState {
            cs: seg(&sregs.cs),
            ss: seg(&sregs.ss),
            ds: seg(&sregs.ds),
            es: seg(&sregs.es),
            fs: seg(&sregs.fs),
            gs: seg(&sregs.gs),
            tr: seg(&sregs.tr),
            ldt: Segment::from_kvm(&sregs.ldt, false),
            gdt: (&sregs.gdt).into(),
            idt: (&sregs.idt).into(),
            cr0: sregs.cr0,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
            rflags,
            cet: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuVendor {
    Intel,
    Amd,
}

/// What the checks depend on besides the state itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Platform {
    /// VMX "unrestricted guest": real mode and unpaged protected mode may be entered directly.
    pub unrestricted_guest: bool,
    /// Decides which EFER bits exist; the segment rules are VMX's on either vendor, so a
    /// state that passes here enters on Intel and AMD hosts alike.
    pub vendor: CpuVendor,
    pub phys_addr_bits: u8,
    pub linear_addr_bits: u8,
}

impl Platform {
    /// An Intel host with unrestricted guest (every VMX CPU since 2010), 52-bit physical and
    /// 48-bit linear addresses.
    pub const fn intel(unrestricted_guest: bool) -> Platform {
        Platform { unrestricted_guest, vendor: CpuVendor::Intel, phys_addr_bits: 52, linear_addr_bits: 48 }
    }

    /// This host as KVM presents it to guests: vendor and address widths from the supported
    /// CPUID; unrestricted guest from kvm_intel's parameter (AMD's SVM enters real and unpaged
    /// modes directly, which the unrestricted-guest rules describe).
    pub fn host(supported: &kvm_bindings::CpuId) -> Platform {
        let leaf =
            |function: u32| supported.as_slice().iter().find(|e| e.function == function && e.index == 0);
        let vendor = match leaf(0) {
            Some(e) if e.ebx == u32::from_le_bytes(*b"Auth") => CpuVendor::Amd,
            _ => CpuVendor::Intel,
        };
        let (phys_addr_bits, linear_addr_bits) = match leaf(0x8000_0008) {
            Some(e) if e.eax & 0xff != 0 => ((e.eax & 0xff) as u8, ((e.eax >> 8) & 0xff) as u8),
            _ => (36, 48),
        };
        let unrestricted_guest = vendor == CpuVendor::Amd || kvm_intel_unrestricted_guest().unwrap_or(true);
        Platform { unrestricted_guest, vendor, phys_addr_bits, linear_addr_bits }
    }
}

/// kvm_intel's `unrestricted_guest` module parameter, when kvm_intel is loaded.
pub fn kvm_intel_unrestricted_guest() -> Option<bool> {
    let value = std::fs::read_to_string("/sys/module/kvm_intel/parameters/unrestricted_guest").ok()?;
    Some(value.trim() == "Y" || value.trim() == "1")
}

#[cfg(test)]
mod tests;
