//! carve's local PKI: a long-lived P-384 root CA and an intermediate kept in carve's state
//! directory, and a short-lived leaf per VM whose key signs that VM's attestation documents.
//! Relying parties pin carve's root (`carve attestation root`) where they would pin AWS's.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use p384::ecdsa::{DerSignature, SigningKey};
use p384::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rand_core::{OsRng, RngCore};
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::der::{Decode, DecodePem, Encode, EncodePem};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::{Time, Validity};
use x509_cert::Certificate;

const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
pub const ROOT_LIFETIME: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
pub const INTERMEDIATE_LIFETIME: Duration = YEAR;
/// Nitro's leaves live about three hours.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(3 * 3600);
/// An intermediate this close to its end is replaced when the CA is opened.
const INTERMEDIATE_RENEWAL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Certificates start a little in the past, so a verifier whose clock lags still accepts them.
const BACKDATE: Duration = Duration::from_secs(60);

pub const ROOT_NAME: &str = "CN=carve.nitro-enclaves,OU=local,O=carve";
const INTERMEDIATE_NAME: &str = "CN=intermediate.carve.nitro-enclaves,OU=local,O=carve";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot find carve's state directory: set CARVE_STATE_DIR, XDG_DATA_HOME or HOME")]
    NoStateDir,
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid {what}: {problem}")]
    Corrupt { path: PathBuf, what: &'static str, problem: String },
    #[error("cannot build a certificate for {subject}: {problem}")]
    Build { subject: String, problem: String },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io { what, path: path.to_path_buf(), source }
}

/// Where carve keeps its persistent state (the CA): `$CARVE_STATE_DIR`, else `/var/lib/carve`
/// for root, else `$XDG_DATA_HOME/carve` (default `~/.local/share/carve`).
pub fn state_dir() -> Result<PathBuf, PkiError> {
    if let Some(dir) = std::env::var_os("CARVE_STATE_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(PathBuf::from("/var/lib/carve"));
    }
    if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(data).join("carve"));
    }
    let home = std::env::var_os("HOME").filter(|d| !d.is_empty()).ok_or(PkiError::NoStateDir)?;
    Ok(PathBuf::from(home).join(".local/share/carve"))
}

/// The root and intermediate, loaded from (or on first use created in) `<state>/ca/`.
pub struct CertificateAuthority {
    root: Certificate,
    root_key: SigningKey,
    intermediate: Certificate,
    intermediate_key: SigningKey,
}

/// A VM's signing identity: a leaf key and certificate, and the chain above it.
#[derive(Clone)]
pub struct Leaf {
    pub key: SigningKey,
    pub certificate: Vec<u8>,
    /// DER certificates, root first.
    pub cabundle: Vec<Vec<u8>>,
    pub not_after: SystemTime,
}

struct Paths {
    dir: PathBuf,
}

impl Paths {
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl CertificateAuthority {
    /// Opens the CA under `state`, creating it (directories 0700, keys 0600) on first use and
    /// renewing an intermediate near its end. Concurrent carve processes serialise on a lock.
    pub fn open(state: &Path) -> Result<CertificateAuthority, PkiError> {
        let paths = Paths { dir: state.join("ca") };
        // A state directory carve creates is private; one that exists keeps its mode (it may
        // be a directory the user chose), while `ca/` is carve's own and always private.
        if !state.exists() {
            DirBuilder::new().recursive(true).mode(0o700).create(state).map_err(io("create", state))?;
        }
        let ca_dir = paths.dir.as_path();
        DirBuilder::new().recursive(true).mode(0o700).create(ca_dir).map_err(io("create", ca_dir))?;
        fs::set_permissions(ca_dir, fs::Permissions::from_mode(0o700)).map_err(io("restrict", ca_dir))?;
        let lock_path = paths.file("lock");
        let lock = OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&lock_path);
        let lock = lock.map_err(io("open", &lock_path))?;
        lock.lock().map_err(io("lock", &lock_path))?;

        let now = SystemTime::now();
        let (root, root_key) = match load_pair(&paths, "root")? {
            Some((cert, key)) if not_after(&cert) > now => (cert, key),
            _ => {
                let key = SigningKey::random(&mut OsRng);
                let cert = issue(Profile::Root, ROOT_NAME, key.verifying_key(), &key, now, ROOT_LIFETIME)?;
                store_pair(&paths, "root", &cert, &key)?;
                (cert, key)
            }
        };
        let issuer = root.tbs_certificate.subject.clone();
        let (intermediate, intermediate_key) = match load_pair(&paths, "intermediate")? {
            Some((cert, key))
                if cert.tbs_certificate.issuer == issuer
                    && not_after(&cert) > now + INTERMEDIATE_RENEWAL
                    && crate::verify::signed_by(&cert, &root).is_ok() =>
            {
                (cert, key)
            }
            _ => {
                let key = SigningKey::random(&mut OsRng);
                let profile = Profile::SubCA { issuer, path_len_constraint: Some(0) };
                let cert = issue(
                    profile,
                    INTERMEDIATE_NAME,
                    key.verifying_key(),
                    &root_key,
                    now,
                    INTERMEDIATE_LIFETIME,
                )?;
                store_pair(&paths, "intermediate", &cert, &key)?;
                (cert, key)
            }
        };
        drop(lock);
        Ok(CertificateAuthority { root, root_key, intermediate, intermediate_key })
    }

