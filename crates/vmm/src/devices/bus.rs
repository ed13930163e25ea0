//! Address-range dispatch for port I/O and MMIO exits.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::BusDevice;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps a device already mapped")]
    Overlap { base: u64, len: u64 },
    #[error("bus range at {base:#x} has zero length")]
    Empty { base: u64 },
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Cloning shares the devices: every vCPU thread dispatches on its own copy of the map.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty { base });
        }
        let end = base.checked_add(len).ok_or(BusError::Overlap { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if before.is_some_and(|(&b, &(l, _))| b + l > base) {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// The device whose range holds the whole access.
    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, device)) = self.ranges.range(..=addr).next_back()?;
        let end = addr.checked_add(size as u64)?;
        (end <= base + len).then_some((base, device))
    }

    /// Returns false when no device claims the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((base, device)) = self.find(addr, data.len()) else { return false };
        device.lock().unwrap_or_else(PoisonError::into_inner).read(base, addr - base, data);
        true
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((base, device)) = self.find(addr, data.len()) else { return false };
        device.lock().unwrap_or_else(PoisonError::into_inner).write(base, addr - base, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Latch(Vec<u8>);
    impl BusDevice for Latch {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.copy_from_slice(&self.0[offset as usize..offset as usize + data.len()]);
        }
        fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
            self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlaps() {
        let mut bus = Bus::default();
        let latch: SharedDevice = Arc::new(Mutex::new(Latch(vec![0; 4])));
        bus.insert(latch.clone(), 0x10, 4).unwrap();
        assert_eq!(bus.insert(latch.clone(), 0x12, 4), Err(BusError::Overlap { base: 0x12, len: 4 }));
        assert_eq!(bus.insert(latch.clone(), 0x0e, 4), Err(BusError::Overlap { base: 0x0e, len: 4 }));
        bus.insert(latch, 0x14, 1).unwrap();
        assert!(bus.write(0x11, &[7, 8]));
        let mut data = [0u8; 2];
        assert!(bus.read(0x11, &mut data));
        assert_eq!(data, [7, 8]);
        assert!(!bus.read(0x13, &mut [0u8; 2]), "access running past the range is unclaimed");
        assert!(!bus.read(0x20, &mut data));
        assert!(!bus.read(u64::MAX, &mut data));
    }
}
