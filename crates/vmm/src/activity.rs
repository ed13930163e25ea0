//! A guest's memory activity over a window (`carve vm describe --sample-ms`): pages written,
//! from the dirty log, and pages touched, from idle-page tracking where the host offers it (KVM
//! ages guest pages through its MMU notifiers, so guest reads count too), else the pages written.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;

use crate::control::MemoryActivity;
use crate::dirty_log::DirtyLog;
use crate::memory::{GuestRam, PAGE_SIZE};
use crate::working_set::IdleSample;

/// Watches `mem` for `window` and reports what the guest did to it.
pub fn sample(vm: Arc<VmFd>, mem: &GuestRam, window: Duration) -> Result<MemoryActivity, String> {
    let idle = match IdleSample::available().then(|| IdleSample::start(mem)) {
        Some(Ok(idle)) => Some(idle),
        // hugetlb pages are never aged: the dirty log is all there is.
        Some(Err(e)) if e.kind() == std::io::ErrorKind::Unsupported => None,
        Some(Err(e)) => return Err(format!("cannot start idle-page tracking: {e}")),
        None => None,
    };
    let mut log = DirtyLog::start(vm, mem).map_err(|e| e.to_string())?;
    let began = Instant::now();
    std::thread::sleep(window);
    let dirty = log.harvest(mem).map_err(|e| e.to_string())?.count();
    let elapsed = began.elapsed();
    let (working_set_pages, working_set_method) = match idle {
        Some(idle) => (
            idle.accessed_pages(mem).map_err(|e| format!("cannot read idle-page tracking: {e}"))?,
            "idle-page-tracking",
        ),
        None => (dirty, "dirty-log"),
    };
    let dirty_method = if log.manual_protect() {
        "kvm-dirty-log (manual protect) + device writes"
    } else {
        "kvm-dirty-log + device writes"
    };
    Ok(MemoryActivity {
        window_ms: elapsed.as_millis() as u64,
        dirty_pages: dirty,
        dirty_bytes_per_s: (dirty as f64 * PAGE_SIZE as f64 / elapsed.as_secs_f64()) as u64,
        dirty_method: dirty_method.into(),
        working_set_pages,
        working_set_bytes: working_set_pages * PAGE_SIZE,
        working_set_method: working_set_method.into(),
    })
}
