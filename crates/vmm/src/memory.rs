//! Guest RAM: anonymous, shared memfd or hugetlb mappings split around the MMIO gap below
//! 4 GiB, optionally mergeable by KSM, registered with KVM (docs/memory.md).

pub use carve_virtio::GuestRam;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::bitmap::NewBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// The page size of guest RAM as carve tracks it: KVM's dirty log, vm-memory's bitmap, the
/// snapshot's holes and migration's pages.
pub const PAGE_SIZE: u64 = 4096;

static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// Whether `page` (at most a page) is all zeros: one memcmp, fast even in debug builds.
pub fn is_zero_page(page: &[u8]) -> bool {
    page == &ZERO_PAGE[..page.len().min(ZERO_PAGE.len())]
}

/// A page of zeros, to write where a page became zero.
pub fn zero_page() -> &'static [u8] {
    &ZERO_PAGE
}

/// The smallest guest carve builds: room for boot structures, a kernel at 1 MiB and a stack.
pub const MIN_MEMORY_MIB: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is too small: carve needs at least {MIN_MEMORY_MIB} MiB")]
    TooSmall(u64),
    #[error(
        "cannot map {0} MiB of guest memory: its dirty bitmap alone is more than this host can allocate"
    )]
    TooLarge(u64),
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map { mib: u64, source: vm_memory::mmap::FromRangesError },
    #[error("KVM refused guest memory slot {slot}: {source}")]
    RegisterSlot { slot: u32, source: kvm_ioctls::Error },
    #[error(
        "not enough free hugepages for {mib} MiB of guest memory ({missing_mib} MiB short); reserve \
         more with `carve allocator`"
    )]
    InsufficientHugepages { mib: u64, missing_mib: u64 },
    #[error("cannot map {mib} MiB of guest memory from the snapshot's memory file: {detail}")]
    MapFile { mib: u64, detail: String },
    #[error("cannot map {mib} MiB of hugepage memory: {source}")]
    MapHugepages { mib: u64, source: vm_memory::mmap::MmapRegionError },
    #[error("guest memory of {mib} MiB is not a whole number of {page} hugepages (backing={backing})")]
    NotHugepageMultiple { mib: u64, page: &'static str, backing: &'static str },
    #[error(
        "not enough free {page} hugepages for {mib} MiB of guest memory: {needed} needed, {free} free; \
         reserve more in {pool}"
    )]
    HugetlbShort { mib: u64, page: &'static str, needed: u64, free: u64, pool: String },
    #[error("{}", not_mergeable_reason(*.0))]
    NotMergeable(MemoryBacking),
    #[error("cannot back {mib} MiB of guest memory with a memfd: {detail}")]
    Memfd { mib: u64, detail: String },
    #[error("cannot make guest memory mergeable (madvise MADV_MERGEABLE): {0}")]
    Mergeable(std::io::Error),
}

/// Why `mergeable=on` cannot go with `backing`.
fn not_mergeable_reason(backing: MemoryBacking) -> String {
    let why = match backing {
        MemoryBacking::Memfd => "memfd memory is shared (MAP_SHARED), so it cannot be mergeable",
        MemoryBacking::Hugetlb2M | MemoryBacking::Hugetlb1G | MemoryBacking::Hugepages => {
            "hugetlb pages are never merged, so they cannot be mergeable"
        }
        MemoryBacking::Anonymous => "anonymous memory can be mergeable",
    };
    format!(
        "backing={} cannot be mergeable=on: KSM merges only private anonymous pages, and {why}",
        backing.name()
    )
}

/// What backs guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryBacking {
    /// Ordinary anonymous memory, faulted in as the guest touches it.
    #[default]
    Anonymous,
    /// Reserved hugetlb pages, 1 GiB where they fit and are free, else 2 MiB, all faulted in
    /// at start (as Nitro donates hugepages to an enclave). Sizes round up to 2 MiB.
    Hugepages,
    /// One shared memfd (memfd_create, ftruncate, MAP_SHARED), region after region at their
    /// offsets: memory another process can map from the descriptor (vhost-user back ends, a
    /// live upgrade handing the guest to a new carve).
    Memfd,
    /// Private hugetlb pages of 2 MiB (MAP_HUGETLB | MAP_HUGE_2MB), reserved at start, faulted
    /// in as the guest touches them; the size must be a whole number of pages.
    Hugetlb2M,
    /// As [`MemoryBacking::Hugetlb2M`] with 1 GiB pages.
    Hugetlb1G,
}

