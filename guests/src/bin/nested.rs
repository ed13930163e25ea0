//! Nested virtualisation (AMD SVM) from inside: the guest becomes a hypervisor of its own and
//! keeps a tiny nested guest (L2) running, so that a snapshot taken mid-run catches the vCPU in
//! guest mode (or with GIF clear) and a restore must bring KVM's nested state back.
//!
//! 1. Without SVM (CPUID 0x8000_0001 ECX bit 2) it prints `nested: no SVM` and exits with
//!    [`NO_SVM`] (process status 121), which tests tell apart from a pass or a failure.
//! 2. Otherwise it sets EFER.SVME and VM_HSAVE_PA, builds a VMCB (AMD APM vol. 2, §15 and
//!    appendix B) that intercepts VMRUN, VMMCALL, shutdown and a few exceptions, with ASID 1 and
//!    a 64-bit L2 sharing this guest's page tables, GDT and segments, and runs VMRUN. L2 spins
//!    `l2_spin` times, increments a counter in memory and executes VMMCALL; the guest checks the
//!    exit code (0x81), that RIP stopped at the VMMCALL (and NRIP points past it where NRIPS is
//!    offered), that the counter went up by exactly one, then moves L2's RIP past the 3-byte
//!    VMMCALL and runs it again.
//! 3. It keeps doing that, printing `tick N l2_runs=M clock_ms=T` once `period_ms` of KVM-clock
//!    time passed since the last tick, each tick requiring that L2 ran since the last one. After
//!    `ticks` ticks it exits with success.
//!
//! L1's global interrupt flag stays clear from the first VMRUN to the end (VMRUN sets it for
//! L2, #VMEXIT clears it), as a hypervisor has it between `clgi` and `stgi`: KVM's nested state
//! is then never the fresh one, so every snapshot of this guest carries it, in L1 or in L2.
//!
//! Parameters: `ticks=N` (20), `period_ms=P` (100), `l2_spin=S` (200000: L2 then holds the vCPU
//! most of the time on the emulated KVM host, about 2 ms a run there; some 0.1 ms on hardware).
#![no_std]
#![no_main]

use core::arch::{asm, global_asm, x86_64::__cpuid};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};

use carve_guests::io::{rdmsr, read_phys, write_phys, wrmsr};
use carve_guests::pvclock::{Area, PVCLOCK_TSC_STABLE_BIT};
use carve_guests::{check, exit, guest_main, param, parse_u64, println, require, BootInfo};

guest_main!(main);

/// The exit code that says this vCPU offers no SVM (process status `NO_SVM << 1 | 1` = 121).
pub const NO_SVM: u8 = 0x3c;

const MSR_EFER: u32 = 0xc000_0080;
const MSR_VM_CR: u32 = 0xc001_0114;
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
const MSR_PAT: u32 = 0x277;
const EFER_SVME: u64 = 1 << 12;
const VM_CR_SVMDIS: u64 = 1 << 4;

// VMCB control area (APM vol. 2, table B-1; Linux's struct vmcb_control_area).
const INTERCEPT_EXCEPTIONS: u64 = 0x008;
const INTERCEPT_MISC1: u64 = 0x00c;
const INTERCEPT_MISC2: u64 = 0x010;
const GUEST_ASID: u64 = 0x058;
const EXITCODE: u64 = 0x070;
const EXITINFO1: u64 = 0x078;
const EXITINFO2: u64 = 0x080;
const EXITINTINFO: u64 = 0x088;
const NEXT_RIP: u64 = 0x0c8;
// VMCB state save area (table B-2), at 0x400.
const SAVE: u64 = 0x400;
const ES: u64 = SAVE;
const CS: u64 = SAVE + 0x10;
const SS: u64 = SAVE + 0x20;
const DS: u64 = SAVE + 0x30;
const GDTR: u64 = SAVE + 0x60;
const IDTR: u64 = SAVE + 0x80;
const CPL: u64 = SAVE + 0xcb;
const EFER: u64 = SAVE + 0xd0;
const CR4: u64 = SAVE + 0x148;
const CR3: u64 = SAVE + 0x150;
const CR0: u64 = SAVE + 0x158;
const DR7: u64 = SAVE + 0x160;
const DR6: u64 = SAVE + 0x168;
const RFLAGS: u64 = SAVE + 0x170;
const RIP: u64 = SAVE + 0x178;
const RSP: u64 = SAVE + 0x1d8;
const RAX: u64 = SAVE + 0x1f8;
const G_PAT: u64 = SAVE + 0x268;

