//! nitro-cli's error scheme, in one place for every carve command: each failure carries the
//! E-code nitro-cli gives the same condition, reads as a sentence, prints as `[ Exx ] …` and
//! exits with the code's number. The explanations are carve's own words.

use std::fmt;
use std::process::ExitCode;

use serde::{Deserialize, Serialize};

/// (code, nitro-cli's name for it, what it means in carve).
const CODES: &[(u8, &str, &str)] = &[
    (0, "UnspecifiedError", "An error carve could not classify."),
    (1, "MissingArgument", "A required argument was not given."),
    (2, "ConflictingArgument", "Two arguments that exclude each other were both given."),
    (3, "InvalidArgument", "An argument's value could not be used: a malformed number, size, path or JSON value."),
    (4, "SocketPairCreationFailure", "carve could not create the socket pair it uses to talk to an enclave process."),
    (5, "ProcessSpawnFailure", "The enclave process could not be started."),
    (6, "DaemonizeProcessFailure", "The enclave process could not detach from the terminal."),
    (7, "ReadFromDiskFailure", "The directory of enclave sockets could not be read."),
    (8, "UnusableConnectionError", "A connection to an enclave process was already closed or never opened."),
    (9, "SocketCloseError", "A socket could not be closed."),
    (10, "SocketConnectTimeoutError", "A socket timeout could not be set, for example while attaching to a console."),
    (11, "SocketError", "A socket operation failed."),
    (12, "EpollError", "Waiting on enclave events with epoll failed."),
    (13, "InotifyError", "Watching a socket path with inotify failed."),
    (14, "InvalidCommand", "An enclave process received a command or arguments it does not know."),
    (15, "LockAcquireFailure", "A lock protecting enclave state could not be taken."),
    (16, "ThreadJoinFailure", "A worker thread could not be joined."),
    (17, "SerdeError", "Serializing or parsing a command, a reply or a JSON file failed."),
    (18, "FilePermissionsError", "A file's permissions could not be changed."),
    (19, "FileOperationFailure", "A file could not be opened, read, written or created; the message names the file and the operation."),
    (20, "InvalidCpuConfiguration", "The same CPU was requested more than once."),
    (21, "NoSuchCpuAvailableInPool", "A requested CPU is not in the enclave CPU pool (see `carve allocator`)."),
    (22, "InsufficientCpus", "More CPUs were requested than the enclave CPU pool holds (see `carve allocator`)."),
    (23, "MalformedCpuId", "A CPU list could not be parsed."),
    (24, "CpuError", "A CPU range is invalid."),
    (25, "NoSuchHugepageFlag", "A hugepage size carve does not know was requested."),
    (26, "InsufficientMemoryRequested", "The requested memory is too small for the image: an enclave needs at least 64 MiB and four times the EIF's size."),
    (27, "InsufficientMemoryAvailable", "There is not enough reserved hugepage memory for the request (see `carve allocator`)."),
    (28, "InvalidEnclaveFd", "The enclave's virtual machine could not be created."),
    (29, "IoctlFailure", "A KVM or enclave ioctl failed; the message says which."),
    (30, "IoctlImageLoadInfoFailure", "The image load information could not be obtained."),
    (31, "IoctlSetMemoryRegionFailure", "A memory region could not be given to the enclave."),
    (32, "IoctlAddVcpuFailure", "A vCPU could not be added to the enclave."),
    (33, "IoctlEnclaveStartFailure", "The enclave could not be started."),
    (34, "MemoryOverflow", "The image does not fit in the enclave's memory."),
    (35, "EifParsingError", "The file is not a valid Enclave Image Format file; the message names the check it failed."),
    (36, "EnclaveBootFailure", "The enclave did not signal that it booted (no heartbeat), for example because its image is invalid or its signing certificate expired."),
    (37, "EnclaveEventWaitError", "Waiting for enclave events failed."),
    (38, "EnclaveProcessCommandNotExecuted", "At least one enclave process did not answer a command."),
    (39, "EnclaveProcessConnectionFailure", "carve could not connect to an enclave process."),
    (40, "SocketPathNotFound", "The socket path of an enclave process could not be found."),
    (41, "EnclaveProcessSendReplyFailure", "An enclave process could not send its reply."),
    (42, "EnclaveMmapError", "Enclave memory could not be mapped."),
    (43, "EnclaveMunmapError", "Enclave memory could not be unmapped."),
    (44, "EnclaveConsoleConnectionFailure", "The enclave console could not be attached; consoles exist only for debug-mode enclaves."),
    (45, "EnclaveConsoleReadError", "Reading from the enclave console failed."),
    (46, "EnclaveConsoleWriteOutputError", "Writing the enclave console to standard output failed."),
    (47, "IntegerParsingError", "A number could not be parsed or converted."),
    (48, "EifBuildingError", "The enclave image could not be built; the message says which input was at fault."),
    (49, "DockerImageBuildError", "A container image could not be built."),
    (50, "DockerImagePullError", "The container image could not be obtained: from a Docker daemon, the registry or the archive given (`--oci-archive`)."),
    (51, "ArtifactsPathNotSet", "No directory for build artifacts was found."),
    (52, "BlobsPathNotSet", "No blobs directory (kernel, init, nsm.ko, cmdline) was found; set --blobs-dir or NITRO_CLI_BLOBS."),
    (53, "ClockSkewError", "The system clock is not usable."),
    (54, "SignalMaskingError", "Signals could not be masked."),
    (55, "SignalUnmaskingError", "Signals could not be unmasked."),
    (56, "LoggerError", "The log could not be set up."),
    (57, "HasherError", "A measurement could not be computed, for example because a certificate could not be parsed."),
    (58, "EnclaveNamingError", "No enclave, or more than one, has the given name."),
    (59, "EIFSignatureCheckerError", "The image's signature could not be checked or is not valid, or its certificate is outside its validity period."),
    (60, "EIFSigningError", "The image could not be signed: an unreadable or unsupported key or certificate, or a key that does not match the certificate."),
];

