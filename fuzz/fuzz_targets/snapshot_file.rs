//! Any bytes as a snapshot state file, and the same bytes as the CBOR payload of a file whose
//! header and checksum are right (libFuzzer rarely forges a CRC-32 on its own), decoded as any
//! CBOR value and as a small nested state. Each is a value or an error, never a panic; what
//! decodes encodes again and decodes to the same state.
#![no_main]

use std::collections::BTreeMap;

use carve_snapshot::file::{decode, encode, header_for};
use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};

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
    /// Recursive, so the typed decode meets the nesting limit too.
    child: Option<Box<Device>>,
}

fuzz_target!(|data: &[u8]| {
    check(data);
    check(&framed(data));
});

fn check(bytes: &[u8]) {
    if let Ok(value) = decode::<ciborium::Value>(bytes) {
        let again = encode(&value).expect("a decoded value encodes");
        decode::<ciborium::Value>(&again).expect("an encoded value decodes");
    }
    if let Ok(device) = decode::<Device>(bytes) {
        let again = encode(&device).expect("a decoded state encodes");
        assert_eq!(decode::<Device>(&again).expect("an encoded state decodes"), device);
    }
}

/// A version-1 file around `payload`, as `encode` would write it.
fn framed(payload: &[u8]) -> Vec<u8> {
    [&header_for(payload)[..], payload].concat()
}
