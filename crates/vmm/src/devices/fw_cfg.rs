//! QEMU's fw_cfg over I/O ports (selector 0x510, data 0x511): the items kvm-unit-tests reads.

use std::collections::BTreeMap;

use carve_snapshot::Persist;
use serde::{Deserialize, Serialize};

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

    /// Item `key`'s bytes (none for a key fw_cfg does not have).
    fn item(&self, key: u16) -> &[u8] {
        self.items.get(&key).map_or(&[], Vec::as_slice)
    }

    /// Reads past the item's end are zeros and leave the offset at its end, so the offset is
    /// always within the item.
    fn next_byte(&mut self) -> u8 {
        let byte = self.item(self.selected).get(self.offset).copied();
        if byte.is_some() {
            self.offset += 1;
        }
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

/// What fw_cfg's items are built from: the VM's configuration, not its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgConfig {
    pub cpus: u16,
    pub max_cpus: u16,
    pub ram_bytes: u64,
}

/// Where the guest is reading: the selected item and the next byte of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgState {
    pub selected: u16,
    pub offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FwCfgStateError {
    #[error("the fw_cfg state reads item {key:#x} at byte {offset}, but that item holds {len} bytes")]
    OffsetPastItem { key: u16, offset: u64, len: usize },
}

impl Persist for FwCfg {
    type State = FwCfgState;
    /// The items are rebuilt from the same configuration the VM was built with.
    type ConstructorArgs = FwCfgConfig;
    type Error = FwCfgStateError;

    fn save(&self) -> Result<FwCfgState, FwCfgStateError> {
        Ok(FwCfgState { selected: self.selected, offset: self.offset as u64 })
    }

    fn restore(config: FwCfgConfig, state: &FwCfgState) -> Result<FwCfg, FwCfgStateError> {
        let mut fw_cfg = FwCfg::new(config.cpus, config.max_cpus, config.ram_bytes);
        let len = fw_cfg.item(state.selected).len();
        let offset = usize::try_from(state.offset)
            .ok()
            .filter(|&offset| offset <= len)
            .ok_or(FwCfgStateError::OffsetPastItem { key: state.selected, offset: state.offset, len })?;
        fw_cfg.selected = state.selected;
        fw_cfg.offset = offset;
        Ok(fw_cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: FwCfgConfig = FwCfgConfig { cpus: 2, max_cpus: 4, ram_bytes: 64 << 20 };

    fn read_byte(dev: &mut FwCfg) -> u8 {
        let mut b = [0];
        dev.read(FW_CFG_BASE, 1, &mut b);
        b[0]
    }

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

    #[test]
    fn a_read_resumes_where_it_was_saved() {
        let mut dev = FwCfg::new(CONFIG.cpus, CONFIG.max_cpus, CONFIG.ram_bytes);
        dev.write(FW_CFG_BASE, 0, &KEY_SIGNATURE.to_le_bytes());
        assert_eq!(read_byte(&mut dev), b'Q');
        let state = dev.save().unwrap();
        assert_eq!(state, FwCfgState { selected: KEY_SIGNATURE, offset: 1 });
        let mut restored = FwCfg::restore(CONFIG, &state).unwrap();
        assert_eq!(restored.save().unwrap(), state, "save, restore, save: the same state");
        assert_eq!([read_byte(&mut restored), read_byte(&mut restored), read_byte(&mut restored)], *b"EMU");
        assert_eq!(read_byte(&mut restored), 0, "past the end");
        assert_eq!(
            restored.save().unwrap(),
            FwCfgState { selected: KEY_SIGNATURE, offset: 4 },
            "stays at the end"
        );
        assert_eq!(read_item(&mut restored, KEY_NB_CPUS, 2), [2, 0], "items come from the configuration");
    }

    #[test]
    fn positions_outside_the_rebuilt_items_are_refused() {
        let at_end = FwCfgState { selected: KEY_RAM_SIZE, offset: 8 };
        assert_eq!(FwCfg::restore(CONFIG, &at_end).unwrap().save().unwrap(), at_end);
        let unknown = FwCfgState { selected: 0x4242, offset: 0 };
        assert_eq!(
            FwCfg::restore(CONFIG, &unknown).unwrap().save().unwrap(),
            unknown,
            "any key can be selected"
        );

        let error = FwCfg::restore(CONFIG, &FwCfgState { selected: KEY_RAM_SIZE, offset: 9 }).err().unwrap();
        assert_eq!(
            error.to_string(),
            "the fw_cfg state reads item 0x3 at byte 9, but that item holds 8 bytes"
        );
        for state in
            [FwCfgState { selected: 0x4242, offset: 1 }, FwCfgState { selected: 0, offset: u64::MAX }]
        {
            let error = FwCfg::restore(CONFIG, &state).err().unwrap();
            assert!(matches!(error, FwCfgStateError::OffsetPastItem { .. }), "{error}");
        }
    }
}
