//! Failures as nitro-cli reports them: each carries the E-code nitro-cli gives the same
//! condition (the process exit status is the code's number) and reads as a sentence.

use serde::{Deserialize, Serialize};

/// nitro-cli's E-codes for the conditions carve's enclave commands can meet.
pub mod code {
    pub const UNSPECIFIED: u8 = 0;
    pub const MISSING_ARGUMENT: u8 = 1;
    pub const CONFLICTING_ARGUMENT: u8 = 2;
    pub const INVALID_ARGUMENT: u8 = 3;
    pub const PROCESS_SPAWN: u8 = 5;
    pub const READ_FROM_DISK: u8 = 7;
    pub const SOCKET_ERROR: u8 = 11;
    pub const LOCK_ACQUIRE: u8 = 15;
    pub const SERDE: u8 = 17;
    pub const FILE_OPERATION: u8 = 19;
    pub const INVALID_CPU_CONFIGURATION: u8 = 20;
    pub const NO_SUCH_CPU_IN_POOL: u8 = 21;
    pub const INSUFFICIENT_CPUS: u8 = 22;
    pub const MALFORMED_CPU_ID: u8 = 23;
    pub const CPU_ERROR: u8 = 24;
    pub const INSUFFICIENT_MEMORY_REQUESTED: u8 = 26;
    pub const INSUFFICIENT_MEMORY_AVAILABLE: u8 = 27;
    pub const INVALID_ENCLAVE_FD: u8 = 28;
    pub const IOCTL_FAILURE: u8 = 29;
    pub const MEMORY_OVERFLOW: u8 = 34;
    pub const EIF_PARSING: u8 = 35;
    pub const ENCLAVE_BOOT_FAILURE: u8 = 36;
    pub const COMMAND_NOT_EXECUTED: u8 = 38;
    pub const ENCLAVE_PROCESS_CONNECTION: u8 = 39;
    pub const CONSOLE_CONNECTION: u8 = 44;
    pub const CONSOLE_READ: u8 = 45;
    pub const CONSOLE_WRITE_OUTPUT: u8 = 46;
    pub const ENCLAVE_NAMING: u8 = 58;
    pub const SIGNATURE_CHECKER: u8 = 59;
}

/// A failure with its nitro-cli E-code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl std::fmt::Display) -> Failure {
        Failure { code, message: message.to_string() }
    }

    /// A file that could not be opened, read or written (E19), naming file and operation.
    pub fn file(path: &std::path::Path, operation: &str, error: impl std::fmt::Display) -> Failure {
        Failure::new(code::FILE_OPERATION, format!("cannot {operation} '{}': {error}", path.display()))
    }
}

pub type Result<T> = std::result::Result<T, Failure>;
