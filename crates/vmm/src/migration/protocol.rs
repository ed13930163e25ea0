//! The migration stream, over one TCP connection:
//!
//! ```text
//! source                                   destination (carve vm run --incoming)
//!   PREAMBLE (magic, protocol version)  →
//!   Offer (layout, vCPUs, CPUID)        →
//!                                       ←  Accept | Refuse(reason)
//!   Pages … (pre-copy rounds)           →
//!   Pages … (the rest, VM paused)       →
//!   State (the VM's snapshot)           →
//!                                       ←  Started | Refuse(reason)
//! ```
//!
//! Either side may send `Abort(reason)` instead of its next frame. Every frame is a 12-byte
//! header (kind, reserved, length, CRC-32 of the payload) and its payload, at most
//! [`MAX_FRAME`] bytes: the stream is untrusted, and a corrupted or hostile one is refused by
//! its checksum, its lengths or its addresses before anything is written to guest memory.
//! Offer and State payloads are carve snapshot-state encodings (versioned CBOR, checksummed).

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::kvm_state::CpuidEntry;
use crate::memory::{self, RamRange};

/// Sent first by the source: what the stream is and the protocol version that follows.
pub const MAGIC: [u8; 12] = *b"CARVE-MIGRAT";
/// Bumped when frames or their meaning change; a destination refuses any other version.
pub const VERSION: u32 = 1;
pub const PREAMBLE_LEN: usize = 16;

pub const PAGE: usize = memory::PAGE_SIZE as usize;
/// Pages per `Pages` frame: about 4 MiB, big enough to stream, small enough to check at once.
pub const PAGES_PER_FRAME: usize = 1024;
/// The largest frame accepted: a full `Pages` frame, or a VM state well above any real one.
pub const MAX_FRAME: u32 = 64 << 20;
pub const HEADER_LEN: usize = 12;
/// In a page entry: the page is all zeros, and no data follows.
pub const ZERO_PAGE: u64 = 1 << 63;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Offer = 1,
    Accept = 2,
    Refuse = 3,
    Pages = 4,
    State = 5,
    Started = 6,
    Abort = 7,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        [Kind::Offer, Kind::Accept, Kind::Refuse, Kind::Pages, Kind::State, Kind::Started, Kind::Abort]
            .into_iter()
            .find(|k| *k as u8 == byte)
    }
}

/// What the source tells the destination before any memory moves, for it to check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub memory: Vec<RamRange>,
    pub vcpus: u32,
    /// vCPU 0's CPUID as the guest sees it: every feature it may be using.
    pub cpuid: Vec<CpuidEntry>,
}

impl Offer {
    /// The checks that need no host: a layout carve builds, of whole MiB, and 1 to
    /// [`crate::mptable::MAX_CPUS`] vCPUs. Returns the memory size in bytes.
    pub fn check(&self) -> Result<u64, String> {
        let total = crate::snapshot::check_layout(&self.memory)?;
        if total % (1 << 20) != 0 {
            return Err(format!("the VM's memory of {total} bytes is not a whole number of MiB"));
        }
        if self.vcpus == 0 || self.vcpus > crate::mptable::MAX_CPUS.into() {
            return Err(format!("{} vCPUs are not 1 to {}", self.vcpus, crate::mptable::MAX_CPUS));
        }
        Ok(total)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the stream is not a carve migration (bad magic)")]
    BadMagic,
    #[error("the source speaks migration protocol version {found}; this carve speaks version {VERSION}")]
    Version { found: u32 },
    #[error("the stream is corrupted: {0}")]
    Corrupted(String),
    #[error("expected {expected}, got {got:?}")]
    Unexpected { expected: &'static str, got: Kind },
    #[error("the other side aborted: {0}")]
    Aborted(String),
}

pub fn preamble() -> [u8; PREAMBLE_LEN] {
    let mut bytes = [0; PREAMBLE_LEN];
    bytes[..MAGIC.len()].copy_from_slice(&MAGIC);
    bytes[MAGIC.len()..].copy_from_slice(&VERSION.to_le_bytes());
    bytes
}

pub fn read_preamble(reader: &mut impl Read) -> Result<(), ProtocolError> {
    let mut bytes = [0; PREAMBLE_LEN];
    reader.read_exact(&mut bytes)?;
    if bytes[..MAGIC.len()] != MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    let found = u32::from_le_bytes(bytes[MAGIC.len()..].try_into().expect("four bytes"));
    if found != VERSION {
        return Err(ProtocolError::Version { found });
    }
    Ok(())
}

/// Writes one frame; a payload over [`MAX_FRAME`] is refused (no destination would read it).
pub fn write_frame(writer: &mut impl Write, kind: Kind, payload: &[u8]) -> std::io::Result<()> {
    let Some(len) = u32::try_from(payload.len()).ok().filter(|&l| l <= MAX_FRAME) else {
        let detail =
            format!("a {kind:?} frame of {} bytes is over the {MAX_FRAME}-byte limit", payload.len());
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, detail));
    };
    let mut header = [0u8; HEADER_LEN];
    header[0] = kind as u8;
    header[4..8].copy_from_slice(&len.to_le_bytes());
    header[8..12].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    writer.write_all(&header)?;
    writer.write_all(payload)
}

