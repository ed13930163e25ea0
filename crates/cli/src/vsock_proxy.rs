//! `carve vsock-proxy`, also carve invoked as `vsock-proxy`: AWS's vsock-proxy command line,
//! messages and exit statuses (`Error: "<text>"` and 1; clap's usage errors 2).

use std::path::PathBuf;
use std::process::ExitCode;

use carve_enclave::run_dir::RunDir;
use carve_enclave::vsock_proxy::{self, IpFamily, ProxyConfig};
use clap::Args;

/// vsock-proxy's name and the version that nitro-cli 1.5.0 ships, for when carve is installed
/// as `vsock-proxy`.
pub const NAME: &str = "vsock-proxy";
pub const TITLE: &str = "Vsock-TCP proxy";
pub const VERSION: &str = "1.0.1";

#[derive(Args)]
pub struct ProxyArgs {
    /// Force the proxy to use IPv4 addresses only.
    #[arg(short = '4', long = "ipv4")]
    ipv4: bool,
    /// Force the proxy to use IPv6 addresses only.
    #[arg(short = '6', long = "ipv6", conflicts_with = "ipv4")]
    ipv6: bool,
    /// Set the maximum number of simultaneous connections supported.
    #[arg(short = 'w', long = "num_workers", value_name = "workers", default_value = "4")]
    num_workers: String,
    /// YAML file containing the services that can be forwarded.
    #[arg(long = "config", value_name = "config_file", default_value = vsock_proxy::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Local Vsock port to listen for incoming connections.
    #[arg(value_name = "local_port")]
    local_port: String,
    /// Address of the server to be proxyed.
    #[arg(value_name = "remote_addr")]
    remote_addr: String,
    /// Remote TCP port of the server to be proxyed.
    #[arg(value_name = "remote_port")]
    remote_port: String,
}

/// `carve` as `vsock-proxy`: its own command line, no carve subcommands.
#[derive(clap::Parser)]
pub struct VsockProxyCli {
    #[command(flatten)]
    pub args: ProxyArgs,
}

pub fn run(args: ProxyArgs) -> ExitCode {
    match start(args) {
        Ok(never) => match never {},
        Err(text) => {
            eprintln!("Error: {text:?}");
            ExitCode::FAILURE
        }
    }
}

enum Never {}

fn start(args: ProxyArgs) -> Result<Never, String> {
    let config = ProxyConfig {
        local_port: args.local_port.parse().map_err(|_| "Local port is not valid")?,
        remote_addr: args.remote_addr,
        remote_port: args.remote_port.parse().map_err(|_| "Remote port is not valid")?,
        family: match (args.ipv4, args.ipv6) {
            (true, _) => IpFamily::V4,
            (_, true) => IpFamily::V6,
            _ => IpFamily::Any,
        },
        workers: match args.num_workers.parse::<usize>() {
            Ok(0) => return Err("Number of workers must not be 0".into()),
            Ok(n) => n,
            Err(_) => return Err("Number of workers is not valid".into()),
        },
    };
    log::info!("Checking allowlist configuration");
    vsock_proxy::check_allowlist(&args.config, &config)
        .map_err(|e| format!("Error at checking the allowlist: {e}"))?;
    let run_dir = RunDir::open().map_err(|e| format!("Could not listen for connections: {e}"))?;
    let listener = vsock_proxy::listen(&run_dir, config.local_port)
        .map_err(|e| format!("Could not listen for connections: {e}"))?;
    remove_on_signals(listener.files());
    Err(vsock_proxy::serve(&listener, &config))
}

/// A proxy stopped by SIGINT, SIGTERM or SIGHUP takes its files with it.
fn remove_on_signals(files: [PathBuf; 2]) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else { return };
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            for file in &files {
                let _ = std::fs::remove_file(file);
            }
            std::process::exit(128 + signal);
        }
    });
}
