//! The 8250 UART on COM1 (vm-superio), raising its IRQ through an eventfd bound to a GSI.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;

/// An interrupt line backed by an eventfd that KVM routes to a GSI (irqfd).
pub struct IrqEventFd(pub EventFd);

impl Trigger for IrqEventFd {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialOutput = Box<dyn Write + Send>;

pub struct SerialPort {
    uart: Serial<IrqEventFd, NoEvents, SerialOutput>,
}

impl SerialPort {
    pub fn new(irq: IrqEventFd, output: SerialOutput) -> SerialPort {
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
