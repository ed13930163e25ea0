//! carve's bare-metal guests, built from `guests/` by this crate's build script.
//!
//! Every guest exists in three forms: a PVH ELF (which also carries a multiboot header), a
//! multiboot-only ELF, and a bzImage; those linked below 1 MiB only as multiboot ELFs. The demo guest is embedded; test guests are files.

use std::path::PathBuf;

/// The demo guest as a PVH ELF, embedded in the `carve` binary for `carve vm run --demo`.
pub static DEMO_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.elf"));

/// The demo guest as a bzImage, so it can stand where a Linux kernel stands.
pub static DEMO_BZIMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.bzimage"));

/// The demo enclave: an EIF whose kernel is [`DEMO_BZIMAGE`] (`carve build-enclave --demo`).
pub static DEMO_EIF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.eif"));

include!(concat!(env!("OUT_DIR"), "/guest_names.rs"));

/// How a guest is packaged for the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// ELF with a Xen PVH note (and a multiboot header, which PVH takes precedence over).
    Pvh,
    /// ELF with only a multiboot v1 header.
    Multiboot,
    /// Linux boot-protocol bzImage with a 64-bit entry.
    BzImage,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Pvh, Format::Multiboot, Format::BzImage];

    fn suffix(self) -> &'static str {
        match self {
            Format::Pvh => "elf",
            Format::Multiboot => "multiboot.elf",
            Format::BzImage => "bzimage",
        }
    }

    /// The protocol name the guest's boot_info reports for this format.
    pub fn protocol(self) -> &'static str {
        match self {
            Format::Pvh => "pvh",
            Format::Multiboot => "multiboot",
            Format::BzImage => "linux64",
        }
    }
}

/// Path of a static Linux program from `guests/linux/tools` (x86_64 musl), for the initramfs of
/// a Linux test guest. Panics on a name the tools do not build.
pub fn linux_tool(name: &str) -> PathBuf {
    assert!(["vsock-nc"].contains(&name), "no Linux guest tool named {name}");
    PathBuf::from(env!("OUT_DIR")).join(name)
}

/// Path of the example enclave app `examples/attest` (static musl), built for the tests.
pub fn example_attest() -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join("attest")
}

/// Path of a guest from `guests/src/low/`, loaded below 1 MiB (a multiboot ELF; no other form).
pub fn low_guest(name: &str) -> PathBuf {
    assert!(LOW_GUESTS.contains(&name), "no low guest named {name}");
    PathBuf::from(env!("OUT_DIR")).join(format!("{name}.multiboot.elf"))
}

/// Path of a built guest. Panics on a name `GUESTS` does not list.
pub fn path(name: &str, format: Format) -> PathBuf {
    assert!(GUESTS.contains(&name), "no guest named {name}");
    PathBuf::from(env!("OUT_DIR")).join(format!("{name}.{}", format.suffix()))
}
