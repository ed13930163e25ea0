//! What can go wrong saving or restoring KVM's state, as sentences.

use std::fmt;

use super::compat::{feature_name, Register};
use super::msrs::msr_label;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("KVM refused {ioctl} for vCPU {vcpu}: {source}")]
    VcpuIoctl { vcpu: usize, ioctl: &'static str, source: kvm_ioctls::Error },
    #[error("KVM refused {ioctl} for the VM: {source}")]
    VmIoctl { ioctl: &'static str, source: kvm_ioctls::Error },
    #[error("KVM refused {ioctl} on /dev/kvm: {source}")]
    SystemIoctl { ioctl: &'static str, source: kvm_ioctls::Error },
    #[error(
        "KVM refused to restore vCPU {vcpu}'s MSR {} to {data:#x}: KVM_SET_MSRS stopped there, after \
         {written} of the {count} MSRs in its batch, so this host's KVM does not take that value",
        msr_label(*index)
    )]
    MsrRefused { vcpu: usize, index: u32, data: u64, written: usize, count: usize },
    #[error(
        "KVM could not {} vCPU {vcpu}'s shadow-stack pointer ({ioctl}, register KVM_REG_GUEST_SSP \
         {:#x}): {}",
        action(ioctl),
        crate::cpu_features::cet::GUEST_SSP_REG,
        ssp_reason(source)
    )]
    OneReg { vcpu: usize, ioctl: &'static str, source: kvm_ioctls::Error },
    #[error("KVM could not {} vCPU {vcpu}'s nested virtualisation state ({ioctl}): {}", action(ioctl), nested_reason(*errno))]
    NestedState { vcpu: usize, ioctl: &'static str, errno: i32 },
    #[error(
        "vCPU {vcpu} uses nested virtualisation (EFER.SVME or CR4.VMXE is set) and this host's KVM \
         cannot save nested state (no KVM_CAP_NESTED_STATE): a snapshot would not restore it"
    )]
    NestedNotSaveable { vcpu: usize },
    #[error(
        "the snapshot's guest TSC runs at {saved_khz} kHz, this host's at {host_khz} kHz, and this host's \
         KVM cannot scale TSCs (no KVM_CAP_TSC_CONTROL)"
    )]
    TscFrequency { vcpu: usize, saved_khz: u32, host_khz: u32 },
    #[error("the saved state of vCPU {vcpu} is invalid: {what}")]
    InvalidVcpu { vcpu: usize, what: String },
    #[error("the saved VM state is invalid: {0}")]
    InvalidVm(String),
    #[error("the snapshot holds {saved} vCPU states but {given} vCPUs were given to save or restore")]
    VcpuCount { saved: usize, given: usize },
    #[error(transparent)]
    Incompatible(#[from] Incompatible),
}

fn action(ioctl: &str) -> &'static str {
    if ioctl.starts_with("KVM_GET") {
        "read"
    } else {
        "restore"
    }
}

/// EINVAL from the SSP's ONE_REG means KVM has no such register for this vCPU.
fn ssp_reason(source: &kvm_ioctls::Error) -> String {
    match source.errno() {
        libc::EINVAL => "EINVAL: this KVM has no SSP for the vCPU (x86 KVM_GET/SET_ONE_REG needs \
                         Linux 6.18, and the SSP needs SHSTK in the vCPU's CPUID) or refuses the \
                         value"
            .into(),
        _ => source.to_string(),
    }
}

/// What the errors KVM's nested-state paths return mean (seed (g): SVM allocates nested state on
/// demand, so ENOMEM reaches user space from KVM_SET_NESTED_STATE and from setting EFER.SVME).
pub(super) fn nested_reason(errno: i32) -> String {
    match errno {
        libc::ENOMEM => "ENOMEM: the host could not allocate memory for the nested state (the \
                         VMCB/VMCS pages and permission bitmaps KVM allocates on demand); free host \
                         memory or raise the process's memory limit and retry"
            .into(),
        libc::EINVAL => "EINVAL: KVM does not accept this nested state: an unsupported size or \
                         format (VMX state on an SVM host or the reverse), flags this host lacks, or \
                         control fields its checks refuse"
            .into(),
        libc::E2BIG => "E2BIG: the state is larger than the buffer carve offers KVM".into(),
        other => format!("{}", std::io::Error::from_raw_os_error(other)),
    }
}

/// One thing the snapshot's guest uses that this host's KVM lacks.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Missing {
    /// A CPUID feature bit KVM_GET_SUPPORTED_CPUID (and KVM_GET_EMULATED_CPUID) does not offer.
    Cpuid { leaf: u32, subleaf: Option<u32>, register: Register, bit: u8 },
    /// SHSTK, for a saved shadow-stack pointer (named so instead of as its CPUID bit).
    ShadowStack,
    /// An MSR missing from KVM_GET_MSR_INDEX_LIST.
    Msr(u32),
    /// Nested virtualisation state, on a host without KVM_CAP_NESTED_STATE.
    NestedState,
    /// Nested state larger than this host's KVM_CAP_NESTED_STATE.
    NestedStateSize { saved: usize, host: usize },
    /// XSAVE components beyond the area this host's KVM moves.
    Xsave { saved_bytes: usize, host_bytes: usize },
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Cpuid { leaf, subleaf, register, bit } => {
                let leaf_text = if *leaf < 10 { leaf.to_string() } else { format!("{leaf:#x}") };
                let subleaf_text = subleaf.map(|s| format!(".{s}")).unwrap_or_default();
                let reg = format!("{register:?}").to_uppercase();
                write!(f, "CPUID {leaf_text}{subleaf_text} {reg} bit {bit}")?;
                match feature_name(*leaf, *subleaf, *register, *bit) {
                    Some(name) => write!(f, " ({name})"),
                    None => Ok(()),
                }
            }
            Missing::ShadowStack => write!(f, "CET shadow stacks (CPUID 7.0 ECX bit 7)"),
            Missing::Msr(index) => write!(f, "MSR {}", msr_label(*index)),
            Missing::NestedState => write!(f, "nested virtualisation state (no KVM_CAP_NESTED_STATE)"),
            Missing::NestedStateSize { saved, host } => {
                write!(f, "{saved} bytes of nested state (KVM_CAP_NESTED_STATE allows {host})")
            }
            Missing::Xsave { saved_bytes, host_bytes } => write!(
                f,
                "XSAVE state beyond byte {host_bytes} (the snapshot's area is {saved_bytes} bytes, \
                 KVM_CAP_XSAVE2 here {host_bytes})"
            ),
        }
    }
}

/// The snapshot needs what this host's KVM does not offer: restoring would fail halfway, or hand
/// the guest a CPU that lost features it already uses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Incompatible {
    pub missing: Vec<Missing>,
}

impl fmt::Display for Incompatible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self.missing.iter().map(ToString::to_string).collect();
        write!(f, "this host's KVM lacks what the snapshot's guest uses: {}", items.join(", "))
    }
}
