//! `carve`: Nitro-Enclaves-style enclaves on any KVM host. nitro-cli's image commands
//! (`build-enclave`, `describe-eif`, `sign-eif`, `pcr`, `explain`), `carve attestation` and
//! `carve vm`.

mod attestation;
mod cpio;
mod image;
mod logger;
mod nitro_error;
mod oci;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Explain a nitro-cli error code (Exx).
    Explain {
        #[arg(long, value_name = "Exx")]
        error_code: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logger::init(cli.log_level);
    let result = match cli.command {
        Command::Vm(command) => return vm::run(command),
        Command::Attestation(command) => return attestation::run(command),
        Command::Explain { error_code } => return nitro_error::explain(&error_code),
        Command::BuildEnclave(args) => image::build_enclave(*args),
        Command::DescribeEif(args) => image::describe_eif(args),
        Command::SignEif(args) => image::sign_eif(args),
        Command::Pcr(args) => image::pcr(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => error.report(),
    }
}
