//! A guest's working set, estimated with Linux idle page tracking
//! (Documentation/admin-guide/mm/idle_page_tracking.rst).
//!
//! [`IdleSample::start`] looks up the host frame behind every resident page of guest RAM in
//! /proc/self/pagemap and sets its idle flag in /sys/kernel/mm/page_idle/bitmap. Setting the
//! flag also clears the accessed bit of every mapping of the frame, and KVM's MMU notifier
//! (clear_young) does the same for the guest's EPT/NPT entries. An access by the guest, or by
//! carve itself, sets an accessed bit again, and when [`IdleSample::accessed_pages`] reads the
//! bitmap back (test_young), that clears the idle flag. A page first touched during the window
//! had no frame to mark, so it counts as accessed without a bitmap lookup.
//!
//! The estimate errs high. The kernel cannot age a frame that is off the LRU lists when it is
//! marked, such as a page faulted in so recently that it still waits in a per-CPU batch. Such
//! a frame reads as not idle. The idle flags belong to the host, one per frame, so two
//! samplers marking the same memory see each other's marks.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{GuestRam, PAGE_SIZE};

const PAGEMAP: &str = "/proc/self/pagemap";
const KPAGEFLAGS: &str = "/proc/kpageflags";
const IDLE_BITMAP: &str = "/sys/kernel/mm/page_idle/bitmap";

/// pagemap entry: the page is in RAM; its frame number is in [`PM_PFN`].
const PM_PRESENT: u64 = 1 << 63;
const PM_PFN: u64 = (1 << 55) - 1;

/// kpageflags bits (include/uapi/linux/kernel-page-flags.h).
const KPF_COMPOUND_HEAD: u64 = 1 << 15;
const KPF_COMPOUND_TAIL: u64 = 1 << 16;
const KPF_HUGE: u64 = 1 << 17;
const KPF_ZERO_PAGE: u64 = 1 << 24;

/// pagemap entries per pread: 128 MiB of guest RAM from 256 KiB of buffer.
const PAGEMAP_CHUNK: u64 = 1 << 15;
/// kpageflags entries per pread.
const FLAGS_CHUNK: u64 = 512;
/// Bitmap words per pread/pwrite. sysfs moves at most a page per call.
const BITMAP_CHUNK_WORDS: u64 = 512;
/// Frames in the largest transparent huge page (a PMD on x86-64). A folio is aligned to its
/// size, so a tail page's head is in the tail's aligned block of this many frames.
const MAX_THP_FRAMES: u64 = 512;
/// In place of a frame: nothing of the guest's that could be aged (the shared zero page).
const UNTRACKED: u64 = u64::MAX;

/// Pages of guest RAM marked idle at the start of a sample.
///
/// This keeps one bit per guest page (whether it was marked), not the frames themselves. A
/// page's idle flag moves with it when the kernel migrates it (compaction, NUMA balancing), so
/// [`IdleSample::accessed_pages`] reads the flag of the frame that holds the page then. The
/// frame recorded at the start might already be free.
pub struct IdleSample {
    /// Guest RAM's regions as mapped when the sample started.
    spans: Vec<Span>,
    /// One bit per guest page, numbered across `spans`: set where a frame was marked idle.
    marked: Vec<u64>,
}

impl IdleSample {
    /// Whether this host offers idle-page tracking: /sys/kernel/mm/page_idle/bitmap is writable
    /// and /proc/self/pagemap shows PFNs (needs CAP_SYS_ADMIN; PFN reads as 0 otherwise).
    /// /proc/kpageflags must be readable too (same kernel option, root only), because huge and
    /// zero pages can only be recognised there.
    pub fn available() -> bool {
        unavailable_reason().is_none()
    }

