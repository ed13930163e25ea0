//! KVM state save and restore against the real /dev/kvm: a vCPU and the VM's irqchips, PIT and
//! clock go from one VM into a fresh one and read back the same; time follows the policy; what
//! the host lacks, or a state file gets wrong, is refused before anything is written.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use carve_vmm::kvm_state::{
    self, check_host, ClockApplied, HostCaps, KvmState, Missing, StateError, TimePolicy, TscSync, VcpuState,
};
use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, kvm_pit_config, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const APIC_TPR: usize = 0x80;
const APIC_LVTT: usize = 0x320;
const APIC_TMCCT: usize = 0x390;
/// A guest TSC far below any host's: restored, it must stay far below.
const SMALL_TSC: u64 = 1_000_000;

fn kvm_usable(test: &str) -> bool {
    let usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !usable {
        eprintln!("SKIPPED {test}: /dev/kvm is not usable here");
    }
    usable
}

struct TestVm {
    vm: VmFd,
    vcpus: Vec<VcpuFd>,
    cpuids: Vec<CpuId>,
}

impl TestVm {
    /// A VM as carve builds one: in-kernel irqchip and PIT; `configured` vCPUs get carve's CPUID,
    /// boot MSRs and LAPIC wiring, the others stay as KVM creates them (restore targets).
    fn new(kvm: &Kvm, count: u8, configured: bool) -> TestVm {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() }).unwrap();
        let mut supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        carve_vmm::cpuid::announce_emulated(&mut supported, kvm.check_extension(Cap::TscDeadlineTimer));
        let (mut vcpus, mut cpuids) = (Vec::new(), Vec::new());
        for index in 0..count {
            let fd = vm.create_vcpu(index.into()).unwrap();
            let mut cpuid = supported.clone();
            carve_vmm::cpuid::normalize(&mut cpuid, index, count, fd.get_tsc_khz().ok());
            if configured {
                fd.set_cpuid2(&cpuid).unwrap();
                fd.set_msrs(&carve_vmm::vcpu::boot_msrs()).unwrap();
                carve_vmm::vcpu::configure_lapic(&fd).unwrap();
            }
            vcpus.push(fd);
            cpuids.push(cpuid);
        }
        TestVm { vm, vcpus, cpuids }
    }

    fn fds(&self) -> Vec<&VcpuFd> {
        self.vcpus.iter().collect()
    }

    fn save(&self, caps: &HostCaps) -> KvmState {
        let cpuids: Vec<_> = self.cpuids.iter().map(|c| c.as_slice()).collect();
        kvm_state::save(&self.vm, &self.fds(), &cpuids, caps).unwrap()
    }
}

fn set_msrs(fd: &VcpuFd, msrs: &[(u32, u64)]) {
    let entries: Vec<_> =
        msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    assert_eq!(fd.set_msrs(&Msrs::from_entries(&entries).unwrap()).unwrap(), entries.len());
}

fn get_msr(fd: &VcpuFd, index: u32) -> u64 {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]).unwrap();
    assert_eq!(fd.get_msrs(&mut msrs).unwrap(), 1);
    msrs.as_slice()[0].data
}

/// MSRs KVM lists whose values run on with time like the TSC: Hyper-V's VP runtime
/// (0x4000_0010) and reference time counter (0x4000_0020).
const RUNNING_COUNTERS: [u32; 2] = [0x4000_0010, 0x4000_0020];

fn msr_map(state: &VcpuState) -> BTreeMap<u32, u64> {
    state.msrs.iter().map(|m| (m.index, m.data)).collect()
}

fn lapic_set(lapic: &mut kvm_bindings::kvm_lapic_state, offset: usize, value: u32) {
    for (slot, byte) in lapic.regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *slot = byte as _;
    }
}

/// The state as a file would carry it: through serde and back.
fn through_a_file(state: &KvmState) -> KvmState {
    serde_json::from_slice(&serde_json::to_vec(state).unwrap()).unwrap()
}

/// Whether this host's KVM moves a vCPU's TSC when IA32_TSC is written. Some nested hosts
/// (carve's CI machines) accept the write and keep every guest TSC at the host's.
fn tsc_writes_take(kvm: &Kvm) -> bool {
    let probe = TestVm::new(kvm, 1, true);
    set_msrs(&probe.vcpus[0], &[(MSR_IA32_TSC, SMALL_TSC)]);
    let khz = probe.vcpus[0].get_tsc_khz().unwrap_or(1_000_000) as u64;
    get_msr(&probe.vcpus[0], MSR_IA32_TSC) < SMALL_TSC + khz * 10_000
}

