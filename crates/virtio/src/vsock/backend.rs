//! The vsock device's engine: moves packets between the guest's queues and host Unix sockets.
//!
//! Runs on the VMM's event loop. Every socket is registered edge-triggered once; readiness is
//! remembered per connection (`host_readable`), so a connection that cannot be served now (no
//! guest credit, no receive buffers) costs nothing until the guest gives credit or buffers.
//!
//! The VMM may take the backend off its event loop (pause) and put it back (resume): `init`
//! registers every descriptor the backend holds at that moment — the queue and command
//! eventfds, the listener, the timer (all level-triggered, so what they counted meanwhile
//! fires) and every socket (edge-triggered; epoll reports an already-ready descriptor once when
//! it is added, and `init` also marks every connection readable and wakes the backend, so
//! nothing that arrived while it was parked waits for another edge).

use crate::GuestRam;
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use socket2::{Domain, SockAddr, Socket, Type};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, ReadVolatile, VolatileMemoryError};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnKey, Connection, State};
use super::proto::*;
use super::{VsockError, EVENTS, HOST_CID, PARENT_CID, RX, TX};
use crate::fault::FaultLog;
use crate::link::{Command, CommandReceiver};
use crate::mmio::QueueConfig;
use crate::state::VsockState;
use crate::DeviceSignals;

/// Largest payload carve takes in one guest packet (Linux sends at most 64 KiB).
const MAX_PKT_DATA: u32 = 64 * 1024;
/// Connections one guest may hold open at once.
const MAX_CONNECTIONS: usize = 1024;
/// Control packets (RST, RESPONSE, credit) waiting for receive buffers; a guest that never
/// gives buffers cannot make carve hold more.
const MAX_CONTROL_BACKLOG: usize = 4096;
/// Host-initiated connections get parent-side ports from here up, as in Firecracker.
pub(crate) const FIRST_HOST_PORT: u32 = 1 << 30;
/// `struct virtio_vsock_event`'s only event (virtio 1.2 §5.10.6.5): the device lost every
/// connection; the driver resets its sockets and reads the guest CID again.
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Bytes of `struct virtio_vsock_event` (`le32 id`).
const EVENT_SIZE: usize = 4;
/// How long a host connection waits for the guest to accept, as in Firecracker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const TIMER_TICK: Duration = Duration::from_millis(250);
/// "CONNECT 4294967295\n" and some slack.
const MAX_CONNECT_LINE: usize = 32;

const NAME: &str = "virtio-vsock";

/// What the device did; read by benchmarks and logged when the VM ends.
#[derive(Debug, Default)]
pub struct VsockStats {
    pub bytes_to_guest: AtomicU64,
    pub bytes_from_guest: AtomicU64,
    pub connections: AtomicU64,
}

/// A packet carve sends the guest without payload.
struct Control {
    host_port: u32,
    guest_port: u32,
    /// Source CID: the parent, or whatever CID a refused packet was addressed to.
    peer_cid: u64,
    op: u16,
    flags: u32,
}

/// The fields of a packet the guest sent.
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

enum Role {
    /// Accepted on the host socket, waiting for its `CONNECT <port>` line.
    Handshake(UnixStream, Vec<u8>),
    /// Asked for guest `port` before the driver was ready; connects once it is.
    Waiting(UnixStream, u32),
    Conn(ConnKey),
}

struct Active {
    queues: Vec<Queue>,
    signals: Arc<DeviceSignals>,
}

struct Peer {
    conn: Connection,
    /// The host socket may have data (edge seen, no WouldBlock since).
    host_readable: bool,
    in_ready: bool,
    host_write_shut: bool,
    /// A host-initiated connection the guest has not answered is reset after this.
    connect_deadline: Option<Instant>,
    /// The CID carve answers as: the one the guest connected to (the host, 2, or the parent,
    /// 3); the parent's for connections the host starts. Linux drops replies from another.
    host_cid: u64,
}

impl Peer {
    fn new(conn: Connection, connect_deadline: Option<Instant>, host_cid: u64) -> Peer {
        // Assume data may be waiting: a read that would block just clears it.
        Peer {
            conn,
            host_readable: true,
            in_ready: false,
            host_write_shut: false,
            connect_deadline,
            host_cid,
        }
    }
}

