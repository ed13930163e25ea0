//! Unit tests that need no KVM: validation, MSR order, compatibility wording, time arithmetic.

use kvm_bindings::{KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE};

use super::msrs::{may_fail_on_restore, msr_label, restore_order};
use super::time::{plan_clock, same_frequency, ticks, tsc_khz_to_set};
use super::*;

fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
    CpuidEntry { function, index, flags: 0, eax, ebx, ecx, edx }
}

fn caps() -> HostCaps {
    HostCaps {
        xsave_size: 4096,
        xsave2: true,
        nested_state_size: 0,
        tsc_control: false,
        vcpu_attributes: false,
        clock_flags: 0,
        tsc_deadline_timer: true,
        offered_cpuid: vec![
            entry(1, 0, 0, 0, 1 << 0, 1 << 0),                 // sse3; fpu
            entry(7, 0, 0, 1 << 0, 0, 0),                      // fsgsbase
            entry(0xd, 1, 1 << 0, 0, 0, 0),                    // xsaveopt
            entry(0x8000_0001, 0, 0, 0, 0, 1 << 20 | 1 << 29), // nx, lm
        ],
        msr_index_list: vec![0x10, 0x174, 0x6e0],
    }
}

fn msr(index: u32, data: u64) -> Msr {
    Msr { index, data }
}

fn vcpu_state() -> VcpuState {
    VcpuState {
        cpuid: vec![entry(1, 0, 0, 0, 1, 1)],
        regs: kvm_regs { rax: 0x1234, rip: 0xfff0, rflags: 2, ..Default::default() },
        sregs: Default::default(),
        xsave: vec![0; XSAVE_REGION_WORDS],
        xcrs: Default::default(),
        debug_regs: Default::default(),
        lapic: kvm_lapic_state { regs: [0; 1024] },
        mp_state: Default::default(),
        events: Default::default(),
        msrs: vec![msr(0x10, 1000), msr(0x174, 0x10)],
        nested: None,
        tsc_khz: Some(2_000_000),
        tsc_offset: None,
        ssp: None,
    }
}

/// CPUID.(7,0):ECX: bit 7 SHSTK, bit 16 LA57.
const SHSTK: u32 = 1 << 7;
const LA57: u32 = 1 << 16;
const CET_MSRS: [u32; 7] = [0x6a0, 0x6a2, 0x6a4, 0x6a5, 0x6a6, 0x6a7, 0x6a8];
const SGX_LE_HASHES: [u32; 4] = [0x8c, 0x8d, 0x8e, 0x8f];

/// A CET guest (SHSTK; XSS with CET_U and CET_S) that also has SGX launch control: its MSRs in
/// KVM_GET_MSR_INDEX_LIST's order (XSS after the CET MSRs) and its SSP.
fn cet_vcpu_state() -> VcpuState {
    let mut state = vcpu_state();
    state.cpuid.push(entry(7, 0, 0, 0, SHSTK, 0));
    state.msrs = vec![msr(0x10, 1000)];
    state.msrs.extend(SGX_LE_HASHES.iter().map(|&i| msr(i, 0x1111_2222_3333_0000 | u64::from(i))));
    state.msrs.extend([
        msr(0x6a0, 1),                     // U_CET: SH_STK_EN
        msr(0x6a2, 1 << 2 | 1 << 10),      // S_CET: ENDBR_EN, SUPPRESS
        msr(0x6a4, 0xffff_8880_0000_8000), // PL0_SSP
        msr(0x6a5, 0),
        msr(0x6a6, 0),
        msr(0x6a7, 0x7fff_ffff_e000), // PL3_SSP
        msr(0x6a8, 0xffff_8880_0001_0000),
        msr(0x6e0, 5000),
        msr(0xda0, 1 << 11 | 1 << 12), // XSS: CET_U, CET_S
    ]);
    state.ssp = Some(0x7fff_ffff_dff8);
    state
}

