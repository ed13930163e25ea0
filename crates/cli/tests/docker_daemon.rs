//! `build-enclave --docker-uri` takes an image a local Docker daemon has before going to a
//! registry, as nitro-cli does. A real dockerd (Debian's docker.io) runs here on private
//! sockets and directories, with the vfs storage driver and no networking of its own.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::registry::{gzip, OciLayout, Registry, LAYER_GZIP};
use common::{bytes, fresh_dir, stderr, tar_add};
use serde_json::{json, Value};
use tar::{Builder, EntryType};

struct Dockerd {
    child: Child,
    socket: PathBuf,
}

impl Dockerd {
    fn start(dir: &Path) -> Dockerd {
        let socket = dir.join("docker.sock");
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .arg(format!("--host=unix://{}", socket.display()))
            .arg(format!("--data-root={}", dir.join("data").display()))
            .arg(format!("--exec-root={}", dir.join("exec").display()))
            .arg(format!("--pidfile={}", dir.join("docker.pid").display()))
            .args(["--storage-driver=vfs", "--iptables=false", "--ip6tables=false", "--bridge=none"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("dockerd runs (Debian package docker.io; .ci/run installs it)");
        let daemon = Dockerd { child, socket };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !daemon.docker(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "dockerd did not start: {}",
                dir.join("dockerd.log").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        daemon
    }

    fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker").env("DOCKER_HOST", self.host()).args(args).output().expect("docker runs")
    }

    fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SIGTERM: dockerd stops the containerd it started before it exits.
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

fn layer() -> Vec<u8> {
    let mut layer = Builder::new(Vec::new());
    tar_add(&mut layer, "bin/", EntryType::Directory, 0o755, b"", None);
    tar_add(&mut layer, "bin/app", EntryType::Regular, 0o755, &bytes(50_000, 11), None);
    layer.into_inner().unwrap()
}

fn config(cmd: &str) -> Value {
    json!({"architecture": "amd64", "os": "linux", "created": "2026-11-30T12:00:00Z",
           "config": {"Cmd": [cmd], "Env": ["PATH=/bin"]}})
}

/// A docker-save archive of one image tagged `tag`.
fn docker_archive(path: &Path, tag: &str, layer: &[u8], config: &Value) {
    use sha2::Digest;
    let mut config = config.clone();
    let diff_id = format!("sha256:{}", hex::encode(sha2::Sha256::digest(layer)));
    config["rootfs"] = json!({"type": "layers", "diff_ids": [diff_id]});
    let manifest = json!([{"Config": "config.json", "RepoTags": [tag], "Layers": ["layer.tar"]}]);
    let mut archive = Builder::new(Vec::new());
    let files = [
        ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        ("config.json", serde_json::to_vec(&config).unwrap()),
        ("layer.tar", layer.to_vec()),
    ];
    for (name, data) in files {
        tar_add(&mut archive, name, EntryType::Regular, 0o644, &data, None);
    }
    std::fs::write(path, archive.into_inner().unwrap()).unwrap();
}

fn build(dir: &Path, uri: &str, docker_host: &str, output: &Path) -> Output {
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join("bzImage"), bytes(30_000, 5)).unwrap();
    std::fs::write(blobs.join("cmdline"), "console=ttyS0\n").unwrap();
    std::fs::write(blobs.join("init"), bytes(4_000, 6)).unwrap();
    Command::new(env!("CARGO_BIN_EXE_carve"))
        .args(["build-enclave", "--docker-uri", uri, "--output-file", output.to_str().unwrap()])
        .args(["--blobs-dir", blobs.to_str().unwrap()])
        .env("DOCKER_HOST", docker_host)
        .env("DOCKER_CONFIG", dir.join("docker-config"))
        .output()
        .unwrap()
}

fn measurements(out: &Output) -> Value {
    assert!(out.status.success(), "{}", stderr(out));
    serde_json::from_slice::<Value>(&out.stdout).unwrap()["Measurements"].clone()
}

#[test]
fn images_a_docker_daemon_has_are_taken_from_it_before_any_registry() {
    let dir = fresh_dir("docker-daemon");
    let daemon = Dockerd::start(&dir);
    let registry = Registry::start(&dir.join("registry"), None);
    let layer = layer();

    // In the daemon only (loaded, never pushed): a name no registry could serve here.
    let archive = dir.join("local.tar");
    docker_archive(&archive, "local-only/app:1", &layer, &config("/bin/app"));
    let loaded = daemon.docker(&["load", "-i", archive.to_str().unwrap()]);
    assert!(loaded.status.success(), "{}", stderr(&loaded));
    let eif = dir.join("local.eif");
    let from_daemon = measurements(&build(&dir, "local-only/app:1", &daemon.host(), &eif));
    let described = Command::new(env!("CARGO_BIN_EXE_carve"))
        .args(["describe-eif", "--eif-path", eif.to_str().unwrap()])
        .output()
        .unwrap();
    let described: Value = serde_json::from_slice(&described.stdout).unwrap();
    assert_eq!(described["ImageName"], "local-only/app");
    // The same image as an archive: the same measurements.
    let from_archive = Command::new(env!("CARGO_BIN_EXE_carve"))
        .args(["build-enclave", "--oci-archive", archive.to_str().unwrap()])
        .args(["--output-file", dir.join("archive.eif").to_str().unwrap()])
        .args(["--blobs-dir", dir.join("blobs").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(measurements(&from_archive), from_daemon);

    // Both have the reference: the daemon's copy wins (its Cmd differs from the registry's).
    let mut layout = OciLayout::new(&dir.join("layout"));
    let pushed =
        layout.image(&[(LAYER_GZIP, gzip(&layer))], std::slice::from_ref(&layer), config("/bin/pushed"));
    layout.tag(&pushed, "1");
    registry.push(&layout, "1", "shared:1", false);
    let uri = format!("{}/shared:1", registry.address);
    let from_registry =
        measurements(&build(&dir, &uri, "unix:///nonexistent/docker.sock", &dir.join("r.eif")));
    let archive = dir.join("shared.tar");
    docker_archive(&archive, &uri, &layer, &config("/bin/app"));
    let loaded = daemon.docker(&["load", "-i", archive.to_str().unwrap()]);
    assert!(loaded.status.success(), "{}", stderr(&loaded));
    let preferred = measurements(&build(&dir, &uri, &daemon.host(), &dir.join("d.eif")));
    assert_eq!(preferred, from_daemon, "the daemon's image was not the one built");
    assert_ne!(preferred["PCR0"], from_registry["PCR0"]);

    // Not in the daemon: pulled from the registry.
    let removed = daemon.docker(&["rmi", &uri]);
    assert!(removed.status.success(), "{}", stderr(&removed));
    assert_eq!(measurements(&build(&dir, &uri, &daemon.host(), &dir.join("p.eif"))), from_registry);
}
