//! `carve`: Nitro-Enclaves-style enclaves on any KVM host. This session's commands: `carve vm`.

mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "carve", version, about = "Run Nitro-Enclaves-style enclaves on any Linux host with KVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run and inspect plain microVMs (carve's VMM underneath enclaves).
    #[command(subcommand)]
    Vm(vm::VmCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Vm(command) => vm::run(command),
    }
}
