//! virtio-mmio devices on the MMIO bus: where each sits, its interrupt, and how the kernel hears
//! of it (command line and ACPI).

use carve_virtio::mmio::{MmioTransport, MMIO_WINDOW};

use super::BusDevice;

/// One virtio-mmio device's window and interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSlot {
    pub base: u64,
    pub len: u64,
    pub irq: u32,
}

impl VirtioSlot {
    pub fn new(base: u64, irq: u32) -> VirtioSlot {
        VirtioSlot { base, len: MMIO_WINDOW, irq }
    }

    /// The `virtio_mmio.device=` parameter Linux's VIRTIO_MMIO_CMDLINE_DEVICES understands.
    pub fn cmdline_param(&self) -> String {
        format!("virtio_mmio.device={}K@{:#x}:{}", self.len >> 10, self.base, self.irq)
    }

    /// Address of the QueueNotify register, where ioeventfds match the queue index.
    pub fn notify_address(&self) -> u64 {
        self.base + carve_virtio::mmio::reg::QUEUE_NOTIFY
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_parameter_has_linuxs_syntax() {
        assert_eq!(VirtioSlot::new(0xd000_1000, 6).cmdline_param(), "virtio_mmio.device=4K@0xd0001000:6");
    }
}