/// The next frame; `Abort` frames become [`ProtocolError::Aborted`].
pub fn read_frame(reader: &mut impl Read) -> Result<(Kind, Vec<u8>), ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    reader.read_exact(&mut header)?;
    let kind = Kind::from_byte(header[0])
        .ok_or_else(|| ProtocolError::Corrupted(format!("unknown frame kind {}", header[0])))?;
    if header[1..4] != [0; 3] {
        return Err(ProtocolError::Corrupted("reserved header bytes are set".into()));
    }
    let len = u32::from_le_bytes(header[4..8].try_into().expect("four bytes"));
    if len > MAX_FRAME {
        return Err(ProtocolError::Corrupted(format!(
            "a frame of {len} bytes is over the {MAX_FRAME}-byte limit"
        )));
    }
    let mut payload = vec![0; len as usize];
    reader.read_exact(&mut payload)?;
    if crc32fast::hash(&payload) != u32::from_le_bytes(header[8..12].try_into().expect("four bytes")) {
        return Err(ProtocolError::Corrupted(format!("a {kind:?} frame's checksum does not match")));
    }
    if kind == Kind::Abort {
        return Err(ProtocolError::Aborted(text(&payload)));
    }
    Ok((kind, payload))
}

/// A reason sent in `Refuse` or `Abort`, as printable text (it is shown to the user).
pub fn text(payload: &[u8]) -> String {
    String::from_utf8_lossy(&payload[..payload.len().min(1024)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Builds `Pages` frames: entries of a guest-physical address (with [`ZERO_PAGE`] for a page
/// of zeros) and, unless zero, its 4 KiB.
#[derive(Default)]
pub struct PagesFrame {
    pub payload: Vec<u8>,
    pub pages: usize,
}

impl PagesFrame {
    /// Adds the page at `gpa`; `data` is its contents (a zero page travels without them).
    pub fn push(&mut self, gpa: u64, data: &[u8]) {
        if memory::is_zero_page(data) {
            self.payload.extend_from_slice(&(gpa | ZERO_PAGE).to_le_bytes());
            self.pages += 1;
        } else {
            self.push_data(gpa, data);
        }
    }

    /// Adds the page at `gpa` with its contents, known not to be zero.
    pub fn push_data(&mut self, gpa: u64, data: &[u8]) {
        self.payload.extend_from_slice(&gpa.to_le_bytes());
        self.payload.extend_from_slice(data);
        self.pages += 1;
    }

    pub fn is_full(&self) -> bool {
        self.pages >= PAGES_PER_FRAME
    }

    pub fn take(&mut self) -> Vec<u8> {
        self.pages = 0;
        std::mem::take(&mut self.payload)
    }
}

/// The pages of a `Pages` payload, each checked to be a whole page of `layout`'s RAM, handed to
/// `store(gpa, Some(data))` or `store(gpa, None)` for a zero page. Returns the page count.
pub fn parse_pages(
    payload: &[u8],
    layout: &[RamRange],
    mut store: impl FnMut(u64, Option<&[u8]>),
) -> Result<usize, ProtocolError> {
    let corrupted = |what: String| ProtocolError::Corrupted(what);
    let mut rest = payload;
    let mut count = 0;
    while !rest.is_empty() {
        let Some((entry, after)) = rest.split_first_chunk::<8>() else {
            return Err(corrupted("a page entry is cut short".into()));
        };
        let entry = u64::from_le_bytes(*entry);
        let gpa = entry & !ZERO_PAGE;
        let in_ram = layout.iter().any(|r| gpa >= r.base && gpa < r.end());
        if !gpa.is_multiple_of(PAGE as u64) || !in_ram {
            return Err(corrupted(format!("page {gpa:#x} is not a page of the guest's RAM")));
        }
        if entry & ZERO_PAGE != 0 {
            store(gpa, None);
            rest = after;
        } else {
            let Some((data, after)) = after.split_at_checked(PAGE) else {
                return Err(corrupted(format!("page {gpa:#x} is cut short")));
            };
            store(gpa, Some(data));
            rest = after;
        }
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_corruption_is_caught() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Accept, b"").unwrap();
        write_frame(&mut wire, Kind::Refuse, b"no room").unwrap();
        let mut reader = &wire[..];
        assert_eq!(read_frame(&mut reader).unwrap(), (Kind::Accept, vec![]));
        assert_eq!(read_frame(&mut reader).unwrap(), (Kind::Refuse, b"no room".to_vec()));

        let mut flipped = wire.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let mut reader = &flipped[HEADER_LEN..];
        assert!(
            matches!(read_frame(&mut reader), Err(ProtocolError::Corrupted(m)) if m.contains("checksum"))
        );
        let mut huge = wire.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            matches!(read_frame(&mut &huge[..]), Err(ProtocolError::Corrupted(m)) if m.contains("limit"))
        );
        assert!(
            matches!(read_frame(&mut &[9u8; 12][..]), Err(ProtocolError::Corrupted(m)) if m.contains("kind 9"))
        );
        let mut abort = Vec::new();
        write_frame(&mut abort, Kind::Abort, b"source\nstopped").unwrap();
        assert!(
            matches!(read_frame(&mut &abort[..]), Err(ProtocolError::Aborted(m)) if m == "source stopped")
        );
    }

    #[test]
    fn preamble_names_the_version() {
        read_preamble(&mut &preamble()[..]).unwrap();
        let mut newer = preamble();
        newer[12] = 2;
        assert!(matches!(read_preamble(&mut &newer[..]), Err(ProtocolError::Version { found: 2 })));
        assert!(matches!(read_preamble(&mut &[0u8; 16][..]), Err(ProtocolError::BadMagic)));
    }

    #[test]
    fn pages_are_checked_against_the_layout() {
        let layout = [RamRange { base: 0, size: 16 * PAGE as u64 }];
        let mut frame = PagesFrame::default();
        frame.push(0, &[0; PAGE]);
        frame.push(PAGE as u64, &[7; PAGE]);
        assert_eq!(frame.payload.len(), 8 + 8 + PAGE, "zero pages travel without data");
        let payload = frame.take();
        let mut seen = Vec::new();
        assert_eq!(
            parse_pages(&payload, &layout, |gpa, data| seen.push((gpa, data.map(|d| d[0])))).unwrap(),
            2
        );
        assert_eq!(seen, vec![(0, None), (PAGE as u64, Some(7))]);

        for bad in [16 * PAGE as u64, 5, !ZERO_PAGE & !0xfff] {
            let e = parse_pages(&(bad | ZERO_PAGE).to_le_bytes(), &layout, |_, _| {}).unwrap_err();
            assert!(e.to_string().contains("not a page of the guest's RAM"), "{e}");
        }
        let e = parse_pages(&payload[..payload.len() - 1], &layout, |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("cut short"), "{e}");
    }
}
