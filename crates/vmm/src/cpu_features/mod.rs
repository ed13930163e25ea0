//! Guest CPU features carve exposes only when asked: CET shadow stacks and IBT, SGX with a
//! virtual EPC, nested virtualisation. Each is offered where this host's KVM supports it and
//! hidden otherwise; asking for one the host lacks fails before the VM starts, naming the
//! missing CPUID bit, device node or KVM capability. See docs/cpu-features.md.
//!
//! [`HostFeatures`] is what this host offers (probed once, from KVM_GET_SUPPORTED_CPUID, KVM
//! capabilities and device nodes); [`check`] refuses a request it cannot meet; [`shape`] writes
//! the request into a vCPU's CPUID.

pub mod cet;
pub mod nested;
pub mod sgx;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use serde::Serialize;

/// What a VM asks for beyond its CPU template; everything off by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// Shadow stacks and indirect-branch tracking, as far as the host offers them.
    pub cet: bool,
    /// SVM (AMD) or VMX (Intel) for the guest's own guests.
    pub nested: bool,
    /// Virtual EPC sections, in the order they are placed after RAM.
    pub sgx_epc: Vec<sgx::EpcSection>,
}

impl CpuFeatures {
    /// The names `--cpu-features` takes.
    pub const NAMES: &'static [&'static str] = &["cet", "nested"];

    /// Turns on one feature by its `--cpu-features` name.
    pub fn enable(&mut self, name: &str) -> Result<(), String> {
        match name {
            "cet" => self.cet = true,
            "nested" => self.nested = true,
            "sgx" => {
                return Err("SGX is asked for with --sgx-epc SIZE (its EPC sections), not by name".into())
            }
            other => {
                return Err(format!("unknown CPU feature '{other}' (available: {})", Self::NAMES.join(", ")))
            }
        }
        Ok(())
    }
}

/// Whether this host can give a guest one feature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Offer {
    pub available: bool,
    /// What a guest gets when available; the missing host capability when not.
    pub detail: String,
}

impl Offer {
    fn yes(detail: impl Into<String>) -> Offer {
        Offer { available: true, detail: detail.into() }
    }

