//! vCPU configuration (CPUID, MSRs, LAPIC) and the KVM_RUN loop each vCPU thread runs.

use crate::memory::GuestRam;
use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Once};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_msr_entry, kvm_run, Msrs, KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::bus::Bus;
use crate::exit::{CrashKind, CrashReport, ExitSignal, VmExit};
use crate::guest_state::{self, CetState, GuestState, Platform};
use crate::kvm_state::{self, HostCaps, StateError, VcpuState};
use carve_snapshot::Persist;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Accesses no device claimed: ignored, reads answered with all ones.
#[derive(Default)]
pub struct IoStats {
    pub pio_exits: AtomicU64,
    pub mmio_exits: AtomicU64,
    pub ignored_pio: AtomicU64,
    pub ignored_mmio: AtomicU64,
    /// `int3`s the host could not emulate, delivered by carve.
    pub breakpoints: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoStatsSnapshot {
    pub pio_exits: u64,
    pub mmio_exits: u64,
    pub ignored_pio: u64,
    pub ignored_mmio: u64,
    pub breakpoints: u64,
}

impl IoStats {
    pub fn snapshot(&self) -> IoStatsSnapshot {
        IoStatsSnapshot {
            pio_exits: self.pio_exits.load(Ordering::Relaxed),
            mmio_exits: self.mmio_exits.load(Ordering::Relaxed),
            ignored_pio: self.ignored_pio.load(Ordering::Relaxed),
            ignored_mmio: self.ignored_mmio.load(Ordering::Relaxed),
            breakpoints: self.breakpoints.load(Ordering::Relaxed),
        }
    }
}

/// Boot MSRs: fast strings on, MTRRs enabled with write-back default (as firmware leaves them).
pub fn boot_msrs() -> Msrs {
    let entry = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    Msrs::from_entries(&[
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ])
    .expect("two MSR entries fit")
}

/// Routes LINT0 as ExtINT (the PIC) and LINT1 as NMI, as the MP table describes.
pub fn configure_lapic(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut lapic = vcpu.get_lapic()?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: Vec<u8> = lapic.regs[offset..offset + 4].iter().map(|&b| b as u8).collect();
        let value = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let value = (value & !0x700) | (mode << 8);
        for (slot, byte) in lapic.regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
            *slot = byte as _;
        }
    }
    vcpu.set_lapic(&lapic)
}

/// What a vCPU thread shares with the rest of the VM.
pub struct VcpuContext {
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: Arc<ExitSignal>,
    pub stats: IoStats,
    pub mem: GuestRam,
    /// What the VM-entry checks assume, for explaining a failed entry.
    pub platform: Platform,
}

/// One vCPU: what KVM holds of it and what saving it needs. What its thread shares with the
/// rest of the VM ([`VcpuContext`]) is handed over when the thread starts: a restore rebuilds
/// the vCPUs before the devices the context's buses reach (those go onto the irqchip, which is
/// restored after the LAPICs).
pub struct Vcpu {
    pub index: usize,
    pub fd: VcpuFd,
    /// The CPUID it was given (KVM_SET_CPUID2's input), which a snapshot carries.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// What this host's KVM offers for saving it, read once per VM and shared by its vCPUs.
    pub caps: Arc<HostCaps>,
}

/// What restoring a vCPU takes besides its state.
pub struct VcpuRestore {
    /// The vCPU fresh from KVM_CREATE_VCPU. The VM's restore creates every vCPU before it writes
    /// anything: checking the saved TSC frequencies against this host reads them.
    pub fd: VcpuFd,
    pub index: usize,
    pub caps: Arc<HostCaps>,
    /// How far the guest TSC moves on from its saved value (what the restored clock advanced).
    pub tsc_advance_ns: u64,
}

/// KVM's state of the vCPU. Saved while it does not run: in place before the VM runs, on its
/// own thread ([`VcpuRequest::Save`]) while it does.
impl Persist for Vcpu {
    type State = VcpuState;
    type ConstructorArgs = VcpuRestore;
    type Error = StateError;

    fn save(&self) -> Result<VcpuState, StateError> {
        kvm_state::save_vcpu(&self.fd, self.index, &self.cpuid, &self.caps)
    }

