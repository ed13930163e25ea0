//! Wiring a VM in one readable place (`Vm::build`) and running it to its end (`Vm::run`).

use crate::memory::GuestRam;
use std::fs::File;
use std::io::{Cursor, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use carve_nsm::pcr::{BootMeasurements, ParentIdentity};
use carve_nsm::pki::CertificateAuthority;

use crate::acpi::{self, AcpiError};
use crate::boot::{self, BootError, BootSetup, BootSource, KernelImage};
use crate::cpuid::{self, CpuTemplate};
use crate::devices::bus::{Bus, BusError};
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_LEN, DEBUG_EXIT_PORT};
use crate::devices::fw_cfg::{FwCfg, FW_CFG_BASE, FW_CFG_LEN};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::msi_testdev::{MsiTestdev, MSI_TESTDEV_LEN};
use crate::devices::serial::{SerialOutput, SerialPort, COM1_BASE, COM1_LEN};
use crate::devices::testdev::{Testdev, TestdevHost, IOMEM_BASE, IOMEM_LEN};
use crate::devices::virtio::VirtioSlot;
use crate::exit::{ExitSignal, VmExit};
use crate::guest_state::file::{StateFile, StateFileError};
use crate::guest_state::{self, GuestState, Platform, Violation};
use crate::interrupts::{InterruptError, InterruptManager};
use crate::layout::{
    KVM_TSS_ADDRESS, MSI_TESTDEV_START, SERIAL_IRQ, VIRTIO_FIRST_IRQ, VIRTIO_MMIO_SLOTS, VIRTIO_MMIO_START,
};
use crate::memory::{self, MemoryBacking, MemoryError};
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
    #[error("cannot attach the NSM device: {0}")]
    Nsm(std::io::Error),
    #[error("cannot give the NSM a signing identity: {0}")]
    NsmIdentity(carve_nsm::pki::PkiError),
    #[error("no room for another virtio device: carve maps at most {VIRTIO_MMIO_SLOTS}")]
    TooManyVirtioDevices,
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

