//! EIF round trips, measurements against an independent computation, signatures, and every
//! corruption the reader names.

use std::io::Cursor;
use std::path::PathBuf;
use std::process::Command;

use carve_eif::header::{
    EifHeader, SectionHeader, SectionType, HEADER_CRC_COVERED, HEADER_LEN, MAX_SECTIONS,
};
use carve_eif::measure::{hex, pcr_of};
use carve_eif::reader::Discard;
use carve_eif::{read, EifBuilder, EifError, EifSummary, SectionInput, SigningCertificate, SigningKey};
use proptest::prelude::*;

fn build(kernel: &[u8], cmdline: &str, ramdisks: &[&[u8]]) -> Vec<u8> {
    build_signed(kernel, cmdline, ramdisks, None)
}

fn build_signed(
    kernel: &[u8],
    cmdline: &str,
    ramdisks: &[&[u8]],
    signer: Option<(&SigningKey, &SigningCertificate)>,
) -> Vec<u8> {
    let mut builder =
        EifBuilder::new(SectionInput::bytes("kernel", kernel), cmdline, br#"{"ImageName":"t"}"#.to_vec());
    for (i, ramdisk) in ramdisks.iter().enumerate() {
        builder = builder.ramdisk(SectionInput::bytes(format!("ramdisk {i}"), ramdisk));
    }
    if let Some((key, certificate)) = signer {
        builder = builder.sign(key, certificate);
    }
    let mut out = Cursor::new(Vec::new());
    builder.write(&mut out).unwrap();
    out.into_inner()
}

fn parse(bytes: &[u8]) -> Result<EifSummary, EifError> {
    read(bytes, Some(bytes.len() as u64), &mut Discard)
}

fn error(bytes: &[u8]) -> String {
    match parse(bytes) {
        Ok(_) => panic!("the image was accepted"),
        Err(e) => e.to_string(),
    }
}

/// An EIF assembled section by section, with a correct header and CRC (for shapes the builder
/// refuses to write).
fn assemble(version: u16, sections: &[(u16, &[u8])]) -> Vec<u8> {
    let mut header = EifHeader {
        version,
        flags: 0,
        default_mem: 1 << 30,
        default_cpus: 2,
        num_sections: sections.len() as u16,
        section_offsets: [0; MAX_SECTIONS],
        section_sizes: [0; MAX_SECTIONS],
        crc32: 0,
    };
    let mut body = Vec::new();
    for (i, (raw_type, data)) in sections.iter().enumerate() {
        header.section_offsets[i] = (HEADER_LEN + body.len()) as u64;
        header.section_sizes[i] = data.len() as u64;
        body.extend_from_slice(&raw_type.to_be_bytes());
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&(data.len() as u64).to_be_bytes());
        body.extend_from_slice(data);
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header.to_bytes()[..HEADER_CRC_COVERED]);
    crc.update(&body);
    header.crc32 = crc.finalize();
    let mut image = header.to_bytes().to_vec();
    image.extend_from_slice(&body);
    image
}

const KERNEL: u16 = 1;
const CMDLINE: u16 = 2;
const RAMDISK: u16 = 3;
const METADATA: u16 = 5;

