//! Every case docs/nitro-cli-differences.md lists, run: where carve differs from nitro-cli 1.5.0
//! and vsock-proxy, it does what the page says. The first test keeps the page and this file
//! naming the same cases.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{fresh_dir, guest, kvm_usable, stderr, stdout, Format, TIMEOUT};
use serde_json::Value;

#[test]
fn the_page_and_these_tests_name_the_same_cases() {
    let page = include_str!("../../../docs/nitro-cli-differences.md");
    let source = include_str!("nitro_cli_differences.rs");
    let names = |text: &str, prefix: &str| -> std::collections::BTreeSet<String> {
        text.match_indices(prefix)
            .map(|(at, _)| {
                let rest = &text[at + prefix.len()..];
                let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
                rest[..end].to_string()
            })
            .filter(|name: &String| !name.is_empty())
            .collect()
    };
    let listed = names(page, "`difference_");
    let tested = names(source, "fn difference_");
    assert!(!listed.is_empty());
    assert_eq!(listed, tested, "docs/nitro-cli-differences.md and this file name different cases");
}

/// An isolated carve: its own run and state directories.
struct Carve {
    root: PathBuf,
}

impl Carve {
    fn new(name: &str) -> Carve {
        Carve { root: fresh_dir(&format!("differences-{name}")) }
    }

    fn command(&self, program: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(program);
        command
            .args(args)
            .env("CARVE_RUN_DIR", self.root.join("run"))
            .env("CARVE_STATE_DIR", self.root.join("state"))
            .env("NITRO_CLI_LOGS_PATH", self.root.join("nitro-logs"))
            .env_remove("NITRO_CLI_SOCKETS_PATH");
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(Path::new(env!("CARGO_BIN_EXE_carve")), args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        out
    }

    fn development(&self) {
        let config = self.root.join("dev.yaml");
        std::fs::write(&config, "development: true\n").unwrap();
        self.ok(&["allocator", "--config", config.to_str().unwrap()]);
    }

    /// run-enclave of `eif` on one CPU with 64 MiB.
    fn run_enclave(&self, eif: &Path) -> Output {
        self.run(&["run-enclave", "--eif-path", eif.to_str().unwrap(), "--cpu-count", "1", "--memory", "64"])
    }

    fn demo_eif(&self) -> PathBuf {
        let eif = self.root.join("demo.eif");
        self.ok(&["build-enclave", "--demo", "--output-file", eif.to_str().unwrap()]);
        eif
    }
}

impl Drop for Carve {
    fn drop(&mut self) {
        let _ = self.run(&["terminate-enclave", "--all"]);
    }
}

fn assert_code(out: &Output, code: i32, says: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(err.contains(&format!("[ E{code:02} ]")) && err.contains(says), "{err}");
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn difference_crc_mismatch_is_refused() {
    let carve = Carve::new("crc");
    carve.development();
    let eif = carve.demo_eif();
    let mut bytes = std::fs::read(&eif).unwrap();
    let at = bytes.windows(13).position(|w| w == b"console=ttyS0").unwrap();
    bytes[at + 12] = b'1';
    std::fs::write(&eif, bytes).unwrap();
    let out = carve.run_enclave(&eif);
    assert_code(&out, 35, "the image's CRC does not match");
}

#[test]
fn difference_expired_certificate_is_e59() {
    let carve = Carve::new("expired");
    carve.development();
    let eif = carve.demo_eif();
    let (key, cert) = common::expired_signer(&carve.root, "old");
    carve.ok(&[
        "sign-eif",
        "--eif-path",
        eif.to_str().unwrap(),
        "--signing-certificate",
        &cert,
        "--private-key",
        &key,
    ]);
    let out = carve.run_enclave(&eif);
    assert_code(&out, 59, "the signing certificate is expired or not yet valid (valid from");
}

/// carve linked as `vsock-proxy` in `dir`.
fn vsock_proxy(dir: &Path) -> PathBuf {
    let link = dir.join("vsock-proxy");
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_carve"), &link).unwrap();
    }
    link
}

/// A running vsock-proxy; killed when dropped.
struct Proxy {
    child: Child,
    socket: PathBuf,
}

impl Proxy {
    /// With `hosts`, the proxy sees that file as /etc/hosts (a private mount namespace).
    fn start(carve: &Carve, allowlist: &str, args: &[&str], hosts: Option<&Path>) -> Proxy {
        let config = carve.root.join("allowlist.yaml");
        std::fs::write(&config, allowlist).unwrap();
        let proxy = vsock_proxy(&carve.root);
        let mut all = vec!["--config", config.to_str().unwrap()];
        all.extend_from_slice(args);
        let mut command = match hosts {
            Some(hosts) => {
                let script = format!("mount --bind {} /etc/hosts && exec \"$0\" \"$@\"", hosts.display());
                let mut command = carve.command(Path::new("unshare"), &["--mount", "sh", "-c", &script]);
                command.arg(&proxy).args(&all);
                command
            }
            None => carve.command(&proxy, &all),
        };
        command.env("RUST_LOG", "info").stdout(Stdio::null()).stderr(Stdio::piped());
        let child = command.spawn().unwrap();
        let socket = carve.root.join(format!("run/vsock_{}", args[args.len() - 3]));
        let deadline = Instant::now() + TIMEOUT;
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the proxy listens");
            std::thread::sleep(Duration::from_millis(20));
        }
        Proxy { child, socket }
    }

