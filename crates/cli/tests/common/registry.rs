//! A real registry for pull tests: Debian's `docker-registry` (the CNCF distribution registry)
//! on a loopback port, images written as OCI layouts here and pushed with skopeo.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

fn tool(name: &str, package: &str) -> &'static str {
    let found = Command::new("sh").args(["-c", &format!("command -v {name}")]).output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "{name} is not installed (Debian package {package}; .ci/run installs it)"
    );
    Box::leak(name.to_string().into_boxed_str())
}

pub struct Registry {
    /// `127.0.0.1:PORT`
    pub address: String,
    /// The registry's filesystem storage.
    pub storage: PathBuf,
    child: Child,
    credentials: Option<String>,
    _tokens: Option<TokenServer>,
}

/// How a registry authenticates.
#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    /// htpasswd basic auth.
    Basic(&'a str, &'a str),
    /// Bearer tokens from a token server that takes these credentials (Docker Hub's scheme).
    Token(&'a str, &'a str),
}

impl Registry {
    /// Starts a registry storing under `dir`; with `user` (name, password) it demands htpasswd
    /// basic auth.
    pub fn start(dir: &Path, user: Option<(&str, &str)>) -> Registry {
        let auth = match user {
            Some((name, password)) => Auth::Basic(name, password),
            None => Auth::None,
        };
        Registry::launch(dir, auth, false)
    }

    /// A registry that speaks only TLS, with a self-signed certificate for 127.0.0.1.
    pub fn start_tls(dir: &Path) -> Registry {
        Registry::launch(dir, Auth::None, true)
    }

    /// A registry that takes only bearer tokens, which a token server beside it issues to
    /// `user` (name, password) as Docker Hub's does.
    pub fn start_with_tokens(dir: &Path, user: (&str, &str)) -> Registry {
        Registry::launch(dir, Auth::Token(user.0, user.1), false)
    }

