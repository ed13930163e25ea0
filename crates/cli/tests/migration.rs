//! Live migration between two carve processes: on loopback, and across two network namespaces
//! joined by a veth pair this test makes. The `persist` guest keeps rewriting a memory pattern
//! (each page with its own generation) and checks all of it, its clocks and its application
//! processors at every tick; the demo guest's vsock echo shows the device on both sides. Every
//! failure leaves the source running, with one line on each side.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A carve process whose standard error is collected line by line as it comes.
struct Carve {
    child: Option<Child>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Carve {
    /// `carve ARGS`, in network namespace `netns` if given.
    fn spawn(netns: Option<&str>, args: &[&str]) -> Carve {
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_carve")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_carve")),
        };
        let mut child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("carve starts");
        let (sender, lines) = channel();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (pipe, all) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                all.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = sender.send(line);
            }
        });
        Carve { child: Some(child), lines, stderr }
    }

    /// The first line of standard error containing `needle`.
    fn line_with(&self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!("no line with '{needle}'; standard error:\n{}", self.stderr())
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the end: its status and everything it printed on standard error.
    fn wait(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("carve did not end; standard error:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread sees the pipe close once the process is gone.
        std::thread::sleep(Duration::from_millis(50));
        (status, self.stderr())
    }

    /// SIGKILL: the process ends as if the host lost it.
    fn kill(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
        }
    }
}

