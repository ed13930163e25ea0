//! Byte compatibility with AWS's own crates: aws-nitro-enclaves-nsm-api (the wire types, serde_cbor)
//! decodes what carve's NSM sends and encodes what it reads; aws-nitro-enclaves-cose with OpenSSL
//! verifies carve's signatures, and OpenSSL validates the certificate chain.

use std::collections::BTreeSet;

use aws_nitro_enclaves_cose::crypto::Openssl;
use aws_nitro_enclaves_cose::CoseSign1;
use aws_nitro_enclaves_nsm_api::api::{
    AttestationDoc, Digest, ErrorCode as OracleError, Request as OracleRequest, Response as OracleResponse,
};
use carve_eif::Measurements;
use carve_nsm::pcr::{BootMeasurements, ParentIdentity};
use carve_nsm::pki::CertificateAuthority;
use carve_nsm::protocol::{ErrorCode, Request, Response};
use carve_nsm::Nsm;
use serde_bytes::ByteBuf;

fn nsm() -> (Nsm, tempfile::TempDir) {
    let state = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::open(state.path()).unwrap();
    let boot = BootMeasurements {
        image: Some(Measurements { pcr0: [0xa0; 48], pcr1: [0xa1; 48], pcr2: [0xa2; 48], pcr8: None }),
        parent: ParentIdentity { role: None, instance_id: Some("i-0123456789abcdef0".into()) },
        debug_mode: false,
    };
    (Nsm::new("i-0000000000000000-enc1".into(), &boot, ca).unwrap(), state)
}

fn oracle_call(nsm: &mut Nsm, request: &OracleRequest) -> OracleResponse {
    let bytes = serde_cbor::to_vec(request).unwrap();
    serde_cbor::from_slice(&nsm.handle(&bytes)).unwrap()
}

#[test]
fn requests_encode_exactly_as_nsm_api_does() {
    let pairs = [
        (OracleRequest::DescribePCR { index: 7 }, Request::DescribePcr { index: 7 }),
        (
            OracleRequest::ExtendPCR { index: 16, data: vec![1, 2, 3] },
            Request::ExtendPcr { index: 16, data: vec![1, 2, 3] },
        ),
        (OracleRequest::LockPCR { index: 31 }, Request::LockPcr { index: 31 }),
        (OracleRequest::LockPCRs { range: 300 }, Request::LockPcrs { range: 300 }),
        (OracleRequest::DescribeNSM, Request::DescribeNsm),
        (OracleRequest::GetRandom, Request::GetRandom),
        (
            OracleRequest::Attestation {
                user_data: Some(ByteBuf::from(b"user".to_vec())),
                nonce: None,
                public_key: Some(ByteBuf::from(vec![4; 97])),
            },
            Request::Attestation {
                user_data: Some(b"user".to_vec()),
                nonce: None,
                public_key: Some(vec![4; 97]),
            },
        ),
    ];
    for (oracle, ours) in pairs {
        let wire = serde_cbor::to_vec(&oracle).unwrap();
        assert_eq!(ours.encode(), wire, "{oracle:?}");
        assert_eq!(Request::decode(&wire), Ok(ours));
    }
}

#[test]
fn responses_decode_with_nsm_api_and_match_its_encoding() {
    let (mut nsm, _state) = nsm();
    let describe = nsm.handle(&serde_cbor::to_vec(&OracleRequest::DescribePCR { index: 0 }).unwrap());
    match serde_cbor::from_slice(&describe).unwrap() {
        OracleResponse::DescribePCR { lock, data } => {
            assert!(lock);
            assert_eq!(data, vec![0xa0; 48]);
            let again = serde_cbor::to_vec(&OracleResponse::DescribePCR { lock, data }).unwrap();
            assert_eq!(describe, again, "byte-identical to serde_cbor's encoding");
        }
        other => panic!("{other:?}"),
    }
    match oracle_call(&mut nsm, &OracleRequest::DescribeNSM) {
        OracleResponse::DescribeNSM { version_major, module_id, max_pcrs, locked_pcrs, digest, .. } => {
            assert_eq!((version_major, max_pcrs, digest), (1, 32, Digest::SHA384));
            assert_eq!(module_id, "i-0000000000000000-enc1");
            assert_eq!(locked_pcrs, (0..16).collect::<BTreeSet<u16>>());
        }
        other => panic!("{other:?}"),
    }
    let extended = match oracle_call(&mut nsm, &OracleRequest::ExtendPCR { index: 16, data: b"x".to_vec() }) {
        OracleResponse::ExtendPCR { data } => data,
        other => panic!("{other:?}"),
    };
    assert_eq!(extended, carve_eif::measure::extend_zero(b"x").to_vec());
    assert!(matches!(oracle_call(&mut nsm, &OracleRequest::LockPCR { index: 16 }), OracleResponse::LockPCR));
    assert!(matches!(
        oracle_call(&mut nsm, &OracleRequest::LockPCRs { range: 20 }),
        OracleResponse::LockPCRs
    ));
    match oracle_call(&mut nsm, &OracleRequest::GetRandom) {
        OracleResponse::GetRandom { random } => assert_eq!(random.len(), 256),
        other => panic!("{other:?}"),
    }
    let encoded = Response::Error(ErrorCode::ReadOnlyIndex).encode();
    assert_eq!(encoded, serde_cbor::to_vec(&OracleResponse::Error(OracleError::ReadOnlyIndex)).unwrap());
}

