//! nitro-cli's image commands: build-enclave, describe-eif, sign-eif and pcr, with its flags,
//! JSON and E-codes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use carve_eif::measure::{hex, PcrHasher};
use carve_eif::metadata::{
    kernel_identity, rfc3339_now, BuildInfo, IdentityInfo, MetadataDescription, MAX_CUSTOM_METADATA,
};
use carve_eif::signature::CertificateInfo;
use carve_eif::{EifBuilder, EifError, Measurements, SectionInput, SigningCertificate, SigningKey};
use clap::Args;
use serde::Serialize;
use serde_json::Value;

use carve_nitro_error::{ErrorCode, Failure};

#[derive(Args)]
pub struct BuildArgs {
    /// Container image to build from: pulled from its registry (or exported from a local Docker
    /// daemon that has it), or its name in --oci-archive.
    #[arg(long, value_name = "URI", conflicts_with = "kernel")]
    docker_uri: Option<String>,
    /// `docker save` output or an OCI image-layout tarball holding the image.
    #[arg(long, value_name = "PATH", conflicts_with = "kernel")]
    oci_archive: Option<PathBuf>,
    /// Build from a Dockerfile directory (needs a container builder; not supported by carve).
    #[arg(long, value_name = "DIR")]
    docker_dir: Option<PathBuf>,
    /// Write carve's built-in demo enclave (the demo guest as the image's kernel).
    #[arg(long, conflicts_with_all = ["kernel", "oci_archive", "docker_uri", "docker_dir"])]
    demo: bool,
    /// Kernel image (bzImage) for building without a container image.
    #[arg(long, value_name = "PATH", requires_all = ["cmdline", "ramdisk"])]
    kernel: Option<PathBuf>,
    /// Kernel command line (with --kernel).
    #[arg(long, value_name = "TEXT", requires = "kernel")]
    cmdline: Option<String>,
    /// Ramdisk (cpio or cpio.gz); repeat for more, in boot order (with --kernel).
    #[arg(long, value_name = "PATH", requires = "kernel")]
    ramdisk: Vec<PathBuf>,
    /// Directory with bzImage, bzImage.config, cmdline, init and nsm.ko.
    #[arg(long, value_name = "DIR", env = "NITRO_CLI_BLOBS")]
    blobs_dir: Option<PathBuf>,
    /// Where to write the image.
    #[arg(long, value_name = "PATH")]
    output_file: PathBuf,
    /// PEM X.509 certificate to sign the image with.
    #[arg(long, value_name = "PEM", requires = "private_key")]
    signing_certificate: Option<PathBuf>,
    /// PEM EC private key (P-256, P-384 or P-521) matching the certificate.
    #[arg(long, value_name = "PATH", requires = "signing_certificate")]
    private_key: Option<PathBuf>,
    /// Image name recorded in the metadata.
    #[arg(long = "name", value_name = "NAME")]
    image_name: Option<String>,
    /// Image version recorded in the metadata.
    #[arg(long = "version", value_name = "VERSION")]
    image_version: Option<String>,
    /// JSON file of custom metadata (at most 4096 bytes).
    #[arg(long, value_name = "PATH")]
    metadata: Option<PathBuf>,
}

#[derive(Args)]
pub struct DescribeArgs {
    #[arg(long, value_name = "PATH")]
    eif_path: PathBuf,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["input", "signing_certificate"])))]
pub struct PcrArgs {
    /// A file whose bytes to measure.
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
    /// A PEM certificate whose DER encoding to measure (PCR8).
    #[arg(long, value_name = "PEM")]
    signing_certificate: Option<PathBuf>,
}

/// As nitro-cli's: a missing image is E01 and a missing signer E60 (not usage errors); one half
/// of the signer without the other is a usage error there too.
#[derive(Args)]
pub struct SignArgs {
    #[arg(long, value_name = "PATH")]
    eif_path: Option<PathBuf>,
    #[arg(long, value_name = "PEM", requires = "private_key")]
    signing_certificate: Option<PathBuf>,
    #[arg(long, value_name = "PATH", requires = "signing_certificate")]
    private_key: Option<PathBuf>,
}

