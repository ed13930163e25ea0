//! Proves CPUID normalisation and CPU templates from inside: prints what the guest sees and
//! checks the features named by `hidden=a,b,...` are absent and the hypervisor bit is set.
#![no_std]
#![no_main]

use core::arch::x86_64::__cpuid_count;

use carve_guests::{check, exit, guest_main, param, println, BootInfo};

guest_main!(main);

/// (name, leaf, subleaf, register index: 0=eax 1=ebx 2=ecx 3=edx, bit)
const FEATURES: &[(&str, u32, u32, usize, u32)] = &[
    ("popcnt", 1, 0, 2, 23),
    ("xsave", 1, 0, 2, 26),
    ("osxsave", 1, 0, 2, 27),
    ("avx", 1, 0, 2, 28),
    ("smep", 7, 0, 1, 7),
    ("smap", 7, 0, 1, 20),
    ("avx2", 7, 0, 1, 5),
    ("avx512f", 7, 0, 1, 16),
    ("pku", 7, 0, 2, 3),
];

fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    // SAFETY: CPUID is always available in 64-bit mode.
    let r = unsafe { __cpuid_count(leaf, subleaf) };
    [r.eax, r.ebx, r.ecx, r.edx]
}

fn main(boot: &BootInfo) -> ! {
    let leaf1 = cpuid(1, 0);
    let leaf7 = cpuid(7, 0);
    println!("cpuid 1: eax={:#x} ebx={:#x} ecx={:#x} edx={:#x}", leaf1[0], leaf1[1], leaf1[2], leaf1[3]);
    println!("cpuid 7: ebx={:#x} ecx={:#x} edx={:#x}", leaf7[1], leaf7[2], leaf7[3]);
    check!(leaf1[2] & (1 << 31) != 0, "hypervisor bit set");
    check!(leaf1[1] >> 24 == 0, "BSP APIC ID is 0");
    let max_leaf = cpuid(0, 0)[0];
    if max_leaf >= 0xd {
        println!("cpuid 0xd.0: eax={:#x}", cpuid(0xd, 0)[0]);
    }
    let hidden = param(boot.cmdline, "hidden").unwrap_or("");
    for name in hidden.split(',').filter(|n| !n.is_empty()) {
        let Some(&(_, leaf, subleaf, reg, bit)) = FEATURES.iter().find(|f| f.0 == name) else {
            check!(false, "known feature name {}", name);
            continue;
        };
        check!(cpuid(leaf, subleaf)[reg] & (1 << bit) == 0, "{} hidden", name);
    }
    exit(0)
}
