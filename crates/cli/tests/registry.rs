//! `build-enclave --docker-uri` pulls from a real registry (Debian's docker-registry on
//! loopback, images pushed with skopeo): OCI and Docker v2 manifests, gzip and zstd layers,
//! image indexes, htpasswd auth with config.json credentials and credential helpers, and every
//! kind of bad image refused with nitro-cli's E-code, one line, and no output file.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::registry::{gzip, zstd, OciLayout, Registry, LAYER_GZIP, LAYER_TAR, LAYER_ZSTD};
use common::{bytes, fresh_dir, stderr, tar_add};
use serde_json::{json, Value};
use tar::{Builder, EntryType};

/// Blobs good enough for build-enclave (it measures them, it does not boot them).
fn blobs(dir: &Path) -> PathBuf {
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join("bzImage"), bytes(30_000, 5)).unwrap();
    std::fs::write(blobs.join("cmdline"), "console=ttyS0\n").unwrap();
    std::fs::write(blobs.join("init"), bytes(4_000, 6)).unwrap();
    blobs
}

/// Runs build-enclave for `uri` with a private Docker config directory and no daemon.
fn build(dir: &Path, uri: &str, output: &Path, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_carve"));
    command
        .args(["build-enclave", "--docker-uri", uri, "--output-file", output.to_str().unwrap()])
        .args(["--blobs-dir", blobs(dir).to_str().unwrap()])
        .env("DOCKER_CONFIG", dir.join("docker"))
        .env("DOCKER_HOST", format!("unix://{}", dir.join("no-daemon.sock").display()))
        .env("SOURCE_DATE_EPOCH", "1700000000");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

fn pcrs(out: &Output) -> Value {
    assert!(out.status.success(), "{}", stderr(out));
    serde_json::from_slice::<Value>(&out.stdout).unwrap()["Measurements"].clone()
}

/// nitro-cli's failure shape: `[ Exx ] one line`, exit status xx, and no image written.
fn assert_refused(out: &Output, code: u8, output: &Path, names: &str) {
    let text = stderr(out);
    let line =
        text.lines().find(|l| l.starts_with("[ E")).unwrap_or_else(|| panic!("no E-code line in {text}"));
    assert!(line.starts_with(&format!("[ E{code} ] ")), "{text}");
    assert!(line.contains(names), "expected {names:?} in: {line}");
    assert_eq!(out.status.code(), Some(code as i32), "{text}");
    assert!(!output.exists(), "{} was left behind", output.display());
}

fn lower_layer() -> Vec<u8> {
    let mut lower = Builder::new(Vec::new());
    tar_add(&mut lower, "bin/", EntryType::Directory, 0o755, b"", None);
    tar_add(&mut lower, "bin/hello", EntryType::Regular, 0o755, b"#!/bin/sh\necho hello\n", None);
    tar_add(&mut lower, "bin/sh", EntryType::Symlink, 0o777, b"", Some("busybox"));
    tar_add(&mut lower, "etc/", EntryType::Directory, 0o755, b"", None);
    tar_add(&mut lower, "etc/removed", EntryType::Regular, 0o644, b"gone", None);
    tar_add(&mut lower, "data/big", EntryType::Regular, 0o644, &bytes(300_000, 7), None);
    lower.into_inner().unwrap()
}

fn upper_layer() -> Vec<u8> {
    let mut upper = Builder::new(Vec::new());
    tar_add(&mut upper, "etc/.wh.removed", EntryType::Regular, 0o644, b"", None);
    tar_add(&mut upper, "etc/motd", EntryType::Regular, 0o644, b"welcome\n", None);
    tar_add(&mut upper, "bin/hello-again", EntryType::Link, 0o755, b"", Some("bin/hello"));
    upper.into_inner().unwrap()
}

fn config(cmd: &[&str]) -> Value {
    json!({
        "architecture": "amd64", "os": "linux", "created": "2026-11-30T12:00:00Z",
        "config": {"Entrypoint": ["/bin/hello"], "Cmd": cmd, "Env": ["PATH=/bin", "MODE=enclave"]},
    })
}

/// The same image as a docker-save archive, for the `--oci-archive` build to compare with.
fn docker_archive(path: &Path, tars: &[Vec<u8>], config: &Value) {
    let mut config = config.clone();
    config["rootfs"] = json!({"type": "layers", "diff_ids": []});
    let manifest = json!([{"Config": "config.json", "RepoTags": ["app:1"], "Layers": ["0.tar", "1.tar"]}]);
    let mut archive = Builder::new(Vec::new());
    tar_add(
        &mut archive,
        "manifest.json",
        EntryType::Regular,
        0o644,
        &serde_json::to_vec(&manifest).unwrap(),
        None,
    );
    tar_add(
        &mut archive,
        "config.json",
        EntryType::Regular,
        0o644,
        &serde_json::to_vec(&config).unwrap(),
        None,
    );
    for (i, tar) in tars.iter().enumerate() {
        tar_add(&mut archive, &format!("{i}.tar"), EntryType::Regular, 0o644, tar, None);
    }
    std::fs::write(path, archive.into_inner().unwrap()).unwrap();
}

/// Pushes the two-layer test image (gzip) as `name` (`repo:tag`); returns its manifest's
/// descriptor.
fn push_app(layout: &mut OciLayout, registry: &Registry, name: &str) -> Value {
    let tars = [lower_layer(), upper_layer()];
    let image =
        layout.image(&[(LAYER_GZIP, gzip(&tars[0])), (LAYER_GZIP, gzip(&tars[1]))], &tars, config(&["x"]));
    let tag = name.rsplit(':').next().unwrap();
    layout.tag(&image, tag);
    registry.push(layout, tag, name, false);
    image
}

#[test]
fn pulled_images_build_the_same_eif_as_their_archive_whatever_the_format() {
    let dir = fresh_dir("registry-formats");
    let registry = Registry::start(&dir.join("registry"), None);
    let mut layout = OciLayout::new(&dir.join("layout"));
    let tars = [lower_layer(), upper_layer()];
    let config = config(&["--loud", "world"]);
    // gzip under zstd, and both uncompressed: the compression must not change the ramdisk.
    let mixed =
        layout.image(&[(LAYER_GZIP, gzip(&tars[0])), (LAYER_ZSTD, zstd(&tars[1]))], &tars, config.clone());
    let plain =
        layout.image(&[(LAYER_TAR, tars[0].clone()), (LAYER_TAR, tars[1].clone())], &tars, config.clone());
    layout.tag(&mixed, "mixed");
    layout.tag(&plain, "plain");
    registry.push(&layout, "mixed", "team/app:mixed", false);
    registry.push(&layout, "plain", "team/app:plain", false);

    let archive = dir.join("app.tar");
    docker_archive(&archive, &tars, &config);
    let from_archive = Command::new(env!("CARGO_BIN_EXE_carve"))
        .args(["build-enclave", "--oci-archive", archive.to_str().unwrap(), "--docker-uri", "app:1"])
        .args(["--output-file", dir.join("archive.eif").to_str().unwrap()])
        .args(["--blobs-dir", blobs(&dir).to_str().unwrap()])
        .output()
        .unwrap();
    let expected = pcrs(&from_archive);

    for tag in ["mixed", "plain"] {
        let eif = dir.join(format!("{tag}.eif"));
        let out = build(&dir, &format!("{}/team/app:{tag}", registry.address), &eif, &[]);
        assert_eq!(pcrs(&out), expected, "{tag}");
    }

    // skopeo converts the plain image to Docker's v2 schema 2 manifest (gzip layers).
    let out = Command::new("skopeo")
        .env("HOME", dir.join("skopeo-home"))
        .args(["copy", "--insecure-policy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false"])
        .args(["--format", "v2s2"])
        .arg(format!("docker://{}/team/app:plain", registry.address))
        .arg(format!("docker://{}/team/app:docker", registry.address))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest = http_get(
        &registry.address,
        "/v2/team/app/manifests/docker",
        "application/vnd.docker.distribution.manifest.v2+json",
    );
    assert!(manifest.contains("application/vnd.docker.distribution.manifest.v2+json"), "{manifest}");
    let out = build(&dir, &format!("{}/team/app:docker", registry.address), &dir.join("docker.eif"), &[]);
    assert_eq!(pcrs(&out), expected);

    // Byte for byte: the same image from the registry twice is the same file.
    let again = dir.join("again.eif");
    pcrs(&build(&dir, &format!("{}/team/app:mixed", registry.address), &again, &[]));
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(dir.join("mixed.eif")).unwrap());
}

