//! Proves the platform's devices and exits: fw_cfg answers, ignored ports and unbacked MMIO
//! read as all ones, and (with `testdev` on the command line) pc-testdev behaves like QEMU's.
#![no_std]
#![no_main]

use carve_guests::io::{inb, inl, inw, outb, outl, outw, read_phys, write_phys};
use carve_guests::{check, exit, flag, fw_cfg, guest_main, param, parse_u64, BootInfo};

guest_main!(main);

fn main(boot: &BootInfo) -> ! {
    check!(&fw_cfg::read::<4>(fw_cfg::SIGNATURE) == b"QEMU", "fw_cfg signature");
    if let Some(ram) = param(boot.cmdline, "expect_ram").and_then(parse_u64) {
        check!(fw_cfg::read_u64(fw_cfg::RAM_SIZE) == ram, "fw_cfg RAM size {:#x}", ram);
    }
    if let Some(cpus) = param(boot.cmdline, "expect_cpus").and_then(parse_u64) {
        check!(fw_cfg::read_u16(fw_cfg::NB_CPUS) as u64 == cpus, "fw_cfg CPU count {}", cpus);
        check!(fw_cfg::read_u16(fw_cfg::MAX_CPUS) as u64 >= cpus, "fw_cfg max CPUs");
    }
    check!(fw_cfg::read_u64(0x7fff) == 0, "unknown fw_cfg key reads zeros");

    // Ignored port I/O.
    outb(0x80, 0x55);
    outw(0x1234, 0x55aa);
    check!(inb(0x1230) == 0xff, "ignored byte port reads 0xff");
    check!(inw(0x1230) == 0xffff, "ignored word port reads 0xffff");
    check!(inl(0x1230) == 0xffff_ffff, "ignored dword port reads all ones");

    // Unbacked MMIO: above RAM, below the IOAPIC.
    let hole = 0xe000_0000u64;
    write_phys::<u32>(hole, 0x1234_5678);
    check!(read_phys::<u32>(hole) == 0xffff_ffff, "unbacked MMIO reads all ones");
    check!(read_phys::<u8>(hole + 3) == 0xff, "unbacked MMIO byte reads 0xff");

    if flag(boot.cmdline, "testdev") {
        outl(0xe0, 0xdead_beef);
        check!(inl(0xe0) == 0xdead_beef, "testdev dword latch");
        check!(inb(0xe1) == 0xbe, "testdev latch by byte offset");
        outb(0xea, 0x11);
        check!(inl(0xe8) == 0xde11_beef, "testdev byte latch shares the value");
        check!(inw(0xe2) == 0xde11, "testdev word read at offset 2");
        let buf = 0xff00_0000u64;
        write_phys::<u64>(buf + 8, 0x0123_4567_89ab_cdef);
        write_phys::<u8>(buf + 0xffff, 0x5a);
        check!(read_phys::<u64>(buf + 8) == 0x0123_4567_89ab_cdef, "testdev iomem qword");
        check!(read_phys::<u16>(buf + 10) == 0x89ab, "testdev iomem word");
        check!(read_phys::<u8>(buf + 0xffff) == 0x5a, "testdev iomem last byte");
        outl(0xe4, 0x0020_0000);
        check!(read_phys::<u64>(buf + 8) == 0x0123_4567_89ab_cdef, "flush-page keeps memory");
        outb(0x2000 + 10, 1);
        outb(0x2000 + 10, 0);
        check!(true, "ISA IRQ line 10 raised and lowered");
    } else {
        check!(inl(0xe0) == 0xffff_ffff, "testdev absent without --testdev");
    }
    exit(0)
}
