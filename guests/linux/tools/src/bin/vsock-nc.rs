//! A netcat for AF_VSOCK inside carve's Linux test guests (busybox has none).
//!
//!   vsock-nc connect CID PORT   send standard input, then print what comes back until EOF
//!   vsock-nc echo PORT          accept one connection and echo it until EOF
//!
//! Failures print one line and exit 1.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["connect", cid, port] => connect(number(cid), number(port)),
        ["echo", port] => echo(number(port)),
        _ => Err("usage: vsock-nc connect CID PORT | vsock-nc echo PORT".into()),
    };
    if let Err(e) = result {
        eprintln!("vsock-nc: {e}");
        std::process::exit(1);
    }
}

fn number(text: &str) -> u32 {
    text.parse().unwrap_or_else(|_| {
        eprintln!("vsock-nc: '{text}' is not a number");
        std::process::exit(1)
    })
}

fn address(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all zeroes is a valid value before the fields are set.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn socket() -> Result<std::fs::File, String> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket(AF_VSOCK): {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just created and is owned by nothing else.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

const LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// Connects (retrying for a few seconds while the parent is not yet listening), sends standard
/// input, half-closes, and copies the answer to standard output.
fn connect(cid: u32, port: u32) -> Result<(), String> {
    let addr = address(cid, port);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        let stream = socket()?;
        // SAFETY: addr is a valid sockaddr_vm of LEN bytes for the call's duration.
        let r = unsafe { libc::connect(stream.as_raw_fd(), (&raw const addr).cast(), LEN) };
        if r == 0 {
            break stream;
        }
        let error = std::io::Error::last_os_error();
        if Instant::now() > deadline {
            return Err(format!("connect to {cid}:{port}: {error}"));
        }
        eprintln!("vsock-nc: connect to {cid}:{port}: {error}; retrying");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).map_err(|e| format!("reading standard input: {e}"))?;
    stream.write_all(&input).map_err(|e| format!("sending: {e}"))?;
    // SAFETY: shutdown(2) on a socket this function owns.
    unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) };
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(|e| format!("receiving: {e}"))?;
    std::io::stdout().write_all(&answer).map_err(|e| format!("writing standard output: {e}"))
}

/// Listens on any CID, accepts one connection and echoes it until the peer half-closes.
fn echo(port: u32) -> Result<(), String> {
    let listener = socket()?;
    let addr = address(libc::VMADDR_CID_ANY, port);
    // SAFETY: addr is a valid sockaddr_vm of LEN bytes for the call's duration.
    if unsafe { libc::bind(listener.as_raw_fd(), (&raw const addr).cast(), LEN) } != 0 {
        return Err(format!("bind to port {port}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: listen(2) on a socket this function owns.
    if unsafe { libc::listen(listener.as_raw_fd(), 1) } != 0 {
        return Err(format!("listen: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: accept4(2) without a peer address; the result is checked before use.
    let fd = unsafe {
        libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
    };
    if fd < 0 {
        return Err(format!("accept: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by accept4 and is owned by nothing else.
    let mut stream = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut buffer = [0u8; 4096];
    loop {
        let n = stream.read(&mut buffer).map_err(|e| format!("receiving: {e}"))?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buffer[..n]).map_err(|e| format!("sending: {e}"))?;
    }
}
