//! `carve vm run`, `carve vm check-state` and `carve vm cpu-templates`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use carve_enclave::nsm::EnclaveNsm;
use carve_nsm::pcr::ParentIdentity;
use carve_vmm::control::{ControlError, ControlReply, ControlRequest};
use carve_vmm::cpu_features::{sgx, CpuFeatures};
use carve_vmm::cpuid::CpuTemplate;
use carve_vmm::exit::STATUS_CARVE_ERROR;
use carve_vmm::guest_state::file::StateFile;
use carve_vmm::guest_state::{self, Platform};
use carve_vmm::kvm_state::TimePolicy;
use carve_vmm::memory::MemorySpec;
use carve_vmm::migration::{Incoming, IncomingConfig};
use carve_vmm::snapshot::{RestoreConfig, VmSnapshot};
use carve_vmm::{EntryCheck, ExtraDevice, KernelSpec, SerialSink, Vm, VmConfig, VmExit, VsockConfig};
use clap::{ArgGroup, Args, Subcommand};

#[derive(Subcommand)]
pub enum VmCommand {
    /// Boot a kernel (bzImage, PVH ELF or multiboot ELF) or the built-in demo guest.
    Run(Box<RunArgs>),
    /// Check a vCPU state file against the VM-entry guest-state rules (status 1 if any break).
    CheckState(CheckStateArgs),
    /// Pause a running VM: every vCPU and device backend stops at a consistent point.
    Pause(ControlArgs),
    /// Resume a paused VM exactly where it stopped.
    Resume(ResumeArgs),
    /// Describe a running VM: state, uptime, time paused, exits, and its memory activity
    /// (dirty-page rate, working set) over a short sample.
    Describe(DescribeArgs),
    /// Save a running VM to a new directory (it is paused meanwhile, then runs on).
    Snapshot(SnapshotArgs),
    /// Run a VM from a snapshot, exactly where it was saved.
    Restore(RestoreArgs),
    /// Send a running VM to `carve vm run --incoming` on another host (or here): it runs on
    /// there, paused only for the last round, and ends here.
    Migrate(MigrateArgs),
    /// List the CPU templates `--cpu-template` accepts.
    CpuTemplates {
        /// Print the templates as JSON (the data carve applies).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
#[command(group(ArgGroup::new("image").required(true).args(["kernel", "demo", "eif", "incoming"])))]
#[command(group(ArgGroup::new("with_nsm").args(["nsm", "eif"]).multiple(true)))]
pub struct RunArgs {
    /// Kernel image: bzImage, ELF vmlinux with a PVH note, or multiboot v1 ELF.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Wait on HOST:PORT for a VM that `carve vm migrate` sends, and run it. Its memory is
    /// --memory (the VM's size; its size by default), its serial, vsock and control as given
    /// here; the guest must use no CPU feature this host (narrowed by --cpu-template) lacks.
    #[arg(
        long,
        value_name = "HOST:PORT",
        conflicts_with_all = ["initrd", "dump_state", "load_state", "nsm", "testdev", "cpu_features", "nested", "sgx_epc", "vcpus"]
    )]
    incoming: Option<String>,
    /// Run the built-in demo guest instead of a kernel file.
    #[arg(long)]
    demo: bool,
    /// Boot an enclave image (EIF) as Nitro does, with an NSM holding its PCRs. Its console is
    /// readable only with --debug-mode, which makes the image PCRs read as zero.
    #[arg(long, value_name = "PATH", conflicts_with = "initrd")]
    eif: Option<PathBuf>,
    /// Run the enclave image in debug mode: console readable, image PCRs zero.
    #[arg(long)]
    debug_mode: bool,
    /// Kernel command line.
    #[arg(long, value_name = "TEXT", default_value = "")]
    cmdline: String,
    /// Initial ramdisk (multiboot: module 0; PVH: module 0).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Guest memory: SIZE in MiB (or 512M, 2G), then optionally `backing=anonymous` (the
    /// default), `memfd` (shared, for vhost-user and live upgrade), `hugetlb-2m` or `hugetlb-1g`
    /// (SIZE a whole number of pages), and `mergeable=on|off` (KSM; anonymous only, never an
    /// enclave's). See docs/memory.md.
    #[arg(long, value_name = "SIZE[,backing=anonymous|memfd|hugetlb-2m|hugetlb-1g][,mergeable=on|off]")]
    memory: Option<String>,
    /// Number of vCPUs (1 by default).
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    /// CPU template masking guest CPUID: a name (see `carve vm cpu-templates`) or a FILE.json
    /// of the same shape; with --incoming, what this destination offers.
    #[arg(long, value_name = "NAME")]
    cpu_template: Option<String>,
    /// CPU features beyond the template, comma-separated: cet, nested (see `carve host`). Each is
    /// refused, before the VM starts, on a host whose KVM cannot give it.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    cpu_features: Vec<String>,
    /// Expose SVM (AMD) or VMX (Intel) to the guest: the same as --cpu-features nested.
    #[arg(long)]
    nested: bool,
    /// Give the guest SGX with a virtual EPC section of SIZE (64M, 32MiB, 1G or bytes; whole
    /// 4 KiB pages), populated at start with `,prefault`. Repeat for more sections. Refused on a
    /// host whose KVM offers no SGX (see `carve host`); such a VM cannot be snapshotted.
    #[arg(long, value_name = "SIZE[,prefault]", action = clap::ArgAction::Append, value_parser = sgx::parse_section)]
    sgx_epc: Vec<sgx::EpcSection>,
    /// Serial console destination: stdout (the default), file:PATH or none.
    #[arg(long, value_name = "SINK", value_parser = parse_serial)]
    serial: Option<SerialArg>,
    /// Map QEMU's pc-testdev (I/O 0xe0-0xeb, 0x2000-0x2017; MMIO 0xff000000) for kvm-unit-tests.
    #[arg(long)]
    testdev: bool,
    /// Print exit counters to standard error when the VM ends.
    #[arg(long)]
    stats: bool,
    /// Attach a virtio-vsock device: guest CID N; the host side is the Unix socket PATH
    /// (`CONNECT <port>` to reach a guest port) and PATH_<port> for guest connections.
    #[arg(long, value_name = "cid=N,uds=PATH", value_parser = parse_vsock)]
    vsock: Option<VsockConfig>,
    /// Attach a Nitro Secure Module (virtio-nsm) whose attestation documents carve's local CA
    /// signs (`carve attestation root`).
    #[arg(long)]
    nsm: bool,
    /// The parent's role, measured into the NSM's PCR3.
    #[arg(long, value_name = "TEXT", requires = "with_nsm")]
    parent_role: Option<String>,
    /// The parent's instance ID, measured into the NSM's PCR4.
    #[arg(long, value_name = "TEXT", requires = "with_nsm")]
    parent_id: Option<String>,
    /// Write vCPU 0's initial state (the `check-state` JSON format) to FILE before running.
    #[arg(long, value_name = "FILE")]
    dump_state: Option<PathBuf>,
    /// Start vCPU 0 with the segment, control registers and RFLAGS of a state file.
    #[arg(long, value_name = "FILE")]
    load_state: Option<PathBuf>,
    /// Answer `carve vm pause|resume|describe|snapshot --control PATH` on this Unix socket.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

#[derive(Args)]
pub struct ControlArgs {
    /// The VM's control socket (`carve vm run --control PATH`).
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
}

#[derive(Args)]
pub struct DescribeArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// Watch the guest's memory this long for its dirty-page rate and working set (0: do not).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    sample_ms: u64,
}

