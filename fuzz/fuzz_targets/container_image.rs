//! Container images are untrusted: a `docker save` or OCI archive (mode 0), or one layer of
//! an image (mode 1: a tar, gzip or zstd stream with whiteouts, links and devices) becomes the
//! customer ramdisk. Nothing may panic, and a ramdisk that is made must be as long as it says.
#![no_main]

use std::io::{Read, Write};

use carve_image::Image;
use libfuzzer_sys::fuzz_target;

fn file_of(bytes: &[u8]) -> std::fs::File {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(bytes).unwrap();
    file
}

/// A docker-save archive whose one layer is `layer`.
fn wrap_layer(layer: &[u8]) -> Vec<u8> {
    let config = br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/app"],"Env":["A=1"]}}"#;
    let manifest = br#"[{"Config":"config.json","RepoTags":["fuzz:1"],"Layers":["layer.tar"]}]"#;
    let mut archive = tar::Builder::new(Vec::new());
    for (name, data) in [("manifest.json", &manifest[..]), ("config.json", &config[..]), ("layer.tar", layer)] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        archive.append_data(&mut header, name, data).unwrap();
    }
    archive.into_inner().unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let archive = if mode % 2 == 0 { rest.to_vec() } else { wrap_layer(rest) };
    let Ok(image) = Image::from_archive(file_of(&archive), "fuzz", None) else { return };
    let _ = (image.name(), image.id_hex(), image.created(), image.docker_info());
    if let Ok(ramdisk) = image.customer_ramdisk() {
        let (mut reader, len) = (ramdisk.reader, ramdisk.len);
        let mut sink = Vec::new();
        // Bounded: a layer may describe large (sparse) files.
        let read = reader.by_ref().take(64 << 20).read_to_end(&mut sink).unwrap();
        if len <= 64 << 20 {
            assert_eq!(read as u64, len);
        }
    }
});
