//! One streaming pass over an EIF: every check the format allows, the CRC, the PCRs, and the
//! section bytes handed to a [`SectionSink`] in constant memory.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use crate::header::{
    EifHeader, SectionHeader, SectionType, HEADER_CRC_COVERED, HEADER_LEN, MAX_SECTIONS, SECTION_HEADER_LEN,
};
use crate::measure::{ImageHashers, Measured, Measurements};
use crate::signature::{EifSignature, MAX_SIGNATURE_SECTION};
use crate::EifError;

/// Metadata is JSON carve keeps in memory; nitro-cli's is a few KiB.
pub const MAX_METADATA_SECTION: u64 = 16 << 20;
const CHUNK: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionInfo {
    pub section_type: SectionType,
    /// File offset of the section's 12-byte header.
    pub offset: u64,
    /// Bytes of data after the header.
    pub size: u64,
}

impl SectionInfo {
    pub fn data_offset(&self) -> u64 {
        self.offset + SECTION_HEADER_LEN as u64
    }
}

/// Receives each section's bytes, in file order, as they stream past.
pub trait SectionSink {
    fn data(&mut self, index: usize, section: &SectionInfo, bytes: &[u8]) -> io::Result<()>;
}

/// Discards section data (describe, measure).
pub struct Discard;

impl SectionSink for Discard {
    fn data(&mut self, _: usize, _: &SectionInfo, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

/// What one pass over a valid EIF learnt.
pub struct EifSummary {
    pub header: EifHeader,
    pub sections: Vec<SectionInfo>,
    pub measurements: Measurements,
    pub computed_crc: u32,
    pub metadata: Option<Vec<u8>>,
    pub signature: Option<EifSignature>,
}

impl EifSummary {
    pub fn crc_ok(&self) -> bool {
        self.header.crc32 == self.computed_crc
    }

    /// `Err(CrcMismatch)` unless the header's CRC matches the content.
    pub fn check_crc(&self) -> Result<(), EifError> {
        if self.crc_ok() {
            Ok(())
        } else {
            Err(EifError::CrcMismatch { header: self.header.crc32, computed: self.computed_crc })
        }
    }

    /// Whether the signature signs this image's PCR0 with its certificate's key.
    pub fn signature_check(&self) -> Option<bool> {
        let signature = self.signature.as_ref()?;
        Some(signature.verify(&self.measurements.pcr0).unwrap_or(false))
    }
}

/// Reads and checks the EIF at `path` without keeping its sections.
pub fn read_file(path: &Path) -> Result<EifSummary, EifError> {
    read_file_into(path, &mut Discard)
}

pub fn read_file_into(path: &Path, sink: &mut dyn SectionSink) -> Result<EifSummary, EifError> {
    let file = File::open(path).map_err(EifError::Io)?;
    let len = file.metadata().map_err(EifError::Io)?.len();
    read(io::BufReader::with_capacity(CHUNK, file), Some(len), sink)
}

/// Reads and checks an EIF from `input`; `file_len`, when known, lets truncation be reported
/// before any section is streamed.
pub fn read<R: Read>(
    mut input: R,
    file_len: Option<u64>,
    sink: &mut dyn SectionSink,
) -> Result<EifSummary, EifError> {
    let mut header_bytes = [0u8; HEADER_LEN];
    read_exact(&mut input, &mut header_bytes, "the header", 0)?;
    let header = EifHeader::parse(&header_bytes)?;
    let count = usize::from(header.num_sections);
    check_section_table(&header, file_len)?;

    let mut crc = crc32fast::Hasher::new();
    crc.update(&header_bytes[..HEADER_CRC_COVERED]);
    let mut hashers = ImageHashers::default();
    let mut sections = Vec::with_capacity(count);
    let mut metadata = None;
    let mut signature = None;
    let mut ramdisks = 0usize;
    let mut position = HEADER_LEN as u64;
    let mut buffer = vec![0u8; CHUNK];

    for index in 0..count {
        if position != header.section_offsets[index] {
            return Err(EifError::OffsetMismatch {
                index,
                listed: header.section_offsets[index],
                actual: position,
            });
        }
        let mut section_bytes = [0u8; SECTION_HEADER_LEN];
        read_exact(&mut input, &mut section_bytes, &format!("section {index}'s header"), position)?;
        let section = SectionHeader::parse(&section_bytes, index)?;
        if section.size != header.section_sizes[index] {
            return Err(EifError::SizeMismatch {
                index,
                listed: header.section_sizes[index],
                actual: section.size,
            });
        }
        let info = SectionInfo { section_type: section.section_type, offset: position, size: section.size };
        check_placement(&header, &sections, &info, index)?;
        crc.update(&section_bytes);

        let measured = match section.section_type {
            SectionType::Kernel | SectionType::Cmdline => Some(Measured::Boot),
            SectionType::Ramdisk => {
                ramdisks += 1;
                Some(if ramdisks == 1 { Measured::FirstRamdisk } else { Measured::OtherRamdisk })
            }
            SectionType::Signature | SectionType::Metadata => None,
        };
        let mut kept = match section.section_type {
            SectionType::Signature | SectionType::Metadata => Some(Vec::with_capacity(section.size as usize)),
            _ => None,
        };
        let mut left = section.size;
        let data_start = info.data_offset();
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            let at = data_start + (section.size - left);
            read_exact(
                &mut input,
                &mut buffer[..n],
                &format!("section {index} ({})", section.section_type.name()),
                at,
            )?;
            let bytes = &buffer[..n];
            crc.update(bytes);
            if let Some(measured) = measured {
                hashers.update(measured, bytes);
            }
            if let Some(kept) = kept.as_mut() {
                kept.extend_from_slice(bytes);
            }
            sink.data(index, &info, bytes).map_err(EifError::Sink)?;
            left -= n as u64;
        }
        match section.section_type {
            SectionType::Metadata => metadata = kept,
            SectionType::Signature => {
                let bytes = kept.expect("signature bytes were kept");
                signature = Some(EifSignature::parse(&bytes).map_err(EifError::BadSignature)?);
            }
            _ => {}
        }
        sections.push(info);
        position = data_start + section.size;
    }

    let mut probe = [0u8; 1];
    if input.read(&mut probe).map_err(EifError::Io)? != 0 {
        return Err(EifError::TrailingData { at: position });
    }
    for required in [SectionType::Kernel, SectionType::Cmdline, SectionType::Ramdisk] {
        if !sections.iter().any(|s| s.section_type == required) {
            return Err(EifError::Missing(required.name()));
        }
    }
    let pcr8 = signature.as_ref().map(|s: &EifSignature| s.certificate.pcr8());
    Ok(EifSummary {
        header,
        sections,
        measurements: hashers.finish(pcr8),
        computed_crc: crc.finalize(),
        metadata,
        signature,
    })
}

/// Header table checks that need no section: unused entries are zero, and (with the file's
/// length) no listed section runs past the end.
fn check_section_table(header: &EifHeader, file_len: Option<u64>) -> Result<(), EifError> {
    let count = usize::from(header.num_sections);
    for index in count..MAX_SECTIONS {
        if header.section_offsets[index] != 0 || header.section_sizes[index] != 0 {
            return Err(EifError::StrayTableEntry { index, count });
        }
    }
    let Some(file_len) = file_len else { return Ok(()) };
    for index in 0..count {
        let end = header.section_offsets[index]
            .checked_add(SECTION_HEADER_LEN as u64)
            .and_then(|end| end.checked_add(header.section_sizes[index]));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                let end = header.section_offsets[index].saturating_add(header.section_sizes[index]);
                return Err(EifError::PastEnd { index, end, file_len });
            }
        }
    }
    Ok(())
}

