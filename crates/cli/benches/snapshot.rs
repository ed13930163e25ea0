//! Pause, snapshot and restore, each side by side with its floor, in one run: `cargo bench -p
//! carve-cli --bench snapshot`. Results go to docs/benchmarks.md by hand.
//!
//! "carve" is the shipped static binary (`cargo dist`, built here if stale); the in-process rows
//! call the same library (`carve_vmm`) it is built from.
//!
//! 1. Snapshot of a running `persist` guest that has written a 64 MiB pattern, with 128 MiB and
//!    with 1 GiB of RAM: `carve vm snapshot` end to end, and the control request from this
//!    process (its round trip and the `took_us` the VM reports: pause, save, resume); the files'
//!    apparent sizes and the disk blocks they use (`memory` is sparse). Floor: writing as many
//!    bytes as the guest touched to a new file and syncing it.
//! 2. Restore to the first guest instruction, against a cold boot of the same guest. The guest
//!    is built here (a PVH ELF of a few instructions): it loops on `out 0x80` (an ignored port)
//!    until a flag byte in its memory is set, then writes the flag to the serial port and exits
//!    through the debug-exit port. It is snapshotted while it loops, the flag is then set in the
//!    snapshot's `memory` file, so the restored guest's next loop iteration (at most six
//!    instructions) writes the serial byte and exits; the cold-booted copy has the flag set in
//!    its image, so it does the same from its first instruction (four instructions). The first
//!    serial byte reaches a writer in this process from the vCPU thread: "to first guest
//!    instruction" is from before `VmSnapshot::read` (or `Vm::build`) to that byte, through
//!    `Vm::restore` and `Vm::run` (vCPU thread spawned, KVM_RUN, the guest's instructions, the
//!    port exit). The same snapshots and guest run as processes: `carve vm restore` against
//!    `carve vm run`, to the process's exit. Also: `VmSnapshot::read` + `Vm::restore` alone of
//!    the 64 MiB-touched `persist` snapshots of part 1, and restores with the snapshot's files
//!    evicted from the page cache first (POSIX_FADV_DONTNEED on those files alone).
//! 3. Pause and resume of a running `persist` guest with 1 and 2 vCPUs: the client's round trip
//!    and the VM's `took_us`; `describe` (which touches no vCPU) is the control socket's floor.

#[path = "common/mod.rs"]
mod common;

use std::cell::RefCell;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use carve_guest_images::{path as guest, Format};
use carve_vmm::control::{self, ControlReply, ControlRequest};
use carve_vmm::kvm_state::TimePolicy;
use carve_vmm::snapshot::{RestoreConfig, VmSnapshot};
use carve_vmm::{KernelSpec, SerialSink, Vm, VmConfig};
use common::interleaved;

/// What the `persist` guests of part 1 write before they are snapshotted.
const PATTERN_KIB: u64 = 64 << 10;
const SNAPSHOT_ROUNDS: usize = 5;
const RESTORE_ROUNDS: usize = 21;
const PAUSE_ROUNDS: usize = 21;
const SIZES_MIB: [u64; 2] = [128, 1024];

/// Where the built guest sits (PVH: loaded at its physical address, entered in flat 32-bit
/// mode) and the flag byte it polls.
const GUEST_BASE: u64 = 0x10_0000;
const FLAG: u64 = GUEST_BASE + 0x100;
/// The flag's value, which is also the byte the guest writes to the serial port.
const FLAG_SET: u8 = b'\n';

