//! `carve explain`: nitro-cli's explanation of an E-code (the codes live in carve_nitro_error).

use std::process::ExitCode;

use carve_nitro_error::ErrorCode;

/// `carve explain --error-code Exx`: the explanation on stderr, as nitro-cli prints it.
pub fn explain(code: &str) -> ExitCode {
    match ErrorCode::parse(code) {
        Some(code) => {
            eprintln!("[ {code} ] {}: {}", code.name(), code.explanation());
            ExitCode::SUCCESS
        }
        None => {
            // nitro-cli says so and still succeeds; scripts that probe codes rely on it.
            eprintln!("No such error code {code}");
            ExitCode::SUCCESS
        }
    }
}