#[test]
fn a_vcpu_reads_back_the_same_after_save_and_restore() {
    if !kvm_usable("a_vcpu_reads_back_the_same_after_save_and_restore") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let source = TestVm::new(&kvm, 1, true);
    let caps = HostCaps::read(&kvm, &source.vm).unwrap();
    eprintln!(
        "host: KVM_CAP_XSAVE2 {} bytes, KVM_CAP_NESTED_STATE {}, KVM_CAP_TSC_CONTROL {}, \
         KVM_CAP_VCPU_ATTRIBUTES {}, KVM_CAP_ADJUST_CLOCK flags {:#x}, {} MSRs listed",
        caps.xsave_size(),
        caps.nested_state_size(),
        caps.tsc_control(),
        caps.vcpu_attributes(),
        caps.clock_flags(),
        caps.msr_index_list().len()
    );
    let fd = &source.vcpus[0];
    let mut regs = fd.get_regs().unwrap();
    (regs.rax, regs.rbx, regs.rsp, regs.rip, regs.rflags) = (0x1111, 0x2222, 0x8000, 0x1000, 0x202);
    fd.set_regs(&regs).unwrap();
    let mut sregs = fd.get_sregs().unwrap();
    sregs.cr2 = 0xdead_0000;
    (sregs.gdt.base, sregs.gdt.limit, sregs.idt.base, sregs.idt.limit) = (0x500, 0x1f, 0x520, 0x7ff);
    fd.set_sregs(&sregs).unwrap();
    let mut debug = fd.get_debug_regs().unwrap();
    debug.db[0] = 0x1000;
    debug.dr7 = 0x401;
    fd.set_debug_regs(&debug).unwrap();
    let mut lapic = fd.get_lapic().unwrap();
    lapic_set(&mut lapic, APIC_TPR, 0x20);
    lapic_set(&mut lapic, APIC_LVTT, 0b10 << 17 | 0xec); // TSC-deadline mode, unmasked
    fd.set_lapic(&lapic).unwrap();
    set_msrs(
        fd,
        &[
            (MSR_IA32_TSC, SMALL_TSC),
            (MSR_IA32_SYSENTER_CS, 0x10),
            (MSR_IA32_SYSENTER_ESP, 0x7000),
            (MSR_LSTAR, 0xffff_ffff_8100_0000),
            (MSR_KERNEL_GS_BASE, 0xffff_8880_0000_1000),
        ],
    );
    let deadline = get_msr(fd, MSR_IA32_TSC) + (1 << 40);
    set_msrs(fd, &[(MSR_IA32_TSC_DEADLINE, deadline)]);

    let saved = through_a_file(&source.save(&caps));
    let target = TestVm::new(&kvm, 1, false);
    let restored = kvm_state::restore(&target.vm, &target.fds(), &saved, TimePolicy::Frozen, &caps).unwrap();
    assert_eq!(restored.clock.applied, ClockApplied::Frozen);
    assert_eq!(restored.skipped_msrs, Vec::<(usize, u32)>::new(), "no MSR refused");
    let again = target.save(&caps);
    let (before, after) = (&saved.vcpus[0], &again.vcpus[0]);

    assert_eq!(after.regs, before.regs);
    assert_eq!((after.regs.rax, after.regs.rip), (0x1111, 0x1000));
    assert_eq!(after.sregs, before.sregs);
    assert_eq!(after.sregs.cr2, 0xdead_0000);
    assert_eq!(after.debug_regs, before.debug_regs);
    assert_eq!(after.xcrs, before.xcrs);
    assert_eq!(after.xsave, before.xsave);
    assert_eq!(after.mp_state, before.mp_state);
    assert_eq!(after.events, before.events);
    let readback = |fd: &VcpuFd| fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
    assert_eq!(readback(&target.vcpus[0]), readback(&source.vcpus[0]), "KVM holds the same CPUID");
    let lapic_regs = |s: &VcpuState| {
        let mut regs = s.lapic.regs;
        regs[APIC_TMCCT..APIC_TMCCT + 4].fill(0); // the timer's current count runs on
        regs
    };
    assert_eq!(lapic_regs(after), lapic_regs(before));
    assert_eq!(after.lapic.regs[APIC_TPR], 0x20);

    let (mut msrs_before, mut msrs_after) = (msr_map(before), msr_map(after));
    let (tsc_saved, tsc_restored) = (msrs_before.remove(&MSR_IA32_TSC), msrs_after.remove(&MSR_IA32_TSC));
    for counter in RUNNING_COUNTERS {
        msrs_before.remove(&counter);
        msrs_after.remove(&counter);
    }
    assert_eq!(msrs_after, msrs_before, "every MSR but the running TSC and counters");
    assert_eq!(msrs_after[&MSR_KERNEL_GS_BASE], 0xffff_8880_0000_1000);
    let (tsc_saved, tsc_restored) = (tsc_saved.unwrap(), tsc_restored.unwrap());
    assert!(tsc_restored >= tsc_saved, "the TSC continues: {tsc_restored} < {tsc_saved}");
    let khz = before.tsc_khz.unwrap_or(1_000_000) as u64;
    if tsc_writes_take(&kvm) {
        assert!(tsc_saved < SMALL_TSC + khz * 1000, "saved the small TSC set: {tsc_saved}");
        assert!(tsc_restored - tsc_saved < khz * 1000, "restored TSC {tsc_restored} is not near {tsc_saved}");
        eprintln!("TSC: saved {tsc_saved}, {} ticks later after restore", tsc_restored - tsc_saved);
    } else {
        eprintln!(
            "NOTE: this host's KVM ignores IA32_TSC writes (every guest TSC reads the host's, {tsc_saved} \
             here), so whether the TSC continues from its saved value cannot be seen on it"
        );
    }
    if msrs_before[&MSR_IA32_TSC_DEADLINE] != 0 {
        assert_eq!(msrs_after[&MSR_IA32_TSC_DEADLINE], deadline, "the armed deadline survives");
    } else {
        eprintln!("NOTE: this host's KVM did not keep the TSC deadline; not compared");
    }
}

