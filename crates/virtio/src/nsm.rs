//! virtio-nsm (device ID 33): the Nitro Secure Module's transport. One queue; a request is
//! device-readable buffers holding CBOR (at most 0x1000 bytes), its response goes to
//! device-writable buffers (0x3000 bytes, as every NSM driver supplies) and the used length is
//! its size. Drivers lay these out two ways: one chain, readable then writable (carve's guests,
//! AWS's old out-of-tree driver), or — Linux's mainline driver, `drivers/misc/nsm.c` — the
//! request alone in one chain and the response buffer as the next; the request chain is then
//! returned first, with length 0.
//!
//! [`NsmDevice`] is what the transport holds; [`NsmBackend`] runs on the VMM's event loop, owns
//! the queue once the driver is ready and answers through [`carve_nsm::Nsm`].

use crate::GuestRam;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use carve_nsm::protocol::{ErrorCode, Response, MAX_REQUEST, RESPONSE_BUFFER};
use carve_nsm::Nsm;
use carve_snapshot::Persist;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::fault::FaultLog;
use crate::link::{command_channel, Command, CommandReceiver, CommandSender};
use crate::mmio::QueueConfig;
use crate::state::{NsmDeviceState, PendingRequest, RestoreError};
use crate::{ActivateError, DeviceSignals, VirtioDevice, VIRTIO_F_VERSION_1};

pub const VIRTIO_ID_NSM: u32 = 33;
pub const QUEUE_SIZE: u16 = 64;
const NAME: &str = "virtio-nsm";

/// What the device did; read by benchmarks and logged when the VM ends.
#[derive(Debug, Default)]
pub struct NsmStats {
    pub requests: AtomicU64,
    /// Time spent answering requests, from popping the chain to adding it to the used ring.
    pub busy_nanos: AtomicU64,
}

/// The transport-facing half of the NSM device.
pub struct NsmDevice {
    notifiers: Vec<EventFd>,
    commands: CommandSender,
}

impl NsmDevice {
    /// Creates the device and its backend answering with `nsm`.
    pub fn new(nsm: Nsm, mem: GuestRam) -> std::io::Result<(NsmDevice, NsmBackend)> {
        let notifier = EventFd::new(libc::EFD_NONBLOCK)?;
        let (commands, receiver) = command_channel()?;
        let backend = NsmBackend {
            nsm,
            mem,
            notifier: notifier.try_clone()?,
            commands: receiver,
            active: None,
            faults: FaultLog::default(),
            stats: Arc::default(),
            pending: None,
        };
        Ok((NsmDevice { notifiers: vec![notifier], commands }, backend))
    }
}

impl VirtioDevice for NsmDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NSM
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn queue_notifiers(&self) -> &[EventFd] {
        &self.notifiers
    }

    fn activate(
        &mut self,
        _features: u64,
        queues: Vec<Queue>,
        signals: Arc<DeviceSignals>,
    ) -> Result<(), ActivateError> {
        self.commands.activate(1, queues, signals)
    }

    fn reset(&mut self) {
        let _ = self.commands.send(Command::Reset);
    }
}

struct Active {
    queue: Queue,
    signals: Arc<DeviceSignals>,
}

/// The NSM device's event-loop half.
pub struct NsmBackend {
    nsm: Nsm,
    mem: GuestRam,
    notifier: EventFd,
    commands: CommandReceiver,
    active: Option<Active>,
    faults: FaultLog,
    stats: Arc<NsmStats>,
    /// A request that came alone (its chain's head and layout), waiting for the next chain's
    /// response buffer; its chain goes back to the driver with the response's, first.
    pending: Option<(u16, Layout)>,
}

/// Where a chain's request and response buffers are.
#[derive(Default)]
struct Layout {
    has_request: bool,
    request: Vec<u8>,
    request_len: usize,
    response: Vec<(vm_memory::GuestAddress, usize)>,
    response_len: usize,
    readable_after_writable: bool,
}

impl NsmBackend {
    pub fn stats(&self) -> Arc<NsmStats> {
        self.stats.clone()
    }

    fn handle(&mut self, fd: RawFd) {
        if fd == self.commands.fd() {
            self.apply_commands();
        } else if fd == self.notifier.as_raw_fd() {
            let _ = self.notifier.read();
        }
        self.process_queue();
    }