    /// Marks every resident page of `mem` idle. Pages never touched have no frame and are
    /// skipped: until touched they cannot be in the working set. Pages that a read of untouched
    /// memory mapped to the shared zero page are skipped as well, because they hold nothing.
    /// Fails with `Unsupported` if guest RAM is hugetlb-backed. hugetlb pages are never on an
    /// LRU list, so they can never be marked and every one would read as accessed.
    pub fn start(mem: &GuestRam) -> io::Result<IdleSample> {
        let bitmap = open(IDLE_BITMAP, true)?;
        let spans = spans(mem)?;
        let pages = spans.last().map_or(0, |s| s.first_page + s.pages);
        let mut marked = vec![0u64; pages.div_ceil(64) as usize];
        let mut frames = Vec::new();
        let hugetlb = for_each_tracked(&spans, |page, frame| {
            marked[(page / 64) as usize] |= 1 << (page % 64);
            frames.push(frame);
        })?;
        if hugetlb {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "guest RAM is in hugetlb pages ({KPAGEFLAGS} shows KPF_HUGE), which idle page \
                     tracking cannot age: they are never on an LRU list"
                ),
            ));
        }
        frames.sort_unstable();
        frames.dedup();
        mark_idle(&bitmap, &frames)?;
        Ok(IdleSample { spans, marked })
    }

    /// Pages of those marked at `start` that are no longer idle (accessed since), plus pages
    /// that became resident since start (first touched in the window — re-read pagemap for the
    /// pages that had no PFN). Returns the count of 4 KiB pages accessed.
    ///
    /// The count covers everything since [`IdleSample::start`], so calling this again gives a
    /// count at least as large, as long as no page was reclaimed in between. A transparent huge
    /// page has one idle flag, kept at its head, so an access anywhere in it counts all its
    /// 4 KiB pages.
    pub fn accessed_pages(&self, mem: &GuestRam) -> io::Result<u64> {
        if spans(mem)? != self.spans {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "guest RAM is not mapped as it was when the idle sample started",
            ));
        }
        let bitmap = open(IDLE_BITMAP, false)?;
        let mut first_touched = 0;
        let mut frames = Vec::new();
        for_each_tracked(&self.spans, |page, frame| {
            if self.marked[(page / 64) as usize] >> (page % 64) & 1 != 0 {
                frames.push(frame);
            } else {
                first_touched += 1;
            }
        })?;
        frames.sort_unstable();
        Ok(first_touched + count_not_idle(&bitmap, &frames)?)
    }
}

/// Why the host does not offer idle page tracking, or None if it does.
fn unavailable_reason() -> Option<String> {
    if let Err(e) = open(IDLE_BITMAP, true) {
        return Some(format!(
            "{e} (it exists only with CONFIG_IDLE_PAGE_TRACKING, and only root may write it)"
        ));
    }
    frames_hidden()
}

/// Why this process cannot see which frames back its pages, or None if it can: pagemap must
/// show frame numbers (it zeroes them without CAP_SYS_ADMIN), and kpageflags must be readable.
fn frames_hidden() -> Option<String> {
    if let Err(e) = open(KPAGEFLAGS, false) {
        return Some(e.to_string());
    }
    // A page of this stack is resident: it is in use right now.
    let probe = [0u8; 8];
    let address = std::hint::black_box(&probe).as_ptr().addr() as u64;
    let mut entry = [0];
    let read = open(PAGEMAP, false)
        .and_then(|pagemap| read_u64s(&pagemap, PAGEMAP, address / PAGE_SIZE, &mut entry));
    match read {
        Err(e) => Some(e.to_string()),
        Ok(()) if entry[0] & PM_PRESENT != 0 && entry[0] & PM_PFN != 0 => None,
        Ok(()) => Some(format!("{PAGEMAP} hides frame numbers: showing them needs CAP_SYS_ADMIN")),
    }
}

/// One region of guest RAM as this process maps it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Span {
    /// Host virtual address of its first byte.
    host: u64,
    pages: u64,
    /// The number of its first page, counting across all regions.
    first_page: u64,
}

fn spans(mem: &GuestRam) -> io::Result<Vec<Span>> {
    let mut first_page = 0;
    mem.iter()
        .map(|region| {
            let host = mem.get_host_address(region.start_addr()).map_err(|e| {
                io::Error::other(format!(
                    "guest RAM region at {:#x} has no host mapping: {e}",
                    region.start_addr().raw_value()
                ))
            })?;
            let span = Span { host: host.addr() as u64, pages: region.len().div_ceil(PAGE_SIZE), first_page };
            first_page += span.pages;
            Ok(span)
        })
        .collect()
}

