//! Platform devices as state machines behind one narrow trait; the VMM maps them on the PIO
//! and MMIO buses and wires their interrupts and exit requests. Each platform device also
//! implements `carve_snapshot::Persist`: its registers as plain data, restoring as a constructor
//! that takes the new VM's handles (lines, sinks, the restored interrupt manager).

pub mod bus;
pub mod debug_exit;
pub mod fw_cfg;
pub mod i8042;
pub mod msi_testdev;
pub mod serial;
pub mod testdev;
pub mod virtio;

/// A device that answers reads and writes on a bus. `base` is where the access matched (a
/// device may be mapped at several places), `offset` the distance from it.
pub trait BusDevice: Send {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}
