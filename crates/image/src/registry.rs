//! Pulling an image from a registry with the OCI distribution API, without a Docker daemon:
//! oci-client speaks the protocol (token and basic auth, OCI and Docker v2 manifests, digests);
//! this module chooses what Docker would choose (credentials from `~/.docker/config.json` and
//! its helpers, http only where Docker allows it, linux/amd64 from an index) and bounds what
//! an untrusted registry may send.

use std::fs::File;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use docker_credential::{CredentialRetrievalError, DockerCredential};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::io::AsyncWrite;

use crate::oci::{anonymous_file, choose_platform, Blob, MAX_JSON};
use crate::{Image, ImageError};

/// Layer media types carve unpacks (the compression is also recognised by its magic bytes).
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

const CONFIG_TYPES: &[&str] =
    &["application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"];

/// Where Docker keeps Docker Hub's credentials in config.json.
const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";

/// How to reach registries.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Registries (`host[:port]`) spoken to over plain http, besides loopback ones.
    pub insecure_registries: Vec<String>,
}

impl PullOptions {
    /// Docker's list (`insecure-registries` in /etc/docker/daemon.json) and carve's
    /// (`CARVE_INSECURE_REGISTRIES`, comma-separated).
    pub fn from_environment() -> PullOptions {
        let mut insecure: Vec<String> = std::env::var("CARVE_INSECURE_REGISTRIES")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(String::from)
            .collect();
        let daemon = std::fs::read("/etc/docker/daemon.json").ok();
        let daemon: Option<serde_json::Value> = daemon.and_then(|d| serde_json::from_slice(&d).ok());
        if let Some(list) = daemon.as_ref().and_then(|d| d["insecure-registries"].as_array()) {
            insecure.extend(list.iter().filter_map(|r| r.as_str().map(String::from)));
        }
        PullOptions { insecure_registries: insecure }
    }

    /// Docker's rule: loopback registries and listed ones may be plain http (or https with a
    /// certificate nobody vouches for).
    fn allows_http(&self, registry: &str) -> bool {
        let host = match registry.strip_prefix('[') {
            Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
            None => registry.rsplit_once(':').map_or(registry, |(host, _)| host),
        };
        host == "localhost"
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            || self.insecure_registries.iter().any(|r| r == registry)
    }
}

