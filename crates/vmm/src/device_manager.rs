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
use carve_virtio::state::{DeviceState, MmioDevice, NsmRestore, RestoreError, VirtioState, VsockRestore};
use carve_virtio::vsock::{Vsock, VsockBackend};
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
use crate::snapshot::SaveError;
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

/// A virtio device's two halves (its transport on the MMIO bus, its backend on the event loop),
/// typed so a snapshot can save it.
pub enum Virtio {
    Vsock(MmioDevice<VsockBackend>),
    Nsm(MmioDevice<NsmBackend>),
}

impl Virtio {
    pub fn kind(&self) -> VirtioKind {
        match self {
            Virtio::Vsock(_) => VirtioKind::Vsock,
            Virtio::Nsm(_) => VirtioKind::Nsm,
        }
    }

    /// The device's name, as its errors say it.
    pub fn name(&self) -> &'static str {
        match self {
            Virtio::Vsock(_) => "virtio-vsock",
            Virtio::Nsm(_) => "virtio-nsm",
        }
    }

    pub fn transport(&self) -> &Arc<Mutex<MmioTransport>> {
        match self {
            Virtio::Vsock(device) => &device.transport,
            Virtio::Nsm(device) => &device.transport,
        }
    }

    fn subscriber(&self) -> Box<dyn MutEventSubscriber> {
        match self {
            Virtio::Vsock(device) => Box::new(device.backend.clone()),
            Virtio::Nsm(device) => Box::new(device.backend.clone()),
        }
    }

    /// The device's own [`Persist::save`]; the VM is paused and the backend off the loop.
    pub fn save(&self) -> Result<VirtioState, RestoreError> {
        match self {
            Virtio::Vsock(device) => device.save(),
            Virtio::Nsm(device) => device.save(),
        }
    }
}

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One virtio-mmio device: where it sits, its transport and its backend.
pub struct VirtioHandle {
    pub slot: VirtioSlot,
    pub device: Virtio,
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
pub struct DeviceRestore {
    pub vm: Arc<VmFd>,
    pub mem: GuestRam,
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
        let device = match parts {
            VirtioParts::Vsock(device, backend) => Virtio::Vsock(MmioDevice::new(
                MmioTransport::new(Box::new(device), mem.clone(), line),
                *backend,
            )),
            VirtioParts::Nsm(device, backend) => Virtio::Nsm(MmioDevice::new(
                MmioTransport::new(Box::new(device), mem.clone(), line),
                *backend,
            )),
        };
        self.attach_device(vm, slot, device)
    }

    /// Maps an already built device (booted or restored) at `slot`.
    pub fn attach_device(&mut self, vm: &VmFd, slot: VirtioSlot, device: Virtio) -> Result<(), VmError> {
        let address = IoEventAddress::Mmio(slot.notify_address());
        let transport = device.transport().clone();
        for (queue, notifier) in lock(&transport).device().queue_notifiers().iter().enumerate() {
            // With the ioeventfd a notification costs no exit to user space; the transport
            // still forwards any that reach it.
            vm.register_ioevent(notifier, &address, queue as u32).map_err(|source| VmError::Kvm {
                what: "bind a virtio queue notification to an ioeventfd",
                source,
            })?;
        }
        self.mmio.insert(transport, slot.base, slot.len)?;
        self.virtio.push(VirtioHandle { slot, device, subscriber: None });
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
                handle.subscriber = Some(events.add_subscriber(handle.device.subscriber()));
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

/// Every device through its own [`Persist`] impl. Restored onto a VM whose irqchip already holds
/// its saved state (the serial port may raise its line again at once) and whose memory holds
/// the snapshot's contents.
impl Persist for DeviceManager {
    type State = DevicesState;
    type ConstructorArgs = DeviceRestore;
    type Error = VmError;

    /// The VM is paused and the backends are off the event loop.
    fn save(&self) -> Result<DevicesState, VmError> {
        Ok(DevicesState {
            interrupts: self.interrupts.save().map_err(unsaved("interrupt routes"))?,
            serial: lock(&self.serial).save().map_err(unsaved("serial port"))?,
            i8042: lock(&self.i8042).save().unwrap_or_else(|never| match never {}),
            fw_cfg_config: self.fw_cfg_config,
            fw_cfg: lock(&self.fw_cfg).save().map_err(unsaved("fw_cfg"))?,
            test_devices: match &self.test_devices {
                Some(t) => Some((
                    lock(&t.testdev).save().map_err(unsaved("pc-testdev"))?,
                    lock(&t.msi).save().map_err(unsaved("MSI test device"))?,
                )),
                None => None,
            },
            virtio: self
                .virtio
                .iter()
                .map(|h| h.device.save().map_err(unsaved(h.device.name())))
                .collect::<Result<_, _>>()?,
            vsock: self.vsock.clone(),
        })
    }

    fn restore(args: DeviceRestore, state: &DevicesState) -> Result<DeviceManager, VmError> {
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
            let device = match &saved.device {
                DeviceState::Vsock(_) => {
                    let Some(vsock) = &vsock else {
                        return Err(VmError::SnapshotState(
                            "vsock device comes without its configuration".into(),
                        ));
                    };
                    let host_side = VsockRestore {
                        cid: vsock.cid,
                        uds: vsock.uds.clone(),
                        shared_listeners: vsock.shared_listeners.clone(),
                        mem,
                        line,
                    };
                    Virtio::Vsock(MmioDevice::restore(host_side, saved).map_err(restored)?)
                }
                DeviceState::Nsm(_) => {
                    let Some(ca) = nsm_ca.take() else {
                        return Err(VmError::SnapshotState(
                            "NSM has no CA to sign for it (one per NSM)".into(),
                        ));
                    };
                    Virtio::Nsm(MmioDevice::restore(NsmRestore { ca, mem, line }, saved).map_err(restored)?)
                }
            };
            devices.attach_device(&args.vm, slot, device)?;
        }
        Ok(devices)
    }
}

/// A device's save error as the VM's: none of carve's devices fails to save today, but the trait
/// lets any say why it could not.
fn unsaved<E: std::fmt::Display>(device: &'static str) -> impl FnOnce(E) -> VmError {
    move |e| SaveError::Device { device, message: e.to_string() }.into()
}
