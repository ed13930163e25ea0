//! Time across a save and restore: the TSC frequency, the guest TSC and its per-vCPU offsets, and
//! KVM's clock (kvmclock).

use std::time::{SystemTime, UNIX_EPOCH};

use kvm_bindings::{
    kvm_clock_data, kvm_device_attr, kvm_msr_entry, Msrs, KVM_CLOCK_REALTIME, KVM_VCPU_TSC_CTRL,
    KVM_VCPU_TSC_OFFSET,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;

use super::error::StateError;
use super::VcpuState;

/// How guest time relates to the time the snapshot spent on disk (or in transit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimePolicy {
    /// Guest time continues from the saved value: the pause is invisible to the guest (a
    /// snapshot resumed hours later sees no time pass; its wall clock lags until it resyncs).
    #[default]
    Frozen,
    /// Guest time advances by the wall-clock time that passed since the save, as a migration
    /// wants: kvmclock by the elapsed CLOCK_REALTIME, and the guest TSC by the same time in
    /// ticks, so the two clocks keep agreeing. Needs host clocks synchronised (NTP) across hosts.
    HostElapsed,
}

/// What restoring the clock did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockApplied {
    /// [`TimePolicy::Frozen`]: kvmclock continues from the saved value.
    Frozen,
    /// [`TimePolicy::HostElapsed`] by KVM's own pair (KVM_CLOCK_REALTIME in the saved
    /// `kvm_clock_data` and in this host's KVM_CAP_ADJUST_CLOCK): KVM added the wall time since
    /// the save as it set the clock.
    KvmRealtime,
    /// [`TimePolicy::HostElapsed`] by carve's CLOCK_REALTIME reading taken right after
    /// KVM_GET_CLOCK (KVM returns its own pair only while its master clock runs: a host TSC
    /// clocksource and vCPUs whose TSCs match; carve's nested CI hosts never return it): exact
    /// to within the microseconds between the two reads.
    CarveRealtime,
    /// [`TimePolicy::HostElapsed`] asked, but no wall-clock reading came with the saved clock,
    /// or this host's wall clock stands before the save's: kvmclock continues from the saved
    /// value, as with [`TimePolicy::Frozen`].
    NoWallClock,
}

/// The outcome of restoring the clock: how it was done and by how much guest time advanced
/// (the vCPUs' TSCs advance by the same time, see [`super::restore_vcpu`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockRestored {
    pub applied: ClockApplied,
    pub advanced_ns: u64,
}

/// What becomes of the saved clock under `policy`, `now_ns` being CLOCK_REALTIME now.
/// `host_clock_flags` is this host's KVM_CHECK_EXTENSION(KVM_CAP_ADJUST_CLOCK).
pub(super) fn plan_clock(
    saved: &kvm_clock_data,
    saved_at_realtime_ns: Option<u64>,
    policy: TimePolicy,
    host_clock_flags: u32,
    now_ns: u64,
) -> (kvm_clock_data, ClockRestored) {
    // KVM_SET_CLOCK takes no flags before Linux 5.16 and only acts on KVM_CLOCK_REALTIME after:
    // the saved flags (TSC_STABLE, HOST_TSC) describe the source host, not a request.
    let frozen = kvm_clock_data { clock: saved.clock, ..Default::default() };
    let as_saved = |applied| (frozen, ClockRestored { applied, advanced_ns: 0 });
    if policy == TimePolicy::Frozen {
        return as_saved(ClockApplied::Frozen);
    }
    if saved.flags & KVM_CLOCK_REALTIME != 0 && host_clock_flags & KVM_CLOCK_REALTIME != 0 {
        let data = kvm_clock_data {
            clock: saved.clock,
            realtime: saved.realtime,
            flags: KVM_CLOCK_REALTIME,
            ..Default::default()
        };
        let advanced_ns = now_ns.saturating_sub(saved.realtime);
        return (data, ClockRestored { applied: ClockApplied::KvmRealtime, advanced_ns });
    }
    match saved_at_realtime_ns {
        Some(at) if now_ns >= at => {
            let advanced_ns = now_ns - at;
            let data =
                kvm_clock_data { clock: saved.clock.saturating_add(advanced_ns), ..Default::default() };
            (data, ClockRestored { applied: ClockApplied::CarveRealtime, advanced_ns })
        }
        _ => as_saved(ClockApplied::NoWallClock),
    }
}

pub(super) fn realtime_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos().min(u64::MAX as u128) as u64)
}

/// TSC ticks in `ns` nanoseconds at `khz`.
pub(super) fn ticks(ns: u64, khz: u32) -> u64 {
    (ns as u128 * khz as u128 / 1_000_000).min(u64::MAX as u128) as u64
}

