//! carve's virtio layer: the virtio-mmio transport and the devices behind it.
//!
//! Devices are state machines with no knowledge of the bus or of KVM: the VMM maps a
//! [`mmio::MmioTransport`] on its MMIO bus, binds the device's queue notifiers to ioeventfds and
//! its [`InterruptLine`] to an irqfd, and runs the device's event handler on its event loop.

pub mod fault;
mod link;
pub mod mmio;
pub mod nsm;
pub mod state;
pub mod vsock;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM as every part of carve sees it: vm-memory's mmap backend with a dirty bitmap per
/// region, so the pages carve's own devices write are known alongside KVM's dirty log (which
/// sees only the guest's writes).
pub type GuestRam = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// VIRTIO_F_VERSION_1: the device speaks virtio 1.x (little-endian, modern layout).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// `InterruptStatus` bits of virtio-mmio.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// The wire a device's interrupts leave on (an irqfd-backed IOAPIC pin in carve).
pub trait InterruptLine: Send + Sync {
    fn trigger(&self);
}

/// What a device shares with its transport once active: the interrupt status the driver reads
/// and acknowledges, the line that raises it, and the device's call for a reset.
pub struct DeviceSignals {
    status: AtomicU32,
    needs_reset: AtomicBool,
    line: Arc<dyn InterruptLine>,
}

impl DeviceSignals {
    pub fn new(line: Arc<dyn InterruptLine>) -> DeviceSignals {
        DeviceSignals { status: AtomicU32::new(0), needs_reset: AtomicBool::new(false), line }
    }

    /// Tells the driver that used buffers are waiting.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::AcqRel);
        self.line.trigger();
    }

    /// Sets DEVICE_NEEDS_RESET and tells the driver through a configuration-change interrupt.
    pub fn signal_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            self.status.fetch_or(INT_CONFIG_CHANGE, Ordering::AcqRel);
            self.line.trigger();
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    fn interrupt_status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }

    /// Signals as saved: the status the driver had not acknowledged and DEVICE_NEEDS_RESET. The
    /// line is not raised; the interrupt controller's own state says what is pending.
    fn restored(line: Arc<dyn InterruptLine>, status: u32, needs_reset: bool) -> DeviceSignals {
        DeviceSignals { status: AtomicU32::new(status), needs_reset: AtomicBool::new(needs_reset), line }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the device expects {expected} queues, the driver set up {found}")]
    QueueCount { expected: usize, found: usize },
    #[error("queue {0} is not ready or lies outside guest memory")]
    InvalidQueue(usize),
    #[error("the device's backend is gone: {0}")]
    Backend(String),
}

/// A virtio device as the transport sees it.
pub trait VirtioDevice: Send {
    /// The virtio device ID (19 for vsock).
    fn device_type(&self) -> u32;
    fn name(&self) -> &'static str;
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Reads from the device-specific configuration space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the configuration space; read-only configurations ignore them.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The eventfds the driver's queue notifications arrive on, one per queue.
    fn queue_notifiers(&self) -> &[EventFd];
    /// Starts the device with the queues the driver configured.
    fn activate(
        &mut self,
        features: u64,
        queues: Vec<Queue>,
        signals: Arc<DeviceSignals>,
    ) -> Result<(), ActivateError>;
    /// Returns the device to its initial state (driver wrote status 0).
    fn reset(&mut self);
}
