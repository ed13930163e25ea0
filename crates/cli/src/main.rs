//! `carve`: Nitro-Enclaves-style enclaves on any KVM host. nitro-cli's image commands
//! (`build-enclave`, `describe-eif`, `sign-eif`, `pcr`, `explain`), `carve attestation` and
//! `carve vm`.

mod attestation;
mod enclave;
mod host;
mod image;
mod logger;
mod nitro_cli;
mod nitro_error;
mod pcr_diff;
mod vm;
mod vsock_proxy;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// See Cargo.toml: musl's allocator costs the static build a millisecond of system calls.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

#[derive(Parser)]
#[command(name = "carve", version, about = "Run Nitro-Enclaves-style enclaves on any Linux host with KVM")]
struct Cli {
    /// How much carve logs to standard error: error, warn, info or debug.
    #[arg(long, global = true, value_name = "LEVEL", default_value = "warn", value_parser = logger::parse_level)]
    log_level: log::LevelFilter,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start an enclave from an EIF (or --demo) on CPUs and hugepages from the pool.
    RunEnclave(Box<enclave::RunArgs>),
    /// Describe the running enclaves (JSON array).
    DescribeEnclaves(enclave::DescribeArgs),
    /// Terminate an enclave (or --all), giving its CPUs and memory back.
    TerminateEnclave(enclave::TerminateArgs),
    /// Stream a debug-mode enclave's console.
    Console(enclave::ConsoleArgs),
    /// Block until an enclave ends and say why (carve's addition to nitro-cli).
    Wait(enclave::WaitArgs),
    /// Set the enclave CPU pool and reserve its hugepages (nitro-cli's allocator service).
    Allocator(enclave::AllocatorArgs),
    /// The enclave process (started by run-enclave; not for direct use).
    #[command(name = "__enclave-process", hide = true)]
    EnclaveProcess,
    /// Run and inspect plain microVMs (carve's VMM underneath enclaves).
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Build an enclave image (EIF) from a kernel and ramdisks or from a container image archive.
    BuildEnclave(Box<image::BuildArgs>),
    /// Describe an EIF: version, measurements, signature, CRC and metadata.
    DescribeEif(image::DescribeArgs),
    /// Sign an EIF (replacing any signature) with a PEM key and certificate.
    SignEif(image::SignArgs),
    /// Print the PCR of a file's bytes, or PCR8 of a signing certificate.
    Pcr(image::PcrArgs),
    /// carve's attestation CA: print its root, verify attestation documents.
    #[command(subcommand)]
    Attestation(attestation::AttestationCommand),
    /// Which PCRs of two enclave images differ, and the sections and files that make them.
    PcrDiff(pcr_diff::PcrDiffArgs),
    /// Relay every enclave's connections to a vsock port to a TCP server (AWS's vsock-proxy).
    VsockProxy(vsock_proxy::ProxyArgs),
    /// What this host's KVM can give a guest: CET, SGX, nested virtualisation (carve's own).
    Host(host::HostArgs),
    /// Explain a nitro-cli error code (Exx).
    Explain {
        #[arg(long, value_name = "Exx")]
        error_code: String,
    },
}

/// nitro-cli's name and version, for when carve is installed as `nitro-cli`.
const NITRO_CLI_NAME: &str = "nitro-cli";
const NITRO_CLI_VERSION: &str = "1.5.0";

