//! The NSM's saved state ([`carve_snapshot::Persist`] for [`crate::Nsm`] and [`PcrBank`]).
//!
//! What survives a restore exactly: the module's identity (`module_id`, the boot measurements
//! the platform PCRs were set from, the bank's digest) and the PCR bank (every value, and which
//! PCRs are locked). What does not: the signing identity. The leaf key never leaves the process;
//! at restore the CA given as the constructor argument issues a fresh leaf for the same
//! `module_id` (a new key, certificate and three-hour validity; the chain above it is the CA's
//! current one). Documents signed after a restore therefore carry another certificate than those
//! signed before, which relying parties see as they see Nitro's leaf rotation.
//!
//! A state may come from an untrusted file, so restoring checks it: the digest is SHA384, every
//! PCR index is in the bank and appears once, every value is 48 bytes, the lock bitmap stays
//! within the bank's 32 registers, the platform PCRs (0–15) are locked and hold what the boot
//! measurements give them (nothing can change them after boot).

use serde::{Deserialize, Serialize};

use crate::pcr::{PCR_COUNT, PCR_LEN};

/// The only digest carve's bank uses (an attestation document's `digest`).
pub const DIGEST: &str = "SHA384";

/// A saved [`crate::Nsm`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsmState {
    /// The enclave ID: DescribeNSM's `module_id` and the leaf certificate's CN.
    pub module_id: String,
    /// What the platform PCRs were set from at boot.
    pub boot: BootState,
    pub bank: PcrBankState,
}

/// A saved [`crate::pcr::BootMeasurements`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootState {
    /// The enclave image's PCR0, PCR1, PCR2 and PCR8 (48 bytes each); `None` without an image.
    pub image: Option<ImageState>,
    /// The parent's role (measured into PCR3).
    pub parent_role: Option<String>,
    /// The parent instance's ID (measured into PCR4).
    pub parent_instance_id: Option<String>,
    pub debug_mode: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageState {
    pub pcr0: Vec<u8>,
    pub pcr1: Vec<u8>,
    pub pcr2: Vec<u8>,
    pub pcr8: Option<Vec<u8>>,
}

/// A saved [`PcrBank`](crate::pcr::PcrBank).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcrBankState {
    /// The hash the registers are extended with: [`DIGEST`].
    pub digest: String,
    /// Every register once, by index.
    pub pcrs: Vec<PcrState>,
    /// Bit `i` set: PCR `i` is locked.
    pub locked: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcrState {
    pub index: u64,
    pub value: Vec<u8>,
}

/// Why a saved NSM cannot be restored; each message is one sentence.
#[derive(Debug, thiserror::Error)]
pub enum NsmStateError {
    #[error("the saved PCR bank uses the digest {0:?}, but carve's NSM uses {DIGEST}")]
    Digest(String),
    #[error("the saved PCR bank has PCR index {0}, out of range for a bank of {PCR_COUNT}")]
    IndexOutOfRange(u64),
    #[error("the saved PCR bank has PCR {0} more than once")]
    DuplicateIndex(u64),
    #[error("the saved PCR bank lacks PCR {0}")]
    MissingIndex(usize),
    #[error("the saved PCR {index} holds {len} bytes, but {DIGEST} values are {PCR_LEN}")]
    ValueLength { index: u64, len: usize },
    #[error("the saved lock bitmap {0:#x} locks registers beyond the {PCR_COUNT} the bank has")]
    LockOutOfRange(u64),
    #[error("the saved PCR bank leaves platform PCR {0} unlocked, which the platform locks at boot")]
    PlatformUnlocked(usize),
    #[error("the saved PCR {0} differs from what the saved boot measurements give it, and it cannot change after boot")]
    BootMismatch(usize),
    #[error("the saved boot measurement {name} holds {len} bytes, but {DIGEST} values are {PCR_LEN}")]
    MeasurementLength { name: &'static str, len: usize },
    #[error("the saved module ID is empty or longer than {MAX_MODULE_ID} bytes")]
    ModuleId,
    #[error("cannot give the restored NSM a signing identity: {0}")]
    Identity(#[from] crate::pki::PkiError),
}

/// Longer module IDs are refused (Nitro's are `i-<17 hex>-enc<16 hex>`, 41 bytes).
pub const MAX_MODULE_ID: usize = 256;

/// A 48-byte value from a saved field.
pub(crate) fn pcr_value(bytes: &[u8]) -> Option<[u8; PCR_LEN]> {
    bytes.try_into().ok()
}
