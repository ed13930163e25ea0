//! An enclave app that attests the way real Nitro apps do, with AWS's `aws-nitro-enclaves-nsm-api`
//! driver on /dev/nsm:
//!
//! - vsock port 5006: the parent sends a u32 big-endian length and a 1–512 byte nonce; the app
//!   answers with a u32 big-endian length and an attestation document (COSE_Sign1) over that
//!   nonce, with user data `carve-example-attest` and a fresh 32-byte public key from the NSM's
//!   GetRandom (a stand-in for the key a real app would generate);
//! - vsock port 5007: the parent sends one byte; the app exits with it as its status.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use aws_nitro_enclaves_nsm_api::api::{Request, Response};
use aws_nitro_enclaves_nsm_api::driver::{nsm_exit, nsm_init, nsm_process_request};
use serde_bytes::ByteBuf;

const ATTESTATION_PORT: u32 = 5006;
const EXIT_PORT: u32 = 5007;
const USER_DATA: &[u8] = b"carve-example-attest";

fn main() {
    let nsm = nsm_init();
    if nsm < 0 {
        eprintln!("attest: cannot open /dev/nsm");
        std::process::exit(2);
    }
    let attestation = listen(ATTESTATION_PORT);
    let exit = listen(EXIT_PORT);
    println!("attest: serving attestation documents on vsock port {ATTESTATION_PORT}");
    loop {
        let mut fds = [
            libc::pollfd { fd: attestation.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: exit.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: poll reads and writes only the two pollfds passed to it.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            let mut status = [0u8];
            if accept(&exit).and_then(|mut s| s.read_exact(&mut status)).is_ok() {
                nsm_exit(nsm);
                println!("attest: exiting with status {} as the parent asked", status[0]);
                std::process::exit(status[0].into());
            }
        }
        if fds[0].revents != 0 {
            match accept(&attestation).and_then(|stream| serve(nsm, stream)) {
                Ok(len) => println!("attest: sent a {len}-byte attestation document"),
                Err(e) => eprintln!("attest: {e}"),
            }
        }
    }
}

/// One request: nonce in, document out.
fn serve(nsm: i32, mut stream: std::fs::File) -> std::io::Result<usize> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if !(1..=512).contains(&len) {
        return Err(std::io::Error::other(format!("a nonce of {len} bytes (1-512 allowed)")));
    }
    let mut nonce = vec![0u8; len];
    stream.read_exact(&mut nonce)?;
    let public_key: Vec<u8> = match nsm_process_request(nsm, Request::GetRandom) {
        Response::GetRandom { random } => random.into_iter().take(32).collect(),
        other => return Err(std::io::Error::other(format!("GetRandom answered {other:?}"))),
    };
    let request = Request::Attestation {
        user_data: Some(ByteBuf::from(USER_DATA)),
        nonce: Some(ByteBuf::from(nonce)),
        public_key: Some(ByteBuf::from(public_key)),
    };
    let document = match nsm_process_request(nsm, request) {
        Response::Attestation { document } => document,
        other => return Err(std::io::Error::other(format!("Attestation answered {other:?}"))),
    };
    stream.write_all(&(document.len() as u32).to_be_bytes())?;
    stream.write_all(&document)?;
    Ok(document.len())
}

fn listen(port: u32) -> std::fs::File {
    // SAFETY: socket(2) with constant arguments; checked below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket(AF_VSOCK): {}", std::io::Error::last_os_error());
    // SAFETY: fd was just created and is owned by nothing else.
    let socket = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: sockaddr_vm is plain data; all zeroes is valid before the fields are set.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_vm of len bytes; listen takes the socket this owns.
    let ok = unsafe { libc::bind(fd, (&raw const addr).cast(), len) == 0 && libc::listen(fd, 4) == 0 };
    assert!(ok, "listening on vsock port {port}: {}", std::io::Error::last_os_error());
    socket
}

fn accept(listener: &std::fs::File) -> std::io::Result<std::fs::File> {
    // SAFETY: accept4 without a peer address; the result is checked before use.
    let fd = unsafe {
        libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by accept4 and is owned by nothing else.
    let stream = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let timeout = libc::timeval { tv_sec: 10, tv_usec: 0 };
    // SAFETY: setsockopt reads the timeval for the call's duration.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    Ok(stream)
}
