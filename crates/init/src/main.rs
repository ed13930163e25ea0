//! carve's enclave init: PID 1 of a Linux enclave, keeping the contract of AWS's init
//! (aws-nitro-enclaves-sdk-bootstrap `init/init.c`) so images built for Nitro run unchanged:
//!
//! 1. mount /dev, put the console on fds 0–2, load `nsm.ko` if the image carries one;
//! 2. the boot heartbeat: 0xB7 to the parent (CID 3) on vsock port 9000, echoed back;
//! 3. read `/cmd` and `/env`, switch the root to `/rootfs`, mount /proc, /sys, /run, /tmp, …;
//! 4. start the app in its own session and reap every orphan until the app ends;
//! 5. beyond AWS's init: tell the parent how the app ended ("exit N" or "signal S" on vsock
//!    port 47031, which carve's enclave process listens on and acknowledges with one byte), then
//!    reboot, which ends the enclave.
//!
//! Failures print one `carve-init:` line on the console; a failure before the app starts is
//! reported to the parent as exit status 127 where the vsock path still works.

mod config;

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use config::{AppEnd, SEARCH_PATH};

const PARENT_CID: u32 = 3;
const HEARTBEAT_PORT: u32 = 9000;
const HEARTBEAT: u8 = 0xB7;
/// Where the app's end goes (0xB7B7, after the heartbeat byte).
const EXIT_PORT: u32 = 47031;

fn main() {
    // PID 1 takes no signals; the app gets a clean mask (see boot_and_run).
    // SAFETY: sigfillset and sigprocmask only write the set and the mask passed to them.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
    let end = match boot_and_run() {
        Ok(end) => end,
        Err(e) => {
            say(&e);
            AppEnd::Exited(127)
        }
    };
    match &end {
        AppEnd::Exited(0) => {}
        AppEnd::Exited(code) => say(&format!("the app exited with status {code}")),
        AppEnd::Killed(signal) => say(&format!("the app was killed by signal {signal}")),
    }
    if let Err(e) = send_to_parent(EXIT_PORT, end.line().as_bytes()) {
        say(&format!("cannot tell the parent how the app ended: {e}"));
    }
    // SAFETY: sync and reboot take no pointers; reboot ends this enclave (reboot=k).
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
}

fn say(message: &str) {
    let _ = writeln!(std::io::stderr(), "carve-init: {message}");
}

/// Everything up to the app's end; an error is a step that failed, in a sentence.
fn boot_and_run() -> Result<AppEnd, String> {
    mount("dev", "/dev", "devtmpfs", libc::MS_NOSUID | libc::MS_NOEXEC, None)?;
    console()?;
    load_nsm_module()?;
    heartbeat().map_err(|e| format!("the boot heartbeat to the parent failed: {e}"))?;
    let cmd = take_file("/cmd")?;
    let env = take_file("/env")?;
    let (argv, envp) = config::app(&cmd, &env);
    enter_rootfs()?;
    let program =
        resolve(&argv[0]).ok_or_else(|| format!("cannot run '{}': not found in {SEARCH_PATH}", argv[0]))?;
    let mut command = Command::new(&program);
    command.arg0(&argv[0]).args(&argv[1..]).env_clear().current_dir("/");
    for entry in &envp {
        let (key, value) = entry.split_once('=').unwrap_or((entry, ""));
        command.env(key, value);
    }
    // The app starts in its own session with every signal unblocked: a fork keeps PID 1's
    // all-blocked mask, and an app with SIGSEGV or SIGTERM blocked could not die of them.
    // SAFETY: setsid, sigemptyset and sigprocmask are async-signal-safe and write only the
    // local set and the child's own mask.
    unsafe {
        command.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) < 0 || libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let app = command.spawn().map_err(|e| format!("cannot run '{}': {e}", argv[0]))?;
    Ok(reap_until(app.id() as libc::pid_t))
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let c = |s: &str| CString::new(s).expect("no NUL in mount arguments");
    let (source_c, target_c, fstype_c) = (c(source), c(target), c(fstype));
    let data_c = data.map(c);
    let _ = std::fs::create_dir_all(target);
    // SAFETY: every pointer is a NUL-terminated string alive for the call, or null for no data.
    let r = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            flags,
            data_c.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    let error = std::io::Error::last_os_error();
    if r == 0 || error.raw_os_error() == Some(libc::EBUSY) {
        Ok(())
    } else {
        Err(format!("cannot mount {fstype} on {target}: {error}"))
    }
}

