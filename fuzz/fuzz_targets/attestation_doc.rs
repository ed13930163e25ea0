//! `carve attestation verify` on arbitrary bytes: the COSE and payload parsers and the chain
//! checks see untrusted documents. Never a panic, and garbage never verifies.
#![no_main]

use std::sync::OnceLock;
use std::time::SystemTime;

use carve_nsm::pki::CertificateAuthority;
use carve_nsm::verify::{verify, Expectations};
use libfuzzer_sys::fuzz_target;

fn root() -> &'static x509_cert::Certificate {
    static ROOT: OnceLock<x509_cert::Certificate> = OnceLock::new();
    ROOT.get_or_init(|| {
        let state = std::env::temp_dir().join(format!("carve-fuzz-doc-{}", std::process::id()));
        CertificateAuthority::open(&state).expect("a CA in a temporary directory").root().clone()
    })
}

fuzz_target!(|data: &[u8]| {
    let verdict = verify(data, root(), &Expectations::default(), SystemTime::now());
    assert!(!verdict.valid, "no fuzzer input carries a signature by carve's CA");
});
