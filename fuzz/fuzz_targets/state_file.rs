//! Any bytes as a `check-state` / `--load-state` file: parse, check in every mode, convert.
#![no_main]

use carve_vmm::guest_state::file::StateFile;
use carve_vmm::guest_state::{check, CpuVendor, Platform};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(state) = StateFile::parse(text) else { return };
    for unrestricted in [true, false] {
        for vendor in [CpuVendor::Intel, CpuVendor::Amd] {
            let platform = Platform { vendor, ..Platform::intel(unrestricted) };
            for violation in check(&state.guest_state(&platform), &platform) {
                let _ = violation.to_string();
            }
        }
    }
    let _ = state.to_kvm(&Default::default());
    assert_eq!(StateFile::parse(&state.to_json()).as_ref(), Ok(&state));
});