/// Cardinality and order: one kernel and one cmdline, ramdisks after the kernel, at most one
/// signature (version 3 on) and one metadata section, and their size limits.
fn check_placement(
    header: &EifHeader,
    earlier: &[SectionInfo],
    info: &SectionInfo,
    index: usize,
) -> Result<(), EifError> {
    let seen = |t: SectionType| earlier.iter().any(|s| s.section_type == t);
    let kind = info.section_type;
    match kind {
        SectionType::Kernel | SectionType::Cmdline | SectionType::Signature | SectionType::Metadata
            if seen(kind) =>
        {
            return Err(EifError::Duplicate { section: kind.name(), index });
        }
        SectionType::Ramdisk if !seen(SectionType::Kernel) => {
            return Err(EifError::RamdiskBeforeKernel { index })
        }
        SectionType::Signature if header.version < 3 => {
            return Err(EifError::NotInVersion { section: kind.name(), version: header.version });
        }
        _ => {}
    }
    let max = match kind {
        SectionType::Signature => MAX_SIGNATURE_SECTION,
        SectionType::Metadata => MAX_METADATA_SECTION,
        _ => u64::MAX,
    };
    if info.size > max {
        return Err(EifError::TooLarge { section: kind.name(), size: info.size, max });
    }
    Ok(())
}

fn read_exact<R: Read>(input: &mut R, buf: &mut [u8], what: &str, at: u64) -> Result<(), EifError> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => EifError::Truncated { what: what.to_string(), at },
        _ => EifError::Io(e),
    })
}
