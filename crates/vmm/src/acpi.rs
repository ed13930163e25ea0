//! ACPI tables (acpi_tables crate): RSDP → XSDT → FADT (→ DSDT), MADT. The DSDT describes each
//! virtio-mmio device as `LNRO0005` with its window and interrupt, so kernels find them without
//! `virtio_mmio.device=` on the command line (which needs VIRTIO_MMIO_CMDLINE_DEVICES). A VM
//! with a virtual EPC also gets `\_SB.EPC_` (INT0E0C) with the whole EPC region, as QEMU and
//! Cloud Hypervisor describe it.

use crate::memory::{GuestRam, RamRange};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::i8042::{I8042_BASE, RESET_COMMAND};
use crate::devices::virtio::VirtioSlot;
use crate::layout::{ACPI_END, ACPI_START, IOAPIC_START, LAPIC_START};

const OEM_ID: [u8; 6] = *b"CARVE ";
const OEM_TABLE_ID: [u8; 8] = *b"CARVEVM ";
const OEM_REVISION: u32 = 1;
/// IA-PC boot architecture flags: an 8042 is present (reset goes through it).
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables ({size} bytes) do not fit below {limit:#x}")]
    TooLarge { size: u64, limit: u64 },
    #[error("cannot write the ACPI tables to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Writes every table and returns the RSDP's address (also found by the BIOS-area scan). `epc`
/// is the virtual EPC region, if the VM has one.
pub fn write(
    mem: &GuestRam,
    vcpus: u8,
    virtio: &[VirtioSlot],
    epc: Option<RamRange>,
) -> Result<GuestAddress, AcpiError> {
    let mut writer = TableWriter { mem, next: ACPI_START + Rsdp::len() as u64 };

    let dsdt = writer.put(dsdt(virtio, epc).as_slice())?;
    let fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt.0)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    let mut fadt = fadt;
    fadt.reset_reg = GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, I8042_BASE + 4);
    fadt.reset_value = RESET_COMMAND;
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_8042.into();
    let fadt = writer.put(&bytes_of(&fadt.finalize()))?;
    let madt = writer.put(&bytes_of(&madt(vcpus)))?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt.0);
    xsdt.add_entry(madt.0);
    let xsdt = writer.put(&bytes_of(&xsdt))?;

    let rsdp = GuestAddress(ACPI_START);
    mem.write_slice(&bytes_of(&Rsdp::new(OEM_ID, xsdt.0)), rsdp)?;
    Ok(rsdp)
}

fn madt(vcpus: u8) -> MADT {
    let mut madt =
        MADT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION, LocalInterruptController::Address(LAPIC_START as u32));
    for cpu in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    madt
}

fn dsdt(virtio: &[VirtioSlot], epc: Option<RamRange>) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    for (index, slot) in virtio.iter().enumerate() {
        let name = format!("V{index:03X}");
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &(index as u32));
        let window = aml::Memory32Fixed::new(true, slot.base as u32, slot.len as u32);
        let irq = aml::Interrupt::new(true, true, false, false, slot.irq);
        let resources = aml::ResourceTemplate::new(vec![&window, &irq]);
        let crs = aml::Name::new("_CRS".into(), &resources);
        let device = aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]);
        device.to_aml_bytes(&mut body);
    }
    if let Some(epc) = epc {
        body.extend(epc_device(epc));
    }
    let scope = aml::Scope::raw("_SB_".into(), body);
    dsdt.append_slice(&scope);
    dsdt
}

/// `\_SB.EPC_`: the guest's SGX driver finds EPC sections in CPUID; this device (the
/// INT0E0C ID QEMU gives it) tells the OS the region is taken.
fn epc_device(epc: RamRange) -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("INT0E0C"));
    let region = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        epc.base,
        epc.end() - 1,
        None,
    );
    let resources = aml::ResourceTemplate::new(vec![&region]);
    let crs = aml::Name::new("_CRS".into(), &resources);
    let present = aml::Return::new(&0xfu8);
    let sta = aml::Method::new("_STA".into(), 0, false, vec![&present]);
    bytes_of(&aml::Device::new("EPC_".into(), vec![&hid, &crs, &sta]))
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Places tables one after another after the RSDP, 8-byte aligned.
struct TableWriter<'a> {
    mem: &'a GuestRam,
    next: u64,
}

