//! MSRs: read in batches (dropping the ones KVM lists but will not read), written back in the
//! order the TSC needs, with one named error for the first MSR KVM refuses.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use super::error::StateError;
use super::Msr;

pub(super) const MSR_IA32_TSC: u32 = 0x10;
pub(super) const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
pub(super) const MSR_IA32_XSS: u32 = 0xda0;

/// Entries per KVM_GET_MSRS/KVM_SET_MSRS call: KVM refuses 256 or more (MAX_IO_MSRS).
const BATCH: usize = 128;

/// Names for the MSRs errors most often mention; the rest go by number.
const NAMES: &[(u32, &str)] = &[
    (0x10, "IA32_TSC"),
    (0x3a, "IA32_FEAT_CTL"),
    (0x3b, "IA32_TSC_ADJUST"),
    (0x48, "IA32_SPEC_CTRL"),
    (0x8b, "IA32_UCODE_REV"),
    (0x8c, "IA32_SGXLEPUBKEYHASH0"),
    (0x8d, "IA32_SGXLEPUBKEYHASH1"),
    (0x8e, "IA32_SGXLEPUBKEYHASH2"),
    (0x8f, "IA32_SGXLEPUBKEYHASH3"),
    (0x10a, "IA32_ARCH_CAPABILITIES"),
    (0x122, "IA32_TSX_CTRL"),
    (0x174, "IA32_SYSENTER_CS"),
    (0x175, "IA32_SYSENTER_ESP"),
    (0x176, "IA32_SYSENTER_EIP"),
    (0x1a0, "IA32_MISC_ENABLE"),
    (0x1c4, "IA32_XFD"),
    (0x1c5, "IA32_XFD_ERR"),
    (0x1d9, "IA32_DEBUGCTL"),
    (0x277, "IA32_PAT"),
    (0x2ff, "IA32_MTRR_DEF_TYPE"),
    (0x345, "IA32_PERF_CAPABILITIES"),
    (0x6a0, "IA32_U_CET"),
    (0x6a2, "IA32_S_CET"),
    (0x6a4, "IA32_PL0_SSP"),
    (0x6a5, "IA32_PL1_SSP"),
    (0x6a6, "IA32_PL2_SSP"),
    (0x6a7, "IA32_PL3_SSP"),
    (0x6a8, "IA32_INT_SSP_TAB"),
    (0x6e0, "IA32_TSC_DEADLINE"),
    (0xda0, "IA32_XSS"),
    (0xc000_0081, "STAR"),
    (0xc000_0082, "LSTAR"),
    (0xc000_0083, "CSTAR"),
    (0xc000_0084, "SYSCALL_MASK"),
    (0xc000_0102, "KERNEL_GS_BASE"),
    (0xc000_0103, "TSC_AUX"),
    (0xc000_0104, "AMD64_TSC_RATIO"),
    (0xc001_0117, "VM_HSAVE_PA"),
    (0x4b56_4d00, "KVM_WALL_CLOCK_NEW"),
    (0x4b56_4d01, "KVM_SYSTEM_TIME_NEW"),
    (0x4b56_4d02, "KVM_ASYNC_PF_EN"),
    (0x4b56_4d03, "KVM_STEAL_TIME"),
    (0x4b56_4d04, "KVM_PV_EOI_EN"),
    (0x4b56_4d05, "KVM_POLL_CONTROL"),
    (0x4b56_4d06, "KVM_ASYNC_PF_INT"),
    (0x4b56_4d07, "KVM_ASYNC_PF_ACK"),
];

/// "0x6e0 (IA32_TSC_DEADLINE)", or the bare number for MSRs without a name here.
pub(super) fn msr_label(index: u32) -> String {
    let name = NAMES
        .iter()
        .find(|(i, _)| *i == index)
        .map(|(_, n)| *n)
        .or_else(|| (0x480..=0x491).contains(&index).then_some("a VMX capability MSR"));
    match name {
        Some(name) => format!("{index:#x} ({name})"),
        None => format!("{index:#x}"),
    }
}

/// MSRs whose restore may fail without failing the restore: the performance-monitoring unit's.
///
/// Crosvm allow-lists exactly these (AMD's PERF_CTL/PERF_CTR and IA32_PERF_CAPABILITIES) and
/// Firecracker leaves PMU MSRs out of its snapshots altogether: whether KVM takes them depends on
/// the host's PMU and on `kvm.enable_pmu` (nested hosts often expose no PMU at all), and a guest
/// that loses a counter's value loses a perf sample, nothing it computes. Everything else KVM
/// refuses is an error: host-initiated writes are permissive (KVM accepts zero for every MSR it
/// lists), so a refusal means the value does not fit this host, and [`super::check_host`] has
/// already named the MSRs this host lacks altogether.
pub(super) fn may_fail_on_restore(index: u32) -> bool {
    const PMU: &[(u32, u32)] = &[
        (0xc1, 0xc8),               // IA32_PMC0..7
        (0x186, 0x18d),             // IA32_PERFEVTSEL0..7
        (0x309, 0x30c),             // IA32_FIXED_CTR0..3
        (0x345, 0x345),             // IA32_PERF_CAPABILITIES
        (0x38d, 0x390),             // IA32_FIXED_CTR_CTRL, IA32_PERF_GLOBAL_STATUS/CTRL/OVF_CTRL
        (0x4c1, 0x4c8),             // IA32_A_PMC0..7 (full-width counters)
        (0xc000_0300, 0xc000_0303), // AMD PerfMonV2 global status/control
        (0xc001_0000, 0xc001_0007), // AMD K7 PERF_CTL0..3, PERF_CTR0..3
        (0xc001_0200, 0xc001_020b), // AMD F15H PERF_CTL0..5 / PERF_CTR0..5
    ];
    PMU.iter().any(|&(first, last)| (first..=last).contains(&index))
}

