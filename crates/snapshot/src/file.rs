//! The snapshot state file: a fixed header, then the state as CBOR.
//!
//! ```text
//! offset  size  field
//!      0    16  MAGIC
//!     16     2  format version, u16 LE (FORMAT_VERSION)
//!     18     2  flags, u16 LE; none defined, so anything but 0 is refused
//!     20     4  CRC-32 (IEEE, as crc32fast) of the payload, u32 LE
//!     24     8  payload length in bytes, u64 LE, at most MAX_STATE_BYTES
//!     32     …  payload: the state as CBOR, exactly `length` bytes, nothing after it
//! ```
//!
//! The file is untrusted input: it may be truncated, corrupted, from another carve or hostile.
//! Reading checks the header before looking at the payload, bounds what it reads and allocates
//! by [`MAX_STATE_BYTES`], verifies the checksum before decoding, and decodes with a nesting
//! limit so hostile CBOR cannot overflow the stack. What decodes is still only well-formed, not
//! valid: [`Persist::restore`](crate::Persist::restore) checks the values.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// PNG-style: the high byte catches 7-bit transfers, `\r\n` and `\x1a\n` catch line-ending
/// conversion, and the rest reads as what the file is in a hex dump.
pub const MAGIC: [u8; 16] = *b"\x89CARVE-STATE\r\n\x1a\n";

/// The only version this carve reads or writes. A change to the header or to the meaning of
/// the payload's encoding bumps it; a change to a device's state is the device's business.
pub const FORMAT_VERSION: u16 = 1;

/// Bytes before the payload.
pub const HEADER_LEN: usize = 32;

/// The largest payload accepted, far above any real VM's device state (guest memory is not in
/// it), so a hostile length cannot make a reader allocate or read without bound.
pub const MAX_STATE_BYTES: u64 = 64 << 20;

/// How deep CBOR arrays, maps, tags and enums may nest. Real state nests a few levels; the
/// limit keeps hostile input from exhausting the stack (deserialising recurses per level), with
/// room to spare on a 2 MiB thread stack in a debug build (128 levels fit in 512 KiB).
pub const MAX_NESTING: usize = 128;

const VERSION_AT: usize = 16;
const FLAGS_AT: usize = 18;
const CRC_AT: usize = 20;
const LENGTH_AT: usize = 24;

/// Why a snapshot state could not be encoded, written, read or decoded.
///
/// Its `Display` is one complete sentence. Errors from [`read`] and [`write`] carry the path
/// ("snapshot state /x/vm.state is truncated: …"); errors from [`encode`] and [`decode`] have
/// none ("snapshot state is truncated: …"). Callers therefore never add the path themselves.
#[derive(Debug)]
pub struct SnapshotError {
    path: Option<PathBuf>,
    problem: Problem,
}

impl std::error::Error for SnapshotError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.problem.source()
    }
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(path) => write!(f, "snapshot state {} {}", path.display(), self.problem),
            None => write!(f, "snapshot state {}", self.problem),
        }
    }
}

impl SnapshotError {
    /// What went wrong, to match on.
    pub fn problem(&self) -> &Problem {
        &self.problem
    }

    /// The file, for errors from [`read`] and [`write`].
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn at(self, path: &Path) -> SnapshotError {
        SnapshotError { path: Some(path.to_owned()), ..self }
    }
}

impl From<Problem> for SnapshotError {
    fn from(problem: Problem) -> Self {
        SnapshotError { path: None, problem }
    }
}

/// What is wrong with a snapshot state; each message is the predicate of a sentence whose
/// subject is the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    #[error("is not a carve snapshot (bad magic)")]
    BadMagic,
    #[error("was written in snapshot format version {found}; this carve reads version {FORMAT_VERSION}")]
    Version { found: u16 },
    #[error("sets header flags {flags:#06x} that this carve does not know")]
    UnknownFlags { flags: u16 },
    #[error("is truncated: it has {actual} bytes, fewer than the {HEADER_LEN}-byte header")]
    TruncatedHeader { actual: usize },
    #[error("is truncated: the header promises {expected} bytes of state, the file has {actual}")]
    Truncated { expected: u64, actual: u64 },
    #[error("is corrupted: it has {extra} bytes after the {expected} bytes of state its header promises")]
    TrailingBytes { expected: u64, extra: u64 },
    #[error("is larger than the {} MiB a state file may have", MAX_STATE_BYTES >> 20)]
    TooLarge,
    #[error("is corrupted: its checksum does not match")]
    Checksum,
    #[error("holds state this carve cannot read: {detail}")]
    Undecodable { detail: String },
    #[error("could not be encoded: {detail}")]
    Unencodable { detail: String },
    #[error("could not be read: {source}")]
    Read { source: io::Error },
    #[error("could not be written: {source}")]
    Write { source: io::Error },
}

