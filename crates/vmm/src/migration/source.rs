//! The sending side, on its own thread while the VM runs: connect, offer, pre-copy rounds, then
//! the last round and the VM's state once the event loop has paused it.

use std::io::{BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::protocol::{self, Kind, Offer, PagesFrame, ProtocolError, HEADER_LEN, PAGE, PREAMBLE_LEN};
use super::{MigrationReport, Progress, IO_TIMEOUT};
use crate::dirty_log::{DirtyLog, DirtyPages};
use crate::memory::{self, GuestRam};
use crate::snapshot::VmSnapshot;

/// Pre-copy rounds before carve stops the VM whatever is left: a guest dirtying memory faster
/// than the link carries it would otherwise never converge.
pub const MAX_ROUNDS: u32 = 30;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a migration ended, as the thread tells the event loop.
pub(crate) type Outcome = Result<MigrationReport, Failure>;

/// Why a migration failed, and whether the VM may run on here.
#[derive(Debug)]
pub(crate) struct Failure {
    pub reason: String,
    /// False once the VM's state has left and the destination's answer is unknown: it may run
    /// there, so it must not also resume here (the user decides, as after QEMU's "postmigrate").
    pub may_resume: bool,
}

impl From<String> for Failure {
    fn from(reason: String) -> Failure {
        Failure { reason, may_resume: true }
    }
}

/// What the migration thread asks of the event loop.
pub(crate) enum ToLoop {
    /// Pre-copy has converged: pause the VM and hand over its state.
    StopTheVm,
    /// The migration is over.
    Finished(Outcome),
}

/// The event loop's answer to [`ToLoop::StopTheVm`].
pub(crate) enum FromLoop {
    Stopped { state: Box<VmSnapshot>, paused_at: Instant },
    Failed(String),
}

/// What the event loop keeps of a running migration to stop it: the flag the thread checks
/// between steps and its connection, shut down to end a blocked read or write at once.
#[derive(Clone, Default)]
pub(crate) struct Cancel {
    requested: Arc<AtomicBool>,
    stream: Arc<Mutex<Option<TcpStream>>>,
}

impl Cancel {
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Some(stream) = &*self.stream.lock().unwrap_or_else(PoisonError::into_inner) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn check(&self) -> Result<(), String> {
        match self.requested.load(Ordering::SeqCst) {
            true => Err("the VM ended during the migration".into()),
            false => Ok(()),
        }
    }
}

/// Releases the dirty log when the migration ends, however it ends.
struct DirtyLogClaim(Arc<AtomicBool>);

impl Drop for DirtyLogClaim {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
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
    pub cancel: Cancel,
    /// Claimed by the event loop for this migration (so a `describe` sample cannot take the
    /// dirty log meanwhile); released when the thread ends.
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

fn io_failed(e: std::io::Error) -> String {
    format!("the connection failed: {e}")
}

fn stream_failed(e: ProtocolError) -> String {
    format!("the destination's stream: {e}")
}

impl Source {
    /// Runs the migration to its end and tells the loop how it went. A panic on this thread is
    /// a failure like any other: the loop must hear of it, or the VM would stay paused.
    pub fn run(self) {
        let _claim = DirtyLogClaim(self.dirty_log_busy.clone());
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.migrate(started)))
            .unwrap_or_else(|_| Err(Failure::from("the migration thread failed (a panic)".to_string())));
        let _ = self.to_loop.send(ToLoop::Finished(outcome));
        let _ = self.wake.write(1);
    }

    fn migrate(&self, started: Instant) -> Outcome {
        let address = resolve(&self.to)?;
        let stream = TcpStream::connect_timeout(&address, CONNECT_TIMEOUT)
            .map_err(|e| format!("cannot reach the destination: {e}"))?;
        stream.set_nodelay(true).map_err(io_failed)?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_failed)?;
        stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io_failed)?;
        *self.cancel.stream.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(stream.try_clone().map_err(io_failed)?);
        self.cancel.check()?;
        let mut reader = stream.try_clone().map_err(io_failed)?;
        let mut writer = BufWriter::with_capacity(1 << 20, stream);
        let mut sent = Sent::default();

        writer.write_all(&protocol::preamble()).map_err(io_failed)?;
        let offer = carve_snapshot::file::encode(&self.offer).map_err(|e| e.to_string())?;
        protocol::write_frame(&mut writer, Kind::Offer, &offer).map_err(io_failed)?;
        writer.flush().map_err(io_failed)?;
        sent.bytes += (PREAMBLE_LEN + HEADER_LEN + offer.len()) as u64;
        match protocol::read_frame(&mut reader).map_err(stream_failed)? {
            (Kind::Accept, _) => {}
            (Kind::Refuse, reason) => {
                return Err(format!("the destination refused the VM: {}", protocol::text(&reason)).into())
            }
            (kind, _) => {
                return Err(stream_failed(ProtocolError::Unexpected { expected: "Accept", got: kind }).into())
            }
        }

        let outcome = self.precopy_and_finish(&mut reader, &mut writer, &mut sent, started);
        if let Err(failure) = &outcome {
            // The destination hears why, if it still listens.
            let _ = protocol::write_frame(&mut writer, Kind::Abort, failure.reason.as_bytes())
                .and_then(|()| writer.flush());
        }
        outcome
    }

    fn precopy_and_finish(
        &self,
        reader: &mut TcpStream,
        writer: &mut BufWriter<TcpStream>,
        sent: &mut Sent,
        started: Instant,
    ) -> Outcome {
        let mut log = DirtyLog::start(self.vm.clone(), &self.mem).map_err(|e| e.to_string())?;

        // Round 0: every page that is not zero (the destination's memory starts zeroed).
        self.progress.round.store(1, Ordering::Relaxed);
        self.send_all(writer, sent)?;
        let mut rounds = 1;
        let mut pending = self.harvest(&mut log)?;
        while rounds < MAX_ROUNDS && !self.fits(&pending, sent) {
            rounds += 1;
            self.progress.round.store(rounds.into(), Ordering::Relaxed);
            self.send_pages(writer, &pending, sent)?;
            pending = self.harvest(&mut log)?;
        }

        // Stop-and-copy: the loop pauses the VM and hands over its state.
        let _ = self.to_loop.send(ToLoop::StopTheVm);
        let _ = self.wake.write(1);
        let (state, paused_at) = match self.from_loop.recv() {
            Ok(FromLoop::Stopped { state, paused_at }) => (state, paused_at),
            Ok(FromLoop::Failed(reason)) => return Err(reason.into()),
            Err(_) => return Err("the VM ended during the migration".to_string().into()),
        };
        self.progress.round.store(u64::from(rounds) + 1, Ordering::Relaxed);
        let last = self.harvest(&mut log)?;
        let precopy_pages = sent.pages;
        self.send_pages(writer, &merge(pending, last), sent)?;
        let state = carve_snapshot::file::encode(&*state).map_err(|e| e.to_string())?;
        protocol::write_frame(writer, Kind::State, &state).map_err(io_failed)?;
        sent.bytes += (HEADER_LEN + state.len()) as u64;
        // From here the destination may have the VM: only its refusal lets it run on here.
        let unknown = |reason: String| Failure {
            reason: format!(
                "{reason}; the VM's state was sent, so it may run at the destination: it stays paused \
                 here (`carve vm resume` only if it does not run there)"
            ),
            may_resume: false,
        };
        writer.flush().map_err(|e| unknown(io_failed(e)))?;
        match protocol::read_frame(reader).map_err(|e| unknown(stream_failed(e)))? {
            (Kind::Started, _) => Ok(MigrationReport {
                to: self.to.clone(),
                total_us: started.elapsed().as_micros() as u64,
                downtime_us: paused_at.elapsed().as_micros() as u64,
                rounds,
                pages_sent: sent.pages,
                last_round_pages: sent.pages - precopy_pages,
                bytes_sent: sent.bytes,
                guest_bytes: memory::total_size(&self.mem),
                manual_dirty_protect: log.manual_protect(),
            }),
            (Kind::Refuse, reason) => {
                Err(format!("the destination could not start the VM: {}", protocol::text(&reason)).into())
            }
            (kind, _) => {
                Err(unknown(stream_failed(ProtocolError::Unexpected { expected: "Started", got: kind })))
            }
        }
    }

    fn harvest(&self, log: &mut DirtyLog) -> Result<DirtyPages, String> {
        self.cancel.check()?;
        log.harvest(&self.mem).map_err(|e| e.to_string())
    }

    /// Whether `pending` can be sent within the downtime target at the rate seen so far.
    fn fits(&self, pending: &DirtyPages, sent: &Sent) -> bool {
        let rate = sent.bytes as f64 / sent.sending.as_secs_f64().max(1e-6);
        let bytes = pending.count() as f64 * (PAGE + 8) as f64;
        bytes / rate <= self.downtime.as_secs_f64()
    }

    /// Every page that is not zero; pages never touched are not even read.
    fn send_all(&self, writer: &mut impl Write, sent: &mut Sent) -> Result<(), String> {
        let began = Instant::now();
        let mut frame = PagesFrame::default();
        let mut page = [0u8; PAGE];
        for region in self.mem.iter() {
            let base = region.start_addr().0;
            let touched = memory::touched_pages(region);
            for (index, offset) in (0..region.len()).step_by(PAGE).enumerate() {
                if touched.as_ref().is_some_and(|touched| !touched[index]) {
                    continue;
                }
                self.mem.read_slice(&mut page, GuestAddress(base + offset)).map_err(|e| e.to_string())?;
                if !memory::is_zero_page(&page) {
                    frame.push_data(base + offset, &page);
                    self.flush_if_full(writer, &mut frame, sent)?;
                }
            }
        }
        self.flush(writer, &mut frame, sent)?;
        sent.sending += began.elapsed();
        Ok(())
    }

    fn send_pages(&self, writer: &mut impl Write, pages: &DirtyPages, sent: &mut Sent) -> Result<(), String> {
        let began = Instant::now();
        let mut frame = PagesFrame::default();
        let mut page = [0u8; PAGE];
        for gpa in pages.addresses() {
            self.mem.read_slice(&mut page, GuestAddress(gpa)).map_err(|e| e.to_string())?;
            frame.push(gpa, &page);
            self.flush_if_full(writer, &mut frame, sent)?;
        }
        self.flush(writer, &mut frame, sent)?;
        sent.sending += began.elapsed();
        Ok(())
    }

    fn flush_if_full(
        &self,
        writer: &mut impl Write,
        frame: &mut PagesFrame,
        sent: &mut Sent,
    ) -> Result<(), String> {
        match frame.is_full() {
            true => self.flush(writer, frame, sent),
            false => Ok(()),
        }
    }

    fn flush(&self, writer: &mut impl Write, frame: &mut PagesFrame, sent: &mut Sent) -> Result<(), String> {
        if frame.pages == 0 {
            return Ok(());
        }
        self.cancel.check()?;
        sent.pages += frame.pages as u64;
        let payload = frame.take();
        protocol::write_frame(writer, Kind::Pages, &payload).map_err(io_failed)?;
        sent.bytes += (HEADER_LEN + payload.len()) as u64;
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

/// `HOST:PORT` (a name, IPv4 or bracketed IPv6) to the first address it names. Name lookups
/// block: this runs on the migration thread, never on the event loop.
pub fn resolve(to: &str) -> Result<SocketAddr, String> {
    check_address(to)?;
    to.to_socket_addrs()
        .map_err(|e| format!("cannot resolve the destination: {e}"))?
        .next()
        .ok_or_else(|| "the destination's name has no address".to_string())
}

/// Whether `to` has the shape `HOST:PORT`, without looking the name up.
pub fn check_address(to: &str) -> Result<(), String> {
    match to.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("'{to}' is not a destination; expected HOST:PORT")),
    }
}
