//! Table-driven: each case breaks one rule (or shows a state the rule allows) and lists the
//! rules expected with and without unrestricted guest.

use std::collections::BTreeSet;

use super::*;

const CODE64: u32 = 0xa09b;
const CODE32: u32 = 0xc09b;
const DATA: u32 = 0xc093;
const USER_CODE64: u32 = 0xa0fb;
const USER_DATA: u32 = 0xc0f3;
const TSS_BUSY: u32 = 0x8b;
const LDT: u32 = 0x82;
const V86: u32 = 0xf3;
const NONCANONICAL: u64 = 0x0000_8000_0000_0000;

fn seg(selector: u16, base: u64, limit: u32, access_rights: u32) -> Segment {
    Segment { selector, base, limit, access_rights }
}

fn with_segments(code: Segment, data: Segment, tr: Segment, ldt: Segment) -> GuestState {
    GuestState {
        cs: code,
        ss: data,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        tr,
        ldt,
        gdt: DescriptorTable { base: 0x500, limit: 0x27 },
        idt: DescriptorTable { base: 0x520, limit: 7 },
        rflags: 2,
        ..Default::default()
    }
}

/// carve's Linux 64-bit entry state.
fn long64() -> GuestState {
    let mut state = with_segments(
        seg(0x10, 0, 0xffff_ffff, CODE64),
        seg(0x18, 0, 0xffff_ffff, DATA),
        seg(0x20, 0, 0x67, TSS_BUSY),
        seg(0, 0, 0, ar::UNUSABLE),
    );
    (state.cr0, state.cr3, state.cr4, state.efer) = (0x8000_0011, 0x9000, 0x20, 0x500);
    state
}

/// 64-bit ring 3.
fn user64() -> GuestState {
    let mut state = long64();
    state.cs = seg(0x33, 0, 0xffff_ffff, USER_CODE64);
    for data in [&mut state.ss, &mut state.ds, &mut state.es] {
        *data = seg(0x2b, 0, 0xffff_ffff, USER_DATA);
    }
    state
}

/// carve's PVH/multiboot entry: flat 32-bit protected mode, paging off.
fn prot32() -> GuestState {
    let mut state = long64();
    state.cs.access_rights = CODE32;
    (state.cr0, state.cr3, state.cr4, state.efer) = (0x11, 0, 0, 0);
    state
}

/// The processor's reset state.
fn real() -> GuestState {
    let mut state = with_segments(
        seg(0xf000, 0xffff_0000, 0xffff, 0x9b),
        seg(0, 0, 0xffff, 0x93),
        seg(0, 0, 0xffff, TSS_BUSY),
        seg(0, 0, 0xffff, LDT),
    );
    state.cr0 = 0x6000_0010;
    state
}

/// A CET guest in long mode: CR4.CET with CR0.WP, supervisor IBT (ENDBR_EN), SSP in its stack.
fn cet64() -> GuestState {
    let mut state = long64();
    state.cr0 |= 1 << 16;
    state.cr4 |= 1 << 23;
    state.cet =
        Some(CetState { s_cet: 1 << 2, ssp: 0x7fff_ffff_eff8, interrupt_ssp_table: 0xffff_8880_0001_0000 });
    state
}

/// A CET guest in 32-bit protected mode, paging off.
fn cet32() -> GuestState {
    let mut state = prot32();
    state.cr0 |= 1 << 16;
    state.cet = Some(CetState { s_cet: 1, ssp: 0xffff_fff8, interrupt_ssp_table: 0 });
    state
}

fn cet(state: &mut GuestState) -> &mut CetState {
    state.cet.as_mut().expect("a CET state")
}

fn v8086() -> GuestState {
    let mut state = with_segments(
        seg(0x1000, 0x10000, 0xffff, V86),
        seg(0x2000, 0x20000, 0xffff, V86),
        seg(0x20, 0x1000, 0x2067, TSS_BUSY),
        seg(0, 0, 0, ar::UNUSABLE),
    );
    (state.cr0, state.cr3, state.rflags) = (0x8000_0011, 0x9000, 0x2_0002);
    state
}

