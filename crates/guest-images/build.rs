//! Builds the `guests/` workspace for `x86_64-unknown-none` with a nested cargo, once with the
//! PVH note (PVH + multiboot ELFs) and once without (multiboot-only ELFs), and wraps each PVH
//! ELF as a bzImage (Linux boot-protocol setup header + flat image, 64-bit entry at +0x200).
//! Also builds `guests/linux/tools`, static Linux programs for Linux test guests' initramfs, and
//! the example enclave app `examples/attest` that the Linux enclave tests package as an image.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use object::{Object, ObjectSegment};

const LOAD_ADDRESS: u64 = 0x10_0000;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let guests = manifest.join("../../guests").canonicalize().expect("guests/ directory");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed={}", guests.join("src").display());
    println!("cargo:rerun-if-changed={}", guests.join("Cargo.toml").display());
    println!("cargo:rerun-if-changed={}", guests.join("link.ld").display());
    println!("cargo:rerun-if-changed={}", guests.join("low.ld").display());
    println!("cargo:rerun-if-changed={}", guests.join("build.rs").display());
    println!("cargo:rerun-if-changed={}", guests.join(".cargo/config.toml").display());

    let tools = guests.join("linux/tools");
    let attest = manifest.join("../../examples/attest").canonicalize().expect("examples/attest");
    for dir in [&tools, &attest] {
        for path in ["src", "Cargo.toml", "Cargo.lock"] {
            println!("cargo:rerun-if-changed={}", dir.join(path).display());
        }
    }

    let pvh = build_guests(&guests, &out.join("target-pvh"), &[]);
    let multiboot = build_guests(&guests, &out.join("target-multiboot"), &["--no-default-features"]);
    let linux_tools = nested_build(&tools, &out.join("target-linux"), "x86_64-unknown-linux-musl", &[]);
    fs::copy(linux_tools.join("vsock-nc"), out.join("vsock-nc")).unwrap();
    let example = nested_build(&attest, &out.join("target-attest"), "x86_64-unknown-linux-musl", &[]);
    fs::copy(example.join("attest"), out.join("attest")).unwrap();
    let names = guest_names(&guests.join("src/bin"));
    let low_names = guest_names(&guests.join("src/low"));
    let quoted = |names: &[String]| names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ");
    let generated = format!(
        "/// The guests `guests/src/bin/` defines.\npub const GUESTS: &[&str] = &[{}];\n\
         /// The guests `guests/src/low/` defines.\npub const LOW_GUESTS: &[&str] = &[{}];\n",
        quoted(&names),
        quoted(&low_names)
    );
    fs::write(out.join("guest_names.rs"), generated).unwrap();
    for name in &names {
        let elf = fs::read(pvh.join(name)).expect("guest ELF");
        fs::write(out.join(format!("{name}.elf")), &elf).unwrap();
        fs::write(out.join(format!("{name}.bzimage")), bzimage(&elf)).unwrap();
        fs::copy(multiboot.join(name), out.join(format!("{name}.multiboot.elf"))).unwrap();
    }
    // Guests linked below 1 MiB (guests/src/low/): multiboot ELFs only.
    for name in &low_names {
        fs::copy(multiboot.join(name), out.join(format!("{name}.multiboot.elf"))).unwrap();
    }
    write_demo_eif(&fs::read(out.join("demo.bzimage")).unwrap(), &out.join("demo.eif"));
}

/// The demo enclave: the demo guest (bzImage form) as an EIF's kernel, with an empty newc
/// ramdisk (an EIF needs one). Fixed metadata keeps the image, and so its PCRs, reproducible.
fn write_demo_eif(bzimage: &[u8], path: &Path) {
    use carve_eif::metadata::{BuildInfo, IdentityInfo};
    use carve_eif::{EifBuilder, SectionInput};
    let ramdisk = empty_newc_archive();
    let identity = IdentityInfo {
        image_name: "carve-demo".into(),
        image_version: env::var("CARGO_PKG_VERSION").unwrap(),
        build_info: BuildInfo {
            build_time: "1970-01-01T00:00:00Z".into(),
            build_tool: "carve".into(),
            build_tool_version: env::var("CARGO_PKG_VERSION").unwrap(),
            operating_system: "carve demo guest".into(),
            kernel_version: "carve-demo".into(),
        },
        docker_info: serde_json::json!({}),
        custom_metadata: serde_json::json!({}),
    };
    let mut file = fs::File::create(path).unwrap();
    EifBuilder::new(SectionInput::bytes("demo.bzimage", bzimage), DEMO_CMDLINE, identity.to_json())
        .ramdisk(SectionInput::bytes("demo-ramdisk.cpio", &ramdisk))
        .write(&mut file)
        .expect("writing the demo EIF");
}