#[test]
fn round_trip_measures_like_the_formula() {
    let (kernel, r0, r1) = (vec![0x4b; 5000], vec![1u8; 3000], vec![2u8; 7000]);
    let image = build(&kernel, "console=ttyS0", &[&r0, &r1]);
    let summary = parse(&image).unwrap();
    assert!(summary.crc_ok());
    assert_eq!(summary.header.version, 4);
    let types: Vec<SectionType> = summary.sections.iter().map(|s| s.section_type).collect();
    use SectionType::*;
    assert_eq!(types, [Kernel, Cmdline, Metadata, Ramdisk, Ramdisk]);
    let cat = |parts: &[&[u8]]| parts.concat();
    let m = summary.measurements;
    assert_eq!(m.pcr0, pcr_of(&cat(&[&kernel, b"console=ttyS0", &r0, &r1])));
    assert_eq!(m.pcr1, pcr_of(&cat(&[&kernel, b"console=ttyS0", &r0])));
    assert_eq!(m.pcr2, pcr_of(&r1));
    assert_eq!(m.pcr8, None);
    assert_eq!(summary.metadata.as_deref(), Some(&br#"{"ImageName":"t"}"#[..]));
    // The cmdline has no trailing NUL.
    assert_eq!(summary.sections[1].size, 13);
}

#[test]
fn one_ramdisk_gives_the_empty_pcr2() {
    let summary = parse(&build(b"k", "", &[b"r"])).unwrap();
    let pcr2 = hex(&summary.measurements.pcr2);
    assert!(pcr2.starts_with("21b9efbc") && pcr2.ends_with("fc500a"), "{pcr2}");
}

#[test]
fn older_versions_are_read() {
    for version in [2, 3] {
        let image = assemble(version, &[(KERNEL, b"k"), (CMDLINE, b"c"), (RAMDISK, b"r")]);
        let summary = parse(&image).unwrap();
        assert!(summary.crc_ok());
        assert_eq!(summary.header.version, version);
    }
}

#[test]
fn every_corruption_is_named() {
    let good = build(b"kernel", "cmdline", &[b"ramdisk"]);
    let patched = |at: usize, bytes: &[u8]| {
        let mut image = good.clone();
        image[at..at + bytes.len()].copy_from_slice(bytes);
        image
    };
    assert!(error(&patched(0, b"XEIF")).starts_with("not an EIF: the file starts with [58, 45, 49, 46]"));
    assert_eq!(
        error(&patched(4, &[0, 5])),
        "EIF version 5 is not supported (carve reads versions 2, 3 and 4)"
    );
    assert_eq!(
        error(&patched(4, &[0, 1])),
        "EIF version 1 is not supported (carve reads versions 2, 3 and 4)"
    );
    assert_eq!(
        error(&patched(0x1a, &[0, 33])),
        "the header lists 33 sections, more than the 32 an EIF can hold"
    );
    // Section 0's size in the header table.
    assert_eq!(
        error(&patched(0x11c + 7, &[7])),
        "the header gives section 0 7 bytes, but its section header says 6"
    );
    assert_eq!(
        error(&patched(0x1c + 7, &[0])),
        "the header lists section 0 at byte 512, but it starts at byte 548"
    );
    // Section 0's type, then its flags.
    assert!(
        error(&patched(HEADER_LEN, &[0, 0])).starts_with("section 0 has section type 0, which is not kernel")
    );
    assert!(error(&patched(HEADER_LEN, &[0, 6])).starts_with("section 0 has section type 6"));
    assert_eq!(error(&patched(HEADER_LEN + 2, &[0, 1])), "section 0 has reserved flags 0x1 set");
    assert_eq!(
        error(&good[..good.len() - 3]),
        format!(
            "section 3 ends at byte {}, past the end of the file ({} bytes)",
            good.len() - 12,
            good.len() - 3
        )
    );
    let truncated = &good[..good.len() - 3];
    let streamed = read(truncated, None, &mut Discard).err().unwrap().to_string();
    assert!(
        streamed.starts_with("the image is truncated: the file ends inside section 3 (ramdisk)"),
        "{streamed}"
    );
    assert!(error(&good[..100]).starts_with("the image is truncated: the file ends inside the header"));
    let mut trailing = good.clone();
    trailing.push(0);
    assert_eq!(error(&trailing), format!("there are bytes after the last section, from byte {}", good.len()));
    let stray = patched(0x1c + 8 * 31 + 7, &[1]);
    assert_eq!(error(&stray), "the header's table has an entry at index 31, beyond its 4 sections");
    // A flipped data byte keeps the image readable but fails the CRC.
    let flipped = patched(good.len() - 1, b"X");
    let summary = parse(&flipped).unwrap();
    assert!(!summary.crc_ok());
    assert!(summary.check_crc().unwrap_err().to_string().starts_with("the CRC in the header"));
}

#[test]
fn section_sets_the_format_forbids_are_named() {
    type Sections<'a> = &'a [(u16, &'a [u8])];
    let cases: [(Sections, &str); 7] = [
        (&[(CMDLINE, b"c"), (METADATA, b"{}")], "the image has no kernel section"),
        (&[(KERNEL, b"k"), (RAMDISK, b"r")], "the image has no cmdline section"),
        (&[(KERNEL, b"k"), (CMDLINE, b"c"), (METADATA, b"{}")], "the image has no ramdisk section"),
        (
            &[(KERNEL, b"k"), (KERNEL, b"k"), (CMDLINE, b"c"), (RAMDISK, b"r")],
            "section 1 is a second kernel section",
        ),
        (
            &[(KERNEL, b"k"), (CMDLINE, b"c"), (CMDLINE, b"c"), (RAMDISK, b"r")],
            "section 2 is a second cmdline section",
        ),
        (
            &[(RAMDISK, b"r"), (KERNEL, b"k"), (CMDLINE, b"c")],
            "section 0 is a ramdisk placed before the kernel",
        ),
        (
            &[(KERNEL, b"k"), (CMDLINE, b"c"), (METADATA, b"{}"), (METADATA, b"{}"), (RAMDISK, b"r")],
            "section 3 is a second metadata section",
        ),
    ];
    for (sections, expected) in cases {
        assert_eq!(error(&assemble(4, sections)), expected);
    }
    let signature_in_v2 = assemble(2, &[(KERNEL, b"k"), (CMDLINE, b"c"), (RAMDISK, b"r"), (4, b"\x80")]);
    assert_eq!(error(&signature_in_v2), "a version-2 EIF cannot have a signature section");
    let big_signature = vec![0u8; 32 * 1024 + 1];
    let image = assemble(4, &[(KERNEL, b"k"), (CMDLINE, b"c"), (RAMDISK, b"r"), (4, &big_signature)]);
    assert_eq!(error(&image), "the signature section has 32769 bytes, more than the 32768 allowed");
    let garbage = assemble(4, &[(KERNEL, b"k"), (CMDLINE, b"c"), (RAMDISK, b"r"), (4, b"\xa0")]);
    assert!(error(&garbage)
        .starts_with("the signature section is invalid: the signature section is not valid CBOR"));
}

/// A key and self-signed certificate made by the openssl command (a test fixture generator,
/// not part of carve).
fn key_and_certificate(curve: &str) -> (String, Vec<u8>) {
    let dir = std::env::temp_dir().join(format!("carve-eif-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join(format!("{curve}.key"));
    let cert = dir.join(format!("{curve}.pem"));
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["ecparam", "-name", curve, "-genkey", "-noout", "-out", key.to_str().unwrap()]);
    run(&[
        "req",
        "-new",
        "-x509",
        "-key",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
        "-days",
        "30",
        "-subj",
        "/C=US/O=carve tests/CN=signer",
    ]);
    (std::fs::read_to_string(key).unwrap(), std::fs::read(cert).unwrap())
}

fn der_of(pem: &[u8]) -> Vec<u8> {
    let path: PathBuf = std::env::temp_dir().join(format!("carve-eif-der-{}", std::process::id()));
    std::fs::write(&path, pem).unwrap();
    let out = Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in", path.to_str().unwrap()])
        .output()
        .unwrap();
    out.stdout
}

#[test]
fn signatures_verify_on_every_curve_and_pcr8_measures_the_der() {
    for curve in ["prime256v1", "secp384r1", "secp521r1"] {
        let (key_pem, cert_pem) = key_and_certificate(curve);
        let key = SigningKey::from_pem(&key_pem).unwrap();
        let certificate = SigningCertificate::from_pem(&cert_pem).unwrap();
        let image = build_signed(b"kernel", "cmdline", &[b"r0", b"r1"], Some((&key, &certificate)));
        let summary = parse(&image).unwrap();
        assert!(summary.crc_ok(), "{curve}");
        assert_eq!(summary.signature_check(), Some(true), "{curve}");
        assert_eq!(summary.measurements.pcr8, Some(pcr_of(&der_of(&cert_pem))), "{curve}");
        let info = summary.signature.as_ref().unwrap().certificate.describe();
        assert_eq!(info.issuer_name.get("commonName").map(String::as_str), Some("signer"));
        assert_eq!(info.issuer_name.get("organizationName").map(String::as_str), Some("carve tests"));
        assert!(info.signature.contains(':') && info.not_after.ends_with(" GMT"), "{info:?}");

        // The signed payload no longer matches once the image changes.
        let kernel_byte = HEADER_LEN + 12;
        let mut tampered = image.clone();
        tampered[kernel_byte] ^= 1;
        assert_eq!(parse(&tampered).unwrap().signature_check(), Some(false), "{curve}");
    }
}

#[test]
fn signature_sections_use_nitro_cli_s_integer_arrays() {
    let (key_pem, cert_pem) = key_and_certificate("secp384r1");
    let key = SigningKey::from_pem(&key_pem).unwrap();
    let certificate = SigningCertificate::from_pem(&cert_pem).unwrap();
    let image = build_signed(b"k", "c", &[b"r"], Some((&key, &certificate)));
    let summary = parse(&image).unwrap();
    let section = summary.sections.last().unwrap();
    assert_eq!(section.section_type, SectionType::Signature);
    let start = section.data_offset() as usize;
    let bytes = &image[start..start + section.size as usize];
    // array(1), map(2), "signing_certificate" (text of 19), then an array of the PEM's bytes.
    assert_eq!(&bytes[..3], &[0x81, 0xa2, 0x73]);
    assert_eq!(&bytes[3..22], b"signing_certificate");
    let len = cert_pem.len();
    assert_eq!(&bytes[22..25], &[0x99, (len >> 8) as u8, len as u8]);
    // '-' (0x2d) needs a one-byte integer head: 0x18 0x2d.
    assert_eq!(&bytes[25..27], &[0x18, b'-']);
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_refused() {
    let (_, cert_pem) = key_and_certificate("secp384r1");
    let (other_key, _) = key_and_certificate("secp384r1");
    let key = SigningKey::from_pem(&other_key).unwrap();
    let certificate = SigningCertificate::from_pem(&cert_pem).unwrap();
    let builder = EifBuilder::new(SectionInput::bytes("kernel", b"k"), "c", b"{}".to_vec())
        .ramdisk(SectionInput::bytes("r", b"r"))
        .sign(&key, &certificate);
    let err = builder.write(&mut Cursor::new(Vec::new())).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot sign the image: the private key does not match the signing certificate's public key"
    );
    assert!(
        SigningKey::from_pem("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n").is_err()
    );
    assert!(SigningCertificate::from_pem(b"not a certificate").is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_section_sets_round_trip(
        kernel in proptest::collection::vec(any::<u8>(), 0..4096),
        cmdline in "[ -~]{0,200}",
        ramdisks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..4096), 1..6),
    ) {
        let refs: Vec<&[u8]> = ramdisks.iter().map(Vec::as_slice).collect();
        let image = build(&kernel, &cmdline, &refs);
        let summary = parse(&image).unwrap();
        prop_assert!(summary.crc_ok());
        prop_assert_eq!(summary.sections.len(), 3 + ramdisks.len());
        let all: Vec<u8> = [kernel.clone(), cmdline.as_bytes().to_vec(), ramdisks.concat()].concat();
        prop_assert_eq!(summary.measurements.pcr0, pcr_of(&all));
        prop_assert_eq!(summary.measurements.pcr2, pcr_of(&ramdisks[1..].concat()));
    }

    #[test]
    fn mutated_images_never_panic(flips in proptest::collection::vec((0usize..700, any::<u8>()), 1..8)) {
        let mut image = build(b"kernel", "cmdline", &[b"ramdisk", b"second"]);
        for (at, byte) in flips {
            let at = at % image.len();
            image[at] = byte;
        }
        let _ = parse(&image);
        let _ = read(image.as_slice(), None, &mut Discard);
    }
}

#[test]
fn section_headers_round_trip() {
    let header = SectionHeader { section_type: SectionType::Metadata, size: 1234 };
    assert_eq!(SectionHeader::parse(&header.to_bytes(), 0).unwrap(), header);
}