impl MemoryBacking {
    /// The backings `--memory …,backing=NAME` names.
    pub const NAMED: [MemoryBacking; 4] =
        [MemoryBacking::Anonymous, MemoryBacking::Memfd, MemoryBacking::Hugetlb2M, MemoryBacking::Hugetlb1G];

    /// The name `--memory` uses (`hugepages` is the enclave pool's, not offered there).
    pub fn name(self) -> &'static str {
        match self {
            MemoryBacking::Anonymous => "anonymous",
            MemoryBacking::Hugepages => "hugepages",
            MemoryBacking::Memfd => "memfd",
            MemoryBacking::Hugetlb2M => "hugetlb-2m",
            MemoryBacking::Hugetlb1G => "hugetlb-1g",
        }
    }

    /// The fixed hugetlb page size of an explicit hugetlb backing: bytes, mmap flag, name.
    fn hugetlb_page(self) -> Option<(u64, i32, &'static str)> {
        match self {
            MemoryBacking::Hugetlb2M => Some((2 << 20, libc::MAP_HUGE_2MB, "2 MiB")),
            MemoryBacking::Hugetlb1G => Some((1 << 30, libc::MAP_HUGE_1GB, "1 GiB")),
            _ => None,
        }
    }
}

/// Guest memory as `--memory SIZE[,backing=…][,mergeable=on|off]` asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySpec {
    pub mib: u64,
    pub backing: MemoryBacking,
    /// madvise(MADV_MERGEABLE) on every RAM mapping: KSM may merge identical pages.
    pub mergeable: bool,
}

impl MemorySpec {
    /// Parses `SIZE[,backing=anonymous|memfd|hugetlb-2m|hugetlb-1g][,mergeable=on|off]`; SIZE
    /// is MiB, or a number with `M`/`MiB` or `G`/`GiB`. Combinations no mapping can give are
    /// refused here (the minimum size is [`create`]'s to check).
    pub fn parse(text: &str) -> Result<MemorySpec, String> {
        let mut parts = text.split(',');
        let size = parts.next().unwrap_or_default().trim();
        let mib = parse_size_mib(size)?;
        let mut spec = MemorySpec { mib, backing: MemoryBacking::Anonymous, mergeable: false };
        let (mut backing_seen, mut mergeable_seen) = (false, false);
        for part in parts {
            match part.split_once('=') {
                Some(("backing", name)) if !backing_seen => {
                    backing_seen = true;
                    spec.backing = MemoryBacking::NAMED.into_iter().find(|b| b.name() == name).ok_or_else(|| {
                        format!("unknown memory backing '{name}' (expected anonymous, memfd, hugetlb-2m or hugetlb-1g)")
                    })?;
                }
                Some(("mergeable", value)) if !mergeable_seen => {
                    mergeable_seen = true;
                    spec.mergeable = match value {
                        "on" => true,
                        "off" => false,
                        _ => return Err(format!("mergeable must be on or off, not '{value}'")),
                    };
                }
                Some(("backing" | "mergeable", _)) => {
                    return Err(format!("'{part}' is given twice in --memory"))
                }
                _ => {
                    return Err(format!(
                        "unexpected '{part}' in --memory; expected SIZE[,backing=anonymous|memfd|hugetlb-2m|\
                         hugetlb-1g][,mergeable=on|off]"
                    ))
                }
            }
        }
        spec.check().map_err(|e| e.to_string())?;
        Ok(spec)
    }

    /// Refuses what no mapping can give: mergeable memory that is not private anonymous, and
    /// a hugetlb backing whose size is not a whole number of its pages.
    pub fn check(&self) -> Result<(), MemoryError> {
        if self.mergeable && self.backing != MemoryBacking::Anonymous {
            return Err(MemoryError::NotMergeable(self.backing));
        }
        if let Some((page, _, page_name)) = self.backing.hugetlb_page() {
            if self.mib.checked_mul(1 << 20).is_none_or(|bytes| bytes % page != 0) {
                return Err(MemoryError::NotHugepageMultiple {
                    mib: self.mib,
                    page: page_name,
                    backing: self.backing.name(),
                });
            }
        }
        Ok(())
    }
}

