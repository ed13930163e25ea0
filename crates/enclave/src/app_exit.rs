//! How the enclave's app ended, as carve's enclave init (crates/init) reports it just before it
//! reboots: one line, `exit N` or `signal S`, on vsock port 47031 of the parent. Nitro's own init
//! reports nothing; images with it simply never connect.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};

pub const PORT: u32 = 47031;
/// The longest line worth reading ("signal 64\n" is ten bytes); the guest is not trusted.
const MAX_LINE: usize = 32;

/// The parent's listener for the report, answered on its own thread from before boot: every
/// connection is taken at once (a guest cannot fill the backlog and stall carve's vsock device),
/// the first well-formed report is kept, and each report is acknowledged with one byte so
/// carve-init knows it arrived before it reboots. The socket file goes when it drops.
pub struct AppExitListener {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl AppExitListener {
    pub fn bind(path: &Path) -> std::io::Result<AppExitListener> {
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(None));
        let (stop_flag, first) = (stop.clone(), report.clone());
        let thread = std::thread::Builder::new()
            .name("carve-app-exit".into())
            .spawn(move || serve(&listener, &stop_flag, &first))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(path);
            })?;
        Ok(AppExitListener { path: path.to_path_buf(), stop, report, thread: Some(thread) })
    }

    /// Once the VM has ended: the app's end as a sentence, if the enclave reported one.
    pub fn take(mut self) -> Option<String> {
        self.finish();
        self.report.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for AppExitListener {
    fn drop(&mut self) {
        self.finish();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Accepts until told to stop, then takes what is still queued.
fn serve(listener: &UnixListener, stop: &AtomicBool, report: &Mutex<Option<String>>) {
    loop {
        let stopping = stop.load(Ordering::Acquire);
        while let Ok((stream, _)) = listener.accept() {
            if let Some(sentence) = read_report(stream) {
                report.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(sentence);
            }
        }
        if stopping {
            return;
        }
        let mut fds = [PollFd::new(listener, PollFlags::IN)];
        let _ = poll(&mut fds, Some(&Timespec { tv_sec: 0, tv_nsec: 100_000_000 }));
    }
}

/// One connection: a line of at most [`MAX_LINE`] bytes, acknowledged with one byte.
fn read_report(mut stream: UnixStream) -> Option<String> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut line = Vec::new();
    let mut byte = [0u8];
    while line.len() < MAX_LINE && !line.ends_with(b"\n") {
        match stream.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => break,
        }
    }
    let line = String::from_utf8_lossy(&line);
    let sentence = describe(&line);
    if sentence.is_some() {
        let _ = stream.write_all(b"\n");
    } else {
        log::warn!("the enclave reported its app's end as {line:?}, which carve does not understand");
    }
    sentence
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
    fn reports_are_acknowledged_and_the_first_one_is_kept() {
        let dir = std::env::temp_dir().join(format!("carve-app-exit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vsock_47031");
        let report = |line: &[u8]| {
            let mut enclave = UnixStream::connect(&path).unwrap();
            enclave.write_all(line).unwrap();
            let mut ack = Vec::new();
            let _ = enclave.read_to_end(&mut ack);
            ack
        };
        assert_eq!(AppExitListener::bind(&path).unwrap().take(), None, "nothing reported");
        let listener = AppExitListener::bind(&path).unwrap();
        assert_eq!(report(b"garbage"), b"", "no ack for what carve does not understand");
        assert_eq!(report(b"exit 7\n"), b"\n", "acknowledged");
        assert_eq!(report(b"exit 9\n"), b"\n");
        // Many more connections than a backlog holds: none is left waiting.
        for _ in 0..300 {
            drop(UnixStream::connect(&path).unwrap());
        }
        assert_eq!(listener.take().as_deref(), Some("the app exited with status 7"));
        assert!(!path.exists(), "the socket file goes with the listener");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
