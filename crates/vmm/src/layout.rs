//! The guest-physical address map carve builds for every VM.
//!
//! ```text
//! 0x0000_0500  GDT                        0x0000_9000  PML4, PDPT, 4 PDs (64-bit boot)
//! 0x0000_0528  IDT (empty)                0x0002_0000  kernel command line (64 KiB max)
//! 0x0000_6000  PVH start_info             0x0009_fc00  MP table (EBDA)
//! 0x0000_7000  Linux zero page            0x0010_0000  kernel
//! 0x0000_8ff0  boot stack top             0x000e_0000  ACPI: RSDP, then the other tables
//!                                          0xc000_0000  MMIO gap up to 4 GiB; RAM beyond
//! 0xd000_0000  virtio-mmio windows, 4 KiB each, IRQs from 5
//! 0xd100_0000  interrupt-message-store test device (with --testdev)
//! ```
//!
//! Multiboot kernels may be linked anywhere (kvm-unit-tests' realmode.flat sits at 16 KiB), so
//! their information block and command line go on the page after the kernel instead.

pub const GDT_START: u64 = 0x500;
/// After the GDT's five descriptors (null, null, code, data, TSS).
pub const IDT_START: u64 = 0x528;
pub const BOOT_TABLES_END: u64 = IDT_START + 8;
pub const BOOT_INFO_START: u64 = 0x6000;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x2_0000;
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
pub const EBDA_START: u64 = 0x9_fc00;
/// The BIOS area Linux scans for the RSDP; not RAM in the e820 map.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
pub const HIMEM_START: u64 = 0x10_0000;
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Room for this many virtio-mmio devices.
pub const VIRTIO_MMIO_SLOTS: u64 = 16;
pub const MSI_TESTDEV_START: u64 = 0xd100_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's real-mode TSS (three pages) on Intel hosts without unrestricted guest.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// ISA IRQ lines routed through the IOAPIC.
pub const SERIAL_IRQ: u32 = 4;
/// virtio-mmio devices get IRQs 5, 6, … (ISA lines: edge-triggered, active high).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
