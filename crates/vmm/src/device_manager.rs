//! The device manager: owns every device of a VM with a typed handle, maps them on the PIO and
//! MMIO buses, wires their interrupts, and hands their event-loop halves to the VMM's loop.
//! Booting and restoring a VM attach devices through the same helpers here.

use std::sync::{Arc, Mutex};

use event_manager::{MutEventSubscriber, SubscriberId, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};

use carve_nsm::pki::CertificateAuthority;
use carve_snapshot::Persist;
use carve_virtio::mmio::MmioTransport;
use carve_virtio::nsm::{NsmBackend, NsmDevice};
use carve_virtio::state::{self, DeviceState, RestoreError, VirtioState};
use carve_virtio::vsock::{Vsock, VsockBackend};
use carve_virtio::VirtioDevice;
use serde::{Deserialize, Serialize};

use crate::devices::bus::Bus;
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_LEN, DEBUG_EXIT_PORT};
use crate::devices::fw_cfg::{FwCfg, FwCfgConfig, FwCfgState, FW_CFG_BASE, FW_CFG_LEN};
use crate::devices::i8042::{I8042State, I8042, I8042_BASE, I8042_LEN};
use crate::devices::msi_testdev::{MsiTestdev, MsiTestdevState, MSI_TESTDEV_LEN};
use crate::devices::serial::{SerialOutput, SerialPort, SerialPortState, COM1_BASE, COM1_LEN};
use crate::devices::testdev::{Testdev, TestdevState, IOMEM_BASE, IOMEM_LEN};
use crate::devices::virtio::VirtioSlot;
use crate::exit::ExitSignal;
use crate::interrupts::{InterruptManager, InterruptState};
use crate::layout::{MSI_TESTDEV_START, SERIAL_IRQ, VIRTIO_FIRST_IRQ, VIRTIO_MMIO_SLOTS, VIRTIO_MMIO_START};
use crate::memory::GuestRam;
use crate::vm::{VmError, VsockConfig};

/// What a virtio device is, for saving it and for telling a restore what to rebuild.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioKind {
    Vsock,
    Nsm,
}

/// A virtio device's two halves as built: the device its transport drives, and its backend.
pub enum VirtioParts {
    Vsock(Vsock, Box<VsockBackend>),
    Nsm(NsmDevice, Box<NsmBackend>),
}

/// A virtio device's event-loop half, shared between the loop and the manager, typed so a
/// snapshot can save it.
#[derive(Clone)]
pub enum Backend {
    Vsock(Arc<Mutex<VsockBackend>>),
    Nsm(Arc<Mutex<NsmBackend>>),
}

impl Backend {
    pub fn kind(&self) -> VirtioKind {
        match self {
            Backend::Vsock(_) => VirtioKind::Vsock,
            Backend::Nsm(_) => VirtioKind::Nsm,
        }
    }

    fn subscriber(&self) -> Box<dyn MutEventSubscriber> {
        match self {
            Backend::Vsock(backend) => Box::new(backend.clone()),
            Backend::Nsm(backend) => Box::new(backend.clone()),
        }
    }

    /// Saves the device with its transport; the VM is paused and the backend off the loop.
    pub fn save(&self, transport: &MmioTransport) -> VirtioState {
        match self {
            Backend::Vsock(backend) => state::save(transport, &mut *lock(backend)),
            Backend::Nsm(backend) => state::save(transport, &mut *lock(backend)),
        }
    }
}

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One virtio-mmio device: where it sits, its transport on the MMIO bus, its backend.
pub struct VirtioHandle {
    pub slot: VirtioSlot,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub backend: Backend,
    /// The backend's place on the event loop while it is registered there.
    subscriber: Option<SubscriberId>,
}

/// pc-testdev and the MSI message-store test device (`--testdev`).
pub struct TestDevices {
    pub testdev: Arc<Mutex<Testdev>>,
    pub msi: Arc<Mutex<MsiTestdev>>,
}

