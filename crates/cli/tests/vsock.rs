//! virtio-vsock end to end: the `vsock` test guest and the demo guest against host Unix sockets.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::thread;

use common::*;

/// Writes `data` on one thread while reading as much back on this one.
fn echo_round_trip(stream: &UnixStream, data: &[u8]) -> Vec<u8> {
    let mut writer = stream.try_clone().unwrap();
    let sent = data.to_vec();
    let feeder = thread::spawn(move || writer.write_all(&sent).unwrap());
    let mut echoed = vec![0u8; data.len()];
    (&*stream).read_exact(&mut echoed).expect("the echo comes back whole");
    feeder.join().unwrap();
    echoed
}

#[test]
fn guest_and_host_exchange_data_both_ways_over_hybrid_vsock() {
    if !kvm_usable("guest_and_host_exchange_data_both_ways_over_hybrid_vsock") {
        return;
    }
    let dir = fresh_dir("vsock-guest");
    let uds = dir.join("v.sock");
    // The parent listens where every VM's connections to its port 9000 arrive (AF_VSOCK's
    // model); the VM's own listener's file is stale, so carve goes on to the shared one.
    drop(UnixListener::bind(dir.join("v.sock_9000")).unwrap());
    let parent = UnixListener::bind(dir.join("all_9000")).unwrap();
    let to_guest = bytes(1 << 20, 42);
    let cmdline = format!(
        "cid=7 parent_port=9000 expect_len={} expect_sum={} send_len={}",
        to_guest.len(),
        sum64(&to_guest),
        1 << 20
    );
    let kernel = guest("vsock", Format::Pvh);
    let vsock = format!("cid=7,uds={},shared={}", uds.display(), dir.join("all").display());
    let vm = Vm::start_with_vsock(&["--kernel", kernel.to_str().unwrap()], &vsock, &["--cmdline", &cmdline]);

    // Guest → parent listener: greeting, 1 MiB to the guest, 1 MiB back. The connection comes
    // from an abstract address naming the guest's end: CID, port, and the parent port.
    let (conn, from) = parent.accept().unwrap();
    let from = std::os::linux::net::SocketAddrExt::as_abstract_name(&from).map(String::from_utf8_lossy);
    let from = from.expect("the connection is named").into_owned();
    let fields: Vec<&str> = from.strip_prefix("carve/vsock/").unwrap_or_default().split('/').collect();
    assert_eq!(fields.len(), 4, "named {from}");
    assert_eq!(
        (fields[0], fields[2], fields[3]),
        ("7", "9000", vm.pid().to_string().as_str()),
        "named {from}"
    );
    assert!(fields[1].parse::<u32>().is_ok(), "named {from}");
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut hello = String::new();
    reader.read_line(&mut hello).unwrap();
    assert_eq!(hello, "hello from the guest\n");
    let mut writer = conn.try_clone().unwrap();
    let data = to_guest.clone();
    let feeder = thread::spawn(move || {
        writer.write_all(&data).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut from_guest = Vec::new();
    reader.read_to_end(&mut from_guest).expect("the guest's data ends with its close");
    feeder.join().unwrap();
    assert_eq!(from_guest.len(), 1 << 20);
    for (i, block) in from_guest.chunks(4096).enumerate() {
        assert!(block.iter().all(|&b| b == i as u8), "block {i} from the guest is intact");
    }

    // Host → guest echo service: 1 MiB through and back.
    let (echo, host_port) = connect_guest(&uds, 5005).expect("the guest accepts on 5005");
    assert!(host_port >= 1 << 30, "host-side ports come from 2^30 up, as in Firecracker");
    assert!(echo_round_trip(&echo, &to_guest) == to_guest, "1 MiB echoed intact");
    drop(echo);

    // 64 connections at once, each with its own data.
    let conns: Vec<(UnixStream, Vec<u8>)> = (0..64)
        .map(|i| {
            let (stream, _) = connect_guest(&uds, 5005).expect("the guest accepts connection {i}");
            (stream, bytes(3000 + i * 17, i as u64 + 1))
        })
        .collect();
    for (stream, data) in &conns {
        (&*stream).write_all(data).unwrap();
    }
    for (i, (stream, data)) in conns.iter().enumerate() {
        let mut back = vec![0u8; data.len()];
        (&*stream).read_exact(&mut back).unwrap();
        assert!(back == *data, "connection {i} echoed its own bytes");
    }
    drop(conns);

    // Refusals: a guest port nobody listens on, and a malformed request line.
    assert!(connect_guest(&uds, 4444).is_none(), "RST from the guest closes the host socket");
    let mut bad = UnixStream::connect(&uds).unwrap();
    bad.set_read_timeout(Some(TIMEOUT)).unwrap();
    bad.write_all(b"HELLO 5005\n").unwrap();
    assert_eq!(bad.read(&mut [0u8; 8]).unwrap(), 0, "a bad request line is closed");

    let _ = connect_guest(&uds, 5999);
    let out = vm.wait();
    assert_guest_passed(&out);
    assert!(!uds.exists(), "carve removes its socket when the VM ends");
}

#[test]
fn demo_guest_serves_echo_on_port_5005() {
    if !kvm_usable("demo_guest_serves_echo_on_port_5005") {
        return;
    }
    let dir = fresh_dir("vsock-demo");
    let uds = dir.join("demo.sock");
    let vm = Vm::start(&["--demo"], &uds, 4, &["--cmdline", "echo_sessions=1"]);
    let (stream, _) = connect_guest(&uds, 5005).expect("the demo accepts on 5005");
    let message = b"carve demo echo\n".repeat(100);
    assert!(echo_round_trip(&stream, &message) == message);
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&stream).read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "the demo closes once the peer has");
    let out = vm.wait();
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("echo on port 5005"), "{}", stdout(&out));
}

