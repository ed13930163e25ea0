//! Snapshots of a paused VM, in a directory of two files:
//!
//! - `state`: carve's snapshot file (versioned, checksummed; `carve_snapshot::file`) holding the
//!   memory layout, KVM's state of the VM and its vCPUs, and every device's state;
//! - `memory`: guest RAM, region after region, with holes where a page is all zeros (a guest
//!   that touched little of its memory makes a small file).
//!
//! A restore maps `memory` copy-on-write: the file is never written, pages are read as the guest
//! touches them, and the restore costs the same whatever the guest's size. Everything read from
//! a snapshot is untrusted and checked before KVM or a device sees it.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use carve_nsm::pki::CertificateAuthority;
use carve_snapshot::Persist;
use carve_virtio::state::DeviceState;

use crate::device_manager::{DeviceManager, DeviceRestore, DevicesState};
use crate::exit::ExitSignal;
use crate::kvm_state::{self, HostCaps, KvmState, TimePolicy, VcpuState};
use crate::memory::{self, GuestRam, RamRange};
use crate::vcpu::{Vcpu, VcpuContext, VcpuRestore};
use crate::vm::{self, SerialSink, Vm, VmError, VsockConfig};

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

const PAGE: usize = memory::PAGE_SIZE as usize;

/// Everything a VM is apart from its memory's contents.
#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    pub memory: Vec<RamRange>,
    pub kvm: KvmState,
    pub devices: DevicesState,
}

impl VmSnapshot {
    /// Reads the state of the snapshot in `dir` (checked as a file; its contents are checked
    /// when restored).
    pub fn read(dir: &Path) -> Result<VmSnapshot, VmError> {
        Ok(carve_snapshot::file::read(&dir.join(STATE_FILE))?)
    }

    /// The checks that need no KVM: memory layout, vCPU count, KVM's structures. Devices check
    /// their own states as they are restored.
    pub fn validate(&self) -> Result<u64, VmError> {
        let total = check_layout(&self.memory).map_err(VmError::SnapshotState)?;
        let count = self.kvm.vcpus.len();
        if count == 0 || count > crate::mptable::MAX_CPUS.into() {
            return Err(VmError::SnapshotState(format!(
                "{count} vCPUs are not 1 to {}",
                crate::mptable::MAX_CPUS
            )));
        }
        kvm_state::validate_vm(&self.kvm.vm).map_err(VmError::KvmState)?;
        for (index, vcpu) in self.kvm.vcpus.iter().enumerate() {
            kvm_state::validate_vcpu(index, vcpu).map_err(VmError::KvmState)?;
        }
        Ok(total)
    }

    /// Whether restoring needs a CA for an NSM.
    pub fn has_nsm(&self) -> bool {
        self.devices.virtio.iter().any(|d| matches!(d.device, DeviceState::Nsm(_)))
    }

