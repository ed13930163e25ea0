//! Saving and restoring carve's virtio devices (pause, snapshot, restore).
//!
//! # How the VMM holds a device
//!
//! Each virtio device is two halves, held together as an [`MmioDevice`]: the transport
//! ([`MmioTransport`], on the MMIO bus as `Arc<Mutex<MmioTransport>>`) and the backend
//! ([`VsockBackend`], [`NsmBackend`]) that runs on the event loop as `Arc<Mutex<B>>`, registered
//! with `Box::new(arc.clone())`.
//!
//! - **Pause**: stop the vCPUs, then `remove_subscriber` each backend. **Resume**:
//!   `add_subscriber` it again; its `init` registers every descriptor it holds at that moment
//!   (queue and command eventfds, listeners, timers, every live connection's socket), and what
//!   arrived meanwhile is served then.
//! - **Snapshot** (paused): [`Persist::save`] of each [`MmioDevice`] locks both halves and gives
//!   one [`VirtioState`].
//! - **Restore**: with guest memory already holding the snapshot's contents,
//!   [`Persist::restore`] with [`VsockRestore`] or [`NsmRestore`] (what `Vsock::new` /
//!   `NsmDevice::new` take, plus the interrupt line); map the transport, bind the ioeventfds of
//!   `transport.device().queue_notifiers()` and register the backend as above.
//!
//! # What the state is
//!
//! [`VirtioState`] is the transport's [`MmioState`] (status, feature selectors and accepted
//! features, queue selector, every queue's configuration, interrupt status, configuration
//! generation, whether the device runs) and the device's own [`DeviceState`].
//!
//! The transport hands its queues to the backend at DRIVER_OK, so while a device runs the
//! positions that matter (`next_avail`, `next_used`) are the backend's: saving takes them from
//! there, after applying any command the transport sent that the event loop has not taken yet.
//! A restore of a running device hands the backend queues at exactly those positions. Pending
//! ioeventfd notifications do not survive (the eventfds are new), so a restored backend looks at
//! its queues once when the event loop first runs; an interrupt the driver had not acknowledged
//! is restored in the interrupt status but not raised again (the interrupt controller's saved
//! state says what was pending).
//!
//! A snapshot is untrusted: every restore checks the state against the device and guest memory
//! and refuses what is malformed with a [`RestoreError`], one sentence, never a panic.
//!
//! ## vsock
//!
//! Connections do not survive (as in Firecracker): the restored backend starts with none. If the
//! device was running, the guest is sent `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (event ID 0,
//! virtio 1.2 §5.10.6.5) in the first buffer of its event queue; a driver then drops every
//! connection and reads the guest CID again (Linux: `virtio_vsock_event_handle`). Packets for a
//! connection the guest still believes in are answered with RST. The saved guest CID must be
//! the configured one ([`RestoreError::Cid`] names both). The next port for host-initiated
//! connections carries over, so new connections never reuse an old connection's ports.
//!
//! ## NSM
//!
//! The module (`module_id`, boot measurements, digest) and the PCR bank (values, locks) survive
//! exactly ([`carve_nsm::state`]). The signing leaf does not: the CA in [`NsmRestore`] issues a
//! fresh one. A request that waited for its response buffer (Linux's driver sends the
//! two as separate chains) waits again.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use carve_nsm::pki::CertificateAuthority;
use carve_nsm::state::{NsmState, NsmStateError};
use carve_nsm::Nsm;
use carve_snapshot::Persist;
use serde::{Deserialize, Serialize};

use crate::mmio::MmioTransport;
pub use crate::mmio::{MmioState, QueueConfig};
use crate::nsm::{NsmBackend, NsmDevice};
use crate::vsock::{Vsock, VsockBackend, VsockError, FIRST_HOST_PORT};
use crate::{GuestRam, InterruptLine};

/// One virtio device as saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    pub transport: MmioState,
    pub device: DeviceState,
}

/// The device's own state.
// Built once per device and snapshot; a box would only make matching on it clumsier.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    Vsock(VsockState),
    Nsm(NsmDeviceState),
}