/// `128` (MiB), `128M`, `128MiB`, `2G`, `2GiB` (units in either case) → MiB.
fn parse_size_mib(text: &str) -> Result<u64, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("memory size '{text}' is not a number of MiB (or with M or G: 512M, 2G)"))?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mib" => 1,
        "g" | "gib" => 1 << 10,
        _ => return Err(format!("memory size '{text}' has an unknown unit '{unit}' (expected M or G)")),
    };
    number.checked_mul(scale).ok_or_else(|| format!("memory size '{text}' is too large"))
}

/// Hugepage sizes carve uses, largest first, with their mmap flags.
pub const HUGEPAGE_SIZES: [(u64, i32); 2] = [(1 << 30, libc::MAP_HUGE_1GB), (2 << 20, libc::MAP_HUGE_2MB)];
/// Hugepage-backed guests are sized in whole 2 MiB pages.
pub const HUGEPAGE_GRANULE: u64 = 2 << 20;

/// An e820 memory-map entry as every boot protocol describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RamRange {
    pub base: u64,
    pub size: u64,
}

impl RamRange {
    pub fn end(&self) -> u64 {
        self.base + self.size
    }
}

/// The guest-physical RAM ranges for a guest of `size` bytes.
pub fn ram_regions(size: u64) -> Vec<RamRange> {
    let low = size.min(MMIO_GAP_START);
    let mut regions = vec![RamRange { base: 0, size: low }];
    if size > low {
        regions.push(RamRange { base: MMIO_GAP_END, size: size - low });
    }
    regions
}

/// The usable-RAM map handed to the guest: conventional memory up to the EBDA, then from 1 MiB.
pub fn e820_map(size: u64) -> Vec<RamRange> {
    let mut map = vec![RamRange { base: 0, size: EBDA_START }];
    for region in ram_regions(size) {
        let base = region.base.max(HIMEM_START);
        if region.end() > base {
            map.push(RamRange { base, size: region.end() - base });
        }
    }
    map
}

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One entry of the memory map a boot protocol hands the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub base: u64,
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The whole memory map: usable RAM as [`e820_map`] gives it, and `reserved` ranges beside it
/// (a virtual EPC), in address order. Without reserved ranges it is exactly [`e820_map`].
pub fn e820_entries(size: u64, reserved: &[RamRange]) -> Vec<E820Entry> {
    let ram = e820_map(size).into_iter().map(|r| E820Entry { base: r.base, size: r.size, kind: E820_RAM });
    let reserved = reserved.iter().map(|r| E820Entry { base: r.base, size: r.size, kind: E820_RESERVED });
    let mut map: Vec<E820Entry> = ram.chain(reserved).collect();
    map.sort_by_key(|e| e.base);
    map
}

/// The end of RAM below the MMIO gap: where 32-bit boot structures and initrds may go.
pub fn low_ram_end(mem: &GuestRam) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|&end| end <= MMIO_GAP_START)
        .max()
        .unwrap_or(0)
}

pub fn create(mib: u64, backing: MemoryBacking) -> Result<GuestRam, MemoryError> {
    create_with(MemorySpec { mib, backing, mergeable: false })
}

/// Guest RAM as `spec` asks: its backing, and mergeable by KSM if asked (anonymous only).
pub fn create_with(spec: MemorySpec) -> Result<GuestRam, MemoryError> {
    let MemorySpec { mib, backing, mergeable } = spec;
    if mib < MIN_MEMORY_MIB {
        return Err(MemoryError::TooSmall(mib));
    }
    check_bitmap(mib)?;
    spec.check()?;
    let mem = match backing {
        MemoryBacking::Hugepages => create_hugepages(mib)?,
        MemoryBacking::Memfd => create_memfd(mib)?,
        MemoryBacking::Hugetlb2M | MemoryBacking::Hugetlb1G => create_hugetlb(mib, backing)?,
        MemoryBacking::Anonymous => {
            let ranges: Vec<_> =
                ram_regions(mib << 20).into_iter().map(|r| (GuestAddress(r.base), r.size as usize)).collect();
            GuestRam::from_ranges(&ranges).map_err(|source| MemoryError::Map { mib, source })?
        }
    };
    if mergeable {
        advise_mergeable(&mem)?;
    }
    Ok(mem)
}

