//! `verify` follows AWS's published steps: each kind of bad document fails with its reason.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use carve_nsm::document::AttestationDoc;
use carve_nsm::pcr::BootMeasurements;
use carve_nsm::pki::{self, CertificateAuthority};
use carve_nsm::protocol::{Request, Response};
use carve_nsm::verify::{verify, Expectations, Verdict};
use carve_nsm::Nsm;
use p384::ecdsa::SigningKey;
use x509_cert::builder::Profile;
use x509_cert::der::Encode;

struct Fixture {
    _state: tempfile::TempDir,
    ca: CertificateAuthority,
    nsm: Nsm,
}

fn fixture() -> Fixture {
    let state = tempfile::tempdir().unwrap();
    let nsm = Nsm::new(
        "i-0000000000000000-enc2".into(),
        &BootMeasurements::default(),
        CertificateAuthority::open(state.path()).unwrap(),
    )
    .unwrap();
    let ca = CertificateAuthority::open(state.path()).unwrap();
    Fixture { _state: state, ca, nsm }
}

fn attest(nsm: &mut Nsm, nonce: &[u8]) -> Vec<u8> {
    let request = Request::Attestation {
        user_data: Some(b"hello".to_vec()),
        nonce: Some(nonce.to_vec()),
        public_key: None,
    };
    match nsm.respond(request) {
        Response::Attestation { document } => document,
        other => panic!("{other:?}"),
    }
}

fn check(document: &[u8], ca: &CertificateAuthority, expect: &Expectations) -> Verdict {
    verify(document, ca.root(), expect, SystemTime::now())
}

fn reason(verdict: &Verdict) -> &str {
    assert!(!verdict.valid, "expected a failure: {verdict:?}");
    verdict.reason.as_deref().unwrap()
}

#[test]
fn a_fresh_document_verifies_with_its_nonce_and_pcrs() {
    let mut f = fixture();
    let document = attest(&mut f.nsm, b"n0nce");
    let pcrs = BTreeMap::from([(0, vec![0; 48]), (16, vec![0; 48])]);
    let verdict =
        check(&document, &f.ca, &Expectations { nonce: Some(b"n0nce".to_vec()), pcrs: BTreeMap::new() });
    assert!(verdict.valid, "{verdict:?}");
    assert_eq!(verdict.checks.signature, Some(true));
    assert_eq!(verdict.checks.nonce, Some(true));
    assert_eq!(verdict.module_id.as_deref(), Some("i-0000000000000000-enc2"));
    assert_eq!(verdict.chain.as_ref().unwrap().len(), 3);
    // PCR16 is not in a document (only 0–15 are): asking for it fails.
    let verdict = check(&document, &f.ca, &Expectations { nonce: None, pcrs });
    assert_eq!(reason(&verdict), "PCR16 differ from the expected values");
}

#[test]
fn wrong_nonce_and_wrong_pcr_are_named() {
    let mut f = fixture();
    let document = attest(&mut f.nsm, b"abc");
    let expect = Expectations { nonce: Some(b"abd".to_vec()), pcrs: BTreeMap::from([(3, vec![1; 48])]) };
    let verdict = check(&document, &f.ca, &expect);
    assert_eq!(reason(&verdict), "the nonce is not the expected one; PCR3 differ from the expected values");
    assert_eq!((verdict.checks.nonce, verdict.checks.pcrs), (Some(false), Some(false)));
}

#[test]
fn truncated_and_corrupted_documents_fail() {
    let mut f = fixture();
    let document = attest(&mut f.nsm, b"abc");
    let verdict = check(&document[..document.len() - 10], &f.ca, &Expectations::default());
    assert!(reason(&verdict).starts_with("the document is not a COSE_Sign1 structure"), "{verdict:?}");
    assert!(!verdict.checks.syntax);

    // Flip a byte of user_data ("hello") inside the signed payload.
    let mut corrupted = document.clone();
    let at = corrupted.windows(5).position(|w| w == b"hello").unwrap();
    corrupted[at] = b'j';
    let verdict = check(&corrupted, &f.ca, &Expectations::default());
    assert_eq!(reason(&verdict), "the COSE signature does not verify with the leaf certificate's key");
    assert_eq!(verdict.checks.chain, Some(true));
}

#[test]
fn a_document_resigned_with_another_key_fails() {
    let mut f = fixture();
    let document = attest(&mut f.nsm, b"abc");
    let signed = carve_nsm::document::SignedDocument::parse(&document).unwrap();
    let resigned = signed.doc.sign(&SigningKey::random(&mut rand_core::OsRng));
    let verdict = check(&resigned, &f.ca, &Expectations::default());
    assert_eq!(reason(&verdict), "the COSE signature does not verify with the leaf certificate's key");
}

