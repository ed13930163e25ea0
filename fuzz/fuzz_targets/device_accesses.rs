//! Guest-controlled port and MMIO accesses against carve's devices: never a panic.
#![no_main]

use std::sync::{Arc, Mutex};

use carve_vmm::devices::bus::Bus;
use carve_vmm::devices::fw_cfg::FwCfg;
use carve_vmm::devices::testdev::{Testdev, TestdevHost};
use libfuzzer_sys::fuzz_target;

struct NoHost;
impl TestdevHost for NoHost {
    fn set_irq_line(&self, _line: u32, _level: bool) {}
    fn flush_page(&self, _gpa: u64) {}
}

fuzz_target!(|data: &[u8]| {
    let mut pio = Bus::default();
    let testdev = Arc::new(Mutex::new(Testdev::new(Box::new(NoHost))));
    for (base, len) in Testdev::pio_ranges() {
        pio.insert(testdev.clone(), base, len).unwrap();
    }
    pio.insert(testdev, 0xff00_0000, 0x1_0000).unwrap();
    pio.insert(Arc::new(Mutex::new(FwCfg::new(2, 8, 1 << 30))), 0x510, 2).unwrap();
    // Each access: 1 byte op (write?, size), 8 bytes address, up to 8 bytes data.
    for chunk in data.chunks(17) {
        if chunk.len() < 9 {
            break;
        }
        let size = [1usize, 2, 4, 8][(chunk[0] & 3) as usize];
        let addr = u64::from_le_bytes(chunk[1..9].try_into().unwrap()) % 0x1_0000_0000;
        let mut buf = [0u8; 8];
        let n = (chunk.len() - 9).min(size);
        buf[..n].copy_from_slice(&chunk[9..9 + n]);
        if chunk[0] & 0x80 != 0 {
            pio.write(addr, &buf[..size]);
        } else {
            pio.read(addr, &mut buf[..size]);
        }
    }
});
