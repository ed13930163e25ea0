//! A Linux enclave made only of carve's parts: a container image (a docker-save archive holding
//! busybox and a command) becomes an EIF with carve's enclave kernel and init
//! (scripts/build-enclave-blobs.sh), found in carve's cache; run-enclave boots it, carve's init
//! sends the heartbeat, starts the app and reports its exit status, which `carve wait` names.
//!
//! Linux user space needs a real KVM host, so this runs in the suite's real KVM phase
//! (scripts/test.sh, docs/kvm-host.md) and is ignored by a plain `cargo test`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

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

/// `docker save` of an image whose one layer is busybox, and whose command is `command`.
fn image_archive(path: &Path, command: &[&str]) {
    use tar::{Builder, EntryType, Header};
    fn add(
        builder: &mut Builder<Vec<u8>>,
        path: &str,
        kind: EntryType,
        mode: u32,
        data: &[u8],
        link: Option<&str>,
    ) {
        let mut header = Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(data.len() as u64);
        header.set_mtime(1_700_000_000);
        if let Some(link) = link {
            header.set_link_name(link).unwrap();
        }
        builder.append_data(&mut header, path, data).unwrap();
    }
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (Debian's busybox-static) is installed");
    let mut layer = Builder::new(Vec::new());
    add(&mut layer, "bin/", EntryType::Directory, 0o755, b"", None);
    add(&mut layer, "bin/busybox", EntryType::Regular, 0o755, &busybox, None);
    add(&mut layer, "bin/sh", EntryType::Symlink, 0o777, b"", Some("busybox"));
    let layer = layer.into_inner().unwrap();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": command, "Env": ["PATH=/bin", "GREETING=hello from the app"]},
        "rootfs": {"type": "layers", "diff_ids": []}
    });
    let manifest = serde_json::json!([{
        "Config": "config.json", "RepoTags": ["carve-app:1"], "Layers": ["layer.tar"]
    }]);
    let mut archive = Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        ("config.json", serde_json::to_vec(&config).unwrap()),
        ("layer.tar", layer),
    ] {
        add(&mut archive, name, EntryType::Regular, 0o644, &data, None);
    }
    std::fs::write(path, archive.into_inner().unwrap()).unwrap();
}

struct Host {
    root: PathBuf,
}

impl Host {
    fn carve(&self, args: &[&str], env: &[(&str, &Path)]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_carve"));
        command
            .args(args)
            .env("CARVE_RUN_DIR", self.root.join("run"))
            .env("CARVE_STATE_DIR", self.root.join("state"))
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
    let host = Host { root: fresh_dir("linux-enclave") };
    // carve's blobs where carve looks for them: its cache's enclave-blobs.
    let cache = host.root.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::os::unix::fs::symlink(blobs(), cache.join("enclave-blobs")).unwrap();
    let config = host.root.join("dev.yaml");
    std::fs::write(&config, "development: true\n").unwrap();
    assert!(host.carve(&["allocator", "--config", config.to_str().unwrap()], &[]).status.success());

    let archive = host.root.join("app.tar");
    // The app greets with its image's Env, gives a console reader time to attach, and exits 7.
    image_archive(&archive, &["/bin/sh", "-c", "echo \"$GREETING on $(busybox cut -d' ' -f1-3 /proc/version)\"; [ -c /dev/nsm ] && echo 'the NSM is /dev/nsm'; busybox sleep 3; exit 7"]);
    let eif = host.root.join("app.eif");
    let no_blobs = host.carve(
        &["build-enclave", "--oci-archive", archive.to_str().unwrap(), "--docker-uri", "carve-app:1"]
            .into_iter()
            .chain(["--output-file", eif.to_str().unwrap()])
            .collect::<Vec<_>>(),
        &[("CARVE_CACHE_DIR", &host.root.join("empty"))],
    );
    assert_eq!(no_blobs.status.code(), Some(52), "{}", stderr(&no_blobs));
    assert!(stderr(&no_blobs).contains("no enclave blobs found"), "{}", stderr(&no_blobs));
    assert!(!eif.exists(), "no output file left");

    let built = host.carve(
        &["build-enclave", "--oci-archive", archive.to_str().unwrap(), "--docker-uri", "carve-app:1"]
            .into_iter()
            .chain(["--output-file", eif.to_str().unwrap()])
            .collect::<Vec<_>>(),
        &[("CARVE_CACHE_DIR", &cache)],
    );
    assert!(built.status.success(), "{}", stderr(&built));

    let run = host.carve(
        &[
            "run-enclave",
            "--eif-path",
            eif.to_str().unwrap(),
            "--cpu-count",
            "1",
            "--memory",
            "256",
            "--debug-mode",
        ],
        &[],
    );
    assert!(run.status.success(), "run-enclave: {}{}", stdout(&run), stderr(&run));
    let enclave: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let id = enclave["EnclaveID"].as_str().unwrap();

    // In debug mode the console replays from boot: the kernel, then the app's greeting.
    let console = std::thread::scope(|scope| {
        let console = scope.spawn(|| host.carve(&["console", "--enclave-id", id], &[]));
        let waited = host.carve(&["wait", "--enclave-id", id], &[]);
        assert!(waited.status.success(), "{}", stderr(&waited));
        assert_eq!(stdout(&waited).trim(), format!("Enclave {id} ended: the app exited with status 7"));
        console.join().unwrap()
    });
    let text = stdout(&console);
    assert!(
        text.contains("hello from the app on Linux version 6.12"),
        "console:\n{text}{}",
        stderr(&console)
    );
    assert!(text.contains("the NSM is /dev/nsm"), "the kernel's NSM driver found carve's device:\n{text}");
    assert!(text.contains("carve-init: the app exited with status 7"), "console:\n{text}");
    let log = std::fs::read_to_string(host.root.join("run/enclaves.log")).unwrap();
    assert!(log.contains("the app exited with status 7"), "{log}");

    let mut files: Vec<String> = std::fs::read_dir(host.root.join("run"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["allocator.json", "carve.lock", "enclaves.log"], "nothing left behind");
}