    /// Takes what the transport sent: the driver's queue at DRIVER_OK, or a reset.
    fn apply_commands(&mut self) {
        for command in self.commands.drain() {
            match command {
                Command::Activate { queues, signals } => {
                    let queue = queues.into_iter().next().expect("activate checked one queue");
                    self.active = Some(Active { queue, signals });
                }
                Command::Reset => {
                    self.active = None;
                    self.pending = None;
                }
            }
        }
    }

    /// The state a snapshot keeps, and the running queue (with the device's positions in it).
    /// Commands the event loop has not taken yet are applied first; the loop is woken to serve
    /// the queue once it runs.
    pub(crate) fn save_parts(&mut self) -> Result<(NsmDeviceState, Option<Vec<QueueConfig>>), RestoreError> {
        self.apply_commands();
        self.commands.wake();
        let pending = self.pending.as_ref().map(|(head, layout)| PendingRequest {
            head: *head,
            request: layout.request.clone(),
            request_len: layout.request_len as u64,
            readable_after_writable: layout.readable_after_writable,
        });
        let queues = self.active.as_ref().map(|a| vec![a.queue.state().into()]);
        Ok((NsmDeviceState { module: self.nsm.save()?, pending }, queues))
    }

    /// Continues from a snapshot once the restored transport has handed over its queue. A
    /// request that waited for its response buffer waits again; notifications the guest gave
    /// the old process are gone with its eventfds, so the backend is woken to look at the queue
    /// once the event loop runs.
    pub(crate) fn restored(&mut self, pending: Option<&PendingRequest>) -> Result<(), RestoreError> {
        self.apply_commands();
        if let Some(pending) = pending {
            let bad = |problem: String| Err(RestoreError::PendingRequest(problem));
            let Some(active) = &self.active else {
                return bad("belongs to a device that is not running".into());
            };
            if pending.head >= active.queue.size() {
                return bad(format!(
                    "names descriptor {}, beyond the queue's {}",
                    pending.head,
                    active.queue.size()
                ));
            }
            let request_len = usize::try_from(pending.request_len).unwrap_or(usize::MAX);
            let kept = request_len.min(MAX_REQUEST + 1);
            if pending.request.len() != kept {
                return bad(format!(
                    "keeps {} bytes of a {}-byte request, not the first {kept}",
                    pending.request.len(),
                    pending.request_len
                ));
            }
            let layout = Layout {
                has_request: true,
                request: pending.request.clone(),
                request_len,
                readable_after_writable: pending.readable_after_writable,
                ..Layout::default()
            };
            self.pending = Some((pending.head, layout));
        }
        self.commands.wake();
        Ok(())
    }

