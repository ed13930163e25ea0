//! The i8042 keyboard controller (vm-superio), here only for its CPU reset command, which
//! ends the VM as a clean reset.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::BusDevice;
use crate::exit::{ExitSignal, VmExit};

/// Data port 0x60 and command port 0x64 (offsets 0 and 4).
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
/// Written to the command port, pulses the CPU reset line.
pub const RESET_COMMAND: u8 = 0xfe;

pub struct ResetTrigger(pub Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(VmExit::Reset);
        Ok(())
    }
}

pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    pub fn new(signal: Arc<ExitSignal>) -> I8042 {
        I8042(I8042Device::new(ResetTrigger(signal)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        data[0] = self.0.read(offset as u8);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let _ = self.0.write(offset as u8, data[0]);
    }
}