/// `state` as a complete state file: header and CBOR payload.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, SnapshotError> {
    let mut bytes = vec![0; HEADER_LEN];
    ciborium::into_writer(state, &mut bytes).map_err(|e| Problem::Unencodable {
        detail: match e {
            ciborium::ser::Error::Value(message) => message,
            ciborium::ser::Error::Io(e) => format!("{e:?}"),
        },
    })?;
    let payload = &bytes[HEADER_LEN..];
    let length = payload.len() as u64;
    if length > MAX_STATE_BYTES {
        // Refused here rather than written, as no carve could read it back.
        return Err(Problem::TooLarge.into());
    }
    let header = header_for(payload);
    bytes[..HEADER_LEN].copy_from_slice(&header);
    Ok(bytes)
}

/// The header of a current-version file around `payload` (fuzz targets frame arbitrary
/// payloads with it, as libFuzzer rarely forges a CRC on its own).
pub fn header_for(payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut header = [0; HEADER_LEN];
    header[..VERSION_AT].copy_from_slice(&MAGIC);
    header[VERSION_AT..FLAGS_AT].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[FLAGS_AT..CRC_AT].copy_from_slice(&0u16.to_le_bytes());
    header[CRC_AT..LENGTH_AT].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    header[LENGTH_AT..HEADER_LEN].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    header
}

/// The state in a complete state file, checked as described in the module docs.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SnapshotError> {
    let header = Header::parse(bytes)?;
    let payload = &bytes[HEADER_LEN..];
    let actual = payload.len() as u64;
    if actual < header.length {
        return Err(Problem::Truncated { expected: header.length, actual }.into());
    }
    if actual > header.length {
        return Err(Problem::TrailingBytes { expected: header.length, extra: actual - header.length }.into());
    }
    if crc32fast::hash(payload) != header.crc {
        return Err(Problem::Checksum.into());
    }
    let mut reader = payload;
    let state = ciborium::de::from_reader_with_recursion_limit(&mut reader, MAX_NESTING)
        .map_err(|e| Problem::Undecodable { detail: cbor_detail(e) })?;
    if !reader.is_empty() {
        let detail = format!("{} bytes follow the state's CBOR", reader.len());
        return Err(Problem::Undecodable { detail }.into());
    }
    Ok(state)
}

/// Writes `state` to `path` so that a crash leaves either the old file or the new one under
/// that name, never part of one: a temporary file in the same directory, flushed to disk, then
/// renamed over `path`, then the directory flushed so the rename itself is durable. The file is
/// readable only by its owner, as VM state may hold the enclave's secrets.
pub fn write<T: Serialize>(path: &Path, state: &T) -> Result<(), SnapshotError> {
    let bytes = encode(state).map_err(|e| e.at(path))?;
    write_bytes(path, &bytes).map_err(|source| SnapshotError::from(Problem::Write { source }).at(path))
}

/// Reads the state that [`write`] wrote to `path`. Reads the header first and then at most the
/// length it declares (bounded by [`MAX_STATE_BYTES`]) plus one byte to notice trailing data,
/// so a huge or hostile file costs no more than that.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, SnapshotError> {
    let read_err = |source| SnapshotError::from(Problem::Read { source }).at(path);
    let mut file = File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    (&mut file).take(HEADER_LEN as u64).read_to_end(&mut bytes).map_err(read_err)?;
    // A bad header is reported by `decode` below, from the same bytes.
    if let Ok(header) = Header::parse(&bytes) {
        (&mut file).take(header.length + 1).read_to_end(&mut bytes).map_err(read_err)?;
    }
    decode(&bytes).map_err(|e| e.at(path))
}

