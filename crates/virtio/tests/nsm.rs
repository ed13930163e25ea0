//! The virtio-nsm device behind the real virtio-mmio transport: requests and responses through
//! the queue, and every kind of bad chain a guest can build.

#[path = "common/nsm_driver.rs"]
mod nsm_driver;

use std::sync::atomic::Ordering;

use carve_nsm::pcr::BootMeasurements;
use carve_nsm::protocol::{ErrorCode, Request, Response};
use carve_virtio::mmio::reg;
use nsm_driver::{Driver, DATA, F_WRITE, MEM_SIZE};
use vm_memory::{Bytes, GuestAddress};

fn error(code: ErrorCode) -> Vec<u8> {
    Response::Error(code).encode()
}

#[test]
fn identifies_as_device_33_with_one_queue() {
    let mut d = Driver::new(&BootMeasurements::default());
    assert_eq!(d.read(reg::DEVICE_ID), 33);
    d.write(reg::QUEUE_SEL, 1);
    assert_eq!(d.read(reg::QUEUE_NUM_MAX), 0, "only queue 0 exists");
}

#[test]
fn answers_requests_through_the_queue_and_interrupts() {
    let mut d = Driver::new(&BootMeasurements::default());
    let before = d.line.0.load(Ordering::SeqCst);
    let response = d.call(&Request::DescribePcr { index: 16 }.encode());
    assert_eq!(response, Response::DescribePcr { lock: false, data: vec![0; 48] }.encode());
    assert!(d.line.0.load(Ordering::SeqCst) > before, "the guest is interrupted");
    let extended = d.call(&Request::ExtendPcr { index: 16, data: b"abc".to_vec() }.encode());
    let describe = d.call(&Request::DescribePcr { index: 16 }.encode());
    let Response::ExtendPcr { data } = decode_extend(&extended) else { unreachable!() };
    assert_eq!(describe, Response::DescribePcr { lock: false, data }.encode());
    assert_eq!(d.call(&Request::DescribePcr { index: 99 }.encode()), error(ErrorCode::InvalidIndex));
    assert_eq!(d.stats.requests.load(Ordering::Relaxed), 4);
}

fn decode_extend(bytes: &[u8]) -> Response {
    let value: ciborium::Value = ciborium::from_reader(bytes).unwrap();
    let body = &value.as_map().unwrap()[0].1;
    let data = body.as_map().unwrap()[0].1.as_bytes().unwrap().clone();
    Response::ExtendPcr { data }
}

#[test]
fn a_request_split_over_several_buffers_is_joined() {
    let mut d = Driver::new(&BootMeasurements::default());
    let request = Request::DescribeNsm.encode();
    d.mem.write_slice(&request, GuestAddress(DATA)).unwrap();
    let (a, b) = (request.len() as u32 / 2, request.len() as u32 - request.len() as u32 / 2);
    d.submit(&[
        (DATA, a, 0),
        (DATA + u64::from(a), b, 0),
        (DATA + 0x4000, 0x1000, F_WRITE),
        (DATA + 0x5000, 0x2000, F_WRITE),
    ]);
    let (_, len) = d.used().unwrap();
    let mut response = vec![0; len as usize];
    d.mem.read_slice(&mut response, GuestAddress(DATA + 0x4000)).unwrap();
    assert!(response.starts_with(&[0xa1, 0x6b]) && response.windows(11).any(|w| w == b"DescribeNSM"));
}

#[test]
fn linux_sends_the_request_and_the_response_buffer_as_two_chains() {
    // drivers/misc/nsm.c: virtqueue_add_outbuf(request), virtqueue_add_inbuf(response), one
    // kick; it takes the request back first, then the response.
    let mut d = Driver::new(&BootMeasurements::default());
    let request = Request::GetRandom.encode();
    d.mem.write_slice(&request, GuestAddress(DATA)).unwrap();
    d.submit(&[(DATA, request.len() as u32, 0)]);
    assert_eq!(d.used(), None, "the request waits for its response buffer");
    d.submit(&[(DATA + 0x4000, 0x3000, F_WRITE)]);
    let (first, len) = d.used().expect("the request chain comes back");
    assert_eq!((first, len), (0, 0), "the request's chain, nothing written");
    let (_, len) = d.used().expect("then the response chain");
    let mut response = vec![0; len as usize];
    d.mem.read_slice(&mut response, GuestAddress(DATA + 0x4000)).unwrap();
    // What Linux's hwrng reads: {"GetRandom": {"random": bytes}}.
    let head = [&[0xa1, 0x69][..], b"GetRandom", &[0xa1, 0x66], b"random"].concat();
    assert!(response.starts_with(&head) && response.len() > head.len() + 23, "{response:02x?}");
    // A response buffer with no request before it gets nothing; the device goes on.
    d.submit(&[(DATA + 0x4000, 0x3000, F_WRITE)]);
    assert_eq!(d.used().unwrap().1, 0);
    assert_eq!(d.call(&Request::DescribeNsm.encode())[..2], [0xa1, 0x6b]);
}

#[test]
fn bad_chains_get_error_responses_or_nothing_and_the_device_goes_on() {
    let mut d = Driver::new(&BootMeasurements::default());
    let response_at = DATA + 0x8000;
    let read_response = |d: &mut Driver, len: u32| {
        let mut out = vec![0; len as usize];
        d.mem.read_slice(&mut out, GuestAddress(response_at)).unwrap();
        out
    };
    // A request past 0x1000 bytes.
    d.submit(&[(DATA, 0x1001, 0), (response_at, 0x3000, F_WRITE)]);
    let (_, len) = d.used().unwrap();
    assert_eq!(read_response(&mut d, len), error(ErrorCode::InputTooLarge));
    // A response buffer smaller than 0x3000.
    d.mem.write_slice(&Request::GetRandom.encode(), GuestAddress(DATA)).unwrap();
    d.submit(&[(DATA, 11, 0), (response_at, 0x100, F_WRITE)]);
    let (_, len) = d.used().unwrap();
    assert_eq!(read_response(&mut d, len), error(ErrorCode::BufferTooSmall));
    // Readable after writable.
    d.submit(&[(response_at, 0x3000, F_WRITE), (DATA, 11, 0)]);
    let (_, len) = d.used().unwrap();
    assert_eq!(read_response(&mut d, len), error(ErrorCode::InvalidArgument));
    // A request alone waits for a response buffer; a whole chain after it returns it empty.
    d.submit(&[(DATA, 11, 0)]);
    assert_eq!(d.used(), None, "held for its response buffer");
    d.submit(&[(DATA, 11, 0), (response_at, 2, F_WRITE)]);
    assert_eq!(d.used().unwrap().1, 0, "the unanswered request comes back empty");
    assert_eq!(d.used().unwrap().1, 0, "a response buffer of 2 bytes: nothing fits");
    // A buffer outside memory: used, length 0.
    d.submit(&[(MEM_SIZE as u64 - 4, 11, 0), (response_at, 0x3000, F_WRITE)]);
    assert_eq!(d.used().unwrap().1, 0);
    // Garbage CBOR.
    assert_eq!(d.call(&[0xff, 0x00]), error(ErrorCode::InvalidOperation));
    // And a good request still works.
    assert_eq!(d.call(&Request::LockPcr { index: 20 }.encode()), Response::LockPcr.encode());
}
