//! Booting an Enclave Image Format file as Nitro does: the whole EIF is copied into guest
//! memory at 8 MiB, then the kernel, its command line and the concatenated ramdisks are loaded
//! from that copy by the Linux boot protocol (the job of the Nitro hypervisor, which carve stands
//! in for). The image's measurements come from the same checked pass that locates the sections.

use crate::memory::GuestRam;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use carve_eif::{EifSummary, Measurements, SectionType};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, GuestAddress, ReadVolatile, VolatileMemoryError, VolatileSlice};

use super::BootError;
use crate::memory::low_ram_end;

/// Where the EIF copy starts in guest memory.
pub const EIF_LOAD_ADDRESS: u64 = 8 << 20;

/// An EIF copied into guest memory, with its sections located in the copy.
pub struct LoadedEif {
    pub kernel: GuestBytes,
    /// Every ramdisk, in file order, read as one initrd.
    pub initrd: GuestBytes,
    /// The image's command line (trailing NULs dropped).
    pub cmdline: String,
    pub measurements: Measurements,
    /// Bytes of guest memory the copy occupies from [`EIF_LOAD_ADDRESS`].
    pub size: u64,
}

/// Copies the EIF at `path` into `mem` at [`EIF_LOAD_ADDRESS`], then checks the copy (format,
/// CRC) and measures it in one pass: the file is read once, and what is measured is what boots.
pub fn copy_into(mem: &GuestRam, path: &Path) -> Result<LoadedEif, BootError> {
    let not_bootable = |e: &dyn std::fmt::Display| BootError::Eif(e.to_string());
    let mut file = File::open(path).map_err(|e| not_bootable(&format_args!("cannot read the image: {e}")))?;
    let size = file.seek(SeekFrom::End(0)).map_err(BootError::ReadKernel)?;
    let room = low_ram_end(mem).saturating_sub(EIF_LOAD_ADDRESS);
    if size > room {
        return Err(BootError::EifTooLarge { size, ramdisks: 0, room });
    }
    file.seek(SeekFrom::Start(0)).map_err(BootError::ReadKernel)?;
    mem.read_exact_volatile_from(GuestAddress(EIF_LOAD_ADDRESS), &mut file, size as usize)
        .map_err(|e| BootError::ReadKernel(std::io::Error::other(e)))?;
    let copy = GuestBytes::new(mem.clone(), vec![(EIF_LOAD_ADDRESS, size)]);
    let summary =
        carve_eif::read(copy, Some(size), &mut carve_eif::reader::Discard).map_err(|e| not_bootable(&e))?;
    summary.check_crc().map_err(|e| not_bootable(&e))?;
    // The ramdisks are copied out of the image to the top of low RAM; the two must not meet.
    let ramdisks: u64 =
        summary.sections.iter().filter(|s| s.section_type == SectionType::Ramdisk).map(|s| s.size).sum();
    if size + ramdisks.next_multiple_of(4096) > room {
        return Err(BootError::EifTooLarge { size, ramdisks, room });
    }
    locate(mem, &summary, size)
}

fn locate(mem: &GuestRam, summary: &EifSummary, size: u64) -> Result<LoadedEif, BootError> {
    let pieces = |kind: SectionType| -> Vec<(u64, u64)> {
        summary
            .sections
            .iter()
            .filter(|s| s.section_type == kind)
            .map(|s| (EIF_LOAD_ADDRESS + s.data_offset(), s.size))
            .collect()
    };
    // The reader guarantees exactly one kernel and one cmdline and at least one ramdisk.
    let kernel = GuestBytes::new(mem.clone(), pieces(SectionType::Kernel));
    let mut cmdline = GuestBytes::new(mem.clone(), pieces(SectionType::Cmdline));
    let mut text = Vec::new();
    cmdline.read_to_end(&mut text).map_err(BootError::ReadKernel)?;
    while text.last() == Some(&0) {
        text.pop();
    }
    let cmdline =
        String::from_utf8(text).map_err(|_| BootError::Eif("the cmdline section is not UTF-8".into()))?;
    Ok(LoadedEif {
        kernel,
        initrd: GuestBytes::new(mem.clone(), pieces(SectionType::Ramdisk)),
        cmdline,
        measurements: summary.measurements,
        size,
    })
}

/// Pieces of guest memory read as one seekable byte stream.
pub struct GuestBytes {
    mem: GuestRam,
    pieces: Vec<(u64, u64)>,
    len: u64,
    pos: u64,
}

impl GuestBytes {
    pub fn new(mem: GuestRam, pieces: Vec<(u64, u64)>) -> GuestBytes {
        let len = pieces.iter().map(|p| p.1).sum();
        GuestBytes { mem, pieces, len, pos: 0 }
    }

    /// The guest address and length of the longest run readable at the current position.
    fn run(&self, want: usize) -> Option<(u64, usize)> {
        let mut start = 0;
        for &(addr, len) in &self.pieces {
            if self.pos < start + len {
                let offset = self.pos - start;
                return Some((addr + offset, ((len - offset) as usize).min(want)));
            }
            start += len;
        }
        None
    }
}

impl Read for GuestBytes {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some((addr, n)) = self.run(buf.len()) else { return Ok(0) };
        self.mem.read_slice(&mut buf[..n], GuestAddress(addr)).map_err(std::io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for GuestBytes {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let target = match pos {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(n) => self.len.checked_add_signed(n),
            SeekFrom::Current(n) => self.pos.checked_add_signed(n),
        };
        self.pos = target.ok_or_else(|| std::io::Error::other("seek before the start"))?;
        Ok(self.pos)
    }
}

impl ReadVolatile for GuestBytes {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        // vm-memory asks each region for its whole part in one call: fill `buf` (short only at
        // the end of the stream), a bounded chunk at a time.
        let mut chunk = vec![0u8; buf.len().min(1 << 20)];
        let mut done = 0;
        while done < buf.len() {
            let want = (buf.len() - done).min(chunk.len());
            let n = self.read(&mut chunk[..want]).map_err(VolatileMemoryError::IOError)?;
            if n == 0 {
                break;
            }
            buf.offset(done)?.copy_from(&chunk[..n]);
            done += n;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_read_as_one_stream_and_seek() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x100)).unwrap();
        mem.write_slice(b", world", GuestAddress(0x900)).unwrap();
        let mut bytes = GuestBytes::new(mem, vec![(0x100, 5), (0x900, 7)]);
        assert_eq!(bytes.seek(SeekFrom::End(0)).unwrap(), 12);
        bytes.seek(SeekFrom::Start(3)).unwrap();
        let mut out = String::new();
        bytes.read_to_string(&mut out).unwrap();
        assert_eq!(out, "lo, world");
        assert!(bytes.seek(SeekFrom::Current(-20)).is_err());
    }

    #[test]
    fn a_kernel_larger_than_one_chunk_loads_whole() {
        // A 6.12 enclave kernel is 1.4 MiB: more than one read chunk, in one region.
        let len = (1 << 20) + 4096 + 3;
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        mem.write_slice(&data[..1000], GuestAddress(0x40_0000)).unwrap();
        mem.write_slice(&data[1000..], GuestAddress(0x50_0000)).unwrap();
        let mut bytes =
            GuestBytes::new(mem.clone(), vec![(0x40_0000, 1000), (0x50_0000, (len - 1000) as u64)]);
        mem.read_exact_volatile_from(GuestAddress(0x10_0000), &mut bytes, len).unwrap();
        let mut copy = vec![0u8; len];
        mem.read_slice(&mut copy, GuestAddress(0x10_0000)).unwrap();
        assert!(copy == data, "every byte in place");
    }
}
