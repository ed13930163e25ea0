//! A test device whose MSI vectors live in its own interrupt message store (the IMS model):
//! a table of 16-byte entries {address low, address high, data, control} in its MMIO window,
//! as many as the window holds (4096, twice PCI MSI-X's cap), and a doorbell that fires one.
//! Mapped with `--testdev`; guests use it to prove MSI routing, masking and pending delivery.

use carve_snapshot::Persist;
use serde::{Deserialize, Serialize};

use super::BusDevice;
use crate::interrupts::{InterruptError, InterruptManager, InterruptStateError, MsiMessage, MsiStore};

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

/// The device's registers; its vectors are its message store's, which the interrupt state holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiTestdevState {
    /// The store's id in the interrupt state ([`MsiStore::id`]).
    pub store: u32,
    /// CAPACITY, as the guest may have read it.
    pub capacity: u32,
    /// STATUS: how the last operation went.
    pub status: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum MsiTestdevStateError {
    #[error("the MSI test device's status {0} is none of its codes ({STATUS_OK}–{STATUS_FAILED})")]
    Status(u32),
    #[error(
        "the MSI test device's state has room for {saved} MSI vectors, but the restored VM routes {restored}"
    )]
    Capacity { saved: u32, restored: usize },
    #[error(transparent)]
    Store(#[from] InterruptStateError),
}

impl Persist for MsiTestdev {
    type State = MsiTestdevState;
    /// The new VM's interrupt manager, restored from the same snapshot: the device claims its
    /// store there.
    type ConstructorArgs = InterruptManager;
    type Error = MsiTestdevStateError;

    fn save(&self) -> Result<MsiTestdevState, MsiTestdevStateError> {
        Ok(MsiTestdevState { store: self.store.id(), capacity: self.capacity, status: self.status })
    }

    fn restore(
        interrupts: InterruptManager,
        state: &MsiTestdevState,
    ) -> Result<MsiTestdev, MsiTestdevStateError> {
        if state.status > STATUS_FAILED {
            return Err(MsiTestdevStateError::Status(state.status));
        }
        let capacity = interrupts.msi_capacity();
        if usize::try_from(state.capacity) != Ok(capacity) {
            return Err(MsiTestdevStateError::Capacity { saved: state.capacity, restored: capacity });
        }
        let store = interrupts.claim_msi_store(state.store, MAX_ENTRIES as usize)?;
        Ok(MsiTestdev { store, capacity: state.capacity, status: state.status })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupts::testing::TestVm;
    use crate::interrupts::{InterruptState, MsiStoreState, MsiVectorState};

    fn write(dev: &mut MsiTestdev, offset: u64, value: u32) {
        dev.write(0, offset, &value.to_le_bytes());
    }

    fn read(dev: &mut MsiTestdev, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        dev.read(0, offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn entry(index: u64, field: u64) -> u64 {
        ENTRIES_OFFSET + index * ENTRY_SIZE + field
    }

    fn program(dev: &mut MsiTestdev, index: u64, vector: u8) {
        write(dev, entry(index, 0), 0xfee0_0000);
        write(dev, entry(index, 4), 0);
        write(dev, entry(index, 8), vector.into());
    }

    #[test]
    fn a_pending_msi_arrives_after_a_restore_when_the_guest_unmasks_it() {
        let old = TestVm::new();
        let interrupts = InterruptManager::new(old.vm.clone()).unwrap();
        let mut dev = MsiTestdev::new(interrupts.msi_store(), interrupts.msi_capacity());
        program(&mut dev, 0, 0x51);
        write(&mut dev, entry(0, 12), 0);
        write(&mut dev, DOORBELL, 0);
        assert!(old.received(0x51));
        write(&mut dev, entry(0, 12), CONTROL_MASKED);
        write(&mut dev, DOORBELL, 0);
        assert_eq!(read(&mut dev, entry(0, 12)), CONTROL_MASKED | CONTROL_PENDING);
        program(&mut dev, 9, 0x52);
        write(&mut dev, entry(9, 12), 0);
        dev.status = STATUS_ROUTES_EXHAUSTED;

        let (device_state, interrupt_state) = (dev.save().unwrap(), interrupts.save().unwrap());
        assert_eq!(device_state.capacity as usize, interrupts.msi_capacity());
        drop((dev, interrupts));
        let new = TestVm::new();
        let interrupts = InterruptManager::restore(new.vm.clone(), &interrupt_state).unwrap();
        let mut dev = MsiTestdev::restore(interrupts.clone(), &device_state).unwrap();
        assert_eq!(
            (dev.save().unwrap(), interrupts.save().unwrap()),
            (device_state, interrupt_state),
            "save, restore, save"
        );

        assert_eq!(read(&mut dev, STATUS), STATUS_ROUTES_EXHAUSTED);
        assert_eq!(read(&mut dev, CAPACITY), device_state.capacity);
        assert_eq!(read(&mut dev, entry(0, 8)), 0x51);
        assert_eq!(read(&mut dev, entry(0, 12)), CONTROL_MASKED | CONTROL_PENDING);
        assert!(!new.has(0x51));
        write(&mut dev, entry(0, 12), 0);
        assert!(new.received(0x51), "unmasking delivers the MSI pending at the save");
        assert_eq!(read(&mut dev, entry(0, 12)), 0);
        assert_eq!(read(&mut dev, STATUS), STATUS_OK);
        write(&mut dev, DOORBELL, 9);
        assert!(new.received(0x52), "a vector unmasked at the save fires");
    }

    #[test]
    fn malformed_states_are_refused() {
        let vm = TestVm::new();
        let limit = InterruptManager::new(vm.vm.clone()).unwrap().save().unwrap().route_limit;
        let masked =
            MsiVectorState { message: MsiMessage::default(), masked: true, pending: false, has_gsi: false };
        let stores = vec![
            MsiStoreState { id: 0, vectors: vec![masked; 3] },
            MsiStoreState { id: 1, vectors: vec![masked; MAX_ENTRIES as usize + 1] },
        ];
        let interrupts =
            InterruptManager::restore(vm.vm.clone(), &InterruptState { route_limit: limit, stores }).unwrap();
        let capacity = interrupts.msi_capacity() as u32;
        let good = MsiTestdevState { store: 0, capacity, status: STATUS_OK };
        let refuse = |state: MsiTestdevState| MsiTestdev::restore(interrupts.clone(), &state).err().unwrap();

        let error = refuse(MsiTestdevState { status: 3, ..good });
        assert_eq!(error.to_string(), "the MSI test device's status 3 is none of its codes (0–2)");
        let error = refuse(MsiTestdevState { capacity: capacity + 1, ..good });
        assert!(matches!(error, MsiTestdevStateError::Capacity { .. }), "{error}");
        let error = refuse(MsiTestdevState { store: 5, ..good });
        assert!(
            matches!(error, MsiTestdevStateError::Store(InterruptStateError::UnknownStore(5))),
            "{error}"
        );
        let error = refuse(MsiTestdevState { store: 1, ..good });
        assert!(
            matches!(
                error,
                MsiTestdevStateError::Store(InterruptStateError::StoreTooLarge { vectors: 4097, .. })
            ),
            "{error}"
        );
        assert_eq!(interrupts.unclaimed_msi_stores(), [0, 1], "a refused state claims nothing");
        let dev = MsiTestdev::restore(interrupts.clone(), &good).unwrap();
        assert_eq!(dev.save().unwrap(), good);
        let error = refuse(good);
        assert!(
            matches!(error, MsiTestdevStateError::Store(InterruptStateError::StoreClaimed(0))),
            "{error}"
        );
    }
}
