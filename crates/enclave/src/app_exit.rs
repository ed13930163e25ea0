//! How the enclave's app ended, as carve's enclave init (crates/init) reports it just before it
//! reboots: one line, `exit N` or `signal S`, on vsock port 47031 of the parent. Nitro's own init
//! reports nothing; images with it simply never connect.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const PORT: u32 = 47031;
/// The longest line worth reading ("signal 64\n" is ten bytes); the guest is not trusted.
const MAX_LINE: u64 = 32;

/// The parent's listener for the report; its socket file goes when it drops.
pub struct AppExitListener {
    listener: UnixListener,
    path: PathBuf,
}

impl AppExitListener {
    pub fn bind(path: &Path) -> std::io::Result<AppExitListener> {
        Ok(AppExitListener { listener: UnixListener::bind(path)?, path: path.to_path_buf() })
    }

    /// Once the VM has ended: the app's end as a sentence, if the enclave reported one. The
    /// report waits in the listener's backlog (the vsock device connected and delivered it).
    pub fn take(&self) -> Option<String> {
        self.listener.set_nonblocking(true).ok()?;
        let (stream, _) = self.listener.accept().ok()?;
        stream.set_nonblocking(false).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        let mut line = String::new();
        stream.take(MAX_LINE).read_to_string(&mut line).ok()?;
        let sentence = describe(&line);
        if sentence.is_none() {
            log::warn!("the enclave reported its app's end as {line:?}, which carve does not understand");
        }
        sentence
    }
}

impl Drop for AppExitListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `exit N` (0–255) or `signal S` (1–64), newline-terminated, as a sentence.
pub fn describe(line: &str) -> Option<String> {
    let line = line.strip_suffix('\n')?;
    if let Some(code) = line.strip_prefix("exit ").and_then(|n| n.parse::<u8>().ok()) {
        return Some(format!("the app exited with status {code}"));
    }
    let signal =
        line.strip_prefix("signal ").and_then(|n| n.parse::<u8>().ok()).filter(|s| (1..=64).contains(s))?;
    Some(format!("the app was killed by signal {signal}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_read_strictly() {
        assert_eq!(describe("exit 7\n").as_deref(), Some("the app exited with status 7"));
        assert_eq!(describe("exit 0\n").as_deref(), Some("the app exited with status 0"));
        assert_eq!(describe("signal 11\n").as_deref(), Some("the app was killed by signal 11"));
        for bad in
            ["exit 7", "exit 256\n", "exit -1\n", "signal 0\n", "signal 65\n", "exit 7\nexit 8\n", "\n", ""]
        {
            assert_eq!(describe(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_report_left_in_the_backlog_is_read_after_the_vm_ended() {
        let dir = std::env::temp_dir().join(format!("carve-app-exit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vsock_47031");
        let listener = AppExitListener::bind(&path).unwrap();
        assert_eq!(listener.take(), None, "nothing reported");
        let mut enclave = std::os::unix::net::UnixStream::connect(&path).unwrap();
        std::io::Write::write_all(&mut enclave, b"exit 7\n").unwrap();
        drop(enclave);
        assert_eq!(listener.take().as_deref(), Some("the app exited with status 7"));
        drop(listener);
        assert!(!path.exists(), "the socket file goes with the listener");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
