//! Running a built VM: one thread per vCPU, and on the calling thread an event-manager loop
//! with the exit eventfd, console input, stop signals, the halt watch, the control socket and
//! the device backends. Event handlers only queue [`Action`]s; the loop carries them out between
//! rounds, where it may pause vCPUs and take backends off the loop.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberId, SubscriberOps};
use kvm_ioctls::VmFd;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::control::{self, ControlReply, ControlRequest, VmDescription, MAX_SAMPLE_MS};
use crate::cpu_features::sgx::Epc;
use crate::device_manager::DeviceManager;
use crate::devices::serial::SerialPort;
use crate::exit::{ExitSignal, VmExit};
use crate::kvm_state::CpuidEntry;
use crate::memory;
use crate::migration::protocol::Offer;
use crate::migration::source::{Cancel, FromLoop, Source, ToLoop};
use crate::migration::Progress;
use crate::snapshot::{SaveError, VmSnapshot};
use crate::vcpu::{Vcpu, VcpuContext, VcpuHandle, VcpuRequest, VcpuResponse};
use crate::vm::{VmError, VmOutcome};

/// What [`run`] needs of a built (or restored) VM.
pub(crate) struct Parts {
    pub vcpus: Vec<Vcpu>,
    pub context: Arc<VcpuContext>,
    pub devices: DeviceManager,
    pub serial_input: bool,
    pub vcpu_affinity: Vec<usize>,
    pub vm_fd: Arc<VmFd>,
    /// The virtual EPC's mappings, kept as long as the VM runs.
    pub epc: Option<Epc>,
}

/// Work an event handler asks the loop for.
enum Action {
    PrintState,
    HaltCheck,
    Control(ControlRequest, UnixStream),
    /// The migration thread has news (converged, or finished).
    Migration,
}

type Actions = Rc<RefCell<VecDeque<Action>>>;

/// Event-loop rounds that drain device work after the vCPUs stopped; each round takes every
/// event already signalled, so a few suffice and a guest cannot keep the VMM alive.
const DRAIN_ROUNDS: usize = 16;

const HALT_WATCH_PERIOD: Duration = Duration::from_millis(500);

pub(crate) fn run(parts: Parts, control: Option<UnixListener>) -> Result<VmOutcome, VmError> {
    let host = |e: &dyn std::fmt::Display| VmError::Host(e.to_string());
    let context = parts.context.clone();
    let mut events =
        EventManager::<Box<dyn MutEventSubscriber>>::new().map_err(|e| host(&format!("{e:?}")))?;
    let actions: Actions = Default::default();
    let exit_event = context.exit.event().try_clone().map_err(|e| host(&e))?;
    events.add_subscriber(Box::new(ExitWatcher(exit_event)));
    if parts.serial_input {
        events.add_subscriber(Box::new(ConsoleInput { serial: parts.devices.serial.clone() }));
    }
    // Stop signals end the VM like any other exit, so devices clean up (sockets removed).
    let mut signal_ids = Vec::new();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
        let (reader, id) = signal_pipe(signal)?;
        signal_ids.push(id);
        events.add_subscriber(Box::new(StopSignal { reader, signal, exit: context.exit.clone() }));
    }
    // SIGUSR1 asks every vCPU for its registers, as QEMU's `info registers` (a guest that
    // hangs can be located without stopping it).
    let (reader, id) = signal_pipe(signal_hook::consts::SIGUSR1)?;
    signal_ids.push(id);
    events.add_subscriber(Box::new(Queue {
        source: reader,
        action: || Action::PrintState,
        actions: actions.clone(),
    }));
    let mut timer = vmm_sys_util::timerfd::TimerFd::new().map_err(|e| host(&e))?;
    timer.reset(HALT_WATCH_PERIOD, Some(HALT_WATCH_PERIOD)).map_err(|e| host(&e))?;
    events.add_subscriber(Box::new(Queue {
        source: timer,
        action: || Action::HaltCheck,
        actions: actions.clone(),
    }));
    if let Some(listener) = control {
        events.add_subscriber(Box::new(ControlServer { listener, actions: actions.clone() }));
    }

    let guest_cpuid =
        parts.vcpus.first().map(|v| v.cpuid.iter().map(CpuidEntry::from).collect()).unwrap_or_default();
    let mut runner = Runner {
        vcpus: Vec::new(),
        guest_cpuid,
        actions: actions.clone(),
        migration: None,
        migrated: false,
        dirty_log_busy: Default::default(),
        devices: parts.devices,
        context: context.clone(),
        vm_fd: parts.vm_fd,
        paused_since: None,
        clock_at_pause: None,
        paused_total: Duration::ZERO,
        started: Instant::now(),
        halt_check_sent: false,
        epc: parts.epc,
    };
    runner.devices.start_backends(&mut events);
    for vcpu in parts.vcpus {
        let host_cpu = parts.vcpu_affinity.get(vcpu.index).copied();
        match VcpuHandle::spawn(vcpu, context.clone(), host_cpu) {
            Ok(handle) => runner.vcpus.push(handle),
            Err(e) => {
                context.exit.request(VmExit::VmmFailure(format!("cannot start a vCPU thread: {e}")));
                break;
            }
        }
    }
    while !context.exit.is_requested() {
        if let Err(e) = events.run() {
            context.exit.request(VmExit::VmmFailure(format!("event loop failed: {e:?}")));
        }
        loop {
            let Some(action) = actions.borrow_mut().pop_front() else { break };
            runner.act(action, &mut events);
        }
    }
    if let Some(migration) = runner.migration.take() {
        runner.migrated = migration.cancel();
    }
    for handle in runner.vcpus.drain(..) {
        handle.join();
    }
    // The guest may have handed devices work just before it stopped (say, the last packets
    // of a reply, then a power-off): queue notifications arrive through ioeventfds, so let
    // the devices take what is already signalled before they are dropped. Not after a
    // migration: that work is the destination's now (its queues carry it), done twice here.
    if !runner.migrated {
        runner.devices.start_backends(&mut events);
        for _ in 0..DRAIN_ROUNDS {
            if !matches!(events.run_with_timeout(0), Ok(n) if n > 0) {
                break;
            }
        }
    }
    for id in signal_ids {
        signal_hook::low_level::unregister(id);
    }
    runner.devices.flush_serial();
    let exit = context.exit.take().expect("the loop ends only once an exit was requested");
    Ok(VmOutcome { exit, io: context.stats.snapshot() })
}

