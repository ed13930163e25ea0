//! A test driver for the virtio-vsock device: the transport handshake, then packets placed on
//! the queues by hand, with the device held as the VMM holds it (an `MmioDevice`, the backend
//! on a real event loop), so it can be parked, saved and restored.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, MutexGuard};

use carve_snapshot::Persist;
use carve_virtio::mmio::{reg, status, MmioTransport};
use carve_virtio::state::{MmioDevice, RestoreError, VirtioState, VsockRestore};
use carve_virtio::vsock::{Vsock, VsockBackend};
use carve_virtio::{GuestRam, InterruptLine};
use event_manager::{EventManager, MutEventSubscriber, SubscriberId, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};

pub const CID: u64 = 7;
pub const MEM_SIZE: usize = 1 << 20;
pub const QUEUE: u16 = 16;
const RX: usize = 0;
const TX: usize = 1;
const EVENTS: usize = 2;
/// Queue i: descriptors at `QUEUE_BASE[i]`, available ring 0x1000 after, used ring 0x2000 after.
const QUEUE_BASE: [u64; 3] = [0x1000, 0x4000, 0x7000];
/// Each queue's buffers: 16 slots of `SLOT` bytes.
const BUFFERS: [u64; 3] = [0x20000, 0x40000, 0x60000];
const SLOT: u64 = 0x1000;
const EVENT_BUFFER: u32 = 8;
const F_WRITE: u16 = 2;
pub const HEADER: usize = 44;
/// The receive credit the driver advertises.
pub const BUF_ALLOC: u32 = 64 * 1024;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;

#[derive(Default)]
pub struct CountingLine(pub AtomicU32);
impl InterruptLine for CountingLine {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A packet the device delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub op: u16,
    pub flags: u32,
    pub data: Vec<u8>,
}

/// The driver's side of one queue.
#[derive(Clone, Copy, Default)]
struct Ring {
    avail_idx: u16,
    used_seen: u16,
}

pub struct VsockDriver {
    /// As the VMM holds it; `None` only while a restore replaces it.
    pub device: Option<MmioDevice<VsockBackend>>,
    pub mem: GuestRam,
    pub events: EventManager<Box<dyn MutEventSubscriber>>,
    subscriber: Option<SubscriberId>,
    pub line: Arc<CountingLine>,
    pub uds: PathBuf,
    rings: [Ring; 3],
    pub dir: tempfile::TempDir,
}

impl VsockDriver {
    /// A device on a fresh socket directory, set up by the driver, with receive and event
    /// buffers given.
    pub fn new() -> VsockDriver {
        let mut driver = VsockDriver::unset();
        driver.negotiate();
        driver.setup_queues();
        driver.driver_ok();
        driver
    }

    /// A device the driver has not touched yet.
    pub fn unset() -> VsockDriver {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (device, backend) = Vsock::new(CID, uds.clone(), None, mem.clone()).unwrap();
        let line = Arc::new(CountingLine::default());
        let transport = MmioTransport::new(Box::new(device), mem.clone(), line.clone());
        VsockDriver::around(transport, backend, mem, line, uds, dir)
    }

    fn around(
        transport: MmioTransport,
        backend: VsockBackend,
        mem: GuestRam,
        line: Arc<CountingLine>,
        uds: PathBuf,
        dir: tempfile::TempDir,
    ) -> VsockDriver {
        let events = EventManager::<Box<dyn MutEventSubscriber>>::new().unwrap();
        let mut driver = VsockDriver {
            device: Some(MmioDevice::new(transport, backend)),
            mem,
            events,
            subscriber: None,
            line,
            uds,
            rings: [Ring::default(); 3],
            dir,
        };
        driver.unpark();
        driver
    }