    /// Step 3 of the restore order in [`kvm_state`]: the VM's restore checks the host and sets
    /// the clock before, and lines up TSC offsets and restores the irqchip after, every vCPU.
    fn restore(args: VcpuRestore, state: &VcpuState) -> Result<Vcpu, StateError> {
        // Performance-monitoring MSRs KVM would not take are tolerated (kvm_state's msrs.rs).
        let _skipped = kvm_state::restore_vcpu(&args.fd, args.index, state, &args.caps, args.tsc_advance_ns)?;
        Ok(Vcpu {
            index: args.index,
            fd: args.fd,
            cpuid: state.cpuid.iter().map(Into::into).collect(),
            caps: args.caps,
        })
    }
}

/// A vCPU on its thread, with what it shares with the rest of the VM.
struct VcpuThread {
    vcpu: Vcpu,
    context: Arc<VcpuContext>,
    /// The guest TSC when the vCPU last paused, for [`VcpuRequest::MeasurePause`].
    tsc_at_pause: Option<Result<u64, String>>,
}

/// What the VMM asks of a vCPU thread. A request is sent, then the thread is kicked out of
/// KVM_RUN; it answers on its response channel.
#[derive(Debug)]
pub enum VcpuRequest {
    /// Stop at the next exit and wait for further requests ([`VcpuResponse::Paused`]).
    Pause,
    /// Continue running ([`VcpuResponse::Resumed`]).
    Resume,
    /// Tell how far the guest TSC went on since the pause ([`VcpuResponse::PauseMeasured`]);
    /// only answered while paused.
    MeasurePause,
    /// Move the guest TSC back by this many ticks ([`VcpuResponse::TscRewound`]): the least any
    /// vCPU went on, so that equal TSC offsets stay equal and no TSC goes back past its value at
    /// the pause. Only answered while paused.
    RewindTsc(u64),
    /// Save KVM's state of the vCPU ([`Persist::save`]); only answered while paused.
    Save,
    /// Print the registers to standard error (SIGUSR1), no answer.
    PrintState,
    /// Answer whether only another vCPU could ever wake this one ([`VcpuResponse::Stuck`]).
    CheckStuck,
    /// Leave the thread.
    Exit,
}

#[derive(Debug)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    Saved(Result<Box<VcpuState>, StateError>),
    PauseMeasured(Result<u64, StateError>),
    TscRewound(Result<(), StateError>),
    Stuck(bool),
    /// A request the vCPU cannot answer in its state (saving a running vCPU).
    NotAllowed(&'static str),
}

/// The vCPU thread's states: running guest code, parked between requests, or leaving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
    Exiting,
}

/// The VMM's end of a vCPU thread.
pub struct VcpuHandle {
    pub index: usize,
    requests: Sender<VcpuRequest>,
    responses: Receiver<VcpuResponse>,
    thread: JoinHandle<()>,
}

/// How long a request waits for its answer before the thread is kicked again: a kick that lands
/// just before KVM_RUN is caught by `immediate_exit`, so this only bounds a lost race.
const KICK_RETRY: Duration = Duration::from_millis(20);

impl VcpuHandle {
    /// Starts `vcpu` on its own thread with the VM's `context`, pinned to `host_cpu` when given.
    pub fn spawn(
        vcpu: Vcpu,
        context: Arc<VcpuContext>,
        host_cpu: Option<usize>,
    ) -> std::io::Result<VcpuHandle> {
        install_kick_handler();
        let (requests, request_rx) = channel();
        let (response_tx, responses) = channel();
        let index = vcpu.index;
        let thread = thread::Builder::new().name(format!("carve-vcpu{index}")).spawn(move || {
            if let Some(cpu) = host_cpu {
                if let Err(e) = pin_current_thread(cpu) {
                    let message = format!("cannot pin vCPU {index} to host CPU {cpu}: {e}");
                    context.exit.request(VmExit::VmmFailure(message));
                    return;
                }
            }
            VcpuThread { vcpu, context, tsc_at_pause: None }.run(request_rx, response_tx)
        })?;
        Ok(VcpuHandle { index, requests, responses, thread })
    }

    /// Sends a request and kicks the thread out of KVM_RUN so it sees it.
    pub fn send(&self, request: VcpuRequest) {
        // A thread that has left drops its receiver; there is nothing left to ask then.
        if self.requests.send(request).is_ok() {
            self.kick();
        }
    }

