//! SGX for guests: virtual EPC sections from /dev/sgx_vepc placed after RAM, described to the
//! guest in CPUID leaf 0x12 (sub-leaves 2 and on), and the PROVISIONKEY attribute where
//! /dev/sgx_provision grants it (KVM_CAP_SGX_ATTRIBUTE).
//!
//! `--sgx-epc SIZE[,prefault]` asks for one section; all sections form one contiguous EPC
//! region on the first 4 KiB boundary after RAM (at 4 GiB when RAM ends below the MMIO gap),
//! back to back in the order given, as QEMU and Cloud Hypervisor place them. Each section is
//! its own /dev/sgx_vepc instance mapped shared (not guest RAM: the device has no size, and
//! its pages are EPC the host cannot read) and registered as a KVM memory slot after RAM's.
//! The guest learns of the region from CPUID 0x12 (the SGX driver's source), a RESERVED e820
//! entry (so no kernel takes it for RAM) and the ACPI device `\_SB.EPC_` (INT0E0C).
//!
//! A guest reset ends a carve VM (devices/i8042.rs, exit.rs), so [`Epc::remove_all`] is never
//! needed: the host frees every EPC page when the VM's /dev/sgx_vepc descriptors close. It is
//! here for the day carve reboots a guest in place.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::str::FromStr;

use kvm_bindings::{kvm_cpuid_entry2, kvm_enable_cap, kvm_userspace_memory_region, CpuId};
use kvm_bindings::{KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VmFd;

use super::{clear_bit, HostProbe, Leaves, Offer, Reg};
use crate::layout::MMIO_GAP_END;
use crate::memory::RamRange;

pub const VEPC_PATH: &str = "/dev/sgx_vepc";
pub const PROVISION_PATH: &str = "/dev/sgx_provision";
/// KVM_ENABLE_CAP on the VM with an SGX attribute file's descriptor (api.rst 7.24).
pub const KVM_CAP_SGX_ATTRIBUTE: u32 = 196;
/// `_IO(0xA4, 0x04)` on a /dev/sgx_vepc descriptor: EREMOVE every page (Linux 5.16).
pub const SGX_IOC_VEPC_REMOVE_ALL: libc::c_ulong =
    vmm_sys_util::ioctl::ioctl_expr(vmm_sys_util::ioctl::_IOC_NONE, 0xA4, 0x04, 0);

/// CPUID.(7,0):EBX bit 2.
pub(crate) const SGX: (u32, Reg, u32) = (0x7, Reg::Ebx, 2);
/// CPUID.(7,0):ECX bit 30: flexible launch control (the guest's own LE hash MSRs).
pub(crate) const SGX_LC: (u32, Reg, u32) = (0x7, Reg::Ecx, 30);
pub const LEAF_SGX: u32 = 0x12;
/// CPUID.(0x12,1):EAX bit 4: ECREATE may set SECS.ATTRIBUTES.PROVISIONKEY.
const ATTRIBUTE_PROVISIONKEY: u32 = 4;
/// The first sub-leaf of leaf 0x12 that describes an EPC section.
const FIRST_SECTION_SUBLEAF: u32 = 2;
/// Sub-leaf type 1 (EAX[3:0]): an EPC section.
const SUBLEAF_EPC_SECTION: u32 = 1;
/// Section property (ECX[3:0]) 1: confidentiality and integrity protected.
const SECTION_PROTECTED: u32 = 1;

/// EPC sections are whole 4 KiB pages.
pub const EPC_PAGE: u64 = 4096;
/// Linux reads at most this many sections (SGX_MAX_EPC_SECTIONS); QEMU probes as many.
pub const MAX_SECTIONS: usize = 8;
/// CPUID 0x12 gives a section's base and size 52 bits (bits 51:32 in EBX and EDX).
pub const ADDRESS_LIMIT: u64 = 1 << 52;

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

/// What a VM was given of SGX, as its vCPUs' CPUID describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SgxGuest {
    /// Where the EPC sections are; none hides SGX.
    pub sections: Vec<PlacedSection>,
    /// KVM granted the VM the PROVISIONKEY attribute (KVM_CAP_SGX_ATTRIBUTE).
    pub provision_key: bool,
}

