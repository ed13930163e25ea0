//! Loading a kernel by the boot protocol its file announces, and starting the boot vCPU where
//! that protocol says.
//!
//! | file                              | protocol                                  |
//! |-----------------------------------|-------------------------------------------|
//! | bzImage (`HdrS` at 0x202)         | Linux 64-bit boot: zero page, long mode   |
//! | ELF64 with a Xen PVH note         | PVH: `hvm_start_info`, 32-bit flat mode   |
//! | ELF32/64 with a multiboot v1 header | multiboot: `multiboot_info`, EAX magic  |
//! | ELF64 vmlinux without either      | Linux 64-bit boot from the ELF entry      |

pub mod cpu_state;
pub mod eif;
mod linux;
mod multiboot;
mod pvh;

use crate::memory::GuestRam;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{GuestAddress, ReadVolatile};

pub use cpu_state::EntryState;

use crate::layout::{CMDLINE_MAX_SIZE, HIMEM_START};
use crate::memory::{low_ram_end, RamRange};

pub(super) const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read the kernel image: {0}")]
    ReadKernel(#[source] std::io::Error),
    #[error(
        "unrecognised kernel format: expected a bzImage, an ELF vmlinux (with or without a PVH \
         note) or a multiboot v1 ELF"
    )]
    UnknownFormat,
    #[error("the kernel ({size} bytes) is larger than guest memory ({memory} bytes)")]
    KernelTooLarge { size: u64, memory: u64 },
    #[error("cannot load the kernel: {0}")]
    Load(#[from] linux_loader::loader::Error),
    #[error(
        "the initrd ({size} bytes) does not fit in guest memory above the kernel (room for {room} bytes)"
    )]
    InitrdTooLarge { size: u64, room: u64 },
    #[error("cannot read the initrd: {0}")]
    ReadInitrd(#[source] std::io::Error),
    #[error("the kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("the multiboot kernel is not a loadable ELF: {0}")]
    MultibootElf(String),
    #[error("the multiboot header requests {0}, which carve does not provide")]
    MultibootUnsupported(&'static str),
    #[error("the kernel segment at {addr:#x} ({size} bytes) lies outside guest RAM")]
    SegmentOutsideRam { addr: u64, size: u64 },
    #[error("the kernel segment at {addr:#x} ({size} bytes) overlaps {what} ({start:#x}-{end:#x})")]
    SegmentOverlapsCarve { addr: u64, size: u64, what: &'static str, start: u64, end: u64 },
    #[error(
        "no room in guest RAM below 4 GiB after the kernel (which ends at {kernel_end:#x}) for the \
         multiboot information; give the VM more memory"
    )]
    NoRoomForBootInfo { kernel_end: u64 },
    #[error("cannot write boot parameters: {0}")]
    Configure(#[from] linux_loader::configurator::Error),
    #[error("the enclave image is not bootable: {0}")]
    Eif(String),
    #[error(
        "the enclave image ({size} bytes) and a copy of its ramdisks ({ramdisks} bytes) do not fit \
         in guest memory above 8 MiB ({room} bytes); give the VM more memory"
    )]
    EifTooLarge { size: u64, ramdisks: u64, room: u64 },
    #[error("cannot write boot structures into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// The kernel file formats carve recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    PvhElf,
    Multiboot,
    LinuxElf,
}

impl KernelFormat {
    pub fn name(self) -> &'static str {
        match self {
            KernelFormat::BzImage => "bzImage (Linux 64-bit boot protocol)",
            KernelFormat::PvhElf => "ELF with PVH entry",
            KernelFormat::Multiboot => "multiboot v1 ELF",
            KernelFormat::LinuxElf => "ELF vmlinux (Linux 64-bit boot protocol)",
        }
    }
}

/// Something a kernel or initrd can be loaded from: a file or an embedded image.
pub trait Image: Read + ReadVolatile + Seek {}
impl<T: Read + ReadVolatile + Seek> Image for T {}

/// A kernel or initrd image: a file, one built into the binary, or part of an enclave image
/// already in guest memory.
pub enum KernelImage {
    File(std::fs::File),
    Embedded(std::io::Cursor<&'static [u8]>),
    Guest(eif::GuestBytes),
}

impl Read for KernelImage {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            KernelImage::File(f) => f.read(buf),
            KernelImage::Embedded(c) => c.read(buf),
            KernelImage::Guest(g) => g.read(buf),
        }
    }
}

impl Seek for KernelImage {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        match self {
            KernelImage::File(f) => f.seek(pos),
            KernelImage::Embedded(c) => c.seek(pos),
            KernelImage::Guest(g) => g.seek(pos),
        }
    }
}

impl ReadVolatile for KernelImage {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        match self {
            KernelImage::File(f) => f.read_volatile(buf),
            KernelImage::Embedded(c) => c.read_volatile(buf),
            KernelImage::Guest(g) => g.read_volatile(buf),
        }
    }
}

