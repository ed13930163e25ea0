//! What the CLI and an enclave process say to each other, one JSON value per line: the launch
//! request and its events over the new process's stdin/stdout, then requests and replies over
//! its control socket. Internal to carve (nitro-cli's own wire format is CBOR; nothing outside
//! carve speaks to the socket).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::args::{CpuRequest, RunEnclaveArgs};
use crate::error::Failure;

/// What the CLI hands a new enclave process on its standard input.
#[derive(Debug, Serialize, Deserialize)]
pub struct LaunchRequest {
    pub args: RunEnclaveArgs,
    pub cpus: CpuRequest,
    /// Boot the built-in demo enclave image instead of `args.eif_path`.
    pub demo: bool,
}

/// `run-enclave`'s JSON, in nitro-cli's key order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    #[serde(rename = "EnclaveName")]
    pub name: String,
    #[serde(rename = "EnclaveID")]
    pub id: String,
    #[serde(rename = "ProcessID")]
    pub pid: u32,
    #[serde(rename = "EnclaveCID")]
    pub cid: u64,
    #[serde(rename = "NumberOfCPUs")]
    pub cpu_count: usize,
    #[serde(rename = "CPUIDs")]
    pub cpu_ids: Vec<u32>,
    #[serde(rename = "MemoryMiB")]
    pub memory_mib: u64,
}

/// What a launching enclave process tells the CLI, until it says Started or Failed.
#[derive(Debug, Serialize, Deserialize)]
pub enum LaunchEvent {
    /// A line nitro-cli prints to stderr while launching.
    Notice(String),
    Started(RunInfo),
    Failed(Failure),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Describe,
    Terminate,
    /// Stream the console (debug mode only); the raw bytes follow the reply line.
    Console,
    /// Reply once the enclave ends.
    Wait,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Described(Box<EnclaveState>),
    /// A terminate was accepted; `Done` follows once the enclave is gone.
    Terminating,
    Done,
    Ended(String),
    Failed(Failure),
}

/// Everything describe-enclaves shows about one enclave.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnclaveState {
    pub run: RunInfo,
    pub state: String,
    pub debug_mode: bool,
    pub development: bool,
    pub measurements: BTreeMap<String, String>,
    /// The image's metadata section (JSON text), for `--metadata`.
    pub metadata: Option<String>,
}

/// Writes `value` as one line.
pub fn send(to: &mut impl Write, value: &impl Serialize) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    to.write_all(&line)?;
    to.flush()
}

/// Reads one line as a `T`; `None` at end of stream.
pub fn receive<T: DeserializeOwned>(from: &mut impl BufRead) -> std::io::Result<Option<T>> {
    let mut line = String::new();
    // Bounded: a peer cannot make us buffer without end.
    let n = std::io::Read::take(&mut *from, 1 << 20).read_line(&mut line)?;
    if n == 0 {
        return Ok(None);
    }
    serde_json::from_str(&line).map(Some).map_err(std::io::Error::other)
}
