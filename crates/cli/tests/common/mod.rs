//! Shared by carve's integration tests: running the binary and finding guests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use carve_guest_images::{path as guest, Format};

pub mod registry;

/// Whether /dev/kvm can be used here. Tests that need it print a clear SKIPPED line otherwise.
pub fn kvm_usable(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            assert!(!real_kvm_required(), "{test}: /dev/kvm is not usable on the real KVM host ({e})");
            eprintln!("SKIPPED {test}: /dev/kvm is not usable here ({e})");
            false
        }
    }
}

/// Set (CARVE_REAL_KVM=1) by scripts/test.sh's phase on the software KVM host: what our
/// nested build hosts lack (CPUID enforcement, Linux user space, nested state) is required.
pub fn real_kvm_required() -> bool {
    std::env::var_os("CARVE_REAL_KVM").is_some_and(|v| v == "1")
}

/// Whether this is the software KVM host of scripts/kvm-host.sh (QEMU's TCG CPU with SVM), whose
/// emulation has gaps of its own (docs/kvm-host.md).
pub fn qemu_tcg_host() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| info.contains("QEMU TCG CPU"))
}

pub fn carve(args: &[&str]) -> Output {
    // (the reproducible-builds convention would pin the build time tests compare)
    Command::new(env!("CARGO_BIN_EXE_carve"))
        .args(args)
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .expect("carve runs")
}

/// `carve ARGS`, killed after `limit` (status 124, as coreutils' timeout reports it): for guests
/// whose failure mode is a hang.
pub fn carve_within(limit: Duration, args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["--kill-after=5", &limit.as_secs().to_string(), env!("CARGO_BIN_EXE_carve")])
        .args(args)
        .output()
        .expect("timeout runs carve")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the guest test passed (debug-exit 0, process status 1) and shows its output if not.
pub fn assert_guest_passed(out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "guest test failed:\n--- serial ---\n{}\n--- stderr ---\n{}",
        stdout(out),
        stderr(out)
    );
    assert!(!stdout(out).contains("FAIL"), "{}", stdout(out));
}

pub fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("carve-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// FNV-1a, as the guest runtime computes it.
pub fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

/// Appends one entry (fixed mtime, so archives are reproducible) to a tar being built.
pub fn tar_add(
    builder: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    data: &[u8],
    link: Option<&str>,
) {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(data.len() as u64);
    header.set_mtime(1_700_000_000);
    if let Some(link) = link {
        header.set_link_name(link).unwrap();
    }
    builder.append_data(&mut header, path, data).unwrap();
}

/// Deterministic pseudo-random bytes.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Kills the VM if a test fails before it ends.
pub struct Vm(pub Option<Child>);

impl Vm {
    /// `carve vm run` with `image` (`--kernel PATH` or `--demo`) and a vsock device.
    pub fn start(image: &[&str], uds: &Path, cid: u32, extra: &[&str]) -> Vm {
        Vm::start_with_vsock(image, &format!("cid={cid},uds={}", uds.display()), extra)
    }

    /// As [`Vm::start`], with the whole `--vsock` value.
    pub fn start_with_vsock(image: &[&str], vsock: &str, extra: &[&str]) -> Vm {
        let child = Command::new(env!("CARGO_BIN_EXE_carve"))
            .args(["vm", "run"])
            .args(image)
            .args(["--vsock", vsock])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("carve starts");
        Vm(Some(child))
    }

    /// The carve process's ID.
    pub fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    pub fn wait(mut self) -> std::process::Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }

    /// Kills the VM (if it still runs) and returns what it printed.
    pub fn wait_after_kill(mut self) -> std::process::Output {
        let mut child = self.0.take().unwrap();
        let _ = child.kill();
        child.wait_with_output().unwrap()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn sum64(data: &[u8]) -> u64 {
    data.chunks(8).fold(0u64, |sum, c| {
        let mut word = [0u8; 8];
        word[..c.len()].copy_from_slice(c);
        sum.wrapping_add(u64::from_le_bytes(word))
    })
}

pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = temp_path(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Connects through the hybrid socket: `CONNECT port` → `OK host_port`, or None when refused.
pub fn connect_guest(uds: &Path, port: u32) -> Option<(UnixStream, u32)> {
    let deadline = Instant::now() + TIMEOUT;
    let stream = loop {
        match UnixStream::connect(uds) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("cannot reach {}: {e}", uds.display()),
        }
    };
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    (&stream).write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8];
    while (&stream).read(&mut byte).ok()? == 1 {
        line.push(byte[0]);
        if byte[0] == b'\n' {
            let text = String::from_utf8(line).unwrap();
            let host_port = text.strip_prefix("OK ")?.trim().parse().ok()?;
            return Some((stream, host_port));
        }
    }
    None
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().expect("openssl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A P-384 key and a self-signed certificate valid only on 2020-01-01 (`openssl ca`, which
/// OpenSSL 3.0 needs to set dates in the past).
pub fn expired_signer(dir: &Path, name: &str) -> (String, String) {
    let path = |suffix: &str| dir.join(format!("{name}.{suffix}")).to_str().unwrap().to_string();
    let (key, cert, csr, config) = (path("key"), path("pem"), path("csr"), path("cnf"));
    std::fs::write(path("index"), "").unwrap();
    std::fs::write(path("serial"), "01\n").unwrap();
    let ca = format!(
        "[ca]\ndefault_ca = own\n[own]\ndatabase = {}\nserial = {}\nnew_certs_dir = {}\n\
         default_md = sha384\npolicy = any\n[any]\norganizationName = optional\ncommonName = supplied\n",
        path("index"),
        path("serial"),
        dir.display()
    );
    std::fs::write(&config, ca).unwrap();
    openssl(&["ecparam", "-name", "secp384r1", "-genkey", "-noout", "-out", &key]);
    openssl(&["req", "-new", "-key", &key, "-out", &csr, "-subj", "/O=carve/CN=expired"]);
    openssl(&[
        "ca",
        "-batch",
        "-notext",
        "-selfsign",
        "-config",
        &config,
        "-keyfile",
        &key,
        "-in",
        &csr,
        "-out",
        &cert,
        "-startdate",
        "20200101000000Z",
        "-enddate",
        "20200102000000Z",
    ]);
    (key, cert)
}

/// A P-384 key and a self-signed certificate for it (openssl as the fixture generator).
pub fn signer(dir: &Path, name: &str) -> (String, String) {
    let key = dir.join(format!("{name}.key")).to_str().unwrap().to_string();
    let cert = dir.join(format!("{name}.pem")).to_str().unwrap().to_string();
    openssl(&["ecparam", "-name", "secp384r1", "-genkey", "-noout", "-out", &key]);
    openssl(&[
        "req",
        "-new",
        "-x509",
        "-key",
        &key,
        "-out",
        &cert,
        "-days",
        "7",
        "-subj",
        "/O=carve/CN=tests",
    ]);
    (key, cert)
}

/// The `tick …` lines a ticking test guest (persist, nested) has written to its serial file.
pub fn ticks(serial: &Path) -> Vec<String> {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("tick "))
        .map(String::from)
        .collect()
}

/// Waits until `serial` shows `count` tick lines (the `persist` guest's), failing after
/// [`TIMEOUT`] with what it shows.
pub fn wait_for_ticks(serial: &Path, count: usize) {
    let start = Instant::now();
    while ticks(serial).len() < count {
        assert!(start.elapsed() < TIMEOUT, "no tick {count} in time: {:?}", std::fs::read_to_string(serial));
        thread::sleep(Duration::from_millis(20));
    }
}

/// A test path as the `&str` a command line takes.
pub fn path(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}