/// madvise(MADV_MERGEABLE) on every region: ksmd may then merge identical pages of this guest
/// (and of other mergeable memory on the host), copy-on-write.
fn advise_mergeable(mem: &GuestRam) -> Result<(), MemoryError> {
    for region in mem.iter() {
        let host = mem
            .get_host_address(region.start_addr())
            .expect("a region's start address is inside guest memory");
        // SAFETY: `host` and `region.len()` are exactly one of our own live mappings; the
        // advice changes only how the kernel may share its pages, never their contents.
        let done = unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_MERGEABLE) };
        if done != 0 {
            let e = std::io::Error::last_os_error();
            return Err(MemoryError::Mergeable(if e.raw_os_error() == Some(libc::EINVAL) {
                std::io::Error::other(format!("{e}; this kernel may be built without KSM (CONFIG_KSM)"))
            } else {
                e
            }));
        }
    }
    Ok(())
}

/// Guest RAM in one shared memfd, the regions at consecutive offsets (as a snapshot's memory
/// file lays them out), MAP_SHARED so another process mapping the descriptor sees the guest's
/// memory. Pages are allocated as the guest touches them.
fn create_memfd(mib: u64) -> Result<GuestRam, MemoryError> {
    let fail = |detail: String| MemoryError::Memfd { mib, detail };
    // SAFETY: the name is a NUL-terminated C string; the flags ask for nothing unusual.
    let fd = unsafe { libc::memfd_create(c"carve-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(fail(format!("memfd_create: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: memfd_create just returned this descriptor and nothing else owns it.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(mib << 20).map_err(|e| fail(format!("ftruncate to {mib} MiB: {e}")))?;
    let mut regions = Vec::new();
    let mut offset = 0;
    for range in ram_regions(mib << 20) {
        let len = range.size as usize;
        let file = file.try_clone().map_err(|e| fail(e.to_string()))?;
        let region = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_file_offset(vm_memory::FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| fail(e.to_string()))?;
        regions
            .push(GuestRegionMmap::new(region, GuestAddress(range.base)).expect("guest ranges do not wrap"));
        offset += range.size;
    }
    GuestRam::from_regions(regions)
        .map_err(|e| MemoryError::Map { mib, source: vm_memory::mmap::FromRangesError::Collection(e) })
}

/// A hugetlb pool as sysfs shows it: its directory and the pages free for a new reservation
/// (free less those already promised to mappings).
fn hugetlb_pool(page: u64) -> (String, u64) {
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page >> 10);
    let read = |name: &str| -> u64 {
        std::fs::read_to_string(format!("{dir}/{name}")).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
    };
    let available = read("free_hugepages").saturating_sub(read("resv_hugepages"));
    (dir, available)
}

/// Guest RAM from private hugetlb pages of `backing`'s one size. The kernel reserves the pages
/// at mmap time, so a short pool is an error here (naming free against needed), never a
/// SIGBUS when the guest touches its memory.
fn create_hugetlb(mib: u64, backing: MemoryBacking) -> Result<GuestRam, MemoryError> {
    let (page, flag, page_name) = backing.hugetlb_page().expect("a hugetlb backing");
    let size = mib << 20;
    let short = || {
        let (dir, free) = hugetlb_pool(page);
        MemoryError::HugetlbShort {
            mib,
            page: page_name,
            needed: size / page,
            free,
            pool: format!("{dir}/nr_hugepages"),
        }
    };
    if hugetlb_pool(page).1 < size / page {
        return Err(short());
    }
    let mut regions = Vec::new();
    for range in ram_regions(size) {
        let len = range.size as usize;
        let region = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | flag)
            .with_hugetlbfs(true)
            .build();
        let region = match region {
            Ok(region) => region,
            // Another process took pages between the count and the mapping.
            Err(vm_memory::mmap::MmapRegionError::Mmap(e)) if e.raw_os_error() == Some(libc::ENOMEM) => {
                return Err(short())
            }
            Err(source) => return Err(MemoryError::MapHugepages { mib, source }),
        };
        regions
            .push(GuestRegionMmap::new(region, GuestAddress(range.base)).expect("guest ranges do not wrap"));
    }
    GuestRam::from_regions(regions)
        .map_err(|e| MemoryError::Map { mib, source: vm_memory::mmap::FromRangesError::Collection(e) })
}

/// Each region's dirty bitmap (a bit per page) is allocated before its mapping, and an allocation
/// failure aborts the process; an absurd size is refused here first, as the mapping would be.
fn check_bitmap(mib: u64) -> Result<(), MemoryError> {
    let words = (mib << 20).div_ceil(4096 * 64) as usize;
    if mib > u64::MAX >> 20 || Vec::<u64>::new().try_reserve_exact(words).is_err() {
        return Err(MemoryError::TooLarge(mib));
    }
    Ok(())
}