fn signal_pipe(signal: i32) -> Result<(UnixStream, signal_hook::SigId), VmError> {
    let host = |e: std::io::Error| VmError::Host(e.to_string());
    let (reader, writer) = UnixStream::pair().map_err(host)?;
    reader.set_nonblocking(true).map_err(host)?;
    let id = signal_hook::low_level::pipe::register(signal, writer).map_err(host)?;
    Ok((reader, id))
}

/// The loop's view of the running VM.
struct Runner {
    vcpus: Vec<VcpuHandle>,
    /// vCPU 0's CPUID: what a migration's destination must offer.
    guest_cpuid: Vec<CpuidEntry>,
    actions: Actions,
    migration: Option<Migration>,
    /// The VM ended by migrating: its devices' pending work went with it.
    migrated: bool,
    /// A migration or a `describe` sample has the dirty log.
    dirty_log_busy: Arc<AtomicBool>,
    devices: DeviceManager,
    context: Arc<VcpuContext>,
    vm_fd: Arc<VmFd>,
    paused_since: Option<Instant>,
    /// The KVM clock when the VM last paused.
    clock_at_pause: Option<kvm_bindings::kvm_clock_data>,
    paused_total: Duration,
    started: Instant,
    /// A halt check went out last period; its answers decide this period.
    halt_check_sent: bool,
    /// The virtual EPC, if any: it lives until the VM has ended.
    epc: Option<Epc>,
}

type Loop = EventManager<Box<dyn MutEventSubscriber>>;

impl Runner {
    fn act(&mut self, action: Action, events: &mut Loop) {
        match action {
            Action::PrintState => self.vcpus.iter().for_each(|v| v.send(VcpuRequest::PrintState)),
            Action::HaltCheck => self.halt_check(),
            Action::Control(ControlRequest::Migrate { to, downtime_ms }, stream) => {
                if let Err(error) = self.start_migration(to, downtime_ms, &stream, events) {
                    control::send_reply(stream, &ControlReply::failed(error));
                }
            }
            Action::Control(ControlRequest::Describe { sample_ms }, stream) if sample_ms > 0 => {
                self.sample(sample_ms, stream)
            }
            Action::Control(request, stream) => {
                let reply = self.control(request, events);
                control::send_reply(stream, &reply);
            }
            Action::Migration => self.migration_news(events),
        }
    }

