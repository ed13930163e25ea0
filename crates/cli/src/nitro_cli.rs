//! carve invoked as `nitro-cli`: nitro-cli's environment overrides and its log files, so tools
//! and runbooks written for it find what they expect. Invoked as `carve`, none of this applies
//! and carve's own names stay (docs/nitro-cli-differences.md).

use std::path::{Path, PathBuf};

use carve_nitro_error::{ErrorCode, Failure};

/// Where nitro-cli logs, unless `NITRO_CLI_LOGS_PATH` says otherwise.
const LOGS_DIR: &str = "/var/log/nitro_enclaves";
pub const LOG_FILE: &str = "nitro_enclaves.log";

pub struct NitroCli {
    logs: PathBuf,
}

impl NitroCli {
    /// Applies nitro-cli's environment to this process; call before any thread starts.
    /// `NITRO_CLI_SOCKETS_PATH` becomes the run directory (where the enclave processes'
    /// sockets are); `build-enclave`'s scratch files go under `NITRO_CLI_ARTIFACTS`, else
    /// `$HOME/.nitro_cli`, else it is E51, as in nitro-cli.
    pub fn enter(builds_an_image: bool) -> Result<NitroCli, Failure> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(sockets) = var("NITRO_CLI_SOCKETS_PATH") {
            std::env::set_var("CARVE_RUN_DIR", sockets);
        }
        if builds_an_image {
            let artifacts =
                var("NITRO_CLI_ARTIFACTS").or_else(|| var("HOME").map(|home| home.join(".nitro_cli")));
            let artifacts = artifacts.ok_or_else(|| {
                Failure::new(
                    ErrorCode::ARTIFACTS_PATH_NOT_SET,
                    "Could not find a folder for the CLI artifacts, set either HOME or NITRO_CLI_ARTIFACTS",
                )
            })?;
            std::fs::create_dir_all(&artifacts).map_err(|e| Failure::file(&artifacts, "create", e))?;
            std::env::set_var("TMPDIR", &artifacts);
        }
        Ok(NitroCli { logs: var("NITRO_CLI_LOGS_PATH").unwrap_or_else(|| PathBuf::from(LOGS_DIR)) })
    }

    pub fn logs(&self) -> &Path {
        &self.logs
    }

    /// nitro-cli's log, appended to (`None` where this user may not write it, as for
    /// nitro-cli's users outside the `ne` group).
    pub fn log_file(&self) -> Option<std::fs::File> {
        std::fs::create_dir_all(&self.logs).ok()?;
        std::fs::File::options().create(true).append(true).open(self.logs.join(LOG_FILE)).ok()
    }

    /// A failure, into nitro-cli's log only (standard error gets nitro-cli's `[ Exx ]` lines).
    pub fn log_failure(&self, failure: &Failure) {
        if let Some(mut file) = self.log_file() {
            let line = format!(
                "[nitro-cli][ERROR][{}][{}:{}] {}: {}\n",
                carve_eif::metadata::rfc3339_now(),
                file!(),
                line!(),
                failure.code,
                failure.message
            );
            let _ = std::io::Write::write_all(&mut file, line.as_bytes());
        }
    }
}
