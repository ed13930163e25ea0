//! Live migration, side by side with its floor and with QEMU, in one run: `cargo bench -p
//! carve-cli --bench migration` (`-- migrate` or `-- harvest` runs that part alone). Results go
//! to docs/benchmarks.md by hand.
//!
//! "carve" is the shipped static binary (`cargo dist`, built here if stale); the harvest rows
//! call the library it is built from (`carve_vmm`) in this process.
//!
//! 1. Migration of an idle 256 MiB `persist` guest (churn_kib=0) over loopback to a fresh
//!    `carve vm run --incoming 127.0.0.1:0`: what `carve vm migrate --json` reports (total: the
//!    request to the destination's start; downtime: the guest's pause; rounds; bytes sent against
//!    the guest's size) and the wall time of that process. Floor: as many bytes as it sent over a
//!    loopback TCP connection in this process (connect, write all, the peer reads all).
//! 2. The same with the guest rewriting memory (pattern_kib=2048 churn_kib=2048: its whole
//!    pattern, page by page, every tick); its dirty rate is measured by a 1 s `describe` sample
//!    just before each migration (the idle guest's too).
//! 3. QEMU's migration of an idle 256 MiB KVM guest (SeaBIOS, nothing to boot) to a fresh
//!    `-incoming tcp:` destination, downtime-limit 50 ms and max-bandwidth 100G, driven over the
//!    HMP monitor: `info migrate`'s total time, downtime, dirty sync count (rounds), transferred
//!    ram and total ram; the wall time from `migrate -d` to `completed` seen by polling. Floor:
//!    as in 1, for its transferred bytes.
//! 4. Dirty-log harvest (`DirtyLog::harvest`) of a 1 GiB KVM VM with its memory registered and
//!    no vCPU, per GiB: (a) of a clean log, the floor; (b) after this process wrote every page
//!    through vm-memory (the device bitmap, which a harvest merges with KVM's log).
//!
//! Every VM hops: each round's destination is the next round's source. Between their samples
//! the carve VMs are paused (the persist guest spins on its clock: a whole core here), so one
//! guest runs at a time.

#[path = "common/mod.rs"]
mod common;

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use carve_guest_images::{path as guest, Format};
use carve_vmm::control::{self, ControlReply, ControlRequest};
use carve_vmm::dirty_log::DirtyLog;
use carve_vmm::memory::PAGE_SIZE;
use carve_vmm::MemoryBacking;
use common::interleaved;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const MIGRATION_ROUNDS: usize = 5;
const HARVEST_ROUNDS: usize = 21;
const GUEST_MIB: u64 = 256;
const HARVEST_MIB: u64 = 1024;
const DOWNTIME_MS: u64 = 50;
const IDLE: &str = "ticks=100000 period_ms=100 pattern_kib=1024 churn_kib=0";
/// Rewrites its whole pattern every tick (~0.8 s here): a steady ~2 MiB/s of distinct pages,
/// where a 1 MiB churn of a 4 MiB pattern (a tick of ~1.1 s) shows 0.3 to 1 MiB/s in a 1 s sample.
const CHURN: &str = "ticks=100000 period_ms=100 pattern_kib=2048 churn_kib=2048";
const TIMEOUT: Duration = Duration::from_secs(60);

/// Killed by the panic hook, with the work directory removed: the release profile aborts on
/// panic, so no destructor runs (PR_SET_PDEATHSIG covers this process being killed).
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static WORK: OnceLock<PathBuf> = OnceLock::new();
static NEXT: AtomicU32 = AtomicU32::new(0);

fn main() {
    let parts: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let part = |name: &str| parts.is_empty() || parts.iter().any(|p| p == name);
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        eprintln!("SKIPPED: /dev/kvm is not usable here");
        return;
    }
    let work = std::env::temp_dir().join(format!("carve-bench-migration-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    WORK.set(work.clone()).unwrap();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        for &pid in CHILDREN.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            // SAFETY: a plain syscall on a child of ours, not yet reaped (Drop forgets it then).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(WORK.get().unwrap());
        default_hook(info);
    }));
    if part("migrate") {
        let shipped = common::shipped_carve();
        migrations(shipped.to_str().unwrap(), &work);
    }
    if part("harvest") {
        harvests();
    }
    let _ = std::fs::remove_dir_all(&work);
}