struct Case {
    name: &'static str,
    base: fn() -> GuestState,
    change: fn(&mut GuestState),
    /// Rules broken with unrestricted guest, then without.
    unrestricted: &'static [&'static str],
    restricted: &'static [&'static str],
}

const fn case(
    name: &'static str,
    base: fn() -> GuestState,
    change: fn(&mut GuestState),
    unrestricted: &'static [&'static str],
    restricted: &'static [&'static str],
) -> Case {
    Case { name, base, change, unrestricted, restricted }
}

const CASES: &[Case] = &[
    // The states themselves.
    case("long mode", long64, |_| {}, &[], &[]),
    case("64-bit ring 3", user64, |_| {}, &[], &[]),
    case("virtual-8086", v8086, |_| {}, &[], &[]),
    case("32-bit protected, paging off", prot32, |_| {}, &[], &["C2"]),
    case("real mode (reset state)", real, |_| {}, &[], &["C2"]),
    // Selectors (kvm-unit-tests: test_guest_segment_sel_fields).
    case("TR.TI = 1", long64, |s| s.tr.selector |= 4, &["S1"], &["S1"]),
    case("usable LDTR, TI = 1", long64, |s| s.ldt = seg(0x2c, 0, 0xffff, LDT), &["S2"], &["S2"]),
    case("usable LDTR, TI = 0", long64, |s| s.ldt = seg(0x28, 0, 0xffff, LDT), &[], &[]),
    case("unusable LDTR, TI = 1", long64, |s| s.ldt.selector = 0x2c, &[], &[]),
    case("SS.RPL != CS.RPL", user64, |s| s.ss.selector = 0x28, &[], &["A7", "S3"]),
    case(
        "SS.RPL != CS.RPL in virtual-8086",
        v8086,
        |s| {
            s.ss.selector = 0x2003;
            s.ss.base = 0x20030;
        },
        &[],
        &[],
    ),
    // Base addresses (kvm-unit-tests: test_guest_segment_base_addr_fields).
    case("v8086 base != selector << 4", v8086, |s| s.ds.base = 0, &["B1"], &["B1"]),
    case("TR base not canonical", long64, |s| s.tr.base = NONCANONICAL, &["B2"], &["B2"]),
    case("FS base not canonical", long64, |s| s.fs.base = NONCANONICAL, &["B2"], &["B2"]),
    case("GS base not canonical", long64, |s| s.gs.base = NONCANONICAL, &["B2"], &["B2"]),
    case("GS base canonical high half", long64, |s| s.gs.base = 0xffff_8000_0000_0000, &[], &[]),
    case(
        "usable LDTR base not canonical",
        long64,
        |s| s.ldt = seg(0x28, NONCANONICAL, 0xffff, LDT),
        &["B3"],
        &["B3"],
    ),
    case("unusable LDTR base not canonical", long64, |s| s.ldt.base = NONCANONICAL, &[], &[]),
    case("CS base bit 32", long64, |s| s.cs.base = 1 << 32, &["B4"], &["B4"]),
    case("SS base bit 32", long64, |s| s.ss.base = 1 << 32, &["B5"], &["B5"]),
    case("DS base bit 63", long64, |s| s.ds.base = 1 << 63, &["B5"], &["B5"]),
    case("ES base bit 40", long64, |s| s.es.base = 1 << 40, &["B5"], &["B5"]),
    case("unusable ES base bit 40", long64, |s| s.es = seg(0, 1 << 40, 0, ar::UNUSABLE), &[], &[]),
    // Limits and virtual-8086 access rights.
    case("v8086 limit != 0xffff", v8086, |s| s.cs.limit = 0xfffff, &["L1"], &["L1"]),
    case("v8086 access rights != 0xf3", v8086, |s| s.es.access_rights = 0xf1, &["A1"], &["A1"]),
    // Code and data access rights.
    case("CS type 3 (data)", long64, |s| s.cs.access_rights = 0xa093, &[], &["A2"]),
    case("CS type 8 (code, not accessed)", long64, |s| s.cs.access_rights = 0xa098, &["A2"], &["A2"]),
    case("SS type 5 (read-only data)", long64, |s| s.ss.access_rights = 0xc095, &["A3"], &["A3"]),
    case("unusable SS type 5", long64, |s| s.ss.access_rights = ar::UNUSABLE | 5, &[], &[]),
    case("DS type 2 (not accessed)", long64, |s| s.ds.access_rights = 0xc092, &["A4"], &["A4"]),
    case("FS execute-only code", long64, |s| s.fs.access_rights = 0xc099, &["A4"], &["A4"]),
    case("GS readable code", long64, |s| s.gs.access_rights = 0xc09b, &[], &[]),
    case("DS system segment (S = 0)", long64, |s| s.ds.access_rights = 0xc083, &["A5"], &["A5"]),
    case("CS system segment (S = 0)", long64, |s| s.cs.access_rights = 0xa08b, &["A5"], &["A5"]),
    case("CS.DPL != SS.DPL (non-conforming)", long64, |s| s.cs.access_rights = 0xa0fb, &["A6"], &["A6"]),
    case("conforming CS.DPL > SS.DPL", long64, |s| s.cs.access_rights = 0xa0ff, &["A6"], &["A6"]),
    case("conforming CS.DPL < SS.DPL", user64, |s| s.cs.access_rights = 0xa09f, &[], &[]),
    case("CS type 3 with DPL 1", real, |s| s.cs.access_rights = 0xb3, &["A6"], &["A2", "A6", "C2"]),
    case(
        "CS type 3, SS.DPL 1",
        real,
        |s| {
            s.cs.access_rights = 0x93;
            s.ss.access_rights = 0xb3;
        },
        &["A7"],
        &["A2", "A7", "C2"],
    ),
    case(
        "SS.DPL 3 with CR0.PE = 0",
        real,
        |s| {
            s.cs.access_rights = 0xff;
            s.ss.access_rights = 0xf3;
            s.ss.selector = 3;
        },
        &["A7"],
        &["A7", "C2", "S3"],
    ),
    case("DS.DPL < DS.RPL", long64, |s| s.ds.selector = 0x1b, &[], &["A8"]),
    case(
        "DS.DPL < DS.RPL, conforming code",
        long64,
        |s| {
            s.ds.selector = 0x1b;
            s.ds.access_rights = 0xc09f;
        },
        &[],
        &[],
    ),
    case("DS not present", long64, |s| s.ds.access_rights &= !ar::P, &["A9"], &["A9"]),
    case("DS reserved bit 8", long64, |s| s.ds.access_rights |= 0x100, &["A10"], &["A10"]),
    case("CS.L and CS.D in IA-32e mode", long64, |s| s.cs.access_rights |= ar::DB, &["A11"], &["A11"]),
    case("G = 1 with limit 0xff00", long64, |s| s.ds.limit = 0xff00, &["A12"], &["A12"]),
    case("G = 0 with limit 0x100000", long64, |s| s.es.access_rights &= !ar::G, &["A12"], &["A12"]),
    case("DS reserved bit 20", long64, |s| s.ds.access_rights |= 1 << 20, &["A13"], &["A13"]),
    // TR.
    case("TR type 3 in IA-32e mode", long64, |s| s.tr.access_rights = 0x83, &["T1"], &["T1"]),
    case("TR type 3 in protected mode", v8086, |s| s.tr.access_rights = 0x83, &[], &[]),
    case("TR type 9 (available TSS)", v8086, |s| s.tr.access_rights = 0x89, &["T1"], &["T1"]),
    case("TR code segment (S = 1)", long64, |s| s.tr.access_rights |= ar::S, &["T2"], &["T2"]),
    case("TR not present", long64, |s| s.tr.access_rights &= !ar::P, &["T2"], &["T2"]),
    case("TR reserved bit 9", long64, |s| s.tr.access_rights |= 0x200, &["T2"], &["T2"]),
    case("TR G = 1 with limit 0x67", long64, |s| s.tr.access_rights |= ar::G, &["T3"], &["T3"]),
    case("TR unusable", long64, |s| s.tr.access_rights |= ar::UNUSABLE, &["T4"], &["T4"]),
    case("TR reserved bit 17", long64, |s| s.tr.access_rights |= 1 << 17, &["T4"], &["T4"]),
    // LDTR.
    case("LDTR type 3", long64, |s| s.ldt = seg(0x28, 0, 0xffff, 0x83), &["D1"], &["D1"]),
    case("LDTR S = 1", long64, |s| s.ldt = seg(0x28, 0, 0xffff, 0x92), &["D1"], &["D1"]),
    case("LDTR not present", long64, |s| s.ldt = seg(0x28, 0, 0xffff, 0x02), &["D1"], &["D1"]),
    case(
        "LDTR G = 0 with limit 0x100000",
        long64,
        |s| s.ldt = seg(0x28, 0, 0x10_0000, LDT),
        &["D1"],
        &["D1"],
    ),
    // Descriptor tables.
    case("GDTR base not canonical", long64, |s| s.gdt.base = NONCANONICAL, &["G1"], &["G1"]),
    case("IDTR base not canonical", long64, |s| s.idt.base = NONCANONICAL, &["G1"], &["G1"]),
    case("GDTR limit 0x10000", long64, |s| s.gdt.limit = 0x1_0000, &["G2"], &["G2"]),
    case("IDTR limit 0xffff", long64, |s| s.idt.limit = 0xffff, &[], &[]),
    // Control registers, EFER, RFLAGS.
    case("CR0.PG without CR0.PE", prot32, |s| s.cr0 = 0x8000_0010, &["C1"], &["C1", "C2"]),
    case("CR0 bit 32", long64, |s| s.cr0 |= 1 << 32, &["C3"], &["C3"]),
    case("IA-32e mode without CR4.PAE", long64, |s| s.cr4 = 0, &["C4"], &["C4"]),
    case("IA-32e mode without CR0.PG", long64, |s| s.cr0 = 0x11, &["C4"], &["C2", "C4"]),
    case("CR4.PCIDE outside IA-32e mode", v8086, |s| s.cr4 = 1 << 17, &["C5"], &["C5"]),
    case("CR4.PCIDE in IA-32e mode", long64, |s| s.cr4 |= 1 << 17, &[], &[]),
    case("CR4.CET without CR0.WP", long64, |s| s.cr4 |= 1 << 23, &["C6"], &["C6"]),
    case(
        "CR4.CET with CR0.WP",
        long64,
        |s| {
            s.cr4 |= 1 << 23;
            s.cr0 |= 1 << 16;
        },
        &[],
        &[],
    ),
    case("CR3 beyond the physical-address width", long64, |s| s.cr3 = 1 << 52, &["C7"], &["C7"]),
    // CET state ("load CET state"): IA32_S_CET, IA32_INTERRUPT_SSP_TABLE_ADDR, SSP.
    case("CET guest, long mode", cet64, |_| {}, &[], &[]),
    case("CET guest, protected mode", cet32, |_| {}, &[], &["C2"]),
    case("CET guest without CR0.WP", cet64, |s| s.cr0 &= !(1 << 16), &["C6"], &["C6"]),
    case("S_CET reserved bit 6", cet64, |s| cet(s).s_cet |= 1 << 6, &["C8"], &["C8"]),
    case("S_CET reserved bit 9", cet64, |s| cet(s).s_cet |= 1 << 9, &["C8"], &["C8"]),
    case("S_CET SUPPRESS and TRACKER", cet64, |s| cet(s).s_cet |= 3 << 10, &["C9"], &["C9"]),
    case("S_CET SUPPRESS alone", cet64, |s| cet(s).s_cet |= 1 << 10, &[], &[]),
    case("S_CET TRACKER alone", cet64, |s| cet(s).s_cet |= 1 << 11, &[], &[]),
    case(
        "interrupt SSP table not canonical",
        cet64,
        |s| cet(s).interrupt_ssp_table = NONCANONICAL,
        &["C10"],
        &["C10"],
    ),
    case("SSP with bit 48 in 64-bit mode", cet64, |s| cet(s).ssp = 1 << 48, &["R3"], &["R3"]),
    case("SSP with bit 47 in 64-bit mode", cet64, |s| cet(s).ssp = NONCANONICAL, &[], &[]),
    case("SSP in the high half in 64-bit mode", cet64, |s| cet(s).ssp = 0xffff_8000_0000_0000, &[], &[]),
    case(
        "SSP above 4 GiB in compatibility mode",
        cet64,
        |s| {
            s.cs.access_rights = CODE32;
            cet(s).ssp = 1 << 32;
        },
        &["R3"],
        &["R3"],
    ),
    case("SSP above 4 GiB in protected mode", cet32, |s| cet(s).ssp = 1 << 32, &["R3"], &["C2", "R3"]),
    case("SSP not 4-byte aligned", cet64, |s| cet(s).ssp |= 2, &["K3"], &["K3"]),
    case("broken CET state without \"load CET state\"", long64, |s| s.cet = None, &[], &[]),
    case("EFER.SVME on Intel", long64, |s| s.efer |= 1 << 12, &["E1"], &["E1"]),
    case("EFER.LMA without EFER.LME", long64, |s| s.efer = 0x400, &["E2"], &["E2"]),
    case("EFER.LME without EFER.LMA, paging on", v8086, |s| s.efer = 0x100, &["E2"], &["E2"]),
    case("EFER.LME without EFER.LMA, paging off", prot32, |s| s.efer = 0x100, &[], &["C2"]),
    case("CS.L outside IA-32e mode", prot32, |s| s.cs.access_rights |= ar::L, &["K1"], &["C2", "K1"]),
    case("CR0.NW without CR0.CD", long64, |s| s.cr0 |= 1 << 29, &["K2"], &["K2"]),
    case("RFLAGS bit 15", long64, |s| s.rflags |= 1 << 15, &["R1"], &["R1"]),
    case("RFLAGS bit 1 clear", long64, |s| s.rflags = 0, &["R1"], &["R1"]),
    case("RFLAGS.VM in IA-32e mode", long64, |s| s.rflags |= 1 << 17, &["R2"], &["R2"]),
    case("RFLAGS.VM with CR0.PE = 0", real, |s| s.rflags |= 1 << 17, &["R2"], &["C2", "R2"]),
];

