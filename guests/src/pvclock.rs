//! The KVM clock (pvclock): per-vCPU time areas KVM keeps up to date once the guest writes
//! their address to MSR_KVM_SYSTEM_TIME_NEW.

use core::cell::UnsafeCell;
use core::sync::atomic::{fence, Ordering::SeqCst};

use crate::io::{rdtsc, read_phys, wrmsr};

pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// pvclock flags: the host guarantees the clock is monotonic across vCPUs by itself.
pub const PVCLOCK_TSC_STABLE_BIT: u8 = 1 << 0;

/// A pvclock_vcpu_time_info (32 bytes) or pvclock_wall_clock (12 bytes) KVM writes into.
#[repr(C, align(64))]
pub struct Area(UnsafeCell<[u8; 64]>);
// SAFETY: KVM writes these areas; the guest only reads them with volatile loads.
unsafe impl Sync for Area {}

impl Area {
    pub const fn new() -> Area {
        Area(UnsafeCell::new([0; 64]))
    }

    pub fn addr(&self) -> u64 {
        self.0.get() as u64
    }

    /// Asks KVM to keep this area as the current vCPU's clock.
    pub fn enable(&self) {
        wrmsr(MSR_KVM_SYSTEM_TIME_NEW, self.addr() | 1);
    }

    /// Nanoseconds since the VM's clock started, the pvclock flags, and the TSC value the
    /// time was computed from.
    pub fn read(&self) -> (u64, u8, u64) {
        let area = self.addr();
        loop {
            let version = read_phys::<u32>(area);
            if version & 1 != 0 {
                continue;
            }
            fence(SeqCst);
            let tsc_timestamp = read_phys::<u64>(area + 8);
            let system_time = read_phys::<u64>(area + 16);
            let mul = read_phys::<u32>(area + 24);
            let shift = read_phys::<i8>(area + 28);
            let flags = read_phys::<u8>(area + 29);
            let tsc = rdtsc();
            fence(SeqCst);
            if read_phys::<u32>(area) != version {
                continue;
            }
            let mut delta = tsc.saturating_sub(tsc_timestamp);
            if shift >= 0 {
                delta <<= shift;
            } else {
                delta >>= -shift;
            }
            return (system_time + ((delta as u128 * mul as u128) >> 32) as u64, flags, tsc);
        }
    }
}

impl Default for Area {
    fn default() -> Area {
        Area::new()
    }
}