fn poke(chip: &kvm_irqchip, offset: usize, bytes: &[u8]) -> kvm_irqchip {
    let mut value = serde_json::to_value(chip).unwrap();
    let array = value.as_array_mut().unwrap();
    for (i, byte) in bytes.iter().enumerate() {
        array[offset + i] = (*byte).into();
    }
    serde_json::from_value(value).unwrap()
}

fn peek(chip: &kvm_irqchip, offset: usize, len: usize) -> Vec<u8> {
    let bytes: Vec<u8> = serde_json::from_value(serde_json::to_value(chip).unwrap()).unwrap();
    bytes[offset..offset + len].to_vec()
}

// Offsets in kvm_irqchip: chip_id and pad, then the chip. kvm_pic_state: last_irr, irr, imr,
// isr, priority_add, irq_base. kvm_ioapic_state: base_address, ioregsel, id, irr, pad, redirtbl.
const PIC_IMR: usize = 8 + 2;
const PIC_IRQ_BASE: usize = 8 + 5;
const IOAPIC_ID: usize = 8 + 12;
const IOAPIC_REDIR_4: usize = 8 + 24 + 4 * 8;

#[test]
fn irqchips_and_pit_read_back_the_same_after_save_and_restore() {
    if !kvm_usable("irqchips_and_pit_read_back_the_same_after_save_and_restore") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let source = TestVm::new(&kvm, 1, true);
    let caps = HostCaps::read(&kvm, &source.vm).unwrap();
    let chip = |vm: &VmFd, chip_id| {
        let mut chip = kvm_irqchip { chip_id, ..Default::default() };
        vm.get_irqchip(&mut chip).unwrap();
        chip
    };
    let master = poke(&chip(&source.vm, 0), PIC_IMR, &[0xfa]);
    let master = poke(&master, PIC_IRQ_BASE, &[0x20]);
    source.vm.set_irqchip(&master).unwrap();
    let slave = poke(&chip(&source.vm, 1), PIC_IRQ_BASE, &[0x28]);
    source.vm.set_irqchip(&slave).unwrap();
    let redirection = (0x24u64 | 1 << 16 | 1 << 15).to_le_bytes(); // vector 0x24, masked, level
    let ioapic = poke(&chip(&source.vm, 2), IOAPIC_REDIR_4, &redirection);
    let ioapic = poke(&ioapic, IOAPIC_ID, &[3, 0, 0, 0]);
    source.vm.set_irqchip(&ioapic).unwrap();
    let mut pit = source.vm.get_pit2().unwrap();
    (pit.channels[0].count, pit.channels[0].mode, pit.channels[0].rw_mode) = (0x1234, 2, 3);
    (pit.channels[2].count, pit.channels[2].gate) = (0x42, 1);
    source.vm.set_pit2(&pit).unwrap();

    let saved = through_a_file(&source.save(&caps));
    let target = TestVm::new(&kvm, 1, false);
    kvm_state::restore(&target.vm, &target.fds(), &saved, TimePolicy::Frozen, &caps).unwrap();
    let again = kvm_state::save_vm(&target.vm).unwrap();

    for (what, before, after, offset, len) in [
        ("PIC master IMR and IRQ base", &saved.vm.pic_master, &again.pic_master, PIC_IMR, 4),
        ("PIC slave", &saved.vm.pic_slave, &again.pic_slave, 8, 16),
        ("IOAPIC ID", &saved.vm.ioapic, &again.ioapic, IOAPIC_ID, 4),
        ("IOAPIC redirection table", &saved.vm.ioapic, &again.ioapic, IOAPIC_REDIR_4 - 32, 24 * 8),
    ] {
        assert_eq!(peek(after, offset, len), peek(before, offset, len), "{what}");
    }
    assert_eq!(peek(&again.pic_master, PIC_IRQ_BASE, 1), [0x20]);
    assert_eq!(peek(&again.ioapic, IOAPIC_REDIR_4, 8), redirection);
    for (i, (before, after)) in saved.vm.pit.channels.iter().zip(&again.pit.channels).enumerate() {
        let fields = |c: &kvm_bindings::kvm_pit_channel_state| (c.count, c.mode, c.rw_mode, c.gate, c.bcd);
        assert_eq!(fields(after), fields(before), "PIT channel {i}");
    }
    assert_eq!(again.pit.channels[0].count, 0x1234);
    assert_eq!(again.pit.flags, saved.vm.pit.flags);
}

