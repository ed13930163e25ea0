//! Host↔guest vsock throughput and round-trip latency through carve's hybrid Unix socket, side
//! by side with the same echo over a plain Unix socket pair on the host (the floor), plus the
//! device's CPU time per MiB (the event-loop thread's CPU time, from /proc schedstat).
//! Run: `cargo bench -p carve-cli --bench vsock`.

#[path = "common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const PAYLOAD: usize = 4 << 20;
const PINGS: usize = 200;

fn main() {
    let (floor_mibps, floor_rtt) = {
        let (a, b) = UnixStream::pair().unwrap();
        thread::spawn(move || echo_server(b));
        (throughput(&a), round_trip(&a))
    };

    let shipped = measure(&common::shipped_carve());
    let glibc = measure(std::path::Path::new(env!("CARGO_BIN_EXE_carve")));

    println!("## vsock echo, {} MiB through and back; {PINGS} 1-byte round trips (median)\n", PAYLOAD >> 20);
    println!("| | MiB/s (each way) | round trip µs | device CPU, ms per MiB |");
    println!("|---|---|---|---|");
    println!("| Unix socket echo on the host (floor) | {floor_mibps:.1} | {floor_rtt:.1} | |");
    for (name, m) in [("carve", &shipped), ("carve, cargo's default build (dynamic glibc)", &glibc)] {
        println!(
            "| {name}: hybrid vsock → demo guest echo | {:.1} | {:.1} | {:.2} |",
            m.mibps, m.rtt, m.cpu_per_mib_ms
        );
    }
    println!("\nDevice CPU is carve's event-loop thread's CPU time over the throughput phase.");
}

struct Measured {
    mibps: f64,
    rtt: f64,
    cpu_per_mib_ms: f64,
}

fn measure(carve: &std::path::Path) -> Measured {
    let dir = std::env::temp_dir().join(format!("carve-vsock-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("bench.sock");
    let mut child = Command::new(carve)
        .args(["vm", "run", "--demo", "--serial", "none", "--cmdline", "echo_sessions=2", "--vsock"])
        .arg(format!("cid=9,uds={}", uds.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let event_loop_cpu = || cpu_ns(child.id());
    let stream = connect(&uds, 5005);
    let cpu_before = event_loop_cpu();
    let mibps = throughput(&stream);
    let cpu_per_mib_ms = (event_loop_cpu() - cpu_before) as f64 / 1e6 / ((2 * PAYLOAD) >> 20) as f64;
    drop(stream);
    let stream = connect(&uds, 5005);
    let rtt = round_trip(&stream);
    drop(stream);
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Measured { mibps, rtt, cpu_per_mib_ms }
}

fn echo_server(stream: UnixStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut reader = &stream;
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if (&stream).write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn connect(uds: &std::path::Path, port: u32) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(stream) = UnixStream::connect(uds) {
            (&stream).write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
            let mut byte = [0u8];
            let mut line = Vec::new();
            while (&stream).read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            assert!(line.starts_with(b"OK "), "refused: {}", String::from_utf8_lossy(&line));
            return stream;
        }
        assert!(Instant::now() < deadline, "carve's socket never appeared");
        thread::sleep(Duration::from_millis(20));
    }
}

/// MiB/s of PAYLOAD bytes written while the echo is read back concurrently.
fn throughput(stream: &UnixStream) -> f64 {
    let data: Vec<u8> = (0..PAYLOAD).map(|i| (i * 31 + i / 4096) as u8).collect();
    let mut writer = stream.try_clone().unwrap();
    let start = Instant::now();
    let sender = thread::spawn(move || writer.write_all(&data).unwrap());
    let mut back = vec![0u8; PAYLOAD];
    (&*stream).read_exact(&mut back).unwrap();
    sender.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(back.iter().enumerate().all(|(i, &b)| b == (i * 31 + i / 4096) as u8), "echo intact");
    (PAYLOAD >> 20) as f64 / secs
}

fn round_trip(stream: &UnixStream) -> f64 {
    let mut times = Vec::with_capacity(PINGS);
    let mut byte = [0u8];
    for i in 0..PINGS {
        let start = Instant::now();
        (&*stream).write_all(&[i as u8]).unwrap();
        (&*stream).read_exact(&mut byte).unwrap();
        times.push(start.elapsed().as_secs_f64() * 1e6);
        assert_eq!(byte[0], i as u8);
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// CPU time of a process's main thread (carve's event loop), in nanoseconds.
fn cpu_ns(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/schedstat")).unwrap_or_default();
    text.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0)
}
