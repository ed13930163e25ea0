//! Container images to enclave ramdisks, as nitro-cli's build-enclave makes them: images read
//! from `docker save` archives and OCI image layouts, exported by a Docker daemon, or pulled
//! from a registry with the OCI distribution API; their layers applied into the customer
//! ramdisk (`rootfs/…`, `cmd`, `env`), and the bootstrap ramdisk from the enclave blobs.
//!
//! Everything read here is untrusted: archives, manifests, configs, layers and registries.
//! Sizes are bounded, digests are verified, and no path leaves the image's root.

pub mod cpio;
#[cfg(feature = "registry")]
mod daemon;
mod error;
mod oci;
pub mod ramdisk;
#[cfg(feature = "registry")]
mod registry;

pub use error::ImageError;
pub use oci::{bootstrap_ramdisk, Image};
#[cfg(feature = "registry")]
pub use registry::{pull, PullOptions};

/// Finds `uri` where nitro-cli users expect it: exported from the local Docker daemon when one
/// answers on its socket and has the image, else pulled from its registry.
#[cfg(feature = "registry")]
pub fn fetch(uri: &str, options: &PullOptions) -> Result<Image, ImageError> {
    if let Some(image) = daemon::export(uri)? {
        return Ok(image);
    }
    pull(uri, options)
}
