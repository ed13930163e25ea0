//! QEMU's pc-testdev, used by kvm-unit-tests' emulator, realmode, ioapic and eventinj tests:
//! a 32-bit I/O latch (0xe0, and byte-wide at 0xe8), flush-page (0xe4), ISA IRQ line control
//! (0x2000 + line), and a 64 KiB RAM-like MMIO buffer at 0xff000000.

use carve_snapshot::Persist;
use serde::{Deserialize, Serialize};

use super::BusDevice;

pub const LATCH_PORT: u64 = 0xe0;
pub const FLUSH_PAGE_PORT: u64 = 0xe4;
pub const LATCH_BYTE_PORT: u64 = 0xe8;
pub const IRQ_PORT_BASE: u64 = 0x2000;
pub const IRQ_LINES: u64 = 24;
pub const IOMEM_BASE: u64 = 0xff00_0000;
pub const IOMEM_LEN: u64 = 0x1_0000;

/// What the testdev asks of the VM around it.
pub trait TestdevHost: Send {
    fn set_irq_line(&self, line: u32, level: bool);
    /// Makes KVM drop and refault its mapping of the guest page at `gpa`.
    fn flush_page(&self, gpa: u64);
}

pub struct Testdev {
    latch: u32,
    iomem: Vec<u8>,
    host: Box<dyn TestdevHost>,
}

impl Testdev {
    pub fn new(host: Box<dyn TestdevHost>) -> Testdev {
        Testdev { latch: 0, iomem: vec![0; IOMEM_LEN as usize], host }
    }

    /// Where the testdev is mapped: (base, length) on the PIO bus, then on the MMIO bus.
    pub fn pio_ranges() -> [(u64, u64); 4] {
        [(LATCH_PORT, 4), (FLUSH_PAGE_PORT, 4), (LATCH_BYTE_PORT, 4), (IRQ_PORT_BASE, IRQ_LINES)]
    }

    fn latch_mask(offset: u64, len: usize) -> (u32, u32) {
        let shift = (offset as u32 & 3) * 8;
        let bits = (len as u32 * 8).min(32 - shift);
        let mask = if bits == 32 { u32::MAX } else { ((1u32 << bits) - 1) << shift };
        (mask, shift)
    }

    fn iomem_range(&self, offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.iomem.len()).then_some(start..end)
    }
}

