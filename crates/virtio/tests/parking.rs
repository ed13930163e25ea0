//! Pause and resume as the VMM does them: the backend is removed from the event loop (all its
//! descriptors leave epoll) and added back later (`init` registers what it holds then). What
//! arrived meanwhile is served after, and nothing is lost.

#[path = "common/nsm_driver.rs"]
mod nsm_driver;
#[path = "common/vsock_driver.rs"]
mod vsock_driver;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

use carve_nsm::pcr::BootMeasurements;
use carve_nsm::protocol::{Request, Response};
use vm_memory::{Bytes, GuestAddress};
use vsock_driver::{VsockDriver, OP_REQUEST, OP_RESPONSE, OP_RW};

/// The payload the guest's port `port` received, over a few rounds of the loop.
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
    host.set_nonblocking(false).unwrap();
    host.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let mut buf = vec![0; len];
    host.read_exact(&mut buf).unwrap();
    buf
}

fn nothing_to_read(host: &mut UnixStream) -> bool {
    host.set_nonblocking(true).unwrap();
    let nothing = matches!(host.read(&mut [0u8; 64]), Err(e) if e.kind() == ErrorKind::WouldBlock);
    host.set_nonblocking(false).unwrap();
    nothing
}

#[test]
fn a_vsock_stream_carries_data_across_a_park() {
    let mut d = VsockDriver::new();
    let listener = UnixListener::bind(d.port_path(5000)).unwrap();
    assert_eq!(d.connect(1024, 5000), OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(b"before").unwrap();
    assert_eq!(data_to(&mut d, 1024), b"before");
    d.send(1024, 5000, OP_RW, 0, b"ping");
    assert_eq!(read_exactly(&mut host, 4), b"ping");

    d.park();
    // Both directions move while the backend is off the loop: nothing is served...
    host.write_all(b"while parked").unwrap();
    d.send(1024, 5000, OP_RW, 0, b"guest, while parked");
    assert!(d.receive().is_empty(), "a parked backend delivers nothing");
    assert!(nothing_to_read(&mut host), "a parked backend forwards nothing");
    // ...and a host connection arrives, its CONNECT line with it.
    let mut second = UnixStream::connect(&d.uds).unwrap();
    second.write_all(b"CONNECT 77\n").unwrap();

    d.unpark();
    // ...until it is back: everything that waited is served.
    let packets = d.receive();
    let request = packets.iter().find(|p| p.op == OP_REQUEST).expect("the host connection reaches the guest");
    assert_eq!((request.dst_port, request.src_port), (77, 1 << 30));
    let mut data: Vec<u8> =
        packets.iter().filter(|p| p.dst_port == 1024 && p.op == OP_RW).flat_map(|p| p.data.clone()).collect();
    if data.is_empty() {
        data = data_to(&mut d, 1024);
    }
    assert_eq!(data, b"while parked");
    assert_eq!(read_exactly(&mut host, 19), b"guest, while parked");

    // Park and resume once more in the middle of a transfer, then the stream still works.
    d.park();
    d.unpark();
    // Once the loop is quiet, new host data needs the socket back in epoll to be seen.
    assert!(d.receive().is_empty());
    host.write_all(b"after").unwrap();
    assert_eq!(data_to(&mut d, 1024), b"after");
    d.send(1077, 1 << 30, OP_RESPONSE, 0, &[]);
    d.send(1024, 5000, OP_RW, 0, b"pong");
    assert_eq!(read_exactly(&mut host, 4), b"pong");
}

#[test]
fn an_nsm_request_queued_while_parked_is_answered_after() {
    let mut d = nsm_driver::Driver::new(&BootMeasurements::default());
    d.park();
    let request = Request::DescribePcr { index: 16 }.encode();
    d.mem.write_slice(&request, GuestAddress(nsm_driver::DATA)).unwrap();
    let response_at = nsm_driver::DATA + 0x4000;
    d.submit(&[(nsm_driver::DATA, request.len() as u32, 0), (response_at, 0x3000, nsm_driver::F_WRITE)]);
    assert_eq!(d.used(), None, "a parked backend answers nothing");

    d.unpark();
    d.pump();
    let (_, len) = d.used().expect("answered once back on the loop");
    let mut response = vec![0; len as usize];
    d.mem.read_slice(&mut response, GuestAddress(response_at)).unwrap();
    assert_eq!(response, Response::DescribePcr { lock: false, data: vec![0; 48] }.encode());
    // And the device goes on as before.
    assert_eq!(d.call(&Request::LockPcr { index: 16 }.encode()), Response::LockPcr.encode());
}
