//! AWS's vsock-proxy on carve: enclaves reach a TCP server outside through the parent. Where
//! AWS's binds AF_VSOCK CID 3 port P, carve's listens where every enclave's connections to parent
//! port P arrive (`<run dir>/vsock_P`, [`RunDir::shared_vsock_prefix`]), so one proxy serves
//! every enclave, started before them or after. The allowlist, its checks and the texts of
//! failures are vsock-proxy 1.0's; where carve differs (docs/nitro-cli-differences.md) it is
//! to keep a proxy running or to refuse what vsock-proxy would silently misread.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::run_dir::{self, RunDir};

/// vsock-proxy's default allowlist.
pub const DEFAULT_CONFIG: &str = "/etc/nitro_enclaves/vsock-proxy.yaml";

/// Which addresses of the remote a proxy uses (`-4`, `-6`, or either, IPv4 first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpFamily {
    Any,
    V4,
    V6,
}

/// What a proxy serves: its vsock port, the remote, how many connections at once.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub local_port: u32,
    pub remote_addr: String,
    pub remote_port: u16,
    pub family: IpFamily,
    pub workers: usize,
}

/// Checks the remote against the allowlist at `path` as vsock-proxy does, once at start: the
/// remote is resolved first (its first address); an entry with the same port matches when its
/// address is the same text, or resolves (errors ignored) to that address.
pub fn check_allowlist(path: &Path, config: &ProxyConfig) -> Result<IpAddr, String> {
    let mut file = std::fs::File::open(path).map_err(|_| "Could not open the file".to_string())?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(|_| "Could not read the file".to_string())?;
    let yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).map_err(|_| "Bad yaml format".to_string())?;
    // (an empty file is no document at all: vsock-proxy panics on it)
    let entries = yaml.get("allowlist").and_then(|a| a.as_sequence()).ok_or("No allowlist field")?;
    let remote = first_address(&config.remote_addr, config.family)?;
    for entry in entries {
        let address = entry.get("address").and_then(|a| a.as_str()).ok_or("No address field")?;
        // (vsock-proxy truncates a port past 65535 to 16 bits; carve refuses it)
        let port = entry
            .get("port")
            .and_then(|p| p.as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .ok_or("No port field or invalid type")?;
        if port != config.remote_port {
            continue;
        }
        if address == config.remote_addr {
            log::info!("Matched with host name \"{address}\" and port \"{port}\"");
            return Ok(remote);
        }
        match resolve(address, config.family) {
            Ok(addresses) if addresses.contains(&remote) => {
                log::info!("Matched with host IP \"{remote}\" and port \"{port}\"");
                return Ok(remote);
            }
            Ok(_) => {}
            Err(_) => log::warn!("Unable to resolve allow listed host: {address:?}."),
        }
    }
    Err("The given address and port are not allowed".into())
}

/// `host`'s addresses of `family`, IPv4 first as vsock-proxy's resolver orders them, through
/// the system's resolver (/etc/hosts, then DNS).
pub fn resolve(host: &str, family: IpFamily) -> Result<Vec<IpAddr>, String> {
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let mut addresses: Vec<IpAddr> = match literal.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => {
            let ascii = idna::domain_to_ascii(host).map_err(|_| "Could not parse domain name".to_string())?;
            (ascii.as_str(), 0)
                .to_socket_addrs()
                .map_err(|_| "DNS lookup failed!".to_string())?
                .map(|a| a.ip())
                .collect()
        }
    };
    if addresses.is_empty() {
        return Err("DNS lookup returned no IP addresses!".into());
    }
    addresses.sort_by_key(IpAddr::is_ipv6);
    addresses.dedup();
    addresses.retain(|ip| match family {
        IpFamily::Any => true,
        IpFamily::V4 => ip.is_ipv4(),
        IpFamily::V6 => ip.is_ipv6(),
    });
    if addresses.is_empty() {
        return Err("No accepted IP was found.".into());
    }
    Ok(addresses)
}

fn first_address(host: &str, family: IpFamily) -> Result<IpAddr, String> {
    resolve(host, family).map(|addresses| addresses[0])
}

/// The listener for every enclave's connections to parent port `port`, in `run_dir`, open to
/// every enclave process (nitro-cli's sockets are 0766 too). A lock file held for the
/// listener's life tells a live proxy from a socket file a killed one left (taken over); the
/// socket is bound under a name of its own and moved into place once it listens, so nothing
/// connecting sees it before.
pub fn listen(run_dir: &RunDir, port: u32) -> Result<Listener, String> {
    let path = run_dir::port_socket(&run_dir.shared_vsock_prefix(), port);
    let lock_path = path.with_extension("lock");
    let failed = |e: &dyn std::fmt::Display| {
        format!("Could not bind to cid: 3 port: {port} ({}: {e})", path.display())
    };
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| failed(&e))?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(failed(&"another vsock-proxy serves this port"));
    }
    let binding = path.with_extension(format!("binding.{}", std::process::id()));
    let _ = std::fs::remove_file(&binding);
    let bound = UnixListener::bind(&binding).and_then(|listener| {
        std::fs::set_permissions(&binding, std::fs::Permissions::from_mode(0o766))?;
        std::fs::rename(&binding, &path)?;
        Ok(listener)
    });
    match bound {
        Ok(listener) => {
            log::info!("Bound to cid: 3 port: {port} ({})", path.display());
            Ok(Listener { listener, path, lock_path, _lock: lock })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&binding);
            Err(failed(&e))
        }
    }
}

