//! Any bytes as a kernel (and initrd): detection and every loader must fail cleanly.
#![no_main]

use carve_virtio::GuestRam;
use std::io::Cursor;

use carve_vmm::boot::{self, BootSource};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

fuzz_target!(|data: &[u8]| {
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let split = data.len() / 2;
    let mut kernel = Cursor::new(data);
    let mut initrd = Cursor::new(&data[split..]);
    let _ = boot::load(
        &mem,
        BootSource {
            kernel: &mut kernel,
            kernel_name: "fuzz",
            cmdline: "console=ttyS0",
            initrd: Some(&mut initrd),
        },
    );
});