#[test]
fn bad_vsock_arguments_are_one_clear_line() {
    let dir = fresh_dir("vsock-args");
    for (arg, expected) in [
        ("cid=3,uds=/tmp/x", "guest CID 3 is reserved"),
        ("cid=4294967295,uds=/tmp/x", "reserved"),
        ("cid=five,uds=/tmp/x", "not a number"),
        ("cid=5", "both cid=N and uds=PATH"),
        ("cid=5,uds=/tmp/x,port=1", "unexpected 'port=1'"),
    ] {
        let out = carve(&["vm", "run", "--demo", "--vsock", arg]);
        assert_eq!(out.status.code(), Some(2), "{arg}");
        assert!(stderr(&out).contains(expected), "{arg}: {}", stderr(&out));
    }
    if !kvm_usable("bad_vsock_arguments_are_one_clear_line (socket in use)") {
        return;
    }
    let taken = dir.join("taken.sock");
    let _listener = UnixListener::bind(&taken).unwrap();
    let out = carve(&["vm", "run", "--demo", "--vsock", &format!("cid=5,uds={}", taken.display())]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("cannot listen on the vsock Unix socket") && err.lines().count() == 1, "{err}");
}

#[test]
fn a_stop_signal_ends_the_vm_cleanly_and_removes_its_sockets() {
    if !kvm_usable("a_stop_signal_ends_the_vm_cleanly_and_removes_its_sockets") {
        return;
    }
    let dir = fresh_dir("vsock-signal");
    let uds = dir.join("sig.sock");
    let vm = Vm::start(&["--demo"], &uds, 6, &["--serial", "none"]);
    let pid = vm.0.as_ref().unwrap().id();
    let (_stream, _) = connect_guest(&uds, 5005).expect("the demo serves while running");
    let killed = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    let out = vm.wait();
    assert_eq!(out.status.code(), Some(128 + 15), "{}", stderr(&out));
    assert!(!uds.exists(), "the socket is removed on SIGTERM");
}
