//! EIF signatures: a CBOR array of `{signing_certificate, signature}` maps whose byte strings
//! are written as arrays of small integers (serde's encoding of `Vec<u8>`, as nitro-cli writes
//! them); `signature` is an untagged COSE_Sign1 over `{register_index: 0, register_value: PCR0}`.

use std::collections::BTreeMap;

use ciborium::Value;
use coset::{iana, CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, TaggedCborSerializable};
use ecdsa::signature::{Signer, Verifier};
use x509_cert::der::asn1::ObjectIdentifier;
use x509_cert::der::{DecodePem, Encode};
use x509_cert::Certificate;

use crate::measure::{pcr_of, Pcr};

/// nitro-cli refuses larger signature sections.
pub const MAX_SIGNATURE_SECTION: u64 = 32 * 1024;

const CURVE_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const CURVE_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const CURVE_P521: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.35");

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("the private key is not a PEM EC key on P-256, P-384 or P-521")]
    BadPrivateKey,
    #[error("the signing certificate is not a PEM X.509 certificate: {0}")]
    BadCertificate(String),
    #[error("the signing certificate's key is not an EC key on P-256, P-384 or P-521")]
    UnsupportedCertificateKey,
    #[error("the private key does not match the signing certificate's public key")]
    KeyMismatch,
    #[error("the signature section is not valid CBOR of nitro-cli's layout: {0}")]
    BadSection(String),
    #[error("the COSE_Sign1 signature is malformed: {0}")]
    BadCose(String),
}

/// An ECDSA private key; the curve decides the COSE algorithm (ES256, ES384, ES512).
pub enum SigningKey {
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
    P521(p521::ecdsa::SigningKey),
}

impl SigningKey {
    /// A SEC1 (`EC PRIVATE KEY`) or PKCS#8 (`PRIVATE KEY`) PEM key.
    pub fn from_pem(pem: &str) -> Result<SigningKey, SignatureError> {
        use p256::pkcs8::DecodePrivateKey;
        if let Ok(key) = p384::SecretKey::from_sec1_pem(pem).or_else(|_| p384::SecretKey::from_pkcs8_pem(pem))
        {
            return Ok(SigningKey::P384(key.into()));
        }
        if let Ok(key) = p256::SecretKey::from_sec1_pem(pem).or_else(|_| p256::SecretKey::from_pkcs8_pem(pem))
        {
            return Ok(SigningKey::P256(key.into()));
        }
        if let Ok(key) = p521::SecretKey::from_sec1_pem(pem).or_else(|_| p521::SecretKey::from_pkcs8_pem(pem))
        {
            let key = p521::ecdsa::SigningKey::from_slice(&key.to_bytes())
                .map_err(|_| SignatureError::BadPrivateKey)?;
            return Ok(SigningKey::P521(key));
        }
        Err(SignatureError::BadPrivateKey)
    }

    fn algorithm(&self) -> iana::Algorithm {
        match self {
            SigningKey::P256(_) => iana::Algorithm::ES256,
            SigningKey::P384(_) => iana::Algorithm::ES384,
            SigningKey::P521(_) => iana::Algorithm::ES512,
        }
    }

    /// Raw r ‖ s over `data`, hashed with the curve's COSE hash.
    fn sign(&self, data: &[u8]) -> Vec<u8> {
        match self {
            SigningKey::P256(key) => Signer::<p256::ecdsa::Signature>::sign(key, data).to_bytes().to_vec(),
            SigningKey::P384(key) => Signer::<p384::ecdsa::Signature>::sign(key, data).to_bytes().to_vec(),
            SigningKey::P521(key) => Signer::<p521::ecdsa::Signature>::sign(key, data).to_bytes().to_vec(),
        }
    }

    fn public_point(&self) -> Vec<u8> {
        match self {
            SigningKey::P256(key) => key.verifying_key().to_encoded_point(false).as_bytes().to_vec(),
            SigningKey::P384(key) => key.verifying_key().to_encoded_point(false).as_bytes().to_vec(),
            SigningKey::P521(key) => {
                p521::ecdsa::VerifyingKey::from(key).to_encoded_point(false).as_bytes().to_vec()
            }
        }
    }
}

enum VerifyingKey {
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    P521(p521::ecdsa::VerifyingKey),
}

impl VerifyingKey {
    fn verify(&self, algorithm: Option<iana::Algorithm>, data: &[u8], signature: &[u8]) -> bool {
        match (self, algorithm) {
            (VerifyingKey::P256(key), Some(iana::Algorithm::ES256)) => {
                p256::ecdsa::Signature::from_slice(signature).is_ok_and(|s| key.verify(data, &s).is_ok())
            }
            (VerifyingKey::P384(key), Some(iana::Algorithm::ES384)) => {
                p384::ecdsa::Signature::from_slice(signature).is_ok_and(|s| key.verify(data, &s).is_ok())
            }
            (VerifyingKey::P521(key), Some(iana::Algorithm::ES512)) => {
                p521::ecdsa::Signature::from_slice(signature).is_ok_and(|s| key.verify(data, &s).is_ok())
            }
            _ => false,
        }
    }