fn kvm_error(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
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
#[derive(Clone, Debug)]
pub struct VsockConfig {
    pub cid: u64,
    pub uds: PathBuf,
    /// Listeners every VM reaches (`PREFIX_PORT`), after the VM's own at `uds_PORT`.
    pub shared_listeners: Option<PathBuf>,
}

/// The NSM to attach: who the VM is, who launched it, and the CA that signs for it. The image
/// PCRs come from the enclave image being booted (zeros without one).
pub struct NsmConfig {
    /// The enclave ID, reported as `module_id` and the leaf certificate's CN.
    pub module_id: String,
    pub parent: ParentIdentity,
    /// Debug-mode enclaves report their image PCRs as zeros.
    pub debug_mode: bool,
    pub ca: CertificateAuthority,
}

pub struct VmConfig {
    pub kernel: KernelSpec,
    pub cmdline: String,
    pub initrd: Option<PathBuf>,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub cpu_template: CpuTemplate,
    pub serial: SerialSink,
    /// Forward the process's standard input to the serial port.
    pub serial_input: bool,
    /// Map QEMU's pc-testdev (for kvm-unit-tests).
    pub testdev: bool,
    /// Registers to start vCPU 0 with instead of the boot protocol's (`--load-state`).
    pub load_state: Option<StateFile>,
    pub entry_check: EntryCheck,
    pub vsock: Option<VsockConfig>,
    /// A Nitro Secure Module the guest reaches through virtio-nsm.
    pub nsm: Option<NsmConfig>,
    pub memory_backing: MemoryBacking,
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
            serial: SerialSink::Stdout,
            serial_input: false,
            testdev: false,
            load_state: None,
            entry_check: EntryCheck::default(),
            vsock: None,
            nsm: None,
            memory_backing: MemoryBacking::Anonymous,
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

/// A built VM, ready to run. Field order is drop order: vCPUs and the VM fd go before memory.
pub struct Vm {
    vcpus: Vec<Vcpu>,
    context: Arc<VcpuContext>,
    serial: Arc<Mutex<SerialPort>>,
    serial_input: bool,
    boot: BootSetup,
    entry_warnings: Vec<String>,
    template_warning: Option<String>,
    vcpu_affinity: Vec<usize>,
    /// Device event handlers (virtio backends) that run on the VM's event loop.
    device_handlers: Vec<Box<dyn MutEventSubscriber + Send>>,
    _vm_fd: Arc<VmFd>,
    _kvm: Kvm,
}

impl Vm {
    pub fn build(config: VmConfig) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(|source| VmError::KvmUnavailable { source })?;
        let max_vcpus = (kvm.get_max_vcpus() as u32).min(mptable::MAX_CPUS as u32);
        match config.vcpus {
            0 => return Err(VmError::NoVcpus),
            n if n > max_vcpus => return Err(VmError::TooManyVcpus { requested: n, max: max_vcpus }),
            _ => {}
        }
        let vcpu_count = config.vcpus as u8;

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
        let mem = memory::create(config.memory_mib, config.memory_backing)?;
        memory::register(&vm_fd, &mem)?;
        vm_fd.set_tss_address(KVM_TSS_ADDRESS).map_err(kvm_error("set the TSS address"))?;
        vm_fd.create_irq_chip().map_err(kvm_error("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm_fd.create_pit2(pit).map_err(kvm_error("create the in-kernel PIT"))?;

        let interrupts = InterruptManager::new(vm_fd.clone())?;
        let exit = Arc::new(ExitSignal::new().map_err(|e| VmError::Host(e.to_string()))?);
        let serial =
            Arc::new(Mutex::new(SerialPort::new(interrupts.legacy_line(SERIAL_IRQ)?, serial_output)));

        let mut pio = Bus::default();
        pio.insert(serial.clone(), COM1_BASE, COM1_LEN)?;
        pio.insert(Arc::new(Mutex::new(I8042::new(exit.clone()))), I8042_BASE, I8042_LEN)?;
        pio.insert(Arc::new(Mutex::new(DebugExit(exit.clone()))), DEBUG_EXIT_PORT, DEBUG_EXIT_LEN)?;
        let fw_cfg = FwCfg::new(vcpu_count.into(), max_vcpus as u16, config.memory_mib << 20);
        pio.insert(Arc::new(Mutex::new(fw_cfg)), FW_CFG_BASE, FW_CFG_LEN)?;
        let mut mmio = Bus::default();
        if config.testdev {
            let host = Box::new(VmTestdevHost { vm: vm_fd.clone(), mem: mem.clone() });
            let testdev = Arc::new(Mutex::new(Testdev::new(host)));
            for (base, len) in Testdev::pio_ranges() {
                pio.insert(testdev.clone(), base, len)?;
            }
            mmio.insert(testdev, IOMEM_BASE, IOMEM_LEN)?;
            let msi = MsiTestdev::new(interrupts.msi_store(), interrupts.msi_capacity());
            mmio.insert(Arc::new(Mutex::new(msi)), MSI_TESTDEV_START, MSI_TESTDEV_LEN)?;
        }

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

        let mut virtio =
            VirtioDevices { vm: &vm_fd, interrupts: &interrupts, mmio: &mut mmio, slots: Vec::new() };
        let mut device_handlers: Vec<Box<dyn MutEventSubscriber + Send>> = Vec::new();
        if let Some(vsock) = &config.vsock {
            let (device, backend) = carve_virtio::vsock::Vsock::new(
                vsock.cid,
                vsock.uds.clone(),
                vsock.shared_listeners.clone(),
                mem.clone(),
            )?;
            virtio.attach(Box::new(device), &mem)?;
            device_handlers.push(Box::new(backend));
        }
        if let Some(setup) = config.nsm {
            let measurements = BootMeasurements {
                image: image_measurements,
                parent: setup.parent,
                debug_mode: setup.debug_mode,
            };
            let nsm = carve_nsm::Nsm::new(setup.module_id, &measurements, setup.ca)
                .map_err(VmError::NsmIdentity)?;
            let (device, backend) =
                carve_virtio::nsm::NsmDevice::new(nsm, mem.clone()).map_err(VmError::Nsm)?;
            virtio.attach(Box::new(device), &mem)?;
            device_handlers.push(Box::new(backend));
        }
        let slots = virtio.slots;
        for slot in &slots {
            cmdline = format!("{cmdline} {}", slot.cmdline_param()).trim_start().to_string();
        }

        let kernel_name = kernel_name(&config.kernel);
        let mut kernel = kernel.expect("a kernel file, an embedded kernel or an enclave image's");
        let boot = boot::load(
            &mem,
            BootSource {
                kernel: &mut kernel,
                kernel_name: &kernel_name,
                cmdline: &cmdline,
                initrd: initrd.as_mut(),
            },
        )?;
        mptable::write(&mem, vcpu_count)?;
        acpi::write(&mem, vcpu_count, &slots)?;

        let mut supported =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_error("report supported CPUID"))?;
        cpuid::announce_emulated(&mut supported, kvm.check_extension(Cap::TscDeadlineTimer));
        let platform = Platform::host(&supported);
        let context = Arc::new(VcpuContext {
            pio,
            mmio,
            exit,
            stats: Default::default(),
            mem: mem.clone(),
            platform,
            state_requests: Default::default(),
            halt_round: Default::default(),
            stuck_in_round: (0..vcpu_count).map(|_| Default::default()).collect(),
        });

        let mut vcpus = Vec::with_capacity(vcpu_count.into());
        for index in 0..vcpu_count {
            let fd = vm_fd.create_vcpu(index.into()).map_err(kvm_error("create a vCPU"))?;
            configure_vcpu(&fd, &supported, &config.cpu_template, index, vcpu_count)?;
            if index == 0 {
                boot::cpu_state::apply(&fd, &mem, boot.entry)?;
                if let Some(state) = &config.load_state {
                    load_state(&fd, state, &platform, config.entry_check)?;
                }
            }
            vcpus.push(Vcpu { index: index.into(), fd, context: context.clone() });
        }
        let entry_warnings = check_entry_states(&vcpus, &platform, config.entry_check)?;
        let template_warning = unenforced_template(&vcpus[0].fd, &config.cpu_template)?;

        Ok(Vm {
            vcpus,
            context,
            serial,
            serial_input: config.serial_input,
            boot,
            entry_warnings,
            template_warning,
            vcpu_affinity: config.vcpu_affinity,
            device_handlers,
            _vm_fd: vm_fd,
            _kvm: kvm,
        })
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

    pub fn boot_setup(&self) -> &BootSetup {
        &self.boot
    }

    /// Bytes of guest RAM (hugepage-backed guests round up to whole pages).
    pub fn memory_size(&self) -> u64 {
        memory::total_size(&self.context.mem)
    }

    /// A handle that ends the VM from another thread once it runs.
    pub fn stopper(&self) -> VmStopper {
        VmStopper(self.context.exit.clone())
    }

    /// The boot vCPU, before the VM runs (for inspecting or checking its state).
    pub fn boot_vcpu(&self) -> &VcpuFd {
        &self.vcpus[0].fd
    }

    /// Runs every vCPU on its own thread until the guest or carve ends the VM.
    pub fn run(self) -> Result<VmOutcome, VmError> {
        install_kick_handler();
        let context = self.context.clone();
        let mut events =
            EventManager::<Box<dyn MutEventSubscriber>>::new().map_err(|e| VmError::Host(e.to_string()))?;
        let exit_event = context.exit.event().try_clone().map_err(|e| VmError::Host(e.to_string()))?;
        events.add_subscriber(Box::new(ExitWatcher(exit_event)));
        if self.serial_input {
            events.add_subscriber(Box::new(ConsoleInput { serial: self.serial.clone() }));
        }
        for handler in self.device_handlers {
            events.add_subscriber(handler);
        }
        // Stop signals end the VM like any other exit, so devices clean up (sockets removed).
        let mut signal_ids = Vec::new();
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP]
        {
            let (reader, writer) = UnixStream::pair().map_err(|e| VmError::Host(e.to_string()))?;
            reader.set_nonblocking(true).map_err(|e| VmError::Host(e.to_string()))?;
            let id = signal_hook::low_level::pipe::register(signal, writer)
                .map_err(|e| VmError::Host(e.to_string()))?;
            signal_ids.push(id);
            events.add_subscriber(Box::new(StopSignal { reader, signal, exit: context.exit.clone() }));
        }

        let mut threads = Vec::new();
        for vcpu in self.vcpus {
            let name = format!("carve-vcpu{}", vcpu.index);
            let host_cpu = self.vcpu_affinity.get(vcpu.index).copied();
            let run = move || {
                if let Some(cpu) = host_cpu {
                    if let Err(e) = pin_current_thread(cpu) {
                        let message = format!("cannot pin vCPU {} to host CPU {cpu}: {e}", vcpu.index);
                        vcpu.context.exit.request(VmExit::VmmFailure(message));
                        return;
                    }
                }
                vcpu.run()
            };
            match thread::Builder::new().name(name).spawn(run) {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    context.exit.request(VmExit::VmmFailure(format!("cannot start a vCPU thread: {e}")));
                    break;
                }
            }
        }
        // SIGUSR1 asks every vCPU for its registers, as QEMU's `info registers` (a guest that
        // hangs can be located without stopping it).
        let (reader, writer) = UnixStream::pair().map_err(|e| VmError::Host(e.to_string()))?;
        reader.set_nonblocking(true).map_err(|e| VmError::Host(e.to_string()))?;
        let usr1 = signal_hook::low_level::pipe::register(signal_hook::consts::SIGUSR1, writer)
            .map_err(|e| VmError::Host(e.to_string()))?;
        signal_ids.push(usr1);
        // std hands out a u64 everywhere; libc's pthread_t is a pointer on musl.
        #[allow(clippy::unnecessary_cast)]
        let threads_to_kick: Vec<_> = threads.iter().map(|h| h.as_pthread_t() as libc::pthread_t).collect();
        events.add_subscriber(Box::new(StateRequest {
            reader,
            context: context.clone(),
            threads: threads_to_kick.clone(),
        }));
        events.add_subscriber(Box::new(HaltWatch::new(context.clone(), threads_to_kick)?));
        while !context.exit.is_requested() {
            if let Err(e) = events.run() {
                context.exit.request(VmExit::VmmFailure(format!("event loop failed: {e:?}")));
            }
        }
        // A vCPU may be inside KVM_RUN (or about to enter it): kick until every thread is out.
        for handle in threads {
            while !handle.is_finished() {
                let _ = handle.kill(SIGRTMIN());
                thread::sleep(Duration::from_micros(200));
            }
            let _ = handle.join();
        }
        // The guest may have handed devices work just before it stopped (say, the last packets
        // of a reply, then a power-off): queue notifications arrive through ioeventfds, so let
        // the devices take what is already signalled before they are dropped.
        for _ in 0..DRAIN_ROUNDS {
            if !matches!(events.run_with_timeout(0), Ok(n) if n > 0) {
                break;
            }
        }
        for id in signal_ids {
            signal_hook::low_level::unregister(id);
        }
        self.serial.lock().unwrap_or_else(std::sync::PoisonError::into_inner).flush();
        let exit = context.exit.take().expect("the loop ends only once an exit was requested");
        Ok(VmOutcome { exit, io: context.stats.snapshot() })
    }
}

/// Ends a running VM from another thread; the VM's exit is then [`VmExit::Terminated`].
#[derive(Clone)]
pub struct VmStopper(Arc<ExitSignal>);

impl VmStopper {
    pub fn stop(&self) {
        self.0.request(VmExit::Terminated);
    }
}

fn pin_current_thread(cpu: usize) -> rustix::io::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set)
}