#[test]
fn a_loopback_registry_that_speaks_tls_is_pulled_over_https() {
    let dir = fresh_dir("registry-tls");
    // Loopback, so as Docker: its certificate is not checked, but the registry takes only TLS.
    let registry = Registry::start_tls(&dir.join("registry"));
    let mut layout = OciLayout::new(&dir.join("layout"));
    push_app(&mut layout, &registry, "app:1");
    pcrs(&build(&dir, &format!("{}/app:1", registry.address), &dir.join("app.eif"), &[]));
}

#[test]
fn a_registry_on_the_insecure_list_is_reached_over_http_and_no_other() {
    // A registry under a name, not a loopback address: build-enclave runs in a private mount
    // namespace whose /etc/hosts maps the name to 127.0.0.1 and whose /etc/docker is the test's
    // (root, as the suite runs; docker-registry's package makes /etc/docker).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED a_registry_on_the_insecure_list_is_reached_over_http: needs root");
        return;
    }
    let dir = fresh_dir("registry-insecure");
    let registry = Registry::start(&dir.join("registry"), None);
    let mut layout = OciLayout::new(&dir.join("layout"));
    push_app(&mut layout, &registry, "team/app:1");
    let port = registry.address.rsplit(':').next().unwrap();
    let named = format!("registry.carve-test:{port}");
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost registry.carve-test\n").unwrap();
    let eif = dir.join("app.eif");
    // `daemon_json`: Docker's own list, as /etc/docker/daemon.json in that namespace.
    let build_named = |insecure: &str, daemon_json: &str| {
        let daemon = dir.join("daemon.json");
        std::fs::write(&daemon, daemon_json).unwrap();
        let script = format!(
            "mount --bind {} /etc/hosts && mount -t tmpfs none /etc/docker && cp {} /etc/docker/daemon.json && exec \"$0\" \"$@\"",
            hosts.display(),
            daemon.display()
        );
        Command::new("unshare")
            .args(["--mount", "sh", "-c", &script, env!("CARGO_BIN_EXE_carve")])
            .args(["build-enclave", "--docker-uri", &format!("{named}/team/app:1")])
            .args(["--output-file", eif.to_str().unwrap(), "--blobs-dir", blobs(&dir).to_str().unwrap()])
            .env("DOCKER_CONFIG", dir.join("docker"))
            .env("DOCKER_HOST", format!("unix://{}", dir.join("no-daemon.sock").display()))
            .env("CARVE_INSECURE_REGISTRIES", insecure)
            .output()
            .unwrap()
    };
    // Not listed: https only, which this registry does not speak.
    assert_refused(&build_named("other.example:5000", "{}"), 50, &eif, "cannot pull");
    // Listed, by carve's variable or by Docker's daemon.json: plain http after https fails, as
    // Docker does.
    let out = build_named(&format!("other.example:5000, {named}"), "{}");
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_file(&eif).unwrap();
    let out = build_named("", &format!("{{\"insecure-registries\": [\"{named}\"]}}"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(eif.exists());
}

/// A GET on the registry's HTTP API (the test's own view of what skopeo pushed).
fn http_get(address: &str, path: &str, accept: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\nAccept: {accept}\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn an_image_index_gives_its_linux_amd64_image_and_one_without_is_refused() {
    let dir = fresh_dir("registry-index");
    let registry = Registry::start(&dir.join("registry"), None);
    let mut layout = OciLayout::new(&dir.join("layout"));
    let tars = [lower_layer(), upper_layer()];
    let layers = [(LAYER_GZIP, gzip(&tars[0])), (LAYER_GZIP, gzip(&tars[1]))];
    let amd64 = layout.image(&layers, &tars, config(&["amd64"]));
    let arm64 = layout.image(&layers, &tars, config(&["arm64"]));
    let both = layout.index(&[(arm64.clone(), "linux", "arm64"), (amd64.clone(), "linux", "amd64")]);
    let arm_only = layout.index(&[(arm64, "linux", "arm64")]);
    layout.tag(&amd64, "amd64");
    layout.tag(&both, "both");
    layout.tag(&arm_only, "arm");
    registry.push(&layout, "amd64", "multi:amd64", false);
    registry.push(&layout, "both", "multi:both", true);
    registry.push(&layout, "arm", "multi:arm", true);

    let direct = pcrs(&build(&dir, &format!("{}/multi:amd64", registry.address), &dir.join("a.eif"), &[]));
    let chosen = pcrs(&build(&dir, &format!("{}/multi:both", registry.address), &dir.join("b.eif"), &[]));
    assert_eq!(chosen, direct, "the index's linux/amd64 image was not the one built");

    let eif = dir.join("arm.eif");
    let out = build(&dir, &format!("{}/multi:arm", registry.address), &eif, &[]);
    assert_refused(&out, 50, &eif, "no linux/amd64 image (it has linux/arm64)");
}

#[test]
fn a_registry_with_htpasswd_auth_is_pulled_with_docker_credentials() {
    let dir = fresh_dir("registry-auth");
    let registry = Registry::start(&dir.join("registry"), Some(("enclave-dev", "s3cret-pass")));
    let mut layout = OciLayout::new(&dir.join("layout"));
    push_app(&mut layout, &registry, "private/app:1");
    let uri = format!("{}/private/app:1", registry.address);
    let eif = dir.join("app.eif");
    let docker = dir.join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    let write_config =
        |config: Value| std::fs::write(docker.join("config.json"), config.to_string()).unwrap();

    // No credential at all, then a wrong one: refused, nothing written.
    assert_refused(&build(&dir, &uri, &eif, &[]), 50, &eif, "refused access");
    let auth = |user_password: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(user_password)
    };
    write_config(json!({"auths": {registry.address.clone(): {"auth": auth("enclave-dev:wrong")}}}));
    assert_refused(&build(&dir, &uri, &eif, &[]), 50, &eif, "refused access");

    // `docker login`'s record in config.json.
    write_config(json!({"auths": {registry.address.clone(): {"auth": auth("enclave-dev:s3cret-pass")}}}));
    let expected = pcrs(&build(&dir, &uri, &eif, &[]));
    std::fs::remove_file(&eif).unwrap();

    // A credential helper, as Docker runs it: `docker-credential-NAME get`, the server on stdin.
    let helpers = dir.join("helpers");
    std::fs::create_dir_all(&helpers).unwrap();
    let helper = helpers.join("docker-credential-carvetest");
    let asked = dir.join("helper-asked");
    install_script(
        &helper,
        &format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\ncat > {}\necho '{{\"ServerURL\":\"x\",\"Username\":\"enclave-dev\",\"Secret\":\"s3cret-pass\"}}'\n",
            asked.display()
        ),
    );
    write_config(json!({"credHelpers": {registry.address.clone(): "carvetest"}}));
    let path = format!("{}:{}", helpers.display(), std::env::var("PATH").unwrap());
    assert_eq!(pcrs(&build(&dir, &uri, &eif, &[("PATH", &path)])), expected);
    assert_eq!(std::fs::read_to_string(&asked).unwrap().trim(), registry.address);
    std::fs::remove_file(&eif).unwrap();
    // The same helper as the store for every registry (`credsStore`, Docker Desktop's way).
    std::fs::remove_file(&asked).unwrap();
    write_config(json!({"credsStore": "carvetest"}));
    assert_eq!(pcrs(&build(&dir, &uri, &eif, &[("PATH", &path)])), expected);
    assert_eq!(std::fs::read_to_string(&asked).unwrap().trim(), registry.address);
    std::fs::remove_file(&eif).unwrap();

    // A helper that fails is named.
    install_script(
        &helper,
        "#!/bin/sh\ncat >/dev/null\necho 'credentials not found in native keychain' >&2\nexit 1\n",
    );
    let out = build(&dir, &uri, &eif, &[("PATH", &path)]);
    assert_refused(&out, 50, &eif, "the credential helper docker-credential-carvetest failed");
}

