//! Container images without a Docker daemon: `docker save` archives (manifest.json) and OCI
//! image-layout tarballs (index.json), their layers applied with whiteouts into the customer
//! ramdisk nitro-cli builds (`rootfs/…`, `cmd`, `env`), and the bootstrap ramdisk from the
//! blobs directory (`dev/`, `init`, `nsm.ko`). Layers are streamed; only the file table is
//! kept in memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use carve_eif::SectionInput;
use serde_json::Value;

use crate::cpio::{CpioEntry, CpioStream, Kind};
use crate::nitro_error::{ErrorCode, NitroError};

/// JSON documents in an archive (manifests, configs) are small; refuse absurd ones.
const MAX_JSON: u64 = 16 << 20;

fn pull_error(archive: &Path, message: impl std::fmt::Display) -> NitroError {
    NitroError::new(ErrorCode::DOCKER_IMAGE_PULL, format!("{}: {message}", archive.display()))
}

/// A blob inside the archive: where its bytes are.
#[derive(Clone, Copy)]
struct Blob {
    offset: u64,
    size: u64,
}

pub struct Image {
    archive: PathBuf,
    name: String,
    config: Value,
    config_digest: String,
    layers: Vec<Blob>,
}

impl Image {
    /// Finds the image in `archive`: the one tagged `uri` (or the only one when no `uri`).
    pub fn open(archive: &Path, uri: Option<&str>) -> Result<Image, NitroError> {
        let file = File::open(archive).map_err(|e| NitroError::file(archive, "open", e))?;
        let mut blobs = BTreeMap::new();
        let mut tar = tar::Archive::new(BufReader::new(file));
        let entries = tar.entries().map_err(|e| pull_error(archive, format!("not a tar archive: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| pull_error(archive, format!("not a tar archive: {e}")))?;
            let path = entry
                .path()
                .map_err(|e| pull_error(archive, e))?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_string();
            blobs.insert(path, Blob { offset: entry.raw_file_position(), size: entry.size() });
        }
        let read_json = |name: &str| -> Result<Value, NitroError> {
            let blob = blobs.get(name).ok_or_else(|| pull_error(archive, format!("{name} is missing")))?;
            if blob.size > MAX_JSON {
                return Err(pull_error(archive, format!("{name} is larger than 16 MiB")));
            }
            let mut bytes = Vec::new();
            blob_reader(archive, *blob)?
                .read_to_end(&mut bytes)
                .map_err(|e| NitroError::file(archive, "read", e))?;
            serde_json::from_slice(&bytes)
                .map_err(|e| pull_error(archive, format!("{name} is not JSON: {e}")))
        };
        let digest_path = |digest: &str| format!("blobs/{}", digest.replacen(':', "/", 1));

        let (name, config_name, layer_names) = if blobs.contains_key("manifest.json") {
            let manifest = read_json("manifest.json")?;
            let images = manifest.as_array().cloned().unwrap_or_default();
            let tags = |image: &Value| -> Vec<String> {
                image["RepoTags"]
                    .as_array()
                    .map(|t| t.iter().filter_map(|t| t.as_str().map(String::from)).collect())
                    .unwrap_or_default()
            };
            let image = pick(&images, uri, |image| tags(image))
                .ok_or_else(|| missing_image(archive, uri, images.len()))?;
            let name = uri.map(String::from).or_else(|| tags(image).into_iter().next()).unwrap_or_default();
            let config =
                image["Config"].as_str().ok_or_else(|| pull_error(archive, "manifest.json has no Config"))?;
            let layers = image["Layers"].as_array().cloned().unwrap_or_default();
            let layers: Vec<String> = layers.iter().filter_map(|l| l.as_str().map(String::from)).collect();
            (name, config.to_string(), layers)
        } else if blobs.contains_key("index.json") {
            let index = read_json("index.json")?;
            let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
            let tags = |m: &Value| -> Vec<String> {
                m["annotations"]["io.containerd.image.name"]
                    .as_str()
                    .or(m["annotations"]["org.opencontainers.image.ref.name"].as_str())
                    .map(|t| vec![t.to_string()])
                    .unwrap_or_default()
            };
            let entry = pick(&manifests, uri, |m| tags(m))
                .ok_or_else(|| missing_image(archive, uri, manifests.len()))?;
            let name = uri.map(String::from).or_else(|| tags(entry).into_iter().next()).unwrap_or_default();
            let mut manifest = read_json(&digest_path(entry["digest"].as_str().unwrap_or_default()))?;
            if manifest["manifests"].is_array() {
                // An image index: take the linux/amd64 manifest.
                let chosen = manifest["manifests"]
                    .as_array()
                    .and_then(|all| {
                        all.iter().find(|m| m["platform"]["architecture"] == "amd64").or(all.first())
                    })
                    .cloned()
                    .ok_or_else(|| pull_error(archive, "the image index lists no manifests"))?;
                manifest = read_json(&digest_path(chosen["digest"].as_str().unwrap_or_default()))?;
            }
            let config = digest_path(manifest["config"]["digest"].as_str().unwrap_or_default());
            let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
            let layers =
                layers.iter().map(|l| digest_path(l["digest"].as_str().unwrap_or_default())).collect();
            (name, config, layers)
        } else {
            return Err(pull_error(
                archive,
                "neither manifest.json (docker save) nor index.json (OCI layout) is in it",
            ));
        };
        let config = read_json(&config_name)?;
        let config_digest =
            config_name.rsplit(['/']).next().unwrap_or_default().trim_end_matches(".json").to_string();
        let layers = layer_names
            .iter()
            .map(|l| {
                blobs.get(l).copied().ok_or_else(|| pull_error(archive, format!("layer {l} is missing")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Image { archive: archive.to_path_buf(), name, config, config_digest, layers })
    }

    /// nitro-cli's default ImageName: the image reference before its tag.
    pub fn name(&self) -> String {
        match self.name.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => name.to_string(),
            _ => self.name.clone(),
        }
    }

    /// nitro-cli's default ImageVersion: the image ID without `sha256:`.
    pub fn id_hex(&self) -> String {
        self.config_digest.trim_start_matches("sha256:").to_string()
    }

    /// The image config's `created` time, if it is a plausible RFC 3339 timestamp (it is untrusted
    /// and goes into the image's metadata).
    pub fn created(&self) -> Option<String> {
        let created = self.config["created"].as_str()?;
        let plausible = (20..=40).contains(&created.len())
            && created.as_bytes()[..4].iter().all(u8::is_ascii_digit)
            && created.bytes().all(|b| b.is_ascii_digit() || b"-:.+TZ".contains(&b));
        plausible.then(|| created.to_string())
    }

    /// The metadata's DockerInfo: what `docker image inspect` would show of the image.
    pub fn docker_info(&self) -> Value {
        serde_json::json!({
            "Id": format!("sha256:{}", self.id_hex()),
            "RepoTags": if self.name.is_empty() { vec![] } else { vec![self.name.clone()] },
            "Architecture": self.config["architecture"],
            "Os": self.config["os"],
            "Created": self.config["created"],
            "Config": self.config["config"],
            "RootFS": self.config["rootfs"],
        })
    }

    /// The customer ramdisk: the image's filesystem under `rootfs/`, its entrypoint and
    /// command in `cmd` and its environment in `env`, one item per line.
    pub fn customer_ramdisk(&self) -> Result<SectionInput<'static>, NitroError> {
        let mut tree = BTreeMap::<String, Node>::new();
        for (index, blob) in self.layers.iter().enumerate() {
            self.apply_layer(index, *blob, &mut tree)?;
        }
        let config = &self.config["config"];
        let strings = |value: &Value| -> Vec<String> {
            value
                .as_array()
                .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
                .unwrap_or_default()
        };
        // nitro-cli's rule, not Docker's: Cmd when the image has one (even empty), and then its
        // Entrypoint is ignored; else the Entrypoint.
        let cmd = match (&config["Cmd"], &config["Entrypoint"]) {
            (Value::Array(_), _) => strings(&config["Cmd"]),
            (_, Value::Array(_)) => strings(&config["Entrypoint"]),
            _ => {
                return Err(NitroError::new(
                    ErrorCode::EIF_BUILDING,
                    format!("the image {} has neither a Cmd nor an Entrypoint to run", self.name()),
                ))
            }
        };
        let lines =
            |items: Vec<String>| items.iter().map(|i| format!("{i}\n")).collect::<String>().into_bytes();

        let mut entries = vec![CpioEntry::directory("rootfs", 0o755)];
        for (path, node) in tree {
            entries.push(node.entry.renamed(format!("rootfs/{path}")));
        }
        entries.push(CpioEntry::bytes("cmd", 0o644, lines(cmd)));
        entries.push(CpioEntry::bytes("env", 0o644, lines(strings(&config["Env"]))));
        let stream = CpioStream::new(entries);
        let len = stream.len();
        Ok(SectionInput::new("the customer ramdisk", stream, len))
    }

    fn apply_layer(
        &self,
        index: usize,
        blob: Blob,
        tree: &mut BTreeMap<String, Node>,
    ) -> Result<(), NitroError> {
        let layer_error =
            |e: io::Error| pull_error(&self.archive, format!("layer {index} is not a readable tar: {e}"));
        let mut magic = [0u8; 4];
        let read = blob_reader(&self.archive, blob)?.read(&mut magic).map_err(layer_error)?;
        if read == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
            return Err(pull_error(
                &self.archive,
                format!("layer {index} is zstd-compressed, which carve cannot unpack"),
            ));
        }
        // Compressed layers are unpacked once to a temporary file, so file contents can be read
        // again (at their offsets) when the ramdisk is written.
        let (source, base, len) = if magic[..2] == [0x1f, 0x8b] {
            let mut unpacked = tempfile_in_tmp().map_err(|e| pull_error(&self.archive, e))?;
            io::copy(&mut flate2::read::GzDecoder::new(blob_reader(&self.archive, blob)?), &mut unpacked)
                .map_err(layer_error)?;
            let len = unpacked.metadata().map_err(layer_error)?.len();
            (unpacked, 0, len)
        } else {
            let archive =
                File::open(&self.archive).map_err(|e| NitroError::file(&self.archive, "open", e))?;
            (archive, blob.offset, blob.size)
        };
        let source = std::sync::Arc::new(source);
        let mut reader = source.as_ref();
        reader.seek(SeekFrom::Start(base)).map_err(layer_error)?;
        let mut tar = tar::Archive::new(BufReader::new(reader.take(len)));
        for entry in tar.entries().map_err(layer_error)? {
            let entry = entry.map_err(layer_error)?;
            let raw = entry.path().map_err(layer_error)?.to_string_lossy().into_owned();
            let path = normalize(&raw);
            if path.is_empty() {
                continue;
            }
            let (parent, file) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
            if file == ".wh..wh..opq" {
                let prefix = format!("{parent}/");
                tree.retain(|p, node| !(p.starts_with(&prefix) && node.layer < index));
                continue;
            }
            if let Some(hidden) = file.strip_prefix(".wh.") {
                let target =
                    if parent.is_empty() { hidden.to_string() } else { format!("{parent}/{hidden}") };
                let prefix = format!("{target}/");
                tree.retain(|p, _| p != &target && !p.starts_with(&prefix));
                continue;
            }
            let header = entry.header();
            let mode = header.mode().unwrap_or(0o644) & 0o7777;
            let (uid, gid, mtime) =
                (header.uid().unwrap_or(0), header.gid().unwrap_or(0), header.mtime().unwrap_or(0));
            let kind = match header.entry_type() {
                tar::EntryType::Directory => Kind::Directory,
                tar::EntryType::Symlink => Kind::Symlink(link_name(&entry)?),
                tar::EntryType::Link => {
                    let target = normalize(&link_name(&entry)?);
                    match tree.get(&target) {
                        Some(node) => node.entry.kind.clone(),
                        None => continue,
                    }
                }
                tar::EntryType::Char | tar::EntryType::Block => {
                    let char = header.entry_type() == tar::EntryType::Char;
                    let (major, minor) =
                        (header.device_major().ok().flatten(), header.device_minor().ok().flatten());
                    Kind::Device { char, major: major.unwrap_or(0), minor: minor.unwrap_or(0) }
                }
                tar::EntryType::Fifo => Kind::Fifo,
                tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File {
                    source: source.clone(),
                    offset: base + entry.raw_file_position(),
                    size: entry.size(),
                },
                _ => continue,
            };
            if matches!(kind, Kind::Directory) {
                if let Some(existing) = tree.get_mut(&path) {
                    existing.entry.mode = mode;
                    continue;
                }
            }
            let entry = CpioEntry {
                name: path.clone(),
                mode,
                uid: uid as u32,
                gid: gid as u32,
                mtime: mtime as u32,
                kind,
            };
            tree.insert(path, Node { layer: index, entry });
        }
        Ok(())
    }
}

struct Node {
    layer: usize,
    entry: CpioEntry,
}

fn link_name<R: Read>(entry: &tar::Entry<R>) -> Result<String, NitroError> {
    let name = entry.link_name().ok().flatten().map(|l| l.to_string_lossy().into_owned());
    Ok(name.unwrap_or_default())
}

/// `./usr//bin/` → `usr/bin`; `..` components are dropped so nothing escapes `rootfs/`.
fn normalize(path: &str) -> String {
    path.split('/').filter(|c| !c.is_empty() && *c != "." && *c != "..").collect::<Vec<_>>().join("/")
}

fn pick<'a>(
    items: &'a [Value],
    uri: Option<&str>,
    tags: impl Fn(&Value) -> Vec<String>,
) -> Option<&'a Value> {
    match uri {
        None if items.len() == 1 => items.first(),
        None => None,
        Some(uri) => {
            let with_latest = if uri.rsplit('/').next().is_some_and(|last| last.contains(':')) {
                uri.to_string()
            } else {
                format!("{uri}:latest")
            };
            items.iter().find(|item| tags(item).iter().any(|t| t == uri || *t == with_latest))
        }
    }
}