/// Standard input, output and error on /dev/console.
fn console() -> Result<(), String> {
    let console = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .map_err(|e| format!("cannot open /dev/console: {e}"))?;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors, which this process owns.
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
    Ok(())
}

/// AWS's kernels carry the NSM driver as a module beside init; carve's has it built in.
fn load_nsm_module() -> Result<(), String> {
    let Ok(module) = std::fs::File::open("nsm.ko") else { return Ok(()) };
    let params = CString::default();
    // SAFETY: finit_module reads the open module file and the empty parameter string.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, module.as_raw_fd(), params.as_ptr(), 0) };
    if r != 0 {
        return Err(format!("failed to insert the nsm driver: {}", std::io::Error::last_os_error()));
    }
    let _ = std::fs::remove_file("nsm.ko");
    Ok(())
}

fn vsock_connect(port: u32) -> std::io::Result<std::fs::File> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nothing else.
    let socket = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: sockaddr_vm is plain data; all zeroes is valid before the fields are set.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = PARENT_CID;
    addr.svm_port = port;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_vm of len bytes for the call's duration.
    if unsafe { libc::connect(socket.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(socket)
}

fn heartbeat() -> std::io::Result<()> {
    let mut socket = vsock_connect(HEARTBEAT_PORT)?;
    socket.write_all(&[HEARTBEAT])?;
    let mut echo = [0u8];
    socket.read_exact(&mut echo)?;
    if echo[0] != HEARTBEAT {
        return Err(std::io::Error::other(format!("the parent answered {:#04x}", echo[0])));
    }
    Ok(())
}

/// Sends `bytes` and waits (briefly) for the parent's one-byte acknowledgement: vsock sends from
/// a kernel worker, and a reboot right after the write could lose what it queued.
fn send_to_parent(port: u32, bytes: &[u8]) -> std::io::Result<()> {
    let mut socket = vsock_connect(port)?;
    socket.write_all(bytes)?;
    let timeout = libc::timeval { tv_sec: 2, tv_usec: 0 };
    // SAFETY: setsockopt reads the timeval for the call's duration.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let mut ack = [0u8];
    match socket.read(&mut ack)? {
        1 => Ok(()),
        _ => Err(std::io::Error::other("the parent closed without acknowledging")),
    }
}

/// Reads and removes one of the files build-enclave leaves in the initramfs root.
fn take_file(path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let _ = std::fs::remove_file(path);
    Ok(text)
}

/// Makes `/rootfs` the root, as AWS's init does (bind it, move it over `/`, chroot), then mounts
/// what the app expects to find.
fn enter_rootfs() -> Result<(), String> {
    mount("/rootfs", "/rootfs", "", libc::MS_BIND | libc::MS_REC, None)?;
    std::env::set_current_dir("/rootfs").map_err(|e| format!("cannot enter /rootfs: {e}"))?;
    mount(".", "/", "", libc::MS_MOVE, None)?;
    std::os::unix::fs::chroot(".").map_err(|e| format!("cannot chroot into /rootfs: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("cannot enter the new root: {e}"))?;

    let hidden = libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC;
    mount("dev", "/dev", "devtmpfs", libc::MS_NOSUID | libc::MS_NOEXEC, None)?;
    mount("proc", "/proc", "proc", hidden, None)?;
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    mount("tmpfs", "/run", "tmpfs", hidden, Some("mode=0755"))?;
    mount("tmpfs", "/tmp", "tmpfs", hidden, None)?;
    mount("shm", "/dev/shm", "tmpfs", hidden, None)?;
    mount("devpts", "/dev/pts", "devpts", libc::MS_NOSUID | libc::MS_NOEXEC, None)?;
    mount("sysfs", "/sys", "sysfs", hidden, None)?;
    Ok(())
}

/// The program for argv[0]: as given when it has a slash, else the first executable on
/// [`SEARCH_PATH`].
fn resolve(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    SEARCH_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Reaps every child (orphans re-parent to PID 1) until `app` ends; returns how it ended.
fn reap_until(app: libc::pid_t) -> AppEnd {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only the status passed to it.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == app {
            return AppEnd::from_wait_status(status);
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            return AppEnd::Exited(127);
        }
    }
}