/// Event-loop rounds that drain device work after the vCPUs stopped; each round takes every
/// event already signalled, so a few suffice and a guest cannot keep the VMM alive.
const DRAIN_ROUNDS: usize = 16;

/// Places virtio-mmio devices: a window and IRQ each, queue notifications on ioeventfds.
struct VirtioDevices<'a> {
    vm: &'a VmFd,
    interrupts: &'a InterruptManager,
    mmio: &'a mut Bus,
    slots: Vec<VirtioSlot>,
}

impl VirtioDevices<'_> {
    fn attach(&mut self, device: Box<dyn carve_virtio::VirtioDevice>, mem: &GuestRam) -> Result<(), VmError> {
        let index = self.slots.len() as u64;
        if index >= VIRTIO_MMIO_SLOTS {
            return Err(VmError::TooManyVirtioDevices);
        }
        let slot = VirtioSlot::new(
            VIRTIO_MMIO_START + index * carve_virtio::mmio::MMIO_WINDOW,
            VIRTIO_FIRST_IRQ + index as u32,
        );
        let address = IoEventAddress::Mmio(slot.notify_address());
        for (queue, notifier) in device.queue_notifiers().iter().enumerate() {
            // With the ioeventfd a notification costs no exit to user space; the transport
            // still forwards any that reach it.
            self.vm
                .register_ioevent(notifier, &address, queue as u32)
                .map_err(kvm_error("bind a virtio queue notification to an ioeventfd"))?;
        }
        let line = Arc::new(self.interrupts.legacy_line(slot.irq)?);
        let transport = carve_virtio::mmio::MmioTransport::new(device, mem.clone(), line);
        self.mmio.insert(Arc::new(Mutex::new(transport)), slot.base, slot.len)?;
        self.slots.push(slot);
        Ok(())
    }
}

