//! A test device whose MSI vectors live in its own interrupt message store (the IMS model):
//! a table of 16-byte entries {address low, address high, data, control} in its MMIO window,
//! as many as the window holds (4096, twice PCI MSI-X's cap), and a doorbell that fires one.
//! Mapped with `--testdev`; guests use it to prove MSI routing, masking and pending delivery.

use super::BusDevice;
use crate::interrupts::{InterruptError, MsiMessage, MsiStore};

pub const MSI_TESTDEV_LEN: u64 = ENTRIES_OFFSET + ENTRY_SIZE * MAX_ENTRIES;

/// Write a vector index to fire it.
pub const DOORBELL: u64 = 0x0;
/// Read: 0 when the last operation worked, else one of the `STATUS_*` codes.
pub const STATUS: u64 = 0x4;
/// Read: MSI vectors the VM can route in all.
pub const CAPACITY: u64 = 0x8;
pub const ENTRIES_OFFSET: u64 = 0x1000;
pub const ENTRY_SIZE: u64 = 16;
pub const MAX_ENTRIES: u64 = 4096;
/// Control word bits: mask (read-write) and pending (read-only).
pub const CONTROL_MASKED: u32 = 1;
pub const CONTROL_PENDING: u32 = 2;

pub const STATUS_OK: u32 = 0;
pub const STATUS_ROUTES_EXHAUSTED: u32 = 1;
pub const STATUS_FAILED: u32 = 2;

pub struct MsiTestdev {
    store: MsiStore,
    capacity: u32,
    status: u32,
}

impl MsiTestdev {
    pub fn new(store: MsiStore, capacity: usize) -> MsiTestdev {
        MsiTestdev { store, capacity: capacity as u32, status: STATUS_OK }
    }

    fn record(&mut self, result: Result<(), InterruptError>) {
        self.status = match result {
            Ok(()) => STATUS_OK,
            Err(InterruptError::RoutesExhausted { .. }) => STATUS_ROUTES_EXHAUSTED,
            Err(_) => STATUS_FAILED,
        };
    }

    fn read_entry(&self, index: usize, field: u64) -> u32 {
        let message = self.store.message(index);
        match field {
            0 => message.address as u32,
            4 => (message.address >> 32) as u32,
            8 => message.data,
            _ => {
                let masked = if self.store.is_masked(index) { CONTROL_MASKED } else { 0 };
                let pending = if self.store.is_pending(index) { CONTROL_PENDING } else { 0 };
                masked | pending
            }
        }
    }

    fn write_entry(&mut self, index: usize, field: u64, value: u32) {
        let mut message = self.store.message(index);
        let result = match field {
            0 => {
                message.address = (message.address & !0xffff_ffff) | u64::from(value);
                self.store.set_message(index, message)
            }
            4 => {
                message.address = (message.address & 0xffff_ffff) | (u64::from(value) << 32);
                self.store.set_message(index, message)
            }
            8 => self.store.set_message(index, MsiMessage { data: value, ..message }),
            _ if value & CONTROL_MASKED != 0 => self.store.mask(index),
            _ => self.store.unmask(index),
        };
        self.record(result);
    }
}

impl BusDevice for MsiTestdev {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match offset {
            _ if data.len() != 4 || !offset.is_multiple_of(4) => u32::MAX,
            STATUS => self.status,
            CAPACITY => self.capacity,
            o if o >= ENTRIES_OFFSET => {
                let entry = o - ENTRIES_OFFSET;
                self.read_entry((entry / ENTRY_SIZE) as usize, entry % ENTRY_SIZE)
            }
            _ => 0,
        };
        let n = data.len().min(4);
        data.fill(0xff);
        data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else { return };
        let value = u32::from_le_bytes(bytes);
        match offset {
            _ if !offset.is_multiple_of(4) => {}
            DOORBELL if u64::from(value) < MAX_ENTRIES => {
                let result = self.store.trigger(value as usize);
                self.record(result);
            }
            o if o >= ENTRIES_OFFSET => {
                let entry = o - ENTRIES_OFFSET;
                self.write_entry((entry / ENTRY_SIZE) as usize, entry % ENTRY_SIZE, value);
            }
            _ => {}
        }
    }
}
