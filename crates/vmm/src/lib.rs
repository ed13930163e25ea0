//! carve's virtual machine monitor: a KVM microVM built from the rust-vmm crates.
//!
//! - [`memory`]: guest RAM and the e820 map; [`layout`]: where everything sits.
//! - [`boot`]: bzImage, PVH and multiboot loaders and the boot vCPU's starting state.
//! - [`cpuid`]: CPUID normalisation and CPU templates; [`mptable`]: SMP discovery.
//! - [`devices`]: serial, i8042, debug-exit, fw_cfg, pc-testdev, virtio-mmio slots, the buses.
//! - [`interrupts`]: legacy lines and per-device MSI message stores on KVM's GSI routing.
//! - [`acpi`]: RSDP/XSDT/FADT/MADT/DSDT, with the virtio-mmio devices in the DSDT.
//! - [`vcpu`]: the KVM_RUN loop; [`exit`]: how a VM ends; [`vm`]: the builder that wires it.
//! - [`snapshot`]: save and restore; [`migration`]: live migration over TCP, on [`dirty_log`];
//!   [`activity`]: dirty-page rate and working set (with [`working_set`]'s idle-page tracking).

pub mod acpi;
pub mod activity;
pub mod boot;
pub mod breakpoint;
pub mod control;
pub mod cpu_features;
pub mod cpuid;
pub mod device_manager;
pub mod devices;
pub mod dirty_log;
pub mod exit;
pub mod guest_state;
pub mod interrupts;
pub mod kvm_state;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod mptable;
mod runner;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
pub mod working_set;
pub mod x86;

pub use device_manager::{VirtioKind, VirtioParts};
pub use exit::VmExit;
pub use memory::MemoryBacking;
pub use vm::{
    BootedImage, EntryCheck, ExtraDevice, KernelSpec, SerialSink, Vm, VmConfig, VmError, VmErrorKind,
    VmOutcome, VmStopper, VsockConfig,
};