impl SgxGuest {
    /// The whole EPC region (sections are back to back), if there is one.
    pub fn region(&self) -> Option<RamRange> {
        region(&self.sections)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EpcError {
    #[error(
        "at most {MAX_SECTIONS} EPC sections can be given (what a Linux guest reads); {0} were asked for"
    )]
    TooManySections(usize),
    #[error(
        "the EPC sections ({total} bytes from {base:#x}) end beyond the 52-bit guest-physical \
         addresses CPUID leaf 0x12 describes"
    )]
    TooLarge { base: u64, total: u64 },
    #[error(
        "the vCPU's CPUID has no room for {entries} more leaf 0x12 sub-leaves (KVM takes at most \
         {KVM_MAX_CPUID_ENTRIES} entries)"
    )]
    CpuidFull { entries: usize },
    #[error("cannot open {VEPC_PATH} for EPC section {index}: {source}")]
    Open { index: usize, source: std::io::Error },
    #[error("cannot map EPC section {index} ({size} bytes) from {VEPC_PATH}: {source}")]
    Map { index: usize, size: u64, source: std::io::Error },
    #[error("KVM refused EPC section {index} as memory slot {slot}: {source}")]
    RegisterSlot { index: usize, slot: u32, source: kvm_ioctls::Error },
}

impl FromStr for EpcSection {
    type Err = String;

    fn from_str(text: &str) -> Result<EpcSection, String> {
        parse_section(text)
    }
}

/// Parses `SIZE[,prefault]`: bytes, or a number with K, M, G or T (also KiB, MiB, GiB, TiB),
/// non-zero and a whole number of 4 KiB pages.
pub fn parse_section(text: &str) -> Result<EpcSection, String> {
    let mut parts = text.split(',');
    let size_text = parts.next().unwrap_or_default().trim();
    let mut prefault = false;
    for option in parts {
        match option.trim() {
            "prefault" => prefault = true,
            other => {
                return Err(format!("unknown EPC section option '{other}' (expected SIZE or SIZE,prefault)"))
            }
        }
    }
    let size = parse_size(size_text)?;
    if size == 0 {
        return Err("an EPC section cannot be empty: give a size such as 64M".into());
    }
    if size % EPC_PAGE != 0 {
        return Err(format!(
            "the EPC section size {size_text} ({size} bytes) is not a whole number of 4 KiB pages"
        ));
    }
    if size >= ADDRESS_LIMIT {
        return Err(format!("the EPC section size {size_text} is beyond what CPUID leaf 0x12 describes"));
    }
    Ok(EpcSection { size, prefault })
}

fn parse_size(text: &str) -> Result<u64, String> {
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return Err(format!("'{text}' is not a size: give bytes or K, M, G (64M, 32MiB, 1G, 4096)")),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size: give bytes or K, M, G (64M, 32MiB, 1G, 4096)"))?;
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("the EPC section size {text} is beyond what CPUID leaf 0x12 describes"))
}

/// Places `sections` back to back from the first 4 KiB boundary after guest RAM, which ends
/// at `ram_end`; RAM that ends below 4 GiB puts them at 4 GiB, clear of the MMIO gap.
pub fn place(sections: &[EpcSection], ram_end: u64) -> Result<Vec<PlacedSection>, EpcError> {
    if sections.len() > MAX_SECTIONS {
        return Err(EpcError::TooManySections(sections.len()));
    }
    let base = ram_end.max(MMIO_GAP_END).next_multiple_of(EPC_PAGE);
    // Each section is below 2^52 (parse_section), and there are at most 8: no overflow.
    let total: u64 = sections.iter().map(|s| s.size).sum();
    if base + total > ADDRESS_LIMIT {
        return Err(EpcError::TooLarge { base, total });
    }
    let mut at = base;
    Ok(sections
        .iter()
        .map(|section| {
            let placed = PlacedSection { base: at, size: section.size };
            at += section.size;
            placed
        })
        .collect())
}

