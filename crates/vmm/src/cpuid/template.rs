//! CPU templates: named, data-driven masks over the guest CPUID (JSON in `cpu-templates/`).
//!
//! A template clears feature bits (`clear_bits`) and drops whole leaves (`remove_leaves`);
//! it never adds what KVM does not support. See docs/cpu-templates.md.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use serde::{Deserialize, Deserializer};

const BUILT_IN: &[&str] =
    &[include_str!("../../cpu-templates/host.json"), include_str!("../../cpu-templates/baseline.json")];

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown CPU template '{name}' (available: {available})")]
    Unknown { name: String, available: String },
    #[error("CPU template is not valid JSON: {0}")]
    Parse(#[from] serde_json::Error),
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ClearBit {
    #[serde(deserialize_with = "hex_u32")]
    pub leaf: u32,
    #[serde(default, deserialize_with = "opt_hex_u32")]
    pub subleaf: Option<u32>,
    pub register: Register,
    pub bit: u8,
    pub feature: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct RemoveLeaf {
    #[serde(deserialize_with = "hex_u32")]
    pub leaf: u32,
    pub feature: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTemplate {
    pub name: String,
    pub description: String,
    pub clear_bits: Vec<ClearBit>,
    pub remove_leaves: Vec<RemoveLeaf>,
}

fn parse_hex(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0x").ok_or_else(|| format!("'{text}' must start with 0x"))?;
    u32::from_str_radix(digits, 16).map_err(|e| format!("'{text}': {e}"))
}

fn hex_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    parse_hex(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

fn opt_hex_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Option::<String>::deserialize(d)?.map(|s| parse_hex(&s).map_err(serde::de::Error::custom)).transpose()
}

impl Register {
    fn get(self, entry: &kvm_cpuid_entry2) -> u32 {
        match self {
            Register::Eax => entry.eax,
            Register::Ebx => entry.ebx,
            Register::Ecx => entry.ecx,
            Register::Edx => entry.edx,
        }
    }

    fn get_mut(self, entry: &mut kvm_cpuid_entry2) -> &mut u32 {
        match self {
            Register::Eax => &mut entry.eax,
            Register::Ebx => &mut entry.ebx,
            Register::Ecx => &mut entry.ecx,
            Register::Edx => &mut entry.edx,
        }
    }
}

impl ClearBit {
    fn covers(&self, entry: &kvm_cpuid_entry2) -> bool {
        entry.function == self.leaf && self.subleaf.is_none_or(|s| s == entry.index)
    }
}

/// CPUID bits KVM recomputes from guest state as the guest runs (OSXSAVE, OSPKE), so a read-back
/// may show them whatever was set.
const RUNTIME_BITS: &[(u32, Register, u8)] = &[(1, Register::Ecx, 27), (7, Register::Ecx, 4)];

impl CpuTemplate {
    /// Every built-in template, in documentation order.
    pub fn all() -> Vec<CpuTemplate> {
        BUILT_IN
            .iter()
            .map(|json| serde_json::from_str(json).expect("built-in CPU templates are valid"))
            .collect()
    }

    pub fn named(name: &str) -> Result<CpuTemplate, TemplateError> {
        let all = Self::all();
        let available = all.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ");
        all.iter()
            .find(|t| t.name == name)
            .cloned()
            .ok_or(TemplateError::Unknown { name: name.into(), available })
    }

    pub fn from_json(json: &str) -> Result<CpuTemplate, TemplateError> {
        Ok(serde_json::from_str(json)?)
    }

    pub fn apply(&self, cpuid: &mut CpuId) {
        let removed: Vec<u32> = self.remove_leaves.iter().map(|r| r.leaf).collect();
        cpuid.retain(|entry| !removed.contains(&entry.function));
        for clear in &self.clear_bits {
            for entry in cpuid.as_mut_slice().iter_mut().filter(|entry| clear.covers(entry)) {
                *clear.register.get_mut(entry) &= !(1u32 << clear.bit);
            }
        }
    }

    /// The features this template removes that `readback` (a vCPU's KVM_GET_CPUID2 after
    /// KVM_SET_CPUID2) still shows: non-empty when the host's KVM does not apply templates.
    pub fn unenforced(&self, readback: &CpuId) -> Vec<&str> {
        let entries = readback.as_slice();
        let leaves = self
            .remove_leaves
            .iter()
            .filter(|removed| entries.iter().any(|e| e.function == removed.leaf))
            .map(|removed| removed.feature.as_str());
        let bits = self
            .clear_bits
            .iter()
            .filter(|clear| !RUNTIME_BITS.contains(&(clear.leaf, clear.register, clear.bit)))
            .filter(|clear| {
                entries
                    .iter()
                    .any(|entry| clear.covers(entry) && clear.register.get(entry) & (1 << clear.bit) != 0)
            })
            .map(|clear| clear.feature.as_str());
        let mut features = Vec::new();
        for feature in leaves.chain(bits) {
            if !features.contains(&feature) {
                features.push(feature);
            }
        }
        features
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ecx, ebx: !0, ..Default::default() }
    }

    #[test]
    fn built_ins_parse_and_have_unique_names() {
        let names: Vec<_> = CpuTemplate::all().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["host", "baseline"]);
    }

    #[test]
    fn unenforced_names_what_a_readback_still_shows() {
        let baseline = CpuTemplate::named("baseline").unwrap();
        let mut applied = CpuId::from_entries(&[entry(1, 0, !0), entry(7, 0, 0), entry(0xd, 0, 1)]).unwrap();
        baseline.apply(&mut applied);
        assert!(baseline.unenforced(&applied).is_empty(), "{:?}", baseline.unenforced(&applied));
        // A host that answers with its own leaves: popcnt and xsave back, leaf 0xd back.
        let mut leaked = applied.clone();
        leaked.as_mut_slice()[0].ecx |= 1 << 23 | 1 << 26 | 1 << 27;
        leaked.push(entry(0xd, 0, 1)).unwrap();
        let shown = baseline.unenforced(&leaked);
        assert!(shown.contains(&"popcnt") && shown.contains(&"xsave"), "{shown:?}");
        assert!(!shown.contains(&"osxsave"), "OSXSAVE follows CR4 at run time: {shown:?}");
        assert_eq!(shown.iter().filter(|f| **f == "xsave").count(), 1, "named once: {shown:?}");
        assert!(CpuTemplate::named("host").unwrap().unenforced(&leaked).is_empty());
    }

    #[test]
    fn baseline_hides_xsave_popcnt_smep_smap() {
        let mut cpuid =
            CpuId::from_entries(&[entry(1, 0, !0), entry(7, 0, 0), entry(0xd, 0, 1), entry(0xd, 1, 1)])
                .unwrap();
        CpuTemplate::named("baseline").unwrap().apply(&mut cpuid);
        let leaves = cpuid.as_slice();
        assert_eq!(leaves.len(), 2, "leaf 0xd removed");
        assert_eq!(leaves[0].ecx & (1 << 26 | 1 << 27 | 1 << 23), 0);
        assert_eq!(leaves[0].ecx & 1, 1, "sse3 stays");
        assert_eq!(leaves[1].ebx & (1 << 7 | 1 << 20), 0);
        assert_eq!(leaves[1].ebx & 1, 1, "fsgsbase stays");
    }

    #[test]
    fn unknown_name_lists_the_choices() {
        let err = CpuTemplate::named("c3").unwrap_err().to_string();
        assert_eq!(err, "unknown CPU template 'c3' (available: host, baseline)");
    }

    #[test]
    fn malformed_template_is_an_error() {
        let json = r#"{"name":"x","description":"","clear_bits":[{"leaf":"1","register":"ecx","bit":1,"feature":"f"}],"remove_leaves":[]}"#;
        assert!(CpuTemplate::from_json(json).unwrap_err().to_string().contains("must start with 0x"));
    }
}
