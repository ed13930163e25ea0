//! Benchmark guest: `count=N` writes to an ignored I/O port, then exits with code 0.
#![no_std]
#![no_main]

use carve_guests::{exit, guest_main, param, parse_u64, BootInfo};

guest_main!(main);

fn main(boot: &BootInfo) -> ! {
    let count = param(boot.cmdline, "count").and_then(parse_u64).unwrap_or(0);
    for _ in 0..count {
        carve_guests::io::outb(0x80, 0);
    }
    exit(0)
}