#[test]
fn a_document_from_another_ca_fails_against_the_pinned_root() {
    let mut f = fixture();
    let other = fixture();
    let document = attest(&mut f.nsm, b"abc");
    let verdict = check(&document, &other.ca, &Expectations::default());
    assert_eq!(reason(&verdict), "the cabundle does not start with the pinned root certificate");
    assert_eq!(verdict.checks.chain, Some(false));
}

#[test]
fn an_expired_leaf_fails() {
    let mut f = fixture();
    let document = attest(&mut f.nsm, b"abc");
    let later = SystemTime::now() + pki::LEAF_LIFETIME + Duration::from_secs(60);
    let verdict = verify(&document, f.ca.root(), &Expectations::default(), later);
    assert!(reason(&verdict).contains("is not valid now"), "{verdict:?}");
}

/// A forger with a key of their own puts the real chain around a leaf they made.
fn forged(f: &Fixture, profile: Profile, signer: &SigningKey, root_only: bool) -> Vec<u8> {
    let key = SigningKey::random(&mut rand_core::OsRng);
    let leaf =
        pki::issue(profile, "CN=forged", key.verifying_key(), signer, SystemTime::now(), pki::LEAF_LIFETIME)
            .unwrap();
    let mut genuine = f.ca.issue_leaf("x", SystemTime::now()).unwrap();
    if root_only {
        genuine.cabundle.truncate(1);
    }
    let doc = AttestationDoc {
        module_id: "forged".into(),
        digest: "SHA384".into(),
        timestamp: 1,
        pcrs: BTreeMap::from([(0, vec![0; 48])]),
        certificate: leaf.to_der().unwrap(),
        cabundle: genuine.cabundle,
        public_key: None,
        user_data: None,
        nonce: None,
    };
    doc.sign(&key)
}

#[test]
fn a_self_made_leaf_is_not_accepted() {
    let f = fixture();
    let stranger = SigningKey::random(&mut rand_core::OsRng);
    let issuer = f.ca.issue_leaf("x", SystemTime::now()).unwrap();
    let intermediate = pki::certificate_from_der(&issuer.cabundle[1]).unwrap();
    let profile = Profile::Leaf {
        issuer: intermediate.tbs_certificate.subject.clone(),
        enable_key_agreement: false,
        enable_key_encipherment: false,
    };
    let verdict = check(&forged(&f, profile, &stranger, false), &f.ca, &Expectations::default());
    assert_eq!(
        reason(&verdict),
        "certificate \"CN=forged\": the signature does not verify with its issuer's key"
    );
}

#[test]
fn a_leaf_marked_as_a_ca_fails_and_names_must_chain() {
    let f = fixture();
    let root_name = f.ca.root().tbs_certificate.subject.clone();
    let profile = Profile::SubCA { issuer: root_name, path_len_constraint: None };
    // Signed by the real root, directly below it.
    let document = forged(&f, profile.clone(), f.ca.root_key(), true);
    let verdict = check(&document, &f.ca, &Expectations::default());
    assert_eq!(reason(&verdict), "the leaf certificate \"CN=forged\" is marked as a CA");
    // The same leaf with the intermediate in the bundle: its issuer is not the intermediate.
    let document = forged(&f, profile, f.ca.root_key(), false);
    let verdict = check(&document, &f.ca, &Expectations::default());
    assert!(reason(&verdict).contains("was not issued by \"CN=intermediate.carve"), "{verdict:?}");
}

#[test]
fn oversized_fields_fail_the_syntax_check() {
    let f = fixture();
    let leaf = f.ca.issue_leaf("x", SystemTime::now()).unwrap();
    let doc = AttestationDoc {
        module_id: "x".into(),
        digest: "SHA384".into(),
        timestamp: 1,
        pcrs: BTreeMap::from([(0, vec![0; 48])]),
        certificate: leaf.certificate.clone(),
        cabundle: leaf.cabundle.clone(),
        public_key: None,
        user_data: Some(vec![0; 513]),
        nonce: None,
    };
    let verdict = check(&doc.sign(&leaf.key), &f.ca, &Expectations::default());
    assert_eq!(reason(&verdict), "the payload field user_data is malformed: 513 bytes; 0 to 512 allowed");
    let bad_pcr = AttestationDoc { user_data: None, pcrs: BTreeMap::from([(40, vec![0; 48])]), ..doc };
    let verdict = check(&bad_pcr.sign(&leaf.key), &f.ca, &Expectations::default());
    assert!(reason(&verdict).contains("is not 0 to 31"), "{verdict:?}");
}