    /// The one place a snapshot is put together, from the vCPUs' states (each saved where its
    /// vCPU is: in place before the VM runs, on its thread while it does), then KVM's VM-wide
    /// state and every device. The VM is paused.
    pub(crate) fn compose(
        vcpus: Vec<VcpuState>,
        vm_fd: &VmFd,
        mem: &GuestRam,
        devices: &DeviceManager,
    ) -> Result<VmSnapshot, VmError> {
        let vm = kvm_state::save_vm(vm_fd).map_err(SaveError::Kvm)?;
        Ok(VmSnapshot { memory: memory::layout(mem), kvm: KvmState { vm, vcpus }, devices: devices.save()? })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("cannot create the snapshot directory {path}: {source}")]
    Directory { path: PathBuf, source: std::io::Error },
    #[error("the snapshot directory {0} is not empty; carve does not overwrite snapshots")]
    NotEmpty(PathBuf),
    #[error("cannot write guest memory to {path}: {source}")]
    Memory { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    State(#[from] carve_snapshot::file::SnapshotError),
    #[error("cannot save KVM's state: {0}")]
    Kvm(#[from] kvm_state::StateError),
    #[error("the {device}: {message}")]
    Device { device: &'static str, message: String },
    #[error(
        "a VM with SGX EPC sections cannot be snapshotted: EPC contents cannot be read out of the \
         enclave page cache"
    )]
    Epc,
}

/// Writes `snapshot` and the contents of `mem` to `dir` (new, or empty). The VM is paused.
pub fn save(dir: &Path, snapshot: &VmSnapshot, mem: &GuestRam) -> Result<(), SaveError> {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            let empty = std::fs::read_dir(dir)
                .map_err(|source| SaveError::Directory { path: dir.into(), source })?
                .next()
                .is_none();
            if !empty {
                return Err(SaveError::NotEmpty(dir.into()));
            }
        }
        Err(source) => return Err(SaveError::Directory { path: dir.into(), source }),
    }
    let path = dir.join(MEMORY_FILE);
    write_memory(&path, mem).map_err(|source| SaveError::Memory { path, source })?;
    // The state last: a directory with a state file holds a whole snapshot.
    carve_snapshot::file::write(&dir.join(STATE_FILE), snapshot)?;
    Ok(())
}

/// Guest RAM into a sparse file: pages of zeros stay holes.
fn write_memory(path: &Path, mem: &GuestRam) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.set_len(memory::total_size(mem))?;
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let slice = region.get_slice(MemoryRegionAddress(0), len).map_err(std::io::Error::other)?;
        let guard = slice.ptr_guard();
        // SAFETY: the slice covers the whole mapped region, which `mem` keeps mapped for the
        // call; the VM is paused and its device backends are off the event loop, so nothing
        // writes guest memory while it is read here.
        let bytes = unsafe { std::slice::from_raw_parts(guard.as_ptr(), len) };
        write_nonzero_pages(&file, bytes, offset, memory::touched_pages(region).as_deref())?;
        offset += len as u64;
    }
    file.sync_all()
}

