//! Saving and restoring virtio devices through `carve_virtio::state`'s `MmioDevice` (its
//! `Persist` impl, as the VMM saves every device): the device continues where
//! it was (queue positions, interrupt state, the NSM's PCRs and a half-delivered request), vsock
//! connections end with a transport reset, and malformed states are refused with one sentence.

#[path = "common/nsm_driver.rs"]
mod nsm_driver;
#[path = "common/vsock_driver.rs"]
mod vsock_driver;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use carve_eif::Measurements;
use carve_nsm::pcr::{BootMeasurements, ParentIdentity};
use carve_nsm::protocol::{ErrorCode, Request, Response};
use carve_snapshot::Persist;
use carve_virtio::mmio::status;
use carve_virtio::nsm::NsmBackend;
use carve_virtio::state::{self, DeviceState, MmioDevice, NsmRestore, VirtioState, VsockRestore};
use carve_virtio::vsock::VsockBackend;
use carve_virtio::vsock::VIRTIO_VSOCK_EVENT_TRANSPORT_RESET;
use vm_memory::{Bytes, GuestAddress};
use vsock_driver::{VsockDriver, CID, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW};

/// Through the snapshot file's encoding, as the VMM stores it.
fn through_file(state: &VirtioState) -> VirtioState {
    let decoded = carve_snapshot::file::decode(&carve_snapshot::file::encode(state).unwrap()).unwrap();
    assert_eq!(&decoded, state);
    decoded
}

fn data_to(d: &mut VsockDriver, port: u32) -> Vec<u8> {
    let mut data = Vec::new();
    for _ in 0..20 {
        for packet in d.receive() {
            if packet.dst_port == port && packet.op == OP_RW {
                data.extend_from_slice(&packet.data);
            }
        }
        if !data.is_empty() {
            break;
        }
    }
    data
}

fn read_exactly(host: &mut UnixStream, len: usize) -> Vec<u8> {
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0; len];
    host.read_exact(&mut buf).unwrap();
    buf
}

/// A host connection to guest port `port`; returns the parent-side port the guest saw.
fn host_connect(d: &mut VsockDriver, port: u32) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(&d.uds).unwrap();
    host.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let packets = d.receive();
    let request = packets.iter().find(|p| p.op == OP_REQUEST && p.dst_port == port).expect("a REQUEST");
    let host_port = request.src_port;
    d.send(port, host_port, OP_RESPONSE, 0, &[]);
    let ok = format!("OK {host_port}\n");
    assert_eq!(read_exactly(&mut host, ok.len()), ok.as_bytes());
    (host, host_port)
}

#[test]
fn a_restored_vsock_device_resets_the_transport_and_new_connections_work() {
    let mut d = VsockDriver::new();
    let listener = UnixListener::bind(d.port_path(5000)).unwrap();
    assert_eq!(d.connect(1024, 5000), OP_RESPONSE);
    let (mut old_stream, _) = listener.accept().unwrap();
    d.send(1024, 5000, OP_RW, 0, b"hi");
    assert_eq!(read_exactly(&mut old_stream, 2), b"hi");
    let (_old_host, first_port) = host_connect(&mut d, 2000);
    assert_eq!(first_port, 1 << 30);

    let saved = through_file(&d.save());
    assert!(saved.transport.activated);
    assert_eq!(
        saved.device,
        DeviceState::Vsock(state::VsockState { cid: CID, next_host_port: (1 << 30) + 1 })
    );
    // Where the device is in its queues: the guest sent 3 packets (REQUEST, RW, RESPONSE) and
    // received at least 2 (RESPONSE, REQUEST).
    assert_eq!((saved.transport.queues[1].next_avail, saved.transport.queues[1].next_used), (3, 3));
    assert!(saved.transport.queues[0].next_used >= 2);

    let interrupts = d.line.0.load(Ordering::SeqCst);
    d.restore(&saved).unwrap();
    assert_eq!(d.save(), saved, "save → restore → save gives the same state");
    d.unpark();
    assert!(d.transport().is_activated());

    // The guest hears of the reset once, on its event queue, with an interrupt.
    assert_eq!(d.device_events(), [VIRTIO_VSOCK_EVENT_TRANSPORT_RESET]);
    assert!(d.line.0.load(Ordering::SeqCst) > interrupts);
    assert!(d.device_events().is_empty(), "one reset event");
    // The old connections are gone on both sides.
    old_stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(old_stream.read(&mut [0u8; 8]).unwrap(), 0, "the host side sees the connection end");
    d.send(1024, 5000, OP_RW, 0, b"stale");
    let packets = d.receive();
    assert!(packets.iter().any(|p| p.dst_port == 1024 && p.op == OP_RST), "{packets:?}");

    // New connections work both ways, and host ports go on from where they were.
    assert_eq!(d.connect(1025, 5000), OP_RESPONSE);
    let (mut stream, _) = listener.accept().unwrap();
    d.send(1025, 5000, OP_RW, 0, b"new");
    assert_eq!(read_exactly(&mut stream, 3), b"new");
    stream.write_all(b"welcome back").unwrap();
    assert_eq!(data_to(&mut d, 1025), b"welcome back");
    let (mut host, port) = host_connect(&mut d, 2001);
    assert_eq!(port, (1 << 30) + 1);
    host.write_all(b"x").unwrap();
    assert_eq!(data_to(&mut d, 2001), b"x");
}

