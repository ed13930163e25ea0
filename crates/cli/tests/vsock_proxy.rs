//! carve as AWS's vsock-proxy: its command line, allowlist checks, messages and exit statuses,
//! and relaying. (An enclave connecting out through it: enclaves.rs.)

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{fresh_dir, stderr, TIMEOUT};

/// A directory with carve linked as `vsock-proxy`, its run directory and an allowlist.
struct Setup {
    dir: PathBuf,
}

impl Setup {
    fn new(name: &str, allowlist: &str) -> Setup {
        let dir = fresh_dir(&format!("vsock-proxy-{name}"));
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_carve"), dir.join("vsock-proxy")).unwrap();
        std::fs::write(dir.join("allowlist.yaml"), allowlist).unwrap();
        Setup { dir }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(self.dir.join("vsock-proxy"));
        command.args(args).env("CARVE_RUN_DIR", self.dir.join("run")).env("RUST_LOG", "info");
        command.env_remove("NITRO_CLI_SOCKETS_PATH");
        command
    }

    /// The proxy with `--config allowlist.yaml` and `args`, to its end.
    fn run(&self, args: &[&str]) -> Output {
        let config = self.dir.join("allowlist.yaml");
        let mut all = vec!["--config", config.to_str().unwrap()];
        all.extend_from_slice(args);
        self.command(&all).output().unwrap()
    }

    fn start(&self, args: &[&str]) -> Proxy {
        let config = self.dir.join("allowlist.yaml");
        let mut all = vec!["--config", config.to_str().unwrap()];
        all.extend_from_slice(args);
        let child = self.command(&all).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let socket = self.dir.join(format!("run/vsock_{}", args[args.len() - 3]));
        let deadline = Instant::now() + TIMEOUT;
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the proxy listens at {}", socket.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        Proxy { child, socket }
    }
}

struct Proxy {
    child: Child,
    socket: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    /// SIGTERM; returns the log.
    fn stop(mut self) -> String {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let status = self.child.wait().unwrap();
        let mut log = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
        assert_eq!(status.code(), Some(128 + 15), "{log}");
        assert!(!self.socket.exists(), "the proxy takes its socket with it");
        assert!(!self.socket.with_extension("lock").exists(), "and its lock");
        log
    }
}

fn assert_error(out: &Output, text: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
    assert_eq!(stderr(out).lines().last(), Some(format!("Error: {text:?}").as_str()), "{}", stderr(out));
}

