//! nitro-cli's image commands through the `carve` binary: JSON shapes, stderr lines, E-codes,
//! and container archives turned into ramdisks.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}{}", stdout(out), stderr(out)))
}

fn dir(name: &str) -> PathBuf {
    let dir = temp_path(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Asserts nitro-cli's error shape: `[ Exx ] …` first, status = xx.
fn assert_nitro_error(out: &Output, code: u8, expected: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(i32::from(code)), "{err}");
    // build-enclave announces itself first, as nitro-cli does.
    let first = err.lines().find(|l| l.starts_with("[ E")).unwrap_or_default();
    assert!(first.starts_with(&format!("[ E{code:02} ] ")), "{err}");
    assert!(first.contains(expected), "expected '{expected}' in: {err}");
    assert!(err.contains(&format!("cli-errors.html#E{code:02}")), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn build_kernel_image(dir: &Path, output: &Path, extra: &[&str]) -> Output {
    let kernel = dir.join("bzImage");
    let ramdisk = dir.join("ramdisk");
    std::fs::write(&kernel, bytes(40_000, 1)).unwrap();
    std::fs::write(&ramdisk, bytes(9_000, 2)).unwrap();
    let mut args = vec![
        "build-enclave",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 quiet",
        "--ramdisk",
        ramdisk.to_str().unwrap(),
        "--ramdisk",
        ramdisk.to_str().unwrap(),
        "--output-file",
        output.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    carve(&args)
}

#[test]
fn build_describe_sign_and_pcr_agree() {
    let dir = dir("eif-commands");
    let eif = dir.join("hello.eif");
    let meta = dir.join("meta.json");
    std::fs::write(&meta, r#"{"owner": "blue team", "build": 7}"#).unwrap();
    let out = build_kernel_image(
        &dir,
        &eif,
        &["--name", "hello", "--version", "2.0", "--metadata", meta.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "Start building the Enclave Image...\nEnclave Image successfully created.\n");
    let built = json(&out);
    assert!(stdout(&out)
        .starts_with("{\n  \"Measurements\": {\n    \"HashAlgorithm\": \"Sha512_48 { .. }\",\n    \"PCR0\""));

    let out = carve(&["describe-eif", "--eif-path", eif.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let described = json(&out);
    let text = stdout(&out);
    let keys: Vec<&str> =
        text.lines().filter(|l| l.starts_with("  \"")).map(|l| l.trim().split('"').nth(1).unwrap()).collect();
    assert_eq!(
        keys,
        ["EifVersion", "Measurements", "IsSigned", "CheckCRC", "ImageName", "ImageVersion", "Metadata"]
    );
    assert_eq!(described["Measurements"], built["Measurements"]);
    assert_eq!((described["EifVersion"].as_u64(), described["IsSigned"].as_bool()), (Some(4), Some(false)));
    assert_eq!(
        (described["ImageName"].as_str(), described["ImageVersion"].as_str()),
        (Some("hello"), Some("2.0"))
    );
    assert_eq!(described["Metadata"]["owner"], "blue team");
    assert_eq!(described["Metadata"]["BuildTool"], "carve");

    // PCR2 is the measurement of the second ramdisk alone, which `carve pcr` computes too.
    let out = carve(&["pcr", "--input", dir.join("ramdisk").to_str().unwrap()]);
    assert_eq!(json(&out)["PCR"], described["Measurements"]["PCR2"]);

    let (key, cert) = signer(&dir, "signer");
    let out = carve(&[
        "sign-eif",
        "--eif-path",
        eif.to_str().unwrap(),
        "--signing-certificate",
        &cert,
        "--private-key",
        &key,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "Enclave Image successfully signed.\n");
    let signed = json(&out);
    let pcr8 = json(&carve(&["pcr", "--signing-certificate", &cert]));
    assert_eq!(signed["Measurements"]["PCR8"], pcr8["PCR8"]);
    assert_eq!(signed["Measurements"]["PCR0"], built["Measurements"]["PCR0"]);

    let described = json(&carve(&["describe-eif", "--eif-path", eif.to_str().unwrap()]));
    assert_eq!(
        (described["IsSigned"].as_bool(), described["SignatureCheck"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(described["CheckCRC"], true);
    assert_eq!(described["SigningCertificate"]["IssuerName"]["commonName"], "tests");
    assert_eq!(described["SigningCertificate"]["Algorithm"], "ecdsa-with-SHA256");

    // Signing again replaces the signature rather than adding one.
    let (key2, cert2) = signer(&dir, "second");
    let out = carve(&[
        "sign-eif",
        "--eif-path",
        eif.to_str().unwrap(),
        "--signing-certificate",
        &cert2,
        "--private-key",
        &key2,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let described = json(&carve(&["describe-eif", "--eif-path", eif.to_str().unwrap()]));
    assert_eq!(
        described["Measurements"]["PCR8"],
        json(&carve(&["pcr", "--signing-certificate", &cert2]))["PCR8"]
    );
    assert_eq!(described["SignatureCheck"], true);

    // A flipped byte: still described, CheckCRC false and the signature no longer matches.
    let mut image = std::fs::read(&eif).unwrap();
    image[600] ^= 0xff;
    std::fs::write(&eif, image).unwrap();
    let described = json(&carve(&["describe-eif", "--eif-path", eif.to_str().unwrap()]));
    assert_eq!(
        (described["CheckCRC"].as_bool(), described["SignatureCheck"].as_bool()),
        (Some(false), Some(false))
    );
}

#[test]
fn signed_builds_check_the_key_against_the_certificate() {
    let dir = dir("eif-signed-build");
    let (key, cert) = signer(&dir, "a");
    let (other_key, _) = signer(&dir, "b");
    let eif = dir.join("signed.eif");
    let out = build_kernel_image(&dir, &eif, &["--signing-certificate", &cert, "--private-key", &key]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(json(&out)["Measurements"]["PCR8"].is_string());
    let described = json(&carve(&["describe-eif", "--eif-path", eif.to_str().unwrap()]));
    assert_eq!(described["SignatureCheck"], true);

    let mismatched = dir.join("mismatched.eif");
    let out =
        build_kernel_image(&dir, &mismatched, &["--signing-certificate", &cert, "--private-key", &other_key]);
    assert_nitro_error(&out, 48, "the private key does not match the signing certificate's public key");
    assert!(!mismatched.exists(), "a failed build leaves no file");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".carve-"))
        .collect();
    assert!(leftovers.is_empty());

    let out = carve(&[
        "sign-eif",
        "--eif-path",
        eif.to_str().unwrap(),
        "--signing-certificate",
        &cert,
        "--private-key",
        &cert,
    ]);
    assert_nitro_error(&out, 60, "the private key is not a PEM EC key");
    let out = carve(&[
        "sign-eif",
        "--eif-path",
        eif.to_str().unwrap(),
        "--signing-certificate",
        &key,
        "--private-key",
        &key,
    ]);
    assert_nitro_error(&out, 60, "the signing certificate is not a PEM X.509 certificate");

    // nitro-cli's codes for what is missing: the image E01, the signer E60, half of it usage.
    let eif_arg = eif.to_str().unwrap();
    assert_nitro_error(&carve(&["sign-eif"]), 1, "`eif-path` argument not found");
    assert_nitro_error(
        &carve(&["sign-eif", "--eif-path", eif_arg]),
        60,
        "give --signing-certificate and --private-key",
    );
    assert_eq!(carve(&["sign-eif", "--eif-path", eif_arg, "--private-key", &key]).status.code(), Some(2));
    // A KMS key is recognised as one, not looked for as a file.
    let arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    let out =
        carve(&["sign-eif", "--eif-path", eif_arg, "--signing-certificate", &cert, "--private-key", arn]);
    assert_nitro_error(
        &out,
        60,
        "is a KMS key ARN; carve signs with a PEM key file, KMS signing is not supported",
    );
    let out = carve(&["pcr", "--signing-certificate", &key]);
    assert_nitro_error(&out, 57, "the signing certificate is not a PEM X.509 certificate");
}

#[test]
fn bad_images_and_paths_get_nitro_cli_codes() {
    let dir = dir("eif-bad");
    let eif = dir.join("good.eif");
    assert_eq!(build_kernel_image(&dir, &eif, &[]).status.code(), Some(0));
    let image = std::fs::read(&eif).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let describe = |path: &Path| carve(&["describe-eif", "--eif-path", path.to_str().unwrap()]);
    assert_nitro_error(
        &describe(&write("truncated.eif", &image[..image.len() / 2])),
        35,
        "past the end of the file",
    );
    assert_nitro_error(&describe(&write("text.eif", b"hello")), 35, "the image is truncated");
    assert_nitro_error(&describe(&write("empty.eif", b"")), 35, "the image is truncated");
    let mut magic = image.clone();
    magic[0] = b'X';
    assert_nitro_error(&describe(&write("magic.eif", &magic)), 35, "not an EIF");
    assert_nitro_error(&describe(Path::new("/nonexistent/x.eif")), 19, "cannot read '/nonexistent/x.eif'");
    assert_nitro_error(&describe(&dir), 19, "cannot read");
    assert_nitro_error(
        &carve(&["pcr", "--input", "/nonexistent/file"]),
        19,
        "cannot open '/nonexistent/file'",
    );

    let out = carve(&[
        "build-enclave",
        "--kernel",
        "/nonexistent/bzImage",
        "--cmdline",
        "x",
        "--ramdisk",
        "/etc/hostname",
        "--output-file",
        dir.join("o.eif").to_str().unwrap(),
    ]);
    assert_nitro_error(&out, 19, "cannot open '/nonexistent/bzImage'");
    let big = write("big.json", &vec![b' '; 5000]);
    let out = build_kernel_image(&dir, &dir.join("o.eif"), &["--metadata", big.to_str().unwrap()]);
    assert_nitro_error(&out, 48, "it is larger than 4096 bytes");
    let bad = write("bad.json", b"{ nope");
    let out = build_kernel_image(&dir, &dir.join("o.eif"), &["--metadata", bad.to_str().unwrap()]);
    assert_nitro_error(&out, 48, "is not JSON");
    let out = build_kernel_image(&dir, Path::new("/nonexistent/dir/o.eif"), &[]);
    assert_nitro_error(&out, 19, "cannot create '/nonexistent/dir/o.eif'");

    let out = carve(&["build-enclave", "--output-file", dir.join("o.eif").to_str().unwrap()]);
    assert_nitro_error(&out, 1, "nothing to build from");

    let out = carve(&["explain", "--error-code", "E35"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stderr(&out).starts_with("[ E35 ] EifParsingError: "), "{}", stderr(&out));
    // Unknown codes are said so, and the command still succeeds, as nitro-cli's does.
    let out = carve(&["explain", "--error-code", "E99"]);
    assert_eq!(stderr(&out), "No such error code E99\n");
    assert_eq!(out.status.code(), Some(0));
}

/// A `docker save`-style archive: manifest.json, a config and two layers (the second gzipped,
/// with a whiteout and an opaque directory).
fn docker_archive(path: &Path) {
    use common::tar_add as add;
    use tar::{Builder, EntryType};
    let mut lower = Builder::new(Vec::new());
    add(&mut lower, "bin/", EntryType::Directory, 0o755, b"", None);
    add(&mut lower, "bin/hello", EntryType::Regular, 0o755, b"#!/bin/sh\necho hello\n", None);
    add(&mut lower, "bin/sh", EntryType::Symlink, 0o777, b"", Some("busybox"));
    add(&mut lower, "etc/", EntryType::Directory, 0o755, b"", None);
    add(&mut lower, "etc/removed", EntryType::Regular, 0o644, b"gone", None);
    add(&mut lower, "var/cache/", EntryType::Directory, 0o755, b"", None);
    add(&mut lower, "var/cache/old", EntryType::Regular, 0o644, b"old", None);
    // Links a later layer writes through: they are followed inside the image's root.
    add(&mut lower, "escape", EntryType::Symlink, 0o777, b"", Some("/"));
    add(&mut lower, "lib", EntryType::Symlink, 0o777, b"", Some("usr/lib"));
    add(&mut lower, "etc/localtime", EntryType::Symlink, 0o777, b"", Some("/usr/share/zoneinfo/UTC"));
    // A file under a directory no entry made, then a link in that directory's place.
    add(&mut lower, "implied/init", EntryType::Regular, 0o755, b"not the enclave's init either", None);
    add(&mut lower, "implied", EntryType::Symlink, 0o777, b"", Some("/"));
    let lower = lower.into_inner().unwrap();
    let mut upper = Builder::new(Vec::new());
    add(&mut upper, "etc/.wh.removed", EntryType::Regular, 0o644, b"", None);
    add(&mut upper, "var/cache/.wh..wh..opq", EntryType::Regular, 0o644, b"", None);
    add(&mut upper, "var/cache/new", EntryType::Regular, 0o644, b"new", None);
    add(&mut upper, "etc/motd", EntryType::Regular, 0o644, b"welcome\n", None);
    add(&mut upper, "escape/init", EntryType::Regular, 0o755, b"not the enclave's init", None);
    add(&mut upper, "lib/libapp.so", EntryType::Regular, 0o644, b"ELF", None);
    let upper = upper.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &upper).unwrap();
    let upper = gz.finish().unwrap();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/hello"], "Cmd": ["--loud", "world"], "Env": ["PATH=/bin", "MODE=enclave"]},
        "created": "2026-11-30T12:00:00Z",
        "rootfs": {"type": "layers"}
    });
    let manifest = serde_json::json!([{
        "Config": "blobs/sha256/c0ffee.json", "RepoTags": ["hello-enclave:v1"],
        "Layers": ["blobs/sha256/lower", "blobs/sha256/upper"]
    }]);
    let mut archive = Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        ("blobs/sha256/c0ffee.json", serde_json::to_vec(&config).unwrap()),
        ("blobs/sha256/lower", lower),
        ("blobs/sha256/upper", upper),
    ] {
        add(&mut archive, name, EntryType::Regular, 0o644, &data, None);
    }
    std::fs::write(path, archive.into_inner().unwrap()).unwrap();
}

/// An OCI image-layout tarball: index.json → image index → manifest → config and one layer.
fn oci_layout_archive(path: &Path) {
    use tar::{Builder, EntryType, Header};
    fn sha(bytes: &[u8]) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        format!("{:016x}", h.finish())
    }
    let mut layer = Builder::new(Vec::new());
    let mut header = Header::new_gnu();
    header.set_entry_type(EntryType::Regular);
    header.set_mode(0o755);
    header.set_size(6);
    layer.append_data(&mut header, "app/run", &b"run me"[..]).unwrap();
    let layer = layer.into_inner().unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {"Entrypoint": ["/app/run"], "Env": ["A=1"]}
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha(&config))},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{}", sha(&layer))}]
    }))
    .unwrap();
    let image_index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [
            {"digest": "sha256:arm", "platform": {"architecture": "arm64", "os": "linux"}},
            {"digest": format!("sha256:{}", sha(&manifest)), "platform": {"architecture": "amd64", "os": "linux"}}
        ]
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"digest": format!("sha256:{}", sha(&image_index)),
                       "annotations": {"org.opencontainers.image.ref.name": "oci-app:2"}}]
    }))
    .unwrap();
    let mut archive = Builder::new(Vec::new());
    for (name, data) in [
        ("oci-layout".to_string(), br#"{"imageLayoutVersion": "1.0.0"}"#.to_vec()),
        ("index.json".to_string(), index),
        (format!("blobs/sha256/{}", sha(&image_index)), image_index.clone()),
        (format!("blobs/sha256/{}", sha(&manifest)), manifest.clone()),
        (format!("blobs/sha256/{}", sha(&config)), config.clone()),
        (format!("blobs/sha256/{}", sha(&layer)), layer.clone()),
    ] {
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        archive.append_data(&mut header, name, data.as_slice()).unwrap();
    }
    std::fs::write(path, archive.into_inner().unwrap()).unwrap();
}