    /// Where the guest's connections to parent port `port` go.
    pub fn port_path(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.uds.display()))
    }

    /// The transport, as the MMIO bus reaches it.
    pub fn transport(&self) -> MutexGuard<'_, MmioTransport> {
        self.device.as_ref().expect("a device").transport.lock().unwrap()
    }

    pub fn write(&mut self, offset: u64, value: u32) {
        self.transport().write(offset, &value.to_le_bytes());
    }

    pub fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport().read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// Status up to FEATURES_OK, with VERSION_1 accepted.
    pub fn negotiate(&mut self) {
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, 1);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    }

    /// Configures the three queues and marks them ready.
    pub fn setup_queues(&mut self) {
        for (index, base) in QUEUE_BASE.into_iter().enumerate() {
            self.write(reg::QUEUE_SEL, index as u32);
            self.write(reg::QUEUE_NUM, QUEUE.into());
            self.write(reg::QUEUE_DESC_LOW, base as u32);
            self.write(reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
            self.write(reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
            self.write(reg::QUEUE_READY, 1);
        }
    }

    /// DRIVER_OK, then receive and event buffers for the device.
    pub fn driver_ok(&mut self) {
        let ready = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        self.write(reg::STATUS, ready);
        assert!(self.transport().is_activated());
        for id in 0..QUEUE {
            self.give(RX, id, SLOT as u32);
        }
        for id in 0..4 {
            self.give(EVENTS, id, EVENT_BUFFER);
        }
        self.notify(RX);
        self.notify(EVENTS);
    }

    /// Puts descriptor `id` (its queue's slot `id`) in the available ring.
    fn give(&mut self, queue: usize, id: u16, len: u32) {
        let flags = if queue == TX { 0 } else { F_WRITE };
        let at = QUEUE_BASE[queue] + 16 * u64::from(id);
        let addr = BUFFERS[queue] + SLOT * u64::from(id);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(0u16, GuestAddress(at + 14)).unwrap();
        let ring = &mut self.rings[queue];
        let avail = QUEUE_BASE[queue] + 0x1000;
        self.mem.write_obj(id, GuestAddress(avail + 4 + 2 * u64::from(ring.avail_idx % QUEUE))).unwrap();
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        self.mem.write_obj(ring.avail_idx, GuestAddress(avail + 2)).unwrap();
    }

    /// A notification through the transport (as the ioeventfd would deliver it), then the loop.
    fn notify(&mut self, queue: usize) {
        self.write(reg::QUEUE_NOTIFY, queue as u32);
        self.pump();
    }

    /// Runs the device's event loop until it has nothing more to do.
    pub fn pump(&mut self) {
        while self.events.run_with_timeout(20).unwrap() > 0 {}
    }

    /// The next used element of `queue`: (descriptor id, written length).
    fn used(&mut self, queue: usize) -> Option<(u16, u32)> {
        let used = QUEUE_BASE[queue] + 0x2000;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        let ring = &mut self.rings[queue];
        if idx == ring.used_seen {
            return None;
        }
        let at = used + 4 + 8 * u64::from(ring.used_seen % QUEUE);
        ring.used_seen = ring.used_seen.wrapping_add(1);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        Some((id as u16, self.mem.read_obj(GuestAddress(at + 4)).unwrap()))
    }

    /// Sends one packet from guest port `src_port` to the parent's `dst_port`.
    pub fn send(&mut self, src_port: u32, dst_port: u32, op: u16, flags: u32, data: &[u8]) {
        while self.used(TX).is_some() {}
        let id = self.rings[TX].avail_idx % QUEUE;
        let addr = BUFFERS[TX] + SLOT * u64::from(id);
        let mut header = [0u8; HEADER];
        header[0..8].copy_from_slice(&CID.to_le_bytes());
        header[8..16].copy_from_slice(&3u64.to_le_bytes());
        header[16..20].copy_from_slice(&src_port.to_le_bytes());
        header[20..24].copy_from_slice(&dst_port.to_le_bytes());
        header[24..28].copy_from_slice(&(data.len() as u32).to_le_bytes());
        header[28..30].copy_from_slice(&1u16.to_le_bytes());
        header[30..32].copy_from_slice(&op.to_le_bytes());
        header[32..36].copy_from_slice(&flags.to_le_bytes());
        header[36..40].copy_from_slice(&BUF_ALLOC.to_le_bytes());
        header[40..44].copy_from_slice(&0u32.to_le_bytes());
        self.mem.write_slice(&header, GuestAddress(addr)).unwrap();
        self.mem.write_slice(data, GuestAddress(addr + HEADER as u64)).unwrap();
        self.give(TX, id, (HEADER + data.len()) as u32);
        self.notify(TX);
    }

    /// Every packet the device delivered since the last call; the buffers go back to it.
    pub fn receive(&mut self) -> Vec<Packet> {
        self.pump();
        let mut packets = Vec::new();
        while let Some((id, len)) = self.used(RX) {
            let addr = BUFFERS[RX] + SLOT * u64::from(id);
            let mut bytes = vec![0u8; len as usize];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            let le32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
            let le64 = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
            let data_len = le32(24) as usize;
            packets.push(Packet {
                src_cid: le64(0),
                dst_cid: le64(8),
                src_port: le32(16),
                dst_port: le32(20),
                op: u16::from_le_bytes([bytes[30], bytes[31]]),
                flags: le32(32),
                data: bytes[HEADER..HEADER + data_len].to_vec(),
            });
            self.give(RX, id, SLOT as u32);
        }
        if !packets.is_empty() {
            self.notify(RX);
        }
        packets
    }

    /// The event IDs the device wrote into event buffers since the last call.
    pub fn device_events(&mut self) -> Vec<u32> {
        self.pump();
        let mut ids = Vec::new();
        while let Some((id, len)) = self.used(EVENTS) {
            assert_eq!(len, 4, "struct virtio_vsock_event is 4 bytes");
            let addr = BUFFERS[EVENTS] + SLOT * u64::from(id);
            ids.push(self.mem.read_obj::<u32>(GuestAddress(addr)).unwrap());
            self.give(EVENTS, id, EVENT_BUFFER);
        }
        ids
    }

    /// Connects guest port `guest_port` to the parent's `port`; returns the reply's operation.
    pub fn connect(&mut self, guest_port: u32, port: u32) -> u16 {
        self.send(guest_port, port, OP_REQUEST, 0, &[]);
        let replies = self.receive();
        let reply = replies.iter().find(|p| p.dst_port == guest_port).expect("the device answers a REQUEST");
        reply.op
    }

    /// Takes the backend off the event loop, as the VMM does to pause.
    pub fn park(&mut self) {
        if let Some(id) = self.subscriber.take() {
            self.events.remove_subscriber(id).unwrap();
        }
    }

    /// Puts the backend back on the event loop, as the VMM does to resume.
    pub fn unpark(&mut self) {
        if let (None, Some(device)) = (self.subscriber, &self.device) {
            self.subscriber = Some(self.events.add_subscriber(Box::new(device.backend.clone())));
        }
    }

    /// Saves the device (parked), as the VMM does for a snapshot.
    pub fn save(&mut self) -> VirtioState {
        self.park();
        self.device.as_ref().unwrap().save().unwrap()
    }

    /// Replaces the device with one restored from `state` on the same socket path and guest
    /// memory (the old one is dropped first, as in a new process); the driver's own state,
    /// which lives in guest memory, carries on.
    pub fn restore(&mut self, state: &VirtioState) -> Result<(), RestoreError> {
        self.restore_with_cid(state, CID)
    }

    pub fn restore_with_cid(&mut self, state: &VirtioState, cid: u64) -> Result<(), RestoreError> {
        self.park();
        self.events = EventManager::new().unwrap();
        // The old process ends: its sockets close and its socket file goes.
        self.device = None;
        let args = VsockRestore {
            cid,
            uds: self.uds.clone(),
            shared_listeners: None,
            mem: self.mem.clone(),
            line: self.line.clone(),
        };
        self.device = Some(MmioDevice::restore(args, state)?);
        self.unpark();
        Ok(())
    }
}
