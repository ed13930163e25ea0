//! A bare-metal virtio-vsock driver (stream sockets, polled): connect, listen, send, receive,
//! shutdown, with credit-based flow control. Each connection's receive buffer is a ring in the
//! DMA area, and its size is the credit the driver advertises.

use crate::io::{read_phys, write_phys};
use crate::virtio::{MmioDevice, Virtqueue, VIRTIO_F_VERSION_1};

pub const PARENT_CID: u64 = 3;
pub const MAX_CONNECTIONS: usize = 72;
/// Receive buffer (and advertised credit) per connection.
pub const CONN_BUF: u32 = 32 * 1024;
const HEADER: u32 = 44;
const QUEUE_SIZE: u16 = 128;
/// One packet buffer: header plus up to 4 KiB of payload, as Linux uses.
const SLOT: u32 = HEADER + 4096;
pub const MAX_PAYLOAD: u32 = SLOT - HEADER;

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_BOTH: u32 = 3;
const SHUTDOWN_SEND: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Free,
    Connecting,
    Established,
    /// The peer reset (or refused) the connection.
    Reset,
    /// We shut down both ways and wait for the peer's RST.
    Closing,
}

#[derive(Clone, Copy)]
struct Conn {
    state: State,
    local_port: u32,
    peer_port: u32,
    peer_eof: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    fwd_cnt: u32,
    announced_fwd_cnt: u32,
    /// Receive ring: `head` bytes consumed, `tail` bytes received (both wrapping counters).
    head: u32,
    tail: u32,
    buf: u64,
}

impl Conn {
    const FREE: Conn = Conn {
        state: State::Free,
        local_port: 0,
        peer_port: 0,
        peer_eof: false,
        peer_buf_alloc: 0,
        peer_fwd_cnt: 0,
        tx_cnt: 0,
        fwd_cnt: 0,
        announced_fwd_cnt: 0,
        head: 0,
        tail: 0,
        buf: 0,
    };

    fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

pub struct Vsock {
    device: MmioDevice,
    rx: Virtqueue,
    tx: Virtqueue,
    pub cid: u64,
    conns: [Conn; MAX_CONNECTIONS],
    listening: [u32; 4],
    next_port: u32,
    /// Packets the device dropped as malformed are invisible to us; count what we refused.
    pub refused: u32,
}

/// A connection handle (index into the table).
pub type ConnId = usize;

/// What `poll` saw happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Accepted(ConnId),
}

