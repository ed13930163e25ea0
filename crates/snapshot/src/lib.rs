//! carve's VM state seam (as Firecracker's `snapshot/persist.rs`): every device, the VM and its
//! vCPUs say what they are as plain data, and restoring is constructing from that data. The
//! snapshot file that carries the data is versioned and checksummed ([`file`]); everything read
//! from it is untrusted, so every `restore` validates what it is given.

pub mod file;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// State out; restore is a constructor.
pub trait Persist: Sized {
    /// What is saved: plain data, no handles.
    type State: Serialize + DeserializeOwned;
    /// What restoring needs besides the state: guest memory, interrupt lines, host sockets.
    type ConstructorArgs;
    type Error: std::error::Error;

    /// The state as it is now; the caller has paused whatever could change it. Fallible, as
    /// Cloud Hypervisor's `Snapshottable` is: state KVM holds (vCPUs, the VM's irqchip) is read
    /// by ioctls, which can fail.
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// A new object in `state`, checked: the state may come from an untrusted file.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
