//! The control socket of a running VM (`carve vm run --control PATH`): one JSON request per
//! connection, one JSON reply, as Firecracker's API socket but without HTTP. The socket file is
//! the owner's only (mode 0600); a request that does not arrive within a second is dropped, so a
//! silent client cannot hold the VM's event loop.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::vcpu::IoStatsSnapshot;

/// Longest request line carve reads: a request names at most a path.
const MAX_REQUEST: u64 = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Stop every vCPU and device backend at a consistent point.
    Pause,
    /// Continue exactly where the pause stopped; with `hide_pause`, the guest's KVM clock and
    /// TSCs continue from their values at the pause, so the time paused does not show.
    Resume {
        #[serde(default)]
        hide_pause: bool,
    },
    /// Describe the VM; with `sample_ms`, also watch its memory for that long (dirty-page
    /// rate and working set) before answering.
    Describe {
        #[serde(default, skip_serializing_if = "is_zero")]
        sample_ms: u64,
    },
    /// Save the VM to a new directory `to` (pausing it meanwhile if it runs).
    Snapshot { to: PathBuf },
    /// Send the running VM to `carve vm run --incoming` at `to` (HOST:PORT), pausing it for
    /// about `downtime_ms` at the end; the answer comes when the VM runs there (this VM then
    /// ends) or the migration failed (this VM runs on).
    Migrate {
        to: String,
        #[serde(default = "default_downtime_ms")]
        downtime_ms: u64,
    },
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

fn default_downtime_ms() -> u64 {
    crate::migration::DEFAULT_DOWNTIME_MS
}

/// The longest `describe` sample: the VM's event loop does not wait on it, but its client does.
pub const MAX_SAMPLE_MS: u64 = 10_000;

/// What `describe` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    /// `running` or `paused`.
    pub state: String,
    /// Since the VM started running (restored VMs: since the restore), paused time included.
    pub uptime_ms: u64,
    /// Of that, the time spent paused.
    pub paused_ms: u64,
    pub vcpus: usize,
    pub memory_bytes: u64,
    pub exits: ExitCounts,
    /// What the guest did to its memory over a sample (`describe --sample-ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryActivity>,
    /// The migration under way, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::migration::MigrationProgress>,
}

/// The guest's memory activity over one sample window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryActivity {
    pub window_ms: u64,
    /// Pages written in the window, by vCPUs (KVM's dirty log) or carve's devices.
    pub dirty_pages: u64,
    pub dirty_bytes_per_s: u64,
    /// How the dirty pages were found.
    pub dirty_method: String,
    /// Pages the guest touched in the window: read or written with `idle-page-tracking`, only
    /// written with `dirty-log` (the fallback where the host has no idle-page tracking).
    pub working_set_pages: u64,
    pub working_set_bytes: u64,
    pub working_set_method: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounts {
    pub pio: u64,
    pub mmio: u64,
    pub ignored_pio: u64,
    pub ignored_mmio: u64,
    pub int3_delivered: u64,
}

impl From<IoStatsSnapshot> for ExitCounts {
    fn from(io: IoStatsSnapshot) -> ExitCounts {
        ExitCounts {
            pio: io.pio_exits,
            mmio: io.mmio_exits,
            ignored_pio: io.ignored_pio,
            ignored_mmio: io.ignored_mmio,
            int3_delivered: io.breakpoints,
        }
    }
}

/// The answer to a request: `error` set when it failed, `description` for `describe`, and
/// for `pause`/`resume`/`snapshot` how long the VM took.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<VmDescription>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub took_us: Option<u64>,
    /// For `migrate`: what the migration did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::migration::MigrationReport>,
    /// With `error`: the exit status the client should end with, when the answering side has
    /// its own scheme (an enclave's nitro-cli E-code); carve's status 4 otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u8>,
}