    /// Waits for the answer `accept` takes, dropping answers of other kinds (a halt check's)
    /// and kicking the thread again while none comes. `None` when the thread has left.
    pub fn wait<T>(&self, mut accept: impl FnMut(VcpuResponse) -> Option<T>) -> Option<T> {
        loop {
            match self.responses.recv_timeout(KICK_RETRY) {
                Ok(response) => {
                    if let Some(answer) = accept(response) {
                        return Some(answer);
                    }
                }
                Err(RecvTimeoutError::Timeout) if !self.thread.is_finished() => self.kick(),
                Err(_) => return None,
            }
        }
    }

    /// The latest answer to a [`VcpuRequest::CheckStuck`], if one came since the last call.
    pub fn take_stuck_answer(&self) -> Option<bool> {
        let mut answer = None;
        while let Ok(response) = self.responses.try_recv() {
            if let VcpuResponse::Stuck(stuck) = response {
                answer = Some(stuck);
            }
        }
        answer
    }

    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    fn kick(&self) {
        // std hands out a u64 everywhere; libc's pthread_t is a pointer on musl.
        #[allow(clippy::unnecessary_cast)]
        let thread = self.thread.as_pthread_t() as libc::pthread_t;
        // SAFETY: the handle owns the JoinHandle, so the thread is not yet joined and its id is
        // live; SIGRTMIN has a handler that only sets the thread's own `immediate_exit`.
        unsafe { libc::pthread_kill(thread, SIGRTMIN()) };
    }

    /// Asks the thread to leave and joins it, kicking until it has.
    pub fn join(self) {
        let _ = self.requests.send(VcpuRequest::Exit);
        while !self.thread.is_finished() {
            self.kick();
            thread::sleep(Duration::from_micros(200));
        }
        let _ = self.thread.join();
    }
}

thread_local! {
    /// This thread's `kvm_run`, for the kick handler: setting `immediate_exit` there makes a
    /// KVM_RUN the kick arrived just before return at once, so no kick is ever lost.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        KVM_RUN.with(|run| {
            let run = run.get();
            if !run.is_null() {
                // SAFETY: the pointer is this thread's own mapped kvm_run, published by
                // `VcpuThread::run` and cleared before its VcpuFd (and the mapping) is dropped; a
                // signal handler on the same thread cannot race with that.
                unsafe { (*run).immediate_exit = 1 };
            }
        });
    }
    ONCE.call_once(|| {
        // Without a handler SIGRTMIN would kill the process; with one, KVM_RUN returns EINTR.
        register_signal_handler(SIGRTMIN(), kick).expect("SIGRTMIN is a valid signal");
    });
}

/// Clears the kick handler's pointer when the vCPU thread leaves, before its VcpuFd unmaps it.
struct PublishedRun;

impl PublishedRun {
    fn publish(fd: &mut VcpuFd) -> PublishedRun {
        let run: *mut kvm_run = fd.get_kvm_run();
        KVM_RUN.with(|slot| slot.set(run));
        PublishedRun
    }
}

impl Drop for PublishedRun {
    fn drop(&mut self) {
        KVM_RUN.with(|slot| slot.set(std::ptr::null_mut()));
    }
}

fn pin_current_thread(cpu: usize) -> rustix::io::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set)
}

/// What a single exit asks of the loop (computed while `kvm_run` is borrowed).
enum Step {
    Continue,
    Stop(VmExit),
    Crash(CrashKind, String),
    FailedEntry(u64, u32),
    InternalError,
}

impl VcpuThread {
    /// The thread's life: run the guest, answering requests between exits, until the VM is
    /// asked to end (by this vCPU, another one, or the VMM) or [`VcpuRequest::Exit`] arrives.
    fn run(mut self, requests: Receiver<VcpuRequest>, responses: Sender<VcpuResponse>) {
        let _published = PublishedRun::publish(&mut self.vcpu.fd);
        let mut state = RunState::Running;
        while state != RunState::Exiting {
            let request = match state {
                RunState::Paused => requests.recv().ok().or(Some(VcpuRequest::Exit)),
                _ => match requests.try_recv() {
                    Ok(request) => Some(request),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => Some(VcpuRequest::Exit),
                },
            };
            if let Some(request) = request {
                state = self.answer(request, state, &responses);
                continue;
            }
            if self.context.exit.is_requested() {
                break;
            }
            if let Some(exit) = self.step() {
                self.context.exit.request(exit);
            }
        }
    }