pub struct VsockBackend {
    cid: u64,
    uds: PathBuf,
    /// Where listeners shared by every VM are (`PREFIX_PORT`), tried after this VM's own.
    shared_listeners: Option<PathBuf>,
    mem: GuestRam,
    queue_events: [EventFd; 3],
    commands: CommandReceiver,
    listener: UnixListener,
    /// Ticks while host connections wait for the guest's answer.
    timer: TimerFd,
    active: Option<Active>,
    roles: HashMap<RawFd, Role>,
    peers: HashMap<ConnKey, Peer>,
    ready: VecDeque<ConnKey>,
    control: VecDeque<Control>,
    next_host_port: u32,
    /// A transport reset the guest has yet to hear of (set by a restore), sent on the event
    /// queue once the driver gives a buffer there.
    reset_event_pending: bool,
    /// Sockets opened or closed while handling an event, registered with epoll afterwards.
    opened: Vec<RawFd>,
    closed: Vec<UnixStream>,
    scratch: Vec<u8>,
    faults: FaultLog,
    stats: Arc<VsockStats>,
}

impl VsockBackend {
    pub(super) fn new(
        cid: u64,
        uds: PathBuf,
        shared_listeners: Option<PathBuf>,
        mem: GuestRam,
        queue_events: [EventFd; 3],
        commands: CommandReceiver,
    ) -> Result<VsockBackend, VsockError> {
        let listener =
            bind_reclaiming_stale(&uds).map_err(|source| VsockError::Listen { path: uds.clone(), source })?;
        listener.set_nonblocking(true).map_err(|source| VsockError::Listen { path: uds.clone(), source })?;
        let timer = TimerFd::new().map_err(|e| VsockError::EventFd(e.into()))?;
        Ok(VsockBackend {
            timer,
            cid,
            uds,
            shared_listeners,
            mem,
            queue_events,
            commands,
            listener,
            active: None,
            roles: HashMap::new(),
            peers: HashMap::new(),
            ready: VecDeque::new(),
            control: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
            reset_event_pending: false,
            opened: Vec::new(),
            closed: Vec::new(),
            scratch: vec![0; MAX_PKT_DATA as usize],
            faults: FaultLog::default(),
            stats: Arc::default(),
        })
    }

    pub fn stats(&self) -> Arc<VsockStats> {
        self.stats.clone()
    }

    fn handle(&mut self, fd: RawFd, set: EventSet) {
        if fd == self.commands.fd() {
            self.apply_commands();
            self.process_tx();
        } else if fd == self.queue_events[TX].as_raw_fd() {
            let _ = self.queue_events[TX].read();
            self.process_tx();
        } else if fd == self.queue_events[RX].as_raw_fd() || fd == self.queue_events[EVENTS].as_raw_fd() {
            // New receive or event buffers: fill_rx and deliver_events below use them.
            let _ = self.queue_events[RX].read();
            let _ = self.queue_events[EVENTS].read();
        } else if fd == self.listener.as_raw_fd() {
            self.accept();
        } else if fd == self.timer.as_raw_fd() {
            self.expire_connects();
        } else {
            match self.roles.get(&fd) {
                Some(Role::Handshake(..)) => self.handshake(fd),
                Some(&Role::Conn(key)) => self.socket_ready(key, set),
                Some(Role::Waiting(..)) | None => {}
            }
        }
        self.fill_rx();
        self.deliver_events();
    }

    /// Takes what the transport sent: the driver's queues at DRIVER_OK, or a reset.
    fn apply_commands(&mut self) {
        for command in self.commands.drain() {
            match command {
                Command::Activate { queues, signals } => {
                    self.active = Some(Active { queues, signals });
                    let waiting: Vec<RawFd> = self
                        .roles
                        .iter()
                        .filter(|(_, r)| matches!(r, Role::Waiting(..)))
                        .map(|(fd, _)| *fd)
                        .collect();
                    for fd in waiting {
                        if let Some(Role::Waiting(stream, port)) = self.roles.remove(&fd) {
                            self.host_connect(fd, stream, port);
                        }
                    }
                }
                Command::Reset => self.reset(),
            }
        }
    }