/// A nitro-cli E-code (`E00`–`E60`); as data, its number (numbers nitro-cli does not define
/// read as E00).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ErrorCode(u8);

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<ErrorCode, D::Error> {
        u8::deserialize(deserializer).map(ErrorCode::from_number)
    }
}

impl ErrorCode {
    pub const UNSPECIFIED: ErrorCode = ErrorCode(0);
    pub const MISSING_ARGUMENT: ErrorCode = ErrorCode(1);
    pub const CONFLICTING_ARGUMENT: ErrorCode = ErrorCode(2);
    pub const INVALID_ARGUMENT: ErrorCode = ErrorCode(3);
    pub const PROCESS_SPAWN: ErrorCode = ErrorCode(5);
    pub const READ_FROM_DISK: ErrorCode = ErrorCode(7);
    pub const SOCKET_ERROR: ErrorCode = ErrorCode(11);
    pub const LOCK_ACQUIRE: ErrorCode = ErrorCode(15);
    pub const SERDE: ErrorCode = ErrorCode(17);
    pub const FILE_OPERATION: ErrorCode = ErrorCode(19);
    pub const INVALID_CPU_CONFIGURATION: ErrorCode = ErrorCode(20);
    pub const NO_SUCH_CPU_IN_POOL: ErrorCode = ErrorCode(21);
    pub const INSUFFICIENT_CPUS: ErrorCode = ErrorCode(22);
    pub const MALFORMED_CPU_ID: ErrorCode = ErrorCode(23);
    pub const CPU_ERROR: ErrorCode = ErrorCode(24);
    pub const INSUFFICIENT_MEMORY_REQUESTED: ErrorCode = ErrorCode(26);
    pub const INSUFFICIENT_MEMORY_AVAILABLE: ErrorCode = ErrorCode(27);
    pub const INVALID_ENCLAVE_FD: ErrorCode = ErrorCode(28);
    pub const IOCTL_FAILURE: ErrorCode = ErrorCode(29);
    pub const MEMORY_OVERFLOW: ErrorCode = ErrorCode(34);
    pub const EIF_PARSING: ErrorCode = ErrorCode(35);
    pub const ENCLAVE_BOOT_FAILURE: ErrorCode = ErrorCode(36);
    pub const COMMAND_NOT_EXECUTED: ErrorCode = ErrorCode(38);
    pub const ENCLAVE_PROCESS_CONNECTION: ErrorCode = ErrorCode(39);
    pub const CONSOLE_CONNECTION: ErrorCode = ErrorCode(44);
    pub const CONSOLE_READ: ErrorCode = ErrorCode(45);
    pub const CONSOLE_WRITE_OUTPUT: ErrorCode = ErrorCode(46);
    pub const EIF_BUILDING: ErrorCode = ErrorCode(48);
    pub const DOCKER_IMAGE_BUILD: ErrorCode = ErrorCode(49);
    pub const DOCKER_IMAGE_PULL: ErrorCode = ErrorCode(50);
    pub const ARTIFACTS_PATH_NOT_SET: ErrorCode = ErrorCode(51);
    pub const BLOBS_PATH_NOT_SET: ErrorCode = ErrorCode(52);
    pub const HASHER: ErrorCode = ErrorCode(57);
    pub const ENCLAVE_NAMING: ErrorCode = ErrorCode(58);
    pub const SIGNATURE_CHECKER: ErrorCode = ErrorCode(59);
    pub const SIGNING: ErrorCode = ErrorCode(60);