/// The header's fields, once the header is known to be one this carve reads.
struct Header {
    crc: u32,
    length: u64,
}

impl Header {
    /// Checks in the order that gives the most useful error: a file that is not a snapshot at
    /// all, then one from another version (whose header may differ in length), then the rest.
    fn parse(bytes: &[u8]) -> Result<Header, Problem> {
        let field = |at: usize, len: usize| bytes.get(at..at + len);
        let Some(magic) = field(0, MAGIC.len()) else {
            return Err(if MAGIC.starts_with(bytes) {
                Problem::TruncatedHeader { actual: bytes.len() }
            } else {
                Problem::BadMagic
            });
        };
        if magic != MAGIC {
            return Err(Problem::BadMagic);
        }
        let truncated = || Problem::TruncatedHeader { actual: bytes.len() };
        let version = field(VERSION_AT, 2).ok_or_else(truncated)?;
        let version = u16::from_le_bytes([version[0], version[1]]);
        if version != FORMAT_VERSION {
            return Err(Problem::Version { found: version });
        }
        let mut header = [0; HEADER_LEN];
        header.copy_from_slice(field(0, HEADER_LEN).ok_or_else(truncated)?);
        let flags = u16::from_le_bytes([header[FLAGS_AT], header[FLAGS_AT + 1]]);
        if flags != 0 {
            return Err(Problem::UnknownFlags { flags });
        }
        let mut crc = [0; 4];
        crc.copy_from_slice(&header[CRC_AT..LENGTH_AT]);
        let mut length = [0; 8];
        length.copy_from_slice(&header[LENGTH_AT..HEADER_LEN]);
        let length = u64::from_le_bytes(length);
        if length > MAX_STATE_BYTES {
            return Err(Problem::TooLarge);
        }
        Ok(Header { crc: u32::from_le_bytes(crc), length })
    }
}

/// ciborium's own `Display` is its `Debug`; this says the same as a clause.
fn cbor_detail<E>(error: ciborium::de::Error<E>) -> String {
    use ciborium::de::Error;
    match error {
        Error::Io(_) => "its CBOR ends early".to_owned(),
        Error::Syntax(at) => format!("malformed CBOR at byte {at} of the state"),
        Error::Semantic(Some(at), message) => format!("{message} (at byte {at} of the state)"),
        Error::Semantic(None, message) => message,
        Error::RecursionLimitExceeded => format!("it nests more than {MAX_NESTING} levels deep"),
    }
}

