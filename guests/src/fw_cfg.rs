//! QEMU fw_cfg over I/O ports, as kvm-unit-tests uses it.

use crate::io::{inb, outw};

const SELECTOR: u16 = 0x510;
const DATA: u16 = 0x511;

pub const SIGNATURE: u16 = 0x00;
pub const RAM_SIZE: u16 = 0x03;
pub const NB_CPUS: u16 = 0x05;
pub const MAX_CPUS: u16 = 0x0f;

/// Selects `key` and reads `N` bytes of its item.
pub fn read<const N: usize>(key: u16) -> [u8; N] {
    outw(SELECTOR, key);
    let mut bytes = [0u8; N];
    for byte in bytes.iter_mut() {
        *byte = inb(DATA);
    }
    bytes
}

pub fn read_u64(key: u16) -> u64 {
    u64::from_le_bytes(read::<8>(key))
}

pub fn read_u16(key: u16) -> u16 {
    u16::from_le_bytes(read::<2>(key))
}