    fn no(missing: impl Into<String>) -> Offer {
        Offer { available: false, detail: missing.into() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

/// What the probe of a host found, kept apart from the probing so recorded hosts (the
/// fixtures under `tests/fixtures/cpuid/`) can be judged as this one is.
#[derive(Clone, Debug)]
pub struct HostProbe {
    /// KVM_GET_SUPPORTED_CPUID.
    pub supported: Vec<kvm_cpuid_entry2>,
    /// KVM_CAP_NESTED_STATE: the largest nested state KVM saves; 0 without.
    pub nested_state_size: usize,
    /// KVM_CAP_SGX_ATTRIBUTE.
    pub sgx_attribute_cap: bool,
    /// Opening /dev/sgx_vepc read-write: `Err` says why not.
    pub sgx_vepc: Result<(), String>,
    /// Opening /dev/sgx_provision: `Err` says why not.
    pub sgx_provision: Result<(), String>,
}

/// What this host's KVM offers guests, feature by feature (`carve host`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostFeatures {
    pub vendor: Vendor,
    pub cet: Offer,
    pub sgx: Offer,
    /// The PROVISIONKEY attribute for guest enclaves (needs SGX too).
    pub sgx_provision_key: Offer,
    pub nested: Offer,
    /// Snapshots of a guest that uses nested virtualisation (KVM_GET/SET_NESTED_STATE).
    pub nested_state: Offer,
}

/// A request this host cannot meet.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("this host cannot give the guest {feature}: {missing}")]
pub struct FeatureRefused {
    pub feature: &'static str,
    pub missing: String,
}

impl HostProbe {
    /// Probes this host: `supported` is KVM_GET_SUPPORTED_CPUID as carve received it.
    pub fn this_host(kvm: &kvm_ioctls::Kvm, supported: &CpuId) -> HostProbe {
        HostProbe {
            supported: supported.as_slice().to_vec(),
            nested_state_size: kvm.check_extension_int(kvm_ioctls::Cap::NestedState).max(0) as usize,
            sgx_attribute_cap: kvm.check_extension_raw(sgx::KVM_CAP_SGX_ATTRIBUTE.into()) > 0,
            sgx_vepc: sgx::open_vepc().map(drop).map_err(|e| format!("cannot open {}: {e}", sgx::VEPC_PATH)),
            sgx_provision: sgx::open_provision()
                .map(drop)
                .map_err(|e| format!("cannot open {}: {e}", sgx::PROVISION_PATH)),
        }
    }
}

impl HostFeatures {
    pub fn from_probe(probe: &HostProbe) -> HostFeatures {
        let cpuid = Leaves(&probe.supported);
        let vendor = cpuid.vendor();
        HostFeatures {
            vendor,
            cet: cet::offer(&cpuid),
            sgx: sgx::offer(&cpuid, probe),
            sgx_provision_key: sgx::provision_offer(&cpuid, probe),
            nested: nested::offer(&cpuid, vendor),
            nested_state: if probe.nested_state_size > 0 {
                Offer::yes(format!("KVM_CAP_NESTED_STATE: up to {} bytes per vCPU", probe.nested_state_size))
            } else {
                Offer::no("KVM_CAP_NESTED_STATE is not reported (no KVM_GET/SET_NESTED_STATE)")
            },
        }
    }
}

/// Refuses, naming the missing host capability, what `request` asks of a host without it.
pub fn check(request: &CpuFeatures, host: &HostFeatures) -> Result<(), FeatureRefused> {
    let refuse = |feature, offer: &Offer| match offer.available {
        true => Ok(()),
        false => Err(FeatureRefused { feature, missing: offer.detail.clone() }),
    };
    if request.cet {
        refuse("CET", &host.cet)?;
    }
    if request.nested {
        refuse("nested virtualisation", &host.nested)?;
    }
    if !request.sgx_epc.is_empty() {
        refuse("SGX", &host.sgx)?;
    }
    Ok(())
}

/// Writes `request` into one vCPU's CPUID (KVM's supported CPUID, normalised): what is asked
/// for stays as KVM offers it (and is completed where KVM leaves that to user space), the rest
/// of each feature is hidden. `sgx` is where the EPC sections were placed and whether KVM
/// granted the VM PROVISIONKEY; a table with no room left for the sections' sub-leaves fails.
pub fn shape(cpuid: &mut CpuId, request: &CpuFeatures, sgx: &sgx::SgxGuest) -> Result<(), sgx::EpcError> {
    cet::shape(cpuid, request.cet);
    nested::shape(cpuid, request.nested);
    sgx::shape(cpuid, sgx)
}

/// The features `request` asks for that a CPU template, applied after [`shape`], took away
/// again: `shaped` is the CPUID before the template, `templated` after it.
pub fn removed_by_template(request: &CpuFeatures, shaped: &CpuId, templated: &CpuId) -> Vec<&'static str> {
    let (before, after) = (Leaves(shaped.as_slice()), Leaves(templated.as_slice()));
    let lost = |bits: &[(u32, u32, Reg, u32)]| {
        bits.iter().any(|&(function, index, register, bit)| {
            before.bit(function, index, register, bit) && !after.bit(function, index, register, bit)
        })
    };
    let leaf0 = |(function, register, bit): (u32, Reg, u32)| (function, 0, register, bit);
    let mut removed = Vec::new();
    let xss = |bit| (0xd, 1, Reg::Ecx, bit);
    if request.cet && lost(&[cet::SHSTK, cet::IBT, xss(cet::XSS_CET_U), xss(cet::XSS_CET_S)]) {
        removed.push("CET");
    }
    if request.nested && lost(&[leaf0(nested::VMX), leaf0(nested::SVM)]) {
        removed.push("nested virtualisation");
    }
    // Leaf 0x12.0 EAX bit 0: SGX1.
    if !request.sgx_epc.is_empty()
        && lost(&[leaf0(sgx::SGX), leaf0(sgx::SGX_LC), (sgx::LEAF_SGX, 0, Reg::Eax, 0)])
    {
        removed.push("SGX");
    }
    removed
}

/// Lookups in a CPUID table.
pub(crate) struct Leaves<'a>(pub &'a [kvm_cpuid_entry2]);

