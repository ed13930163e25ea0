//! The SDM Vol. 3C guest-state checks (and what KVM_SET_SREGS and KVM_SET_ONE_REG add), one
//! function per group. Rule ids follow docs/guest-state.md: S selectors, B bases, L limits, A
//! access rights, T TR, D LDTR, C control registers and MSRs, E EFER, R RFLAGS and SSP, G
//! GDTR/IDTR, K KVM.

use std::fmt;

use super::{ar, CetState, CpuVendor, DescriptorTable, GuestState, Platform, Segment};
use crate::x86::*;

/// IA32_S_CET (and IA32_U_CET): bits 9:6 reserved, bit 10 SUPPRESS, bit 11 TRACKER (WAIT_ENDBR).
const CET_RESERVED: u64 = 0xf << 6;
const CET_SUPPRESS: u64 = 1 << 10;
const CET_TRACKER: u64 = 1 << 11;

/// One broken rule: which register and field, what it holds, and what the SDM requires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Rule id (e.g. `S1`), as in docs/guest-state.md.
    pub rule: &'static str,
    /// Register as the state file names it (`cs`, `tr`, `ldt`, `gdt`, `cr0`, `rflags`, …).
    pub register: &'static str,
    pub field: &'static str,
    pub found: u64,
    /// The requirement, in the SDM's words shortened.
    pub requirement: String,
}

impl Violation {
    /// Where the rule comes from.
    pub fn source(&self) -> &'static str {
        match (self.rule, self.rule.as_bytes()[0]) {
            ("R3", _) => "SDM 3C: checks on guest RIP, RFLAGS and SSP",
            ("K3", _) => "KVM_SET_ONE_REG",
            (_, b'C' | b'E') => "SDM 3C: checks on guest control registers and MSRs",
            (_, b'R') => "SDM 3C: checks on guest RFLAGS",
            (_, b'G') => "SDM 3C: checks on guest descriptor-table registers",
            (_, b'K') => "KVM_SET_SREGS",
            _ => "SDM 3C: checks on guest segment registers",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{} = {:#x}: {} [{} {}]",
            self.register,
            self.field,
            self.found,
            self.requirement,
            self.rule,
            self.source()
        )
    }
}

/// Every rule `state` breaks on `platform`, in a fixed order (selectors, bases, limits and
/// access rights, TR, LDTR, descriptor tables, control registers, RFLAGS, CET state).
pub fn check(state: &GuestState, platform: &Platform) -> Vec<Violation> {
    let mut checker = Checker {
        state,
        platform,
        ia32e: state.efer & EFER_LMA != 0,
        // RFLAGS.VM outside legacy protected mode is R2's violation, not a virtual-8086 guest.
        v8086: state.rflags & RFLAGS_VM != 0 && state.cr0 & CR0_PE != 0 && state.efer & EFER_LMA == 0,
        violations: Vec::new(),
    };
    checker.selectors();
    checker.bases();
    checker.code_and_data_segments();
    checker.task_register();
    checker.ldtr();
    checker.descriptor_tables();
    checker.control_registers();
    checker.rflags();
    if let Some(cet) = state.cet {
        checker.cet(cet);
    }
    checker.violations
}

struct Checker<'a> {
    state: &'a GuestState,
    platform: &'a Platform,
    ia32e: bool,
    v8086: bool,
    violations: Vec<Violation>,
}

