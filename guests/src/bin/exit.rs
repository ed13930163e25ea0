//! Ends the VM the way `mode=` asks, to prove carve's exit-status convention:
//! `code:N` (debug-exit), `reset` (i8042), `triple` (triple fault), `exec-mmio` (an instruction
//! fetch KVM cannot emulate), `hang` (spins until killed), `halt` (halts with interrupts
//! disabled: nothing can run again), `halt-sti` (halts waiting for interrupts).
#![no_std]
#![no_main]

use carve_guests::{exit, guest_main, param, parse_u64, println, reset, BootInfo};

guest_main!(main);

fn main(boot: &BootInfo) -> ! {
    let mode = param(boot.cmdline, "mode").unwrap_or("code:0");
    println!("exit mode: {}", mode);
    if let Some(code) = mode.strip_prefix("code:") {
        exit(parse_u64(code).unwrap_or(0xff) as u8)
    }
    match mode {
        "reset" => reset(),
        "triple" => {
            let empty_idt = [0u16; 5];
            // SAFETY: deliberately faults with no IDT, which triple-faults the vCPU.
            unsafe {
                core::arch::asm!(
                    "lidt [{0}]",
                    "mov rax, [{1}]",
                    in(reg) &empty_idt,
                    in(reg) 0x8000_0000_0000_0000u64,
                    out("rax") _,
                )
            };
            exit(0x7e)
        }
        "exec-mmio" => {
            // SAFETY: jumps into unbacked physical space; KVM fails to fetch the instruction.
            unsafe { core::arch::asm!("jmp {0}", in(reg) 0xd000_0000u64, options(noreturn)) }
        }
        "hang" => loop {
            core::hint::spin_loop();
        },
        "halt" => carve_guests::halt_forever(),
        "halt-sti" => loop {
            // SAFETY: halting with interrupts enabled waits for the next one (the PIT's).
            unsafe { core::arch::asm!("sti; hlt") };
        },
        _ => exit(0x7d),
    }
}