#[test]
fn errors_are_the_nsm_api_codes() {
    let (mut nsm, _state) = nsm();
    let cases = [
        (OracleRequest::DescribePCR { index: 32 }, "InvalidIndex"),
        (OracleRequest::ExtendPCR { index: 3, data: vec![1] }, "ReadOnlyIndex"),
        (OracleRequest::LockPCR { index: 0 }, "ReadOnlyIndex"),
        (OracleRequest::LockPCRs { range: 33 }, "InvalidIndex"),
        (
            OracleRequest::Attestation {
                user_data: Some(ByteBuf::from(vec![0; 513])),
                nonce: None,
                public_key: None,
            },
            "InputTooLarge",
        ),
        (
            OracleRequest::Attestation {
                user_data: None,
                nonce: Some(ByteBuf::from(vec![0; 513])),
                public_key: None,
            },
            "InputTooLarge",
        ),
        (
            OracleRequest::Attestation {
                user_data: None,
                nonce: None,
                public_key: Some(ByteBuf::from(vec![0; 1025])),
            },
            "InputTooLarge",
        ),
    ];
    for (request, expected) in cases {
        match oracle_call(&mut nsm, &request) {
            OracleResponse::Error(code) => assert_eq!(format!("{code:?}"), expected, "{request:?}"),
            other => panic!("{request:?} answered {other:?}"),
        }
    }
    for garbage in [&b""[..], b"\xff", b"\x63abc", &vec![0x40; 0x1001]] {
        let response: OracleResponse = serde_cbor::from_slice(&nsm.handle(garbage)).unwrap();
        assert!(matches!(response, OracleResponse::Error(_)), "{garbage:?} → {response:?}");
    }
}

#[test]
fn attestation_documents_verify_with_aws_crates_and_openssl() {
    let (mut nsm, _state) = nsm();
    let request = OracleRequest::Attestation {
        user_data: Some(ByteBuf::from(b"carve-demo".to_vec())),
        nonce: Some(ByteBuf::from(vec![7; 512])),
        public_key: None,
    };
    let OracleResponse::Attestation { document } = oracle_call(&mut nsm, &request) else { panic!() };
    assert_eq!(&document[..4], &[0x84, 0x44, 0xa1, 0x01], "untagged COSE_Sign1, protected header first");
    assert_eq!(&document[4..8], &[0x38, 0x22, 0xa0, 0x59], "{{1: -35}}, empty unprotected map, payload bstr");

    let cose = CoseSign1::from_bytes(&document).unwrap();
    let payload = cose.get_payload::<Openssl>(None).unwrap();
    let doc = AttestationDoc::from_binary(&payload).unwrap();
    assert_eq!(doc.module_id, "i-0000000000000000-enc1");
    assert_eq!(doc.digest, Digest::SHA384);
    assert_eq!(doc.pcrs.len(), 16);
    assert_eq!(doc.pcrs[&0].as_slice(), &[0xa0; 48]);
    assert_eq!(doc.pcrs[&4].as_slice(), &carve_eif::measure::extend_zero(b"i-0123456789abcdef0"));
    assert_eq!(doc.user_data.as_deref().map(Vec::as_slice), Some(&b"carve-demo"[..]));
    assert_eq!(doc.nonce.as_deref().map(Vec::as_slice), Some(&[7u8; 512][..]));
    assert_eq!(doc.public_key, None);
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(doc.timestamp <= now_ms && now_ms - doc.timestamp < 60_000);
    // The nine keys, in Nitro's order.
    let keys = payload_keys(&payload);
    assert_eq!(
        keys,
        [
            "module_id",
            "digest",
            "timestamp",
            "pcrs",
            "certificate",
            "cabundle",
            "public_key",
            "user_data",
            "nonce"
        ]
    );

    let leaf = openssl::x509::X509::from_der(&doc.certificate).unwrap();
    assert!(cose.verify_signature::<Openssl>(leaf.public_key().unwrap().as_ref()).unwrap());

    // OpenSSL walks leaf → intermediate → pinned root on its own.
    let mut store = openssl::x509::store::X509StoreBuilder::new().unwrap();
    store.add_cert(openssl::x509::X509::from_der(&doc.cabundle[0]).unwrap()).unwrap();
    let store = store.build();
    let mut intermediates = openssl::stack::Stack::new().unwrap();
    for der in &doc.cabundle[1..] {
        intermediates.push(openssl::x509::X509::from_der(der).unwrap()).unwrap();
    }
    let mut context = openssl::x509::X509StoreContext::new().unwrap();
    let ok = context.init(&store, &leaf, &intermediates, |c| c.verify_cert()).unwrap();
    assert!(ok, "OpenSSL chain validation: {}", context.error());

    // Tampering is caught by the oracle too.
    let mut tampered = document.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let cose = CoseSign1::from_bytes(&tampered).unwrap();
    assert!(!cose.verify_signature::<Openssl>(leaf.public_key().unwrap().as_ref()).unwrap());
}

fn payload_keys(payload: &[u8]) -> Vec<String> {
    let value: ciborium::Value = ciborium::from_reader(payload).unwrap();
    value.as_map().unwrap().iter().map(|(k, _)| k.as_text().unwrap().to_string()).collect()
}