    /// Handles one request in `state`; returns the state to go on in.
    fn answer(
        &mut self,
        request: VcpuRequest,
        state: RunState,
        responses: &Sender<VcpuResponse>,
    ) -> RunState {
        let (next, response) = match (request, state) {
            (VcpuRequest::Exit, _) => (RunState::Exiting, None),
            (VcpuRequest::Pause, RunState::Paused) => (state, Some(VcpuResponse::Paused)),
            (VcpuRequest::Pause, _) => {
                // Read once stopped: nothing moves the TSC but time from here on.
                self.tsc_at_pause =
                    Some(kvm_state::guest_tsc(&self.vcpu.fd, self.vcpu.index).map_err(|e| e.to_string()));
                (RunState::Paused, Some(VcpuResponse::Paused))
            }
            (VcpuRequest::Resume, _) => (RunState::Running, Some(VcpuResponse::Resumed)),
            (VcpuRequest::MeasurePause, RunState::Paused) => {
                let index = self.vcpu.index;
                let moved = match &self.tsc_at_pause {
                    Some(Ok(at_pause)) => {
                        kvm_state::guest_tsc(&self.vcpu.fd, index).map(|now| now.saturating_sub(*at_pause))
                    }
                    Some(Err(e)) => Err(StateError::InvalidVcpu {
                        vcpu: index,
                        what: format!("its TSC at the pause: {e}"),
                    }),
                    None => Err(StateError::InvalidVcpu {
                        vcpu: index,
                        what: "its TSC at the pause was not read".into(),
                    }),
                };
                (state, Some(VcpuResponse::PauseMeasured(moved)))
            }
            (VcpuRequest::RewindTsc(ticks), RunState::Paused) => {
                let rewound = kvm_state::rewind_tsc(&self.vcpu.fd, self.vcpu.index, ticks);
                (state, Some(VcpuResponse::TscRewound(rewound)))
            }
            (VcpuRequest::MeasurePause | VcpuRequest::RewindTsc(_), _) => {
                (state, Some(VcpuResponse::NotAllowed("a running vCPU's pause cannot be hidden")))
            }
            (VcpuRequest::Save, RunState::Paused) => {
                (state, Some(VcpuResponse::Saved(self.vcpu.save().map(Box::new))))
            }
            (VcpuRequest::Save, _) => {
                (state, Some(VcpuResponse::NotAllowed("a running vCPU cannot be saved")))
            }
            (VcpuRequest::PrintState, _) => {
                let doing = if state == RunState::Paused { "paused" } else { "running" };
                eprintln!("carve: vCPU {} is {doing}. {}", self.vcpu.index, self.describe_state());
                (state, None)
            }
            // A paused vCPU is waiting for the VMM, not for the guest.
            (VcpuRequest::CheckStuck, _) => {
                (state, Some(VcpuResponse::Stuck(state == RunState::Running && self.is_stuck())))
            }
        };
        if let Some(response) = response {
            // The VMM may have stopped listening while it ends the VM.
            let _ = responses.send(response);
        }
        next
    }

    /// Runs the guest until its next exit; the VM's end if that exit ends it.
    fn step(&mut self) -> Option<VmExit> {
        Some(match self.run_once() {
            Step::Continue => return None,
            Step::Stop(exit) => exit,
            Step::Crash(kind, what) => self.crash(kind, what),
            Step::FailedEntry(reason, cpu) => {
                let what = format!(
                    "failed VM entry (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x} on host CPU \
                     {cpu}): {}; {}",
                    describe_entry_failure(reason),
                    self.broken_entry_rules()
                );
                self.crash(CrashKind::FailedEntry, what)
            }
            Step::InternalError => {
                if self.deliver_unemulated_breakpoint() {
                    return None;
                }
                let what = self.internal_error_detail();
                self.crash(CrashKind::InternalError, what)
            }
        })
    }

