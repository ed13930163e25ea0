//! PCR measurements as nitro-cli computes them: PCR = SHA-384(48 zero bytes ‖ SHA-384(content)),
//! one extend of a zeroed register with the content's digest.

use std::collections::BTreeMap;

use sha2::{Digest, Sha384};

pub const PCR_LEN: usize = 48;
pub type Pcr = [u8; PCR_LEN];

/// How nitro-cli names the hash in its JSON: the Rust Debug text of its hasher. nitro-cli 1.5
/// (aws-nitro-enclaves-image-format 0.7 and 0.8) hashes with sha2 0.10, whose `Sha384` prints
/// as the SHA-512 core truncated to 48 bytes; the 1.4 releases (sha2 0.9) printed
/// `Sha384 { ... }`.
pub const HASH_ALGORITHM: &str = "Sha512_48 { .. }";

/// Extends a zero register with `digest`.
pub fn extend_zero(digest: &[u8]) -> Pcr {
    let mut register = Sha384::new();
    register.update([0u8; PCR_LEN]);
    register.update(digest);
    register.finalize().into()
}

/// A PCR over bytes fed in any number of pieces.
#[derive(Clone, Default)]
pub struct PcrHasher(Sha384);

impl PcrHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Pcr {
        extend_zero(&self.0.finalize())
    }
}

/// The PCR of a whole byte string (`carve pcr --input`).
pub fn pcr_of(bytes: &[u8]) -> Pcr {
    let mut hasher = PcrHasher::default();
    hasher.update(bytes);
    hasher.finish()
}

/// An image's measurements: PCR0 (kernel, cmdline, every ramdisk), PCR1 (kernel, cmdline,
/// first ramdisk), PCR2 (the other ramdisks), PCR8 (the signing certificate, when signed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measurements {
    pub pcr0: Pcr,
    pub pcr1: Pcr,
    pub pcr2: Pcr,
    pub pcr8: Option<Pcr>,
}

impl Measurements {
    /// nitro-cli's `Measurements` object: a sorted map of hex strings.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        map.insert("HashAlgorithm".to_string(), HASH_ALGORITHM.to_string());
        map.insert("PCR0".to_string(), hex(&self.pcr0));
        map.insert("PCR1".to_string(), hex(&self.pcr1));
        map.insert("PCR2".to_string(), hex(&self.pcr2));
        if let Some(pcr8) = &self.pcr8 {
            map.insert("PCR8".to_string(), hex(pcr8));
        }
        map
    }
}

/// The image sections' PCRs, fed in file order.
#[derive(Clone, Default)]
pub struct ImageHashers {
    image: PcrHasher,
    bootstrap: PcrHasher,
    application: PcrHasher,
}

/// Which PCRs a section's bytes extend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measured {
    /// Kernel and cmdline: PCR0 and PCR1.
    Boot,
    /// The first ramdisk: PCR0 and PCR1.
    FirstRamdisk,
    /// Later ramdisks: PCR0 and PCR2.
    OtherRamdisk,
}

impl ImageHashers {
    pub fn update(&mut self, what: Measured, bytes: &[u8]) {
        self.image.update(bytes);
        match what {
            Measured::Boot | Measured::FirstRamdisk => self.bootstrap.update(bytes),
            Measured::OtherRamdisk => self.application.update(bytes),
        }
    }

    pub fn finish(self, pcr8: Option<Pcr>) -> Measurements {
        Measurements {
            pcr0: self.image.finish(),
            pcr1: self.bootstrap.finish(),
            pcr2: self.application.finish(),
            pcr8,
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_empty_input_pcr_is_the_spec_s_golden_value() {
        let pcr = hex(&pcr_of(b""));
        assert!(pcr.starts_with("21b9efbc"), "{pcr}");
        assert!(pcr.ends_with("fc500a"), "{pcr}");
    }

    #[test]
    fn pieces_hash_like_the_whole() {
        let mut hasher = PcrHasher::default();
        hasher.update(b"hello ");
        hasher.update(b"enclave");
        assert_eq!(hasher.finish(), pcr_of(b"hello enclave"));
    }
}
