//! Proves the XSAVE enumeration carve gives a guest is consistent, from inside: with every
//! user state component CPUID 0xD.0 offers enabled in XCR0, XCR0 reads back as written and
//! CPUID 0xD.0 EBX (the save area for the enabled components) matches the layout the sub-leaves
//! describe — what Linux checks at boot ("XSAVE consistency problem"). Without XSAVE in CPUID
//! (a template that hides it, or a host that does not offer it) there is nothing to enable, and
//! leaf 0xD must then not describe any.
#![no_std]
#![no_main]

use core::arch::x86_64::__cpuid_count;

use carve_guests::{check, exit, guest_main, println, BootInfo};

guest_main!(main);

const LEGACY_AND_HEADER: u32 = 512 + 64;
/// Components a ring-0 test may enable without supervisor state: x87 .. AVX-512, PKRU, AMX.
const USER_COMPONENTS: u64 = 0x0006_02ff;

fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    // SAFETY: CPUID is always available in 64-bit mode.
    let r = unsafe { __cpuid_count(leaf, subleaf) };
    [r.eax, r.ebx, r.ecx, r.edx]
}

fn main(_boot: &BootInfo) -> ! {
    let xsave = cpuid(1, 0)[2] & (1 << 26) != 0;
    let max_leaf = cpuid(0, 0)[0];
    if !xsave {
        println!("no XSAVE in CPUID leaf 1");
        let described =
            if max_leaf >= 0xd { cpuid(0xd, 0)[0] as u64 | (cpuid(0xd, 0)[3] as u64) << 32 } else { 0 };
        check!(described & !0b11 == 0, "leaf 0xD describes no extended state ({described:#x})");
        exit(0);
    }
    check!(max_leaf >= 0xd, "XSAVE comes with leaf 0xD (max leaf {max_leaf:#x})");
    let leaf = cpuid(0xd, 0);
    let supported = (leaf[0] as u64 | (leaf[3] as u64) << 32) & USER_COMPONENTS;
    println!("cpuid 0xd.0: eax={:#x} ebx={:#x} ecx={:#x} edx={:#x}", leaf[0], leaf[1], leaf[2], leaf[3]);
    check!(supported & 0b11 == 0b11, "x87 and SSE state are offered");
    // AVX-512's three components and AMX's two are architecturally all or nothing, and AVX-512
    // needs AVX's state too.
    let mut xcr0 = supported;
    if xcr0 & 0xe0 != 0xe0 || xcr0 & 0x4 == 0 {
        xcr0 &= !0xe0;
    }
    if xcr0 & 0x6_0000 != 0x6_0000 {
        xcr0 &= !0x6_0000;
    }
    // SAFETY: CR4.OSXSAVE is set only because CPUID reports XSAVE; XCR0 gets only components
    // leaf 0xD offers, x87 included, AVX-512's and AMX's as whole groups.
    unsafe {
        core::arch::asm!("mov {t}, cr4", "or {t}, {bit}", "mov cr4, {t}", t = out(reg) _, bit = const 1u64 << 18);
        core::arch::asm!("xsetbv", in("ecx") 0, in("eax") xcr0 as u32, in("edx") (xcr0 >> 32) as u32);
    }
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV of XCR0 with CR4.OSXSAVE set.
    unsafe { core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi) };
    let read_back = lo as u64 | (hi as u64) << 32;
    check!(read_back == xcr0, "XCR0 reads back as written ({read_back:#x}, wrote {xcr0:#x})");

    let mut end = LEGACY_AND_HEADER;
    for component in 2..63 {
        if xcr0 & (1 << component) == 0 {
            continue;
        }
        let [size, offset, ..] = cpuid(0xd, component);
        check!(size != 0, "component {component} has a size");
        println!("component {component}: offset {offset} size {size}");
        end = end.max(offset + size);
    }
    let [_, enabled_size, max_size, _] = cpuid(0xd, 0);
    check!(
        enabled_size == end,
        "CPUID 0xD.0 EBX {enabled_size} is the save area for XCR0 {xcr0:#x} ({end} from the sub-leaves)"
    );
    check!(max_size >= end, "CPUID 0xD.0 ECX {max_size} covers every offered component");
    exit(0)
}
