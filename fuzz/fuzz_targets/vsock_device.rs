//! The vsock device driven by an untrusted guest: a correct driver handshake, then guest memory
//! (rings, descriptors, packets) and register accesses from the fuzzer, with the device's event
//! loop run between them. Never a panic, never a hang.
#![no_main]

use carve_virtio::GuestRam;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use carve_virtio::mmio::{reg, MmioTransport};
use carve_virtio::vsock::Vsock;
use carve_virtio::InterruptLine;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 1 << 20;
/// Queue i: descriptors at 0x1000*(1+3i), avail +0x1000, used +0x2000.
const QUEUES: [u64; 3] = [0x1000, 0x4000, 0x7000];

struct NoLine;
impl InterruptLine for NoLine {
    fn trigger(&self) {}
}

fn write(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("carve-fuzz-vsock-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let uds = dir.join(format!("v{}.sock", RUN.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_file(&uds);
    let peer_path = format!("{}_1024", uds.display());
    let _ = std::fs::remove_file(&peer_path);
    let _peer = UnixListener::bind(&peer_path).unwrap();

    let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let (device, backend) = Vsock::new(5, uds.clone(), None, mem.clone()).unwrap();
    let mut events = EventManager::<Box<dyn MutEventSubscriber>>::new().unwrap();
    events.add_subscriber(Box::new(backend));
    let mut t = MmioTransport::new(Box::new(device), mem.clone(), Arc::new(NoLine));

    // A well-behaved handshake, with the fuzzer choosing the queue sizes.
    write(&mut t, reg::STATUS, 1);
    write(&mut t, reg::STATUS, 3);
    write(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    write(&mut t, reg::DRIVER_FEATURES, 1);
    write(&mut t, reg::STATUS, 11);
    for (i, base) in QUEUES.iter().enumerate() {
        write(&mut t, reg::QUEUE_SEL, i as u32);
        let size = data.get(i).map_or(16, |&b| 1u32 << (b % 10));
        write(&mut t, reg::QUEUE_NUM, size);
        write(&mut t, reg::QUEUE_DESC_LOW, *base as u32);
        write(&mut t, reg::QUEUE_DRIVER_LOW, (*base + 0x1000) as u32);
        write(&mut t, reg::QUEUE_DEVICE_LOW, (*base + 0x2000) as u32);
        write(&mut t, reg::QUEUE_READY, 1);
    }
    write(&mut t, reg::STATUS, 15);
    let _ = events.run_with_timeout(0);

    // Then chunks: 0 = guest memory write, 1 = register write, 2 = register read,
    // 3 = notify a queue and run the device.
    let mut rest = data.get(3..).unwrap_or_default();
    while rest.len() >= 7 {
        let (op, arg) = (rest[0] % 4, u32::from_le_bytes(rest[1..5].try_into().unwrap()));
        let len = (rest[5] as usize).min(rest.len() - 6);
        let payload = &rest[6..6 + len];
        match op {
            0 => {
                let _ = mem.write_slice(payload, GuestAddress(u64::from(arg) % MEM as u64));
            }
            1 => t.write(u64::from(arg % 0x200), payload.get(..4).unwrap_or(payload)),
            2 => t.read(u64::from(arg % 0x200), &mut [0u8; 4][..(len % 5).max(1)]),
            _ => {
                write(&mut t, reg::QUEUE_NOTIFY, arg % 4);
                let _ = events.run_with_timeout(0);
            }
        }
        rest = &rest[6 + len..];
    }
    let _ = events.run_with_timeout(0);
    drop(events);
    let _ = std::fs::remove_file(&peer_path);
});