    fn launch(dir: &Path, auth: Auth, tls: bool) -> Registry {
        std::fs::create_dir_all(dir).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let storage = dir.join("storage");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        let mut tokens = None;
        if let Auth::Token(name, password) = auth {
            let (key, certificate) = self_signed(dir, "token");
            let server = TokenServer::start(&key, &certificate, name, password);
            config += &format!(
                "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                server.port,
                certificate.display()
            );
            tokens = Some(server);
        }
        if let Auth::Basic(name, password) = auth {
            let out = Command::new(tool("htpasswd", "apache2-utils"))
                .args(["-Bbn", name, password])
                .output()
                .unwrap();
            assert!(out.status.success());
            let htpasswd = dir.join("htpasswd");
            std::fs::write(&htpasswd, &out.stdout).unwrap();
            config +=
                &format!("auth:\n  htpasswd:\n    realm: carve-test\n    path: {}\n", htpasswd.display());
        }
        if tls {
            let (key, certificate) = self_signed(dir, "tls");
            config +=
                &format!("  tls:\n    certificate: {}\n    key: {}\n", certificate.display(), key.display());
        }
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new(tool("docker-registry", "docker-registry"))
            .args(["serve", config_path.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let address = format!("127.0.0.1:{port}");
        let registry = Registry {
            address,
            storage,
            child,
            credentials: match auth {
                Auth::Basic(name, password) | Auth::Token(name, password) => {
                    Some(format!("{name}:{password}"))
                }
                Auth::None => None,
            },
            _tokens: tokens,
        };
        // Slow under the emulated KVM host: give it time to listen.
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(&registry.address).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry did not start: {}",
                dir.join("registry.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// Pushes the layout's `tag` as `name` (`repo:tag`) with skopeo; `all` pushes an index whole.
    pub fn push(&self, layout: &OciLayout, tag: &str, name: &str, all: bool) {
        let source = format!("oci:{}:{tag}", layout.dir.display());
        let destination = format!("docker://{}/{name}", self.address);
        let mut command = Command::new(tool("skopeo", "skopeo"));
        // Its own state in a fresh place: no blob cache that changes what is pushed.
        command.env("HOME", layout.dir.join(".skopeo-home"));
        command.args([
            "copy",
            "--insecure-policy",
            "--quiet",
            "--dest-tls-verify=false",
            "--preserve-digests",
        ]);
        if let Some(credentials) = &self.credentials {
            command.args(["--dest-creds", credentials]);
        }
        if all {
            command.arg("--all");
        }
        let out = command.args([&source, &destination]).output().unwrap();
        assert!(
            out.status.success(),
            "skopeo copy {source} {destination}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Where the registry keeps the blob `digest`'s bytes.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage.join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A P-256 key and a self-signed certificate for 127.0.0.1 (openssl as the fixture maker).
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (key, certificate) = (dir.join(format!("{name}-key.pem")), dir.join(format!("{name}-cert.pem")));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"])
        .args(["-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-keyout", key.to_str().unwrap(), "-out", certificate.to_str().unwrap()])
        .output()
        .expect("openssl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (key, certificate)
}

const TOKEN_SERVICE: &str = "carve-test-registry";
const TOKEN_ISSUER: &str = "carve-test-issuer";

/// The token server of the distribution registry's token auth: `GET /token?scope=…&service=…`
/// with the user's basic credentials answers an ES256 JWT granting the scopes asked for,
/// its certificate in the `x5c` header (the registry trusts it through `rootcertbundle`).
struct TokenServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TokenServer {
    fn start(key: &Path, certificate: &Path, user: &str, password: &str) -> TokenServer {
        use base64::Engine;
        use p256::pkcs8::DecodePrivateKey;
        let key = p256::ecdsa::SigningKey::from_pkcs8_pem(&std::fs::read_to_string(key).unwrap()).unwrap();
        let pem = std::fs::read_to_string(certificate).unwrap();
        let der_base64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let user = user.to_string();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let _ = answer(stream, &key, &der_base64, &expected, &user);
            }
        });
        TokenServer { port, stop, thread: Some(thread) }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer(
    stream: TcpStream,
    key: &p256::ecdsa::SigningKey,
    x5c: &str,
    expected: &str,
    user: &str,
) -> std::io::Result<()> {
    use base64::Engine;
    use p256::ecdsa::signature::Signer;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut authorized = false;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            authorized |= name.eq_ignore_ascii_case("authorization") && value.trim() == expected;
        }
    }
    let mut stream = stream;
    if !authorized {
        return stream
            .write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    }
    let query = request.split_whitespace().nth(1).unwrap_or_default().split_once('?').map_or("", |(_, q)| q);
    let access: Vec<serde_json::Value> = query
        .split('&')
        .filter_map(|pair| pair.strip_prefix("scope="))
        .map(|scope| percent_encoding::percent_decode_str(scope).decode_utf8_lossy().into_owned())
        .filter_map(|scope| {
            // repository:NAME:ACTIONS, where NAME may hold a port's colon
            let (kind, rest) = scope.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            Some(json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
        })
        .collect();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = json!({"typ": "JWT", "alg": "ES256", "x5c": [x5c]});
    let claims = json!({
        "iss": TOKEN_ISSUER, "sub": user, "aud": TOKEN_SERVICE, "exp": now + 300, "nbf": now - 10,
        "iat": now, "jti": format!("{now}-{}", access.len()), "access": access,
    });
    let signing_input = format!("{}.{}", url.encode(header.to_string()), url.encode(claims.to_string()));
    let signature: p256::ecdsa::Signature = key.sign(signing_input.as_bytes());
    let token = format!("{signing_input}.{}", url.encode(signature.to_bytes()));
    let body = json!({"token": token, "access_token": token, "expires_in": 300}).to_string();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/…`).
pub struct OciLayout {
    pub dir: PathBuf,
    tags: Vec<Value>,
}

impl OciLayout {
    pub fn new(dir: &Path) -> OciLayout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        OciLayout { dir: dir.to_path_buf(), tags: Vec::new() }
    }

    /// Stores `bytes`; returns a descriptor of them.
    pub fn blob(&self, media_type: &str, bytes: &[u8]) -> Value {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        std::fs::write(self.dir.join("blobs/sha256").join(&digest[7..]), bytes).unwrap();
        json!({"mediaType": media_type, "digest": digest, "size": bytes.len()})
    }

    /// An image manifest of `layers` (media type, blob bytes; the diff IDs are their
    /// uncompressed digests, given as `tars`) and `config` (whose rootfs is filled in).
    pub fn image(&self, layers: &[(&str, Vec<u8>)], tars: &[Vec<u8>], mut config: Value) -> Value {
        let diff_ids: Vec<String> =
            tars.iter().map(|t| format!("sha256:{}", hex::encode(Sha256::digest(t)))).collect();
        config["rootfs"] = json!({"type": "layers", "diff_ids": diff_ids});
        let config =
            self.blob("application/vnd.oci.image.config.v1+json", &serde_json::to_vec(&config).unwrap());
        let layers: Vec<Value> =
            layers.iter().map(|(media_type, bytes)| self.blob(media_type, bytes)).collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": layers,
        });
        self.blob("application/vnd.oci.image.manifest.v1+json", &serde_json::to_vec(&manifest).unwrap())
    }

    /// An image index of `(manifest descriptor, os, architecture)`.
    pub fn index(&self, images: &[(Value, &str, &str)]) -> Value {
        let manifests: Vec<Value> = images
            .iter()
            .map(|(descriptor, os, arch)| {
                let mut entry = descriptor.clone();
                entry["platform"] = json!({"os": os, "architecture": arch});
                entry
            })
            .collect();
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        self.blob("application/vnd.oci.image.index.v1+json", &serde_json::to_vec(&index).unwrap())
    }

    /// Names `descriptor` `tag` in index.json.
    pub fn tag(&mut self, descriptor: &Value, tag: &str) {
        let mut entry = descriptor.clone();
        entry["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        self.tags.push(entry);
        let index = json!({"schemaVersion": 2, "manifests": self.tags});
        std::fs::write(self.dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    }
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, bytes).unwrap();
    gz.finish().unwrap()
}

/// zstd-compressed by Debian's zstd tool (an encoder independent of carve's decoder).
pub fn zstd(bytes: &[u8]) -> Vec<u8> {
    let mut child = Command::new(tool("zstd", "zstd"))
        .args(["-q", "-c", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    out.stdout
}
