//! Delivering a long-mode `int3` (#BP) from user space when KVM reports it cannot emulate it.
//!
//! On hosts where guest ring-0 code runs in KVM's instruction emulator (nested hosts without
//! hardware help), INT3 is one of the instructions the emulator lacks: KVM_RUN returns an
//! emulation failure with RIP at the `0xcc`. Linux executes `int3` in its alternatives
//! self-test and whenever it patches kernel text, so carve performs what the CPU would: push
//! SS, RSP, RFLAGS, CS and the address after the `int3` on the handler's stack, clear TF, NT,
//! RF (and IF through an interrupt gate), and jump to the IDT's vector-3 gate.
//!
//! Only the case the kernel needs is handled: 64-bit mode, a present 64-bit interrupt or trap
//! gate into the current code segment at the current privilege level, on the current stack or
//! an IST stack. Anything else is left to the crash report.

use crate::memory::GuestRam;
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::x86::{EFER_LMA, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_TF};

const INT3: u8 = 0xcc;
const VECTOR: u64 = 3;
const GATE_INTERRUPT: u8 = 0xe;
const GATE_TRAP: u8 = 0xf;
/// Offset of IST1 in the 64-bit TSS.
const TSS_IST1: u64 = 0x24;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BreakpointError {
    #[error("the instruction at RIP is not int3")]
    NotInt3,
    #[error("the vCPU is not in 64-bit mode")]
    NotLongMode,
    #[error("the #BP gate cannot be used here: {0}")]
    UnsupportedGate(&'static str),
    #[error("guest address {0:#x} is not mapped")]
    Unmapped(u64),
    #[error("cannot read or write the vCPU's registers: {0}")]
    Registers(kvm_ioctls::Error),
}

/// Linear-to-physical translation plus guest memory: what delivery touches.
pub trait GuestView {
    fn translate(&self, linear: u64) -> Option<u64>;
    fn memory(&self) -> &GuestRam;

    fn read_u64(&self, linear: u64) -> Result<u64, BreakpointError> {
        let mut bytes = [0u8; 8];
        self.read(linear, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Byte by byte through the translation, so a range may cross pages.
    fn read(&self, linear: u64, out: &mut [u8]) -> Result<(), BreakpointError> {
        for (i, byte) in out.iter_mut().enumerate() {
            let at = linear.wrapping_add(i as u64);
            let physical = self.translate(at).ok_or(BreakpointError::Unmapped(at))?;
            *byte =
                self.memory().read_obj(GuestAddress(physical)).map_err(|_| BreakpointError::Unmapped(at))?;
        }
        Ok(())
    }

    fn write(&self, linear: u64, bytes: &[u8]) -> Result<(), BreakpointError> {
        for (i, byte) in bytes.iter().enumerate() {
            let at = linear.wrapping_add(i as u64);
            let physical = self.translate(at).ok_or(BreakpointError::Unmapped(at))?;
            self.memory()
                .write_obj(*byte, GuestAddress(physical))
                .map_err(|_| BreakpointError::Unmapped(at))?;
        }
        Ok(())
    }
}

struct Vcpu<'a> {
    fd: &'a VcpuFd,
    mem: &'a GuestRam,
}

impl GuestView for Vcpu<'_> {
    fn translate(&self, linear: u64) -> Option<u64> {
        let t = self.fd.translate_gva(linear).ok()?;
        (t.valid != 0).then_some(t.physical_address)
    }

    fn memory(&self) -> &GuestRam {
        self.mem
    }
}

/// Delivers #BP for the `int3` at the vCPU's RIP.
pub fn deliver(fd: &VcpuFd, mem: &GuestRam) -> Result<(), BreakpointError> {
    let mut regs = fd.get_regs().map_err(BreakpointError::Registers)?;
    let sregs = fd.get_sregs().map_err(BreakpointError::Registers)?;
    deliver_on(&Vcpu { fd, mem }, &mut regs, &sregs)?;
    fd.set_regs(&regs).map_err(BreakpointError::Registers)
}

/// The delivery itself, on registers and a view of guest memory (tested without KVM).
pub fn deliver_on(
    view: &impl GuestView,
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
) -> Result<(), BreakpointError> {
    let mut opcode = [0u8];
    view.read(sregs.cs.base.wrapping_add(regs.rip), &mut opcode)?;
    if opcode[0] != INT3 {
        return Err(BreakpointError::NotInt3);
    }
    if sregs.efer & EFER_LMA == 0 || sregs.cs.l == 0 {
        return Err(BreakpointError::NotLongMode);
    }
    if u64::from(sregs.idt.limit) < 16 * VECTOR + 15 {
        return Err(BreakpointError::UnsupportedGate("the IDT has no entry 3"));
    }
    let mut gate = [0u8; 16];
    view.read(sregs.idt.base + 16 * VECTOR, &mut gate)?;
    let offset = u64::from(u16::from_le_bytes([gate[0], gate[1]]))
        | u64::from(u16::from_le_bytes([gate[6], gate[7]])) << 16
        | u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]])) << 32;
    let selector = u16::from_le_bytes([gate[2], gate[3]]);
    let ist = gate[4] & 7;
    let (kind, dpl, present) = (gate[5] & 0xf, (gate[5] >> 5) & 3, gate[5] & 0x80 != 0);
    let cpl = sregs.cs.selector & 3;
    if !present {
        return Err(BreakpointError::UnsupportedGate("entry 3 is not present"));
    }
    if kind != GATE_INTERRUPT && kind != GATE_TRAP {
        return Err(BreakpointError::UnsupportedGate("entry 3 is not a 64-bit interrupt or trap gate"));
    }
    if u16::from(dpl) < cpl {
        // The CPU raises #GP here; carve leaves that to the crash report.
        return Err(BreakpointError::UnsupportedGate("the gate's DPL is below the current privilege level"));
    }
    if selector != sregs.cs.selector {
        return Err(BreakpointError::UnsupportedGate("the handler is in another code segment"));
    }

    let stack =
        if ist != 0 { view.read_u64(sregs.tr.base + TSS_IST1 + 8 * u64::from(ist - 1))? } else { regs.rsp };
    let frame = [
        regs.rip.wrapping_add(1),
        u64::from(sregs.cs.selector),
        regs.rflags,
        regs.rsp,
        u64::from(sregs.ss.selector),
    ];
    let top = (stack & !0xf).wrapping_sub(8 * frame.len() as u64);
    let bytes: Vec<u8> = frame.iter().flat_map(|v| v.to_le_bytes()).collect();
    view.write(top, &bytes)?;

    regs.rsp = top;
    regs.rip = offset;
    regs.rflags &= !(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF);
    if kind == GATE_INTERRUPT {
        regs.rflags &= !RFLAGS_IF;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Identity-mapped memory below 1 MiB.
    struct Flat(GuestRam);

    impl GuestView for Flat {
        fn translate(&self, linear: u64) -> Option<u64> {
            (linear < 1 << 20).then_some(linear)
        }
        fn memory(&self) -> &GuestRam {
            &self.0
        }
    }

    fn setup(gate_type: u8, ist: u8) -> (Flat, kvm_regs, kvm_sregs) {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_obj(INT3, GuestAddress(0x5000)).unwrap();
        let handler = 0x6000u64;
        let mut gate = [0u8; 16];
        gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
        gate[2..4].copy_from_slice(&0x08u16.to_le_bytes());
        gate[4] = ist;
        gate[5] = 0x80 | gate_type;
        mem.write_slice(&gate, GuestAddress(0x1000 + 16 * 3)).unwrap();
        mem.write_obj(0x9000u64, GuestAddress(0x3000 + TSS_IST1)).unwrap();
        let regs = kvm_regs { rip: 0x5000, rsp: 0x8008, rflags: 0x302 | RFLAGS_RF, ..Default::default() };
        let mut sregs = kvm_sregs { efer: EFER_LMA, ..Default::default() };
        sregs.cs.selector = 0x08;
        sregs.cs.l = 1;
        sregs.ss.selector = 0x10;
        sregs.idt.base = 0x1000;
        sregs.idt.limit = 0xfff;
        sregs.tr.base = 0x3000;
        (Flat(mem), regs, sregs)
    }

    #[test]
    fn an_interrupt_gate_gets_the_hardware_frame_and_clears_if() {
        let (view, mut regs, sregs) = setup(GATE_INTERRUPT, 0);
        deliver_on(&view, &mut regs, &sregs).unwrap();
        assert_eq!(regs.rip, 0x6000);
        assert_eq!(regs.rsp, 0x8000 - 40, "aligned down to 16, then five quadwords");
        let frame: Vec<u64> =
            (0..5).map(|i| view.0.read_obj(GuestAddress(regs.rsp + 8 * i)).unwrap()).collect();
        assert_eq!(frame, [0x5001, 0x08, 0x302 | RFLAGS_RF, 0x8008, 0x10]);
        assert_eq!(regs.rflags, 0x2, "IF, TF and RF cleared");
    }

    #[test]
    fn a_trap_gate_keeps_if_and_an_ist_gate_switches_stacks() {
        let (view, mut regs, sregs) = setup(GATE_TRAP, 1);
        deliver_on(&view, &mut regs, &sregs).unwrap();
        assert_eq!(regs.rsp, 0x9000 - 40);
        assert_ne!(regs.rflags & RFLAGS_IF, 0);
    }

    #[test]
    fn what_the_cpu_would_fault_on_is_refused() {
        let (view, mut regs, mut sregs) = setup(GATE_INTERRUPT, 0);
        sregs.cs.selector = 0x0b; // CPL 3 against a DPL-0 gate: #GP on hardware.
        assert!(matches!(deliver_on(&view, &mut regs, &sregs), Err(BreakpointError::UnsupportedGate(_))));
        let (view, mut regs, sregs) = setup(0x6, 0);
        assert!(matches!(deliver_on(&view, &mut regs, &sregs), Err(BreakpointError::UnsupportedGate(_))));
        let (view, mut regs, sregs) = setup(GATE_INTERRUPT, 0);
        regs.rip = 0x5001;
        assert_eq!(deliver_on(&view, &mut regs, &sregs), Err(BreakpointError::NotInt3));
        let (view, mut regs, mut sregs) = setup(GATE_INTERRUPT, 0);
        sregs.efer = 0;
        assert_eq!(deliver_on(&view, &mut regs, &sregs), Err(BreakpointError::NotLongMode));
    }
}