impl TableWriter<'_> {
    fn put(&mut self, table: &[u8]) -> Result<GuestAddress, AcpiError> {
        let at = self.next.next_multiple_of(8);
        let end = at + table.len() as u64;
        if end > ACPI_END {
            return Err(AcpiError::TooLarge { size: end - ACPI_START, limit: ACPI_END });
        }
        self.mem.write_slice(table, GuestAddress(at))?;
        self.next = end;
        Ok(GuestAddress(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    fn table_at(mem: &GuestRam, addr: u64) -> Vec<u8> {
        let mut header = [0u8; 8];
        mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
        let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        assert_eq!(
            table.iter().fold(0u8, |s, &b| s.wrapping_add(b)),
            0,
            "{} checksum",
            String::from_utf8_lossy(&header[..4])
        );
        table
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums_and_name_each_virtio_device() {
        let mem = crate::memory::create(128, crate::memory::MemoryBacking::Anonymous).unwrap();
        let slots = [
            VirtioSlot { base: 0xd000_0000, len: 0x1000, irq: 5 },
            VirtioSlot { base: 0xd000_1000, len: 0x1000, irq: 6 },
        ];
        let rsdp = write(&mem, 2, &slots, None).unwrap();
        let mut raw = [0u8; 36];
        mem.read_slice(&mut raw, rsdp).unwrap();
        assert_eq!(&raw[..8], b"RSD PTR ");
        assert_eq!(raw[..20].iter().fold(0u8, |s, &b| s.wrapping_add(b)), 0);
        assert_eq!(raw.iter().fold(0u8, |s, &b| s.wrapping_add(b)), 0);
        let xsdt = table_at(&mem, u64::from_le_bytes(raw[24..32].try_into().unwrap()));
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<Vec<u8>> =
            xsdt[36..].chunks(8).map(|c| table_at(&mem, u64::from_le_bytes(c.try_into().unwrap()))).collect();
        let fadt = entries.iter().find(|t| &t[..4] == b"FACP").expect("FADT");
        let madt = entries.iter().find(|t| &t[..4] == b"APIC").expect("MADT");
        // Two local APICs (type 0) and one IOAPIC (type 1) after the 44-byte header.
        let mut kinds = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            kinds.push(madt[at]);
            at += madt[at + 1] as usize;
        }
        assert_eq!(kinds, [0, 0, 1]);
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&mem, dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        let text = String::from_utf8_lossy(&dsdt);
        assert_eq!(text.matches("LNRO0005").count(), 2);
        // Memory32Fixed descriptors (0x86) carry each window's base and length.
        for slot in &slots {
            let mut needle = vec![0x86, 9, 0, 1];
            needle.extend_from_slice(&(slot.base as u32).to_le_bytes());
            needle.extend_from_slice(&(slot.len as u32).to_le_bytes());
            assert!(dsdt.windows(needle.len()).any(|w| w == needle), "window of {:#x}", slot.base);
            let irq = [0x89, 6, 0, 0b0011, 1, slot.irq as u8, 0, 0, 0];
            assert!(dsdt.windows(irq.len()).any(|w| w == irq), "interrupt {}", slot.irq);
        }
        assert!(mem.address_in_range(GuestAddress(ACPI_END - 1)));
    }

    /// The DSDT `write` put in `mem`, found from the RSDP.
    fn written_dsdt(mem: &GuestRam, rsdp: GuestAddress) -> Vec<u8> {
        let mut raw = [0u8; 36];
        mem.read_slice(&mut raw, rsdp).unwrap();
        let xsdt = table_at(mem, u64::from_le_bytes(raw[24..32].try_into().unwrap()));
        let fadt = xsdt[36..]
            .chunks(8)
            .map(|c| table_at(mem, u64::from_le_bytes(c.try_into().unwrap())))
            .find(|t| &t[..4] == b"FACP")
            .expect("FADT");
        table_at(mem, u64::from_le_bytes(fadt[140..148].try_into().unwrap()))
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn only_a_vm_with_an_epc_has_the_epc_device_over_its_whole_region() {
        // DWordPrefix, then EISAID("INT0E0C") = 0x0c0ed425 little-endian.
        const INT0E0C: [u8; 5] = [0x0c, 0x25, 0xd4, 0x0e, 0x0c];
        let slots = [VirtioSlot { base: 0xd000_0000, len: 0x1000, irq: 5 }];

        let mem = crate::memory::create(128, crate::memory::MemoryBacking::Anonymous).unwrap();
        let plain = written_dsdt(&mem, write(&mem, 1, &slots, None).unwrap());
        assert!(!contains(&plain, &INT0E0C) && !contains(&plain, b"EPC_"));
        assert_eq!(plain, dsdt(&slots, None).as_slice());

        let epc = RamRange { base: 0x1_0000_0000, size: 96 << 20 };
        let mem = crate::memory::create(128, crate::memory::MemoryBacking::Anonymous).unwrap();
        let with_epc = written_dsdt(&mem, write(&mem, 1, &slots, Some(epc)).unwrap());
        assert!(contains(&with_epc, &[b"EPC_".as_slice(), &[0x08], b"_HID", &INT0E0C].concat()));
        assert_eq!(with_epc.windows(INT0E0C.len()).filter(|w| *w == INT0E0C).count(), 1);
        // QWord address space descriptor: memory, min and max fixed, read-write, not cacheable;
        // granularity 0, min, max, translation 0, length.
        let mut qword = vec![0x8a, 43, 0, 0, 0b1100, 1];
        for value in [0, epc.base, epc.end() - 1, 0, epc.size] {
            qword.extend_from_slice(&u64::to_le_bytes(value));
        }
        assert!(contains(&with_epc, &qword), "the EPC's QWord memory range");
        // Method (_STA, 0) { Return (0x0F) }
        assert!(contains(&with_epc, &[b"_STA".as_slice(), &[0, 0xa4, 0x0a, 0x0f]].concat()));
        // The virtio device is described as before.
        assert_eq!(with_epc.windows(8).filter(|w| *w == b"LNRO0005").count(), 1);
    }
}