/// The temporary file's name is unique among live writers (process id and a per-process
/// counter), hidden, and says what it is should a crash leave it behind.
fn write_bytes(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path does not name a file"))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let (temp_path, mut temp) = loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".{}.{n}.tmp", std::process::id()));
        let temp_path = dir.join(temp_name);
        // `create_new`: never follow a planted symlink or reuse another writer's file.
        match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp_path) {
            Ok(file) => break (temp_path, file),
            // Left by a crashed process that had our id; take the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    };
    let result =
        temp.write_all(bytes).and_then(|()| temp.sync_all()).and_then(|()| fs::rename(&temp_path, path));
    drop(temp);
    if let Err(e) = result {
        let _ = fs::remove_file(&temp_path);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Queue {
        Idle,
        Running { head: u16, pending: Vec<u16> },
        Failed(String),
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Device {
        id: u32,
        queues: Vec<Queue>,
        config: Option<Vec<u8>>,
        features: BTreeMap<String, u64>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Vm {
        name: String,
        vcpus: Vec<[u64; 4]>,
        devices: Vec<Device>,
        paused: bool,
        balloon: Option<Box<Device>>,
    }

    fn vm() -> Vm {
        Vm {
            name: "enclave-0".into(),
            vcpus: vec![[1, 2, 3, u64::MAX], [0; 4]],
            devices: vec![
                Device {
                    id: 3,
                    queues: vec![
                        Queue::Idle,
                        Queue::Running { head: 7, pending: vec![1, 2] },
                        Queue::Failed("x".into()),
                    ],
                    config: Some(vec![0, 255, 7]),
                    features: [("event-idx".into(), 1 << 29)].into(),
                },
                Device { id: 4, queues: vec![], config: None, features: BTreeMap::new() },
            ],
            paused: true,
            balloon: Some(Box::new(Device {
                id: 9,
                queues: vec![Queue::Idle],
                config: None,
                features: BTreeMap::new(),
            })),
        }
    }

    fn problem<T: std::fmt::Debug>(result: Result<T, SnapshotError>) -> Problem {
        match result {
            Ok(value) => panic!("expected an error, decoded {value:?}"),
            Err(e) => e.problem,
        }
    }

    /// A file around `payload` with a correct header, as a hostile writer would make.
    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut bytes = encode(&()).unwrap();
        bytes.truncate(HEADER_LEN);
        bytes[CRC_AT..LENGTH_AT].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
        bytes[LENGTH_AT..HEADER_LEN].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn round_trips_nested_state() {
        let bytes = encode(&vm()).unwrap();
        assert_eq!(bytes[..16], MAGIC);
        assert_eq!(decode::<Vm>(&bytes).unwrap(), vm());
        assert_eq!(decode::<()>(&encode(&()).unwrap()).unwrap(), ());
    }

    #[test]
    fn header_layout_is_fixed() {
        let bytes = encode(&7u8).unwrap();
        assert_eq!(bytes.len(), HEADER_LEN + 1);
        assert_eq!(&bytes[..16], b"\x89CARVE-STATE\r\n\x1a\n");
        assert_eq!(bytes[16..18], [1, 0]);
        assert_eq!(bytes[18..20], [0, 0]);
        assert_eq!(bytes[20..24], crc32fast::hash(&[7]).to_le_bytes());
        assert_eq!(bytes[24..32], [1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bytes[32], 7);
    }

    #[test]
    fn refuses_bad_magic() {
        let mut bytes = encode(&vm()).unwrap();
        bytes[0] = b'C';
        assert!(matches!(problem(decode::<Vm>(&bytes)), Problem::BadMagic));
        for other in [&b"{\"vcpus\": []}"[..], b"x", b"\x89CARVE-STATE\n\x1a\n", &[0; 64]] {
            assert!(matches!(problem(decode::<Vm>(other)), Problem::BadMagic), "{other:?}");
        }
    }

    #[test]
    fn refuses_every_foreign_version() {
        let mut bytes = encode(&vm()).unwrap();
        for version in (0..=u16::MAX).filter(|&v| v != FORMAT_VERSION) {
            bytes[VERSION_AT..FLAGS_AT].copy_from_slice(&version.to_le_bytes());
            match problem(decode::<Vm>(&bytes)) {
                Problem::Version { found } => assert_eq!(found, version),
                other => panic!("version {version}: {other:?}"),
            }
        }
    }

    #[test]
    fn foreign_version_is_reported_even_if_its_header_is_shorter() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&2u16.to_le_bytes());
        assert!(matches!(problem(decode::<Vm>(&bytes)), Problem::Version { found: 2 }));
    }

    #[test]
    fn refuses_unknown_flags() {
        let mut bytes = encode(&vm()).unwrap();
        bytes[FLAGS_AT + 1] = 0x80;
        assert!(matches!(problem(decode::<Vm>(&bytes)), Problem::UnknownFlags { flags: 0x8000 }));
    }

    #[test]
    fn refuses_truncation_at_every_byte() {
        let bytes = encode(&vm()).unwrap();
        for len in 0..HEADER_LEN {
            match problem(decode::<Vm>(&bytes[..len])) {
                Problem::TruncatedHeader { actual } => assert_eq!(actual, len),
                other => panic!("{len} bytes: {other:?}"),
            }
        }
        let expected = (bytes.len() - HEADER_LEN) as u64;
        for len in HEADER_LEN..bytes.len() {
            match problem(decode::<Vm>(&bytes[..len])) {
                Problem::Truncated { expected: e, actual } => {
                    assert_eq!((e, actual), (expected, (len - HEADER_LEN) as u64))
                }
                other => panic!("{len} bytes: {other:?}"),
            }
        }
    }

    #[test]
    fn refuses_trailing_bytes() {
        let mut bytes = encode(&vm()).unwrap();
        bytes.push(0);
        assert!(matches!(problem(decode::<Vm>(&bytes)), Problem::TrailingBytes { extra: 1, .. }));
        // Within the checksummed payload: one CBOR item, then more.
        let mut payload = Vec::new();
        ciborium::into_writer(&1u8, &mut payload).unwrap();
        payload.push(0);
        assert!(matches!(problem(decode::<u8>(&framed(&payload))), Problem::Undecodable { .. }));
    }

    #[test]
    fn flipped_payload_bit_fails_the_checksum() {
        let bytes = encode(&vm()).unwrap();
        for bit in HEADER_LEN * 8..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(problem(decode::<Vm>(&flipped)), Problem::Checksum), "bit {bit}");
        }
    }

    #[test]
    fn flipped_header_bit_is_an_error() {
        let bytes = encode(&vm()).unwrap();
        for bit in 0..HEADER_LEN * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(decode::<Vm>(&flipped).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn refuses_oversized_length_before_looking_further() {
        for length in [MAX_STATE_BYTES + 1, u64::MAX] {
            let mut bytes = encode(&()).unwrap();
            bytes[LENGTH_AT..HEADER_LEN].copy_from_slice(&length.to_le_bytes());
            assert!(matches!(problem(decode::<()>(&bytes)), Problem::TooLarge));
        }
    }

    #[test]
    fn read_refuses_oversized_length_without_reading_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.state");
        let mut header = encode(&()).unwrap();
        header[LENGTH_AT..HEADER_LEN].copy_from_slice(&u64::MAX.to_le_bytes());
        fs::write(&path, &header[..HEADER_LEN]).unwrap();
        // Sparse: costs no disk, but reading it all would take 16 GiB of memory.
        File::options().write(true).open(&path).unwrap().set_len(16 << 30).unwrap();
        let error = read::<()>(&path).unwrap_err();
        assert!(matches!(error.problem(), Problem::TooLarge));
        assert_eq!(
            error.to_string(),
            format!("snapshot state {} is larger than the 64 MiB a state file may have", path.display())
        );
    }

    #[test]
    fn read_stops_after_the_declared_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("long.state");
        fs::write(&path, encode(&vm()).unwrap()).unwrap();
        let file = File::options().append(true).open(&path).unwrap();
        file.set_len(16 << 30).unwrap();
        assert!(matches!(read::<Vm>(&path).unwrap_err().problem(), Problem::TrailingBytes { extra: 1, .. }));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        // Arrays of one element, a tag around a tag, maps of one entry, each 100 000 deep.
        for (open, leaf) in [(&[0x81][..], 0x00), (&[0xc6][..], 0x00), (&[0xa1, 0x00][..], 0x00)] {
            let mut payload = open.repeat(100_000);
            payload.push(leaf);
            let bytes = framed(&payload);
            match problem(decode::<ciborium::Value>(&bytes)) {
                Problem::Undecodable { detail } => assert!(detail.contains("nests more than"), "{detail}"),
                other => panic!("{other:?}"),
            }
            assert!(decode::<Vm>(&bytes).is_err());
        }
        // At the limit it still decodes.
        let mut payload = [0x81].repeat(MAX_NESTING);
        payload.push(0x00);
        assert!(decode::<ciborium::Value>(&framed(&payload)).is_ok());
    }

    #[test]
    fn wrong_shape_is_undecodable() {
        let error = decode::<Vm>(&encode(&"not a vm").unwrap()).unwrap_err();
        assert!(matches!(error.problem(), Problem::Undecodable { .. }));
        assert_eq!(
            error.to_string(),
            "snapshot state holds state this carve cannot read: invalid type: string, expected map"
        );
        for payload in [&[0xff][..], &[0x82, 0x00]] {
            assert!(matches!(
                problem(decode::<ciborium::Value>(&framed(payload))),
                Problem::Undecodable { .. }
            ));
        }
    }

    #[test]
    fn huge_declared_cbor_lengths_do_not_allocate() {
        // A byte string, a text string, an array and a map each claiming 2^64 - 1 entries.
        for head in [0x5b, 0x7b, 0x9b, 0xbb] {
            let mut payload = vec![head];
            payload.extend_from_slice(&u64::MAX.to_be_bytes());
            assert!(decode::<ciborium::Value>(&framed(&payload)).is_err());
            assert!(decode::<Vm>(&framed(&payload)).is_err());
        }
    }

    #[test]
    fn messages_are_sentences() {
        let mut bytes = encode(&vm()).unwrap();
        bytes[VERSION_AT] = 7;
        assert_eq!(
            decode::<Vm>(&bytes).unwrap_err().to_string(),
            "snapshot state was written in snapshot format version 7; this carve reads version 1"
        );
        let bytes = encode(&vm()).unwrap();
        let cut = &bytes[..HEADER_LEN + 5];
        assert_eq!(
            decode::<Vm>(cut).unwrap_err().to_string(),
            format!(
                "snapshot state is truncated: the header promises {} bytes of state, the file has 5",
                bytes.len() - HEADER_LEN
            )
        );
        assert_eq!(
            decode::<Vm>(b"").unwrap_err().to_string(),
            "snapshot state is truncated: it has 0 bytes, fewer than the 32-byte header"
        );
        assert_eq!(
            decode::<Vm>(b"hello").unwrap_err().to_string(),
            "snapshot state is not a carve snapshot (bad magic)"
        );
    }

    #[test]
    fn unencodable_state_is_an_error() {
        struct Refuses;
        impl Serialize for Refuses {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("a file descriptor is not state"))
            }
        }
        let error = encode(&Refuses).unwrap_err();
        assert!(matches!(error.problem(), Problem::Unencodable { .. }));
        assert_eq!(error.to_string(), "snapshot state could not be encoded: a file descriptor is not state");
    }

    #[test]
    fn write_then_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.state");
        write(&path, &vm()).unwrap();
        assert_eq!(read::<Vm>(&path).unwrap(), vm());
        assert_eq!(fs::read(&path).unwrap(), encode(&vm()).unwrap());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn write_replaces_atomically_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.state");
        write(&path, &vm()).unwrap();
        let mut old = File::open(&path).unwrap();
        let mut other = vm();
        other.name = "enclave-1".into();
        other.devices.clear();
        write(&path, &other).unwrap();
        // The old file was replaced, not rewritten in place: a reader that had it open still
        // sees all of the old state.
        let mut old_bytes = Vec::new();
        old.read_to_end(&mut old_bytes).unwrap();
        assert_eq!(decode::<Vm>(&old_bytes).unwrap(), vm());
        assert_eq!(read::<Vm>(&path).unwrap(), other);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["vm.state"]);
    }

    #[test]
    fn failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.state");
        write(&path, &vm()).unwrap();
        // Renaming a file over a non-empty directory fails, after the temporary is written.
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("x"), b"").unwrap();
        let error = write(&blocked, &vm()).unwrap_err();
        assert!(matches!(error.problem(), Problem::Write { .. }));
        assert!(error
            .to_string()
            .starts_with(&format!("snapshot state {} could not be written: ", blocked.display())));
        let mut names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["blocked", "vm.state"]);
        assert_eq!(read::<Vm>(&path).unwrap(), vm());
    }

    #[test]
    fn errors_from_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.state");
        let error = read::<Vm>(&missing).unwrap_err();
        assert!(matches!(error.problem(), Problem::Read { .. }));
        assert_eq!(error.path(), Some(missing.as_path()));
        assert!(error
            .to_string()
            .starts_with(&format!("snapshot state {} could not be read: ", missing.display())));

        let error = write(&dir.path().join("no/such/dir/vm.state"), &vm()).unwrap_err();
        assert!(matches!(error.problem(), Problem::Write { .. }));

        let corrupt = dir.path().join("corrupt.state");
        let mut bytes = encode(&vm()).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        fs::write(&corrupt, bytes).unwrap();
        assert_eq!(
            read::<Vm>(&corrupt).unwrap_err().to_string(),
            format!("snapshot state {} is corrupted: its checksum does not match", corrupt.display())
        );
    }
}