// ---------------------------------------------------------------------------------------------
// 1-3. Migrations

/// One migration sample (seconds, bytes, bytes per second).
#[derive(Clone, Copy)]
struct Migration {
    total: f64,
    downtime: f64,
    rounds: f64,
    bytes: f64,
    guest: f64,
    wall: f64,
    floor: f64,
    dirty: f64,
}

fn migrations(carve: &str, work: &Path) {
    println!("## Live migration of a 256 MiB guest over loopback (median of {MIGRATION_ROUNDS} rounds)\n");
    let persist = guest("persist", Format::Multiboot);
    let boot = |cmdline: &str| {
        let vm = CarveVm::spawn(carve, work, &["--kernel", persist.to_str().unwrap(), "--cmdline", cmdline]);
        vm.line_in(&vm.serial, "tick 1 ");
        vm.request(ControlRequest::Pause);
        vm
    };
    let idle = RefCell::new(boot(IDLE));
    let churn = RefCell::new(boot(CHURN));
    // QEMU's source, or why it could not go on (a row says so instead of numbers).
    let qemu = RefCell::new(Qemu::start(work, None));
    let samples: Vec<RefCell<Vec<Migration>>> = (0..3).map(|_| RefCell::default()).collect();
    let carve_row = |row: usize, vm: &RefCell<CarveVm>| {
        let m = carve_migration(carve, work, &mut vm.borrow_mut());
        samples[row].borrow_mut().push(m);
        m.total
    };
    let qemu_row = || {
        let mut qemu = qemu.borrow_mut();
        let Ok(source) = qemu.as_mut() else { return f64::NAN };
        match qemu_migration(work, source) {
            Ok(m) => {
                samples[2].borrow_mut().push(m);
                m.total
            }
            Err(e) => {
                *qemu = Err(e);
                f64::NAN
            }
        }
    };
    interleaved(
        MIGRATION_ROUNDS,
        &mut [&mut || carve_row(0, &idle), &mut || carve_row(1, &churn), &mut || qemu_row()],
    );
    // Each guest still runs after its last hop (persist checks its pattern at every tick).
    for vm in [&idle, &churn] {
        let vm = vm.borrow();
        vm.request(ControlRequest::Resume { hide_pause: false });
        vm.line_in(&vm.serial, "tick ");
    }
    drop((idle, churn));
    let qemu_error = qemu.into_inner().err();

    let mib = |b: f64| b / (1 << 20) as f64;
    // "QEMU emulator version 7.2.22 (…)"
    let version = Command::new("qemu-system-x86_64").arg("--version").output().map(|o| o.stdout);
    let version = String::from_utf8_lossy(&version.unwrap_or_default()).split(' ').nth(3).map(String::from);
    println!("| | total ms | × floor | downtime ms | rounds | MiB sent / guest MiB | dirty MiB/s (1 s `describe` before) | wall ms (`carve vm migrate`; QEMU: polled) |");
    println!("|---|---|---|---|---|---|---|---|");
    let labels = [
        "carve, idle guest (churn_kib=0)".to_string(),
        "carve, guest rewriting its 2 MiB pattern every tick".to_string(),
        format!(
            "QEMU {}, idle guest (SeaBIOS, nothing to boot), `-accel kvm`",
            version.as_deref().unwrap_or("?")
        ),
    ];
    for (row, label) in labels.iter().enumerate() {
        let samples = samples[row].borrow();
        if samples.is_empty() {
            let why = qemu_error.clone().unwrap_or_default();
            println!("| {label} | not measured: {} | | | | | | |", why.replace('|', "/").replace('\n', " "));
            continue;
        }
        let med = |f: &dyn Fn(&Migration) -> f64| middle(samples.iter().map(f).collect());
        println!(
            "| floor: {:.2} MiB over loopback TCP in this process | {:.2} | 1.00 | | | {:.2} | | |",
            mib(med(&|m| m.bytes)),
            med(&|m| m.floor) * 1e3,
            mib(med(&|m| m.bytes)),
        );
        let dirty = if row == 2 { String::new() } else { format!("{:.2}", mib(med(&|m| m.dirty))) };
        println!(
            "| {label} | {:.1} | {:.1} | {:.2} | {:.0} | {:.2} / {:.0} | {dirty} | {:.1} |",
            med(&|m| m.total) * 1e3,
            med(&|m| m.total / m.floor),
            med(&|m| m.downtime) * 1e3,
            med(&|m| m.rounds),
            mib(med(&|m| m.bytes)),
            mib(med(&|m| m.guest)),
            med(&|m| m.wall) * 1e3,
        );
    }
    if let (Some(why), false) = (&qemu_error, samples[2].borrow().is_empty()) {
        println!("\nQEMU stopped part way: {why}");
    }
    println!();
}

