//! The enclave CPU pool and hugepage reservation that `carve allocator` sets up, with the
//! Nitro driver's rules (`ne_cpus`): whole cores only, never CPU 0 or its siblings, all on one
//! NUMA node; hugepages reserved on that node, largest size first. Unlike Nitro, pool CPUs stay
//! online in the parent: carve pins each vCPU thread to its own pool CPU, and no two enclaves
//! share one.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, Failure, Result};

/// nitro-cli's allocator.yaml: `memory_mib` and one of `cpu_count` / `cpu_pool`; carve adds
/// `development: true` for hosts without a pool (laptops): no pinning, ordinary memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocatorConfig {
    pub memory_mib: Option<u64>,
    pub cpu_count: Option<usize>,
    pub cpu_pool: Option<String>,
    #[serde(default)]
    pub development: bool,
    /// carve's: who the enclaves' parent is, for PCR3 and PCR4 (run-enclave's flags win).
    pub parent_role: Option<String>,
    pub parent_id: Option<String>,
}

/// Why `carve allocator` failed; statuses are those of nitro-cli's allocator script.
#[derive(Debug, thiserror::Error)]
pub enum AllocatorError {
    #[error("cannot read the allocator configuration {path}: {source}")]
    ReadConfig { path: PathBuf, source: std::io::Error },
    #[error("the allocator configuration {path} is not valid: {message}")]
    BadConfig { path: PathBuf, message: String },
    #[error("the CPU pool is empty or invalid: {0}")]
    CpuPool(String),
    #[error("CPU {cpu} has no NUMA node in sysfs")]
    MissingNode { cpu: u32 },
    #[error("the pool's CPUs are on NUMA nodes {0:?}; a pool must be on one node")]
    SeveralNodes(Vec<u32>),
    #[error("cannot set {path}: {source}")]
    SetPages { path: PathBuf, source: std::io::Error },
    #[error("only {got_mib} MiB of the {wanted_mib} MiB of hugepages could be reserved on node {node}")]
    InsufficientMemory { node: u32, wanted_mib: u64, got_mib: u64 },
    #[error("{0} enclave(s) are running; terminate them before changing the pool")]
    EnclavesRunning(usize),
    #[error("{0}")]
    RunDir(Failure),
}

impl AllocatorError {
    pub fn status(&self) -> u8 {
        match self {
            AllocatorError::CpuPool(_) => 200,
            AllocatorError::MissingNode { .. } => 201,
            AllocatorError::SeveralNodes(_) => 202,
            AllocatorError::SetPages { .. } => 204,
            AllocatorError::InsufficientMemory { .. } => 206,
            _ => 1,
        }
    }
}

/// The pool in force, kept in the run directory (like `ne_cpus`, it does not survive a reboot).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub cpus: Vec<u32>,
    pub node: u32,
    pub memory_mib: u64,
    pub development: bool,
    /// Hugepage counts per page size (KiB) on `node` before the reservation, restored on clear.
    pub pages_before: Vec<(u64, u64)>,
    #[serde(default)]
    pub parent_role: Option<String>,
    #[serde(default)]
    pub parent_id: Option<String>,
}

/// Host CPU and memory topology as sysfs shows it (`root` is `/sys` outside tests).
pub struct Topology {
    root: PathBuf,
}

impl Topology {
    pub fn host() -> Topology {
        Topology { root: PathBuf::from("/sys") }
    }

    pub fn at(root: PathBuf) -> Topology {
        Topology { root }
    }

    fn read(&self, relative: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(relative)).ok().map(|s| s.trim().to_string())
    }

    pub fn online_cpus(&self) -> Vec<u32> {
        self.read("devices/system/cpu/online").and_then(|t| parse_cpu_list(&t).ok()).unwrap_or_default()
    }

    /// `cpu` and its SMT siblings.
    pub fn core_of(&self, cpu: u32) -> Vec<u32> {
        self.read(&format!("devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"))
            .and_then(|t| parse_cpu_list(&t).ok())
            .unwrap_or_else(|| vec![cpu])
    }

    pub fn node_of(&self, cpu: u32) -> Option<u32> {
        let nodes = self.read("devices/system/node/online").and_then(|t| parse_cpu_list(&t).ok());
        match nodes {
            Some(nodes) => nodes.into_iter().find(|node| {
                self.read(&format!("devices/system/node/node{node}/cpulist"))
                    .and_then(|t| parse_cpu_list(&t).ok())
                    .is_some_and(|cpus| cpus.contains(&cpu))
            }),
            // Kernels without NUMA have one implicit node.
            None => Some(0),
        }
    }

    pub fn hugepages_file(&self, node: u32, page_kib: u64) -> PathBuf {
        self.root
            .join(format!("devices/system/node/node{node}/hugepages/hugepages-{page_kib}kB/nr_hugepages"))
    }

    /// Page sizes (KiB) the kernel offers on `node`, largest first.
    pub fn hugepage_sizes(&self, node: u32) -> Vec<u64> {
        let dir = self.root.join(format!("devices/system/node/node{node}/hugepages"));
        let mut sizes: Vec<u64> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("hugepages-")?.strip_suffix("kB")?.parse().ok()
            })
            .collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        sizes
    }
}

