//! The sending side, on its own thread while the VM runs: connect, offer, pre-copy rounds, then
//! the last round and the VM's state once the event loop has paused it.

use std::io::{BufWriter, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::protocol::{self, Kind, Offer, PagesFrame, PAGE_SIZE};
use super::{MigrationReport, Progress, IO_TIMEOUT};
use crate::dirty_log::{DirtyLog, DirtyPages};
use crate::memory::GuestRam;
use crate::snapshot::VmSnapshot;

/// Pre-copy rounds before carve stops the VM whatever is left: a guest dirtying memory faster
/// than the link carries it would otherwise never converge.
pub const MAX_ROUNDS: u32 = 30;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the migration thread asks of the event loop.
pub(crate) enum ToLoop {
    /// Pre-copy has converged: pause the VM and hand over its state.
    StopTheVm,
    /// The migration is over: the VM runs on the destination, or (`Err`) it failed and the
    /// source should run on.
    Finished(Result<MigrationReport, String>),
}

/// The event loop's answer to [`ToLoop::StopTheVm`].
pub(crate) enum FromLoop {
    Stopped { state: Box<VmSnapshot>, paused_at: Instant },
    Failed(String),
}

pub(crate) struct Source {
    pub to: String,
    pub downtime: Duration,
    pub vm: Arc<VmFd>,
    pub mem: GuestRam,
    pub offer: Offer,
    pub to_loop: Sender<ToLoop>,
    pub wake: EventFd,
    pub from_loop: Receiver<FromLoop>,
    /// Set by the event loop when the VM ends meanwhile.
    pub cancel: Arc<AtomicBool>,
    /// Held while the dirty log is in use, so a `describe` sample does not turn it off.
    pub dirty_log_busy: Arc<AtomicBool>,
    pub progress: Arc<Progress>,
}

/// Counts as the stream goes.
#[derive(Default)]
struct Sent {
    bytes: u64,
    pages: u64,
    sending: Duration,
}

impl Source {
    /// Runs the migration to its end and tells the loop how it went.
    pub fn run(self) {
        let started = Instant::now();
        let result = self.migrate(started);
        let _ = self.to_loop.send(ToLoop::Finished(result));
        let _ = self.wake.write(1);
    }

    fn migrate(&self, started: Instant) -> Result<MigrationReport, String> {
        let address = resolve(&self.to)?;
        let stream = TcpStream::connect_timeout(&address, CONNECT_TIMEOUT)
            .map_err(|e| format!("cannot reach the destination {}: {e}", self.to))?;
        let io = |e: std::io::Error| format!("the connection to {} failed: {e}", self.to);
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        let mut reader = stream.try_clone().map_err(io)?;
        let mut writer = BufWriter::with_capacity(1 << 20, stream);
        let protocol = |e: protocol::ProtocolError| format!("the destination {}: {e}", self.to);

        writer.write_all(&protocol::preamble()).map_err(io)?;
        let offer = carve_snapshot::file::encode(&self.offer).map_err(|e| e.to_string())?;
        protocol::write_frame(&mut writer, Kind::Offer, &offer).map_err(io)?;
        writer.flush().map_err(io)?;
        match protocol::read_frame(&mut reader).map_err(protocol)? {
            (Kind::Accept, _) => {}
            (Kind::Refuse, reason) => {
                return Err(format!(
                    "the destination {} refused the VM: {}",
                    self.to,
                    protocol::text(&reason)
                ))
            }
            (kind, _) => {
                return Err(protocol(protocol::ProtocolError::Unexpected { expected: "Accept", got: kind }))
            }
        }

        if self.dirty_log_busy.swap(true, Ordering::SeqCst) {
            return Err("the dirty log is in use by a `describe` sample; try again".into());
        }
        let outcome = self.precopy_and_finish(&mut reader, &mut writer, started);
        self.dirty_log_busy.store(false, Ordering::SeqCst);
        if let Err(reason) = &outcome {
            // The destination hears why, if it still listens.
            let _ = protocol::write_frame(&mut writer, Kind::Abort, reason.as_bytes())
                .and_then(|()| writer.flush());
        }
        outcome
    }

    fn precopy_and_finish(
        &self,
        reader: &mut TcpStream,
        writer: &mut BufWriter<TcpStream>,
        started: Instant,
    ) -> Result<MigrationReport, String> {
        let io = |e: std::io::Error| format!("the connection to {} failed: {e}", self.to);
        let vm_fd = self.vm.clone();
        let mut log = DirtyLog::start(vm_fd, &self.mem).map_err(|e| e.to_string())?;
        let mut sent = Sent::default();

        // Round 0: every page that is not zero (the destination's memory starts zeroed).
        self.progress.round.store(1, Ordering::Relaxed);
        self.send_all(writer, &mut sent).map_err(io)?;
        let mut rounds = 1;
        let mut pending = self.harvest(&mut log)?;
        while rounds < MAX_ROUNDS && !self.fits(&pending, &sent) {
            rounds += 1;
            self.progress.round.store(rounds.into(), Ordering::Relaxed);
            self.send_pages(writer, &pending, &mut sent).map_err(io)?;
            pending = self.harvest(&mut log)?;
        }

        // Stop-and-copy: the loop pauses the VM and hands over its state.
        let _ = self.to_loop.send(ToLoop::StopTheVm);
        let _ = self.wake.write(1);
        let (state, paused_at) = match self.from_loop.recv() {
            Ok(FromLoop::Stopped { state, paused_at }) => (state, paused_at),
            Ok(FromLoop::Failed(reason)) => return Err(reason),
            Err(_) => return Err("the VM ended during the migration".into()),
        };
        let last = self.harvest(&mut log)?;
        let precopy_pages = sent.pages;
        self.send_pages(writer, &merge(pending, last), &mut sent).map_err(io)?;
        let state = carve_snapshot::file::encode(&*state).map_err(|e| e.to_string())?;
        protocol::write_frame(writer, Kind::State, &state).map_err(io)?;
        sent.bytes += state.len() as u64;
        writer.flush().map_err(io)?;
        match protocol::read_frame(reader).map_err(|e| format!("the destination {}: {e}", self.to))? {
            (Kind::Started, _) => Ok(MigrationReport {
                to: self.to.clone(),
                total_us: started.elapsed().as_micros() as u64,
                downtime_us: paused_at.elapsed().as_micros() as u64,
                rounds,
                pages_sent: sent.pages,
                last_round_pages: sent.pages - precopy_pages,
                bytes_sent: sent.bytes,
                guest_bytes: crate::memory::total_size(&self.mem),
                manual_dirty_protect: log.manual_protect(),
            }),
            (Kind::Refuse, reason) => Err(format!(
                "the destination {} could not start the VM: {}",
                self.to,
                protocol::text(&reason)
            )),
            (kind, _) => Err(format!(
                "the destination {}: {}",
                self.to,
                protocol::ProtocolError::Unexpected { expected: "Started", got: kind }
            )),
        }
    }

    fn harvest(&self, log: &mut DirtyLog) -> Result<DirtyPages, String> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err("the VM ended during the migration".into());
        }
        log.harvest(&self.mem).map_err(|e| e.to_string())
    }

    /// Whether `pending` can be sent within the downtime target at the rate seen so far.
    fn fits(&self, pending: &DirtyPages, sent: &Sent) -> bool {
        let rate = sent.bytes as f64 / sent.sending.as_secs_f64().max(1e-6);
        let bytes = pending.count() as f64 * (PAGE_SIZE + 8) as f64;
        bytes / rate <= self.downtime.as_secs_f64()
    }

    fn send_all(&self, writer: &mut impl Write, sent: &mut Sent) -> std::io::Result<()> {
        let began = Instant::now();
        let mut frame = PagesFrame::default();
        let mut page = [0u8; PAGE_SIZE];
        for region in self.mem.iter() {
            let base = region.start_addr().0;
            for offset in (0..region.len()).step_by(PAGE_SIZE) {
                self.mem.read_slice(&mut page, GuestAddress(base + offset)).map_err(std::io::Error::other)?;
                if protocol::is_zero(&page) {
                    continue;
                }
                frame.push(base + offset, &page);
                if frame.is_full() {
                    self.flush_frame(writer, &mut frame, sent)?;
                }
            }
        }
        self.flush_frame(writer, &mut frame, sent)?;
        sent.sending += began.elapsed();
        Ok(())
    }

    fn send_pages(
        &self,
        writer: &mut impl Write,
        pages: &DirtyPages,
        sent: &mut Sent,
    ) -> std::io::Result<()> {
        let began = Instant::now();
        let mut frame = PagesFrame::default();
        let mut page = [0u8; PAGE_SIZE];
        for gpa in pages.addresses() {
            self.mem.read_slice(&mut page, GuestAddress(gpa)).map_err(std::io::Error::other)?;
            frame.push(gpa, &page);
            if frame.is_full() {
                self.flush_frame(writer, &mut frame, sent)?;
            }
        }
        self.flush_frame(writer, &mut frame, sent)?;
        sent.sending += began.elapsed();
        Ok(())
    }

    fn flush_frame(
        &self,
        writer: &mut impl Write,
        frame: &mut PagesFrame,
        sent: &mut Sent,
    ) -> std::io::Result<()> {
        if frame.pages == 0 {
            return Ok(());
        }
        if self.cancel.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("the VM ended during the migration"));
        }
        sent.pages += frame.pages as u64;
        let payload = frame.take();
        sent.bytes += payload.len() as u64 + 12;
        protocol::write_frame(writer, Kind::Pages, &payload)?;
        self.progress.pages.store(sent.pages, Ordering::Relaxed);
        self.progress.bytes.store(sent.bytes, Ordering::Relaxed);
        Ok(())
    }
}

/// The union of two harvests of the same memory.
fn merge(mut a: DirtyPages, b: DirtyPages) -> DirtyPages {
    for ((_, words), (_, more)) in a.regions.iter_mut().zip(b.regions) {
        words.iter_mut().zip(more).for_each(|(w, m)| *w |= m);
    }
    a
}

/// `HOST:PORT` (a name, IPv4 or bracketed IPv6) to the first address it names.
pub fn resolve(to: &str) -> Result<SocketAddr, String> {
    to.to_socket_addrs()
        .map_err(|e| format!("cannot resolve the destination '{to}' (expected HOST:PORT): {e}"))?
        .next()
        .ok_or_else(|| format!("the destination '{to}' names no address"))
}
