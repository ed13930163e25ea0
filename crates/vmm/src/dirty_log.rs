//! Which guest pages changed: KVM's dirty log for what the vCPUs wrote, merged with vm-memory's
//! bitmap for what carve's own devices wrote (a virtio queue's used ring, a vsock packet), which
//! KVM never sees. Live migration sends what changed since its last round; `describe` turns the
//! count into a dirty-page rate.
//!
//! With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` a harvest is KVM_GET_DIRTY_LOG, which only reads the
//! bits, then KVM_CLEAR_DIRTY_LOG of exactly those bits, which write-protects those pages again:
//! pages nobody wrote stay unprotected and cost nothing. Without it, KVM_GET_DIRTY_LOG re-protects
//! the whole slot as it reads. Either way the bits are cleared before the caller reads the pages,
//! so a write racing with the copy shows up in the next harvest.

use std::sync::Arc;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::memory::{GuestRam, PAGE_SIZE};

vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, kvm_bindings::KVMIO, 0xc0, kvm_clear_dirty_log);

#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("KVM refused to {action} the dirty log of memory slot {slot}: {source}")]
    Slot { action: &'static str, slot: u32, source: kvm_ioctls::Error },
}

/// One RAM region as KVM knows it.
#[derive(Clone, Copy)]
struct Slot {
    slot: u32,
    guest_base: u64,
    size: u64,
    host: u64,
}

/// Dirty logging on every RAM slot of a VM, from [`DirtyLog::start`] until dropped.
pub struct DirtyLog {
    vm: Arc<VmFd>,
    slots: Vec<Slot>,
    /// KVM_CLEAR_DIRTY_LOG re-protects pages (MANUAL_DIRTY_LOG_PROTECT2 is on).
    manual: bool,
}

/// The pages a harvest found written: per RAM region, its guest base and one bit per page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyPages {
    pub regions: Vec<(u64, Vec<u64>)>,
}

impl DirtyPages {
    pub fn count(&self) -> u64 {
        self.regions.iter().flat_map(|(_, words)| words).map(|w| u64::from(w.count_ones())).sum()
    }

    /// Guest-physical addresses of the dirty pages, in order.
    pub fn addresses(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().flat_map(|(base, words)| {
            words.iter().enumerate().flat_map(move |(word_index, &word)| {
                BitIter(word).map(move |bit| base + (word_index as u64 * 64 + bit) * PAGE_SIZE)
            })
        })
    }
}

/// The set bits of a word, lowest first.
struct BitIter(u64);

impl Iterator for BitIter {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        if self.0 == 0 {
            return None;
        }
        let bit = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(u64::from(bit))
    }
}

impl DirtyLog {
    /// Turns dirty logging on for every RAM slot (region `i` is slot `i`, as
    /// [`crate::memory::register`] made them) and forgets what devices wrote so far: from here on,
    /// every page written is in the next [`DirtyLog::harvest`].
    pub fn start(vm: Arc<VmFd>, mem: &GuestRam) -> Result<DirtyLog, DirtyLogError> {
        // KVM answers with the flags it supports (bit 0: manual protect).
        let offered = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
        let manual = offered & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as i32 != 0
            && vm
                .enable_cap(&kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
                    ..Default::default()
                })
                .is_ok();
        let slots: Vec<Slot> = mem
            .iter()
            .enumerate()
            .map(|(slot, region)| Slot {
                slot: slot as u32,
                guest_base: region.start_addr().raw_value(),
                size: region.len(),
                host: mem
                    .get_host_address(region.start_addr())
                    .expect("a region's start address is inside guest memory") as u64,
            })
            .collect();
        let log = DirtyLog { vm, slots, manual };
        for slot in &log.slots {
            log.set_flags(slot, KVM_MEM_LOG_DIRTY_PAGES).map_err(|source| DirtyLogError::Slot {
                action: "start",
                slot: slot.slot,
                source,
            })?;
        }
        mem.iter().for_each(|region| device_writes(region).reset());
        Ok(log)
    }

    /// Whether KVM re-protects only the pages harvested (MANUAL_DIRTY_LOG_PROTECT2).
    pub fn manual_protect(&self) -> bool {
        self.manual
    }

    fn set_flags(&self, slot: &Slot, flags: u32) -> Result<(), kvm_ioctls::Error> {
        let region = kvm_userspace_memory_region {
            slot: slot.slot,
            flags,
            guest_phys_addr: slot.guest_base,
            memory_size: slot.size,
            userspace_addr: slot.host,
        };
        // SAFETY: the same slot, guest range and host mapping KVM already has (only the flags
        // change); the mapping outlives the VM.
        unsafe { self.vm.set_user_memory_region(region) }
    }

    /// The pages written since the last harvest (or the start), by vCPUs or devices; they are
    /// write-protected again before this returns.
    pub fn harvest(&mut self, mem: &GuestRam) -> Result<DirtyPages, DirtyLogError> {
        let mut pages = DirtyPages::default();
        for (slot, region) in self.slots.iter().zip(mem.iter()) {
            let fail = |action, source| DirtyLogError::Slot { action, slot: slot.slot, source };
            let mut words =
                self.vm.get_dirty_log(slot.slot, slot.size as usize).map_err(|e| fail("read", e))?;
            if self.manual && words.iter().any(|&w| w != 0) {
                self.clear(slot, &mut words).map_err(|e| fail("clear", e))?;
            }
            // vm-memory's bitmap has a bit per page as KVM's does, same order.
            for (word, device) in words.iter_mut().zip(device_writes(region).get_and_reset()) {
                *word |= device;
            }
            pages.regions.push((slot.guest_base, words));
        }
        Ok(pages)
    }

    fn clear(&self, slot: &Slot, words: &mut [u64]) -> Result<(), kvm_ioctls::Error> {
        let mut clear = kvm_clear_dirty_log {
            slot: slot.slot,
            num_pages: (slot.size / PAGE_SIZE) as u32,
            first_page: 0,
            ..Default::default()
        };
        clear.__bindgen_anon_1.dirty_bitmap = words.as_mut_ptr().cast();
        // SAFETY: `words` holds a bit for each of the slot's `num_pages` pages (KVM_GET_DIRTY_LOG
        // filled it for this slot) and lives across the call; KVM only reads it.
        let ret = unsafe { ioctl_with_ref(self.vm.as_ref(), KVM_CLEAR_DIRTY_LOG(), &clear) };
        if ret < 0 {
            return Err(kvm_ioctls::Error::last());
        }
        Ok(())
    }
}

/// The pages carve's devices wrote through vm-memory since the bitmap was last reset.
fn device_writes(region: &MmapRegion<AtomicBitmap>) -> &AtomicBitmap {
    region.bitmap()
}

impl Drop for DirtyLog {
    /// Logging costs write faults; a VM that is no longer watched runs without it.
    fn drop(&mut self) {
        for slot in &self.slots {
            let _ = self.set_flags(slot, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_pages_list_their_addresses_in_order() {
        let pages = DirtyPages { regions: vec![(0, vec![0b101, 1 << 63]), (1 << 32, vec![2])] };
        let addresses: Vec<u64> = pages.addresses().collect();
        assert_eq!(addresses, vec![0, 2 * PAGE_SIZE, 127 * PAGE_SIZE, (1 << 32) + PAGE_SIZE]);
        assert_eq!(pages.count(), 4);
    }
}
