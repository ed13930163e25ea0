//! The KVM clock from inside, as kvm-unit-tests' kvmclock_test checks it: KVM's CPUID leaves
//! announce it, every vCPU enables it, the time it gives never goes back when read across
//! vCPUs (where KVM flags its master clock), it advances at the rate of the PIT (an independent
//! clock), the TSC runs at the rate announced in leaf 0x40000010, and the wall clock KVM
//! derives from it is the host's time (`now=SECONDS` on the command line).
//!
//! `expect_cpus=N` (default 2) vCPUs each read the clock `loops=N` (default 20000) times.
#![no_std]
#![no_main]

use core::arch::x86_64::__cpuid;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};

use carve_guests::io::{inb, outb, read_phys, wrmsr};
use carve_guests::pvclock::{Area, MSR_KVM_WALL_CLOCK_NEW, PVCLOCK_TSC_STABLE_BIT};
use carve_guests::{check, exit, guest_main, param, parse_u64, println, smp, BootInfo};

guest_main!(main);

const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
const KVM_FEATURES_LEAF: u32 = 0x4000_0001;
/// VMware's convention, which KVM guests read too: EAX = TSC kHz, EBX = APIC bus kHz.
const TIMING_LEAF: u32 = 0x4000_0010;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;
const MAX_CPUS: usize = 4;
const PIT_HZ: u64 = 1_193_182;

static CLOCKS: [Area; MAX_CPUS] = [const { Area::new() }; MAX_CPUS];
static WALL: Area = Area::new();
static READY: AtomicU32 = AtomicU32::new(0);
static START: AtomicU32 = AtomicU32::new(0);
static DONE: AtomicU32 = AtomicU32::new(0);
static LOOPS: AtomicU64 = AtomicU64::new(20_000);
static LAST: AtomicU64 = AtomicU64::new(0);
static WARPS: AtomicU64 = AtomicU64::new(0);
static WORST_WARP: AtomicU64 = AtomicU64::new(0);
static STABLE_FLAG_SEEN: AtomicU32 = AtomicU32::new(0);

/// Nanoseconds since the VM's clock started, and the pvclock flags, from `cpu`'s area.
fn clock_read(cpu: usize) -> (u64, u8) {
    let (ns, flags, _) = clock_read_with_tsc(cpu);
    (ns, flags)
}

/// [`clock_read`], with the TSC value the time was computed from.
fn clock_read_with_tsc(cpu: usize) -> (u64, u8, u64) {
    CLOCKS[cpu].read()
}

fn enable_clock(cpu: usize) {
    CLOCKS[cpu].enable();
}

/// Reads the clock `LOOPS` times, counting reads earlier than one any vCPU made before.
fn cycle(cpu: usize) {
    for _ in 0..LOOPS.load(SeqCst) {
        let last = LAST.load(SeqCst);
        let (now, flags) = clock_read(cpu);
        if flags & PVCLOCK_TSC_STABLE_BIT != 0 {
            STABLE_FLAG_SEEN.fetch_or(1 << cpu, SeqCst);
        }
        if now < last {
            WARPS.fetch_add(1, SeqCst);
            WORST_WARP.fetch_max(last - now, SeqCst);
        }
        LAST.fetch_max(now, SeqCst);
    }
}

fn ap_work(number: u32) {
    let cpu = number as usize;
    if cpu >= MAX_CPUS {
        return;
    }
    enable_clock(cpu);
    READY.fetch_add(1, SeqCst);
    while START.load(SeqCst) == 0 {
        core::hint::spin_loop();
    }
    cycle(cpu);
    DONE.fetch_add(1, SeqCst);
}

/// Waits `ms` milliseconds on PIT channel 2 (mode 0, polled through port 0x61).
fn pit_wait_ms(ms: u64) {
    let mut left = ms;
    while left > 0 {
        let chunk = left.min(50);
        let count = PIT_HZ * chunk / 1000;
        outb(0x61, (inb(0x61) & !0x03) | 0x01); // gate on, speaker off
        outb(0x43, 0xb0); // channel 2, low then high byte, mode 0
        outb(0x42, count as u8);
        outb(0x42, (count >> 8) as u8);
        while inb(0x61) & 0x20 == 0 {
            core::hint::spin_loop();
        }
        left -= chunk;
    }
}

