//! Writing an EIF in nitro-cli's layout (kernel, cmdline, metadata, ramdisks, [signature]) in
//! one streaming pass: sections first, then the header, whose CRC joins the header's and the
//! sections' CRCs.

use std::io::{Read, Seek, SeekFrom, Write};

use crate::header::{
    EifHeader, SectionHeader, SectionType, CURRENT_VERSION, DEFAULT_CPUS, DEFAULT_MEM, HEADER_CRC_COVERED,
    HEADER_LEN, MAX_SECTIONS, SECTION_HEADER_LEN,
};
use crate::measure::{ImageHashers, Measured, Measurements};
use crate::signature::{sign_section, SigningCertificate, SigningKey};
use crate::EifError;

/// A section's bytes: a reader and the length it must yield.
pub struct SectionInput<'a> {
    pub name: String,
    pub reader: Box<dyn Read + 'a>,
    pub len: u64,
}

impl<'a> SectionInput<'a> {
    pub fn new(name: impl Into<String>, reader: impl Read + 'a, len: u64) -> SectionInput<'a> {
        SectionInput { name: name.into(), reader: Box::new(reader), len }
    }

    pub fn bytes(name: impl Into<String>, bytes: &'a [u8]) -> SectionInput<'a> {
        SectionInput::new(name, bytes, bytes.len() as u64)
    }
}

pub struct EifBuilder<'a> {
    kernel: SectionInput<'a>,
    cmdline: Vec<u8>,
    metadata: Vec<u8>,
    ramdisks: Vec<SectionInput<'a>>,
    signer: Option<(&'a SigningKey, &'a SigningCertificate)>,
    flags: u16,
}

impl<'a> EifBuilder<'a> {
    pub fn new(kernel: SectionInput<'a>, cmdline: &str, metadata: Vec<u8>) -> EifBuilder<'a> {
        EifBuilder {
            kernel,
            cmdline: cmdline.as_bytes().to_vec(),
            metadata,
            ramdisks: Vec::new(),
            signer: None,
            flags: 0,
        }
    }

    pub fn ramdisk(mut self, ramdisk: SectionInput<'a>) -> Self {
        self.ramdisks.push(ramdisk);
        self
    }

    pub fn sign(mut self, key: &'a SigningKey, certificate: &'a SigningCertificate) -> Self {
        self.signer = Some((key, certificate));
        self
    }

    /// Header flags (bit 0: aarch64 image).
    pub fn flags(mut self, flags: u16) -> Self {
        self.flags = flags;
        self
    }

    /// Writes the image to `out` (from its current start) and returns its measurements.
    pub fn write<W: Write + Seek>(self, out: &mut W) -> Result<Measurements, EifError> {
        let count = 3 + self.ramdisks.len() + usize::from(self.signer.is_some());
        if self.ramdisks.is_empty() {
            return Err(EifError::Missing("ramdisk"));
        }
        if count > MAX_SECTIONS {
            return Err(EifError::TooManySections(count as u16));
        }
        let mut writer = SectionWriter {
            out,
            position: HEADER_LEN as u64,
            crc: crc32fast::Hasher::new(),
            hashers: ImageHashers::default(),
            table: Vec::with_capacity(count),
        };
        writer.out.seek(SeekFrom::Start(HEADER_LEN as u64)).map_err(EifError::Output)?;
        let mut kernel = self.kernel;
        writer.section(SectionType::Kernel, &mut kernel, Some(Measured::Boot))?;
        writer.section(
            SectionType::Cmdline,
            &mut SectionInput::bytes("cmdline", &self.cmdline),
            Some(Measured::Boot),
        )?;
        writer.section(SectionType::Metadata, &mut SectionInput::bytes("metadata", &self.metadata), None)?;
        for (i, mut ramdisk) in self.ramdisks.into_iter().enumerate() {
            let measured = if i == 0 { Measured::FirstRamdisk } else { Measured::OtherRamdisk };
            writer.section(SectionType::Ramdisk, &mut ramdisk, Some(measured))?;
        }
        let pcr8 = self.signer.map(|(_, certificate)| certificate.pcr8());
        let measurements = std::mem::take(&mut writer.hashers).finish(pcr8);
        if let Some((key, certificate)) = self.signer {
            let section = sign_section(&measurements.pcr0, key, certificate).map_err(EifError::Sign)?;
            writer.section(SectionType::Signature, &mut SectionInput::bytes("signature", &section), None)?;
        }
        writer.finish(self.flags)?;
        Ok(measurements)
    }
}

/// Rewrites the image `source` (read and checked into `summary`) to `out` with a new signature
/// for `key` and `certificate`: the other sections keep their order, an old signature is
/// dropped and the new one appended.
pub fn sign_image<R: Read + Seek, W: Write + Seek>(
    source: &mut R,
    summary: &crate::EifSummary,
    key: &SigningKey,
    certificate: &SigningCertificate,
    out: &mut W,
) -> Result<Measurements, EifError> {
    let mut writer = SectionWriter {
        out,
        position: HEADER_LEN as u64,
        crc: crc32fast::Hasher::new(),
        hashers: ImageHashers::default(),
        table: Vec::with_capacity(summary.sections.len() + 1),
    };
    writer.out.seek(SeekFrom::Start(HEADER_LEN as u64)).map_err(EifError::Output)?;
    let mut ramdisks = 0;
    for (index, section) in summary.sections.iter().enumerate() {
        let measured = match section.section_type {
            SectionType::Signature => continue,
            SectionType::Metadata => None,
            SectionType::Kernel | SectionType::Cmdline => Some(Measured::Boot),
            SectionType::Ramdisk => {
                ramdisks += 1;
                Some(if ramdisks == 1 { Measured::FirstRamdisk } else { Measured::OtherRamdisk })
            }
        };
        let name = format!("section {index} of the image");
        source
            .seek(SeekFrom::Start(section.data_offset()))
            .map_err(|source| EifError::Input { name: name.clone(), source })?;
        let mut input = SectionInput::new(name, (&mut *source).take(section.size), section.size);
        writer.section(section.section_type, &mut input, measured)?;
    }
    let measurements = std::mem::take(&mut writer.hashers).finish(Some(certificate.pcr8()));
    let signature = sign_section(&measurements.pcr0, key, certificate).map_err(EifError::Sign)?;
    writer.section(SectionType::Signature, &mut SectionInput::bytes("signature", &signature), None)?;
    writer.finish_with(summary.header.version.max(3), summary.header.flags)?;
    Ok(measurements)
}

struct SectionWriter<'w, W> {
    out: &'w mut W,
    position: u64,
    crc: crc32fast::Hasher,
    hashers: ImageHashers,
    table: Vec<(u64, u64)>,
}

impl<W: Write + Seek> SectionWriter<'_, W> {
    fn section(
        &mut self,
        kind: SectionType,
        input: &mut SectionInput<'_>,
        measured: Option<Measured>,
    ) -> Result<(), EifError> {
        let header = SectionHeader { section_type: kind, size: input.len }.to_bytes();
        self.out.write_all(&header).map_err(EifError::Output)?;
        self.crc.update(&header);
        let mut buffer = vec![0u8; (1 << 20).min(input.len.max(1) as usize)];
        let mut written = 0u64;
        loop {
            let n = match input.reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(EifError::Input { name: input.name.clone(), source }),
            };
            written += n as u64;
            if written > input.len {
                break;
            }
            let bytes = &buffer[..n];
            self.crc.update(bytes);
            if let Some(measured) = measured {
                self.hashers.update(measured, bytes);
            }
            self.out.write_all(bytes).map_err(EifError::Output)?;
        }
        if written != input.len {
            return Err(EifError::InputChanged { name: input.name.clone(), expected: input.len });
        }
        self.table.push((self.position, input.len));
        self.position += SECTION_HEADER_LEN as u64 + input.len;
        Ok(())
    }

    fn finish(self, flags: u16) -> Result<(), EifError> {
        self.finish_with(CURRENT_VERSION, flags)
    }

    fn finish_with(self, version: u16, flags: u16) -> Result<(), EifError> {
        let mut header = EifHeader {
            version,
            flags,
            default_mem: DEFAULT_MEM,
            default_cpus: DEFAULT_CPUS,
            num_sections: self.table.len() as u16,
            section_offsets: [0; MAX_SECTIONS],
            section_sizes: [0; MAX_SECTIONS],
            crc32: 0,
        };
        for (i, (offset, size)) in self.table.iter().enumerate() {
            header.section_offsets[i] = *offset;
            header.section_sizes[i] = *size;
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header.to_bytes()[..HEADER_CRC_COVERED]);
        crc.combine(&self.crc);
        header.crc32 = crc.finalize();
        self.out.seek(SeekFrom::Start(0)).map_err(EifError::Output)?;
        self.out.write_all(&header.to_bytes()).map_err(EifError::Output)?;
        self.out.seek(SeekFrom::Start(self.position)).map_err(EifError::Output)?;
        self.out.flush().map_err(EifError::Output)
    }
}