fn entries(msrs: impl Iterator<Item = Msr>) -> Msrs {
    let entries: Vec<kvm_msr_entry> =
        msrs.map(|m| kvm_msr_entry { index: m.index, data: m.data, ..Default::default() }).collect();
    Msrs::from_entries(&entries).expect("a batch of at most 128 MSRs fits kvm_msrs")
}

/// Reads every MSR in `indices`. KVM_GET_MSRS stops at the first MSR it cannot read and returns
/// how many it read; as Cloud Hypervisor does, that one is dropped and the read goes on after it.
pub(super) fn read(fd: &VcpuFd, vcpu: usize, indices: &[u32]) -> Result<Vec<Msr>, StateError> {
    let mut saved = Vec::with_capacity(indices.len());
    for batch in indices.chunks(BATCH) {
        let mut rest = batch;
        while !rest.is_empty() {
            let mut msrs = entries(rest.iter().map(|&index| Msr { index, data: 0 }));
            let read = fd.get_msrs(&mut msrs).map_err(|source| StateError::VcpuIoctl {
                vcpu,
                ioctl: "KVM_GET_MSRS",
                source,
            })?;
            let read = read.min(rest.len());
            saved.extend(msrs.as_slice()[..read].iter().map(|e| Msr { index: e.index, data: e.data }));
            rest = &rest[(read + 1).min(rest.len())..];
        }
    }
    Ok(saved)
}

/// The order MSRs go back in: IA32_TSC first, so that everything KVM computes from the guest
/// TSC sees the restored one; IA32_XSS next, before the CET MSRs (0x6a0-0x6a8) among the rest:
/// they are supervisor XSAVE state that IA32_XSS enables, judged against the guest's XSS (QEMU
/// writes XSS first too); IA32_TSC_DEADLINE last, because KVM arms the LAPIC timer from the
/// deadline *relative to the current guest TSC* when it is written (Firecracker defers it the
/// same way; written before the TSC, the deadline is judged against the fresh vCPU's TSC and the
/// timer fires at the wrong time or never). `tsc_advance` ticks are added to the saved TSC (the
/// wall time [`super::TimePolicy::HostElapsed`] lets pass; 0 otherwise).
pub(super) fn restore_order(saved: &[Msr], tsc_advance: u64) -> Vec<Msr> {
    let tsc = saved
        .iter()
        .filter(|m| m.index == MSR_IA32_TSC)
        .map(|m| Msr { index: m.index, data: m.data.wrapping_add(tsc_advance) });
    let xss = saved.iter().filter(|m| m.index == MSR_IA32_XSS).copied();
    let middle = saved
        .iter()
        .filter(|m| ![MSR_IA32_TSC, MSR_IA32_XSS, MSR_IA32_TSC_DEADLINE].contains(&m.index))
        .copied();
    let deadline = saved.iter().filter(|m| m.index == MSR_IA32_TSC_DEADLINE).copied();
    tsc.chain(xss).chain(middle).chain(deadline).collect()
}

/// Writes `msrs` in order. Returns the performance-monitoring MSRs KVM refused (see
/// [`may_fail_on_restore`]); any other refusal is an error naming the MSR.
pub(super) fn write(fd: &VcpuFd, vcpu: usize, msrs: &[Msr]) -> Result<Vec<u32>, StateError> {
    let mut skipped = Vec::new();
    for batch in msrs.chunks(BATCH) {
        let mut rest = batch;
        while !rest.is_empty() {
            let written = fd
                .set_msrs(&entries(rest.iter().copied()))
                .map_err(|source| StateError::VcpuIoctl { vcpu, ioctl: "KVM_SET_MSRS", source })?;
            if written >= rest.len() {
                break;
            }
            let refused = rest[written];
            if !may_fail_on_restore(refused.index) {
                return Err(StateError::MsrRefused {
                    vcpu,
                    index: refused.index,
                    data: refused.data,
                    written,
                    count: rest.len(),
                });
            }
            skipped.push(refused.index);
            rest = &rest[written + 1..];
        }
    }
    Ok(skipped)
}
