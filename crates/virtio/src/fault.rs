//! Guest mistakes are reported once per kind and device, never fatal: an untrusted guest must
//! not be able to flood the host's log or stop the VMM.

use std::collections::HashSet;

/// Remembers which kinds of fault a device has already reported.
#[derive(Debug, Default)]
pub struct FaultLog {
    seen: HashSet<&'static str>,
}

impl FaultLog {
    /// Logs `what` as a warning the first time this `kind` happens; returns whether it did.
    pub fn report(&mut self, device: &str, kind: &'static str, what: impl std::fmt::Display) -> bool {
        if !self.seen.insert(kind) {
            return false;
        }
        log::warn!(target: "carve::guest", "{device}: {what} (reported once)");
        true
    }

    pub fn has_reported(&self, kind: &str) -> bool {
        self.seen.contains(kind)
    }
}