/// Guest RAM from hugetlb pages: one mapping per 1 GiB page where a 1 GiB-aligned gigabyte is
/// left and such a page is free, then 2 MiB pages for the rest of each range. The kernel
/// reserves hugetlb pages at mmap time, so a shortfall is an error here, never a SIGBUS later.
fn create_hugepages(mib: u64) -> Result<GuestRam, MemoryError> {
    let size = (mib << 20).next_multiple_of(HUGEPAGE_GRANULE);
    let mut regions = Vec::new();
    let mut allocated = 0;
    for range in ram_regions(size) {
        let mut at = range.base;
        while at < range.end() {
            let remaining = range.end() - at;
            let mut mapped = None;
            for (page, flag) in HUGEPAGE_SIZES {
                if remaining < page || at % page != 0 {
                    continue;
                }
                // One 1 GiB page per mapping, so a partial supply of them is still used.
                let len = if page == 1 << 30 { page } else { remaining - remaining % page };
                match map_hugepages(len, flag) {
                    Ok(region) => {
                        mapped = Some((region, len));
                        break;
                    }
                    Err(vm_memory::mmap::MmapRegionError::Mmap(e))
                        if e.raw_os_error() == Some(libc::ENOMEM) => {}
                    Err(source) => return Err(MemoryError::MapHugepages { mib, source }),
                }
            }
            let Some((region, len)) = mapped else {
                return Err(MemoryError::InsufficientHugepages {
                    mib,
                    missing_mib: (size - allocated) >> 20,
                });
            };
            allocated += len;
            regions.push(GuestRegionMmap::new(region, GuestAddress(at)).expect("guest ranges do not wrap"));
            at += len;
        }
    }
    GuestRam::from_regions(regions)
        .map_err(|e| MemoryError::Map { mib, source: vm_memory::mmap::FromRangesError::Collection(e) })
}

fn map_hugepages(
    len: u64,
    size_flag: i32,
) -> Result<vm_memory::mmap::MmapRegion<AtomicBitmap>, vm_memory::mmap::MmapRegionError> {
    MmapRegionBuilder::new_with_bitmap(len as usize, AtomicBitmap::with_len(len as usize))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | size_flag | libc::MAP_POPULATE,
        )
        .with_hugetlbfs(true)
        .build()
}

/// Guest RAM whose contents are `file`'s, region after region, mapped copy-on-write: the file
/// is never written, pages are read from it as the guest first touches them, and mapping costs
/// the same whatever the size. `layout` must be what [`ram_regions`] gives for its total.
pub fn map_file(file: &std::fs::File, layout: &[RamRange]) -> Result<GuestRam, MemoryError> {
    let total: u64 = layout.iter().map(|r| r.size).sum();
    let mib = total >> 20;
    check_bitmap(mib)?;
    let mut regions = Vec::with_capacity(layout.len());
    let mut offset = 0;
    for range in layout {
        let len = range.size as usize;
        let file = file.try_clone().map_err(|e| MemoryError::MapFile { mib, detail: e.to_string() })?;
        let region = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_file_offset(vm_memory::FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::MapFile { mib, detail: e.to_string() })?;
        regions.push(
            GuestRegionMmap::new(region, GuestAddress(range.base))
                .ok_or_else(|| MemoryError::MapFile { mib, detail: "a region wraps around".into() })?,
        );
        offset += range.size;
    }
    GuestRam::from_regions(regions)
        .map_err(|e| MemoryError::Map { mib, source: vm_memory::mmap::FromRangesError::Collection(e) })
}

/// The RAM ranges `mem` holds, in order.
pub fn layout(mem: &GuestRam) -> Vec<RamRange> {
    mem.iter().map(|r| RamRange { base: r.start_addr().raw_value(), size: r.len() }).collect()
}

/// Bytes of guest RAM `mem` holds.
pub fn total_size(mem: &GuestRam) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// The first KVM memory slot [`register`] leaves free (it gives region `i` slot `i`).
pub fn first_free_slot(mem: &GuestRam) -> u32 {
    mem.num_regions() as u32
}