/// A bound proxy listener; its socket and lock files go when it does.
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
    lock_path: PathBuf,
    _lock: std::fs::File,
}

impl Listener {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The files it made: its socket and its lock.
    pub fn files(&self) -> [PathBuf; 2] {
        [self.path.clone(), self.lock_path.clone()]
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// The enclave end of a connection: carve's vsock device connects from the abstract address
/// `carve/vsock/<CID>/<port>/<parent port>` (docs/vsock.md).
fn enclave_end(stream: &UnixStream) -> String {
    let named = stream.peer_addr().ok().and_then(|a| a.as_abstract_name().map(<[u8]>::to_vec));
    let text = named.map(|n| String::from_utf8_lossy(&n).into_owned()).unwrap_or_default();
    let mut parts = text.strip_prefix("carve/vsock/").unwrap_or_default().split('/');
    match (parts.next(), parts.next()) {
        (Some(cid), Some(port)) => format!("cid: {cid} port: {port}"),
        _ => "an unnamed enclave end".into(),
    }
}

/// Serves forever: each accepted connection goes to a worker once one is free (a bounded
/// number wait; past that, accepting waits too and the kernel's backlog holds the rest), and is
/// relayed to the remote, resolved again for it. Returns only when accepting fails for good.
pub fn serve(listener: &Listener, config: &ProxyConfig) -> String {
    log::info!("Proxy is now in listening state");
    let (queue, jobs) = mpsc::sync_channel::<(UnixStream, String)>(config.workers.saturating_mul(16));
    let jobs = Arc::new(Mutex::new(jobs));
    for n in 0..config.workers {
        let (jobs, config) = (jobs.clone(), config.clone());
        let spawned = std::thread::Builder::new().name(format!("vsock-proxy-{n}")).spawn(move || loop {
            let job = jobs.lock().map(|jobs| jobs.recv());
            match job {
                Ok(Ok((client, from))) => relay_one(client, &from, &config),
                _ => return,
            }
        });
        if let Err(e) = spawned {
            return format!("Could not create proxy: {e}");
        }
    }
    loop {
        let client = match listener.listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // Out of descriptors or a connection gone before it was taken: this one is lost,
            // the proxy is not.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ECONNABORTED)) => {
                log::warn!("Could not accept a connection: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => return format!("Could not accept connection: {e}"),
        };
        let from = enclave_end(&client);
        log::info!("Accepted connection on {from}");
        if queue.send((client, from)).is_err() {
            return "Could not accept connection: no worker is left".into();
        }
    }
}

/// How long a connect to the remote may take before the enclave's connection is given up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

fn relay_one(client: UnixStream, from: &str, config: &ProxyConfig) {
    // Resolved for each connection (a name's addresses may change); vsock-proxy caches them for
    // the record's TTL and exits when a lookup fails, carve closes that one connection.
    let remote = match first_address(&config.remote_addr, config.family) {
        Ok(ip) => SocketAddr::new(ip, config.remote_port),
        Err(e) => {
            log::error!("Could not resolve {}: {e}; connection from {from} closed", config.remote_addr);
            return;
        }
    };
    let server = match TcpStream::connect_timeout(&remote, CONNECT_TIMEOUT) {
        Ok(server) => server,
        Err(e) => {
            log::error!("Could not create connection: Could not connect to {remote}: {e}");
            return;
        }
    };
    log::info!("Connected client from {from} to {remote}");
    relay(&client, &server);
    log::info!("Client on {from} disconnected");
}

/// Copies both ways until both ends are done; an end of stream is passed on as a half-close,
/// so request-then-answer protocols work; a failure either way ends both.
fn relay(client: &UnixStream, server: &TcpStream) {
    fn pump(from: &mut impl Read, to: &mut impl Write, close_write: impl Fn(), abort: impl Fn()) {
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) => return close_write(),
                Ok(n) if to.write_all(&buf[..n]).is_ok() => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                _ => return abort(),
            }
        }
    }
    let abort = || {
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
    };
    std::thread::scope(|scope| {
        scope.spawn(|| pump(&mut &*server, &mut &*client, || drop(client.shutdown(Shutdown::Write)), abort));
        pump(&mut &*client, &mut &*server, || drop(server.shutdown(Shutdown::Write)), abort);
    });
}
