//! The enclave process: one per enclave, detached from the terminal, holding the VM (its
//! memory and pinned vCPU threads) for the enclave's life. It claims resources under the run
//! directory's lock, boots the image, waits for the heartbeat, reports to the CLI that
//! launched it, then answers describe / console / terminate / wait on its control socket until
//! the enclave ends, and finally gives everything back.

use std::fs::File;
use std::io::{BufReader, Seek, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use carve_nsm::pcr::ParentIdentity;
use carve_vmm::{
    KernelSpec, MemoryBacking, SerialSink, Vm, VmConfig, VmError, VmErrorKind, VmExit, VmOutcome, VmStopper,
    VsockConfig,
};

use crate::app_exit::{self, AppExitListener};
use crate::args::{check_memory, CpuRequest};
use crate::console::{Chunk, Console};
use crate::error::{ErrorCode, Failure, Result};
use crate::heartbeat::{self, HeartbeatError, HeartbeatListener};
use crate::ids;
use crate::nsm::EnclaveNsm;
use crate::pool::{Pool, Topology};
use crate::protocol::{receive, send, EnclaveState, LaunchEvent, LaunchRequest, Reply, Request, RunInfo};
use crate::run_dir::{self, Claim, Record, RunDir};
use carve_vmm::control::{ControlReply, ControlRequest};

/// The lowest CID carve hands out when asked to choose one.
const FIRST_AUTO_CID: u64 = 16;

/// Runs an enclave process: the launch request on stdin, launch events on stdout (which is
/// then let go, so the CLI sees its end), logs on stderr. `demo_image` is the EIF that
/// `--demo` boots. Returns the process status.
pub fn main(demo_image: &'static [u8]) -> i32 {
    let _ = rustix::process::setsid();
    let mut events = std::io::stdout();
    let request: LaunchRequest = match receive(&mut BufReader::new(std::io::stdin())) {
        Ok(Some(request)) => request,
        other => {
            let failure =
                Failure::new(ErrorCode::SERDE, format!("no launch request on standard input: {other:?}"));
            let _ = send(&mut events, &LaunchEvent::Failed(failure));
            return 1;
        }
    };
    let notify = |text: &str| {
        let _ = send(&mut std::io::stdout(), &LaunchEvent::Notice(text.to_string()));
    };
    let enclave = match launch(request, demo_image, &notify) {
        Ok(enclave) => enclave,
        Err(failure) => {
            log::error!("launch failed: [ {} ] {}", failure.code, failure.message);
            let _ = send(&mut events, &LaunchEvent::Failed(failure));
            return 1;
        }
    };
    let _ = send(&mut events, &LaunchEvent::Started(enclave.state.run.clone()));
    // Standard output goes to /dev/null so the launching CLI reads its end and returns.
    if let Ok(null) = File::options().write(true).open("/dev/null") {
        let _ = rustix::stdio::dup2_stdout(&null);
    }
    enclave.serve();
    0
}

/// A booted enclave and what it holds. Field order is drop order: sockets, then the claim.
struct Enclave {
    state: EnclaveState,
    vm: JoinHandle<std::result::Result<VmOutcome, VmError>>,
    stopper: VmStopper,
    console: Console,
    control: UnixListener,
    control_path: PathBuf,
    vsock_path: PathBuf,
    app_exit: AppExitListener,
    uid: u32,
    _claim: Claim,
}

/// The enclave's end, for `wait` and terminate replies.
#[derive(Default)]
struct Ending {
    reason: Mutex<Option<String>>,
    ended: Condvar,
}

impl Ending {
    fn wait(&self) -> String {
        let reason = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        let reason = self.ended.wait_while(reason, |r| r.is_none()).unwrap_or_else(PoisonError::into_inner);
        reason.clone().unwrap_or_default()
    }

    fn set(&self, reason: String) {
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
        self.ended.notify_all();
    }
}

/// A checked image, open, with its measurements.
struct Image {
    file: File,
    size: u64,
    summary: carve_eif::EifSummary,
}

/// What a launch holds once claimed under the run directory's lock.
struct Claimed {
    record: Record,
    cpus: CpuChoice,
    claim: Claim,
    control: UnixListener,
    control_path: PathBuf,
    vsock_path: PathBuf,
    heartbeat: HeartbeatListener,
    app_exit: AppExitListener,
    /// Removes the socket files if the launch fails from here on.
    cleanup: SocketFiles,
}

fn launch(request: LaunchRequest, demo_image: &'static [u8], notify: &dyn Fn(&str)) -> Result<Enclave> {
    let started = std::time::Instant::now();
    let args = &request.args;
    let run_dir = RunDir::open()?;
    let pool = read_pool(&run_dir)?;
    if pool.development {
        check_host_memory(args.memory_mib)?;
    }
    let image = check_image(&request, demo_image)?;
    let Claimed { record, cpus, claim, control, control_path, vsock_path, heartbeat, app_exit, cleanup } =
        claim_resources(&run_dir, &request, &pool)?;
    let (id, cid) = (record.id.clone(), record.cid);
    // Who the parent is, as EC2 measures it into PCR3 (its role) and PCR4 (its instance ID).
    let parent = ParentIdentity {
        role: args.parent_role.clone().or_else(|| pool.parent_role.clone()),
        instance_id: Some(
            args.parent_id.clone().or_else(|| pool.parent_id.clone()).unwrap_or_else(ids::host_id),
        ),
    };

    notify("Start allocating memory...");
    let console = Console::new();
    let ca = carve_nsm::pki::state_dir()
        .and_then(|dir| carve_nsm::pki::CertificateAuthority::open(&dir))
        .map_err(|e| {
            Failure::new(ErrorCode::FILE_OPERATION, format!("cannot open carve's attestation CA: {e}"))
        })?;
    let config = VmConfig {
        cmdline: String::new(),
        memory_mib: args.memory_mib,
        vcpus: cpus.count,
        serial: if args.debug_mode {
            SerialSink::Writer(Box::new(console.clone()))
        } else {
            SerialSink::None
        },
        vsock: Some(VsockConfig {
            cid,
            uds: vsock_path.clone(),
            shared_listeners: Some(run_dir.shared_vsock_prefix()),
        }),
        memory_backing: if pool.development { MemoryBacking::Anonymous } else { MemoryBacking::Hugepages },
        vcpu_affinity: cpus.pinned.iter().map(|&c| c as usize).collect(),
        ..VmConfig::new(KernelSpec::Eif(image_path(&image.file)))
    };
    let nsm = EnclaveNsm { module_id: id.clone(), parent: parent.clone(), debug_mode: args.debug_mode, ca };
    let vm = Vm::build(config, vec![Box::new(nsm)]).map_err(vm_failure)?;
    let built = started.elapsed();
    let memory_mib = vm.memory_size() >> 20;
    let stopper = vm.stopper();
    let vm = thread::Builder::new()
        .name("carve-vm".into())
        .spawn(move || vm.run())
        .map_err(|e| Failure::new(ErrorCode::PROCESS_SPAWN, format!("cannot start the VM thread: {e}")))?;
    // The VM has its copy; the CLI may replace or remove the file now.
    drop(image.file);

    let timeout = heartbeat::timeout(image.size, args.memory_mib);
    if let Err(e) = heartbeat.wait(timeout, || vm.is_finished()) {
        stopper.stop();
        // Why the enclave stopped by itself, if it did.
        let ended = match (&e, vm.join()) {
            (HeartbeatError::EnclaveEnded, Ok(Ok(outcome))) => format!(" ({})", outcome.exit),
            _ => String::new(),
        };
        return Err(Failure::new(
            ErrorCode::ENCLAVE_BOOT_FAILURE,
            format!("Waiting on enclave to boot failed with error: {e}{ended}"),
        ));
    }
    drop(heartbeat);
    // Askers see the enclave from now on (nitro-cli's enclave process, too, listens only once
    // its enclave runs); until now they would have waited on a socket nobody accepts on.
    std::fs::rename(run_dir.starting_control_socket(record.slot), &control_path).map_err(|e| {
        Failure::new(ErrorCode::SOCKET_ERROR, format!("cannot listen on {}: {e}", control_path.display()))
    })?;
    notify(&format!(
        "Started enclave with enclave-cid: {cid}, memory: {memory_mib} MiB, cpu-ids: {:?}",
        cpus.pinned
    ));
    cleanup.keep();
    log::info!(
        "enclave {id} ({}) started: CID {cid}, {memory_mib} MiB, CPUs {:?}; VM built in {built:.1?}, heartbeat \
         after {:.1?}",
        record.name,
        cpus.pinned,
        started.elapsed()
    );
    Ok(Enclave {
        state: EnclaveState {
            run: RunInfo {
                name: record.name,
                id,
                pid: std::process::id(),
                cid,
                cpu_count: cpus.count as usize,
                cpu_ids: cpus.pinned,
                memory_mib,
            },
            state: "RUNNING".into(),
            debug_mode: args.debug_mode,
            development: pool.development,
            measurements: {
                let mut measurements = image.summary.measurements.to_map();
                for (index, value) in parent.pcrs() {
                    measurements.insert(format!("PCR{index}"), carve_eif::measure::hex(&value));
                }
                measurements
            },
            metadata: image.summary.metadata.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
        },
        vm,
        stopper,
        console,
        control,
        control_path,
        vsock_path,
        app_exit,
        uid: record.uid,
        _claim: claim,
    })
}

/// Opens the image and checks it as nitro-cli does before anything is claimed: memory for
/// its size (E26), format (E35), signature and the certificate's validity period (E59), CRC
/// (E35).
fn check_image(request: &LaunchRequest, demo_image: &'static [u8]) -> Result<Image> {
    let (file, name) = open_image(request, demo_image)?;
    let size = file.metadata().map_err(|e| Failure::file(&image_path(&file), "read", e))?.len();
    check_memory(request.args.memory_mib, size)?;
    let summary = carve_eif::read(&file, Some(size), &mut carve_eif::reader::Discard)
        .map_err(|e| Failure::new(ErrorCode::EIF_PARSING, format!("{name}: {e}")))?;
    if summary.signature_check() == Some(false) {
        return Err(Failure::new(
            ErrorCode::SIGNATURE_CHECKER,
            format!("{name}: the image's signature does not match its PCRs or its certificate is not valid"),
        ));
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    if let Some(signature) = summary.signature.as_ref().filter(|s| !s.certificate.valid_at(now)) {
        let validity = signature.certificate.describe();
        return Err(Failure::new(
            ErrorCode::SIGNATURE_CHECKER,
            format!(
                "{name}: the signing certificate is expired or not yet valid (valid from {} to {})",
                validity.not_before, validity.not_after
            ),
        ));
    }
    if !summary.crc_ok() {
        return Err(Failure::new(ErrorCode::EIF_PARSING, format!("{name}: the image's CRC does not match")));
    }
    Ok(Image { file, size, summary })
}

/// Under the run directory's lock: CPUs, CID, slot, ID and name are chosen against the running
/// enclaves and claimed; the control socket and the heartbeat listener are bound.
fn claim_resources(run_dir: &RunDir, request: &LaunchRequest, pool: &Pool) -> Result<Claimed> {
    let args = &request.args;
    let lock = run_dir.lock()?;
    let others = run_dir.live_records(&lock);
    let cpus = choose_cpus(&request.cpus, pool, &others)?;
    let cid = choose_cid(args.enclave_cid, &others)?;
    let slot = new_slot(&others);
    let id = ids::enclave_id(slot);
    let taken: Vec<String> = others.iter().map(|r| r.name.clone()).collect();
    let wanted = args.enclave_name.clone().unwrap_or_else(|| ids::name_from_eif(&args.eif_path()));
    let name = ids::unique_name(&wanted, &taken);
    let uid = rustix::process::getuid().as_raw();
    let record = Record { slot, id, name, cid, uid, pid: std::process::id(), cpus: cpus.pinned.clone() };
    let claim = run_dir.claim(&record, &lock)?;
    let control_path = run_dir.control_socket(slot);
    let vsock_path = run_dir.vsock_socket(&record.id);
    let starting = run_dir.starting_control_socket(slot);
    let cleanup = SocketFiles(vec![starting.clone(), control_path.clone(), vsock_path.clone()]);
    // Bound under a name of its own until the enclave runs (see `launch`).
    let control = UnixListener::bind(&starting).map_err(|e| {
        Failure::new(ErrorCode::SOCKET_ERROR, format!("cannot listen on {}: {e}", control_path.display()))
    })?;
    // Anyone may ask; the process itself decides who may terminate (nitro-cli's 0766).
    let _ = std::fs::set_permissions(&starting, std::fs::Permissions::from_mode(0o766));
    let heartbeat = HeartbeatListener::bind(&run_dir::heartbeat_socket(&vsock_path))
        .map_err(|e| Failure::new(ErrorCode::ENCLAVE_BOOT_FAILURE, e))?;
    let app_exit_path = run_dir::port_socket(&vsock_path, app_exit::PORT);
    let app_exit = AppExitListener::bind(&app_exit_path).map_err(|e| {
        Failure::new(
            ErrorCode::ENCLAVE_BOOT_FAILURE,
            format!("cannot listen on {}: {e}", app_exit_path.display()),
        )
    })?;
    Ok(Claimed { record, cpus, claim, control, control_path, vsock_path, heartbeat, app_exit, cleanup })
}

/// Removes socket files if a launch fails after creating them.
struct SocketFiles(Vec<PathBuf>);

impl SocketFiles {
    /// The launch succeeded: the files stay (the enclave removes them when it ends).
    fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for SocketFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn image_path(image: &File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", image.as_raw_fd()))
}

/// The image to boot: the file, or the built-in demo in an anonymous memory file (nothing to
/// clean up, whatever happens).
fn open_image(request: &LaunchRequest, demo_image: &[u8]) -> Result<(File, String)> {
    if request.demo {
        let fd =
            rustix::fs::memfd_create("carve-demo.eif", rustix::fs::MemfdFlags::CLOEXEC).map_err(|e| {
                Failure::new(ErrorCode::FILE_OPERATION, format!("cannot hold the demo image: {e}"))
            })?;
        let mut file = File::from(fd);
        file.write_all(demo_image).and_then(|()| file.rewind()).map_err(|e| {
            Failure::new(ErrorCode::FILE_OPERATION, format!("cannot hold the demo image: {e}"))
        })?;
        return Ok((file, "the demo enclave image".into()));
    }
    let path = request.args.eif_path();
    let file = File::open(&path).map_err(|e| Failure::file(&path, "open", e))?;
    Ok((file, path.display().to_string()))
}

/// Without a hugepage reservation, the host's RAM is the bound (E27), checked before KVM is
/// handed a mapping it cannot back.
fn check_host_memory(requested_mib: u64) -> Result<()> {
    let total_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map(|kib| kib >> 10);
    match total_mib {
        Some(total) if requested_mib > total => Err(Failure::new(
            ErrorCode::INSUFFICIENT_MEMORY_AVAILABLE,
            format!("Insufficient memory available: {requested_mib} MiB requested, the host has {total} MiB"),
        )),
        _ => Ok(()),
    }
}

fn read_pool(run_dir: &RunDir) -> Result<Pool> {
    let path = run_dir.pool_file();
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| {
            Failure::new(ErrorCode::SERDE, format!("the CPU pool file {} is not valid: {e}", path.display()))
        }),
        // No pool yet: like an empty ne_cpus.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Pool::default()),
        Err(e) => Err(Failure::file(&path, "read", e)),
    }
}

struct CpuChoice {
    count: u32,
    /// Host CPUs the vCPUs are pinned to, in vCPU order (empty in development mode).
    pinned: Vec<u32>,
}

/// The driver's CPU rules, against the pool less what running enclaves own.
fn choose_cpus(request: &CpuRequest, pool: &Pool, others: &[Record]) -> Result<CpuChoice> {
    let pool_hint =
        "; set the pool with `carve allocator` (cpu_count / cpu_pool in the allocator configuration)";
    if let CpuRequest::Ids(ids) = request {
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = ids.iter().find(|id| !seen.insert(**id)) {
            return Err(Failure::new(
                ErrorCode::INVALID_CPU_CONFIGURATION,
                format!("CPU {dup} was requested more than once"),
            ));
        }
    }
    let count = match request {
        CpuRequest::Count(0) => {
            return Err(Failure::new(ErrorCode::INVALID_ARGUMENT, "`cpu-count` must be at least 1"));
        }
        CpuRequest::Ids(ids) if ids.is_empty() => {
            return Err(Failure::new(ErrorCode::MISSING_ARGUMENT, "`cpu-ids` needs at least one CPU"));
        }
        CpuRequest::Count(n) => *n,
        CpuRequest::Ids(ids) => ids.len() as u32,
    };
    if pool.development {
        return Ok(CpuChoice { count, pinned: Vec::new() });
    }
    let used: Vec<u32> = others.iter().flat_map(|r| r.cpus.iter().copied()).collect();
    let free: Vec<u32> = pool.cpus.iter().copied().filter(|c| !used.contains(c)).collect();
    let topology = Topology::host();
    let pinned = match request {
        CpuRequest::Ids(ids) => {
            for id in ids {
                if !pool.cpus.contains(id) {
                    return Err(Failure::new(
                        ErrorCode::NO_SUCH_CPU_IN_POOL,
                        format!("CPU {id} is not in the enclave CPU pool {:?}{pool_hint}", pool.cpus),
                    ));
                }
                if used.contains(id) {
                    return Err(Failure::new(
                        ErrorCode::IOCTL_FAILURE,
                        format!("CPU {id} is already used by another enclave"),
                    ));
                }
                if let Some(sibling) = topology.core_of(*id).into_iter().find(|s| !ids.contains(s)) {
                    return Err(Failure::new(
                        ErrorCode::IOCTL_FAILURE,
                        format!("Full CPU cores must be used: CPU {id}'s sibling {sibling} is not requested"),
                    ));
                }
            }
            ids.clone()
        }
        CpuRequest::Count(n) => {
            let n = *n as usize;
            if n > pool.cpus.len() {
                return Err(Failure::new(
                    ErrorCode::INSUFFICIENT_CPUS,
                    format!(
                        "Insufficient CPUs available in the pool. User provided `cpu-count` is {n}, which is more \
                         than the configured CPU pool size ({}){pool_hint}",
                        pool.cpus.len()
                    ),
                ));
            }
            // Whole cores first, as the driver fills them.
            let mut chosen = Vec::new();
            for &cpu in &free {
                let core = topology.core_of(cpu);
                if chosen.len() + core.len() <= n
                    && !chosen.contains(&cpu)
                    && core.iter().all(|c| free.contains(c))
                {
                    chosen.extend(core);
                }
            }
            if chosen.len() < n {
                return Err(Failure::new(
                    ErrorCode::INSUFFICIENT_CPUS,
                    format!(
                        "Insufficient CPUs available in the pool: {n} requested, {} of the pool's {} are free{pool_hint}",
                        free.len(),
                        pool.cpus.len()
                    ),
                ));
            }
            chosen
        }
    };
    Ok(CpuChoice { count, pinned })
}

fn choose_cid(requested: Option<u64>, others: &[Record]) -> Result<u64> {
    match requested {
        Some(cid) if cid != 0 => {
            crate::args::check_cid(cid)?;
            match others.iter().find(|r| r.cid == cid) {
                Some(other) => Err(Failure::new(
                    ErrorCode::INVALID_ARGUMENT,
                    format!("CID {cid} is already used by enclave {}", other.id),
                )),
                None => Ok(cid),
            }
        }
        _ => Ok((FIRST_AUTO_CID..).find(|cid| others.iter().all(|r| r.cid != *cid)).expect("a free CID")),
    }
}

/// A fresh slot number (random, as Nitro's slot uids look), unused by running enclaves.
fn new_slot(others: &[Record]) -> u64 {
    loop {
        let mut bytes = [0u8; 8];
        let _ = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty());
        let slot = u64::from_le_bytes(bytes) >> 1;
        if slot != 0 && others.iter().all(|r| r.slot != slot) {
            return slot;
        }
    }
}