    /// The state a snapshot keeps, and the running queues (with the device's positions in
    /// them). Commands the event loop has not taken yet are applied first, so the queues are
    /// those the transport last handed over; the loop is woken to serve them once it runs.
    pub(crate) fn save_parts(&mut self) -> (VsockState, Option<Vec<QueueConfig>>) {
        self.apply_commands();
        self.commands.wake();
        let queues = self.active.as_ref().map(|a| a.queues.iter().map(|q| q.state().into()).collect());
        (VsockState { cid: self.cid, next_host_port: self.next_host_port }, queues)
    }

    /// Continues from a snapshot, once the restored transport has handed over its queues: no
    /// connection survives, so a running device owes the guest a transport reset. Notifications
    /// the guest gave the old process are gone with its eventfds; the backend is woken to look
    /// at its queues once the event loop runs.
    pub(crate) fn restored(&mut self, state: &VsockState) {
        self.next_host_port = state.next_host_port;
        self.apply_commands();
        self.reset_event_pending = self.active.is_some();
        self.commands.wake();
    }

    /// Tells the guest of a transport reset in its next event buffer, if one is owed.
    fn deliver_events(&mut self) {
        let mut used = false;
        while self.reset_event_pending {
            let Some(active) = self.active.as_mut() else { return };
            let Some(chain) = active.queues[EVENTS].pop_descriptor_chain(&self.mem) else { break };
            let head = chain.head_index();
            let mut written = 0;
            for descriptor in chain {
                if descriptor.is_write_only() && descriptor.len() as usize >= EVENT_SIZE {
                    let event = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
                    if self.mem.write_slice(&event, descriptor.addr()).is_ok() {
                        written = EVENT_SIZE as u32;
                    }
                    break;
                }
            }
            if active.queues[EVENTS].add_used(&self.mem, head, written).is_err() {
                return self.broken_queue("event");
            }
            used = true;
            if written > 0 {
                log::debug!(target: "carve::virtio", "{NAME}: told the guest of the transport reset");
                self.reset_event_pending = false;
            } else {
                self.fault("event-chain", "dropped an event buffer that cannot take an event");
            }
        }
        if used {
            self.notify_guest(EVENTS);
        }
    }

    /// The driver reset the device: every connection ends, listeners stay.
    fn reset(&mut self) {
        self.reset_event_pending = false;
        self.active = None;
        for (_, peer) in self.peers.drain() {
            self.closed.push(peer.conn.stream);
        }
        for (_, role) in self.roles.drain() {
            if let Role::Handshake(stream, _) | Role::Waiting(stream, _) = role {
                self.closed.push(stream);
            }
        }
        self.ready.clear();
        self.control.clear();
    }

    fn fault(&mut self, kind: &'static str, what: impl std::fmt::Display) {
        self.faults.report(NAME, kind, what);
    }

    // ---- guest → host ----

    fn process_tx(&mut self) {
        let mut used = false;
        loop {
            let Some(active) = self.active.as_mut() else { return };
            let Some(mut chain) = active.queues[TX].pop_descriptor_chain(&self.mem) else { break };
            let head = chain.head_index();
            let parsed = match VsockPacket::from_tx_virtq_chain(&self.mem, &mut chain, MAX_PKT_DATA) {
                Ok(packet) => {
                    let header = header_of(&packet);
                    let len = header.len as usize;
                    match packet.data_slice() {
                        Some(data) if len > 0 => data
                            .copy_to(&mut self.scratch[..len])
                            .eq(&len)
                            .then_some(header)
                            .ok_or_else(|| "its payload could not be read".to_string()),
                        _ => Ok(header),
                    }
                }
                Err(e) => Err(format!("{e:?}")),
            };
            let added = active.queues[TX].add_used(&self.mem, head, 0);
            used = true;
            if added.is_err() {
                self.broken_queue("transmit");
                return;
            }
            match parsed {
                Ok(header) => self.handle_packet(header),
                Err(e) => {
                    self.fault("tx-chain", format_args!("dropped a malformed transmit descriptor chain: {e}"))
                }
            }
        }
        // A kick with nothing new (or a spurious one) must not interrupt the guest.
        if used {
            self.notify_guest(TX);
        }
    }

