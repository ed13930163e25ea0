//! Port I/O and raw physical memory access (all memory is identity mapped).

use core::arch::asm;

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no effect on memory safety inside this guest.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack)) };
}

pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") value, options(nostack)) };
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack)) };
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nostack)) };
    value
}

pub fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: as for `outb`.
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") value, options(nostack)) };
    value
}

pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nostack)) };
    value
}

pub fn rdmsr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: guests read only MSRs their CPUID announces; a fault would end the test.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nostack)) };
    (high as u64) << 32 | low as u64
}

pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: as for `rdmsr`; the MSRs guests write (KVM's clock MSRs) point at guest memory.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack)) };
}

/// The time-stamp counter, ordered after earlier loads (as Linux's rdtsc_ordered).
pub fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: RDTSC only reads the counter.
    unsafe { asm!("lfence", "rdtsc", out("eax") low, out("edx") high, options(nostack)) };
    (high as u64) << 32 | low as u64
}

/// Reads a value at a physical address.
pub fn read_phys<T: Copy>(addr: u64) -> T {
    // SAFETY: the low 4 GiB are identity mapped; callers read what the VMM put there.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

pub fn write_phys<T: Copy>(addr: u64, value: T) {
    // SAFETY: as for `read_phys`; callers write only device or scratch addresses.
    unsafe { core::ptr::write_volatile(addr as *mut T, value) }
}

/// A byte slice of physical memory.
pub fn phys_slice(addr: u64, len: usize) -> &'static [u8] {
    // SAFETY: as for `read_phys`; the VMM placed `len` bytes at `addr`.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

/// A NUL-terminated string in physical memory (at most 64 KiB), lossily as UTF-8.
pub fn phys_cstr(addr: u64) -> &'static str {
    if addr == 0 {
        return "";
    }
    let bytes = phys_slice(addr, 0x10000);
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(0);
    core::str::from_utf8(&bytes[..len]).unwrap_or("<not utf-8>")
}
