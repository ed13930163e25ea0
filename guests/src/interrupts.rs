//! Just enough interrupt handling to count deliveries: an IDT whose vectors 0x50–0x57 each bump
//! a counter and signal EOI to the local APIC (xAPIC at its default address).

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, Ordering};

use crate::io::write_phys;

/// The first vector with a counting handler; there are `COUNTED` of them.
pub const FIRST_VECTOR: u8 = 0x50;
pub const COUNTED: usize = 8;
const LAPIC: u64 = 0xfee0_0000;
const LAPIC_SVR: u64 = LAPIC + 0xf0;

global_asm!(
    r#"
    .section .text
    .code64
    .macro counting_stub n
    .global vector_stub_\n
vector_stub_\n:
    push %rax
    lock incl irq_counts+4*\n(%rip)
    mov $0xfee000b0, %eax
    movl $0, (%rax)
    pop %rax
    iretq
    .endm
    counting_stub 0
    counting_stub 1
    counting_stub 2
    counting_stub 3
    counting_stub 4
    counting_stub 5
    counting_stub 6
    counting_stub 7

    .section .bss
    .p2align 12
    .global guest_idt
guest_idt:
    .fill 4096, 1, 0
    .global irq_counts
irq_counts:
    .fill 4 * 8, 1, 0
    "#,
    options(att_syntax)
);

extern "C" {
    static guest_idt: [u8; 4096];
    static irq_counts: [AtomicU32; COUNTED];
    fn vector_stub_0();
    fn vector_stub_1();
    fn vector_stub_2();
    fn vector_stub_3();
    fn vector_stub_4();
    fn vector_stub_5();
    fn vector_stub_6();
    fn vector_stub_7();
}

fn counts() -> &'static [AtomicU32; COUNTED] {
    // SAFETY: irq_counts is a 32-byte, 4-aligned .bss array only ever accessed atomically.
    unsafe { &*core::ptr::addr_of!(irq_counts) }
}

/// Deliveries of `FIRST_VECTOR + index` so far.
pub fn count(index: usize) -> u32 {
    counts()[index].load(Ordering::SeqCst)
}

/// Points IDT entry `vector` at `handler`: a 64-bit interrupt gate in code segment 0x08, DPL 0.
pub fn set_gate(vector: u8, handler: u64) {
    let gate = core::ptr::addr_of!(guest_idt) as u64 + 16 * vector as u64;
    write_phys::<u16>(gate, handler as u16);
    write_phys::<u16>(gate + 2, 0x08);
    write_phys::<u16>(gate + 4, 0x8e00);
    write_phys::<u16>(gate + 6, (handler >> 16) as u16);
    write_phys::<u32>(gate + 8, (handler >> 32) as u32);
    write_phys::<u32>(gate + 12, 0);
}

/// Makes the IDT the CPU's (interrupts stay as they are).
pub fn load_idt() {
    let idt = core::ptr::addr_of!(guest_idt) as u64;
    let pointer: [u16; 5] = [4095, idt as u16, (idt >> 16) as u16, (idt >> 32) as u16, (idt >> 48) as u16];
    // SAFETY: lidt reads the 10-byte pointer; the table's unset entries are not present, so a
    // vector without a gate faults rather than jumping anywhere.
    unsafe { asm!("lidt [{}]", in(reg) pointer.as_ptr(), options(nostack)) };
}

/// Loads the IDT with the counting vectors, software-enables the local APIC and turns
/// interrupts on.
pub fn enable() {
    install();
    // SAFETY: only the counted vectors are routed to this vCPU by the tests that call this.
    unsafe { asm!("sti", options(nostack)) };
}

/// Loads the IDT with the counting vectors and software-enables the local APIC (whose LVT
/// entries can only be unmasked from then on); interrupts stay off.
fn install() {
    let stubs: [unsafe extern "C" fn(); COUNTED] = [
        vector_stub_0,
        vector_stub_1,
        vector_stub_2,
        vector_stub_3,
        vector_stub_4,
        vector_stub_5,
        vector_stub_6,
        vector_stub_7,
    ];
    for (i, stub) in stubs.iter().enumerate() {
        set_gate(FIRST_VECTOR + i as u8, *stub as usize as u64);
    }
    load_idt();
    write_phys::<u32>(LAPIC_SVR, 0x1ff);
}

/// Waits (a bounded spin) until `index`'s count exceeds `seen`; returns the new count.
pub fn wait_for(index: usize, seen: u32, spins: u32) -> u32 {
    for _ in 0..spins {
        let now = count(index);
        if now > seen {
            return now;
        }
        core::hint::spin_loop();
    }
    count(index)
}

const LAPIC_TIMER_LVT: u64 = LAPIC + 0x320;
const LAPIC_TIMER_INITIAL: u64 = LAPIC + 0x380;
const LAPIC_TIMER_DIVIDE: u64 = LAPIC + 0x3e0;
const LAPIC_LVT0: u64 = LAPIC + 0x350;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
/// KVM's local APIC timer counts at 1 GHz with a divider of 1.
const TIMER_COUNTS_PER_US: u32 = 1000;

const IOAPIC: u64 = 0xfec0_0000;

/// Sends IOAPIC `pin` (edge-triggered, active high, as carve's irqfd lines are) to `vector` on
/// the boot vCPU.
pub fn route_pin(pin: u32, vector: u8) {
    let select = |register: u32, value: u32| {
        write_phys::<u32>(IOAPIC, register);
        write_phys::<u32>(IOAPIC + 0x10, value);
    };
    select(0x11 + 2 * pin, 0);
    select(0x10 + 2 * pin, vector as u32);
}

/// Lets the vCPU sleep between polls: the counting vectors gated, the PIC's line masked (its
/// vectors have no gates), and the local APIC timer ticking every `period_us` on
/// `FIRST_VECTOR`, as a backstop for wake-ups. Interrupts stay off except inside [`idle`].
pub fn start_ticks(period_us: u32) {
    install();
    write_phys::<u32>(LAPIC_LVT0, LVT_MASKED);
    write_phys::<u32>(LAPIC_TIMER_DIVIDE, 0b1011);
    write_phys::<u32>(LAPIC_TIMER_LVT, LVT_PERIODIC | FIRST_VECTOR as u32);
    write_phys::<u32>(LAPIC_TIMER_INITIAL, period_us.saturating_mul(TIMER_COUNTS_PER_US));
}

/// Halts until the next interrupt (a tick from [`start_ticks`] at the latest). An interrupt
/// that arrived since the caller last looked is pending, so it ends the halt at once: `sti`
/// holds interrupts off for one more instruction, the `hlt`.
pub fn idle() {
    // SAFETY: every vector that can arrive is gated; interrupts are off again afterwards.
    unsafe { asm!("sti", "hlt", "cli", options(nostack)) };
}
