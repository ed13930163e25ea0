//! The virtio-mmio transport, register layout version 2 (virtio 1.x, §4.2.2).
//!
//! The transport owns the driver-facing state machine: status, feature negotiation and queue
//! configuration. It hands the configured queues to the device at DRIVER_OK. Anything the driver
//! does out of order is ignored (or fails FEATURES_OK / sets DEVICE_NEEDS_RESET) and reported
//! once; nothing the driver writes stops the VMM.

use crate::GuestRam;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use crate::fault::FaultLog;
use crate::state::RestoreError;
use crate::{
    DeviceSignals, InterruptLine, VirtioDevice, INT_CONFIG_CHANGE, INT_USED_RING, VIRTIO_F_VERSION_1,
};

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4556_5243; // "CRVE"

pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (§2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// VIRTIO_RING_F_EVENT_IDX: a queue may use event indices only if the driver accepted it.
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// The transport as saved (see [`crate::state`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// The device behind the transport (19 vsock, 33 NSM); a restore checks it.
    pub device_type: u32,
    /// The status the driver wrote ([`status`] bits); DEVICE_NEEDS_RESET is `needs_reset`.
    pub status: u32,
    pub needs_reset: bool,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// The features the driver accepted (or is writing, before FEATURES_OK).
    pub driver_features: u64,
    pub queue_sel: u32,
    /// Every queue of the device, in order.
    pub queues: Vec<QueueConfig>,
    /// `InterruptStatus` bits the driver has not acknowledged.
    pub interrupt_status: u32,
    pub config_generation: u32,
    /// The device runs: DRIVER_OK without DEVICE_NEEDS_RESET. The queues' positions are then
    /// the running device's, and a restore starts the device again with them.
    pub activated: bool,
}

/// One queue: the driver's configuration and, for a running device, where the device is in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub event_idx: bool,
    /// The next available-ring entry the device reads.
    pub next_avail: u16,
    /// The next used-ring entry the device writes.
    pub next_used: u16,
}

impl From<QueueState> for QueueConfig {
    fn from(q: QueueState) -> QueueConfig {
        QueueConfig {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            event_idx: q.event_idx_enabled,
            next_avail: q.next_avail,
            next_used: q.next_used,
        }
    }
}