    fn handle_packet(&mut self, h: Header) {
        if h.src_cid != self.cid {
            let cid = self.cid;
            self.fault(
                "spoofed-cid",
                format_args!("dropped a packet claiming source CID {} (the guest is {cid})", h.src_cid),
            );
            return;
        }
        let key = ConnKey { host_port: h.dst_port, guest_port: h.src_port };
        if h.dst_cid != PARENT_CID && h.dst_cid != HOST_CID {
            self.refuse(&h, key);
            return;
        }
        if h.type_ != TYPE_STREAM {
            self.fault(
                "socket-type",
                format_args!("refused a packet of socket type {}; only streams are supported", h.type_),
            );
            self.refuse(&h, key);
            return;
        }
        if h.op == OP_REQUEST {
            self.guest_connect(key, &h);
            return;
        }
        let Some(peer) = self.peers.get_mut(&key) else {
            self.refuse(&h, key);
            return;
        };
        peer.conn.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        match h.op {
            OP_RESPONSE if peer.conn.state == State::Connecting => {
                peer.conn.state = State::Established;
                peer.connect_deadline = None;
                let line = format!("OK {}\n", key.host_port);
                // A fresh socket's buffer takes a short line whole.
                if peer.conn.stream.write_all(line.as_bytes()).is_err() {
                    self.reset_connection(key);
                    return;
                }
                self.stats.connections.fetch_add(1, Ordering::Relaxed);
            }
            OP_RST => {
                log::debug!(target: "carve::virtio", "{NAME}: guest port {} reset its connection", key.guest_port);
                self.close(key);
                return;
            }
            OP_SHUTDOWN => {
                log::debug!(
                    target: "carve::virtio",
                    "{NAME}: guest port {} shut down toward host port {} (flags {:#x})",
                    key.guest_port,
                    key.host_port,
                    h.flags
                );
                peer.conn.guest_rcv_shut |= h.flags & SHUTDOWN_RCV != 0;
                peer.conn.guest_send_shut |= h.flags & SHUTDOWN_SEND != 0;
                if peer.conn.guest_rcv_shut && peer.conn.guest_send_shut {
                    peer.conn.state = State::Closing;
                }
                self.after_forward(key);
                return;
            }
            OP_RW if peer.conn.state != State::Connecting && !peer.conn.guest_send_shut => {
                let len = h.len as usize;
                if !peer.conn.accepts(len) {
                    self.fault("credit", "the guest sent more than the credit carve gave; connection reset");
                    self.reset_connection(key);
                    return;
                }
                self.stats.bytes_from_guest.fetch_add(len as u64, Ordering::Relaxed);
                if let Err(e) = peer.conn.forward(&self.scratch[..len]) {
                    log::debug!(target: "carve::virtio", "{NAME}: host port {} failed: {e}", key.host_port);
                    self.reset_connection(key);
                    return;
                }
                self.after_forward(key);
                return;
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.send_control(key, OP_CREDIT_UPDATE, 0),
            op => {
                self.fault("op", format_args!("reset a connection after an unexpected operation {op}"));
                self.reset_connection(key);
                return;
            }
        }
        self.requeue_if_readable(key);
    }

    /// Answers a packet for no connection (or to nobody carve serves) with RST.
    fn refuse(&mut self, h: &Header, key: ConnKey) {
        log::debug!(
            target: "carve::virtio",
            "{NAME}: refused op {} from guest port {} to port {}: no such connection",
            h.op,
            key.guest_port,
            key.host_port
        );
        if h.op != OP_RST {
            let control = Control {
                host_port: key.host_port,
                guest_port: key.guest_port,
                peer_cid: h.dst_cid,
                op: OP_RST,
                flags: 0,
            };
            self.push_control(control);
        }
    }

    fn guest_connect(&mut self, key: ConnKey, h: &Header) {
        if self.peers.contains_key(&key) {
            self.fault("duplicate-request", "reset a connection the guest requested twice");
            self.reset_connection(key);
            return;
        }
        if self.peers.len() >= MAX_CONNECTIONS {
            self.fault(
                "connections",
                format_args!("refused a connection beyond {MAX_CONNECTIONS} open ones"),
            );
            self.refuse(h, key);
            return;
        }
        // Connecting to a listening Unix socket completes at once or fails (then RST), and never
        // waits: a listener whose backlog the guest filled must not stall the event loop. This
        // VM's own listener for the port comes first, then the one shared by every VM.
        // (the process ID keeps two VMs given the same CID apart)
        let from =
            format!("carve/vsock/{}/{}/{}/{}", self.cid, key.guest_port, key.host_port, std::process::id());
        let connected = connect_nonblocking(&port_path(&self.uds, key.host_port), &from).or_else(|e| {
            match &self.shared_listeners {
                Some(shared) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                    connect_nonblocking(&port_path(shared, key.host_port), &from)
                }
                _ => Err(e),
            }
        });
        let Ok(stream) = connected else { return self.refuse(h, key) };
        let mut conn = Connection::new(stream, State::Established);
        conn.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        self.register(key, conn, h.dst_cid);
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.send_control(key, OP_RESPONSE, 0);
    }