/// A VM holds a descriptor per routed MSI vector (thousands with the message-store device),
/// per vsock connection and per vCPU; the usual soft limit of 1024 is far below what KVM routes.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the rlimit passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn main() -> ExitCode {
    raise_open_file_limit();
    if invoked_as() == Some(std::ffi::OsString::from(vsock_proxy::NAME)) {
        return run_as_vsock_proxy();
    }
    let (cli, as_nitro_cli) = parse_command_line();
    let nitro = match as_nitro_cli
        .then(|| nitro_cli::NitroCli::enter(matches!(cli.command, Command::BuildEnclave(_))))
    {
        Some(Err(failure)) => return failure.report(),
        Some(Ok(nitro)) => Some(nitro),
        None => None,
    };
    // An enclave process's log (run dir's enclaves.log) records at least its life events.
    let is_enclave_process = matches!(cli.command, Command::EnclaveProcess);
    let level = if is_enclave_process { cli.log_level.max(log::LevelFilter::Info) } else { cli.log_level };
    // As nitro-cli, also into its log file, at RUST_LOG's level (info by default).
    let nitro_log = nitro.as_ref().and_then(nitro_cli::NitroCli::log_file).map(|file| {
        let level = std::env::var("RUST_LOG").ok().and_then(|l| logger::parse_level(&l).ok());
        (file, level.unwrap_or(log::LevelFilter::Info))
    });
    logger::init_with_file(level, nitro_log);
    let result = match cli.command {
        Command::EnclaveProcess => return enclave::enclave_process(),
        Command::Allocator(args) => return enclave::allocator(args),
        Command::RunEnclave(args) => enclave::run_enclave(*args),
        Command::DescribeEnclaves(args) => enclave::describe_enclaves(args),
        Command::TerminateEnclave(args) => enclave::terminate_enclave(args),
        Command::Console(args) => enclave::console(args),
        Command::Wait(args) => enclave::wait(args),
        Command::Vm(command) => return vm::run(command),
        Command::Attestation(command) => return attestation::run(command),
        Command::Host(args) => return host::run(args),
        Command::Explain { error_code } => return nitro_error::explain(&error_code),
        Command::VsockProxy(args) => return vsock_proxy::run(args),
        Command::PcrDiff(args) => return pcr_diff::run(args),
        Command::BuildEnclave(args) => image::build_enclave(*args),
        Command::DescribeEif(args) => image::describe_eif(args),
        Command::SignEif(args) => image::sign_eif(args),
        Command::Pcr(args) => image::pcr(args),
    };
    match (result, nitro) {
        (Ok(()), _) => ExitCode::SUCCESS,
        (Err(error), Some(nitro)) => {
            nitro.log_failure(&error);
            error.report_logging_to(Some((nitro.logs(), &carve_eif::metadata::rfc3339_now())))
        }
        (Err(error), None) => error.report(),
    }
}

/// Invoked as `nitro-cli` (a symlink or copy), carve answers as nitro-cli: its name in help
/// and errors, `Nitro CLI 1.5.0` for `--version`.
fn parse_command_line() -> (Cli, bool) {
    use clap::{CommandFactory, FromArgMatches};
    let mut command = Cli::command();
    let as_nitro_cli = invoked_as().as_deref() == Some(std::ffi::OsStr::new(NITRO_CLI_NAME));
    if as_nitro_cli {
        command = command
            .name(NITRO_CLI_NAME)
            .bin_name(NITRO_CLI_NAME)
            .display_name("Nitro CLI")
            .version(NITRO_CLI_VERSION)
            .arg_required_else_help(true);
    }
    let matches = command.get_matches();
    (Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()), as_nitro_cli)
}

/// The file name carve was started as (`nitro-cli` and `vsock-proxy` are links to it).
fn invoked_as() -> Option<std::ffi::OsString> {
    std::env::args_os()
        .next()
        .map(|arg0| std::path::Path::new(&arg0).file_name().map(|n| n.to_os_string()).unwrap_or(arg0))
}

/// Invoked as `vsock-proxy`, carve is AWS's vsock-proxy: its command line, name and version,
/// and its logging (`RUST_LOG`, errors only by default).
fn run_as_vsock_proxy() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let command = vsock_proxy::VsockProxyCli::command()
        .name(vsock_proxy::TITLE)
        .bin_name(vsock_proxy::NAME)
        .about(vsock_proxy::TITLE)
        .version(vsock_proxy::VERSION);
    let matches = command.get_matches();
    let cli = vsock_proxy::VsockProxyCli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Where nitro-cli's enclaves are, when carve runs them as nitro-cli with that override.
    if let Some(sockets) = std::env::var_os("NITRO_CLI_SOCKETS_PATH").filter(|s| !s.is_empty()) {
        std::env::set_var("CARVE_RUN_DIR", sockets);
    }
    let level = std::env::var("RUST_LOG").ok().and_then(|l| logger::parse_level(&l).ok());
    logger::init(level.unwrap_or(log::LevelFilter::Error));
    vsock_proxy::run(cli.args)
}