    /// Answers every request the driver has made available.
    pub fn process_queue(&mut self) {
        let mut used = false;
        let mem = self.mem.clone();
        loop {
            let Some(active) = self.active.as_mut() else { return };
            let Some(chain) = active.queue.pop_descriptor_chain(&mem) else { break };
            let started = Instant::now();
            let head = chain.head_index();
            for (head, written) in self.answer(head, chain) {
                let Some(active) = self.active.as_mut() else { return };
                if active.queue.add_used(&self.mem, head, written as u32).is_err() {
                    self.fault("queue", "the used ring is outside guest memory; device needs reset");
                    if let Some(active) = self.active.take() {
                        active.signals.signal_needs_reset();
                    }
                    return;
                }
                used = true;
            }
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            self.stats.busy_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        if let Some(active) = self.active.as_mut() {
            if used && active.queue.needs_notification(&self.mem).unwrap_or(true) {
                active.signals.signal_used();
            }
        }
    }

    /// Takes one chain; returns the chains to give back, in order, with the bytes written to each
    /// (none while a lone request waits for its response buffer).
    fn answer(&mut self, head: u16, chain: DescriptorChain<&GuestRam>) -> Vec<(u16, usize)> {
        let layout = match self.layout(chain) {
            Ok(layout) => layout,
            Err(what) => {
                self.fault("chain", what);
                return vec![(head, 0)];
            }
        };
        let mut done = Vec::new();
        match (layout.has_request, layout.response.is_empty()) {
            (true, true) => {
                if let Some((unanswered, _)) = self.pending.replace((head, layout)) {
                    self.fault("unanswered", "a request came before the previous one's response buffer");
                    done.push((unanswered, 0));
                }
            }
            (false, false) => match self.pending.take() {
                Some((request_head, request)) => {
                    let layout =
                        Layout { response: layout.response, response_len: layout.response_len, ..request };
                    done.push((request_head, 0));
                    done.push((head, self.respond(&layout)));
                }
                None => {
                    self.fault("no-request", "a response buffer came without a request");
                    done.push((head, 0));
                }
            },
            (true, false) => {
                if let Some((unanswered, _)) = self.pending.take() {
                    self.fault("unanswered", "a request came before the previous one's response buffer");
                    done.push((unanswered, 0));
                }
                done.push((head, self.respond(&layout)));
            }
            (false, true) => {
                self.fault("chain", "an empty descriptor chain");
                done.push((head, 0));
            }
        }
        done
    }

    /// Answers a request into its response buffers; returns the bytes written.
    fn respond(&mut self, layout: &Layout) -> usize {
        let response = if layout.readable_after_writable {
            self.fault("chain-order", "a request chain put readable buffers after writable ones");
            Response::Error(ErrorCode::InvalidArgument).encode()
        } else if layout.request_len > MAX_REQUEST {
            Response::Error(ErrorCode::InputTooLarge).encode()
        } else if layout.response_len < RESPONSE_BUFFER {
            self.fault(
                "response-size",
                format_args!(
                    "a response buffer of {} bytes; NSM drivers supply {RESPONSE_BUFFER}",
                    layout.response_len
                ),
            );
            Response::Error(ErrorCode::BufferTooSmall).encode()
        } else {
            self.nsm.handle(&layout.request)
        };
        let response = if response.len() > layout.response_len {
            Response::Error(ErrorCode::BufferTooSmall).encode()
        } else {
            response
        };
        if response.len() > layout.response_len {
            return 0;
        }
        self.write_response(layout, &response)
    }

    fn layout(&self, chain: DescriptorChain<&GuestRam>) -> Result<Layout, String> {
        let mut layout = Layout::default();
        for descriptor in chain {
            let (addr, len) = (descriptor.addr(), descriptor.len() as usize);
            if !self.mem.check_range(addr, len) {
                return Err(format!("a buffer of {len} bytes at {:#x} lies outside guest memory", addr.0));
            }
            if descriptor.is_write_only() {
                layout.response.push((addr, len));
                layout.response_len += len;
            } else {
                layout.has_request = true;
                if !layout.response.is_empty() {
                    layout.readable_after_writable = true;
                }
                layout.request_len += len;
                // Read no more than a request can be; a longer one is refused anyway.
                let take = len.min((MAX_REQUEST + 1).saturating_sub(layout.request.len()));
                if take > 0 {
                    let start = layout.request.len();
                    layout.request.resize(start + take, 0);
                    self.mem
                        .read_slice(&mut layout.request[start..], addr)
                        .map_err(|e| format!("reading a request buffer failed: {e}"))?;
                }
            }
        }
        Ok(layout)
    }

    fn write_response(&mut self, layout: &Layout, response: &[u8]) -> usize {
        let mut written = 0;
        for &(addr, len) in &layout.response {
            if written == response.len() {
                break;
            }
            let n = len.min(response.len() - written);
            if self.mem.write_slice(&response[written..written + n], addr).is_err() {
                self.fault("write", "writing the response into guest memory failed");
                return written;
            }
            written += n;
        }
        written
    }

    fn fault(&mut self, kind: &'static str, what: impl std::fmt::Display) {
        self.faults.report(NAME, kind, what);
    }
}

impl MutEventSubscriber for NsmBackend {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        self.handle(events.fd());
    }

    /// Registers the command kick and the queue's notifier (both level-triggered eventfds, so
    /// a notification that came while the VMM had the backend off its loop fires now); called
    /// at start and on every resume after a pause.
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.commands.fd(), self.notifier.as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!(target: "carve::virtio", "{NAME}: cannot watch descriptor {fd}: {e:?}");
            }
        }
    }
}

impl Drop for NsmBackend {
    fn drop(&mut self) {
        log::info!(
            target: "carve::virtio",
            "{NAME}: {} requests answered",
            self.stats.requests.load(Ordering::Relaxed)
        );
    }
}