    /// Ends the VM once nothing can run again. Every period each vCPU is asked whether it is
    /// stuck (halted with interrupts disabled, or never started); if all said so, the VM is over
    /// ([`VmExit::Halted`]). KVM keeps a halted vCPU inside KVM_RUN, so only asking tells.
    fn halt_check(&mut self) {
        if self.paused_since.is_some() {
            self.halt_check_sent = false;
            return;
        }
        if self.halt_check_sent {
            let answers: Vec<Option<bool>> = self.vcpus.iter().map(VcpuHandle::take_stuck_answer).collect();
            if answers.iter().all(|a| *a == Some(true)) {
                self.context.exit.request(VmExit::Halted);
                return;
            }
        }
        self.vcpus.iter().for_each(|v| v.send(VcpuRequest::CheckStuck));
        self.halt_check_sent = true;
    }

    fn control(&mut self, request: ControlRequest, events: &mut Loop) -> ControlReply {
        let started = Instant::now();
        if let (Some(migration), false) =
            (&self.migration, matches!(request, ControlRequest::Describe { .. }))
        {
            return ControlReply::failed(format!(
                "a migration to {} is under way; wait for it to end (`carve vm describe` shows it)",
                migration.to
            ));
        }
        let result = match request {
            ControlRequest::Pause => self.pause(events),
            ControlRequest::Resume { hide_pause } => self.resume(events, hide_pause),
            ControlRequest::Describe { .. } => {
                return ControlReply { description: Some(self.describe()), ..Default::default() }
            }
            ControlRequest::Snapshot { to } => self.snapshot(&to, events),
            // `act` takes these before they reach here.
            ControlRequest::Migrate { .. } => Err("internal: migrate reached control()".into()),
        };
        match result {
            Ok(()) => {
                ControlReply { took_us: Some(started.elapsed().as_micros() as u64), ..Default::default() }
            }
            Err(error) => ControlReply::failed(error),
        }
    }

    /// Stops every vCPU at its next exit, then takes the device backends off the loop: nothing
    /// changes guest memory, queues or registers until [`Runner::resume`].
    fn pause(&mut self, events: &mut Loop) -> Result<(), String> {
        if self.paused_since.is_some() {
            return Ok(());
        }
        self.vcpus.iter().for_each(|v| v.send(VcpuRequest::Pause));
        for vcpu in &self.vcpus {
            if vcpu.wait(|r| matches!(r, VcpuResponse::Paused).then_some(())).is_none() {
                return Err(format!("vCPU {} has stopped; the VM is ending", vcpu.index));
            }
        }
        // The KVM clock runs on while the VM is paused: read as the vCPUs stopped, for a resume
        // that hides the pause.
        self.clock_at_pause = self.vm_fd.get_clock().ok();
        self.devices.park_backends(events);
        self.paused_since = Some(Instant::now());
        Ok(())
    }

    /// Runs the VM on from its pause; with `hide_pause` the guest's TSCs and KVM clock first go
    /// back to their values at the pause, so the guest sees no time pass (as `--time frozen` at
    /// a restore).
    fn resume(&mut self, events: &mut Loop, hide_pause: bool) -> Result<(), String> {
        let Some(since) = self.paused_since else { return Ok(()) };
        if hide_pause {
            self.hide_pause()?;
        }
        self.paused_since = None;
        self.paused_total += since.elapsed();
        self.devices.start_backends(events);
        self.vcpus.iter().for_each(|v| v.send(VcpuRequest::Resume));
        for vcpu in &self.vcpus {
            if vcpu.wait(|r| matches!(r, VcpuResponse::Resumed).then_some(())).is_none() {
                return Err(format!("vCPU {} has stopped; the VM is ending", vcpu.index));
            }
        }
        Ok(())
    }