fn vm_failure(error: VmError) -> Failure {
    let code = match error.kind() {
        VmErrorKind::Memory => ErrorCode::INSUFFICIENT_MEMORY_AVAILABLE,
        VmErrorKind::ImageTooLarge => ErrorCode::MEMORY_OVERFLOW,
        VmErrorKind::Image => ErrorCode::EIF_PARSING,
        VmErrorKind::KvmUnavailable => ErrorCode::INVALID_ENCLAVE_FD,
        VmErrorKind::Other => ErrorCode::IOCTL_FAILURE,
    };
    Failure::new(code, error)
}

impl Enclave {
    /// Answers the control socket until the enclave ends, then gives everything back.
    fn serve(self) {
        let ending = Arc::new(Ending::default());
        let terminating = Arc::new(AtomicBool::new(false));
        let state = Arc::new(self.state);
        let _ = self.control.set_nonblocking(true);
        let mut clients: Vec<JoinHandle<()>> = Vec::new();
        while !self.vm.is_finished() {
            match self.control.accept() {
                Ok((stream, _)) => {
                    let session = Session {
                        state: state.clone(),
                        ending: ending.clone(),
                        terminating: terminating.clone(),
                        stopper: self.stopper.clone(),
                        console: self.console.clone(),
                        owner: self.uid,
                    };
                    if let Ok(handle) =
                        thread::Builder::new().name("carve-client".into()).spawn(move || session.run(stream))
                    {
                        clients.push(handle);
                    }
                }
                Err(_) => {
                    let mut fds = [rustix::event::PollFd::new(&self.control, rustix::event::PollFlags::IN)];
                    let slice = rustix::event::Timespec { tv_sec: 0, tv_nsec: 50_000_000 };
                    let _ = rustix::event::poll(&mut fds, Some(&slice));
                }
            }
            clients.retain(|c| !c.is_finished());
        }
        // No new questions while the VM is taken down: askers are refused, not left waiting.
        drop(self.control);
        let _ = std::fs::remove_file(&self.control_path);
        let (vm_end, clean) = match self.vm.join() {
            Ok(Ok(outcome)) => {
                let clean = matches!(outcome.exit, VmExit::Reset | VmExit::PowerOff | VmExit::Halted);
                (outcome.exit.to_string(), clean)
            }
            Ok(Err(e)) => (format!("carve failed: {e}"), false),
            Err(_) => ("carve's VM thread panicked".into(), false),
        };
        // With carve's init, how the app ended says more than the reboot that followed; it
        // never hides a crash or a failure of carve's, nor a terminate.
        let terminated = terminating.load(std::sync::atomic::Ordering::Acquire);
        let reason = match self.app_exit.take() {
            Some(app) if clean && !terminated => {
                log::info!("enclave {}: {app}; then {vm_end}", state.run.id);
                app
            }
            Some(app) if !terminated => format!("{app}; then {vm_end}"),
            _ => vm_end,
        };
        log::info!("enclave {} ended: {reason}", state.run.id);
        self.console.close();
        // Give back before anyone hears the enclave ended: memory went with the VM, the control
        // socket before it; now the vsock socket and the claim on CPUs and slot.
        let _ = std::fs::remove_file(&self.vsock_path);
        drop(self._claim);
        ending.set(reason);
        for client in clients {
            let _ = client.join();
        }
    }
}

