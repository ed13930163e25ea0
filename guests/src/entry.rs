//! Boot entry points for all three protocols carve speaks, plus the application-processor
//! trampoline. Everything lands in `rust_entry(boot_magic, info_ptr)` in 64-bit mode on our own
//! identity-mapped page tables (4 GiB in 2 MiB pages) and our own GDT.
//!
//! - multiboot v1 and PVH enter `_start32` in 32-bit protected mode without paging; EAX holds
//!   the multiboot magic (PVH leaves it undefined, its info block starts with its own magic).
//! - the Linux 64-bit boot protocol enters at load address + 0x200 in long mode, RSI = zero page.

use core::arch::global_asm;

/// Tells `rust_entry` that the 64-bit Linux boot protocol was used.
pub const LINUX64_MAGIC: u32 = 0x4c36_3442; // "B46L"
/// Physical page the AP trampoline is copied to (SIPI vector = address >> 12).
pub const AP_TRAMPOLINE: u64 = 0x8000;

global_asm!(
    r#"
    .section .multiboot, "a"
    .p2align 2
multiboot_header:
    .long 0x1BADB002
    .long 0x00000003
    .long -(0x1BADB002 + 0x00000003)

    .section .boot32, "ax"
    .code32
    .global _start32
_start32:
    cli
    mov %eax, %edi
    mov %ebx, %esi
    mov $boot_stack_top, %esp
    call enable_long_mode32
    ljmp $0x08, $long_mode_common

    // Shared by the BSP and APs: PAE + our CR3, EFER.LME, then paging on.
enable_long_mode32:
    lgdt gdt_pointer
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    ret

    .section .boot64, "ax"
    .code64
    .global _start64_linux
_start64_linux:
    cli
    mov $boot_stack_top, %rsp
    lgdt gdt_pointer
    mov $pml4, %rax
    mov %rax, %cr3
    mov ${linux_magic}, %edi
    pushq $0x08
    pushq $long_mode_common
    lretq

    .section .boot.text, "ax"
    .code64
long_mode_common:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %ax, %ax
    mov %ax, %fs
    mov %ax, %gs
    mov $boot_stack_top, %rsp
    mov %edi, %edi
    mov %esi, %esi
    call rust_entry
1:  hlt
    jmp 1b

ap_long_mode:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $1, %eax
    lock xadd %eax, ap_next_stack
    inc %eax
    shl $12, %rax
    lea ap_stacks(%rip), %rsp
    add %rax, %rsp
    call rust_ap_entry
2:  cli
    hlt
    jmp 2b

    // Copied to AP_TRAMPOLINE by the BSP; position-dependent on that address only.
    .section .rodata.ap_trampoline, "a"
    .global ap_trampoline_start
    .global ap_trampoline_end
    .code16
ap_trampoline_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl (ap_gdtr - ap_trampoline_start + {trampoline})
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x18, $(ap_pm32 - ap_trampoline_start + {trampoline})
    .code32
ap_pm32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $(ap_tmp_stack - ap_trampoline_start + {trampoline}), %esp
    mov $enable_long_mode32, %eax      // absolute: this code runs from its copy
    call *%eax
    ljmp $0x08, $ap_long_mode
    .p2align 3
ap_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
    .fill 64, 1, 0
ap_tmp_stack:
ap_trampoline_end:

    .section .rodata.gdt, "a"
    .p2align 3
gdt:
    .quad 0                      // null
    .quad 0x00af9a000000ffff     // 0x08: 64-bit code
    .quad 0x00cf92000000ffff     // 0x10: flat data
    .quad 0x00cf9a000000ffff     // 0x18: 32-bit code (AP trampoline)
gdt_end:
gdt_pointer:
    .word gdt_end - gdt - 1
    .quad gdt

    // Identity map of the low 4 GiB with 2 MiB pages, resolved at link time.
    .section .data.pagetables, "aw"
    .p2align 12
pml4:
    .quad pdpt + 0x3
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x3
    .quad pd + 0x1003
    .quad pd + 0x2003
    .quad pd + 0x3003
    .fill 508, 8, 0
pd:
    .set page, 0
    .rept 2048
    .quad (page << 21) | 0x83
    .set page, page + 1
    .endr

    .section .bss.stacks, "aw", @nobits
    .p2align 12
boot_stack:
    .fill 65536, 1, 0
boot_stack_top:
    .global ap_stacks
ap_stacks:
    .fill 4096 * {max_aps}, 1, 0
    .p2align 2
ap_next_stack:
    .long 0
"#,
    linux_magic = const LINUX64_MAGIC,
    trampoline = const AP_TRAMPOLINE,
    max_aps = const crate::smp::MAX_APS,
    options(att_syntax)
);

#[cfg(feature = "pvh")]
global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .p2align 2
    .long 4        // name size
    .long 8        // descriptor size
    .long 18       // XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .p2align 2
    .quad _start32
"#,
    options(att_syntax)
);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
}

/// The AP trampoline's bytes, to be copied to [`AP_TRAMPOLINE`].
pub fn ap_trampoline() -> &'static [u8] {
    // SAFETY: both symbols delimit one contiguous read-only section emitted above.
    unsafe {
        let start = &raw const ap_trampoline_start;
        let end = &raw const ap_trampoline_end;
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

#[no_mangle]
extern "C" fn rust_entry(magic: u32, info: u64) -> ! {
    let boot = crate::boot_info::BootInfo::parse(magic, info);
    extern "Rust" {
        fn guest_main(boot: &crate::boot_info::BootInfo) -> !;
    }
    // SAFETY: every guest binary defines `guest_main` through the `guest_main!` macro.
    unsafe { guest_main(&boot) }
}

#[no_mangle]
extern "C" fn rust_ap_entry() -> ! {
    let number = crate::smp::ap_started();
    if let Some(work) = crate::smp::ap_work() {
        work(number);
    }
    loop {
        // SAFETY: parking an AP with interrupts off is the end of its life here.
        unsafe { core::arch::asm!("cli; hlt") };
    }
}