#[derive(Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// The destination: `carve vm run --incoming HOST:PORT` there.
    #[arg(long, value_name = "HOST:PORT")]
    to: String,
    /// The longest pause acceptable: pre-copy rounds go on until the rest fits in it (or
    /// 30 rounds have gone).
    #[arg(long, value_name = "MS", default_value_t = carve_vmm::migration::DEFAULT_DOWNTIME_MS)]
    downtime_ms: u64,
    /// Print the migration's figures as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ResumeArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// Whether the guest sees the time it spent paused: `elapsed` (its clocks ran on) or
    /// `frozen` (they go on from their values at the pause).
    #[arg(long, value_name = "elapsed|frozen", default_value = "elapsed", value_parser = parse_time)]
    time: TimePolicy,
}

#[derive(Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// The directory to write (new, or empty): `state` and `memory`.
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// The snapshot directory (`carve vm snapshot --to DIR`).
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// Serial console destination: stdout (the default), file:PATH or none.
    #[arg(long, value_name = "SINK", value_parser = parse_serial)]
    serial: Option<SerialArg>,
    /// The vsock device's host side, if not where it was saved; the CID must be the saved one.
    #[arg(long, value_name = "cid=N,uds=PATH", value_parser = parse_vsock)]
    vsock: Option<VsockConfig>,
    /// Whether the guest sees the time the snapshot spent on disk: `frozen` (its clocks go on
    /// from the saved values) or `elapsed` (they advance by the wall time since the save).
    #[arg(long, value_name = "frozen|elapsed", default_value = "frozen", value_parser = parse_time)]
    time: TimePolicy,
    /// Answer `carve vm pause|resume|describe|snapshot --control PATH` on this Unix socket.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Print exit counters to standard error when the VM ends.
    #[arg(long)]
    stats: bool,
}

