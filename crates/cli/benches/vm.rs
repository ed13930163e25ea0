//! carve's VMM benchmarks, each side by side with its floor (and QEMU where it is a peer), in
//! one run: `cargo bench -p carve-cli --bench vm`. Results go to docs/benchmarks.md by hand.
//!
//! "carve" is the shipped static binary (`cargo dist`, built here if stale).
//!
//! 1. PIO exit round trip: the `pio_loop` guest under carve vs a minimal raw KVM_RUN loop.
//! 2. Process start to guest exit for a tiny PVH guest: carve vs a raw KVM process vs QEMU
//!    microvm.
//! 3. Peak RSS of a 128 MiB tiny guest: carve vs the raw process vs QEMU.

#[path = "common/mod.rs"]
mod common;

use carve_virtio::GuestRam;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use carve_guest_images::{path as guest, Format};
use common::{interleaved, median};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const PIO_EXITS: u64 = 100_000;
const RUNS: usize = 11;
/// Start-to-exit times are bimodal here (see `raw_boot`), so they get more runs.
const BOOT_RUNS: usize = 21;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("raw-boot") {
        raw_boot(Path::new(&args[2]), args.get(3).map(String::as_str) == Some("irqchip"));
        return;
    }
    if args.get(1).map(String::as_str) == Some("raw-guest") {
        let seconds = raw_guest_loop(Path::new(&args[2]), args[3].parse().unwrap(), args[4] == "irqchip");
        println!("{seconds}");
        return;
    }
    if args.get(1).map(String::as_str) == Some("rss") {
        println!("{}", peak_rss_kib(&args[2..]));
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm is not usable here");
        return;
    }
    let shipped = common::shipped_carve();
    let carve = shipped.to_str().unwrap();
    let carve_glibc = env!("CARGO_BIN_EXE_carve");
    let elf = guest("pio_loop", Format::Pvh);
    let qemu_elf = pvh_only_copy(&elf);
    let qemu = ensure_qemu();

    let me = std::env::current_exe().unwrap();

    println!("## PIO exit round trip ({PIO_EXITS} `out` to an ignored port, median of {RUNS} rounds)\n");
    let same_guest = |irqchip: &str| {
        let loop_time = |count: u64| -> f64 {
            let out = Command::new(&me)
                .args(["raw-guest", elf.to_str().unwrap(), &count.to_string(), irqchip])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        (loop_time(PIO_EXITS) - loop_time(0)).max(0.0) / PIO_EXITS as f64
    };
    let pio = interleaved(
        RUNS,
        &mut [
            &mut || raw_pio_loop(PIO_EXITS) / PIO_EXITS as f64,
            &mut || same_guest("none"),
            &mut || same_guest("irqchip"),
            &mut || {
                let n = time(|| run(carve, &carve_args(&elf, PIO_EXITS)));
                let zero = time(|| run(carve, &carve_args(&elf, 0)));
                (n - zero).max(0.0) / PIO_EXITS as f64
            },
        ],
    );
    pio.print_table(
        "µs per exit",
        1e6,
        &[
            "raw KVM_RUN loop, real-mode `out`/`dec`/`jnz` (floor)",
            "raw KVM_RUN loop, the same guest as carve's",
            "raw KVM_RUN loop, the same guest, irqchip + PIT as carve's",
            "carve",
        ],
    );
    println!("\ncarve against the raw loop running its own guest and VM shape: {:.2}×\n", pio.ratio(3, 2));

    println!("## Process start to guest exit, tiny PVH guest (128 MiB, median of {BOOT_RUNS} rounds)\n");
    let raw_boot_time = |shape: &str| {
        let args = ["raw-boot".to_string(), elf.display().to_string(), shape.to_string()];
        time(|| run(me.to_str().unwrap(), &args))
    };
    let boot = interleaved(
        BOOT_RUNS,
        &mut [
            &mut || raw_boot_time("bare"),
            &mut || raw_boot_time("irqchip"),
            &mut || time(|| run(carve, &carve_args(&elf, 0))),
            &mut || time(|| run(carve_glibc, &carve_args(&elf, 0))),
        ],
    );
    let floor = boot.median(0);
    boot.print_table(
        "ms",
        1e3,
        &[
            "raw KVM process (floor)",
            "raw KVM process with carve's irqchip and PIT",
            "carve",
            "carve, cargo's default build (dynamic glibc)",
        ],
    );
    if let Some(qemu) = &qemu {
        let qemu_boot = median(BOOT_RUNS, || time(|| run(qemu.to_str().unwrap(), &qemu_args(&qemu_elf))));
        println!("| QEMU 7.2 microvm | {:.2} | {:.2} |", qemu_boot * 1e3, qemu_boot / floor);
    }

    println!("\n## Peak RSS, tiny guest with 128 MiB\n");
    let rss = |command: Vec<String>| -> u64 {
        let mut args = vec!["rss".to_string()];
        args.extend(command);
        let out = Command::new(&me).args(&args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    };
    let floor_rss =
        rss(vec![me.display().to_string(), "raw-boot".into(), elf.display().to_string(), "bare".into()]);
    let mut carve_cmd = vec![carve.to_string()];
    carve_cmd.extend(carve_args(&elf, 0));
    let carve_rss = rss(carve_cmd);
    let mut carve_glibc_cmd = vec![carve_glibc.to_string()];
    carve_glibc_cmd.extend(carve_args(&elf, 0));
    let carve_glibc_rss = rss(carve_glibc_cmd);
    println!("| | peak RSS (KiB) |\n|---|---|");
    println!("| raw KVM process (floor) | {floor_rss} |");
    println!("| carve | {carve_rss} |");
    println!("| carve, cargo's default build (dynamic glibc) | {carve_glibc_rss} |");
    if let Some(qemu) = &qemu {
        let mut qemu_cmd = vec![qemu.display().to_string()];
        qemu_cmd.extend(qemu_args(&qemu_elf));
        println!("| QEMU 7.2 microvm | {} |", rss(qemu_cmd));
    }
}

fn carve_args(elf: &Path, count: u64) -> Vec<String> {
    ["vm", "run", "--serial", "none", "--memory", "128", "--kernel"]
        .iter()
        .map(|s| s.to_string())
        .chain([elf.display().to_string(), "--cmdline".into(), format!("count={count}")])
        .collect()
}

fn qemu_args(elf: &Path) -> Vec<String> {
    [
        "-M",
        "microvm",
        "-accel",
        "kvm",
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "none",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
        "-kernel",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([elf.display().to_string()])
    .collect()
}

/// QEMU tries multiboot before PVH and refuses multiboot ELF64s, so it gets a copy of the
/// guest whose multiboot magic is blanked (the PVH note is untouched).
fn pvh_only_copy(elf: &Path) -> PathBuf {
    let mut bytes = std::fs::read(elf).unwrap();
    let magic = 0x1bad_b002u32.to_le_bytes();
    if let Some(at) = bytes.windows(4).position(|w| w == magic) {
        bytes[at..at + 4].fill(0);
    }
    let copy = std::env::temp_dir().join("carve-bench-pio_loop-pvh-only.elf");
    std::fs::write(&copy, bytes).unwrap();
    copy
}

fn ensure_qemu() -> Option<PathBuf> {
    let path = PathBuf::from("/usr/bin/qemu-system-x86_64");
    if !path.exists() {
        eprintln!("installing qemu-system-x86 for the side-by-side numbers");
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq", "qemu-system-x86"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
    }
    path.exists().then_some(path).or_else(|| {
        eprintln!("QEMU unavailable: its rows are left out");
        None
    })
}

fn run(program: &str, args: &[String]) {
    let status =
        Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap();
    assert!(status.code().is_some_and(|c| c == 1 || c == 0), "{program} {args:?} exited with {status}");
}

fn time(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

/// The floor for an exit round trip: real mode, one memory slot, no irqchip, `out` in a loop.
/// Returns the seconds the loop took.
fn raw_pio_loop(count: u64) -> f64 {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    register(&vm, &mem);
    // mov ecx, count; l: out 0x80, al; dec ecx; jnz l; hlt
    let mut code = vec![0x66, 0xb9];
    code.extend_from_slice(&(count as u32).to_le_bytes());
    code.extend_from_slice(&[0xe6, 0x80, 0x66, 0x49, 0x75, 0xfa, 0xf4]);
    mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let regs = kvm_bindings::kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() };
    vcpu.set_regs(&regs).unwrap();
    let start = Instant::now();
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(..) => {}
            VcpuExit::Hlt => break,
            other => panic!("raw loop: unexpected exit {other:?}"),
        }
    }
    start.elapsed().as_secs_f64()
}