fn configure_vcpu(
    fd: &VcpuFd,
    supported: &kvm_bindings::CpuId,
    template: &CpuTemplate,
    index: u8,
    count: u8,
) -> Result<(), VmError> {
    let mut cpuid = supported.clone();
    let tsc_khz = fd.get_tsc_khz().ok().filter(|&khz| khz > 0);
    cpuid::normalize(&mut cpuid, index, count, tsc_khz);
    template.apply(&mut cpuid);
    fd.set_cpuid2(&cpuid).map_err(kvm_error("set the vCPU's CPUID"))?;
    fd.set_msrs(&vcpu::boot_msrs()).map_err(kvm_error("set boot MSRs"))?;
    vcpu::configure_lapic(fd).map_err(kvm_error("configure the local APIC"))?;
    Ok(())
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
        let violations = guest_state::check(&GuestState::from_kvm(&sregs, regs.rflags, platform), platform);
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

fn open_serial(sink: SerialSink) -> Result<SerialOutput, VmError> {
    Ok(match sink {
        SerialSink::Stdout => Box::new(std::io::stdout()),
        SerialSink::None => Box::new(std::io::sink()),
        SerialSink::Writer(writer) => writer,
        SerialSink::File(path) => {
            Box::new(File::create(&path).map_err(|source| VmError::SerialOutput { path, source })?)
        }
    })
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    ONCE.call_once(|| {
        // Without a handler SIGRTMIN would kill the process; with one, KVM_RUN returns EINTR.
        register_signal_handler(SIGRTMIN(), kick).expect("SIGRTMIN is a valid signal");
    });
}

/// Wakes the event loop when a vCPU or device asks the VM to end.
struct ExitWatcher(EventFd);

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.0, EventSet::IN)).expect("a fresh eventfd registers");
    }
}

