//! The run directory (`$CARVE_RUN_DIR`, else `/run/carve` for root, else
//! `$XDG_RUNTIME_DIR/carve`): each enclave process's control socket `<slot>.sock`, its record
//! `<slot>.lock` (JSON, flock-held for the process's life), the enclave's vsock sockets
//! `<EnclaveID>.vsock[_<port>]`, and the CPU pool `allocator.json`. A record nobody holds
//! belongs to a process that died; the next command removes it and its sockets.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};
use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, Failure, Result};

/// What a running enclave's process publishes about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub slot: u64,
    pub id: String,
    pub name: String,
    pub cid: u64,
    /// The uid that launched it; only it and root may terminate it.
    pub uid: u32,
    pub pid: u32,
    /// Pool CPUs the enclave owns (empty in development mode).
    pub cpus: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// The run directory for this user, created if missing (0700 unless it is root's).
    pub fn open() -> Result<RunDir> {
        let path = match std::env::var_os("CARVE_RUN_DIR") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ if rustix::process::geteuid().is_root() => PathBuf::from("/run/carve"),
            _ => match std::env::var_os("XDG_RUNTIME_DIR") {
                Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("carve"),
                _ => std::env::temp_dir().join(format!("carve-{}", rustix::process::geteuid().as_raw())),
            },
        };
        RunDir::at(path)
    }

    pub fn at(path: PathBuf) -> Result<RunDir> {
        let mode = if rustix::process::geteuid().is_root() { 0o755 } else { 0o700 };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(&path)
            .map_err(|e| Failure::file(&path, "create the run directory", e))?;
        Ok(RunDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn control_socket(&self, slot: u64) -> PathBuf {
        self.path.join(format!("{slot:x}.sock"))
    }

    /// Where an enclave's control socket listens until the enclave runs, then renamed to
    /// [`RunDir::control_socket`]: nobody asks a process that cannot answer yet.
    pub fn starting_control_socket(&self, slot: u64) -> PathBuf {
        self.path.join(format!("{slot:x}.sock.starting"))
    }

    fn record_path(&self, slot: u64) -> PathBuf {
        self.path.join(format!("{slot:x}.lock"))
    }

    /// The parent side of an enclave's vsock (Firecracker's hybrid vsock over Unix sockets).
    pub fn vsock_socket(&self, id: &str) -> PathBuf {
        self.path.join(format!("{id}.vsock"))
    }

    /// Where a parent program listens for every enclave's connections to its vsock port P:
    /// `vsock_P` (AF_VSOCK's model: one listener, any CID). An enclave's own `<ID>.vsock_P`
    /// comes first.
    pub fn shared_vsock_prefix(&self) -> PathBuf {
        self.path.join("vsock")
    }

    pub fn pool_file(&self) -> PathBuf {
        self.path.join("allocator.json")
    }

    /// Takes the directory-wide lock that orders launches, cleanups and allocator changes:
    /// exclusively where this user may write the lock file, else shared (another user reading
    /// root's enclaves: describe, or a terminate the enclave process will refuse).
    pub fn lock(&self) -> Result<DirLock> {
        let path = self.path.join("carve.lock");
        let opened = OpenOptions::new().create(true).truncate(false).write(true).mode(0o644).open(&path);
        let (file, exclusive) = match opened {
            Ok(file) => (file, true),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                (File::open(&path).map_err(|e| Failure::file(&path, "open the lock", e))?, false)
            }
            Err(e) => return Err(Failure::file(&path, "open the lock", e)),
        };
        let operation = if exclusive { FlockOperation::LockExclusive } else { FlockOperation::LockShared };
        flock(&file, operation).map_err(|e| {
            Failure::new(ErrorCode::LOCK_ACQUIRE, format!("cannot lock {}: {e}", path.display()))
        })?;
        Ok(DirLock { _file: file, exclusive })
    }

    /// Every live enclave's record, removing what dead processes left (when the lock is
    /// exclusive). Needs the dir lock.
    pub fn live_records(&self, lock: &DirLock) -> Vec<Record> {
        let Ok(entries) = std::fs::read_dir(&self.path) else { return Vec::new() };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(slot) = name.to_str().and_then(|n| n.strip_suffix(".lock")) else { continue };
            let Ok(slot) = u64::from_str_radix(slot, 16) else { continue };
            let path = self.record_path(slot);
            let Ok(mut file) = File::open(&path) else { continue };
            if flock(&file, FlockOperation::NonBlockingLockShared).is_ok() {
                // Nobody holds it: its process is gone (killed, or crashed before cleaning up).
                if lock.exclusive {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    let record: Option<Record> = serde_json::from_str(&text).ok();
                    self.remove_leftovers(slot, record.as_ref());
                }
                continue;
            }
            let mut text = String::new();
            if file.read_to_string(&mut text).is_ok() {
                if let Ok(record) = serde_json::from_str::<Record>(&text) {
                    records.push(record);
                }
            }
        }
        records.sort_by_key(|r| r.slot);
        records
    }

    fn remove_leftovers(&self, slot: u64, record: Option<&Record>) {
        log::info!("removing what the dead enclave process of slot {slot:x} left behind");
        let _ = std::fs::remove_file(self.control_socket(slot));
        let _ = std::fs::remove_file(self.starting_control_socket(slot));
        if let Some(record) = record {
            let _ = std::fs::remove_file(self.vsock_socket(&record.id));
            let vsock = self.vsock_socket(&record.id);
            let _ = std::fs::remove_file(heartbeat_socket(&vsock));
            let _ = std::fs::remove_file(port_socket(&vsock, crate::app_exit::PORT));
        }
        let _ = std::fs::remove_file(self.record_path(slot));
    }

    /// Claims `slot` for this process: its record file, locked until the claim drops.
    pub fn claim(&self, record: &Record, _lock: &DirLock) -> Result<Claim> {
        let path = self.record_path(record.slot);
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .mode(0o644)
            .open(&path)
            .map_err(|e| Failure::file(&path, "create the enclave record", e))?;
        flock(&file, FlockOperation::NonBlockingLockExclusive).map_err(|e| {
            Failure::new(ErrorCode::LOCK_ACQUIRE, format!("cannot lock {}: {e}", path.display()))
        })?;
        // From here a failure drops the claim, which removes the file.
        let mut claim = Claim { file: Some(file), path: path.clone() };
        let text = serde_json::to_string(record).expect("records serialize");
        let file = claim.file.as_mut().expect("just set");
        file.write_all(text.as_bytes()).map_err(|e| Failure::file(&path, "write", e))?;
        file.rewind().map_err(|e| Failure::file(&path, "write", e))?;
        Ok(claim)
    }
}