#[derive(Serialize)]
struct BuildOutput {
    #[serde(rename = "Measurements")]
    measurements: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct DescribeOutput {
    #[serde(rename = "EifVersion")]
    version: u16,
    #[serde(rename = "Measurements")]
    measurements: BTreeMap<String, String>,
    #[serde(rename = "IsSigned")]
    is_signed: bool,
    #[serde(rename = "SigningCertificate", skip_serializing_if = "Option::is_none")]
    certificate: Option<CertificateInfo>,
    #[serde(rename = "CheckCRC")]
    crc_check: bool,
    #[serde(rename = "SignatureCheck", skip_serializing_if = "Option::is_none")]
    signature_check: Option<bool>,
    #[serde(flatten)]
    identity: IdentityOutput,
}

/// An image's name, version and build metadata as nitro-cli's describe commands print them
/// (each key absent without a metadata section).
#[derive(Default, Serialize)]
pub struct IdentityOutput {
    #[serde(rename = "ImageName", skip_serializing_if = "Option::is_none")]
    image_name: Option<String>,
    #[serde(rename = "ImageVersion", skip_serializing_if = "Option::is_none")]
    image_version: Option<String>,
    #[serde(rename = "Metadata", skip_serializing_if = "Option::is_none")]
    metadata: Option<MetadataDescription>,
}

impl From<Option<IdentityInfo>> for IdentityOutput {
    fn from(identity: Option<IdentityInfo>) -> IdentityOutput {
        IdentityOutput {
            image_name: identity.as_ref().map(|i| i.image_name.clone()),
            image_version: identity.as_ref().map(|i| i.image_version.clone()),
            metadata: identity.map(MetadataDescription::from),
        }
    }
}

fn print_json(value: &impl Serialize) {
    println!("{}", serde_json::to_string_pretty(value).expect("command output always serializes"));
}

pub(crate) fn eif_error(code: ErrorCode, path: &Path, error: EifError) -> Failure {
    match error {
        EifError::Io(e) => Failure::file(path, "read", e),
        EifError::Output(e) => Failure::file(path, "write", e),
        other => Failure::new(code, format!("{}: {other}", path.display())),
    }
}

pub fn describe_eif(args: DescribeArgs) -> Result<(), Failure> {
    let path = &args.eif_path;
    let summary = carve_eif::read_file(path).map_err(|e| eif_error(ErrorCode::EIF_PARSING, path, e))?;
    let identity = match &summary.metadata {
        Some(bytes) => Some(IdentityInfo::parse(bytes).map_err(|e| {
            Failure::new(
                ErrorCode::EIF_PARSING,
                format!("{}: the metadata section is not valid: {e}", path.display()),
            )
        })?),
        None => None,
    };
    let output = DescribeOutput {
        version: summary.header.version,
        measurements: summary.measurements.to_map(),
        is_signed: summary.signature.is_some(),
        certificate: summary.signature.as_ref().map(|s| s.certificate.describe()),
        crc_check: summary.crc_ok(),
        signature_check: summary.signature_check(),
        identity: identity.into(),
    };
    print_json(&output);
    Ok(())
}

/// `carve pcr`: one streaming pass over the file, in constant memory.
pub fn pcr(args: PcrArgs) -> Result<(), Failure> {
    let mut output = BTreeMap::new();
    if let Some(path) = &args.signing_certificate {
        let pem = std::fs::read(path).map_err(|e| Failure::file(path, "read", e))?;
        let certificate = SigningCertificate::from_pem(&pem)
            .map_err(|e| Failure::new(ErrorCode::HASHER, format!("{}: {e}", path.display())))?;
        output.insert("PCR8", hex(&certificate.pcr8()));
    } else if let Some(path) = &args.input {
        let mut file = File::open(path).map_err(|e| Failure::file(path, "open", e))?;
        let mut hasher = PcrHasher::default();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            match file.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buffer[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Failure::file(path, "read", e)),
            }
        }
        output.insert("PCR", hex(&hasher.finish()));
    }
    print_json(&output);
    Ok(())
}

fn load_signer(
    certificate: &Path,
    key: &Path,
    code: ErrorCode,
) -> Result<(SigningKey, SigningCertificate), Failure> {
    let pem = std::fs::read(certificate).map_err(|e| Failure::file(certificate, "read", e))?;
    let certificate = SigningCertificate::from_pem(&pem)
        .map_err(|e| Failure::new(code, format!("{}: {e}", certificate.display())))?;
    if is_kms_key_arn(&key.to_string_lossy()) {
        return Err(Failure::new(
            code,
            format!("--private-key {} is a KMS key ARN; carve signs with a PEM key file, KMS signing is not supported", key.display()),
        ));
    }
    let key_text = std::fs::read_to_string(key).map_err(|e| Failure::file(key, "read", e))?;
    let key =
        SigningKey::from_pem(&key_text).map_err(|e| Failure::new(code, format!("{}: {e}", key.display())))?;
    Ok((key, certificate))
}