/// The whole EPC region: from the first section's base to the last one's end.
pub fn region(placed: &[PlacedSection]) -> Option<RamRange> {
    let first = placed.first()?;
    let last = placed.last()?;
    Some(RamRange { base: first.base, size: last.base + last.size - first.base })
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

/// Hides SGX when no EPC section was placed. With sections, leaf 7's SGX and SGX_LC stay as KVM
/// offers them; sub-leaves 0 (SGX1/SGX2, MISCSELECT, enclave sizes) and 1 (SECS.ATTRIBUTES and
/// XFRM ECREATE may set) are KVM's, narrowed only: PROVISIONKEY goes unless the VM was granted
/// it; and sub-leaves 2 and on describe the sections, then an all-zero one ends the list.
pub(super) fn shape(cpuid: &mut CpuId, guest: &SgxGuest) -> Result<(), EpcError> {
    if guest.sections.is_empty() {
        for (function, register, bit) in [SGX, SGX_LC] {
            clear_bit(cpuid, function, 0, register, bit);
        }
        cpuid.retain(|e| e.function != LEAF_SGX);
        return Ok(());
    }
    let kept = cpuid.as_slice().iter().filter(|e| !is_section_leaf(e)).count();
    let entries = guest.sections.len() + 1;
    if kept + entries > KVM_MAX_CPUID_ENTRIES {
        return Err(EpcError::CpuidFull { entries });
    }
    cpuid.retain(|e| !is_section_leaf(e));
    for entry in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == LEAF_SGX) {
        entry.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        if entry.index == 1 && !guest.provision_key {
            entry.eax &= !(1 << ATTRIBUTE_PROVISIONKEY);
        }
    }
    let terminator = kvm_cpuid_entry2 {
        function: LEAF_SGX,
        index: FIRST_SECTION_SUBLEAF + guest.sections.len() as u32,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        ..Default::default()
    };
    for entry in guest.sections.iter().enumerate().map(|(i, s)| section_leaf(i, s)).chain([terminator]) {
        cpuid.push(entry).map_err(|_| EpcError::CpuidFull { entries })?;
    }
    Ok(())
}

fn is_section_leaf(entry: &kvm_cpuid_entry2) -> bool {
    entry.function == LEAF_SGX && entry.index >= FIRST_SECTION_SUBLEAF
}

/// CPUID.(0x12, 2 + `index`) for one section, as QEMU (`target/i386/cpu.c`, `case 0x12`) and
/// Cloud Hypervisor computed it; QEMU copies the property nibble from the host's first section,
/// which is 1 on every SGX part.
fn section_leaf(index: usize, section: &PlacedSection) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: LEAF_SGX,
        index: FIRST_SECTION_SUBLEAF + index as u32,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: (section.base as u32 & 0xffff_f000) | SUBLEAF_EPC_SECTION,
        ebx: (section.base >> 32) as u32 & 0xf_ffff,
        ecx: (section.size as u32 & 0xffff_f000) | SECTION_PROTECTED,
        edx: (section.size >> 32) as u32 & 0xf_ffff,
        ..Default::default()
    }
}

/// Asks KVM to let the VM's enclaves have the PROVISIONKEY attribute: KVM_ENABLE_CAP
/// (KVM_CAP_SGX_ATTRIBUTE) with a /dev/sgx_provision descriptor, which KVM only checks (it may
/// close afterwards). Whether KVM granted it; without, CPUID 0x12.1 EAX bit 4 stays clear.
pub fn grant_provision_key(vm: &VmFd) -> bool {
    let Ok(file) = open_provision() else { return false };
    let mut cap = kvm_enable_cap { cap: KVM_CAP_SGX_ATTRIBUTE, ..Default::default() };
    cap.args[0] = file.as_raw_fd() as u64;
    vm.enable_cap(&cap).is_ok()
}

/// A VM's virtual EPC: one /dev/sgx_vepc instance per section, mapped and registered with KVM.
/// The mappings go when it is dropped; the host frees the EPC pages when the descriptors close.
pub struct Epc {
    mappings: Vec<VepcMapping>,
    guest: SgxGuest,
}

/// One section's /dev/sgx_vepc instance and its shared mapping.
struct VepcMapping {
    file: File,
    /// The mapping's host address (a number, so the VM that owns it may move between threads).
    host: usize,
    len: usize,
}

