//! The receiving side (`carve vm run --incoming ADDR:PORT`): one connection, one VM. The offer
//! is checked before any memory moves; every page is checked against the layout before it is
//! written; the state is validated as a snapshot's is. Whatever fails is sent back to the source
//! (a refusal, or an abort once memory moves), so it runs on, and returned here.

use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};

use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};

use super::protocol::{self, Kind, Offer, ProtocolError};
use super::{MigrationError, IO_TIMEOUT};
use crate::cpuid::CpuTemplate;
use crate::kvm_state::{self, HostCaps, TimePolicy};
use crate::memory::{self, GuestRam, MemorySpec, RamRange};
use crate::snapshot::{RestoreConfig, RestoreMemory, VmRestore, VmSnapshot};
use crate::vm::Vm;

/// How the destination takes a VM in.
pub struct IncomingConfig {
    /// The memory it gives the VM: its size must be the VM's; `None` takes the VM's size with
    /// anonymous memory.
    pub memory: Option<MemorySpec>,
    /// Narrows what this destination offers (the guest must use none of what it removes).
    pub cpu_template: Option<CpuTemplate>,
    /// Serial, vsock and time as for a restore (time is [`TimePolicy::HostElapsed`]: the guest's
    /// clocks run on through the migration). `nsm_ca` is asked for only if the VM has an NSM.
    pub restore: RestoreConfig,
    pub nsm_ca: Option<Box<dyn FnOnce() -> Result<carve_nsm::pki::CertificateAuthority, String>>>,
}

/// A destination waiting for its VM.
pub struct Incoming {
    listener: TcpListener,
}

/// Why a connection did not give us a VM: `refused` before memory moved (the source is told
/// why in a `Refuse`), else the stream failed or the VM could not start (an `Abort` or a
/// `Refuse` after the state).
enum Failed {
    Refused(String),
    Stream(String),
}

impl Incoming {
    pub fn listen(address: &str) -> Result<Incoming, MigrationError> {
        let addr = super::source::resolve(address).map_err(|e| {
            MigrationError::Setup(format!("cannot listen for an incoming VM on {address}: {e}"))
        })?;
        let listener = TcpListener::bind(addr).map_err(|e| {
            MigrationError::Setup(format!("cannot listen for an incoming VM on {address}: {e}"))
        })?;
        Ok(Incoming { listener })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Takes the first connection's VM: a VM ready to run, or why not (the source was told).
    pub fn receive(self, config: IncomingConfig) -> Result<Vm, MigrationError> {
        let (stream, peer) = self.listener.accept().map_err(|e| MigrationError::Setup(e.to_string()))?;
        drop(self.listener);
        let from = peer.to_string();
        let mut writer = stream
            .try_clone()
            .map_err(|e| MigrationError::Failed { from: from.clone(), detail: e.to_string() })?;
        let answer = |writer: &mut TcpStream, kind, reason: &str| {
            let _ = protocol::write_frame(writer, kind, reason.as_bytes()).and_then(|()| writer.flush());
        };
        match take_vm(stream, &mut writer, config) {
            Ok(vm) => Ok(vm),
            Err(Failed::Refused(reason)) => {
                answer(&mut writer, Kind::Refuse, &reason);
                Err(MigrationError::Refused { from, reason })
            }
            Err(Failed::Stream(detail)) => {
                answer(&mut writer, Kind::Abort, &detail);
                Err(MigrationError::Failed { from, detail })
            }
        }
    }
}

fn take_vm(stream: TcpStream, writer: &mut TcpStream, config: IncomingConfig) -> Result<Vm, Failed> {
    let stream_failed = |e: ProtocolError| Failed::Stream(e.to_string());
    let io_failed = |e: std::io::Error| Failed::Stream(format!("the connection failed: {e}"));
    stream.set_nodelay(true).map_err(io_failed)?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_failed)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io_failed)?;
    let mut reader = BufReader::with_capacity(1 << 20, stream);

    protocol::read_preamble(&mut reader).map_err(|e| match e {
        ProtocolError::Version { .. } => Failed::Refused(e.to_string()),
        e => stream_failed(e),
    })?;
    let offer: Offer = match protocol::read_frame(&mut reader).map_err(stream_failed)? {
        (Kind::Offer, payload) => {
            carve_snapshot::file::decode(&payload).map_err(|e| Failed::Stream(format!("its offer: {e}")))?
        }
        (kind, _) => return Err(stream_failed(ProtocolError::Unexpected { expected: "Offer", got: kind })),
    };
    let spec = check_offer(&offer, &config).map_err(Failed::Refused)?;
    let mem = memory::create_with(spec).map_err(|e| Failed::Refused(e.to_string()))?;
    if memory::layout(&mem) != offer.memory {
        return Err(Failed::Refused(format!(
            "the VM's memory layout {:?} is not this destination's {:?}",
            offer.memory,
            memory::layout(&mem)
        )));
    }
    protocol::write_frame(writer, Kind::Accept, b"").map_err(io_failed)?;

    let state = receive_memory(&mut reader, &mem, &offer.memory).map_err(stream_failed)?;
    let vm = start(state, mem, &offer, config).map_err(Failed::Refused)?;
    protocol::write_frame(writer, Kind::Started, b"").map_err(io_failed)?;
    Ok(vm)
}