/// Linux's largest possible CPU id (NR_CPUS is at most 8192).
const MAX_CPU_ID: u32 = 8191;

/// A Linux cpu-list: `2,3,6-9`, lines allowed. Malformed → E23; a backwards range or an id
/// beyond Linux's largest → E24.
pub fn parse_cpu_list(text: &str) -> Result<Vec<u32>> {
    let mut cpus = BTreeSet::new();
    for part in text.split([',', '\n']).map(str::trim).filter(|p| !p.is_empty()) {
        let number = |t: &str| {
            t.trim().parse::<u32>().map_err(|_| {
                Failure::new(
                    ErrorCode::MALFORMED_CPU_ID,
                    format!("'{part}' in the CPU list '{text}' is not a CPU id"),
                )
            })
        };
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (number(first)?, number(last)?);
                if first > last {
                    return Err(Failure::new(
                        ErrorCode::CPU_ERROR,
                        format!("the CPU range {part} runs backwards"),
                    ));
                }
                cpus.extend(first..=last.min(MAX_CPU_ID + 1));
            }
            None => {
                cpus.insert(number(part)?);
            }
        }
        if cpus.last().is_some_and(|&cpu| cpu > MAX_CPU_ID) {
            return Err(Failure::new(ErrorCode::CPU_ERROR, format!("{part}: CPU ids end at {MAX_CPU_ID}")));
        }
    }
    Ok(cpus.into_iter().collect())
}

/// The pool `config` asks for, checked against Nitro's rules on this `topology`.
pub fn choose_cpus(
    config: &AllocatorConfig,
    topology: &Topology,
) -> std::result::Result<(Vec<u32>, u32), AllocatorError> {
    let online = topology.online_cpus();
    let forbidden: BTreeSet<u32> = topology.core_of(0).into_iter().chain([0]).collect();
    let cpus = match (&config.cpu_pool, config.cpu_count) {
        (Some(_), Some(_)) => {
            return Err(AllocatorError::CpuPool("give cpu_count or cpu_pool, not both".into()))
        }
        (None, None) => return Err(AllocatorError::CpuPool("give cpu_count or cpu_pool".into())),
        (Some(list), None) => {
            let cpus = parse_cpu_list(list).map_err(|e| AllocatorError::CpuPool(e.message))?;
            for &cpu in &cpus {
                if !online.contains(&cpu) {
                    return Err(AllocatorError::CpuPool(format!("CPU {cpu} is not online")));
                }
                if forbidden.contains(&cpu) {
                    return Err(AllocatorError::CpuPool(format!(
                        "CPU {cpu} is CPU 0 or its sibling; the parent keeps it"
                    )));
                }
                if let Some(missing) = topology.core_of(cpu).into_iter().find(|s| !cpus.contains(s)) {
                    return Err(AllocatorError::CpuPool(format!(
                        "CPU {cpu}'s core is not whole: its sibling {missing} is not in the pool"
                    )));
                }
            }
            cpus
        }
        (None, Some(count)) => {
            // Whole cores, node by node, skipping CPU 0's core.
            let mut chosen = Vec::new();
            for &cpu in &online {
                if chosen.len() >= count || forbidden.contains(&cpu) || chosen.contains(&cpu) {
                    continue;
                }
                let core = topology.core_of(cpu);
                if chosen.len() + core.len() > count {
                    continue;
                }
                chosen.extend(core);
            }
            if chosen.len() != count || count == 0 {
                return Err(AllocatorError::CpuPool(format!(
                    "cannot take {count} CPUs as whole cores outside CPU 0's (online: {online:?})"
                )));
            }
            chosen.sort_unstable();
            chosen
        }
    };
    if cpus.is_empty() {
        return Err(AllocatorError::CpuPool("no CPUs".into()));
    }
    let mut nodes = BTreeSet::new();
    for &cpu in &cpus {
        nodes.insert(topology.node_of(cpu).ok_or(AllocatorError::MissingNode { cpu })?);
    }
    if nodes.len() > 1 {
        return Err(AllocatorError::SeveralNodes(nodes.into_iter().collect()));
    }
    Ok((cpus, nodes.into_iter().next().expect("at least one CPU")))
}