/// Every device of a VM.
pub struct DeviceManager {
    pub interrupts: InterruptManager,
    pub serial: Arc<Mutex<SerialPort>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub debug_exit: Arc<Mutex<DebugExit>>,
    pub fw_cfg: Arc<Mutex<FwCfg>>,
    pub test_devices: Option<TestDevices>,
    pub virtio: Vec<VirtioHandle>,
    /// What fw_cfg's items were built from, and where vsock's host side is: configuration a
    /// snapshot carries so the restored devices are the same.
    fw_cfg_config: FwCfgConfig,
    vsock: Option<VsockConfig>,
    pio: Bus,
    mmio: Bus,
}

/// Every device's state, as a snapshot holds it.
#[derive(Serialize, Deserialize)]
pub struct DevicesState {
    pub interrupts: InterruptState,
    pub serial: SerialPortState,
    pub i8042: I8042State,
    pub fw_cfg_config: FwCfgConfig,
    pub fw_cfg: FwCfgState,
    pub test_devices: Option<(TestdevState, MsiTestdevState)>,
    /// In slot order.
    pub virtio: Vec<VirtioState>,
    pub vsock: Option<VsockConfig>,
}

/// What restoring devices needs besides their state.
pub struct DeviceRestore<'a> {
    pub vm: &'a Arc<VmFd>,
    pub mem: &'a GuestRam,
    pub exit: Arc<ExitSignal>,
    pub serial_output: SerialOutput,
    /// Replaces the saved vsock host side (its socket paths), keeping the guest's CID.
    pub vsock: Option<VsockConfig>,
    /// Issues the restored NSM's signing leaf.
    pub nsm_ca: Option<CertificateAuthority>,
}

/// The platform devices every VM has, already built (from a configuration or from saved state).
pub struct PlatformDevices {
    pub serial: SerialPort,
    pub i8042: I8042,
    pub fw_cfg: FwCfg,
    pub test_devices: Option<(Testdev, MsiTestdev)>,
}

impl DeviceManager {
    /// Maps the platform devices: COM1, the i8042 (its reset line), debug-exit, fw_cfg and,
    /// for kvm-unit-tests, pc-testdev and the MSI test device.
    pub fn new(
        interrupts: InterruptManager,
        exit: Arc<ExitSignal>,
        platform: PlatformDevices,
        fw_cfg_config: FwCfgConfig,
        vsock: Option<VsockConfig>,
    ) -> Result<DeviceManager, VmError> {
        let mut pio = Bus::default();
        let mut mmio = Bus::default();
        let serial = Arc::new(Mutex::new(platform.serial));
        pio.insert(serial.clone(), COM1_BASE, COM1_LEN)?;
        let i8042 = Arc::new(Mutex::new(platform.i8042));
        pio.insert(i8042.clone(), I8042_BASE, I8042_LEN)?;
        let debug_exit = Arc::new(Mutex::new(DebugExit(exit)));
        pio.insert(debug_exit.clone(), DEBUG_EXIT_PORT, DEBUG_EXIT_LEN)?;
        let fw_cfg = Arc::new(Mutex::new(platform.fw_cfg));
        pio.insert(fw_cfg.clone(), FW_CFG_BASE, FW_CFG_LEN)?;
        let test_devices = match platform.test_devices {
            Some((testdev, msi)) => {
                let testdev = Arc::new(Mutex::new(testdev));
                for (base, len) in Testdev::pio_ranges() {
                    pio.insert(testdev.clone(), base, len)?;
                }
                mmio.insert(testdev.clone(), IOMEM_BASE, IOMEM_LEN)?;
                let msi = Arc::new(Mutex::new(msi));
                mmio.insert(msi.clone(), MSI_TESTDEV_START, MSI_TESTDEV_LEN)?;
                Some(TestDevices { testdev, msi })
            }
            None => None,
        };
        Ok(DeviceManager {
            interrupts,
            serial,
            i8042,
            debug_exit,
            fw_cfg,
            test_devices,
            virtio: Vec::new(),
            fw_cfg_config,
            vsock,
            pio,
            mmio,
        })
    }