    fn register(&mut self, key: ConnKey, conn: Connection, host_cid: u64) {
        let fd = conn.stream.as_raw_fd();
        self.roles.insert(fd, Role::Conn(key));
        self.opened.push(fd);
        self.peers.insert(key, Peer::new(conn, None, host_cid));
        self.requeue_if_readable(key);
    }

    /// After guest data went out (or a shutdown came in): announce credit, pass shutdowns on.
    fn after_forward(&mut self, key: ConnKey) {
        let Some(peer) = self.peers.get_mut(&key) else { return };
        if peer.conn.has_pending_out() {
            return;
        }
        if peer.conn.state == State::Closing {
            // The guest closed both ways and everything it sent is delivered.
            self.reset_connection(key);
            return;
        }
        if peer.conn.guest_send_shut && !peer.host_write_shut {
            peer.host_write_shut = true;
            let _ = peer.conn.stream.shutdown(Shutdown::Write);
        }
        if peer.conn.owes_credit_update() {
            self.send_control(key, OP_CREDIT_UPDATE, 0);
        }
    }

    // ---- host → guest ----

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.roles.insert(fd, Role::Handshake(stream, Vec::new()));
                    self.opened.push(fd);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line a byte at a time, so no payload after it is consumed.
    fn handshake(&mut self, fd: RawFd) {
        let Some(Role::Handshake(stream, line)) = self.roles.get_mut(&fd) else { return };
        let mut byte = [0u8; 1];
        let port = loop {
            match stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(line),
                Ok(1) if line.len() < MAX_CONNECT_LINE => line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                _ => break None,
            }
        };
        let Some(Role::Handshake(stream, _)) = self.roles.remove(&fd) else { unreachable!() };
        match port {
            Some(port) if self.active.is_some() => self.host_connect(fd, stream, port),
            Some(port) => {
                self.roles.insert(fd, Role::Waiting(stream, port));
            }
            // Not a request line: close, as Firecracker does.
            None => self.closed.push(stream),
        }
    }

    /// Sends the guest a REQUEST for a host socket that asked for `guest_port`.
    fn host_connect(&mut self, fd: RawFd, stream: UnixStream, guest_port: u32) {
        if self.peers.len() >= MAX_CONNECTIONS {
            self.closed.push(stream);
            return;
        }
        let key = ConnKey { host_port: self.allocate_host_port(guest_port), guest_port };
        self.roles.insert(fd, Role::Conn(key));
        let conn = Connection::new(stream, State::Connecting);
        self.peers.insert(key, Peer::new(conn, Some(Instant::now() + CONNECT_TIMEOUT), PARENT_CID));
        self.send_control(key, OP_REQUEST, 0);
        if !self.timer.is_armed().unwrap_or(true) {
            let _ = self.timer.reset(TIMER_TICK, Some(TIMER_TICK));
        }
    }

    /// Resets host connections the guest left unanswered; stops the timer when none wait.
    fn expire_connects(&mut self) {
        let _ = self.timer.wait();
        let now = Instant::now();
        let mut waiting = false;
        let expired: Vec<ConnKey> = self
            .peers
            .iter()
            .filter(|(_, p)| p.conn.state == State::Connecting)
            .filter_map(|(key, p)| {
                let expired = p.connect_deadline.is_some_and(|d| d <= now);
                waiting |= !expired;
                expired.then_some(*key)
            })
            .collect();
        for key in expired {
            self.reset_connection(key);
        }
        if !waiting {
            let _ = self.timer.clear();
        }
    }

    fn allocate_host_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let port = self.next_host_port;
            self.next_host_port = self.next_host_port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.peers.contains_key(&ConnKey { host_port: port, guest_port }) {
                return port;
            }
        }
    }

    fn socket_ready(&mut self, key: ConnKey, set: EventSet) {
        let Some(peer) = self.peers.get_mut(&key) else { return };
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR) {
            peer.host_readable = true;
        }
        if set.intersects(EventSet::OUT | EventSet::ERROR) && peer.conn.has_pending_out() {
            if peer.conn.flush().is_err() {
                self.reset_connection(key);
                return;
            }
            self.after_forward(key);
        }
        self.requeue_if_readable(key);
    }

    fn requeue_if_readable(&mut self, key: ConnKey) {
        if let Some(peer) = self.peers.get_mut(&key) {
            if peer.host_readable
                && !peer.in_ready
                && peer.conn.wants_host_data()
                && peer.conn.peer_credit() > 0
            {
                peer.in_ready = true;
                self.ready.push_back(key);
            }
        }
    }

    /// Fills receive buffers: control packets first, then host data round-robin.
    fn fill_rx(&mut self) {
        let mut used = false;
        loop {
            let Some(active) = self.active.as_mut() else { return };
            if self.control.is_empty() && self.ready.is_empty() {
                break;
            }
            let Some(mut chain) = active.queues[RX].pop_descriptor_chain(&self.mem) else { break };
            let head = chain.head_index();
            let mut packet = match VsockPacket::from_rx_virtq_chain(&self.mem, &mut chain, MAX_PKT_DATA) {
                Ok(packet) => packet,
                Err(e) => {
                    let _ = active.queues[RX].add_used(&self.mem, head, 0);
                    used = true;
                    self.fault(
                        "rx-chain",
                        format_args!("dropped a malformed receive descriptor chain: {e:?}"),
                    );
                    continue;
                }
            };
            let written = if let Some(control) = self.control.pop_front() {
                let credit = self
                    .peers
                    .get_mut(&ConnKey { host_port: control.host_port, guest_port: control.guest_port });
                let (buf_alloc, fwd_cnt) = credit.map_or((0, 0), |peer| peer.conn.credit_fields());
                write_header(&mut packet, self.cid, &control, buf_alloc, fwd_cnt, 0);
                Some(0)
            } else {
                let key = self.ready.pop_front().expect("checked non-empty above");
                let written = read_host_data(key, &mut packet, self.cid, &mut self.peers, &self.stats);
                match self.peers.get(&key) {
                    Some(peer) if peer.conn.state == State::Closing && peer.host_write_shut => {
                        self.close(key)
                    }
                    // More may be waiting: back of the line, after the others.
                    Some(peer) if peer.in_ready => self.ready.push_back(key),
                    _ => {}
                }
                written
            };
            let active = self.active.as_mut().expect("still active");
            match written {
                Some(len) => {
                    if active.queues[RX].add_used(&self.mem, head, PKT_HEADER_SIZE as u32 + len).is_err() {
                        return self.broken_queue("receive");
                    }
                    used = true;
                }
                // Nothing to send after all: hand the buffer back to the ring.
                None => active.queues[RX].go_to_previous_position(),
            }
        }
        if used {
            self.notify_guest(RX);
        }
    }

    fn send_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        let peer_cid = self.peers.get(&key).map_or(PARENT_CID, |peer| peer.host_cid);
        self.push_control(Control {
            host_port: key.host_port,
            guest_port: key.guest_port,
            peer_cid,
            op,
            flags,
        });
    }

    fn push_control(&mut self, control: Control) {
        if self.control.len() >= MAX_CONTROL_BACKLOG {
            self.fault("backlog", "dropped control packets: the guest gives no receive buffers");
            return;
        }
        self.control.push_back(control);
    }

    /// Ends a connection and tells the guest.
    fn reset_connection(&mut self, key: ConnKey) {
        self.send_control(key, OP_RST, 0);
        self.close(key);
    }

    fn close(&mut self, key: ConnKey) {
        if let Some(peer) = self.peers.remove(&key) {
            log::debug!(target: "carve::virtio", "{NAME}: host port {} to guest port {} closed", key.host_port, key.guest_port);
            self.roles.remove(&peer.conn.stream.as_raw_fd());
            self.closed.push(peer.conn.stream);
        }
    }

    fn notify_guest(&mut self, queue: usize) {
        let Some(active) = self.active.as_mut() else { return };
        if active.queues[queue].needs_notification(&self.mem).unwrap_or(true) {
            active.signals.signal_used();
        }
    }

    fn broken_queue(&mut self, which: &str) {
        self.fault(
            "queue",
            format_args!("the {which} queue's used ring is outside guest memory; device needs reset"),
        );
        if let Some(active) = self.active.take() {
            active.signals.signal_needs_reset();
        }
    }

    /// Registers sockets opened and forgets sockets closed while handling events.
    fn sync_epoll(&mut self, ops: &mut EventOps) {
        for fd in self.opened.drain(..) {
            if self.roles.contains_key(&fd) {
                let set = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
                let _ = ops.add(Events::new_raw(fd, set));
            }
        }
        for stream in self.closed.drain(..) {
            let _ = ops.remove(Events::empty(&stream));
        }
    }
}

