//! Guest memory backings and KSM (docs/memory.md): every `--memory` backing boots the `persist`
//! guest, which writes a memory pattern and checks it at every tick; two identical guests with
//! `mergeable=on` see their pages merged by ksmd and still read their own data after one of
//! them rewrites its pattern; bad specifications and enclaves asking to merge get one line.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

/// The guests here spin between ticks: one test's VMs at a time on our two-core hosts.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serialise() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// `carve vm run` of the persist guest with `--memory MEMORY`, its serial in `dir/NAME.serial`.
fn start_persist(dir: &Path, name: &str, memory: &str, cmdline: &str) -> (Vm, PathBuf) {
    let serial = dir.join(format!("{name}.serial"));
    let _ = std::fs::remove_file(&serial);
    let child = Command::new(env!("CARGO_BIN_EXE_carve"))
        .args(["vm", "run", "--kernel"])
        .arg(guest("persist", Format::Multiboot))
        .args(["--memory", memory, "--cmdline", cmdline, "--serial"])
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (Vm(Some(child)), serial)
}

fn serial_text(serial: &Path) -> String {
    std::fs::read_to_string(serial).unwrap_or_default()
}

/// Waits until the serial output contains `what`; the VM must still run meanwhile.
fn wait_for(vm: &mut Vm, serial: &Path, what: &str, limit: Duration) {
    let start = Instant::now();
    while !serial_text(serial).contains(what) {
        if let Some(status) = vm.0.as_mut().unwrap().try_wait().unwrap() {
            let out = std::mem::replace(vm, Vm(None)).0.take().map(|c| c.wait_with_output().unwrap());
            panic!(
                "the VM ended ({status}) before '{what}':\n{}\n{}",
                serial_text(serial),
                out.map(|o| stderr(&o)).unwrap_or_default()
            );
        }
        assert!(start.elapsed() < limit, "no '{what}' within {limit:?}:\n{}", serial_text(serial));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts the persist guest ran to its end with every check passed.
fn assert_persist_passed(vm: Vm, serial: &Path, what: &str) {
    let out = vm.wait();
    let text = serial_text(serial);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: the guest failed:\n{text}\n--- stderr ---\n{}",
        stderr(&out)
    );
    assert!(text.contains("ticks, all checks passed"), "{what}:\n{text}");
}

/// The smaps entry of `pid`'s one mapping of at least `size` bytes (the kernel may have joined
/// an anonymous guest mapping to its neighbours): its header line and fields.
fn guest_mapping(pid: u32, size: u64) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut entries: Vec<String> = Vec::new();
    for line in smaps.lines() {
        let is_header = line.split_whitespace().next().is_some_and(|range| {
            range.contains('-') && range.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        });
        match entries.last_mut() {
            Some(entry) if !is_header => {
                entry.push('\n');
                entry.push_str(line);
            }
            _ => entries.push(line.to_string()),
        }
    }
    let kib =
        |entry: &String| smaps_field(entry, "Size:").trim_end_matches(" kB").parse::<u64>().unwrap_or(0);
    let found: Vec<&String> = entries.iter().filter(|e| kib(e) >= size >> 10).collect();
    assert_eq!(found.len(), 1, "one mapping of at least {size} bytes in carve's smaps:\n{found:#?}");
    found[0].clone()
}

fn smaps_field<'a>(entry: &'a str, field: &str) -> &'a str {
    entry.lines().find_map(|l| l.strip_prefix(field)).map(str::trim).unwrap_or_default()
}

/// A hugetlb pool in sysfs, put back as it was found when dropped.
struct HugePool {
    dir: PathBuf,
    found: u64,
}

impl HugePool {
    fn open(kib: u64) -> HugePool {
        let dir = PathBuf::from(format!("/sys/kernel/mm/hugepages/hugepages-{kib}kB"));
        let found = read_number(&dir.join("nr_hugepages"));
        HugePool { dir, found }
    }