/// Intercept word 3: SHUTDOWN is bit 31. Word 4 (0x010): VMRUN is bit 0 (required, or VMRUN
/// fails with VMEXIT_INVALID), VMMCALL bit 1.
const INTERCEPT_SHUTDOWN: u32 = 1 << 31;
const INTERCEPT_VMRUN: u32 = 1 << 0;
const INTERCEPT_VMMCALL: u32 = 1 << 1;
/// #UD, #DF, #GP, #PF: an L2 that faults says where rather than shutting down.
const INTERCEPTED_EXCEPTIONS: u32 = 1 << 6 | 1 << 8 | 1 << 13 | 1 << 14;

const VMEXIT_EXCEPTION_BASE: u64 = 0x40;
const VMEXIT_VMMCALL: u64 = 0x81;
const VMEXIT_SHUTDOWN: u64 = 0x7f;
const VMEXIT_INVALID: u64 = u64::MAX;
const VMMCALL_LEN: u64 = 3;

/// A 4 KiB-aligned page of guest memory (identity mapped, so its address is physical).
#[repr(C, align(4096))]
struct Page(UnsafeCell<[u8; 4096]>);
// SAFETY: only the BSP touches these pages, and the CPU while it runs VMRUN/#VMEXIT on them.
unsafe impl Sync for Page {}

impl Page {
    const fn new() -> Page {
        Page(UnsafeCell::new([0; 4096]))
    }

    fn addr(&self) -> u64 {
        self.0.get() as u64
    }
}

static VMCB: Page = Page::new();
static HSAVE: Page = Page::new();
/// L2's stack (it uses none today, but an RSP of its own keeps it from L1's).
static L2_STACK: [Page; 2] = [Page::new(), Page::new()];
static CLOCK: Area = Area::new();

/// How many times L2 went through its routine; only L2 writes it.
static L2_RUNS: AtomicU64 = AtomicU64::new(0);
/// The iterations L2 spins before VMMCALL, so that L2 holds the vCPU for most of the time.
static L2_SPIN: AtomicU64 = AtomicU64::new(0);

// L2: spin, count the run, VMMCALL to L1; resumed past the VMMCALL, it starts over.
global_asm!(
    ".section .text.nested_l2, \"ax\"",
    ".global nested_l2_entry",
    "nested_l2_entry:",
    "    mov rcx, qword ptr [rip + {spin}]",
    ".Lnested_l2_spin:",
    "    test rcx, rcx",
    "    jz .Lnested_l2_count",
    "    dec rcx",
    "    jmp .Lnested_l2_spin",
    ".Lnested_l2_count:",
    "    lock inc qword ptr [rip + {runs}]",
    ".global nested_l2_vmmcall",
    "nested_l2_vmmcall:",
    "    vmmcall",
    "    jmp nested_l2_entry",
    spin = sym L2_SPIN,
    runs = sym L2_RUNS,
);

extern "C" {
    fn nested_l2_entry();
    fn nested_l2_vmmcall();
}

/// Where L2 starts, and its VMMCALL.
fn l2_entry() -> u64 {
    nested_l2_entry as *const () as u64
}

fn l2_vmmcall() -> u64 {
    nested_l2_vmmcall as *const () as u64
}

fn vmcb_read<T: Copy>(offset: u64) -> T {
    read_phys(VMCB.addr() + offset)
}