/// Reads host bytes for connection `key` into the packet; `None` when there is nothing after
/// all (the buffer goes back to the ring).
fn read_host_data<B: BitmapSlice>(
    key: ConnKey,
    packet: &mut VsockPacket<'_, B>,
    cid: u64,
    peers: &mut HashMap<ConnKey, Peer>,
    stats: &VsockStats,
) -> Option<u32> {
    let peer = peers.get_mut(&key)?;
    peer.in_ready = false;
    if !peer.conn.wants_host_data() || peer.conn.peer_credit() == 0 {
        return None;
    }
    let limit = (peer.conn.peer_credit() as usize).min(packet.data_slice().map_or(0, |s| s.len()));
    let mut control = Control {
        host_port: key.host_port,
        guest_port: key.guest_port,
        peer_cid: peer.host_cid,
        op: OP_RW,
        flags: 0,
    };
    let result = match packet.data_slice() {
        Some(slice) if limit > 0 => match slice.subslice(0, limit) {
            Ok(mut window) => peer.conn.stream.read_volatile(&mut window),
            Err(_) => return None,
        },
        _ => return None,
    };
    let len = match result {
        Ok(0) => {
            log::debug!(target: "carve::virtio", "{NAME}: host port {} reached end of stream", key.host_port);
            // End of the host's stream: the guest hears it will get no more.
            peer.conn.host_eof = true;
            peer.host_readable = false;
            control.op = OP_SHUTDOWN;
            control.flags = SHUTDOWN_SEND;
            0
        }
        Ok(n) => n as u32,
        Err(VolatileMemoryError::IOError(e))
            if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted =>
        {
            peer.host_readable = e.kind() == ErrorKind::Interrupted;
            return None;
        }
        Err(e) => {
            log::debug!(target: "carve::virtio", "{NAME}: host port {} failed: {e}", key.host_port);
            peer.host_readable = false;
            peer.conn.host_eof = true;
            control.op = OP_RST;
            0
        }
    };
    let (buf_alloc, fwd_cnt) = peer.conn.credit_fields();
    write_header(packet, cid, &control, buf_alloc, fwd_cnt, len);
    if len > 0 {
        peer.conn.record_sent(len);
        stats.bytes_to_guest.fetch_add(len.into(), Ordering::Relaxed);
        if peer.conn.peer_credit() > 0 {
            // More may be waiting: back of the line, after the others.
            peer.in_ready = true;
        }
    }
    if control.op == OP_RST {
        peer.conn.state = State::Closing;
        peer.host_write_shut = true;
    }
    Some(len)
}

