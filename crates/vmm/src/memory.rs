//! Guest RAM: anonymous or hugetlb mappings split around the MMIO gap below 4 GiB, registered
//! with KVM.

pub use carve_virtio::GuestRam;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::bitmap::NewBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

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
    if mib < MIN_MEMORY_MIB {
        return Err(MemoryError::TooSmall(mib));
    }
    check_bitmap(mib)?;
    if backing == MemoryBacking::Hugepages {
        return create_hugepages(mib);
    }
    let ranges: Vec<_> =
        ram_regions(mib << 20).into_iter().map(|r| (GuestAddress(r.base), r.size as usize)).collect();
    GuestRam::from_ranges(&ranges).map_err(|source| MemoryError::Map { mib, source })
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
    fn too_small_is_refused() {
        assert!(matches!(create(4, MemoryBacking::Anonymous), Err(MemoryError::TooSmall(4))));
    }
}
