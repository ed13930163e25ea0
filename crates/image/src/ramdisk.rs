//! Reading an enclave image's ramdisks back: the files of a "newc" cpio archive (plain or
//! gzipped, archives one after another as the kernel reads them) with their metadata and a
//! digest of their contents, and what differs between two such listings. The archive is
//! untrusted: names and link targets are bounded, contents are hashed as they stream past,
//! nothing is extracted.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read};

use sha2::{Digest, Sha256};

const MAGIC_NEWC: &[u8; 6] = b"070701";
const MAGIC_CRC: &[u8; 6] = b"070702";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";
/// Longer names or link targets than Linux's PATH_MAX are refused.
const MAX_NAME: usize = 4096;
/// Entries read from one ramdisk at most (a listing is kept in memory).
const MAX_ENTRIES: usize = 1 << 20;

/// One file of a ramdisk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamdiskFile {
    pub path: String,
    /// Type and permission bits, as `st_mode`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
    pub size: u32,
    /// SHA-256 of the contents (of the target, for a symlink).
    pub digest: [u8; 32],
    /// A symlink's target.
    pub link: Option<String>,
    /// A device node's major and minor.
    pub rdev: (u32, u32),
}

#[derive(Debug, thiserror::Error)]
pub enum RamdiskError {
    #[error("cannot read the ramdisk: {0}")]
    Io(#[from] io::Error),
    #[error("entry {index} is not a newc cpio header")]
    BadHeader { index: usize },
    #[error("entry {index} has a name of {len} bytes")]
    BadName { index: usize, len: usize },
    #[error("the ramdisk ends inside entry {index}")]
    Truncated { index: usize },
    #[error("the ramdisk has more than {MAX_ENTRIES} entries")]
    TooManyEntries,
}

/// The files of the cpio archive(s) in `input`, in archive order (a later entry of the same path
/// replaces an earlier one, as when the kernel unpacks them).
pub fn list(input: impl Read) -> Result<Vec<RamdiskFile>, RamdiskError> {
    let mut input = BufReader::new(input);
    let gzipped = input.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    let mut input: Box<dyn BufRead> = if gzipped {
        Box::new(BufReader::new(flate2::bufread::MultiGzDecoder::new(input)))
    } else {
        Box::new(input)
    };
    let mut files: Vec<RamdiskFile> = Vec::new();
    let mut index_of: BTreeMap<String, usize> = BTreeMap::new();
    let mut offset = 0u64;
    let mut index = 0;
    loop {
        // Between archives: zero padding, then another archive or the end.
        let next = loop {
            let buf = input.fill_buf()?;
            match buf.iter().position(|&b| b != 0) {
                Some(at) => {
                    input.consume(at);
                    offset += at as u64;
                    break true;
                }
                None if buf.is_empty() => break false,
                None => {
                    let len = buf.len();
                    input.consume(len);
                    offset += len as u64;
                }
            }
        };
        if !next {
            return Ok(files);
        }
        if index == MAX_ENTRIES {
            return Err(RamdiskError::TooManyEntries);
        }
        let file = read_entry(&mut input, &mut offset, index)?;
        index += 1;
        let Some(file) = file else { continue };
        match index_of.get(&file.path) {
            Some(&at) => files[at] = file,
            None => {
                index_of.insert(file.path.clone(), files.len());
                files.push(file);
            }
        }
    }
}

/// One entry; `None` for a trailer.
fn read_entry(
    input: &mut dyn BufRead,
    offset: &mut u64,
    index: usize,
) -> Result<Option<RamdiskFile>, RamdiskError> {
    let truncated = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => RamdiskError::Truncated { index },
        _ => RamdiskError::Io(e),
    };
    let mut header = [0u8; HEADER_LEN];
    input.read_exact(&mut header[..6]).map_err(truncated)?;
    if &header[..6] != MAGIC_NEWC && &header[..6] != MAGIC_CRC {
        return Err(RamdiskError::BadHeader { index });
    }
    input.read_exact(&mut header[6..]).map_err(truncated)?;
    let field = |n: usize| -> Result<u32, RamdiskError> {
        let text = std::str::from_utf8(&header[6 + 8 * n..14 + 8 * n])
            .map_err(|_| RamdiskError::BadHeader { index })?;
        u32::from_str_radix(text, 16).map_err(|_| RamdiskError::BadHeader { index })
    };
    let (mode, uid, gid, mtime, size) = (field(1)?, field(2)?, field(3)?, field(5)?, field(6)?);
    let rdev = (field(9)?, field(10)?);
    let name_len = field(11)? as usize;
    if name_len == 0 || name_len > MAX_NAME {
        return Err(RamdiskError::BadName { index, len: name_len });
    }
    let mut name = vec![0u8; name_len];
    input.read_exact(&mut name).map_err(truncated)?;
    *offset += (HEADER_LEN + name_len) as u64;
    skip(input, offset, pad4(*offset)).map_err(truncated)?;
    // (the name's terminating NUL is part of its length)
    let path = String::from_utf8_lossy(name.strip_suffix(&[0]).unwrap_or(&name)).into_owned();
    let is_link = mode & 0o170000 == 0o120000;
    if is_link && size as usize > MAX_NAME {
        return Err(RamdiskError::BadName { index, len: size as usize });
    }
    let mut hasher = Sha256::new();
    let mut target = Vec::new();
    let mut left = u64::from(size);
    let mut buf = [0u8; 64 * 1024];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        input.read_exact(&mut buf[..want]).map_err(truncated)?;
        hasher.update(&buf[..want]);
        if is_link {
            target.extend_from_slice(&buf[..want]);
        }
        left -= want as u64;
    }
    *offset += u64::from(size);
    skip(input, offset, pad4(*offset)).map_err(truncated)?;
    if path == TRAILER {
        return Ok(None);
    }
    let link = is_link.then(|| String::from_utf8_lossy(&target).into_owned());
    Ok(Some(RamdiskFile { path, mode, uid, gid, mtime, size, digest: hasher.finalize().into(), link, rdev }))
}

