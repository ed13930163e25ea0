//! `run-enclave`'s arguments as nitro-cli takes them (flags or `--config` JSON) and its rules
//! for them: memory sizes with unit suffixes, CID values, CPU choices.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, Failure, Result};

/// The parent's CID; no enclave may take it.
pub const PARENT_CID: u64 = 3;
/// Enclaves need at least this much memory (the Nitro driver's `NE_MIN_ENCLAVE_MEM_SIZE`).
pub const MIN_MEMORY_MIB: u64 = 64;

/// What `run-enclave` was asked for, in `--config`'s JSON shape (nitro-cli's
/// `RunEnclavesArgs`, snake_case).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEnclaveArgs {
    pub eif_path: String,
    pub enclave_cid: Option<u64>,
    pub memory_mib: u64,
    pub cpu_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub debug_mode: bool,
    #[serde(default)]
    pub attach_console: bool,
    pub cpu_count: Option<u32>,
    pub enclave_name: Option<String>,
    /// carve's: the parent's role measured into PCR3 (an IAM role ARN on EC2); else the
    /// allocator configuration's, else none (PCR3 zero).
    #[serde(default)]
    pub parent_role: Option<String>,
    /// carve's: the parent instance's ID measured into PCR4; else the allocator
    /// configuration's, else the host's ID (the prefix of its enclave IDs).
    #[serde(default)]
    pub parent_id: Option<String>,
}

/// How the enclave's CPUs are chosen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuRequest {
    Count(u32),
    Ids(Vec<u32>),
}

impl RunEnclaveArgs {
    /// Reads a `--config` file: unopenable → E19, bad JSON → E17, CPU choice missing → E01 or
    /// doubled → E02. `attach_console` implies debug mode.
    pub fn from_config(path: &Path) -> Result<RunEnclaveArgs> {
        let file = std::fs::File::open(path).map_err(|e| Failure::file(path, "open the config file", e))?;
        let mut args: RunEnclaveArgs = serde_json::from_reader(file).map_err(|e| {
            Failure::new(ErrorCode::SERDE, format!("Invalid JSON format for config file: {e}"))
        })?;
        args.cpu_request()?;
        args.debug_mode |= args.attach_console;
        Ok(args)
    }

    pub fn cpu_request(&self) -> Result<CpuRequest> {
        match (&self.cpu_count, &self.cpu_ids) {
            (None, None) => {
                Err(Failure::new(ErrorCode::MISSING_ARGUMENT, "Missing both `cpu-count` and `cpu-ids`"))
            }
            (Some(_), Some(_)) => Err(Failure::new(
                ErrorCode::CONFLICTING_ARGUMENT,
                "`cpu-count` and `cpu-ids` cannot be used together",
            )),
            (Some(count), None) => Ok(CpuRequest::Count(*count)),
            (None, Some(ids)) => Ok(CpuRequest::Ids(ids.clone())),
        }
    }

    pub fn eif_path(&self) -> PathBuf {
        PathBuf::from(&self.eif_path)
    }
}

/// nitro-cli's `--memory`: leading digits, then nothing, `M`/`m` (MiB), `G`/`g` (GiB) or
/// `T`/`t` (TiB); anything else → E03.
pub fn parse_memory(text: &str) -> Result<u64> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| {
        Failure::new(
            ErrorCode::INVALID_ARGUMENT,
            format!("`memory` argument does not contain a number: '{text}'"),
        )
    })?;
    let scale = match unit {
        "" | "M" | "m" => 1,
        "G" | "g" => 1 << 10,
        "T" | "t" => 1 << 20,
        _ => {
            return Err(Failure::new(
                ErrorCode::INVALID_ARGUMENT,
                format!("`memory` argument does not contain a valid size indicator: '{text}'"),
            ))
        }
    };
    number.checked_mul(scale).ok_or_else(|| {
        Failure::new(ErrorCode::INVALID_ARGUMENT, format!("`memory` argument is too large: '{text}'"))
    })
}

/// An integer flag (`--cpu-count`, `--cpu-ids`, `--enclave-cid`, `--disconnect-timeout`);
/// not a number → E03 naming the flag.
pub fn parse_number<T: std::str::FromStr>(flag: &str, text: &str) -> Result<T> {
    text.parse()
        .map_err(|_| Failure::new(ErrorCode::INVALID_ARGUMENT, format!("`{flag}` is not a number: '{text}'")))
}