/// Pulls `uri` (Docker's reference syntax: `alpine` is `docker.io/library/alpine:latest`).
pub fn pull(uri: &str, options: &PullOptions) -> Result<Image, ImageError> {
    let fail = |what: String| ImageError::Pull(format!("cannot pull {uri}: {what}"));
    let reference: Reference =
        uri.parse().map_err(|e| fail(format!("it is not an image reference ({e})")))?;
    let registry = reference.resolve_registry().to_string();
    // Which crypto rustls uses is process-wide; an earlier install is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let auth = credentials(&reference).map_err(fail)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(format!("cannot start the downloader: {e}")))?;
    let attempt = |protocol, insecure| {
        let client = Client::new(ClientConfig {
            protocol,
            accept_invalid_certificates: insecure,
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            user_agent: concat!("carve/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        });
        runtime.block_on(pull_image(&client, &reference, &auth))
    };
    // Docker's way with insecure registries: https without checking the certificate, and
    // plain http when no TLS server answers.
    let pulled = if options.allows_http(reference.registry()) {
        match attempt(ClientProtocol::Https, true) {
            Err(Failure::Registry(OciDistributionError::RequestError(e))) if e.is_connect() => {
                attempt(ClientProtocol::Http, false)
            }
            pulled => pulled,
        }
    } else {
        attempt(ClientProtocol::Https, false)
    };
    let (config, config_digest, layers) = pulled.map_err(|e| match e {
        Failure::Registry(e) => fail(describe(&e, &registry)),
        Failure::Image(what) => fail(what),
    })?;
    Image::from_pulled(uri.to_string(), &config, config_digest, layers)
}

enum Failure {
    Registry(OciDistributionError),
    Image(String),
}

impl From<OciDistributionError> for Failure {
    fn from(e: OciDistributionError) -> Failure {
        Failure::Registry(e)
    }
}

type Pulled = (Vec<u8>, String, Vec<Blob>);

async fn pull_image(client: &Client, reference: &Reference, auth: &RegistryAuth) -> Result<Pulled, Failure> {
    let manifest = match client.pull_manifest(reference, auth).await?.0 {
        OciManifest::Image(manifest) => manifest,
        OciManifest::ImageIndex(index) => {
            let platforms: Vec<(String, String)> = index
                .manifests
                .iter()
                .map(|entry| match &entry.platform {
                    Some(p) => (p.os.to_string(), p.architecture.to_string()),
                    None => ("unknown".into(), "unknown".into()),
                })
                .collect();
            let chosen = choose_platform(&platforms).map_err(Failure::Image)?;
            let platform_reference = reference.clone_with_digest(index.manifests[chosen].digest.clone());
            match client.pull_manifest(&platform_reference, auth).await?.0 {
                OciManifest::Image(manifest) => manifest,
                OciManifest::ImageIndex(_) => {
                    return Err(Failure::Image("its linux/amd64 entry is another index, not an image".into()))
                }
            }
        }
    };
    check_media_types(&manifest).map_err(Failure::Image)?;
    let mut config = Vec::new();
    client.pull_blob(reference, &manifest.config, Limited::new(&mut config, &manifest.config)).await?;
    let layers = manifest.layers.iter().map(|layer| async move {
        let file =
            anonymous_file().map_err(|e| Failure::Image(format!("cannot make a temporary file: {e}")))?;
        let writer = file.try_clone().map_err(|e| Failure::Image(e.to_string()))?;
        client.pull_blob(reference, layer, Limited::new(writer, layer)).await?;
        Blob::whole(file).map_err(|e| Failure::Image(e.to_string()))
    });
    let layers = futures_util::future::try_join_all(layers).await?;
    Ok((config, manifest.config.digest.clone(), layers))
}

fn check_media_types(manifest: &OciImageManifest) -> Result<(), String> {
    if !CONFIG_TYPES.contains(&manifest.config.media_type.as_str()) {
        return Err(format!(
            "its config has the media type {}, not an image config",
            manifest.config.media_type
        ));
    }
    if !(0..=MAX_JSON as i64).contains(&manifest.config.size) {
        return Err(format!("its config is {} bytes; at most 16 MiB is allowed", manifest.config.size));
    }
    for layer in &manifest.layers {
        if !LAYER_TYPES.contains(&layer.media_type.as_str()) {
            return Err(format!(
                "a layer has the media type {}, which carve cannot unpack",
                layer.media_type
            ));
        }
        if layer.size < 0 {
            return Err(format!("a layer has the size {}", layer.size));
        }
    }
    Ok(())
}

/// The credential Docker would use: config.json's `auths`, `credHelpers` or `credsStore`
/// (docker_credential reads them and runs the helpers), else none.
fn credentials(reference: &Reference) -> Result<RegistryAuth, String> {
    let server = match reference.registry() {
        "docker.io" => DOCKER_HUB_AUTH_KEY,
        registry => registry,
    };
    let config_dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".docker")));
    let Some(path) = config_dir.map(|dir| dir.join("config.json")) else {
        return Ok(RegistryAuth::Anonymous);
    };
    let config = match File::open(&path) {
        Ok(config) => config,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    match docker_credential::get_credential_from_reader(io::BufReader::new(config), server) {
        Ok(DockerCredential::UsernamePassword(user, password)) => Ok(RegistryAuth::Basic(user, password)),
        Ok(DockerCredential::IdentityToken(_)) => Err(format!(
            "{} has an identity token for {server}, which carve cannot use; log in with a user name and password",
            path.display()
        )),
        Err(CredentialRetrievalError::NoCredentialConfigured) => Ok(RegistryAuth::Anonymous),
        Err(CredentialRetrievalError::HelperFailure { helper, stdout, stderr }) => {
            let said = if stderr.trim().is_empty() { stdout } else { stderr };
            Err(format!("the credential helper {helper} failed for {server}: {}", said.trim()))
        }
        Err(CredentialRetrievalError::HelperCommunicationError) => Err(format!(
            "the credential helper {} names for {server} cannot be run, or did not read the request",
            path.display()
        )),
        Err(e) => Err(format!("cannot use {}'s credential for {server}: {e}", path.display())),
    }
}

/// One line saying what went wrong, in the registry's terms.
fn describe(error: &OciDistributionError, registry: &str) -> String {
    let line = match error {
        OciDistributionError::RegistryError { envelope, .. } => {
            let first = envelope.errors.first();
            match first.map(|e| &e.code) {
                // Registries differ on which of the two a missing repository is.
                Some(OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown) => {
                    "the registry has no such image (repository and tag)".to_string()
                }
                Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => {
                    format!("the registry {registry} refused access (check `docker login` or ~/.docker/config.json)")
                }
                Some(OciErrorCode::BlobUnknown) => "the registry lacks a blob the image needs".to_string(),
                _ => format!("the registry answered: {envelope}"),
            }
        }
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
            format!("the registry {registry} refused access (check `docker login` or ~/.docker/config.json)")
        }
        OciDistributionError::ServerError { code, message, .. } => {
            format!("the registry answered HTTP {code} {}", message.trim())
        }
        OciDistributionError::RequestError(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                text = format!("{text}: {cause}");
                source = cause.source();
            }
            if e.is_connect() || e.is_timeout() {
                format!("cannot reach the registry {registry}: {text}")
            } else {
                format!("talking to the registry {registry} failed: {text}")
            }
        }
        OciDistributionError::DigestError(e) => {
            format!("the registry sent bytes that do not match their digest: {e}")
        }
        OciDistributionError::UnsupportedMediaTypeError(t) => {
            format!("its manifest has the media type {t}, which carve does not support")
        }
        OciDistributionError::UnsupportedSchemaVersionError(v) => {
            format!("its manifest has schema version {v}; only version 2 is supported")
        }
        OciDistributionError::IoError(e) => e.to_string(),
        other => other.to_string(),
    };
    line.replace(['\n', '\r'], " ")
}