fn missing_image(archive: &Path, uri: Option<&str>, count: usize) -> NitroError {
    match uri {
        Some(uri) => pull_error(archive, format!("no image tagged {uri} in it")),
        None => pull_error(archive, format!("it holds {count} images; choose one with --docker-uri")),
    }
}

fn blob_reader(archive: &Path, blob: Blob) -> Result<impl Read, NitroError> {
    let mut file = File::open(archive).map_err(|e| NitroError::file(archive, "open", e))?;
    file.seek(SeekFrom::Start(blob.offset)).map_err(|e| NitroError::file(archive, "read", e))?;
    Ok(BufReader::new(file.take(blob.size)))
}

/// An unnamed temporary file: gone when closed, whatever happens.
fn tempfile_in_tmp() -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(std::env::temp_dir())
}

/// The bootstrap ramdisk nitro-cli builds from its blobs: `dev/`, `init` and `nsm.ko`.
pub fn bootstrap_ramdisk(blobs: &Path) -> Result<SectionInput<'static>, NitroError> {
    let file = |name: &str, mode: u32| -> Result<CpioEntry, NitroError> {
        let path = blobs.join(name);
        let source = File::open(&path).map_err(|e| NitroError::file(&path, "open", e))?;
        let size = source.metadata().map_err(|e| NitroError::file(&path, "read", e))?.len();
        Ok(CpioEntry::file(name, mode, std::sync::Arc::new(source), 0, size))
    };
    let mut entries = vec![CpioEntry::directory("dev", 0o755), file("init", 0o755)?];
    // AWS's kernels load the NSM driver from here; carve's enclave kernel has it built in.
    if blobs.join("nsm.ko").exists() {
        entries.push(file("nsm.ko", 0o644)?);
    }
    let stream = CpioStream::new(entries);
    let len = stream.len();
    Ok(SectionInput::new("the bootstrap ramdisk", stream, len))
}