fn invalid(state: &VcpuState) -> String {
    validate_vcpu(3, state).expect_err("the state should be refused").to_string()
}

/// A nested-state buffer: `format` 0 VMX / 1 SVM, `len` bytes, its header's size saying `len`.
fn nested(format: u16, flags: u16, len: usize, vmxon_pa: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    bytes[0..2].copy_from_slice(&flags.to_le_bytes());
    bytes[2..4].copy_from_slice(&format.to_le_bytes());
    bytes[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    bytes[8..16].copy_from_slice(&vmxon_pa.to_le_bytes());
    bytes
}

#[test]
fn msr_restore_writes_the_tsc_first_and_the_deadline_last() {
    let saved = [msr(0x6e0, 5000), msr(0x174, 1), msr(0x10, 100), msr(0x3b, 0)];
    let order = restore_order(&saved, 7);
    assert_eq!(order, [msr(0x10, 107), msr(0x174, 1), msr(0x3b, 0), msr(0x6e0, 5000)]);
    assert_eq!(restore_order(&saved, 0)[0], msr(0x10, 100), "no advance: the saved TSC exactly");
}

#[test]
fn msr_restore_writes_xss_before_the_cet_msrs() {
    let order: Vec<u32> = restore_order(&cet_vcpu_state().msrs, 0).iter().map(|m| m.index).collect();
    let mut expected = vec![0x10, 0xda0];
    expected.extend(SGX_LE_HASHES);
    expected.extend(CET_MSRS);
    expected.push(0x6e0);
    assert_eq!(order, expected, "TSC, XSS, the rest as saved (SGX hashes, CET), the deadline");
    let without_xss = [msr(0x6a2, 4), msr(0x10, 1)];
    assert_eq!(restore_order(&without_xss, 0), [msr(0x10, 1), msr(0x6a2, 4)]);
}

#[test]
fn only_performance_monitoring_msrs_may_fail_on_restore() {
    for pmu in [0x345, 0xc1, 0x186, 0x38f, 0xc001_0201, 0xc001_0004] {
        assert!(may_fail_on_restore(pmu), "{pmu:#x}");
    }
    for other in [0x10, 0x6e0, 0x174, 0x10a, 0x480, 0x4b56_4d01, 0xc000_0103] {
        assert!(!may_fail_on_restore(other), "{other:#x}");
    }
}

#[test]
fn a_refused_msr_is_named() {
    let error = StateError::MsrRefused { vcpu: 1, index: 0x6e0, data: 0x5, written: 3, count: 7 };
    assert_eq!(
        error.to_string(),
        "KVM refused to restore vCPU 1's MSR 0x6e0 (IA32_TSC_DEADLINE) to 0x5: KVM_SET_MSRS stopped \
         there, after 3 of the 7 MSRs in its batch, so this host's KVM does not take that value"
    );
    assert_eq!(msr_label(0x1234), "0x1234");
    assert_eq!(msr_label(0x485), "0x485 (a VMX capability MSR)");
}

#[test]
fn nested_state_errors_name_enomem_and_einval() {
    let enomem = StateError::NestedState { vcpu: 2, ioctl: "KVM_SET_NESTED_STATE", errno: libc::ENOMEM };
    let text = enomem.to_string();
    assert!(
        text.starts_with(
            "KVM could not restore vCPU 2's nested virtualisation state (KVM_SET_NESTED_STATE): ENOMEM"
        ),
        "{text}"
    );
    let einval = StateError::NestedState { vcpu: 0, ioctl: "KVM_GET_NESTED_STATE", errno: libc::EINVAL };
    assert!(einval.to_string().contains("could not read vCPU 0's nested virtualisation state"));
    assert!(einval.to_string().contains("EINVAL: KVM does not accept this nested state"));
}

#[test]
fn a_valid_state_passes() {
    validate_vcpu(0, &vcpu_state()).unwrap();
    let mut with_nested = vcpu_state();
    with_nested.nested = Some(nested(1, 0x100, NESTED_HEADER + 4096, 0));
    validate_vcpu(0, &with_nested).unwrap();
}

#[test]
fn bad_sizes_are_refused_before_any_ioctl() {
    let mut state = vcpu_state();
    state.xsave = vec![0; 1000];
    assert_eq!(
        invalid(&state),
        "the saved state of vCPU 3 is invalid: its XSAVE area is 4000 bytes; KVM's is at least 4096 \
         and carve takes at most 65536"
    );
    state.xsave = vec![0; MAX_XSAVE_BYTES / 4 + 1];
    assert!(invalid(&state).contains("XSAVE area is 65540 bytes"));

    let mut state = vcpu_state();
    state.cpuid = vec![entry(1, 0, 0, 0, 0, 0); KVM_MAX_CPUID_ENTRIES + 1];
    assert!(invalid(&state).contains("it has 257 CPUID entries; KVM takes 1 to 256"));
    state.cpuid.clear();
    assert!(invalid(&state).contains("it has 0 CPUID entries"));

    let mut state = vcpu_state();
    state.msrs = (0..MAX_MSRS as u32 + 1).map(|i| msr(i, 0)).collect();
    assert!(invalid(&state).contains("it has 1025 MSRs; carve takes at most 1024"));
    state.msrs = vec![msr(0x10, 1), msr(0x6e0, 0), msr(0x10, 2)];
    assert!(invalid(&state).contains("MSR 0x10 (IA32_TSC) appears twice"));

    let mut state = vcpu_state();
    state.xcrs.nr_xcrs = KVM_MAX_XCRS + 1;
    assert!(invalid(&state).contains("it has 17 XCRs"));

    let mut state = vcpu_state();
    state.tsc_khz = Some(0);
    assert!(invalid(&state).contains("TSC frequency is 0 kHz"));
}

#[test]
fn nested_state_must_match_its_header_and_the_buffer() {
    let mut state = vcpu_state();
    let mut lying = nested(0, 1, NESTED_HEADER + 8192, 0x1000);
    lying[4..8].copy_from_slice(&(NESTED_HEADER as u32 + 4096).to_le_bytes());
    state.nested = Some(lying);
    assert!(invalid(&state).contains("its nested state header says 4224 bytes but 8320 were saved"));

    state.nested = Some(nested(0, 1, 9000, 0x1000));
    assert!(invalid(&state).contains("its nested state is 9000 bytes; KVM's is 128 to 8320"));

    state.nested = Some(vec![0; 64]);
    assert!(invalid(&state).contains("its nested state is 64 bytes"));

    state.nested = Some(nested(7, 0, NESTED_HEADER, 0));
    assert!(invalid(&state).contains("has format 7"));
}

#[test]
fn nested_state_that_says_nothing_is_not_kept() {
    assert!(!nested_in_use(&nested(0, 0, NESTED_HEADER, u64::MAX)), "VMX, no VMXON");
    assert!(nested_in_use(&nested(0, 0, NESTED_HEADER, 0x1000)), "VMX after VMXON");
    assert!(!nested_in_use(&nested(1, KVM_STATE_NESTED_GIF_SET as u16, NESTED_HEADER, 0)), "SVM, GIF set");
    assert!(nested_in_use(&nested(1, 0, NESTED_HEADER, 0)), "SVM with GIF clear");
    assert!(nested_in_use(&nested(1, 0x101, NESTED_HEADER + 4096, 0)), "SVM in guest mode");
}

#[test]
fn irqchips_must_be_the_chips_they_claim() {
    let chip = |chip_id| kvm_irqchip { chip_id, ..Default::default() };
    let mut vm = VmState {
        pic_master: chip(0),
        pic_slave: chip(1),
        ioapic: chip(2),
        pit: Default::default(),
        clock: Default::default(),
        saved_at_realtime_ns: None,
    };
    validate_vm(&vm).unwrap();
    vm.pic_slave.chip_id = 2;
    assert_eq!(
        validate_vm(&vm).unwrap_err().to_string(),
        "the saved VM state is invalid: the PIC slave state is for irqchip 2 instead of 1"
    );
}

#[test]
fn kvm_structs_in_a_state_file_must_have_their_exact_size() {
    let state = vcpu_state();
    let json = serde_json::to_value(&state).unwrap();
    let back: VcpuState = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back.regs, state.regs);
    assert_eq!(back.msrs, state.msrs);

    let mut short = json.clone();
    short["lapic"].as_array_mut().unwrap().pop();
    let error = serde_json::from_value::<VcpuState>(short).unwrap_err().to_string();
    assert!(error.contains("invalid length 1023, expected exactly 1024 bytes"), "{error}");

    let mut long = json;
    long["regs"].as_array_mut().unwrap().push(0.into());
    let error = serde_json::from_value::<VcpuState>(long).unwrap_err().to_string();
    assert!(error.contains("expected exactly 144 bytes"), "{error}");
}

