//! Enclave launch and footprint, side by side in one run: `cargo bench -p carve-cli --bench
//! enclave`. Results go to docs/benchmarks.md by hand.
//!
//! 1. run-enclave → heartbeat for the demo enclave (the command returns once the enclave's
//!    heartbeat arrived), against the floor: `carve vm run --eif` of an image whose guest exits
//!    at its first instruction (the same VMM booting the same kind of image, with no enclave
//!    process, sockets or heartbeat).
//! 2. Host memory per enclave beyond guest RAM, after a heartbeat and an attestation: the
//!    enclave process's resident memory outside its guest RAM mapping, as RSS (every page it
//!    maps, shared ones whole), PSS (shared pages split among their users) and USS (pages only
//!    it maps), with one and with four enclaves running; and RSS with the guest in hugepages (which RSS leaves out).
//!    Hugepages only as root; the reservation is given back.

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use carve_guest_images::{path as guest, Format};
use common::median;

const RUNS: usize = 15;

fn main() {
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        eprintln!("SKIPPED: /dev/kvm is not usable here");
        return;
    }
    let work = std::env::temp_dir().join(format!("carve-bench-enclave-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let host =
        Host { carve: common::shipped_carve(), run_dir: work.join("run"), state_dir: work.join("state") };
    let exit_eif = build_exit_eif(&host, &work);

    println!("## run-enclave → heartbeat, demo enclave (64 MiB, 1 vCPU; median of {RUNS})\n");
    // The guest's debug-exit 0 is process status 1 (QEMU's isa-debug-exit convention).
    let floor = median(RUNS, || {
        time(|| host.expect(1, &["vm", "run", "--eif", exit_eif.to_str().unwrap(), "--memory", "64"]))
    });
    host.development();
    let dev = median(RUNS, || launch_and_time(&host));
    let shared_text = [1, 4].map(|n| footprint_of(&host, n));
    println!("| | ms | × floor |\n|---|---|---|");
    println!("| `carve vm run --eif` of a guest that exits at once (floor) | {:.1} | 1.00 |", floor * 1e3);
    println!("| `carve run-enclave --demo`, development mode | {:.1} | {:.2} |", dev * 1e3, dev / floor);
    let pool = rustix::process::geteuid().is_root().then(|| {
        let _guard = Reservation::new(&host, &work);
        let launch = median(RUNS, || launch_and_time(&host));
        println!(
            "| `carve run-enclave --demo`, pool CPU 1 + hugepages | {:.1} | {:.2} |",
            launch * 1e3,
            launch / floor
        );
        footprint_of(&host, 1)
    });

    println!("\n## Host memory per enclave beyond guest RAM\n");
    let bare = peak_rss_kib(&host, &["vm", "run", "--eif", exit_eif.to_str().unwrap(), "--memory", "64"]);
    println!("| | RSS KiB | PSS KiB | USS KiB |\n|---|---|---|---|");
    println!("| `carve vm run --eif` (bare VMM, same kind of image), peak RSS | {bare} | | |");
    for (n, footprint) in [1, 4].iter().zip(shared_text) {
        println!(
            "| enclave process outside guest RAM, {n} enclave(s) running, development mode | {} | {} | {} |",
            footprint.rss_kib, footprint.pss_kib, footprint.uss_kib
        );
    }
    match pool {
        Some(footprint) => println!(
            "| enclave process, guest RAM in hugepages ({} KiB, not in RSS) | {} | {} | {} |",
            footprint.hugetlb_kib, footprint.rss_kib, footprint.pss_kib, footprint.uss_kib
        ),
        None => println!("| enclave process with hugepages | needs root | |"),
    }
    drop(host);
    let _ = std::fs::remove_dir_all(&work);
}

struct Host {
    /// The shipped binary (`cargo dist`), which also runs the enclave processes.
    carve: PathBuf,
    run_dir: PathBuf,
    state_dir: PathBuf,
}

impl Drop for Host {
    /// A benchmark that stops half-way leaves no enclave running.
    fn drop(&mut self) {
        let _ = self.carve(&["terminate-enclave", "--all"]);
    }
}

impl Host {
    fn carve(&self, args: &[&str]) -> Output {
        Command::new(&self.carve)
            .args(args)
            .env("CARVE_RUN_DIR", &self.run_dir)
            .env("CARVE_STATE_DIR", &self.state_dir)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> Output {
        self.expect(0, args)
    }

    fn expect(&self, status: i32, args: &[&str]) -> Output {
        let out = self.carve(args);
        assert_eq!(
            out.status.code(),
            Some(status),
            "carve {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn development(&self) {
        let yaml = self.run_dir.with_file_name("dev.yaml");
        std::fs::write(&yaml, "development: true\n").unwrap();
        self.ok(&["allocator", "--config", yaml.to_str().unwrap()]);
    }
}

/// The hugepage reservation of one benchmark; the counts found are written back.
struct Reservation<'a> {
    host: &'a Host,
    found: Vec<(PathBuf, String)>,
}

impl<'a> Reservation<'a> {
    fn new(host: &'a Host, work: &Path) -> Reservation<'a> {
        let found = ["hugepages-2048kB", "hugepages-1048576kB"]
            .iter()
            .map(|s| PathBuf::from(format!("/sys/devices/system/node/node0/hugepages/{s}/nr_hugepages")))
            .filter_map(|p| std::fs::read_to_string(&p).ok().map(|c| (p, c)))
            .collect();
        let yaml = work.join("pool.yaml");
        std::fs::write(&yaml, "memory_mib: 64\ncpu_pool: 1\n").unwrap();
        host.ok(&["allocator", "--config", yaml.to_str().unwrap()]);
        Reservation { host, found }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let _ = self.host.carve(&["terminate-enclave", "--all"]);
        let _ = self.host.carve(&["allocator", "--clear"]);
        for (path, count) in &self.found {
            let _ = std::fs::write(path, count.trim());
        }
    }
}

fn launch_and_time(host: &Host) -> f64 {
    let seconds = time(|| host.ok(&["run-enclave", "--demo", "--cpu-count", "1", "--memory", "64"]));
    host.ok(&["terminate-enclave", "--all"]);
    seconds
}

struct Footprint {
    rss_kib: u64,
    pss_kib: u64,
    /// Pages only this process maps: what one more enclave adds.
    uss_kib: u64,
    hugetlb_kib: u64,
}

/// The memory of the first of `count` running demo enclaves' processes outside its 64 MiB guest
/// RAM mapping, after one attestation.
fn footprint_of(host: &Host, count: usize) -> Footprint {
    let mut pids = Vec::new();
    for _ in 0..count {
        let out = host.ok(&["run-enclave", "--demo", "--cpu-count", "1", "--memory", "64"]);
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        attest(&host.run_dir.join(format!("{}.vsock", info["EnclaveID"].as_str().unwrap())));
        pids.push(info["ProcessID"].to_string());
    }
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", pids[0])).unwrap();
    let mut footprint = Footprint { rss_kib: 0, pss_kib: 0, uss_kib: 0, hugetlb_kib: 0 };
    let mut guest_ram = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let (Some(key), Some(value)) = (words.next(), words.next()) else { continue };
        let kib = || value.parse::<u64>().unwrap_or(0);
        match key {
            "Size:" => guest_ram = kib() == 64 << 10,
            "Rss:" if !guest_ram => footprint.rss_kib += kib(),
            "Pss:" if !guest_ram => footprint.pss_kib += kib(),
            "Private_Clean:" | "Private_Dirty:" if !guest_ram => footprint.uss_kib += kib(),
            "Private_Hugetlb:" => footprint.hugetlb_kib += kib(),
            _ => {}
        }
    }
    host.ok(&["terminate-enclave", "--all"]);
    footprint
}

fn attest(vsock: &Path) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(vsock).unwrap();
    s.write_all(b"CONNECT 5006\n").unwrap();
    let mut byte = [0u8];
    while byte[0] != b'\n' {
        s.read_exact(&mut byte).unwrap();
    }
    s.write_all(&[0, 0, 0, 4, 1, 2, 3, 4]).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut document = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut document).unwrap();
}

fn build_exit_eif(host: &Host, work: &Path) -> PathBuf {
    let ramdisk = work.join("empty.cpio");
    std::fs::write(&ramdisk, b"").unwrap();
    let eif = work.join("exit.eif");
    host.ok(&[
        "build-enclave",
        "--kernel",
        guest("exit", Format::BzImage).to_str().unwrap(),
        "--cmdline",
        "mode=code:0",
        "--ramdisk",
        ramdisk.to_str().unwrap(),
        "--output-file",
        eif.to_str().unwrap(),
    ]);
    eif
}

fn peak_rss_kib(host: &Host, args: &[&str]) -> i64 {
    let mut command = Command::new("/usr/bin/time");
    command.arg("-f").arg("%M").arg(&host.carve).args(args);
    command.env("CARVE_STATE_DIR", &host.state_dir);
    match command.output() {
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            err.lines().last().and_then(|l| l.trim().parse().ok()).unwrap_or(-1)
        }
        Err(_) => -1,
    }
}

fn time(f: impl FnOnce() -> Output) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}