/// Calls `each(page, frame)` for every page of `spans` whose frame can be aged. `page` numbers
/// pages across the spans, and `frame` is the one whose idle flag stands for the page (see
/// [`track_frames`]). Returns whether any page was a hugetlb page. Works one pagemap chunk at a
/// time, so memory use does not grow with the guest.
fn for_each_tracked(spans: &[Span], mut each: impl FnMut(u64, u64)) -> io::Result<bool> {
    let pagemap = open(PAGEMAP, false)?;
    let kpageflags = open(KPAGEFLAGS, false)?;
    let read_flags = |first: u64, out: &mut [u64]| read_u64s(&kpageflags, KPAGEFLAGS, first, out);
    let mut buffer = vec![0; PAGEMAP_CHUNK as usize];
    let mut hugetlb = false;
    for span in spans {
        let mut done = 0;
        while done < span.pages {
            let entries = &mut buffer[..(span.pages - done).min(PAGEMAP_CHUNK) as usize];
            read_u64s(&pagemap, PAGEMAP, span.host / PAGE_SIZE + done, entries)?;
            let mut frames: Vec<u64> =
                entries.iter().filter(|&&e| e & PM_PRESENT != 0).map(|&e| e & PM_PFN).collect();
            if frames.contains(&0) {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{PAGEMAP} hides frame numbers: showing them needs CAP_SYS_ADMIN"),
                ));
            }
            frames.sort_unstable();
            frames.dedup();
            let (heads, huge) = track_frames(&frames, read_flags)?;
            hugetlb |= huge;
            for (page, &entry) in (span.first_page + done..).zip(entries.iter()) {
                if entry & PM_PRESENT == 0 {
                    continue;
                }
                let head = heads[frames.binary_search(&(entry & PM_PFN)).expect("every frame was looked up")];
                if head != UNTRACKED {
                    each(page, head);
                }
            }
            done += entries.len() as u64;
        }
    }
    Ok(hugetlb)
}

/// For each of `frames` (sorted, distinct), the frame whose idle flag stands for it. That is
/// the frame itself, except in two cases. A tail page of a huge page is represented by the
/// folio's head, because the kernel keeps one idle flag per folio at the head and reads every
/// tail as not idle. The shared zero page, which reads of untouched memory map and which holds
/// nothing of the guest's, is [`UNTRACKED`]. Also says whether any frame is a hugetlb page.
/// `flags(first, out)` fills `out` with /proc/kpageflags from frame `first` on.
fn track_frames(
    frames: &[u64],
    mut flags: impl FnMut(u64, &mut [u64]) -> io::Result<()>,
) -> io::Result<(Vec<u64>, bool)> {
    let mut heads = Vec::with_capacity(frames.len());
    let mut hugetlb = false;
    let mut buffer = vec![0; FLAGS_CHUNK as usize];
    // The previous frame and its head, when it was part of a huge page: the next frame, if a
    // tail, shares that head (a folio is contiguous), which spares a search for it.
    let mut previous: Option<(u64, u64)> = None;
    for run in runs(frames.iter().copied(), FLAGS_CHUNK) {
        let run_flags = &mut buffer[..run.len as usize];
        flags(run.first, run_flags)?;
        for (frame, &f) in (run.first..).zip(run_flags.iter()) {
            hugetlb |= f & KPF_HUGE != 0;
            let head = if f & KPF_ZERO_PAGE != 0 {
                UNTRACKED
            } else if f & KPF_COMPOUND_TAIL == 0 {
                frame
            } else {
                match previous {
                    Some((before, head)) if before + 1 == frame => head,
                    _ => find_head(frame, &mut flags)?,
                }
            };
            let compound = f & (KPF_COMPOUND_HEAD | KPF_COMPOUND_TAIL) != 0;
            previous = (compound && head != UNTRACKED).then_some((frame, head));
            heads.push(head);
        }
    }
    Ok((heads, hugetlb))
}

/// The head of the huge page whose tail is `frame`: the last head before it within its aligned
/// block of [`MAX_THP_FRAMES`]. A tail with no head there (a gigantic hugetlb page) stands for
/// itself, and so reads as not idle.
fn find_head(frame: u64, flags: &mut impl FnMut(u64, &mut [u64]) -> io::Result<()>) -> io::Result<u64> {
    let block = frame & !(MAX_THP_FRAMES - 1);
    let mut before = vec![0; (frame - block) as usize];
    flags(block, &mut before)?;
    Ok(before.iter().rposition(|f| f & KPF_COMPOUND_HEAD != 0).map_or(frame, |i| block + i as u64))
}

/// Consecutive integers, as `first..first + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    first: u64,
    len: u64,
}

impl Run {
    fn end(self) -> u64 {
        self.first + self.len
    }
}

/// `sorted` (ascending; repeats are skipped) as runs of consecutive values, each at most
/// `max_len` long.
fn runs(sorted: impl IntoIterator<Item = u64>, max_len: u64) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for value in sorted {
        match out.last_mut() {
            Some(run) if value < run.end() => debug_assert!(value + 1 == run.end(), "values are unsorted"),
            Some(run) if value == run.end() && run.len < max_len => run.len += 1,
            _ => out.push(Run { first: value, len: 1 }),
        }
    }
    out
}