fn vmcb_write<T: Copy>(offset: u64, value: T) {
    write_phys(VMCB.addr() + offset, value)
}

/// A segment in the VMCB's form: selector, attributes (descriptor bits 40-47 and 52-55 packed
/// into 12 bits), limit, base.
fn vmcb_segment(offset: u64, selector: u16, attrib: u16, limit: u32, base: u64) {
    vmcb_write(offset, selector);
    vmcb_write(offset + 2, attrib);
    vmcb_write(offset + 4, limit);
    vmcb_write(offset + 8, base);
}

/// The 12-bit VMCB attributes of the GDT descriptor `selector` names.
fn attributes(gdt_base: u64, selector: u16) -> u16 {
    let descriptor: u64 = read_phys(gdt_base + (selector as u64 & !7));
    ((descriptor >> 40) & 0xff) as u16 | (((descriptor >> 52) & 0xf) as u16) << 8
}

fn read_cr(n: u8) -> u64 {
    let value: u64;
    // SAFETY: reading a control register has no side effects at CPL 0.
    unsafe {
        match n {
            0 => asm!("mov {}, cr0", out(reg) value, options(nomem, nostack)),
            3 => asm!("mov {}, cr3", out(reg) value, options(nomem, nostack)),
            _ => asm!("mov {}, cr4", out(reg) value, options(nomem, nostack)),
        }
    }
    value
}

/// (limit, base) of the GDT (`sgdt`) or IDT (`sidt`).
fn descriptor_table(idt: bool) -> (u16, u64) {
    let mut pointer = [0u8; 10];
    // SAFETY: SGDT/SIDT store 10 bytes at the pointer, which `pointer` holds.
    unsafe {
        if idt {
            asm!("sidt [{}]", in(reg) pointer.as_mut_ptr(), options(nostack));
        } else {
            asm!("sgdt [{}]", in(reg) pointer.as_mut_ptr(), options(nostack));
        }
    }
    (u16::from_le_bytes([pointer[0], pointer[1]]), u64::from_le_bytes(pointer[2..].try_into().unwrap()))
}

fn selector(name: &str) -> u16 {
    let value: u16;
    // SAFETY: reading a segment register has no side effects.
    unsafe {
        match name {
            "cs" => asm!("mov {:x}, cs", out(reg) value, options(nomem, nostack)),
            "ss" => asm!("mov {:x}, ss", out(reg) value, options(nomem, nostack)),
            "ds" => asm!("mov {:x}, ds", out(reg) value, options(nomem, nostack)),
            _ => asm!("mov {:x}, es", out(reg) value, options(nomem, nostack)),
        }
    }
    value
}

/// Runs L2 until its next #VMEXIT. L1's global interrupt flag is clear before and after.
fn vmrun() {
    // SAFETY: RAX holds the VMCB's physical address. VMRUN saves L1's RSP, RAX, RIP, control
    // registers, EFER and segments in the host save area and #VMEXIT brings them back; every
    // other general-purpose register holds what L2 left, so all are clobbered (RBX and RBP,
    // which cannot be named, are pushed). L2 writes only L2_RUNS.
    unsafe {
        asm!(
            "push rbx",
            "push rbp",
            "clgi",
            "vmrun rax",
            "pop rbp",
            "pop rbx",
            inout("rax") VMCB.addr() => _,
            out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            out("r12") _, out("r13") _, out("r14") _, out("r15") _,
        );
    }
}