#[test]
fn the_clock_stays_frozen_or_moves_with_the_wall_clock() {
    if !kvm_usable("the_clock_stays_frozen_or_moves_with_the_wall_clock") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let source = TestVm::new(&kvm, 1, true);
    let caps = HostCaps::read(&kvm, &source.vm).unwrap();
    let saved = kvm_state::save_vm(&source.vm).unwrap();
    let saved_at = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let slack = 150_000_000; // ns: VM creation and the ioctls in between

    let frozen = TestVm::new(&kvm, 1, false);
    let restored = kvm_state::restore_vm(&frozen.vm, &saved, TimePolicy::Frozen, &caps).unwrap();
    let clock = frozen.vm.get_clock().unwrap().clock;
    assert_eq!(restored.applied, ClockApplied::Frozen);
    assert!(
        clock >= saved.clock.clock && clock - saved.clock.clock < slack,
        "frozen: {clock} vs {}",
        saved.clock.clock
    );

    let moved = TestVm::new(&kvm, 1, false);
    let restored = kvm_state::restore_vm(&moved.vm, &saved, TimePolicy::HostElapsed, &caps).unwrap();
    let clock = moved.vm.get_clock().unwrap().clock;
    let elapsed = saved_at.elapsed().as_nanos() as u64;
    eprintln!(
        "clock: saved with flags {:#x}; HostElapsed applied {:?}, advanced {} ms over {} ms of wall time",
        saved.clock.flags,
        restored.applied,
        restored.advanced_ns / 1_000_000,
        elapsed / 1_000_000
    );
    assert!(matches!(restored.applied, ClockApplied::KvmRealtime | ClockApplied::CarveRealtime));
    let advanced = clock - saved.clock.clock;
    assert!(advanced >= 300_000_000, "advanced only {advanced} ns");
    assert!(advanced < elapsed + slack, "advanced {advanced} ns over {elapsed} ns");
}

