//! The CLI's side: launching an enclave process, finding enclaves, and asking them to
//! describe themselves, stream their console, terminate, or say when they end.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{ErrorCode, Failure, Result};
use crate::protocol::{receive, send, EnclaveState, LaunchEvent, LaunchRequest, Reply, Request, RunInfo};
use crate::run_dir::{Record, RunDir};

/// Where enclave processes write their log, in the run directory.
pub const LOG_FILE: &str = "enclaves.log";

/// The hidden `carve` subcommand that becomes an enclave process.
pub const ENCLAVE_PROCESS_COMMAND: &str = "__enclave-process";

/// Starts an enclave process and follows its launch; `notice` gets nitro-cli's stderr lines.
pub fn launch(run_dir: &RunDir, request: &LaunchRequest, notice: &mut dyn FnMut(&str)) -> Result<RunInfo> {
    let exe = std::env::current_exe().map_err(|e| {
        Failure::new(ErrorCode::PROCESS_SPAWN, format!("cannot find the carve executable: {e}"))
    })?;
    let log_path = run_dir.path().join(LOG_FILE);
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Failure::file(&log_path, "open the log", e))?;
    let mut child = Command::new(exe)
        .arg(ENCLAVE_PROCESS_COMMAND)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| {
            Failure::new(ErrorCode::PROCESS_SPAWN, format!("cannot start the enclave process: {e}"))
        })?;
    let mut stdin = child.stdin.take().expect("piped");
    send(&mut stdin, request).map_err(|e| {
        Failure::new(ErrorCode::PROCESS_SPAWN, format!("cannot hand the enclave process its request: {e}"))
    })?;
    drop(stdin);
    let mut events = BufReader::new(child.stdout.take().expect("piped"));
    loop {
        match receive::<LaunchEvent>(&mut events) {
            Ok(Some(LaunchEvent::Notice(text))) => notice(&text),
            Ok(Some(LaunchEvent::Started(info))) => return Ok(info),
            Ok(Some(LaunchEvent::Failed(failure))) => {
                let _ = child.wait();
                return Err(failure);
            }
            Ok(None) | Err(_) => {
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(Failure::new(
                    ErrorCode::PROCESS_SPAWN,
                    format!(
                        "the enclave process ended before the enclave started ({status}); see {}",
                        log_path.display()
                    ),
                ));
            }
        }
    }
}

/// Which enclave a command names.
pub enum Selector<'a> {
    Id(&'a str),
    Name(&'a str),
}

/// The running enclave `selector` names: unknown names → E58; malformed IDs → E03; IDs of no
/// running enclave → E11 (nitro-cli fails to connect to the socket such an ID would have).
pub fn find(run_dir: &RunDir, selector: Selector) -> Result<Record> {
    let records = run_dir.live_records(&run_dir.lock()?);
    match selector {
        Selector::Name(name) => records.into_iter().find(|r| r.name == name).ok_or_else(|| {
            Failure::new(ErrorCode::ENCLAVE_NAMING, format!("No enclave named '{name}' is running"))
        }),
        Selector::Id(id) => {
            if crate::ids::slot_of(id).is_none() {
                return Err(Failure::new(
                    ErrorCode::INVALID_ARGUMENT,
                    format!("'{id}' is not an enclave ID"),
                ));
            }
            records.into_iter().find(|r| r.id == id).ok_or_else(|| {
                Failure::new(ErrorCode::SOCKET_ERROR, format!("No enclave with ID {id} is running"))
            })
        }
    }
}

pub fn running(run_dir: &RunDir) -> Result<Vec<Record>> {
    Ok(run_dir.live_records(&run_dir.lock()?))
}

/// Sends one request and reads the reply line; returns the stream and any bytes that came
/// after the line (a console's first output).
fn ask(
    run_dir: &RunDir,
    record: &Record,
    request: &Request,
    timeout: Option<Duration>,
) -> Result<(UnixStream, Reply, Vec<u8>)> {
    let path = run_dir.control_socket(record.slot);
    let failed = |e: &dyn std::fmt::Display| {
        Failure::new(
            ErrorCode::ENCLAVE_PROCESS_CONNECTION,
            format!("cannot reach the process of enclave {}: {e}", record.id),
        )
    };
    let mut stream = UnixStream::connect(&path).map_err(|e| failed(&e))?;
    stream.set_read_timeout(timeout).map_err(|e| failed(&e))?;
    send(&mut stream, request).map_err(|e| failed(&e))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| failed(&e))?);
    match receive::<Reply>(&mut reader) {
        Ok(Some(reply)) => Ok((stream, reply, reader.buffer().to_vec())),
        Ok(None) => Err(failed(&"it closed the connection without replying")),
        Err(e) => Err(failed(&e)),
    }
}

fn expect_failure(reply: Reply) -> Failure {
    match reply {
        Reply::Failed(failure) => failure,
        other => Failure::new(ErrorCode::COMMAND_NOT_EXECUTED, format!("unexpected reply {other:?}")),
    }
}

/// Every running enclave's state, and how many took the question but did not answer it within
/// 3 s. One whose socket refuses or drops the question is ending (its process closes the socket
/// before taking its VM down) and is left out, as nitro-cli leaves out stale sockets.
pub fn describe_all(run_dir: &RunDir) -> Result<(Vec<EnclaveState>, usize)> {
    let mut states = Vec::new();
    let mut failed = 0;
    for record in running(run_dir)? {
        match describe_one(run_dir, &record) {
            Ok(Some(state)) => states.push(state),
            Ok(None) => {}
            Err(_) => failed += 1,
        }
    }
    Ok((states, failed))
}

