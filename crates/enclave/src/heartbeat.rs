//! Nitro's boot heartbeat: before the enclave starts, the parent listens on vsock port 9000;
//! the enclave's init connects, sends 0xB7 and expects it echoed. No heartbeat within the
//! timeout means the enclave did not boot (E36).

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};

pub const PORT: u32 = 9000;
pub const BYTE: u8 = 0xB7;

/// nitro-cli's timeout: 90 s per started 6 GiB of image plus 90 s per started 100 GiB of
/// memory (so at least 180 s). `CARVE_HEARTBEAT_TIMEOUT` (seconds) overrides it for tests.
pub fn timeout(eif_size: u64, memory_mib: u64) -> Duration {
    if let Some(seconds) = std::env::var("CARVE_HEARTBEAT_TIMEOUT").ok().and_then(|s| s.parse().ok()) {
        return Duration::from_secs(seconds);
    }
    let per = |amount: u64, unit: u64| 90 * amount.div_ceil(unit).max(1);
    Duration::from_secs(per(eif_size, 6 << 30) + per(memory_mib, 100 << 10))
}

#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error("vsock bind error: cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("the enclave sent no heartbeat within {0:?}")]
    TimedOut(Duration),
    #[error("the enclave stopped before it sent its heartbeat")]
    EnclaveEnded,
    #[error("the heartbeat connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the enclave sent {0:#04x} as its heartbeat, not 0xb7")]
    WrongByte(u8),
}

/// The parent's port-9000 listener; its socket file goes when it drops.
pub struct HeartbeatListener {
    listener: UnixListener,
    path: PathBuf,
}

impl HeartbeatListener {
    pub fn bind(path: &Path) -> Result<HeartbeatListener, HeartbeatError> {
        let listener = UnixListener::bind(path)
            .map_err(|source| HeartbeatError::Bind { path: path.to_path_buf(), source })?;
        Ok(HeartbeatListener { listener, path: path.to_path_buf() })
    }

    /// Waits for the heartbeat until `timeout`, giving up early once `ended` says the
    /// enclave stopped. One connection is accepted, as Nitro does.
    pub fn wait(&self, timeout: Duration, ended: impl Fn() -> bool) -> Result<(), HeartbeatError> {
        let deadline = Instant::now() + timeout;
        loop {
            if ended() {
                return Err(HeartbeatError::EnclaveEnded);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HeartbeatError::TimedOut(timeout));
            }
            let slice = left.min(Duration::from_millis(20));
            let mut fds = [PollFd::new(&self.listener, PollFlags::IN)];
            let wait = Timespec { tv_sec: 0, tv_nsec: slice.as_nanos() as i64 };
            match poll(&mut fds, Some(&wait)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => break,
                Err(e) => return Err(HeartbeatError::Io(e.into())),
            }
        }
        let (mut stream, _) = self.listener.accept()?;
        stream.set_read_timeout(Some(
            deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)),
        ))?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte)?;
        if byte[0] != BYTE {
            return Err(HeartbeatError::WrongByte(byte[0]));
        }
        stream.write_all(&[BYTE])?;
        Ok(())
    }
}

impl Drop for HeartbeatListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn timeout_follows_nitro_cli() {
        if std::env::var_os("CARVE_HEARTBEAT_TIMEOUT").is_some() {
            return;
        }
        assert_eq!(timeout(1 << 20, 512), Duration::from_secs(180));
        assert_eq!(timeout(7 << 30, 512), Duration::from_secs(270));
        assert_eq!(timeout(1, 200 << 10), Duration::from_secs(270));
    }

    fn socket(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("carve-hb-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn the_byte_is_echoed_and_a_wrong_one_refused() {
        let path = socket("echo");
        let listener = HeartbeatListener::bind(&path).unwrap();
        let client = std::thread::spawn({
            let path = path.clone();
            move || {
                let mut s = UnixStream::connect(path).unwrap();
                s.write_all(&[BYTE]).unwrap();
                let mut echo = [0u8];
                s.read_exact(&mut echo).unwrap();
                echo[0]
            }
        });
        listener.wait(Duration::from_secs(5), || false).unwrap();
        assert_eq!(client.join().unwrap(), BYTE);
        drop(listener);
        assert!(!path.exists(), "the listener's socket goes with it");

        let listener = HeartbeatListener::bind(&path).unwrap();
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(&[0x42]).unwrap();
        assert!(matches!(
            listener.wait(Duration::from_secs(5), || false),
            Err(HeartbeatError::WrongByte(0x42))
        ));
    }

    #[test]
    fn silence_times_out_and_an_ended_enclave_stops_the_wait() {
        let path = socket("silent");
        let listener = HeartbeatListener::bind(&path).unwrap();
        let started = Instant::now();
        assert!(matches!(
            listener.wait(Duration::from_millis(100), || false),
            Err(HeartbeatError::TimedOut(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(matches!(listener.wait(Duration::from_secs(60), || true), Err(HeartbeatError::EnclaveEnded)));
    }
}
