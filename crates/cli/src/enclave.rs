//! nitro-cli's enclave lifecycle commands (`run-enclave`, `describe-enclaves`,
//! `terminate-enclave`, `console`), carve's `wait` and `allocator`, and the hidden command that
//! becomes an enclave process. The work is in `carve_enclave`; this is flags and output.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use carve_eif::metadata::IdentityInfo;
use carve_enclave::args::{check_cid, parse_memory, parse_number, CpuRequest, RunEnclaveArgs};
use carve_enclave::client::{self, Selector};
use carve_enclave::pool::{self, AllocatorConfig, AllocatorError, Pool, Topology};
use carve_enclave::protocol::{EnclaveState, LaunchRequest, RunInfo};
use carve_enclave::run_dir::RunDir;

use clap::{ArgGroup, Args};
use serde::Serialize;

use crate::image::IdentityOutput;
use carve_nitro_error::{ErrorCode, Failure};

#[derive(Args)]
#[command(group(ArgGroup::new("cpus").required(true).args(["cpu_ids", "cpu_count", "config"])))]
#[command(group(ArgGroup::new("image").args(["eif_path", "demo"])))]
pub struct RunArgs {
    /// CPUs from the enclave CPU pool to give the enclave.
    #[arg(long, value_name = "ID", num_args = 1.., conflicts_with = "config")]
    cpu_ids: Option<Vec<String>>,
    /// How many pool CPUs to give the enclave.
    #[arg(long, value_name = "N", conflicts_with = "config")]
    cpu_count: Option<String>,
    /// Enclave memory: MiB, or with a unit M, G or T.
    #[arg(long, value_name = "SIZE", required_unless_present = "config", conflicts_with = "config")]
    memory: Option<String>,
    /// The enclave image.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["config", "demo"], conflicts_with = "config")]
    eif_path: Option<PathBuf>,
    /// Run carve's built-in demo enclave image.
    #[arg(long, conflicts_with = "config")]
    demo: bool,
    /// The enclave's vsock CID (0 or absent: carve chooses).
    #[arg(long, value_name = "CID", conflicts_with = "config")]
    enclave_cid: Option<String>,
    /// Debug mode: the console can be read; the image PCRs read as zero.
    #[arg(long, conflicts_with = "config")]
    debug_mode: bool,
    /// Attach to the console once the enclave runs (implies --debug-mode).
    #[arg(long)]
    attach_console: bool,
    /// A name for the enclave (default: the image's file name without .eif).
    #[arg(long, value_name = "NAME", conflicts_with = "config")]
    enclave_name: Option<String>,
    /// The parent's role, measured into PCR3 (carve's; default: the allocator configuration's
    /// `parent_role`, else none).
    #[arg(long, value_name = "TEXT", conflicts_with = "config")]
    parent_role: Option<String>,
    /// The parent instance's ID, measured into PCR4 (carve's; default: the allocator
    /// configuration's `parent_id`, else this host's ID, as in enclave IDs).
    #[arg(long, value_name = "TEXT", conflicts_with = "config")]
    parent_id: Option<String>,
    /// All of the above as nitro-cli's JSON (eif_path, memory_mib, cpu_count | cpu_ids, …).
    #[arg(long, value_name = "JSON_FILE")]
    config: Option<PathBuf>,
}

#[derive(Args)]
pub struct DescribeArgs {
    /// Include the image's name, version and build metadata.
    #[arg(long)]
    metadata: bool,
}