/// What arrives on the control socket: the CLI's enclave requests, or a VM control request
/// (`carve vm pause --control` pointed at an enclave), which enclaves refuse.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Incoming {
    Enclave(Request),
    Vm(ControlRequest),
}

/// A Nitro enclave cannot be paused, snapshotted or migrated, and a restored copy would repeat
/// its secrets and nonces: the request is refused with nitro-cli's E38.
fn refuse_vm_control(stream: UnixStream, request: &ControlRequest) {
    let what = match request {
        ControlRequest::Pause | ControlRequest::Resume { .. } => "paused or resumed",
        ControlRequest::Snapshot { .. } => "snapshotted",
        ControlRequest::Describe { .. } => "described as a VM (use describe-enclaves)",
        ControlRequest::Migrate { .. } => "migrated",
    };
    let failure = Failure::new(
        ErrorCode::COMMAND_NOT_EXECUTED,
        format!(
            "An enclave cannot be {what}: Nitro enclaves cannot be paused, snapshotted or migrated, \
             and a restored copy would repeat the enclave's secrets and nonces."
        ),
    );
    let reply = ControlReply {
        error: Some(format!("[ {} ] {}", failure.code, failure.message)),
        status: Some(failure.code.number()),
        ..Default::default()
    };
    carve_vmm::control::send_reply(stream, &reply);
}

