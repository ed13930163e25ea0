//! `carve vm run` and `carve vm cpu-templates`.

use std::path::PathBuf;
use std::process::ExitCode;

use carve_vmm::cpuid::CpuTemplate;
use carve_vmm::exit::STATUS_CARVE_ERROR;
use carve_vmm::{KernelSpec, SerialSink, Vm, VmConfig, VmExit};
use clap::{ArgGroup, Args, Subcommand};

#[derive(Subcommand)]
pub enum VmCommand {
    /// Boot a kernel (bzImage, PVH ELF or multiboot ELF) or the built-in demo guest.
    Run(RunArgs),
    /// List the CPU templates `--cpu-template` accepts.
    CpuTemplates {
        /// Print the templates as JSON (the data carve applies).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
#[command(group(ArgGroup::new("image").required(true).args(["kernel", "demo"])))]
pub struct RunArgs {
    /// Kernel image: bzImage, ELF vmlinux with a PVH note, or multiboot v1 ELF.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Run the built-in demo guest instead of a kernel file.
    #[arg(long)]
    demo: bool,
    /// Kernel command line.
    #[arg(long, value_name = "TEXT", default_value = "")]
    cmdline: String,
    /// Initial ramdisk (multiboot: module 0; PVH: module 0).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u32,
    /// CPU template masking guest CPUID (see `carve vm cpu-templates`).
    #[arg(long, value_name = "NAME", default_value = "host")]
    cpu_template: String,
    /// Serial console destination: stdout, file:PATH or none.
    #[arg(long, value_name = "SINK", default_value = "stdout", value_parser = parse_serial)]
    serial: SerialArg,
    /// Map QEMU's pc-testdev (I/O 0xe0-0xeb, 0x2000-0x2017; MMIO 0xff000000) for kvm-unit-tests.
    #[arg(long)]
    testdev: bool,
    /// Print exit counters to standard error when the VM ends.
    #[arg(long)]
    stats: bool,
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

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("carve: error: {message}");
    ExitCode::from(STATUS_CARVE_ERROR as u8)
}

pub fn run(command: VmCommand) -> ExitCode {
    match command {
        VmCommand::Run(args) => run_vm(args),
        VmCommand::CpuTemplates { json } => {
            for template in CpuTemplate::all() {
                if json {
                    println!("{}", template_json(&template));
                } else {
                    println!("{:<10} {}", template.name, template.description);
                }
            }
            ExitCode::SUCCESS
        }
    }
}

fn template_json(template: &CpuTemplate) -> String {
    let bits: Vec<String> = template.clear_bits.iter().map(|c| format!("\"{}\"", c.feature)).collect();
    let leaves: Vec<String> = template.remove_leaves.iter().map(|r| format!("\"{:#x}\"", r.leaf)).collect();
    format!(
        "{{\"name\": \"{}\", \"clears\": [{}], \"removes_leaves\": [{}]}}",
        template.name,
        bits.join(", "),
        leaves.join(", ")
    )
}

fn run_vm(args: RunArgs) -> ExitCode {
    let cpu_template = match CpuTemplate::named(&args.cpu_template) {
        Ok(template) => template,
        Err(e) => return fail(e),
    };
    let kernel = match args.kernel {
        Some(path) => KernelSpec::Path(path),
        None => KernelSpec::Embedded { name: "carve-demo", image: carve_guest_images::DEMO_ELF },
    };
    let serial_to_stdout = matches!(args.serial, SerialArg::Stdout);
    let config = VmConfig {
        kernel,
        cmdline: args.cmdline,
        initrd: args.initrd,
        memory_mib: args.memory,
        vcpus: args.vcpus,
        cpu_template,
        serial: match args.serial {
            SerialArg::Stdout => SerialSink::Stdout,
            SerialArg::File(path) => SerialSink::File(path),
            SerialArg::None => SerialSink::None,
        },
        serial_input: serial_to_stdout,
        testdev: args.testdev,
    };
    let outcome = match Vm::build(config).and_then(Vm::run) {
        Ok(outcome) => outcome,
        Err(e) => return fail(e),
    };
    if args.stats {
        let io = outcome.io;
        eprintln!(
            "carve: exits: pio={} mmio={} ignored_pio={} ignored_mmio={}",
            io.pio_exits, io.mmio_exits, io.ignored_pio, io.ignored_mmio
        );
    }
    match &outcome.exit {
        VmExit::Crash(report) => eprintln!("carve: guest crashed: {}", report.explanation),
        VmExit::VmmFailure(message) => eprintln!("carve: error: {message}"),
        _ => {}
    }
    ExitCode::from(outcome.exit.status() as u8)
}
