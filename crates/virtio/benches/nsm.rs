//! Device-side service time of an NSM Attestation request (popping the chain, decoding, building
//! and signing the document, writing the response, adding it to the used ring) against its
//! limit measured in the same run: one bare ES384 signature over a payload of the same size.
//!
//! `cargo bench -p carve-virtio --bench nsm`

#[path = "../tests/common/nsm_driver.rs"]
mod nsm_driver;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use carve_nsm::pcr::BootMeasurements;
use carve_nsm::protocol::Request;
use nsm_driver::Driver;
use p384::ecdsa::signature::Signer;

const RUNS: usize = 400;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let mut driver = Driver::new(&BootMeasurements::default());
    let request = Request::Attestation {
        user_data: Some(b"carve-bench".to_vec()),
        nonce: Some(vec![7; 64]),
        public_key: None,
    }
    .encode();
    let payload_len = driver.call(&request).len();
    assert!(matches!(decode_variant(&driver.call(&request)), Some(ref v) if v == "Attestation"));
    let key = p384::ecdsa::SigningKey::random(&mut rand_core::OsRng);
    let payload = vec![0x5a; payload_len];

    // Interleaved, after a warm-up, so both see the same machine.
    let (mut device, mut bare) = (Vec::with_capacity(RUNS), Vec::with_capacity(RUNS));
    for run in 0..RUNS + RUNS / 10 {
        let before = driver.stats.busy_nanos.load(Ordering::Relaxed);
        driver.call(&request);
        let served = Duration::from_nanos(driver.stats.busy_nanos.load(Ordering::Relaxed) - before);
        let start = Instant::now();
        let signature: p384::ecdsa::Signature = key.sign(&payload);
        std::hint::black_box(signature);
        let signed = start.elapsed();
        if run >= RUNS / 10 {
            device.push(served);
            bare.push(signed);
        }
    }

    let (d50, d99) = (percentile(&mut device, 0.5), percentile(&mut device, 0.99));
    let (b50, b99) = (percentile(&mut bare, 0.5), percentile(&mut bare, 0.99));
    println!("NSM Attestation service time, {RUNS} requests, document of {payload_len} bytes");
    println!("{:<38} {:>10} {:>10}", "", "median µs", "p99 µs");
    println!("{:<38} {:>10.0} {:>10.0}", "bare ES384 signature (limit)", micros(b50), micros(b99));
    println!("{:<38} {:>10.0} {:>10.0}", "carve virtio-nsm Attestation", micros(d50), micros(d99));
    println!("ratio (median): {:.2}x   (target <= 1.30x)", micros(d50) / micros(b50));
}

/// The outer variant name of a response.
fn decode_variant(bytes: &[u8]) -> Option<String> {
    let value: ciborium::Value = ciborium::from_reader(bytes).ok()?;
    value.as_map()?.first()?.0.as_text().map(str::to_string)
}