#[test]
fn compatibility_names_everything_the_host_lacks_in_one_line() {
    let mut state = vcpu_state();
    state.cpuid = vec![
        // sse3 + the bits a VMM or KVM sets (TSC deadline, OSXSAVE, hypervisor); fpu + HTT.
        entry(1, 0, 0, 0, 1 | 1 << 24 | 1 << 27 | 1 << 31, 1 | 1 << 28),
        entry(7, 0, 0, 1 | 1 << 3 | 1 << 5, 1 << 4, 0), // fsgsbase, bmi1, avx2; OSPKE
        entry(7, 1, 0, 0xffff, 0, 0),                   // subleaf 1 is not compared
        entry(0xd, 1, 1 | 1 << 3, 0, 0, 0),             // xsaveopt, xsaves
        entry(0x8000_0001, 0, 0, 0, 0, 1 << 20 | 1 << 27 | 1 << 29), // nx, rdtscp, lm
    ];
    state.msrs = vec![msr(0x10, 0), msr(0xc000_0103, 0)];
    state.nested = Some(nested(1, 0, NESTED_HEADER, 0));
    let error = check_host(&caps(), &[state.clone(), state]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "this host's KVM lacks what the snapshot's guest uses: CPUID 7.0 EBX bit 3 (bmi1), CPUID 7.0 \
         EBX bit 5 (avx2), CPUID 0xd.1 EAX bit 3 (xsaves), CPUID 0x80000001 EDX bit 27 (rdtscp), MSR \
         0xc0000103 (TSC_AUX), nested virtualisation state (no KVM_CAP_NESTED_STATE)"
    );
    assert_eq!(
        StateError::from(error).to_string().lines().count(),
        1,
        "one line, however many vCPUs repeat it"
    );
}