    fn public_point(&self) -> Vec<u8> {
        match self {
            VerifyingKey::P256(key) => key.to_encoded_point(false).as_bytes().to_vec(),
            VerifyingKey::P384(key) => key.to_encoded_point(false).as_bytes().to_vec(),
            VerifyingKey::P521(key) => key.to_encoded_point(false).as_bytes().to_vec(),
        }
    }
}

/// A signing certificate as the EIF carries it: the PEM file's bytes.
pub struct SigningCertificate {
    pub pem: Vec<u8>,
    pub der: Vec<u8>,
    certificate: Certificate,
}

impl SigningCertificate {
    pub fn from_pem(pem: &[u8]) -> Result<SigningCertificate, SignatureError> {
        let certificate =
            Certificate::from_pem(pem).map_err(|e| SignatureError::BadCertificate(e.to_string()))?;
        let der = certificate.to_der().map_err(|e| SignatureError::BadCertificate(e.to_string()))?;
        Ok(SigningCertificate { pem: pem.to_vec(), der, certificate })
    }

    /// PCR8: the measurement of the certificate's DER encoding.
    pub fn pcr8(&self) -> Pcr {
        pcr_of(&self.der)
    }

    fn verifying_key(&self) -> Result<VerifyingKey, SignatureError> {
        let spki = &self.certificate.tbs_certificate.subject_public_key_info;
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
        let point = spki.subject_public_key.raw_bytes();
        let unsupported = |_| SignatureError::UnsupportedCertificateKey;
        Ok(match curve {
            Some(CURVE_P256) => {
                VerifyingKey::P256(p256::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(unsupported)?)
            }
            Some(CURVE_P384) => {
                VerifyingKey::P384(p384::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(unsupported)?)
            }
            Some(CURVE_P521) => {
                VerifyingKey::P521(p521::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(unsupported)?)
            }
            _ => return Err(SignatureError::UnsupportedCertificateKey),
        })
    }

    /// Whether `unix_time` lies in the certificate's validity period.
    pub fn valid_at(&self, unix_time: std::time::Duration) -> bool {
        let validity = &self.certificate.tbs_certificate.validity;
        validity.not_before.to_unix_duration() <= unix_time
            && unix_time <= validity.not_after.to_unix_duration()
    }

    /// describe-eif's `SigningCertificate` object, in nitro-cli's (OpenSSL's) spelling.
    pub fn describe(&self) -> CertificateInfo {
        let tbs = &self.certificate.tbs_certificate;
        let mut issuer_name = BTreeMap::new();
        for rdn in tbs.issuer.0.iter() {
            for attribute in rdn.0.iter() {
                let value = String::from_utf8_lossy(attribute.value.value()).into_owned();
                issuer_name.insert(attribute_name(&attribute.oid), value);
            }
        }
        let signature = self.certificate.signature.raw_bytes();
        CertificateInfo {
            issuer_name,
            algorithm: algorithm_name(&self.certificate.signature_algorithm.oid),
            not_before: openssl_time(&tbs.validity.not_before),
            not_after: openssl_time(&tbs.validity.not_after),
            signature: signature.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":"),
        }
    }
}

/// describe-eif's `SigningCertificate`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CertificateInfo {
    #[serde(rename = "IssuerName")]
    pub issuer_name: BTreeMap<String, String>,
    #[serde(rename = "Algorithm")]
    pub algorithm: String,
    #[serde(rename = "NotBefore")]
    pub not_before: String,
    #[serde(rename = "NotAfter")]
    pub not_after: String,
    #[serde(rename = "Signature")]
    pub signature: String,
}

fn attribute_name(oid: &ObjectIdentifier) -> String {
    match oid.to_string().as_str() {
        "2.5.4.3" => "commonName",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "countryName",
        "2.5.4.7" => "localityName",
        "2.5.4.8" => "stateOrProvinceName",
        "2.5.4.9" => "streetAddress",
        "2.5.4.10" => "organizationName",
        "2.5.4.11" => "organizationalUnitName",
        "2.5.4.17" => "postalCode",
        "1.2.840.113549.1.9.1" => "emailAddress",
        "0.9.2342.19200300.100.1.25" => "domainComponent",
        other => return other.to_string(),
    }
    .to_string()
}

fn algorithm_name(oid: &ObjectIdentifier) -> String {
    match oid.to_string().as_str() {
        "1.2.840.10045.4.3.2" => "ecdsa-with-SHA256",
        "1.2.840.10045.4.3.3" => "ecdsa-with-SHA384",
        "1.2.840.10045.4.3.4" => "ecdsa-with-SHA512",
        "1.2.840.113549.1.1.11" => "sha256WithRSAEncryption",
        "1.2.840.113549.1.1.12" => "sha384WithRSAEncryption",
        "1.2.840.113549.1.1.13" => "sha512WithRSAEncryption",
        other => return other.to_string(),
    }
    .to_string()
}