/// Whether this destination can take the VM offered; the memory to give it.
fn check_offer(offer: &Offer, config: &IncomingConfig) -> Result<MemorySpec, String> {
    let total = offer.check()?;
    let spec = match config.memory {
        Some(spec) if spec.mib << 20 != total => {
            return Err(format!(
                "the VM has {} MiB of memory; this destination was started with --memory {}",
                total >> 20,
                spec.mib
            ))
        }
        Some(spec) => spec,
        None => MemorySpec { mib: total >> 20, backing: memory::MemoryBacking::Anonymous, mergeable: false },
    };
    let kvm = Kvm::new().map_err(|e| format!("this destination has no usable KVM: {e}"))?;
    let max = kvm.get_max_vcpus().min(crate::mptable::MAX_CPUS.into());
    if offer.vcpus as usize > max {
        return Err(format!("the VM has {} vCPUs; this destination's KVM runs at most {max}", offer.vcpus));
    }
    // What a restore checks of the whole state, checked of the guest's CPUID now, before any
    // memory moves, against this KVM narrowed by the destination's template.
    let vm = kvm.create_vm().map_err(|e| format!("this destination cannot create a VM: {e}"))?;
    let caps = HostCaps::read(&kvm, &vm).map_err(|e| e.to_string())?;
    kvm_state::check_cpuid(&caps, config.cpu_template.as_ref(), &offer.cpuid).map_err(|e| {
        let template = config.cpu_template.as_ref().map(|t| format!(" with CPU template {}", t.name));
        let missing: Vec<String> = e.missing.iter().map(ToString::to_string).collect();
        format!(
            "the guest uses what this destination{} does not offer: {}",
            template.unwrap_or_default(),
            missing.join(", ")
        )
    })?;
    Ok(spec)
}

/// Writes `Pages` frames into `mem` (laid out as `layout`, which carve built) until the `State`
/// frame, which it returns decoded. Public for the fuzz target that feeds it any bytes.
pub fn receive_memory(
    reader: &mut impl std::io::Read,
    mem: &GuestRam,
    layout: &[RamRange],
) -> Result<VmSnapshot, ProtocolError> {
    loop {
        match protocol::read_frame(reader)? {
            (Kind::Pages, payload) => {
                let mut unwritten = None;
                protocol::parse_pages(&payload, layout, |gpa, data| {
                    if mem.write_slice(data.unwrap_or(memory::zero_page()), GuestAddress(gpa)).is_err() {
                        unwritten.get_or_insert(gpa);
                    }
                })?;
                if let Some(gpa) = unwritten {
                    return Err(ProtocolError::Corrupted(format!(
                        "page {gpa:#x} is outside this guest's memory"
                    )));
                }
            }
            (Kind::State, payload) => {
                return carve_snapshot::file::decode(&payload)
                    .map_err(|e| ProtocolError::Corrupted(format!("the VM's state: {e}")))
            }
            (kind, _) => return Err(ProtocolError::Unexpected { expected: "Pages or State", got: kind }),
        }
    }
}

/// The VM rebuilt from its state in the memory received, ready to run.
fn start(state: VmSnapshot, mem: GuestRam, offer: &Offer, config: IncomingConfig) -> Result<Vm, String> {
    if state.memory != offer.memory || state.kvm.vcpus.len() != offer.vcpus as usize {
        return Err("the VM's state does not match its offer (memory layout or vCPU count)".into());
    }
    let mut restore = config.restore;
    restore.time = TimePolicy::HostElapsed;
    if state.has_nsm() && restore.nsm_ca.is_none() {
        let open = config.nsm_ca.ok_or("the VM has an NSM and this destination has no CA for it")?;
        restore.nsm_ca = Some(open()?);
    }
    <Vm as carve_snapshot::Persist>::restore(
        VmRestore { memory: RestoreMemory::Ram(mem), config: restore },
        &state,
    )
    .map_err(|e| e.to_string())
}
