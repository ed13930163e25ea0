//! One vsock stream: its Unix socket on the host side and the credit accounting of virtio-vsock's
//! flow control (§5.10.6.3): each side advertises its buffer size (`buf_alloc`) and how many
//! bytes it has consumed (`fwd_cnt`); a sender may have at most `buf_alloc` bytes in flight.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

/// Bytes carve buffers per connection for the guest→host direction, and advertises as credit.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Consumed bytes after which carve tells the guest about new credit unasked.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    /// The parent-side port: the port a guest connected to, or the one carve allocated for a
    /// host-initiated connection.
    pub host_port: u32,
    pub guest_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated, REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
    /// The guest shut both directions down; close once its data is forwarded.
    Closing,
}

pub struct Connection {
    pub stream: UnixStream,
    pub state: State,
    /// The guest sends no more (SHUTDOWN_SEND received).
    pub guest_send_shut: bool,
    /// The guest receives no more (SHUTDOWN_RCV received).
    pub guest_rcv_shut: bool,
    /// The host side reached end of stream; SHUTDOWN_SEND was (or will be) sent.
    pub host_eof: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes carve sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// Bytes of guest data carve wrote to the host socket.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Guest data the host socket has not taken yet (at most CONN_BUF_ALLOC bytes).
    pending_out: VecDeque<u8>,
}

impl Connection {
    pub fn new(stream: UnixStream, state: State) -> Connection {
        Connection {
            stream,
            state,
            guest_send_shut: false,
            guest_rcv_shut: false,
            host_eof: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            pending_out: VecDeque::new(),
        }
    }

    /// Takes in the credit every guest packet carries.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// How many bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub fn record_sent(&mut self, bytes: u32) {
        self.tx_cnt += bytes;
    }

    /// The credit fields of the next packet to the guest; marks the credit as announced.
    pub fn credit_fields(&mut self) -> (u32, u32) {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        (CONN_BUF_ALLOC, self.fwd_cnt.0)
    }

    /// Whether enough was consumed since the last announcement to tell the guest unasked.
    pub fn owes_credit_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// Whether `len` more bytes from the guest fit in what carve advertised.
    pub fn accepts(&self, len: usize) -> bool {
        self.pending_out.len() + len <= CONN_BUF_ALLOC as usize
    }

    pub fn has_pending_out(&self) -> bool {
        !self.pending_out.is_empty()
    }

    /// Should carve read host data for the guest?
    pub fn wants_host_data(&self) -> bool {
        self.state == State::Established && !self.host_eof && !self.guest_rcv_shut
    }

    /// Forwards guest bytes to the host socket; what the socket cannot take now is kept.
    pub fn forward(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.pending_out.is_empty() {
            let written = write_some(&mut self.stream, data)?;
            self.fwd_cnt += written as u32;
            self.pending_out.extend(&data[written..]);
        } else {
            self.pending_out.extend(data);
        }
        Ok(())
    }

    /// Writes out kept bytes once the host socket is writable again.
    pub fn flush(&mut self) -> std::io::Result<()> {
        while !self.pending_out.is_empty() {
            let (front, _) = self.pending_out.as_slices();
            let written = write_some(&mut self.stream, front)?;
            if written == 0 {
                break;
            }
            self.pending_out.drain(..written);
            self.fwd_cnt += written as u32;
        }
        Ok(())
    }
}

/// Writes what the non-blocking socket takes now (0 when it would block).
fn write_some(stream: &mut UnixStream, data: &[u8]) -> std::io::Result<usize> {
    match stream.write(data) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(0),
        Err(e) if e.kind() == ErrorKind::Interrupted => Ok(0),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(a, State::Established), b)
    }

    #[test]
    fn peer_credit_follows_what_the_guest_consumed() {
        let (mut conn, _peer) = pair();
        assert_eq!(conn.peer_credit(), 0, "no credit before the guest announces its buffer");
        conn.update_peer_credit(4096, 0);
        conn.record_sent(4000);
        assert_eq!(conn.peer_credit(), 96);
        conn.update_peer_credit(4096, 4000);
        assert_eq!(conn.peer_credit(), 4096);
        // Counters wrap at 2^32 without breaking the arithmetic.
        conn.record_sent(u32::MAX - 3999 + 100);
        conn.update_peer_credit(4096, 99);
        assert_eq!(conn.peer_credit(), 4095);
    }

    #[test]
    fn guest_data_the_socket_cannot_take_is_kept_and_counted_only_when_written() {
        let (mut conn, mut peer) = pair();
        let chunk = vec![0xa5u8; 64 * 1024];
        let mut sent = 0;
        while conn.accepts(chunk.len()) {
            conn.forward(&chunk).unwrap();
            sent += chunk.len();
        }
        assert!(conn.has_pending_out(), "the socket buffer filled up");
        let (_, fwd) = conn.credit_fields();
        assert!((fwd as usize) < sent);
        let mut sink = vec![0u8; sent];
        peer.set_nonblocking(true).unwrap();
        let mut read = 0;
        while read < sent {
            conn.flush().unwrap();
            match std::io::Read::read(&mut peer, &mut sink[read..]) {
                Ok(n) => read += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert!(!conn.has_pending_out());
        assert!(conn.owes_credit_update());
        assert_eq!(conn.credit_fields(), (CONN_BUF_ALLOC, sent as u32));
        assert!(!conn.owes_credit_update());
        assert!(sink.iter().all(|&b| b == 0xa5));
    }
}