/// Writes the runs of pages of `memory` that hold anything but zeros, at `at` in the file.
/// Pages `touched` says were never touched are zeros without being read.
fn write_nonzero_pages(file: &File, memory: &[u8], at: u64, touched: Option<&[bool]>) -> std::io::Result<()> {
    let mut run: Option<usize> = None;
    for (index, page) in memory.chunks(PAGE).enumerate() {
        let zero = touched.is_some_and(|touched| !touched[index]) || memory::is_zero_page(page);
        match (run, zero) {
            (None, false) => run = Some(index * PAGE),
            (Some(start), true) => {
                file.write_all_at(&memory[start..index * PAGE], at + start as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        file.write_all_at(&memory[start..], at + start as u64)?;
    }
    Ok(())
}

/// How to bring a snapshot back.
pub struct RestoreConfig {
    pub serial: SerialSink,
    pub serial_input: bool,
    /// The vsock device's host side (its sockets); the saved one when `None`. The guest CID
    /// must be the saved one.
    pub vsock: Option<VsockConfig>,
    /// Issues the restored NSM's signing leaf (needed when [`VmSnapshot::has_nsm`]).
    pub nsm_ca: Option<CertificateAuthority>,
    pub time: TimePolicy,
}

impl Vm {
    /// Rebuilds the VM saved in `dir` (whose state was read into `snapshot`): its
    /// [`Persist::restore`].
    pub fn restore(dir: &Path, snapshot: &VmSnapshot, config: RestoreConfig) -> Result<Vm, VmError> {
        <Vm as Persist>::restore(
            VmRestore { memory: RestoreMemory::Dir(dir.to_path_buf()), config },
            snapshot,
        )
    }

    /// Saves the VM, built and not yet run, to the snapshot directory `dir` (new, or empty), as
    /// a running VM's `snapshot` control request does.
    pub fn save_to(&self, dir: &Path) -> Result<(), VmError> {
        let snapshot = Persist::save(self)?;
        save(dir, &snapshot, &self.parts().context.mem)?;
        Ok(())
    }
}

/// What restoring a VM takes besides its state: its memory and how to bring it back.
pub struct VmRestore {
    pub memory: RestoreMemory,
    pub config: RestoreConfig,
}

/// Where a restored VM's memory comes from.
pub enum RestoreMemory {
    /// The snapshot directory: its memory file, mapped copy-on-write.
    Dir(PathBuf),
    /// Memory already filled, laid out as the state says (a migration's destination).
    Ram(GuestRam),
}

/// Everything a VM is apart from its memory's contents, which stay in their own file
/// ([`save`] writes both).
impl Persist for Vm {
    type State = VmSnapshot;
    type ConstructorArgs = VmRestore;
    type Error = VmError;

    /// A built VM that does not run (its vCPUs are here, not on threads); a running VM is saved
    /// by its event loop, through the same [`VmSnapshot::compose`].
    fn save(&self) -> Result<VmSnapshot, VmError> {
        let parts = self.parts();
        if parts.epc.is_some() {
            return Err(SaveError::Epc.into());
        }
        let vcpus =
            parts.vcpus.iter().map(Persist::save).collect::<Result<_, _>>().map_err(SaveError::Kvm)?;
        VmSnapshot::compose(vcpus, &parts.vm_fd, &parts.context.mem, &parts.devices)
    }

    /// Ready to run from exactly where it was saved.
    fn restore(args: VmRestore, snapshot: &VmSnapshot) -> Result<Vm, VmError> {
        let config = args.config;
        let invalid = |what: String| VmError::SnapshotState(what);
        let total = snapshot.validate()?;
        let mem = match args.memory {
            RestoreMemory::Dir(dir) => {
                let memory_path = dir.join(MEMORY_FILE);
                let memory_file = File::open(&memory_path)
                    .map_err(|e| invalid(format!("memory file {}: {e}", memory_path.display())))?;
                let file_len = memory_file.metadata().map(|m| m.len()).unwrap_or(0);
                if file_len != total {
                    return Err(invalid(format!(
                        "memory file {} holds {file_len} bytes; its state describes {total}",
                        memory_path.display()
                    )));
                }
                memory::map_file(&memory_file, &snapshot.memory)?
            }
            RestoreMemory::Ram(mem) if memory::layout(&mem) == snapshot.memory => mem,
            RestoreMemory::Ram(mem) => {
                return Err(invalid(format!(
                    "its memory layout {:?} is not that of the memory given, {:?}",
                    snapshot.memory,
                    memory::layout(&mem)
                )))
            }
        };
        let kvm = Kvm::new().map_err(|source| VmError::KvmUnavailable { source })?;
        let max_vcpus = kvm.get_max_vcpus().min(crate::mptable::MAX_CPUS.into());
        let count = snapshot.kvm.vcpus.len();
        if count > max_vcpus {
            return Err(invalid(format!("{count} vCPUs are more than this host's KVM allows ({max_vcpus})")));
        }
        let vm_fd = Arc::new(kvm.create_vm().map_err(vm::kvm_error("create a VM"))?);
        memory::register(&vm_fd, &mem)?;
        vm::create_irqchip(&vm_fd)?;
        let caps = Arc::new(HostCaps::read(&kvm, &vm_fd).map_err(|e| VmError::Host(e.to_string()))?);

        // KVM's state in kvm_state's documented order, each vCPU restored as a Vcpu in between.
        let mut fds = Vec::with_capacity(count);
        for index in 0..count {
            fds.push(vm_fd.create_vcpu(index as u64).map_err(vm::kvm_error("create a vCPU"))?);
        }
        let refs: Vec<_> = fds.iter().collect();
        let clock = kvm_state::begin_restore(&vm_fd, &refs, &snapshot.kvm, config.time, &caps)
            .map_err(VmError::KvmState)?;
        let mut vcpus = Vec::with_capacity(count);
        for ((index, fd), state) in fds.into_iter().enumerate().zip(&snapshot.kvm.vcpus) {
            let args = VcpuRestore { fd, index, caps: caps.clone(), tsc_advance_ns: clock.advanced_ns };
            vcpus.push(Vcpu::restore(args, state).map_err(VmError::KvmState)?);
        }
        let refs: Vec<_> = vcpus.iter().map(|v: &Vcpu| &v.fd).collect();
        kvm_state::finish_restore(&vm_fd, &refs, &snapshot.kvm).map_err(VmError::KvmState)?;

        let exit = Arc::new(ExitSignal::new().map_err(|e| VmError::Host(e.to_string()))?);
        let devices = DeviceManager::restore(
            DeviceRestore {
                vm: vm_fd.clone(),
                mem: mem.clone(),
                exit: exit.clone(),
                serial_output: vm::open_serial(config.serial)?,
                vsock: config.vsock,
                nsm_ca: config.nsm_ca,
            },
            &snapshot.devices,
        )?;
        // MSIs the guest had pending reach LAPICs that now hold their saved state.
        devices.interrupts.deliver_pending()?;

        let mut supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(vm::kvm_error("report supported CPUID"))?;
        crate::cpuid::announce_emulated(
            &mut supported,
            kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
        );
        let (pio, mmio) = devices.buses();
        let context = Arc::new(VcpuContext {
            pio,
            mmio,
            exit,
            stats: Default::default(),
            mem,
            platform: crate::guest_state::Platform::host(&supported),
        });
        Ok(Vm::from_parts(vm::Parts {
            vcpus,
            context,
            devices,
            serial_input: config.serial_input,
            vcpu_affinity: Vec::new(),
            vm_fd,
            // A VM with an EPC is never saved (runner.rs refuses), so none is restored.
            epc: None,
        }))
    }
}

/// The layout must be the one carve builds for its total (so the guest's e820 map, ACPI and
/// fw_cfg, all in the saved memory, still describe it); returns the total.
pub(crate) fn check_layout(layout: &[RamRange]) -> Result<u64, String> {
    let total =
        layout.iter().try_fold(0u64, |sum, r| sum.checked_add(r.size)).ok_or("memory layout overflows")?;
    if total % PAGE as u64 != 0
        || total < memory::MIN_MEMORY_MIB << 20
        || memory::ram_regions(total) != layout
    {
        return Err(format!("memory layout {layout:?} is not one carve builds"));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_layouts_carve_builds_are_restored() {
        assert_eq!(check_layout(&memory::ram_regions(128 << 20)), Ok(128 << 20));
        assert_eq!(check_layout(&memory::ram_regions(5 << 30)), Ok(5 << 30));
        let odd = [RamRange { base: 0x1000, size: 128 << 20 }];
        assert!(check_layout(&odd).unwrap_err().contains("not one carve builds"));
        assert!(check_layout(&[]).is_err());
        let huge = [RamRange { base: 0, size: u64::MAX }, RamRange { base: 0, size: 2 }];
        assert!(check_layout(&huge).is_err());
    }

    #[test]
    fn zero_pages_stay_holes() {
        let path = std::env::temp_dir().join(format!("carve-sparse-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut chunk = vec![0u8; 4 * PAGE];
        chunk[PAGE + 7] = 1;
        chunk[3 * PAGE] = 2;
        file.set_len(chunk.len() as u64).unwrap();
        write_nonzero_pages(&file, &chunk, 0, None).unwrap();
        let mut back = vec![0u8; chunk.len()];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, chunk);
        // Pages said never touched are holes even if the slice shows data there.
        file.set_len(0).unwrap();
        file.set_len(chunk.len() as u64).unwrap();
        write_nonzero_pages(&file, &chunk, 0, Some(&[true, false, true, true])).unwrap();
        chunk[PAGE + 7] = 0;
        let mut back = vec![0u8; chunk.len()];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, chunk);
        std::fs::remove_file(&path).unwrap();
    }
}
