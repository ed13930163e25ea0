//! Multiboot v1 (the format of kvm-unit-tests' x86 `*.flat` files): an ELF32 or ELF64 image
//! with a multiboot header in its first 8 KiB, loaded at its segments' physical addresses and
//! entered in flat 32-bit mode with EAX = 0x2BADB002 and EBX = `multiboot_info`.
//!
//! Such kernels may be linked low (realmode.flat at 16 KiB), so the information block and the
//! command line go on the page after the kernel, as QEMU places them, and a segment that would
//! overlap what carve writes below 1 MiB (boot GDT/IDT, MP and ACPI tables) is refused.

use crate::memory::GuestRam;
use object::read::elf::{FileHeader, ProgramHeader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{check_cmdline, load_initrd, BootError, BootSetup, EntryState, Image, KernelFormat, PAGE_SIZE};
use crate::layout::{BOOT_TABLES_END, CMDLINE_MAX_SIZE, EBDA_START, GDT_START, HIMEM_START, MMIO_GAP_START};
use crate::memory::{e820_entries, low_ram_end, RamRange};

/// The header must lie entirely within the image's first 8192 bytes, 32-bit aligned.
pub(super) const SEARCH_LIMIT: usize = 8192;
const HEADER_MAGIC: u32 = 0x1bad_b002;
const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;

const HEADER_PAGE_ALIGN: u32 = 1 << 0;
const HEADER_MEMORY_INFO: u32 = 1 << 1;
const HEADER_VIDEO_MODE: u32 = 1 << 2;

const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;

// Offsets in the information area: the block itself at 0, then its tables and strings.
const MMAP_OFFSET: u64 = 0x100;
const MODS_OFFSET: u64 = 0x300;
const LOADER_NAME_OFFSET: u64 = 0x340;
const MODULE_STRING_OFFSET: u64 = 0x360;
const CMDLINE_OFFSET: u64 = 0x400;

/// What carve writes below 1 MiB for every VM, which no kernel segment may overlap.
const CARVE_LOW_AREAS: [(u64, u64, &str); 2] = [
    (GDT_START, BOOT_TABLES_END, "carve's boot GDT and IDT"),
    (EBDA_START, HIMEM_START, "the MP table and ACPI area carve reserves"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultibootHeader {
    pub flags: u32,
}

/// Finds a multiboot v1 header (magic, flags, checksum summing to zero).
pub fn find_header(image: &[u8]) -> Option<MultibootHeader> {
    let words = image[..image.len().min(SEARCH_LIMIT)].chunks_exact(4);
    let words: Vec<u32> = words.map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect();
    words.windows(3).find_map(|w| {
        (w[0] == HEADER_MAGIC && w[0].wrapping_add(w[1]).wrapping_add(w[2]) == 0)
            .then_some(MultibootHeader { flags: w[1] })
    })
}

struct Loaded {
    entry: u64,
    end: u64,
}

fn load_segments<H: FileHeader>(mem: &GuestRam, data: &[u8]) -> Result<Loaded, BootError> {
    let elf_error = |e: object::Error| BootError::MultibootElf(e.to_string());
    let header = H::parse(data).map_err(elf_error)?;
    let endian = header.endian().map_err(elf_error)?;
    let mut end = 0;
    for segment in header.program_headers(endian, data).map_err(elf_error)? {
        if segment.p_type(endian) != object::elf::PT_LOAD {
            continue;
        }
        let addr: u64 = segment.p_paddr(endian).into();
        let size: u64 = segment.p_memsz(endian).into();
        let bytes = segment.data(endian, data).map_err(|()| {
            BootError::MultibootElf(format!("segment at {addr:#x} extends past the end of the file"))
        })?;
        let inside = addr.checked_add(size).is_some_and(|e| e <= MMIO_GAP_START)
            && (bytes.len() as u64) <= size
            && mem.check_range(GuestAddress(addr), size as usize);
        if !inside {
            return Err(BootError::SegmentOutsideRam { addr, size });
        }
        if let Some(&(start, end, what)) =
            CARVE_LOW_AREAS.iter().find(|&&(start, end, _)| addr < end && start < addr + size)
        {
            return Err(BootError::SegmentOverlapsCarve { addr, size, what, start, end });
        }
        mem.write_slice(bytes, GuestAddress(addr))?;
        end = end.max(addr + size);
    }
    if end == 0 {
        return Err(BootError::MultibootElf("it has no loadable segment".into()));
    }
    Ok(Loaded { entry: header.e_entry(endian).into(), end })
}

pub(super) fn load<K: Image, I: Image>(
    mem: &GuestRam,
    kernel: &mut K,
    size: u64,
    header: MultibootHeader,
    cmdline: &str,
    initrd: Option<&mut I>,
    reserved: &[RamRange],
) -> Result<BootSetup, BootError> {
    let required = header.flags & 0xffff;
    if required & HEADER_VIDEO_MODE != 0 {
        return Err(BootError::MultibootUnsupported("a video mode"));
    }
    if required & !(HEADER_PAGE_ALIGN | HEADER_MEMORY_INFO | HEADER_VIDEO_MODE) != 0 {
        return Err(BootError::MultibootUnsupported("an unknown required feature"));
    }
    let mut data = vec![0u8; size as usize];
    kernel.seek(std::io::SeekFrom::Start(0)).map_err(BootError::ReadKernel)?;
    kernel.read_exact(&mut data).map_err(BootError::ReadKernel)?;
    let loaded = match data.get(4) {
        Some(1) => load_segments::<object::elf::FileHeader32<object::Endianness>>(mem, &data)?,
        Some(2) => load_segments::<object::elf::FileHeader64<object::Endianness>>(mem, &data)?,
        _ => return Err(BootError::MultibootElf("unknown ELF class".into())),
    };

    check_cmdline(cmdline, CMDLINE_MAX_SIZE)?;
    let mut info = loaded.end.next_multiple_of(PAGE_SIZE);
    let size = CMDLINE_OFFSET + cmdline.len() as u64 + 1;
    if info < HIMEM_START && info + size > EBDA_START {
        // A low kernel ending just under the EBDA: its information goes above 1 MiB instead.
        info = HIMEM_START;
    }
    let info_end = info + size;
    if info_end > low_ram_end(mem).min(MMIO_GAP_START) {
        return Err(BootError::NoRoomForBootInfo { kernel_end: loaded.end });
    }
    mem.write_slice(cmdline.as_bytes(), GuestAddress(info + CMDLINE_OFFSET))?;
    mem.write_obj(0u8, GuestAddress(info + CMDLINE_OFFSET + cmdline.len() as u64))?;
    // (never below 1 MiB, where carve's MP and ACPI tables go)
    let initrd = load_initrd(mem, initrd, info_end.max(HIMEM_START), MMIO_GAP_START)?;
    write_info(mem, info, initrd, reserved)?;
    Ok(BootSetup {
        format: KernelFormat::Multiboot,
        entry: EntryState::Protected32 { eip: loaded.entry, eax: BOOTLOADER_MAGIC, ebx: info as u32 },
        kernel_end: loaded.end,
        initrd,
    })
}

/// Writes the information block at `info` (below the MMIO gap, so its 32-bit pointers hold).
fn write_info(
    mem: &GuestRam,
    info: u64,
    module: Option<(u64, u64)>,
    reserved: &[RamRange],
) -> Result<(), BootError> {
    let put32 = |offset: u64, value: u32| mem.write_obj(value, GuestAddress(info + offset));
    let map = e820_entries(super::mem_size(mem), reserved);
    for (i, range) in map.iter().enumerate() {
        let entry = info + MMAP_OFFSET + i as u64 * 24;
        mem.write_obj(20u32, GuestAddress(entry))?;
        mem.write_obj(range.base, GuestAddress(entry + 4))?;
        mem.write_obj(range.size, GuestAddress(entry + 12))?;
        mem.write_obj(range.kind, GuestAddress(entry + 20))?;
    }
    let mut flags = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME;
    put32(4, (EBDA_START / 1024) as u32)?;
    put32(8, ((low_ram_end(mem) - HIMEM_START) / 1024) as u32)?;
    put32(16, (info + CMDLINE_OFFSET) as u32)?;
    put32(44, (map.len() * 24) as u32)?;
    put32(48, (info + MMAP_OFFSET) as u32)?;
    mem.write_slice(b"carve\0", GuestAddress(info + LOADER_NAME_OFFSET))?;
    put32(64, (info + LOADER_NAME_OFFSET) as u32)?;
    if let Some((addr, size)) = module {
        flags |= INFO_MODS;
        let mods = info + MODS_OFFSET;
        mem.write_obj(addr as u32, GuestAddress(mods))?;
        mem.write_obj((addr + size) as u32, GuestAddress(mods + 4))?;
        mem.write_obj((info + MODULE_STRING_OFFSET) as u32, GuestAddress(mods + 8))?;
        mem.write_slice(b"initrd\0", GuestAddress(info + MODULE_STRING_OFFSET))?;
        put32(20, 1)?;
        put32(24, mods as u32)?;
    }
    put32(0, flags)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A multiboot ELF32 with one PT_LOAD segment of `data` at `paddr` (`memsz` with its bss).
    fn elf32(paddr: u32, data: &[u8], memsz: u32) -> Cursor<&'static [u8]> {
        let mut elf = vec![0u8; 0x54];
        elf[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 1, 1, 1]);
        let put16 = |elf: &mut Vec<u8>, at: usize, v: u16| elf[at..at + 2].copy_from_slice(&v.to_le_bytes());
        let put32 = |elf: &mut Vec<u8>, at: usize, v: u32| elf[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put16(&mut elf, 16, 2); // ET_EXEC
        put16(&mut elf, 18, 3); // EM_386
        put32(&mut elf, 20, 1);
        put32(&mut elf, 24, paddr); // entry
        put32(&mut elf, 28, 0x34); // program headers
        put16(&mut elf, 40, 0x34);
        put16(&mut elf, 42, 0x20);
        put16(&mut elf, 44, 1);
        for (at, v) in
            [(0, 1), (4, 0x54), (8, paddr), (12, paddr), (16, data.len() as u32), (20, memsz), (24, 7)]
        {
            put32(&mut elf, 0x34 + at, v);
        }
        elf.extend_from_slice(data);
        Cursor::new(Vec::leak(elf))
    }

    fn boot(paddr: u32, data: &[u8], memsz: u32) -> (GuestRam, Result<BootSetup, BootError>) {
        boot_reserving(paddr, data, memsz, &[])
    }

    fn boot_reserving(
        paddr: u32,
        data: &[u8],
        memsz: u32,
        reserved: &[RamRange],
    ) -> (GuestRam, Result<BootSetup, BootError>) {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let mut kernel = elf32(paddr, data, memsz);
        let size = kernel.get_ref().len() as u64;
        let header = MultibootHeader { flags: 0 };
        let result = load::<_, Cursor<&[u8]>>(&mem, &mut kernel, size, header, "k x=1", None, reserved);
        (mem, result)
    }

    /// The memory map a multiboot kernel reads: (base, length, type) per entry.
    fn memory_map(mem: &GuestRam, info: u64) -> Vec<(u64, u64, u32)> {
        let length: u32 = mem.read_obj(GuestAddress(info + 44)).unwrap();
        let addr: u32 = mem.read_obj(GuestAddress(info + 48)).unwrap();
        (0..u64::from(length) / 24)
            .map(|i| {
                let entry = u64::from(addr) + i * 24;
                assert_eq!(mem.read_obj::<u32>(GuestAddress(entry)).unwrap(), 20);
                (
                    mem.read_obj(GuestAddress(entry + 4)).unwrap(),
                    mem.read_obj(GuestAddress(entry + 12)).unwrap(),
                    mem.read_obj(GuestAddress(entry + 20)).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn the_memory_map_marks_an_epc_reserved_and_is_unchanged_without_one() {
        use crate::memory::{e820_map, E820_RAM, E820_RESERVED};
        let ram: Vec<_> = e820_map(16 << 20).iter().map(|r| (r.base, r.size, E820_RAM)).collect();
        let (mem, setup) = boot(0x20_0000, &[0x90; 16], 0x1000);
        let EntryState::Protected32 { ebx, .. } = setup.unwrap().entry else { panic!("32-bit entry") };
        assert_eq!(memory_map(&mem, ebx.into()), ram);

        let epc = RamRange { base: 0x1_0000_0000, size: 64 << 20 };
        let (mem, setup) = boot_reserving(0x20_0000, &[0x90; 16], 0x1000, &[epc]);
        let EntryState::Protected32 { ebx, .. } = setup.unwrap().entry else { panic!("32-bit entry") };
        let mut expected = ram;
        expected.push((epc.base, epc.size, E820_RESERVED));
        assert_eq!(memory_map(&mem, ebx.into()), expected);
    }

    #[test]
    fn a_kernel_linked_low_keeps_its_bytes_and_finds_its_info_after_itself() {
        // realmode.flat's shape: 16 KiB up, over the 0x6000 carve uses for PVH's start_info.
        let data: Vec<u8> = (0..0x2800u32).map(|i| (i * 7 + 3) as u8).collect();
        let (mem, setup) = boot(0x4000, &data, 0x2900);
        let EntryState::Protected32 { ebx, .. } = setup.unwrap().entry else { panic!("32-bit entry") };
        assert_eq!(ebx, 0x7000, "the page after the kernel's bss");
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, GuestAddress(0x4000)).unwrap();
        assert!(back == data, "the loader wrote over the kernel");
        let cmdline: u32 = mem.read_obj(GuestAddress(0x7000 + 16)).unwrap();
        let mut text = [0u8; 6];
        mem.read_slice(&mut text, GuestAddress(cmdline.into())).unwrap();
        assert_eq!(&text, b"k x=1\0");
    }

    #[test]
    fn information_never_lands_on_the_mp_table() {
        // A kernel ending just under the EBDA (0x9fc00): its information goes to 1 MiB.
        let (mem, setup) = boot(0x4000, &[0x90; 16], 0x9f800 - 0x4000);
        let EntryState::Protected32 { ebx, .. } = setup.unwrap().entry else { panic!("32-bit entry") };
        assert_eq!(u64::from(ebx), HIMEM_START);
        let cmdline: u32 = mem.read_obj(GuestAddress(HIMEM_START + 16)).unwrap();
        assert!(u64::from(cmdline) > HIMEM_START);
    }

    #[test]
    fn segments_over_carves_low_structures_are_refused() {
        for (paddr, what) in [(0x400, "boot GDT"), (0x9f000, "MP table"), (0xf0000, "MP table")] {
            let error = boot(paddr, &[0x90; 16], 0x1000).1.unwrap_err().to_string();
            assert!(error.contains(what) && error.contains(&format!("{paddr:#x}")), "{error}");
        }
    }

    #[test]
    fn header_needs_magic_and_checksum() {
        let mut image = vec![0u8; 64];
        let words = [HEADER_MAGIC, 3, 0u32.wrapping_sub(HEADER_MAGIC + 3)];
        for (i, w) in words.iter().enumerate() {
            image[16 + i * 4..20 + i * 4].copy_from_slice(&w.to_le_bytes());
        }
        assert_eq!(find_header(&image), Some(MultibootHeader { flags: 3 }));
        image[24] ^= 1;
        assert_eq!(find_header(&image), None);
    }

    #[test]
    fn header_past_eight_kib_is_not_found() {
        let mut image = vec![0u8; SEARCH_LIMIT + 16];
        let words = [HEADER_MAGIC, 0, 0u32.wrapping_sub(HEADER_MAGIC)];
        for (i, w) in words.iter().enumerate() {
            image[SEARCH_LIMIT + i * 4..SEARCH_LIMIT + 4 + i * 4].copy_from_slice(&w.to_le_bytes());
        }
        assert_eq!(find_header(&image), None);
    }
}