/// A non-blocking connection to the Unix listener at `path` (EAGAIN when its backlog is full),
/// made from the abstract address `from` when that is free, so that the listener's accept(2)
/// learns which guest end the connection is (a name taken leaves it unnamed).
fn connect_nonblocking(path: &Path, from: &str) -> std::io::Result<UnixStream> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    if let Ok(name) = SockAddr::unix(format!("\0{from}")) {
        let _ = socket.bind(&name);
    }
    socket.connect(&SockAddr::unix(path)?)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

/// `PREFIX_PORT`: where a listener for parent port `port` is.
fn port_path(prefix: &Path, port: u32) -> PathBuf {
    let mut path = prefix.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

fn write_header<B: BitmapSlice>(
    packet: &mut VsockPacket<'_, B>,
    cid: u64,
    control: &Control,
    buf_alloc: u32,
    fwd_cnt: u32,
    len: u32,
) {
    packet
        .set_src_cid(control.peer_cid)
        .set_dst_cid(cid)
        .set_src_port(control.host_port)
        .set_dst_port(control.guest_port)
        .set_len(len)
        .set_type(TYPE_STREAM)
        .set_op(control.op)
        .set_flags(control.flags)
        .set_buf_alloc(buf_alloc)
        .set_fwd_cnt(fwd_cnt);
}

fn header_of<B: BitmapSlice>(packet: &VsockPacket<'_, B>) -> Header {
    Header {
        src_cid: packet.src_cid(),
        dst_cid: packet.dst_cid(),
        src_port: packet.src_port(),
        dst_port: packet.dst_port(),
        len: packet.len(),
        type_: packet.type_(),
        op: packet.op(),
        flags: packet.flags(),
        buf_alloc: packet.buf_alloc(),
        fwd_cnt: packet.fwd_cnt(),
    }
}

/// Binds a Unix listener at `path`, taking the place of a socket file nobody listens on (left by
/// a killed process); a live listener there is `AddrInUse`.
fn bind_reclaiming_stale(path: &std::path::Path) -> std::io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(e) if e.kind() == ErrorKind::AddrInUse => match UnixStream::connect(path) {
            Err(refused) if refused.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)?;
                UnixListener::bind(path)
            }
            _ => Err(e),
        },
        result => result,
    }
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.trim_end_matches('\r').strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

