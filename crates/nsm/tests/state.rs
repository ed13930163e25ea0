//! Saving and restoring the NSM: the bank and the module's identity survive exactly, the signing
//! leaf is issued afresh, and malformed states are refused with one sentence.

use carve_eif::Measurements;
use carve_nsm::pcr::{BootMeasurements, ParentIdentity};
use carve_nsm::pki::CertificateAuthority;
use carve_nsm::protocol::{ErrorCode, NsmDescription, Request, Response};
use carve_nsm::state::NsmState;
use carve_nsm::Nsm;
use carve_snapshot::Persist;

fn boot() -> BootMeasurements {
    BootMeasurements {
        image: Some(Measurements {
            pcr0: [0xa0; 48],
            pcr1: [0xa1; 48],
            pcr2: [0xa2; 48],
            pcr8: Some([8; 48]),
        }),
        parent: ParentIdentity { role: Some("arn:aws:iam::1:role/r".into()), instance_id: None },
        debug_mode: false,
    }
}

fn describe(nsm: &mut Nsm, index: u64) -> Response {
    nsm.respond(Request::DescribePcr { index })
}

#[test]
fn extended_and_locked_pcrs_survive_a_restore_and_the_leaf_is_reissued() {
    let dir = tempfile::tempdir().unwrap();
    let mut nsm =
        Nsm::new("i-0000000000000000-enc5".into(), &boot(), CertificateAuthority::open(dir.path()).unwrap())
            .unwrap();
    nsm.respond(Request::ExtendPcr { index: 16, data: b"app".to_vec() });
    nsm.respond(Request::ExtendPcr { index: 17, data: b"config".to_vec() });
    assert_eq!(nsm.respond(Request::LockPcr { index: 16 }), Response::LockPcr);
    assert_eq!(nsm.respond(Request::LockPcrs { range: 20 }), Response::LockPcrs);
    nsm.respond(Request::ExtendPcr { index: 25, data: b"open".to_vec() });
    let before: Vec<Response> = (0..32).map(|i| describe(&mut nsm, i)).collect();
    let Response::Attestation { document: old_doc } =
        nsm.respond(Request::Attestation { user_data: None, nonce: None, public_key: None })
    else {
        panic!("no document")
    };

    let state = nsm.save().unwrap();
    // Through the snapshot file's encoding, as the VMM stores it.
    let bytes = carve_snapshot::file::encode(&state).unwrap();
    let decoded: NsmState = carve_snapshot::file::decode(&bytes).unwrap();
    assert_eq!(decoded, state);
    let mut restored = Nsm::restore(CertificateAuthority::open(dir.path()).unwrap(), &decoded).unwrap();
    assert_eq!(restored.save().unwrap(), state, "save → restore → save is the identity");
    assert_eq!(restored.module_id(), "i-0000000000000000-enc5");
    assert_eq!(restored.boot_measurements(), &boot());
    let after: Vec<Response> = (0..32).map(|i| describe(&mut restored, i)).collect();
    assert_eq!(after, before);
    assert_eq!(
        restored.respond(Request::ExtendPcr { index: 17, data: b"x".to_vec() }),
        Response::Error(ErrorCode::ReadOnlyIndex),
        "PCR 17 stays locked"
    );
    assert!(matches!(
        restored.respond(Request::ExtendPcr { index: 25, data: b"x".to_vec() }),
        Response::ExtendPcr { .. }
    ));
    let Response::DescribeNsm(NsmDescription { locked_pcrs, module_id, .. }) =
        restored.respond(Request::DescribeNsm)
    else {
        panic!("no description")
    };
    assert_eq!(locked_pcrs, (0..20).collect::<Vec<u16>>());
    assert_eq!(module_id, "i-0000000000000000-enc5");

    // A new leaf signs after the restore: same chain, another certificate.
    let Response::Attestation { document: new_doc } =
        restored.respond(Request::Attestation { user_data: None, nonce: None, public_key: None })
    else {
        panic!("no document")
    };
    let certificate = |doc: &[u8]| {
        let doc = carve_nsm::document::SignedDocument::parse(doc).unwrap().doc;
        (doc.certificate, doc.cabundle, doc.pcrs)
    };
    let (old_cert, old_bundle, old_pcrs) = certificate(&old_doc);
    let (new_cert, new_bundle, new_pcrs) = certificate(&new_doc);
    assert_ne!(old_cert, new_cert);
    assert_eq!(old_bundle, new_bundle);
    assert_eq!(old_pcrs, new_pcrs);
}

#[test]
fn malformed_states_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let nsm =
        Nsm::new("i-0000000000000000-enc6".into(), &boot(), CertificateAuthority::open(dir.path()).unwrap())
            .unwrap();
    let good = nsm.save().unwrap();
    let refused = |change: &dyn Fn(&mut NsmState)| {
        let mut state = good.clone();
        change(&mut state);
        let ca = CertificateAuthority::open(dir.path()).unwrap();
        Nsm::restore(ca, &state).err().expect("refused").to_string()
    };
    assert_eq!(
        refused(&|s| s.bank.pcrs[0].index = 32),
        "the saved PCR bank has PCR index 32, out of range for a bank of 32"
    );
    assert_eq!(
        refused(&|s| s.bank.pcrs[2].value[0] ^= 1),
        "the saved PCR 2 differs from what the saved boot measurements give it, and it cannot change after boot"
    );
    assert_eq!(
        refused(&|s| s.boot.parent_role = None),
        "the saved PCR 3 differs from what the saved boot measurements give it, and it cannot change after boot"
    );
    assert_eq!(
        refused(&|s| s.boot.image.as_mut().unwrap().pcr1.truncate(32)),
        "the saved boot measurement PCR1 holds 32 bytes, but SHA384 values are 48"
    );
    assert_eq!(refused(&|s| s.module_id.clear()), "the saved module ID is empty or longer than 256 bytes");
    assert_eq!(
        refused(&|s| s.bank.locked = u64::MAX),
        "the saved lock bitmap 0xffffffffffffffff locks registers beyond the 32 the bank has"
    );
}
