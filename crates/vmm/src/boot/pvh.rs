//! The Xen PVH boot protocol: `hvm_start_info` with command line, e820-style memory map and
//! the initrd as module 0, entered in flat 32-bit mode with EBX pointing at the start info.

use crate::memory::GuestRam;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::KernelLoaderResult;
use vm_memory::GuestAddress;

use super::linux::write_cmdline;
use super::{check_cmdline, load_initrd, BootError, BootSetup, EntryState, Image, KernelFormat};
use crate::layout::{BOOT_INFO_START, CMDLINE_MAX_SIZE, CMDLINE_START, MMIO_GAP_START};
use crate::memory::{e820_entries, RamRange};

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const MODLIST_START: u64 = BOOT_INFO_START + 0x40;
const MEMMAP_START: u64 = BOOT_INFO_START + 0x100;

pub(super) fn configure<I: Image>(
    mem: &GuestRam,
    result: &KernelLoaderResult,
    entry: GuestAddress,
    cmdline: &str,
    initrd: Option<&mut I>,
    reserved: &[RamRange],
) -> Result<BootSetup, BootError> {
    check_cmdline(cmdline, CMDLINE_MAX_SIZE)?;
    write_cmdline(mem, cmdline)?;
    let initrd = load_initrd(mem, initrd, result.kernel_end, MMIO_GAP_START)?;

    let memmap: Vec<_> = e820_entries(super::mem_size(mem), reserved)
        .into_iter()
        .map(|e| hvm_memmap_table_entry { addr: e.base, size: e.size, type_: e.kind, reserved: 0 })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        nr_modules: initrd.is_some() as u32,
        modlist_paddr: if initrd.is_some() { MODLIST_START } else { 0 },
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(BOOT_INFO_START));
    params.set_sections(&memmap, GuestAddress(MEMMAP_START));
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry { paddr, size, ..Default::default() };
        params.set_modules(&[module], GuestAddress(MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestRam>(&params, mem)?;
    Ok(BootSetup {
        format: KernelFormat::PvhElf,
        entry: EntryState::Protected32 { eip: entry.0, eax: 0, ebx: BOOT_INFO_START as u32 },
        kernel_end: result.kernel_end,
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{e820_map, MemoryBacking, E820_RAM, E820_RESERVED};
    use std::io::Cursor;
    use vm_memory::Bytes;

    /// The memory map PVH's start_info points at, for a 64 MiB guest.
    fn memory_map(reserved: &[RamRange]) -> Vec<(u64, u64, u32)> {
        let mem = crate::memory::create(64, MemoryBacking::Anonymous).unwrap();
        let result = KernelLoaderResult { kernel_end: 0x20_0000, ..Default::default() };
        configure::<Cursor<&[u8]>>(&mem, &result, GuestAddress(0x10_0000), "", None, reserved).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(BOOT_INFO_START)).unwrap();
        (0..u64::from(info.memmap_entries))
            .map(|i| {
                let at = GuestAddress(info.memmap_paddr + i * 24);
                let entry: hvm_memmap_table_entry = mem.read_obj(at).unwrap();
                (entry.addr, entry.size, entry.type_)
            })
            .collect()
    }

    #[test]
    fn the_start_info_map_marks_an_epc_reserved_and_is_unchanged_without_one() {
        let ram: Vec<_> = e820_map(64 << 20).iter().map(|r| (r.base, r.size, E820_RAM)).collect();
        assert_eq!(memory_map(&[]), ram);
        let epc = RamRange { base: 0x1_0000_0000, size: 4 << 20 };
        let mut expected = ram;
        expected.push((epc.base, epc.size, E820_RESERVED));
        assert_eq!(memory_map(&[epc]), expected);
    }
}