/// Ends the VM when a stop signal arrives (signal-hook writes a byte to `reader`'s peer).
struct StopSignal {
    reader: UnixStream,
    signal: i32,
    exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for StopSignal {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.reader.read(&mut [0u8; 16]);
        self.exit.request(VmExit::Stopped(self.signal));
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.reader, EventSet::IN)).expect("a fresh socket registers");
    }
}

/// Asks each vCPU thread to print its registers: bump the request, kick it out of KVM_RUN.
struct StateRequest {
    reader: UnixStream,
    context: Arc<VcpuContext>,
    threads: Vec<libc::pthread_t>,
}

impl MutEventSubscriber for StateRequest {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.reader.read(&mut [0u8; 16]);
        self.context.state_requests.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        kick(&self.threads);
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.reader, EventSet::IN)).expect("a fresh socket registers");
    }
}

/// Makes each vCPU thread return from KVM_RUN (EINTR) and look at its requests.
fn kick(threads: &[libc::pthread_t]) {
    for &thread in threads {
        // SAFETY: the vCPU threads are joined only after the event loop that calls this has
        // ended, so every id names a live thread; SIGRTMIN has a no-op handler.
        unsafe { libc::pthread_kill(thread, SIGRTMIN()) };
    }
}

/// Ends the VM once nothing can run again. Every period it starts a round and kicks the vCPUs;
/// each checks whether it is stuck (halted with interrupts disabled, or never started); if all
/// were in the last round, the VM is over ([`VmExit::Halted`]). KVM keeps a halted vCPU inside
/// KVM_RUN, so only asking tells.
struct HaltWatch {
    timer: vmm_sys_util::timerfd::TimerFd,
    context: Arc<VcpuContext>,
    threads: Vec<libc::pthread_t>,
}