#[test]
fn compatibility_accepts_what_the_host_offers() {
    let mut state = vcpu_state();
    state.cpuid = vec![entry(1, 0, 0, 0, 1 | 1 << 31, 1), entry(0x8000_0001, 0, 0, 0, 0, 1 << 29)];
    state.msrs = vec![msr(0x10, 0), msr(0x6e0, 0)];
    check_host(&caps(), &[state.clone()]).unwrap();

    let mut no_deadline_timer = caps();
    no_deadline_timer.tsc_deadline_timer = false;
    state.cpuid[0].ecx |= 1 << 24;
    let error = check_host(&no_deadline_timer, &[state]).unwrap_err();
    assert_eq!(error.missing, [Missing::Cpuid { leaf: 1, subleaf: None, register: Register::Ecx, bit: 24 }]);
    assert!(error.to_string().ends_with("CPUID 1 ECX bit 24 (tsc_deadline_timer)"));
}

#[test]
fn xsave_state_beyond_the_hosts_area_is_incompatible() {
    let mut state = vcpu_state();
    state.xsave = vec![0; 2816]; // an 11 KiB AMX-sized area
    check_host(&caps(), &[state.clone()]).unwrap();
    state.xsave[2000] = 1;
    assert_eq!(
        check_host(&caps(), &[state]).unwrap_err().to_string(),
        "this host's KVM lacks what the snapshot's guest uses: XSAVE state beyond byte 4096 (the \
         snapshot's area is 11264 bytes, KVM_CAP_XSAVE2 here 4096)"
    );
}