    /// Pages a new mapping can reserve now.
    fn available(&self) -> u64 {
        read_number(&self.dir.join("free_hugepages"))
            .saturating_sub(read_number(&self.dir.join("resv_hugepages")))
    }

    /// Grows the pool until `pages` are available; Err says why it could not.
    fn ensure(&self, pages: u64) -> Result<(), String> {
        let available = self.available();
        if available >= pages {
            return Ok(());
        }
        let want = self.found + (pages - available);
        let nr = self.dir.join("nr_hugepages");
        std::fs::write(&nr, want.to_string()).map_err(|e| format!("cannot write {}: {e}", nr.display()))?;
        match self.available() {
            now if now >= pages => Ok(()),
            now => Err(format!(
                "asked {} for {want} pages, it has {} ({now} available)",
                nr.display(),
                read_number(&nr)
            )),
        }
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        let nr = self.dir.join("nr_hugepages");
        if read_number(&nr) != self.found {
            if let Err(e) = std::fs::write(&nr, self.found.to_string()) {
                eprintln!("memory tests: cannot restore {} to {}: {e}", nr.display(), self.found);
            }
        }
    }
}

fn read_number(path: &Path) -> u64 {
    std::fs::read_to_string(path).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

/// Whether this process may change `path` (root on a writable sysfs): write back what it holds.
fn writable(path: &Path) -> Result<(), String> {
    let value = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    std::fs::write(path, value.trim()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The nested KVM of our build hosts emulates the guest's ring 0: a small pattern keeps each
/// tick's check (a read per 64 bytes) short.
const PERSIST: &str = "ticks=20 period_ms=50 pattern_kib=256";

#[test]
fn every_backing_boots_the_persist_guest() {
    if !kvm_usable("every_backing_boots_the_persist_guest") {
        return;
    }
    let _one = serialise();
    let dir = fresh_dir("memory-backings");
    // 136 MiB: a size no other mapping of carve's has, so smaps shows the guest's.
    let size = 136u64 << 20;
    let run = |name: &str, memory: &str, size: u64| -> String {
        let (mut vm, serial) = start_persist(&dir, name, memory, PERSIST);
        wait_for(&mut vm, &serial, "tick 1 ", TIMEOUT);
        let mapping = guest_mapping(vm.pid(), size);
        assert_persist_passed(vm, &serial, memory);
        println!("{memory}: {}", mapping.lines().next().unwrap());
        mapping
    };

    for memory in ["136", "136M,backing=anonymous", "136,backing=anonymous,mergeable=off"] {
        let mapping = run("anonymous", memory, size);
        assert_eq!(smaps_field(&mapping, "KernelPageSize:"), "4 kB", "{mapping}");
        assert!(!smaps_field(&mapping, "VmFlags:").split(' ').any(|f| f == "mg" || f == "sh"), "{mapping}");
    }
    let mapping = run("mergeable", "136,mergeable=on", size);
    assert!(smaps_field(&mapping, "VmFlags:").split(' ').any(|f| f == "mg"), "MADV_MERGEABLE: {mapping}");

    let mapping = run("memfd", "136,backing=memfd", size);
    assert!(mapping.lines().next().unwrap().contains("/memfd:carve-guest-ram"), "{mapping}");
    assert!(smaps_field(&mapping, "VmFlags:").split(' ').any(|f| f == "sh"), "MAP_SHARED: {mapping}");

    // 2 MiB pages: a short pool is one line naming free against needed; then 68 pages.
    let pool = HugePool::open(2048);
    let available = pool.available();
    let memory = format!("{},backing=hugetlb-2m", (available + 4) * 2);
    let out = carve(&["vm", "run", "--demo", "--memory", &memory]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let expected = format!(
        "not enough free 2 MiB hugepages for {} MiB of guest memory: {} needed, {available} free",
        (available + 4) * 2,
        available + 4
    );
    assert!(err.contains(&expected), "{err}");
    println!("short pool: {}", err.trim());
    pool.ensure(size / (2 << 20)).expect("2 MiB hugepages for the guest");
    let mapping = run("hugetlb-2m", "136,backing=hugetlb-2m", size);
    assert_eq!(smaps_field(&mapping, "KernelPageSize:"), "2048 kB", "{mapping}");
    drop(pool);

    // 1 GiB pages: the host must find a free, aligned gigabyte.
    let pool = HugePool::open(1 << 20);
    match pool.ensure(1) {
        Ok(()) => {
            let mapping = run("hugetlb-1g", "1G,backing=hugetlb-1g", 1 << 30);
            assert_eq!(smaps_field(&mapping, "KernelPageSize:"), "1048576 kB", "{mapping}");
        }
        Err(why) => println!("SKIPPED backing=hugetlb-1g: this host cannot allocate a 1 GiB page: {why}"),
    }
    drop(pool);
}

/// KSM's settings, put back as they were found when dropped.
struct KsmSettings {
    saved: Vec<(PathBuf, String)>,
}

const KSM: &str = "/sys/kernel/mm/ksm";

impl KsmSettings {
    /// Err says why ksmd cannot be run from here.
    fn take() -> Result<KsmSettings, String> {
        let dir = Path::new(KSM);
        if !dir.exists() {
            return Err(format!("{KSM} does not exist: this kernel has no KSM"));
        }
        let mut saved = Vec::new();
        for name in ["pages_to_scan", "sleep_millisecs", "run"] {
            let path = dir.join(name);
            writable(&path)?;
            saved.push((path.clone(), std::fs::read_to_string(&path).unwrap().trim().to_string()));
        }
        Ok(KsmSettings { saved })
    }

    fn set(&self, name: &str, value: &str) {
        std::fs::write(Path::new(KSM).join(name), value).unwrap();
    }
}

impl Drop for KsmSettings {
    fn drop(&mut self) {
        for (path, value) in &self.saved {
            if let Err(e) = std::fs::write(path, value) {
                eprintln!("memory tests: cannot restore {} to {value}: {e}", path.display());
            }
        }
    }
}

fn pages_sharing() -> u64 {
    read_number(&Path::new(KSM).join("pages_sharing"))
}

#[test]
fn two_identical_mergeable_guests_share_pages_and_keep_their_own_data() {
    let test = "two_identical_mergeable_guests_share_pages_and_keep_their_own_data";
    if !kvm_usable(test) {
        return;
    }
    let _one = serialise();
    let dir = fresh_dir("memory-ksm");
    let ksm = match KsmSettings::take() {
        Ok(ksm) => ksm,
        Err(why) => {
            println!("{test}: ksmd cannot run here ({why}); checking only that mergeable=on is accepted");
            let (vm, serial) = start_persist(&dir, "alone", "128,mergeable=on", PERSIST);
            assert_persist_passed(vm, &serial, "mergeable=on");
            return;
        }
    };
    // 1 MiB of pattern: 256 pages the same in both guests, at the same guest addresses.
    let pattern_pages = 256;
    let before = pages_sharing();
    ksm.set("pages_to_scan", "10000");
    ksm.set("sleep_millisecs", "10");
    ksm.set("run", "1");
    let (rewrite_at, ticks) = (60, 80);
    let cmdline = |extra: &str| format!("ticks={ticks} period_ms=100 pattern_kib=1024 {extra}");
    let (mut writer, writer_serial) =
        start_persist(&dir, "writer", "128,mergeable=on", &cmdline(&format!("rewrite_at={rewrite_at}")));
    let (mut reader, reader_serial) = start_persist(&dir, "reader", "128,mergeable=on", &cmdline(""));
    wait_for(&mut writer, &writer_serial, "tick 1 ", TIMEOUT);
    wait_for(&mut reader, &reader_serial, "tick 1 ", TIMEOUT);

    // ksmd needs two passes over a page (the second finds it unchanged) before it merges it.
    let start = Instant::now();
    let mut peak = before;
    while peak < before + pattern_pages * 3 / 4 {
        assert!(
            !serial_text(&writer_serial).contains("rewrote"),
            "pages_sharing went only from {before} to {peak} before the rewrite at tick {rewrite_at}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(25),
            "pages_sharing went only from {before} to {peak} in 25 s"
        );
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(pages_sharing());
    }
    let merged_after = start.elapsed();
    // Let it settle a little for the record.
    std::thread::sleep(Duration::from_secs(2));
    let settled = pages_sharing();
    println!(
        "KSM: pages_sharing {before} before, {peak} after {:.1} s, {settled} 2 s later (pattern: {pattern_pages} \
         pages per guest; pages_shared {})",
        merged_after.as_secs_f64(),
        read_number(&Path::new(KSM).join("pages_shared"))
    );
    assert!(
        !serial_text(&writer_serial).contains("rewrote"),
        "the rewrite came before the merge was measured: raise rewrite_at"
    );

    // One guest writes over merged pages: copy-on-write gives it its own; the other's stay.
    wait_for(&mut writer, &writer_serial, "rewrote the pattern", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    let after_rewrite = pages_sharing();
    println!("KSM: pages_sharing {after_rewrite} 2 s after one guest rewrote its pattern");
    assert!(
        after_rewrite + pattern_pages * 3 / 4 <= settled,
        "the rewritten pages stayed merged: pages_sharing {settled} → {after_rewrite}"
    );
    assert_persist_passed(writer, &writer_serial, "the guest that rewrote its pattern");
    assert_persist_passed(reader, &reader_serial, "the guest that kept its pattern");
    assert!(!serial_text(&reader_serial).contains("rewrote"));
    drop(ksm);
}

/// `carve vm run` with a bad `--memory`: one line, status 2 (a usage error, as clap's) or 4
/// (what only building the VM finds, as for other sizes).
#[test]
fn bad_memory_specifications_get_one_line() {
    let one_line = |args: &[&str], status: i32, expected: &str| {
        let out = carve(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(status), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: expected '{expected}' in: {err}");
    };
    let run = |memory: &'static str| ["vm", "run", "--demo", "--memory", memory];
    one_line(&run("128,backing=bogus"), 2, "unknown memory backing 'bogus' (expected anonymous, memfd");
    one_line(&run("128,mergeable=maybe"), 2, "mergeable must be on or off, not 'maybe'");
    one_line(
        &run("128,backing=memfd,mergeable=on"),
        2,
        "backing=memfd cannot be mergeable=on: KSM merges only private anonymous pages, and memfd memory is shared",
    );
    one_line(&run("128,backing=hugetlb-1g,mergeable=on"), 2, "hugetlb pages are never merged");
    one_line(&run("100,backing=hugetlb-1g"), 2, "not a whole number of 1 GiB hugepages");
    one_line(&run("lots"), 2, "is not a number of MiB");
    one_line(&run("12T"), 2, "unknown unit 'T'");
    one_line(&run("128,shared"), 2, "unexpected 'shared'");

    // Enclaves never merge: the same page in two enclaves would be a side channel between them.
    let eif = temp_path("memory-demo.eif");
    std::fs::write(&eif, carve_guest_images::DEMO_EIF).unwrap();
    one_line(
        &["vm", "run", "--eif", eif.to_str().unwrap(), "--memory", "128,mergeable=on"],
        2,
        "enclaves never merge memory: KSM sharing pages between enclaves would be a cross-enclave side channel",
    );
    let root = fresh_dir("memory-run-enclave");
    let out = Command::new(env!("CARGO_BIN_EXE_carve"))
        .args(["run-enclave", "--eif-path", eif.to_str().unwrap(), "--cpu-count", "1"])
        .args(["--memory", "128,mergeable=on"])
        .env("CARVE_RUN_DIR", root.join("run"))
        .env("CARVE_STATE_DIR", root.join("state"))
        .env("NITRO_CLI_LOGS_PATH", root.join("logs"))
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("[ E03 ]") && err.contains("enclaves never merge memory"), "{err}");

    if !kvm_usable("bad_memory_specifications_get_one_line") {
        return;
    }
    one_line(&run("0"), 4, "guest memory of 0 MiB is too small");
}