/// Whether `text` has the shape nitro-cli takes as a KMS key, not a key file:
/// `arn:<aws partition>:kms:<region>:<12-digit account>:key/<id>` (or `key:<id>`).
fn is_kms_key_arn(text: &str) -> bool {
    let fields: Vec<&str> = text.splitn(6, ':').collect();
    let [arn, partition, service, region, account, resource] = fields[..] else { return false };
    let id = resource.strip_prefix("key/").or_else(|| resource.strip_prefix("key:"));
    let word = |s: &str| {
        !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    arn == "arn"
        && partition.starts_with("aws")
        && word(partition)
        && service == "kms"
        && word(region)
        && account.len() == 12
        && account.chars().all(|c| c.is_ascii_digit())
        && id.is_some_and(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
}

/// Writes through a temporary file renamed into place, so a failed build leaves nothing.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut File) -> Result<Measurements, Failure>,
) -> Result<Measurements, Failure> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.carve-{}", std::process::id()));
    let mut file = File::create(&temporary).map_err(|e| Failure::file(path, "create", e))?;
    let result = write(&mut file).and_then(|m| {
        file.sync_all().map_err(|e| Failure::file(path, "write", e))?;
        std::fs::rename(&temporary, path).map_err(|e| Failure::file(path, "create", e))?;
        Ok(m)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

fn input_file(path: &Path) -> Result<SectionInput<'static>, Failure> {
    let file = File::open(path).map_err(|e| Failure::file(path, "open", e))?;
    let meta = file.metadata().map_err(|e| Failure::file(path, "read", e))?;
    if meta.is_dir() {
        return Err(Failure::file(path, "read", "it is a directory"));
    }
    Ok(SectionInput::new(path.display().to_string(), BufReader::with_capacity(1 << 20, file), meta.len()))
}

fn custom_metadata(path: Option<&Path>) -> Result<Value, Failure> {
    let Some(path) = path else { return Ok(Value::Null) };
    let meta = std::fs::metadata(path).map_err(|e| Failure::file(path, "read", e))?;
    if !meta.is_file() || meta.len() > MAX_CUSTOM_METADATA {
        let why = if meta.is_file() { "it is larger than 4096 bytes" } else { "it is not a file" };
        return Err(Failure::new(
            ErrorCode::EIF_BUILDING,
            format!("cannot use metadata file '{}': {why}", path.display()),
        ));
    }
    let text = std::fs::read(path).map_err(|e| Failure::file(path, "read", e))?;
    serde_json::from_slice(&text).map_err(|e| {
        Failure::new(ErrorCode::EIF_BUILDING, format!("metadata file '{}' is not JSON: {e}", path.display()))
    })
}

fn build_info(kernel: &Path, build_time: String) -> BuildInfo {
    let config = std::fs::read_to_string(format!("{}.config", kernel.display())).unwrap_or_default();
    let (operating_system, kernel_version) = kernel_identity(&config);
    BuildInfo {
        build_time,
        build_tool: "carve".into(),
        build_tool_version: env!("CARGO_PKG_VERSION").into(),
        operating_system,
        kernel_version,
    }
}

/// What goes into an image besides its signer: kernel, cmdline, ramdisks and identity.
struct ImageParts {
    kernel: PathBuf,
    cmdline: String,
    ramdisks: Vec<SectionInput<'static>>,
    default_name: String,
    default_version: String,
    docker_info: Value,
    /// The image's own time, when it has one: the build then depends on nothing else.
    created: Option<String>,
}

/// The build time the image records: `SOURCE_DATE_EPOCH` (the reproducible-builds convention)
/// when set, else the container image's creation time (the epoch when it has none), else —
/// for images made from a kernel, not a container — now. nitro-cli always writes now, so its
/// images of the same container differ from build to build; carve's do not.
fn build_time(created: Option<String>) -> String {
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s < 253_402_300_800);
    epoch.map(carve_eif::metadata::rfc3339).or(created).unwrap_or_else(rfc3339_now)
}

pub fn build_enclave(args: BuildArgs) -> Result<(), Failure> {
    eprintln!("Start building the Enclave Image...");
    if args.demo {
        return write_demo(&args.output_file);
    }
    if args.kernel.is_none()
        && args.oci_archive.is_none()
        && args.docker_uri.is_none()
        && args.docker_dir.is_none()
    {
        return Err(Failure::new(
            ErrorCode::MISSING_ARGUMENT,
            "nothing to build from: give --kernel with --cmdline and --ramdisk, or --oci-archive (and --docker-uri)",
        ));
    }
    let custom = custom_metadata(args.metadata.as_deref())?;
    let signer = match (&args.signing_certificate, &args.private_key) {
        (Some(certificate), Some(key)) => Some(load_signer(certificate, key, ErrorCode::EIF_BUILDING)?),
        _ => None,
    };
    let parts = match &args.kernel {
        Some(kernel) => ImageParts {
            kernel: kernel.clone(),
            cmdline: args.cmdline.clone().unwrap_or_default(),
            ramdisks: args.ramdisk.iter().map(|p| input_file(p)).collect::<Result<_, _>>()?,
            default_name: args
                .output_file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            default_version: "1.0".into(),
            docker_info: Value::Object(Default::default()),
            created: None,
        },
        None => container_parts(&args)?,
    };
    let identity = IdentityInfo {
        image_name: args.image_name.clone().unwrap_or(parts.default_name),
        image_version: args.image_version.clone().unwrap_or(parts.default_version),
        build_info: build_info(&parts.kernel, build_time(parts.created)),
        docker_info: parts.docker_info,
        custom_metadata: custom,
    };
    let mut builder = EifBuilder::new(input_file(&parts.kernel)?, parts.cmdline.trim(), identity.to_json());
    for ramdisk in parts.ramdisks {
        builder = builder.ramdisk(ramdisk);
    }
    if let Some((key, certificate)) = &signer {
        builder = builder.sign(key, certificate);
    }
    let output = &args.output_file;
    let measurements = write_atomically(output, |file| {
        builder.write(file).map_err(|e| eif_error(ErrorCode::EIF_BUILDING, output, e))
    })?;
    eprintln!("Enclave Image successfully created.");
    print_json(&BuildOutput { measurements: measurements.to_map() });
    Ok(())
}

/// Writes the demo enclave built into carve and prints its measurements.
fn write_demo(output: &Path) -> Result<(), Failure> {
    let measurements = write_atomically(output, |file| {
        file.write_all(carve_guest_images::DEMO_EIF).map_err(|e| Failure::file(output, "write", e))?;
        let summary = carve_eif::read(carve_guest_images::DEMO_EIF, None, &mut carve_eif::reader::Discard)
            .map_err(|e| eif_error(ErrorCode::EIF_BUILDING, output, e))?;
        Ok(summary.measurements)
    })?;
    eprintln!("Enclave Image successfully created.");
    print_json(&BuildOutput { measurements: measurements.to_map() });
    Ok(())
}

/// Kernel, cmdline and bootstrap ramdisk from the blobs directory; the customer ramdisk from
/// the container image.
fn container_parts(args: &BuildArgs) -> Result<ImageParts, Failure> {
    if args.docker_dir.is_some() {
        return Err(Failure::new(
            ErrorCode::DOCKER_IMAGE_BUILD,
            "carve builds no container images (--docker-dir); build it with your tools, `docker save` it and pass --oci-archive",
        ));
    }
    let blobs = find_blobs(args.blobs_dir.as_deref())?;
    let cmdline_path = blobs.join("cmdline");
    let cmdline =
        std::fs::read_to_string(&cmdline_path).map_err(|e| Failure::file(&cmdline_path, "read", e))?;
    let image = match (&args.oci_archive, &args.docker_uri) {
        (Some(archive), uri) => carve_image::Image::open(archive, uri.as_deref())?,
        (None, Some(uri)) => carve_image::fetch(uri, &carve_image::PullOptions::from_environment())?,
        (None, None) => {
            return Err(Failure::new(ErrorCode::MISSING_ARGUMENT, "give --docker-uri or --oci-archive"))
        }
    };
    let bootstrap = carve_image::bootstrap_ramdisk(&blobs)?;
    let customer = image.customer_ramdisk()?;
    Ok(ImageParts {
        kernel: blobs.join("bzImage"),
        cmdline,
        ramdisks: vec![bootstrap, customer],
        default_name: image.name(),
        default_version: image.id_hex(),
        // An image without its own time (some builders leave it out) is dated as the
        // reproducible ones (ko, rules_oci) date theirs: the Unix epoch.
        created: Some(image.created().unwrap_or_else(|| carve_eif::metadata::rfc3339(0))),
        docker_info: image.docker_info(),
    })
}

/// Where nitro-cli installs AWS's blobs.
const NITRO_CLI_BLOBS: &str = "/usr/share/nitro_enclaves/blobs";

/// The enclave kernel, cmdline and init: `--blobs-dir` or `NITRO_CLI_BLOBS` when given, else
/// carve's own (scripts/build-enclave-blobs.sh keeps them in carve's cache), else nitro-cli's.
fn find_blobs(given: Option<&Path>) -> Result<PathBuf, Failure> {
    if let Some(dir) = given {
        if dir.join("bzImage").is_file() {
            return Ok(dir.to_path_buf());
        }
        return Err(Failure::new(
            ErrorCode::BLOBS_PATH_NOT_SET,
            format!(
                "no enclave blobs (bzImage, cmdline, init) in '{}' (--blobs-dir or NITRO_CLI_BLOBS)",
                dir.display()
            ),
        ));
    }
    let cache = std::env::var_os("CARVE_CACHE_DIR").map(PathBuf::from).or_else(|| {
        let cache_home = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from);
        cache_home
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
            .map(|c| c.join("carve"))
    });
    let candidates: Vec<PathBuf> =
        cache.map(|c| c.join("enclave-blobs")).into_iter().chain([PathBuf::from(NITRO_CLI_BLOBS)]).collect();
    candidates.iter().find(|dir| dir.join("bzImage").is_file()).cloned().ok_or_else(|| {
        let looked: Vec<String> = candidates.iter().map(|d| format!("'{}'", d.display())).collect();
        Failure::new(
            ErrorCode::BLOBS_PATH_NOT_SET,
            format!(
                "no enclave blobs found (looked in NITRO_CLI_BLOBS, {}); build carve's with scripts/build-enclave-blobs.sh",
                looked.join(", ")
            ),
        )
    })
}

