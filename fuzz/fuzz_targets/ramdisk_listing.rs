//! `carve pcr-diff` lists the ramdisks of untrusted enclave images: any bytes (plain or gzipped
//! cpio, archives back to back) must list or fail cleanly, never panic or allocate without
//! bound; a listing compared with itself has no differences.
#![no_main]

use carve_image::ramdisk;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(files) = ramdisk::list(data) {
        assert!(ramdisk::diff(&files, &files).is_empty());
        for file in &files {
            let _ = file.summary();
        }
    }
});
