//! KVM's own state of a VM and its vCPUs, saved and restored: what a snapshot or a migration
//! carries besides guest memory and carve's device models, as plain serde data.
//!
//! A state file is untrusted input: everything is validated before the first ioctl (sizes,
//! counts, headers), [`check_host`] names everything the snapshot needs that this host's KVM
//! lacks, and every ioctl error names the ioctl and the vCPU.
//!
//! Restore order, and why. [`restore`] takes these steps on raw vCPU fds; a carve VM's restore
//! (`Persist for Vm`) takes the same: [`begin_restore`] (1, 2), `Persist::restore` of each
//! `Vcpu` (3), [`finish_restore`] (4, 5).
//! 1. Validate everything, check the host, check TSC frequencies: refuse before writing anything.
//! 2. KVM_SET_CLOCK (`TimePolicy`): first, so the vCPUs' TSCs can advance by what the clock did.
//! 3. Each vCPU ([`restore_vcpu`]): TSC frequency, CPUID, MP state, regs, sregs, XSAVE, XCRs,
//!    debug registers, LAPIC, MSRs (IA32_TSC first, then IA32_XSS, IA32_TSC_DEADLINE last), the
//!    shadow-stack pointer (KVM_SET_ONE_REG, CET guests), nested state, vCPU events (reasons at
//!    each step there). CET needs this order: CPUID before all (KVM checks the CET MSRs and the
//!    SSP against the guest's SHSTK/IBT), SREGS before the MSRs (CR4.CET with CR0.WP), XCRs and
//!    IA32_XSS before the CET MSRs (supervisor XSAVE state), the SSP after them.
//! 4. TSC offsets made identical across vCPUs ([`sync_tsc_offsets`]), so KVM's master clock can
//!    engage.
//! 5. PIC master, PIC slave, IOAPIC, then the PIT: after the LAPICs, because restoring the IOAPIC
//!    re-delivers its pending lines and the PIT starts its timer at once; an interrupt delivered
//!    into a LAPIC that KVM_SET_LAPIC then overwrites is lost, and in the PIT's reinject mode a
//!    tick that is never acknowledged stops the PIT for good.
//!
//! vCPUs must not be running (paused, outside KVM_RUN) while saved; restore into fresh vCPUs that
//! have not run (KVM refuses a different CPUID after the first KVM_RUN), of a VM with the same
//! in-kernel irqchip, PIT and enabled capabilities as the one saved.

mod compat;
mod error;
mod exact;
mod msrs;
#[cfg(test)]
mod tests;
mod time;

use std::collections::BTreeSet;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_nested_state, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, kvm_xsave2,
    CpuId, Xsave, KVM_CAP_VCPU_ATTRIBUTES, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_XCRS, KVM_STATE_NESTED_FORMAT_SVM, KVM_STATE_NESTED_FORMAT_VMX,
    KVM_STATE_NESTED_GIF_SET,
};
use kvm_ioctls::{Cap, Kvm, KvmNestedStateBuffer, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::cpu_features::{cet, Leaves, Reg};

pub use compat::{check_cpuid, check_host, Register};
pub use error::{Incompatible, Missing, StateError};
pub use time::{guest_tsc, rewind_tsc, sync_tsc_offsets, ClockApplied, ClockRestored, TimePolicy, TscSync};

/// The most MSRs a saved vCPU may hold (KVM lists some 40 to 300).
pub const MAX_MSRS: usize = 1024;
/// The largest XSAVE area taken from a state file (AMX makes today's largest about 11 KiB).
pub const MAX_XSAVE_BYTES: usize = 64 * 1024;
/// `kvm_xsave`'s fixed region: what KVM_GET_XSAVE moves, and the start of every XSAVE area.
const XSAVE_REGION_WORDS: usize = std::mem::size_of::<kvm_xsave>() / 4;
/// `struct kvm_nested_state` without data: flags, format, size and the 120-byte header union.
const NESTED_HEADER: usize = std::mem::size_of::<kvm_nested_state>();
const EFER_SVME: u64 = 1 << 12;
const CR4_VMXE: u64 = 1 << 13;
const APIC_ISR: usize = 0x100;
const APIC_IRR: usize = 0x200;
const APIC_LVTT: usize = 0x320;
/// CPUID.(7,0):ECX bit 16: 57-bit linear addresses.
const CPUID_7_ECX_LA57: u32 = 16;

/// One CPUID entry as KVM_SET_CPUID2 takes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: &CpuidEntry) -> Self {
        kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    pub index: u32,
    pub data: u64,
}

