//! QEMU's isa-debug-exit: a write of `v` ends the VM with process status `(v << 1) | 1`.

use std::convert::Infallible;
use std::sync::Arc;

use carve_snapshot::Persist;
use serde::{Deserialize, Serialize};

use super::BusDevice;
use crate::exit::{ExitSignal, VmExit};

pub const DEBUG_EXIT_PORT: u64 = 0xf4;
pub const DEBUG_EXIT_LEN: u64 = 4;

pub struct DebugExit(pub Arc<ExitSignal>);

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset != 0 || !matches!(data.len(), 1 | 2 | 4) {
            return;
        }
        let mut value = [0u8; 4];
        value[..data.len()].copy_from_slice(data);
        self.0.request(VmExit::DebugExit(u32::from_le_bytes(value)));
    }
}

/// The device has no registers: a write ends the VM at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugExitState;

impl Persist for DebugExit {
    type State = DebugExitState;
    /// The new VM's exit signal.
    type ConstructorArgs = Arc<ExitSignal>;
    type Error = Infallible;

    fn save(&self) -> Result<DebugExitState, Infallible> {
        Ok(DebugExitState)
    }

    fn restore(exit: Arc<ExitSignal>, _state: &DebugExitState) -> Result<DebugExit, Infallible> {
        Ok(DebugExit(exit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_device_ends_the_new_vm() {
        let old = Arc::new(ExitSignal::new().unwrap());
        let state = DebugExit(old.clone()).save().unwrap();
        let new = Arc::new(ExitSignal::new().unwrap());
        let mut dev = DebugExit::restore(new.clone(), &state).unwrap();
        assert_eq!(dev.save().unwrap(), state);
        assert_eq!(serde_json::to_string(&state).unwrap(), "null", "nothing to save");
        dev.write(DEBUG_EXIT_PORT, 0, &[3]);
        assert_eq!(new.take(), Some(VmExit::DebugExit(3)));
        assert!(!old.is_requested());
    }
}