    /// The code numbered `number`; numbers nitro-cli does not define become E00.
    pub fn from_number(number: u8) -> ErrorCode {
        ErrorCode(if CODES.iter().any(|(n, ..)| *n == number) { number } else { 0 })
    }

    /// `E19` → the code, if nitro-cli defines it.
    pub fn parse(text: &str) -> Option<ErrorCode> {
        let number: u8 = text.strip_prefix('E')?.parse().ok()?;
        (text.len() == 3 && CODES.iter().any(|(n, ..)| *n == number)).then_some(ErrorCode(number))
    }

    /// The process exit status nitro-cli gives it: its number.
    pub fn number(self) -> u8 {
        self.0
    }

    pub fn explanation(self) -> &'static str {
        CODES.iter().find(|(n, ..)| *n == self.0).map(|(_, _, text)| *text).unwrap_or("")
    }

    pub fn name(self) -> &'static str {
        CODES.iter().find(|(n, ..)| *n == self.0).map(|(_, name, _)| *name).unwrap_or("")
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "E{:02}", self.0)
    }
}

/// A failure with its nitro-cli E-code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl fmt::Display) -> Failure {
        Failure { code, message: message.to_string() }
    }

    /// A file that could not be opened, read or written (E19), naming file and operation.
    pub fn file(path: &std::path::Path, operation: &str, error: impl fmt::Display) -> Failure {
        Failure::new(ErrorCode::FILE_OPERATION, format!("cannot {operation} '{}': {error}", path.display()))
    }

    /// Prints `[ Exx ] message` and nitro-cli's pointer to the error's documentation, and
    /// returns the E number as the exit status.
    pub fn report(&self) -> ExitCode {
        self.report_logging_to(None)
    }

    /// As [`Failure::report`]; with `logs`, also as nitro-cli does: the error goes to
    /// `err<RFC 3339 time>.log` there, and the message ends by naming that file (left out
    /// when it cannot be written).
    pub fn report_logging_to(&self, logs: Option<(&std::path::Path, &str)>) -> ExitCode {
        eprintln!("[ {} ] {}", self.code, self.message);
        eprintln!();
        eprint!("For more details, please visit https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html#{}", self.code);
        let logged = logs.and_then(|(dir, time)| {
            let path = dir.join(format!("err{time}.log"));
            let text = format!("  Action: {}\n  Code: {} ({})\n", self.message, self.code, self.code.name());
            std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, text)).ok().map(|()| path)
        });
        match logged {
            Some(path) => eprintln!(
                "\n\nIf you open a support ticket, please provide the error log found at \"{}\"",
                path.display()
            ),
            None => eprintln!(),
        }
        // (nitro-cli exits 0 for E00, its catch-all; a failure never does here)
        ExitCode::from(self.code.0.max(1))
    }
}

pub type Result<T> = std::result::Result<T, Failure>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_from_e00_to_e60_is_defined_once() {
        for (i, (number, name, text)) in CODES.iter().enumerate() {
            assert_eq!(usize::from(*number), i);
            assert!(!name.is_empty() && text.ends_with('.'), "E{number:02}");
        }
        assert_eq!(ErrorCode::parse("E35"), Some(ErrorCode::EIF_PARSING));
        assert_eq!(ErrorCode::parse("E61"), None);
        assert_eq!(ErrorCode::parse("E3"), None);
        assert_eq!(ErrorCode::parse("35"), None);
        assert_eq!(ErrorCode::FILE_OPERATION.to_string(), "E19");
    }
}