/// One connection on the control socket.
struct Session {
    state: Arc<EnclaveState>,
    ending: Arc<Ending>,
    terminating: Arc<AtomicBool>,
    stopper: VmStopper,
    console: Console,
    owner: u32,
}

impl Session {
    fn run(self, mut stream: UnixStream) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let request = match receive::<Incoming>(&mut BufReader::new(&stream)) {
            Ok(Some(Incoming::Enclave(request))) => request,
            Ok(Some(Incoming::Vm(request))) => return refuse_vm_control(stream, &request),
            _ => return,
        };
        let reply = match request {
            Request::Describe => {
                let mut state = (*self.state).clone();
                if self.terminating.load(Ordering::Acquire) {
                    state.state = "TERMINATING".into();
                }
                Reply::Described(Box::new(state))
            }
            Request::Terminate => {
                let peer = rustix::net::sockopt::socket_peercred(&stream).map(|c| c.uid.as_raw());
                match peer {
                    Ok(uid) if uid == 0 || uid == self.owner => {
                        // Said at once: a process that cannot say even this is not answering.
                        // A client that gave up waiting (this process was stopped) is gone, and
                        // so is its request: nobody hears the enclave was terminated.
                        if send(&mut stream, &Reply::Terminating).is_err() {
                            return;
                        }
                        self.terminating.store(true, Ordering::Release);
                        self.stopper.stop();
                        self.ending.wait();
                        Reply::Done
                    }
                    _ => Reply::Failed(Failure::new(
                        ErrorCode::COMMAND_NOT_EXECUTED,
                        format!(
                            "only the user who launched enclave {} (uid {}) or root may terminate it",
                            self.state.run.id, self.owner
                        ),
                    )),
                }
            }
            Request::Wait => Reply::Ended(self.ending.wait()),
            Request::Console if !self.state.debug_mode => Reply::Failed(Failure::new(
                ErrorCode::CONSOLE_CONNECTION,
                "The enclave was not started with the debug flag set, so its console cannot be attached",
            )),
            Request::Console => {
                if send(&mut stream, &Reply::Done).is_ok() {
                    self.stream_console(&mut stream);
                }
                return;
            }
        };
        let _ = send(&mut stream, &reply);
    }

    fn stream_console(&self, stream: &mut UnixStream) {
        let mut at = self.console.oldest();
        loop {
            match self.console.read(at, Duration::from_millis(200)) {
                Chunk::Data(data, next) => {
                    if stream.write_all(&data).is_err() {
                        return;
                    }
                    at = next;
                }
                // A reader that went away while the console was quiet is only seen by asking.
                Chunk::Idle if peer_closed(stream) => return,
                Chunk::Idle => {}
                Chunk::Closed => return,
            }
        }
    }
}

/// Whether the other end of `stream` has closed (what it sends is not used).
fn peer_closed(stream: &UnixStream) -> bool {
    let mut fds = [rustix::event::PollFd::new(stream, rustix::event::PollFlags::IN)];
    let now = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    match rustix::event::poll(&mut fds, Some(&now)) {
        Ok(0) => false,
        Ok(_) => {
            let mut scratch = [0u8; 256];
            let _ = stream.set_nonblocking(true);
            let closed = matches!(std::io::Read::read(&mut &*stream, &mut scratch), Ok(0) | Err(_));
            let _ = stream.set_nonblocking(false);
            closed
        }
        Err(_) => true,
    }
}
