//! The NSM's request handler under arbitrary guest requests: a sequence of requests (each a
//! 16-bit length and that many bytes) against one NSM, whose PCR state carries over. Every
//! request gets a response that decodes as one CBOR item; never a panic.
#![no_main]

use std::sync::{Mutex, OnceLock};

use carve_nsm::pcr::BootMeasurements;
use carve_nsm::pki::CertificateAuthority;
use carve_nsm::protocol::RESPONSE_BUFFER;
use carve_nsm::Nsm;
use libfuzzer_sys::fuzz_target;

fn nsm() -> &'static Mutex<Nsm> {
    static NSM: OnceLock<Mutex<Nsm>> = OnceLock::new();
    NSM.get_or_init(|| {
        let state = std::env::temp_dir().join(format!("carve-fuzz-nsm-{}", std::process::id()));
        let ca = CertificateAuthority::open(&state).expect("a CA in a temporary directory");
        Mutex::new(Nsm::new("i-0000000000000000-enc0".into(), &BootMeasurements::default(), ca).unwrap())
    })
}

fuzz_target!(|data: &[u8]| {
    let mut nsm = nsm().lock().unwrap();
    let mut rest = data;
    while rest.len() >= 2 {
        let len = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let request = &rest[2..2 + len];
        rest = &rest[2 + len..];
        let response = nsm.handle(request);
        assert!(response.len() <= RESPONSE_BUFFER, "a response must fit the driver's buffer");
        let mut reader = response.as_slice();
        let _: ciborium::Value = ciborium::from_reader(&mut reader).expect("responses are CBOR");
        assert!(reader.is_empty());
    }
});
