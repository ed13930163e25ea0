//! Enclave IDs and names as nitro-cli makes them.

use std::path::Path;

/// Where EC2 keeps the instance ID, which prefixes enclave IDs.
const BOARD_ASSET_TAG: &str = "/sys/devices/virtual/dmi/id/board_asset_tag";
const NO_INSTANCE: &str = "i-0000000000000000";

/// This host's instance ID as nitro-cli reads it: the board asset tag (EC2's instance ID),
/// else `i-0000000000000000`.
pub fn host_id() -> String {
    let tag = std::fs::read_to_string(BOARD_ASSET_TAG)
        .map(|t| t.split_whitespace().collect::<String>())
        .unwrap_or_default();
    if tag.is_empty() {
        NO_INSTANCE.to_string()
    } else {
        tag
    }
}

/// A parent identity for PCR3/PCR4: 1–2048 bytes (an IAM ARN's limit) of printable text.
pub fn check_parent_identity(text: &str) -> Result<(), &'static str> {
    if text.is_empty() || text.len() > 2048 {
        Err("must be 1 to 2048 bytes long")
    } else if text.chars().any(char::is_control) {
        Err("must not hold control characters")
    } else {
        Ok(())
    }
}

/// `<host ID>-enc<slot in lowercase hex>`.
pub fn enclave_id(slot: u64) -> String {
    format!("{}-enc{slot:x}", host_id())
}

/// The slot an enclave ID names: the hex after its last `-enc`.
pub fn slot_of(id: &str) -> Option<u64> {
    let (_, hex) = id.rsplit_once("-enc")?;
    u64::from_str_radix(hex, 16).ok().filter(|_| !hex.is_empty() && hex.len() <= 16)
}

/// The default name: the EIF's file name without `.eif`.
pub fn name_from_eif(path: &Path) -> String {
    let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    file.strip_suffix(".eif").map(str::to_owned).unwrap_or(file)
}

/// `wanted`, or `wanted_1`, `wanted_2`, … — the first no running enclave has.
pub fn unique_name(wanted: &str, taken: &[String]) -> String {
    if !taken.iter().any(|t| t == wanted) {
        return wanted.to_string();
    }
    (1..)
        .map(|n| format!("{wanted}_{n}"))
        .find(|candidate| !taken.contains(candidate))
        .expect("some suffix is free")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_the_slot_in_hex() {
        let id = enclave_id(0x1f);
        assert!(id.ends_with("-enc1f"), "{id}");
        assert_eq!(slot_of(&id), Some(0x1f));
        assert_eq!(slot_of("i-abc12345def67890a-enc9876abcd543210ef"), Some(0x9876abcd543210ef));
        assert_eq!(slot_of("i-0000000000000000-enc"), None);
        assert_eq!(slot_of("i-0000000000000000-encxyz"), None);
        assert_eq!(slot_of("nonsense"), None);
    }

    #[test]
    fn names_come_from_the_image_and_are_deduplicated() {
        assert_eq!(name_from_eif(Path::new("/images/hello.eif")), "hello");
        assert_eq!(name_from_eif(Path::new("image")), "image");
        let taken = vec!["hello".to_string(), "hello_1".to_string()];
        assert_eq!(unique_name("hello", &taken), "hello_2");
        assert_eq!(unique_name("other", &taken), "other");
    }
}