/// OpenSSL's ASN1_TIME_print form: `Mar  3 12:00:00 2024 GMT`.
fn openssl_time(time: &x509_cert::time::Time) -> String {
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let t = time.to_date_time();
    format!(
        "{} {:>2} {:02}:{:02}:{:02} {} GMT",
        MONTHS[usize::from(t.month() - 1)],
        t.day(),
        t.hour(),
        t.minutes(),
        t.seconds(),
        t.year()
    )
}

/// The COSE payload nitro-cli signs: `{"register_index": 0, "register_value": [PCR0 bytes]}`.
fn pcr0_payload(pcr0: &Pcr) -> Vec<u8> {
    let value = Value::Map(vec![
        (Value::Text("register_index".into()), Value::Integer(0.into())),
        (Value::Text("register_value".into()), integer_array(pcr0)),
    ]);
    cbor(&value)
}

fn integer_array(bytes: &[u8]) -> Value {
    Value::Array(bytes.iter().map(|&b| Value::Integer(b.into())).collect())
}

fn cbor(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("writing CBOR to a Vec cannot fail");
    out
}

/// The signature section for an image whose PCR0 is `pcr0`.
pub fn sign_section(
    pcr0: &Pcr,
    key: &SigningKey,
    certificate: &SigningCertificate,
) -> Result<Vec<u8>, SignatureError> {
    if certificate.verifying_key()?.public_point() != key.public_point() {
        return Err(SignatureError::KeyMismatch);
    }
    let protected = HeaderBuilder::new().algorithm(key.algorithm()).build();
    let sign1 = CoseSign1Builder::new()
        .protected(protected)
        .payload(pcr0_payload(pcr0))
        .create_signature(b"", |data| key.sign(data))
        .build();
    let cose = sign1.to_vec().map_err(|e| SignatureError::BadCose(e.to_string()))?;
    let entry = Value::Map(vec![
        (Value::Text("signing_certificate".into()), integer_array(&certificate.pem)),
        (Value::Text("signature".into()), integer_array(&cose)),
    ]);
    Ok(cbor(&Value::Array(vec![entry])))
}

/// A parsed signature section: the first (PCR0) entry, as nitro-cli reads it.
pub struct EifSignature {
    pub certificate: SigningCertificate,
    cose: Vec<u8>,
}

impl EifSignature {
    pub fn parse(section: &[u8]) -> Result<EifSignature, SignatureError> {
        let bad = |what: &str| SignatureError::BadSection(what.to_string());
        let value: Value =
            ciborium::from_reader(section).map_err(|e| SignatureError::BadSection(e.to_string()))?;
        let entry = match value {
            Value::Array(entries) => entries.into_iter().next().ok_or_else(|| bad("no signature entries"))?,
            _ => return Err(bad("expected an array of signatures")),
        };
        let Value::Map(fields) = entry else { return Err(bad("expected a map per signature")) };
        let field = |name: &str| {
            let value = fields
                .iter()
                .find(|(key, _)| key.as_text() == Some(name))
                .map(|(_, value)| value)
                .ok_or_else(|| SignatureError::BadSection(format!("no {name}")))?;
            byte_string(value)
                .ok_or_else(|| SignatureError::BadSection(format!("{name} is not a byte string")))
        };
        let certificate = SigningCertificate::from_pem(&field("signing_certificate")?)?;
        Ok(EifSignature { certificate, cose: field("signature")? })
    }

    /// Whether the COSE signature verifies with the certificate's key and signs `pcr0`.
    pub fn verify(&self, pcr0: &Pcr) -> Result<bool, SignatureError> {
        let sign1 = CoseSign1::from_slice(&self.cose)
            .or_else(|_| CoseSign1::from_tagged_slice(&self.cose))
            .map_err(|e| SignatureError::BadCose(e.to_string()))?;
        let key = self.certificate.verifying_key()?;
        let algorithm = match sign1.protected.header.alg {
            Some(coset::RegisteredLabelWithPrivate::Assigned(algorithm)) => Some(algorithm),
            _ => None,
        };
        let signed = sign1.verify_signature(b"", |signature, data| {
            if key.verify(algorithm, data, signature) {
                Ok(())
            } else {
                Err(())
            }
        });
        Ok(signed.is_ok() && sign1.payload.as_deref() == Some(pcr0_payload(pcr0).as_slice()))
    }
}

/// A byte string written either as CBOR bytes or as nitro-cli's array of integers.
fn byte_string(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::Bytes(bytes) => Some(bytes.clone()),
        Value::Array(items) => {
            items.iter().map(|item| item.as_integer().and_then(|i| u8::try_from(i).ok())).collect()
        }
        _ => None,
    }
}

/// The certificate a PEM file holds, for `carve pcr --signing-certificate`.
pub fn certificate_pcr8(pem: &[u8]) -> Result<Pcr, SignatureError> {
    SigningCertificate::from_pem(pem).map(|c| c.pcr8())
}

impl std::fmt::Debug for SigningCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningCertificate").field("der_len", &self.der.len()).finish()
    }
}