/// A raw floor that runs carve's own guest: the PVH ELF loaded with `count=N` on its command
/// line (setup through carve's boot code, outside the timing), optionally with the in-kernel
/// irqchip and PIT carve creates, then a bare KVM_RUN loop until the debug-exit port. Returns
/// the loop's seconds.
fn raw_guest_loop(elf: &Path, count: u64, irqchip: bool) -> f64 {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), 128 << 20)]).unwrap();
    register(&vm, &mem);
    if irqchip {
        vm.set_tss_address(0xfffb_d000).unwrap();
        vm.create_irq_chip().unwrap();
        let pit =
            kvm_bindings::kvm_pit_config { flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).unwrap();
    }
    let mut kernel = std::fs::File::open(elf).unwrap();
    let cmdline = format!("count={count}");
    let source = carve_vmm::boot::BootSource::<_, std::fs::File> {
        kernel: &mut kernel,
        kernel_name: "pio_loop",
        cmdline: &cmdline,
        initrd: None,
    };
    let setup = carve_vmm::boot::load(&mem, source).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap()).unwrap();
    carve_vmm::boot::cpu_state::apply(&vcpu, &mem, setup.entry).unwrap();
    let start = Instant::now();
    run_to_debug_exit(&mut vcpu);
    start.elapsed().as_secs_f64()
}