fn cpuid(leaf: u32) -> [u32; 4] {
    let r = __cpuid(leaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Fails with everything the VMCB says about an exit that was not L2's VMMCALL.
fn unexpected_exit(run: u64) -> ! {
    let code: u64 = vmcb_read(EXITCODE);
    let what = match code {
        VMEXIT_INVALID => "VMEXIT_INVALID: VMRUN refused the VMCB's controls or guest state",
        VMEXIT_SHUTDOWN => "shutdown (L2 triple-faulted)",
        c if (VMEXIT_EXCEPTION_BASE..VMEXIT_EXCEPTION_BASE + 32).contains(&c) => "an exception in L2",
        _ => "unexpected",
    };
    println!(
        "FAIL: VMRUN {} exited with code {:#x} ({}): exitinfo1={:#x} exitinfo2={:#x} exitintinfo={:#x} rip={:#x}",
        run,
        code,
        what,
        vmcb_read::<u64>(EXITINFO1),
        vmcb_read::<u64>(EXITINFO2),
        vmcb_read::<u64>(EXITINTINFO),
        vmcb_read::<u64>(RIP)
    );
    exit(1)
}

fn main(boot: &BootInfo) -> ! {
    let number = |key, default| param(boot.cmdline, key).and_then(parse_u64).unwrap_or(default);
    let ticks = number("ticks", 20);
    let period_ns = number("period_ms", 100) * 1_000_000;
    L2_SPIN.store(number("l2_spin", 200_000), SeqCst);

    let max_extended = cpuid(0x8000_0000)[0];
    let svm = max_extended >= 0x8000_0001 && cpuid(0x8000_0001)[2] & (1 << 2) != 0;
    if !svm {
        println!("nested: no SVM (CPUID 0x80000001 ECX bit 2 is clear)");
        exit(NO_SVM);
    }
    let [revision, asids, _, features] =
        if max_extended >= 0x8000_000a { cpuid(0x8000_000a) } else { [0; 4] };
    let nrips = features & (1 << 3) != 0;
    println!(
        "nested: SVM revision {} with {} ASIDs, features {:#x} (NRIPS {})",
        revision & 0xff,
        asids,
        features,
        if nrips { "yes" } else { "no" }
    );
    check!(asids >= 2, "ASID 1 exists ({} ASIDs)", asids);
    check!(rdmsr(MSR_VM_CR) & VM_CR_SVMDIS == 0, "VM_CR.SVMDIS is clear");

    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SVME);
    check!(rdmsr(MSR_EFER) & EFER_SVME != 0, "EFER.SVME set");
    wrmsr(MSR_VM_HSAVE_PA, HSAVE.addr());
    check!(rdmsr(MSR_VM_HSAVE_PA) == HSAVE.addr(), "VM_HSAVE_PA holds {:#x}", HSAVE.addr());

    // Controls: intercepts (VMRUN must be among them), ASID 1; no nested paging, no I/O or MSR
    // intercepts, so the permission maps are never read.
    vmcb_write(INTERCEPT_EXCEPTIONS, INTERCEPTED_EXCEPTIONS);
    vmcb_write(INTERCEPT_MISC1, INTERCEPT_SHUTDOWN);
    vmcb_write(INTERCEPT_MISC2, INTERCEPT_VMRUN | INTERCEPT_VMMCALL);
    vmcb_write(GUEST_ASID, 1u32);
    // Guest state: this guest's own long mode, page tables and flat segments.
    let (gdt_limit, gdt_base) = descriptor_table(false);
    let (idt_limit, idt_base) = descriptor_table(true);
    for (offset, name) in [(CS, "cs"), (SS, "ss"), (DS, "ds"), (ES, "es")] {
        let sel = selector(name);
        vmcb_segment(offset, sel, attributes(gdt_base, sel), u32::MAX, 0);
    }
    vmcb_segment(GDTR, 0, 0, gdt_limit as u32, gdt_base);
    vmcb_segment(IDTR, 0, 0, idt_limit as u32, idt_base);
    vmcb_write(CPL, 0u8);
    vmcb_write(EFER, rdmsr(MSR_EFER));
    vmcb_write(CR0, read_cr(0));
    vmcb_write(CR3, read_cr(3));
    vmcb_write(CR4, read_cr(4));
    vmcb_write(DR6, 0xffff_0ff0u64);
    vmcb_write(DR7, 0x400u64);
    vmcb_write(RFLAGS, 2u64);
    vmcb_write(RIP, l2_entry());
    vmcb_write(RSP, L2_STACK[1].addr() + 4096);
    vmcb_write(RAX, 0u64);
    vmcb_write(G_PAT, rdmsr(MSR_PAT));
    println!(
        "nested: VMCB at {:#x}, host save area at {:#x}, L2 at {:#x}, cs attributes {:#x}",
        VMCB.addr(),
        HSAVE.addr(),
        l2_entry(),
        vmcb_read::<u16>(CS + 2)
    );

    // One run of L2, checked: VMMCALL at the expected place, exactly one more round counted.
    let mut runs = 0u64;
    let mut run_l2 = || {
        vmrun();
        runs += 1;
        if vmcb_read::<u64>(EXITCODE) != VMEXIT_VMMCALL {
            unexpected_exit(runs);
        }
        let rip: u64 = vmcb_read(RIP);
        require!(rip == l2_vmmcall(), "L2 exited at {:#x}, not at its VMMCALL", rip);
        if nrips {
            let next: u64 = vmcb_read(NEXT_RIP);
            require!(next == rip + VMMCALL_LEN, "NRIP is {:#x} after a VMMCALL at {:#x}", next, rip);
        }
        let counted = L2_RUNS.load(SeqCst);
        require!(counted == runs, "L2 counted {} runs after {} VMRUNs", counted, runs);
        vmcb_write(RIP, rip + VMMCALL_LEN);
        runs
    };
    run_l2();
    check!(true, "VMRUN entered L2, which counted its run and exited with VMMCALL");
    run_l2();
    check!(true, "L2 resumed past its VMMCALL and exited again");

    CLOCK.enable();
    let (start, flags, _) = CLOCK.read();
    let (mut last_clock, mut last_tick) = (start, start);
    let (mut steps_back, mut worst_step_back) = (0u64, 0u64);
    let mut last_runs = L2_RUNS.load(SeqCst);
    println!(
        "nested: started, L2 spins {} times a run; KVM clock {}TSC-stable",
        L2_SPIN.load(SeqCst),
        if flags & PVCLOCK_TSC_STABLE_BIT != 0 { "" } else { "not " }
    );
    for tick in 1..=ticks {
        // A period after the last tick (not after the start): a pause or a snapshot delays the
        // ticks that follow rather than letting them all out at once.
        let deadline = last_tick + period_ns;
        loop {
            run_l2();
            let (now, flags, _) = CLOCK.read();
            if now < last_clock {
                // Without a master clock (a host whose clocksource is not the TSC, such as the
                // emulated KVM host's HPET) KVM's per-vCPU updates may step a reading back;
                // Linux keeps its clock monotonic over them, and so does this guest.
                require!(
                    flags & PVCLOCK_TSC_STABLE_BIT == 0,
                    "the TSC-stable KVM clock went back from {} to {} ns",
                    last_clock,
                    now
                );
                steps_back += 1;
                worst_step_back = worst_step_back.max(last_clock - now);
                continue;
            }
            last_clock = now;
            if now >= deadline {
                break;
            }
        }
        let l2_runs = L2_RUNS.load(SeqCst);
        require!(l2_runs > last_runs, "L2 did not run since the last tick");
        last_runs = l2_runs;
        println!("tick {} l2_runs={} clock_ms={}", tick, l2_runs, last_clock / 1_000_000);
        last_tick = last_clock;
    }
    // SAFETY: STGI sets the global interrupt flag again; interrupts stay off (IF clear).
    unsafe { asm!("stgi", options(nomem, nostack)) };
    if steps_back > 0 {
        println!(
            "nested: the KVM clock stepped back {} times, at most by {} ns",
            steps_back, worst_step_back
        );
    }
    println!("nested: {} ticks, L2 ran {} times, all checks passed", ticks, L2_RUNS.load(SeqCst));
    exit(0)
}
