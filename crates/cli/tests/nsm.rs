//! The NSM end to end on the real /dev/kvm: the `nsm` guest asks the device from inside, the demo
//! serves attestation on vsock port 5006, and every document is verified twice: by `carve
//! attestation verify` and, independently, by AWS's nsm-api and COSE crates with OpenSSL.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use aws_nitro_enclaves_cose::crypto::Openssl;
use aws_nitro_enclaves_cose::CoseSign1;
use aws_nitro_enclaves_nsm_api::api::{AttestationDoc, Response};
use common::*;

fn carve_in(state: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_carve"))
        .env("CARVE_STATE_DIR", state)
        .args(args)
        .output()
        .expect("carve runs")
}

/// The `NSM <name> <hex>` lines the guest printed, decoded.
fn responses(serial: &str) -> Vec<(String, Vec<u8>)> {
    serial
        .lines()
        .filter_map(|line| line.strip_prefix("NSM "))
        .map(|rest| {
            let (name, hex) = rest.split_once(' ').unwrap();
            (name.to_string(), hex::decode(hex.trim()).unwrap())
        })
        .collect()
}

fn response(all: &[(String, Vec<u8>)], name: &str) -> Response {
    let bytes = &all.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name} response")).1;
    serde_cbor::from_slice(bytes).unwrap()
}

/// Verifies with AWS's crates and OpenSSL alone; returns the payload.
fn verify_with_oracles(document: &[u8]) -> AttestationDoc {
    let cose = CoseSign1::from_bytes(document).unwrap();
    let doc = AttestationDoc::from_binary(&cose.get_payload::<Openssl>(None).unwrap()).unwrap();
    let leaf = openssl::x509::X509::from_der(&doc.certificate).unwrap();
    assert!(cose.verify_signature::<Openssl>(leaf.public_key().unwrap().as_ref()).unwrap());
    let root = openssl::x509::X509::from_der(&doc.cabundle[0]).unwrap();
    let intermediate = openssl::x509::X509::from_der(&doc.cabundle[1]).unwrap();
    assert!(intermediate.verify(root.public_key().unwrap().as_ref()).unwrap());
    assert!(leaf.verify(intermediate.public_key().unwrap().as_ref()).unwrap());
    doc
}