impl From<QueueConfig> for QueueState {
    fn from(q: QueueConfig) -> QueueState {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestRam,
    signals: Arc<DeviceSignals>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    config_generation: u32,
    faults: FaultLog,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestRam, line: Arc<dyn InterruptLine>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
            .collect();
        MmioTransport {
            device,
            mem,
            signals: Arc::new(DeviceSignals::new(line)),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            config_generation: 0,
            faults: FaultLog::default(),
        }
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The status as the driver reads it.
    pub fn status(&self) -> u32 {
        let needs_reset = if self.signals.needs_reset() { status::DEVICE_NEEDS_RESET } else { 0 };
        self.status | needs_reset
    }

    pub fn is_activated(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && !self.signals.needs_reset()
    }

    fn fault(&mut self, kind: &'static str, what: impl std::fmt::Display) {
        let name = self.device.name();
        self.faults.report(name, kind, what);
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue configuration is writable only between FEATURES_OK and DRIVER_OK, on a queue the
    /// driver has not yet marked ready.
    fn queue_writable(&mut self, offset: u64) -> bool {
        let phase_ok =
            self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED) == status::FEATURES_OK;
        let queue_ready = self.queues.get(self.queue_sel as usize).map(|q| q.ready());
        match (phase_ok, queue_ready) {
            (true, Some(false)) => true,
            (_, None) => {
                self.fault(
                    "queue-sel",
                    format!("driver configured queue {}, which does not exist", self.queue_sel),
                );
                false
            }
            _ => {
                self.fault(
                    "queue-state",
                    format!(
                        "driver wrote queue register {offset:#x} in the wrong state (status {:#x})",
                        self.status
                    ),
                );
                false
            }
        }
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.fault(
                "unaligned",
                format!("driver read {} bytes at register {offset:#x}; registers are 32-bit", data.len()),
            );
            data.fill(0xff);
            return;
        }
        let value = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            reg::INTERRUPT_STATUS => self.signals.interrupt_status(),
            reg::STATUS => self.status(),
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & status::DRIVER == 0 {
                self.fault("config-state", "driver wrote the configuration space before setting DRIVER");
                return;
            }
            self.device.write_config(offset - reg::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.fault(
                "unaligned",
                format!("driver wrote {} bytes at register {offset:#x}; registers are 32-bit", data.len()),
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            self.fault("unaligned", format!("driver wrote at unaligned register offset {offset:#x}"));
            return;
        }
        let value = u32::from_le_bytes(bytes);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.signals.acknowledge(value),
            reg::STATUS => self.write_status(value),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue(offset, value),
            _ => self.fault("read-only", format!("driver wrote read-only or unknown register {offset:#x}")),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & (status::DRIVER | status::FEATURES_OK) != status::DRIVER {
            self.fault("features-state", "driver wrote features outside feature negotiation");
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
            _ => self.fault("features-sel", "driver wrote a feature word beyond bit 63"),
        }
    }

    fn write_queue(&mut self, offset: u64, value: u32) {
        if !self.queue_writable(offset) {
            return;
        }
        let queue = self.selected_queue().expect("queue_writable checked the selection");
        match offset {
            reg::QUEUE_NUM => {
                if queue.try_set_size(value.min(u16::MAX.into()) as u16).is_err() || value > u16::MAX.into() {
                    let max = queue.max_size();
                    self.fault(
                        "queue-size",
                        format!("driver set a queue size of {value}; it must be a power of two up to {max}"),
                    );
                }
            }
            reg::QUEUE_READY => queue.set_ready(value == 1),
            reg::QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
            reg::QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
            reg::QUEUE_DRIVER_LOW => queue.set_avail_ring_address(Some(value), None),
            reg::QUEUE_DRIVER_HIGH => queue.set_avail_ring_address(None, Some(value)),
            reg::QUEUE_DEVICE_LOW => queue.set_used_ring_address(Some(value), None),
            reg::QUEUE_DEVICE_HIGH => queue.set_used_ring_address(None, Some(value)),
            _ => unreachable!("write() routes only queue registers here"),
        }
    }

    /// A notification that reached the transport rather than an ioeventfd.
    fn notify(&mut self, queue: u32) {
        if !self.is_activated() {
            self.fault("notify-state", "driver notified a queue before DRIVER_OK");
            return;
        }
        match self.device.queue_notifiers().get(queue as usize) {
            Some(event) => {
                let _ = event.write(1);
            }
            None => {
                self.fault("notify-queue", format!("driver notified queue {queue}, which does not exist"))
            }
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        if value & self.status != self.status {
            self.fault(
                "status-clear",
                format!("driver cleared status bits ({:#x} → {value:#x}) without a reset", self.status),
            );
            return;
        }
        if added & status::FAILED != 0 {
            self.status = value;
            return;
        }
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let unknown = self.driver_features & !offered;
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                self.fault(
                    "features",
                    format!(
                        "driver accepted features {:#x} (offered {offered:#x}; VERSION_1 is required); FEATURES_OK refused",
                        self.driver_features
                    ),
                );
                self.status = value & !status::FEATURES_OK;
                return;
            }
        }
        if added & status::DRIVER_OK != 0 {
            if self.status & status::FEATURES_OK == 0 {
                self.fault("driver-ok", "driver set DRIVER_OK before FEATURES_OK");
                self.status = value & !status::DRIVER_OK;
                return;
            }
            self.status = value;
            self.activate();
            return;
        }
        self.status = value;
    }

    fn activate(&mut self) {
        let invalid = self.queues.iter().position(|q| !q.is_valid(&self.mem));
        let result = match invalid {
            Some(index) => Err(crate::ActivateError::InvalidQueue(index)),
            None => {
                // The device gets its own copies; the transport keeps answering register reads.
                let queues = self.queues.iter().filter_map(|q| Queue::try_from(q.state()).ok()).collect();
                self.device.activate(self.driver_features, queues, self.signals.clone())
            }
        };
        match result {
            Ok(()) => {
                log::info!(target: "carve::virtio", "{}: driver ready (features {:#x})", self.device.name(), self.driver_features)
            }
            Err(e) => {
                self.fault("activate", format!("cannot start: {e}; device needs reset"));
                self.signals.signal_needs_reset();
            }
        }
    }