#[test]
fn a_registry_with_token_auth_is_pulled_with_a_bearer_token() {
    let dir = fresh_dir("registry-token");
    // Docker Hub's scheme: the registry answers 401 with a Bearer challenge naming a token
    // server, which issues a JWT for the repository to the user's basic credentials.
    let registry = Registry::start_with_tokens(&dir.join("registry"), ("enclave-dev", "t0ken-pass"));
    let mut layout = OciLayout::new(&dir.join("layout"));
    push_app(&mut layout, &registry, "team/app:1");
    let uri = format!("{}/team/app:1", registry.address);
    let eif = dir.join("app.eif");
    assert_refused(&build(&dir, &uri, &eif, &[]), 50, &eif, "refused access");
    let docker = dir.join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    let auth = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode("enclave-dev:t0ken-pass")
    };
    let config = json!({"auths": {registry.address.clone(): {"auth": auth}}});
    std::fs::write(docker.join("config.json"), config.to_string()).unwrap();
    pcrs(&build(&dir, &uri, &eif, &[]));
}

/// Makes `path` an executable script. `install` writes it from its own process: a file this
/// multi-threaded test process had open for writing could still be open in a child another test
/// is forking, and executing it would fail with ETXTBSY.
fn install_script(path: &Path, script: &str) {
    let source = path.with_extension("source");
    std::fs::write(&source, script).unwrap();
    let status = Command::new("install").args(["-m", "755"]).arg(&source).arg(path).status().unwrap();
    assert!(status.success());
}