    fn connect(&self) -> UnixStream {
        let stream = UnixStream::connect(&self.socket).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream
    }

    /// Stops it; returns its log.
    fn log(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut log = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
        log
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proxy_once(carve: &Carve, allowlist: &str, args: &[&str]) -> Output {
    let config = carve.root.join("allowlist.yaml");
    std::fs::write(&config, allowlist).unwrap();
    let mut all = vec!["--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    carve.command(&vsock_proxy(&carve.root), &all).output().unwrap()
}

#[test]
fn difference_vsock_proxy_refuses_ports_past_65535() {
    let carve = Carve::new("proxy-port");
    let out = proxy_once(
        &carve,
        "allowlist:\n- {address: 127.0.0.1, port: 70979}\n",
        &["8000", "127.0.0.1", "5443"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).ends_with("Error: \"Error at checking the allowlist: No port field or invalid type\"\n")
    );
}

#[test]
fn difference_vsock_proxy_empty_allowlist_is_an_error() {
    let carve = Carve::new("proxy-empty");
    for text in ["", "# nothing allowed yet\n"] {
        let out = proxy_once(&carve, text, &["8000", "127.0.0.1", "443"]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).ends_with("Error: \"Error at checking the allowlist: No allowlist field\"\n"));
    }
}

#[test]
fn difference_hash_algorithm_is_1_5s() {
    let carve = Carve::new("hash");
    let eif = carve.demo_eif();
    let described = json(&carve.ok(&["describe-eif", "--eif-path", eif.to_str().unwrap()]));
    assert_eq!(described["Measurements"]["HashAlgorithm"], "Sha512_48 { .. }");
}

/// A fake blobs directory: build-enclave only copies and measures its files.
fn blobs(dir: &Path) -> PathBuf {
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    for (name, data) in
        [("bzImage", &common::bytes(20_000, 1)[..]), ("cmdline", b"console=ttyS0"), ("init", b"init")]
    {
        std::fs::write(blobs.join(name), data).unwrap();
    }
    blobs
}

#[test]
fn difference_docker_dir_is_refused() {
    let carve = Carve::new("docker-dir");
    let (blobs, out_file) = (blobs(&carve.root), carve.root.join("app.eif"));
    let out = carve.run(&[
        "build-enclave",
        "--docker-dir",
        carve.root.to_str().unwrap(),
        "--docker-uri",
        "app:1",
        "--blobs-dir",
        blobs.to_str().unwrap(),
        "--output-file",
        out_file.to_str().unwrap(),
    ]);
    assert_code(&out, 49, "carve builds no container images (--docker-dir)");
    assert!(!out_file.exists());
}

#[test]
fn difference_docker_uri_needs_no_daemon() {
    use common::registry::{gzip, OciLayout, Registry, LAYER_GZIP};
    let carve = Carve::new("no-daemon");
    let registry = Registry::start(&carve.root.join("registry"), None);
    let mut layout = OciLayout::new(&carve.root.join("layout"));
    let mut layer = tar::Builder::new(Vec::new());
    common::tar_add(&mut layer, "app", tar::EntryType::Regular, 0o755, b"#!/bin/sh\n", None);
    let layer = layer.into_inner().unwrap();
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/app"]}});
    let image = layout.image(&[(LAYER_GZIP, gzip(&layer))], std::slice::from_ref(&layer), config);
    layout.tag(&image, "1");
    registry.push(&layout, "1", "app:1", false);
    let (blobs, eif) = (blobs(&carve.root), carve.root.join("app.eif"));
    let uri = format!("{}/app:1", registry.address);
    let out = carve
        .command(
            Path::new(env!("CARGO_BIN_EXE_carve")),
            &["build-enclave", "--docker-uri", &uri, "--blobs-dir", blobs.to_str().unwrap()],
        )
        .args(["--output-file", eif.to_str().unwrap()])
        .env("DOCKER_HOST", format!("unix://{}", carve.root.join("no-daemon.sock").display()))
        .env("DOCKER_CONFIG", carve.root.join("docker"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(eif.exists());
}

#[test]
fn difference_kms_signing_is_refused() {
    let carve = Carve::new("kms");
    let eif = carve.demo_eif();
    let (_, cert) = common::signer(&carve.root, "signer");
    let arn = "arn:aws:kms:eu-west-1:123456789012:key/0f6c7b2e-1234-4d5e-8f90-123456789abc";
    let out = carve.run(&[
        "sign-eif",
        "--eif-path",
        eif.to_str().unwrap(),
        "--signing-certificate",
        &cert,
        "--private-key",
        arn,
    ]);
    assert_code(&out, 60, "KMS signing is not supported");
}

#[test]
fn difference_build_time_is_reproducible() {
    let carve = Carve::new("build-time");
    let kernel = carve.root.join("bzImage");
    std::fs::write(&kernel, common::bytes(20_000, 3)).unwrap();
    // (the same file name: an image is named after its file unless told otherwise)
    let build = |dir: &str| {
        std::fs::create_dir_all(carve.root.join(dir)).unwrap();
        let eif = carve.root.join(dir).join("image.eif");
        let args = ["build-enclave", "--kernel", kernel.to_str().unwrap(), "--cmdline", "console=ttyS0"];
        let out = carve
            .command(Path::new(env!("CARGO_BIN_EXE_carve")), &args)
            .args(["--ramdisk", kernel.to_str().unwrap(), "--output-file", eif.to_str().unwrap()])
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        std::fs::read(&eif).unwrap()
    };
    let first = build("one");
    std::thread::sleep(Duration::from_millis(1100));
    assert!(first == build("two"), "byte-identical");
    let one = carve.root.join("one/image.eif");
    let described = json(&carve.ok(&["describe-eif", "--eif-path", one.to_str().unwrap()]));
    assert_eq!(described["Metadata"]["BuildTime"], "2023-11-14T22:13:20.000000000+00:00");
}

#[test]
fn difference_explain_knows_every_code() {
    for code in ["E57", "E58", "E59"] {
        let out = common::carve(&["explain", "--error-code", code]);
        assert!(out.status.success());
        assert!(
            stderr(&out).starts_with(&format!("[ {code} ] ")) && stderr(&out).trim_end().ends_with('.'),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn difference_describe_shows_parent_pcrs() {
    if !kvm_usable("difference_describe_shows_parent_pcrs") {
        return;
    }
    let carve = Carve::new("parent-pcrs");
    carve.development();
    let role = "arn:aws:iam::123456789012:role/Webserver";
    let run = json(&carve.ok(&[
        "run-enclave",
        "--demo",
        "--cpu-count",
        "1",
        "--memory",
        "64",
        "--parent-role",
        role,
    ]));
    let described = json(&carve.ok(&["describe-enclaves"]));
    let measurements = &described[0]["Measurements"];
    assert_eq!(
        measurements["PCR3"],
        "78fce75db17cd4e0a3fb8dad3ad128ca5e77edbb2b2c7f75329dccd99aa5f6ef4fc1f1a452e315b9e98f9e312e6921e6"
    );
    assert!(measurements["PCR4"].as_str().is_some_and(|p| p.len() == 96), "{measurements}");
    carve.ok(&["terminate-enclave", "--enclave-id", run["EnclaveID"].as_str().unwrap()]);
}

/// carve linked as `nitro-cli` in `dir`.
fn nitro_cli(dir: &Path) -> PathBuf {
    let link = dir.join("nitro-cli");
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_carve"), &link).unwrap();
    }
    link
}

#[test]
fn difference_run_directory_is_carves() {
    let carve = Carve::new("run-dir");
    let config = carve.root.join("dev.yaml");
    std::fs::write(&config, "development: true\n").unwrap();
    // As nitro-cli without NITRO_CLI_SOCKETS_PATH: carve's run directory, not /run/nitro_enclaves.
    let link = nitro_cli(&carve.root);
    let out = carve.command(&link, &["allocator", "--config", config.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(carve.root.join("run/allocator.json").exists());
}

#[test]
fn difference_enclave_log_is_in_the_run_directory() {
    let carve = Carve::new("enclave-log");
    carve.development();
    // A launch that fails in the enclave process (the image is not there) is logged there.
    let out =
        carve.run(&["run-enclave", "--eif-path", "/nonexistent.eif", "--cpu-count", "1", "--memory", "64"]);
    assert!(!out.status.success());
    let log = std::fs::read_to_string(carve.root.join("run/enclaves.log")).unwrap();
    assert!(log.contains("launch failed: [ E"), "{log}");
}

#[test]
fn difference_error_log_holds_the_failure() {
    let carve = Carve::new("error-log");
    let logs = carve.root.join("logs");
    let out = carve
        .command(&nitro_cli(&carve.root), &["describe-eif", "--eif-path", "/nonexistent.eif"])
        .env("NITRO_CLI_LOGS_PATH", &logs)
        .output()
        .unwrap();
    assert_code(&out, 19, "/nonexistent.eif");
    let error_log = std::fs::read_dir(&logs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("err"))
        .expect("an err<time>.log");
    let text = std::fs::read_to_string(error_log).unwrap();
    assert!(text.contains("/nonexistent.eif") && text.contains("E19 (FileOperationFailure)"), "{text}");
    assert!(!text.contains("Root error file"), "{text}");
}

#[test]
fn difference_pool_cpus_stay_online() {
    let online = Path::new("/sys/devices/system/cpu/cpu1/online");
    let pages = Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages");
    if !online.exists() || std::fs::OpenOptions::new().write(true).open(pages).is_err() {
        // A pool needs CPU 1 and hugepages this user may reserve (the suite runs as root).
        assert!(!common::real_kvm_required(), "a pool can be made on the real KVM host");
        eprintln!("SKIPPED difference_pool_cpus_stay_online: no CPU 1 or hugepages to reserve");
        return;
    }
    let carve = Carve::new("pool-online");
    let config = carve.root.join("pool.yaml");
    std::fs::write(&config, "memory_mib: 2\ncpu_pool: 1\n").unwrap();
    let out = carve.run(&["allocator", "--config", config.to_str().unwrap()]);
    let still_online = std::fs::read_to_string(online).unwrap();
    carve.ok(&["allocator", "--clear"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(still_online.trim(), "1");
}

#[test]
fn difference_parent_listeners_are_unix_sockets() {
    if !kvm_usable("difference_parent_listeners_are_unix_sockets") {
        return;
    }
    let carve = Carve::new("listeners");
    carve.development();
    // One listener for every enclave's connections to parent port 8000, before any enclave.
    std::fs::create_dir_all(carve.root.join("run")).unwrap();
    let listener = UnixListener::bind(carve.root.join("run/vsock_8000")).unwrap();
    let ramdisk = carve.root.join("empty.cpio");
    std::fs::write(&ramdisk, b"").unwrap();
    let eif = carve.root.join("connect-out.eif");
    let kernel = guest("demo", Format::BzImage);
    carve.ok(&[
        "build-enclave",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 connect_out=8000",
        "--ramdisk",
        ramdisk.to_str().unwrap(),
        "--output-file",
        eif.to_str().unwrap(),
    ]);
    let serve = std::thread::spawn(move || {
        let (conn, from) = listener.accept().unwrap();
        let from = std::os::linux::net::SocketAddrExt::as_abstract_name(&from)
            .map(|n| String::from_utf8_lossy(n).into_owned());
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).unwrap();
        (&conn).write_all(b"noted\n").unwrap();
        (from, line)
    });
    let run = json(&carve.ok(&[
        "run-enclave",
        "--eif-path",
        eif.to_str().unwrap(),
        "--cpu-count",
        "1",
        "--memory",
        "64",
    ]));
    let (from, line) = serve.join().unwrap();
    assert_eq!(line, "hello from the enclave\n");
    let cid = run["EnclaveCID"].to_string();
    let from = from.unwrap_or_default();
    let fields: Vec<&str> = from.strip_prefix("carve/vsock/").unwrap_or_default().split('/').collect();
    assert_eq!(
        (fields.first(), fields.get(2), fields.get(3)),
        (Some(&cid.as_str()), Some(&"8000"), Some(&run["ProcessID"].to_string().as_str())),
        "{from}"
    );
}

/// A TCP server on 127.0.0.1 that answers each connection's request (read to its end) with
/// `answer` followed by the request.
fn answering_server(answer: &'static [u8]) -> u16 {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in server.incoming().flatten() {
            std::thread::spawn(move || {
                let mut request = Vec::new();
                let _ = (&conn).read_to_end(&mut request);
                let _ = (&conn).write_all(&[answer, &request].concat());
            });
        }
    });
    port
}

/// Sends `request`, half-closes, returns the whole answer.
fn exchange(stream: UnixStream, request: &[u8]) -> Vec<u8> {
    (&stream).write_all(request).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    let _ = (&stream).read_to_end(&mut answer);
    answer
}

#[test]
fn difference_vsock_proxy_resolves_for_each_connection() {
    let carve = Carve::new("proxy-resolve");
    let port = answering_server(b"hi ");
    // The proxy sees a hosts file of the test's (its own /etc/hosts, in a mount namespace), so
    // the test can change what the name resolves to. (Needs root, as the suite runs.)
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIPPED difference_vsock_proxy_resolves_for_each_connection: needs root for a mount namespace"
        );
        return;
    }
    let hosts = carve.root.join("hosts");
    let resolvable = "127.0.0.1 localhost enclave-remote\n";
    std::fs::write(&hosts, resolvable).unwrap();
    let allowlist = format!("allowlist:\n- {{address: enclave-remote, port: {port}}}\n");
    let proxy =
        Proxy::start(&carve, &allowlist, &["8003", "enclave-remote", &port.to_string()], Some(&hosts));
    assert_eq!(exchange(proxy.connect(), b"one"), b"hi one");
    // The name stops resolving: that connection is closed, the proxy serves on.
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    assert_eq!(exchange(proxy.connect(), b"two"), b"");
    std::fs::write(&hosts, resolvable).unwrap();
    assert_eq!(exchange(proxy.connect(), b"three"), b"hi three");
    let log = proxy.log();
    assert!(log.contains("Could not resolve enclave-remote: DNS lookup failed!"), "{log}");
}

#[test]
fn difference_vsock_proxy_unreachable_remote_closes_the_connection() {
    let carve = Carve::new("proxy-unreachable");
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let allowlist = format!("allowlist:\n- {{address: 127.0.0.1, port: {port}}}\n");
    let proxy = Proxy::start(&carve, &allowlist, &["8004", "127.0.0.1", &port.to_string()], None);
    assert_eq!(exchange(proxy.connect(), b"anyone?"), b"");
    assert_eq!(exchange(proxy.connect(), b"still?"), b"", "the proxy serves on");
    let log = proxy.log();
    assert!(
        log.contains(&format!("Could not create connection: Could not connect to 127.0.0.1:{port}")),
        "{log}"
    );
}

#[test]
fn difference_vsock_proxy_passes_a_half_close_on() {
    let carve = Carve::new("proxy-half-close");
    let port = answering_server(b"you said: ");
    let allowlist = format!("allowlist:\n- {{address: 127.0.0.1, port: {port}}}\n");
    let proxy = Proxy::start(&carve, &allowlist, &["8005", "127.0.0.1", &port.to_string()], None);
    // The server answers only once the request has ended: it sees the enclave's half-close.
    assert_eq!(exchange(proxy.connect(), b"ping"), b"you said: ping");
}

#[test]
fn difference_vsock_proxy_bind_error_names_the_socket() {
    let carve = Carve::new("proxy-bind");
    let allowlist = "allowlist:\n- {address: 127.0.0.1, port: 443}\n";
    let proxy = Proxy::start(&carve, allowlist, &["8006", "127.0.0.1", "443"], None);
    let out = proxy_once(&carve, allowlist, &["8006", "127.0.0.1", "443"]);
    assert_eq!(out.status.code(), Some(1));
    let expected = format!(
        "Error: \"Could not listen for connections: Could not bind to cid: 3 port: 8006 ({}: ",
        proxy.socket.display()
    );
    assert!(stderr(&out).lines().last().unwrap_or_default().starts_with(&expected), "{}", stderr(&out));
}

#[test]
fn difference_additions_exist() {
    for command in ["wait", "allocator", "pcr-diff", "vsock-proxy", "vm", "attestation"] {
        let out = common::carve(&[command, "--help"]);
        assert!(out.status.success(), "carve {command} --help: {}", stderr(&out));
    }
    let run = stdout(&common::carve(&["run-enclave", "--help"]));
    assert!(["--parent-role", "--parent-id", "--demo"].iter().all(|f| run.contains(f)), "{run}");
    let build = stdout(&common::carve(&["build-enclave", "--help"]));
    assert!(["--blobs-dir", "--demo"].iter().all(|f| build.contains(f)), "{build}");
}