/// The parent listener for the boot heartbeat: `<vsock>_9000`.
pub fn heartbeat_socket(vsock: &Path) -> PathBuf {
    port_socket(vsock, crate::heartbeat::PORT)
}

/// The parent's listener for guest connections to `port`: `<vsock>_<port>`.
pub fn port_socket(vsock: &Path, port: u32) -> PathBuf {
    let mut path = vsock.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Held while the run directory's launches and cleanups must not interleave.
pub struct DirLock {
    _file: File,
    exclusive: bool,
}

/// A claimed slot: the record file exists and is locked until this drops, then removed.
pub struct Claim {
    file: Option<File>,
    path: PathBuf,
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Remove first, then unlock: nobody can mistake the file for a dead process's.
        let _ = std::fs::remove_file(&self.path);
        drop(self.file.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(slot: u64) -> Record {
        Record {
            slot,
            id: format!("i-0-enc{slot:x}"),
            name: "n".into(),
            cid: 16,
            uid: 0,
            pid: 1,
            cpus: vec![],
        }
    }

    #[test]
    fn claimed_records_are_live_and_released_ones_vanish() {
        let dir = std::env::temp_dir().join(format!("carve-run-dir-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let run = RunDir::at(dir.clone()).unwrap();
        let lock = run.lock().unwrap();
        let claim = run.claim(&record(0x2a), &lock).unwrap();
        assert_eq!(run.live_records(&lock), vec![record(0x2a)]);
        assert!(run.claim(&record(0x2a), &lock).is_err(), "a slot is claimed once");
        drop(claim);
        assert!(run.live_records(&lock).is_empty());
        assert!(!dir.join("2a.lock").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_dead_process_record_and_its_sockets_are_cleaned() {
        let dir = std::env::temp_dir().join(format!("carve-run-dir-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let run = RunDir::at(dir.clone()).unwrap();
        let stale = record(7);
        std::fs::write(dir.join("7.lock"), serde_json::to_string(&stale).unwrap()).unwrap();
        std::fs::write(run.control_socket(7), b"").unwrap();
        std::fs::write(run.vsock_socket(&stale.id), b"").unwrap();
        let lock = run.lock().unwrap();
        assert!(run.live_records(&lock).is_empty());
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("carve.lock")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