impl Leaves<'_> {
    pub fn get(&self, function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
        self.0.iter().find(|e| e.function == function && e.index == index)
    }

    /// Whether `register` (0 EAX … 3 EDX) of leaf `function`.`index` has `bit` set.
    pub fn bit(&self, function: u32, index: u32, register: Reg, bit: u32) -> bool {
        self.get(function, index).is_some_and(|e| register.of(e) & (1 << bit) != 0)
    }

    fn vendor(&self) -> Vendor {
        match self.get(0, 0).map(|e| e.ebx) {
            Some(ebx) if ebx == u32::from_le_bytes(*b"Auth") => Vendor::Amd,
            Some(ebx) if ebx == u32::from_le_bytes(*b"Genu") => Vendor::Intel,
            _ => Vendor::Other,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    pub fn of(self, e: &kvm_cpuid_entry2) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }

    pub fn of_mut(self, e: &mut kvm_cpuid_entry2) -> &mut u32 {
        match self {
            Reg::Eax => &mut e.eax,
            Reg::Ebx => &mut e.ebx,
            Reg::Ecx => &mut e.ecx,
            Reg::Edx => &mut e.edx,
        }
    }
}

/// Clears `bit` of `register` in every entry of leaf `function`.`index`.
pub(crate) fn clear_bit(cpuid: &mut CpuId, function: u32, index: u32, register: Reg, bit: u32) {
    for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == function && e.index == index) {
        *register.of_mut(e) &= !(1 << bit);
    }
}

/// Loads a recorded KVM_GET_SUPPORTED_CPUID table (tests/fixtures/cpuid/*.json): a JSON list
/// of entries with hexadecimal strings or numbers for each field.
pub fn parse_cpuid_table(json: &str) -> Result<Vec<kvm_cpuid_entry2>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        function: Word,
        #[serde(default)]
        index: Word,
        #[serde(default)]
        flags: Word,
        #[serde(default)]
        eax: Word,
        #[serde(default)]
        ebx: Word,
        #[serde(default)]
        ecx: Word,
        #[serde(default)]
        edx: Word,
        /// What the entry shows, for the reader.
        #[serde(default, rename = "comment")]
        _comment: String,
    }
    #[derive(Default, serde::Deserialize)]
    #[serde(untagged)]
    enum Word {
        #[default]
        Zero,
        Number(u32),
        Hex(String),
    }
    impl Word {
        fn value(&self) -> Result<u32, String> {
            match self {
                Word::Zero => Ok(0),
                Word::Number(n) => Ok(*n),
                Word::Hex(text) => {
                    let digits =
                        text.strip_prefix("0x").ok_or_else(|| format!("'{text}' must start with 0x"))?;
                    u32::from_str_radix(&digits.replace('_', ""), 16).map_err(|e| format!("'{text}': {e}"))
                }
            }
        }
    }
    #[derive(serde::Deserialize)]
    struct Table {
        #[serde(rename = "host")]
        _host: String,
        entries: Vec<Entry>,
    }
    let table: Table = serde_json::from_str(json).map_err(|e| e.to_string())?;
    table
        .entries
        .iter()
        .map(|e| {
            Ok(kvm_cpuid_entry2 {
                function: e.function.value()?,
                index: e.index.value()?,
                flags: e.flags.value()?,
                eax: e.eax.value()?,
                ebx: e.ebx.value()?,
                ecx: e.ecx.value()?,
                edx: e.edx.value()?,
                ..Default::default()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