#[test]
fn tsc_frequencies_within_250_ppm_are_the_same() {
    assert!(same_frequency(2_000_000, 2_000_500)); // 250 ppm
    assert!(same_frequency(2_000_000, 1_999_600));
    assert!(!same_frequency(2_000_000, 2_000_501));
    assert_eq!(tsc_khz_to_set(0, Some(2_000_000), Some(2_000_300), false).unwrap(), None);
    assert_eq!(tsc_khz_to_set(0, Some(2_000_000), Some(2_600_000), true).unwrap(), Some(2_000_000));
    assert_eq!(tsc_khz_to_set(0, None, Some(2_600_000), false).unwrap(), None);
    assert_eq!(tsc_khz_to_set(0, Some(2_000_000), None, false).unwrap(), None);
    assert_eq!(
        tsc_khz_to_set(1, Some(2_000_000), Some(2_600_000), false).unwrap_err().to_string(),
        "the snapshot's guest TSC runs at 2000000 kHz, this host's at 2600000 kHz, and this host's \
         KVM cannot scale TSCs (no KVM_CAP_TSC_CONTROL)"
    );
}

#[test]
fn elapsed_time_becomes_tsc_ticks() {
    assert_eq!(ticks(1_000_000_000, 2_000_000), 2_000_000_000);
    assert_eq!(ticks(1, 2_445_428), 2);
    assert_eq!(ticks(u64::MAX, u32::MAX), u64::MAX, "saturates");
}

#[test]
fn the_clock_follows_the_time_policy() {
    let saved = kvm_clock_data {
        clock: 5_000_000_000,
        flags: KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC,
        realtime: 1_000_000_000_000,
        host_tsc: 77,
        ..Default::default()
    };
    let now = saved.realtime + 3_000_000_000;
    let all_flags = KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC;

    let (data, restored) = plan_clock(&saved, Some(saved.realtime + 10), TimePolicy::Frozen, all_flags, now);
    assert_eq!((data.clock, data.flags), (saved.clock, 0), "frozen: as saved, source flags dropped");
    assert_eq!(restored, ClockRestored { applied: ClockApplied::Frozen, advanced_ns: 0 });

    let (data, restored) =
        plan_clock(&saved, Some(saved.realtime + 10), TimePolicy::HostElapsed, all_flags, now);
    assert_eq!((data.clock, data.flags, data.realtime), (saved.clock, KVM_CLOCK_REALTIME, saved.realtime));
    assert_eq!(restored, ClockRestored { applied: ClockApplied::KvmRealtime, advanced_ns: 3_000_000_000 });

    // KVM gave no realtime at the save (no master clock): carve's own reading serves.
    let no_pair = kvm_clock_data { flags: 0, realtime: 0, ..saved };
    let at = saved.realtime + 1_000_000_000;
    let (data, restored) = plan_clock(&no_pair, Some(at), TimePolicy::HostElapsed, all_flags, now);
    assert_eq!((data.clock, data.flags), (saved.clock + 2_000_000_000, 0));
    assert_eq!(restored, ClockRestored { applied: ClockApplied::CarveRealtime, advanced_ns: 2_000_000_000 });

    // This host's KVM cannot take KVM_CLOCK_REALTIME: the same, computed by carve.
    let (data, restored) = plan_clock(&saved, Some(at), TimePolicy::HostElapsed, KVM_CLOCK_TSC_STABLE, now);
    assert_eq!(
        (data.clock, data.flags, restored.applied),
        (saved.clock + 2_000_000_000, 0, ClockApplied::CarveRealtime)
    );

    // A wall clock behind the save, or no reading at all: as saved, and said so.
    for at in [Some(now + 1), None] {
        let (data, restored) = plan_clock(&no_pair, at, TimePolicy::HostElapsed, all_flags, now);
        assert_eq!((data.clock, data.flags), (saved.clock, 0));
        assert_eq!(restored, ClockRestored { applied: ClockApplied::NoWallClock, advanced_ns: 0 });
    }
}