const HALT_WATCH_PERIOD: Duration = Duration::from_millis(500);

impl HaltWatch {
    fn new(context: Arc<VcpuContext>, threads: Vec<libc::pthread_t>) -> Result<HaltWatch, VmError> {
        let mut timer = vmm_sys_util::timerfd::TimerFd::new().map_err(|e| VmError::Host(e.to_string()))?;
        timer.reset(HALT_WATCH_PERIOD, Some(HALT_WATCH_PERIOD)).map_err(|e| VmError::Host(e.to_string()))?;
        Ok(HaltWatch { timer, context, threads })
    }
}

impl MutEventSubscriber for HaltWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.timer.wait();
        let round = self.context.halt_round.load(std::sync::atomic::Ordering::Acquire);
        if round > 0 && self.context.all_stuck(round) {
            self.context.exit.request(VmExit::Halted);
            return;
        }
        self.context.halt_round.store(round + 1, std::sync::atomic::Ordering::Release);
        kick(&self.threads);
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.timer, EventSet::IN)).expect("a fresh timerfd registers");
    }
}

/// Feeds standard input to the guest's serial port.
struct ConsoleInput {
    serial: Arc<Mutex<SerialPort>>,
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n = std::io::stdin().lock().read(&mut buf).unwrap_or(0);
        if n == 0 || events.event_set().contains(EventSet::HANG_UP) {
            let _ = ops.remove(events);
            return;
        }
        self.serial.lock().unwrap_or_else(std::sync::PoisonError::into_inner).enqueue_input(&buf[..n]);
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Regular files and /dev/null cannot be polled; then there is simply no console input.
        let _ = ops.add(Events::new(&std::io::stdin().as_raw_fd(), EventSet::IN));
    }
}

/// pc-testdev's effects on the VM: ISA IRQ lines and page flushes.
struct VmTestdevHost {
    vm: Arc<VmFd>,
    mem: GuestRam,
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