impl DeviceState {
    /// The device's name, as its errors and logs say it.
    pub fn name(&self) -> &'static str {
        match self {
            DeviceState::Vsock(_) => "virtio-vsock",
            DeviceState::Nsm(_) => "virtio-nsm",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's CID; a restore requires the same.
    pub cid: u64,
    /// The parent-side port the next host-initiated connection gets (2^30 and up).
    pub next_host_port: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsmDeviceState {
    pub module: NsmState,
    /// A request whose response buffer has not come yet.
    pub pending: Option<PendingRequest>,
}

/// A request chain the device holds until the driver's next chain brings the response buffer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRequest {
    /// The request chain's head descriptor, returned to the driver with the response.
    pub head: u16,
    /// The request's first bytes (all of it, up to one byte past the largest request).
    pub request: Vec<u8>,
    /// The request's whole length.
    pub request_len: u64,
    /// The chain put readable buffers after writable ones (answered InvalidArgument).
    pub readable_after_writable: bool,
}

/// Why a saved device cannot be restored (or, through its NSM's module, saved); each message is
/// one sentence.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the snapshot holds {found}'s state, not {expected}'s")]
    WrongDevice { expected: &'static str, found: &'static str },
    #[error("the saved transport is for virtio device type {saved}, but {name} is type {device}")]
    DeviceType { saved: u32, device: u32, name: &'static str },
    #[error("the saved {name} status {status:#x} has bits a driver cannot set")]
    Status { name: &'static str, status: u32 },
    #[error("the saved {name} status {status:#x} sets FEATURES_OK or DRIVER_OK without the steps before it")]
    StatusOrder { name: &'static str, status: u32 },
    #[error("the saved {name} driver accepted features {accepted:#x}, but the device offers {offered:#x} and requires VERSION_1")]
    Features { name: &'static str, accepted: u64, offered: u64 },
    #[error("the saved {name} is marked {} but its status is {status:#x}", if *activated { "running" } else { "stopped" })]
    Activated { name: &'static str, status: u32, activated: bool },
    #[error("the saved {name} interrupt status {status:#x} has bits virtio-mmio does not define")]
    InterruptStatus { name: &'static str, status: u32 },
    #[error("the saved {name} has {saved} queues, but the device has {device}")]
    QueueCount { name: &'static str, saved: usize, device: usize },
    #[error("the saved {name} queue {index} {problem}")]
    Queue { name: &'static str, index: usize, problem: String },
    #[error("the saved {name} queue {index} is not ready or its rings (descriptors at {desc:#x}, available ring at {avail:#x}, used ring at {used:#x}) lie outside guest memory")]
    QueueOutsideMemory { name: &'static str, index: usize, desc: u64, avail: u64, used: u64 },
    #[error("cannot start the restored {name}: {problem}")]
    Activate { name: &'static str, problem: String },
    #[error(
        "the snapshot's vsock device has guest CID {saved}, but this VM is configured with CID {configured}"
    )]
    Cid { saved: u64, configured: u64 },
    #[error(
        "the saved vsock device's next host port {0} is below {FIRST_HOST_PORT}, where host ports start"
    )]
    HostPort(u32),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Nsm(#[from] NsmStateError),
    #[error("cannot create the restored NSM device's event descriptors: {0}")]
    EventFd(std::io::Error),
    #[error("the saved NSM request waiting for its response buffer {0}")]
    PendingRequest(String),
}

mod private {
    pub trait Sealed {}
    impl Sealed for crate::vsock::VsockBackend {}
    impl Sealed for crate::nsm::NsmBackend {}
}

/// A device backend an [`MmioDevice`] holds: [`VsockBackend`] or [`NsmBackend`].
pub trait Backend: private::Sealed + Sized {
    /// What restoring the device takes besides its state ([`VsockRestore`], [`NsmRestore`]).
    type RestoreArgs;

    /// The device's own state, and its running queues if it runs.
    #[doc(hidden)]
    fn save_parts(&mut self) -> Result<(DeviceState, Option<Vec<QueueConfig>>), RestoreError>;

    /// Both halves rebuilt from `state`.
    #[doc(hidden)]
    fn restore_parts(
        args: Self::RestoreArgs,
        state: &VirtioState,
    ) -> Result<(MmioTransport, Self), RestoreError>;
}

/// What restoring a vsock device takes: the inputs [`Vsock::new`] takes (the guest CID must be
/// the saved one) and the transport's interrupt line.
pub struct VsockRestore {
    pub cid: u64,
    pub uds: PathBuf,
    pub shared_listeners: Option<PathBuf>,
    pub mem: GuestRam,
    pub line: Arc<dyn InterruptLine>,
}

/// What restoring an NSM device takes: the CA that issues the restored module's signing leaf,
/// guest memory and the transport's interrupt line.
pub struct NsmRestore {
    pub ca: CertificateAuthority,
    pub mem: GuestRam,
    pub line: Arc<dyn InterruptLine>,
}

impl Backend for VsockBackend {
    type RestoreArgs = VsockRestore;

    fn save_parts(&mut self) -> Result<(DeviceState, Option<Vec<QueueConfig>>), RestoreError> {
        let (state, queues) = VsockBackend::save_parts(self);
        Ok((DeviceState::Vsock(state), queues))
    }

    /// The backend starts with no connections and, if the device was running, tells the guest
    /// of a transport reset.
    fn restore_parts(args: VsockRestore, state: &VirtioState) -> Result<(MmioTransport, Self), RestoreError> {
        let DeviceState::Vsock(saved) = &state.device else {
            return Err(RestoreError::WrongDevice { expected: "virtio-vsock", found: state.device.name() });
        };
        if saved.cid != args.cid {
            return Err(RestoreError::Cid { saved: saved.cid, configured: args.cid });
        }
        if saved.next_host_port < FIRST_HOST_PORT {
            return Err(RestoreError::HostPort(saved.next_host_port));
        }
        let (device, mut backend) = Vsock::new(args.cid, args.uds, args.shared_listeners, args.mem.clone())?;
        let transport =
            MmioTransport::restore_state(Box::new(device), args.mem, args.line, &state.transport)?;
        backend.restored(saved);
        Ok((transport, backend))
    }
}

impl Backend for NsmBackend {
    type RestoreArgs = NsmRestore;

    fn save_parts(&mut self) -> Result<(DeviceState, Option<Vec<QueueConfig>>), RestoreError> {
        let (state, queues) = NsmBackend::save_parts(self)?;
        Ok((DeviceState::Nsm(state), queues))
    }

    fn restore_parts(args: NsmRestore, state: &VirtioState) -> Result<(MmioTransport, Self), RestoreError> {
        let DeviceState::Nsm(saved) = &state.device else {
            return Err(RestoreError::WrongDevice { expected: "virtio-nsm", found: state.device.name() });
        };
        let nsm = Nsm::restore(args.ca, &saved.module)?;
        let (device, mut backend) = NsmDevice::new(nsm, args.mem.clone()).map_err(RestoreError::EventFd)?;
        let transport =
            MmioTransport::restore_state(Box::new(device), args.mem, args.line, &state.transport)?;
        backend.restored(saved.pending.as_ref())?;
        Ok((transport, backend))
    }
}

/// One virtio device as a VMM holds it: the transport (on the MMIO bus) and the backend (on the
/// event loop), each shared with what drives it.
pub struct MmioDevice<B> {
    pub transport: Arc<Mutex<MmioTransport>>,
    pub backend: Arc<Mutex<B>>,
}

impl<B> MmioDevice<B> {
    /// The two halves of one device: `transport` drives the device `backend` was created with.
    pub fn new(transport: MmioTransport, backend: B) -> MmioDevice<B> {
        MmioDevice { transport: Arc::new(Mutex::new(transport)), backend: Arc::new(Mutex::new(backend)) }
    }
}

/// Saving locks both halves (the VM paused, the backend off the event loop); restoring builds
/// both from the state, at its queue positions, with what the backend's constructor takes.
impl<B: Backend> Persist for MmioDevice<B> {
    type State = VirtioState;
    type ConstructorArgs = B::RestoreArgs;
    type Error = RestoreError;

    fn save(&self) -> Result<VirtioState, RestoreError> {
        let transport = lock(&self.transport);
        let (device, queues) = lock(&self.backend).save_parts()?;
        debug_assert_eq!(
            device.name(),
            transport.device().name(),
            "a transport saved with another device's backend"
        );
        Ok(VirtioState { transport: transport.save_state(queues), device })
    }

    fn restore(args: B::RestoreArgs, state: &VirtioState) -> Result<MmioDevice<B>, RestoreError> {
        let (transport, backend) = B::restore_parts(args, state)?;
        Ok(MmioDevice::new(transport, backend))
    }
}

/// A poisoned lock still holds the device: a panic elsewhere does not make its state unreadable.
fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