/// The idle-bitmap words holding the bits of `frames` (sorted), each word once, as runs of
/// adjacent words at most `max_len` long. Word `i` covers frames `64 * i..64 * i + 64`. Each
/// run takes one pread or pwrite (at byte `8 * first`), not one per frame.
fn word_runs(frames: &[u64], max_len: u64) -> Vec<Run> {
    runs(frames.iter().map(|frame| frame / 64), max_len)
}

/// Sets the idle flag of each of `frames` (sorted).
fn mark_idle(bitmap: &File, frames: &[u64]) -> io::Result<()> {
    let mut rest = frames;
    let mut bytes = Vec::new();
    for run in word_runs(frames, BITMAP_CHUNK_WORDS) {
        let mut words = vec![0u64; run.len as usize];
        while let Some((&frame, tail)) = rest.split_first() {
            if frame / 64 >= run.end() {
                break;
            }
            words[(frame / 64 - run.first) as usize] |= 1 << (frame % 64);
            rest = tail;
        }
        bytes.clear();
        bytes.extend(words.iter().flat_map(|word| word.to_ne_bytes()));
        let mut done = 0;
        while done < bytes.len() {
            match bitmap.write_at(&bytes[done..], run.first * 8 + done as u64) {
                // Only in the word holding the host's last frame (max_pfn), which the kernel
                // takes but does not count. Its frames then read as not idle.
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(context(e, "write", IDLE_BITMAP)),
            }
        }
    }
    Ok(())
}

/// How many of `frames` (sorted; a frame listed twice counts twice) read as not idle.
fn count_not_idle(bitmap: &File, frames: &[u64]) -> io::Result<u64> {
    let mut rest = frames;
    let mut count = 0;
    let mut bytes = Vec::new();
    for run in word_runs(frames, BITMAP_CHUNK_WORDS) {
        bytes.clear();
        bytes.resize(run.len as usize * 8, 0);
        let mut done = 0;
        while done < bytes.len() {
            match bitmap.read_at(&mut bytes[done..], run.first * 8 + done as u64) {
                // As in `mark_idle`: past max_pfn the words stay zero, which reads as not idle.
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(context(e, "read", IDLE_BITMAP)),
            }
        }
        while let Some((&frame, tail)) = rest.split_first() {
            let word = frame / 64;
            if word >= run.end() {
                break;
            }
            let at = (word - run.first) as usize * 8;
            let bits = u64::from_ne_bytes(bytes[at..at + 8].try_into().expect("eight bytes"));
            if bits >> (frame % 64) & 1 == 0 {
                count += 1;
            }
            rest = tail;
        }
    }
    Ok(count)
}

/// Fills `out` with the native-endian u64s at index `index` of `file`. pagemap and kpageflags
/// are arrays of these, one per page or frame.
fn read_u64s(file: &File, path: &str, index: u64, out: &mut [u64]) -> io::Result<()> {
    let mut bytes = vec![0u8; out.len() * 8];
    file.read_exact_at(&mut bytes, index * 8).map_err(|e| context(e, "read", path))?;
    for (value, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        *value = u64::from_ne_bytes(chunk.try_into().expect("eight bytes"));
    }
    Ok(())
}

fn open(path: &str, write: bool) -> io::Result<File> {
    OpenOptions::new().read(true).write(write).open(path).map_err(|e| context(e, "open", path))
}

