//! `carve attestation root` and `carve attestation verify`: the relying party's side of the NSM.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use carve_nsm::pki::{self, CertificateAuthority, PkiError};
use carve_nsm::verify::{self, Expectations};
use carve_vmm::exit::STATUS_CARVE_ERROR;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum AttestationCommand {
    /// Print carve's root CA certificate (PEM), creating the CA on first use. Relying parties
    /// pin it as they would pin AWS's Nitro Enclaves root.
    Root,
    /// Verify an attestation document as AWS's published process does; prints a JSON verdict
    /// and exits 0 only if every check holds (1 if one fails).
    Verify(VerifyArgs),
}

#[derive(Args)]
pub struct VerifyArgs {
    /// The attestation document (the COSE_Sign1 bytes the NSM returned).
    #[arg(long, value_name = "FILE")]
    doc: PathBuf,
    /// The root to pin (PEM); default: carve's own root.
    #[arg(long, value_name = "PEM")]
    root: Option<PathBuf>,
    /// The nonce the document must carry, in hex.
    #[arg(long, value_name = "HEX", value_parser = parse_hex)]
    nonce: Option<HexBytes>,
    /// A PCR value the document must carry: index=hex (repeatable).
    #[arg(long = "pcr", value_name = "N=HEX", value_parser = parse_pcr)]
    pcrs: Vec<(u64, Vec<u8>)>,
}

/// Bytes given in hex (a newtype: clap takes a bare `Vec` as many values).
#[derive(Clone)]
struct HexBytes(Vec<u8>);

fn parse_hex(text: &str) -> Result<HexBytes, String> {
    hex::decode(text).map(HexBytes).map_err(|e| format!("'{text}' is not hex: {e}"))
}

fn parse_pcr(text: &str) -> Result<(u64, Vec<u8>), String> {
    let (index, value) = text.split_once('=').ok_or("expected N=HEX")?;
    let index: u64 = index.parse().map_err(|_| format!("PCR index '{index}' is not a number"))?;
    if index >= 32 {
        return Err(format!("PCR index {index} is past the 32 PCRs"));
    }
    Ok((index, parse_hex(value)?.0))
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("carve: error: {message}");
    ExitCode::from(STATUS_CARVE_ERROR as u8)
}

/// carve's CA, from (or created in) the state directory.
pub fn open_ca() -> Result<CertificateAuthority, PkiError> {
    CertificateAuthority::open(&pki::state_dir()?)
}

pub fn run(command: AttestationCommand) -> ExitCode {
    match command {
        AttestationCommand::Root => match open_ca() {
            Ok(ca) => {
                print!("{}", ca.root_pem());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        AttestationCommand::Verify(args) => verify_document(args),
    }
}

fn verify_document(args: VerifyArgs) -> ExitCode {
    let document = match std::fs::read(&args.doc) {
        Ok(bytes) => bytes,
        Err(e) => return fail(format_args!("cannot read attestation document {}: {e}", args.doc.display())),
    };
    let root = match &args.root {
        Some(path) => std::fs::read(path)
            .map_err(|e| format!("cannot read root certificate {}: {e}", path.display()))
            .and_then(|pem| {
                pki::certificate_from_pem(&pem)
                    .map_err(|e| format!("{} is not a PEM certificate: {e}", path.display()))
            }),
        None => open_ca().map(|ca| ca.root().clone()).map_err(|e| e.to_string()),
    };
    let root = match root {
        Ok(root) => root,
        Err(e) => return fail(e),
    };
    let expect = Expectations {
        nonce: args.nonce.map(|n| n.0),
        pcrs: args.pcrs.into_iter().collect::<BTreeMap<_, _>>(),
    };
    let verdict = verify::verify(&document, &root, &expect, SystemTime::now());
    println!("{}", serde_json::to_string_pretty(&verdict).expect("a verdict serialises"));
    if verdict.valid {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "carve: attestation document is not valid: {}",
            verdict.reason.as_deref().unwrap_or("unknown")
        );
        ExitCode::from(1)
    }
}
