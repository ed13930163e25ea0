//! How a VM ends, who asked first, and the process status each ending maps to.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use vmm_sys_util::eventfd::EventFd;

/// Status when the guest reset or powered off the machine.
pub const STATUS_POWER_OFF: i32 = 0;
/// Status for carve's own errors: bad input, missing /dev/kvm, host resources.
pub const STATUS_CARVE_ERROR: i32 = 4;
/// Status when the guest crashed: triple fault, failed VM entry, KVM internal error.
pub const STATUS_GUEST_CRASH: i32 = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashKind {
    TripleFault,
    FailedEntry,
    InternalError,
    UnexpectedExit,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrashReport {
    pub kind: CrashKind,
    pub vcpu: usize,
    /// One paragraph: what happened, what it usually means, and the vCPU's registers.
    pub explanation: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (i8042 reset command, or a KVM reset event).
    Reset,
    /// The guest powered off (KVM shutdown system event).
    PowerOff,
    /// The guest wrote `value` to the debug-exit port.
    DebugExit(u32),
    Crash(CrashReport),
    /// carve itself failed while the VM ran.
    VmmFailure(String),
    /// carve was asked to stop (SIGINT, SIGTERM or SIGHUP); the VM was torn down cleanly.
    Stopped(i32),
    /// Its owner ended the VM through a [`crate::VmStopper`] (an enclave's terminate).
    Terminated,
    /// Every vCPU halted with interrupts disabled (or was never started): nothing can run
    /// again, as after Linux's `halt`. Nitro ends an enclave in this state; so does carve.
    Halted,
    /// The VM was migrated to `to` and runs there now.
    Migrated {
        to: String,
    },
}

impl VmExit {
    /// The process status `carve vm run` exits with (see the README's "Exit status"): odd statuses
    /// belong to the guest's debug-exit writes, as QEMU's isa-debug-exit defines them.
    pub fn status(&self) -> i32 {
        match self {
            VmExit::Reset
            | VmExit::PowerOff
            | VmExit::Terminated
            | VmExit::Halted
            | VmExit::Migrated { .. } => STATUS_POWER_OFF,
            VmExit::DebugExit(value) => (((value << 1) | 1) & 0xff) as i32,
            VmExit::Crash(_) => STATUS_GUEST_CRASH,
            VmExit::VmmFailure(_) => STATUS_CARVE_ERROR,
            // The shell's convention for a process ended by a signal.
            VmExit::Stopped(signal) => 128 + signal,
        }
    }
}

impl std::fmt::Display for VmExit {
    /// Why the VM ended, as one line for logs and `carve wait`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => write!(f, "the guest reset the machine"),
            VmExit::PowerOff => write!(f, "the guest powered off"),
            VmExit::DebugExit(value) => write!(f, "the guest wrote {value:#x} to the debug-exit port"),
            VmExit::Crash(report) => write!(f, "the guest crashed: {}", report.explanation),
            VmExit::VmmFailure(message) => write!(f, "carve failed: {message}"),
            VmExit::Stopped(signal) => write!(f, "carve was stopped by signal {signal}"),
            VmExit::Terminated => write!(f, "terminated on request"),
            VmExit::Halted => write!(f, "every vCPU halted with interrupts disabled"),
            VmExit::Migrated { to } => write!(f, "the VM migrated to {to} and runs there now"),
        }
    }
}

/// The first exit request wins; later ones (other vCPUs racing) are dropped. Raising it wakes
/// the VMM's event loop through an eventfd.
pub struct ExitSignal {
    requested: AtomicBool,
    exit: Mutex<Option<VmExit>>,
    event: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<ExitSignal> {
        Ok(ExitSignal {
            requested: AtomicBool::new(false),
            exit: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn request(&self, exit: VmExit) {
        let mut slot = self.exit.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(exit);
            self.requested.store(true, Ordering::SeqCst);
            // A full eventfd counter still wakes the loop; nothing to do on error.
            let _ = self.event.write(1);
        }
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    pub fn take(&self) -> Option<VmExit> {
        self.exit.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_documented_convention() {
        assert_eq!(VmExit::Reset.status(), 0);
        assert_eq!(VmExit::DebugExit(0).status(), 1);
        assert_eq!(VmExit::DebugExit(0x21).status(), 0x43);
        assert_eq!(VmExit::DebugExit(0x7f).status(), 0xff);
        assert_eq!(VmExit::VmmFailure(String::new()).status(), STATUS_CARVE_ERROR);
        let crash = CrashReport { kind: CrashKind::TripleFault, vcpu: 0, explanation: String::new() };
        assert_eq!(VmExit::Crash(crash).status(), STATUS_GUEST_CRASH);
    }

    #[test]
    fn first_request_wins() {
        let signal = ExitSignal::new().unwrap();
        assert!(!signal.is_requested());
        signal.request(VmExit::DebugExit(3));
        signal.request(VmExit::Reset);
        assert!(signal.is_requested());
        assert_eq!(signal.take(), Some(VmExit::DebugExit(3)));
    }
}