#[derive(Args)]
#[command(group(ArgGroup::new("which").required(true).args(["enclave_id", "enclave_name", "all"])))]
pub struct TerminateArgs {
    #[arg(long, value_name = "ID")]
    enclave_id: Option<String>,
    #[arg(long, value_name = "NAME")]
    enclave_name: Option<String>,
    /// Terminate every enclave this user may terminate.
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
#[command(group(ArgGroup::new("which").required(true).args(["enclave_id", "enclave_name"])))]
pub struct ConsoleArgs {
    #[arg(long, value_name = "ID")]
    enclave_id: Option<String>,
    #[arg(long, value_name = "NAME")]
    enclave_name: Option<String>,
    /// Disconnect after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    disconnect_timeout: Option<String>,
}

#[derive(Args)]
#[command(group(ArgGroup::new("which").required(true).args(["enclave_id", "enclave_name"])))]
pub struct WaitArgs {
    #[arg(long, value_name = "ID")]
    enclave_id: Option<String>,
    #[arg(long, value_name = "NAME")]
    enclave_name: Option<String>,
}

#[derive(Args)]
pub struct AllocatorArgs {
    /// nitro-cli's allocator.yaml: memory_mib and cpu_count | cpu_pool (or development: true).
    #[arg(long, value_name = "FILE", default_value = "/etc/carve/allocator.yaml", conflicts_with = "clear")]
    config: PathBuf,
    /// Give the pool's CPUs and hugepages back.
    #[arg(long)]
    clear: bool,
}

fn selector<'a>(id: &'a Option<String>, name: &'a Option<String>) -> Selector<'a> {
    match (id, name) {
        (Some(id), _) => Selector::Id(id),
        (None, Some(name)) => Selector::Name(name),
        (None, None) => unreachable!("clap requires one of them"),
    }
}

fn print_json(value: &impl Serialize) {
    println!("{}", serde_json::to_string_pretty(value).expect("command output always serializes"));
}

/// nitro-cli's `--memory`, and a clear refusal for `carve vm run`'s KSM option: enclaves never
/// merge memory (docs/memory.md).
fn parse_enclave_memory(text: &str) -> Result<u64, Failure> {
    if text.split(',').skip(1).any(|part| part.trim().starts_with("mergeable")) {
        return Err(Failure::new(
            ErrorCode::INVALID_ARGUMENT,
            format!(
                "`memory` argument asks for mergeable memory: '{text}'; enclaves never merge memory, as \
                 KSM sharing pages between enclaves would be a cross-enclave side channel"
            ),
        ));
    }
    parse_memory(text)
}

/// The flags as nitro-cli's `RunEnclavesArgs`, checked as nitro-cli checks them.
fn run_args(args: &RunArgs) -> Result<(RunEnclaveArgs, CpuRequest), Failure> {
    let mut run = match &args.config {
        Some(path) => RunEnclaveArgs::from_config(path)?,
        None => RunEnclaveArgs {
            eif_path: args.eif_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            enclave_cid: args.enclave_cid.as_deref().map(|t| parse_number("enclave-cid", t)).transpose()?,
            memory_mib: parse_enclave_memory(args.memory.as_deref().unwrap_or_default())?,
            cpu_ids: match &args.cpu_ids {
                Some(ids) => Some(ids.iter().map(|t| parse_number("cpu-id", t)).collect::<Result<_, _>>()?),
                None => None,
            },
            cpu_count: args.cpu_count.as_deref().map(|t| parse_number("cpu-count", t)).transpose()?,
            debug_mode: args.debug_mode || args.attach_console,
            attach_console: args.attach_console,
            enclave_name: args.enclave_name.clone(),
            parent_role: args.parent_role.clone(),
            parent_id: args.parent_id.clone(),
        },
    };
    for (flag, value) in [("parent-role", &run.parent_role), ("parent-id", &run.parent_id)] {
        if let Some(Err(problem)) = value.as_deref().map(carve_enclave::ids::check_parent_identity) {
            return Err(Failure::new(ErrorCode::INVALID_ARGUMENT, format!("`{flag}` {problem}")));
        }
    }
    if args.attach_console {
        run.attach_console = true;
        run.debug_mode = true;
    }
    if run.enclave_name.as_deref() == Some("") {
        return Err(Failure::new(ErrorCode::INVALID_ARGUMENT, "`enclave-name` must not be empty"));
    }
    match run.enclave_cid {
        Some(0) => eprintln!("The enclave CID will be auto-generated as the provided CID is 0"),
        Some(cid) => check_cid(cid)?,
        None => {}
    }
    if !args.demo {
        // The enclave process runs elsewhere (its own cwd): hand it an absolute path.
        let path = PathBuf::from(&run.eif_path);
        if let Ok(absolute) = std::path::absolute(&path) {
            run.eif_path = absolute.display().to_string();
        }
    } else {
        run.eif_path = "demo.eif".into();
    }
    let cpus = run.cpu_request()?;
    Ok((run, cpus))
}

pub fn run_enclave(args: RunArgs) -> Result<(), Failure> {
    let (run, cpus) = run_args(&args)?;
    let run_dir = RunDir::open()?;
    let attach = run.attach_console;
    let request = LaunchRequest { args: run, cpus, demo: args.demo };
    let info = client::launch(&run_dir, &request, &mut |line| eprintln!("{line}"))?;
    print_json(&info);
    if attach {
        let record = client::find(&run_dir, Selector::Id(&info.id))?;
        attach_console(&run_dir, &record, &info, None)?;
    }
    Ok(())
}

fn attach_console(
    run_dir: &RunDir,
    record: &carve_enclave::run_dir::Record,
    info: &RunInfo,
    disconnect: Option<Duration>,
) -> Result<(), Failure> {
    let connected = &mut || {
        println!("Connecting to the console for enclave {}...", info.cid);
        println!("Successfully connected to the console.");
    };
    client::console(run_dir, record, disconnect, connected, &mut std::io::stdout())
}

#[derive(Serialize)]
struct Description {
    #[serde(flatten)]
    run: RunInfo,
    #[serde(rename = "State")]
    state: String,
    #[serde(rename = "Flags")]
    flags: &'static str,
    #[serde(rename = "Measurements")]
    measurements: BTreeMap<String, String>,
    #[serde(flatten)]
    identity: IdentityOutput,
    /// carve's addition: present (true) only for enclaves without a pool or hugepages.
    #[serde(rename = "DevelopmentMode", skip_serializing_if = "std::ops::Not::not")]
    development: bool,
}

impl Description {
    fn new(state: EnclaveState, with_metadata: bool) -> Description {
        let identity = match (&state.metadata, with_metadata) {
            (Some(text), true) => IdentityInfo::parse(text.as_bytes()).ok(),
            _ => None,
        };
        Description {
            run: state.run,
            state: state.state,
            flags: if state.debug_mode { "DEBUG_MODE" } else { "NONE" },
            measurements: state.measurements,
            identity: identity.into(),
            development: state.development,
        }
    }
}

pub fn describe_enclaves(args: DescribeArgs) -> Result<(), Failure> {
    let run_dir = RunDir::open()?;
    let (states, failed) = client::describe_all(&run_dir)?;
    let descriptions: Vec<Description> =
        states.into_iter().map(|s| Description::new(s, args.metadata)).collect();
    print_json(&descriptions);
    if failed > 0 {
        // As nitro-cli: what could be described is printed, then the command fails.
        eprintln!("Failed connections: {failed}");
        return Err(Failure::new(
            ErrorCode::ENCLAVE_PROCESS_CONNECTION,
            format!("{failed} enclave process(es) did not answer within 3 s"),
        ));
    }
    Ok(())
}

#[derive(Serialize)]
struct Terminated {
    #[serde(rename = "EnclaveName")]
    name: String,
    #[serde(rename = "EnclaveID")]
    id: String,
    #[serde(rename = "Terminated")]
    terminated: bool,
}

pub fn terminate_enclave(args: TerminateArgs) -> Result<(), Failure> {
    let run_dir = RunDir::open()?;
    if args.all {
        // As nitro-cli: the enclaves terminated, then a count of the enclave processes that
        // could not be reached or did not answer, and E39 if there were any.
        let mut results = Vec::new();
        let mut failed = 0;
        for (record, result) in client::terminate_all(&run_dir)? {
            match result {
                Ok(()) => {
                    eprintln!("Successfully terminated enclave {}.", record.id);
                    results.push(Terminated { name: record.name, id: record.id, terminated: true });
                }
                Err(e) => {
                    log::info!("enclave {} was not terminated: {e}", record.id);
                    failed += 1;
                }
            }
        }
        if failed > 0 {
            eprintln!("Failed connections: {failed}");
        }
        print_json(&results);
        if failed > 0 {
            let message = format!("Failed to connect to {failed} enclave processes");
            return Err(Failure::new(ErrorCode::ENCLAVE_PROCESS_CONNECTION, message));
        }
        return Ok(());
    }
    let record = client::find(&run_dir, selector(&args.enclave_id, &args.enclave_name))?;
    client::terminate(&run_dir, &record)?;
    eprintln!("Successfully terminated enclave {}.", record.id);
    print_json(&Terminated { name: record.name, id: record.id, terminated: true });
    Ok(())
}

pub fn console(args: ConsoleArgs) -> Result<(), Failure> {
    let disconnect = args
        .disconnect_timeout
        .as_deref()
        .map(|t| parse_number::<u64>("disconnect-timeout", t).map(Duration::from_secs))
        .transpose()?;
    let run_dir = RunDir::open()?;
    let record = client::find(&run_dir, selector(&args.enclave_id, &args.enclave_name))?;
    let (states, _) = client::describe_all(&run_dir)?;
    let info = states.into_iter().find(|s| s.run.id == record.id).map(|s| s.run).ok_or_else(|| {
        Failure::new(ErrorCode::ENCLAVE_PROCESS_CONNECTION, format!("enclave {} ended", record.id))
    })?;
    attach_console(&run_dir, &record, &info, disconnect)
}

pub fn wait(args: WaitArgs) -> Result<(), Failure> {
    let run_dir = RunDir::open()?;
    let (id, reason) = match client::find(&run_dir, selector(&args.enclave_id, &args.enclave_name)) {
        Ok(record) => (record.id.clone(), client::wait(&run_dir, &record)?),
        // An enclave that has already ended, named by its ID (names are used again), is
        // answered from the log.
        Err(missing) => match args.enclave_id.as_deref() {
            Some(id) => (id.to_string(), client::recorded_end(&run_dir, id).ok_or(missing)?),
            None => return Err(missing),
        },
    };
    println!("Enclave {id} ended: {reason}");
    Ok(())
}

pub fn enclave_process() -> ExitCode {
    ExitCode::from(carve_enclave::process::main(carve_guest_images::DEMO_EIF) as u8)
}

pub fn allocator(args: AllocatorArgs) -> ExitCode {
    match set_pool(&args) {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("carve allocator: {e}");
            ExitCode::from(e.status())
        }
    }
}

