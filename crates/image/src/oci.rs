//! An image's config and layers, wherever they came from: `docker save` archives
//! (manifest.json), OCI image-layout tarballs (index.json) or a registry. Its layers are
//! applied with whiteouts into the customer ramdisk nitro-cli builds (`rootfs/…`, `cmd`,
//! `env`); the bootstrap ramdisk comes from the blobs directory (`dev/`, `init`, `nsm.ko`).
//! Layers are streamed; only the file table is kept in memory.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use carve_eif::SectionInput;
use serde_json::Value;

use crate::cpio::{CpioEntry, CpioStream, Kind};
use crate::ImageError;

/// JSON documents (manifests, configs) are small; refuse absurd ones.
pub(crate) const MAX_JSON: u64 = 16 << 20;

/// `size` bytes of `file` from `offset`: an archive member, or a whole pulled blob.
#[derive(Clone)]
pub(crate) struct Blob {
    file: Arc<File>,
    offset: u64,
    size: u64,
}

impl Blob {
    pub(crate) fn whole(file: File) -> io::Result<Blob> {
        let size = file.metadata()?.len();
        Ok(Blob { file: Arc::new(file), offset: 0, size })
    }

    /// Reads at offsets, so readers of one file never disturb each other.
    fn reader(&self) -> BlobReader {
        BlobReader { file: self.file.clone(), at: self.offset, end: self.offset + self.size }
    }
}