impl MutEventSubscriber for VsockBackend {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.handle(events.fd(), events.event_set());
        self.sync_epoll(ops);
    }

    /// Registers everything the backend holds now: called when the VMM adds the backend to its
    /// event loop, at start and again on every resume after a pause (which removed it, and with
    /// it all its descriptors, from epoll).
    fn init(&mut self, ops: &mut EventOps) {
        // None of these is in the epoll set (the subscriber is new, or was removed whole).
        self.closed.clear();
        self.opened.clear();
        let mut watch = |fd: RawFd, set: EventSet| {
            if let Err(e) = ops.add(Events::new_raw(fd, set)) {
                log::error!(target: "carve::virtio", "{NAME}: cannot watch descriptor {fd}: {e:?}");
            }
        };
        let fds = [
            self.commands.fd(),
            self.queue_events[RX].as_raw_fd(),
            self.queue_events[TX].as_raw_fd(),
            self.queue_events[EVENTS].as_raw_fd(),
            self.listener.as_raw_fd(),
            self.timer.as_raw_fd(),
        ];
        for fd in fds {
            watch(fd, EventSet::IN);
        }
        for &fd in self.roles.keys() {
            watch(fd, EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED);
        }
        // Host data may have come while the backend was off the loop; a read that would block
        // just clears the mark. A host connection waiting for the guest gets its full time again:
        // the guest did not run either.
        let now = Instant::now();
        let mut keys = Vec::with_capacity(self.peers.len());
        for (key, peer) in self.peers.iter_mut() {
            peer.host_readable = true;
            if peer.conn.state == State::Connecting {
                peer.connect_deadline = Some(now + CONNECT_TIMEOUT);
            }
            keys.push(*key);
        }
        for key in keys {
            self.requeue_if_readable(key);
        }
        self.commands.wake();
    }
}

impl Drop for VsockBackend {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
        let stats = &self.stats;
        log::info!(
            target: "carve::virtio",
            "{NAME}: {} connections, {} bytes to the guest, {} from it",
            stats.connections.load(Ordering::Relaxed),
            stats.bytes_to_guest.load(Ordering::Relaxed),
            stats.bytes_from_guest.load(Ordering::Relaxed),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 5005"), Some(5005));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"connect 5"), None);
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }
}