    /// Every device's state; the VM is paused and the backends are off the event loop.
    pub fn save(&self) -> DevicesState {
        DevicesState {
            interrupts: self.interrupts.save(),
            serial: lock(&self.serial).save(),
            i8042: lock(&self.i8042).save(),
            fw_cfg_config: self.fw_cfg_config,
            fw_cfg: lock(&self.fw_cfg).save(),
            test_devices: self.test_devices.as_ref().map(|t| (lock(&t.testdev).save(), lock(&t.msi).save())),
            virtio: self.virtio.iter().map(|h| h.backend.save(&lock(&h.transport))).collect(),
            vsock: self.vsock.clone(),
        }
    }

    /// Rebuilds the devices of a snapshot onto a VM whose irqchip already holds its saved
    /// state (the serial port may raise its line again at once) and whose memory holds the
    /// snapshot's contents.
    pub fn restore(args: DeviceRestore<'_>, state: &DevicesState) -> Result<DeviceManager, VmError> {
        let invalid = |what: &str, e: &dyn std::fmt::Display| VmError::SnapshotState(format!("{what}: {e}"));
        let interrupts = InterruptManager::restore(args.vm.clone(), &state.interrupts)
            .map_err(|e| invalid("interrupt routes", &e))?;
        let serial =
            SerialPort::restore((interrupts.legacy_line(SERIAL_IRQ)?, args.serial_output), &state.serial)
                .map_err(|e| invalid("serial port", &e))?;
        let fw_cfg = FwCfg::restore(state.fw_cfg_config, &state.fw_cfg).map_err(|e| invalid("fw_cfg", &e))?;
        let i8042 = match I8042::restore(args.exit.clone(), &state.i8042) {
            Ok(i8042) => i8042,
            Err(never) => match never {},
        };
        let test_devices = match &state.test_devices {
            Some((testdev, msi)) => {
                let host = Box::new(crate::vm::VmTestdevHost { vm: args.vm.clone(), mem: args.mem.clone() });
                let testdev = Testdev::restore(host, testdev).map_err(|e| invalid("pc-testdev", &e))?;
                let msi = MsiTestdev::restore(interrupts.clone(), msi)
                    .map_err(|e| invalid("MSI test device", &e))?;
                Some((testdev, msi))
            }
            None => None,
        };
        let unclaimed = interrupts.unclaimed_msi_stores();
        if !unclaimed.is_empty() {
            return Err(invalid(
                "interrupt routes",
                &format_args!("MSI stores {unclaimed:?} belong to no device"),
            ));
        }
        let platform = PlatformDevices { serial, i8042, fw_cfg, test_devices };
        let vsock = match (&state.vsock, args.vsock) {
            (Some(_), Some(configured)) => Some(configured),
            (saved, _) => saved.clone(),
        };
        let mut devices =
            DeviceManager::new(interrupts, args.exit, platform, state.fw_cfg_config, vsock.clone())?;
        let mut nsm_ca = args.nsm_ca;
        for saved in &state.virtio {
            let slot = devices.next_virtio_slot()?;
            let line = Arc::new(devices.interrupts.legacy_line(slot.irq)?);
            let mem = args.mem.clone();
            let restored = |e: RestoreError| VmError::SnapshotState(format!("{}: {e}", saved.device.name()));
            let (transport, backend) = match &saved.device {
                DeviceState::Vsock(_) => {
                    let Some(vsock) = &vsock else {
                        return Err(VmError::SnapshotState(
                            "vsock device comes without its configuration".into(),
                        ));
                    };
                    let (transport, backend) = state::restore_vsock(
                        saved,
                        vsock.cid,
                        vsock.uds.clone(),
                        vsock.shared_listeners.clone(),
                        mem,
                        line,
                    )
                    .map_err(restored)?;
                    (transport, Backend::Vsock(Arc::new(Mutex::new(backend))))
                }
                DeviceState::Nsm(_) => {
                    let Some(ca) = nsm_ca.take() else {
                        return Err(VmError::SnapshotState(
                            "NSM has no CA to sign for it (one per NSM)".into(),
                        ));
                    };
                    let (transport, backend) = state::restore_nsm(saved, ca, mem, line).map_err(restored)?;
                    (transport, Backend::Nsm(Arc::new(Mutex::new(backend))))
                }
            };
            devices.attach_transport(args.vm, slot, transport, backend)?;
        }
        Ok(devices)
    }