#[test]
fn host_elapsed_moves_the_tsc_with_the_clock() {
    if !kvm_usable("host_elapsed_moves_the_tsc_with_the_clock") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let source = TestVm::new(&kvm, 1, true);
    let caps = HostCaps::read(&kvm, &source.vm).unwrap();
    set_msrs(&source.vcpus[0], &[(MSR_IA32_TSC, SMALL_TSC)]);
    let saved = source.save(&caps);
    std::thread::sleep(Duration::from_millis(200));
    let target = TestVm::new(&kvm, 1, false);
    let restored =
        kvm_state::restore(&target.vm, &target.fds(), &saved, TimePolicy::HostElapsed, &caps).unwrap();
    let tsc_saved = msr_map(&saved.vcpus[0])[&MSR_IA32_TSC];
    let tsc_now = get_msr(&target.vcpus[0], MSR_IA32_TSC);
    let khz = saved.vcpus[0].tsc_khz.unwrap_or(1_000_000) as u64;
    assert!(restored.clock.advanced_ns >= 200_000_000);
    if tsc_writes_take(&kvm) {
        let moved_ms = (tsc_now - tsc_saved) / khz;
        assert!(
            (200..1000).contains(&moved_ms),
            "the TSC moved {moved_ms} ms, the clock {} ms",
            restored.clock.advanced_ns / 1_000_000
        );
    } else {
        assert!(tsc_now >= tsc_saved);
        eprintln!("NOTE: this host's KVM ignores IA32_TSC writes; the TSC advance cannot be seen on it");
    }
}

#[test]
fn vcpus_restored_together_share_one_tsc_offset() {
    if !kvm_usable("vcpus_restored_together_share_one_tsc_offset") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let source = TestVm::new(&kvm, 2, true);
    let caps = HostCaps::read(&kvm, &source.vm).unwrap();
    for fd in &source.vcpus {
        set_msrs(fd, &[(MSR_IA32_TSC, SMALL_TSC)]);
    }
    let saved = through_a_file(&source.save(&caps));
    let target = TestVm::new(&kvm, 2, false);
    let restored = kvm_state::restore(&target.vm, &target.fds(), &saved, TimePolicy::Frozen, &caps).unwrap();
    let again = target.save(&caps);
    // Where the host's own TSC is unstable (the emulated KVM host's is), KVM recomputes a
    // vCPU's offset each time the vCPU is loaded, so that its TSC goes on from where it last
    // stopped: an offset set is not the offset read back, and two reads differ. There only the
    // TSCs themselves can be compared (below).
    let offsets_move = target.save(&caps).vcpus[0].tsc_offset != again.vcpus[0].tsc_offset;
    match restored.tsc {
        TscSync::Synced { .. } if offsets_move => {
            eprintln!("NOTE: this host's KVM recomputes TSC offsets on every vCPU load (unstable host TSC)");
        }
        TscSync::Synced { offset } => {
            assert_eq!(again.vcpus[0].tsc_offset, Some(offset));
            assert_eq!(again.vcpus[1].tsc_offset, Some(offset), "vCPU 1 has vCPU 0's offset");
            eprintln!("TSC offsets synced through KVM_VCPU_TSC_OFFSET: {offset:#x}");
        }
        TscSync::Unavailable => eprintln!("NOTE: no KVM_VCPU_TSC_OFFSET attribute on this host's vCPUs"),
    }
    let tsc = |s: &VcpuState| msr_map(s)[&MSR_IA32_TSC];
    let khz = saved.vcpus[0].tsc_khz.unwrap_or(1_000_000) as u64;
    // With offsets recomputed on load, each vCPU's TSC stands where its last ioctl left it, so
    // the two differ by the time between those ioctls (milliseconds on the emulated host); both
    // still continue from the saved TSC, far from the host's.
    // (A TSC restored near zero may stand just below zero on such a host: the difference wraps.)
    let apart = (tsc(&again.vcpus[1]).wrapping_sub(tsc(&again.vcpus[0])) as i64).unsigned_abs();
    let bound_ms = if offsets_move { 100 } else { 1 };
    assert!(apart < khz * bound_ms, "vCPUs' TSCs {apart} ticks apart, more than {bound_ms} ms");
    if tsc_writes_take(&kvm) {
        for vcpu in &again.vcpus {
            let near_saved = (tsc(vcpu) as i64) < (SMALL_TSC + khz * 10_000) as i64;
            assert!(near_saved, "the TSCs continue from the saved one: {}", tsc(vcpu));
        }
    }
}

