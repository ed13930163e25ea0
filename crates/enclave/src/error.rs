//! Failures as nitro-cli reports them (carve_nitro_error, shared by every command).

pub use carve_nitro_error::{ErrorCode, Failure, Result};