struct BlobReader {
    file: Arc<File>,
    at: u64,
    end: u64,
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min((self.end - self.at).try_into().unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

pub struct Image {
    /// What messages name: the archive's path or the image's reference.
    source: String,
    name: String,
    config: Value,
    config_digest: String,
    layers: Vec<Blob>,
}

impl Image {
    /// Finds the image in `archive`: the one tagged `uri` (or the only one when no `uri`).
    pub fn open(archive: &Path, uri: Option<&str>) -> Result<Image, ImageError> {
        let file = File::open(archive).map_err(|e| ImageError::file(archive, "open", e))?;
        Image::from_archive(file, &archive.display().to_string(), uri)
    }

    /// As [`Image::open`], for an archive already open (a daemon's export); `source` names it.
    pub fn from_archive(file: File, source: &str, uri: Option<&str>) -> Result<Image, ImageError> {
        let pull_error = |message: String| ImageError::Pull(format!("{source}: {message}"));
        let archive = Blob::whole(file).map_err(|e| pull_error(format!("cannot read it: {e}")))?;
        let mut blobs = BTreeMap::new();
        let mut tar = tar::Archive::new(BufReader::new(archive.reader()));
        let entries = tar.entries().map_err(|e| pull_error(format!("not a tar archive: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| pull_error(format!("not a tar archive: {e}")))?;
            let path = entry
                .path()
                .map_err(|e| pull_error(e.to_string()))?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_string();
            let member =
                Blob { file: archive.file.clone(), offset: entry.raw_file_position(), size: entry.size() };
            blobs.insert(path, member);
        }
        let read_json = |name: &str| -> Result<Value, ImageError> {
            let blob = blobs.get(name).ok_or_else(|| pull_error(format!("{name} is missing")))?;
            serde_json::from_slice(&read_small(blob).map_err(|e| pull_error(format!("{name}: {e}")))?)
                .map_err(|e| pull_error(format!("{name} is not JSON: {e}")))
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
                .ok_or_else(|| pull_error(missing_image(uri, images.len())))?;
            let name = uri.map(String::from).or_else(|| tags(image).into_iter().next()).unwrap_or_default();
            let config =
                image["Config"].as_str().ok_or_else(|| pull_error("manifest.json has no Config".into()))?;
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
                .ok_or_else(|| pull_error(missing_image(uri, manifests.len())))?;
            let name = uri.map(String::from).or_else(|| tags(entry).into_iter().next()).unwrap_or_default();
            let mut manifest = read_json(&digest_path(entry["digest"].as_str().unwrap_or_default()))?;
            if manifest["manifests"].is_array() {
                let all = manifest["manifests"].as_array().cloned().unwrap_or_default();
                let platforms: Vec<(String, String)> = all.iter().map(platform_of).collect();
                let chosen = choose_platform(&platforms).map_err(pull_error)?;
                manifest = read_json(&digest_path(all[chosen]["digest"].as_str().unwrap_or_default()))?;
            }
            let config = digest_path(manifest["config"]["digest"].as_str().unwrap_or_default());
            let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
            let layers =
                layers.iter().map(|l| digest_path(l["digest"].as_str().unwrap_or_default())).collect();
            (name, config, layers)
        } else {
            return Err(pull_error(
                "neither manifest.json (docker save) nor index.json (OCI layout) is in it".into(),
            ));
        };
        let config = read_json(&config_name)?;
        let config_digest =
            config_name.rsplit(['/']).next().unwrap_or_default().trim_end_matches(".json").to_string();
        let layers = layer_names
            .iter()
            .map(|l| blobs.get(l).cloned().ok_or_else(|| pull_error(format!("layer {l} is missing"))))
            .collect::<Result<_, _>>()?;
        Ok(Image { source: source.to_string(), name, config, config_digest, layers })
    }

    #[cfg_attr(not(feature = "registry"), allow(dead_code))]
    /// An image pulled from a registry, its config and layers already checked against their
    /// digests.
    pub(crate) fn from_pulled(
        name: String,
        config: &[u8],
        config_digest: String,
        layers: Vec<Blob>,
    ) -> Result<Image, ImageError> {
        let config = serde_json::from_slice(config)
            .map_err(|e| ImageError::Pull(format!("{name}: its config is not JSON: {e}")))?;
        Ok(Image { source: name.clone(), name, config, config_digest, layers })
    }

    #[cfg_attr(not(feature = "registry"), allow(dead_code))]
    /// The same image under the reference the user gave.
    pub(crate) fn named(mut self, name: &str) -> Image {
        self.name = name.to_string();
        self
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
    pub fn customer_ramdisk(&self) -> Result<SectionInput<'static>, ImageError> {
        let mut tree = BTreeMap::<String, Node>::new();
        for (index, blob) in self.layers.iter().enumerate() {
            self.apply_layer(index, blob, &mut tree)?;
        }
        // Layers may leave out the directories their files are in; the kernel, unpacking the
        // ramdisk, makes none, so such files would silently not be there.
        let mut missing = BTreeSet::new();
        for path in tree.keys() {
            for (end, _) in path.match_indices('/') {
                match tree.get(&path[..end]).map(|node| &node.entry.kind) {
                    None => drop(missing.insert(path[..end].to_string())),
                    Some(Kind::Directory) => {}
                    // (layers are applied so this cannot happen; a ramdisk must never hold it)
                    Some(_) => {
                        return Err(ImageError::Pull(format!(
                            "{}: {path} is under {}, which is not a directory",
                            self.source,
                            &path[..end]
                        )))
                    }
                }
            }
        }
        for dir in missing {
            let entry = CpioEntry::directory(&dir, 0o755);
            tree.insert(dir, Node { layer: self.layers.len(), entry });
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
                return Err(ImageError::Unusable(format!(
                    "the image {} has neither a Cmd nor an Entrypoint to run",
                    self.name()
                )))
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

    /// Applies layer `index` onto `tree`, with the whiteouts of the OCI image spec.
    fn apply_layer(
        &self,
        index: usize,
        blob: &Blob,
        tree: &mut BTreeMap<String, Node>,
    ) -> Result<(), ImageError> {
        let layer_error = |what: String| ImageError::Pull(format!("{}: layer {index} {what}", self.source));
        let unreadable = |e: io::Error| layer_error(format!("is not a readable tar: {e}"));
        let mut magic = [0u8; 4];
        let read = blob.reader().read(&mut magic).map_err(unreadable)?;
        // Compressed layers are unpacked once to a temporary file, so file contents can be read
        // again (at their offsets) when the ramdisk is written.
        let unpack = |decoder: &mut dyn Read| -> Result<Blob, ImageError> {
            let mut unpacked =
                anonymous_file().map_err(|e| layer_error(format!("cannot be unpacked: {e}")))?;
            io::copy(decoder, &mut unpacked).map_err(unreadable)?;
            Blob::whole(unpacked).map_err(unreadable)
        };
        let tar_bytes = if read == 4 && magic == ZSTD_MAGIC {
            let mut decoder = ruzstd::decoding::StreamingDecoder::new(BufReader::new(blob.reader()))
                .map_err(|e| layer_error(format!("is not valid zstd: {e}")))?;
            unpack(&mut decoder)?
        } else if read >= 2 && magic[..2] == GZIP_MAGIC {
            unpack(&mut flate2::read::MultiGzDecoder::new(BufReader::new(blob.reader())))?
        } else {
            blob.clone()
        };
        let mut tar = tar::Archive::new(BufReader::new(tar_bytes.reader()));
        for entry in tar.entries().map_err(unreadable)? {
            let entry = entry.map_err(unreadable)?;
            let raw = entry.path().map_err(unreadable)?.to_string_lossy().into_owned();
            // (the kernel's unpacker skips longer names; they would only cost time here)
            if raw.len() > MAX_PATH || link_name(&entry).len() > MAX_PATH {
                return Err(layer_error(format!("has a path or link longer than {MAX_PATH} bytes")));
            }
            let escapes = |what: &str| layer_error(format!("has {what}, which escapes the image's root"));
            let path = normalize(&raw).ok_or_else(|| escapes(&format!("the path {raw:?}")))?;
            let path = resolve_parents(tree, &path).ok_or_else(|| {
                layer_error(format!("has the path {raw:?} through a loop of symbolic links"))
            })?;
            if path.is_empty() {
                continue;
            }
            let (parent, file) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
            if file == ".wh..wh..opq" {
                let lower: Vec<String> = under(tree, parent)
                    .filter(|(_, node)| node.layer < index)
                    .map(|(p, _)| p.clone())
                    .collect();
                for path in lower {
                    tree.remove(&path);
                }
                continue;
            }
            if let Some(hidden) = file.strip_prefix(".wh.") {
                let target =
                    if parent.is_empty() { hidden.to_string() } else { format!("{parent}/{hidden}") };
                remove_under(tree, &target);
                tree.remove(&target);
                continue;
            }
            let header = entry.header();
            let mode = header.mode().unwrap_or(0o644) & 0o7777;
            let (uid, gid, mtime) =
                (header.uid().unwrap_or(0), header.gid().unwrap_or(0), header.mtime().unwrap_or(0));
            let kind = match header.entry_type() {
                tar::EntryType::Directory => Kind::Directory,
                tar::EntryType::Symlink => {
                    let target = link_name(&entry);
                    // As Docker: a relative target is resolved from the link's directory and
                    // must stay inside; an absolute one is resolved in the enclave's chroot.
                    if !target.starts_with('/') && normalize(&format!("{parent}/{target}")).is_none() {
                        return Err(escapes(&format!("the link {raw} -> {target}")));
                    }
                    Kind::Symlink(target)
                }
                tar::EntryType::Link => {
                    let target = link_name(&entry);
                    let resolved = normalize(&target)
                        .and_then(|target| resolve_parents(tree, &target))
                        .ok_or_else(|| escapes(&format!("the hard link {raw} -> {target}")))?;
                    match tree.get(&resolved) {
                        Some(node) => node.entry.kind.clone(),
                        None => {
                            return Err(layer_error(format!(
                                "has the hard link {raw} to {target}, which the image does not hold"
                            )))
                        }
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
                    source: tar_bytes.file.clone(),
                    offset: tar_bytes.offset + entry.raw_file_position(),
                    size: entry.size(),
                },
                _ => continue,
            };
            // As Docker unpacks a layer: a directory over a directory only takes its mode;
            // anything else replaces what was there. Nothing stays under a non-directory — not
            // even files of a parent no entry had made: `a/init` then `a -> /` would otherwise
            // have the kernel write through the link over the enclave's /init.
            match (tree.get_mut(&path), &kind) {
                (Some(existing), Kind::Directory) if matches!(existing.entry.kind, Kind::Directory) => {
                    existing.entry.mode = mode;
                    continue;
                }
                (_, Kind::Directory) => {}
                _ => remove_under(tree, &path),
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

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

struct Node {
    layer: usize,
    entry: CpioEntry,
}

fn link_name<R: Read>(entry: &tar::Entry<R>) -> String {
    entry.link_name().ok().flatten().map(|l| l.to_string_lossy().into_owned()).unwrap_or_default()
}

/// `./usr//bin/../lib/` → `usr/lib`, relative to the image's root; `None` when `..` would
/// leave it.
fn normalize(path: &str) -> Option<String> {
    let mut parts = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            name => parts.push(name),
        }
    }
    Some(parts.join("/"))
}

/// `path` (normalized) with each directory on the way followed through the symbolic links
/// already in `tree`, inside the image's root as Docker follows them: an absolute target starts
/// at the root, and `..` at the root stays there. Without this a layer holding `x -> /` and then
/// `x/init` would have the kernel, unpacking the ramdisk, write through the link over the
/// enclave's own `/init`. `None` for a loop of links.
fn resolve_parents(tree: &BTreeMap<String, Node>, path: &str) -> Option<String> {
    let mut resolved = String::new();
    // Where each component of `resolved` starts, to go back one for `..`.
    let mut starts: Vec<usize> = Vec::new();
    let mut pending: VecDeque<&str> = path.split('/').collect();
    let mut links = 0;
    while let Some(component) = pending.pop_front() {
        match component {
            "" | "." => continue,
            ".." => {
                if let Some(start) = starts.pop() {
                    resolved.truncate(start.saturating_sub(1));
                }
                continue;
            }
            name => {
                starts.push(if resolved.is_empty() { 0 } else { resolved.len() + 1 });
                if !resolved.is_empty() {
                    resolved.push('/');
                }
                resolved.push_str(name);
            }
        }
        // The last component is the entry itself, never followed.
        if pending.iter().all(|c| c.is_empty() || *c == ".") {
            break;
        }
        if let Some(Kind::Symlink(target)) = tree.get(&resolved).map(|n| &n.entry.kind) {
            links += 1;
            if links > MAX_LINKS {
                return None;
            }
            let start = starts.pop().unwrap_or(0);
            resolved.truncate(start.saturating_sub(1));
            if target.starts_with('/') {
                resolved.clear();
                starts.clear();
            }
            for part in target.split('/').rev() {
                pending.push_front(part);
            }
        }
    }
    Some(resolved)
}

/// The entries under directory `dir` ("" for the root), in order.
fn under<'a>(tree: &'a BTreeMap<String, Node>, dir: &str) -> impl Iterator<Item = (&'a String, &'a Node)> {
    // Paths under `dir/` sort between `dir/` and `dir0` ('0' follows '/').
    let (from, to) =
        if dir.is_empty() { (String::new(), None) } else { (format!("{dir}/"), Some(format!("{dir}0"))) };
    let range = match to {
        Some(to) => tree.range(from..to),
        None => tree.range(from..),
    };
    range
}

/// Removes everything under `path`, not `path` itself.
fn remove_under(tree: &mut BTreeMap<String, Node>, path: &str) {
    let below: Vec<String> = under(tree, path).map(|(p, _)| p.clone()).collect();
    for p in below {
        tree.remove(&p);
    }
}

/// Linux's PATH_MAX: longer names and link targets are refused.
const MAX_PATH: usize = 4096;

/// Links followed for one path before it counts as a loop (Linux's own limit).
const MAX_LINKS: usize = 40;

/// A JSON document's bytes, at most [`MAX_JSON`].
fn read_small(blob: &Blob) -> Result<Vec<u8>, String> {
    if blob.size > MAX_JSON {
        return Err("larger than 16 MiB".into());
    }
    let mut bytes = Vec::new();
    blob.reader().read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// An image index entry's `os/architecture`.
fn platform_of(entry: &Value) -> (String, String) {
    let field = |name: &str| entry["platform"][name].as_str().unwrap_or("unknown").to_string();
    (field("os"), field("architecture"))
}

/// The linux/amd64 image of an index: enclaves are x86-64 Linux. Entries without a platform
/// are attestation manifests and the like, not images.
pub(crate) fn choose_platform(platforms: &[(String, String)]) -> Result<usize, String> {
    platforms.iter().position(|(os, arch)| os == "linux" && arch == "amd64").ok_or_else(|| {
        let offered: Vec<String> = platforms
            .iter()
            .filter(|(os, _)| os != "unknown")
            .map(|(os, arch)| format!("{os}/{arch}"))
            .collect();
        format!("its image index has no linux/amd64 image (it has {})", offered.join(", "))
    })
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

fn missing_image(uri: Option<&str>, count: usize) -> String {
    match uri {
        Some(uri) => format!("no image tagged {uri} in it"),
        None => format!("it holds {count} images; choose one with --docker-uri"),
    }
}

/// An unnamed temporary file, gone when closed whatever happens (O_TMPFILE where the
/// filesystem has it, else created and unlinked at once).
pub(crate) fn anonymous_file() -> io::Result<File> {
    tempfile::tempfile()
}

/// The bootstrap ramdisk nitro-cli builds from its blobs: `dev/`, `init` and `nsm.ko`.
pub fn bootstrap_ramdisk(blobs: &Path) -> Result<SectionInput<'static>, ImageError> {
    let file = |name: &str, mode: u32| -> Result<CpioEntry, ImageError> {
        let path = blobs.join(name);
        let source = File::open(&path).map_err(|e| ImageError::file(&path, "open", e))?;
        let size = source.metadata().map_err(|e| ImageError::file(&path, "read", e))?.len();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(links: &[(&str, &str)]) -> BTreeMap<String, Node> {
        let link = |(path, target): &(&str, &str)| {
            let entry =
                CpioEntry { kind: Kind::Symlink(target.to_string()), ..CpioEntry::directory(path, 0o777) };
            (path.to_string(), Node { layer: 0, entry })
        };
        links.iter().map(link).collect()
    }

    #[test]
    fn paths_through_links_stay_in_the_root() {
        let tree = tree(&[("up", "../../.."), ("root", "/"), ("lib", "usr/lib"), ("a", "b"), ("b", "a")]);
        assert_eq!(resolve_parents(&tree, "root/init").as_deref(), Some("init"));
        assert_eq!(resolve_parents(&tree, "root/root/etc/x").as_deref(), Some("etc/x"));
        assert_eq!(resolve_parents(&tree, "up/etc/passwd").as_deref(), Some("etc/passwd"));
        assert_eq!(resolve_parents(&tree, "lib/libc.so").as_deref(), Some("usr/lib/libc.so"));
        // The entry itself is never followed: a new `root` replaces the link.
        assert_eq!(resolve_parents(&tree, "root").as_deref(), Some("root"));
        assert_eq!(resolve_parents(&tree, "a/x"), None, "a loop");
    }
}