/// Which pages of a region the guest (or carve) ever touched, from /proc/self/pagemap: a page
/// neither present nor swapped out was never written and reads as zeros, so it need not be read
/// (reading it would fault in the zero page, a few microseconds each). Only for anonymous
/// regions: a file-backed page that is not mapped may still hold the file's data. `None` where
/// that cannot be known, and the caller reads every page.
pub fn touched_pages(region: &GuestRegionMmap<AtomicBitmap>) -> Option<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const CHUNK: usize = 32 * 1024;
    if region.file_offset().is_some() {
        return None;
    }
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
    let first = region.as_ptr() as u64 / PAGE_SIZE;
    let pages = (region.len() / PAGE_SIZE) as usize;
    let mut touched = Vec::with_capacity(pages);
    let mut entries = vec![0u8; CHUNK * 8];
    while touched.len() < pages {
        let count = CHUNK.min(pages - touched.len());
        let bytes = &mut entries[..count * 8];
        pagemap.read_exact_at(bytes, (first + touched.len() as u64) * 8).ok()?;
        touched.extend(bytes.chunks_exact(8).map(|entry| {
            let entry = u64::from_le_bytes(entry.try_into().expect("eight bytes"));
            entry & (PRESENT | SWAPPED) != 0
        }));
    }
    Some(touched)
}

/// Where guest RAM ends: the end of its highest region.
pub fn ram_end(mem: &GuestRam) -> u64 {
    mem.iter().map(|r| r.start_addr().raw_value() + r.len()).max().unwrap_or(0)
}

