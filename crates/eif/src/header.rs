//! The 548-byte EIF header and the 12-byte section headers, big-endian on disk.

use crate::EifError;

pub const MAGIC: [u8; 4] = *b".eif";
pub const CURRENT_VERSION: u16 = 4;
pub const MAX_SECTIONS: usize = 32;
pub const HEADER_LEN: usize = 548;
pub const SECTION_HEADER_LEN: usize = 12;
/// The header bytes the CRC covers: all but the CRC field itself.
pub const HEADER_CRC_COVERED: usize = HEADER_LEN - 4;
/// Header flag bit 0: the image is for aarch64 (clear: x86_64).
pub const FLAG_ARCH_ARM64: u16 = 1;
/// What nitro-cli writes into the (unused) default memory and CPU fields.
pub const DEFAULT_MEM: u64 = 1 << 30;
pub const DEFAULT_CPUS: u64 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SectionType {
    Kernel,
    Cmdline,
    Ramdisk,
    Signature,
    Metadata,
}

impl SectionType {
    pub fn from_u16(value: u16) -> Option<SectionType> {
        match value {
            1 => Some(SectionType::Kernel),
            2 => Some(SectionType::Cmdline),
            3 => Some(SectionType::Ramdisk),
            4 => Some(SectionType::Signature),
            5 => Some(SectionType::Metadata),
            _ => None,
        }
    }

    pub fn to_u16(self) -> u16 {
        match self {
            SectionType::Kernel => 1,
            SectionType::Cmdline => 2,
            SectionType::Ramdisk => 3,
            SectionType::Signature => 4,
            SectionType::Metadata => 5,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SectionType::Kernel => "kernel",
            SectionType::Cmdline => "cmdline",
            SectionType::Ramdisk => "ramdisk",
            SectionType::Signature => "signature",
            SectionType::Metadata => "metadata",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EifHeader {
    pub version: u16,
    pub flags: u16,
    pub default_mem: u64,
    pub default_cpus: u64,
    pub num_sections: u16,
    pub section_offsets: [u64; MAX_SECTIONS],
    pub section_sizes: [u64; MAX_SECTIONS],
    pub crc32: u32,
}

impl EifHeader {
    /// Parses the header, checking what can be checked without the sections: magic, version
    /// and section count.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<EifHeader, EifError> {
        if bytes[..4] != MAGIC {
            return Err(EifError::BadMagic(bytes[..4].try_into().expect("four bytes")));
        }
        let u16_at = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
        let u64_at = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("eight bytes"));
        let version = u16_at(4);
        if !(2..=CURRENT_VERSION).contains(&version) {
            return Err(EifError::UnsupportedVersion(version));
        }
        let num_sections = u16_at(0x1a);
        if usize::from(num_sections) > MAX_SECTIONS {
            return Err(EifError::TooManySections(num_sections));
        }
        let mut header = EifHeader {
            version,
            flags: u16_at(6),
            default_mem: u64_at(8),
            default_cpus: u64_at(0x10),
            num_sections,
            section_offsets: [0; MAX_SECTIONS],
            section_sizes: [0; MAX_SECTIONS],
            crc32: u32::from_be_bytes(bytes[HEADER_CRC_COVERED..].try_into().expect("four bytes")),
        };
        for i in 0..MAX_SECTIONS {
            header.section_offsets[i] = u64_at(0x1c + 8 * i);
            header.section_sizes[i] = u64_at(0x11c + 8 * i);
        }
        Ok(header)
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[..4].copy_from_slice(&MAGIC);
        bytes[4..6].copy_from_slice(&self.version.to_be_bytes());
        bytes[6..8].copy_from_slice(&self.flags.to_be_bytes());
        bytes[8..0x10].copy_from_slice(&self.default_mem.to_be_bytes());
        bytes[0x10..0x18].copy_from_slice(&self.default_cpus.to_be_bytes());
        bytes[0x1a..0x1c].copy_from_slice(&self.num_sections.to_be_bytes());
        for i in 0..MAX_SECTIONS {
            bytes[0x1c + 8 * i..0x24 + 8 * i].copy_from_slice(&self.section_offsets[i].to_be_bytes());
            bytes[0x11c + 8 * i..0x124 + 8 * i].copy_from_slice(&self.section_sizes[i].to_be_bytes());
        }
        bytes[HEADER_CRC_COVERED..].copy_from_slice(&self.crc32.to_be_bytes());
        bytes
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionHeader {
    pub section_type: SectionType,
    pub size: u64,
}

impl SectionHeader {
    /// Parses section `index`'s header; its type must be known and its flags zero.
    pub fn parse(bytes: &[u8; SECTION_HEADER_LEN], index: usize) -> Result<SectionHeader, EifError> {
        let raw_type = u16::from_be_bytes([bytes[0], bytes[1]]);
        let section_type =
            SectionType::from_u16(raw_type).ok_or(EifError::InvalidSectionType { index, raw_type })?;
        let flags = u16::from_be_bytes([bytes[2], bytes[3]]);
        if flags != 0 {
            return Err(EifError::SectionFlags { index, flags });
        }
        Ok(SectionHeader {
            section_type,
            size: u64::from_be_bytes(bytes[4..].try_into().expect("eight bytes")),
        })
    }

    pub fn to_bytes(&self) -> [u8; SECTION_HEADER_LEN] {
        let mut bytes = [0u8; SECTION_HEADER_LEN];
        bytes[..2].copy_from_slice(&self.section_type.to_u16().to_be_bytes());
        bytes[4..].copy_from_slice(&self.size.to_be_bytes());
        bytes
    }
}
