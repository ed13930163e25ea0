//! The enclave lifecycle end to end on /dev/kvm: run-enclave / describe-enclaves / console /
//! terminate-enclave / wait, the CPU pool and hugepages, the heartbeat, recovery after an
//! enclave process is killed, nitro-cli's E-codes, and leak-free launch/terminate cycles.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{fresh_dir, guest, kvm_usable, real_kvm_required, stderr, stdout, Format};
use serde_json::Value;

/// One isolated carve host: its own run and state directories.
struct Host {
    run_dir: PathBuf,
    state_dir: PathBuf,
}

impl Host {
    fn new(name: &str) -> Host {
        let root = fresh_dir(&format!("enclaves-{name}"));
        Host { run_dir: root.join("run"), state_dir: root.join("state") }
    }

    fn command(&self, program: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(program);
        command.args(args).env("CARVE_RUN_DIR", &self.run_dir).env("CARVE_STATE_DIR", &self.state_dir);
        // As nitro-cli, carve would log under /var/log and look for sockets where these say.
        command
            .env("NITRO_CLI_LOGS_PATH", self.run_dir.with_file_name("nitro-logs"))
            .env_remove("NITRO_CLI_SOCKETS_PATH");
        command
    }

    fn carve(&self, args: &[&str]) -> Output {
        self.command(Path::new(env!("CARGO_BIN_EXE_carve")), args).output().expect("carve runs")
    }