fn pad4(offset: u64) -> u64 {
    (4 - offset % 4) % 4
}

fn skip(input: &mut dyn BufRead, offset: &mut u64, count: u64) -> io::Result<()> {
    let skipped = io::copy(&mut input.take(count), &mut io::sink())?;
    *offset += skipped;
    if skipped < count {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// How one path differs between two ramdisks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileDifference {
    OnlyInFirst(RamdiskFile),
    OnlyInSecond(RamdiskFile),
    Changed { first: RamdiskFile, second: RamdiskFile },
}

/// The paths whose files differ, in path order.
pub fn diff(first: &[RamdiskFile], second: &[RamdiskFile]) -> Vec<FileDifference> {
    let by_path = |files: &[RamdiskFile]| -> BTreeMap<String, RamdiskFile> {
        files.iter().map(|f| (f.path.clone(), f.clone())).collect()
    };
    let (mut a, b) = (by_path(first), by_path(second));
    let mut differences = Vec::new();
    for (path, second) in b {
        match a.remove(&path) {
            None => differences.push(FileDifference::OnlyInSecond(second)),
            Some(first) if first != second => differences.push(FileDifference::Changed { first, second }),
            Some(_) => {}
        }
    }
    differences.extend(a.into_values().map(FileDifference::OnlyInFirst));
    differences.sort_by(|x, y| x.path().cmp(y.path()));
    differences
}

impl FileDifference {
    pub fn path(&self) -> &str {
        match self {
            FileDifference::OnlyInFirst(f) | FileDifference::OnlyInSecond(f) => &f.path,
            FileDifference::Changed { first, .. } => &first.path,
        }
    }
}

impl RamdiskFile {
    /// `file 0644 0:0 12 bytes sha256 ab12…` and the like.
    pub fn summary(&self) -> String {
        let kind = match self.mode & 0o170000 {
            0o040000 => "directory",
            0o120000 => "symlink",
            0o020000 => "char device",
            0o060000 => "block device",
            0o010000 => "fifo",
            0o140000 => "socket",
            _ => "file",
        };
        let mut text =
            format!("{kind} {:04o} {}:{} mtime {}", self.mode & 0o7777, self.uid, self.gid, time(self.mtime));
        match (&self.link, self.mode & 0o170000) {
            (Some(target), _) => text += &format!(" -> {target}"),
            (None, 0o100000) => text += &format!(" {} bytes sha256 {}", self.size, hex(&self.digest[..8])),
            (None, 0o020000 | 0o060000) => text += &format!(" {}:{}", self.rdev.0, self.rdev.1),
            _ => {}
        }
        text
    }
}

impl fmt::Display for FileDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileDifference::OnlyInFirst(file) => {
                write!(f, "- {}: only in the first ({})", file.path, file.summary())
            }
            FileDifference::OnlyInSecond(file) => {
                write!(f, "+ {}: only in the second ({})", file.path, file.summary())
            }
            FileDifference::Changed { first, second } => {
                let mut changes = Vec::new();
                let mut field = |name: &str, a: String, b: String| {
                    if a != b {
                        changes.push(format!("{name} {a} → {b}"));
                    }
                };
                field("type and mode", format!("{:06o}", first.mode), format!("{:06o}", second.mode));
                field(
                    "owner",
                    format!("{}:{}", first.uid, first.gid),
                    format!("{}:{}", second.uid, second.gid),
                );
                field("mtime", time(first.mtime), time(second.mtime));
                field("size", first.size.to_string(), second.size.to_string());
                field("link", format!("{:?}", first.link), format!("{:?}", second.link));
                field("device", format!("{:?}", first.rdev), format!("{:?}", second.rdev));
                if first.digest != second.digest {
                    changes.push(format!(
                        "sha256 {} → {}",
                        hex(&first.digest[..8]),
                        hex(&second.digest[..8])
                    ));
                }
                write!(f, "~ {}: {}", first.path, changes.join(", "))
            }
        }
    }
}

