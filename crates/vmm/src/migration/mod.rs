//! Live migration over TCP (docs/migration.md): the source's pre-copy rounds from the dirty log
//! ([`crate::dirty_log`]) while the guest runs, then a short stop to send the rest and the VM's
//! state ([`crate::snapshot::VmSnapshot`], as a snapshot holds it); the destination checks the
//! offer before any memory moves and restores the VM as a snapshot restore does, its clocks run
//! on (TimePolicy::HostElapsed).
//!
//! - [`protocol`]: frames, the preamble, page entries (all checked on receipt);
//! - [`source`]: the sending thread, driven by the event loop (runner.rs) for the pause;
//! - [`destination`]: `carve vm run --incoming`.

pub mod destination;
pub mod protocol;
pub(crate) mod source;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use destination::{Incoming, IncomingConfig};

/// How long either side waits on the other before it gives up (the source then runs on).
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The default downtime target, as `carve vm migrate --downtime-ms` sets it.
pub const DEFAULT_DOWNTIME_MS: u64 = 50;

/// What a finished migration did, as `carve vm migrate` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    pub to: String,
    /// From the request to the destination's "started".
    pub total_us: u64,
    /// From the pause here to the destination's "started": the time the guest did not run.
    pub downtime_us: u64,
    /// Rounds of memory sent while the guest ran (the first sends every page that is not zero).
    pub rounds: u32,
    pub pages_sent: u64,
    /// Pages sent while the VM was paused.
    pub last_round_pages: u64,
    /// Everything sent: the preamble, the offer, every frame header, page entries and data, and
    /// the VM's state.
    pub bytes_sent: u64,
    pub guest_bytes: u64,
    /// Whether KVM re-protected only the pages harvested (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2).
    pub manual_dirty_protect: bool,
}

/// A migration under way, as `carve vm describe` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationProgress {
    pub to: String,
    pub elapsed_ms: u64,
    /// Rounds of memory begun (the first sends every page that is not zero).
    pub round: u64,
    pub pages_sent: u64,
    pub bytes_sent: u64,
}

/// The sending thread's counters, read by the event loop for `describe`.
#[derive(Default)]
pub(crate) struct Progress {
    pub round: AtomicU64,
    pub pages: AtomicU64,
    pub bytes: AtomicU64,
}

impl Progress {
    pub fn report(&self, to: &str, started: Instant) -> MigrationProgress {
        MigrationProgress {
            to: to.to_string(),
            elapsed_ms: started.elapsed().as_millis() as u64,
            round: self.round.load(Ordering::Relaxed),
            pages_sent: self.pages.load(Ordering::Relaxed),
            bytes_sent: self.bytes.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("{0}")]
    Setup(String),
    #[error("refused the VM from {from}: {reason}")]
    Refused { from: String, reason: String },
    #[error("the migration from {from} failed: {detail}")]
    Failed { from: String, detail: String },
}