fn lapic_with_lvtt(lvtt: u32) -> kvm_lapic_state {
    let mut lapic = kvm_lapic_state { regs: [0; 1024] };
    for (slot, byte) in lapic.regs[APIC_LVTT..APIC_LVTT + 4].iter_mut().zip(lvtt.to_le_bytes()) {
        *slot = byte as _;
    }
    lapic
}

#[test]
fn an_expired_deadline_timer_fires_again_after_restore() {
    const DEADLINE_MODE: u32 = 0b10 << 17;
    let saved = || vec![msr(0x10, 1234), msr(0x6e0, 0)];

    let mut msrs = saved();
    fix_zero_tsc_deadline(&mut msrs, &lapic_with_lvtt(DEADLINE_MODE | 0xec));
    assert_eq!(msrs[1], msr(0x6e0, 1234));

    let mut msrs = saved();
    fix_zero_tsc_deadline(&mut msrs, &lapic_with_lvtt(DEADLINE_MODE | 1 << 16 | 0xec));
    assert_eq!(msrs[1], msr(0x6e0, 0), "masked timer: nothing to fire");

    let mut msrs = saved();
    fix_zero_tsc_deadline(&mut msrs, &lapic_with_lvtt(0xec));
    assert_eq!(msrs[1], msr(0x6e0, 0), "one-shot mode: the deadline MSR means nothing");

    let mut lapic = lapic_with_lvtt(DEADLINE_MODE | 0xec);
    let irr_word = APIC_IRR + (0xec / 32) * 0x10;
    lapic.regs[irr_word + (0xec % 32) / 8] = (1u8 << (0xec % 8)) as _;
    let mut msrs = saved();
    fix_zero_tsc_deadline(&mut msrs, &lapic);
    assert_eq!(msrs[1], msr(0x6e0, 0), "the interrupt is already pending in the LAPIC");
}

fn vm_state() -> VmState {
    let chip = |chip_id| kvm_irqchip { chip_id, ..Default::default() };
    VmState {
        pic_master: chip(0),
        pic_slave: chip(1),
        ioapic: chip(2),
        pit: Default::default(),
        clock: Default::default(),
        saved_at_realtime_ns: Some(1),
    }
}

#[test]
fn cet_and_sgx_state_round_trips_through_the_snapshot_file() {
    let state = KvmState { vm: vm_state(), vcpus: vec![cet_vcpu_state(), vcpu_state()] };
    let bytes = carve_snapshot::file::encode(&state).unwrap();
    let back: KvmState = carve_snapshot::file::decode(&bytes).unwrap();
    for (back, saved) in back.vcpus.iter().zip(&state.vcpus) {
        assert_eq!(back.msrs, saved.msrs);
        assert_eq!(back.ssp, saved.ssp);
        assert_eq!(back.cpuid, saved.cpuid);
    }
    assert_eq!(carve_snapshot::file::encode(&back).unwrap(), bytes, "nothing else changed either");
    validate_vcpu(0, &back.vcpus[0]).unwrap();
}