fn parse_time(text: &str) -> Result<TimePolicy, String> {
    match text {
        "frozen" => Ok(TimePolicy::Frozen),
        "elapsed" => Ok(TimePolicy::HostElapsed),
        _ => Err("expected frozen or elapsed".into()),
    }
}

#[derive(Args)]
pub struct CheckStateArgs {
    /// State file: segments (kvm_segment fields), gdt, idt, cr0, cr3, cr4, efer, rflags.
    #[arg(long, value_name = "FILE.json")]
    state: PathBuf,
    /// Check as with or without VMX "unrestricted guest" (default: as this host's KVM).
    #[arg(long, value_name = "true|false", action = clap::ArgAction::Set)]
    unrestricted_guest: Option<bool>,
}

#[derive(Clone)]
enum SerialArg {
    Stdout,
    File(PathBuf),
    None,
}

fn parse_serial(text: &str) -> Result<SerialArg, String> {
    match text {
        "stdout" => Ok(SerialArg::Stdout),
        "none" => Ok(SerialArg::None),
        _ => match text.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(SerialArg::File(path.into())),
            _ => Err("expected stdout, file:PATH or none".into()),
        },
    }
}

fn parse_vsock(text: &str) -> Result<VsockConfig, String> {
    let (mut cid, mut uds, mut shared_listeners) = (None, None, None);
    for part in text.split(',') {
        match part.split_once('=') {
            Some(("cid", value)) => {
                let value: u64 = value.parse().map_err(|_| format!("cid '{value}' is not a number"))?;
                carve_virtio::vsock::validate_cid(value).map_err(|e| e.to_string())?;
                cid = Some(value);
            }
            Some(("uds", path)) if !path.is_empty() => uds = Some(PathBuf::from(path)),
            Some(("shared", path)) if !path.is_empty() => shared_listeners = Some(PathBuf::from(path)),
            _ => return Err(format!("unexpected '{part}'; expected cid=N,uds=PATH[,shared=PREFIX]")),
        }
    }
    match (cid, uds) {
        (Some(cid), Some(uds)) => Ok(VsockConfig { cid, uds, shared_listeners }),
        _ => Err("both cid=N and uds=PATH are needed".into()),
    }
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("carve: error: {message}");
    ExitCode::from(STATUS_CARVE_ERROR as u8)
}

pub fn run(command: VmCommand) -> ExitCode {
    match command {
        VmCommand::Run(args) => run_vm(*args),
        VmCommand::CheckState(args) => check_state(args),
        VmCommand::Pause(args) => control(&args, ControlRequest::Pause),
        VmCommand::Resume(args) => {
            let hide_pause = args.time == TimePolicy::Frozen;
            control(&args.control, ControlRequest::Resume { hide_pause })
        }
        VmCommand::Describe(args) => {
            control(&args.control, ControlRequest::Describe { sample_ms: args.sample_ms })
        }
        VmCommand::Migrate(args) => migrate(args),
        VmCommand::Snapshot(args) => {
            control(&args.control, ControlRequest::Snapshot { to: absolute(&args.to) })
        }
        VmCommand::Restore(args) => restore(args),
        VmCommand::CpuTemplates { json } => {
            if json {
                println!("{}", templates_json());
                return ExitCode::SUCCESS;
            }
            for template in CpuTemplate::all() {
                println!("{:<10} {}", template.name, template.description);
            }
            println!("(CET, SGX and nested virtualisation are asked for apart from templates: `carve host`)");
            ExitCode::SUCCESS
        }
    }
}

