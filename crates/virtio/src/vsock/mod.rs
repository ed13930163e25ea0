//! virtio-vsock (device ID 19, stream sockets) with a hybrid Unix-socket host side, as in
//! Firecracker: the host reaches the guest through one listening socket (`CONNECT <port>\n` →
//! `OK <host_port>\n`), and a guest connection to parent port P reaches the Unix socket
//! `<uds>_<P>`. carve never touches the host's AF_VSOCK.
//!
//! [`Vsock`] is what the transport holds; [`VsockBackend`] runs on the VMM's event loop and owns
//! the queues once the driver is ready, the sockets and every connection.

mod backend;
mod connection;

use crate::GuestRam;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::link::{command_channel, Command, CommandSender};
use crate::{ActivateError, DeviceSignals, VirtioDevice, VIRTIO_F_VERSION_1};
pub(crate) use backend::FIRST_HOST_PORT;
pub use backend::{VsockBackend, VsockStats, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET};

pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The parent's CID, as on Nitro: guests reach host sockets here.
pub const PARENT_CID: u64 = 3;
/// The well-known host CID; carve accepts it as another name for the parent.
pub const HOST_CID: u64 = 2;
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENTS: usize = 2;
const QUEUE_COUNT: usize = 3;

/// virtio-vsock packet header fields (virtio 1.2 §5.10.6).
pub mod proto {
    pub const TYPE_STREAM: u16 = 1;
    pub const OP_REQUEST: u16 = 1;
    pub const OP_RESPONSE: u16 = 2;
    pub const OP_RST: u16 = 3;
    pub const OP_SHUTDOWN: u16 = 4;
    pub const OP_RW: u16 = 5;
    pub const OP_CREDIT_UPDATE: u16 = 6;
    pub const OP_CREDIT_REQUEST: u16 = 7;
    /// SHUTDOWN flags: the sender will receive / send no more.
    pub const SHUTDOWN_RCV: u32 = 1;
    pub const SHUTDOWN_SEND: u32 = 2;
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved; use 4 up to 4294967294")]
    InvalidCid(u64),
    #[error("cannot listen on the vsock Unix socket {path}: {source}")]
    Listen { path: PathBuf, source: std::io::Error },
    #[error("cannot create the vsock device's event descriptors: {0}")]
    EventFd(std::io::Error),
}

/// Checks a guest CID the way Nitro does: 0–3 and u32::MAX are taken.
pub fn validate_cid(cid: u64) -> Result<(), VsockError> {
    if cid <= PARENT_CID || cid >= u64::from(u32::MAX) {
        return Err(VsockError::InvalidCid(cid));
    }
    Ok(())
}

/// The transport-facing half of the vsock device.
pub struct Vsock {
    cid: u64,
    notifiers: Vec<EventFd>,
    commands: CommandSender,
}

impl Vsock {
    /// Creates the device for guest `cid` and its backend, listening on `uds`; the guest's
    /// connections to the parent's port P go to a listener at `uds_P`, else at
    /// `shared_listeners_P`.
    pub fn new(
        cid: u64,
        uds: PathBuf,
        shared_listeners: Option<PathBuf>,
        mem: GuestRam,
    ) -> Result<(Vsock, VsockBackend), VsockError> {
        validate_cid(cid)?;
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::EventFd);
        let notifiers = vec![eventfd()?, eventfd()?, eventfd()?];
        let clone = |e: &EventFd| e.try_clone().map_err(VsockError::EventFd);
        let (commands, receiver) = command_channel().map_err(VsockError::EventFd)?;
        let backend = VsockBackend::new(
            cid,
            uds,
            shared_listeners,
            mem,
            [clone(&notifiers[RX])?, clone(&notifiers[TX])?, clone(&notifiers[EVENTS])?],
            receiver,
        )?;
        Ok((Vsock { cid, notifiers, commands }, backend))
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn name(&self) -> &'static str {
        "virtio-vsock"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUE_COUNT]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // The configuration is the 64-bit guest CID.
        let config = self.cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset.checked_add(i as u64).and_then(|o| config.get(o as usize)).copied().unwrap_or(0);
        }
    }

    fn queue_notifiers(&self) -> &[EventFd] {
        &self.notifiers
    }

    fn activate(
        &mut self,
        _features: u64,
        queues: Vec<Queue>,
        signals: Arc<DeviceSignals>,
    ) -> Result<(), ActivateError> {
        self.commands.activate(QUEUE_COUNT, queues, signals)
    }

    fn reset(&mut self) {
        let _ = self.commands.send(Command::Reset);
    }
}
