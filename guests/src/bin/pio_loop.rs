//! Benchmark guest: `count=N` writes to an ignored I/O port, then exits with code 0.
#![no_std]
#![no_main]

use core::arch::asm;

use carve_guests::{exit, guest_main, param, parse_u64, BootInfo};

guest_main!(main);

fn main(boot: &BootInfo) -> ! {
    let count = param(boot.cmdline, "count").and_then(parse_u64).unwrap_or(0);
    if count > 0 {
        // The benchmark floor's loop exactly (`out`, `dec`, `jnz`): this host emulates guest
        // ring-0 code instruction by instruction, so any extra instruction per write would be
        // counted against carve's exit round trip.
        // SAFETY: port I/O to an unclaimed port; it touches no guest memory.
        unsafe {
            asm!(
                "2:",
                "out 0x80, al",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) count => _,
                in("al") 0u8,
                options(nomem, nostack),
            )
        };
    }
    exit(0)
}