fn main(boot: &BootInfo) -> ! {
    let cpus = param(boot.cmdline, "expect_cpus").and_then(parse_u64).unwrap_or(2) as usize;
    if let Some(loops) = param(boot.cmdline, "loops").and_then(parse_u64) {
        LOOPS.store(loops, SeqCst);
    }
    check!((1..=MAX_CPUS).contains(&cpus), "{} vCPUs (at most {})", cpus, MAX_CPUS);

    let signature = __cpuid(KVM_SIGNATURE_LEAF);
    let mut name = [0u8; 12];
    for (i, reg) in [signature.ebx, signature.ecx, signature.edx].iter().enumerate() {
        name[i * 4..i * 4 + 4].copy_from_slice(&reg.to_le_bytes());
    }
    println!("cpuid {:#x}: eax={:#x} {:?}", KVM_SIGNATURE_LEAF, signature.eax, core::str::from_utf8(&name));
    check!(&name == b"KVMKVMKVM\0\0\0", "KVM's signature in CPUID {:#x}", KVM_SIGNATURE_LEAF);
    check!(signature.eax >= KVM_FEATURES_LEAF, "the signature leaf names the features leaf");
    let features = __cpuid(KVM_FEATURES_LEAF).eax;
    println!("cpuid {:#x}: eax={:#x}", KVM_FEATURES_LEAF, features);
    check!(features & KVM_FEATURE_CLOCKSOURCE2 != 0, "KVM clock (new MSRs) announced");
    let stable = features & KVM_FEATURE_CLOCKSOURCE_STABLE_BIT != 0;
    println!("clocksource stable bit announced: {}", stable);

    enable_clock(0);
    wrmsr(MSR_KVM_WALL_CLOCK_NEW, WALL.addr());
    let (t0, flags) = clock_read(0);
    println!("kvmclock: {} ns since start, flags {:#x}", t0, flags);
    check!(t0 > 0, "the clock runs");

    if let Some(now) = param(boot.cmdline, "now").and_then(parse_u64) {
        let seconds = read_phys::<u32>(WALL.addr() + 4) as u64 + clock_read(0).0 / 1_000_000_000;
        println!("wall clock: {} s (host said {} s)", seconds, now);
        check!(seconds.abs_diff(now) <= 30, "the wall clock is the host's time, within 30 s");
    }

    // Each clock reading comes with the TSC it was computed from, so the TSC and the clock
    // measure the same window however the vCPU is scheduled.
    let (start, _, tsc_start) = clock_read_with_tsc(0);
    pit_wait_ms(500);
    let (end, _, tsc_end) = clock_read_with_tsc(0);
    let elapsed_us = end.saturating_sub(start) / 1000;
    println!("500 ms on the PIT took {} us on the KVM clock", elapsed_us);
    // Polling sees each 50 ms countdown end late when the vCPU is descheduled on a loaded host,
    // never early: the bound above is loose, the one below is not.
    check!((475_000..=750_000).contains(&elapsed_us), "the clock advances at the PIT's rate");
    // The TSC frequency the VMM announces (carve: KVM's, in leaf 0x40000010) is the rate of the
    // TSC this vCPU reads, measured over the same window on the KVM clock.
    if signature.eax >= TIMING_LEAF {
        let announced_khz = __cpuid(TIMING_LEAF).eax as u64;
        let measured_khz = (tsc_end - tsc_start) * 1000 / elapsed_us.max(1);
        println!("TSC: {} kHz announced, {} kHz measured", announced_khz, measured_khz);
        check!(
            measured_khz.abs_diff(announced_khz) * 50 <= announced_khz,
            "the announced TSC frequency is the TSC's rate (within 2%)"
        );
    }

    smp::set_ap_work(ap_work);
    if cpus > 1 {
        let started = smp::start_aps(cpus as u32 - 1);
        check!(started == cpus as u32 - 1, "{} application processors started", started);
        while READY.load(SeqCst) < started {
            core::hint::spin_loop();
        }
    }
    if let Some(ms) = param(boot.cmdline, "settle_ms").and_then(parse_u64) {
        pit_wait_ms(ms);
    }
    START.store(1, SeqCst);
    cycle(0);
    while DONE.load(SeqCst) < cpus as u32 - 1 {
        core::hint::spin_loop();
    }
    let stable_seen = STABLE_FLAG_SEEN.load(SeqCst);
    println!(
        "{} reads on {} vCPUs: {} went back (worst by {} ns); TSC-stable flag on vCPUs {:#b}",
        LOOPS.load(SeqCst) * cpus as u64,
        cpus,
        WARPS.load(SeqCst),
        WORST_WARP.load(SeqCst),
        stable_seen
    );
    // KVM promises raw reads that never go back across vCPUs only with its master clock, which
    // it flags in every vCPU's pvclock (PVCLOCK_TSC_STABLE_BIT); without it (a host whose
    // clocksource is not the TSC) guests keep the clock monotonic themselves, as Linux does.
    if stable_seen == (1 << cpus) - 1 {
        check!(WARPS.load(SeqCst) == 0, "the clock never went back across vCPUs (TSC-stable)");
    } else {
        check!(stable_seen == 0, "all vCPUs or none see the TSC-stable flag");
        println!("NOTE: no TSC-stable flag: the host has no master clock; raw reads may go back");
    }
    exit(0)
}
