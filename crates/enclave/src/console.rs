//! An enclave's serial console: output kept in a bounded ring (the newest bytes win) that
//! any number of `carve console` readers follow from where they joined.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

/// Bytes of console history each enclave keeps.
pub const RING_BYTES: usize = 64 << 10;

#[derive(Default)]
struct Ring {
    bytes: VecDeque<u8>,
    /// Bytes ever written; `bytes` holds the last `bytes.len()` of them.
    written: u64,
    closed: bool,
}

#[derive(Clone, Default)]
pub struct Console {
    ring: Arc<(Mutex<Ring>, Condvar)>,
}

/// What a reader gets: new bytes (and its next position), or the end.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    Data(Vec<u8>, u64),
    Idle,
    Closed,
}

impl Console {
    pub fn new() -> Console {
        Console::default()
    }

    /// The position where the ring's history starts (a new reader sees the history).
    pub fn oldest(&self) -> u64 {
        let ring = self.ring.0.lock().unwrap_or_else(PoisonError::into_inner);
        ring.written - ring.bytes.len() as u64
    }

    /// Bytes from `from` on (or from the oldest kept, if those are gone), waiting up to `wait`.
    pub fn read(&self, from: u64, wait: Duration) -> Chunk {
        let (lock, ready) = &*self.ring;
        let ring = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let (ring, _) = ready
            .wait_timeout_while(ring, wait, |r| r.written <= from && !r.closed)
            .unwrap_or_else(PoisonError::into_inner);
        if ring.written > from {
            let oldest = ring.written - ring.bytes.len() as u64;
            let skip = (from.max(oldest) - oldest) as usize;
            let data: Vec<u8> = ring.bytes.iter().skip(skip).copied().collect();
            return Chunk::Data(data, ring.written);
        }
        if ring.closed {
            Chunk::Closed
        } else {
            Chunk::Idle
        }
    }

    /// Marks the end: readers drain what is left, then see [`Chunk::Closed`].
    pub fn close(&self) {
        let (lock, ready) = &*self.ring;
        lock.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        ready.notify_all();
    }
}

impl io::Write for Console {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let (lock, ready) = &*self.ring;
        let mut ring = lock.lock().unwrap_or_else(PoisonError::into_inner);
        ring.bytes.extend(data);
        let excess = ring.bytes.len().saturating_sub(RING_BYTES);
        ring.bytes.drain(..excess);
        ring.written += data.len() as u64;
        ready.notify_all();
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn readers_follow_and_old_bytes_fall_out() {
        let mut console = Console::new();
        console.write_all(b"hello ").unwrap();
        assert_eq!(console.read(0, Duration::ZERO), Chunk::Data(b"hello ".to_vec(), 6));
        assert_eq!(console.read(6, Duration::from_millis(10)), Chunk::Idle);
        let reader = {
            let console = console.clone();
            std::thread::spawn(move || console.read(6, Duration::from_secs(10)))
        };
        std::thread::sleep(Duration::from_millis(20));
        console.write_all(b"world").unwrap();
        assert_eq!(reader.join().unwrap(), Chunk::Data(b"world".to_vec(), 11));
        console.write_all(&vec![b'x'; RING_BYTES]).unwrap();
        match console.read(0, Duration::ZERO) {
            Chunk::Data(data, end) => {
                assert_eq!(data.len(), RING_BYTES);
                assert_eq!(end, 11 + RING_BYTES as u64);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(console.oldest(), 11);
        console.close();
        assert_eq!(console.read(11 + RING_BYTES as u64, Duration::from_secs(10)), Chunk::Closed);
    }
}