    pub fn root(&self) -> &Certificate {
        &self.root
    }

    pub fn root_pem(&self) -> String {
        self.root.to_pem(LineEnding::LF).expect("a decoded certificate re-encodes")
    }

    /// Issues a leaf for `common_name` (the enclave ID), valid [`LEAF_LIFETIME`] from `now`.
    pub fn issue_leaf(&self, common_name: &str, now: SystemTime) -> Result<Leaf, PkiError> {
        let key = SigningKey::random(&mut OsRng);
        let profile = Profile::Leaf {
            issuer: self.intermediate.tbs_certificate.subject.clone(),
            enable_key_agreement: false,
            enable_key_encipherment: false,
        };
        let subject = format!("CN={},OU=local,O=carve", escape_rdn(common_name));
        let cert = issue(profile, &subject, key.verifying_key(), &self.intermediate_key, now, LEAF_LIFETIME)?;
        let der = |c: &Certificate| c.to_der().expect("a built certificate encodes");
        Ok(Leaf {
            key,
            not_after: not_after(&cert),
            certificate: der(&cert),
            cabundle: vec![der(&self.root), der(&self.intermediate)],
        })
    }

    /// The root's key, for tests that forge chains.
    #[doc(hidden)]
    pub fn root_key(&self) -> &SigningKey {
        &self.root_key
    }
}

/// Escapes the characters RFC 4514 reserves in an attribute value.
fn escape_rdn(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=' | '#') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

pub(crate) fn not_after(cert: &Certificate) -> SystemTime {
    cert.tbs_certificate.validity.not_after.to_system_time()
}

/// Builds and signs one certificate for `subject`'s `public` key.
pub fn issue(
    profile: Profile,
    subject: &str,
    public: &p384::ecdsa::VerifyingKey,
    signer: &SigningKey,
    now: SystemTime,
    lifetime: Duration,
) -> Result<Certificate, PkiError> {
    let fail = |problem: String| PkiError::Build { subject: subject.to_string(), problem };
    let name = Name::from_str(subject).map_err(|e| fail(e.to_string()))?;
    let time = |t: SystemTime| Time::try_from(t).map_err(|e| fail(e.to_string()));
    let validity = Validity { not_before: time(now - BACKDATE)?, not_after: time(now + lifetime)? };
    let spki = SubjectPublicKeyInfoOwned::from_key(*public).map_err(|e| fail(e.to_string()))?;
    let builder = CertificateBuilder::new(profile, random_serial(), validity, name, spki, signer)
        .map_err(|e| fail(e.to_string()))?;
    builder.build::<DerSignature>().map_err(|e| fail(e.to_string()))
}

/// A positive 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::new(&bytes).expect("16 bytes make a valid serial number")
}