fn broken_rules(state: &GuestState, platform: &Platform) -> Vec<&'static str> {
    let rules: BTreeSet<_> = check(state, platform).iter().map(|v| v.rule).collect();
    rules.into_iter().collect()
}

#[test]
fn every_case_breaks_exactly_its_rules_in_both_modes() {
    let mut failures = Vec::new();
    for case in CASES {
        let mut state = (case.base)();
        (case.change)(&mut state);
        for (unrestricted, expected) in [(true, case.unrestricted), (false, case.restricted)] {
            let got = broken_rules(&state, &Platform::intel(unrestricted));
            if got != expected {
                failures.push(format!(
                    "{} (unrestricted {unrestricted}): expected {expected:?}, got {got:?}",
                    case.name
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_rule_fails_somewhere_in_each_mode_it_applies_to() {
    const ALL: &[&str] = &[
        "S1", "S2", "S3", "B1", "B2", "B3", "B4", "B5", "L1", "A1", "A2", "A3", "A4", "A5", "A6", "A7", "A8",
        "A9", "A10", "A11", "A12", "A13", "T1", "T2", "T3", "T4", "D1", "G1", "G2", "C1", "C2", "C3", "C4",
        "C5", "C6", "C7", "C8", "C9", "C10", "E1", "E2", "K1", "K2", "K3", "R1", "R2", "R3",
    ];
    // Rules that exist only without unrestricted guest.
    const RESTRICTED_ONLY: &[&str] = &["S3", "A8", "C2"];
    for rule in ALL {
        let fails = |pick: fn(&Case) -> &'static [&'static str]| CASES.iter().any(|c| pick(c).contains(rule));
        assert!(fails(|c| c.restricted), "no case breaks {rule} without unrestricted guest");
        if !RESTRICTED_ONLY.contains(rule) {
            assert!(fails(|c| c.unrestricted), "no case breaks {rule} with unrestricted guest");
        }
    }
}

#[test]
fn amd_has_its_own_efer_bits() {
    let mut state = long64();
    state.efer |= 1 << 12;
    let amd = Platform { vendor: CpuVendor::Amd, ..Platform::intel(true) };
    assert!(check(&state, &amd).is_empty());
    state.efer |= 1 << 20;
    assert_eq!(broken_rules(&state, &amd), ["E1"]);
}

#[test]
fn canonical_depends_on_the_linear_address_width() {
    let mut state = long64();
    state.fs.base = 0x0080_0000_0000_0000;
    assert_eq!(broken_rules(&state, &Platform::intel(true)), ["B2"]);
    let la57 = Platform { linear_addr_bits: 57, ..Platform::intel(true) };
    assert!(check(&state, &la57).is_empty());
}

#[test]
fn violations_name_register_field_and_requirement() {
    let mut state = long64();
    state.tr.selector = 0x24;
    let violations = check(&state, &Platform::intel(true));
    assert_eq!(
        violations[0].to_string(),
        "tr.selector = 0x24: the TI flag (bit 2) must be 0 [S1 SDM 3C: checks on guest segment registers]"
    );
}

#[test]
fn kvm_segments_convert_as_kvm_writes_the_vmcs() {
    let data = kvm_segment {
        selector: 0x18,
        limit: 0xffff_ffff,
        type_: 2,
        present: 1,
        s: 1,
        db: 1,
        g: 1,
        ..Default::default()
    };
    assert_eq!(Segment::from_kvm(&data, false).access_rights, 0xc092);
    // With unrestricted guest KVM sets the accessed bit (but not on LDTR).
    assert_eq!(Segment::from_kvm(&data, true).access_rights, 0xc093);
    let absent = kvm_segment { present: 0, ..data };
    assert_eq!(Segment::from_kvm(&absent, true).access_rights, ar::UNUSABLE);
    let sregs = kvm_sregs { ldt: data, ..Default::default() };
    let state = GuestState::from_kvm(&sregs, 2, &Platform::intel(true));
    assert_eq!(state.ldt.type_(), 2);
}

#[test]
fn cet_violations_say_what_the_sdm_requires() {
    let text = |state: &GuestState| -> Vec<String> {
        check(state, &Platform::intel(true)).iter().map(ToString::to_string).collect()
    };
    let mut state = cet64();
    state.cr0 &= !(1 << 16);
    let broken = cet(&mut state);
    broken.s_cet = 0xc40;
    broken.interrupt_ssp_table = NONCANONICAL;
    broken.ssp = 0x0001_0000_0000_0002;
    assert_eq!(
        text(&state),
        [
            "cr4.cet = 0x1: CR4.CET = 1 requires CR0.WP = 1 [C6 SDM 3C: checks on guest control \
             registers and MSRs]",
            "cet.s_cet = 0xc40: IA32_S_CET bits 9:6 are reserved and must be 0 [C8 SDM 3C: checks on \
             guest control registers and MSRs]",
            "cet.s_cet = 0xc40: IA32_S_CET bits 10 (SUPPRESS) and 11 (TRACKER) must not both be 1 [C9 \
             SDM 3C: checks on guest control registers and MSRs]",
            "cet.interrupt_ssp_table = 0x800000000000: IA32_INTERRUPT_SSP_TABLE_ADDR must be canonical \
             [C10 SDM 3C: checks on guest control registers and MSRs]",
            "cet.ssp = 0x1000000000002: in 64-bit mode, SSP bits 63:48 must be identical (48 being the \
             linear-address width) [R3 SDM 3C: checks on guest RIP, RFLAGS and SSP]",
            "cet.ssp = 0x1000000000002: SSP bits 1:0 must be 0 (KVM takes only a 4-byte aligned SSP) [K3 \
             KVM_SET_ONE_REG]",
        ]
    );
    let mut state = cet32();
    cet(&mut state).ssp = 0x1_0000_0000;
    assert_eq!(
        text(&state),
        ["cet.ssp = 0x100000000: outside 64-bit mode (IA-32e mode with CS.L = 1), SSP bits 63:32 must be \
          0 [R3 SDM 3C: checks on guest RIP, RFLAGS and SSP]"]
    );
}

#[test]
fn ssp_in_64_bit_mode_follows_the_linear_address_width() {
    let mut state = cet64();
    cet(&mut state).ssp = 1 << 56;
    let la57 = Platform { linear_addr_bits: 57, ..Platform::intel(true) };
    assert!(check(&state, &la57).is_empty());
    cet(&mut state).ssp = 1 << 57;
    assert_eq!(broken_rules(&state, &la57), ["R3"]);
}