#[test]
fn the_nsm_guest_talks_to_the_device_and_its_document_verifies() {
    if !kvm_usable("the_nsm_guest_talks_to_the_device_and_its_document_verifies") {
        return;
    }
    let dir = fresh_dir("nsm-guest");
    let state = dir.join("state");
    let kernel = guest("nsm", Format::Pvh);
    // vsock first, so the guest must pick the NSM out of two virtio-mmio devices.
    let out = carve_in(
        &state,
        &[
            "vm",
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--vsock",
            &format!("cid=7,uds={}", dir.join("v.sock").display()),
            "--nsm",
            "--parent-id",
            "i-0123456789abcdef0",
            "--parent-role",
            "arn:aws:iam::123456789012:role/carve",
            "--cmdline",
            "nonce=0123abcd",
            "--serial",
            "stdout",
        ],
    );
    assert_guest_passed(&out);
    let all = responses(&stdout(&out));

    let Response::DescribeNSM { module_id, max_pcrs, locked_pcrs, version_major, .. } =
        response(&all, "DescribeNSM")
    else {
        panic!()
    };
    assert!(module_id.starts_with("i-0000000000000000-vm"), "{module_id}");
    assert_eq!((max_pcrs, version_major, locked_pcrs.len()), (32, 1, 16));
    let Response::DescribePCR { lock, data } = response(&all, "DescribePCR0") else { panic!() };
    assert!(lock);
    assert_eq!(data, vec![0; 48], "a VM without an EIF has zero image PCRs");
    let Response::DescribePCR { data: pcr4, .. } = response(&all, "DescribePCR4") else { panic!() };
    assert_eq!(pcr4, carve_eif::measure::extend_zero(b"i-0123456789abcdef0").to_vec());
    let Response::ExtendPCR { data } = response(&all, "ExtendPCR16") else { panic!() };
    assert_eq!(data, carve_eif::measure::extend_zero(b"carve").to_vec());
    let Response::Attestation { document } = response(&all, "Attestation") else { panic!() };

    let doc = verify_with_oracles(&document);
    assert_eq!(doc.module_id, module_id);
    assert_eq!(doc.nonce.as_deref().map(Vec::as_slice), Some(&b"0123abcd"[..]));
    assert_eq!(doc.user_data.as_deref().map(Vec::as_slice), Some(&b"carve-nsm-test"[..]));
    assert_eq!(
        doc.pcrs[&3].as_slice(),
        &carve_eif::measure::extend_zero(b"arn:aws:iam::123456789012:role/carve")
    );

    let root = carve_in(&state, &["attestation", "root"]);
    assert_eq!(root.status.code(), Some(0), "{}", stderr(&root));
    let root_der = openssl::x509::X509::from_pem(&root.stdout).unwrap().to_der().unwrap();
    assert_eq!(doc.cabundle[0].as_slice(), root_der.as_slice(), "the document chains to the printed root");

    let doc_path = dir.join("doc.cose");
    std::fs::write(&doc_path, &document).unwrap();
    let pcr4_arg = format!("4={}", hex::encode(&pcr4));
    let nonce_arg = hex::encode(b"0123abcd");
    let verified = carve_in(
        &state,
        &[
            "attestation",
            "verify",
            "--doc",
            doc_path.to_str().unwrap(),
            "--nonce",
            &nonce_arg,
            "--pcr",
            &pcr4_arg,
        ],
    );
    assert_eq!(verified.status.code(), Some(0), "{}{}", stdout(&verified), stderr(&verified));
    let verdict: serde_json::Value = serde_json::from_slice(&verified.stdout).unwrap();
    assert_eq!(verdict["Valid"], true);
    assert_eq!(verdict["Checks"]["Signature"], true);
    assert_eq!(verdict["ModuleID"], module_id.as_str());
}