fn time(seconds: u32) -> String {
    carve_eif::metadata::rfc3339(u64::from(seconds))
}

/// The first bytes of a digest, enough to tell two apart.
fn hex(bytes: &[u8]) -> String {
    carve_eif::measure::hex(bytes) + "…"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::{CpioEntry, CpioStream, Kind};

    fn archive(entries: Vec<CpioEntry>) -> Vec<u8> {
        let mut bytes = Vec::new();
        CpioStream::new(entries).read_to_end(&mut bytes).unwrap();
        bytes
    }

    #[test]
    fn lists_what_carves_writer_wrote_and_later_archives_win() {
        let link =
            CpioEntry { kind: Kind::Symlink("busybox".into()), ..CpioEntry::directory("bin/sh", 0o777) };
        let first = archive(vec![
            CpioEntry::directory("bin", 0o755),
            CpioEntry::bytes("bin/app", 0o755, b"v1".to_vec()),
            link,
        ]);
        let second = archive(vec![CpioEntry::bytes("bin/app", 0o700, b"version 2".to_vec())]);
        let files = list(&[first.clone(), second].concat()[..]).unwrap();
        let summaries: Vec<(String, u32, u32)> =
            files.iter().map(|f| (f.path.clone(), f.mode, f.size)).collect();
        assert_eq!(
            summaries,
            [("bin".into(), 0o40755, 0), ("bin/app".into(), 0o100700, 9), ("bin/sh".into(), 0o120777, 7)]
        );
        assert_eq!(files[2].link.as_deref(), Some("busybox"));
        assert_eq!(files[1].digest, <[u8; 32]>::from(Sha256::digest(b"version 2")));

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &first).unwrap();
        let unzipped = list(&gz.finish().unwrap()[..]).unwrap();
        assert_eq!(unzipped, list(&first[..]).unwrap());

        let changed = list(&archive(vec![CpioEntry::directory("bin", 0o755)])[..]).unwrap();
        let differences = diff(&unzipped, &changed);
        assert_eq!(differences.iter().map(FileDifference::path).collect::<Vec<_>>(), ["bin/app", "bin/sh"]);
        assert!(matches!(differences[0], FileDifference::OnlyInFirst(_)));

        assert!(matches!(list(&first[..first.len() - 200]), Err(RamdiskError::Truncated { .. })));
        assert!(matches!(
            list(&b"not a cpio archive at all, no"[..]),
            Err(RamdiskError::BadHeader { index: 0 })
        ));
    }
}
