//! A Linux enclave made only of carve's parts and Debian's: a container image (busybox and an
//! app) is pushed to a local registry (Debian's docker-registry, skopeo), pulled by
//! `build-enclave --docker-uri` into an EIF with carve's enclave kernel and init
//! (scripts/build-enclave-blobs.sh), found in carve's cache; run-enclave boots it, carve's init
//! sends the heartbeat, starts the app and reports its exit status, which `carve wait` names.
//!
//! Linux user space needs a real KVM host, so this runs in the suite's real KVM phase
//! (scripts/test.sh, docs/kvm-host.md) and is ignored by a plain `cargo test`.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::registry::{gzip, OciLayout, Registry, LAYER_GZIP};
use common::{fresh_dir, kvm_usable, stderr, stdout};

fn blobs() -> PathBuf {
    if let Ok(path) = std::env::var("CARVE_ENCLAVE_BLOBS") {
        return path.into();
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/build-enclave-blobs.sh");
    let out = Command::new("bash").arg(script).stderr(Stdio::inherit()).output().expect("the script runs");
    assert!(out.status.success(), "scripts/build-enclave-blobs.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Pushes an image of one layer of `files` (path, mode, contents) running `command` to
/// `registry` as `name`; returns the reference to pull.
fn publish(
    dir: &Path,
    registry: &Registry,
    files: &[(&str, u32, &[u8])],
    command: &[&str],
    name: &str,
) -> String {
    use common::tar_add as add;
    use tar::{Builder, EntryType};
    let mut layer = Builder::new(Vec::new());
    add(&mut layer, "bin/", EntryType::Directory, 0o755, b"", None);
    for (name, mode, data) in files {
        add(&mut layer, name, EntryType::Regular, *mode, data, None);
    }
    add(&mut layer, "bin/sh", EntryType::Symlink, 0o777, b"", Some("busybox"));
    let layer = layer.into_inner().unwrap();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": command, "Env": ["PATH=/bin", "GREETING=hello from the app"]},
    });
    let mut layout = OciLayout::new(&dir.join("layout"));
    let image = layout.image(&[(LAYER_GZIP, gzip(&layer))], &[layer], config);
    layout.tag(&image, "1");
    registry.push(&layout, "1", name, false);
    format!("{}/{name}", registry.address)
}

fn busybox() -> Vec<u8> {
    std::fs::read("/bin/busybox").expect("/bin/busybox (Debian's busybox-static) is installed")
}

struct Host {
    root: PathBuf,
}

impl Host {
    fn new(name: &str) -> Host {
        let host = Host { root: fresh_dir(name) };
        // carve's blobs where carve looks for them: its cache's enclave-blobs.
        std::fs::create_dir_all(host.root.join("cache")).unwrap();
        std::os::unix::fs::symlink(blobs(), host.root.join("cache/enclave-blobs")).unwrap();
        host
    }

    fn allocator(&self, yaml: &str) {
        let config = self.root.join("allocator.yaml");
        std::fs::write(&config, yaml).unwrap();
        let out = self.carve(&["allocator", "--config", config.to_str().unwrap()], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
    }

    /// build-enclave pulling `uri` with carve's blobs; returns its JSON.
    fn build(&self, uri: &str, eif: &Path) -> serde_json::Value {
        let args = ["build-enclave", "--docker-uri", uri, "--output-file", eif.to_str().unwrap()];
        let built = self.carve(&args, &[("CARVE_CACHE_DIR", &self.root.join("cache"))]);
        assert!(built.status.success(), "{}", stderr(&built));
        serde_json::from_slice(&built.stdout).unwrap()
    }

    /// run-enclave with `args` after `--eif-path EIF`; returns the enclave's ID.
    fn run(&self, eif: &Path, args: &[&str]) -> String {
        let mut all = vec!["run-enclave", "--eif-path", eif.to_str().unwrap()];
        all.extend_from_slice(args);
        let run = self.carve(&all, &[]);
        assert!(run.status.success(), "run-enclave: {}{}", stdout(&run), stderr(&run));
        let enclave: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        enclave["EnclaveID"].as_str().unwrap().to_string()
    }

    /// Follows a debug-mode enclave's console while `carve wait` sees it end as `ended`;
    /// returns the console's text.
    fn console_until_ended(&self, id: &str, ended: &str) -> String {
        let console = std::thread::scope(|scope| {
            let console = scope.spawn(|| self.carve(&["console", "--enclave-id", id], &[]));
            let waited = self.carve(&["wait", "--enclave-id", id], &[]);
            assert!(waited.status.success(), "{}", stderr(&waited));
            assert_eq!(stdout(&waited).trim(), format!("Enclave {id} ended: {ended}"));
            console.join().unwrap()
        });
        stdout(&console)
    }

    fn run_dir_files(&self) -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(self.root.join("run"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        files
    }

    fn carve(&self, args: &[&str], env: &[(&str, &Path)]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_carve"));
        command
            .args(args)
            .env("CARVE_RUN_DIR", self.root.join("run"))
            .env("CARVE_STATE_DIR", self.root.join("state"))
            .env("DOCKER_CONFIG", self.root.join("docker"))
            .env("DOCKER_HOST", format!("unix://{}", self.root.join("no-docker.sock").display()))
            .env_remove("NITRO_CLI_BLOBS");
        for (key, value) in env {
            command.env(key, value);
        }
        command.output().expect("carve runs")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.carve(&["terminate-enclave", "--all"], &[]);
    }
}

#[test]
#[ignore = "needs a real KVM host for Linux user space: scripts/test.sh runs it in scripts/kvm-host.sh"]
fn a_container_app_runs_as_a_linux_enclave_and_its_exit_status_reaches_wait() {
    assert!(kvm_usable("a_container_app_runs_as_a_linux_enclave"), "/dev/kvm is usable");
    let host = Host::new("linux-enclave");
    host.allocator("development: true\n");
    let registry = Registry::start(&host.root.join("registry"), None);
    // The app greets with its image's Env, gives a console reader time to attach, and exits 7.
    let script = "echo \"$GREETING on $(busybox cut -d' ' -f1-3 /proc/version)\"; \
                  [ -c /dev/nsm ] && echo 'the NSM is /dev/nsm'; busybox sleep 3; exit 7";
    let files = [("bin/busybox", 0o755, &busybox()[..])];
    let uri = publish(&host.root, &registry, &files, &["/bin/sh", "-c", script], "carve-app:1");
    let eif = host.root.join("app.eif");
    let args = ["build-enclave", "--docker-uri", &uri, "--output-file", eif.to_str().unwrap()];
    let no_blobs = host.carve(&args, &[("CARVE_CACHE_DIR", &host.root.join("empty"))]);
    assert_eq!(no_blobs.status.code(), Some(52), "{}", stderr(&no_blobs));
    assert!(stderr(&no_blobs).contains("no enclave blobs found"), "{}", stderr(&no_blobs));
    assert!(!eif.exists(), "no output file left");
    host.build(&uri, &eif);

    let id = host.run(&eif, &["--cpu-count", "1", "--memory", "256", "--debug-mode"]);

    // In debug mode the console replays from boot: the kernel, then the app's greeting.
    let text = host.console_until_ended(&id, "the app exited with status 7");
    assert!(text.contains("hello from the app on Linux version 6.12"), "console:\n{text}");
    assert!(text.contains("the NSM is /dev/nsm"), "the kernel's NSM driver found carve's device:\n{text}");
    assert!(text.contains("carve-init: the app exited with status 7"), "console:\n{text}");
    let log = std::fs::read_to_string(host.root.join("run/enclaves.log")).unwrap();
    assert!(log.contains("the app exited with status 7"), "{log}");

    assert_eq!(host.run_dir_files(), ["allocator.json", "carve.lock", "enclaves.log"], "nothing left behind");
}

/// Connects to an enclave port through the hybrid socket, retrying while the app is not yet
/// listening; sends `request`, half-closes, returns everything the app answers.
fn talk(vsock: &Path, port: u32, request: &[u8]) -> Vec<u8> {
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    let (mut stream, _) = loop {
        if let Some(connected) = common::connect_guest(vsock, port) {
            break connected;
        }
        assert!(std::time::Instant::now() < deadline, "nothing listens on enclave port {port}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    stream.write_all(request).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    reply
}

#[test]
#[ignore = "needs a real KVM host for Linux user space: scripts/test.sh runs it in scripts/kvm-host.sh"]
fn an_enclave_app_attests_through_dev_nsm_on_a_pool_cpu_with_hugepages() {
    assert!(kvm_usable("an_enclave_app_attests_through_dev_nsm"), "/dev/kvm is usable");
    let host = Host::new("linux-enclave-attest");
    // A real pool: CPU 1 and 2 MiB hugepages, given back by --clear.
    host.allocator("---\nmemory_mib: 128\ncpu_pool: 1\n");
    // A private registry (htpasswd), pulled with `docker login`'s record in config.json.
    let registry = Registry::start(&host.root.join("registry"), Some(("enclave-dev", "pull-me")));
    std::fs::create_dir_all(host.root.join("docker")).unwrap();
    let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "enclave-dev:pull-me");
    let config = serde_json::json!({"auths": {registry.address.clone(): {"auth": auth}}});
    std::fs::write(host.root.join("docker/config.json"), config.to_string()).unwrap();
    let attest = std::fs::read(carve_guest_images::example_attest()).unwrap();
    let files = [("bin/busybox", 0o755, &busybox()[..]), ("bin/attest", 0o755, &attest[..])];
    let uri = publish(&host.root, &registry, &files, &["/bin/attest"], "attest:1");
    let eif = host.root.join("attest.eif");
    let measurements = host.build(&uri, &eif)["Measurements"].clone();

    let id = host.run(&eif, &["--cpu-ids", "1", "--memory", "128"]);
    let described: serde_json::Value =
        serde_json::from_slice(&host.carve(&["describe-enclaves"], &[]).stdout).unwrap();
    assert_eq!(described[0]["CPUIDs"], serde_json::json!([1]));
    let vsock = host.root.join(format!("run/{id}.vsock"));

    // The parent asks with a fresh nonce; the app answers through AWS's driver on /dev/nsm.
    let nonce: Vec<u8> = common::bytes(48, std::process::id().into());
    let mut request = (nonce.len() as u32).to_be_bytes().to_vec();
    request.extend_from_slice(&nonce);
    let reply = talk(&vsock, 5006, &request);
    assert!(reply.len() > 4, "the app answered {} bytes", reply.len());
    let len = u32::from_be_bytes(reply[..4].try_into().unwrap()) as usize;
    assert_eq!(reply.len(), 4 + len);
    let document = host.root.join("attestation.cose");
    std::fs::write(&document, &reply[4..]).unwrap();
    let pcr = |n: &str| format!("{n}={}", measurements[format!("PCR{n}")].as_str().unwrap());
    let nonce_hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let verify = host.carve(
        &["attestation", "verify", "--doc", document.to_str().unwrap(), "--nonce", &nonce_hex]
            .into_iter()
            .chain(["--pcr", &pcr("0"), "--pcr", &pcr("1"), "--pcr", &pcr("2")])
            .collect::<Vec<_>>(),
        &[],
    );
    assert!(verify.status.success(), "the document verifies: {}{}", stdout(&verify), stderr(&verify));

    // The parent tells the app to exit 7; carve's init reports it, the enclave ends, and
    // `carve wait` says so (from the enclave, or from the log if it is already gone).
    let _ = talk(&vsock, 5007, &[7]);
    let waited = host.carve(&["wait", "--enclave-id", &id], &[]);
    assert!(waited.status.success(), "{}", stderr(&waited));
    assert!(
        stdout(&waited).starts_with(&format!("Enclave {id} ended: the app exited with status 7")),
        "{}",
        stdout(&waited)
    );
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    while stdout(&host.carve(&["describe-enclaves"], &[])).trim() != "[]" {
        assert!(std::time::Instant::now() < deadline, "the enclave is still listed");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let cleared = host.carve(&["allocator", "--clear"], &[]);
    assert!(cleared.status.success(), "{}", stderr(&cleared));
    assert_eq!(host.run_dir_files(), ["carve.lock", "enclaves.log"], "nothing left behind");
}

#[test]
#[ignore = "needs a real KVM host for Linux user space: scripts/test.sh runs it in scripts/kvm-host.sh"]
fn an_app_that_crashes_reports_its_signal() {
    assert!(kvm_usable("an_app_that_crashes_reports_its_signal"), "/dev/kvm is usable");
    let host = Host::new("linux-enclave-crash");
    host.allocator("development: true\n");
    let registry = Registry::start(&host.root.join("registry"), None);
    let files = [("bin/busybox", 0o755, &busybox()[..])];
    let uri = publish(
        &host.root,
        &registry,
        &files,
        &["/bin/sh", "-c", "busybox grep ^SigBlk /proc/self/status; busybox sleep 2; kill -SEGV $$"],
        "crash:1",
    );
    let eif = host.root.join("crash.eif");
    host.build(&uri, &eif);
    let id = host.run(&eif, &["--cpu-count", "1", "--memory", "128", "--debug-mode"]);
    // The app sleeps 2 s first, so the console reader and `wait` are there before it dies.
    let text = host.console_until_ended(&id, "the app was killed by signal 11");
    // carve-init started the app with nothing blocked (a blocked SIGSEGV would not kill it).
    assert!(text.contains("SigBlk:\t0000000000000000"), "console:\n{text}");
    assert!(text.contains("carve-init: the app was killed by signal 11"), "console:\n{text}");
    let log = std::fs::read_to_string(host.root.join("run/enclaves.log")).unwrap();
    assert!(log.contains(&format!("enclave {id} ended: the app was killed by signal 11")), "{log}");
}