pub fn register(vm: &VmFd, mem: &GuestRam) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = mem
            .get_host_address(region.start_addr())
            .expect("a region's start address is inside guest memory");
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping outlives the VM: `Vm` owns both and drops the VM fd first.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|source| MemoryError::RegisterSlot { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region_and_map_skips_legacy_hole() {
        assert_eq!(ram_regions(128 << 20), vec![RamRange { base: 0, size: 128 << 20 }]);
        assert_eq!(
            e820_map(128 << 20),
            vec![
                RamRange { base: 0, size: EBDA_START },
                RamRange { base: HIMEM_START, size: (128 << 20) - HIMEM_START }
            ]
        );
    }

    #[test]
    fn large_guest_splits_around_the_mmio_gap() {
        let regions = ram_regions(4 << 30);
        assert_eq!(regions[0], RamRange { base: 0, size: MMIO_GAP_START });
        assert_eq!(regions[1], RamRange { base: MMIO_GAP_END, size: (4 << 30) - MMIO_GAP_START });
    }

    #[test]
    fn reserved_ranges_join_the_map_in_address_order_and_nothing_changes_without_them() {
        for size in [128 << 20, 5 << 30] {
            let plain: Vec<E820Entry> = e820_map(size)
                .into_iter()
                .map(|r| E820Entry { base: r.base, size: r.size, kind: E820_RAM })
                .collect();
            assert_eq!(e820_entries(size, &[]), plain);
        }
        let epc = RamRange { base: 0x1_8000_0000, size: 96 << 20 };
        let map = e820_entries(5 << 30, &[epc]);
        assert_eq!(map.len(), 4);
        assert_eq!(map[3], E820Entry { base: 0x1_8000_0000, size: 96 << 20, kind: E820_RESERVED });
        assert!(map[..3].iter().all(|e| e.kind == E820_RAM));
        assert!(map.windows(2).all(|w| w[0].base + w[0].size <= w[1].base));
    }

    #[test]
    fn slots_after_ram_and_its_end_follow_the_regions() {
        let small = create(128, MemoryBacking::Anonymous).unwrap();
        assert_eq!((first_free_slot(&small), ram_end(&small)), (1, 128 << 20));
        let big = GuestRam::from_ranges(
            &ram_regions(4 << 30).iter().map(|r| (GuestAddress(r.base), r.size as usize)).collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!((first_free_slot(&big), ram_end(&big)), (2, MMIO_GAP_END + (1 << 30)));
    }

    #[test]
    fn memory_specs_parse_sizes_backings_and_merging() {
        let spec = |text| MemorySpec::parse(text);
        let plain = |mib| MemorySpec { mib, backing: MemoryBacking::Anonymous, mergeable: false };
        assert_eq!(spec("128"), Ok(plain(128)));
        assert_eq!(spec("128M"), Ok(plain(128)));
        assert_eq!(spec("128MiB"), Ok(plain(128)));
        assert_eq!(spec("2G"), Ok(plain(2048)));
        assert_eq!(spec("1gib"), Ok(plain(1024)));
        assert_eq!(
            spec("256,backing=memfd"),
            Ok(MemorySpec { mib: 256, backing: MemoryBacking::Memfd, mergeable: false })
        );
        assert_eq!(
            spec("1G,backing=hugetlb-1g"),
            Ok(MemorySpec { mib: 1024, backing: MemoryBacking::Hugetlb1G, mergeable: false })
        );
        assert_eq!(
            spec("64,mergeable=on,backing=anonymous"),
            Ok(MemorySpec { mib: 64, backing: MemoryBacking::Anonymous, mergeable: true })
        );
        assert_eq!(
            spec("64,backing=hugetlb-2m,mergeable=off"),
            Ok(MemorySpec { mib: 64, backing: MemoryBacking::Hugetlb2M, mergeable: false })
        );
        for (bad, expected) in [
            ("lots", "not a number"),
            ("12T", "unknown unit"),
            ("99999999999999999999", "not a number"),
            ("18014398509481984G", "too large"),
            ("128,backing=bogus", "unknown memory backing 'bogus'"),
            ("128,backing=hugepages", "unknown memory backing"),
            ("128,mergeable=maybe", "mergeable must be on or off, not 'maybe'"),
            ("128,mergeable=on,mergeable=off", "given twice"),
            ("128,size=2", "unexpected 'size=2'"),
            ("128,backing=memfd,mergeable=on", "KSM merges only private anonymous pages"),
            ("128,backing=hugetlb-2m,mergeable=on", "hugetlb pages are never merged"),
            ("127,backing=hugetlb-2m", "not a whole number of 2 MiB hugepages"),
            ("1536,backing=hugetlb-1g", "not a whole number of 1 GiB hugepages"),
        ] {
            let e = spec(bad).unwrap_err();
            assert!(e.contains(expected), "{bad}: {e}");
            assert_eq!(e.lines().count(), 1, "{bad}: {e}");
        }
    }

    #[test]
    fn memfd_memory_is_shared_and_mergeable_anonymous_memory_maps() {
        let mem = create(16, MemoryBacking::Memfd).unwrap();
        let region = mem.iter().next().unwrap();
        let fd = region.file_offset().expect("a memfd region has its file");
        assert_eq!(fd.file().metadata().unwrap().len(), 16 << 20);
        use vm_memory::Bytes;
        mem.write_obj(0x1234_5678u32, GuestAddress(0x2000)).unwrap();
        let mut word = [0u8; 4];
        use std::os::unix::fs::FileExt;
        fd.file().read_exact_at(&mut word, 0x2000).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0x1234_5678, "the memfd sees the guest's writes");
        // Where the kernel has no KSM, madvise says so; nowhere else may it fail.
        match create_with(MemorySpec { mib: 16, backing: MemoryBacking::Anonymous, mergeable: true }) {
            Ok(_) => {}
            Err(MemoryError::Mergeable(e)) => assert!(e.to_string().contains("CONFIG_KSM"), "{e}"),
            Err(e) => panic!("{e}"),
        }
        assert!(matches!(
            create_with(MemorySpec { mib: 16, backing: MemoryBacking::Hugepages, mergeable: true }),
            Err(MemoryError::NotMergeable(MemoryBacking::Hugepages))
        ));
    }

    #[test]
    fn pages_never_touched_are_known_without_reading_them() {
        use vm_memory::Bytes;
        let mem = create(16, MemoryBacking::Anonymous).unwrap();
        mem.write_obj(1u8, GuestAddress(5 * PAGE_SIZE)).unwrap();
        mem.write_obj(1u8, GuestAddress(4000 * PAGE_SIZE + 7)).unwrap();
        let touched = touched_pages(mem.iter().next().unwrap()).expect("anonymous memory");
        let which: Vec<usize> = (0..touched.len()).filter(|&i| touched[i]).collect();
        assert_eq!(which, [5, 4000]);
        let memfd = create(16, MemoryBacking::Memfd).unwrap();
        assert_eq!(touched_pages(memfd.iter().next().unwrap()), None, "a file's pages may hold data");
    }

    #[test]
    fn too_small_is_refused() {
        assert!(matches!(create(4, MemoryBacking::Anonymous), Err(MemoryError::TooSmall(4))));
    }
}