impl ControlReply {
    pub fn failed(error: impl std::fmt::Display) -> ControlReply {
        ControlReply { error: Some(error.to_string()), ..Default::default() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on the control socket {path}: {source}")]
    Listen { path: PathBuf, source: std::io::Error },
    #[error("cannot reach a VM's control socket at {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("the VM at {path} did not answer: {detail}")]
    NoAnswer { path: PathBuf, detail: String },
    #[error("{message}")]
    Refused { message: String, status: Option<u8> },
}

/// Binds the control socket at `path` for the owner only; an existing socket file that nobody
/// listens on any more (a VM that ended without cleaning up) is replaced, a live one is not.
pub fn listen(path: &Path) -> Result<UnixListener, ControlError> {
    let error = |source| ControlError::Listen { path: path.to_path_buf(), source };
    if path.exists() && UnixStream::connect(path).is_err() {
        std::fs::remove_file(path).map_err(error)?;
    }
    let listener = UnixListener::bind(path).map_err(error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(error)?;
    listener.set_nonblocking(true).map_err(error)?;
    Ok(listener)
}

/// Reads one request from a freshly accepted connection; `Err` says what was wrong with it.
pub fn read_request(stream: &UnixStream) -> Result<ControlRequest, String> {
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(REQUEST_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(stream, MAX_REQUEST))
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the request: {e}"))?;
    serde_json::from_str(line.trim_end())
        .map_err(|e| format!("not a control request ({e}); expected e.g. {{\"op\":\"pause\"}}"))
}

/// Sends `reply` and closes the connection; a client that left loses only its answer.
pub fn send_reply(mut stream: UnixStream, reply: &ControlReply) {
    let mut text = serde_json::to_string(reply).expect("replies serialise");
    text.push('\n');
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let _ = stream.write_all(text.as_bytes());
}

/// The client side: sends `request` to the VM at `path` and returns its reply, or the VM's
/// refusal as [`ControlError::Refused`].
pub fn request(path: &Path, request: &ControlRequest) -> Result<ControlReply, ControlError> {
    let mut stream = UnixStream::connect(path)
        .map_err(|source| ControlError::Connect { path: path.to_path_buf(), source })?;
    let no_answer = |detail: String| ControlError::NoAnswer { path: path.to_path_buf(), detail };
    let mut text = serde_json::to_string(request).expect("requests serialise");
    text.push('\n');
    stream.write_all(text.as_bytes()).map_err(|e| no_answer(e.to_string()))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(|e| no_answer(e.to_string()))?;
    if line.is_empty() {
        return Err(no_answer("it closed the connection (did the VM end?)".into()));
    }
    let reply: ControlReply = serde_json::from_str(line.trim_end()).map_err(|e| no_answer(e.to_string()))?;
    match reply.error {
        Some(message) => Err(ControlError::Refused { message, status: reply.status }),
        None => Ok(reply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        assert_eq!(serde_json::to_string(&ControlRequest::Pause).unwrap(), r#"{"op":"pause"}"#);
        let snapshot = ControlRequest::Snapshot { to: "/tmp/s".into() };
        assert_eq!(serde_json::to_string(&snapshot).unwrap(), r#"{"op":"snapshot","to":"/tmp/s"}"#);
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"snapshot","to":"/s","extra":1}"#).is_err());
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"format-disk"}"#).is_err());
        let describe = ControlRequest::Describe { sample_ms: 0 };
        assert_eq!(serde_json::to_string(&describe).unwrap(), r#"{"op":"describe"}"#);
        assert_eq!(serde_json::from_str::<ControlRequest>(r#"{"op":"describe"}"#).unwrap(), describe);
        assert_eq!(
            serde_json::from_str::<ControlRequest>(r#"{"op":"migrate","to":"10.0.0.2:4444"}"#).unwrap(),
            ControlRequest::Migrate { to: "10.0.0.2:4444".into(), downtime_ms: 50 }
        );
    }

    #[test]
    fn a_live_socket_is_not_replaced_and_a_stale_one_is() {
        let dir = std::env::temp_dir().join(format!("carve-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control");
        let live = listen(&path).unwrap();
        assert!(matches!(listen(&path), Err(ControlError::Listen { .. })));
        drop(live);
        let again = listen(&path).unwrap();
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