    /// Sets every vCPU's TSC, then the KVM clock (which KVM recomputes from the TSCs), back to
    /// their values at the pause. Everything is measured before anything is written, so a
    /// refusal leaves the VM paused as it was. Each vCPU's TSC moves back by the least any of
    /// them went on (on hosts with an unstable TSC, which KVM stops while a vCPU is not loaded,
    /// that is about nothing): offsets that were equal stay equal, and no TSC goes back past
    /// its value at the pause.
    fn hide_pause(&mut self) -> Result<(), String> {
        let Some(clock_at_pause) = self.clock_at_pause else {
            return Err("cannot hide the pause: the KVM clock was not read when the VM paused".into());
        };
        let mut least = u64::MAX;
        self.vcpus.iter().for_each(|v| v.send(VcpuRequest::MeasurePause));
        for vcpu in &self.vcpus {
            match vcpu.wait(|r| match r {
                VcpuResponse::PauseMeasured(moved) => Some(moved),
                _ => None,
            }) {
                Some(Ok(moved)) => least = least.min(moved),
                Some(Err(e)) => return Err(format!("cannot hide the pause from vCPU {}: {e}", vcpu.index)),
                None => return Err(format!("vCPU {} has stopped; the VM is ending", vcpu.index)),
            }
        }
        self.vcpus.iter().for_each(|v| v.send(VcpuRequest::RewindTsc(least)));
        for vcpu in &self.vcpus {
            match vcpu.wait(|r| match r {
                VcpuResponse::TscRewound(rewound) => Some(rewound),
                _ => None,
            }) {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(format!("cannot hide the pause from vCPU {}: {e}", vcpu.index)),
                None => return Err(format!("vCPU {} has stopped; the VM is ending", vcpu.index)),
            }
        }
        let clock = kvm_bindings::kvm_clock_data { clock: clock_at_pause.clock, ..Default::default() };
        self.vm_fd.set_clock(&clock).map_err(|e| format!("KVM refused KVM_SET_CLOCK for the VM: {e}"))
    }

    /// Saves the VM to `dir`: paused for the time it takes, then running again if it ran.
    fn snapshot(&mut self, dir: &Path, events: &mut Loop) -> Result<(), String> {
        if self.epc.is_some() {
            return Err(SaveError::Epc.to_string());
        }
        let was_running = self.paused_since.is_none();
        self.pause(events)?;
        let saved = self.save_to(dir).map_err(|e| e.to_string());
        if was_running {
            self.resume(events, false)?;
        }
        saved
    }

    fn save_to(&mut self, dir: &Path) -> Result<(), VmError> {
        let snapshot = self.saved_state()?;
        crate::snapshot::save(dir, &snapshot, &self.context.mem)?;
        Ok(())
    }

    /// Each vCPU saves itself on its own thread; the rest is [`VmSnapshot::compose`], as for a
    /// VM that does not run. The VM is paused.
    fn saved_state(&mut self) -> Result<VmSnapshot, VmError> {
        self.vcpus.iter().for_each(|v| v.send(VcpuRequest::Save));
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for vcpu in &self.vcpus {
            let saved = vcpu.wait(|r| match r {
                VcpuResponse::Saved(saved) => Some(saved),
                _ => None,
            });
            match saved {
                Some(Ok(state)) => vcpus.push(*state),
                Some(Err(e)) => return Err(SaveError::Kvm(e).into()),
                None => {
                    return Err(VmError::Host(format!("vCPU {} has stopped; the VM is ending", vcpu.index)))
                }
            }
        }
        VmSnapshot::compose(vcpus, &self.vm_fd, &self.context.mem, &self.devices)
    }

