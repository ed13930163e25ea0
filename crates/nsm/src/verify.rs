//! Verifying attestation documents as AWS publishes it (docs/attestation_process.md §3): decode
//! the COSE_Sign1, check the payload's syntax and sizes, validate the chain leaf → cabundle →
//! pinned root (validity periods, names, basicConstraints and pathLen, keyUsage, signatures),
//! then the COSE signature with the leaf's key; finally what the caller expects (nonce, PCRs).

use std::collections::BTreeMap;
use std::time::SystemTime;

use p384::ecdsa::signature::Verifier;
use p384::ecdsa::{DerSignature, VerifyingKey};
use serde::Serialize;
use x509_cert::der::asn1::ObjectIdentifier;
use x509_cert::der::oid::AssociatedOid;
use x509_cert::der::{Decode, Encode};
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages};
use x509_cert::Certificate;

use crate::document::{AttestationDoc, SignedDocument};

const ECDSA_WITH_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const CURVE_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");

/// What the relying party expects of the document beyond a valid signature.
#[derive(Clone, Debug, Default)]
pub struct Expectations {
    pub nonce: Option<Vec<u8>>,
    pub pcrs: BTreeMap<u64, Vec<u8>>,
}

/// Which checks held (`None`: not asked for, or not reached).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Checks {
    #[serde(rename = "Syntax")]
    pub syntax: bool,
    #[serde(rename = "CertificateChain")]
    pub chain: Option<bool>,
    #[serde(rename = "Signature")]
    pub signature: Option<bool>,
    #[serde(rename = "Nonce")]
    pub nonce: Option<bool>,
    #[serde(rename = "PCRs")]
    pub pcrs: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CertificateSummary {
    #[serde(rename = "Subject")]
    pub subject: String,
    #[serde(rename = "NotBefore")]
    pub not_before: String,
    #[serde(rename = "NotAfter")]
    pub not_after: String,
}

/// `carve attestation verify`'s JSON answer.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    #[serde(rename = "Valid")]
    pub valid: bool,
    #[serde(rename = "Reason", skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(rename = "Checks")]
    pub checks: Checks,
    #[serde(rename = "ModuleID", skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
    #[serde(rename = "Timestamp", skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    #[serde(rename = "Digest", skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(rename = "PCRs", skip_serializing_if = "Option::is_none")]
    pub pcrs: Option<BTreeMap<String, String>>,
    #[serde(rename = "UserData", skip_serializing_if = "Option::is_none")]
    pub user_data: Option<Option<String>>,
    #[serde(rename = "Nonce", skip_serializing_if = "Option::is_none")]
    pub nonce: Option<Option<String>>,
    #[serde(rename = "PublicKey", skip_serializing_if = "Option::is_none")]
    pub public_key: Option<Option<String>>,
    /// Subjects from the pinned root down to the leaf.
    #[serde(rename = "Chain", skip_serializing_if = "Option::is_none")]
    pub chain: Option<Vec<CertificateSummary>>,
}

impl Verdict {
    fn failed(reason: String, checks: Checks) -> Verdict {
        Verdict {
            valid: false,
            reason: Some(reason),
            checks,
            module_id: None,
            timestamp: None,
            digest: None,
            pcrs: None,
            user_data: None,
            nonce: None,
            public_key: None,
            chain: None,
        }
    }

    fn describe(&mut self, doc: &AttestationDoc) {
        let hex_opt = |b: &Option<Vec<u8>>| Some(b.as_ref().map(hex::encode));
        self.module_id = Some(doc.module_id.clone());
        self.timestamp = Some(doc.timestamp);
        self.digest = Some(doc.digest.clone());
        self.pcrs = Some(doc.pcrs.iter().map(|(i, v)| (i.to_string(), hex::encode(v))).collect());
        self.user_data = hex_opt(&doc.user_data);
        self.nonce = hex_opt(&doc.nonce);
        self.public_key = hex_opt(&doc.public_key);
    }
}

/// Verifies `document` against the pinned `root` at time `now`.
pub fn verify(document: &[u8], root: &Certificate, expect: &Expectations, now: SystemTime) -> Verdict {
    let mut checks = Checks::default();
    let signed = match SignedDocument::parse(document) {
        Ok(signed) => signed,
        Err(e) => return Verdict::failed(e.to_string(), checks),
    };
    checks.syntax = true;
    let mut verdict = Verdict::failed(String::new(), checks);
    verdict.describe(&signed.doc);

    let chain = match validate_chain(&signed.doc, root, now) {
        Ok(chain) => chain,
        Err(reason) => {
            verdict.checks.chain = Some(false);
            verdict.reason = Some(reason);
            return verdict;
        }
    };
    verdict.checks.chain = Some(true);
    verdict.chain = Some(chain.iter().rev().map(summary).collect());

    let leaf_key = match p384_key(&chain[0]) {
        Ok(key) => key,
        Err(reason) => {
            verdict.reason = Some(format!("the leaf certificate's key: {reason}"));
            return verdict;
        }
    };
    let signature_ok = signed.signature_valid(&leaf_key);
    verdict.checks.signature = Some(signature_ok);
    if !signature_ok {
        verdict.reason = Some("the COSE signature does not verify with the leaf certificate's key".into());
        return verdict;
    }

    let mut failures = Vec::new();
    if let Some(expected) = &expect.nonce {
        let ok = signed.doc.nonce.as_ref() == Some(expected);
        verdict.checks.nonce = Some(ok);
        if !ok {
            failures.push("the nonce is not the expected one".to_string());
        }
    }
    if !expect.pcrs.is_empty() {
        let wrong: Vec<String> = expect
            .pcrs
            .iter()
            .filter(|(i, v)| signed.doc.pcrs.get(i) != Some(v))
            .map(|(i, _)| format!("PCR{i}"))
            .collect();
        verdict.checks.pcrs = Some(wrong.is_empty());
        if !wrong.is_empty() {
            failures.push(format!("{} differ from the expected values", wrong.join(", ")));
        }
    }
    verdict.valid = failures.is_empty();
    verdict.reason = (!failures.is_empty()).then(|| failures.join("; "));
    verdict
}

