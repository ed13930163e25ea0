//! Proves that `int3` in long mode reaches the guest's #BP handler with the return address just
//! past the instruction, as the hardware delivers it, even where the host's instruction
//! emulator cannot execute INT3 (carve then delivers it). Linux runs `int3` in its
//! alternatives self-test and for every text patch.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};

use carve_guests::interrupts::{load_idt, set_gate};
use carve_guests::{check, exit, guest_main, BootInfo};

guest_main!(main);

global_asm!(
    r#"
    .section .text
    .code64
    .global breakpoint_handler
breakpoint_handler:
    push %rax
    mov 8(%rsp), %rax
    mov %rax, bp_return(%rip)
    mov 24(%rsp), %rax
    mov %rax, bp_rflags(%rip)
    pushfq
    pop %rax
    mov %rax, bp_handler_rflags(%rip)
    lock incl bp_count(%rip)
    pop %rax
    iretq

    .global breakpoint_site
breakpoint_site:
    int3
    ret

    .section .bss
    .p2align 3
    .global bp_return
bp_return: .quad 0
    .global bp_rflags
bp_rflags: .quad 0
    .global bp_handler_rflags
bp_handler_rflags: .quad 0
    .global bp_count
bp_count: .long 0
    "#,
    options(att_syntax)
);

extern "C" {
    fn breakpoint_handler();
    fn breakpoint_site();
    static bp_return: u64;
    static bp_rflags: u64;
    static bp_handler_rflags: u64;
    static bp_count: u32;
}

fn read<T: Copy>(value: &T) -> T {
    // SAFETY: the statics are plain .bss words written only by the handler on this vCPU.
    unsafe { core::ptr::read_volatile(value) }
}

fn main(_boot: &BootInfo) -> ! {
    set_gate(3, breakpoint_handler as usize as u64);
    load_idt();
    let site = breakpoint_site as usize as u64;
    for round in 1..=3u32 {
        let rflags: u64;
        // SAFETY: breakpoint_site executes int3 (handled above, which returns past it) and ret.
        unsafe { asm!("pushfq", "pop {f}", "call {site}", f = out(reg) rflags, site = in(reg) site) };
        // SAFETY: see `read`.
        let (count, ret, saved, inside) =
            unsafe { (read(&bp_count), read(&bp_return), read(&bp_rflags), read(&bp_handler_rflags)) };
        check!(count == round, "int3 #{} reached the #BP handler (count {})", round, count);
        check!(ret == site + 1, "the return address is just past int3 ({:#x}, site {:#x})", ret, site);
        check!(saved & 0x2 != 0 && (saved & 0x200) == (rflags & 0x200), "RFLAGS were saved ({:#x})", saved);
        check!(inside & 0x200 == 0, "the interrupt gate cleared IF in the handler ({:#x})", inside);
    }
    exit(0)
}