/// A bit of leaf 7.0 EBX this host's KVM does not offer (avx512f and friends on most hosts).
fn unoffered_leaf7_bit(kvm: &Kvm) -> Option<u8> {
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let emulated = kvm.get_emulated_cpuid(KVM_MAX_CPUID_ENTRIES).ok();
    let ebx = |c: &CpuId| c.as_slice().iter().find(|e| e.function == 7 && e.index == 0).map_or(0, |e| e.ebx);
    let offered = ebx(&supported) | emulated.as_ref().map_or(0, ebx);
    (0..32u8).find(|bit| offered & (1 << bit) == 0)
}

#[test]
fn what_the_host_lacks_is_refused_before_anything_is_written() {
    if !kvm_usable("what_the_host_lacks_is_refused_before_anything_is_written") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let source = TestVm::new(&kvm, 1, true);
    let caps = HostCaps::read(&kvm, &source.vm).unwrap();
    let good = source.save(&caps);
    check_host(&caps, &good.vcpus).expect("a snapshot of this host fits this host");

    let mut bad = good.clone();
    let mut expected = Vec::new();
    if let Some(bit) = unoffered_leaf7_bit(&kvm) {
        let leaf7 = bad.vcpus[0].cpuid.iter_mut().find(|e| e.function == 7 && e.index == 0).unwrap();
        leaf7.ebx |= 1 << bit;
        expected.push(format!("CPUID 7.0 EBX bit {bit}"));
    }
    if !caps.msr_index_list().contains(&0xc000_0103) {
        bad.vcpus[0].msrs.push(kvm_state::Msr { index: 0xc000_0103, data: 1 });
        expected.push("MSR 0xc0000103 (TSC_AUX)".into());
    }
    if caps.nested_state_size() == 0 {
        let mut header = vec![0u8; 128];
        header[0..2].copy_from_slice(&0x100u16.to_le_bytes());
        header[2..4].copy_from_slice(&1u16.to_le_bytes());
        header[4..8].copy_from_slice(&128u32.to_le_bytes());
        bad.vcpus[0].nested = Some(header);
        expected.push("nested virtualisation state (no KVM_CAP_NESTED_STATE)".into());
    }
    let target = TestVm::new(&kvm, 1, false);
    let pristine = target.vcpus[0].get_regs().unwrap();
    let error = kvm_state::restore(&target.vm, &target.fds(), &bad, TimePolicy::Frozen, &caps).unwrap_err();
    let text = error.to_string();
    eprintln!("refused: {text}");
    assert!(matches!(error, StateError::Incompatible(_)), "{text}");
    assert!(text.starts_with("this host's KVM lacks what the snapshot's guest uses: "));
    for item in &expected {
        assert!(text.contains(item.as_str()), "{text} should name {item}");
    }
    assert_eq!(text.lines().count(), 1);
    if let StateError::Incompatible(incompatible) = &error {
        assert!(
            incompatible.missing.iter().any(|m| matches!(m, Missing::Msr(0xc000_0103))) || expected.len() < 2
        );
    }

    let mut faster = good.clone();
    let khz = faster.vcpus[0].tsc_khz.unwrap();
    faster.vcpus[0].tsc_khz = Some(khz * 2);
    match kvm_state::restore(&target.vm, &target.fds(), &faster, TimePolicy::Frozen, &caps) {
        Err(error) if !caps.tsc_control() => assert_eq!(
            error.to_string(),
            format!(
                "the snapshot's guest TSC runs at {} kHz, this host's at {khz} kHz, and this host's KVM \
                 cannot scale TSCs (no KVM_CAP_TSC_CONTROL)",
                khz * 2
            )
        ),
        Ok(_) if caps.tsc_control() => {}
        other => panic!("TSC scaling {}: {other:?}", caps.tsc_control()),
    }

    let mut edited = good;
    edited.vcpus[0].xsave.truncate(100);
    let error =
        kvm_state::restore(&target.vm, &target.fds(), &edited, TimePolicy::Frozen, &caps).unwrap_err();
    assert!(error.to_string().contains("vCPU 0 is invalid: its XSAVE area is 400 bytes"), "{error}");

    if !caps.tsc_control() {
        assert_eq!(target.vcpus[0].get_regs().unwrap(), pristine, "nothing was written");
    }
}