/// Everything KVM holds for one vCPU. The kvm-bindings structs are stored as their exact bytes
/// (input of another size is refused); the rest as readable fields.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the VMM set (KVM_SET_CPUID2's input), not KVM_GET_CPUID2's read-back.
    pub cpuid: Vec<CpuidEntry>,
    #[serde(with = "exact")]
    pub regs: kvm_regs,
    #[serde(with = "exact")]
    pub sregs: kvm_sregs,
    /// The XSAVE area as 32-bit words: KVM_GET_XSAVE2's (KVM_CAP_XSAVE2 bytes), else
    /// KVM_GET_XSAVE's 4096 bytes. Holds the FPU/SSE/AVX state (there is no separate FPU state).
    pub xsave: Vec<u32>,
    #[serde(with = "exact")]
    pub xcrs: kvm_xcrs,
    #[serde(with = "exact")]
    pub debug_regs: kvm_debugregs,
    #[serde(with = "exact")]
    pub lapic: kvm_lapic_state,
    #[serde(with = "exact")]
    pub mp_state: kvm_mp_state,
    #[serde(with = "exact")]
    pub events: kvm_vcpu_events,
    /// Every MSR of KVM_GET_MSR_INDEX_LIST that KVM would read, IA32_TSC among them.
    ///
    /// IA32_TSC is L1's TSC even when the vCPU was saved inside a nested guest (L2): since
    /// Linux 5.10 ("KVM: correctly restore the TSC value on nested migration") host-initiated
    /// reads and writes of IA32_TSC use L1's offset and scaling, as host writes always did, so
    /// the value saved here is the one restore must write. Older kernels returned L2's TSC,
    /// which moved L1's TSC backwards after a restore and stalled its TSC-deadline timer.
    pub msrs: Vec<Msr>,
    /// KVM_GET_NESTED_STATE's bytes (header and VMCS12/VMCB12 data, as long as the header's
    /// `size` says), or `None` when the guest uses no nested virtualisation.
    pub nested: Option<Vec<u8>>,
    /// The guest TSC's frequency (KVM_GET_TSC_KHZ), when the host knows it.
    pub tsc_khz: Option<u32>,
    /// L1's TSC offset (KVM_VCPU_TSC_OFFSET), where the vCPU has that attribute: on restore the
    /// vCPUs keep the differences they had (none, normally).
    pub tsc_offset: Option<u64>,
    /// The current shadow-stack pointer (KVM_GET_ONE_REG's KVM_REG_GUEST_SSP), saved when the
    /// vCPU's CPUID has SHSTK; the CET MSRs travel in `msrs`. Absent from files of older carves.
    #[serde(default)]
    pub ssp: Option<u64>,
}

/// KVM's VM-wide state: the in-kernel PIC pair, IOAPIC and PIT, and kvmclock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    #[serde(with = "exact")]
    pub pic_master: kvm_irqchip,
    #[serde(with = "exact")]
    pub pic_slave: kvm_irqchip,
    #[serde(with = "exact")]
    pub ioapic: kvm_irqchip,
    #[serde(with = "exact")]
    pub pit: kvm_pit_state2,
    /// KVM_GET_CLOCK as returned: clock, flags, and realtime/host_tsc where the flags say so.
    #[serde(with = "exact")]
    pub clock: kvm_clock_data,
    /// CLOCK_REALTIME (ns since the epoch) read by carve right after KVM_GET_CLOCK: what
    /// [`TimePolicy::HostElapsed`] measures elapsed time by when KVM gave no realtime of its own.
    #[serde(default)]
    pub saved_at_realtime_ns: Option<u64>,
}

/// A whole VM's KVM state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KvmState {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
}

/// What this host's KVM offers that saving and restoring depend on, read once per process
/// ([`HostCaps::read`]) from `/dev/kvm` and any of its VMs.
#[derive(Clone, Debug)]
pub struct HostCaps {
    /// Bytes KVM_GET_XSAVE2 writes (KVM_CAP_XSAVE2), or 4096 where only KVM_GET_XSAVE exists.
    /// Private: saving trusts it to size the buffer KVM writes into.
    xsave_size: usize,
    xsave2: bool,
    nested_state_size: usize,
    tsc_control: bool,
    vcpu_attributes: bool,
    clock_flags: u32,
    tsc_deadline_timer: bool,
    /// KVM_GET_SUPPORTED_CPUID with KVM_GET_EMULATED_CPUID's bits added.
    offered_cpuid: Vec<CpuidEntry>,
    msr_index_list: Vec<u32>,
}