#[test]
fn bad_documents_and_arguments_fail_verify_with_the_reason() {
    let dir = fresh_dir("nsm-verify");
    let state = dir.join("state");
    // A document from an NSM of this state directory's CA, made in-process.
    let ca = carve_nsm::pki::CertificateAuthority::open(&state).unwrap();
    let mut nsm = carve_nsm::Nsm::new("i-0000000000000000-enc9".into(), &Default::default(), ca).unwrap();
    let request = carve_nsm::protocol::Request::Attestation {
        user_data: None,
        nonce: Some(b"n".to_vec()),
        public_key: None,
    };
    let carve_nsm::protocol::Response::Attestation { document } = nsm.respond(request) else { panic!() };
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path.to_str().unwrap().to_string()
    };
    let good = write("good.cose", &document);
    let verify = |args: &[&str]| carve_in(&state, &[&["attestation", "verify"][..], args].concat());

    assert_eq!(verify(&["--doc", &good]).status.code(), Some(0));
    let truncated = write("truncated.cose", &document[..document.len() / 2]);
    let out = verify(&["--doc", &truncated]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not valid: the document is not a COSE_Sign1 structure"),
        "{}",
        stderr(&out)
    );
    let mut flipped = document.clone();
    let at = flipped.len() - 20;
    flipped[at] ^= 0xff;
    let out = verify(&["--doc", &write("flipped.cose", &flipped)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("the COSE signature does not verify"), "{}", stderr(&out));
    let out = verify(&["--doc", &good, "--nonce", "00"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("the nonce is not the expected one"), "{}", stderr(&out));

    // Another CA's root pinned.
    let other = dir.join("other");
    let other_root = carve_in(&other, &["attestation", "root"]);
    let out = verify(&["--doc", &good, "--root", &write("other.pem", &other_root.stdout)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("does not start with the pinned root"), "{}", stderr(&out));

    // Usage and file errors: one line each.
    let out = verify(&["--doc", &good, "--nonce", "xyz"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = verify(&["--doc", &good, "--pcr", "40=00"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = verify(&["--doc", &dir.join("missing").to_string_lossy()]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).starts_with("carve: error: cannot read attestation document"), "{}", stderr(&out));
    let out = verify(&["--doc", &good, "--root", &good]);
    assert_eq!(out.status.code(), Some(4));
    assert!(stderr(&out).contains("is not a PEM certificate"), "{}", stderr(&out));
}

#[test]
fn the_demo_serves_verified_attestations_on_port_5006() {
    if !kvm_usable("the_demo_serves_verified_attestations_on_port_5006") {
        return;
    }
    let dir = fresh_dir("nsm-demo");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let uds = dir.join("v.sock");
    let mut vm = start_vm(&state, &["--demo"], 11, &uds, &["--nsm", "--cmdline", "echo_sessions=2"]);
    let mut nonces = Vec::new();
    for (i, len) in [1usize, 512].into_iter().enumerate() {
        let nonce = bytes(len, i as u64 + 5);
        let document = demo_attestation(&mut vm, &uds, &nonce);
        let doc = verify_with_oracles(&document);
        assert_eq!(doc.nonce.as_deref(), Some(&nonce));
        assert_eq!(doc.user_data.as_deref().map(Vec::as_slice), Some(&b"carve-demo"[..]));
        let path = dir.join(format!("demo{i}.cose"));
        std::fs::write(&path, &document).unwrap();
        let out = carve_in(
            &state,
            &["attestation", "verify", "--doc", path.to_str().unwrap(), "--nonce", &hex::encode(&nonce)],
        );
        assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
        nonces.push(nonce);
    }
    let out = vm.wait();
    assert_eq!(out.status.code(), Some(0), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("attestation on port 5006"), "{}", stdout(&out));
    assert!(stdout(&out).contains("served 2 sessions"), "{}", stdout(&out));
}

/// Asks the demo on vsock port 5006 for a document with `nonce`; on failure, shows what the VM
/// said.
fn demo_attestation(vm: &mut Vm, uds: &Path, nonce: &[u8]) -> Vec<u8> {
    let exchange = || -> Result<Vec<u8>, String> {
        let (mut stream, _) = connect_guest(uds, 5006).ok_or("the demo refused port 5006")?;
        stream.write_all(&(nonce.len() as u32).to_be_bytes()).map_err(|e| e.to_string())?;
        stream.write_all(nonce).map_err(|e| e.to_string())?;
        let mut prefix = [0u8; 4];
        stream.read_exact(&mut prefix).map_err(|e| format!("reading the length: {e}"))?;
        let mut document = vec![0u8; u32::from_be_bytes(prefix) as usize];
        stream.read_exact(&mut document).map_err(|e| format!("reading the document: {e}"))?;
        Ok(document)
    };
    exchange().unwrap_or_else(|problem| {
        let mut child = vm.0.take().unwrap();
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!("{problem}\n--- serial ---\n{}\n--- stderr ---\n{}", stdout(&out), stderr(&out))
    })
}

/// `carve vm run` with `image` and a vsock device (guest `cid`) at `uds`, its CA in `state`;
/// debug logging, so a failure shows what the devices did.
fn start_vm(state: &Path, image: &[&str], cid: u32, uds: &Path, extra: &[&str]) -> Vm {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_carve"))
        .env("CARVE_STATE_DIR", state)
        .args(["vm", "run", "--log-level", "debug"])
        .args(image)
        .arg("--vsock")
        .arg(format!("cid={cid},uds={}", uds.display()))
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    Vm(Some(child))
}

/// `carve vm run --eif` on the demo enclave, serving one attestation; `run` names its socket.
fn run_demo_eif(dir: &Path, state: &Path, run: u32, extra: &[&str]) -> (Vec<u8>, Output) {
    let eif = dir.join("demo.eif");
    let uds = dir.join(format!("v{run}.sock"));
    let image = ["--eif", eif.to_str().unwrap(), "--cmdline", "echo_sessions=1"];
    let mut vm = start_vm(state, &image, 20 + run, &uds, extra);
    let document = demo_attestation(&mut vm, &uds, b"eif-nonce");
    (document, vm.wait())
}

#[test]
fn an_enclave_image_boots_from_its_copy_and_its_pcrs_reach_the_document() {
    if !kvm_usable("an_enclave_image_boots_from_its_copy_and_its_pcrs_reach_the_document") {
        return;
    }
    let dir = fresh_dir("nsm-eif");
    let state = dir.join("state");
    let eif = dir.join("demo.eif");
    let built = carve_in(&state, &["build-enclave", "--demo", "--output-file", eif.to_str().unwrap()]);
    assert_eq!(built.status.code(), Some(0), "{}", stderr(&built));
    let measurements: serde_json::Value = serde_json::from_slice(&built.stdout).unwrap();
    let pcr = |n: &str| measurements["Measurements"][n].as_str().unwrap().to_string();

    // Not in debug mode: no console, the image's PCRs in the document.
    let (document, out) = run_demo_eif(&dir, &state, 1, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).is_empty(), "a non-debug enclave's console is not shown: {}", stdout(&out));
    let doc = verify_with_oracles(&document);
    for (index, name) in [(0usize, "PCR0"), (1, "PCR1"), (2, "PCR2")] {
        assert_eq!(hex::encode(&doc.pcrs[&index]), pcr(name), "{name}");
    }
    assert_eq!(doc.pcrs[&8].as_slice(), &[0u8; 48], "an unsigned image has PCR8 zero");
    let path = dir.join("eif.cose");
    std::fs::write(&path, &document).unwrap();
    let pcr0 = format!("0={}", pcr("PCR0"));
    let pcr2 = format!("2={}", pcr("PCR2"));
    let verified = carve_in(
        &state,
        &["attestation", "verify", "--doc", path.to_str().unwrap(), "--pcr", &pcr0, "--pcr", &pcr2],
    );
    assert_eq!(verified.status.code(), Some(0), "{}{}", stdout(&verified), stderr(&verified));

    // Debug mode: the console shows, and the image PCRs read as zero.
    let (document, out) = run_demo_eif(&dir, &state, 2, &["--debug-mode"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("command line:  console=ttyS0 echo_sessions=1"), "{}", stdout(&out));
    assert!(stdout(&out).contains("module:        124 bytes"), "the ramdisk is the initrd: {}", stdout(&out));
    let doc = verify_with_oracles(&document);
    for index in [0usize, 1, 2] {
        assert_eq!(doc.pcrs[&index].as_slice(), &[0u8; 48], "PCR{index} in debug mode");
    }
}

#[test]
fn enclave_images_that_cannot_boot_are_refused_with_one_line() {
    let dir = fresh_dir("nsm-eif-bad");
    let state = dir.join("state");
    let eif = dir.join("demo.eif");
    assert!(carve_in(&state, &["build-enclave", "--demo", "--output-file", eif.to_str().unwrap()])
        .status
        .success());
    let run = |path: &Path, extra: &[&str]| {
        carve_in(&state, &[&["vm", "run", "--eif", path.to_str().unwrap()][..], extra].concat())
    };

    let out = run(&eif, &["--serial", "stdout"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("add --debug-mode"), "{}", stderr(&out));
    let out = run(&eif, &["--initrd", eif.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "--initrd conflicts with --eif");
    let out = carve_in(&state, &["vm", "run", "--demo", "--debug-mode"]);
    assert_eq!(out.status.code(), Some(2), "--debug-mode without --eif: {}", stderr(&out));
    assert!(stderr(&out).contains("use it with --eif"), "{}", stderr(&out));
    let out = carve_in(&state, &["vm", "run", "--demo", "--parent-id", "i-1"]);
    assert_eq!(out.status.code(), Some(2), "--parent-id without an NSM: {}", stderr(&out));

    if !kvm_usable("enclave_images_that_cannot_boot_are_refused_with_one_line") {
        return;
    }
    let out = run(&dir.join("missing.eif"), &[]);
    assert_eq!(out.status.code(), Some(4));
    assert!(stderr(&out).contains("the enclave image is not bootable: cannot read"), "{}", stderr(&out));
    let mut bytes = std::fs::read(&eif).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let corrupt = dir.join("corrupt.eif");
    std::fs::write(&corrupt, &bytes).unwrap();
    let out = run(&corrupt, &[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("the enclave image is not bootable"), "{}", stderr(&out));

    // 12 MiB of guest memory leaves 4 MiB above the copy's 8 MiB start: too little for a 6 MiB image.
    let big_ramdisk = dir.join("big.cpio");
    std::fs::write(&big_ramdisk, vec![0u8; 6 << 20]).unwrap();
    let big = dir.join("big.eif");
    let kernel = dir.join("demo.bzimage");
    std::fs::write(&kernel, carve_guest_images::DEMO_BZIMAGE).unwrap();
    let built = carve_in(
        &state,
        &[
            "build-enclave",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "x",
            "--ramdisk",
            big_ramdisk.to_str().unwrap(),
            "--output-file",
            big.to_str().unwrap(),
        ],
    );
    assert!(built.status.success(), "{}", stderr(&built));
    let out = run(&big, &["--memory", "12"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("do not fit in guest memory above 8 MiB"), "{}", stderr(&out));
}

/// A snapshot of an enclave image's VM, restored: a new vsock connection works (the old ones
/// were reset) and the NSM still holds the image's PCRs, so documents from before and after
/// carry the same measurements and module.
#[test]
fn vsock_and_the_nsm_serve_again_after_a_restore() {
    if !kvm_usable("vsock_and_the_nsm_serve_again_after_a_restore") {
        return;
    }
    let dir = fresh_dir("nsm-restore");
    let state = dir.join("state");
    let eif = dir.join("demo.eif");
    let built = carve_in(&state, &["build-enclave", "--demo", "--output-file", eif.to_str().unwrap()]);
    assert!(built.status.success(), "{}", stderr(&built));
    let (uds, control, snapshot) = (dir.join("v.sock"), dir.join("control"), dir.join("snapshot"));
    let image = ["--eif", eif.to_str().unwrap(), "--cmdline", "echo_sessions=2"];
    let mut vm = start_vm(&state, &image, 31, &uds, &["--control", control.to_str().unwrap()]);
    let before = verify_with_oracles(&demo_attestation(&mut vm, &uds, b"before"));
    let out = carve_in(
        &state,
        &["vm", "snapshot", "--control", control.to_str().unwrap(), "--to", snapshot.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // The original ends cleanly (its sockets go), and its copy takes its place.
    let _ = Command::new("kill").args(["-TERM", &vm.pid().to_string()]).status();
    assert_eq!(vm.wait().status.code(), Some(143));
    let restored = Command::new(env!("CARGO_BIN_EXE_carve"))
        .env("CARVE_STATE_DIR", &state)
        .args(["vm", "restore", "--serial", "none", "--from", snapshot.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut restored = Vm(Some(restored));
    let after = verify_with_oracles(&demo_attestation(&mut restored, &uds, b"after"));
    assert_eq!(after.nonce.as_deref().map(Vec::as_slice), Some(&b"after"[..]));
    assert_eq!(after.module_id, before.module_id);
    assert_eq!(after.pcrs, before.pcrs, "the PCRs survive a restore");
    assert!(after.pcrs[&0].iter().any(|&b| b != 0), "an enclave image's PCR0 is measured");
    // The demo served its second session and powered off.
    let out = restored.wait();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