fn load_pair(paths: &Paths, name: &str) -> Result<Option<(Certificate, SigningKey)>, PkiError> {
    let (cert_path, key_path) = (paths.file(&format!("{name}.crt")), paths.file(&format!("{name}.key")));
    if !cert_path.exists() || !key_path.exists() {
        return Ok(None);
    }
    let pem = fs::read(&cert_path).map_err(io("read", &cert_path))?;
    let cert = Certificate::from_pem(&pem).map_err(|e| PkiError::Corrupt {
        path: cert_path.clone(),
        what: "PEM certificate",
        problem: e.to_string(),
    })?;
    let key_pem = fs::read_to_string(&key_path).map_err(io("read", &key_path))?;
    let key = SigningKey::from_pkcs8_pem(&key_pem).map_err(|e| PkiError::Corrupt {
        path: key_path.clone(),
        what: "PKCS#8 P-384 key",
        problem: e.to_string(),
    })?;
    let spki = SubjectPublicKeyInfoOwned::from_key(*key.verifying_key()).ok();
    if spki.as_ref() != Some(&cert.tbs_certificate.subject_public_key_info) {
        return Err(PkiError::Corrupt {
            path: key_path,
            what: "key for its certificate",
            problem: format!("it does not match {}", cert_path.display()),
        });
    }
    Ok(Some((cert, key)))
}

fn store_pair(paths: &Paths, name: &str, cert: &Certificate, key: &SigningKey) -> Result<(), PkiError> {
    let key_pem = key.to_pkcs8_pem(LineEnding::LF).expect("a P-384 key encodes");
    write_atomically(&paths.file(&format!("{name}.key")), key_pem.as_bytes(), 0o600)?;
    let cert_pem = cert.to_pem(LineEnding::LF).expect("a built certificate encodes");
    write_atomically(&paths.file(&format!("{name}.crt")), cert_pem.as_bytes(), 0o644)
}

/// Writes through a temporary file renamed into place, so a crash never leaves half a key.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let temp = path.with_extension("tmp");
    let mut file: File = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(&temp)
        .map_err(io("create", &temp))?;
    file.write_all(bytes).and_then(|_| file.sync_all()).map_err(io("write", &temp))?;
    fs::rename(&temp, path).map_err(io("replace", path))
}

/// Parses a PEM certificate (for `--root`).
pub fn certificate_from_pem(pem: &[u8]) -> Result<Certificate, String> {
    Certificate::from_pem(pem).map_err(|e| e.to_string())
}

/// Parses a DER certificate.
pub fn certificate_from_der(der: &[u8]) -> Result<Certificate, String> {
    Certificate::from_der(der).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_ca_is_created_once_with_private_permissions_and_reloaded() {
        let parent = tempfile::tempdir().unwrap();
        let state = parent.path().join("carve");
        let first = CertificateAuthority::open(&state).unwrap();
        let second = CertificateAuthority::open(&state).unwrap();
        assert_eq!(first.root_pem(), second.root_pem());
        assert_eq!(first.intermediate, second.intermediate);
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join("ca")), 0o700);
        assert_eq!(mode(&state.join("ca/root.key")), 0o600);
        assert_eq!(mode(&state.join("ca/intermediate.key")), 0o600);
        assert!(!state.join("ca/root.tmp").exists());
    }

    #[test]
    fn a_leaf_lives_three_hours_and_names_the_enclave() {
        let state = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::open(state.path()).unwrap();
        let now = SystemTime::now();
        let leaf = ca.issue_leaf("i-0000000000000000-enc0", now).unwrap();
        let cert = certificate_from_der(&leaf.certificate).unwrap();
        let lifetime = leaf.not_after.duration_since(now).unwrap();
        assert!(lifetime <= LEAF_LIFETIME && lifetime > LEAF_LIFETIME - Duration::from_secs(2));
        assert_eq!(cert.tbs_certificate.subject.to_string(), "CN=i-0000000000000000-enc0,OU=local,O=carve");
        assert_eq!(leaf.cabundle[0], ca.root.to_der().unwrap());
        assert_eq!(leaf.cabundle.len(), 2);
    }

    #[test]
    fn a_corrupt_key_is_reported_not_replaced() {
        let state = tempfile::tempdir().unwrap();
        CertificateAuthority::open(state.path()).unwrap();
        fs::write(state.path().join("ca/root.key"), "not a key").unwrap();
        let error = CertificateAuthority::open(state.path()).err().unwrap().to_string();
        assert!(error.contains("root.key is not a valid PKCS#8 P-384 key"), "{error}");
    }

    #[test]
    fn names_with_reserved_characters_are_escaped() {
        assert_eq!(escape_rdn("a,b=c"), "a\\,b\\=c");
    }
}