/// What the demo enclave's kernel is started with (and measured with).
const DEMO_CMDLINE: &str = "console=ttyS0";

/// A newc cpio archive holding only its trailer.
fn empty_newc_archive() -> Vec<u8> {
    let name = b"TRAILER!!!\0";
    let mut archive = format!("070701{:08x}{:08x}{}", 0, 0, "00000000".repeat(9)).into_bytes();
    archive.extend_from_slice(format!("{:08x}{:08x}", name.len(), 0).as_bytes());
    archive.extend_from_slice(name);
    while archive.len() % 4 != 0 {
        archive.push(0);
    }
    archive
}

/// The guest binaries one directory of `guests/src/` holds (a file each).
fn guest_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("a guests/src/ directory")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.strip_suffix(".rs").map(str::to_string))
        .collect();
    names.sort();
    names
}

fn build_guests(guests: &Path, target_dir: &Path, extra: &[&str]) -> PathBuf {
    nested_build(guests, target_dir, "x86_64-unknown-none", extra)
}

/// `cargo build --release` of the package in `dir` for `target`; returns where its binaries are.
fn nested_build(dir: &Path, target_dir: &Path, target: &str, extra: &[&str]) -> PathBuf {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(dir)
        .args(["build", "--release", "--locked", "--target", target, "--target-dir"])
        .arg(target_dir)
        .args(extra);
    // The host build's flags and target settings must not leak into the guest build.
    // (Nor does `cargo clippy`'s wrapper: the nested build is compiled, not linted.)
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
    ] {
        command.env_remove(var);
    }
    for (key, _) in env::vars() {
        if key.starts_with("CARGO_FEATURE_") || key.starts_with("CARGO_CFG_") {
            command.env_remove(key);
        }
    }
    let status = command.status().expect("running cargo for guests/");
    if !status.success() {
        panic!("building {} failed; is the target installed? Run: rustup target add {target}", dir.display());
    }
    target_dir.join(target).join("release")
}

/// Lays the ELF's loadable segments out flat from `LOAD_ADDRESS` and prepends a boot sector and
/// one setup sector carrying a Linux boot-protocol 2.15 header.
fn bzimage(elf: &[u8]) -> Vec<u8> {
    let file = object::File::parse(elf).expect("guest ELF parses");
    let mut flat = Vec::new();
    let mut memory_end = LOAD_ADDRESS;
    for segment in file.segments() {
        let data = segment.data().expect("segment data");
        let start = segment.address();
        memory_end = memory_end.max(start + segment.size());
        if data.is_empty() {
            continue;
        }
        let offset = (start - LOAD_ADDRESS) as usize;
        if flat.len() < offset + data.len() {
            flat.resize(offset + data.len(), 0);
        }
        flat[offset..offset + data.len()].copy_from_slice(data);
    }

    const SETUP_SECTS: u8 = 1;
    let mut image = vec![0u8; 512 * (1 + SETUP_SECTS as usize)];
    let put = |image: &mut Vec<u8>, offset: usize, bytes: &[u8]| {
        image[offset..offset + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut image, 0x1f1, &[SETUP_SECTS]);
    put(&mut image, 0x1f4, &(flat.len().div_ceil(16) as u32).to_le_bytes()); // syssize
    put(&mut image, 0x1fa, &0xffffu16.to_le_bytes()); // vid_mode: normal
    put(&mut image, 0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(&mut image, 0x200, &[0xeb, 0x66]); // jmp to end of header (never used in 64-bit boot)
    put(&mut image, 0x202, b"HdrS");
    put(&mut image, 0x206, &0x020fu16.to_le_bytes()); // protocol 2.15
    put(&mut image, 0x211, &[0x01]); // loadflags: LOADED_HIGH
    put(&mut image, 0x214, &(LOAD_ADDRESS as u32).to_le_bytes()); // code32_start
    put(&mut image, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(&mut image, 0x230, &0x1000u32.to_le_bytes()); // kernel_alignment
    put(&mut image, 0x236, &0x0001u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(&mut image, 0x238, &0xffffu32.to_le_bytes()); // cmdline_size
    put(&mut image, 0x258, &LOAD_ADDRESS.to_le_bytes()); // pref_address
    put(&mut image, 0x260, &((memory_end - LOAD_ADDRESS) as u32).to_le_bytes()); // init_size
    image.extend_from_slice(&flat);
    image
}