/// KVM_RUN until the guest writes the debug-exit port; other port and MMIO accesses are
/// ignored (reads return all ones), as carve does.
fn run_to_debug_exit(vcpu: &mut kvm_ioctls::VcpuFd) {
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(0xf4, _) => return,
            VcpuExit::IoIn(_, data) => data.fill(0xff),
            VcpuExit::IoOut(..) | VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => {}
            other => panic!("raw KVM_RUN loop: unexpected exit {other:?}"),
        }
    }
}

fn register(vm: &kvm_ioctls::VmFd, mem: &GuestRam) {
    for (slot, region) in mem.iter().enumerate() {
        use vm_memory::GuestMemoryRegion;
        let host = mem.get_host_address(region.start_addr()).unwrap();
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `mem` outlives the VM in every caller.
        unsafe { vm.set_user_memory_region(region) }.unwrap();
    }
}

/// The floor for start-to-exit: one process, one vCPU, the ELF's segments, flat 32-bit entry,
/// KVM_RUN until the debug-exit port. No devices, no boot information, and no irqchip unless
/// `irqchip` asks for the in-kernel irqchip and PIT every carve VM has: on this host's kernel
/// (6.18) those make VM creation or teardown wait for a normal, tick-paced SRCU grace period
/// (PIT notifiers, I/O-bus callbacks), 4–12 ms whenever it falls, which no VMM can avoid.
fn raw_boot(elf: &Path, irqchip: bool) {
    use linux_loader::loader::{elf::Elf, KernelLoader};
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), 128 << 20)]).unwrap();
    register(&vm, &mem);
    if irqchip {
        vm.create_irq_chip().unwrap();
        let pit =
            kvm_bindings::kvm_pit_config { flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).unwrap();
    }
    let mut file = std::fs::File::open(elf).unwrap();
    let loaded = Elf::load(&mem, None, &mut file, None).unwrap();
    let linux_loader::loader::elf::PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        panic!("not a PVH ELF")
    };
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap()).unwrap();
    let entry_state = carve_vmm::boot::EntryState::Protected32 { eip: entry.0, eax: 0, ebx: 0 };
    carve_vmm::boot::cpu_state::apply(&vcpu, &mem, entry_state).unwrap();
    run_to_debug_exit(&mut vcpu);
    std::process::exit(1);
}

/// Runs a command and reports its peak resident set size (KiB), from getrusage.
fn peak_rss_kib(command: &[String]) -> i64 {
    let _ =
        Command::new(&command[0]).args(&command[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) };
    // SAFETY: zero-initialised and filled by getrusage above.
    unsafe { usage.assume_init() }.ru_maxrss
}
