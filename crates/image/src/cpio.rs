//! A streaming writer of "newc" cpio archives (the initramfs format), as a `Read` whose total
//! length is known before the first byte: file contents are read at their offsets when needed.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

#[derive(Clone)]
pub enum Kind {
    Directory,
    /// `size` bytes of `source` from `offset`.
    File {
        source: Arc<File>,
        offset: u64,
        size: u64,
    },
    Bytes(Vec<u8>),
    Symlink(String),
    Device {
        char: bool,
        major: u32,
        minor: u32,
    },
    Fifo,
}

#[derive(Clone)]
pub struct CpioEntry {
    pub name: String,
    /// Permission bits (the file type comes from `kind`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
    pub kind: Kind,
}

impl CpioEntry {
    pub fn directory(name: &str, mode: u32) -> CpioEntry {
        CpioEntry { name: name.into(), mode, uid: 0, gid: 0, mtime: 0, kind: Kind::Directory }
    }

    pub fn bytes(name: &str, mode: u32, bytes: Vec<u8>) -> CpioEntry {
        CpioEntry { name: name.into(), mode, uid: 0, gid: 0, mtime: 0, kind: Kind::Bytes(bytes) }
    }

    pub fn file(name: &str, mode: u32, source: Arc<File>, offset: u64, size: u64) -> CpioEntry {
        CpioEntry {
            name: name.into(),
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            kind: Kind::File { source, offset, size },
        }
    }

    pub fn renamed(mut self, name: String) -> CpioEntry {
        self.name = name;
        self
    }

    fn data_len(&self) -> u64 {
        match &self.kind {
            Kind::File { size, .. } => *size,
            Kind::Bytes(bytes) => bytes.len() as u64,
            Kind::Symlink(target) => target.len() as u64,
            _ => 0,
        }
    }

    fn header(&self, ino: u32) -> Vec<u8> {
        let (file_type, nlink, rdev) = match &self.kind {
            Kind::Directory => (0o040000, 2, (0, 0)),
            Kind::File { .. } | Kind::Bytes(_) => (0o100000, 1, (0, 0)),
            Kind::Symlink(_) => (0o120000, 1, (0, 0)),
            Kind::Device { char: true, major, minor } => (0o020000, 1, (*major, *minor)),
            Kind::Device { char: false, major, minor } => (0o060000, 1, (*major, *minor)),
            Kind::Fifo => (0o010000, 1, (0, 0)),
        };
        header(
            ino,
            file_type | (self.mode & 0o7777),
            self.uid,
            self.gid,
            nlink,
            self.mtime,
            self.data_len(),
            rdev,
            &self.name,
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn header(
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    mtime: u32,
    size: u64,
    rdev: (u32, u32),
    name: &str,
) -> Vec<u8> {
    let mut out = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() + 1,
        0
    )
    .into_bytes();
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
    out
}

fn padded(len: u64) -> u64 {
    len.next_multiple_of(4)
}

/// The archive as a byte stream.
pub struct CpioStream {
    entries: Vec<CpioEntry>,
    next: usize,
    /// Header (and, for small kinds, data) bytes of the current entry still to hand out.
    pending: Vec<u8>,
    pending_at: usize,
    /// File bytes still to read for the current entry, then its padding.
    file: Option<(Arc<File>, u64, u64)>,
    file_padding: usize,
    done: bool,
}

impl CpioStream {
    pub fn new(entries: Vec<CpioEntry>) -> CpioStream {
        CpioStream {
            entries,
            next: 0,
            pending: Vec::new(),
            pending_at: 0,
            file: None,
            file_padding: 0,
            done: false,
        }
    }

    /// Total bytes the stream will yield (never zero: there is always a trailer).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        let header_len = |name: &str| padded((HEADER_LEN + name.len() + 1) as u64);
        let entries: u64 = self.entries.iter().map(|e| header_len(&e.name) + padded(e.data_len())).sum();
        entries + header_len(TRAILER)
    }

    /// Queues the next entry (or the trailer); false once everything was queued.
    fn advance(&mut self) -> bool {
        if self.done {
            return false;
        }
        self.pending_at = 0;
        let Some(entry) = self.entries.get(self.next) else {
            self.pending = header(0, 0, 0, 0, 1, 0, 0, (0, 0), TRAILER);
            self.done = true;
            return true;
        };
        self.next += 1;
        self.pending = entry.header(self.next as u32);
        let data_padding = (padded(entry.data_len()) - entry.data_len()) as usize;
        match &entry.kind {
            Kind::File { source, offset, size } => {
                self.file = Some((source.clone(), *offset, *size));
                self.file_padding = data_padding;
            }
            Kind::Bytes(bytes) => self.pending.extend_from_slice(bytes),
            Kind::Symlink(target) => self.pending.extend_from_slice(target.as_bytes()),
            _ => {}
        }
        if !matches!(entry.kind, Kind::File { .. }) {
            self.pending.resize(self.pending.len() + data_padding, 0);
        }
        true
    }
}

impl Read for CpioStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pending_at < self.pending.len() {
                let n = buf.len().min(self.pending.len() - self.pending_at);
                buf[..n].copy_from_slice(&self.pending[self.pending_at..self.pending_at + n]);
                self.pending_at += n;
                return Ok(n);
            }
            if let Some((source, offset, left)) = &mut self.file {
                if *left > 0 {
                    let want = buf.len().min(*left as usize);
                    let n = source.read_at(&mut buf[..want], *offset)?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "a file in the image ended early",
                        ));
                    }
                    *offset += n as u64;
                    *left -= n as u64;
                    return Ok(n);
                }
                self.file = None;
                self.pending = vec![0; self.file_padding];
                self.pending_at = 0;
                continue;
            }
            if !self.advance() {
                return Ok(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_matches_the_bytes_and_cpio_reads_them_back() {
        let dir = std::env::temp_dir().join(format!("carve-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("data");
        std::fs::write(&data, b"0123456789abcdef").unwrap();
        let source = Arc::new(File::open(&data).unwrap());
        let entries = vec![
            CpioEntry::directory("dev", 0o755),
            CpioEntry::file("init", 0o755, source, 3, 7),
            CpioEntry::bytes("cmd", 0o644, b"/bin/sh\n".to_vec()),
            CpioEntry { kind: Kind::Symlink("init".into()), ..CpioEntry::directory("link", 0o777) },
        ];
        let mut stream = CpioStream::new(entries);
        let len = stream.len();
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, len);
        assert_eq!(len % 4, 0);
        let archive = dir.join("archive.cpio");
        std::fs::write(&archive, &bytes).unwrap();
        // GNU cpio as the oracle.
        let out =
            std::process::Command::new("cpio").args(["-t", "-v", "-F", archive.to_str().unwrap()]).output();
        let Ok(out) = out else {
            eprintln!("SKIPPED cpio listing: cpio is not installed");
            return;
        };
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("drwxr-xr-x") && listing.contains(" dev"), "{listing}");
        assert!(
            listing.contains("-rwxr-xr-x") && listing.contains(" 7 ") && listing.contains(" init"),
            "{listing}"
        );
        assert!(listing.contains("link -> init"), "{listing}");
        let extract = dir.join("out");
        std::fs::create_dir_all(&extract).unwrap();
        let status = std::process::Command::new("cpio")
            .args(["-i", "-d", "--quiet", "-F", archive.to_str().unwrap()])
            .current_dir(&extract)
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(std::fs::read(extract.join("init")).unwrap(), b"3456789");
        assert_eq!(std::fs::read(extract.join("cmd")).unwrap(), b"/bin/sh\n");
    }
}
