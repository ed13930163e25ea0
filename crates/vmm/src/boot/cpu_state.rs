//! The register state each boot protocol starts the boot vCPU in, and the GDT and identity
//! page tables that state refers to.

use crate::memory::GuestRam;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{BOOT_STACK_POINTER, GDT_START, IDT_START, PDPT_START, PD_START, PML4_START};

use crate::x86::{CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, RFLAGS_FIXED_1};

/// Selectors the Linux boot protocol requires (__BOOT_CS, __BOOT_DS); PVH and multiboot use
/// the same flat layout with a 32-bit code segment.
pub const CODE_SELECTOR: u16 = 0x10;
pub const DATA_SELECTOR: u16 = 0x18;
pub const TSS_SELECTOR: u16 = 0x20;

#[derive(Debug, thiserror::Error)]
pub enum CpuStateError {
    #[error("cannot write boot structures into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("cannot set the boot vCPU's {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    /// Long mode with paging on carve's identity map (Linux 64-bit boot protocol).
    Long64 { rip: u64, rsi: u64 },
    /// Flat 32-bit protected mode, paging off (PVH and multiboot).
    Protected32 { eip: u64, eax: u32, ebx: u32 },
}

/// Packs a GDT descriptor from access/flags bits (`0xFA0AA` style: flags in 15:12, access in
/// 7:0), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The `kvm_segment` a descriptor at GDT index `selector >> 3` loads.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = (entry >> 55) & 1 == 1;
    kvm_segment {
        base,
        limit: if granular { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
    }
}

fn boot_gdt(long_mode: bool) -> [u64; 5] {
    let code = if long_mode { 0xa09b } else { 0xc09b };
    [0, 0, gdt_entry(code, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x008b, 0, 0x67)]
}

/// Identity-maps the low 4 GiB with 2 MiB pages.
fn write_page_tables(mem: &GuestRam) -> Result<(), CpuStateError> {
    mem.write_obj(PDPT_START | 0x3, GuestAddress(PML4_START))?;
    for i in 0..4u64 {
        mem.write_obj((PD_START + i * 0x1000) | 0x3, GuestAddress(PDPT_START + i * 8))?;
    }
    for i in 0..2048u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD_START + i * 8))?;
    }
    Ok(())
}

/// The special registers for `entry`, with its GDT (and page tables) written to guest memory.
pub fn boot_sregs(
    mem: &GuestRam,
    entry: EntryState,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, CpuStateError> {
    let long_mode = matches!(entry, EntryState::Long64 { .. });
    let gdt = boot_gdt(long_mode);
    for (i, descriptor) in gdt.iter().enumerate() {
        mem.write_obj(*descriptor, GuestAddress(GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))?;

    let code = segment_from_gdt(gdt[2], CODE_SELECTOR);
    let data = segment_from_gdt(gdt[3], DATA_SELECTOR);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[4], TSS_SELECTOR);
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if long_mode {
        write_page_tables(mem)?;
        sregs.cr3 = PML4_START;
        sregs.cr4 |= CR4_PAE;
        sregs.cr0 |= CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    }
    Ok(sregs)
}

pub fn boot_regs(entry: EntryState) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_FIXED_1,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        ..Default::default()
    };
    match entry {
        EntryState::Long64 { rip, rsi } => {
            regs.rip = rip;
            regs.rsi = rsi;
        }
        EntryState::Protected32 { eip, eax, ebx } => {
            regs.rip = eip;
            regs.rax = eax.into();
            regs.rbx = ebx.into();
        }
    }
    regs
}

/// Puts the boot vCPU at `entry`.
pub fn apply(vcpu: &VcpuFd, mem: &GuestRam, entry: EntryState) -> Result<(), CpuStateError> {
    let kvm = |what| move |source| CpuStateError::Kvm { what, source };
    let sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    vcpu.set_sregs(&boot_sregs(mem, entry, sregs)?).map_err(kvm("special registers"))?;
    vcpu.set_regs(&boot_regs(entry)).map_err(kvm("registers"))?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU state"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode_to_flat_segments() {
        let code64 = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), CODE_SELECTOR);
        assert_eq!((code64.base, code64.limit, code64.l, code64.db), (0, 0xffff_ffff, 1, 0));
        assert_eq!((code64.type_, code64.s, code64.present, code64.g), (0xb, 1, 1, 1));
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), DATA_SELECTOR);
        assert_eq!((data.type_, data.db, data.l, data.limit), (0x3, 1, 0, 0xffff_ffff));
        let tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), TSS_SELECTOR);
        assert_eq!((tss.type_, tss.s, tss.g, tss.limit, tss.unusable), (0xb, 0, 0, 0x67, 0));
    }

    #[test]
    fn long_mode_state_enables_paging_on_the_identity_map() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let sregs =
            boot_sregs(&mem, EntryState::Long64 { rip: 0x100200, rsi: 0x7000 }, Default::default()).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & CR0_PG, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        let pde: u64 = mem.read_obj(GuestAddress(PD_START + 8 * 2047)).unwrap();
        assert_eq!(pde, (2047 << 21) | 0x83);
        let flat =
            boot_sregs(&mem, EntryState::Protected32 { eip: 0, eax: 0, ebx: 0 }, Default::default()).unwrap();
        assert_eq!((flat.cr0 & CR0_PG, flat.efer, flat.cs.db, flat.cs.l), (0, 0, 1, 0));
    }
}