/// Migrates `vm` to a fresh destination, which becomes `vm` (paused, as `vm` was).
fn carve_migration(carve: &str, work: &Path, vm: &mut CarveVm) -> Migration {
    let destination = CarveVm::spawn(carve, work, &["--incoming", "127.0.0.1:0"]);
    let listening = destination.line_in(&destination.stderr, "carve: waiting for a VM on ");
    let address = listening.rsplit(' ').next().unwrap().to_string();
    vm.request(ControlRequest::Resume { hide_pause: false });
    let sample = vm.request(ControlRequest::Describe { sample_ms: 1000 });
    let dirty = sample.description.and_then(|d| d.memory).expect("describe sampled memory").dirty_bytes_per_s;
    let start = Instant::now();
    let out = Command::new(carve)
        .args(["vm", "migrate", "--control"])
        .arg(&vm.control)
        .args(["--to", &address, "--downtime-ms", &DOWNTIME_MS.to_string(), "--json"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let wall = start.elapsed().as_secs_f64();
    assert!(out.status.success(), "carve vm migrate: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let field = |key: &str| report[key].as_u64().unwrap_or_else(|| panic!("no {key} in {report}")) as f64;
    destination.line_in(&destination.stderr, "carve: the VM arrived");
    let status = vm.proc.wait_exit();
    assert!(status.success(), "the source ended with {status}");
    destination.wait_for_control();
    destination.request(ControlRequest::Pause);
    *vm = destination;
    Migration {
        total: field("total_us") / 1e6,
        downtime: field("downtime_us") / 1e6,
        rounds: field("rounds"),
        bytes: field("bytes_sent"),
        guest: field("guest_bytes"),
        wall,
        floor: tcp_floor(field("bytes_sent") as u64),
        dirty: dirty as f64,
    }
}

/// Migrates `source` to a fresh destination, which becomes `source`.
fn qemu_migration(work: &Path, source: &mut Qemu) -> Result<Migration, String> {
    let port =
        TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
    let destination = Qemu::start(work, Some(port))?;
    for parameter in [format!("downtime-limit {DOWNTIME_MS}"), "max-bandwidth 100G".into()] {
        // Its echo alone: anything more is an error.
        let answer = source.command(&format!("migrate_set_parameter {parameter}"))?;
        if answer.lines().count() > 1 {
            return Err(format!("QEMU refused {parameter}: {answer}"));
        }
    }
    let start = Instant::now();
    source.command(&format!("migrate -d tcp:127.0.0.1:{port}"))?;
    let info = loop {
        let info = source.command("info migrate")?;
        if info.contains("Migration status: completed") {
            break info;
        }
        if info.contains("Migration status: failed") || info.contains("Migration status: cancelled") {
            return Err(format!("QEMU's migration failed: {info}"));
        }
        if start.elapsed() > TIMEOUT {
            return Err(format!("QEMU's migration did not end in {TIMEOUT:?}: {info}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let wall = start.elapsed().as_secs_f64();
    // Lines "key: N unit": times in ms, sizes in kbytes (QEMU 7.2).
    let value = |key: &str| {
        let line = info.lines().find_map(|l| l.trim().strip_prefix(key));
        let n = line.and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok());
        n.ok_or_else(|| format!("no '{key}' in QEMU's info migrate: {info}"))
    };
    let bytes = value("transferred ram:")? * 1024.0;
    let m = Migration {
        total: value("total time:")? / 1e3,
        downtime: value("downtime:")? / 1e3,
        rounds: value("dirty sync count:")?,
        bytes,
        guest: value("total ram:")? * 1024.0,
        wall,
        floor: tcp_floor(bytes as u64),
        dirty: 0.0,
    };
    *source = destination;
    Ok(m)
}

/// Sends `bytes` over a fresh loopback TCP connection to a thread that reads them all.
fn tcp_floor(bytes: u64) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let peer =
        std::thread::spawn(move || std::io::copy(&mut listener.accept().unwrap().0, &mut std::io::sink()));
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut stream = TcpStream::connect(address).unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(peer.join().unwrap().unwrap(), bytes);
    start.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// 4. Dirty-log harvest

fn harvests() {
    let mem = carve_vmm::memory::create(HARVEST_MIB, MemoryBacking::Anonymous).unwrap();
    let vm = kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap();
    carve_vmm::memory::register(&vm, &mem).unwrap();
    let log = RefCell::new(DirtyLog::start(Arc::new(vm), &mem).unwrap());
    let pages: Vec<u64> = mem
        .iter()
        .flat_map(|r| {
            let base = r.start_addr().raw_value();
            (0..r.len() / PAGE_SIZE).map(move |i| base + i * PAGE_SIZE)
        })
        .collect();
    let gib = pages.len() as f64 * PAGE_SIZE as f64 / (1u64 << 30) as f64;
    let found: Vec<RefCell<Vec<u64>>> = (0..2).map(|_| RefCell::default()).collect();
    let harvest = |row: usize| {
        let start = Instant::now();
        let dirty = log.borrow_mut().harvest(&mem).unwrap();
        let took = start.elapsed().as_secs_f64();
        found[row].borrow_mut().push(dirty.count());
        took / gib
    };
    let clean = || {
        log.borrow_mut().harvest(&mem).unwrap();
        harvest(0)
    };
    let written = || {
        for &page in &pages {
            mem.write_slice(&[1], GuestAddress(page)).unwrap();
        }
        harvest(1)
    };
    let rounds = interleaved(HARVEST_ROUNDS, &mut [&mut || clean(), &mut || written()]);
    assert!(found[1].borrow().iter().all(|&n| n == pages.len() as u64), "a harvest missed pages");
    println!(
        "## Dirty-log harvest of a {HARVEST_MIB} MiB VM, in process (median of {HARVEST_ROUNDS} rounds; manual protect: {})\n",
        log.borrow().manual_protect()
    );
    println!("| | ms per GiB | × floor | pages found |\n|---|---|---|---|");
    for (row, label) in
        ["floor: harvest of a clean log", "harvest after the host wrote every page (vm-memory)"]
            .iter()
            .enumerate()
    {
        let found = middle(found[row].borrow().iter().map(|&n| n as f64).collect());
        println!("| {label} | {:.3} | {:.2} | {found:.0} |", rounds.median(row) * 1e3, rounds.ratio(row, 0));
    }
    println!();
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// A child process, killed when dropped.
struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    fn spawn(mut command: Command, name: String) -> std::io::Result<Proc> {
        // SAFETY: prctl is async-signal-safe; the child only asks to die with its parent.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        };
        let child = command.spawn()?;
        CHILDREN.lock().unwrap().push(child.id());
        Ok(Proc { child, name })
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        wait_until(
            || format!("{} did not end", self.name),
            || {
                status = self.child.try_wait().unwrap();
                status.is_some()
            },
        );
        status.unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        CHILDREN.lock().unwrap().retain(|&pid| pid != self.child.id());
    }
}

/// A `carve vm run` process (a booted guest or an `--incoming` destination).
struct CarveVm {
    proc: Proc,
    control: PathBuf,
    serial: PathBuf,
    stderr: PathBuf,
}

impl CarveVm {
    fn spawn(carve: &str, work: &Path, args: &[&str]) -> CarveVm {
        let n = NEXT.fetch_add(1, SeqCst);
        let file = |what: &str| work.join(format!("vm-{n}.{what}"));
        let (control, serial, stderr) = (file("control"), file("serial"), file("stderr"));
        let mut command = Command::new(carve);
        command
            .args(["vm", "run", "--memory", &GUEST_MIB.to_string()])
            .args(args)
            .args(["--serial", &format!("file:{}", serial.display()), "--control", control.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let proc = Proc::spawn(command, format!("carve vm run #{n}")).expect("carve starts");
        CarveVm { proc, control, serial, stderr }
    }

    /// The first whole line of `file` (its serial or standard error) with `text`, once written.
    fn line_in(&self, file: &Path, text: &str) -> String {
        let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
        let mut found = None;
        wait_until(
            || format!("{}: no '{text}' in {file:?}; stderr: {}", self.proc.name, read(&self.stderr)),
            || {
                let content = read(file);
                found = content
                    .split_inclusive('\n')
                    .find(|l| l.ends_with('\n') && l.contains(text))
                    .map(String::from);
                found.is_some()
            },
        );
        found.unwrap().trim_end().to_string()
    }

    fn wait_for_control(&self) {
        let describe = ControlRequest::Describe { sample_ms: 0 };
        wait_until(
            || format!("{}: no control socket", self.proc.name),
            || control::request(&self.control, &describe).is_ok(),
        );
    }

    fn request(&self, request: ControlRequest) -> ControlReply {
        control::request(&self.control, &request).unwrap_or_else(|e| panic!("{}: {e}", self.proc.name))
    }
}

/// A `qemu-system-x86_64` process and its HMP monitor.
struct Qemu {
    proc: Proc,
    monitor: UnixStream,
}

impl Qemu {
    /// An idle 256 MiB KVM guest, or with `incoming` a destination waiting on that port.
    fn start(work: &Path, incoming: Option<u16>) -> Result<Qemu, String> {
        let n = NEXT.fetch_add(1, SeqCst);
        let (socket, log) = (work.join(format!("qemu-{n}.monitor")), work.join(format!("qemu-{n}.log")));
        let mut command = Command::new("qemu-system-x86_64");
        command
            .args(format!("-accel kvm -m {GUEST_MIB} -nodefaults -nographic -display none").split(' '))
            .args(["-monitor", &format!("unix:{},server,nowait", socket.display())]);
        if let Some(port) = incoming {
            command.args(["-incoming", &format!("tcp:127.0.0.1:{port}")]);
        }
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        let mut proc =
            Proc::spawn(command, format!("qemu #{n}")).map_err(|e| format!("qemu-system-x86_64: {e}"))?;
        let start = Instant::now();
        loop {
            if let Ok(monitor) = UnixStream::connect(&socket) {
                monitor.set_read_timeout(Some(TIMEOUT)).unwrap();
                let mut qemu = Qemu { proc, monitor };
                qemu.prompt()?;
                return Ok(qemu);
            }
            if let Some(status) = proc.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                let errors: Vec<&str> = log.lines().filter(|l| !l.contains("warning:")).collect();
                return Err(format!("QEMU exited ({status}): {}", errors.join("; ")));
            }
            if start.elapsed() > TIMEOUT {
                return Err("QEMU's monitor never answered".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// What the monitor printed up to its next prompt.
    fn prompt(&mut self) -> Result<String, String> {
        let mut text = Vec::new();
        let mut buffer = [0u8; 4096];
        while !text.ends_with(b"(qemu) ") {
            match self.monitor.read(&mut buffer) {
                Ok(0) | Err(_) => return Err(format!("{}: the monitor closed", self.proc.name)),
                Ok(n) => text.extend_from_slice(&buffer[..n]),
            }
        }
        let text = String::from_utf8_lossy(&text[..text.len() - 7]).replace('\r', "");
        Ok(text.trim_end().to_string())
    }

    /// Runs an HMP command: its echo (one line) and its output.
    fn command(&mut self, command: &str) -> Result<String, String> {
        self.monitor.write_all(format!("{command}\n").as_bytes()).map_err(|e| e.to_string())?;
        self.prompt()
    }
}

/// Polls `done` until it holds; past [`TIMEOUT`], panics with `what`.
fn wait_until(what: impl Fn() -> String, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < TIMEOUT, "{}", what());
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn middle(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}
