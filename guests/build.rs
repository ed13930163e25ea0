//! Guests in src/bin/ load at 1 MiB (link.ld); those in src/low/ below it (low.ld).
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    for (source, script) in [("src/bin", "link.ld"), ("src/low", "low.ld")] {
        for entry in std::fs::read_dir(format!("{dir}/{source}")).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if let Some(bin) = name.strip_suffix(".rs") {
                println!("cargo:rustc-link-arg-bin={bin}=-T{dir}/{script}");
            }
        }
    }
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=low.ld");
    println!("cargo:rerun-if-changed=src/bin");
    println!("cargo:rerun-if-changed=src/low");
}
