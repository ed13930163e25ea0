//! A test driver for the virtio-nsm device: the transport handshake, then requests placed on
//! the queue as raw descriptor chains, answered by the backend on a real event loop. The
//! device is held as the VMM holds it (an `MmioDevice`), so it can be parked, saved and
//! restored.
#![allow(dead_code)]

use carve_virtio::GuestRam;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, MutexGuard};

use carve_nsm::pcr::BootMeasurements;
use carve_nsm::pki::CertificateAuthority;
use carve_nsm::Nsm;
use carve_snapshot::Persist;
use carve_virtio::mmio::{reg, status, MmioTransport};
use carve_virtio::nsm::{NsmBackend, NsmDevice, NsmStats};
use carve_virtio::state::{MmioDevice, NsmRestore, RestoreError, VirtioState};
use carve_virtio::InterruptLine;
use event_manager::{EventManager, MutEventSubscriber, SubscriberId, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};

pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
/// Buffers are placed from here on.
pub const DATA: u64 = 0x10000;
pub const MEM_SIZE: usize = 1 << 20;
pub const QUEUE: u16 = 16;
const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

#[derive(Default)]
pub struct CountingLine(pub AtomicU32);
impl InterruptLine for CountingLine {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

pub struct Driver {
    /// As the VMM holds it; `None` only while a restore replaces it.
    pub device: Option<MmioDevice<NsmBackend>>,
    pub mem: GuestRam,
    pub events: EventManager<Box<dyn MutEventSubscriber>>,
    subscriber: Option<SubscriberId>,
    pub line: Arc<CountingLine>,
    pub stats: Arc<NsmStats>,
    avail_idx: u16,
    used_seen: u16,
    _state: tempfile::TempDir,
}

impl Driver {
    pub fn new(boot: &BootMeasurements) -> Driver {
        let state = tempfile::tempdir().unwrap();
        let nsm = Nsm::new(
            "i-0000000000000000-enc3".into(),
            boot,
            CertificateAuthority::open(state.path()).unwrap(),
        )
        .unwrap();
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (device, backend) = NsmDevice::new(nsm, mem.clone()).unwrap();
        let stats = backend.stats();
        let events = EventManager::<Box<dyn MutEventSubscriber>>::new().unwrap();
        let line = Arc::new(CountingLine::default());
        let transport = MmioTransport::new(Box::new(device), mem.clone(), line.clone());
        let mut driver = Driver {
            device: Some(MmioDevice::new(transport, backend)),
            mem,
            events,
            subscriber: None,
            line,
            stats,
            avail_idx: 0,
            used_seen: 0,
            _state: state,
        };
        driver.unpark();
        driver.handshake();
        driver
    }

    /// The CA the NSM's leaf comes from (kept in the driver's state directory).
    pub fn ca(&self) -> CertificateAuthority {
        CertificateAuthority::open(self._state.path()).unwrap()
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

    /// Replaces the device with one restored from `state` on the same guest memory; the
    /// driver's own state, which lives in guest memory, carries on.
    pub fn restore(&mut self, state: &VirtioState) -> Result<(), RestoreError> {
        self.park();
        self.events = EventManager::new().unwrap();
        self.device = None;
        let args = NsmRestore { ca: self.ca(), mem: self.mem.clone(), line: self.line.clone() };
        let device = MmioDevice::<NsmBackend>::restore(args, state)?;
        self.stats = device.backend.lock().unwrap().stats();
        self.device = Some(device);
        self.unpark();
        Ok(())
    }

    /// The transport, as the MMIO bus reaches it.
    pub fn transport(&self) -> MutexGuard<'_, MmioTransport> {
        self.device.as_ref().expect("a device").transport.lock().unwrap()
    }

    pub fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport().read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    pub fn write(&mut self, offset: u64, value: u32) {
        self.transport().write(offset, &value.to_le_bytes());
    }

    fn handshake(&mut self) {
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, 1);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        self.write(reg::QUEUE_SEL, 0);
        self.write(reg::QUEUE_NUM, QUEUE.into());
        self.write(reg::QUEUE_DESC_LOW, DESC as u32);
        self.write(reg::QUEUE_DRIVER_LOW, AVAIL as u32);
        self.write(reg::QUEUE_DEVICE_LOW, USED as u32);
        self.write(reg::QUEUE_READY, 1);
        let ready = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        self.write(reg::STATUS, ready);
        self.pump();
    }

    /// Runs the device's event loop until it has nothing more to do.
    pub fn pump(&mut self) {
        while self.events.run_with_timeout(10).unwrap() > 0 {}
    }

    /// Makes a chain of `(address, length, flags)` buffers available and notifies the device.
    pub fn submit(&mut self, buffers: &[(u64, u32, u16)]) {
        let first = (self.avail_idx % QUEUE) * 4 % QUEUE;
        for (i, &(addr, len, flags)) in buffers.iter().enumerate() {
            let id = first + i as u16;
            let last = i + 1 == buffers.len();
            let flags = if last { flags } else { flags | F_NEXT };
            let at = DESC + 16 * u64::from(id);
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(id + 1, GuestAddress(at + 14)).unwrap();
        }
        let slot = GuestAddress(AVAIL + 4 + 2 * u64::from(self.avail_idx % QUEUE));
        self.mem.write_obj(first, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2)).unwrap();
        self.write(reg::QUEUE_NOTIFY, 0);
        self.pump();
    }

    /// The next used element: (descriptor id, written length), if the device returned one.
    pub fn used(&mut self) -> Option<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        if idx == self.used_seen {
            return None;
        }
        let at = USED + 4 + 8 * u64::from(self.used_seen % QUEUE);
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((self.mem.read_obj(GuestAddress(at)).unwrap(), self.mem.read_obj(GuestAddress(at + 4)).unwrap()))
    }

    /// Sends `request` with a 0x3000-byte response buffer; returns the response bytes.
    pub fn call(&mut self, request: &[u8]) -> Vec<u8> {
        let response_at = DATA + 0x4000;
        self.mem.write_slice(request, GuestAddress(DATA)).unwrap();
        self.submit(&[(DATA, request.len() as u32, 0), (response_at, 0x3000, F_WRITE)]);
        let (_, len) = self.used().expect("the device answers every request");
        let mut response = vec![0; len as usize];
        self.mem.read_slice(&mut response, GuestAddress(response_at)).unwrap();
        response
    }
}