/// Writes a blob, refusing more bytes than its descriptor declares: a registry cannot fill the
/// disk by sending an endless body (the digest check comes only at the end).
struct Limited<W> {
    inner: W,
    left: u64,
}

impl<W> Limited<W> {
    fn new(inner: W, descriptor: &OciDescriptor) -> Limited<W> {
        Limited { inner, left: descriptor.size.max(0) as u64 }
    }
}

impl<W: Write + Unpin> AsyncWrite for Limited<W> {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.len() as u64 > self.left {
            return Poll::Ready(Err(io::Error::other(
                "the registry sent more bytes than the manifest declares",
            )));
        }
        self.left -= buf.len() as u64;
        // Local files and memory: writing in place is quicker than a blocking-pool round trip.
        Poll::Ready(self.inner.write_all(buf).map(|()| buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.inner.flush())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_only_for_loopback_and_listed_registries() {
        let options = PullOptions { insecure_registries: vec!["registry.lan:5000".into()] };
        for registry in
            ["127.0.0.1:5000", "localhost:5000", "localhost", "[::1]:5000", "127.1.2.3", "registry.lan:5000"]
        {
            assert!(options.allows_http(registry), "{registry}");
        }
        for registry in
            ["docker.io", "index.docker.io", "10.0.0.1:5000", "registry.lan", "localhost.evil.com:5000"]
        {
            assert!(!options.allows_http(registry), "{registry}");
        }
    }

    #[test]
    fn docker_hub_names_default_as_docker_does() {
        let reference: Reference = "alpine".parse().unwrap();
        assert_eq!(reference.registry(), "docker.io");
        assert_eq!(reference.resolve_registry(), "index.docker.io");
        assert_eq!(reference.repository(), "library/alpine");
        assert_eq!(reference.tag(), Some("latest"));
        let reference: Reference = "127.0.0.1:5000/team/app:1".parse().unwrap();
        assert_eq!(
            (reference.registry(), reference.repository(), reference.tag()),
            ("127.0.0.1:5000", "team/app", Some("1"))
        );
    }

    #[test]
    fn an_index_without_linux_amd64_names_what_it_has() {
        let platforms =
            vec![("linux".to_string(), "arm64".to_string()), ("unknown".into(), "unknown".into())];
        assert_eq!(
            choose_platform(&platforms).unwrap_err(),
            "its image index has no linux/amd64 image (it has linux/arm64)"
        );
        let platforms = vec![("linux".to_string(), "arm64".to_string()), ("linux".into(), "amd64".into())];
        assert_eq!(choose_platform(&platforms), Ok(1));
    }
}