/// nitro-cli's CID rules: 0 asks for one to be chosen; 1, 2, the parent's 3, u32::MAX and
/// anything wider than 32 bits are refused with E03.
pub fn check_cid(cid: u64) -> Result<()> {
    let refuse = |why: &str| Err(Failure::new(ErrorCode::INVALID_ARGUMENT, format!("CID {cid} {why}")));
    match cid {
        1 | 2 => refuse("is a well-known CID, not to be used for enclaves"),
        c if c == u64::from(u32::MAX) => refuse("is a well-known CID, not to be used for enclaves"),
        PARENT_CID => refuse("is the CID of the parent VM, not to be used for enclaves"),
        c if c > u64::from(u32::MAX) => {
            refuse("is higher than the maximum supported (u32 max) for a vsock device")
        }
        _ => Ok(()),
    }
}

/// nitro-cli's memory rule: at least 4 × the image's size (and the driver's 64 MiB).
pub fn check_memory(requested_mib: u64, eif_size: u64) -> Result<()> {
    if requested_mib == 0 {
        return Err(Failure::new(
            ErrorCode::INSUFFICIENT_MEMORY_REQUESTED,
            "Insufficient memory requested. User provided `memory` is 0 MB, but memory should be greater than 0 MB",
        ));
    }
    let minimum = (eif_size.div_ceil(1 << 20) * 4).max(MIN_MEMORY_MIB);
    if requested_mib < minimum {
        return Err(Failure::new(
            ErrorCode::INSUFFICIENT_MEMORY_REQUESTED,
            format!(
                "Insufficient memory requested. User provided `memory` is {requested_mib} MB, but based on \
                 the EIF file size, the minimum memory should be {minimum} MB"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_takes_nitro_cli_units() {
        assert_eq!(parse_memory("256"), Ok(256));
        assert_eq!(parse_memory("100M"), Ok(100));
        assert_eq!(parse_memory("100m"), Ok(100));
        assert_eq!(parse_memory("10G"), Ok(10_240));
        assert_eq!(parse_memory("2t"), Ok(2 << 20));
        for bad in ["256_mb", "M", "", "1.5G", "10K", "-5", "99999999999999999999"] {
            assert_eq!(parse_memory(bad).unwrap_err().code, ErrorCode::INVALID_ARGUMENT, "{bad}");
        }
    }

    #[test]
    fn cids_follow_nitro_rules() {
        for ok in [0, 4, 16, u64::from(u32::MAX) - 1] {
            assert!(check_cid(ok).is_ok(), "{ok}");
        }
        for bad in [1, 2, 3, u64::from(u32::MAX), 1 << 40] {
            assert_eq!(check_cid(bad).unwrap_err().code, ErrorCode::INVALID_ARGUMENT, "{bad}");
        }
        assert!(check_cid(3).unwrap_err().message.contains("parent VM"));
    }

    #[test]
    fn memory_must_cover_four_times_the_image_and_64_mib() {
        assert!(check_memory(64, 1 << 20).is_ok());
        assert_eq!(check_memory(0, 1).unwrap_err().code, ErrorCode::INSUFFICIENT_MEMORY_REQUESTED);
        let e = check_memory(100, 30 << 20).unwrap_err();
        assert!(e.message.ends_with("the minimum memory should be 120 MB"), "{e}");
        assert_eq!(check_memory(32, 1).unwrap_err().code, ErrorCode::INSUFFICIENT_MEMORY_REQUESTED);
    }

    #[test]
    fn config_needs_exactly_one_cpu_choice() {
        let mut args = RunEnclaveArgs { eif_path: "x.eif".into(), memory_mib: 64, ..Default::default() };
        assert_eq!(args.cpu_request().unwrap_err().code, ErrorCode::MISSING_ARGUMENT);
        args.cpu_count = Some(1);
        assert_eq!(args.cpu_request(), Ok(CpuRequest::Count(1)));
        args.cpu_ids = Some(vec![1]);
        assert_eq!(args.cpu_request().unwrap_err().code, ErrorCode::CONFLICTING_ARGUMENT);
    }
}
