//! Guest RAM: anonymous mappings split around the MMIO gap below 4 GiB, registered with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// The smallest guest carve builds: room for boot structures, a kernel at 1 MiB and a stack.
pub const MIN_MEMORY_MIB: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is too small: carve needs at least {MIN_MEMORY_MIB} MiB")]
    TooSmall(u64),
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map { mib: u64, source: vm_memory::mmap::FromRangesError },
    #[error("KVM refused guest memory slot {slot}: {source}")]
    RegisterSlot { slot: u32, source: kvm_ioctls::Error },
}

/// An e820 memory-map entry as every boot protocol describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// The end of RAM below the MMIO gap: where 32-bit boot structures and initrds may go.
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|&end| end <= MMIO_GAP_START)
        .max()
        .unwrap_or(0)
}

pub fn create(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if mib < MIN_MEMORY_MIB {
        return Err(MemoryError::TooSmall(mib));
    }
    let ranges: Vec<_> =
        ram_regions(mib << 20).into_iter().map(|r| (GuestAddress(r.base), r.size as usize)).collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { mib, source })
}

pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
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
    fn too_small_is_refused() {
        assert!(matches!(create(4), Err(MemoryError::TooSmall(4))));
    }
}