/// `build-enclave` from a container archive (or none) and a blobs directory.
fn build_from_archive(archive: Option<&Path>, uri: Option<&str>, blobs: &Path, output: &Path) -> Output {
    let mut args = vec![
        "build-enclave",
        "--blobs-dir",
        blobs.to_str().unwrap(),
        "--output-file",
        output.to_str().unwrap(),
    ];
    if let Some(archive) = archive {
        args.extend(["--oci-archive", archive.to_str().unwrap()]);
    }
    if let Some(uri) = uri {
        args.extend(["--docker-uri", uri]);
    }
    carve(&args)
}

/// Section `index`'s bytes in the EIF at `path`.
fn section(path: &Path, index: usize) -> Vec<u8> {
    let summary = carve_eif::read_file(path).unwrap();
    let image = std::fs::read(path).unwrap();
    let section = summary.sections[index];
    image[section.data_offset() as usize..(section.data_offset() + section.size) as usize].to_vec()
}

/// A cpio archive's names, listed by GNU cpio (the oracle).
fn list_cpio(bytes: &[u8]) -> String {
    let mut cpio = Command::new("cpio")
        .args(["-t", "--quiet"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("cpio is installed");
    std::io::Write::write_all(&mut cpio.stdin.take().unwrap(), bytes).unwrap();
    let list = cpio.wait_with_output().unwrap();
    assert!(list.status.success());
    String::from_utf8_lossy(&list.stdout).into_owned()
}

/// Lists and extracts a cpio archive with GNU cpio (the oracle).
fn extract_cpio(bytes: &[u8], into: &Path) -> String {
    std::fs::create_dir_all(into).unwrap();
    let archive = into.with_extension("cpio");
    std::fs::write(&archive, bytes).unwrap();
    let status = Command::new("cpio")
        .args(["-i", "-d", "--quiet", "-F", archive.to_str().unwrap()])
        .current_dir(into)
        .status()
        .unwrap();
    assert!(status.success());
    list_cpio(bytes)
}

#[test]
fn an_image_with_nothing_to_run_is_e48_and_leaves_no_file() {
    use common::tar_add as add;
    use tar::{Builder, EntryType};
    let dir = dir("eif-no-command");
    let mut layer = Builder::new(Vec::new());
    add(&mut layer, "etc/", EntryType::Directory, 0o755, b"", None);
    let layer = layer.into_inner().unwrap();
    let config =
        serde_json::json!({"architecture": "amd64", "os": "linux", "config": {"Env": ["A=1"], "Cmd": null}});
    let manifest = serde_json::json!([{"Config": "c.json", "RepoTags": ["idle:1"], "Layers": ["l.tar"]}]);
    let mut archive = Builder::new(Vec::new());
    add(
        &mut archive,
        "manifest.json",
        EntryType::Regular,
        0o644,
        &serde_json::to_vec(&manifest).unwrap(),
        None,
    );
    add(&mut archive, "c.json", EntryType::Regular, 0o644, &serde_json::to_vec(&config).unwrap(), None);
    add(&mut archive, "l.tar", EntryType::Regular, 0o644, &layer, None);
    let path = dir.join("idle.tar");
    std::fs::write(&path, archive.into_inner().unwrap()).unwrap();
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    for (name, data) in [("bzImage", &b"kernel"[..]), ("cmdline", b"console=ttyS0"), ("init", b"init")] {
        std::fs::write(blobs.join(name), data).unwrap();
    }
    let eif = dir.join("idle.eif");
    let out = build_from_archive(Some(&path), Some("idle:1"), &blobs, &eif);
    assert_nitro_error(&out, 48, "the image idle has neither a Cmd nor an Entrypoint to run");
    assert!(!eif.exists(), "no output file left");
}

#[test]
fn the_same_image_and_blobs_build_byte_identical_images() {
    let dir = dir("eif-reproducible");
    let archive = dir.join("image.tar");
    docker_archive(&archive);
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join("bzImage"), bytes(30_000, 3)).unwrap();
    std::fs::write(blobs.join("cmdline"), "console=ttyS0\n").unwrap();
    std::fs::write(blobs.join("init"), b"\x7fELF init").unwrap();
    // Two builds from different working and temporary directories, at different times.
    let build = |name: &str, env: &[(&str, &str)]| {
        let work = dir.join(name);
        std::fs::create_dir_all(work.join("tmp")).unwrap();
        let eif = work.join("image.eif");
        let out = Command::new(env!("CARGO_BIN_EXE_carve"))
            .args([
                "build-enclave",
                "--oci-archive",
                archive.to_str().unwrap(),
                "--docker-uri",
                "hello-enclave:v1",
            ])
            .args(["--blobs-dir", blobs.to_str().unwrap(), "--output-file", eif.to_str().unwrap()])
            .env("TMPDIR", work.join("tmp"))
            .env_remove("SOURCE_DATE_EPOCH")
            .envs(env.iter().copied())
            .current_dir(&work)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        (std::fs::read(&eif).unwrap(), json(&out)["Measurements"].clone())
    };
    let (first, first_pcrs) = build("one", &[]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (second, second_pcrs) = build("two", &[]);
    assert_eq!(first_pcrs, second_pcrs);
    assert!(first == second, "the two images differ");
    let described =
        json(&carve(&["describe-eif", "--eif-path", dir.join("one/image.eif").to_str().unwrap()]));
    assert_eq!(described["Metadata"]["BuildTime"], "2026-11-30T12:00:00Z", "the image's own time");
    // SOURCE_DATE_EPOCH, the reproducible-builds convention, names the time instead.
    let (pinned, pinned_pcrs) = build("three", &[("SOURCE_DATE_EPOCH", "1700000000")]);
    assert_eq!(pinned_pcrs, first_pcrs, "the build time is not measured");
    assert!(pinned != first);
    let described =
        json(&carve(&["describe-eif", "--eif-path", dir.join("three/image.eif").to_str().unwrap()]));
    assert_eq!(described["Metadata"]["BuildTime"], "2023-11-14T22:13:20.000000000+00:00");
}

#[test]
fn container_archives_become_nitro_cli_ramdisks() {
    let dir = dir("eif-oci");
    let archive = dir.join("image.tar");
    docker_archive(&archive);
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join("bzImage"), bytes(30_000, 9)).unwrap();
    std::fs::write(
        blobs.join("bzImage.config"),
        "#\n# Automatically generated file; DO NOT EDIT.\n# Linux/x86_64 6.1.0 Kernel Configuration\n",
    )
    .unwrap();
    std::fs::write(blobs.join("cmdline"), "reboot=k panic=30 pci=off nomodules console=ttyS0\n").unwrap();
    std::fs::write(blobs.join("init"), b"\x7fELF init").unwrap();
    std::fs::write(blobs.join("nsm.ko"), b"\x7fELF nsm").unwrap();
    let eif = dir.join("oci.eif");
    let out = build_from_archive(Some(&archive), Some("hello-enclave:v1"), &blobs, &eif);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    assert_eq!(section(&eif, 1), b"reboot=k panic=30 pci=off nomodules console=ttyS0");
    let bootstrap = extract_cpio(&section(&eif, 3), &dir.join("bootstrap"));
    assert_eq!(bootstrap.lines().collect::<Vec<_>>(), ["dev", "init", "nsm.ko"]);
    let customer = list_cpio(&section(&eif, 4));
    // (checked before GNU cpio unpacks it here, as the kernel would, following links)
    assert!(!customer.contains("escape/") && !customer.contains("rootfs/lib/"), "{customer}");
    assert!(!customer.contains("implied/"), "nothing stays under a link: {customer}");
    extract_cpio(&section(&eif, 4), &dir.join("customer"));
    let root = dir.join("customer");
    assert_eq!(std::fs::read(root.join("rootfs/init")).unwrap(), b"not the enclave's init");
    assert_eq!(std::fs::read(root.join("rootfs/usr/lib/libapp.so")).unwrap(), b"ELF");
    assert_eq!(std::fs::read_link(root.join("rootfs/escape")).unwrap(), Path::new("/"));
    // An absolute link is kept as it is: the app resolves it in its chroot.
    assert_eq!(
        std::fs::read_link(root.join("rootfs/etc/localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/UTC")
    );
    // As nitro-cli runs it: the image's Cmd, its Entrypoint ignored.
    assert_eq!(std::fs::read_to_string(root.join("cmd")).unwrap(), "--loud\nworld\n");
    assert_eq!(std::fs::read_to_string(root.join("env")).unwrap(), "PATH=/bin\nMODE=enclave\n");
    assert_eq!(std::fs::read(root.join("rootfs/bin/hello")).unwrap(), b"#!/bin/sh\necho hello\n");
    assert_eq!(std::fs::read_link(root.join("rootfs/bin/sh")).unwrap(), Path::new("busybox"));
    assert_eq!(std::fs::read(root.join("rootfs/etc/motd")).unwrap(), b"welcome\n");
    assert!(!customer.contains("etc/removed"), "whiteout: {customer}");
    assert!(!customer.contains("var/cache/old") && customer.contains("var/cache/new"), "opaque: {customer}");
    assert!(!customer.contains(".wh."), "{customer}");

    let described = json(&carve(&["describe-eif", "--eif-path", eif.to_str().unwrap()]));
    assert_eq!(described["ImageName"], "hello-enclave");
    assert_eq!(described["ImageVersion"], "c0ffee");
    assert_eq!(
        (described["Metadata"]["OperatingSystem"].as_str(), described["Metadata"]["KernelVersion"].as_str()),
        (Some("Linux"), Some("6.1.0"))
    );
    assert_eq!(described["Metadata"]["DockerInfo"]["RepoTags"][0], "hello-enclave:v1");

    // The same inputs build the same measurements.
    let again = dir.join("again.eif");
    let out = build_from_archive(Some(&archive), None, &blobs, &again);
    assert_eq!(json(&out)["Measurements"], described["Measurements"]);

    // An OCI image-layout tarball works the same way.
    let layout = dir.join("layout.tar");
    oci_layout_archive(&layout);
    let from_layout = dir.join("layout.eif");
    let out = build_from_archive(Some(&layout), Some("oci-app:2"), &blobs, &from_layout);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    extract_cpio(&section(&from_layout, 4), &dir.join("layout-customer"));
    let root = dir.join("layout-customer");
    assert_eq!(std::fs::read(root.join("rootfs/app/run")).unwrap(), b"run me");
    // (the layer has no entry for app/: the ramdisk makes it, ahead of its file)
    let listed = list_cpio(&section(&from_layout, 4));
    assert!(listed.contains("rootfs/app\nrootfs/app/run\n"), "{listed}");
    assert_eq!(std::fs::read_to_string(root.join("cmd")).unwrap(), "/app/run\n");
    assert_eq!(std::fs::read_to_string(root.join("env")).unwrap(), "A=1\n");
    let described = json(&carve(&["describe-eif", "--eif-path", from_layout.to_str().unwrap()]));
    assert_eq!(described["ImageName"], "oci-app");
    // An image without its own creation time is dated the epoch, not the day it was built.
    assert_eq!(described["Metadata"]["BuildTime"], "1970-01-01T00:00:00.000000000+00:00");

    let out = build_from_archive(Some(&archive), Some("missing:tag"), &blobs, &eif);
    assert_nitro_error(&out, 50, "no image tagged missing:tag");
    // Without an archive the image is pulled, from Docker Hub for a bare name (unreachable here).
    let out = build_from_archive(None, Some("hello-enclave:v1"), &blobs, &eif);
    assert_nitro_error(&out, 50, "cannot pull hello-enclave:v1");
    assert!(stderr(&out).contains("index.docker.io"), "{}", stderr(&out));
    let out = build_from_archive(Some(&archive), None, Path::new("/nonexistent"), &eif);
    assert_nitro_error(&out, 52, "no enclave blobs (bzImage, cmdline, init) in '/nonexistent'");
}

/// Peak RSS (KiB) of one run of carve with `args`, from the child's own rusage.
fn peak_rss_kib(args: &[&str]) -> i64 {
    // GNU time starts carve from its own small process: a child started straight from this
    // (large, multi-threaded) test process would be charged the test's peak RSS as its own.
    let report = std::env::temp_dir().join(format!("carve-rss-{}-{}", std::process::id(), args[0]));
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%M", "-o", report.to_str().unwrap(), env!("CARGO_BIN_EXE_carve")])
        .args(args)
        .stdout(std::process::Stdio::null())
        .output()
        .expect("GNU time (Debian package time) runs");
    assert!(out.status.success(), "carve {args:?} failed: {}", stderr(&out));
    let kib = std::fs::read_to_string(&report).unwrap().trim().parse().unwrap();
    let _ = std::fs::remove_file(&report);
    kib
}

#[test]
fn big_images_are_streamed_in_constant_memory() {
    let dir = dir("eif-big");
    let kernel = dir.join("bzImage");
    std::fs::write(&kernel, bytes(4096, 4)).unwrap();
    let ramdisk = dir.join("big-ramdisk");
    // 256 MiB, sparse: reads return zeros without filling the disk.
    std::fs::File::create(&ramdisk).unwrap().set_len(256 << 20).unwrap();
    let eif = dir.join("big.eif");
    let (k, r, e) = (kernel.to_str().unwrap(), ramdisk.to_str().unwrap(), eif.to_str().unwrap());
    let build = ["build-enclave", "--kernel", k, "--cmdline", "x", "--ramdisk", r, "--output-file", e];
    let build_rss = peak_rss_kib(&build);
    let describe_rss = peak_rss_kib(&["describe-eif", "--eif-path", e]);
    let pcr_rss = peak_rss_kib(&["pcr", "--input", r]);
    eprintln!("peak RSS with a 256 MiB ramdisk: build {build_rss} KiB, describe {describe_rss} KiB, pcr {pcr_rss} KiB");
    for rss in [build_rss, describe_rss, pcr_rss] {
        assert!(rss < 16 * 1024, "{rss} KiB");
    }
    let _ = std::fs::remove_file(&eif);
}

#[test]
fn pcr_diff_names_the_sections_and_files_that_differ() {
    let dir = dir("pcr-diff");
    // Two application ramdisks, written by GNU cpio (the oracle) from two trees.
    let ramdisk = |name: &str, files: &[(&str, &str, &str)]| -> PathBuf {
        let root = dir.join(name);
        std::fs::create_dir_all(root.join("etc")).unwrap();
        for (path, content, mtime) in files {
            std::fs::write(root.join(path), content).unwrap();
            std::fs::set_permissions(root.join(path), std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .unwrap();
            let touched = Command::new("touch").args(["-d", mtime]).arg(root.join(path)).status().unwrap();
            assert!(touched.success());
        }
        let listing =
            Command::new("find").args(["etc", "-mindepth", "1"]).current_dir(&root).output().unwrap();
        let archive = dir.join(format!("{name}.cpio"));
        let mut cpio = Command::new("cpio")
            .args(["-o", "-H", "newc", "--quiet", "-F", archive.to_str().unwrap()])
            .current_dir(&root)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let listing = String::from_utf8(listing.stdout).unwrap();
        let mut names: Vec<&str> = listing.lines().collect();
        names.sort();
        std::io::Write::write_all(&mut cpio.stdin.take().unwrap(), (names.join("\n") + "\n").as_bytes())
            .unwrap();
        assert!(cpio.wait().unwrap().success());
        archive
    };
    let first = ramdisk(
        "a",
        &[("etc/config", "mode=one\n", "2026-01-01 00:00 UTC"), ("etc/hosts", "h\n", "2026-01-01 00:00 UTC")],
    );
    let second = ramdisk(
        "b",
        &[
            ("etc/config", "mode=two!\n", "2026-02-01 00:00 UTC"),
            ("etc/hosts", "h\n", "2026-01-01 00:00 UTC"),
            ("etc/extra", "x", "2026-01-01 00:00 UTC"),
        ],
    );
    let kernel = dir.join("bzImage");
    std::fs::write(&kernel, bytes(30_000, 5)).unwrap();
    let build = |app: &Path, output: &Path| {
        let out = carve(&[
            "build-enclave",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0",
            "--ramdisk",
            kernel.to_str().unwrap(),
            "--ramdisk",
            app.to_str().unwrap(),
            "--output-file",
            output.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let (a, b) = (dir.join("a.eif"), dir.join("b.eif"));
    build(&first, &a);
    build(&second, &b);

    let out = carve(&["pcr-diff", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[2].starts_with("PCR0: differs ")
            && lines[3].starts_with("PCR1: same ")
            && lines[4].starts_with("PCR2: differs "),
        "{text}"
    );
    assert!(
        lines[5].starts_with("ramdisk 2 (PCR0, PCR2): ") && lines[5].ends_with(" 2 files differ"),
        "{text}"
    );
    assert!(lines[6].starts_with("  ~ etc/config: mtime 2026-01-01T00:00:00.000000000+00:00 → 2026-02-01T00:00:00.000000000+00:00, size 9 → 10, sha256 "), "{text}");
    assert!(lines[7].starts_with("  + etc/extra: only in the second (file 0644 "), "{text}");
    // (each was built now: their build times differ, outside every PCR)
    assert_eq!(lines[8..], ["metadata (not measured): differs"], "{text}");
    // The same image: exit 0.
    let out = carve(&["pcr-diff", a.to_str().unwrap(), a.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    // Not an EIF: E35 naming the file.
    let out = carve(&["pcr-diff", a.to_str().unwrap(), first.to_str().unwrap()]);
    assert_nitro_error(&out, 35, &format!("{}: the image is truncated", first.display()));
    let out = carve(&["pcr-diff", kernel.to_str().unwrap(), a.to_str().unwrap()]);
    assert_nitro_error(&out, 35, &format!("{}: not an EIF", kernel.display()));
}
