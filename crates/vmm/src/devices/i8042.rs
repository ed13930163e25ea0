//! The i8042 keyboard controller (vm-superio), here only for its CPU reset command, which
//! ends the VM as a clean reset.

use std::convert::Infallible;
use std::sync::Arc;

use carve_snapshot::Persist;
use serde::{Deserialize, Serialize};
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

/// vm-superio's i8042 keeps no registers (reads are 0; the reset command acts at once), so
/// there is nothing to save.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State;

impl Persist for I8042 {
    type State = I8042State;
    /// The new VM's exit signal, which the reset command raises.
    type ConstructorArgs = Arc<ExitSignal>;
    type Error = Infallible;

    fn save(&self) -> Result<I8042State, Infallible> {
        Ok(I8042State)
    }

    fn restore(signal: Arc<ExitSignal>, _state: &I8042State) -> Result<I8042, Infallible> {
        Ok(I8042::new(signal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_controller_resets_the_new_vm() {
        let old = Arc::new(ExitSignal::new().unwrap());
        let state = I8042::new(old.clone()).save().unwrap();
        let new = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::restore(new.clone(), &state).unwrap();
        assert_eq!(dev.save().unwrap(), state);
        dev.write(I8042_BASE, 4, &[RESET_COMMAND]);
        assert_eq!(new.take(), Some(VmExit::Reset));
        assert!(!old.is_requested());
    }
}
