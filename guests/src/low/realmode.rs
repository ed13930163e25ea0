//! Real mode, as kvm-unit-tests' `realmode.flat` exercises it: a multiboot kernel loaded low
//! (at 16 KiB, below carve's own boot structures) that drops from the 32-bit multiboot entry
//! back to 16-bit real mode and checks instructions there: segment arithmetic, 16- and 32-bit
//! operands, far calls, software interrupts through the IVT, string ops, `loop`, `cpuid`,
//! 32-bit addressing. A pattern at 0x6000 proves the loader wrote nothing over the image.
//! `no-int` on the command line skips the INT check (see `_start`).
//!
//! Each check puts its number in BL first; a failure prints `realmode: FAIL` and exits through
//! the debug-exit port with that number (status `(n << 1) | 1`); success exits with 0.
#![no_std]
#![no_main]

core::arch::global_asm!(
    r#"
    .section .multiboot, "a"
    .p2align 2
    .long 0x1BADB002, 0, -0x1BADB002

    .section .text.start, "ax"
    .code32
    .global _start
_start:
    cli
    mov %ebx, %esi
    mov $1, %bl
    cmp $0x2BADB002, %eax
    jne fail32
    // "no-int" on the command line skips check 7: the nested build hosts' instruction emulator
    // hangs on a real-mode INT, under QEMU as under carve.
    testl $4, (%esi)
    jz 3f
    mov 16(%esi), %esi
1:  cmpb $0, (%esi)
    je 3f
    cmpl $0x692d6f6e, (%esi)
    jne 2f
    cmpw $0x746e, 4(%esi)
    jne 2f
    movb $1, skip_int
    jmp 3f
2:  inc %esi
    jmp 1b
3:  lgdt gdtr
    ljmp $0x08, $pm16

fail32:
    mov %bl, %al
    out %al, $0xf4
1:  hlt
    jmp 1b

    .code16
pm16:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov %cr0, %eax
    and $0xfffffffe, %eax
    mov %eax, %cr0
    ljmp $0, $real

real:
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $stack_top, %sp
    lidt ivt_descriptor
    mov $hello, %si
    call puts

    // 2: the pattern at 0x6000 is intact.
    mov $2, %bl
    mov $pattern, %si
    xor %cx, %cx
    mov $3, %dl
2:  lodsb
    cmp %dl, %al
    jne fail
    add $7, %dl
    inc %cx
    cmp $1024, %cx
    jne 2b

    // 3: 16-bit arithmetic sets carry and zero.
    mov $3, %bl
    mov $0xffff, %ax
    add $1, %ax
    jnc fail
    jnz fail

    // 4: 32-bit operands in real mode.
    mov $4, %bl
    mov $0x12345678, %eax
    rol $8, %eax
    cmp $0x34567812, %eax
    jne fail

    // 5: segment arithmetic: 0x0600:0 is physical 0x6000.
    mov $5, %bl
    mov $0x0600, %ax
    mov %ax, %es
    cmpb $3, %es:0
    jne fail
    cmpb $10, %es:1
    jne fail
    xor %ax, %ax
    mov %ax, %es

    // 6: a far call into another segment and back.
    mov $6, %bl
    xor %dx, %dx
    lcall $0x0400, $(far_target - 0x4000)
    cmp $0x1234, %dx
    jne fail
    mov %cs, %ax
    test %ax, %ax
    jnz fail

    // 7: a software interrupt through the real-mode IVT.
    mov $7, %bl
    cmpb $0, skip_int
    jne 7f
    movw $int_handler, 0x200
    movw $0, 0x202
    xor %cx, %cx
    int $0x80
    cmp $0xbeef, %cx
    jne fail
7:

    // 8: string moves and compares.
    mov $8, %bl
    mov $message, %si
    mov $buffer, %di
    mov $16, %cx
    cld
    rep movsb
    mov $message, %si
    mov $buffer, %di
    mov $16, %cx
    repe cmpsb
    jne fail

    // 9: loop counts CX down.
    mov $9, %bl
    mov $10, %cx
    xor %ax, %ax
3:  add $3, %ax
    loop 3b
    cmp $30, %ax
    jne fail
    test %cx, %cx
    jnz fail

    // 10: cpuid answers in real mode.
    mov $10, %bl
    xor %eax, %eax
    cpuid
    test %eax, %eax
    jz fail
    test %ebx, %ebx
    jz fail

    // 11: the stack and flags survive a push/pop round.
    mov $11, %bl
    mov %sp, %bp
    pushw $0x5a5a
    pushf
    stc
    popf
    jc fail
    pop %ax
    cmp $0x5a5a, %ax
    jne fail
    cmp %sp, %bp
    jne fail

    // 12: 32-bit addressing within the 64 KiB limit.
    mov $12, %bl
    mov $pattern, %esi
    movb (%esi), %al
    cmp $3, %al
    jne fail
    movb 2(%esi), %al
    cmp $17, %al
    jne fail

    mov $passed, %si
    call puts
    xor %al, %al
    out %al, $0xf4
4:  hlt
    jmp 4b

fail:
    mov $failed, %si
    call puts
    mov %bl, %al
    out %al, $0xf4
5:  hlt
    jmp 5b

puts:
    lodsb
    test %al, %al
    jz 6f
    mov $0x3f8, %dx
    out %al, (%dx)
    jmp puts
6:  ret

far_target:
    mov %cs, %ax
    cmp $0x0400, %ax
    jne fail_far
    mov $0x1234, %dx
    lret
fail_far:
    ljmp $0, $fail

int_handler:
    mov $0xbeef, %cx
    iret

    .section .rodata.realmode, "a"
    .p2align 3
gdt:
    .quad 0
    .quad 0x00009a000000ffff    // 0x08: 16-bit code, base 0, 64 KiB
    .quad 0x000092000000ffff    // 0x10: 16-bit data
gdtr:
    .word 23
    .long gdt
ivt_descriptor:
    .word 0x3ff
    .long 0
hello:
    .asciz "realmode: in real mode\n"
passed:
    .asciz "realmode: all checks passed\n"
failed:
    .asciz "realmode: FAIL\n"
message:
    .ascii "carve real mode!"

    .section .data.pattern, "aw"
pattern:
    .set i, 0
    .rept 1024
    .byte (i * 7 + 3) & 0xff
    .set i, i + 1
    .endr

    .section .bss.realmode, "aw", @nobits
skip_int:
    .byte 0
buffer:
    .fill 16, 1, 0
    .p2align 4
    .fill 1024, 1, 0
stack_top:
"#,
    options(att_syntax)
);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
