//! QEMU's fw_cfg over I/O ports (selector 0x510, data 0x511): the items kvm-unit-tests reads.

use std::collections::BTreeMap;

use super::BusDevice;

pub const FW_CFG_BASE: u64 = 0x510;
pub const FW_CFG_LEN: u64 = 2;

pub const KEY_SIGNATURE: u16 = 0x00;
pub const KEY_ID: u16 = 0x01;
pub const KEY_RAM_SIZE: u16 = 0x03;
pub const KEY_NOGRAPHIC: u16 = 0x04;
pub const KEY_NB_CPUS: u16 = 0x05;
pub const KEY_MAX_CPUS: u16 = 0x0f;
pub const KEY_FILE_DIR: u16 = 0x19;

pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    selected: u16,
    offset: usize,
}

impl FwCfg {
    pub fn new(cpus: u16, max_cpus: u16, ram_bytes: u64) -> FwCfg {
        let items = BTreeMap::from([
            (KEY_SIGNATURE, b"QEMU".to_vec()),
            (KEY_ID, 0u32.to_le_bytes().to_vec()), // traditional interface only, no DMA
            (KEY_RAM_SIZE, ram_bytes.to_le_bytes().to_vec()),
            (KEY_NOGRAPHIC, 1u16.to_le_bytes().to_vec()),
            (KEY_NB_CPUS, cpus.to_le_bytes().to_vec()),
            (KEY_MAX_CPUS, max_cpus.to_le_bytes().to_vec()),
            (KEY_FILE_DIR, 0u32.to_be_bytes().to_vec()), // no files
        ]);
        FwCfg { items, selected: KEY_SIGNATURE, offset: 0 }
    }

    fn next_byte(&mut self) -> u8 {
        let byte = self.items.get(&self.selected).and_then(|item| item.get(self.offset)).copied();
        self.offset = self.offset.saturating_add(1);
        byte.unwrap_or(0)
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match offset {
            1 => data.iter_mut().for_each(|b| *b = self.next_byte()),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 2 {
            self.selected = u16::from_le_bytes([data[0], data[1]]);
            self.offset = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_item(dev: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
        dev.write(FW_CFG_BASE, 0, &key.to_le_bytes());
        (0..len)
            .map(|_| {
                let mut b = [0];
                dev.read(FW_CFG_BASE, 1, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn answers_signature_cpus_and_ram() {
        let mut dev = FwCfg::new(3, 8, 128 << 20);
        assert_eq!(read_item(&mut dev, KEY_SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut dev, KEY_NB_CPUS, 2), [3, 0]);
        assert_eq!(read_item(&mut dev, KEY_MAX_CPUS, 2), [8, 0]);
        assert_eq!(read_item(&mut dev, KEY_RAM_SIZE, 8), (128u64 << 20).to_le_bytes());
    }

    #[test]
    fn unknown_keys_and_reads_past_the_end_are_zero() {
        let mut dev = FwCfg::new(1, 1, 0);
        assert_eq!(read_item(&mut dev, 0x4242, 3), [0, 0, 0]);
        assert_eq!(read_item(&mut dev, KEY_SIGNATURE, 6), [b'Q', b'E', b'M', b'U', 0, 0]);
        dev.write(FW_CFG_BASE, 0, &[1]); // a 1-byte selector write is ignored
        let mut b = [0xaa];
        dev.read(FW_CFG_BASE, 0, &mut b);
        assert_eq!(b, [0]);
    }
}