/// What to boot.
pub struct BootSource<'a, K: Image, I: Image> {
    pub kernel: &'a mut K,
    /// Shown to multiboot kernels as argv[0].
    pub kernel_name: &'a str,
    pub cmdline: &'a str,
    pub initrd: Option<&'a mut I>,
}

/// What was loaded, and where the boot vCPU starts.
#[derive(Clone, Copy, Debug)]
pub struct BootSetup {
    pub format: KernelFormat,
    pub entry: EntryState,
    pub kernel_end: u64,
    /// Guest-physical address and size of the initrd (or multiboot module / PVH module).
    pub initrd: Option<(u64, u64)>,
}

/// Reads the start of the file and names its format. ELF files are told apart by their notes
/// and headers in [`load`].
pub fn sniff(header: &[u8]) -> Option<&'static str> {
    if header.len() >= 0x206 && &header[0x202..0x206] == b"HdrS" && header[0x1fe..0x200] == [0x55, 0xaa] {
        Some("bzimage")
    } else if header.starts_with(b"\x7fELF") {
        Some("elf")
    } else {
        None
    }
}

/// Loads kernel, command line and initrd into `mem` and returns where to start.
pub fn load<K: Image, I: Image>(
    mem: &GuestRam,
    source: BootSource<'_, K, I>,
) -> Result<BootSetup, BootError> {
    load_with_reserved(mem, source, &[])
}

/// [`load`], with `reserved` ranges (a virtual EPC) in the memory map every protocol hands over.
pub fn load_with_reserved<K: Image, I: Image>(
    mem: &GuestRam,
    source: BootSource<'_, K, I>,
    reserved: &[RamRange],
) -> Result<BootSetup, BootError> {
    if source.cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let kernel = source.kernel;
    let size = kernel.seek(SeekFrom::End(0)).map_err(BootError::ReadKernel)?;
    let memory: u64 = mem_size(mem);
    if size > memory {
        return Err(BootError::KernelTooLarge { size, memory });
    }
    let mut header = vec![0u8; size.min(multiboot::SEARCH_LIMIT as u64) as usize];
    kernel.seek(SeekFrom::Start(0)).map_err(BootError::ReadKernel)?;
    kernel.read_exact(&mut header).map_err(BootError::ReadKernel)?;

    let initrd = source.initrd;
    match sniff(&header) {
        Some("bzimage") => linux::load_bzimage(mem, kernel, source.cmdline, initrd, reserved),
        Some("elf") => {
            let multiboot_header = multiboot::find_header(&header);
            let is_elf64 = header.get(4) == Some(&2);
            if is_elf64 {
                let loaded = Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)));
                if let Ok(result) = &loaded {
                    if let PvhBootCapability::PvhEntryPresent(entry) = result.pvh_boot_cap {
                        return pvh::configure(mem, result, entry, source.cmdline, initrd, reserved);
                    }
                }
                if multiboot_header.is_none() {
                    return linux::configure_elf(mem, &loaded?, source.cmdline, initrd, reserved);
                }
            }
            match multiboot_header {
                Some(mb) => {
                    let cmdline = match source.cmdline {
                        "" => source.kernel_name.to_string(),
                        text => format!("{} {}", source.kernel_name, text),
                    };
                    multiboot::load(mem, kernel, size, mb, &cmdline, initrd, reserved)
                }
                None => Err(BootError::UnknownFormat),
            }
        }
        _ => Err(BootError::UnknownFormat),
    }
}

fn mem_size(mem: &GuestRam) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().map(|r| r.len()).sum()
}

fn check_cmdline(cmdline: &str, max: usize) -> Result<(), BootError> {
    let max = max.min(CMDLINE_MAX_SIZE - 1);
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong { len: cmdline.len(), max });
    }
    Ok(())
}

/// Copies the initrd to the highest page-aligned place in low RAM below `limit` that stays
/// above the kernel. Returns its address and size.
fn load_initrd<I: Image>(
    mem: &GuestRam,
    initrd: Option<&mut I>,
    kernel_end: u64,
    limit: u64,
) -> Result<Option<(u64, u64)>, BootError> {
    let Some(initrd) = initrd else { return Ok(None) };
    let size = initrd.seek(SeekFrom::End(0)).map_err(BootError::ReadInitrd)?;
    initrd.seek(SeekFrom::Start(0)).map_err(BootError::ReadInitrd)?;
    let top = low_ram_end(mem).min(limit);
    let floor = kernel_end.next_multiple_of(PAGE_SIZE);
    let room = top.saturating_sub(floor);
    if size > room {
        return Err(BootError::InitrdTooLarge { size, room });
    }
    let addr = (top - size) & !(PAGE_SIZE - 1);
    use vm_memory::Bytes;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, size as usize)
        .map_err(|e| BootError::ReadInitrd(std::io::Error::other(e)))?;
    Ok(Some((addr, size)))
}