/// `VcpuState` as carve wrote it before the SSP was saved.
#[derive(Serialize)]
struct VcpuStateWithoutSsp<'a> {
    cpuid: &'a [CpuidEntry],
    regs: &'a kvm_regs,
    sregs: &'a kvm_sregs,
    xsave: &'a [u32],
    xcrs: &'a kvm_xcrs,
    debug_regs: &'a kvm_debugregs,
    lapic: &'a kvm_lapic_state,
    mp_state: &'a kvm_mp_state,
    events: &'a kvm_vcpu_events,
    msrs: &'a [Msr],
    nested: &'a Option<Vec<u8>>,
    tsc_khz: Option<u32>,
    tsc_offset: Option<u64>,
}

#[test]
fn a_state_file_from_before_the_ssp_still_decodes() {
    #[derive(Serialize)]
    struct KvmStateWithoutSsp<'a> {
        vm: &'a VmState,
        vcpus: Vec<VcpuStateWithoutSsp<'a>>,
    }
    let (vm, vcpu) = (vm_state(), cet_vcpu_state());
    let old = KvmStateWithoutSsp {
        vm: &vm,
        vcpus: vec![VcpuStateWithoutSsp {
            cpuid: &vcpu.cpuid,
            regs: &vcpu.regs,
            sregs: &vcpu.sregs,
            xsave: &vcpu.xsave,
            xcrs: &vcpu.xcrs,
            debug_regs: &vcpu.debug_regs,
            lapic: &vcpu.lapic,
            mp_state: &vcpu.mp_state,
            events: &vcpu.events,
            msrs: &vcpu.msrs,
            nested: &vcpu.nested,
            tsc_khz: vcpu.tsc_khz,
            tsc_offset: vcpu.tsc_offset,
        }],
    };
    let back: KvmState = carve_snapshot::file::decode(&carve_snapshot::file::encode(&old).unwrap()).unwrap();
    assert_eq!(back.vcpus[0].ssp, None);
    assert_eq!(back.vcpus[0].msrs, vcpu.msrs);
    validate_vcpu(0, &back.vcpus[0]).unwrap();
}

#[test]
fn a_saved_ssp_must_be_one_kvm_takes() {
    validate_vcpu(0, &cet_vcpu_state()).unwrap();
    let mut state = cet_vcpu_state();
    state.ssp = Some(0xffff_8880_0000_7ff8);
    validate_vcpu(0, &state).unwrap();

    state.ssp = Some(0x7fff_ffff_dffa);
    assert_eq!(
        invalid(&state),
        "the saved state of vCPU 3 is invalid: its shadow-stack pointer 0x7fffffffdffa is not 4-byte \
         aligned"
    );
    state.ssp = Some(0x0000_8000_0000_0000);
    assert_eq!(
        invalid(&state),
        "the saved state of vCPU 3 is invalid: its shadow-stack pointer 0x800000000000 is not \
         canonical for 48-bit linear addresses"
    );
    state.cpuid[1].ecx |= LA57;
    validate_vcpu(0, &state).unwrap();
    state.ssp = Some(0x0100_0000_0000_0000);
    assert!(invalid(&state).contains("is not canonical for 57-bit linear addresses"));

    let mut state = cet_vcpu_state();
    state.cpuid[1].ecx &= !SHSTK;
    assert_eq!(
        invalid(&state),
        "the saved state of vCPU 3 is invalid: its shadow-stack pointer 0x7fffffffdff8 is saved but \
         its CPUID lacks CET shadow stacks (CPUID 7.0 ECX bit 7), so KVM has no SSP to restore"
    );
}

