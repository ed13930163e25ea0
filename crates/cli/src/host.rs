//! `carve host`: what this host's KVM can give a guest, feature by feature.

use std::process::ExitCode;

use carve_vmm::cpu_features::{HostFeatures, HostProbe, Offer};
use carve_vmm::exit::STATUS_CARVE_ERROR;
use carve_vmm::vm::{supported_cpuid, VmError};
use clap::Args;

#[derive(Args)]
pub struct HostArgs {
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Probes this host's KVM.
pub fn features() -> Result<HostFeatures, VmError> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|source| VmError::KvmUnavailable { source })?;
    let supported = supported_cpuid(&kvm)?;
    Ok(HostFeatures::from_probe(&HostProbe::this_host(&kvm, &supported)))
}

pub fn run(args: HostArgs) -> ExitCode {
    let host = match features() {
        Ok(host) => host,
        Err(e) => {
            eprintln!("carve: error: {e}");
            return ExitCode::from(STATUS_CARVE_ERROR as u8);
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&host).expect("the report serialises"));
        return ExitCode::SUCCESS;
    }
    println!("CPU vendor: {}", serde_json::to_value(host.vendor).expect("a name").as_str().unwrap_or("?"));
    let rows: [(&str, &Offer, &str); 5] = [
        ("cet", &host.cet, "--cpu-features cet"),
        ("sgx", &host.sgx, "--sgx-epc SIZE"),
        ("sgx-provision-key", &host.sgx_provision_key, "with --sgx-epc"),
        ("nested", &host.nested, "--nested"),
        ("nested-state", &host.nested_state, "snapshots of nested guests"),
    ];
    for (name, offer, flag) in rows {
        let verdict = if offer.available { "yes" } else { "no" };
        println!("{name:<18} {verdict:<4} {flag:<27} {}", offer.detail);
    }
    ExitCode::SUCCESS
}