impl BusDevice for Testdev {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match base {
            LATCH_PORT | LATCH_BYTE_PORT => {
                let (mask, shift) = Self::latch_mask(offset, data.len());
                let value = ((self.latch & mask) >> shift).to_le_bytes();
                let n = data.len().min(4);
                data[..n].copy_from_slice(&value[..n]);
            }
            IOMEM_BASE => {
                if let Some(range) = self.iomem_range(offset, data.len()) {
                    data.copy_from_slice(&self.iomem[range]);
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let mut word = [0u8; 4];
        let n = data.len().min(4);
        word[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(word);
        match base {
            LATCH_PORT | LATCH_BYTE_PORT => {
                let (mask, shift) = Self::latch_mask(offset, data.len());
                self.latch = (self.latch & !mask) | ((value << shift) & mask);
            }
            FLUSH_PAGE_PORT => self.host.flush_page(u64::from(value) & !0xfff),
            IRQ_PORT_BASE => self.host.set_irq_line(offset as u32, value != 0),
            IOMEM_BASE => {
                if let Some(range) = self.iomem_range(offset, data.len()) {
                    self.iomem[range].copy_from_slice(data);
                }
            }
            _ => {}
        }
    }
}

/// The latch and the MMIO buffer; IRQ line levels are the irqchip's (KVM's state).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestdevState {
    pub latch: u32,
    /// All [`IOMEM_LEN`] bytes.
    pub iomem: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum TestdevStateError {
    #[error("the testdev state's MMIO buffer holds {0} bytes; the device's holds {IOMEM_LEN}")]
    IomemSize(usize),
}

impl Persist for Testdev {
    type State = TestdevState;
    /// The new VM's side of the device (its IRQ lines and memory).
    type ConstructorArgs = Box<dyn TestdevHost>;
    type Error = TestdevStateError;

    fn save(&self) -> Result<TestdevState, TestdevStateError> {
        Ok(TestdevState { latch: self.latch, iomem: self.iomem.clone() })
    }

    fn restore(host: Box<dyn TestdevHost>, state: &TestdevState) -> Result<Testdev, TestdevStateError> {
        if state.iomem.len() as u64 != IOMEM_LEN {
            return Err(TestdevStateError::IomemSize(state.iomem.len()));
        }
        Ok(Testdev { latch: state.latch, iomem: state.iomem.clone(), host })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);
    impl TestdevHost for Recorder {
        fn set_irq_line(&self, line: u32, level: bool) {
            self.0.lock().unwrap().push(format!("irq {line} {level}"));
        }
        fn flush_page(&self, gpa: u64) {
            self.0.lock().unwrap().push(format!("flush {gpa:#x}"));
        }
    }

    #[test]
    fn latch_is_shared_between_word_and_byte_ports() {
        let mut dev = Testdev::new(Box::new(Recorder::default()));
        dev.write(LATCH_PORT, 0, &0xdead_beefu32.to_le_bytes());
        dev.write(LATCH_BYTE_PORT, 2, &[0x11]);
        let mut word = [0u8; 4];
        dev.read(LATCH_PORT, 0, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0xde11_beef);
        let mut half = [0u8; 2];
        dev.read(LATCH_PORT, 2, &mut half);
        assert_eq!(u16::from_le_bytes(half), 0xde11);
        let mut wide = [0u8; 4];
        dev.read(LATCH_PORT, 3, &mut wide);
        assert_eq!(u32::from_le_bytes(wide), 0xde);
    }

    #[test]
    fn iomem_is_ram_like_and_bounded() {
        let mut dev = Testdev::new(Box::new(Recorder::default()));
        dev.write(IOMEM_BASE, 0xfffe, &[1, 2]);
        let mut data = [0u8; 2];
        dev.read(IOMEM_BASE, 0xfffe, &mut data);
        assert_eq!(data, [1, 2]);
        dev.write(IOMEM_BASE, 0xffff, &[1, 2]); // runs past the buffer: ignored
        dev.read(IOMEM_BASE, u64::MAX, &mut data);
        assert_eq!(data, [0, 0]);
    }

    #[test]
    fn irq_and_flush_reach_the_host() {
        let recorder = Recorder::default();
        let mut dev = Testdev::new(Box::new(recorder.clone()));
        dev.write(IRQ_PORT_BASE, 10, &[1]);
        dev.write(IRQ_PORT_BASE, 10, &[0]);
        dev.write(FLUSH_PAGE_PORT, 0, &0x0020_0123u32.to_le_bytes());
        assert_eq!(*recorder.0.lock().unwrap(), ["irq 10 true", "irq 10 false", "flush 0x200000"]);
    }

    #[test]
    fn latch_and_buffer_survive_a_restore() {
        let mut dev = Testdev::new(Box::new(Recorder::default()));
        dev.write(LATCH_PORT, 0, &0x1234_5678u32.to_le_bytes());
        dev.write(IOMEM_BASE, 0x100, &[9, 8, 7]);
        let state = dev.save().unwrap();
        let recorder = Recorder::default();
        let mut dev = Testdev::restore(Box::new(recorder.clone()), &state).unwrap();
        assert_eq!(dev.save().unwrap(), state, "save, restore, save: the same state");
        let mut word = [0u8; 4];
        dev.read(LATCH_PORT, 0, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0x1234_5678);
        let mut data = [0u8; 3];
        dev.read(IOMEM_BASE, 0x100, &mut data);
        assert_eq!(data, [9, 8, 7]);
        dev.write(IRQ_PORT_BASE, 5, &[1]);
        assert_eq!(*recorder.0.lock().unwrap(), ["irq 5 true"], "the new host gets the effects");
    }

    #[test]
    fn a_buffer_of_another_size_is_refused() {
        for len in [0, IOMEM_LEN as usize - 1, IOMEM_LEN as usize + 1] {
            let state = TestdevState { latch: 0, iomem: vec![0; len] };
            let error = Testdev::restore(Box::new(Recorder::default()), &state).err().unwrap();
            assert!(matches!(error, TestdevStateError::IomemSize(n) if n == len), "{error}");
        }
        let error = TestdevStateError::IomemSize(3);
        assert_eq!(
            error.to_string(),
            "the testdev state's MMIO buffer holds 3 bytes; the device's holds 65536"
        );
    }
}