#[test]
fn the_ssp_is_kvm_reg_guest_ssp() {
    assert_eq!(cet::GUEST_SSP_REG, 0x2030_0003_0000_0000);
    let error = StateError::OneReg {
        vcpu: 1,
        ioctl: "KVM_GET_ONE_REG",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    };
    assert_eq!(
        error.to_string(),
        "KVM could not read vCPU 1's shadow-stack pointer (KVM_GET_ONE_REG, register KVM_REG_GUEST_SSP \
         0x2030000300000000): EINVAL: this KVM has no SSP for the vCPU (x86 KVM_GET/SET_ONE_REG needs \
         Linux 6.18, and the SSP needs SHSTK in the vCPU's CPUID) or refuses the value"
    );
    let error =
        StateError::OneReg { vcpu: 0, ioctl: "KVM_SET_ONE_REG", source: kvm_ioctls::Error::new(libc::EIO) };
    assert!(error.to_string().starts_with("KVM could not restore vCPU 0's shadow-stack pointer"));
    assert!(has_shstk(&[kvm_cpuid_entry2 { function: 7, ecx: SHSTK, ..Default::default() }]));
    assert!(!has_shstk(&[kvm_cpuid_entry2 { function: 7, index: 1, ecx: SHSTK, ..Default::default() }]));
}

#[test]
fn compatibility_names_cet_a_host_lacks() {
    let state = cet_vcpu_state();
    let error = check_host(&caps(), &[state.clone(), state.clone()]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "this host's KVM lacks what the snapshot's guest uses: CET shadow stacks (CPUID 7.0 ECX bit 7), \
         MSR 0x8c (IA32_SGXLEPUBKEYHASH0), MSR 0x8d (IA32_SGXLEPUBKEYHASH1), MSR 0x8e \
         (IA32_SGXLEPUBKEYHASH2), MSR 0x8f (IA32_SGXLEPUBKEYHASH3), MSR 0x6a0 (IA32_U_CET), MSR 0x6a2 \
         (IA32_S_CET), MSR 0x6a4 (IA32_PL0_SSP), MSR 0x6a5 (IA32_PL1_SSP), MSR 0x6a6 (IA32_PL2_SSP), \
         MSR 0x6a7 (IA32_PL3_SSP), MSR 0x6a8 (IA32_INT_SSP_TAB), MSR 0xda0 (IA32_XSS)"
    );

    // Without a saved SSP (an older carve's file) the bit is named as any other.
    let mut older = state.clone();
    older.ssp = None;
    let error = check_host(&caps(), &[older]).unwrap_err();
    assert_eq!(
        error.missing[0],
        Missing::Cpuid { leaf: 7, subleaf: Some(0), register: Register::Ecx, bit: 7 }
    );
    assert!(error.to_string().contains("CPUID 7.0 ECX bit 7 (cet_ss)"), "{error}");

    let mut cet_host = caps();
    cet_host.offered_cpuid[1].ecx |= SHSTK;
    cet_host.msr_index_list.extend(SGX_LE_HASHES.iter().chain(&CET_MSRS).chain(&[0xda0]));
    check_host(&cet_host, std::slice::from_ref(&state)).unwrap();
    cet_host.msr_index_list.retain(|&i| i != 0x6a8);
    assert_eq!(check_host(&cet_host, &[state]).unwrap_err().missing, [Missing::Msr(0x6a8)]);
}

#[test]
fn a_migration_checks_the_cpuid_alone_against_a_narrowed_host() {
    let guest = [entry(1, 0, 0, 0, 1 | 1 << 31, 1), entry(7, 0, 0, 1, 0, 0)]; // sse3 hypervisor; fpu; fsgsbase
    assert_eq!(check_cpuid(&caps(), None, &guest), Ok(()), "the hypervisor bit is carve's own");
    let template = crate::cpuid::CpuTemplate::from_json(
        r#"{"name":"t","description":"","remove_leaves":[{"leaf":"0x7","feature":"leaf 7"}],
            "clear_bits":[{"leaf":"0x1","register":"edx","bit":0,"feature":"fpu"}]}"#,
    )
    .unwrap();
    let missing = check_cpuid(&caps(), Some(&template), &guest).unwrap_err().missing;
    let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
    assert_eq!(names, ["CPUID 1 EDX bit 0 (fpu)", "CPUID 7.0 EBX bit 0 (fsgsbase)"]);
}