/// Reserves `mib` of hugepages on `node`, largest page size first, the smallest size covering
/// the rest; returns the counts found before. On failure the counts are put back.
pub fn reserve_hugepages(
    topology: &Topology,
    node: u32,
    mib: u64,
) -> std::result::Result<Vec<(u64, u64)>, AllocatorError> {
    let sizes = topology.hugepage_sizes(node);
    let before: Vec<(u64, u64)> = sizes
        .iter()
        .map(|&kib| (kib, read_count(&topology.hugepages_file(node, kib)).unwrap_or(0)))
        .collect();
    let result = (|| {
        let mut remaining_kib = mib << 10;
        for (i, &kib) in sizes.iter().enumerate() {
            let smallest = i + 1 == sizes.len();
            let pages = if smallest { remaining_kib.div_ceil(kib) } else { remaining_kib / kib };
            let path = topology.hugepages_file(node, kib);
            write_count(&path, pages)?;
            let got = read_count(&path).unwrap_or(0).min(pages);
            remaining_kib = remaining_kib.saturating_sub(got * kib);
        }
        if remaining_kib > 0 {
            return Err(AllocatorError::InsufficientMemory {
                node,
                wanted_mib: mib,
                got_mib: mib.saturating_sub(remaining_kib.div_ceil(1024)),
            });
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(before),
        Err(e) => {
            restore_hugepages(topology, node, &before);
            Err(e)
        }
    }
}

pub fn restore_hugepages(topology: &Topology, node: u32, counts: &[(u64, u64)]) {
    for &(kib, count) in counts {
        let path = topology.hugepages_file(node, kib);
        if let Err(e) = write_count(&path, count) {
            log::warn!("{e}");
        }
    }
}

fn read_count(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn write_count(path: &Path, count: u64) -> std::result::Result<(), AllocatorError> {
    std::fs::write(path, count.to_string())
        .map_err(|source| AllocatorError::SetPages { path: path.to_path_buf(), source })
}

impl AllocatorConfig {
    pub fn read(path: &Path) -> std::result::Result<AllocatorConfig, AllocatorError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| AllocatorError::ReadConfig { path: path.to_path_buf(), source })?;
        let config: AllocatorConfig = serde_yaml_ng::from_str(&text)
            .map_err(|e| AllocatorError::BadConfig { path: path.to_path_buf(), message: e.to_string() })?;
        for (key, value) in [("parent_role", &config.parent_role), ("parent_id", &config.parent_id)] {
            if let Some(Err(problem)) = value.as_deref().map(crate::ids::check_parent_identity) {
                let message = format!("{key} {problem}");
                return Err(AllocatorError::BadConfig { path: path.to_path_buf(), message });
            }
        }
        if !config.development && config.memory_mib.is_none() {
            return Err(AllocatorError::BadConfig {
                path: path.to_path_buf(),
                message: "memory_mib is required".into(),
            });
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_like_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("2,3,6-9").unwrap(), vec![2, 3, 6, 7, 8, 9]);
        assert_eq!(parse_cpu_list("1\n3\n").unwrap(), vec![1, 3]);
        assert_eq!(parse_cpu_list("").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_cpu_list("1,x").unwrap_err().code, ErrorCode::MALFORMED_CPU_ID);
        assert_eq!(parse_cpu_list("5-2").unwrap_err().code, ErrorCode::CPU_ERROR);
        assert_eq!(parse_cpu_list("0-4294967295").unwrap_err().code, ErrorCode::CPU_ERROR);
        assert_eq!(parse_cpu_list("8192").unwrap_err().code, ErrorCode::CPU_ERROR);
    }

    /// A fake sysfs: `cores` lists each core's CPUs, `nodes` each node's CPUs.
    fn fake_sysfs(name: &str, cores: &[&[u32]], nodes: &[&[u32]]) -> Topology {
        let root = std::env::temp_dir().join(format!("carve-sysfs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let list = |cpus: &[u32]| cpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let all: Vec<u32> = cores.iter().flat_map(|c| c.iter().copied()).collect();
        std::fs::create_dir_all(root.join("devices/system/cpu")).unwrap();
        std::fs::write(root.join("devices/system/cpu/online"), list(&all)).unwrap();
        for core in cores {
            for cpu in *core {
                let dir = root.join(format!("devices/system/cpu/cpu{cpu}/topology"));
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join("thread_siblings_list"), list(core)).unwrap();
            }
        }
        let node_ids: Vec<u32> = (0..nodes.len() as u32).collect();
        std::fs::create_dir_all(root.join("devices/system/node")).unwrap();
        std::fs::write(root.join("devices/system/node/online"), list(&node_ids)).unwrap();
        for (node, cpus) in nodes.iter().enumerate() {
            let dir = root.join(format!("devices/system/node/node{node}"));
            for kib in [2048, 1048576] {
                std::fs::create_dir_all(dir.join(format!("hugepages/hugepages-{kib}kB"))).unwrap();
                std::fs::write(dir.join(format!("hugepages/hugepages-{kib}kB/nr_hugepages")), "0").unwrap();
            }
            std::fs::write(dir.join("cpulist"), list(cpus)).unwrap();
        }
        Topology::at(root)
    }

    fn config(count: Option<usize>, pool: Option<&str>) -> AllocatorConfig {
        AllocatorConfig {
            memory_mib: Some(512),
            cpu_count: count,
            cpu_pool: pool.map(String::from),
            ..AllocatorConfig::default()
        }
    }

    #[test]
    fn pools_take_whole_cores_away_from_cpu_0_on_one_node() {
        let smt = fake_sysfs("smt", &[&[0, 4], &[1, 5], &[2, 6], &[3, 7]], &[&[0, 1, 4, 5], &[2, 3, 6, 7]]);
        assert_eq!(choose_cpus(&config(Some(2), None), &smt).unwrap(), (vec![1, 5], 0));
        assert_eq!(choose_cpus(&config(None, Some("2,6")), &smt).unwrap(), (vec![2, 6], 1));
        let refused = |c: AllocatorConfig| choose_cpus(&c, &smt).unwrap_err();
        assert!(matches!(refused(config(Some(3), None)), AllocatorError::CpuPool(_)), "half a core");
        assert!(
            matches!(refused(config(None, Some("1"))), AllocatorError::CpuPool(m) if m.contains("sibling 5"))
        );
        assert!(
            matches!(refused(config(None, Some("4,0"))), AllocatorError::CpuPool(m) if m.contains("CPU 0"))
        );
        assert!(matches!(refused(config(None, Some("1,5,2,6"))), AllocatorError::SeveralNodes(_)));
        assert!(
            matches!(refused(config(None, Some("9"))), AllocatorError::CpuPool(m) if m.contains("not online"))
        );
        assert!(matches!(refused(config(Some(2), Some("1,5"))), AllocatorError::CpuPool(_)));
        let plain = fake_sysfs("plain", &[&[0], &[1]], &[&[0, 1]]);
        assert_eq!(choose_cpus(&config(Some(1), None), &plain).unwrap(), (vec![1], 0));
        assert!(choose_cpus(&config(Some(2), None), &plain).is_err(), "CPU 0 is never given");
    }

    #[test]
    fn hugepages_go_largest_first_and_come_back() {
        let topo = fake_sysfs("pages", &[&[0], &[1]], &[&[0, 1]]);
        std::fs::write(topo.hugepages_file(0, 2048), "3").unwrap();
        let before = reserve_hugepages(&topo, 0, 2048 + 6).unwrap();
        assert_eq!(before, vec![(1048576, 0), (2048, 3)]);
        assert_eq!(read_count(&topo.hugepages_file(0, 1048576)), Some(2));
        assert_eq!(read_count(&topo.hugepages_file(0, 2048)), Some(3), "6 MiB rounds to three 2 MiB pages");
        restore_hugepages(&topo, 0, &before);
        assert_eq!(read_count(&topo.hugepages_file(0, 1048576)), Some(0));
        assert_eq!(read_count(&topo.hugepages_file(0, 2048)), Some(3));
    }

    #[test]
    fn allocator_yaml_is_nitro_clis() {
        let dir = std::env::temp_dir().join(format!("carve-alloc-yaml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("allocator.yaml");
        std::fs::write(
            &path,
            "---\n# Enclave configuration file.\nmemory_mib: 512\ncpu_count: 2\n#cpu_pool: 2,3\n",
        )
        .unwrap();
        assert_eq!(AllocatorConfig::read(&path).unwrap(), config(Some(2), None));
        std::fs::write(&path, "---\ncpu_pool: 1\n").unwrap();
        assert!(matches!(AllocatorConfig::read(&path), Err(AllocatorError::BadConfig { .. })));
        std::fs::write(&path, "---\nmemory_mib: 64\ncpu_pol: 1\n").unwrap();
        assert!(matches!(AllocatorConfig::read(&path), Err(AllocatorError::BadConfig { .. })));
        std::fs::write(&path, "development: true\n").unwrap();
        assert!(AllocatorConfig::read(&path).unwrap().development);
        // carve's parent identity for PCR3/PCR4, checked as run-enclave's flags are.
        std::fs::write(&path, "development: true\nparent_role: arn:aws:iam::1:role/r\nparent_id: i-1\n")
            .unwrap();
        let read = AllocatorConfig::read(&path).unwrap();
        assert_eq!(
            (read.parent_role.as_deref(), read.parent_id.as_deref()),
            (Some("arn:aws:iam::1:role/r"), Some("i-1"))
        );
        std::fs::write(&path, "development: true\nparent_id: \"\"\n").unwrap();
        let error = AllocatorConfig::read(&path).unwrap_err().to_string();
        assert!(error.ends_with("parent_id must be 1 to 2048 bytes long"), "{error}");
    }
}