impl HostCaps {
    /// Reads the capabilities. The XSAVE size is the VM's (it depends on the XSTATE components
    /// the process may use): read it after any `arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)`, which
    /// carve never calls.
    pub fn read(kvm: &Kvm, vm: &VmFd) -> Result<HostCaps, StateError> {
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| StateError::SystemIoctl { ioctl: "KVM_GET_SUPPORTED_CPUID", source })?;
        HostCaps::with_supported(kvm, vm, supported.as_slice())
    }

    /// [`HostCaps::read`] with KVM_GET_SUPPORTED_CPUID's answer (as KVM gave it) that the caller
    /// already has: the ioctl costs some 300 µs on nested hosts, and a VM's build asks once.
    pub fn with_supported(
        kvm: &Kvm,
        vm: &VmFd,
        supported: &[kvm_cpuid_entry2],
    ) -> Result<HostCaps, StateError> {
        let system = |ioctl| move |source| StateError::SystemIoctl { ioctl, source };
        let xsave2 = vm.check_extension_int(Cap::Xsave2);
        let mut offered: Vec<CpuidEntry> = supported.iter().map(CpuidEntry::from).collect();
        // Emulated features (MOVBE, RDPID) work, if slowly; older kernels have no such list.
        if let Ok(emulated) = kvm.get_emulated_cpuid(KVM_MAX_CPUID_ENTRIES) {
            for e in emulated.as_slice() {
                match offered.iter_mut().find(|o| o.function == e.function && o.index == e.index) {
                    Some(o) => {
                        o.eax |= e.eax;
                        o.ebx |= e.ebx;
                        o.ecx |= e.ecx;
                        o.edx |= e.edx;
                    }
                    None => offered.push(CpuidEntry::from(e)),
                }
            }
        }
        let msr_index_list =
            kvm.get_msr_index_list().map_err(system("KVM_GET_MSR_INDEX_LIST"))?.as_slice().to_vec();
        Ok(HostCaps {
            xsave_size: if xsave2 > 0 {
                (xsave2 as usize).max(XSAVE_REGION_WORDS * 4)
            } else {
                XSAVE_REGION_WORDS * 4
            },
            xsave2: xsave2 > 0,
            nested_state_size: vm.check_extension_int(Cap::NestedState).max(0) as usize,
            tsc_control: vm.check_extension(Cap::TscControl),
            vcpu_attributes: vm.check_extension_raw(KVM_CAP_VCPU_ATTRIBUTES.into()) > 0,
            clock_flags: vm.check_extension_int(Cap::AdjustClock).max(0) as u32,
            tsc_deadline_timer: vm.check_extension(Cap::TscDeadlineTimer),
            offered_cpuid: offered,
            msr_index_list,
        })
    }

    /// Bytes of XSAVE state KVM moves (KVM_CAP_XSAVE2, else 4096).
    pub fn xsave_size(&self) -> usize {
        self.xsave_size
    }

    /// The largest nested state KVM holds (KVM_CAP_NESTED_STATE); 0 without nested state support.
    pub fn nested_state_size(&self) -> usize {
        self.nested_state_size
    }

    /// Whether KVM can scale a vCPU's TSC to another frequency (KVM_CAP_TSC_CONTROL).
    pub fn tsc_control(&self) -> bool {
        self.tsc_control
    }

    /// Whether KVM has vCPU device attributes (KVM_CAP_VCPU_ATTRIBUTES); each vCPU is still
    /// asked for KVM_VCPU_TSC_OFFSET itself.
    pub fn vcpu_attributes(&self) -> bool {
        self.vcpu_attributes
    }

    /// The kvm_clock_data flags KVM supports (KVM_CAP_ADJUST_CLOCK).
    pub fn clock_flags(&self) -> u32 {
        self.clock_flags
    }

    /// The MSRs saved for each vCPU (KVM_GET_MSR_INDEX_LIST).
    pub fn msr_index_list(&self) -> &[u32] {
        &self.msr_index_list
    }
}

fn vcpu_ioctl(vcpu: usize, ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::VcpuIoctl { vcpu, ioctl, source }
}

fn vm_ioctl(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::VmIoctl { ioctl, source }
}

