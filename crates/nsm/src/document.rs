//! Attestation documents: the CBOR payload (nsm-api's `AttestationDoc`, nine keys in Nitro's
//! order) inside an untagged COSE_Sign1 with protected header `{1: -35}` (ES384) and a 96-byte
//! raw r‖s ECDSA P-384 signature.

use std::collections::BTreeMap;

use ciborium::Value;
use coset::{iana, CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, TaggedCborSerializable};
use p384::ecdsa::signature::Signer;

use crate::protocol::to_vec;

/// Limits of AWS's published verification process (docs/attestation_process.md).
pub const MAX_USER_DATA: usize = 512;
pub const MAX_NONCE: usize = 512;
pub const MAX_PUBLIC_KEY: usize = 1024;
pub const MAX_CERTIFICATE: usize = 1024;
pub const MAX_PCRS: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestationDoc {
    pub module_id: String,
    pub digest: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
    pub pcrs: BTreeMap<u64, Vec<u8>>,
    /// DER of the leaf certificate whose key signed the document.
    pub certificate: Vec<u8>,
    /// DER certificates from the root down to the leaf's issuer.
    pub cabundle: Vec<Vec<u8>>,
    pub public_key: Option<Vec<u8>>,
    pub user_data: Option<Vec<u8>>,
    pub nonce: Option<Vec<u8>>,
}

/// Why a document is not a well-formed attestation document.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("the document is not a COSE_Sign1 structure: {0}")]
    NotCoseSign1(String),
    #[error("the COSE protected header does not name ES384 (-35)")]
    WrongAlgorithm,
    #[error("the COSE_Sign1 has no payload")]
    NoPayload,
    #[error("the signature is {0} bytes; ES384 signatures are 96")]
    SignatureLength(usize),
    #[error("the payload is not a CBOR map: {0}")]
    PayloadNotMap(String),
    #[error("the payload field {0} is missing")]
    MissingField(&'static str),
    #[error("the payload field {field} is malformed: {problem}")]
    BadField { field: &'static str, problem: String },
    #[error("the payload has an unknown field {0:?}")]
    UnknownField(String),
}

fn bad(field: &'static str, problem: impl Into<String>) -> DocumentError {
    DocumentError::BadField { field, problem: problem.into() }
}

impl AttestationDoc {
    /// The payload's CBOR: a definite map, keys in nsm-api's declaration order.
    pub fn to_cbor(&self) -> Vec<u8> {
        let optional = |b: &Option<Vec<u8>>| b.as_ref().map_or(Value::Null, |b| Value::Bytes(b.clone()));
        let pcrs =
            self.pcrs.iter().map(|(&i, v)| (Value::Integer(i.into()), Value::Bytes(v.clone()))).collect();
        let entries = vec![
            ("module_id", Value::Text(self.module_id.clone())),
            ("digest", Value::Text(self.digest.clone())),
            ("timestamp", Value::Integer(self.timestamp.into())),
            ("pcrs", Value::Map(pcrs)),
            ("certificate", Value::Bytes(self.certificate.clone())),
            ("cabundle", Value::Array(self.cabundle.iter().map(|c| Value::Bytes(c.clone())).collect())),
            ("public_key", optional(&self.public_key)),
            ("user_data", optional(&self.user_data)),
            ("nonce", optional(&self.nonce)),
        ];
        to_vec(&Value::Map(entries.into_iter().map(|(k, v)| (Value::Text(k.into()), v)).collect()))
    }

    /// Parses a payload and applies AWS's syntactic checks (types, sizes, no nulls where a field
    /// is mandatory). Definite and indefinite maps are both accepted.
    pub fn from_cbor(payload: &[u8]) -> Result<AttestationDoc, DocumentError> {
        let mut reader = payload;
        let value: Value =
            ciborium::from_reader(&mut reader).map_err(|e| DocumentError::PayloadNotMap(e.to_string()))?;
        if !reader.is_empty() {
            return Err(DocumentError::PayloadNotMap(format!("{} bytes follow the map", reader.len())));
        }
        let Value::Map(entries) = value else {
            return Err(DocumentError::PayloadNotMap("it is another CBOR type".into()));
        };
        let mut fields: BTreeMap<&str, Value> = BTreeMap::new();
        const KNOWN: [&str; 9] = [
            "module_id",
            "digest",
            "timestamp",
            "pcrs",
            "certificate",
            "cabundle",
            "public_key",
            "user_data",
            "nonce",
        ];
        for (key, value) in entries {
            let name = key.as_text().unwrap_or_default();
            let Some(known) = KNOWN.iter().find(|k| **k == name) else {
                return Err(DocumentError::UnknownField(format!("{key:?}")));
            };
            if fields.insert(known, value).is_some() {
                return Err(bad(known, "it appears twice"));
            }
        }
        let mut take = |name: &'static str| fields.remove(name).ok_or(DocumentError::MissingField(name));

        let module_id = match take("module_id")? {
            Value::Text(t) if !t.is_empty() => t,
            _ => return Err(bad("module_id", "not a non-empty text string")),
        };
        let digest = match take("digest")? {
            Value::Text(t) if t == "SHA384" => t,
            other => return Err(bad("digest", format!("{other:?} is not \"SHA384\""))),
        };
        let timestamp = match take("timestamp")? {
            Value::Integer(i) => u64::try_from(i).ok().filter(|&t| t > 0),
            _ => None,
        }
        .ok_or_else(|| bad("timestamp", "not a positive integer"))?;
        let Value::Map(pcr_entries) = take("pcrs")? else { return Err(bad("pcrs", "not a map")) };
        if pcr_entries.is_empty() || pcr_entries.len() > MAX_PCRS {
            return Err(bad("pcrs", format!("{} entries; 1 to {MAX_PCRS} allowed", pcr_entries.len())));
        }
        let mut pcrs = BTreeMap::new();
        for (index, value) in pcr_entries {
            let index = index
                .as_integer()
                .and_then(|i| u64::try_from(i).ok())
                .filter(|&i| i < MAX_PCRS as u64)
                .ok_or_else(|| bad("pcrs", format!("index {index:?} is not 0 to 31")))?;
            let value = match value {
                Value::Bytes(b) if [32, 48, 64].contains(&b.len()) => b,
                _ => return Err(bad("pcrs", format!("PCR{index} is not 32, 48 or 64 bytes"))),
            };
            if pcrs.insert(index, value).is_some() {
                return Err(bad("pcrs", format!("PCR{index} appears twice")));
            }
        }
        let certificate = sized_bytes("certificate", take("certificate")?, 1, MAX_CERTIFICATE)?;
        let Value::Array(bundle) = take("cabundle")? else { return Err(bad("cabundle", "not an array")) };
        if bundle.is_empty() {
            return Err(bad("cabundle", "it is empty"));
        }
        let cabundle = bundle
            .into_iter()
            .map(|c| sized_bytes("cabundle", c, 1, MAX_CERTIFICATE))
            .collect::<Result<_, _>>()?;
        let mut optional = |name: &'static str, min: usize, max: usize| match take(name) {
            Err(_) | Ok(Value::Null) => Ok(None),
            Ok(value) => sized_bytes(name, value, min, max).map(Some),
        };
        Ok(AttestationDoc {
            module_id,
            digest,
            timestamp,
            pcrs,
            certificate,
            cabundle,
            public_key: optional("public_key", 1, MAX_PUBLIC_KEY)?,
            user_data: optional("user_data", 0, MAX_USER_DATA)?,
            nonce: optional("nonce", 0, MAX_NONCE)?,
        })
    }

    /// Signs the document with the leaf's key: an untagged COSE_Sign1, as Nitro emits it.
    pub fn sign(&self, key: &p384::ecdsa::SigningKey) -> Vec<u8> {
        let protected = HeaderBuilder::new().algorithm(iana::Algorithm::ES384).build();
        CoseSign1Builder::new()
            .protected(protected)
            .payload(self.to_cbor())
            .create_signature(b"", |data| {
                let signature: p384::ecdsa::Signature = key.sign(data);
                signature.to_bytes().to_vec()
            })
            .build()
            .to_vec()
            .expect("encoding a COSE_Sign1 cannot fail")
    }
}