#[test]
fn bad_arguments_and_allowlists_fail_as_vsock_proxy_does() {
    let setup = Setup::new(
        "bad",
        "allowlist:\n- {address: 127.0.0.1, port: 8443}\n- {address: localhost, port: 9}\n",
    );
    let not_allowed = "Error at checking the allowlist: The given address and port are not allowed";
    assert_error(&setup.run(&["8000", "127.0.0.1", "443"]), not_allowed);
    assert_error(&setup.run(&["8000", "127.0.0.2", "8443"]), not_allowed);
    // A name in the list matches an address it resolves to (localhost: 127.0.0.1 and ::1).
    assert_error(
        &setup.run(&["-6", "8000", "127.0.0.1", "9"]),
        "Error at checking the allowlist: No accepted IP was found.",
    );
    assert_error(
        &setup.run(&["8000", "no-such-host.invalid", "8443"]),
        "Error at checking the allowlist: DNS lookup failed!",
    );
    assert_error(&setup.run(&["x", "127.0.0.1", "8443"]), "Local port is not valid");
    assert_error(&setup.run(&["8000", "127.0.0.1", "70000"]), "Remote port is not valid");
    assert_error(&setup.run(&["-w", "0", "8000", "127.0.0.1", "8443"]), "Number of workers must not be 0");
    assert_error(&setup.run(&["-w", "many", "8000", "127.0.0.1", "8443"]), "Number of workers is not valid");
    // Usage errors are clap's, status 2, as vsock-proxy's.
    let out = setup.run(&["-4", "-6", "8000", "127.0.0.1", "8443"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(setup.run(&["8000"]).status.code(), Some(2));
    let version = setup.command(&["--version"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&version.stdout), "Vsock-TCP proxy 1.0.1\n");

    // Allowlists that cannot be used.
    let with = |text: &str, args: &[&str]| {
        std::fs::write(setup.dir.join("allowlist.yaml"), text).unwrap();
        setup.run(args)
    };
    let args = ["8000", "127.0.0.1", "8443"];
    let prefix = "Error at checking the allowlist: ";
    for (text, error) in [
        ("allowlist: [\n", "Bad yaml format"),
        ("", "No allowlist field"),
        ("services:\n- {address: 127.0.0.1, port: 8443}\n", "No allowlist field"),
        ("allowlist:\n- {port: 8443}\n", "No address field"),
        ("allowlist:\n- {address: 127.0.0.1, port: https}\n", "No port field or invalid type"),
        ("allowlist:\n- {address: 127.0.0.1, port: 74979}\n", "No port field or invalid type"),
    ] {
        assert_error(&with(text, &args), &format!("{prefix}{error}"));
    }
    let mut missing =
        setup.command(&["--config", "/nonexistent/vsock-proxy.yaml", "8000", "127.0.0.1", "8443"]);
    assert_error(&missing.output().unwrap(), &format!("{prefix}Could not open the file"));
    let mut directory =
        setup.command(&["--config", setup.dir.to_str().unwrap(), "8000", "127.0.0.1", "8443"]);
    assert_error(&directory.output().unwrap(), &format!("{prefix}Could not read the file"));

    // A port another proxy serves.
    std::fs::write(setup.dir.join("allowlist.yaml"), "allowlist:\n- {address: 127.0.0.1, port: 8443}\n")
        .unwrap();
    let first = setup.start(&args);
    let out = setup.run(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out)
            .lines()
            .last()
            .unwrap_or_default()
            .starts_with("Error: \"Could not listen for connections: Could not bind to cid: 3 port: 8000 ("),
        "{}",
        stderr(&out)
    );
    first.stop();
    // As `carve vsock-proxy` it is the same program.
    let out = Command::new(env!("CARGO_BIN_EXE_carve"))
        .args(["vsock-proxy", "--config", "/nonexistent", "8000", "127.0.0.1", "8443"])
        .output()
        .unwrap();
    assert_error(&out, &format!("{prefix}Could not open the file"));
}

/// Connects to the proxy's socket as carve's vsock device does for an enclave.
fn connect(socket: &Path) -> UnixStream {
    let stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
}

#[test]
fn connections_are_relayed_both_ways_and_an_unreachable_remote_closes_them() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let setup = Setup::new("relay", &format!("allowlist:\n- {{address: 127.0.0.1, port: {port}}}\n"));
    let proxy = setup.start(&["-w", "2", "8001", "127.0.0.1", &port.to_string()]);

    // Three enclave connections at once (two workers: the third waits its turn), each a
    // request, a half-close, and an answer to the end.
    let served = std::thread::spawn(move || {
        for _ in 0..3 {
            let (conn, _) = server.accept().unwrap();
            std::thread::spawn(move || {
                let mut request = Vec::new();
                (&conn).read_to_end(&mut request).unwrap();
                (&conn).write_all(&request.repeat(2)).unwrap();
            });
        }
    });
    let clients: Vec<(UnixStream, Vec<u8>)> = (0..3)
        .map(|i| {
            let client = connect(&proxy.socket);
            let data = common::bytes(100_000 + i * 7, i as u64);
            (&client).write_all(&data).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            (client, data)
        })
        .collect();
    for (client, data) in clients {
        let mut answer = Vec::new();
        (&client).read_to_end(&mut answer).unwrap();
        assert!(answer == data.repeat(2), "{} bytes back of {}", answer.len(), data.len() * 2);
    }
    served.join().unwrap();
    let log = proxy.stop();
    assert!(log.contains("Proxy is now in listening state"), "{log}");
    assert!(log.contains(&format!("to 127.0.0.1:{port}")), "{log}");

    // Nobody at the remote: the enclave's connection is closed, the proxy keeps serving.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = closed.local_addr().unwrap().port();
    drop(closed);
    std::fs::write(
        setup.dir.join("allowlist.yaml"),
        format!("allowlist:\n- {{address: 127.0.0.1, port: {gone}}}\n"),
    )
    .unwrap();
    let proxy = setup.start(&["8002", "127.0.0.1", &gone.to_string()]);
    for _ in 0..2 {
        let client = connect(&proxy.socket);
        let mut line = String::new();
        assert_eq!(BufReader::new(&client).read_line(&mut line).unwrap(), 0, "closed without a byte");
    }
    let log = proxy.stop();
    assert!(
        log.contains(&format!("Could not create connection: Could not connect to 127.0.0.1:{gone}")),
        "{log}"
    );
}
