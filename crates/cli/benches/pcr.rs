//! `carve pcr --input` on a 256 MiB file against `sha384sum` of the same file (the limit: one
//! SHA-384 pass), side by side in one run; plus each one's peak resident memory.
//! Run: `cargo bench -p carve-cli --bench pcr`.

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

const SIZE: usize = 256 << 20;
const RUNS: usize = 7;

fn main() {
    let file = std::env::temp_dir().join(format!("carve-pcr-bench-{}", std::process::id()));
    write_input(&file);
    let shipped = common::shipped_carve();
    let carve = shipped.to_str().unwrap();
    let path = file.to_str().unwrap();
    let carve_cmd = [carve, "pcr", "--input", path];
    let sha_cmd = ["sha384sum", path];
    // Warm the page cache so both read from memory.
    run(&sha_cmd);
    let (mut carve_times, mut sha_times) = (Vec::new(), Vec::new());
    let (mut carve_rss, mut sha_rss) = (0, 0);
    for _ in 0..RUNS {
        let (t, rss) = run(&sha_cmd);
        sha_times.push(t);
        sha_rss = sha_rss.max(rss);
        let (t, rss) = run(&carve_cmd);
        carve_times.push(t);
        carve_rss = carve_rss.max(rss);
    }
    let _ = std::fs::remove_file(&file);
    let (carve_ms, sha_ms) = (median(carve_times), median(sha_times));
    println!("## PCR of a 256 MiB file (median of {RUNS}, page cache warm)\n");
    println!("| | ms | × sha384sum | peak RSS (KiB) |");
    println!("|---|---|---|---|");
    println!("| sha384sum (limit) | {sha_ms:.1} | 1.00 | {sha_rss} |");
    println!("| carve pcr --input | {carve_ms:.1} | {:.2} | {carve_rss} |", carve_ms / sha_ms);
}

/// Pseudo-random bytes, written in 1 MiB pieces: a large buffer here would raise the peak RSS
/// that spawned children inherit until they exec.
fn write_input(path: &Path) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..SIZE / chunk.len() {
        for word in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        std::io::Write::write_all(&mut out, &chunk).unwrap();
    }
    std::io::Write::flush(&mut out).unwrap();
}

/// Wall time (ms) and peak RSS (KiB) of one run of `command`.
fn run(command: &[&str]) -> (f64, i64) {
    let start = Instant::now();
    // Reaped by wait4 below, which also reports the child's own peak RSS.
    #[allow(clippy::zombie_processes)]
    let child =
        Command::new(command[0]).args(&command[1..]).stdout(Stdio::null()).spawn().expect("command starts");
    let mut status = 0;
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: waits for our own child; wait4 fills `status` and `usage`.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, usage.as_mut_ptr()) };
    let elapsed = start.elapsed().as_secs_f64() * 1000.0;
    assert!(pid > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "{command:?} failed");
    // SAFETY: zero-initialised and filled by wait4 above.
    (elapsed, unsafe { usage.assume_init() }.ru_maxrss)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
