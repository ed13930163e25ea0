//! The local APIC's TSC-deadline mode. KVM emulates it wherever KVM_CAP_TSC_DEADLINE_TIMER is
//! present, but kernels such as Debian's 6.1 leave CPUID.1:ECX[24] out of
//! KVM_GET_SUPPORTED_CPUID for the VMM to set (QEMU and Firecracker do; so does carve). Checks
//! the bit, that a deadline fires once and not before its TSC value (the MSR then reads 0), that
//! a deadline already past fires at once, and that writing 0 disarms a pending one.
#![no_std]
#![no_main]

use core::arch::x86_64::__cpuid;

use carve_guests::interrupts::{self, count, FIRST_VECTOR};
use carve_guests::io::{rdmsr, rdtsc, write_phys, wrmsr};
use carve_guests::{check, exit, guest_main, println, BootInfo};

guest_main!(main);

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const LAPIC_TIMER_LVT: u64 = 0xfee0_0320;
const LVT_TSC_DEADLINE_MODE: u32 = 2 << 17;
const TIMING_LEAF: u32 = 0x4000_0010;

/// Waits until the timer vector has fired more than `seen` times or the TSC passes `until`;
/// returns the count and the TSC when it was seen.
fn wait_until(seen: u32, until: u64) -> (u32, u64) {
    loop {
        // The count before the TSC: a TSC read after the interrupt was seen is after its delivery.
        let fired = count(0);
        let now = rdtsc();
        if fired > seen || now > until {
            return (fired, now);
        }
        core::hint::spin_loop();
    }
}

fn main(_boot: &BootInfo) -> ! {
    check!(__cpuid(1).ecx & ECX_TSC_DEADLINE != 0, "CPUID.1:ECX[24] announces the TSC-deadline timer");
    let hypervisor_top = __cpuid(0x4000_0000).eax;
    let khz = if hypervisor_top >= TIMING_LEAF { __cpuid(TIMING_LEAF).eax as u64 } else { 0 };
    let khz = if khz == 0 { 1_000_000 } else { khz };
    let delay = khz * 20; // 20 ms of TSC ticks
    let patience = khz * 5_000; // 5 s: emulated hosts are slow

    interrupts::enable();
    write_phys::<u32>(LAPIC_TIMER_LVT, LVT_TSC_DEADLINE_MODE | FIRST_VECTOR as u32);

    let deadline = rdtsc() + delay;
    wrmsr(MSR_IA32_TSC_DEADLINE, deadline);
    let (fired, seen_at) = wait_until(0, deadline + patience);
    check!(fired == 1, "a deadline 20 ms ahead fires");
    check!(seen_at >= deadline, "not before its TSC value ({} ticks early)", deadline.saturating_sub(seen_at));
    check!(rdmsr(MSR_IA32_TSC_DEADLINE) == 0, "the deadline MSR reads 0 once it fired");

    wrmsr(MSR_IA32_TSC_DEADLINE, 1);
    let (fired, _) = wait_until(1, rdtsc() + patience);
    check!(fired == 2, "a deadline already past fires at once");

    // Far enough ahead that a descheduled vCPU cannot reach it between the two writes.
    let deadline = rdtsc() + patience;
    wrmsr(MSR_IA32_TSC_DEADLINE, deadline);
    wrmsr(MSR_IA32_TSC_DEADLINE, 0);
    let (fired, _) = wait_until(2, deadline + 3 * delay);
    check!(fired == 2, "writing 0 disarms a pending deadline");
    println!("TSC-deadline timer: {} kHz TSC, 3 deadlines checked", khz);
    exit(0)
}