impl VepcMapping {
    fn new(file: File, section: &EpcSection) -> std::io::Result<VepcMapping> {
        let len = section.size as usize;
        let populate = if section.prefault { libc::MAP_POPULATE } else { 0 };
        // SAFETY: a new shared mapping of `file` wherever the kernel chooses: no existing memory
        // is touched. /dev/sgx_vepc has no size: pages are EPC allocated as they are faulted.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE | populate,
                file.as_raw_fd(),
                0,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // EPC reads back as abort-page bytes on the host: keep it out of core dumps, as QEMU does.
        // SAFETY: advice on the mapping just made; it changes no contents.
        unsafe { libc::madvise(host, len, libc::MADV_DONTDUMP) };
        Ok(VepcMapping { file, host: host as usize, len })
    }
}

impl Drop for VepcMapping {
    fn drop(&mut self) {
        // SAFETY: `host` and `len` are this mapping's, made in `new` and unmapped only here;
        // carve never reads or writes EPC itself, so no reference into it outlives this.
        unsafe { libc::munmap(self.host as *mut libc::c_void, self.len) };
    }
}

impl Epc {
    /// Places `sections` after RAM (which ends at `ram_end`), maps each from its own
    /// /dev/sgx_vepc instance and registers them as KVM memory slots `first_slot`, … ; asks
    /// for PROVISIONKEY when the host offers it (`provision_offered`).
    pub fn new(
        vm: &VmFd,
        sections: &[EpcSection],
        ram_end: u64,
        first_slot: u32,
        provision_offered: bool,
    ) -> Result<Epc, EpcError> {
        let placed = place(sections, ram_end)?;
        let mut mappings = Vec::with_capacity(sections.len());
        for (index, (section, at)) in sections.iter().zip(&placed).enumerate() {
            let file = open_vepc().map_err(|source| EpcError::Open { index, source })?;
            let mapping = VepcMapping::new(file, section).map_err(|source| EpcError::Map {
                index,
                size: section.size,
                source,
            })?;
            let slot = first_slot + index as u32;
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: at.base,
                memory_size: at.size,
                userspace_addr: mapping.host as u64,
            };
            // SAFETY: the slot covers exactly this mapping, which lives as long as the `Epc`;
            // the VM's runner holds the `Epc` until the VM has ended. Were it unmapped earlier,
            // KVM's MMU notifier would drop the guest's view of it; no freed memory is used.
            unsafe { vm.set_user_memory_region(region) }.map_err(|source| EpcError::RegisterSlot {
                index,
                slot,
                source,
            })?;
            mappings.push(mapping);
        }
        let provision_key = provision_offered && grant_provision_key(vm);
        Ok(Epc { mappings, guest: SgxGuest { sections: placed, provision_key } })
    }

    /// Where the sections are and what KVM granted, for the vCPUs' CPUID.
    pub fn guest(&self) -> &SgxGuest {
        &self.guest
    }

    /// EREMOVEs every EPC page of every section (SGX_IOC_VEPC_REMOVE_ALL), so a guest that
    /// reboots in place finds its EPC uninitialised, as after a power cycle. A SECS page whose
    /// enclave's pages live in another section is left on the first pass and removed on a
    /// second over all sections, as QEMU does; returns how many pages still could not be.
    /// EBUSY means a vCPU was inside an enclave: call this with every vCPU paused.
    ///
    /// carve ends the VM on a guest reset, so nothing calls this today: closing the
    /// descriptors frees the pages.
    pub fn remove_all(&self) -> std::io::Result<u64> {
        let mut left = 0;
        for _pass in 0..2 {
            left = 0;
            for mapping in &self.mappings {
                // SAFETY: an argument-less ioctl on a /dev/sgx_vepc descriptor this `Epc` owns.
                let ret = unsafe { vmm_sys_util::ioctl::ioctl(&mapping.file, SGX_IOC_VEPC_REMOVE_ALL) };
                if ret < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                left += ret as u64;
            }
            if left == 0 {
                break;
            }
        }
        Ok(left)
    }
}

#[cfg(test)]
#[path = "sgx_tests.rs"]
mod tests;