#[test]
fn bad_images_and_registries_are_refused_with_one_line_and_no_file() {
    let dir = fresh_dir("registry-bad");
    let registry = Registry::start(&dir.join("registry"), None);
    let mut layout = OciLayout::new(&dir.join("layout"));
    let good = push_app(&mut layout, &registry, "app:good");
    let tars = [lower_layer(), upper_layer()];
    let eif = dir.join("bad.eif");
    let at = |name: &str| format!("{}/{name}", registry.address);

    assert_refused(&build(&dir, &at("app:missing"), &eif, &[]), 50, &eif, "has no such image");
    assert_refused(&build(&dir, &at("nobody/here:1"), &eif, &[]), 50, &eif, "has no such image");
    assert_refused(&build(&dir, "Not A Reference!", &eif, &[]), 50, &eif, "not an image reference");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    assert_refused(
        &build(&dir, &format!("{closed}/app:1"), &eif, &[]),
        50,
        &eif,
        "cannot reach the registry",
    );

    // A layer that escapes the root, and a hard link out of it.
    for (tag, path, kind, link) in [
        ("dotdot", "../../etc/passwd", EntryType::Regular, None),
        ("hardlink", "bin/evil", EntryType::Link, Some("../../../etc/shadow")),
        ("symlink", "bin/evil", EntryType::Symlink, Some("../../../../etc/shadow")),
    ] {
        let mut layer = Builder::new(Vec::new());
        tar_add(&mut layer, "bin/", EntryType::Directory, 0o755, b"", None);
        if path.contains("..") {
            // The tar crate will not write such a path; an attacker's tool would.
            let mut header = tar::Header::new_gnu();
            header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_entry_type(kind);
            header.set_mode(0o644);
            header.set_size(4);
            header.set_cksum();
            layer.append(&header, &b"evil"[..]).unwrap();
        } else {
            tar_add(&mut layer, path, kind, 0o644, b"", link);
        }
        let tar = layer.into_inner().unwrap();
        let image = layout.image(&[(LAYER_GZIP, gzip(&tar))], std::slice::from_ref(&tar), config(&["x"]));
        layout.tag(&image, tag);
        registry.push(&layout, tag, &format!("app:{tag}"), false);
        let out = build(&dir, &at(&format!("app:{tag}")), &eif, &[]);
        assert_refused(&out, 50, &eif, "escapes the image's root");
    }

    // A layer of a kind carve cannot unpack.
    let tar = lower_layer();
    let odd = layout.image(
        &[("application/vnd.example.squashfs", tar.clone())],
        std::slice::from_ref(&tar),
        config(&["x"]),
    );
    layout.tag(&odd, "odd");
    registry.push(&layout, "odd", "app:odd", false);
    assert_refused(&build(&dir, &at("app:odd"), &eif, &[]), 50, &eif, "application/vnd.example.squashfs");

    // Neither Cmd nor Entrypoint: nitro-cli's E48.
    let mut nothing = config(&[]);
    nothing["config"] = json!({"Env": ["PATH=/bin"]});
    let image = layout.image(&[(LAYER_GZIP, gzip(&tars[0]))], &tars[..1], nothing);
    layout.tag(&image, "nothing");
    registry.push(&layout, "nothing", "app:nothing", false);
    assert_refused(&build(&dir, &at("app:nothing"), &eif, &[]), 48, &eif, "neither a Cmd nor an Entrypoint");

    // The registry's stored layer changes under it: the digest check catches it.
    let stored = registry.blob_path(&layer_digest(&layout, &good).unwrap());
    let mut bytes = std::fs::read(&stored).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&stored, bytes).unwrap();
    assert_refused(&build(&dir, &at("app:good"), &eif, &[]), 50, &eif, "do not match their digest");
}

/// The first layer's digest of the manifest `descriptor` names.
fn layer_digest(layout: &OciLayout, descriptor: &Value) -> Option<String> {
    let digest = descriptor["digest"].as_str()?;
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(layout.dir.join("blobs/sha256").join(&digest[7..])).ok()?)
            .ok()?;
    manifest["layers"][0]["digest"].as_str().map(String::from)
}