/// Two TSC frequencies closer than this are the same frequency. KVM's own default
/// (`kvm.tsc_tolerance_ppm`, 250) and Firecracker's: TSC calibration at boot differs by a few
/// ppm between identical machines, and a guest's NTP absorbs drift up to 500 ppm. QEMU refuses
/// any difference without scaling, which makes snapshots of identical machines fail to resume.
pub(super) const TSC_TOLERANCE_PPM: u64 = 250;

pub(super) fn same_frequency(saved_khz: u32, host_khz: u32) -> bool {
    saved_khz.abs_diff(host_khz) as u64 * 1_000_000 <= saved_khz as u64 * TSC_TOLERANCE_PPM
}

/// The frequency the vCPU's TSC must be set to, if it must: the saved one when it differs from
/// this host's beyond [`TSC_TOLERANCE_PPM`] and KVM can scale (KVM_CAP_TSC_CONTROL); an error
/// when it differs and KVM cannot. An unknown frequency (either side) is left alone.
pub(super) fn tsc_khz_to_set(
    vcpu: usize,
    saved_khz: Option<u32>,
    host_khz: Option<u32>,
    tsc_control: bool,
) -> Result<Option<u32>, StateError> {
    match (saved_khz, host_khz) {
        (Some(saved), Some(host)) if !same_frequency(saved, host) => {
            if tsc_control {
                Ok(Some(saved))
            } else {
                Err(StateError::TscFrequency { vcpu, saved_khz: saved, host_khz: host })
            }
        }
        _ => Ok(None),
    }
}

/// KVM_GET_TSC_KHZ: `None` where the host's TSC frequency is unknown (unstable TSC).
pub(super) fn host_tsc_khz(fd: &VcpuFd) -> Option<u32> {
    fd.get_tsc_khz().ok().filter(|&khz| khz > 0)
}

// kvm-ioctls offers the vCPU device-attribute ioctls on aarch64 only; x86 needs them for
// KVM_VCPU_TSC_OFFSET (Linux 5.16, KVM_CAP_VCPU_ATTRIBUTES).
vmm_sys_util::ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, kvm_bindings::KVMIO, 0xe1, kvm_device_attr);
vmm_sys_util::ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, kvm_bindings::KVMIO, 0xe2, kvm_device_attr);
vmm_sys_util::ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, kvm_bindings::KVMIO, 0xe3, kvm_device_attr);

fn tsc_offset_attr(addr: u64) -> kvm_device_attr {
    kvm_device_attr { flags: 0, group: KVM_VCPU_TSC_CTRL, attr: KVM_VCPU_TSC_OFFSET.into(), addr }
}

/// Whether the vCPU has the KVM_VCPU_TSC_OFFSET attribute (L1's TSC offset: guest TSC = host
/// TSC × ratio + offset).
pub(super) fn has_tsc_offset(fd: &VcpuFd) -> bool {
    let attr = tsc_offset_attr(0);
    // SAFETY: KVM_HAS_DEVICE_ATTR only reads the `kvm_device_attr` it is given, which lives for
    // the call; `addr` is ignored. `fd` is a vCPU file descriptor.
    unsafe { ioctl_with_ref(fd, KVM_HAS_DEVICE_ATTR(), &attr) == 0 }
}

pub(super) fn get_tsc_offset(fd: &VcpuFd) -> Result<u64, errno::Error> {
    let mut offset = 0u64;
    let attr = tsc_offset_attr(std::ptr::addr_of_mut!(offset) as u64);
    // SAFETY: KVM reads `attr` and writes the offset, a u64, to `attr.addr`, which points at
    // `offset`: live, writable and 8 bytes for the whole call.
    let ret = unsafe { ioctl_with_ref(fd, KVM_GET_DEVICE_ATTR(), &attr) };
    if ret != 0 {
        return Err(errno::Error::last());
    }
    Ok(offset)
}

fn set_tsc_offset(fd: &VcpuFd, offset: u64) -> Result<(), errno::Error> {
    let attr = tsc_offset_attr(std::ptr::addr_of!(offset) as u64);
    // SAFETY: KVM reads `attr` and then 8 bytes at `attr.addr`, which points at `offset`, live
    // for the whole call; it writes nothing back to user memory.
    let ret = unsafe { ioctl_with_ref(fd, KVM_SET_DEVICE_ATTR(), &attr) };
    if ret != 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

/// What [`sync_tsc_offsets`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TscSync {
    /// Every vCPU got vCPU 0's restored offset (plus the difference it had to vCPU 0 at the
    /// save): vCPUs that read the same TSC at the save read the same TSC now, and KVM's master
    /// clock can engage.
    Synced { offset: u64 },
    /// This host's vCPUs have no KVM_VCPU_TSC_OFFSET attribute (Linux < 5.16). The IA32_TSC writes
    /// still line the vCPUs up: KVM gives a write within a second of the previous vCPU's the same
    /// offset (its "TSC matching").
    Unavailable,
}

