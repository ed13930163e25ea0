//! The virtio-mmio transport against driver mistakes, with the real vsock device behind it.

use carve_virtio::GuestRam;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use carve_virtio::mmio::{reg, status, MmioTransport};
use carve_virtio::vsock::{Vsock, VsockBackend};
use carve_virtio::InterruptLine;
use vm_memory::GuestAddress;

#[derive(Default)]
struct CountingLine(AtomicU32);
impl InterruptLine for CountingLine {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn transport(name: &str) -> (MmioTransport, VsockBackend, Arc<CountingLine>) {
    let dir = std::env::temp_dir().join(format!("carve-transport-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join(name);
    let _ = std::fs::remove_file(&uds);
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let (device, backend) = Vsock::new(9, uds, None, mem.clone()).unwrap();
    let line = Arc::new(CountingLine::default());
    (MmioTransport::new(Box::new(device), mem, line.clone()), backend, line)
}

fn read(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn write(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn negotiate(t: &mut MmioTransport, high_features: u32) {
    write(t, reg::STATUS, status::ACKNOWLEDGE);
    write(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write(t, reg::DRIVER_FEATURES_SEL, 1);
    write(t, reg::DRIVER_FEATURES, high_features);
    write(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
}

fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
    write(t, reg::QUEUE_SEL, index);
    write(t, reg::QUEUE_NUM, size);
    write(t, reg::QUEUE_DESC_LOW, base as u32);
    write(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
    write(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
    write(t, reg::QUEUE_READY, 1);
}

#[test]
fn identifies_as_a_version_2_vsock_device_with_its_cid() {
    let (mut t, _backend, _) = transport("ident.sock");
    assert_eq!(read(&mut t, reg::MAGIC), 0x7472_6976);
    assert_eq!(read(&mut t, reg::VERSION), 2);
    assert_eq!(read(&mut t, reg::DEVICE_ID), 19);
    write(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(read(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 only");
    let mut cid = [0u8; 8];
    t.read(reg::CONFIG, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 9);
    let mut beyond = [0xaau8; 4];
    t.read(reg::CONFIG + 8, &mut beyond);
    assert_eq!(beyond, [0; 4], "configuration space beyond the CID reads zero");
}

#[test]
fn features_without_version_1_or_beyond_the_offer_are_refused() {
    let (mut t, _backend, _) = transport("features.sock");
    negotiate(&mut t, 0);
    assert_eq!(t.status() & status::FEATURES_OK, 0, "no VERSION_1: FEATURES_OK refused");
    write(&mut t, reg::STATUS, 0);
    negotiate(&mut t, 1 | 2);
    assert_eq!(t.status() & status::FEATURES_OK, 0, "a feature not offered: refused");
    write(&mut t, reg::STATUS, 0);
    negotiate(&mut t, 1);
    assert_ne!(t.status() & status::FEATURES_OK, 0);
}

#[test]
fn register_abuse_is_ignored() {
    let (mut t, _backend, _) = transport("abuse.sock");
    // Queue setup before FEATURES_OK, unaligned and short accesses, unknown registers.
    write(&mut t, reg::QUEUE_SEL, 0);
    write(&mut t, reg::QUEUE_NUM, 16);
    write(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(read(&mut t, reg::QUEUE_READY), 0, "queue writes before FEATURES_OK are ignored");
    t.write(reg::STATUS + 1, &[0xff]);
    t.write(reg::STATUS, &[0xff, 0xff]);
    let mut short = [0u8; 2];
    t.read(reg::MAGIC, &mut short);
    assert_eq!(short, [0xff, 0xff], "a short register read gets all ones");
    write(&mut t, 0x0fe, 1);
    write(&mut t, reg::MAGIC, 0);
    assert_eq!(read(&mut t, reg::MAGIC), 0x7472_6976);
    assert_eq!(t.status(), 0);

    negotiate(&mut t, 1);
    write(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(read(&mut t, reg::QUEUE_NUM_MAX), 256);
    write(&mut t, reg::QUEUE_NUM, 512);
    write(&mut t, reg::QUEUE_NUM, 100_000);
    write(&mut t, reg::QUEUE_NUM, 3);
    write(&mut t, reg::QUEUE_SEL, 7);
    write(&mut t, reg::QUEUE_NUM, 16);
    assert_eq!(read(&mut t, reg::QUEUE_NUM_MAX), 0, "a queue that does not exist has no size");
    // Clearing status bits without a reset, and DRIVER_OK notifications before it, are ignored.
    write(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    assert_ne!(t.status() & status::FEATURES_OK, 0);
    write(&mut t, reg::QUEUE_NOTIFY, 0);
}

#[test]
fn queues_outside_guest_memory_make_the_device_need_a_reset() {
    let (mut t, _backend, line) = transport("needs-reset.sock");
    negotiate(&mut t, 1);
    setup_queue(&mut t, 0, 16, 0x1000);
    setup_queue(&mut t, 1, 16, 0x4000);
    setup_queue(&mut t, 2, 16, 0xfff_0000); // beyond the 1 MiB of guest memory
    write(&mut t, reg::STATUS, 15);
    assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    assert!(!t.is_activated());
    assert_eq!(read(&mut t, reg::INTERRUPT_STATUS), 2, "a configuration-change interrupt");
    assert_eq!(line.0.load(Ordering::SeqCst), 1);
    write(&mut t, reg::INTERRUPT_ACK, 2);
    assert_eq!(read(&mut t, reg::INTERRUPT_STATUS), 0);
    write(&mut t, reg::STATUS, 0);
    assert_eq!(t.status(), 0, "a reset clears DEVICE_NEEDS_RESET");

    negotiate(&mut t, 1);
    for (index, base) in [0x1000, 0x4000, 0x7000].into_iter().enumerate() {
        setup_queue(&mut t, index as u32, 16, base);
    }
    write(&mut t, reg::STATUS, 15);
    assert!(t.is_activated(), "valid queues activate the device");
}

#[test]
fn a_host_connection_the_guest_never_answers_is_closed_after_the_timeout() {
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    let (mut t, backend, _) = transport("silent-guest.sock");
    let mut events = EventManager::<Box<dyn MutEventSubscriber>>::new().unwrap();
    events.add_subscriber(Box::new(backend));
    // A driver that sets the device up and then never looks at its queues again.
    negotiate(&mut t, 1);
    for (index, base) in [0x1000, 0x4000, 0x7000].into_iter().enumerate() {
        setup_queue(&mut t, index as u32, 16, base);
    }
    write(&mut t, reg::STATUS, 15);
    events.run_with_timeout(0).unwrap();

    let uds = std::env::temp_dir()
        .join(format!("carve-transport-{}", std::process::id()))
        .join("silent-guest.sock");
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"CONNECT 5005\n").unwrap();
    host.set_nonblocking(true).unwrap();
    let started = Instant::now();
    let closed = loop {
        events.run_with_timeout(50).unwrap();
        match host.read(&mut [0u8; 16]) {
            Ok(0) => break true,
            Ok(_) => panic!("no OK line without the guest's RESPONSE"),
            Err(_) if started.elapsed() < Duration::from_secs(10) => {}
            Err(_) => break false,
        }
    };
    assert!(closed, "the host socket was closed");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(4),
        "closed after {waited:?}"
    );
}

#[test]
fn a_stale_socket_file_is_replaced_but_a_live_one_is_refused() {
    use std::os::unix::net::UnixListener;
    let dir = std::env::temp_dir().join(format!("carve-transport-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();

    let stale = dir.join("stale.sock");
    let _ = std::fs::remove_file(&stale);
    drop(UnixListener::bind(&stale).unwrap()); // the file outlives its listener, as after a kill
    assert!(stale.exists());
    assert!(Vsock::new(9, stale.clone(), None, mem.clone()).is_ok(), "a stale socket is reclaimed");

    let live = dir.join("live.sock");
    let _ = std::fs::remove_file(&live);
    let _listener = UnixListener::bind(&live).unwrap();
    let error = Vsock::new(9, live.clone(), None, mem).err().expect("a live socket is not taken over");
    assert!(error.to_string().contains("cannot listen on the vsock Unix socket"), "{error}");
}