fn set_pool(args: &AllocatorArgs) -> Result<String, AllocatorError> {
    let run_dir = RunDir::open().map_err(AllocatorError::RunDir)?;
    let lock = run_dir.lock().map_err(AllocatorError::RunDir)?;
    let running = run_dir.live_records(&lock).len();
    if running > 0 {
        return Err(AllocatorError::EnclavesRunning(running));
    }
    let topology = Topology::host();
    let path = run_dir.pool_file();
    // Give the old pool back first, as nitro-cli's allocator clears ne_cpus and hugepages.
    if let Some(old) = std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str::<Pool>(&t).ok())
    {
        pool::restore_hugepages(&topology, old.node, &old.pages_before);
    }
    let _ = std::fs::remove_file(&path);
    if args.clear {
        return Ok("The enclave CPU pool is empty and its hugepages are given back.".into());
    }
    let config = AllocatorConfig::read(&args.config)?;
    let parent = (config.parent_role.clone(), config.parent_id.clone());
    let mut new = if config.development {
        Pool { development: true, ..Pool::default() }
    } else {
        let (cpus, node) = pool::choose_cpus(&config, &topology)?;
        let memory_mib = config.memory_mib.unwrap_or_default();
        let pages_before = pool::reserve_hugepages(&topology, node, memory_mib)?;
        Pool { cpus, node, memory_mib, pages_before, ..Pool::default() }
    };
    (new.parent_role, new.parent_id) = parent;
    let text = serde_json::to_string(&new).expect("pools serialize");
    std::fs::write(&path, text).map_err(|source| AllocatorError::SetPages { path: path.clone(), source })?;
    Ok(if new.development {
        "Development mode: enclaves run without a CPU pool or hugepages.".into()
    } else {
        format!(
            "Enclave CPU pool: {:?} on NUMA node {}; {} MiB of hugepages reserved.",
            new.cpus, new.node, new.memory_mib
        )
    })
}
