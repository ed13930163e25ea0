//! QEMU's isa-debug-exit: a write of `v` ends the VM with process status `(v << 1) | 1`.

use std::sync::Arc;

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