impl Checker<'_> {
    fn fail(
        &mut self,
        rule: &'static str,
        register: &'static str,
        field: &'static str,
        found: impl Into<u64>,
        requirement: impl Into<String>,
    ) {
        let requirement = requirement.into();
        self.violations.push(Violation { rule, register, field, found: found.into(), requirement });
    }

    fn canonical(&self, address: u64) -> bool {
        sign_extended(address, self.platform.linear_addr_bits.into())
    }

    /// CS, SS, DS, ES, FS and GS with their state-file names.
    fn code_and_data(&self) -> [(&'static str, Segment); 6] {
        let s = self.state;
        [("cs", s.cs), ("ss", s.ss), ("ds", s.ds), ("es", s.es), ("fs", s.fs), ("gs", s.gs)]
    }

    fn selectors(&mut self) {
        let (cs, ss, tr, ldt) = (self.state.cs, self.state.ss, self.state.tr, self.state.ldt);
        if tr.ti() {
            self.fail("S1", "tr", "selector", tr.selector, "the TI flag (bit 2) must be 0");
        }
        if ldt.usable() && ldt.ti() {
            self.fail(
                "S2",
                "ldt",
                "selector",
                ldt.selector,
                "if LDTR is usable, the TI flag (bit 2) must be 0",
            );
        }
        if !self.v8086 && !self.platform.unrestricted_guest && ss.rpl() != cs.rpl() {
            let requirement = format!(
                "outside virtual-8086 mode and without unrestricted guest, the RPL (bits 1:0) must \
                 equal CS.RPL ({})",
                cs.rpl()
            );
            self.fail("S3", "ss", "selector", ss.selector, requirement);
        }
    }

    fn bases(&mut self) {
        if self.v8086 {
            for (name, seg) in self.code_and_data() {
                let expected = u64::from(seg.selector) << 4;
                if seg.base != expected {
                    let requirement =
                        format!("in virtual-8086 mode the base must be the selector shifted left by 4 ({expected:#x})");
                    self.fail("B1", name, "base", seg.base, requirement);
                }
            }
        }
        for (name, seg) in [("tr", self.state.tr), ("fs", self.state.fs), ("gs", self.state.gs)] {
            if !self.canonical(seg.base) {
                self.fail("B2", name, "base", seg.base, "the base address must be canonical");
            }
        }
        let ldt = self.state.ldt;
        if ldt.usable() && !self.canonical(ldt.base) {
            self.fail("B3", "ldt", "base", ldt.base, "if LDTR is usable, the base address must be canonical");
        }
        if self.state.cs.base >> 32 != 0 {
            self.fail("B4", "cs", "base", self.state.cs.base, "bits 63:32 of the base address must be 0");
        }
        for (name, seg) in [("ss", self.state.ss), ("ds", self.state.ds), ("es", self.state.es)] {
            if seg.usable() && seg.base >> 32 != 0 {
                self.fail(
                    "B5",
                    name,
                    "base",
                    seg.base,
                    "if usable, bits 63:32 of the base address must be 0",
                );
            }
        }
    }

    fn code_and_data_segments(&mut self) {
        if self.v8086 {
            for (name, seg) in self.code_and_data() {
                if seg.limit != 0xffff {
                    self.fail(
                        "L1",
                        name,
                        "limit",
                        seg.limit,
                        "in virtual-8086 mode the limit must be 0xffff",
                    );
                }
                if seg.access_rights != 0xf3 {
                    let requirement = "in virtual-8086 mode the access rights must be 0xf3 (present, DPL 3, \
                                       accessed read/write data)";
                    self.fail("A1", name, "access_rights", seg.access_rights, requirement);
                }
            }
            return;
        }
        self.segment_types();
        self.privilege_levels();
        for (name, seg) in self.code_and_data() {
            if name != "cs" && !seg.usable() {
                continue;
            }
            if !seg.s() {
                self.fail("A5", name, "s", 0u64, "CS and usable data segments must be code or data (S = 1)");
            }
            if !seg.present() {
                self.fail("A9", name, "present", 0u64, "CS and usable segments must be present (P = 1)");
            }
            self.reserved_and_granularity(name, seg, "A10", "A12", "A13");
        }
        let cs = self.state.cs;
        if self.ia32e && cs.l() && cs.db() {
            self.fail("A11", "cs", "db", 1u64, "in IA-32e mode with CS.L = 1, CS.D/B must be 0");
        }
    }

    fn segment_types(&mut self) {
        let unrestricted = self.platform.unrestricted_guest;
        let cs_type = self.state.cs.type_();
        let allowed = matches!(cs_type, 9 | 11 | 13 | 15) || (unrestricted && cs_type == 3);
        if !allowed {
            let requirement = if unrestricted {
                "CS type must be 3 (read/write accessed data) or 9, 11, 13, 15 (accessed code)"
            } else {
                "without unrestricted guest, CS type must be 9, 11, 13 or 15 (accessed code)"
            };
            self.fail("A2", "cs", "type", cs_type, requirement);
        }
        let ss = self.state.ss;
        if ss.usable() && !matches!(ss.type_(), 3 | 7) {
            self.fail(
                "A3",
                "ss",
                "type",
                ss.type_(),
                "if usable, SS type must be 3 or 7 (read/write accessed data)",
            );
        }
        for (name, seg) in
            [("ds", self.state.ds), ("es", self.state.es), ("fs", self.state.fs), ("gs", self.state.gs)]
        {
            let type_ = seg.type_();
            if !seg.usable() {
                continue;
            }
            if type_ & 1 == 0 {
                self.fail("A4", name, "type", type_, "if usable, the type's accessed bit (bit 0) must be 1");
            }
            if type_ & 8 != 0 && type_ & 2 == 0 {
                self.fail(
                    "A4",
                    name,
                    "type",
                    type_,
                    "if usable and a code segment, it must be readable (type bit 1)",
                );
            }
        }
    }

    fn privilege_levels(&mut self) {
        let (cs, ss) = (self.state.cs, self.state.ss);
        match cs.type_() {
            3 if cs.dpl() != 0 => self.fail("A6", "cs", "dpl", cs.dpl(), "with CS type 3, CS.DPL must be 0"),
            9 | 11 if cs.dpl() != ss.dpl() => {
                let requirement = format!(
                    "for non-conforming code (type 9 or 11), CS.DPL must equal SS.DPL ({})",
                    ss.dpl()
                );
                self.fail("A6", "cs", "dpl", cs.dpl(), requirement)
            }
            13 | 15 if cs.dpl() > ss.dpl() => {
                let requirement = format!(
                    "for conforming code (type 13 or 15), CS.DPL must not exceed SS.DPL ({})",
                    ss.dpl()
                );
                self.fail("A6", "cs", "dpl", cs.dpl(), requirement)
            }
            _ => {}
        }
        if !self.platform.unrestricted_guest && ss.dpl() != ss.rpl() {
            let requirement = format!("without unrestricted guest, SS.DPL must equal SS.RPL ({})", ss.rpl());
            self.fail("A7", "ss", "dpl", ss.dpl(), requirement);
        }
        if ss.dpl() != 0 && (cs.type_() == 3 || self.state.cr0 & CR0_PE == 0) {
            self.fail("A7", "ss", "dpl", ss.dpl(), "SS.DPL must be 0 when CS type is 3 or CR0.PE = 0");
        }
        if self.platform.unrestricted_guest {
            return;
        }
        for (name, seg) in
            [("ds", self.state.ds), ("es", self.state.es), ("fs", self.state.fs), ("gs", self.state.gs)]
        {
            if seg.usable() && seg.type_() <= 11 && seg.dpl() < seg.rpl() {
                let requirement = format!(
                    "without unrestricted guest, a usable data or non-conforming code segment needs \
                     DPL >= RPL ({})",
                    seg.rpl()
                );
                self.fail("A8", name, "dpl", seg.dpl(), requirement);
            }
        }
    }

    /// Reserved access-rights bits and the limit/granularity consistency every usable
    /// segment (and TR, LDTR) shares.
    fn reserved_and_granularity(
        &mut self,
        name: &'static str,
        seg: Segment,
        reserved_low: &'static str,
        granularity: &'static str,
        reserved_high: &'static str,
    ) {
        if seg.access_rights & ar::RESERVED_11_8 != 0 {
            self.fail(
                reserved_low,
                name,
                "access_rights",
                seg.access_rights,
                "access-rights bits 11:8 are reserved and must be 0",
            );
        }
        if seg.limit & 0xfff != 0xfff && seg.g() {
            self.fail(
                granularity,
                name,
                "g",
                1u64,
                format!("limit {:#x} has bits 11:0 not all 1, so G must be 0", seg.limit),
            );
        }
        if seg.limit >> 20 != 0 && !seg.g() {
            self.fail(
                granularity,
                name,
                "g",
                0u64,
                format!("limit {:#x} has bits 31:20 set, so G must be 1", seg.limit),
            );
        }
        if seg.access_rights & ar::RESERVED_31_17 != 0 {
            self.fail(
                reserved_high,
                name,
                "access_rights",
                seg.access_rights,
                "access-rights bits 31:17 are reserved and must be 0",
            );
        }
    }

    fn task_register(&mut self) {
        let tr = self.state.tr;
        let type_ok = if self.ia32e { tr.type_() == 11 } else { matches!(tr.type_(), 3 | 11) };
        if !type_ok {
            let requirement = if self.ia32e {
                "in IA-32e mode, TR type must be 11 (busy 64-bit TSS)"
            } else {
                "TR type must be 3 (busy 16-bit TSS) or 11 (busy 32-bit TSS)"
            };
            self.fail("T1", "tr", "type", tr.type_(), requirement);
        }
        if tr.s() {
            self.fail("T2", "tr", "s", 1u64, "TR must be a system segment (S = 0)");
        }
        if !tr.present() {
            self.fail("T2", "tr", "present", 0u64, "TR must be present (P = 1)");
        }
        if !tr.usable() {
            self.fail("T4", "tr", "unusable", 1u64, "TR must be usable (access-rights bit 16 = 0)");
        }
        self.reserved_and_granularity("tr", tr, "T2", "T3", "T4");
    }

    fn ldtr(&mut self) {
        let ldt = self.state.ldt;
        if !ldt.usable() {
            return;
        }
        if ldt.type_() != 2 {
            self.fail("D1", "ldt", "type", ldt.type_(), "if LDTR is usable, its type must be 2 (LDT)");
        }
        if ldt.s() {
            self.fail("D1", "ldt", "s", 1u64, "if LDTR is usable, it must be a system segment (S = 0)");
        }
        if !ldt.present() {
            self.fail("D1", "ldt", "present", 0u64, "if LDTR is usable, it must be present (P = 1)");
        }
        self.reserved_and_granularity("ldt", ldt, "D1", "D1", "D1");
    }

    fn descriptor_tables(&mut self) {
        let tables: [(&'static str, DescriptorTable); 2] = [("gdt", self.state.gdt), ("idt", self.state.idt)];
        for (name, table) in tables {
            if !self.canonical(table.base) {
                self.fail("G1", name, "base", table.base, "the base address must be canonical");
            }
            if table.limit >> 16 != 0 {
                self.fail("G2", name, "limit", table.limit, "bits 31:16 of the limit must be 0");
            }
        }
    }

    fn control_registers(&mut self) {
        let s = self.state;
        let (cr0, cr4, efer) = (s.cr0, s.cr4, s.efer);
        if cr0 & CR0_PG != 0 && cr0 & CR0_PE == 0 {
            self.fail("C1", "cr0", "pg", 1u64, "CR0.PG = 1 requires CR0.PE = 1");
        }
        if !self.platform.unrestricted_guest && cr0 & (CR0_PE | CR0_PG) != CR0_PE | CR0_PG {
            self.fail(
                "C2",
                "cr0",
                "pe_pg",
                cr0 & (CR0_PE | CR0_PG),
                "without unrestricted guest, CR0.PE and CR0.PG must both be 1 (IA32_VMX_CR0_FIXED0)",
            );
        }
        if cr0 >> 32 != 0 {
            self.fail("C3", "cr0", "bits_63_32", cr0 >> 32, "CR0 bits 63:32 are reserved and must be 0");
        }
        if cr0 & CR0_NW != 0 && cr0 & CR0_CD == 0 {
            self.fail("K2", "cr0", "nw", 1u64, "CR0.NW = 1 requires CR0.CD = 1");
        }
        if self.ia32e && (cr0 & CR0_PG == 0 || cr4 & CR4_PAE == 0) {
            self.fail(
                "C4",
                "efer",
                "lma",
                1u64,
                "IA-32e mode (EFER.LMA = 1) requires CR0.PG = 1 and CR4.PAE = 1",
            );
        }
        if !self.ia32e && cr4 & CR4_PCIDE != 0 {
            self.fail("C5", "cr4", "pcide", 1u64, "outside IA-32e mode CR4.PCIDE must be 0");
        }
        if cr4 & CR4_CET != 0 && cr0 & CR0_WP == 0 {
            self.fail("C6", "cr4", "cet", 1u64, "CR4.CET = 1 requires CR0.WP = 1");
        }
        let phys_bits = u32::from(self.platform.phys_addr_bits.clamp(32, 63));
        if s.cr3 >> phys_bits != 0 {
            let requirement =
                format!("CR3 bits 63:{phys_bits} (beyond the physical-address width) must be 0");
            self.fail("C7", "cr3", "address", s.cr3, requirement);
        }
        let mut defined = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;
        if self.platform.vendor == CpuVendor::Amd {
            defined |= EFER_AMD_ONLY;
        }
        if efer & !defined != 0 {
            self.fail("E1", "efer", "reserved", efer & !defined, "reserved EFER bits must be 0");
        }
        if cr0 & CR0_PG != 0 && (efer & EFER_LME != 0) != (efer & EFER_LMA != 0) {
            self.fail("E2", "efer", "lme", (efer >> 8) & 1, "with CR0.PG = 1, EFER.LME must equal EFER.LMA");
        }
        if s.cs.l() && !self.ia32e {
            self.fail("K1", "cs", "l", 1u64, "CS.L = 1 needs IA-32e mode (EFER.LMA = 1)");
        }
    }

    fn rflags(&mut self) {
        let rflags = self.state.rflags;
        if rflags & RFLAGS_RESERVED != 0 {
            self.fail(
                "R1",
                "rflags",
                "reserved",
                rflags & RFLAGS_RESERVED,
                "RFLAGS bits 63:22, 15, 5 and 3 are reserved and must be 0",
            );
        }
        if rflags & RFLAGS_FIXED_1 == 0 {
            self.fail("R1", "rflags", "bit_1", 0u64, "RFLAGS bit 1 must be 1");
        }
        if rflags & RFLAGS_VM != 0 && (self.ia32e || self.state.cr0 & CR0_PE == 0) {
            self.fail("R2", "rflags", "vm", 1u64, "RFLAGS.VM must be 0 in IA-32e mode or when CR0.PE = 0");
        }
    }

    /// The checks "load CET state" adds (KVM sets it for every guest with SHSTK or IBT). CR4.CET
    /// needing CR0.WP is C6, among the control registers.
    fn cet(&mut self, cet: CetState) {
        if cet.s_cet & CET_RESERVED != 0 {
            self.fail("C8", "cet", "s_cet", cet.s_cet, "IA32_S_CET bits 9:6 are reserved and must be 0");
        }
        if cet.s_cet & (CET_SUPPRESS | CET_TRACKER) == CET_SUPPRESS | CET_TRACKER {
            self.fail(
                "C9",
                "cet",
                "s_cet",
                cet.s_cet,
                "IA32_S_CET bits 10 (SUPPRESS) and 11 (TRACKER) must not both be 1",
            );
        }
        if !self.canonical(cet.interrupt_ssp_table) {
            self.fail(
                "C10",
                "cet",
                "interrupt_ssp_table",
                cet.interrupt_ssp_table,
                "IA32_INTERRUPT_SSP_TABLE_ADDR must be canonical",
            );
        }
        // As for RIP: in 64-bit mode bits 63:N identical (N the linear-address width, one bit
        // looser than canonical), elsewhere bits 63:32 clear.
        let width = u32::from(self.platform.linear_addr_bits.clamp(32, 64));
        if !(self.ia32e && self.state.cs.l()) {
            if cet.ssp >> 32 != 0 {
                let requirement = "outside 64-bit mode (IA-32e mode with CS.L = 1), SSP bits 63:32 must be 0";
                self.fail("R3", "cet", "ssp", cet.ssp, requirement);
            }
        } else if !sign_extended(cet.ssp, width + 1) {
            let requirement = format!(
                "in 64-bit mode, SSP bits 63:{width} must be identical ({width} being the linear-address \
                 width)"
            );
            self.fail("R3", "cet", "ssp", cet.ssp, requirement);
        }
        if cet.ssp & 3 != 0 {
            self.fail(
                "K3",
                "cet",
                "ssp",
                cet.ssp,
                "SSP bits 1:0 must be 0 (KVM takes only a 4-byte aligned SSP)",
            );
        }
    }
}

/// Whether `address` is the sign extension of its low `bits` bits (canonical for `bits` = the
/// linear-address width).
fn sign_extended(address: u64, bits: u32) -> bool {
    let unused = 64 - bits.clamp(32, 64);
    (((address << unused) as i64) >> unused) as u64 == address
}
