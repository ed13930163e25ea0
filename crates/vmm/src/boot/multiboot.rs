//! Multiboot v1 (the format of kvm-unit-tests' x86 `*.flat` files): an ELF32 or ELF64 image
//! with a multiboot header in its first 8 KiB, loaded at its segments' physical addresses and
//! entered in flat 32-bit mode with EAX = 0x2BADB002 and EBX = `multiboot_info`.

use object::read::elf::{FileHeader, ProgramHeader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::linux::write_cmdline;
use super::{check_cmdline, load_initrd, BootError, BootSetup, EntryState, Image, KernelFormat};
use crate::layout::{
    BOOT_INFO_START, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START,
};
use crate::memory::{e820_map, low_ram_end};

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

const MMAP_START: u64 = BOOT_INFO_START + 0x100;
const MODS_START: u64 = BOOT_INFO_START + 0x300;
const LOADER_NAME_START: u64 = BOOT_INFO_START + 0x340;
const MODULE_STRING_START: u64 = BOOT_INFO_START + 0x360;

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

fn load_segments<H: FileHeader>(mem: &GuestMemoryMmap, data: &[u8]) -> Result<Loaded, BootError> {
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
        mem.write_slice(bytes, GuestAddress(addr))?;
        end = end.max(addr + size);
    }
    if end == 0 {
        return Err(BootError::MultibootElf("it has no loadable segment".into()));
    }
    Ok(Loaded { entry: header.e_entry(endian).into(), end })
}

pub(super) fn load<K: Image, I: Image>(
    mem: &GuestMemoryMmap,
    kernel: &mut K,
    size: u64,
    header: MultibootHeader,
    cmdline: &str,
    initrd: Option<&mut I>,
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
    write_cmdline(mem, cmdline)?;
    let initrd = load_initrd(mem, initrd, loaded.end, MMIO_GAP_START)?;
    write_info(mem, initrd)?;
    Ok(BootSetup {
        format: KernelFormat::Multiboot,
        entry: EntryState::Protected32 {
            eip: loaded.entry,
            eax: BOOTLOADER_MAGIC,
            ebx: BOOT_INFO_START as u32,
        },
        kernel_end: loaded.end,
        initrd,
    })
}

fn write_info(mem: &GuestMemoryMmap, module: Option<(u64, u64)>) -> Result<(), BootError> {
    let put32 = |offset: u64, value: u32| mem.write_obj(value, GuestAddress(BOOT_INFO_START + offset));
    let map = e820_map(super::mem_size(mem));
    for (i, range) in map.iter().enumerate() {
        let entry = MMAP_START + i as u64 * 24;
        mem.write_obj(20u32, GuestAddress(entry))?;
        mem.write_obj(range.base, GuestAddress(entry + 4))?;
        mem.write_obj(range.size, GuestAddress(entry + 12))?;
        mem.write_obj(1u32, GuestAddress(entry + 20))?;
    }
    let mut flags = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME;
    put32(4, (EBDA_START / 1024) as u32)?;
    put32(8, ((low_ram_end(mem) - HIMEM_START) / 1024) as u32)?;
    put32(16, CMDLINE_START as u32)?;
    put32(44, (map.len() * 24) as u32)?;
    put32(48, MMAP_START as u32)?;
    mem.write_slice(b"carve\0", GuestAddress(LOADER_NAME_START))?;
    put32(64, LOADER_NAME_START as u32)?;
    if let Some((addr, size)) = module {
        flags |= INFO_MODS;
        mem.write_obj(addr as u32, GuestAddress(MODS_START))?;
        mem.write_obj((addr + size) as u32, GuestAddress(MODS_START + 4))?;
        mem.write_obj(MODULE_STRING_START as u32, GuestAddress(MODS_START + 8))?;
        mem.write_slice(b"initrd\0", GuestAddress(MODULE_STRING_START))?;
        put32(20, 1)?;
        put32(24, MODS_START as u32)?;
    }
    put32(0, flags)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