    fn development(&self) {
        let config = self.run_dir.with_file_name("dev.yaml");
        std::fs::write(&config, "development: true\n").unwrap();
        let out = self.carve(&["allocator", "--config", config.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
    }

    /// run-enclave; returns its JSON.
    fn run(&self, args: &[&str]) -> Value {
        let mut all = vec!["run-enclave"];
        all.extend_from_slice(args);
        let out = self.carve(&all);
        assert!(out.status.success(), "run-enclave {args:?}: {}{}", stdout(&out), stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn describe(&self) -> Vec<Value> {
        let out = self.carve(&["describe-enclaves"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
    }

    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.run_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Waits until no enclave is listed (an enclave that ended on its own).
    /// Waits until no enclave is described and every enclave process has given back its claim
    /// and sockets (a process stops answering before it has taken its VM down).
    fn wait_until_empty(&self) {
        let deadline = Instant::now() + common::TIMEOUT;
        let held = |f: &String| f.contains(".vsock") || (f.ends_with(".lock") && f != "carve.lock");
        while !self.describe().is_empty() || self.files().iter().any(held) {
            assert!(Instant::now() < deadline, "the enclave did not end");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.carve(&["terminate-enclave", "--all"]);
    }
}

fn status(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// Asserts a nitro-cli failure: `[ Exx ]` first on stderr, exit status xx.
fn assert_fails(out: &Output, code: i32, says: &str) {
    let err = stderr(out);
    assert_eq!(status(out), code, "expected E{code:02}: {err}");
    assert!(err.contains(&format!("[ E{code:02} ]")) && err.contains(says), "{err}");
}

/// The keys of a JSON object in the order the text has them.
fn key_order(json: &str) -> Vec<String> {
    json.lines()
        .filter(|l| l.starts_with("  \"") || l.starts_with("    \""))
        .filter(|l| !l.trim_start().starts_with("\"PCR") && !l.trim_start().starts_with("\"HashAlgorithm"))
        .map(|l| l.trim().split('"').nth(1).unwrap().to_string())
        .collect()
}

fn talk(vsock: &Path, port: u32, send: &[u8]) -> Vec<u8> {
    let mut stream = UnixStream::connect(vsock).unwrap();
    stream.set_read_timeout(Some(common::TIMEOUT)).unwrap();
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8];
    while byte[0] != b'\n' {
        stream.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    assert!(line.starts_with(b"OK "), "{}", String::from_utf8_lossy(&line));
    stream.write_all(send).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    reply
}

#[test]
fn launch_describe_console_terminate_in_development_mode() {
    if !kvm_usable("launch_describe_console_terminate_in_development_mode") {
        return;
    }
    let host = Host::new("lifecycle");
    host.development();
    let out = host.carve(&["run-enclave", "--demo", "--cpu-count", "1", "--memory", "64", "--debug-mode"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "Start allocating memory...\nStarted enclave with enclave-cid: 16, memory: 64 MiB, cpu-ids: []\n"
    );
    let text = stdout(&out);
    assert_eq!(
        key_order(&text),
        ["EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs", "CPUIDs", "MemoryMiB"]
    );
    let first: Value = serde_json::from_str(&text).unwrap();
    let id = first["EnclaveID"].as_str().unwrap().to_string();
    assert!(id.starts_with("i-") && id.contains("-enc"), "{id}");
    assert_eq!(first["EnclaveName"], "demo");
    assert_eq!(first["MemoryMiB"], 64);

    // A second enclave: same image, so its name is de-duplicated; its own CID.
    // Development mode is bounded by the host's RAM; names must not be empty.
    let out = host.carve(&["run-enclave", "--demo", "--cpu-count", "1", "--memory", "10T"]);
    assert_fails(&out, 27, "the host has");
    let out =
        host.carve(&["run-enclave", "--demo", "--cpu-count", "1", "--memory", "64", "--enclave-name", ""]);
    assert_fails(&out, 3, "`enclave-name` must not be empty");
    let out = host.carve(&["run-enclave", "--demo", "--cpu-count", "1", "--memory", "64", "--parent-id", ""]);
    assert_fails(&out, 3, "`parent-id` must be 1 to 2048 bytes long");
    let second = host.run(&["--demo", "--cpu-count", "1", "--memory", "64"]);
    assert_eq!(second["EnclaveName"], "demo_1");
    assert_eq!(second["EnclaveCID"], 17);

    let out = host.carve(&["describe-enclaves"]);
    let described: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(described.len(), 2);
    // Unless told otherwise, PCR4 measures this host's ID, as EC2's the instance ID that also
    // begins its enclave IDs (sha384sum over 48 zero bytes and the ID is AWS's recipe); no
    // role, no PCR3.
    let host_id = id.rsplit_once("-enc").unwrap().0;
    let recipe = format!("{{ head -c 48 /dev/zero; printf %s '{host_id}'; }} | sha384sum");
    let sum = Command::new("sh").args(["-c", &recipe]).output().unwrap();
    let expected = stdout(&sum).split_whitespace().next().unwrap().to_string();
    assert_eq!(described[0]["Measurements"]["PCR4"], expected.as_str());
    assert!(described[0]["Measurements"].get("PCR3").is_none());
    let first_text = stdout(&out);
    assert_eq!(
        key_order(&first_text)[..12],
        [
            "EnclaveName",
            "EnclaveID",
            "ProcessID",
            "EnclaveCID",
            "NumberOfCPUs",
            "CPUIDs",
            "MemoryMiB",
            "State",
            "Flags",
            "Measurements",
            "DevelopmentMode",
            "EnclaveName"
        ]
    );
    let mine = described.iter().find(|d| d["EnclaveID"] == id.as_str()).unwrap();
    assert_eq!(mine["State"], "RUNNING");
    assert_eq!(mine["Flags"], "DEBUG_MODE");
    assert_eq!(mine["ProcessID"], first["ProcessID"]);
    let built = host.carve(&[
        "build-enclave",
        "--demo",
        "--output-file",
        host.run_dir.join("demo.eif").to_str().unwrap(),
    ]);
    let built: Value = serde_json::from_slice(&built.stdout).unwrap();
    let mut image_measurements = mine["Measurements"].clone();
    image_measurements.as_object_mut().unwrap().remove("PCR4");
    assert_eq!(image_measurements, built["Measurements"], "the image's, besides the parent's PCR4");
    std::fs::remove_file(host.run_dir.join("demo.eif")).unwrap();
    let other = described.iter().find(|d| d["EnclaveName"] == "demo_1").unwrap();
    assert_eq!(other["Flags"], "NONE");

    // An enclave's control socket refuses the VM controls: a Nitro enclave cannot be paused or
    // snapshotted, and a restored copy would repeat its secrets and nonces.
    let sockets: Vec<PathBuf> = std::fs::read_dir(&host.run_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sock"))
        .collect();
    assert_eq!(sockets.len(), 2, "{sockets:?}");
    let control = sockets[0].to_str().unwrap();
    assert_fails(
        &host.carve(&["vm", "pause", "--control", control]),
        38,
        "An enclave cannot be paused or resumed",
    );
    let to = host.run_dir.join("copy");
    assert_fails(
        &host.carve(&["vm", "snapshot", "--control", control, "--to", to.to_str().unwrap()]),
        38,
        "a restored copy would repeat the enclave's secrets and nonces",
    );
    assert!(!to.exists(), "nothing was written");
    assert_fails(
        &host.carve(&["vm", "migrate", "--control", control, "--to", "127.0.0.1:9"]),
        38,
        "An enclave cannot be migrated",
    );

    // An enclave process that does not answer: the others are described, then E39.
    let stopped = other["ProcessID"].to_string();
    let signal =
        |name: &str| assert!(Command::new("kill").args([name, &stopped]).status().unwrap().success());
    signal("-STOP");
    let out = host.carve(&["describe-enclaves"]);
    signal("-CONT");
    assert_fails(&out, 39, "did not answer");
    assert!(stderr(&out).starts_with("Failed connections: 1\n"), "{}", stderr(&out));
    let answered: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answered.len(), 1);
    assert_eq!(answered[0]["EnclaveID"], id.as_str());

    // The console replays what the enclave printed, including its heartbeat.
    let out = host.carve(&["console", "--enclave-id", &id, "--disconnect-timeout", "1"]);
    let console = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(console.starts_with(
        "Connecting to the console for enclave 16...\nSuccessfully connected to the console.\n"
    ));
    assert!(console.contains("Hello from the carve demo guest!"), "{console}");
    assert!(console.contains("heartbeat:     acknowledged by the parent"), "{console}");
    assert_fails(&host.carve(&["console", "--enclave-name", "demo_1"]), 44, "debug flag");

    // The parent reaches the enclave over its vsock socket.
    let vsock = host.run_dir.join(format!("{id}.vsock"));
    assert_eq!(talk(&vsock, 5005, b"through the enclave"), b"through the enclave");

    // `wait` returns when the enclave ends; terminate says so as nitro-cli does.
    let waiter = {
        let mut command =
            host.command(Path::new(env!("CARGO_BIN_EXE_carve")), &["wait", "--enclave-name", "demo"]);
        command.stdout(std::process::Stdio::piped()).spawn().unwrap()
    };
    std::thread::sleep(Duration::from_millis(200));
    let out = host.carve(&["terminate-enclave", "--enclave-id", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), format!("Successfully terminated enclave {id}.\n"));
    let terminated: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(terminated, serde_json::json!({"EnclaveName": "demo", "EnclaveID": id, "Terminated": true}));
    let waited = waiter.wait_with_output().unwrap();
    assert_eq!(stdout(&waited), format!("Enclave {id} ended: terminated on request\n"));

    // The other enclave stops itself when told (port 5007): its process cleans up alone.
    let other_id = other["EnclaveID"].as_str().unwrap();
    talk(&host.run_dir.join(format!("{other_id}.vsock")), 5007, b"");
    host.wait_until_empty();
    assert_eq!(host.files(), ["allocator.json", "carve.lock", "enclaves.log"]);
    // `wait` for an enclave that has ended answers from the log, as `docker wait` does; by
    // name (names are used again) it is E58.
    let waited = host.carve(&["wait", "--enclave-id", other_id]);
    assert!(waited.status.success(), "{}", stderr(&waited));
    assert!(stdout(&waited).starts_with(&format!("Enclave {other_id} ended: ")), "{}", stdout(&waited));
    let waited = host.carve(&["wait", "--enclave-id", &id]);
    assert_eq!(stdout(&waited), format!("Enclave {id} ended: terminated on request\n"));
    assert_fails(&host.carve(&["wait", "--enclave-name", "demo"]), 58, "No enclave named 'demo'");
}

fn build_eif(host: &Host, guest_name: &str, cmdline: &str) -> PathBuf {
    let ramdisk = host.run_dir.with_file_name("empty.cpio");
    std::fs::write(&ramdisk, b"").unwrap();
    let eif = host.run_dir.with_file_name(format!("{guest_name}.eif"));
    let out = host.carve(&[
        "build-enclave",
        "--kernel",
        guest(guest_name, Format::BzImage).to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--ramdisk",
        ramdisk.to_str().unwrap(),
        "--output-file",
        eif.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    eif
}

#[test]
fn no_heartbeat_is_e36_and_nothing_is_left() {
    if !kvm_usable("no_heartbeat_is_e36_and_nothing_is_left") {
        return;
    }
    let host = Host::new("heartbeat");
    host.development();
    let hang = build_eif(&host, "exit", "console=ttyS0 mode=hang");
    let started = Instant::now();
    let out = host
        .command(
            Path::new(env!("CARGO_BIN_EXE_carve")),
            &["run-enclave", "--eif-path", hang.to_str().unwrap(), "--cpu-count", "1", "--memory", "64"],
        )
        .env("CARVE_HEARTBEAT_TIMEOUT", "2")
        .output()
        .unwrap();
    assert_fails(&out, 36, "no heartbeat within 2s");
    assert!(
        !stderr(&out).contains("terminated"),
        "carve's own stop is not the enclave's reason: {}",
        stderr(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(host.describe().is_empty());
    assert_eq!(host.files(), ["allocator.json", "carve.lock", "enclaves.log"]);

    // An image that crashes at once fails as soon as it stops, not at the timeout.
    let crash = build_eif(&host, "exit", "console=ttyS0 mode=triple");
    let started = Instant::now();
    let out = host.carve(&[
        "run-enclave",
        "--eif-path",
        crash.to_str().unwrap(),
        "--cpu-count",
        "1",
        "--memory",
        "64",
    ]);
    assert_fails(&out, 36, "stopped before it sent its heartbeat");
    assert!(stderr(&out).contains("triple-faulted"), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(host.files(), ["allocator.json", "carve.lock", "enclaves.log"]);
}

#[test]
fn a_killed_enclave_process_leaves_nothing_that_breaks_the_next_command() {
    if !kvm_usable("a_killed_enclave_process_leaves_nothing_that_breaks_the_next_command") {
        return;
    }
    let host = Host::new("sigkill");
    host.development();
    let first = host.run(&["--demo", "--cpu-count", "1", "--memory", "64", "--enclave-cid", "20"]);
    let pid = first["ProcessID"].as_i64().unwrap().to_string();
    // An idle enclave sleeps between requests: well under half a core (a polling one uses all).
    let cpu_ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let before = cpu_ticks();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks() - before;
    assert!(used < 100, "an idle enclave used {used} of 200 CPU ticks in 2 s");
    assert!(Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
    // Dead once gone or a zombie whose every thread has exited (only then are its files, and
    // with them its record's lock, let go).
    let deadline = Instant::now() + common::TIMEOUT;
    let dead = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.is_empty() || (stat.contains(") Z") && count_entries(&format!("/proc/{pid}/task")) <= 1)
    };
    while !dead() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(host.describe().is_empty(), "a dead enclave is not listed");
    assert_eq!(host.files(), ["allocator.json", "carve.lock", "enclaves.log"], "its files are cleaned");
    // Its name and CID are free again.
    let again = host.run(&["--demo", "--cpu-count", "1", "--memory", "64", "--enclave-cid", "20"]);
    assert_eq!(again["EnclaveName"], "demo");
    assert_eq!(again["EnclaveCID"], 20);
}

#[test]
fn bad_input_gets_nitro_cli_codes() {
    let host = Host::new("bad-input");
    let run = |args: &[&str]| {
        let mut all = vec!["run-enclave"];
        all.extend_from_slice(args);
        host.carve(&all)
    };
    let eif = host.run_dir.with_file_name("missing.eif");
    let eif = eif.to_str().unwrap();
    assert_fails(
        &run(&["--eif-path", eif, "--cpu-count", "1", "--memory", "64Q"]),
        3,
        "valid size indicator",
    );
    assert_fails(
        &run(&["--eif-path", eif, "--cpu-count", "1", "--memory", "lots"]),
        3,
        "does not contain a number",
    );
    assert_fails(
        &run(&["--eif-path", eif, "--cpu-count", "one", "--memory", "64"]),
        3,
        "`cpu-count` is not a number",
    );
    assert_fails(
        &run(&["--eif-path", eif, "--cpu-ids", "1", "x", "--memory", "64"]),
        3,
        "`cpu-id` is not a number",
    );
    for (cid, says) in [
        ("1", "well-known"),
        ("2", "well-known"),
        ("3", "parent VM"),
        ("4294967295", "well-known"),
        ("4294967296", "u32 max"),
    ] {
        assert_fails(
            &run(&["--eif-path", eif, "--cpu-count", "1", "--memory", "64", "--enclave-cid", cid]),
            3,
            says,
        );
    }
    assert_fails(
        &run(&["--eif-path", eif, "--cpu-count", "1", "--memory", "64", "--enclave-cid", "x"]),
        3,
        "not a number",
    );
    // A usage error as clap reports it: exactly one CPU choice.
    assert_eq!(status(&run(&["--eif-path", eif, "--memory", "64"])), 2);
    assert_eq!(status(&run(&["--eif-path", eif, "--cpu-count", "1", "--cpu-ids", "1", "--memory", "64"])), 2);

    let config = host.run_dir.with_file_name("config.json");
    let with_config = |json: &str| {
        std::fs::write(&config, json).unwrap();
        run(&["--config", config.to_str().unwrap()])
    };
    assert_fails(&with_config("{not json"), 17, "Invalid JSON format");
    assert_fails(&with_config(r#"{"eif_path": "x.eif", "memory_mib": 64}"#), 1, "Missing both");
    assert_fails(
        &with_config(r#"{"eif_path": "x.eif", "memory_mib": 64, "cpu_count": 1, "cpu_ids": [1]}"#),
        2,
        "cannot be used together",
    );
    assert_fails(&run(&["--config", "/nonexistent/config.json"]), 19, "/nonexistent/config.json");
    assert_eq!(
        status(&run(&["--config", config.to_str().unwrap(), "--memory", "64"])),
        2,
        "config excludes flags"
    );

    // The image: missing → E19; garbage → E35; too big for the memory → E26.
    assert_fails(&run(&["--eif-path", eif, "--cpu-count", "1", "--memory", "64"]), 19, "missing.eif");
    let garbage = host.run_dir.with_file_name("garbage.eif");
    std::fs::write(&garbage, common::bytes(4096, 1)).unwrap();
    let garbage = garbage.to_str().unwrap();
    assert_fails(&run(&["--eif-path", garbage, "--cpu-count", "1", "--memory", "64"]), 35, "not an EIF");
    assert_fails(
        &run(&["--eif-path", garbage, "--cpu-count", "1", "--memory", "32"]),
        26,
        "minimum memory should be 64 MB",
    );
    assert_fails(
        &run(&["--eif-path", garbage, "--cpu-count", "1", "--memory", "0"]),
        26,
        "greater than 0 MB",
    );
    let big = host.run_dir.with_file_name("big.eif");
    std::fs::File::create(&big).unwrap().set_len(30 << 20).unwrap();
    assert_fails(
        &run(&["--eif-path", big.to_str().unwrap(), "--cpu-count", "1", "--memory", "100"]),
        26,
        "minimum memory should be 120 MB",
    );

    // No pool yet: CPUs cannot be had.
    assert_fails(&run(&["--demo", "--cpu-count", "1", "--memory", "64"]), 22, "carve allocator");
    assert_fails(&run(&["--demo", "--cpu-ids", "1", "--memory", "64"]), 21, "not in the enclave CPU pool");
    assert_fails(&run(&["--demo", "--cpu-ids", "1", "1", "--memory", "64"]), 20, "more than once");

    // Naming enclaves that do not exist.
    assert_fails(&host.carve(&["terminate-enclave", "--enclave-name", "nobody"]), 58, "nobody");
    // nitro-cli finds no socket for such an ID: E11.
    assert_fails(
        &host.carve(&["terminate-enclave", "--enclave-id", "i-0000000000000000-enc1234"]),
        11,
        "No enclave with ID",
    );
    assert_fails(&host.carve(&["console", "--enclave-id", "bogus"]), 3, "not an enclave ID");
    assert_eq!(status(&host.carve(&["terminate-enclave"])), 2);
    assert_eq!(status(&host.carve(&["console", "--enclave-id", "a", "--enclave-name", "b"])), 2);
    let out = host.carve(&["terminate-enclave", "--all"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out).trim(), "[]");
    assert_eq!(stdout(&host.carve(&["describe-enclaves"])).trim(), "[]");
    assert_eq!(host.files(), ["carve.lock", "enclaves.log"]);

    // The allocator's own statuses (nitro-cli's allocator script).
    let yaml = host.run_dir.with_file_name("allocator.yaml");
    std::fs::write(&yaml, "---\nmemory_mib: 64\ncpu_pool: 0\n").unwrap();
    let out = host.carve(&["allocator", "--config", yaml.to_str().unwrap()]);
    assert_eq!(status(&out), 200, "{}", stderr(&out));
    assert!(stderr(&out).contains("CPU 0"), "{}", stderr(&out));
    std::fs::write(&yaml, "---\nmemory_mib: 64\n").unwrap();
    assert_eq!(status(&host.carve(&["allocator", "--config", yaml.to_str().unwrap()])), 200);
    let out = host.carve(&["allocator", "--config", "/nonexistent.yaml"]);
    assert_eq!(status(&out), 1);
    assert!(stderr(&out).contains("/nonexistent.yaml"));
}

#[test]
fn invoked_as_nitro_cli_it_answers_as_nitro_cli() {
    let host = Host::new("nitro-cli");
    std::fs::create_dir_all(&host.run_dir).unwrap();
    let link = host.run_dir.with_file_name("nitro-cli");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_carve"), &link).unwrap();
    let out = host.command(&link, &["--version"]).output().unwrap();
    assert_eq!(stdout(&out), "Nitro CLI 1.5.0\n");
    let out = host.command(&link, &["describe-enclaves"]).output().unwrap();
    assert_eq!(stdout(&out).trim(), "[]");
    let out = host.command(&link, &[]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Usage: nitro-cli"), "{}", stderr(&out));
    let out = host
        .command(&link, &["run-enclave", "--eif-path", "x", "--cpu-count", "1", "--memory", "9X"])
        .output()
        .unwrap();
    assert_fails(&out, 3, "size indicator");

    // nitro-cli's environment: its sockets directory is the run directory, build scratch goes
    // under its artifacts directory (E51 without one), and its log and error logs are kept.
    let root = host.run_dir.parent().unwrap().to_path_buf();
    let (sockets, logs, artifacts) = (root.join("sockets"), root.join("logs"), root.join("artifacts"));
    let nitro = |args: &[&str], env: &[(&str, &Path)]| {
        let mut command = host.command(&link, args);
        command.env("NITRO_CLI_SOCKETS_PATH", &sockets).env("NITRO_CLI_LOGS_PATH", &logs);
        command.env_remove("NITRO_CLI_ARTIFACTS");
        for (key, value) in env {
            command.env(key, value);
        }
        command.output().unwrap()
    };
    let dev = root.join("dev.yaml");
    std::fs::write(&dev, "development: true\n").unwrap();
    let out = nitro(&["allocator", "--config", dev.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(sockets.join("allocator.json").exists(), "NITRO_CLI_SOCKETS_PATH is the run directory");
    let eif = root.join("nitro.eif");
    let build = ["build-enclave", "--demo", "--output-file", eif.to_str().unwrap()];
    let out = nitro(&build, &[("NITRO_CLI_ARTIFACTS", &artifacts)]);
    assert!(out.status.success() && artifacts.is_dir(), "{}", stderr(&out));
    let mut homeless = host.command(&link, &build);
    let out = homeless.env_remove("HOME").env_remove("NITRO_CLI_ARTIFACTS").output().unwrap();
    assert_fails(
        &out,
        51,
        "Could not find a folder for the CLI artifacts, set either HOME or NITRO_CLI_ARTIFACTS",
    );
    let out = nitro(&["describe-eif", "--eif-path", "/nonexistent.eif"], &[]);
    assert_fails(&out, 19, "/nonexistent.eif");
    let last = stderr(&out).lines().last().unwrap_or_default().to_string();
    let error_log = last
        .strip_prefix("If you open a support ticket, please provide the error log found at \"")
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or_else(|| panic!("names its error log: {last}"));
    assert!(Path::new(error_log).starts_with(&logs) && error_log.contains("/err"), "{error_log}");
    assert!(std::fs::read_to_string(error_log).unwrap().contains("/nonexistent.eif"));
    let log = std::fs::read_to_string(logs.join("nitro_enclaves.log")).unwrap();
    assert!(log.lines().any(|l| l.starts_with("[nitro-cli][ERROR][") && l.contains("E19")), "{log}");
}

/// Hugepage counts on node 0 as the test found them, written back however the test ends.
struct HugepageGuard {
    host_counts: Vec<(PathBuf, String)>,
    run_dir: PathBuf,
    state_dir: PathBuf,
}

const NODE0_2M: &str = "/sys/devices/system/node/node0/hugepages/hugepages-2048kB";

impl HugepageGuard {
    fn new(host: &Host) -> HugepageGuard {
        let host_counts = ["hugepages-2048kB", "hugepages-1048576kB"]
            .iter()
            .map(|size| {
                PathBuf::from(format!("/sys/devices/system/node/node0/hugepages/{size}/nr_hugepages"))
            })
            .filter_map(|path| std::fs::read_to_string(&path).ok().map(|count| (path, count)))
            .collect();
        HugepageGuard { host_counts, run_dir: host.run_dir.clone(), state_dir: host.state_dir.clone() }
    }
}

impl Drop for HugepageGuard {
    fn drop(&mut self) {
        let host = Host { run_dir: self.run_dir.clone(), state_dir: self.state_dir.clone() };
        let _ = host.carve(&["terminate-enclave", "--all"]);
        let _ = host.carve(&["allocator", "--clear"]);
        for (path, count) in &self.host_counts {
            let _ = std::fs::write(path, count.trim());
        }
        std::mem::forget(host);
    }
}

fn free_2m_pages() -> u64 {
    std::fs::read_to_string(format!("{NODE0_2M}/free_hugepages")).unwrap().trim().parse().unwrap()
}

fn vcpu_affinity(pid: &str) -> Vec<String> {
    let mut affinities = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("carve-vcpu") {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap();
            let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")).unwrap();
            affinities.push(line.split_whitespace().nth(1).unwrap().to_string());
        }
    }
    affinities
}

/// (open fds, threads) of a process once the boot's short-lived connections have closed: the
/// value `expected` once it shows, else what it is after a second.
fn settled_shape(pid: &str, expected: Option<(usize, usize)>) -> (usize, usize) {
    let shape = || (count_entries(&format!("/proc/{pid}/fd")), count_entries(&format!("/proc/{pid}/task")));
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut now = shape();
    while Instant::now() < deadline && Some(now) != expected {
        std::thread::sleep(Duration::from_millis(20));
        now = shape();
    }
    now
}

fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn pool_cpus_and_hugepages_and_a_hundred_leak_free_cycles() {
    if !kvm_usable("pool_cpus_and_hugepages_and_a_hundred_leak_free_cycles") {
        return;
    }
    if !rustix::process::geteuid().is_root()
        || !Path::new(NODE0_2M).exists()
        || !Path::new("/sys/devices/system/cpu/cpu1").exists()
    {
        assert!(!real_kvm_required(), "the real KVM host has root, 2 MiB hugepages and a CPU 1");
        eprintln!("SKIPPED pool_cpus_and_hugepages_and_a_hundred_leak_free_cycles: needs root, 2 MiB hugepages and a CPU 1");
        return;
    }
    let host = Host::new("pool");
    let _guard = HugepageGuard::new(&host);
    let yaml = host.run_dir.with_file_name("allocator.yaml");
    std::fs::write(&yaml, "---\n# nitro-cli's format\nmemory_mib: 128\ncpu_pool: 1\n").unwrap();
    let out = host.carve(&["allocator", "--config", yaml.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(format!("{NODE0_2M}/nr_hugepages")).unwrap().trim(), "64");
    let free = free_2m_pages();
    assert!(free >= 64, "{free}");

    let enclave = host.run(&["--demo", "--cpu-ids", "1", "--memory", "64", "--debug-mode"]);
    assert_eq!(enclave["CPUIDs"], serde_json::json!([1]));
    assert_eq!(enclave["MemoryMiB"], 64);
    let pid = enclave["ProcessID"].to_string();
    assert_eq!(vcpu_affinity(&pid), ["1"], "the vCPU thread runs on its pool CPU only");
    // Requests and vsock sessions leave no fds or threads behind in the enclave process.
    let baseline = settled_shape(&pid, None);
    let vsock = host.run_dir.join(format!("{}.vsock", enclave["EnclaveID"].as_str().unwrap()));
    for _ in 0..20 {
        assert_eq!(host.describe().len(), 1);
        assert_eq!(talk(&vsock, 5005, b"ping"), b"ping");
    }
    for _ in 0..3 {
        let out = host.carve(&["console", "--enclave-name", "demo", "--disconnect-timeout", "1"]);
        assert!(stdout(&out).contains("heartbeat:     acknowledged by the parent"), "{}", stderr(&out));
    }
    assert_eq!(
        settled_shape(&pid, Some(baseline)),
        baseline,
        "(fds, threads) after 20 requests and sessions and 3 consoles"
    );
    assert_eq!(free_2m_pages(), free - 32, "guest memory is 32 hugepages");
    assert!(!host.describe()[0].as_object().unwrap().contains_key("DevelopmentMode"));

    // CPU 1 is taken: no second enclave; the pool cannot change under a running enclave.
    assert_fails(
        &host.carve(&["run-enclave", "--demo", "--cpu-count", "1", "--memory", "64"]),
        22,
        "0 of the pool's 1 are free",
    );
    let out = host.carve(&["allocator", "--config", yaml.to_str().unwrap()]);
    assert_eq!(status(&out), 1);
    assert!(stderr(&out).contains("running"), "{}", stderr(&out));

    let out = host.carve(&["terminate-enclave", "--enclave-name", "demo"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(free_2m_pages(), free, "terminate gives the hugepages back");

    // More memory than the reservation: E27, and nothing half-started survives.
    let out = host.carve(&["run-enclave", "--demo", "--cpu-count", "1", "--memory", "256"]);
    assert_fails(&out, 27, "hugepages");
    assert_eq!(free_2m_pages(), free);
    assert_eq!(host.files(), ["allocator.json", "carve.lock", "enclaves.log"]);

    // A hundred launch/terminate cycles (CARVE_ENCLAVE_CYCLES where each costs more, as on the
    // software KVM host): every enclave process gone, its pages and files back, and the last
    // enclave process no bigger (fds, threads) than the first.
    let cycles: usize = std::env::var("CARVE_ENCLAVE_CYCLES").map_or(100, |n| n.parse().expect("a count"));
    let mut first_shape = None;
    let mut pids = Vec::new();
    for cycle in 0..cycles {
        let enclave = host.run(&["--demo", "--cpu-count", "1", "--memory", "64"]);
        let pid = enclave["ProcessID"].to_string();
        match first_shape {
            None => first_shape = Some(settled_shape(&pid, None)),
            Some(first) => {
                assert_eq!(
                    settled_shape(&pid, Some(first)),
                    first,
                    "cycle {cycle}: (fds, threads) of the enclave process"
                )
            }
        }
        let out = host.carve(&["terminate-enclave", "--all"]);
        assert!(out.status.success(), "cycle {cycle}: {}", stderr(&out));
        pids.push(pid);
    }
    assert_eq!(free_2m_pages(), free, "no hugepage leaked");
    assert_eq!(host.files(), ["allocator.json", "carve.lock", "enclaves.log"]);
    std::thread::sleep(Duration::from_millis(200));
    for pid in &pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(stat.is_empty() || stat.contains(") Z "), "enclave process {pid} still runs: {stat}");
    }

    let out = host.carve(&["allocator", "--clear"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(host.files(), ["carve.lock", "enclaves.log"]);
}

#[test]
fn attach_console_follows_the_enclave_to_its_end() {
    if !kvm_usable("attach_console_follows_the_enclave_to_its_end") {
        return;
    }
    let host = Host::new("attach");
    host.development();
    let attached = host
        .command(
            Path::new(env!("CARGO_BIN_EXE_carve")),
            &["run-enclave", "--demo", "--cpu-count", "1", "--memory", "64", "--attach-console"],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + common::TIMEOUT;
    let id = loop {
        if let Some(enclave) = host.describe().first() {
            assert_eq!(enclave["Flags"], "DEBUG_MODE", "--attach-console implies debug mode");
            break enclave["EnclaveID"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "the enclave did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    talk(&host.run_dir.join(format!("{id}.vsock")), 5007, b"");
    let out = attached.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let (json, console) = text.split_at(text.find("Connecting to the console").expect("console attached"));
    let info: Value = serde_json::from_str(json).unwrap();
    assert_eq!(info["EnclaveID"], id.as_str());
    assert!(console.starts_with(&format!(
        "Connecting to the console for enclave {}...\nSuccessfully connected to the console.\n",
        info["EnclaveCID"]
    )));
    assert!(console.contains("Hello from the carve demo guest!"), "{console}");
    assert!(console.contains("Demo guest done; powering off."), "{console}");
    assert!(host.describe().is_empty());
}

#[test]
fn other_users_may_look_but_not_terminate() {
    if !kvm_usable("other_users_may_look_but_not_terminate") {
        return;
    }
    if !rustix::process::geteuid().is_root() || !Path::new("/usr/bin/setpriv").exists() {
        eprintln!(
            "SKIPPED other_users_may_look_but_not_terminate: needs root and setpriv to act as another user"
        );
        return;
    }
    let host = Host::new("users");
    host.development();
    let enclave = host.run(&["--demo", "--cpu-count", "1", "--memory", "64"]);
    let id = enclave["EnclaveID"].as_str().unwrap();
    let as_nobody = |args: &[&str]| {
        let mut all = vec!["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_carve")];
        all.extend_from_slice(args);
        host.command(Path::new("/usr/bin/setpriv"), &all).output().unwrap()
    };
    let out = as_nobody(&["describe-enclaves"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let seen: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen.len(), 1);
    assert_fails(&as_nobody(&["terminate-enclave", "--enclave-id", id]), 38, "or root may terminate it");
    let out = as_nobody(&["terminate-enclave", "--all"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "[]", "others' enclaves are skipped");
    assert_eq!(host.describe().len(), 1, "still running");
    let out = host.carve(&["terminate-enclave", "--enclave-id", id]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Asks the demo enclave for an attestation document (vsock port 5006) with `nonce`.
fn attestation(vsock: &Path, nonce: &[u8]) -> Vec<u8> {
    let mut request = (nonce.len() as u32).to_be_bytes().to_vec();
    request.extend_from_slice(nonce);
    let reply = talk(vsock, 5006, &request);
    let len = u32::from_be_bytes(reply[..4].try_into().unwrap()) as usize;
    assert_eq!(reply.len(), 4 + len);
    reply[4..].to_vec()
}

#[test]
fn a_signed_image_runs_with_pcr8_and_a_tampered_one_is_refused() {
    if !kvm_usable("a_signed_image_runs_with_pcr8_and_a_tampered_one_is_refused") {
        return;
    }
    let host = Host::new("signed");
    let dir = host.run_dir.parent().unwrap().to_path_buf();
    // The parent's identity for PCR3 and PCR4, as EC2 measures its role and instance ID: the
    // instance ID from the allocator configuration, the role from run-enclave.
    let allocator = dir.join("allocator.yaml");
    std::fs::write(&allocator, "development: true\nparent_id: i-1234567890abcdef0\n").unwrap();
    let out = host.carve(&["allocator", "--config", allocator.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let eif = dir.join("signed.eif");
    let out = host.carve(&["build-enclave", "--demo", "--output-file", eif.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (key, cert) = common::signer(&dir, "signer");
    let out = host.carve(&[
        "sign-eif",
        "--eif-path",
        eif.to_str().unwrap(),
        "--signing-certificate",
        &cert,
        "--private-key",
        &key,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let measured: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pcr8 = measured["Measurements"]["PCR8"].as_str().unwrap().to_string();

    // The config file route, with a name of its own.
    let config = dir.join("run.json");
    let json = serde_json::json!({
        "eif_path": eif, "memory_mib": 64, "cpu_count": 1, "enclave_name": "signed-app",
        "parent_role": "arn:aws:iam::123456789012:role/Webserver"
    });
    std::fs::write(&config, json.to_string()).unwrap();
    let enclave = host.run(&["--config", config.to_str().unwrap()]);
    assert_eq!(enclave["EnclaveName"], "signed-app");
    let out = host.carve(&["describe-enclaves", "--metadata"]);
    let described: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(described[0]["Measurements"]["PCR8"], pcr8.as_str());
    // AWS's published values for this role and instance ID.
    let (pcr3, pcr4) = (
        "78fce75db17cd4e0a3fb8dad3ad128ca5e77edbb2b2c7f75329dccd99aa5f6ef4fc1f1a452e315b9e98f9e312e6921e6",
        "08f996b5d43e047a9eb51e7f548bfee7e164fd7dc8f65541f2ac09d6545ac812719327281c401a67a10fcba87ae79ce0",
    );
    assert_eq!(
        (&described[0]["Measurements"]["PCR3"], &described[0]["Measurements"]["PCR4"]),
        (&pcr3.into(), &pcr4.into())
    );
    assert!(
        described[0]["ImageName"].is_string() && described[0]["Metadata"]["BuildTool"].is_string(),
        "{}",
        stdout(&out)
    );
    assert!(!stdout(&host.carve(&["describe-enclaves"])).contains("ImageName"), "metadata only when asked");

    // The enclave's attestation carries PCR8, and the document verifies against carve's root.
    let id = enclave["EnclaveID"].as_str().unwrap();
    let document = attestation(&host.run_dir.join(format!("{id}.vsock")), b"signed nonce");
    let doc_path = dir.join("attestation.cose");
    std::fs::write(&doc_path, document).unwrap();
    let out = host.carve(&[
        "attestation",
        "verify",
        "--doc",
        doc_path.to_str().unwrap(),
        "--nonce",
        &hex(b"signed nonce"),
        "--pcr",
        &format!("8={pcr8}"),
        "--pcr",
        &format!("0={}", measured["Measurements"]["PCR0"].as_str().unwrap()),
        "--pcr",
        &format!("3={pcr3}"),
        "--pcr",
        &format!("4={pcr4}"),
    ]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let verdict: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(verdict["Chain"][2]["Subject"].as_str().unwrap().contains(id), "the leaf names the enclave");

    // Tampering with the signed image (its command line): refused before anything starts.
    let mut bytes = std::fs::read(&eif).unwrap();
    let at = bytes.windows(13).position(|w| w == b"console=ttyS0").unwrap();
    bytes[at + 12] = b'1';
    let tampered = dir.join("tampered.eif");
    std::fs::write(&tampered, bytes).unwrap();
    let out = host.carve(&[
        "run-enclave",
        "--eif-path",
        tampered.to_str().unwrap(),
        "--cpu-count",
        "1",
        "--memory",
        "64",
    ]);
    assert_fails(&out, 59, "signature");

    // A certificate outside its validity period: describe-eif shows the dates, run-enclave
    // refuses with E59 before anything starts.
    let expired_eif = dir.join("expired.eif");
    std::fs::copy(dir.join("signed.eif"), &expired_eif).unwrap();
    let (old_key, old_cert) = common::expired_signer(&dir, "expired");
    let eif_arg = expired_eif.to_str().unwrap();
    let signing =
        ["sign-eif", "--eif-path", eif_arg, "--signing-certificate", &old_cert, "--private-key", &old_key];
    let out = host.carve(&signing);
    assert!(out.status.success(), "{}", stderr(&out));
    let described: Value =
        serde_json::from_slice(&host.carve(&["describe-eif", "--eif-path", eif_arg]).stdout).unwrap();
    assert_eq!(described["SigningCertificate"]["NotAfter"], "Jan  2 00:00:00 2020 GMT", "{described}");
    let out = host.carve(&["run-enclave", "--eif-path", eif_arg, "--cpu-count", "1", "--memory", "64"]);
    assert_fails(&out, 59, "the signing certificate is expired or not yet valid");
    assert_eq!(host.describe().len(), 1);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn an_enclave_reaches_a_tcp_server_through_vsock_proxy() {
    if !kvm_usable("an_enclave_reaches_a_tcp_server_through_vsock_proxy") {
        return;
    }
    use std::io::{BufRead, BufReader};
    let host = Host::new("vsock-proxy");
    host.development();
    // A TCP server outside the enclave: reads one line, answers, closes.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port().to_string();
    let served = std::thread::spawn(move || {
        let (mut conn, _) = server.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).unwrap();
        conn.write_all(b"hello from outside\n").unwrap();
        line
    });
    let allowlist = host.run_dir.with_file_name("vsock-proxy.yaml");
    std::fs::write(
        &allowlist,
        format!("allowlist:\n- {{address: localhost, port: 9}}\n- {{address: 127.0.0.1, port: {port}}}\n"),
    )
    .unwrap();
    let carve = Path::new(env!("CARGO_BIN_EXE_carve"));
    let mut proxy = host
        .command(
            carve,
            &[
                "--log-level",
                "info",
                "vsock-proxy",
                "--config",
                allowlist.to_str().unwrap(),
                "8000",
                "127.0.0.1",
                &port,
            ],
        )
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let listener = host.run_dir.join("vsock_8000");
    let deadline = Instant::now() + common::TIMEOUT;
    while !listener.exists() {
        assert!(Instant::now() < deadline, "the proxy listens");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The enclave connects out before its heartbeat, before run-enclave could name it.
    let eif = build_eif(&host, "demo", "console=ttyS0 connect_out=8000");
    let enclave = host.run(&[
        "--eif-path",
        eif.to_str().unwrap(),
        "--cpu-count",
        "1",
        "--memory",
        "64",
        "--debug-mode",
    ]);
    let id = enclave["EnclaveID"].as_str().unwrap();
    assert_eq!(served.join().unwrap(), "hello from the enclave\n");
    let out = host.carve(&["console", "--enclave-id", id, "--disconnect-timeout", "3"]);
    assert!(
        stdout(&out).contains("connect out:   port 8000 answered: hello from outside"),
        "{}",
        stdout(&out)
    );

    // SIGTERM stops the proxy, which takes its socket with it; its log named the enclave.
    let out = host.carve(&["terminate-enclave", "--enclave-id", id]);
    assert!(out.status.success(), "{}", stderr(&out));
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(proxy.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = proxy.wait().unwrap();
    let mut log = String::new();
    proxy.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert_eq!(status.code(), Some(128 + 15), "{log}");
    assert!(log.contains(&format!("Accepted connection on cid: {} port: ", enclave["EnclaveCID"])), "{log}");
    assert!(log.contains(&format!("to 127.0.0.1:{port}")), "{log}");
    assert!(!listener.exists(), "the proxy's socket is gone");
    host.wait_until_empty();
}

#[test]
fn terminate_all_counts_the_enclave_processes_that_do_not_answer() {
    if !kvm_usable("terminate_all_counts_the_enclave_processes_that_do_not_answer") {
        return;
    }
    let host = Host::new("terminate-all");
    host.development();
    let first = host.run(&["--demo", "--cpu-count", "1", "--memory", "64"]);
    let second = host.run(&["--demo", "--cpu-count", "1", "--memory", "64"]);
    let stopped = second["ProcessID"].to_string();
    let signal =
        |name: &str| assert!(Command::new("kill").args([name, &stopped]).status().unwrap().success());
    signal("-STOP");
    let out = host.carve(&["terminate-enclave", "--all"]);
    signal("-CONT");
    assert_fails(&out, 39, "Failed to connect to 1 enclave processes");
    let id = first["EnclaveID"].as_str().unwrap();
    assert!(
        stderr(&out).starts_with(&format!("Successfully terminated enclave {id}.\nFailed connections: 1\n")),
        "{}",
        stderr(&out)
    );
    let terminated: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(terminated, serde_json::json!([{"EnclaveName": "demo", "EnclaveID": id, "Terminated": true}]));
    // Once it answers again, it is terminated too.
    let out = host.carve(&["terminate-enclave", "--all"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap()[0]["EnclaveID"], second["EnclaveID"]);
    host.wait_until_empty();
}