    fn run_once(&mut self) -> Step {
        let context = &self.context;
        match self.vcpu.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                context.stats.pio_exits.fetch_add(1, Ordering::Relaxed);
                if !context.pio.read(port.into(), data) {
                    context.stats.ignored_pio.fetch_add(1, Ordering::Relaxed);
                    data.fill(0xff);
                }
                Step::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                context.stats.pio_exits.fetch_add(1, Ordering::Relaxed);
                if !context.pio.write(port.into(), data) {
                    context.stats.ignored_pio.fetch_add(1, Ordering::Relaxed);
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                context.stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
                if !context.mmio.read(addr, data) {
                    context.stats.ignored_mmio.fetch_add(1, Ordering::Relaxed);
                    data.fill(0xff);
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                context.stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
                if !context.mmio.write(addr, data) {
                    context.stats.ignored_mmio.fetch_add(1, Ordering::Relaxed);
                }
                Step::Continue
            }
            Ok(VcpuExit::Intr) => Step::Continue,
            Ok(VcpuExit::Shutdown) => Step::Crash(
                CrashKind::TripleFault,
                "triple-faulted (KVM_EXIT_SHUTDOWN): an exception arrived while the CPU was \
                 delivering a double fault, which resets a real machine. Usual causes: no valid \
                 IDT, a bad stack pointer, or a page fault in the guest's own page tables"
                    .into(),
            ),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Step::FailedEntry(reason, cpu),
            Ok(VcpuExit::InternalError) => Step::InternalError,
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Step::Stop(VmExit::PowerOff),
                KVM_SYSTEM_EVENT_RESET => Step::Stop(VmExit::Reset),
                KVM_SYSTEM_EVENT_CRASH => {
                    Step::Crash(CrashKind::UnexpectedExit, "reported a crash (KVM_SYSTEM_EVENT_CRASH)".into())
                }
                other => {
                    Step::Crash(CrashKind::UnexpectedExit, format!("raised unknown system event {other}"))
                }
            },
            Ok(other) => Step::Crash(
                CrashKind::UnexpectedExit,
                format!("exited with {other:?}, which carve does not handle"),
            ),
            Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => {
                self.vcpu.fd.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) => match self.enabling_nested() {
                // KVM allocates a vCPU's nested state when its guest first sets EFER.SVME
                // ("nSVM: ondemand nested state allocation") and fails KVM_RUN if it cannot.
                true => Step::Crash(
                    CrashKind::UnexpectedExit,
                    format!(
                        "enabled nested virtualisation (WRMSR to EFER setting SVME) and KVM could not \
                         set up its nested state: KVM_RUN failed with {e}"
                    ),
                ),
                false => {
                    Step::Stop(VmExit::VmmFailure(format!("KVM_RUN failed on vCPU {}: {e}", self.vcpu.index)))
                }
            },
        }
    }

    /// Whether the vCPU stands at a WRMSR that sets EFER.SVME.
    fn enabling_nested(&self) -> bool {
        let (Ok(regs), Ok(sregs)) = (self.vcpu.fd.get_regs(), self.vcpu.fd.get_sregs()) else { return false };
        let mut code = [0u8; 2];
        let fetched = self.vcpu.fd.translate_gva(sregs.cs.base.wrapping_add(regs.rip)).is_ok_and(|t| {
            t.valid != 0 && self.context.mem.read_slice(&mut code, GuestAddress(t.physical_address)).is_ok()
        });
        fetched && sets_efer_svme(code, regs.rcx, regs.rax)
    }

    /// After an emulation failure at an `int3` (hosts whose emulator lacks INT3), delivers the
    /// #BP itself; true when the guest can go on.
    fn deliver_unemulated_breakpoint(&mut self) -> bool {
        // SAFETY: KVM filled the `internal` member of the union for KVM_EXIT_INTERNAL_ERROR.
        let suberror = unsafe { self.vcpu.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        if suberror != KVM_INTERNAL_ERROR_EMULATION {
            return false;
        }
        let delivered = crate::breakpoint::deliver(&self.vcpu.fd, &self.context.mem).is_ok();
        if delivered {
            self.context.stats.breakpoints.fetch_add(1, Ordering::Relaxed);
        }
        delivered
    }

    fn internal_error_detail(&mut self) -> String {
        // SAFETY: KVM filled the `internal` member of the union for KVM_EXIT_INTERNAL_ERROR.
        let internal = unsafe { self.vcpu.fd.get_kvm_run().__bindgen_anon_1.internal };
        let (name, meaning) = match internal.suberror {
            1 => (
                "emulation failure",
                "KVM could not emulate an instruction: usually an instruction fetch from MMIO or \
                 unbacked memory, or an instruction the host's emulator lacks (nested hosts miss \
                 XSAVE, POPCNT, STAC/CLAC and INT3)",
            ),
            2 => ("simultaneous exceptions", "an exception arrived while another was being delivered"),
            3 => ("event delivery failure", "delivering an interrupt or exception needed an exit KVM cannot handle there, often an IDT or stack in MMIO"),
            4 => ("unexpected exit reason", "the hardware exited for a reason KVM does not expect"),
            _ => ("unknown suberror", "KVM reported an internal error carve does not know"),
        };
        let data: Vec<String> =
            internal.data.iter().take(internal.ndata.min(16) as usize).map(|d| format!("{d:#x}")).collect();
        format!(
            "hit a KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {}: {name}): {meaning}; data [{}]",
            internal.suberror,
            data.join(", ")
        )
    }

    /// The VM-entry rules the vCPU's current state breaks, as one clause.
    fn broken_entry_rules(&self) -> String {
        let vcpu = &self.vcpu;
        match (vcpu.fd.get_regs(), vcpu.fd.get_sregs(), CetState::read(&vcpu.fd, &vcpu.cpuid)) {
            (Ok(regs), Ok(sregs), Ok(cet)) => {
                let state =
                    GuestState { cet, ..GuestState::from_kvm(&sregs, regs.rflags, &self.context.platform) };
                broken_entry_rules(&state, &self.context.platform)
            }
            _ => "the registers could not be read to check them".into(),
        }
    }

    fn crash(&self, kind: CrashKind, what: String) -> VmExit {
        let state = if matches!(kind, CrashKind::TripleFault) && self.was_reset() {
            "Registers unavailable: this host's KVM reset the vCPU on the shutdown (AMD SVM's does), \
             so the state that faulted is gone."
                .to_string()
        } else {
            self.describe_state()
        };
        let explanation = format!("vCPU {} {what}. {state}", self.vcpu.index);
        VmExit::Crash(CrashReport { kind, vcpu: self.vcpu.index, explanation })
    }

    /// Whether the vCPU holds the architectural reset state (real mode at F000:FFF0).
    fn was_reset(&self) -> bool {
        let (Ok(regs), Ok(sregs)) = (self.vcpu.fd.get_regs(), self.vcpu.fd.get_sregs()) else { return false };
        regs.rip == 0xfff0
            && sregs.cs.selector == 0xf000
            && sregs.cs.base == 0xffff_0000
            && sregs.cr0 & 1 == 0
    }

    /// Halted with interrupts disabled, or an AP never started: only another vCPU could wake it
    /// (with an IPI or a SIPI).
    fn is_stuck(&self) -> bool {
        match self.vcpu.fd.get_mp_state().map(|s| s.mp_state) {
            Ok(kvm_bindings::KVM_MP_STATE_HALTED) => {
                self.vcpu.fd.get_regs().is_ok_and(|regs| regs.rflags & crate::x86::RFLAGS_IF == 0)
            }
            Ok(kvm_bindings::KVM_MP_STATE_UNINITIALIZED | kvm_bindings::KVM_MP_STATE_INIT_RECEIVED) => true,
            _ => false,
        }
    }

    /// The registers and, when readable, the bytes at RIP.
    fn describe_state(&self) -> String {
        let (Ok(regs), Ok(sregs)) = (self.vcpu.fd.get_regs(), self.vcpu.fd.get_sregs()) else {
            return "Registers unavailable.".into();
        };
        let mut bytes = String::from("unavailable");
        if let Ok(t) = self.vcpu.fd.translate_gva(sregs.cs.base.wrapping_add(regs.rip)) {
            let mut code = [0u8; 15];
            if t.valid != 0
                && self.context.mem.read_slice(&mut code, GuestAddress(t.physical_address)).is_ok()
            {
                bytes = code.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
            }
        }
        let seg = |name: &str, s: &kvm_bindings::kvm_segment| {
            format!(
                "{name}={:#06x}(base {:#x} limit {:#x} type {} l {} db {})",
                s.selector, s.base, s.limit, s.type_, s.l, s.db
            )
        };
        format!(
            "Registers: RIP={:#018x} RSP={:#018x} RFLAGS={:#x} RAX={:#x} RBX={:#x} RCX={:#x} \
             RDX={:#x} RSI={:#x} RDI={:#x} CR0={:#x} CR2={:#x} CR3={:#x} CR4={:#x} EFER={:#x} {} {} \
             {} GDT={:#x}/{:#x} IDT={:#x}/{:#x}; code at RIP: {bytes}",
            regs.rip,
            regs.rsp,
            regs.rflags,
            regs.rax,
            regs.rbx,
            regs.rcx,
            regs.rdx,
            regs.rsi,
            regs.rdi,
            sregs.cr0,
            sregs.cr2,
            sregs.cr3,
            sregs.cr4,
            sregs.efer,
            seg("CS", &sregs.cs),
            seg("SS", &sregs.ss),
            seg("TR", &sregs.tr),
            sregs.gdt.base,
            sregs.gdt.limit,
            sregs.idt.base,
            sregs.idt.limit,
        )
    }
}

