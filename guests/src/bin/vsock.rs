//! Proves virtio-vsock from inside: the device's CID, RST from a parent port nobody listens on,
//! a connection to a parent listener with 1 MiB each way, then an echo service on port 5005 for
//! the host's tests, until the host connects to port 5999.
//!
//! Command line: `cid=N parent_port=P expect_len=L expect_sum=S send_len=M`.
#![no_std]
#![no_main]

use carve_guests::virtio::{find_device, MmioDevice};
use carve_guests::vsock::{serve_echo, State, Vsock};
use carve_guests::{check, exit, guest_main, param, parse_u64, println, sum64, BootInfo};

guest_main!(main);

const DMA: u64 = 0x0200_0000;
const CLOSED_PORT: u32 = 7777;
const ECHO_PORT: u32 = 5005;
const DONE_PORT: u32 = 5999;

fn arg(boot: &BootInfo, key: &str) -> u64 {
    param(boot.cmdline, key).and_then(parse_u64).unwrap_or_else(|| {
        println!("FAIL: missing {}= on the command line", key);
        exit(1)
    })
}

fn main(boot: &BootInfo) -> ! {
    let Some((base, irq)) = find_device(boot.cmdline) else {
        println!("FAIL: no virtio_mmio.device= on the command line");
        exit(1)
    };
    let mut vsock = match Vsock::new(MmioDevice { base, irq }, DMA) {
        Ok(vsock) => vsock,
        Err(e) => {
            println!("FAIL: vsock init: {}", e);
            exit(1)
        }
    };
    check!(vsock.cid == arg(boot, "cid"), "device reports guest CID {}", vsock.cid);

    let conn = vsock.connect(CLOSED_PORT).expect("a free connection slot");
    while vsock.state(conn) == State::Connecting {
        vsock.poll(|_| {});
    }
    check!(vsock.state(conn) == State::Reset, "connecting to a closed parent port gets RST");
    vsock.release(conn);

    let conn = vsock.connect(arg(boot, "parent_port") as u32).expect("a free connection slot");
    while vsock.state(conn) == State::Connecting {
        vsock.poll(|_| {});
    }
    check!(vsock.state(conn) == State::Established, "connected to the parent's listener");
    let hello = b"hello from the guest\n";
    check!(vsock.send(conn, hello) == hello.len(), "greeting sent");

    // Receive until the host shuts its side down, checksumming as the bytes arrive.
    let mut buf = [0u8; 4096];
    let (mut len, mut sum) = (0u64, 0u64);
    loop {
        vsock.poll(|_| {});
        let n = vsock.recv(conn, &mut buf);
        len += n as u64;
        sum = sum.wrapping_add(sum64(&buf[..n]));
        if n == 0 && vsock.peer_closed(conn) {
            break;
        }
    }
    check!(len == arg(boot, "expect_len"), "received {} bytes from the parent", len);
    check!(sum == arg(boot, "expect_sum"), "received bytes are intact (sum {:#x})", sum);

    // Send a known pattern back: block i of 4 KiB is filled with byte i.
    let total = arg(boot, "send_len");
    let mut sent = 0u64;
    while sent < total {
        let block = (sent / 4096) as u8;
        buf.fill(block);
        let offset = (sent % 4096) as usize;
        let want = (4096 - offset).min((total - sent) as usize);
        let n = vsock.send(conn, &buf[..want]);
        sent += n as u64;
        vsock.poll(|_| {});
    }
    vsock.close(conn);
    println!("PASS: sent {} bytes to the parent", sent);

    vsock.listen(ECHO_PORT);
    vsock.listen(DONE_PORT);
    println!("echo service on port {}", ECHO_PORT);
    let sessions = serve_echo(&mut vsock, None, |v, conn| v.local_port(conn) == DONE_PORT);
    println!("PASS: served {} echo sessions; refused {} stray packets", sessions, vsock.refused);
    exit(0)
}