    /// Starts sending the VM to `to` on a thread of its own; the loop answers the client when
    /// it ends ([`Runner::migration_news`]).
    fn start_migration(
        &mut self,
        to: String,
        downtime_ms: u64,
        client: &UnixStream,
        events: &mut Loop,
    ) -> Result<(), String> {
        if let Some(migration) = &self.migration {
            return Err(format!("a migration to {} is already under way", migration.to));
        }
        if self.epc.is_some() {
            return Err("a VM with SGX EPC sections cannot be migrated: EPC contents cannot be read out of \
                        the enclave page cache"
                .into());
        }
        if self.paused_since.is_some() {
            return Err("the VM is paused; resume it before migrating it".into());
        }
        crate::migration::source::check_address(&to)?;
        if self.dirty_log_busy.swap(true, Ordering::SeqCst) {
            return Err("the dirty log is in use by a `describe --sample-ms`; migrate when it ends".into());
        }
        let claimed = self.dirty_log_busy.clone();
        let io = |e: std::io::Error| {
            claimed.store(false, Ordering::SeqCst);
            format!("cannot start the migration: {e}")
        };
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
        let wake_loop = wake.try_clone().map_err(io)?;
        let client = client.try_clone().map_err(io)?;
        let (to_loop, from_thread) = channel();
        let (to_thread, from_loop) = channel();
        let cancel = Cancel::default();
        let progress = Arc::new(Progress::default());
        let mem = self.context.mem.clone();
        let offer = Offer {
            memory: memory::layout(&mem),
            vcpus: self.vcpus.len() as u32,
            cpuid: self.guest_cpuid.clone(),
        };
        let source = Source {
            to: to.clone(),
            downtime: Duration::from_millis(downtime_ms),
            vm: self.vm_fd.clone(),
            mem,
            offer,
            to_loop,
            wake,
            from_loop,
            cancel: cancel.clone(),
            dirty_log_busy: self.dirty_log_busy.clone(),
            progress: progress.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("carve-migrate".into())
            .spawn(move || source.run())
            .map_err(io)?;
        let subscriber = events.add_subscriber(Box::new(Queue {
            source: wake_loop,
            action: || Action::Migration,
            actions: self.actions.clone(),
        }));
        self.migration = Some(Migration {
            to,
            started: Instant::now(),
            progress,
            client,
            to_thread,
            from_thread,
            cancel,
            thread,
            subscriber,
        });
        Ok(())
    }

    /// The migration thread converged (pause the VM and hand it the state; the VM stays paused
    /// until the outcome) or ended (the VM ends, or resumes if the loop paused it).
    fn migration_news(&mut self, events: &mut Loop) {
        let Some(migration) = self.migration.take() else { return };
        let mut outcome = None;
        while let Ok(news) = migration.from_thread.try_recv() {
            match news {
                ToLoop::StopTheVm => {
                    let paused_at = Instant::now();
                    let state =
                        self.pause(events).and_then(|()| self.saved_state().map_err(|e| e.to_string()));
                    // The loop goes on serving (`describe` shows the last round) while the VM
                    // stays paused: nothing resumes it but the outcome.
                    let _ = migration.to_thread.send(match state {
                        Ok(state) => FromLoop::Stopped { state: Box::new(state), paused_at },
                        Err(e) => FromLoop::Failed(format!("cannot stop the VM for its last round: {e}")),
                    });
                }
                ToLoop::Finished(result) => outcome = Some(result),
            }
        }
        let Some(outcome) = outcome else {
            self.migration = Some(migration);
            return;
        };
        let _ = events.remove_subscriber(migration.subscriber);
        let _ = migration.thread.join();
        match outcome {
            Ok(report) => {
                self.migrated = true;
                self.context.exit.request(VmExit::Migrated { to: report.to.clone() });
                let reply = ControlReply { migration: Some(report), ..Default::default() };
                control::send_reply(migration.client, &reply);
            }
            Err(failure) => {
                let mut error = format!("the migration to {} failed: {}", migration.to, failure.reason);
                if failure.may_resume && self.paused_since.is_some() {
                    if let Err(e) = self.resume(events, false) {
                        error = format!("{error}; resuming the VM failed too: {e}");
                    }
                }
                let here = match self.paused_since {
                    Some(_) => "the VM stays paused here",
                    None => "the VM runs on here",
                };
                eprintln!("carve: {error}; {here}");
                control::send_reply(migration.client, &ControlReply::failed(error));
            }
        }
    }

    /// Answers `describe --sample-ms` from a thread of its own once the window has passed, so the
    /// loop runs on meanwhile.
    fn sample(&mut self, sample_ms: u64, client: UnixStream) {
        if sample_ms > MAX_SAMPLE_MS {
            let error = format!("a sample of {sample_ms} ms is longer than the {MAX_SAMPLE_MS} ms allowed");
            return control::send_reply(client, &ControlReply::failed(error));
        }
        if self.dirty_log_busy.swap(true, Ordering::SeqCst) {
            let error = "the dirty log is in use (a migration or another sample); describe without \
                         --sample-ms, or sample later";
            return control::send_reply(client, &ControlReply::failed(error));
        }
        let mut description = self.describe();
        let (vm, mem, busy) = (self.vm_fd.clone(), self.context.mem.clone(), self.dirty_log_busy.clone());
        let window = Duration::from_millis(sample_ms);
        let answer_here = client.try_clone();
        let spawned = std::thread::Builder::new().name("carve-sample".into()).spawn(move || {
            let activity = crate::activity::sample(vm, &mem, window);
            busy.store(false, Ordering::SeqCst);
            let reply = match activity {
                Ok(activity) => {
                    description.memory = Some(activity);
                    ControlReply { description: Some(description), ..Default::default() }
                }
                Err(e) => ControlReply::failed(e),
            };
            control::send_reply(client, &reply);
        });
        if let Err(e) = spawned {
            self.dirty_log_busy.store(false, Ordering::SeqCst);
            if let Ok(client) = answer_here {
                control::send_reply(client, &ControlReply::failed(format!("cannot start the sample: {e}")));
            }
        }
    }

    fn describe(&self) -> VmDescription {
        let paused = self.paused_total + self.paused_since.map_or(Duration::ZERO, |since| since.elapsed());
        VmDescription {
            state: if self.paused_since.is_some() { "paused" } else { "running" }.into(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            paused_ms: paused.as_millis() as u64,
            vcpus: self.vcpus.len(),
            memory_bytes: memory::total_size(&self.context.mem),
            exits: self.context.stats.snapshot().into(),
            memory: None,
            migration: self.migration.as_ref().map(|m| m.progress.report(&m.to, m.started)),
        }
    }
}

/// A migration under way: its thread, and the client waiting for the outcome.
struct Migration {
    to: String,
    started: Instant,
    progress: Arc<Progress>,
    client: UnixStream,
    to_thread: Sender<FromLoop>,
    from_thread: Receiver<ToLoop>,
    cancel: Cancel,
    thread: JoinHandle<()>,
    subscriber: SubscriberId,
}

impl Migration {
    /// The VM ended meanwhile: the thread stops at once (its connection shut down) and tells
    /// the destination. Returns whether the VM may run at the destination all the same (it had
    /// started there, or its state had left): its device work is then not this side's.
    fn cancel(self) -> bool {
        self.cancel.request();
        let _ = self.to_thread.send(FromLoop::Failed("the VM ended during the migration".into()));
        let _ = self.thread.join();
        let outcome = self.from_thread.try_iter().find_map(|news| match news {
            ToLoop::Finished(outcome) => Some(outcome),
            ToLoop::StopTheVm => None,
        });
        let (reply, elsewhere) = match outcome {
            Some(Ok(report)) => (ControlReply { migration: Some(report), ..Default::default() }, true),
            Some(Err(failure)) => {
                let error = format!("the migration to {} failed: {}", self.to, failure.reason);
                (ControlReply::failed(error), !failure.may_resume)
            }
            None => (ControlReply::failed("the VM ended during the migration"), false),
        };
        control::send_reply(self.client, &reply);
        elsewhere
    }
}

/// Wakes the event loop when a vCPU or device asks the VM to end.
struct ExitWatcher(EventFd);

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.0, EventSet::IN)).expect("a fresh eventfd registers");
    }
}

