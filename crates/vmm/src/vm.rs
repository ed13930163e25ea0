//! Wiring a VM in one readable place (`Vm::build`) and running it to its end (`Vm::run`).

use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use carve_eif::Measurements;

use crate::acpi::{self, AcpiError};
use crate::boot::{self, BootError, BootSetup, BootSource, KernelImage};
use crate::cpu_features::sgx::{Epc, EpcError, SgxGuest};
use crate::cpu_features::{self, CpuFeatures, FeatureRefused, HostFeatures, HostProbe};
use crate::cpuid::{self, CpuTemplate};
use crate::device_manager::{DeviceManager, PlatformDevices, VirtioKind, VirtioParts};
use crate::devices::bus::BusError;
use crate::devices::fw_cfg::{FwCfg, FwCfgConfig};
use crate::devices::i8042::I8042;
use crate::devices::msi_testdev::MsiTestdev;
use crate::devices::serial::{SerialOutput, SerialPort};
use crate::devices::testdev::{Testdev, TestdevHost};
use crate::exit::{ExitSignal, VmExit};
use crate::guest_state::file::{StateFile, StateFileError};
use crate::guest_state::{self, CetState, GuestState, Platform, Violation};
use crate::interrupts::{InterruptError, InterruptManager};
use crate::kvm_state::HostCaps;
use crate::layout::{KVM_TSS_ADDRESS, SERIAL_IRQ, VIRTIO_MMIO_SLOTS};
use crate::memory::{self, GuestRam, MemoryBacking, MemoryError};
use crate::mptable::{self, MpTableError};
use crate::vcpu::{self, IoStatsSnapshot, Vcpu, VcpuContext};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {source}{hint}", hint = kvm_hint(*source))]
    KvmUnavailable { source: kvm_ioctls::Error },
    #[error("cannot read kernel {path}: {source}")]
    OpenKernel { path: PathBuf, source: std::io::Error },
    #[error("cannot read initrd {path}: {source}")]
    OpenInitrd { path: PathBuf, source: std::io::Error },
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    #[error("{requested} vCPUs requested, but this host's KVM allows at most {max}")]
    TooManyVcpus { requested: u32, max: u32 },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    CpuState(#[from] boot::cpu_state::CpuStateError),
    #[error("KVM refused to {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("cannot map a device: {0}")]
    Bus(#[from] BusError),
    #[error("cannot open the serial output {path}: {source}")]
    SerialOutput { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    FeatureRefused(#[from] FeatureRefused),
    #[error(transparent)]
    Sgx(#[from] EpcError),
    #[error("CPU template '{template}' removes {features}, which the VM asks for: use another template")]
    TemplateRemovesFeatures { template: String, features: String },
    #[error("the state file holds CET state, but the VM has no CET (add --cpu-features cet)")]
    CetStateWithoutCet,
    #[error("cannot start the VM's threads or event loop: {0}")]
    Host(String),
    #[error("cannot load the vCPU state: {0}")]
    LoadState(#[from] StateFileError),
    #[error("vCPU {vcpu}'s state breaks {} VM-entry rule(s): {}", violations.len(), join(violations))]
    InvalidGuestState { vcpu: usize, violations: Vec<Violation> },
    #[error(transparent)]
    Interrupts(#[from] InterruptError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error("cannot attach the vsock device: {0}")]
    Vsock(#[from] carve_virtio::vsock::VsockError),
    #[error("cannot attach the {kind:?} device: {message}")]
    ExtraDevice { kind: VirtioKind, message: String },
    #[error("no room for another virtio device: carve maps at most {VIRTIO_MMIO_SLOTS}")]
    TooManyVirtioDevices,
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error("cannot restore: {0}")]
    Snapshot(#[from] carve_snapshot::file::SnapshotError),
    #[error("cannot restore: the snapshot's {0}")]
    SnapshotState(String),
    #[error("cannot restore: {0}")]
    KvmState(crate::kvm_state::StateError),
    #[error("cannot save: {0}")]
    Save(#[from] crate::snapshot::SaveError),
    #[error("KVM refused vCPU 0's loaded state ({source}); carve's checks find: {}", join(violations))]
    StateRefused { source: kvm_ioctls::Error, violations: Vec<Violation> },
}

/// What a [`VmError`] was short of, for callers that answer with codes of their own (the
/// enclave process's nitro-cli E-codes) without reading the VMM's error variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmErrorKind {
    /// Guest memory could not be had (hugepages, a mapping).
    Memory,
    /// The kernel image does not fit the guest's memory.
    ImageTooLarge,
    /// The kernel image could not be loaded as given.
    Image,
    /// KVM itself could not be opened.
    KvmUnavailable,
    /// Anything else: KVM refusing a call, devices, host threads.
    Other,
}

impl VmError {
    pub fn kind(&self) -> VmErrorKind {
        match self {
            VmError::Memory(_) => VmErrorKind::Memory,
            VmError::Boot(BootError::EifTooLarge { .. }) => VmErrorKind::ImageTooLarge,
            VmError::Boot(_) | VmError::OpenKernel { .. } | VmError::OpenInitrd { .. } => VmErrorKind::Image,
            VmError::KvmUnavailable { .. } => VmErrorKind::KvmUnavailable,
            _ => VmErrorKind::Other,
        }
    }
}

fn join(violations: &[Violation]) -> String {
    if violations.is_empty() {
        return "no broken rule".into();
    }
    violations.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// What a broken VM-entry rule in a vCPU's starting state does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryCheck {
    /// Stop the start with [`VmError::InvalidGuestState`].
    Refuse,
    /// Start anyway and report the violations through [`Vm::entry_warnings`].
    Warn,
}

impl Default for EntryCheck {
    /// Debug builds refuse, so a boot path that builds a bad state fails its tests; release
    /// builds warn, as the host may still accept what the SDM forbids.
    fn default() -> Self {
        if cfg!(debug_assertions) {
            EntryCheck::Refuse
        } else {
            EntryCheck::Warn
        }
    }
}

fn kvm_hint(error: kvm_ioctls::Error) -> &'static str {
    match error.errno() {
        libc::ENOENT => " (is KVM enabled in firmware and the kvm module loaded?)",
        libc::EACCES | libc::EPERM => " (add your user to the 'kvm' group or run as root)",
        _ => "",
    }
}

pub(crate) fn kvm_error(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Where the guest's serial console goes.
pub enum SerialSink {
    Stdout,
    File(PathBuf),
    None,
    Writer(SerialOutput),
}

/// The kernel to boot.
pub enum KernelSpec {
    /// An Enclave Image Format file, booted as Nitro does (boot/eif.rs).
    Eif(PathBuf),
    Path(PathBuf),
    Embedded {
        name: &'static str,
        image: &'static [u8],
    },
}

/// A virtio-vsock device whose host side is Unix sockets at `uds` (and `uds`_PORT).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub uds: PathBuf,
    /// Listeners every VM reaches (`PREFIX_PORT`), after the VM's own at `uds_PORT`.
    pub shared_listeners: Option<PathBuf>,
}

/// What a device its owner assembles sees of the VM being built: its memory and, for an
/// enclave image, the measurements of what boots (taken in the pass that loaded it).
pub struct BootedImage<'a> {
    pub mem: &'a GuestRam,
    pub measurements: Option<&'a Measurements>,
}

/// A virtio device whose owner assembles it (the enclave code's NSM): built once the boot
/// image is in guest memory, so it can hold what was measured there.
pub trait ExtraDevice: Send {
    fn kind(&self) -> VirtioKind;
    fn build(self: Box<Self>, image: &BootedImage<'_>) -> Result<VirtioParts, String>;
}

pub struct VmConfig {
    pub kernel: KernelSpec,
    pub cmdline: String,
    pub initrd: Option<PathBuf>,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub cpu_template: CpuTemplate,
    /// CET, SGX and nested virtualisation: off unless asked for, refused where the host lacks them.
    pub cpu_features: CpuFeatures,
    pub serial: SerialSink,
    /// Forward the process's standard input to the serial port.
    pub serial_input: bool,
    /// Map QEMU's pc-testdev (for kvm-unit-tests).
    pub testdev: bool,
    /// Registers to start vCPU 0 with instead of the boot protocol's (`--load-state`).
    pub load_state: Option<StateFile>,
    pub entry_check: EntryCheck,
    pub vsock: Option<VsockConfig>,
    pub memory_backing: MemoryBacking,
    /// madvise(MADV_MERGEABLE) on guest RAM so KSM may merge it (anonymous backing only).
    pub memory_mergeable: bool,
    /// Host CPU each vCPU thread is pinned to, by vCPU index; empty leaves them unpinned.
    pub vcpu_affinity: Vec<usize>,
}

impl VmConfig {
    pub fn new(kernel: KernelSpec) -> VmConfig {
        VmConfig {
            kernel,
            cmdline: String::new(),
            initrd: None,
            memory_mib: 128,
            vcpus: 1,
            cpu_template: CpuTemplate::named("host").expect("the host template is built in"),
            cpu_features: CpuFeatures::default(),
            serial: SerialSink::Stdout,
            serial_input: false,
            testdev: false,
            load_state: None,
            entry_check: EntryCheck::default(),
            vsock: None,
            memory_backing: MemoryBacking::Anonymous,
            memory_mergeable: false,
            vcpu_affinity: Vec::new(),
        }
    }
}

/// How a VM ended.
#[derive(Clone, Debug)]
pub struct VmOutcome {
    pub exit: VmExit,
    pub io: IoStatsSnapshot,
}

pub(crate) use crate::runner::Parts;

/// A built (or restored) VM, ready to run.
pub struct Vm {
    parts: Parts,
    /// How it booted; `None` for a restored VM.
    boot: Option<BootSetup>,
    entry_warnings: Vec<String>,
    template_warning: Option<String>,
}

impl Vm {
    /// Builds a VM that boots `config.kernel`, with `extra` devices its owner assembles.
    pub fn build(config: VmConfig, extra: Vec<Box<dyn ExtraDevice>>) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(|source| VmError::KvmUnavailable { source })?;
        let max_vcpus = (kvm.get_max_vcpus() as u32).min(mptable::MAX_CPUS as u32);
        match config.vcpus {
            0 => return Err(VmError::NoVcpus),
            n if n > max_vcpus => return Err(VmError::TooManyVcpus { requested: n, max: max_vcpus }),
            _ => {}
        }
        let vcpu_count = config.vcpus as u8;
        // KVM's own table (HostCaps takes it) and with what carve announces on top: asked once,
        // as KVM_GET_SUPPORTED_CPUID costs some 300 µs on nested hosts.
        let kvm_cpuid =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_error("report supported CPUID"))?;
        let supported = with_announced(&kvm, kvm_cpuid.clone());
        let host = HostFeatures::from_probe(&HostProbe::this_host(&kvm, &supported));
        cpu_features::check(&config.cpu_features, &host)?;

        let mut kernel = open_kernel(&config.kernel)?;
        let mut initrd = match &config.initrd {
            Some(path) => Some(KernelImage::File(
                File::open(path).map_err(|source| VmError::OpenInitrd { path: path.clone(), source })?,
            )),
            None => None,
        };
        let serial_output = open_serial(config.serial)?;

        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_error("create a VM"))?);
        // Memory first: registering slots once the irqchip exists costs KVM far more.
        let mem = memory::create_with(memory::MemorySpec {
            mib: config.memory_mib,
            backing: config.memory_backing,
            mergeable: config.memory_mergeable,
        })?;
        memory::register(&vm_fd, &mem)?;
        // The virtual EPC after RAM, in the slots after RAM's (before the irqchip, as RAM).
        let epc = match config.cpu_features.sgx_epc.as_slice() {
            [] => None,
            sections => Some(Epc::new(
                &vm_fd,
                sections,
                memory::ram_end(&mem),
                memory::first_free_slot(&mem),
                host.sgx_provision_key.available,
            )?),
        };
        let sgx = epc.as_ref().map(Epc::guest).cloned().unwrap_or_default();
        let epc_region = sgx.region();
        create_irqchip(&vm_fd)?;
        // Read once per VM (after any change to the XSTATE the process may use): each vCPU saves
        // itself with them, without asking anyone.
        let caps = HostCaps::with_supported(&kvm, &vm_fd, kvm_cpuid.as_slice());
        let caps = Arc::new(caps.map_err(|e| VmError::Host(e.to_string()))?);

        let interrupts = InterruptManager::new(vm_fd.clone())?;
        let exit = Arc::new(ExitSignal::new().map_err(|e| VmError::Host(e.to_string()))?);
        let fw_cfg_config = FwCfgConfig {
            cpus: vcpu_count.into(),
            max_cpus: max_vcpus as u16,
            ram_bytes: config.memory_mib << 20,
        };
        let platform_devices = PlatformDevices {
            serial: SerialPort::new(interrupts.legacy_line(SERIAL_IRQ)?, serial_output),
            i8042: I8042::new(exit.clone()),
            fw_cfg: FwCfg::new(fw_cfg_config.cpus, fw_cfg_config.max_cpus, fw_cfg_config.ram_bytes),
            test_devices: config.testdev.then(|| {
                let host = Box::new(VmTestdevHost { vm: vm_fd.clone(), mem: mem.clone() });
                (Testdev::new(host), MsiTestdev::new(interrupts.msi_store(), interrupts.msi_capacity()))
            }),
        };
        let mut devices = DeviceManager::new(
            interrupts,
            exit.clone(),
            platform_devices,
            fw_cfg_config,
            config.vsock.clone(),
        )?;

        let mut cmdline = config.cmdline.clone();
        let mut image_measurements = None;
        if let KernelSpec::Eif(path) = &config.kernel {
            let image = boot::eif::copy_into(&mem, path)?;
            kernel = Some(KernelImage::Guest(image.kernel));
            initrd = Some(KernelImage::Guest(image.initrd));
            // The image's command line is used as measured; carve's additions follow it.
            cmdline = format!("{} {cmdline}", image.cmdline).trim().to_string();
            image_measurements = Some(image.measurements);
        }

        if let Some(vsock) = &config.vsock {
            let (device, backend) = carve_virtio::vsock::Vsock::new(
                vsock.cid,
                vsock.uds.clone(),
                vsock.shared_listeners.clone(),
                mem.clone(),
            )?;
            devices.attach_virtio(&vm_fd, &mem, VirtioParts::Vsock(device, Box::new(backend)))?;
        }
        let booted = BootedImage { mem: &mem, measurements: image_measurements.as_ref() };
        for factory in extra {
            let kind = factory.kind();
            let parts = factory.build(&booted).map_err(|message| VmError::ExtraDevice { kind, message })?;
            devices.attach_virtio(&vm_fd, &mem, parts)?;
        }
        let slots = devices.virtio_slots();
        for slot in &slots {
            cmdline = format!("{cmdline} {}", slot.cmdline_param()).trim_start().to_string();
        }

        let kernel_name = kernel_name(&config.kernel);
        let mut kernel = kernel.expect("a kernel file, an embedded kernel or an enclave image's");
        let boot = boot::load_with_reserved(
            &mem,
            BootSource {
                kernel: &mut kernel,
                kernel_name: &kernel_name,
                cmdline: &cmdline,
                initrd: initrd.as_mut(),
            },
            epc_region.as_slice(),
        )?;
        mptable::write(&mem, vcpu_count)?;
        acpi::write(&mem, vcpu_count, &slots, epc_region)?;

        let platform = Platform::host(&supported);
        let (pio, mmio) = devices.buses();
        let context =
            Arc::new(VcpuContext { pio, mmio, exit, stats: Default::default(), mem: mem.clone(), platform });

        let mut vcpus = Vec::with_capacity(vcpu_count.into());
        for index in 0..vcpu_count {
            let fd = vm_fd.create_vcpu(index.into()).map_err(kvm_error("create a vCPU"))?;
            let features =
                VcpuFeatures { template: &config.cpu_template, extra: &config.cpu_features, sgx: &sgx };
            let cpuid = configure_vcpu(&fd, &supported, &features, index, vcpu_count)?;
            if index == 0 {
                boot::cpu_state::apply(&fd, &mem, boot.entry)?;
                if let Some(state) = &config.load_state {
                    load_state(&fd, &cpuid, state, &platform, config.entry_check)?;
                }
            }
            vcpus.push(Vcpu { index: index.into(), fd, cpuid, caps: caps.clone() });
        }
        let entry_warnings = check_entry_states(&vcpus, &platform, config.entry_check)?;
        let template_warning = unenforced_template(&vcpus[0].fd, &config.cpu_template)?;

        Ok(Vm {
            parts: Parts {
                vcpus,
                context,
                devices,
                serial_input: config.serial_input,
                vcpu_affinity: config.vcpu_affinity,
                vm_fd,
                epc,
            },
            boot: Some(boot),
            entry_warnings,
            template_warning,
        })
    }

    pub(crate) fn from_parts(parts: Parts) -> Vm {
        Vm { parts, boot: None, entry_warnings: Vec::new(), template_warning: None }
    }

    pub(crate) fn parts(&self) -> &Parts {
        &self.parts
    }

    /// Rules the starting state breaks, when [`EntryCheck::Warn`] let it start anyway.
    pub fn entry_warnings(&self) -> &[String] {
        &self.entry_warnings
    }

    /// Set when the host's KVM does not apply the CPU template: the guest sees features the
    /// template removes.
    pub fn cpu_template_warning(&self) -> Option<&str> {
        self.template_warning.as_deref()
    }

    /// How the VM booted; `None` for a restored one.
    pub fn boot_setup(&self) -> Option<&BootSetup> {
        self.boot.as_ref()
    }

    /// Bytes of guest RAM (hugepage-backed guests round up to whole pages).
    pub fn memory_size(&self) -> u64 {
        memory::total_size(&self.parts.context.mem)
    }

    /// A handle that ends the VM from another thread once it runs.
    pub fn stopper(&self) -> VmStopper {
        VmStopper(self.parts.context.exit.clone())
    }

    /// The boot vCPU, before the VM runs (for inspecting or checking its state).
    pub fn boot_vcpu(&self) -> &VcpuFd {
        &self.parts.vcpus[0].fd
    }

    /// The boot vCPU's CET state, `None` unless its CPUID has CET.
    pub fn boot_vcpu_cet(&self) -> Result<Option<CetState>, kvm_ioctls::Error> {
        CetState::read(&self.parts.vcpus[0].fd, &self.parts.vcpus[0].cpuid)
    }

    /// Runs every vCPU on its own thread until the guest or carve ends the VM, answering a
    /// control socket at `control` if given.
    pub fn run(self) -> Result<VmOutcome, VmError> {
        self.run_with_control(None)
    }

    pub fn run_with_control(self, control: Option<&Path>) -> Result<VmOutcome, VmError> {
        let listener = control.map(crate::control::listen).transpose()?;
        crate::runner::run(self.parts, listener)
    }
}

/// Ends a running VM from another thread; the VM's exit is then [`VmExit::Terminated`].
#[derive(Clone)]
pub struct VmStopper(pub(crate) Arc<ExitSignal>);

impl VmStopper {
    pub fn stop(&self) {
        self.0.request(VmExit::Terminated);
    }
}

/// The in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT every VM has, booted or restored.
pub(crate) fn create_irqchip(vm_fd: &VmFd) -> Result<(), VmError> {
    vm_fd.set_tss_address(KVM_TSS_ADDRESS).map_err(kvm_error("set the TSS address"))?;
    vm_fd.create_irq_chip().map_err(kvm_error("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm_fd.create_pit2(pit).map_err(kvm_error("create the in-kernel PIT"))?;
    Ok(())
}

/// KVM's supported CPUID with what KVM emulates but leaves to user space to announce.
pub fn supported_cpuid(kvm: &Kvm) -> Result<kvm_bindings::CpuId, VmError> {
    let supported =
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_error("report supported CPUID"))?;
    Ok(with_announced(kvm, supported))
}

fn with_announced(kvm: &Kvm, mut supported: kvm_bindings::CpuId) -> kvm_bindings::CpuId {
    cpuid::announce_emulated(&mut supported, kvm.check_extension(Cap::TscDeadlineTimer));
    supported
}

/// What shapes a vCPU's CPUID beyond KVM's offer and the topology.
struct VcpuFeatures<'a> {
    template: &'a CpuTemplate,
    extra: &'a CpuFeatures,
    /// The EPC sections and what KVM granted the VM of SGX.
    sgx: &'a SgxGuest,
}

fn configure_vcpu(
    fd: &VcpuFd,
    supported: &kvm_bindings::CpuId,
    features: &VcpuFeatures<'_>,
    index: u8,
    count: u8,
) -> Result<Vec<kvm_bindings::kvm_cpuid_entry2>, VmError> {
    let mut cpuid = supported.clone();
    let tsc_khz = fd.get_tsc_khz().ok().filter(|&khz| khz > 0);
    cpuid::normalize(&mut cpuid, index, count, tsc_khz);
    cpu_features::shape(&mut cpuid, features.extra, features.sgx)?;
    let shaped = cpuid.clone();
    features.template.apply(&mut cpuid);
    let removed = cpu_features::removed_by_template(features.extra, &shaped, &cpuid);
    if !removed.is_empty() {
        let template = features.template.name.clone();
        return Err(VmError::TemplateRemovesFeatures { template, features: removed.join(", ") });
    }
    fd.set_cpuid2(&cpuid).map_err(kvm_error("set the vCPU's CPUID"))?;
    fd.set_msrs(&vcpu::boot_msrs()).map_err(kvm_error("set boot MSRs"))?;
    vcpu::configure_lapic(fd).map_err(kvm_error("configure the local APIC"))?;
    Ok(cpuid.as_slice().to_vec())
}

/// Reads back what KVM will show the guest. Some nested hosts (ours) answer CPUID with their own
/// feature leaves whatever KVM_SET_CPUID2 said; a template cannot hide anything there.
fn unenforced_template(fd: &VcpuFd, template: &CpuTemplate) -> Result<Option<String>, VmError> {
    let readback = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm_error("read back the vCPU's CPUID"))?;
    let shown = template.unenforced(&readback);
    Ok((!shown.is_empty()).then(|| {
        format!(
            "this host's KVM does not apply CPU template '{}': the guest still sees {} (nested \
             hosts that answer CPUID themselves do this)",
            template.name,
            shown.join(", ")
        )
    }))
}

/// Checks every vCPU that will enter with its current state (APs waiting for SIPI get theirs
/// from KVM later) against the VM-entry rules.
fn check_entry_states(
    vcpus: &[Vcpu],
    platform: &Platform,
    policy: EntryCheck,
) -> Result<Vec<String>, VmError> {
    let mut warnings = Vec::new();
    for vcpu in vcpus {
        let mp_state = vcpu.fd.get_mp_state().map_err(kvm_error("read a vCPU's MP state"))?;
        if mp_state.mp_state != kvm_bindings::KVM_MP_STATE_RUNNABLE {
            continue;
        }
        let sregs = vcpu.fd.get_sregs().map_err(kvm_error("read a vCPU's special registers"))?;
        let regs = vcpu.fd.get_regs().map_err(kvm_error("read a vCPU's registers"))?;
        let cet = CetState::read(&vcpu.fd, &vcpu.cpuid).map_err(kvm_error("read a vCPU's CET state"))?;
        let state = GuestState { cet, ..GuestState::from_kvm(&sregs, regs.rflags, platform) };
        let violations = guest_state::check(&state, platform);
        if violations.is_empty() {
            continue;
        }
        if policy == EntryCheck::Refuse {
            return Err(VmError::InvalidGuestState { vcpu: vcpu.index, violations });
        }
        warnings.extend(
            violations.iter().map(|v| format!("vCPU {} state breaks a VM-entry rule: {v}", vcpu.index)),
        );
    }
    Ok(warnings)
}

/// Replaces vCPU 0's registers with a state file's, checking it first.
fn load_state(
    fd: &VcpuFd,
    cpuid: &[kvm_bindings::kvm_cpuid_entry2],
    state: &StateFile,
    platform: &Platform,
    policy: EntryCheck,
) -> Result<(), VmError> {
    let violations = guest_state::check(&state.guest_state(platform), platform);
    if policy == EntryCheck::Refuse && !violations.is_empty() {
        return Err(VmError::InvalidGuestState { vcpu: 0, violations });
    }
    let current = fd.get_sregs().map_err(kvm_error("read vCPU 0's special registers"))?;
    let (sregs, rflags) = state.to_kvm(&current)?;
    fd.set_sregs(&sregs).map_err(|source| VmError::StateRefused { source, violations })?;
    let mut regs = fd.get_regs().map_err(kvm_error("read vCPU 0's registers"))?;
    regs.rflags = rflags;
    fd.set_regs(&regs).map_err(kvm_error("set vCPU 0's registers"))?;
    if let Some(cet) = state.cet {
        if CetState::read(fd, cpuid).map_err(kvm_error("read vCPU 0's CET state"))?.is_none() {
            return Err(VmError::CetStateWithoutCet);
        }
        CetState::from(cet).write(fd, cpuid).map_err(kvm_error("set vCPU 0's CET state"))?;
    }
    Ok(())
}

/// Opens a kernel file or embedded image; `None` for an enclave image, whose kernel is read
/// from its copy in guest memory once that exists.
fn open_kernel(spec: &KernelSpec) -> Result<Option<KernelImage>, VmError> {
    match spec {
        KernelSpec::Path(path) => {
            let file =
                File::open(path).map_err(|source| VmError::OpenKernel { path: path.clone(), source })?;
            match file.metadata() {
                Ok(meta) if meta.is_dir() => Err(VmError::OpenKernel {
                    path: path.clone(),
                    source: std::io::Error::from_raw_os_error(libc::EISDIR),
                }),
                _ => Ok(Some(KernelImage::File(file))),
            }
        }
        KernelSpec::Embedded { image, .. } => Ok(Some(KernelImage::Embedded(Cursor::new(image)))),
        KernelSpec::Eif(_) => Ok(None),
    }
}

fn kernel_name(spec: &KernelSpec) -> String {
    match spec {
        KernelSpec::Path(path) | KernelSpec::Eif(path) => path.display().to_string(),
        KernelSpec::Embedded { name, .. } => name.to_string(),
    }
}

pub(crate) fn open_serial(sink: SerialSink) -> Result<SerialOutput, VmError> {
    Ok(match sink {
        SerialSink::Stdout => Box::new(std::io::stdout()),
        SerialSink::None => Box::new(std::io::sink()),
        SerialSink::Writer(writer) => writer,
        SerialSink::File(path) => {
            Box::new(File::create(&path).map_err(|source| VmError::SerialOutput { path, source })?)
        }
    })
}

/// pc-testdev's effects on the VM: ISA IRQ lines and page flushes.
pub(crate) struct VmTestdevHost {
    pub vm: Arc<VmFd>,
    pub mem: GuestRam,
}

impl TestdevHost for VmTestdevHost {
    fn set_irq_line(&self, line: u32, level: bool) {
        let _ = self.vm.set_irq_line(line, level);
    }

    fn flush_page(&self, gpa: u64) {
        let Ok(host) = self.mem.get_host_address(GuestAddress(gpa)) else { return };
        let page = (host as usize & !0xfff) as *mut libc::c_void;
        // SAFETY: `page` is a page of guest RAM mapped by `mem`, which outlives this call. Taking
        // its access away and giving it back makes KVM drop and refault its mapping, as QEMU's
        // testdev does; the contents are untouched.
        unsafe {
            libc::mprotect(page, 4096, libc::PROT_NONE);
            libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_WRITE);
        }
    }
}