fn sized_bytes(field: &'static str, value: Value, min: usize, max: usize) -> Result<Vec<u8>, DocumentError> {
    match value {
        Value::Bytes(b) if (min..=max).contains(&b.len()) => Ok(b),
        Value::Bytes(b) => Err(bad(field, format!("{} bytes; {min} to {max} allowed", b.len()))),
        _ => Err(bad(field, "not a byte string")),
    }
}

/// A COSE_Sign1 document taken apart, its signature not yet checked.
pub struct SignedDocument {
    pub cose: CoseSign1,
    pub doc: AttestationDoc,
}

impl SignedDocument {
    /// Decodes an untagged (as Nitro emits) or tagged COSE_Sign1 and its payload.
    pub fn parse(bytes: &[u8]) -> Result<SignedDocument, DocumentError> {
        let cose = CoseSign1::from_slice(bytes)
            .or_else(|_| CoseSign1::from_tagged_slice(bytes))
            .map_err(|e| DocumentError::NotCoseSign1(e.to_string()))?;
        let es384 = coset::RegisteredLabelWithPrivate::Assigned(iana::Algorithm::ES384);
        if cose.protected.header.alg != Some(es384) {
            return Err(DocumentError::WrongAlgorithm);
        }
        if cose.signature.len() != 96 {
            return Err(DocumentError::SignatureLength(cose.signature.len()));
        }
        let payload = cose.payload.as_deref().ok_or(DocumentError::NoPayload)?;
        let doc = AttestationDoc::from_cbor(payload)?;
        Ok(SignedDocument { cose, doc })
    }

    /// Checks the COSE signature against the key of the document's own certificate holder.
    pub fn signature_valid(&self, key: &p384::ecdsa::VerifyingKey) -> bool {
        use p384::ecdsa::signature::Verifier;
        self.cose
            .verify_signature(b"", |signature, data| {
                let signature = p384::ecdsa::Signature::from_slice(signature).map_err(|_| ())?;
                key.verify(data, &signature).map_err(|_| ())
            })
            .is_ok()
    }
}
