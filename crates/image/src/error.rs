use std::io;
use std::path::{Path, PathBuf};

/// Why an image could not become a ramdisk; each has its nitro-cli E-code (below).
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

/// nitro-cli's E-code for each: a pull error (E50), an image nitro-cli would not build (E48), a
/// file (E19).
impl From<ImageError> for carve_nitro_error::Failure {
    fn from(error: ImageError) -> carve_nitro_error::Failure {
        use carve_nitro_error::ErrorCode;
        let code = match &error {
            ImageError::Pull(_) => ErrorCode::DOCKER_IMAGE_PULL,
            ImageError::Unusable(_) => ErrorCode::EIF_BUILDING,
            ImageError::File { .. } => ErrorCode::FILE_OPERATION,
        };
        carve_nitro_error::Failure::new(code, error.to_string())
    }
}
