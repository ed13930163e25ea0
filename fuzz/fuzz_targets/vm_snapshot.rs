//! Any bytes as a VM snapshot's state file, raw and as the payload of a file whose header and
//! checksum are right: decoded into carve's snapshot type and checked as a restore checks it
//! before KVM sees anything. An error, never a panic.
#![no_main]

use carve_snapshot::file::{decode, header_for};
use carve_vmm::snapshot::VmSnapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for bytes in [data.to_vec(), framed(data)] {
        if let Ok(snapshot) = decode::<VmSnapshot>(&bytes) {
            let _ = snapshot.validate();
            let _ = snapshot.has_nsm();
        }
    }
});

/// A version-1 file around `payload`, as carve writes it.
fn framed(payload: &[u8]) -> Vec<u8> {
    [&header_for(payload)[..], payload].concat()
}
