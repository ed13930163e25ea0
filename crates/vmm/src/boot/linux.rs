//! The Linux x86 64-bit boot protocol: a zero page (`boot_params`) with the image's setup
//! header, e820 map, command line and initrd, entered in long mode at the 64-bit entry.

use crate::memory::GuestRam;
use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::{KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress};

use super::{check_cmdline, load_initrd, BootError, BootSetup, EntryState, Image, KernelFormat};
use crate::layout::{CMDLINE_START, HIMEM_START, ZERO_PAGE_START};
use crate::memory::{e820_entries, RamRange};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XLF_KERNEL_64: u16 = 1;
/// The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;
/// initrd_addr_max for boot protocols before 2.03.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

pub(super) fn load_bzimage<K: Image, I: Image>(
    mem: &GuestRam,
    kernel: &mut K,
    cmdline: &str,
    initrd: Option<&mut I>,
    reserved: &[RamRange],
) -> Result<BootSetup, BootError> {
    let result = BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))?;
    let header = result.setup_header.expect("the bzImage loader returns the setup header");
    if header.version >= 0x020c && header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::Load(linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::InvalidBzImage,
        )));
    }
    let entry = result.kernel_load.0 + STARTUP_64_OFFSET;
    let loaded = Kernel { result: &result, header: Some(header), entry, format: KernelFormat::BzImage };
    finish(mem, &loaded, cmdline, initrd, reserved)
}

pub(super) fn configure_elf<I: Image>(
    mem: &GuestRam,
    result: &KernelLoaderResult,
    cmdline: &str,
    initrd: Option<&mut I>,
    reserved: &[RamRange],
) -> Result<BootSetup, BootError> {
    let loaded = Kernel { result, header: None, entry: result.kernel_load.0, format: KernelFormat::LinuxElf };
    finish(mem, &loaded, cmdline, initrd, reserved)
}

/// A loaded kernel: where it went, its setup header (a bzImage's), where it starts.
struct Kernel<'a> {
    result: &'a KernelLoaderResult,
    header: Option<setup_header>,
    entry: u64,
    format: KernelFormat,
}

fn finish<I: Image>(
    mem: &GuestRam,
    loaded: &Kernel<'_>,
    cmdline: &str,
    initrd: Option<&mut I>,
    reserved: &[RamRange],
) -> Result<BootSetup, BootError> {
    let Kernel { result, header: image_header, entry, format } = *loaded;
    let mut params = boot_params::default();
    if let Some(header) = image_header {
        params.hdr = header;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    let cmdline_max = match image_header {
        Some(h) if h.version >= 0x0206 => h.cmdline_size as usize,
        Some(_) => 255,
        None => usize::MAX,
    };
    check_cmdline(cmdline, cmdline_max)?;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    write_cmdline(mem, cmdline)?;

    let initrd_max = match image_header {
        Some(h) if h.version >= 0x0203 => h.initrd_addr_max as u64 + 1,
        _ => DEFAULT_INITRD_ADDR_MAX + 1,
    };
    let initrd = load_initrd(mem, initrd, result.kernel_end, initrd_max)?;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let map = e820_entries(crate::boot::mem_size(mem), reserved);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry { addr: entry.base, size: entry.size, r#type: entry.kind };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;

    let zero_page = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestRam>(&zero_page, mem)?;
    Ok(BootSetup {
        format,
        entry: EntryState::Long64 { rip: entry, rsi: ZERO_PAGE_START },
        kernel_end: result.kernel_end,
        initrd,
    })
}

/// Writes a NUL-terminated command line at [`CMDLINE_START`].
pub(super) fn write_cmdline(mem: &GuestRam, cmdline: &str) -> Result<(), BootError> {
    mem.write_slice(cmdline.as_bytes(), GuestAddress(CMDLINE_START))?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_START + cmdline.len() as u64))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{e820_map, MemoryBacking, E820_RAM, E820_RESERVED};
    use std::io::Cursor;

    const E820_ENTRIES: usize = 0x1e8;
    const E820_TABLE: usize = 0x2d0;

    /// The zero page a Linux ELF boot writes for a 64 MiB guest, and its e820 map.
    fn zero_page(reserved: &[RamRange]) -> (Vec<u8>, Vec<(u64, u64, u32)>) {
        let mem = crate::memory::create(64, MemoryBacking::Anonymous).unwrap();
        let result = KernelLoaderResult {
            kernel_load: GuestAddress(HIMEM_START),
            kernel_end: HIMEM_START + 0x1000,
            ..Default::default()
        };
        configure_elf::<Cursor<&[u8]>>(&mem, &result, "console=ttyS0", None, reserved).unwrap();
        let mut page = vec![0u8; std::mem::size_of::<boot_params>()];
        mem.read_slice(&mut page, GuestAddress(ZERO_PAGE_START)).unwrap();
        let map = (0..page[E820_ENTRIES] as usize)
            .map(|i| {
                let e = &page[E820_TABLE + i * 20..];
                (
                    u64::from_le_bytes(e[..8].try_into().unwrap()),
                    u64::from_le_bytes(e[8..16].try_into().unwrap()),
                    u32::from_le_bytes(e[16..20].try_into().unwrap()),
                )
            })
            .collect();
        (page, map)
    }

    #[test]
    fn the_zero_page_map_marks_an_epc_reserved_and_is_unchanged_without_one() {
        let ram: Vec<_> = e820_map(64 << 20).iter().map(|r| (r.base, r.size, E820_RAM)).collect();
        let (plain_page, plain) = zero_page(&[]);
        assert_eq!(plain, ram);

        let epc = RamRange { base: 0x1_0000_0000, size: 96 << 20 };
        let (epc_page, with_epc) = zero_page(&[epc]);
        let mut expected = ram.clone();
        expected.push((epc.base, epc.size, E820_RESERVED));
        assert_eq!(with_epc, expected);
        // Only the entry count and the new entry differ.
        let new_entry = E820_TABLE + ram.len() * 20..E820_TABLE + (ram.len() + 1) * 20;
        let differing = (0..plain_page.len()).filter(|&i| plain_page[i] != epc_page[i]);
        assert!(differing.into_iter().all(|i| i == E820_ENTRIES || new_entry.contains(&i)));
    }
}
