//! Any bytes as an EIF: the reader must describe it or name what is wrong, never panic.
#![no_main]

use carve_eif::reader::Discard;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for len in [Some(data.len() as u64), None] {
        if let Ok(summary) = carve_eif::read(data, len, &mut Discard) {
            let _ = summary.crc_ok();
            let _ = summary.signature_check();
            let _ = summary.measurements.to_map();
            if let Some(signature) = &summary.signature {
                let _ = signature.certificate.describe();
            }
            if let Some(metadata) = &summary.metadata {
                let _ = carve_eif::metadata::IdentityInfo::parse(metadata);
            }
        }
    }
});
