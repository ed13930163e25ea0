//! The 8250 UART on COM1 (vm-superio), raising its IRQ through a legacy interrupt line.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::BusDevice;
use crate::interrupts::LegacyLine;

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;

pub type SerialOutput = Box<dyn Write + Send>;

pub struct SerialPort {
    uart: Serial<LegacyLine, NoEvents, SerialOutput>,
}

impl SerialPort {
    pub fn new(irq: LegacyLine, output: SerialOutput) -> SerialPort {
        SerialPort { uart: Serial::new(irq, output) }
    }

    /// Queues console input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        // A failed write to the output sink loses console text, never the VM.
        let _ = self.uart.write(offset as u8, data[0]);
    }
}