impl Vsock {
    /// Sets the device at `device` up, with queues and buffers in the DMA area at `dma`.
    pub fn new(device: MmioDevice, dma: u64) -> Result<Vsock, &'static str> {
        device.init(19, VIRTIO_F_VERSION_1)?;
        let cid = device.read(0x100) as u64 | (device.read(0x104) as u64) << 32;
        let rx = Virtqueue::new(&device, 0, QUEUE_SIZE, SLOT, dma);
        let mut at = dma + Virtqueue::footprint(QUEUE_SIZE, SLOT);
        let tx = Virtqueue::new(&device, 1, QUEUE_SIZE, SLOT, at);
        at += Virtqueue::footprint(QUEUE_SIZE, SLOT);
        // The event queue: a few buffers the device never fills.
        let mut events = Virtqueue::new(&device, 2, 8, 64, at);
        at += Virtqueue::footprint(8, 64);
        let mut conns = [Conn::FREE; MAX_CONNECTIONS];
        for conn in conns.iter_mut() {
            conn.buf = at;
            at += CONN_BUF as u64;
        }
        device.driver_ok();
        if device.status() & crate::virtio::STATUS_NEEDS_RESET != 0 {
            return Err("device needs reset after DRIVER_OK");
        }
        let mut vsock =
            Vsock { device, rx, tx, cid, conns, listening: [0; 4], next_port: 50_000, refused: 0 };
        while let Some(id) = vsock.rx.take() {
            vsock.rx.push(id, SLOT, true);
        }
        while let Some(id) = events.take() {
            events.push(id, 8, true);
        }
        device.notify(0);
        device.notify(2);
        Ok(vsock)
    }

    /// Bytes of DMA area `new` uses.
    pub fn dma_size() -> u64 {
        2 * Virtqueue::footprint(QUEUE_SIZE, SLOT)
            + Virtqueue::footprint(8, 64)
            + MAX_CONNECTIONS as u64 * CONN_BUF as u64
    }

    pub fn listen(&mut self, port: u32) {
        if let Some(slot) = self.listening.iter_mut().find(|p| **p == 0) {
            *slot = port;
        }
    }

    /// The device's interrupt line.
    pub fn irq(&self) -> u32 {
        self.device.irq
    }

    pub fn is_listening(&self, port: u32) -> bool {
        port != 0 && self.listening.contains(&port)
    }

    pub fn state(&self, conn: ConnId) -> State {
        self.conns[conn].state
    }

    pub fn local_port(&self, conn: ConnId) -> u32 {
        self.conns[conn].local_port
    }

    /// The peer will send nothing more.
    pub fn peer_closed(&self, conn: ConnId) -> bool {
        self.conns[conn].peer_eof || self.conns[conn].state == State::Reset
    }

    pub fn available(&self, conn: ConnId) -> u32 {
        self.conns[conn].tail.wrapping_sub(self.conns[conn].head)
    }

    /// Bytes `send` can take now: the peer's credit, bounded by free transmit slots.
    pub fn send_capacity(&self, conn: ConnId) -> u32 {
        let c = &self.conns[conn];
        if c.state != State::Established {
            return 0;
        }
        c.credit()
    }

    /// Starts a connection to the parent's `port`; `poll` until it is Established or Reset.
    pub fn connect(&mut self, port: u32) -> Option<ConnId> {
        let id = self.conns.iter().position(|c| c.state == State::Free)?;
        let local_port = self.next_port;
        self.next_port += 1;
        let conn = &mut self.conns[id];
        *conn = Conn { state: State::Connecting, local_port, peer_port: port, buf: conn.buf, ..Conn::FREE };
        self.send_control(id, OP_REQUEST, 0);
        Some(id)
    }

    /// Sends what fits now (credit and free slots); returns how much was taken.
    pub fn send(&mut self, conn: ConnId, data: &[u8]) -> usize {
        let mut sent = 0;
        while sent < data.len() {
            let room = self.send_capacity(conn).min(MAX_PAYLOAD) as usize;
            if room == 0 {
                break;
            }
            self.reclaim_tx();
            let Some(slot) = self.tx.take() else { break };
            let len = room.min(data.len() - sent);
            let addr = self.tx.slot(slot);
            self.write_header(addr, conn, OP_RW, 0, len as u32);
            // SAFETY: the slot is ours until the device returns it, and holds SLOT bytes.
            unsafe {
                core::ptr::copy_nonoverlapping(data[sent..].as_ptr(), (addr + HEADER as u64) as *mut u8, len)
            };
            self.tx.push(slot, HEADER + len as u32, false);
            self.conns[conn].tx_cnt = self.conns[conn].tx_cnt.wrapping_add(len as u32);
            sent += len;
        }
        if sent > 0 {
            self.device.notify(1);
        }
        sent
    }

    /// Copies received bytes out; consumed bytes become credit for the peer again.
    pub fn recv(&mut self, conn: ConnId, out: &mut [u8]) -> usize {
        let c = &mut self.conns[conn];
        let mut copied = 0;
        while copied < out.len() && c.head != c.tail {
            let offset = c.head % CONN_BUF;
            let contiguous = (c.tail.wrapping_sub(c.head)).min(CONN_BUF - offset) as usize;
            let n = contiguous.min(out.len() - copied);
            // SAFETY: the ring lies in the DMA area reserved for this connection.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    (c.buf + offset as u64) as *const u8,
                    out[copied..].as_mut_ptr(),
                    n,
                )
            };
            c.head = c.head.wrapping_add(n as u32);
            c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
            copied += n;
        }
        if c.fwd_cnt.wrapping_sub(c.announced_fwd_cnt) >= CONN_BUF / 2 {
            self.send_control(conn, OP_CREDIT_UPDATE, 0);
        }
        copied
    }

    /// Shuts both directions down; the connection is freed when the peer's RST arrives.
    pub fn close(&mut self, conn: ConnId) {
        match self.conns[conn].state {
            State::Established | State::Connecting => {
                self.send_control(conn, OP_SHUTDOWN, SHUTDOWN_BOTH);
                self.conns[conn].state = State::Closing;
            }
            State::Reset => self.conns[conn].state = State::Free,
            _ => {}
        }
    }

    /// Says we will send no more, keeping the receive side open.
    pub fn shutdown_send(&mut self, conn: ConnId) {
        self.send_control(conn, OP_SHUTDOWN, SHUTDOWN_SEND);
    }

    /// Frees a connection whose reset the caller has seen.
    pub fn release(&mut self, conn: ConnId) {
        if self.conns[conn].state == State::Reset {
            self.conns[conn].state = State::Free;
        }
    }

    /// Handles every packet the device has delivered; reports accepted connections. Returns
    /// how many packets arrived.
    pub fn poll(&mut self, mut on_event: impl FnMut(Event)) -> usize {
        self.device.ack_interrupts();
        self.reclaim_tx();
        let mut received = 0;
        while let Some((id, len)) = self.rx.pop_used() {
            received += 1;
            let addr = self.rx.slot(id);
            if len >= HEADER {
                if let Some(event) = self.receive(addr, len - HEADER) {
                    on_event(event);
                }
            }
            self.rx.push(id, SLOT, true);
        }
        if received > 0 {
            self.device.notify(0);
        }
        received
    }

    fn receive(&mut self, addr: u64, payload: u32) -> Option<Event> {
        let src_cid: u64 = read_phys(addr);
        let src_port: u32 = read_phys(addr + 16);
        let dst_port: u32 = read_phys(addr + 20);
        let len: u32 = read_phys(addr + 24);
        let op: u16 = read_phys(addr + 30);
        let flags: u32 = read_phys(addr + 32);
        let buf_alloc: u32 = read_phys(addr + 36);
        let fwd_cnt: u32 = read_phys(addr + 40);
        let found = self
            .conns
            .iter()
            .position(|c| c.state != State::Free && c.local_port == dst_port && c.peer_port == src_port);
        let Some(id) = found else {
            if op == OP_REQUEST && self.listening.contains(&dst_port) && src_cid == PARENT_CID {
                return self.accept(dst_port, src_port, buf_alloc, fwd_cnt);
            }
            if op != OP_RST {
                self.refused += 1;
                self.send_raw(dst_port, src_port, src_cid, OP_RST, 0, 0, 0, 0);
            }
            return None;
        };
        let c = &mut self.conns[id];
        c.peer_buf_alloc = buf_alloc;
        c.peer_fwd_cnt = fwd_cnt;
        match op {
            OP_RESPONSE if c.state == State::Connecting => c.state = State::Established,
            OP_RST => {
                c.state = if c.state == State::Closing { State::Free } else { State::Reset };
            }
            OP_SHUTDOWN => {
                if flags & SHUTDOWN_SEND != 0 {
                    c.peer_eof = true;
                }
                if flags & SHUTDOWN_BOTH == SHUTDOWN_BOTH {
                    self.send_control(id, OP_RST, 0);
                    self.conns[id].state = State::Reset;
                }
            }
            OP_RW => {
                let len = len.min(payload);
                if c.tail.wrapping_sub(c.head) + len > CONN_BUF {
                    // The peer overran our credit: a protocol violation.
                    self.send_control(id, OP_RST, 0);
                    self.conns[id].state = State::Reset;
                    return None;
                }
                let mut copied = 0;
                while copied < len {
                    let offset = c.tail % CONN_BUF;
                    let n = (len - copied).min(CONN_BUF - offset);
                    // SAFETY: source is the receive slot, destination this connection's ring.
                    unsafe {
                        core::ptr::copy_nonoverlapping(
                            (addr + HEADER as u64 + copied as u64) as *const u8,
                            (c.buf + offset as u64) as *mut u8,
                            n as usize,
                        )
                    };
                    c.tail = c.tail.wrapping_add(n);
                    copied += n;
                }
            }
            OP_CREDIT_REQUEST => self.send_control(id, OP_CREDIT_UPDATE, 0),
            _ => {}
        }
        None
    }

    fn accept(&mut self, local: u32, peer: u32, buf_alloc: u32, fwd_cnt: u32) -> Option<Event> {
        let Some(id) = self.conns.iter().position(|c| c.state == State::Free) else {
            self.send_raw(local, peer, PARENT_CID, OP_RST, 0, 0, 0, 0);
            return None;
        };
        let buf = self.conns[id].buf;
        self.conns[id] = Conn {
            state: State::Established,
            local_port: local,
            peer_port: peer,
            peer_buf_alloc: buf_alloc,
            peer_fwd_cnt: fwd_cnt,
            buf,
            ..Conn::FREE
        };
        self.send_control(id, OP_RESPONSE, 0);
        Some(Event::Accepted(id))
    }

    fn reclaim_tx(&mut self) {
        while let Some((id, _)) = self.tx.pop_used() {
            self.tx.give_back(id);
        }
    }

    fn send_control(&mut self, conn: ConnId, op: u16, flags: u32) {
        let c = self.conns[conn];
        self.conns[conn].announced_fwd_cnt = c.fwd_cnt;
        self.send_raw(c.local_port, c.peer_port, PARENT_CID, op, flags, 0, CONN_BUF, c.fwd_cnt);
    }

    #[allow(clippy::too_many_arguments)]
    fn send_raw(
        &mut self,
        src_port: u32,
        dst_port: u32,
        dst_cid: u64,
        op: u16,
        flags: u32,
        len: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
    ) {
        self.reclaim_tx();
        let slot = loop {
            if let Some(slot) = self.tx.take() {
                break slot;
            }
            self.reclaim_tx();
        };
        let addr = self.tx.slot(slot);
        write_raw_header(addr, self.cid, dst_cid, src_port, dst_port, len, op, flags, buf_alloc, fwd_cnt);
        self.tx.push(slot, HEADER + len, false);
        self.device.notify(1);
    }

    fn write_header(&mut self, addr: u64, conn: ConnId, op: u16, flags: u32, len: u32) {
        let c = &mut self.conns[conn];
        c.announced_fwd_cnt = c.fwd_cnt;
        write_raw_header(
            addr,
            self.cid,
            PARENT_CID,
            c.local_port,
            c.peer_port,
            len,
            op,
            flags,
            CONN_BUF,
            c.fwd_cnt,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn write_raw_header(
    addr: u64,
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
) {
    write_phys(addr, src_cid);
    write_phys(addr + 8, dst_cid);
    write_phys(addr + 16, src_port);
    write_phys(addr + 20, dst_port);
    write_phys(addr + 24, len);
    write_phys(addr + 28, 1u16);
    write_phys(addr + 30, op);
    write_phys(addr + 32, flags);
    write_phys(addr + 36, buf_alloc);
    write_phys(addr + 40, fwd_cnt);
}

/// One step of an echo service on `conn`: sends back what arrived, as far as credit allows;
/// closes once the peer is done and everything is echoed. Returns false once closed.
pub fn echo_step(vsock: &mut Vsock, conn: ConnId, scratch: &mut [u8]) -> bool {
    match vsock.state(conn) {
        State::Established => {}
        State::Reset => {
            vsock.release(conn);
            return false;
        }
        _ => return false,
    }
    let room = (vsock.send_capacity(conn) as usize).min(scratch.len());
    let n = vsock.recv(conn, &mut scratch[..room]);
    if n > 0 {
        let sent = vsock.send(conn, &scratch[..n]);
        debug_assert_eq!(sent, n);
    }
    if vsock.peer_closed(conn) && vsock.available(conn) == 0 {
        vsock.close(conn);
        return false;
    }
    true
}

/// Serves echo on every accepted connection until `max_sessions` have ended or `stop` says so
/// of a newly accepted connection; returns the sessions served.
pub fn serve_echo(
    vsock: &mut Vsock,
    max_sessions: Option<u32>,
    stop: impl FnMut(&mut Vsock, ConnId) -> bool,
) -> u32 {
    let mut scratch = [0u8; MAX_PAYLOAD as usize];
    serve(vsock, max_sessions, stop, |vsock, conn| echo_step(vsock, conn, &mut scratch))
}

/// Runs `step` on every open connection until `max_sessions` have ended or `stop` says so of a
/// newly accepted connection; `step` returns false once its connection is closed. Returns the
/// sessions served.
pub fn serve(
    vsock: &mut Vsock,
    max_sessions: Option<u32>,
    stop: impl FnMut(&mut Vsock, ConnId) -> bool,
    step: impl FnMut(&mut Vsock, ConnId) -> bool,
) -> u32 {
    serve_with_idle(vsock, max_sessions, stop, step, || {})
}

/// [`serve`], calling `idle` whenever a round brought no packet (nothing can have changed:
/// the services here only move when the peer sends data or credit).
pub fn serve_with_idle(
    vsock: &mut Vsock,
    max_sessions: Option<u32>,
    mut stop: impl FnMut(&mut Vsock, ConnId) -> bool,
    mut step: impl FnMut(&mut Vsock, ConnId) -> bool,
    mut idle: impl FnMut(),
) -> u32 {
    let mut open = [false; MAX_CONNECTIONS];
    let mut sessions = 0;
    let mut received = 1;
    loop {
        if received == 0 {
            idle();
        }
        let mut accepted = [false; MAX_CONNECTIONS];
        received = vsock.poll(|Event::Accepted(conn)| accepted[conn] = true);
        // Connections accepted while someone else polled (say, during the heartbeat).
        for conn in 0..MAX_CONNECTIONS {
            if !open[conn]
                && vsock.state(conn) == State::Established
                && vsock.is_listening(vsock.local_port(conn))
            {
                accepted[conn] = true;
            }
        }
        for conn in (0..MAX_CONNECTIONS).filter(|&conn| accepted[conn]) {
            if stop(vsock, conn) {
                return sessions;
            }
            open[conn] = true;
        }
        for conn in 0..MAX_CONNECTIONS {
            if open[conn] && !step(vsock, conn) {
                open[conn] = false;
                sessions += 1;
                if max_sessions == Some(sessions) {
                    return sessions;
                }
            }
        }
    }
}

/// The parent's port for Nitro's boot heartbeat.
pub const HEARTBEAT_PORT: u32 = 9000;
/// The byte the enclave sends and the parent echoes.
pub const HEARTBEAT_BYTE: u8 = 0xB7;

/// Tells the parent the enclave booted, as Nitro's init does: connect to the parent's port
/// 9000, send 0xB7, expect it echoed, close. Fails if nobody listens (a plain VM).
pub fn heartbeat(vsock: &mut Vsock) -> Result<(), &'static str> {
    let conn = vsock.connect(HEARTBEAT_PORT).ok_or("no free connection")?;
    let mut sent = false;
    loop {
        vsock.poll(|_| {});
        match vsock.state(conn) {
            State::Connecting => continue,
            State::Established => {}
            _ => {
                vsock.release(conn);
                return Err("the parent refused the connection");
            }
        }
        if !sent {
            sent = vsock.send(conn, &[HEARTBEAT_BYTE]) == 1;
            continue;
        }
        let mut echo = [0u8; 1];
        if vsock.recv(conn, &mut echo) == 1 {
            vsock.close(conn);
            return if echo[0] == HEARTBEAT_BYTE { Ok(()) } else { Err("the parent echoed a wrong byte") };
        }
        if vsock.peer_closed(conn) {
            vsock.close(conn);
            return Err("the parent closed without echoing");
        }
    }
}