pub fn sign_eif(args: SignArgs) -> Result<(), Failure> {
    let Some(path) = &args.eif_path else {
        return Err(Failure::new(ErrorCode::MISSING_ARGUMENT, "`eif-path` argument not found"));
    };
    let (Some(certificate), Some(key)) = (&args.signing_certificate, &args.private_key) else {
        return Err(Failure::new(
            ErrorCode::SIGNING,
            "nothing to sign with: give --signing-certificate and --private-key",
        ));
    };
    let (key, certificate) = load_signer(certificate, key, ErrorCode::SIGNING)?;
    let summary = carve_eif::read_file(path).map_err(|e| eif_error(ErrorCode::EIF_PARSING, path, e))?;
    let mut source = File::open(path).map_err(|e| Failure::file(path, "open", e))?;
    let measurements = write_atomically(path, |file| {
        carve_eif::sign_image(&mut source, &summary, &key, &certificate, file)
            .map_err(|e| eif_error(ErrorCode::SIGNING, path, e))
    })?;
    eprintln!("Enclave Image successfully signed.");
    print_json(&BuildOutput { measurements: measurements.to_map() });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_kms_key_arn;

    #[test]
    fn kms_key_arns_are_told_from_key_files() {
        for arn in [
            "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws-cn:kms:cn-north-1:123456789012:key:mrk-1234",
            "arn:aws-us-gov:kms:us-gov-west-1:123456789012:key/abc",
        ] {
            assert!(is_kms_key_arn(arn), "{arn}");
        }
        for not in [
            "key.pem",
            "/etc/keys/arn:aws:kms:us-east-1:123456789012:key/x",
            "arn:aws:kms:us-east-1:12345678901:key/abc",
            "arn:aws:kms:us-east-1:123456789012:alias/mine",
            "arn:aws:s3:us-east-1:123456789012:key/abc",
            "arn:aws:kms:us-east-1:123456789012:key/",
        ] {
            assert!(!is_kms_key_arn(not), "{not}");
        }
    }
}
