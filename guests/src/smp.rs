//! Finding the processors in the MP table and waking them with INIT/SIPI.

use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use crate::entry::{ap_trampoline, AP_TRAMPOLINE};
use crate::io::{phys_slice, read_phys, write_phys};

pub const MAX_APS: usize = 16;
const LAPIC: u64 = 0xfee0_0000;
const ICR_LOW: u64 = LAPIC + 0x300;
const ICR_HIGH: u64 = LAPIC + 0x310;
const ICR_BUSY: u32 = 1 << 12;

static STARTED_APS: AtomicU32 = AtomicU32::new(0);
static AP_WORK: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

/// Counts an AP in; returns its number (1, 2, …).
pub(crate) fn ap_started() -> u32 {
    STARTED_APS.fetch_add(1, Ordering::SeqCst) + 1
}

/// Gives the application processors started after this call `work` to run (with their number)
/// before they park.
pub fn set_ap_work(work: fn(u32)) {
    AP_WORK.store(work as *mut (), Ordering::SeqCst);
}

pub(crate) fn ap_work() -> Option<fn(u32)> {
    let work = AP_WORK.load(Ordering::SeqCst);
    // SAFETY: AP_WORK holds null or a `fn(u32)` stored by `set_ap_work`.
    (!work.is_null()).then(|| unsafe { core::mem::transmute::<*mut (), fn(u32)>(work) })
}

pub fn started_aps() -> u32 {
    STARTED_APS.load(Ordering::SeqCst)
}

/// The processors an MP configuration table lists.
pub struct MpTable {
    pub cpus: u32,
    pub bsp_apic_id: Option<u8>,
    pub ioapics: u32,
    pub interrupt_sources: u32,
}

/// Scans the EBDA's first KiB, then 0xf0000..0x100000, for the MP floating pointer.
pub fn find_mp_table() -> Option<MpTable> {
    let ebda = (read_phys::<u16>(0x40e) as u64) << 4;
    let candidates = [(ebda, 1024), (0x9fc00, 1024), (0xf0000, 0x10000)];
    for (base, len) in candidates {
        if base == 0 {
            continue;
        }
        let area = phys_slice(base, len);
        for offset in (0..len.saturating_sub(16)).step_by(16) {
            let fps = &area[offset..offset + 16];
            if &fps[..4] == b"_MP_" && checksum(fps) == 0 {
                let config = u32::from_le_bytes([fps[4], fps[5], fps[6], fps[7]]) as u64;
                return parse_config(config);
            }
        }
    }
    None
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b))
}

fn parse_config(addr: u64) -> Option<MpTable> {
    let header = phys_slice(addr, 44);
    if &header[..4] != b"PCMP" {
        return None;
    }
    let length = u16::from_le_bytes([header[4], header[5]]) as usize;
    if checksum(phys_slice(addr, length)) != 0 {
        return None;
    }
    let count = u16::from_le_bytes([header[34], header[35]]);
    let mut table = MpTable { cpus: 0, bsp_apic_id: None, ioapics: 0, interrupt_sources: 0 };
    let mut entry = addr + 44;
    for _ in 0..count {
        let kind = read_phys::<u8>(entry);
        match kind {
            0 => {
                let flags = read_phys::<u8>(entry + 3);
                if flags & 1 != 0 {
                    table.cpus += 1;
                }
                if flags & 2 != 0 {
                    table.bsp_apic_id = Some(read_phys(entry + 1));
                }
                entry += 20;
            }
            2 => {
                table.ioapics += 1;
                entry += 8;
            }
            3 => {
                table.interrupt_sources += 1;
                entry += 8;
            }
            1 | 4 => entry += 8,
            _ => return None,
        }
    }
    Some(table)
}

fn send_ipi(low: u32) {
    write_phys::<u32>(ICR_HIGH, 0);
    write_phys::<u32>(ICR_LOW, low);
    while read_phys::<u32>(ICR_LOW) & ICR_BUSY != 0 {}
}

fn spin(iterations: u32) {
    for _ in 0..iterations {
        core::hint::spin_loop();
    }
}

/// Wakes every other processor (INIT, then SIPI twice) and waits until `expected` of them
/// have reached 64-bit Rust code. Returns how many did.
pub fn start_aps(expected: u32) -> u32 {
    let code = ap_trampoline();
    for (i, &byte) in code.iter().enumerate() {
        write_phys::<u8>(AP_TRAMPOLINE + i as u64, byte);
    }
    // Enable the local APIC (spurious vector register, bit 8).
    let svr = read_phys::<u32>(LAPIC + 0xf0);
    write_phys::<u32>(LAPIC + 0xf0, svr | 0x1ff);

    const ALL_BUT_SELF: u32 = 0b11 << 18;
    const ASSERT: u32 = 1 << 14;
    send_ipi(ALL_BUT_SELF | ASSERT | 0x500);
    spin(1000);
    let sipi = ALL_BUT_SELF | ASSERT | 0x600 | (AP_TRAMPOLINE >> 12) as u32;
    send_ipi(sipi);
    spin(1000);
    if started_aps() < expected {
        send_ipi(sipi);
    }
    for _ in 0..2_000_000 {
        if started_aps() >= expected {
            break;
        }
        core::hint::spin_loop();
    }
    started_aps()
}