/// After every vCPU is restored: sets all vCPUs' TSC offsets from vCPU 0's, as Cloud Hypervisor
/// does (`synchronize_tsc_offsets`), so the per-vCPU IA32_TSC writes — a few microseconds apart —
/// leave no skew between vCPUs. Without identical offsets KVM keeps its master clock off, and
/// every kvmclock read in the guest pays for it (Cloud Hypervisor measured Windows' reference TSC
/// page 18× slower).
pub fn sync_tsc_offsets(vcpus: &[&VcpuFd], states: &[VcpuState]) -> Result<TscSync, StateError> {
    let Some(first) = vcpus.first() else { return Ok(TscSync::Unavailable) };
    if !has_tsc_offset(first) {
        return Ok(TscSync::Unavailable);
    }
    let base = get_tsc_offset(first).map_err(|source| StateError::VcpuIoctl {
        vcpu: 0,
        ioctl: "KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)",
        source,
    })?;
    let saved_base = states.first().and_then(|s| s.tsc_offset);
    for (vcpu, fd) in vcpus.iter().enumerate().skip(1) {
        let relative = match (saved_base, states.get(vcpu).and_then(|s| s.tsc_offset)) {
            (Some(first), Some(this)) => this.wrapping_sub(first),
            _ => 0,
        };
        set_tsc_offset(fd, base.wrapping_add(relative)).map_err(|source| StateError::VcpuIoctl {
            vcpu,
            ioctl: "KVM_SET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)",
            source,
        })?;
    }
    Ok(TscSync::Synced { offset: base })
}

const MSR_IA32_TSC: u32 = super::msrs::MSR_IA32_TSC;

/// The guest TSC now (IA32_TSC read by KVM_GET_MSRS): what a paused vCPU keeps, so that
/// [`rewind_tsc`] can hide the pause.
pub fn guest_tsc(fd: &VcpuFd, vcpu: usize) -> Result<u64, StateError> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index: MSR_IA32_TSC, ..Default::default() }])
        .expect("one MSR fits kvm_msrs");
    match fd.get_msrs(&mut msrs) {
        Ok(1) => Ok(msrs.as_slice()[0].data),
        Ok(_) => Err(StateError::VcpuIoctl {
            vcpu,
            ioctl: "KVM_GET_MSRS (IA32_TSC)",
            source: errno::Error::new(libc::EINVAL),
        }),
        Err(source) => Err(StateError::VcpuIoctl { vcpu, ioctl: "KVM_GET_MSRS (IA32_TSC)", source }),
    }
}

/// Moves a paused vCPU's TSC back by `ticks`, to hide time it spent paused: through the TSC
/// offset where KVM has the attribute (every vCPU moved by the same ticks keeps an offset equal
/// to the others', so KVM's master clock stays on); by an IA32_TSC write otherwise (KVM gives
/// writes within a second of each other matching offsets).
pub fn rewind_tsc(fd: &VcpuFd, vcpu: usize, ticks: u64) -> Result<(), StateError> {
    if ticks == 0 {
        return Ok(());
    }
    let refused = |ioctl| move |source| StateError::VcpuIoctl { vcpu, ioctl, source };
    if has_tsc_offset(fd) {
        let offset = get_tsc_offset(fd).map_err(refused("KVM_GET_DEVICE_ATTR (KVM_VCPU_TSC_OFFSET)"))?;
        set_tsc_offset(fd, offset.wrapping_sub(ticks))
            .map_err(refused("KVM_SET_DEVICE_ATTR (KVM_VCPU_TSC_OFFSET)"))
    } else {
        let tsc = guest_tsc(fd, vcpu)?.saturating_sub(ticks);
        let msrs =
            Msrs::from_entries(&[kvm_msr_entry { index: MSR_IA32_TSC, data: tsc, ..Default::default() }])
                .expect("one MSR fits kvm_msrs");
        match fd.set_msrs(&msrs) {
            Ok(1) => Ok(()),
            Ok(_) => Err(refused("KVM_SET_MSRS (IA32_TSC)")(errno::Error::new(libc::EINVAL))),
            Err(source) => Err(refused("KVM_SET_MSRS (IA32_TSC)")(source)),
        }
    }
}