impl Drop for Carve {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A destination: `carve vm run --incoming ADDR --serial file:… ARGS`, and the address it
/// listens on (port 0 picks one).
fn destination(netns: Option<&str>, listen: &str, serial: &Path, extra: &[&str]) -> (Carve, String) {
    let serial = format!("file:{}", serial.display());
    let mut args = vec!["vm", "run", "--incoming", listen, "--serial", &serial];
    args.extend_from_slice(extra);
    let carve = Carve::spawn(netns, &args);
    let line = carve.line_with("waiting for a VM on ");
    let address = line.rsplit(' ').next().unwrap().to_string();
    (carve, address)
}

/// The persist guest with `cmdline`, 256 MiB, its serial in `serial`, its control socket
/// `control`.
fn persist_source(
    netns: Option<&str>,
    cmdline: &str,
    serial: &Path,
    control: &Path,
    extra: &[&str],
) -> Carve {
    let kernel = guest("persist", Format::Multiboot);
    let serial = format!("file:{}", serial.display());
    let mut args = vec![
        "vm",
        "run",
        "--memory",
        "256",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--serial",
        &serial,
        "--control",
        control.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Carve::spawn(netns, &args)
}

/// `carve vm migrate … --json`, killed (status 124) if it hangs.
fn migrate(control: &Path, to: &str) -> std::process::Output {
    eprintln!("migrating to {to}");
    carve_within(TIMEOUT, &["vm", "migrate", "--control", control.to_str().unwrap(), "--to", to, "--json"])
}

fn one_line_error(out: &std::process::Output) -> String {
    let text = stderr(out);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    text
}

/// The tick numbers and gaps a serial file shows: `tick N clock_ms=… gap_ms=G …`.
fn tick_gaps(serial: &Path) -> Vec<(u64, u64)> {
    ticks(serial)
        .iter()
        .map(|t| {
            let field = |key: &str| {
                t.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            let number = t.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
            (number, field("gap_ms="))
        })
        .collect()
}

#[test]
fn a_running_vm_migrates_on_loopback_with_memory_and_clocks_intact() {
    if !kvm_usable("a_running_vm_migrates_on_loopback_with_memory_and_clocks_intact") {
        return;
    }
    let dir = fresh_dir("migrate-loopback");
    let (src_serial, dst_serial, control) =
        (dir.join("src.serial"), dir.join("dst.serial"), dir.join("control"));
    let cmdline = "ticks=40 period_ms=100 pattern_kib=1024 expect_cpus=2 churn_kib=128";
    let source = persist_source(None, cmdline, &src_serial, &control, &["--vcpus", "2"]);
    let (dest, address) = destination(
        None,
        "127.0.0.1:0",
        &dst_serial,
        // The destination keeps its own backing: shared memfd memory here.
        &["--memory", "256,backing=memfd", "--control", dir.join("dst.control").to_str().unwrap()],
    );
    wait_for_ticks(&src_serial, 3);

    let out = migrate(&control, &address);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["to"], address.as_str());
    assert_eq!(report["guest_bytes"], 256 << 20);
    // Only what the guest touched travels: a few MiB of 256.
    let sent = report["bytes_sent"].as_u64().unwrap();
    assert!(sent > 1 << 20 && sent < 32 << 20, "{report}");
    assert!(report["rounds"].as_u64().unwrap() >= 1, "{report}");
    assert!(report["downtime_us"].as_u64().unwrap() < report["total_us"].as_u64().unwrap(), "{report}");

    let (status, text) = source.wait();
    assert!(status.success(), "{text}");
    assert!(text.contains(&format!("the VM migrated to {address}")), "{text}");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", dest.pid())).unwrap();
    assert!(maps.contains("memfd:carve-guest-ram"), "the guest runs in the destination's memfd");
    let described = stdout(&carve_within(
        TIMEOUT,
        &["vm", "describe", "--control", dir.join("dst.control").to_str().unwrap()],
    ));
    assert!(described.contains("\"running\"") && described.contains("268435456"), "{described}");
    // The guest passed: its debug-exit write of 0 is status 1 (the README's "Exit status").
    let (status, text) = dest.wait();
    assert_eq!(status.code(), Some(1), "{text}\n{:?}", std::fs::read_to_string(&dst_serial));
    assert!(text.contains("the VM arrived"), "{text}");

    // The ticks go on where they stopped: one series over both serials, every page and clock
    // checked at each; the clocks ran on through the migration without a jump.
    let (before, after) = (tick_gaps(&src_serial), tick_gaps(&dst_serial));
    assert!(!after.is_empty(), "{:?}", std::fs::read_to_string(&dst_serial));
    let numbers: Vec<u64> = before.iter().chain(&after).map(|(n, _)| *n).collect();
    assert_eq!(numbers, (1..=40).collect::<Vec<_>>(), "{before:?} {after:?}");
    let longest = after.iter().map(|(_, gap)| *gap).max().unwrap();
    assert!(longest < 2000, "a tick after the migration waited {longest} ms: {after:?}");
    let dst = std::fs::read_to_string(&dst_serial).unwrap();
    assert!(dst.contains("persist: 40 ticks, all checks passed"), "{dst}");
}

/// Two network namespaces joined by a veth pair, removed (with the pair) when dropped.
struct NetnsPair {
    names: [String; 2],
    addresses: [String; 2],
}

impl NetnsPair {
    /// `rate` limits what the first namespace sends (tc's token bucket), to slow a migration.
    fn new(tag: &str, rate: Option<&str>) -> NetnsPair {
        let id = std::process::id() % 10_000;
        let names = [format!("carve-{tag}-{id}-a"), format!("carve-{tag}-{id}-b")];
        let subnet = 100 + (id % 100) + if tag == "slow" { 100 } else { 0 };
        let addresses = [format!("10.{}.0.1", subnet % 250), format!("10.{}.0.2", subnet % 250)];
        let pair = NetnsPair { names, addresses };
        let (a, b) = (&pair.names[0], &pair.names[1]);
        let veth = (format!("cv{id}{}a", &tag[..1]), format!("cv{id}{}b", &tag[..1]));
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip runs (iproute2)");
            assert!(out.status.success(), "ip {args:?}: {}", stderr(&out));
        };
        ip(&["netns", "add", a]);
        ip(&["netns", "add", b]);
        ip(&["link", "add", &veth.0, "type", "veth", "peer", "name", &veth.1]);
        ip(&["link", "set", &veth.0, "netns", a]);
        ip(&["link", "set", &veth.1, "netns", b]);
        for (ns, dev, addr) in [(a, &veth.0, &pair.addresses[0]), (b, &veth.1, &pair.addresses[1])] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        if let Some(rate) = rate {
            let out = Command::new("ip")
                .args(["netns", "exec", a, "tc", "qdisc", "add", "dev", &veth.0, "root", "tbf", "rate", rate])
                .args(["burst", "16kb", "latency", "2s"])
                .output()
                .expect("tc runs");
            assert!(out.status.success(), "tc: {}", stderr(&out));
        }
        pair
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn echo(uds: &Path, text: &[u8]) -> std::os::unix::net::UnixStream {
    let (mut stream, _) = connect_guest(uds, 5005).expect("the demo serves echo on port 5005");
    stream.write_all(text).unwrap();
    let mut back = vec![0u8; text.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, text);
    stream
}

/// Across a real network hop: the demo guest's vsock echo before, reset at and after the
/// migration; then the persist guest's checked pattern and clocks.
#[test]
fn a_vm_migrates_across_a_veth_pair_between_network_namespaces() {
    if !kvm_usable("a_vm_migrates_across_a_veth_pair_between_network_namespaces") {
        return;
    }
    let dir = fresh_dir("migrate-netns");
    let pair = NetnsPair::new("veth", None);
    let (src_uds, dst_uds, control) = (dir.join("src.sock"), dir.join("dst.sock"), dir.join("control"));
    let source = Carve::spawn(
        Some(&pair.names[0]),
        &[
            "vm",
            "run",
            "--demo",
            "--memory",
            "256",
            "--serial",
            &format!("file:{}", dir.join("src.serial").display()),
            "--vsock",
            &format!("cid=41,uds={}", src_uds.display()),
            "--control",
            control.to_str().unwrap(),
        ],
    );
    // An echo session open at the migration, and one before it that ended.
    drop(echo(&src_uds, b"before the migration"));
    let mut open = echo(&src_uds, b"open across the migration");

    let listen = format!("{}:7300", pair.addresses[1]);
    let (dest, address) = destination(
        Some(&pair.names[1]),
        &listen,
        &dir.join("dst.serial"),
        &["--vsock", &format!("cid=41,uds={}", dst_uds.display())],
    );
    let out = migrate(&control, &address);
    assert!(out.status.success(), "{}", stderr(&out));
    let (status, text) = source.wait();
    assert!(status.success(), "{text}");

    // The open connection was reset, as on a restore; a new one reaches the guest, which runs
    // on the other side of the veth pair now.
    let mut byte = [0u8; 1];
    let _ = open.write_all(b"x");
    assert!(matches!(open.read(&mut byte), Ok(0) | Err(_)), "the connection open at the migration was reset");
    drop(echo(&dst_uds, b"after the migration"));
    let _ = connect_guest(&dst_uds, 5007);
    let (status, text) = dest.wait();
    assert_eq!(status.code(), Some(0), "{text}\n{:?}", std::fs::read_to_string(dir.join("dst.serial")));

    // Across the same hop, the persist guest rewriting and checking its pattern, with two vCPUs:
    // the ticks go on at the destination where they stopped, every page as last written.
    let (src_serial, dst_serial, control) = (dir.join("p.src"), dir.join("p.dst"), dir.join("p.control"));
    let cmdline = "ticks=20 period_ms=100 pattern_kib=1024 expect_cpus=2 churn_kib=256";
    let source = persist_source(Some(&pair.names[0]), cmdline, &src_serial, &control, &["--vcpus", "2"]);
    let listen = format!("{}:7303", pair.addresses[1]);
    let (dest, address) = destination(Some(&pair.names[1]), &listen, &dst_serial, &[]);
    wait_for_ticks(&src_serial, 3);
    let out = migrate(&control, &address);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(source.wait().0.success());
    let (status, text) = dest.wait();
    assert_eq!(status.code(), Some(1), "{text}\n{:?}", std::fs::read_to_string(&dst_serial));
    let numbers: Vec<u64> =
        tick_gaps(&src_serial).iter().chain(&tick_gaps(&dst_serial)).map(|(n, _)| *n).collect();
    assert_eq!(numbers, (1..=20).collect::<Vec<_>>());
    drop(pair);
}

#[test]
fn a_failed_migration_leaves_the_source_running_with_one_line_each_side() {
    if !kvm_usable("a_failed_migration_leaves_the_source_running_with_one_line_each_side") {
        return;
    }
    let dir = fresh_dir("migrate-bad");
    let (serial, control) = (dir.join("src.serial"), dir.join("control"));
    let source = persist_source(None, "ticks=100000 period_ms=100 pattern_kib=256", &serial, &control, &[]);
    wait_for_ticks(&serial, 2);
    let runs_on = |what: &str| {
        eprintln!("after {what}: does the source run on?");
        let seen = ticks(&serial).len();
        wait_for_ticks(&serial, seen + 2);
        let description =
            stdout(&carve_within(TIMEOUT, &["vm", "describe", "--control", control.to_str().unwrap()]));
        assert!(
            description.contains("\"running\"") && !description.contains("migration"),
            "{what}: {description}"
        );
    };

    // Nobody listening.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let text = one_line_error(&migrate(&control, &closed));
    assert!(
        text.contains(&format!("the migration to {closed} failed: cannot reach the destination")),
        "{text}"
    );
    runs_on("destination not listening");

    // A destination started for another memory size.
    let (dest, address) = destination(None, "127.0.0.1:0", &dir.join("d1"), &["--memory", "128"]);
    let text = one_line_error(&migrate(&control, &address));
    assert!(
        text.contains("the VM has 256 MiB of memory; this destination was started with --memory 128"),
        "{text}"
    );
    let (status, dest_text) = dest.wait();
    assert_eq!(status.code(), Some(4));
    assert_eq!(dest_text.lines().filter(|l| l.contains("error")).count(), 1, "{dest_text}");
    assert!(dest_text.contains("refused the VM"), "{dest_text}");
    runs_on("memory size mismatch");

    // A destination without a CPU feature the guest uses (every x86 guest has an FPU).
    let template = dir.join("no-fpu.json");
    std::fs::write(
        &template,
        r#"{"name":"no-fpu","description":"a host without x87","remove_leaves":[],
            "clear_bits":[{"leaf":"0x1","register":"edx","bit":0,"feature":"FPU"}]}"#,
    )
    .unwrap();
    let (dest, address) =
        destination(None, "127.0.0.1:0", &dir.join("d2"), &["--cpu-template", template.to_str().unwrap()]);
    let text = one_line_error(&migrate(&control, &address));
    assert!(
        text.contains("the guest uses what this destination with CPU template no-fpu does not offer"),
        "{text}"
    );
    assert!(text.contains("CPUID 1 EDX bit 0 (fpu)"), "{text}");
    assert_eq!(dest.wait().0.code(), Some(4));
    runs_on("missing CPU feature");

    // A destination that answers garbage.
    let liar = TcpListener::bind("127.0.0.1:0").unwrap();
    let liar_address = liar.local_addr().unwrap().to_string();
    liar.set_nonblocking(true).unwrap();
    let answer = std::thread::spawn(move || {
        let start = Instant::now();
        let mut stream = loop {
            match liar.accept() {
                Ok((stream, _)) => break stream,
                Err(_) if start.elapsed() < TIMEOUT => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("the source never connected: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        let mut preamble = [0u8; 16];
        stream.read_exact(&mut preamble).unwrap();
        stream.write_all(&[0x5a; 64]).unwrap();
        preamble
    });
    let text = one_line_error(&migrate(&control, &liar_address));
    assert!(text.contains("the stream is corrupted"), "{text}");
    assert_eq!(&answer.join().unwrap()[..12], b"CARVE-MIGRAT");
    runs_on("corrupted answer");

    // Source-side bad input is refused before anything starts.
    let text = one_line_error(&migrate(&control, "no-port-here"));
    assert!(text.contains("expected HOST:PORT"), "{text}");

    let out = carve_within(Duration::from_secs(30), &["vm", "pause", "--control", control.to_str().unwrap()]);
    assert!(out.status.success());
    let text = one_line_error(&migrate(&control, &closed));
    assert!(text.contains("the VM is paused; resume it before migrating it"), "{text}");
    assert!(carve(&["vm", "resume", "--control", control.to_str().unwrap()]).status.success());
    runs_on("paused");

    let source_text = source.stderr();
    assert_eq!(source_text.lines().filter(|l| l.contains("failed")).count(), 4, "{source_text}");
    assert!(
        source_text.lines().all(|l| !l.contains("failed") || l.ends_with("the VM runs on here")),
        "{source_text}"
    );
}

/// A corrupted or foreign stream reaching a destination ends it with one line; nothing is left
/// listening.
#[test]
fn a_destination_refuses_corrupted_and_foreign_streams() {
    if !kvm_usable("a_destination_refuses_corrupted_and_foreign_streams") {
        return;
    }
    let dir = fresh_dir("migrate-corrupt");
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("not carve", b"GET / HTTP/1.1\r\n\r\n".to_vec(), "not a carve migration"),
        ("newer", [&b"CARVE-MIGRAT"[..], &2u32.to_le_bytes()].concat(), "protocol version 2"),
        (
            "bad checksum",
            [&b"CARVE-MIGRAT"[..], &1u32.to_le_bytes(), &[1, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0], b"junk"]
                .concat(),
            "checksum does not match",
        ),
    ];
    for (name, bytes, expected) in cases {
        let (dest, address) = destination(None, "127.0.0.1:0", &dir.join(name), &[]);
        let mut stream = std::net::TcpStream::connect(&address).unwrap();
        stream.write_all(&bytes).unwrap();
        let (status, text) = dest.wait();
        assert_eq!(status.code(), Some(4), "{name}: {text}");
        let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("carve: error")).collect();
        assert_eq!(errors.len(), 1, "{name}: {text}");
        assert!(errors[0].contains(expected), "{name}: {text}");
        assert!(std::net::TcpStream::connect(&address).is_err(), "{name}: still listening");
    }
}

/// Over a slow link, a migration takes seconds: a second one is refused meanwhile, killing the
/// destination mid-stream leaves the source running, and killing the source mid-stream ends the
/// destination with one line.
#[test]
fn a_connection_cut_mid_stream_by_either_side_is_survived() {
    if !kvm_usable("a_connection_cut_mid_stream_by_either_side_is_survived") {
        return;
    }
    let dir = fresh_dir("migrate-cut");
    let pair = NetnsPair::new("slow", Some("2mbit"));
    let (serial, control) = (dir.join("src.serial"), dir.join("control"));
    let mut source = persist_source(
        Some(&pair.names[0]),
        "ticks=100000 period_ms=100 pattern_kib=2048",
        &serial,
        &control,
        &[],
    );
    wait_for_ticks(&serial, 2);
    let migrating = |to: &str| -> Vm {
        let client = Vm(Some(
            Command::new(env!("CARGO_BIN_EXE_carve"))
                .args(["vm", "migrate", "--control", control.to_str().unwrap(), "--to", to])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ));
        let start = Instant::now();
        loop {
            let description =
                stdout(&carve_within(TIMEOUT, &["vm", "describe", "--control", control.to_str().unwrap()]));
            // Sending memory: past the offer, the destination has accepted.
            let described: serde_json::Value = serde_json::from_str(&description).unwrap_or_default();
            let migration = &described["migration"];
            if migration["to"] == to && migration["round"].as_u64() > Some(0) {
                break client;
            }
            assert!(start.elapsed() < TIMEOUT, "the migration did not start: {description}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // The destination dies mid-stream.
    let (mut dest, address) =
        destination(Some(&pair.names[1]), &format!("{}:7301", pair.addresses[1]), &dir.join("d1"), &[]);
    let client = migrating(&address);
    let text = one_line_error(&migrate(&control, &address));
    assert!(text.contains(&format!("a migration to {address} is already under way")), "{text}");
    let sample = carve(&["vm", "describe", "--control", control.to_str().unwrap(), "--sample-ms", "100"]);
    assert!(one_line_error(&sample).contains("the dirty log is in use"));
    std::thread::sleep(Duration::from_millis(500));
    dest.kill();
    let out = client.wait();
    let text = one_line_error(&out);
    assert!(text.contains(&format!("the migration to {address} failed: the connection failed")), "{text}");
    let seen = ticks(&serial).len();
    wait_for_ticks(&serial, seen + 2);
    assert!(source.stderr().contains("the VM runs on here"), "{}", source.stderr());

    // The source dies mid-stream.
    let (dest, address) =
        destination(Some(&pair.names[1]), &format!("{}:7302", pair.addresses[1]), &dir.join("d2"), &[]);
    let _client = migrating(&address);
    std::thread::sleep(Duration::from_millis(500));
    source.kill();
    let (status, text) = dest.wait();
    assert_eq!(status.code(), Some(4), "{text}");
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("carve: error")).collect();
    assert_eq!(errors.len(), 1, "{text}");
    assert!(errors[0].contains("the migration from") && errors[0].contains("failed"), "{text}");
    drop(pair);
}

/// `describe --sample-ms` watches the guest's memory: the pages the churning guest rewrites show
/// as dirty, a paused guest dirties none, and the working set names how it was measured.
#[test]
fn describe_samples_the_dirty_rate_and_the_working_set() {
    if !kvm_usable("describe_samples_the_dirty_rate_and_the_working_set") {
        return;
    }
    let dir = fresh_dir("migrate-sample");
    let (serial, control) = (dir.join("src.serial"), dir.join("control"));
    // 64 pages rewritten per tick.
    let source = persist_source(
        None,
        "ticks=100000 period_ms=100 pattern_kib=1024 churn_kib=256",
        &serial,
        &control,
        &[],
    );
    wait_for_ticks(&serial, 2);
    let control = control.to_str().unwrap();
    let sample = |ms: &str| -> serde_json::Value {
        let out = carve(&["vm", "describe", "--control", control, "--sample-ms", ms]);
        assert!(out.status.success(), "{}", stderr(&out));
        let description: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        description["memory"].clone()
    };

    let at = ticks(&serial).len();
    let running = sample("1500");
    let ticked = ticks(&serial).len() - at;
    assert!(ticked >= 1, "the guest ticked during the sample");
    // The dirty log is a set: a page rewritten twice in the window counts once, so at most the
    // pattern's 256 pages.
    let dirty = running["dirty_pages"].as_u64().unwrap();
    let expected = (64 * (ticked as u64 - 1)).min(256);
    assert!(dirty >= expected, "{ticked} ticks of 64 pages: {running}");
    eprintln!(
        "working set by {} (/sys/kernel/mm/page_idle {})",
        running["working_set_method"],
        if Path::new("/sys/kernel/mm/page_idle").exists() { "exists" } else { "absent" }
    );
    assert!(dirty < 2048, "the guest rewrites 256 KiB per tick, no more: {running}");
    assert!(running["window_ms"].as_u64().unwrap() >= 1500, "{running}");
    assert!(running["dirty_bytes_per_s"].as_u64().unwrap() > 0, "{running}");
    assert!(running["dirty_method"].as_str().unwrap().starts_with("kvm-dirty-log"), "{running}");
    match running["working_set_method"].as_str().unwrap() {
        "dirty-log" => assert_eq!(running["working_set_pages"], running["dirty_pages"], "{running}"),
        "idle-page-tracking" => assert!(running["working_set_pages"].as_u64().unwrap() >= dirty, "{running}"),
        other => panic!("unknown method {other}: {running}"),
    }

    assert!(carve(&["vm", "pause", "--control", control]).status.success());
    let paused = sample("300");
    assert_eq!(paused["dirty_pages"], 0, "a paused guest writes nothing: {paused}");
    assert!(carve(&["vm", "resume", "--control", control]).status.success());

    let text = one_line_error(&carve(&["vm", "describe", "--control", control, "--sample-ms", "60000"]));
    assert!(text.contains("longer than the 10000 ms allowed"), "{text}");
    drop(source);
}

/// A destination that fails only when it restores the VM, after every page arrived (here: the
/// vsock socket it would take over is still the source's), hands it back: the source resumes,
/// serves as before, and a second migration to a destination with its own socket goes through.
#[test]
fn a_vm_refused_at_its_restore_runs_on_and_migrates_on_a_second_try() {
    if !kvm_usable("a_vm_refused_at_its_restore_runs_on_and_migrates_on_a_second_try") {
        return;
    }
    let dir = fresh_dir("migrate-retry");
    let (uds, other, control) = (dir.join("v.sock"), dir.join("w.sock"), dir.join("control"));
    let vsock = format!("cid=43,uds={}", uds.display());
    let source = Carve::spawn(
        None,
        &[
            "vm",
            "run",
            "--demo",
            "--serial",
            "none",
            "--vsock",
            &vsock,
            "--control",
            control.to_str().unwrap(),
        ],
    );
    drop(echo(&uds, b"first"));

    let (dest, address) = destination(None, "127.0.0.1:0", &dir.join("d1"), &[]);
    let text = one_line_error(&migrate(&control, &address));
    assert!(text.contains("could not start the VM") && text.contains("Address already in use"), "{text}");
    let (status, dest_text) = dest.wait();
    assert_eq!(status.code(), Some(4), "{dest_text}");
    drop(echo(&uds, b"the source runs on"));

    let vsock = format!("cid=43,uds={}", other.display());
    let (dest, address) = destination(None, "127.0.0.1:0", &dir.join("d2"), &["--vsock", &vsock]);
    let out = migrate(&control, &address);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(source.wait().0.success());
    drop(echo(&other, b"moved"));
    let _ = connect_guest(&other, 5007);
    let (status, text) = dest.wait();
    assert_eq!(status.code(), Some(0), "{text}");
}

/// A destination that takes every page and the VM's state, then vanishes without answering: the
/// VM may run there now, so the source must not run it too. It stays paused, says so, and
/// resumes only when asked.
#[test]
fn a_lost_answer_after_the_state_left_keeps_the_source_paused() {
    if !kvm_usable("a_lost_answer_after_the_state_left_keeps_the_source_paused") {
        return;
    }
    let dir = fresh_dir("migrate-lost");
    let (serial, control) = (dir.join("src.serial"), dir.join("control"));
    let source = persist_source(None, "ticks=100000 period_ms=100 pattern_kib=256", &serial, &control, &[]);
    wait_for_ticks(&serial, 2);

    // Speaks the protocol as far as the state (frame header: kind, 3 zero bytes, length, CRC-32).
    let vanishing = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = vanishing.local_addr().unwrap().to_string();
    let destination = std::thread::spawn(move || {
        let (mut stream, _) = vanishing.accept().unwrap();
        let mut preamble = [0u8; 16];
        stream.read_exact(&mut preamble).unwrap();
        let mut kinds = Vec::new();
        loop {
            let mut header = [0u8; 12];
            stream.read_exact(&mut header).unwrap();
            let mut payload = vec![0u8; u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize];
            stream.read_exact(&mut payload).unwrap();
            kinds.push(header[0]);
            match header[0] {
                1 => stream.write_all(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap(), // Offer → Accept
                5 => return kinds,                                                     // State: gone
                _ => {}
            }
        }
    });
    let text = one_line_error(&migrate(&control, &address));
    let kinds = destination.join().unwrap();
    assert_eq!((kinds[0], kinds.last()), (1, Some(&5)), "offer, pages, state: {kinds:?}");
    assert!(text.contains("so it may run at the destination: it stays paused here"), "{text}");
    let control = control.to_str().unwrap();
    let described = stdout(&carve_within(TIMEOUT, &["vm", "describe", "--control", control]));
    assert!(described.contains("\"paused\""), "{described}");
    let at = ticks(&serial).len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ticks(&serial).len(), at, "the source did not run on by itself");
    assert!(source.stderr().contains("the VM stays paused here"), "{}", source.stderr());

    assert!(carve(&["vm", "resume", "--control", control]).status.success());
    wait_for_ticks(&serial, at + 2);
}