fn context(e: io::Error, doing: &str, path: &str) -> io::Error {
    io::Error::new(e.kind(), format!("cannot {doing} {path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create, MemoryBacking};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn frames_group_into_words_and_adjacent_words_into_runs() {
        // Words: 0 (5, 63), 1 (64), 2 (130), 3 (200), 10, 11, 12, 15 (1000).
        let frames = [5, 63, 64, 130, 200, 641, 704, 831, 1000];
        assert_eq!(
            word_runs(&frames, 512),
            [Run { first: 0, len: 4 }, Run { first: 10, len: 3 }, Run { first: 15, len: 1 }]
        );
        // A bounded buffer splits a run but never a word.
        assert_eq!(
            word_runs(&frames, 2),
            [
                Run { first: 0, len: 2 },
                Run { first: 2, len: 2 },
                Run { first: 10, len: 2 },
                Run { first: 12, len: 1 },
                Run { first: 15, len: 1 },
            ]
        );
        // A frame listed twice (two guest pages on one frame) reads its word once.
        assert_eq!(word_runs(&[7, 7, 7], 512), [Run { first: 0, len: 1 }]);
        assert_eq!(word_runs(&[], 512), []);
    }

    #[test]
    fn tails_stand_for_their_head_and_the_zero_page_for_nothing() {
        let kpageflags = |frame: u64| match frame {
            7 => KPF_ZERO_PAGE,
            1536 => KPF_COMPOUND_HEAD, // a 2 MiB THP: 1536..2048
            1537..=2047 => KPF_COMPOUND_TAIL,
            2048 | 2064 => KPF_COMPOUND_HEAD, // two 64 KiB folios: 2048..2064, 2064..2080
            2049..=2063 | 2065..=2079 => KPF_COMPOUND_TAIL,
            4096 => KPF_HUGE | KPF_COMPOUND_HEAD,
            _ => 0,
        };
        let flags = |first: u64, out: &mut [u64]| {
            for (frame, flags) in (first..).zip(out.iter_mut()) {
                *flags = kpageflags(frame);
            }
            Ok(())
        };
        let frames = [7, 1000, 1536, 1537, 1600, 1601, 2047, 2070, 4096];
        let (heads, hugetlb) = track_frames(&frames, flags).unwrap();
        assert_eq!(heads, [UNTRACKED, 1000, 1536, 1536, 1536, 1536, 1536, 2064, 4096]);
        assert!(hugetlb);
        let (_, hugetlb) = track_frames(&[1000, 1001], flags).unwrap();
        assert!(!hugetlb);
    }

    /// Runs wherever frame numbers are visible (root), with or without idle page tracking.
    #[test]
    fn pages_read_but_never_written_are_not_resident() {
        if let Some(why) = frames_hidden() {
            eprintln!("skipping: {why}");
            return;
        }
        let mem = create(16, MemoryBacking::Anonymous).unwrap();
        mem.write_obj(1u64, GuestAddress(200 * PAGE_SIZE)).unwrap();
        // A read fault on untouched anonymous memory maps the shared zero page (or the huge
        // zero page), and 11 MiB away it cannot share a huge page with page 200.
        let zero: u64 = mem.read_obj(GuestAddress(3000 * PAGE_SIZE)).unwrap();
        assert_eq!(zero, 0);
        // pagemap does show it, with a frame: only kpageflags tells it apart.
        let span = &spans(&mem).unwrap()[0];
        let mut entry = [0];
        let pagemap = open(PAGEMAP, false).unwrap();
        read_u64s(&pagemap, PAGEMAP, span.host / PAGE_SIZE + 3000, &mut entry).unwrap();
        assert!(entry[0] & PM_PRESENT != 0 && entry[0] & PM_PFN != 0, "{:#x}", entry[0]);
        let mut pages = Vec::new();
        for_each_tracked(&spans(&mem).unwrap(), |page, _| pages.push(page)).unwrap();
        assert!(pages.contains(&200), "{pages:?}");
        assert!(!pages.contains(&3000), "{pages:?}");
    }

    #[test]
    fn sample_counts_pages_touched_in_the_window() {
        if let Some(why) = unavailable_reason() {
            eprintln!("idle page tracking is unavailable, so no sample is taken: {why}");
            assert!(!IdleSample::available());
            if !std::path::Path::new("/sys/kernel/mm/page_idle").exists() {
                assert!(why.contains(IDLE_BITMAP), "{why}");
            }
            return;
        }
        assert!(IdleSample::available());
        let mem = create(16, MemoryBacking::Anonymous).unwrap();
        let total = (16 << 20) / PAGE_SIZE;
        for page in 0..64 {
            mem.write_obj(page, GuestAddress(page * PAGE_SIZE)).unwrap();
        }
        let _: u64 = mem.read_obj(GuestAddress(3000 * PAGE_SIZE)).unwrap();
        let sample = IdleSample::start(&mem).unwrap();
        // Host accesses go through page tables that marking aged, so they count as a guest's do.
        const TOUCHED: u64 = 8;
        for page in 16..16 + TOUCHED {
            mem.write_obj(!page, GuestAddress(page * PAGE_SIZE)).unwrap();
        }
        const FIRST_TOUCHED: u64 = 2;
        for page in 2000..2000 + FIRST_TOUCHED {
            mem.write_obj(page, GuestAddress(page * PAGE_SIZE)).unwrap();
        }
        let accessed = sample.accessed_pages(&mem).unwrap();
        eprintln!("{accessed} of {total} pages accessed");
        assert!(accessed >= TOUCHED + FIRST_TOUCHED, "{accessed}");
        // Up to two transparent huge pages (1024 pages) if THP is always on, else about 64.
        assert!(accessed <= total / 2, "{accessed} of {total}");
        assert!(sample.accessed_pages(&mem).unwrap() >= accessed);
    }
}
