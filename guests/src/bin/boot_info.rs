//! Proves a boot protocol from inside: command line, memory map and initrd/module arrive as the
//! command line's `expect_*` parameters say.
#![no_std]
#![no_main]

use carve_guests::{check, exit, fnv1a, guest_main, param, parse_u64, println, BootInfo, Protocol};

guest_main!(main);

fn expected(boot: &BootInfo, key: &str) -> Option<u64> {
    param(boot.cmdline, key).and_then(parse_u64)
}

fn main(boot: &BootInfo) -> ! {
    println!("protocol: {}", boot.protocol.name());
    println!("cmdline: {}", boot.cmdline);
    for range in boot.memory_map() {
        println!("memory: {:#012x}-{:#012x} type {}", range.base, range.base + range.size, range.kind);
    }
    for module in boot.modules() {
        println!("module: {:#x} {} bytes fnv {:#010x}", module.base, module.size, fnv1a(module.bytes()));
    }

    check!(boot.protocol != Protocol::Unknown, "boot protocol recognised");
    if let Some(name) = param(boot.cmdline, "expect_protocol") {
        check!(boot.protocol.name() == name, "protocol is {}", name);
    }
    check!(param(boot.cmdline, "token") == Some("carve-boot-test"), "cmdline carries token");

    let map = boot.memory_map();
    check!(!map.is_empty(), "memory map present ({} ranges)", map.len());
    check!(map.iter().any(|r| r.base == 0 && r.kind == 1), "low memory is usable RAM");
    check!(map.iter().any(|r| r.base == 0x10_0000 && r.kind == 1), "RAM from 1 MiB is usable");
    if let Some(ram) = expected(boot, "expect_ram") {
        check!(boot.ram_end() == ram, "RAM ends at {:#x} (map says {:#x})", ram, boot.ram_end());
        if boot.protocol == Protocol::Multiboot {
            let (lower, upper) = boot.mem_lower_upper_kib.unwrap_or_default();
            check!(lower == 639, "multiboot mem_lower is 639 KiB ({})", lower);
            check!(upper as u64 == (ram - 0x10_0000) / 1024, "multiboot mem_upper ({} KiB)", upper);
        }
    }

    match (expected(boot, "expect_module_len"), expected(boot, "expect_module_fnv")) {
        (Some(len), Some(fnv)) => {
            check!(boot.modules().len() == 1, "one module/initrd ({})", boot.modules().len());
            let module = boot.modules()[0];
            check!(module.size == len, "module size {} (expected {})", module.size, len);
            check!(module.base % 4096 == 0, "module page aligned ({:#x})", module.base);
            check!(module.base + module.size <= boot.ram_end(), "module inside RAM");
            check!(fnv1a(module.bytes()) as u64 == fnv, "module contents intact");
        }
        _ => check!(boot.modules().is_empty(), "no module when none was given"),
    }
    exit(0)
}
