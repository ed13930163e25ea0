//! The Intel MultiProcessor Specification 1.4 table, so guests without ACPI find every vCPU,
//! the IOAPIC and the ISA interrupt routing.

use crate::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{EBDA_START, IOAPIC_START, LAPIC_START};

/// xAPIC IDs are 8 bits and 0xff is broadcast; the IOAPIC takes the ID after the last vCPU.
pub const MAX_CPUS: u8 = 254;
const ISA_IRQS: u8 = 16;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201; // FPU | APIC

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit an MP table (at most {MAX_CPUS})")]
    TooManyCpus(u8),
    #[error("cannot write the MP table into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_sub(b))
}

/// The table's bytes: floating pointer at `base`, configuration table right after it.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus + 1;
    let mut entries = Vec::new();
    let mut count = 0u16;
    for cpu in 0..cpus {
        let flags = 1 | if cpu == 0 { 2 } else { 0 }; // enabled, bootstrap
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 2;
    for irq in 0..ISA_IRQS {
        // IRQ 0 arrives on IOAPIC pin 2, as on PCs and as KVM's default routing has it.
        let pin = if irq == 0 { 2 } else { irq };
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, pin]);
        count += 1;
    }
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]); // ExtINT -> LINT0
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]); // NMI -> LINT1
    count += 2;

    let config_base = base + 16;
    let mut config = Vec::with_capacity(44 + entries.len());
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    config.extend_from_slice(&[4, 0]); // spec revision 1.4, checksum
    config.extend_from_slice(b"CARVE   ");
    config.extend_from_slice(b"MICROVM     ");
    config.extend_from_slice(&[0; 6]); // OEM table pointer and size
    config.extend_from_slice(&count.to_le_bytes());
    config.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    config.extend_from_slice(&[0; 4]); // extended table length and checksum
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut table = Vec::with_capacity(16 + config.len());
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&(config_base as u32).to_le_bytes());
    table.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    table[10] = checksum(&table);
    table.extend_from_slice(&config);
    Ok(table)
}

pub fn write(mem: &GuestRam, cpus: u8) -> Result<(), MpTableError> {
    let table = build(cpus, EBDA_START)?;
    mem.write_slice(&table, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
    }

    #[test]
    fn checksums_hold_and_every_cpu_is_listed() {
        let table = build(4, EBDA_START).unwrap();
        assert_eq!(&table[..4], b"_MP_");
        assert_eq!(sum(&table[..16]), 0);
        let config = &table[16..];
        let length = u16::from_le_bytes([config[4], config[5]]) as usize;
        assert_eq!(length, config.len());
        assert_eq!(sum(config), 0);
        let processors = config[44..].chunks(20).take(4).filter(|e| e[0] == 0 && e[3] & 1 == 1).count();
        assert_eq!(processors, 4);
        assert_eq!(config[44 + 3] & 2, 2, "vCPU 0 is the bootstrap processor");
    }

    #[test]
    fn cpu_count_is_bounded() {
        assert!(build(0, 0).is_err());
        assert!(build(255, 0).is_err());
        assert!(build(254, EBDA_START).is_ok());
    }
}