    /// The next virtio-mmio slot, or the error that there is none.
    pub fn next_virtio_slot(&self) -> Result<VirtioSlot, VmError> {
        let index = self.virtio.len() as u64;
        if index >= VIRTIO_MMIO_SLOTS {
            return Err(VmError::TooManyVirtioDevices);
        }
        Ok(VirtioSlot::new(
            VIRTIO_MMIO_START + index * carve_virtio::mmio::MMIO_WINDOW,
            VIRTIO_FIRST_IRQ + index as u32,
        ))
    }

    /// Maps a virtio device in the next slot: queue notifications on ioeventfds, its interrupt
    /// on the slot's IOAPIC pin.
    pub fn attach_virtio(&mut self, vm: &VmFd, mem: &GuestRam, parts: VirtioParts) -> Result<(), VmError> {
        let slot = self.next_virtio_slot()?;
        let line = Arc::new(self.interrupts.legacy_line(slot.irq)?);
        let (device, backend): (Box<dyn VirtioDevice>, Backend) = match parts {
            VirtioParts::Vsock(device, backend) => {
                (Box::new(device), Backend::Vsock(Arc::new(Mutex::new(*backend))))
            }
            VirtioParts::Nsm(device, backend) => {
                (Box::new(device), Backend::Nsm(Arc::new(Mutex::new(*backend))))
            }
        };
        let transport = MmioTransport::new(device, mem.clone(), line);
        self.attach_transport(vm, slot, transport, backend)
    }

    /// Maps an already built transport (booted or restored) at `slot`.
    pub fn attach_transport(
        &mut self,
        vm: &VmFd,
        slot: VirtioSlot,
        transport: MmioTransport,
        backend: Backend,
    ) -> Result<(), VmError> {
        let address = IoEventAddress::Mmio(slot.notify_address());
        for (queue, notifier) in transport.device().queue_notifiers().iter().enumerate() {
            // With the ioeventfd a notification costs no exit to user space; the transport
            // still forwards any that reach it.
            vm.register_ioevent(notifier, &address, queue as u32).map_err(|source| VmError::Kvm {
                what: "bind a virtio queue notification to an ioeventfd",
                source,
            })?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio.insert(transport.clone(), slot.base, slot.len)?;
        self.virtio.push(VirtioHandle { slot, transport, backend, subscriber: None });
        Ok(())
    }

    pub fn virtio_slots(&self) -> Vec<VirtioSlot> {
        self.virtio.iter().map(|handle| handle.slot).collect()
    }

    /// The buses the vCPU threads dispatch port and MMIO exits on.
    pub fn buses(&self) -> (Bus, Bus) {
        (self.pio.clone(), self.mmio.clone())
    }

    /// Puts every backend on the event loop (at start, and on resume).
    pub fn start_backends<S: SubscriberOps<Subscriber = Box<dyn MutEventSubscriber>>>(
        &mut self,
        events: &mut S,
    ) {
        for handle in &mut self.virtio {
            if handle.subscriber.is_none() {
                handle.subscriber = Some(events.add_subscriber(handle.backend.subscriber()));
            }
        }
    }

    /// Takes every backend off the event loop, so no device touches guest memory or its queues
    /// while the VM is paused; their file descriptors stay open and their events wait.
    pub fn park_backends<S: SubscriberOps<Subscriber = Box<dyn MutEventSubscriber>>>(
        &mut self,
        events: &mut S,
    ) {
        for handle in &mut self.virtio {
            if let Some(id) = handle.subscriber.take() {
                // The id came from this loop; an error would mean it is already gone.
                let _ = events.remove_subscriber(id);
            }
        }
    }

    /// Flushes console output still buffered when the VM ends.
    pub fn flush_serial(&self) {
        self.serial.lock().unwrap_or_else(std::sync::PoisonError::into_inner).flush();
    }
}