/// Ends the VM when a stop signal arrives (signal-hook writes a byte to `reader`'s peer).
struct StopSignal {
    reader: UnixStream,
    signal: i32,
    exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for StopSignal {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.reader.read(&mut [0u8; 16]);
        self.exit.request(VmExit::Stopped(self.signal));
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.reader, EventSet::IN)).expect("a fresh socket registers");
    }
}

/// Something readable that, when it fires, queues an action: a signal pipe or a timer.
trait Drain: AsRawFd {
    fn drain(&mut self);
}

impl Drain for UnixStream {
    fn drain(&mut self) {
        let _ = self.read(&mut [0u8; 16]);
    }
}

impl Drain for EventFd {
    fn drain(&mut self) {
        let _ = self.read();
    }
}

impl Drain for vmm_sys_util::timerfd::TimerFd {
    fn drain(&mut self) {
        let _ = self.wait();
    }
}

struct Queue<S, F> {
    source: S,
    action: F,
    actions: Actions,
}

impl<S: Drain, F: Fn() -> Action> MutEventSubscriber for Queue<S, F> {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.source.drain();
        self.actions.borrow_mut().push_back((self.action)());
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.source, EventSet::IN)).expect("a fresh descriptor registers");
    }
}

/// Accepts control connections and queues their requests.
struct ControlServer {
    listener: UnixListener,
    actions: Actions,
}

impl MutEventSubscriber for ControlServer {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            match control::read_request(&stream) {
                Ok(request) => self.actions.borrow_mut().push_back(Action::Control(request, stream)),
                Err(error) => control::send_reply(stream, &ControlReply::failed(error)),
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.listener, EventSet::IN)).expect("a fresh listener registers");
    }
}

/// Feeds standard input to the guest's serial port.
struct ConsoleInput {
    serial: Arc<Mutex<SerialPort>>,
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n = std::io::stdin().lock().read(&mut buf).unwrap_or(0);
        if n == 0 || events.event_set().contains(EventSet::HANG_UP) {
            let _ = ops.remove(events);
            return;
        }
        self.serial.lock().unwrap_or_else(PoisonError::into_inner).enqueue_input(&buf[..n]);
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Regular files and /dev/null cannot be polled; then there is simply no console input.
        let _ = ops.add(Events::new(&std::io::stdin().as_raw_fd(), EventSet::IN));
    }
}
