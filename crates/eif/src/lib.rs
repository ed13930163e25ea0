//! The Enclave Image Format, byte-compatible with AWS's nitro-cli: a streaming reader that
//! checks everything ([`reader`]), a streaming writer ([`writer`]), PCR measurements
//! ([`measure`]), COSE_Sign1 signatures ([`signature`]) and the metadata section
//! ([`metadata`]). No VMM dependencies; see docs/eif.md.

pub mod header;
pub mod measure;
pub mod metadata;
pub mod reader;
pub mod signature;
pub mod writer;

pub use header::{EifHeader, SectionType};
pub use measure::{Measurements, Pcr};
pub use reader::{read, read_file, EifSummary, SectionInfo, SectionSink};
pub use signature::{SignatureError, SigningCertificate, SigningKey};
pub use writer::{sign_image, EifBuilder, SectionInput};

/// Why an EIF could not be read or written; each reads as a sentence about the image.
#[derive(Debug, thiserror::Error)]
pub enum EifError {
    #[error("cannot read the image: {0}")]
    Io(std::io::Error),
    #[error("the image is truncated: the file ends inside {what} (which starts at byte {at})")]
    Truncated { what: String, at: u64 },
    #[error("not an EIF: the file starts with {0:02x?}, not \".eif\"")]
    BadMagic([u8; 4]),
    #[error("EIF version {0} is not supported (carve reads versions 2, 3 and 4)")]
    UnsupportedVersion(u16),
    #[error("the header lists {0} sections, more than the 32 an EIF can hold")]
    TooManySections(u16),
    #[error("the header lists section {index} at byte {listed}, but it starts at byte {actual}")]
    OffsetMismatch { index: usize, listed: u64, actual: u64 },
    #[error("the header gives section {index} {listed} bytes, but its section header says {actual}")]
    SizeMismatch { index: usize, listed: u64, actual: u64 },
    #[error("the header's table has an entry at index {index}, beyond its {count} sections")]
    StrayTableEntry { index: usize, count: usize },
    #[error("section {index} ends at byte {end}, past the end of the file ({file_len} bytes)")]
    PastEnd { index: usize, end: u64, file_len: u64 },
    #[error("section {index} has section type {raw_type}, which is not kernel (1), cmdline (2), ramdisk (3), signature (4) or metadata (5)")]
    InvalidSectionType { index: usize, raw_type: u16 },
    #[error("section {index} has reserved flags {flags:#x} set")]
    SectionFlags { index: usize, flags: u16 },
    #[error("section {index} is a second {section} section")]
    Duplicate { section: &'static str, index: usize },
    #[error("the image has no {0} section")]
    Missing(&'static str),
    #[error("section {index} is a ramdisk placed before the kernel")]
    RamdiskBeforeKernel { index: usize },
    #[error("a version-{version} EIF cannot have a {section} section")]
    NotInVersion { section: &'static str, version: u16 },
    #[error("the {section} section has {size} bytes, more than the {max} allowed")]
    TooLarge { section: &'static str, size: u64, max: u64 },
    #[error("there are bytes after the last section, from byte {at}")]
    TrailingData { at: u64 },
    #[error("the CRC in the header ({header:#010x}) does not match the image's ({computed:#010x})")]
    CrcMismatch { header: u32, computed: u32 },
    #[error("the signature section is invalid: {0}")]
    BadSignature(SignatureError),
    #[error("cannot sign the image: {0}")]
    Sign(SignatureError),
    #[error("cannot read {name}: {source}")]
    Input { name: String, source: std::io::Error },
    #[error("{name} changed while it was written: expected {expected} bytes")]
    InputChanged { name: String, expected: u64 },
    #[error("cannot write the image: {0}")]
    Output(std::io::Error),
    #[error("cannot use the section data: {0}")]
    Sink(std::io::Error),
}