/// Saves vCPU `vcpu` (its index, for errors), which must not be running. `cpuid` is the CPUID
/// the VMM gave it with KVM_SET_CPUID2: KVM_GET_CPUID2 reads back runtime bits KVM folds in
/// (OSXSAVE, XSAVE sizes) and, on some nested hosts (carve's CI machines), the host's own
/// feature leaves, which [`check_host`] would then demand of the destination.
pub fn save_vcpu(
    fd: &VcpuFd,
    vcpu: usize,
    cpuid: &[kvm_cpuid_entry2],
    caps: &HostCaps,
) -> Result<VcpuState, StateError> {
    // KVM_GET_MP_STATE first: it runs kvm_apic_accept_events(), which may act on a pending INIT
    // or SIPI and change registers and LAPIC; everything after sees the result (Firecracker).
    let mp_state = fd.get_mp_state().map_err(vcpu_ioctl(vcpu, "KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(vcpu_ioctl(vcpu, "KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(vcpu_ioctl(vcpu, "KVM_GET_SREGS"))?;
    let xsave = get_xsave(fd, vcpu, caps)?;
    let xcrs = fd.get_xcrs().map_err(vcpu_ioctl(vcpu, "KVM_GET_XCRS"))?;
    let debug_regs = fd.get_debug_regs().map_err(vcpu_ioctl(vcpu, "KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(vcpu_ioctl(vcpu, "KVM_GET_LAPIC"))?;
    let mut msrs = msrs::read(fd, vcpu, &caps.msr_index_list)?;
    fix_zero_tsc_deadline(&mut msrs, &lapic);
    // KVM has an SSP only for a guest with SHSTK (EINVAL otherwise).
    let ssp = match has_shstk(cpuid) {
        true => Some(get_ssp(fd, vcpu)?),
        false => None,
    };
    let tsc_offset = match time::has_tsc_offset(fd) {
        true => Some(
            time::get_tsc_offset(fd).map_err(vcpu_ioctl(vcpu, "KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)"))?,
        ),
        false => None,
    };
    let nested = get_nested(fd, vcpu, caps, &sregs)?;
    // Events last: the reads above may still move pending events (Firecracker's order).
    let events = fd.get_vcpu_events().map_err(vcpu_ioctl(vcpu, "KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid: cpuid.iter().map(CpuidEntry::from).collect(),
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        mp_state,
        events,
        msrs,
        nested,
        tsc_khz: time::host_tsc_khz(fd),
        tsc_offset,
        ssp,
    })
}

/// Saves the VM-wide state: PIC master and slave, IOAPIC, PIT, kvmclock.
pub fn save_vm(vm: &VmFd) -> Result<VmState, StateError> {
    let chip = |chip_id| {
        let mut chip = kvm_irqchip { chip_id, ..Default::default() };
        vm.get_irqchip(&mut chip).map(|()| chip).map_err(vm_ioctl("KVM_GET_IRQCHIP"))
    };
    let pic_master = chip(KVM_IRQCHIP_PIC_MASTER)?;
    let pic_slave = chip(KVM_IRQCHIP_PIC_SLAVE)?;
    let ioapic = chip(KVM_IRQCHIP_IOAPIC)?;
    let pit = vm.get_pit2().map_err(vm_ioctl("KVM_GET_PIT2"))?;
    let clock = vm.get_clock().map_err(vm_ioctl("KVM_GET_CLOCK"))?;
    let saved_at_realtime_ns = Some(time::realtime_ns());
    Ok(VmState { pic_master, pic_slave, ioapic, pit, clock, saved_at_realtime_ns })
}

/// Saves the VM and its vCPUs (paused), `cpuids[i]` being what vCPU `i` was given.
pub fn save(
    vm: &VmFd,
    vcpus: &[&VcpuFd],
    cpuids: &[&[kvm_cpuid_entry2]],
    caps: &HostCaps,
) -> Result<KvmState, StateError> {
    if cpuids.len() != vcpus.len() {
        return Err(StateError::VcpuCount { saved: cpuids.len(), given: vcpus.len() });
    }
    let vcpu_states = vcpus
        .iter()
        .zip(cpuids)
        .enumerate()
        .map(|(index, (fd, cpuid))| save_vcpu(fd, index, cpuid, caps))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(KvmState { vm: save_vm(vm)?, vcpus: vcpu_states })
}

/// What [`restore`] did about time, and the performance-monitoring MSRs KVM would not take
/// (vCPU, MSR), which restoring tolerates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    pub clock: ClockRestored,
    pub tsc: TscSync,
    pub skipped_msrs: Vec<(usize, u32)>,
}

/// Restores a whole VM onto raw vCPU fds in the order the module documentation gives:
/// [`begin_restore`], [`restore_vcpu`] for each vCPU, [`finish_restore`] (a carve VM's restore
/// takes the same steps, each vCPU restored as a `Vcpu`).
pub fn restore(
    vm: &VmFd,
    vcpus: &[&VcpuFd],
    state: &KvmState,
    policy: TimePolicy,
    caps: &HostCaps,
) -> Result<Restored, StateError> {
    let clock = begin_restore(vm, vcpus, state, policy, caps)?;
    let mut skipped_msrs = Vec::new();
    for (vcpu, (fd, vcpu_state)) in vcpus.iter().zip(&state.vcpus).enumerate() {
        let skipped = restore_vcpu(fd, vcpu, vcpu_state, caps, clock.advanced_ns)?;
        skipped_msrs.extend(skipped.into_iter().map(|msr| (vcpu, msr)));
    }
    let tsc = finish_restore(vm, vcpus, state)?;
    Ok(Restored { clock, tsc, skipped_msrs })
}

/// Steps 1 and 2: refuses, before writing anything, a state that is invalid, needs what this
/// host lacks, or runs its TSC at a frequency this host can neither match nor scale to (read
/// from `vcpus`, the fresh vCPUs it goes into); then sets the clock. The vCPUs' TSCs advance
/// by the returned [`ClockRestored::advanced_ns`].
pub fn begin_restore(
    vm: &VmFd,
    vcpus: &[&VcpuFd],
    state: &KvmState,
    policy: TimePolicy,
    caps: &HostCaps,
) -> Result<ClockRestored, StateError> {
    if vcpus.len() != state.vcpus.len() {
        return Err(StateError::VcpuCount { saved: state.vcpus.len(), given: vcpus.len() });
    }
    validate_vm(&state.vm)?;
    for (vcpu, vcpu_state) in state.vcpus.iter().enumerate() {
        validate_vcpu(vcpu, vcpu_state)?;
    }
    check_host(caps, &state.vcpus)?;
    for (vcpu, (fd, vcpu_state)) in vcpus.iter().zip(&state.vcpus).enumerate() {
        time::tsc_khz_to_set(vcpu, vcpu_state.tsc_khz, time::host_tsc_khz(fd), caps.tsc_control)?;
    }
    restore_clock(vm, &state.vm, policy, caps)
}

/// Steps 4 and 5, once every vCPU holds its state: TSC offsets made identical, then the PICs,
/// IOAPIC and PIT.
pub fn finish_restore(vm: &VmFd, vcpus: &[&VcpuFd], state: &KvmState) -> Result<TscSync, StateError> {
    let tsc = sync_tsc_offsets(vcpus, &state.vcpus)?;
    restore_devices(vm, &state.vm)?;
    Ok(tsc)
}

/// Step 3 for vCPU `vcpu` (a fresh one that has not run), after [`begin_restore`] checked the
/// host. `tsc_advance_ns` is the time the guest TSC moves on from its saved value
/// ([`ClockRestored::advanced_ns`]; 0 keeps it exact).
/// Returns the performance-monitoring MSRs KVM would not take (tolerated, see the MSR module).
pub fn restore_vcpu(
    fd: &VcpuFd,
    vcpu: usize,
    state: &VcpuState,
    caps: &HostCaps,
    tsc_advance_ns: u64,
) -> Result<Vec<u32>, StateError> {
    validate_vcpu(vcpu, state)?;
    if state.nested.is_some() && caps.nested_state_size == 0 {
        return Err(Incompatible { missing: vec![Missing::NestedState] }.into());
    }
    // The TSC frequency before anything that reads or writes a TSC value: KVM converts every
    // TSC write and the TSC-deadline timer with the vCPU's ratio (Firecracker: before any state).
    let host_khz = time::host_tsc_khz(fd);
    if let Some(khz) = time::tsc_khz_to_set(vcpu, state.tsc_khz, host_khz, caps.tsc_control)? {
        fd.set_tsc_khz(khz).map_err(vcpu_ioctl(vcpu, "KVM_SET_TSC_KHZ"))?;
    }
    // CPUID first: KVM derives from it which MSRs exist, the XSAVE layout and the XCR0 bits it
    // accepts, MAXPHYADDR for CR3 checks, whether VMX/SVM nested state is allowed.
    let entries: Vec<kvm_cpuid_entry2> = state.cpuid.iter().map(kvm_cpuid_entry2::from).collect();
    let cpuid = CpuId::from_entries(&entries)
        .map_err(|_| StateError::InvalidVcpu { vcpu, what: "its CPUID does not fit kvm_cpuid2".into() })?;
    fd.set_cpuid2(&cpuid).map_err(vcpu_ioctl(vcpu, "KVM_SET_CPUID2"))?;
    // MP state next, before the LAPIC and events it interacts with (pending INIT/SIPI), as
    // Firecracker and Cloud Hypervisor do.
    fd.set_mp_state(state.mp_state).map_err(vcpu_ioctl(vcpu, "KVM_SET_MP_STATE"))?;
    // REGS before events: KVM_SET_REGS drops a pending exception, which KVM_SET_VCPU_EVENTS
    // brings back.
    fd.set_regs(&state.regs).map_err(vcpu_ioctl(vcpu, "KVM_SET_REGS"))?;
    // SREGS before the LAPIC (it holds the APIC base: xAPIC or x2APIC decides how KVM reads the
    // LAPIC's ID) and before nested state (EFER.SVME, CR4.VMXE must be on for it).
    fd.set_sregs(&state.sregs).map_err(|source| {
        // Setting EFER.SVME makes SVM allocate the nested state (seed (g)): ENOMEM surfaces here.
        if source.errno() == libc::ENOMEM && state.sregs.efer & EFER_SVME != 0 {
            StateError::NestedState { vcpu, ioctl: "KVM_SET_SREGS (EFER.SVME)", errno: libc::ENOMEM }
        } else {
            StateError::VcpuIoctl { vcpu, ioctl: "KVM_SET_SREGS", source }
        }
    })?;
    set_xsave(fd, vcpu, &state.xsave, caps)?;
    fd.set_xcrs(&state.xcrs).map_err(vcpu_ioctl(vcpu, "KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debug_regs).map_err(vcpu_ioctl(vcpu, "KVM_SET_DEBUGREGS"))?;
    // LAPIC before MSRs: KVM takes IA32_TSC_DEADLINE only while the LVT timer is in TSC-deadline
    // mode, and ignores it otherwise.
    fd.set_lapic(&state.lapic).map_err(vcpu_ioctl(vcpu, "KVM_SET_LAPIC"))?;
    // MSRs before nested state: KVM refuses changes to the VMX capability MSRs (0x480-0x491)
    // once the vCPU is in VMX operation (-EBUSY), and IA32_FEAT_CTL must allow VMXON first
    // (QEMU writes it before nested state for the same reason).
    let khz = state.tsc_khz.or(host_khz).unwrap_or(0);
    let order = msrs::restore_order(&state.msrs, time::ticks(tsc_advance_ns, khz));
    let skipped = msrs::write(fd, vcpu, &order)?;
    // The SSP after the CET MSRs, as QEMU puts it, and before nested state, as REGS go: entering
    // L2 takes L2's SSP from VMCS12 when L1 loads CET state, else keeps this one.
    if let Some(ssp) = state.ssp {
        fd.set_one_reg(cet::GUEST_SSP_REG, &ssp.to_le_bytes()).map_err(|source| StateError::OneReg {
            vcpu,
            ioctl: "KVM_SET_ONE_REG",
            source,
        })?;
    }
    // Nested state after SREGS and MSRs, before events: KVM_SET_NESTED_STATE enters guest mode
    // and takes L2's registers from what SREGS/REGS put in place (SVM); pending events then
    // apply to the level the vCPU is in.
    if let Some(nested) = &state.nested {
        set_nested(fd, vcpu, nested)?;
    }
    fd.set_vcpu_events(&state.events).map_err(vcpu_ioctl(vcpu, "KVM_SET_VCPU_EVENTS"))?;
    // Tell a kvmclock guest it was stopped, so its watchdogs do not report the pause as a soft
    // lockup. Fails (EINVAL) when the guest has no kvmclock enabled: nothing to tell then.
    let _ = fd.kvmclock_ctrl();
    Ok(skipped)
}

/// Restores the VM-wide state: PIC master, PIC slave, IOAPIC, PIT, then kvmclock by `policy`.
/// When vCPUs are restored too, take [`restore`]'s steps, which put the clock first and the
/// interrupt controllers and PIT after the LAPICs.
pub fn restore_vm(
    vm: &VmFd,
    state: &VmState,
    policy: TimePolicy,
    caps: &HostCaps,
) -> Result<ClockRestored, StateError> {
    validate_vm(state)?;
    restore_devices(vm, state)?;
    restore_clock(vm, state, policy, caps)
}

/// The PICs before the IOAPIC and all three before the PIT, whose timer starts at KVM_SET_PIT2
/// and raises IRQ 0 into them.
fn restore_devices(vm: &VmFd, state: &VmState) -> Result<(), StateError> {
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip).map_err(vm_ioctl("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&state.pit).map_err(vm_ioctl("KVM_SET_PIT2"))
}

fn restore_clock(
    vm: &VmFd,
    state: &VmState,
    policy: TimePolicy,
    caps: &HostCaps,
) -> Result<ClockRestored, StateError> {
    let (data, restored) = time::plan_clock(
        &state.clock,
        state.saved_at_realtime_ns,
        policy,
        caps.clock_flags,
        time::realtime_ns(),
    );
    vm.set_clock(&data).map_err(vm_ioctl("KVM_SET_CLOCK"))?;
    Ok(restored)
}

fn get_xsave(fd: &VcpuFd, vcpu: usize, caps: &HostCaps) -> Result<Vec<u32>, StateError> {
    if !caps.xsave2 {
        return Ok(fd.get_xsave().map_err(vcpu_ioctl(vcpu, "KVM_GET_XSAVE"))?.region.to_vec());
    }
    let extra = caps.xsave_size.saturating_sub(XSAVE_REGION_WORDS * 4).div_ceil(4);
    let mut xsave = Xsave::new(extra).map_err(|_| StateError::InvalidVcpu {
        vcpu,
        what: format!("no buffer for KVM_CAP_XSAVE2's {} bytes", caps.xsave_size),
    })?;
    // SAFETY: `xsave` holds caps.xsave_size bytes (rounded up to words), which HostCaps::read
    // took from KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2): the most KVM_GET_XSAVE2 writes while the
    // process permits itself no further XSTATE components, which carve never asks for.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(vcpu_ioctl(vcpu, "KVM_GET_XSAVE2"))?;
    let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(xsave.as_slice());
    Ok(words)
}

fn set_xsave(fd: &VcpuFd, vcpu: usize, words: &[u32], caps: &HostCaps) -> Result<(), StateError> {
    let too_big = |_| StateError::InvalidVcpu { vcpu, what: "its XSAVE area does not fit kvm_xsave".into() };
    let mut header = kvm_xsave::default();
    header.region.copy_from_slice(&words[..XSAVE_REGION_WORDS]);
    let mut xsave = Xsave::from_header(kvm_xsave2 { len: 0, xsave: header }).map_err(too_big)?;
    // Zero-padded to what this host's KVM reads, whatever the snapshot's size.
    let total = words.len().max(caps.xsave_size.div_ceil(4));
    for i in XSAVE_REGION_WORDS..total {
        xsave.push(words.get(i).copied().unwrap_or(0)).map_err(too_big)?;
    }
    // SAFETY: KVM_SET_XSAVE reads the vCPU's XSAVE size (at most KVM_CAP_XSAVE2, 4096 bytes
    // without it) from the buffer, and `xsave` holds at least caps.xsave_size bytes, which
    // HostCaps::read took from KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2).
    unsafe { fd.set_xsave2(&xsave) }.map_err(vcpu_ioctl(vcpu, "KVM_SET_XSAVE"))
}

fn get_nested(
    fd: &VcpuFd,
    vcpu: usize,
    caps: &HostCaps,
    sregs: &kvm_sregs,
) -> Result<Option<Vec<u8>>, StateError> {
    if caps.nested_state_size == 0 {
        // Without KVM_CAP_NESTED_STATE a guest using SVM or VMX would be saved without the
        // nested guest's state and restored wrong; refuse instead.
        if sregs.efer & EFER_SVME != 0 || sregs.cr4 & CR4_VMXE != 0 {
            return Err(StateError::NestedNotSaveable { vcpu });
        }
        return Ok(None);
    }
    let mut buffer = KvmNestedStateBuffer::empty();
    fd.nested_state(&mut buffer).map_err(|e| StateError::NestedState {
        vcpu,
        ioctl: "KVM_GET_NESTED_STATE",
        errno: e.errno(),
    })?;
    let size = buffer.size as usize;
    // The buffer's bytes through its serde form (kvm-bindings serialises it as its bytes),
    // rather than an unsafe view of the struct.
    let bytes: Vec<u8> = serde_json::to_value(buffer).and_then(serde_json::from_value).map_err(|e| {
        StateError::InvalidVcpu { vcpu, what: format!("its nested state could not be copied: {e}") }
    })?;
    if !(NESTED_HEADER..=bytes.len()).contains(&size) {
        return Err(StateError::InvalidVcpu {
            vcpu,
            what: format!("KVM_GET_NESTED_STATE reported {size} bytes of nested state"),
        });
    }
    let bytes = bytes[..size].to_vec();
    Ok(nested_in_use(&bytes).then_some(bytes))
}

/// Whether a CPUID table gives the guest shadow stacks (CPUID.(7,0):ECX bit 7).
fn has_shstk(cpuid: &[kvm_cpuid_entry2]) -> bool {
    let (function, index, register, bit) = cet::SHSTK;
    Leaves(cpuid).bit(function, index, register, bit)
}

fn get_ssp(fd: &VcpuFd, vcpu: usize) -> Result<u64, StateError> {
    let mut bytes = [0u8; 8];
    fd.get_one_reg(cet::GUEST_SSP_REG, &mut bytes).map_err(|source| StateError::OneReg {
        vcpu,
        ioctl: "KVM_GET_ONE_REG",
        source,
    })?;
    Ok(u64::from_le_bytes(bytes))
}

fn set_nested(fd: &VcpuFd, vcpu: usize, bytes: &[u8]) -> Result<(), StateError> {
    // Zero-padded to the buffer's size; KVM reads as many bytes as the header's `size`.
    let buffer = KvmNestedStateBuffer::deserialize(serde::de::value::BytesDeserializer::<
        serde::de::value::Error,
    >::new(bytes))
    .map_err(|e| StateError::InvalidVcpu { vcpu, what: format!("its nested state: {e}") })?;
    fd.set_nested_state(&buffer).map_err(|e| StateError::NestedState {
        vcpu,
        ioctl: "KVM_SET_NESTED_STATE",
        errno: e.errno(),
    })
}

fn nested_header(bytes: &[u8]) -> (u16, u16, u32) {
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    let size = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    (u16_at(0), u16_at(2), size)
}

/// Whether the nested state says anything a fresh vCPU does not: guest mode, VMXON done, data
/// beyond the header, or (SVM) GIF clear.
fn nested_in_use(bytes: &[u8]) -> bool {
    if bytes.len() > NESTED_HEADER {
        return true;
    }
    let (flags, format, _) = nested_header(bytes);
    match u32::from(format) {
        KVM_STATE_NESTED_FORMAT_VMX => {
            let vmxon_pa = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
            flags != 0 || vmxon_pa != u64::MAX
        }
        KVM_STATE_NESTED_FORMAT_SVM => u32::from(flags) != KVM_STATE_NESTED_GIF_SET,
        _ => true,
    }
}

/// Firecracker's fix (PR #4618): a TSC-deadline timer that expired while the vCPU was paused has
/// IA32_TSC_DEADLINE cleared and its interrupt pending inside KVM, outside anything saved; the
/// restored guest would never get it and wait for a timer forever. An armed-looking LVT timer
/// (TSC-deadline mode, unmasked) with a zero deadline and its vector neither pending nor in
/// service gets the saved TSC as deadline: the timer fires at once after restore.
fn fix_zero_tsc_deadline(msrs: &mut [Msr], lapic: &kvm_lapic_state) {
    let lvtt = lapic_reg(lapic, APIC_LVTT);
    let deadline_mode = (lvtt >> 17) & 0b11 == 0b10;
    let masked = lvtt & (1 << 16) != 0;
    let vector = (lvtt & 0xff) as usize;
    let queued = [APIC_ISR, APIC_IRR]
        .iter()
        .any(|&base| lapic_reg(lapic, base + (vector / 32) * 0x10) & (1 << (vector % 32)) != 0);
    if !deadline_mode || masked || queued {
        return;
    }
    let Some(tsc) = msrs.iter().find(|m| m.index == msrs::MSR_IA32_TSC).map(|m| m.data) else { return };
    for msr in msrs.iter_mut().filter(|m| m.index == msrs::MSR_IA32_TSC_DEADLINE && m.data == 0) {
        msr.data = tsc;
    }
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

/// Checks a vCPU state from an untrusted file before any ioctl sees it.
pub fn validate_vcpu(vcpu: usize, state: &VcpuState) -> Result<(), StateError> {
    let invalid = |what: String| Err(StateError::InvalidVcpu { vcpu, what });
    if state.cpuid.is_empty() || state.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
        return invalid(format!(
            "it has {} CPUID entries; KVM takes 1 to {KVM_MAX_CPUID_ENTRIES}",
            state.cpuid.len()
        ));
    }
    if state.msrs.len() > MAX_MSRS {
        return invalid(format!("it has {} MSRs; carve takes at most {MAX_MSRS}", state.msrs.len()));
    }
    let mut seen = BTreeSet::new();
    if let Some(twice) = state.msrs.iter().find(|m| !seen.insert(m.index)) {
        return invalid(format!("MSR {} appears twice", msrs::msr_label(twice.index)));
    }
    let xsave_bytes = state.xsave.len() * 4;
    if !(XSAVE_REGION_WORDS * 4..=MAX_XSAVE_BYTES).contains(&xsave_bytes) {
        return invalid(format!(
            "its XSAVE area is {xsave_bytes} bytes; KVM's is at least {} and carve takes at most \
             {MAX_XSAVE_BYTES}",
            XSAVE_REGION_WORDS * 4
        ));
    }
    if state.xcrs.nr_xcrs > KVM_MAX_XCRS || state.xcrs.flags != 0 {
        return invalid(format!(
            "it has {} XCRs with flags {:#x}; KVM takes at most {KVM_MAX_XCRS} and no flags",
            state.xcrs.nr_xcrs, state.xcrs.flags
        ));
    }
    if state.debug_regs.flags != 0 {
        return invalid(format!(
            "its debug registers carry flags {:#x}; KVM takes none",
            state.debug_regs.flags
        ));
    }
    if state.tsc_khz == Some(0) {
        return invalid("its TSC frequency is 0 kHz".into());
    }
    if let Some(nested) = &state.nested {
        validate_nested(nested).or_else(|what| invalid(format!("its nested state {what}")))?;
    }
    if let Some(ssp) = state.ssp {
        validate_ssp(ssp, &state.cpuid)
            .or_else(|what| invalid(format!("its shadow-stack pointer {what}")))?;
    }
    Ok(())
}

/// The SSP as KVM_SET_ONE_REG takes it: a guest with SHSTK, 4-byte aligned, canonical for the
/// vCPU's linear-address width (57 bits with LA57 in its CPUID, else 48).
fn validate_ssp(ssp: u64, cpuid: &[CpuidEntry]) -> Result<(), String> {
    let entries: Vec<kvm_cpuid_entry2> = cpuid.iter().map(kvm_cpuid_entry2::from).collect();
    if !has_shstk(&entries) {
        return Err(format!(
            "{ssp:#x} is saved but its CPUID lacks CET shadow stacks (CPUID 7.0 ECX bit 7), so KVM has \
             no SSP to restore"
        ));
    }
    if ssp & 3 != 0 {
        return Err(format!("{ssp:#x} is not 4-byte aligned"));
    }
    let bits = if Leaves(&entries).bit(7, 0, Reg::Ecx, CPUID_7_ECX_LA57) { 57 } else { 48 };
    let unused = 64 - bits;
    if (((ssp << unused) as i64) >> unused) as u64 != ssp {
        return Err(format!("{ssp:#x} is not canonical for {bits}-bit linear addresses"));
    }
    Ok(())
}

/// The nested-state buffer against its own header and the buffer KVM is handed.
fn validate_nested(bytes: &[u8]) -> Result<(), String> {
    let most = std::mem::size_of::<KvmNestedStateBuffer>();
    if !(NESTED_HEADER..=most).contains(&bytes.len()) {
        return Err(format!("is {} bytes; KVM's is {NESTED_HEADER} to {most}", bytes.len()));
    }
    let (_, format, size) = nested_header(bytes);
    if size as usize != bytes.len() {
        return Err(format!("header says {size} bytes but {} were saved", bytes.len()));
    }
    if u32::from(format) > KVM_STATE_NESTED_FORMAT_SVM {
        return Err(format!("has format {format}; KVM knows 0 (VMX) and 1 (SVM)"));
    }
    Ok(())
}

/// Checks a VM state from an untrusted file: each irqchip must be the chip its field names
/// (KVM_SET_IRQCHIP picks the chip by `chip_id`).
pub fn validate_vm(state: &VmState) -> Result<(), StateError> {
    for (chip, id, name) in [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER, "PIC master"),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC, "IOAPIC"),
    ] {
        if chip.chip_id != id {
            return Err(StateError::InvalidVm(format!(
                "the {name} state is for irqchip {} instead of {id}",
                chip.chip_id
            )));
        }
    }
    Ok(())
}
