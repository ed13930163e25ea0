//! A guest that proves a pause, a snapshot or a restore left it intact: it fills a memory
//! pattern, then `period_ms` of KVM-clock time after each tick prints the next, having checked that the KVM
//! clock and the TSC never went back, that the pattern still reads as written, and that every
//! application processor kept running. After `ticks` ticks it exits with success.
//!
//! Each tick line carries the gap since the previous tick, so a test sees whether time spent
//! paused or on disk was visible to the guest.
//!
//! Parameters: `ticks=N` (30), `period_ms=P` (100), `pattern_kib=K` (1024, from 16 MiB),
//! `expect_cpus=C` (1), `seed=S` (the pattern's), `rewrite_at=T` (none: at tick T, write the
//! pattern again with another seed and check that one from then on; the KSM test has one of
//! two identical guests do so, breaking pages the host had merged), `churn_kib=K` (0: every
//! tick, rewrite the next K KiB of the pattern, page by page, each page with its own new
//! generation, so memory keeps changing at K KiB per period while every page stays checkable: a
//! migration that lost one write shows as a page that reads an old generation).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering::SeqCst};

use carve_guests::io::{rdtsc, read_phys, write_phys};
use carve_guests::pvclock::{Area, PVCLOCK_TSC_STABLE_BIT};
use carve_guests::{check, exit, require, guest_main, param, parse_u64, println, smp, BootInfo};

guest_main!(main);

const MAX_CPUS: usize = 4;
const PATTERN_BASE: u64 = 16 << 20;
/// The pattern is checked at every cache line: enough to see a page that was lost.
const STRIDE: u64 = 64;

static CLOCKS: [Area; MAX_CPUS] = [const { Area::new() }; MAX_CPUS];
/// Per AP: how many times it went round its loop, and how often its TSC went back.
static AP_ROUNDS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static AP_TSC_BACK: AtomicU64 = AtomicU64::new(0);
const PAGE: u64 = 4096;
/// Pattern pages churn can track (64 MiB of pattern).
const MAX_PAGES: usize = 16384;
/// Each pattern page's generation: its seed is the pattern's xor this.
static GENERATIONS: [AtomicU64; MAX_PAGES] = [const { AtomicU64::new(0) }; MAX_PAGES];

fn page_seed(addr: u64, seed: u64) -> u64 {
    let page = ((addr - PATTERN_BASE) / PAGE) as usize;
    seed ^ GENERATIONS[page].load(SeqCst)
}

fn pattern(addr: u64, seed: u64) -> u64 {
    (addr ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn write_pattern(range: core::ops::Range<u64>, seed: u64) {
    for addr in range.step_by(STRIDE as usize) {
        write_phys(addr, pattern(addr, page_seed(addr, seed)));
    }
}

fn ap_work(number: u32) {
    let cpu = number as usize;
    if cpu >= MAX_CPUS {
        return;
    }
    CLOCKS[cpu].enable();
    let mut last = rdtsc();
    loop {
        let tsc = rdtsc();
        if tsc < last {
            AP_TSC_BACK.fetch_add(1, SeqCst);
        }
        last = tsc;
        AP_ROUNDS[cpu].fetch_add(1, SeqCst);
        core::hint::spin_loop();
    }
}

fn main(boot: &BootInfo) -> ! {
    let number = |key, default| param(boot.cmdline, key).and_then(parse_u64).unwrap_or(default);
    let ticks = number("ticks", 30);
    let period_ns = number("period_ms", 100) * 1_000_000;
    let pattern_end = PATTERN_BASE + number("pattern_kib", 1024) * 1024;
    let cpus = number("expect_cpus", 1) as usize;
    let mut seed = number("seed", 0x5eed_c0de);
    let rewrite_at = number("rewrite_at", 0);
    let churn_pages = number("churn_kib", 0) * 1024 / PAGE;
    let pattern_pages = (pattern_end - PATTERN_BASE) / PAGE;
    check!((1..=MAX_CPUS).contains(&cpus), "{} vCPUs (at most {})", cpus, MAX_CPUS);
    check!(pattern_pages as usize <= MAX_PAGES, "a pattern of {} pages (at most {})", pattern_pages, MAX_PAGES);
    let mut churn_cursor = 0;

    write_pattern(PATTERN_BASE..pattern_end, seed);
    smp::set_ap_work(ap_work);
    if cpus > 1 {
        let started = smp::start_aps(cpus as u32 - 1);
        check!(started == cpus as u32 - 1, "{} application processors started", started);
    }
    CLOCKS[0].enable();
    let (start, _, mut last_tsc) = CLOCKS[0].read();
    let (mut last_clock, mut last_tick) = (start, start);
    let mut rounds = [0u64; MAX_CPUS];
    println!("persist: started, {} vCPUs, pattern {:#x}..{:#x}", cpus, PATTERN_BASE, pattern_end);
    for tick in 1..=ticks {
        // Each tick a period after the last, so a long pause is one long gap, not a burst.
        let deadline = last_tick + period_ns;
        loop {
            let (now, flags, tsc) = CLOCKS[0].read();
            // KVM promises raw reads that never go back only with its master clock (the
            // TSC-stable flag); without it guests keep the clock monotonic themselves, as Linux.
            let stable = flags & PVCLOCK_TSC_STABLE_BIT != 0;
            require!(!stable || now >= last_clock, "the KVM clock went back from {} to {} ns", last_clock, now);
            let now = now.max(last_clock);
            require!(tsc >= last_tsc, "the TSC went back from {} to {}", last_tsc, tsc);
            (last_clock, last_tsc) = (now, tsc);
            if now >= deadline {
                break;
            }
            core::hint::spin_loop();
        }
        for _ in 0..churn_pages.min(pattern_pages) {
            let page = PATTERN_BASE + churn_cursor * PAGE;
            GENERATIONS[churn_cursor as usize].fetch_add(1, SeqCst);
            write_pattern(page..page + PAGE, seed);
            churn_cursor = (churn_cursor + 1) % pattern_pages;
        }
        if tick == rewrite_at {
            seed = !seed;
            write_pattern(PATTERN_BASE..pattern_end, seed);
            println!("persist: tick {} rewrote the pattern with seed {:#x}", tick, seed);
        }
        for addr in (PATTERN_BASE..pattern_end).step_by(STRIDE as usize) {
            let found = read_phys::<u64>(addr);
            let written = pattern(addr, page_seed(addr, seed));
            require!(found == written, "memory at {:#x} reads {:#x}, was written {:#x}", addr, found, written);
        }
        for (cpu, seen) in rounds.iter_mut().enumerate().take(cpus).skip(1) {
            let now = AP_ROUNDS[cpu].load(SeqCst);
            require!(now > *seen, "vCPU {} ran no round since the last tick", cpu);
            *seen = now;
        }
        require!(AP_TSC_BACK.load(SeqCst) == 0, "an application processor's TSC went back");
        println!(
            "tick {} clock_ms={} gap_ms={} tsc={}",
            tick,
            last_clock / 1_000_000,
            (last_clock - last_tick) / 1_000_000,
            last_tsc
        );
        last_tick = last_clock;
    }
    println!("persist: {} ticks, all checks passed", ticks);
    exit(0)
}
