//! carve's guest runtime: just enough to boot under each protocol, print on the serial port,
//! read what the VMM handed over, and report a verdict through the debug-exit port.
//!
//! A test guest passes by calling [`exit`] with 0 (process status 1, as in kvm-unit-tests) and
//! fails with any other code; a panic exits with code 0x7f.
#![no_std]

pub mod boot_info;
pub mod entry;
pub mod fw_cfg;
pub mod interrupts;
pub mod io;
pub mod nsm;
pub mod pvclock;
pub mod serial;
pub mod smp;
pub mod virtio;
pub mod vsock;

pub use boot_info::{BootInfo, Protocol};

/// Defines the guest's main function, called on the BSP once boot info is parsed.
#[macro_export]
macro_rules! guest_main {
    ($main:path) => {
        #[no_mangle]
        fn guest_main(boot: &$crate::BootInfo) -> ! {
            $main(boot)
        }
    };
}

/// QEMU-compatible isa-debug-exit port: writing `code` ends the VM with status `code << 1 | 1`.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Ends the VM through the debug-exit port.
pub fn exit(code: u8) -> ! {
    io::outb(DEBUG_EXIT_PORT, code);
    halt_forever()
}

/// Resets the machine through the i8042 controller (carve treats it as a clean power-off).
pub fn reset() -> ! {
    io::outb(0x64, 0xfe);
    halt_forever()
}

pub fn halt_forever() -> ! {
    loop {
        // SAFETY: halting with interrupts disabled has no memory effects.
        unsafe { core::arch::asm!("cli; hlt") };
    }
}

/// Fails the test (exit code 1) with a message when `cond` is false.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if $cond {
            $crate::println!("PASS: {}", format_args!($($msg)+));
        } else {
            $crate::println!("FAIL: {}", format_args!($($msg)+));
            $crate::exit(1);
        }
    };
}

/// Fails the test like [`check`] when `cond` is false, but stays silent when it holds (for
/// checks made in a loop).
#[macro_export]
macro_rules! require {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            $crate::println!("FAIL: {}", format_args!($($msg)+));
            $crate::exit(1);
        }
    };
}

/// Looks up `key=value` in a space-separated command line.
pub fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_ascii_whitespace().find_map(|word| {
        let (k, v) = word.split_once('=')?;
        (k == key).then_some(v)
    })
}

/// Whether a bare word (no `=`) appears on the command line.
pub fn flag(cmdline: &str, name: &str) -> bool {
    cmdline.split_ascii_whitespace().any(|word| word == name)
}

/// Parses a decimal or 0x-prefixed hexadecimal number.
pub fn parse_u64(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Wrapping sum of little-endian 64-bit words (a short tail counts zero-padded): a checksum
/// cheap enough for emulated guests, computed the same way by host tests.
pub fn sum64(data: &[u8]) -> u64 {
    data.chunks(8).fold(0u64, |sum, chunk| {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        sum.wrapping_add(u64::from_le_bytes(word))
    })
}

/// FNV-1a, 32 bits: a checksum the host side computes the same way.
pub fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("PANIC: {}", info);
    exit(0x7f)
}