fn main() {
    // `cargo bench --bench snapshot -- restore` runs that part alone (names: snapshot, restore,
    // pause); cargo passes `--bench` itself.
    let parts: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let part = |name: &str| parts.is_empty() || parts.iter().any(|p| p == name);
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        eprintln!("SKIPPED: /dev/kvm is not usable here");
        return;
    }
    let shipped = common::shipped_carve();
    let carve = shipped.to_str().unwrap();
    let work = std::env::temp_dir().join(format!("carve-bench-snapshot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let _cleanup = RemoveOnDrop(work.clone());

    let kept = if part("snapshot") { snapshots(carve, &work) } else { Vec::new() };
    if part("restore") {
        restores(carve, &work, &kept);
    }
    if part("pause") {
        pause_resume(carve, &work);
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Snapshot time and size

/// One snapshot's files: apparent sizes and bytes of disk blocks used.
#[derive(Clone, Copy, Default)]
struct Sizes {
    memory_len: u64,
    memory_disk: u64,
    state_len: u64,
    state_disk: u64,
}

fn sizes(dir: &Path) -> Sizes {
    let memory = std::fs::metadata(dir.join("memory")).unwrap();
    let state = std::fs::metadata(dir.join("state")).unwrap();
    Sizes {
        memory_len: memory.len(),
        memory_disk: memory.blocks() * 512,
        state_len: state.len(),
        state_disk: state.blocks() * 512,
    }
}

/// One snapshot sample beyond its time: the `took_us` the VM reported (seconds), its sizes.
type Sample = (Option<f64>, Sizes);

/// Runs part 1 and returns one `persist` snapshot per size, kept for part 2.
fn snapshots(carve: &str, work: &Path) -> Vec<PathBuf> {
    println!(
        "## Snapshot of a running guest that wrote a {} MiB pattern (median of {SNAPSHOT_ROUNDS} rounds)\n",
        PATTERN_KIB >> 10
    );
    let cmdline = format!("ticks=1000000 period_ms=3600000 pattern_kib={PATTERN_KIB} expect_cpus=1");
    let vms: Vec<RunningVm> = SIZES_MIB
        .iter()
        .map(|&mib| RunningVm::start(carve, work, &format!("persist-{mib}"), mib, 1, &cmdline))
        .collect();
    for vm in &vms {
        vm.wait_for_serial("persist: started", Duration::from_secs(300));
        vm.request(ControlRequest::Pause);
    }

    let counter = RefCell::new(0u32);
    let fresh_dir = |what: &str| {
        *counter.borrow_mut() += 1;
        work.join(format!("snap-{what}-{}", counter.borrow()))
    };
    let extra: Vec<RefCell<Vec<Sample>>> = (0..4).map(|_| RefCell::default()).collect();
    let floor_file = work.join("floor");
    let floor_bytes = vec![0x5au8; (PATTERN_KIB << 10) as usize];
    let cli = |i: usize| {
        let vm = &vms[i];
        let dir = fresh_dir("cli");
        vm.resume_untimed();
        let took = time(|| {
            run(
                carve,
                &["vm", "snapshot", "--control", vm.control.to_str().unwrap(), "--to", dir.to_str().unwrap()],
                0,
            )
        });
        vm.request(ControlRequest::Pause);
        extra[i].borrow_mut().push((None, sizes(&dir)));
        std::fs::remove_dir_all(&dir).unwrap();
        took
    };
    let library = |i: usize| {
        let vm = &vms[i];
        let dir = fresh_dir("lib");
        vm.resume_untimed();
        let start = Instant::now();
        let reply = vm.request(ControlRequest::Snapshot { to: dir.clone() });
        let took = start.elapsed().as_secs_f64();
        vm.request(ControlRequest::Pause);
        extra[2 + i].borrow_mut().push((reply.took_us.map(|us| us as f64 / 1e6), sizes(&dir)));
        std::fs::remove_dir_all(&dir).unwrap();
        took
    };
    let floor = || {
        let _ = std::fs::remove_file(&floor_file);
        let took = time(|| {
            let mut file = std::fs::File::create_new(&floor_file).unwrap();
            file.write_all(&floor_bytes).unwrap();
            file.sync_all().unwrap();
        });
        std::fs::remove_file(&floor_file).unwrap();
        took
    };
    let rounds = interleaved(
        SNAPSHOT_ROUNDS,
        &mut [&mut || floor(), &mut || cli(0), &mut || cli(1), &mut || library(0), &mut || library(1)],
    );

    // One snapshot per size for part 2 (the VMs are paused: this is the save alone).
    let kept: Vec<PathBuf> = vms
        .iter()
        .map(|vm| {
            let dir = work.join(format!("keep-{}", vm.name));
            vm.request(ControlRequest::Snapshot { to: dir.clone() });
            dir
        })
        .collect();
    drop(vms);

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("| | ms | × floor | VM's took_us (ms) | `memory` apparent / on disk (MiB) | `state` apparent / on disk (KiB) |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| floor: write {} MiB to a new file and fsync it | {:.1} | 1.00 | | | |",
        PATTERN_KIB >> 10,
        rounds.median(0) * 1e3
    );
    let labels = [
        "`carve vm snapshot`, 128 MiB guest (process, end to end)",
        "`carve vm snapshot`, 1 GiB guest (process, end to end)",
        "snapshot request from this process, 128 MiB guest (round trip)",
        "snapshot request from this process, 1 GiB guest (round trip)",
    ];
    for (i, label) in labels.iter().enumerate() {
        let samples = extra[i].borrow();
        let took: Vec<f64> = samples.iter().filter_map(|(t, _)| *t).collect();
        let took = if took.is_empty() { String::new() } else { format!("{:.1}", middle(took) * 1e3) };
        let s = samples.last().map(|(_, s)| *s).unwrap_or_default();
        println!(
            "| {label} | {:.1} | {:.2} | {took} | {:.0} / {:.1} | {:.1} / {:.1} |",
            rounds.median(i + 1) * 1e3,
            rounds.ratio(i + 1, 0),
            mib(s.memory_len),
            mib(s.memory_disk),
            s.state_len as f64 / 1024.0,
            s.state_disk as f64 / 1024.0,
        );
    }
    println!();
    kept
}

// ---------------------------------------------------------------------------------------------
// 2. Restore to first guest instruction

/// Times of one in-process start, in seconds from its beginning.
#[derive(Clone, Copy)]
struct Stamps {
    /// `Vm::build` or `Vm::restore` returned.
    ready: f64,
    /// The guest's serial byte reached the writer.
    first: f64,
    /// `Vm::run` returned (the VM torn down).
    end: f64,
}

/// Records when the guest's first serial byte arrives (on the vCPU thread).
#[derive(Clone, Default)]
struct FirstByte(Arc<OnceLock<Instant>>);

impl Write for FirstByte {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.set(Instant::now());
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn cold_boot_in_process(elf: &Path, mib: u64) -> Stamps {
    let first = FirstByte::default();
    let start = Instant::now();
    let config = VmConfig {
        memory_mib: mib,
        serial: SerialSink::Writer(Box::new(first.clone())),
        ..VmConfig::new(KernelSpec::Path(elf.to_path_buf()))
    };
    let vm = Vm::build(config, Vec::new()).unwrap();
    let ready = start.elapsed().as_secs_f64();
    let outcome = vm.run().unwrap();
    let end = start.elapsed().as_secs_f64();
    assert_eq!(outcome.exit.status(), 1, "the cold-booted guest ended with {}", outcome.exit);
    Stamps { ready, first: since(start, &first), end }
}

fn restore_in_process(dir: &Path, evict: bool) -> Stamps {
    if evict {
        evict_from_page_cache(dir);
    }
    let first = FirstByte::default();
    let start = Instant::now();
    let snapshot = VmSnapshot::read(dir).unwrap();
    let config = RestoreConfig {
        serial: SerialSink::Writer(Box::new(first.clone())),
        serial_input: false,
        vsock: None,
        nsm_ca: None,
        time: TimePolicy::Frozen,
    };
    let vm = Vm::restore(dir, &snapshot, config).unwrap();
    let ready = start.elapsed().as_secs_f64();
    let outcome = vm.run().unwrap();
    let end = start.elapsed().as_secs_f64();
    assert_eq!(outcome.exit.status(), 1, "the restored guest ended with {}", outcome.exit);
    Stamps { ready, first: since(start, &first), end }
}

/// `VmSnapshot::read` + `Vm::restore` alone (the VM is dropped unrun, outside the timing).
fn restore_only(dir: &Path) -> f64 {
    let start = Instant::now();
    let snapshot = VmSnapshot::read(dir).unwrap();
    let config = RestoreConfig {
        serial: SerialSink::None,
        serial_input: false,
        vsock: None,
        nsm_ca: None,
        time: TimePolicy::Frozen,
    };
    let vm = Vm::restore(dir, &snapshot, config).unwrap();
    let took = start.elapsed().as_secs_f64();
    drop(vm);
    took
}

fn since(start: Instant, first: &FirstByte) -> f64 {
    first.0.get().expect("the guest wrote its serial byte").duration_since(start).as_secs_f64()
}

/// Drops the snapshot's files from the page cache, so the restore reads them from disk.
fn evict_from_page_cache(dir: &Path) {
    use std::os::fd::AsRawFd;
    for name in ["state", "memory"] {
        let file = std::fs::File::open(dir.join(name)).unwrap();
        // SAFETY: an advisory call on a descriptor this function owns.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0, "posix_fadvise failed");
    }
}

fn restores(carve: &str, work: &Path, persist_snapshots: &[PathBuf]) {
    println!("## Restore to first guest instruction (median of {RESTORE_ROUNDS} rounds)\n");
    let spin = work.join("flag-spin.elf");
    let exit = work.join("flag-exit.elf");
    std::fs::write(&spin, flag_guest(0)).unwrap();
    std::fs::write(&exit, flag_guest(FLAG_SET)).unwrap();

    // The spinning guest, snapshotted in its loop at each size, its flag then set on disk.
    let snapshots: Vec<PathBuf> = SIZES_MIB
        .iter()
        .map(|&mib| {
            let name = format!("flag-{mib}");
            let vm = RunningVm::start_kernel(carve, work, &name, mib, 1, &spin, "");
            vm.wait_for_control();
            std::thread::sleep(Duration::from_millis(100));
            let dir = work.join(format!("snap-{name}"));
            vm.request(ControlRequest::Snapshot { to: dir.clone() });
            drop(vm);
            let memory = std::fs::OpenOptions::new().write(true).open(dir.join("memory")).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&memory, &[FLAG_SET], FLAG).unwrap();
            memory.sync_all().unwrap();
            dir
        })
        .collect();
    // Each must end at once with the guest's status (debug-exit 0 → 1).
    for dir in &snapshots {
        run(carve, &["vm", "restore", "--from", dir.to_str().unwrap(), "--serial", "none"], 1);
    }

    let stamps: Vec<RefCell<Vec<Stamps>>> = (0..6).map(|_| RefCell::default()).collect();
    let record = |i: usize, s: Stamps| {
        stamps[i].borrow_mut().push(s);
        s.first
    };
    let (s128, s1g) = (snapshots[0].as_path(), snapshots[1].as_path());
    let exit_path = exit.to_str().unwrap();
    let process_run = |mib: u64| {
        time(|| {
            run(
                carve,
                &["vm", "run", "--kernel", exit_path, "--memory", &mib.to_string(), "--serial", "none"],
                1,
            )
        })
    };
    let process_restore = |dir: &Path| {
        time(|| run(carve, &["vm", "restore", "--from", dir.to_str().unwrap(), "--serial", "none"], 1))
    };
    let rounds = interleaved(
        RESTORE_ROUNDS,
        &mut [
            &mut || record(0, cold_boot_in_process(&exit, 128)),
            &mut || record(1, restore_in_process(s128, false)),
            &mut || record(2, cold_boot_in_process(&exit, 1024)),
            &mut || record(3, restore_in_process(s1g, false)),
            &mut || record(4, restore_in_process(s128, true)),
            &mut || record(5, restore_in_process(s1g, true)),
            &mut || process_run(128),
            &mut || process_restore(s128),
            &mut || process_run(1024),
            &mut || process_restore(s1g),
            &mut || persist_snapshots.first().map_or(0.0, |dir| restore_only(dir)),
            &mut || persist_snapshots.get(1).map_or(0.0, |dir| restore_only(dir)),
        ],
    );

    println!("In process (`carve_vmm`), from the start of `Vm::build` / `VmSnapshot::read`:\n");
    println!("| | to first guest instruction (ms) | × cold boot | `Vm::build` / `Vm::restore` returned (ms) | `Vm::run` returned (ms) |");
    println!("|---|---|---|---|---|");
    let labels = [
        "cold boot, 128 MiB",
        "restore, 128 MiB",
        "cold boot, 1 GiB",
        "restore, 1 GiB",
        "restore, 128 MiB, files not in the page cache",
        "restore, 1 GiB, files not in the page cache",
    ];
    let cold_of = [0, 0, 2, 2, 0, 2];
    for (i, label) in labels.iter().enumerate() {
        let samples = stamps[i].borrow();
        println!(
            "| {label} | {:.2} | {:.2} | {:.2} | {:.2} |",
            rounds.median(i) * 1e3,
            rounds.ratio(i, cold_of[i]),
            middle(samples.iter().map(|s| s.ready).collect()) * 1e3,
            middle(samples.iter().map(|s| s.end).collect()) * 1e3,
        );
    }
    println!("\nProcesses (the shipped binary), start to exit:\n");
    println!("| | ms | × `carve vm run` |\n|---|---|---|");
    for (i, label) in [
        "`carve vm run` of the guest, 128 MiB",
        "`carve vm restore`, 128 MiB",
        "`carve vm run` of the guest, 1 GiB",
        "`carve vm restore`, 1 GiB",
    ]
    .iter()
    .enumerate()
    {
        let run_row = 6 + i - i % 2;
        println!("| {label} | {:.2} | {:.2} |", rounds.median(6 + i) * 1e3, rounds.ratio(6 + i, run_row));
    }
    if !persist_snapshots.is_empty() {
        println!(
            "\n`VmSnapshot::read` + `Vm::restore` alone, part 1's `persist` snapshots ({} MiB touched):\n",
            PATTERN_KIB >> 10
        );
        println!("| | ms |\n|---|---|");
        println!("| 128 MiB | {:.2} |", rounds.median(10) * 1e3);
        println!("| 1 GiB | {:.2} |", rounds.median(11) * 1e3);
    }
    println!();
}

/// The guest of part 2: a PVH ELF whose code, entered in flat 32-bit protected mode at
/// [`GUEST_BASE`], is
///
/// ```text
/// 0:  mov al, [FLAG]
///     test al, al
///     jnz 1f
///     out 0x80, al        ; an ignored port: every round is a KVM exit, where a pause lands
///     jmp 0b
/// 1:  mov dx, 0x3f8
///     out dx, al          ; the flag to the serial port
///     xor eax, eax
///     out 0xf4, al        ; debug-exit 0: process status 1
///     hlt
///     jmp .-1
/// ```
///
/// with the flag byte at [`FLAG`] holding `flag`.
fn flag_guest(flag: u8) -> Vec<u8> {
    let flag_addr = (FLAG as u32).to_le_bytes();
    let mut code = vec![0xa0, flag_addr[0], flag_addr[1], flag_addr[2], flag_addr[3]];
    code.extend_from_slice(&[
        0x84, 0xc0, // test al, al
        0x75, 0x04, // jnz +4
        0xe6, 0x80, // out 0x80, al
        0xeb, 0xf3, // jmp -13
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // out dx, al
        0x31, 0xc0, // xor eax, eax
        0xe6, 0xf4, // out 0xf4, al
        0xf4, // hlt
        0xeb, 0xfd, // jmp -3
    ]);
    let mut segment = vec![0u8; 0x200];
    segment[..code.len()].copy_from_slice(&code);
    segment[(FLAG - GUEST_BASE) as usize] = flag;
    pvh_elf(&segment)
}

/// The guest of part 3's in-process row: `mov dx, 0x3f8; 1: out dx, al; jmp 1b`, a serial byte
/// (a KVM exit) every round, so the host sees when it runs.
fn serial_loop_guest() -> Vec<u8> {
    pvh_elf(&[0x66, 0xba, 0xf8, 0x03, 0xee, 0xeb, 0xfd])
}

/// An ELF64 with one loadable segment at [`GUEST_BASE`] (its entry) and the PVH entry note.
fn pvh_elf(segment: &[u8]) -> Vec<u8> {
    const CODE_OFFSET: u64 = 0x1000;
    let mut elf = Vec::new();
    // ELF64 header.
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&GUEST_BASE.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, 2, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        elf.extend_from_slice(&half.to_le_bytes());
    }
    let note_offset = 64 + 2 * 56u64;
    let mut phdr = |kind: u32, flags: u32, offset: u64, addr: u64, size: u64, align: u64| {
        elf.extend_from_slice(&kind.to_le_bytes());
        elf.extend_from_slice(&flags.to_le_bytes());
        for word in [offset, addr, addr, size, size, align] {
            elf.extend_from_slice(&word.to_le_bytes());
        }
    };
    phdr(1, 7, CODE_OFFSET, GUEST_BASE, segment.len() as u64, 0x1000); // PT_LOAD, RWX
    phdr(4, 4, note_offset, 0, 20, 4); // PT_NOTE
                                       // XEN_ELFNOTE_PHYS32_ENTRY: namesz 4, descsz 4, type 18, "Xen\0", the entry.
    for word in [4u32, 4, 18] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(b"Xen\0");
    elf.extend_from_slice(&(GUEST_BASE as u32).to_le_bytes());
    elf.resize(CODE_OFFSET as usize, 0);
    elf.extend_from_slice(segment);
    elf
}

// ---------------------------------------------------------------------------------------------
// 3. Pause and resume

fn pause_resume(carve: &str, work: &Path) {
    println!("## Pause and resume of a running guest (median of {PAUSE_ROUNDS} rounds)\n");
    let vms: Vec<RunningVm> = [1u32, 2]
        .iter()
        .map(|&vcpus| {
            let cmdline = format!("ticks=1000000 period_ms=3600000 pattern_kib=64 expect_cpus={vcpus}");
            RunningVm::start(carve, work, &format!("pause-{vcpus}"), 128, vcpus, &cmdline)
        })
        .collect();
    for vm in &vms {
        vm.wait_for_serial("persist: started", Duration::from_secs(60));
        vm.request(ControlRequest::Pause);
    }
    let in_process = InProcessVm::start(work);
    in_process.vm.request(ControlRequest::Pause);

    // Between samples every VM is paused, so one runs at a time on this 2-core machine.
    let took: Vec<RefCell<Vec<f64>>> = (0..6).map(|_| RefCell::default()).collect();
    let back_running: RefCell<Vec<f64>> = RefCell::default();
    let timed = |vm: &RunningVm, request: ControlRequest, row: usize| {
        let start = Instant::now();
        let reply = vm.request(request);
        let elapsed = start.elapsed().as_secs_f64();
        if let Some(us) = reply.took_us {
            took[row].borrow_mut().push(us as f64 / 1e6);
        }
        elapsed
    };
    let pause = |i: usize| {
        vms[i].resume_untimed();
        timed(&vms[i], ControlRequest::Pause, 1 + i)
    };
    let resume = |vm: &RunningVm, row: usize| {
        let t = timed(vm, ControlRequest::Resume { hide_pause: false }, row);
        std::thread::sleep(Duration::from_millis(50));
        vm.request(ControlRequest::Pause);
        t
    };
    let resume_watched = || {
        in_process.watch.arm();
        let start = Instant::now();
        let t = resume(&in_process.vm, 5);
        back_running.borrow_mut().push(in_process.watch.seen().duration_since(start).as_secs_f64());
        t
    };
    let rounds = interleaved(
        PAUSE_ROUNDS,
        &mut [
            &mut || timed(&vms[0], ControlRequest::Describe { sample_ms: 0 }, 0),
            &mut || pause(0),
            &mut || pause(1),
            &mut || resume(&vms[0], 3),
            &mut || resume(&vms[1], 4),
            &mut || resume_watched(),
        ],
    );
    drop(vms);
    in_process.stop();
    println!(
        "| | client round trip (µs) | × describe | VM's took_us (µs) | request sent → guest's next exit (µs) |"
    );
    println!("|---|---|---|---|---|");
    for (i, label) in [
        "describe, 1 vCPU (control socket floor: no vCPU involved)",
        "pause, 1 vCPU",
        "pause, 2 vCPUs",
        "resume, 1 vCPU",
        "resume, 2 vCPUs",
        "resume, 1 vCPU, serial-loop guest in this process (library build)",
    ]
    .iter()
    .enumerate()
    {
        let took = took[i].borrow().clone();
        let took = if took.is_empty() { String::new() } else { format!("{:.0}", middle(took) * 1e6) };
        let back = if i == 5 {
            format!("{:.0}", middle(back_running.borrow().clone()) * 1e6)
        } else {
            String::new()
        };
        println!("| {label} | {:.0} | {:.2} | {took} | {back} |", rounds.median(i) * 1e6, rounds.ratio(i, 0));
    }
    println!();
}

/// Marks the first serial byte after [`ResumeWatch::arm`]: when a resumed guest runs again.
#[derive(Clone, Default)]
struct ResumeWatch(Arc<std::sync::Mutex<(bool, Option<Instant>)>>);

impl ResumeWatch {
    fn arm(&self) {
        *self.0.lock().unwrap() = (true, None);
    }

    /// Waits for the byte that follows the arming.
    fn seen(&self) -> Instant {
        let start = Instant::now();
        loop {
            if let Some(at) = self.0.lock().unwrap().1 {
                return at;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "the resumed guest wrote nothing");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Write for ResumeWatch {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let now = Instant::now();
        let mut slot = self.0.lock().unwrap();
        if slot.0 {
            *slot = (false, Some(now));
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The serial-loop guest run by the library on a thread of this process, with a control socket.
struct InProcessVm {
    vm: RunningVm,
    watch: ResumeWatch,
    stopper: carve_vmm::VmStopper,
    thread: std::thread::JoinHandle<()>,
}

impl InProcessVm {
    fn start(work: &Path) -> InProcessVm {
        let elf = work.join("serial-loop.elf");
        std::fs::write(&elf, serial_loop_guest()).unwrap();
        let control = work.join("in-process.control");
        let watch = ResumeWatch::default();
        let (stopper_tx, stopper_rx) = std::sync::mpsc::channel();
        let (writer, socket) = (watch.clone(), control.clone());
        let thread = std::thread::spawn(move || {
            let config = VmConfig {
                serial: SerialSink::Writer(Box::new(writer)),
                ..VmConfig::new(KernelSpec::Path(elf))
            };
            let vm = Vm::build(config, Vec::new()).unwrap();
            stopper_tx.send(vm.stopper()).unwrap();
            vm.run_with_control(Some(&socket)).unwrap();
        });
        let stopper = stopper_rx.recv().unwrap();
        let vm = RunningVm::handle("in-process", control);
        vm.wait_for_control();
        InProcessVm { vm, watch, stopper, thread }
    }

    fn stop(self) {
        self.stopper.stop();
        self.thread.join().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// A `carve vm run` process with a control socket, killed when dropped (and when this process
/// dies: the release profile aborts on panic, so no destructor would run).
struct RunningVm {
    name: String,
    child: Option<std::process::Child>,
    control: PathBuf,
    serial: PathBuf,
}

impl RunningVm {
    fn start(carve: &str, work: &Path, name: &str, mib: u64, vcpus: u32, cmdline: &str) -> RunningVm {
        RunningVm::start_kernel(carve, work, name, mib, vcpus, &guest("persist", Format::Multiboot), cmdline)
    }

    fn start_kernel(
        carve: &str,
        work: &Path,
        name: &str,
        mib: u64,
        vcpus: u32,
        kernel: &Path,
        cmdline: &str,
    ) -> RunningVm {
        let control = work.join(format!("{name}.control"));
        let serial = work.join(format!("{name}.serial"));
        let mut command = Command::new(carve);
        command
            .args(["vm", "run", "--memory", &mib.to_string(), "--vcpus", &vcpus.to_string(), "--kernel"])
            .arg(kernel)
            .args(["--cmdline", cmdline, "--serial"])
            .arg(format!("file:{}", serial.display()))
            .arg("--control")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: prctl is async-signal-safe; the child only asks to die with its parent.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        };
        let child = command.spawn().unwrap();
        RunningVm { name: name.to_string(), child: Some(child), control, serial }
    }

    /// A VM that is not a child process, reached through its control socket alone.
    fn handle(name: &str, control: PathBuf) -> RunningVm {
        RunningVm { name: name.to_string(), child: None, control, serial: PathBuf::new() }
    }

    fn wait_for_control(&self) {
        let start = Instant::now();
        while control::request(&self.control, &ControlRequest::Describe { sample_ms: 0 }).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "{}: no control socket", self.name);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn wait_for_serial(&self, text: &str, timeout: Duration) {
        let start = Instant::now();
        while !std::fs::read_to_string(&self.serial).unwrap_or_default().contains(text) {
            assert!(
                start.elapsed() < timeout,
                "{}: no '{text}' in time: {:?}",
                self.name,
                std::fs::read_to_string(&self.serial)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn request(&self, request: ControlRequest) -> ControlReply {
        control::request(&self.control, &request).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    /// Resumes the VM and lets it run a moment, so what follows meets a running guest.
    fn resume_untimed(&self) {
        self.request(ControlRequest::Resume { hide_pause: false });
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a command to its end; it must exit with `status`.
fn run(program: &str, args: &[&str], status: i32) {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(status),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn time(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

fn middle(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}