/// `Ok(None)` when the enclave's process is ending; `Err` when it does not answer.
fn describe_one(run_dir: &RunDir, record: &Record) -> std::io::Result<Option<EnclaveState>> {
    use std::io::ErrorKind::{BrokenPipe, ConnectionRefused, ConnectionReset, NotFound};
    let ending =
        |e: &std::io::Error| matches!(e.kind(), ConnectionRefused | ConnectionReset | BrokenPipe | NotFound);
    let attempt = || -> std::io::Result<Option<Reply>> {
        let mut stream = UnixStream::connect(run_dir.control_socket(record.slot))?;
        stream.set_read_timeout(Some(ANSWER_WITHIN))?;
        send(&mut stream, &Request::Describe)?;
        receive::<Reply>(&mut BufReader::new(stream))
    };
    match attempt() {
        Ok(Some(Reply::Described(state))) => Ok(Some(*state)),
        Ok(None) => Ok(None),
        Ok(Some(other)) => Err(std::io::Error::other(format!("unexpected reply {other:?}"))),
        Err(e) if ending(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Terminates an enclave; returns once its process gave everything back.
pub fn terminate(run_dir: &RunDir, record: &Record) -> Result<()> {
    // The process accepts within nitro-cli's 3 s, then takes what its VM takes to end.
    let (stream, reply, rest) = ask(run_dir, record, &Request::Terminate, Some(ANSWER_WITHIN))?;
    match reply {
        Reply::Terminating => {}
        // (an enclave process from before carve said Terminating)
        Reply::Done => return Ok(()),
        other => return Err(expect_failure(other)),
    }
    let not_done = |e: &dyn std::fmt::Display| {
        Failure::new(ErrorCode::ENCLAVE_PROCESS_CONNECTION, format!("enclave {} did not end: {e}", record.id))
    };
    stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| not_done(&e))?;
    match receive::<Reply>(&mut BufReader::new(rest.as_slice().chain(&stream))) {
        Ok(Some(Reply::Done)) => Ok(()),
        Ok(Some(reply)) => Err(expect_failure(reply)),
        Ok(None) => Err(not_done(&"its process closed the connection")),
        Err(e) => Err(not_done(&e)),
    }
}

/// How long an enclave process may take to answer a question (nitro-cli's per-operation wait).
const ANSWER_WITHIN: Duration = Duration::from_secs(3);

/// Terminates every enclave this user may terminate (all of them for root); others' enclaves
/// are skipped, as nitro-cli tolerates EACCES for `--all`.
pub fn terminate_all(run_dir: &RunDir) -> Result<Vec<(Record, Result<()>)>> {
    let uid = rustix::process::getuid();
    Ok(running(run_dir)?
        .into_iter()
        .filter(|record| uid.is_root() || record.uid == uid.as_raw())
        .map(|record| {
            let result = terminate(run_dir, &record);
            (record, result)
        })
        .collect())
}

/// Blocks until the enclave ends; returns why it ended.
pub fn wait(run_dir: &RunDir, record: &Record) -> Result<String> {
    match ask(run_dir, record, &Request::Wait, None) {
        Ok((_, Reply::Ended(reason), _)) => Ok(reason),
        Ok((_, reply, _)) => Err(expect_failure(reply)),
        // Its control socket closes as it starts to end; the log says how, a moment later.
        Err(refused) => {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let still_ending = run_dir.live_records(&run_dir.lock()?).iter().any(|r| r.id == record.id);
                if let Some(reason) = recorded_end(run_dir, &record.id) {
                    return Ok(reason);
                }
                if !still_ending || Instant::now() > deadline {
                    return Err(refused);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// How enclave `id` ended, from the enclave log (its process writes the line before it lets go
/// of the enclave's slot), if it has: `wait` for an enclave that is gone answers as `docker
/// wait` does for a container that has exited.
pub fn recorded_end(run_dir: &RunDir, id: &str) -> Option<String> {
    let log = std::fs::read_to_string(run_dir.path().join(LOG_FILE)).ok()?;
    let marker = format!("enclave {id} ended: ");
    log.lines().rev().find_map(|line| line.split_once(&marker).map(|(_, reason)| reason.to_string()))
}

/// Copies the enclave's console to `out` until the enclave ends or `disconnect` passes;
/// `connected` runs once the enclave process accepted.
pub fn console(
    run_dir: &RunDir,
    record: &Record,
    disconnect: Option<Duration>,
    connected: &mut dyn FnMut(),
    out: &mut dyn Write,
) -> Result<()> {
    let (mut stream, reply, first) = ask(run_dir, record, &Request::Console, Some(Duration::from_secs(20)))?;
    if !matches!(reply, Reply::Done) {
        return Err(expect_failure(reply));
    }
    connected();
    let write_failed = |e: std::io::Error| {
        Failure::new(ErrorCode::CONSOLE_WRITE_OUTPUT, format!("cannot write the console output: {e}"))
    };
    out.write_all(&first).and_then(|()| out.flush()).map_err(write_failed)?;
    let deadline = disconnect.map(|d| Instant::now() + d);
    let mut buf = [0u8; 1024];
    loop {
        let slice = match deadline {
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => left.min(Duration::from_millis(500)),
                _ => return Ok(()),
            },
            None => Duration::from_millis(500),
        };
        let _ = stream.set_read_timeout(Some(slice));
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                out.write_all(&buf[..n]).and_then(|()| out.flush()).map_err(write_failed)?;
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Failure::new(
                    ErrorCode::CONSOLE_READ,
                    format!("cannot read the enclave console: {e}"),
                ))
            }
        }
    }
}