/// The templates carve applies, with what this host's KVM offers beyond them (`carve host`).
fn templates_json() -> String {
    let templates: Vec<serde_json::Value> = CpuTemplate::all()
        .iter()
        .map(|t| {
            serde_json::json!({
                "name": t.name,
                "clears": t.clear_bits.iter().map(|c| c.feature.as_str()).collect::<Vec<_>>(),
                "removes_leaves": t.remove_leaves.iter().map(|r| format!("{:#x}", r.leaf)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let host = match crate::host::features() {
        Ok(host) => serde_json::json!({ "features": host }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    serde_json::to_string_pretty(&serde_json::json!({ "templates": templates, "host": host }))
        .expect("the templates serialise")
}

fn run_vm(args: RunArgs) -> ExitCode {
    if args.incoming.is_some() {
        return incoming(args);
    }
    let cpu_template = match cpu_template(args.cpu_template.as_deref().unwrap_or("host")) {
        Ok(template) => template,
        Err(e) => return fail(e),
    };
    let mut cpu_features =
        CpuFeatures { nested: args.nested, sgx_epc: args.sgx_epc, ..CpuFeatures::default() };
    for name in &args.cpu_features {
        if let Err(e) = cpu_features.enable(name.trim()) {
            // A usage error, as clap's own (status 2).
            eprintln!("carve: error: {e}");
            return ExitCode::from(2);
        }
    }
    let kernel = match (args.kernel, &args.eif) {
        (Some(path), _) => KernelSpec::Path(path),
        (None, Some(eif)) => KernelSpec::Eif(eif.clone()),
        (None, None) => KernelSpec::Embedded { name: "carve-demo", image: carve_guest_images::DEMO_ELF },
    };
    // clap does not enforce `requires` on a plain flag.
    if args.debug_mode && args.eif.is_none() {
        eprintln!("carve: error: --debug-mode applies to enclave images; use it with --eif");
        return ExitCode::from(2);
    }
    // As on Nitro, only a debug-mode enclave's console can be read.
    let serial = match (args.serial, args.eif.is_some() && !args.debug_mode) {
        (None | Some(SerialArg::None), true) => SerialArg::None,
        (Some(_), true) => {
            eprintln!(
                "carve: error: the console of an enclave image not in debug mode cannot be read; add \
                 --debug-mode (its image PCRs then read as zero)"
            );
            return ExitCode::from(2);
        }
        (serial, false) => serial.unwrap_or(SerialArg::Stdout),
    };
    let memory = match parse_memory(args.memory.as_deref().unwrap_or("128")) {
        Ok(memory) => memory,
        Err(status) => return status,
    };
    if memory.mergeable && args.eif.is_some() {
        eprintln!(
            "carve: error: enclaves never merge memory: KSM sharing pages between enclaves would be a \
             cross-enclave side channel; drop mergeable=on"
        );
        return ExitCode::from(2);
    }
    let load_state = match args.load_state.as_deref().map(read_state).transpose() {
        Ok(state) => state,
        Err(e) => return fail(e),
    };
    // An enclave image always comes with its NSM; a plain VM's has zero image PCRs.
    let nsm = if args.nsm || args.eif.is_some() {
        match crate::attestation::open_ca() {
            Ok(ca) => Some(EnclaveNsm {
                module_id: format!("i-0000000000000000-vm{:x}", std::process::id()),
                parent: ParentIdentity { role: args.parent_role, instance_id: args.parent_id },
                debug_mode: args.debug_mode,
                ca,
            }),
            Err(e) => return fail(e),
        }
    } else {
        None
    };
    let serial_to_stdout = matches!(serial, SerialArg::Stdout);
    let config = VmConfig {
        cmdline: args.cmdline,
        initrd: args.initrd,
        memory_mib: memory.mib,
        memory_backing: memory.backing,
        memory_mergeable: memory.mergeable,
        vcpus: args.vcpus.unwrap_or(1),
        cpu_template,
        cpu_features,
        serial: serial_sink(serial),
        serial_input: serial_to_stdout,
        testdev: args.testdev,
        load_state,
        entry_check: EntryCheck::default(),
        vsock: args.vsock,
        ..VmConfig::new(kernel)
    };
    let extra: Vec<Box<dyn ExtraDevice>> =
        nsm.into_iter().map(|nsm| Box::new(nsm) as Box<dyn ExtraDevice>).collect();
    let vm = match Vm::build(config, extra) {
        Ok(vm) => vm,
        Err(e) => return fail(e),
    };
    for warning in vm.entry_warnings().iter().map(String::as_str).chain(vm.cpu_template_warning()) {
        eprintln!("carve: warning: {warning}");
    }
    if let Some(path) = &args.dump_state {
        if let Err(e) = dump_state(&vm, path) {
            return fail(e);
        }
    }
    run_to_end(vm, args.control.as_deref(), args.stats)
}

/// A built-in template by name, or one of the same JSON shape (`carve vm cpu-templates --json`)
/// in a file ending in `.json`, as Firecracker's custom CPU templates.
fn cpu_template(name: &str) -> Result<CpuTemplate, String> {
    if !name.ends_with(".json") {
        return CpuTemplate::named(name).map_err(|e| e.to_string());
    }
    let text =
        std::fs::read_to_string(name).map_err(|e| format!("cannot read the CPU template {name}: {e}"))?;
    CpuTemplate::from_json(&text).map_err(|e| format!("the CPU template {name} is not valid: {e}"))
}

/// `--memory`, parsed here rather than by clap so a bad value is one line (status 2, as clap's).
fn parse_memory(text: &str) -> Result<MemorySpec, ExitCode> {
    MemorySpec::parse(text).map_err(|e| {
        eprintln!("carve: error: invalid --memory '{text}': {e}");
        ExitCode::from(2)
    })
}

fn serial_sink(serial: SerialArg) -> SerialSink {
    match serial {
        SerialArg::Stdout => SerialSink::Stdout,
        SerialArg::File(path) => SerialSink::File(path),
        SerialArg::None => SerialSink::None,
    }
}

/// `vm run --incoming`: waits for one VM, then runs it as a restored one.
fn incoming(args: RunArgs) -> ExitCode {
    let address = args.incoming.as_deref().expect("only called with --incoming");
    let memory = match args.memory.as_deref().map(parse_memory).transpose() {
        Ok(memory) => memory,
        Err(status) => return status,
    };
    let cpu_template = match args.cpu_template.as_deref().map(cpu_template).transpose() {
        Ok(template) => template,
        Err(e) => return fail(e),
    };
    let serial = args.serial.unwrap_or(SerialArg::Stdout);
    let config = IncomingConfig {
        memory,
        cpu_template,
        restore: RestoreConfig {
            serial_input: matches!(serial, SerialArg::Stdout),
            serial: serial_sink(serial),
            vsock: args.vsock,
            nsm_ca: None,
            time: TimePolicy::HostElapsed,
        },
        nsm_ca: Some(Box::new(|| crate::attestation::open_ca().map_err(|e| e.to_string()))),
    };
    let listener = match Incoming::listen(address) {
        Ok(listener) => listener,
        Err(e) => return fail(e),
    };
    let bound = listener.local_addr().map_or_else(|_| address.to_string(), |a| a.to_string());
    eprintln!("carve: waiting for a VM on {bound}");
    match listener.receive(config) {
        Ok(vm) => {
            eprintln!("carve: the VM arrived; it runs here now");
            run_to_end(vm, args.control.as_deref(), args.stats)
        }
        Err(e) => fail(e),
    }
}

/// `vm migrate`: asks the VM to go, prints what it took.
fn migrate(args: MigrateArgs) -> ExitCode {
    let request = ControlRequest::Migrate { to: args.to, downtime_ms: args.downtime_ms };
    send(&args.control.control, &request, |reply| {
        let Some(report) = reply.migration else { return fail("the VM answered without a migration report") };
        let text = if args.json {
            serde_json::to_string_pretty(&report).expect("reports serialise")
        } else {
            format!(
                "migrated to {} in {:.1} ms, paused {:.1} ms; {} rounds, {} pages, {:.1} MiB sent of {} MiB",
                report.to,
                report.total_us as f64 / 1e3,
                report.downtime_us as f64 / 1e3,
                report.rounds,
                report.pages_sent,
                report.bytes_sent as f64 / (1 << 20) as f64,
                report.guest_bytes >> 20
            )
        };
        let _ = writeln!(std::io::stdout(), "{text}");
        ExitCode::SUCCESS
    })
}

/// Runs a built or restored VM and reports how it ended.
fn run_to_end(vm: Vm, control: Option<&Path>, stats: bool) -> ExitCode {
    let outcome = match vm.run_with_control(control) {
        Ok(outcome) => outcome,
        Err(e) => return fail(e),
    };
    if stats {
        let io = outcome.io;
        eprintln!(
            "carve: exits: pio={} mmio={} ignored_pio={} ignored_mmio={} int3_delivered={}",
            io.pio_exits, io.mmio_exits, io.ignored_pio, io.ignored_mmio, io.breakpoints
        );
    }
    match &outcome.exit {
        VmExit::Crash(report) => eprintln!("carve: guest crashed: {}", report.explanation),
        VmExit::VmmFailure(message) => eprintln!("carve: error: {message}"),
        VmExit::Halted => eprintln!("carve: {}; the VM is over", outcome.exit),
        VmExit::Migrated { .. } => eprintln!("carve: {}", outcome.exit),
        _ => {}
    }
    ExitCode::from(outcome.exit.status() as u8)
}

/// The VM resolves paths in its own working directory, which need not be ours.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn restore(args: RestoreArgs) -> ExitCode {
    let snapshot = match VmSnapshot::read(&args.from) {
        Ok(snapshot) => snapshot,
        Err(e) => return fail(e),
    };
    let nsm_ca = if snapshot.has_nsm() {
        match crate::attestation::open_ca() {
            Ok(ca) => Some(ca),
            Err(e) => return fail(e),
        }
    } else {
        None
    };
    let serial = args.serial.unwrap_or(SerialArg::Stdout);
    let config = RestoreConfig {
        serial_input: matches!(serial, SerialArg::Stdout),
        serial: serial_sink(serial),
        vsock: args.vsock,
        nsm_ca,
        time: args.time,
    };
    match Vm::restore(&args.from, &snapshot, config) {
        Ok(vm) => run_to_end(vm, args.control.as_deref(), args.stats),
        Err(e) => fail(e),
    }
}

/// Sends one request to a running VM; `describe` prints its JSON, the others print nothing.
fn control(args: &ControlArgs, request: ControlRequest) -> ExitCode {
    send(&args.control, &request, |reply| {
        if let Some(description) = reply.description {
            let text = serde_json::to_string_pretty(&description).expect("descriptions serialise");
            // A reader that left (`| head`) loses the rest, nothing more.
            let _ = writeln!(std::io::stdout(), "{text}");
        }
        ExitCode::SUCCESS
    })
}

/// Sends `request` to the VM at `path`; `answered` prints what its reply says. A refusal is one
/// line: the answering side's own scheme (an enclave's nitro-cli error) printed as it is.
fn send(path: &Path, request: &ControlRequest, answered: impl FnOnce(ControlReply) -> ExitCode) -> ExitCode {
    match carve_vmm::control::request(path, request) {
        Ok(reply) => answered(reply),
        Err(ControlError::Refused { message, status: Some(status) }) => {
            eprintln!("{message}");
            ExitCode::from(status)
        }
        Err(e) => fail(e),
    }
}

fn read_state(path: &Path) -> Result<StateFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read state file {}: {e}", path.display()))?;
    StateFile::parse(&text).map_err(|e| format!("state file {}: {e}", path.display()))
}

fn dump_state(vm: &Vm, path: &Path) -> Result<(), String> {
    let vcpu = vm.boot_vcpu();
    let read_failed = |e: kvm_ioctls::Error| format!("cannot read vCPU 0's state: {e}");
    let sregs = vcpu.get_sregs().map_err(read_failed)?;
    let regs = vcpu.get_regs().map_err(read_failed)?;
    let cet = vm.boot_vcpu_cet().map_err(read_failed)?;
    let state = StateFile { cet: cet.map(Into::into), ..StateFile::from_kvm(&sregs, regs.rflags) };
    std::fs::write(path, state.to_json())
        .map_err(|e| format!("cannot write state file {}: {e}", path.display()))
}

fn check_state(args: CheckStateArgs) -> ExitCode {
    let state = match read_state(&args.state) {
        Ok(state) => state,
        Err(e) => return fail(e),
    };
    let mut platform = host_platform();
    if let Some(unrestricted) = args.unrestricted_guest {
        platform.unrestricted_guest = unrestricted;
    }
    let violations = guest_state::check(&state.guest_state(&platform), &platform);
    for violation in &violations {
        println!("{violation}");
    }
    if violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// This host as KVM presents it, or an Intel host with unrestricted guest when KVM is absent.
fn host_platform() -> Platform {
    kvm_ioctls::Kvm::new()
        .and_then(|kvm| kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES))
        .map(|cpuid| Platform::host(&cpuid))
        .unwrap_or(Platform::intel(true))
}