const WRMSR: [u8; 2] = [0x0f, 0x30];
const MSR_EFER: u64 = 0xc000_0080;
const EFER_SVME: u64 = 1 << 12;

fn sets_efer_svme(code: [u8; 2], rcx: u64, rax: u64) -> bool {
    code == WRMSR && rcx as u32 as u64 == MSR_EFER && rax & EFER_SVME != 0
}

/// What carve's guest-state checks say about a state KVM failed to enter.
fn broken_entry_rules(state: &GuestState, platform: &Platform) -> String {
    let violations = guest_state::check(state, platform);
    if violations.is_empty() {
        return "carve's guest-state checks find no broken rule (on Intel, load kvm_intel with \
                dump_invalid_vmcs=1 for the hardware's VMCS dump)"
            .into();
    }
    let rules: Vec<String> = violations.iter().map(ToString::to_string).collect();
    format!("carve's guest-state checks find: {}", rules.join("; "))
}

/// Decodes the VMX basic exit reason of a failed entry.
fn describe_entry_failure(reason: u64) -> &'static str {
    if reason == u64::MAX {
        return "VMRUN's consistency checks (AMD SVM) refused the guest state";
    }
    match reason & 0xffff {
        33 => {
            "the hardware found invalid guest state (segment registers, CR0/CR4/EFER, RFLAGS or \
               descriptor tables break the SDM's VM-entry checks)"
        }
        34 => "loading MSRs on VM entry failed",
        41 => "a machine-check event occurred during VM entry",
        _ => "the hardware refused to enter the guest with this state",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_sregs;

    #[test]
    fn a_wrmsr_setting_efer_svme_is_recognised() {
        assert!(sets_efer_svme(WRMSR, MSR_EFER, 0x1d01));
        assert!(sets_efer_svme(WRMSR, 0xffff_ffff_0000_0000 | MSR_EFER, EFER_SVME));
        assert!(!sets_efer_svme(WRMSR, MSR_EFER, 0x0d01), "SVME clear");
        assert!(!sets_efer_svme(WRMSR, 0x10, EFER_SVME), "another MSR");
        assert!(!sets_efer_svme([0x0f, 0x32], MSR_EFER, EFER_SVME), "RDMSR");
    }

    #[test]
    fn a_failed_entry_is_explained_by_the_rules_the_state_breaks() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let entry = crate::boot::cpu_state::EntryState::Long64 { rip: 0x100200, rsi: 0x7000 };
        let mut sregs = crate::boot::cpu_state::boot_sregs(&mem, entry, Default::default()).unwrap();
        let platform = Platform::intel(true);
        let rules = |sregs: &kvm_sregs, cet| {
            broken_entry_rules(&GuestState { cet, ..GuestState::from_kvm(sregs, 2, &platform) }, &platform)
        };
        assert!(rules(&sregs, None).contains("find no broken rule"));
        let shadow_stack = CetState { s_cet: 1, ssp: 0x7000, interrupt_ssp_table: 0 };
        assert!(rules(&sregs, Some(shadow_stack)).contains("find no broken rule"));
        let suppressed_and_tracked = CetState { s_cet: 3 << 10, ..shadow_stack };
        assert!(rules(&sregs, Some(suppressed_and_tracked)).contains("[C9"), "the CET state is checked");
        sregs.tr.selector |= 4;
        let text = format!("{}; {}", describe_entry_failure(0x8000_0021), rules(&sregs, None));
        assert!(text.starts_with("the hardware found invalid guest state"), "{text}");
        assert!(text.contains("tr.selector = 0x24: the TI flag (bit 2) must be 0 [S1"), "{text}");
        assert!(describe_entry_failure(u64::MAX).contains("AMD SVM"));
    }
}