fn summary(cert: &Certificate) -> CertificateSummary {
    let validity = &cert.tbs_certificate.validity;
    CertificateSummary {
        subject: cert.tbs_certificate.subject.to_string(),
        not_before: validity.not_before.to_string(),
        not_after: validity.not_after.to_string(),
    }
}

/// Builds `[leaf, cabundle reversed…]` up to the pinned root and checks every link. Returns the
/// chain leaf first, the pinned root last.
fn validate_chain(
    doc: &AttestationDoc,
    root: &Certificate,
    now: SystemTime,
) -> Result<Vec<Certificate>, String> {
    let parse = |what: String, der: &[u8]| {
        Certificate::from_der(der).map_err(|e| format!("{what} is not a DER X.509 certificate: {e}"))
    };
    let root_der = root.to_der().map_err(|e| e.to_string())?;
    if doc.cabundle[0] != root_der {
        return Err("the cabundle does not start with the pinned root certificate".into());
    }
    let mut chain = vec![parse("the leaf certificate".into(), &doc.certificate)?];
    for (i, der) in doc.cabundle.iter().enumerate().skip(1).rev() {
        chain.push(parse(format!("cabundle entry {i}"), der)?);
    }
    chain.push(root.clone());

    for (depth, cert) in chain.iter().enumerate() {
        let name = cert.tbs_certificate.subject.to_string();
        let validity = &cert.tbs_certificate.validity;
        if now < validity.not_before.to_system_time() || now > validity.not_after.to_system_time() {
            return Err(format!(
                "certificate {name:?} is not valid now (valid {} to {})",
                validity.not_before, validity.not_after
            ));
        }
        let issuer = chain.get(depth + 1).unwrap_or(cert);
        if cert.tbs_certificate.issuer != issuer.tbs_certificate.subject {
            return Err(format!(
                "certificate {name:?} was not issued by {:?}",
                issuer.tbs_certificate.subject.to_string()
            ));
        }
        signed_by(cert, issuer).map_err(|e| format!("certificate {name:?}: {e}"))?;
        let constraints =
            extension::<BasicConstraints>(cert).map_err(|e| format!("certificate {name:?}: {e}"))?;
        let usage = extension::<KeyUsage>(cert).map_err(|e| format!("certificate {name:?}: {e}"))?;
        if depth == 0 {
            if constraints.as_ref().is_some_and(|c| c.ca || c.path_len_constraint.is_some()) {
                return Err(format!("the leaf certificate {name:?} is marked as a CA"));
            }
            if !usage.is_some_and(|u| u.0.contains(KeyUsages::DigitalSignature)) {
                return Err(format!("the leaf certificate {name:?} lacks the digitalSignature key usage"));
            }
        } else {
            let Some(constraints) = constraints.filter(|c| c.ca) else {
                return Err(format!("certificate {name:?} signs others but is not a CA"));
            };
            // Intermediates below this one (the leaf does not count).
            let below = (depth - 1) as u8;
            if constraints.path_len_constraint.is_some_and(|limit| below > limit) {
                return Err(format!(
                    "certificate {name:?} allows a path of {:?} below it, not {below}",
                    constraints.path_len_constraint
                ));
            }
            if !usage.is_some_and(|u| u.0.contains(KeyUsages::KeyCertSign)) {
                return Err(format!("certificate {name:?} lacks the keyCertSign key usage"));
            }
        }
    }
    Ok(chain)
}

/// An extension of `cert`, decoded; `None` when absent.
fn extension<E: AssociatedOid + for<'a> Decode<'a>>(cert: &Certificate) -> Result<Option<E>, String> {
    let Some(extensions) = &cert.tbs_certificate.extensions else { return Ok(None) };
    match extensions.iter().find(|e| e.extn_id == E::OID) {
        Some(ext) => {
            E::from_der(ext.extn_value.as_bytes()).map(Some).map_err(|e| format!("extension {}: {e}", E::OID))
        }
        None => Ok(None),
    }
}

fn p384_key(cert: &Certificate) -> Result<VerifyingKey, String> {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
    if curve != Some(CURVE_P384) {
        return Err("it is not an EC key on P-384".into());
    }
    VerifyingKey::from_sec1_bytes(spki.subject_public_key.raw_bytes()).map_err(|e| e.to_string())
}

/// Checks `cert`'s signature (ecdsa-with-SHA384) with `issuer`'s P-384 key.
pub(crate) fn signed_by(cert: &Certificate, issuer: &Certificate) -> Result<(), String> {
    if cert.signature_algorithm.oid != ECDSA_WITH_SHA384 {
        return Err(format!("signature algorithm {} is not ecdsa-with-SHA384", cert.signature_algorithm.oid));
    }
    let key = p384_key(issuer).map_err(|e| format!("its issuer's key: {e}"))?;
    let tbs = cert.tbs_certificate.to_der().map_err(|e| e.to_string())?;
    let signature = cert
        .signature
        .as_bytes()
        .and_then(|b| DerSignature::from_bytes(b).ok())
        .ok_or("the signature is not a DER ECDSA signature")?;
    key.verify(&tbs, &signature)
        .map_err(|_| "the signature does not verify with its issuer's key".to_string())
}