#[test]
fn a_vsock_device_saved_mid_setup_restores_as_it_was_and_finishes_setup() {
    let mut d = VsockDriver::unset();
    d.negotiate();
    d.setup_queues();
    let saved = through_file(&d.save());
    assert!(!saved.transport.activated);
    assert_eq!(saved.transport.status, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert!(saved.transport.queues.iter().all(|q| q.ready && q.size == vsock_driver::QUEUE));

    d.restore(&saved).unwrap();
    assert_eq!(d.save(), saved);
    d.unpark();
    d.driver_ok();
    assert!(d.device_events().is_empty(), "a device that was not running owes no reset");
    let listener = UnixListener::bind(d.port_path(6000)).unwrap();
    assert_eq!(d.connect(1024, 6000), OP_RESPONSE);
    let (mut stream, _) = listener.accept().unwrap();
    d.send(1024, 6000, OP_RW, 0, b"ok");
    assert_eq!(read_exactly(&mut stream, 2), b"ok");
}

#[test]
fn a_device_saved_before_its_backend_took_the_queues_restores_running() {
    // The VMM paused between the guest's DRIVER_OK and the event loop taking the queues: the
    // handover is still in the command channel when the device is saved.
    let mut d = VsockDriver::unset();
    d.park();
    d.negotiate();
    d.setup_queues();
    d.driver_ok();
    let saved = through_file(&d.save());
    assert!(saved.transport.activated);
    assert!(saved.transport.queues.iter().all(|q| (q.next_avail, q.next_used) == (0, 0)));
    d.restore(&saved).unwrap();
    // The receive and event buffers the driver gave before the snapshot are used after it.
    assert_eq!(d.device_events(), [VIRTIO_VSOCK_EVENT_TRANSPORT_RESET]);
    let listener = UnixListener::bind(d.port_path(7000)).unwrap();
    assert_eq!(d.connect(1024, 7000), OP_RESPONSE);
    let (mut stream, _) = listener.accept().unwrap();
    stream.write_all(b"up").unwrap();
    assert_eq!(data_to(&mut d, 1024), b"up");
}

fn boot() -> BootMeasurements {
    BootMeasurements {
        image: Some(Measurements { pcr0: [1; 48], pcr1: [2; 48], pcr2: [3; 48], pcr8: None }),
        parent: ParentIdentity { role: None, instance_id: Some("i-0123456789abcdef0".into()) },
        debug_mode: false,
    }
}

fn extended(d: &mut nsm_driver::Driver, index: u64, data: &[u8]) -> Vec<u8> {
    let response = d.call(&Request::ExtendPcr { index, data: data.to_vec() }.encode());
    let value: ciborium::Value = ciborium::from_reader(&response[..]).unwrap();
    let body = &value.as_map().unwrap()[0].1;
    body.as_map().unwrap()[0].1.as_bytes().unwrap().clone()
}

#[test]
fn a_restored_nsm_keeps_its_pcrs_and_answers_a_request_it_held() {
    let mut d = nsm_driver::Driver::new(&boot());
    let pcr16 = extended(&mut d, 16, b"app");
    let pcr20 = extended(&mut d, 20, b"config");
    assert_eq!(d.call(&Request::LockPcr { index: 16 }.encode()), Response::LockPcr.encode());
    let platform = d.call(&Request::DescribePcr { index: 4 }.encode());
    // Linux's way: the request alone, its response buffer in the next chain; it is held.
    let request = Request::DescribePcr { index: 16 }.encode();
    d.mem.write_slice(&request, GuestAddress(nsm_driver::DATA)).unwrap();
    d.submit(&[(nsm_driver::DATA, request.len() as u32, 0)]);
    assert_eq!(d.used(), None);

    let saved = through_file(&d.save());
    let DeviceState::Nsm(nsm) = &saved.device else { panic!("an NSM state") };
    assert!(nsm.pending.is_some(), "the held request is saved");
    assert_eq!(nsm.module.bank.locked, 0x1_ffff);

    d.restore(&saved).unwrap();
    assert_eq!(d.save(), saved, "save → restore → save gives the same state");
    d.unpark();
    d.pump();

    // The response buffer now comes; the held request is answered from the restored bank.
    let response_at = nsm_driver::DATA + 0x4000;
    d.submit(&[(response_at, 0x3000, nsm_driver::F_WRITE)]);
    assert_eq!(d.used().unwrap().1, 0, "the request chain comes back first");
    let (_, len) = d.used().expect("then the response");
    let mut response = vec![0; len as usize];
    d.mem.read_slice(&mut response, GuestAddress(response_at)).unwrap();
    assert_eq!(response, Response::DescribePcr { lock: true, data: pcr16 }.encode());

    assert_eq!(
        d.call(&Request::DescribePcr { index: 20 }.encode()),
        Response::DescribePcr { lock: false, data: pcr20 }.encode()
    );
    assert_eq!(d.call(&Request::DescribePcr { index: 4 }.encode()), platform);
    assert_eq!(
        d.call(&Request::ExtendPcr { index: 16, data: b"x".to_vec() }.encode()),
        Response::Error(ErrorCode::ReadOnlyIndex).encode()
    );
    let attestation =
        d.call(&Request::Attestation { user_data: None, nonce: None, public_key: None }.encode());
    assert!(attestation.windows(11).any(|w| w == b"Attestation"), "the re-issued leaf signs");
}

/// Restoring `saved` after `change` on a fresh socket; the error's message.
fn vsock_refusal(d: &VsockDriver, saved: &VirtioState, change: impl Fn(&mut VirtioState)) -> String {
    let mut state = saved.clone();
    change(&mut state);
    let uds = d.dir.path().join("restore.sock");
    let args = VsockRestore {
        cid: CID,
        uds: uds.clone(),
        shared_listeners: None,
        mem: d.mem.clone(),
        line: d.line.clone(),
    };
    let error = MmioDevice::<VsockBackend>::restore(args, &state).err().expect("refused");
    assert!(!uds.exists(), "a refused restore leaves no socket behind");
    error.to_string()
}

#[test]
fn malformed_vsock_states_are_refused_with_one_sentence() {
    let mut d = VsockDriver::new();
    let saved = d.save();
    let queue1 = saved.transport.queues[1];
    let refused = |change: &dyn Fn(&mut VirtioState)| vsock_refusal(&d, &saved, change);

    assert_eq!(
        refused(&|s| s.transport.queues[1].desc_table = 0x2000_0000),
        format!(
            "the saved virtio-vsock queue 1 is not ready or its rings (descriptors at 0x20000000, available ring at {:#x}, used ring at {:#x}) lie outside guest memory",
            queue1.avail_ring, queue1.used_ring
        )
    );
    assert_eq!(
        refused(&|s| s.transport.queues[2].used_ring = 0x7002),
        "the saved virtio-vsock queue 2 is malformed (virtio queue used ring breaks alignment constraints)"
    );
    assert_eq!(
        refused(&|s| s.transport.queues[0].size = 12),
        "the saved virtio-vsock queue 0 is malformed (invalid queue size)"
    );
    assert_eq!(
        refused(&|s| s.transport.queues[0].max_size = 128),
        "the saved virtio-vsock queue 0 has a maximum size of 128, but the device's is 256"
    );
    assert_eq!(
        refused(&|s| {
            s.transport.queues.pop();
        }),
        "the saved virtio-vsock has 2 queues, but the device has 3"
    );
    assert_eq!(
        refused(&|s| s.transport.status |= 0x20),
        "the saved virtio-vsock status 0x2f has bits a driver cannot set"
    );
    assert_eq!(
        refused(&|s| s.transport.status = status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK),
        "the saved virtio-vsock status 0x7 sets FEATURES_OK or DRIVER_OK without the steps before it"
    );
    assert_eq!(
        refused(&|s| s.transport.driver_features |= 1 << 40),
        "the saved virtio-vsock driver accepted features 0x10100000000, but the device offers 0x100000000 and requires VERSION_1"
    );
    assert_eq!(
        refused(&|s| s.transport.activated = false),
        "the saved virtio-vsock is marked stopped but its status is 0xf"
    );
    assert_eq!(
        refused(&|s| s.transport.interrupt_status = 4),
        "the saved virtio-vsock interrupt status 0x4 has bits virtio-mmio does not define"
    );
    assert_eq!(
        refused(&|s| s.transport.device_type = 33),
        "the saved transport is for virtio device type 33, but virtio-vsock is type 19"
    );
    assert_eq!(
        refused(&|s| s.device = DeviceState::Vsock(state::VsockState { cid: CID, next_host_port: 5 })),
        "the saved vsock device's next host port 5 is below 1073741824, where host ports start"
    );
    let args = VsockRestore {
        cid: 8,
        uds: d.dir.path().join("cid.sock"),
        shared_listeners: None,
        mem: d.mem.clone(),
        line: d.line.clone(),
    };
    let error = MmioDevice::<VsockBackend>::restore(args, &saved).err().unwrap();
    assert_eq!(
        error.to_string(),
        "the snapshot's vsock device has guest CID 7, but this VM is configured with CID 8"
    );

    let mut nsm = nsm_driver::Driver::new(&BootMeasurements::default());
    let nsm_state = nsm.save();
    assert_eq!(
        refused(&|s| *s = nsm_state.clone()),
        "the snapshot holds virtio-nsm's state, not virtio-vsock's"
    );

    // The device that was saved is untouched by all this, and a good state still restores.
    d.restore(&saved).unwrap();
    d.unpark();
    assert_eq!(d.device_events(), [VIRTIO_VSOCK_EVENT_TRANSPORT_RESET]);
}

fn nsm(state: &mut VirtioState) -> &mut state::NsmDeviceState {
    match &mut state.device {
        DeviceState::Nsm(nsm) => nsm,
        DeviceState::Vsock(_) => unreachable!("an NSM's state"),
    }
}

#[test]
fn malformed_nsm_states_are_refused_with_one_sentence() {
    let mut d = nsm_driver::Driver::new(&boot());
    let saved = d.save();
    let refused = |change: &dyn Fn(&mut VirtioState)| {
        let mut state = saved.clone();
        change(&mut state);
        let args = NsmRestore { ca: d.ca(), mem: d.mem.clone(), line: d.line.clone() };
        MmioDevice::<NsmBackend>::restore(args, &state).err().expect("refused").to_string()
    };
    assert_eq!(
        refused(&|s| nsm(s).module.bank.pcrs[18].index = 40),
        "the saved PCR bank has PCR index 40, out of range for a bank of 32"
    );
    assert_eq!(
        refused(&|s| nsm(s).module.bank.pcrs[18].value.truncate(32)),
        "the saved PCR 18 holds 32 bytes, but SHA384 values are 48"
    );
    assert_eq!(
        refused(&|s| nsm(s).module.bank.locked = 0xff),
        "the saved PCR bank leaves platform PCR 8 unlocked, which the platform locks at boot"
    );
    assert_eq!(
        refused(&|s| nsm(s).module.boot.image = None),
        "the saved PCR 0 differs from what the saved boot measurements give it, and it cannot change after boot"
    );
    assert_eq!(
        refused(&|s| {
            nsm(s).pending = Some(state::PendingRequest {
                head: 64,
                request: vec![0xa0],
                request_len: 1,
                readable_after_writable: false,
            })
        }),
        "the saved NSM request waiting for its response buffer names descriptor 64, beyond the queue's 16"
    );
    assert_eq!(
        refused(&|s| {
            nsm(s).pending = Some(state::PendingRequest {
                head: 1,
                request: vec![0; 10],
                request_len: 1_000_000,
                readable_after_writable: false,
            })
        }),
        "the saved NSM request waiting for its response buffer keeps 10 bytes of a 1000000-byte request, not the first 4097"
    );
    assert_eq!(
        refused(&|s| s.transport.queues[0].avail_ring = 0x10_0000),
        "the saved virtio-nsm queue 0 is not ready or its rings (descriptors at 0x1000, available ring at 0x100000, used ring at 0x3000) lie outside guest memory"
    );
    // A good state still restores.
    d.restore(&saved).unwrap();
    d.unpark();
    assert_eq!(d.call(&Request::LockPcr { index: 16 }.encode()), Response::LockPcr.encode());
}