    /// The transport's state; `running` are the queues of the device's running half, whose
    /// positions are the ones that count while the device is activated.
    pub(crate) fn save_state(&self, running: Option<Vec<QueueConfig>>) -> MmioState {
        let activated = self.is_activated();
        let running = running.filter(|queues| activated && queues.len() == self.queues.len());
        let queues = match running {
            Some(running) => self
                .queues
                .iter()
                .zip(running)
                .map(|(own, running)| QueueConfig {
                    next_avail: running.next_avail,
                    next_used: running.next_used,
                    ..own.state().into()
                })
                .collect(),
            None => self.queues.iter().map(|q| q.state().into()).collect(),
        };
        MmioState {
            device_type: self.device.device_type(),
            status: self.status,
            needs_reset: self.signals.needs_reset(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues,
            interrupt_status: self.signals.interrupt_status(),
            config_generation: self.config_generation,
            activated,
        }
    }

    /// A transport in `state` for `device`, checked against the device and guest memory; an
    /// activated device is started again with the saved queue positions.
    pub(crate) fn restore_state(
        mut device: Box<dyn VirtioDevice>,
        mem: GuestRam,
        line: Arc<dyn InterruptLine>,
        state: &MmioState,
    ) -> Result<MmioTransport, RestoreError> {
        let name = device.name();
        if state.device_type != device.device_type() {
            return Err(RestoreError::DeviceType {
                saved: state.device_type,
                device: device.device_type(),
                name,
            });
        }
        let known =
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK | status::FAILED;
        if state.status & !known != 0 {
            return Err(RestoreError::Status { name, status: state.status });
        }
        let has = |bit| state.status & bit != 0;
        if (has(status::DRIVER_OK) && !has(status::FEATURES_OK))
            || (has(status::FEATURES_OK) && !has(status::DRIVER))
        {
            return Err(RestoreError::StatusOrder { name, status: state.status });
        }
        let offered = device.features();
        if has(status::FEATURES_OK)
            && (state.driver_features & !offered != 0 || state.driver_features & VIRTIO_F_VERSION_1 == 0)
        {
            return Err(RestoreError::Features { name, accepted: state.driver_features, offered });
        }
        if state.activated != (has(status::DRIVER_OK) && !state.needs_reset) {
            return Err(RestoreError::Activated { name, status: state.status, activated: state.activated });
        }
        if state.interrupt_status & !(INT_USED_RING | INT_CONFIG_CHANGE) != 0 {
            return Err(RestoreError::InterruptStatus { name, status: state.interrupt_status });
        }
        let max_sizes = device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(RestoreError::QueueCount {
                name,
                saved: state.queues.len(),
                device: max_sizes.len(),
            });
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (index, (config, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
            if config.max_size != max {
                return Err(RestoreError::Queue {
                    name,
                    index,
                    problem: format!("has a maximum size of {}, but the device's is {max}", config.max_size),
                });
            }
            if config.event_idx && state.driver_features & VIRTIO_RING_F_EVENT_IDX == 0 {
                return Err(RestoreError::Queue {
                    name,
                    index,
                    problem: "uses event indices, which the driver did not accept".into(),
                });
            }
            let queue = Queue::try_from(QueueState::from(*config)).map_err(|e| RestoreError::Queue {
                name,
                index,
                problem: format!("is malformed ({e})"),
            })?;
            if state.activated && !queue.is_valid(&mem) {
                return Err(RestoreError::QueueOutsideMemory {
                    name,
                    index,
                    desc: config.desc_table,
                    avail: config.avail_ring,
                    used: config.used_ring,
                });
            }
            queues.push(queue);
        }
        let signals = Arc::new(DeviceSignals::restored(line, state.interrupt_status, state.needs_reset));
        if state.activated {
            let running = queues.iter().filter_map(|q| Queue::try_from(q.state()).ok()).collect();
            device
                .activate(state.driver_features, running, signals.clone())
                .map_err(|e| RestoreError::Activate { name, problem: e.to_string() })?;
        }
        Ok(MmioTransport {
            device,
            mem,
            signals,
            status: state.status,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            queues,
            config_generation: state.config_generation,
            faults: FaultLog::default(),
        })
    }

    fn reset(&mut self) {
        if self.status & status::DRIVER_OK != 0 {
            self.device.reset();
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.signals.clear();
    }
}
