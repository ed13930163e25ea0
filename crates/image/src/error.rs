use std::io;
use std::path::{Path, PathBuf};

/// Why an image could not become a ramdisk. The CLI maps each to nitro-cli's E-code.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image cannot be fetched or read: a missing image or tag, a registry that does not
    /// answer or refuses us, a bad manifest, digest or layer (nitro-cli's pull error).
    #[error("{0}")]
    Pull(String),
    /// The image was read but cannot run as an enclave (no command to run).
    #[error("{0}")]
    Unusable(String),
    /// A local file failed: the archive, a blob directory, a temporary file.
    #[error("cannot {operation} '{}': {source}", path.display())]
    File { path: PathBuf, operation: &'static str, source: io::Error },
}

impl ImageError {
    pub(crate) fn file(path: &Path, operation: &'static str, source: io::Error) -> ImageError {
        ImageError::File { path: path.to_path_buf(), operation, source }
    }
}
