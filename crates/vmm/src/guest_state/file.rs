//! The JSON state file of `carve vm check-state`, `--dump-state` and `--load-state`: segment
//! registers with kvm_segment's field names, `gdt`/`idt`, and cr0, cr3, cr4, efer, rflags; for a
//! CET guest also `cet` (`s_cet`, `ssp`, `interrupt_ssp_table`), optional so that files without
//! it still parse. Numbers may be JSON integers or `"0x…"` strings; carve writes integers.

use kvm_bindings::{kvm_dtable, kvm_segment, kvm_sregs};
use serde::{Deserialize, Deserializer, Serialize};

use super::{CetState, DescriptorTable, GuestState, Platform};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateFileError {
    #[error("not a JSON state: {0}")]
    Syntax(String),
    #[error("field {field}: {message}")]
    Field { field: String, message: String },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentFile {
    #[serde(deserialize_with = "number")]
    pub base: u64,
    #[serde(deserialize_with = "number")]
    pub limit: u32,
    #[serde(deserialize_with = "number")]
    pub selector: u16,
    #[serde(rename = "type", deserialize_with = "number")]
    pub type_: u8,
    #[serde(deserialize_with = "number")]
    pub present: u8,
    #[serde(deserialize_with = "number")]
    pub dpl: u8,
    #[serde(deserialize_with = "number")]
    pub db: u8,
    #[serde(deserialize_with = "number")]
    pub s: u8,
    #[serde(deserialize_with = "number")]
    pub l: u8,
    #[serde(deserialize_with = "number")]
    pub g: u8,
    #[serde(deserialize_with = "number")]
    pub avl: u8,
    #[serde(deserialize_with = "number")]
    pub unusable: u8,
}

/// GDTR/IDTR. The limit is read as 32 bits, as the VMCS holds it, so that an oversized limit is
/// reported as the rule it breaks rather than as a parse error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableFile {
    #[serde(deserialize_with = "number")]
    pub base: u64,
    #[serde(deserialize_with = "number")]
    pub limit: u32,
}

/// The CET state VM entry loads for a CET guest ([`CetState`]). Checked, not loaded: KVM takes
/// it with KVM_SET_MSRS and KVM_SET_ONE_REG, not KVM_SET_SREGS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CetFile {
    #[serde(deserialize_with = "number")]
    pub s_cet: u64,
    #[serde(deserialize_with = "number")]
    pub ssp: u64,
    #[serde(deserialize_with = "number")]
    pub interrupt_ssp_table: u64,
}

impl From<CetState> for CetFile {
    fn from(cet: CetState) -> Self {
        CetFile { s_cet: cet.s_cet, ssp: cet.ssp, interrupt_ssp_table: cet.interrupt_ssp_table }
    }
}

impl From<CetFile> for CetState {
    fn from(cet: CetFile) -> Self {
        CetState { s_cet: cet.s_cet, ssp: cet.ssp, interrupt_ssp_table: cet.interrupt_ssp_table }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    pub cs: SegmentFile,
    pub ds: SegmentFile,
    pub es: SegmentFile,
    pub fs: SegmentFile,
    pub gs: SegmentFile,
    pub ss: SegmentFile,
    pub tr: SegmentFile,
    pub ldt: SegmentFile,
    pub gdt: TableFile,
    pub idt: TableFile,
    #[serde(deserialize_with = "number")]
    pub cr0: u64,
    #[serde(deserialize_with = "number")]
    pub cr3: u64,
    #[serde(deserialize_with = "number")]
    pub cr4: u64,
    #[serde(deserialize_with = "number")]
    pub efer: u64,
    #[serde(deserialize_with = "number")]
    pub rflags: u64,
    /// Only for a CET guest; absent from older files and from those of other guests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cet: Option<CetFile>,
}

/// A JSON integer or a `"0x…"`/decimal string, narrowed to the field's type.
fn number<'de, D: Deserializer<'de>, T: TryFrom<u64>>(deserializer: D) -> Result<T, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Number {
        Int(u64),
        Text(String),
    }
    let value = match Number::deserialize(deserializer)
        .map_err(|_| serde::de::Error::custom("expected a non-negative integer or a \"0x…\" string"))?
    {
        Number::Int(value) => value,
        Number::Text(text) => {
            let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.map_err(|_| serde::de::Error::custom(format!("{text:?} is not a number")))?
        }
    };
    let max = (1u128 << (8 * std::mem::size_of::<T>())) - 1;
    T::try_from(value).map_err(|_| serde::de::Error::custom(format!("{value:#x} is larger than {max:#x}")))
}

fn first_array(value: &serde_json::Value, path: String) -> Option<String> {
    match value {
        serde_json::Value::Array(_) => Some(path),
        serde_json::Value::Object(map) => map.iter().find_map(|(key, value)| {
            first_array(value, if path.is_empty() { key.clone() } else { format!("{path}.{key}") })
        }),
        _ => None,
    }
}

impl SegmentFile {
    fn from_kvm(seg: &kvm_segment) -> SegmentFile {
        SegmentFile {
            base: seg.base,
            limit: seg.limit,
            selector: seg.selector,
            type_: seg.type_,
            present: seg.present,
            dpl: seg.dpl,
            db: seg.db,
            s: seg.s,
            l: seg.l,
            g: seg.g,
            avl: seg.avl,
            unusable: seg.unusable,
        }
    }

    fn to_kvm(self) -> kvm_segment {
        kvm_segment {
            base: self.base,
            limit: self.limit,
            selector: self.selector,
            type_: self.type_,
            present: self.present,
            dpl: self.dpl,
            db: self.db,
            s: self.s,
            l: self.l,
            g: self.g,
            avl: self.avl,
            unusable: self.unusable,
            padding: 0,
        }
    }

    /// kvm_segment's fields are bit fields of the access rights: type 0-15, dpl 0-3, flags 0-1.
    fn check_ranges(&self, register: &str) -> Result<(), StateFileError> {
        let fields = [
            ("type", self.type_, 15),
            ("dpl", self.dpl, 3),
            ("present", self.present, 1),
            ("db", self.db, 1),
            ("s", self.s, 1),
            ("l", self.l, 1),
            ("g", self.g, 1),
            ("avl", self.avl, 1),
            ("unusable", self.unusable, 1),
        ];
        match fields.iter().find(|(_, value, max)| value > max) {
            Some((name, value, max)) => Err(StateFileError::Field {
                field: format!("{register}.{name}"),
                message: format!("{value} is out of range (0-{max})"),
            }),
            None => Ok(()),
        }
    }
}

impl StateFile {
    /// Parses and range-checks a state file, naming the field at fault.
    pub fn parse(text: &str) -> Result<StateFile, StateFileError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| StateFileError::Syntax(e.to_string()))?;
        if !value.is_object() {
            return Err(StateFileError::Syntax("expected a JSON object".into()));
        }
        // serde would read a struct from an array too; a state file has objects only.
        if let Some(field) = first_array(&value, String::new()) {
            return Err(StateFileError::Field {
                field,
                message: "expected an object or a number, not an array".into(),
            });
        }
        let state: StateFile = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            if path == "." {
                StateFileError::Syntax(message)
            } else {
                StateFileError::Field { field: path, message }
            }
        })?;
        for (name, seg) in state.segments() {
            seg.check_ranges(name)?;
        }
        Ok(state)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a state file always serializes") + "\n"
    }

    fn segments(&self) -> [(&'static str, &SegmentFile); 8] {
        [
            ("cs", &self.cs),
            ("ds", &self.ds),
            ("es", &self.es),
            ("fs", &self.fs),
            ("gs", &self.gs),
            ("ss", &self.ss),
            ("tr", &self.tr),
            ("ldt", &self.ldt),
        ]
    }

    /// A file without CET state: set `cet` from [`CetState::read`] for a CET guest.
    pub fn from_kvm(sregs: &kvm_sregs, rflags: u64) -> StateFile {
        let table = |t: &kvm_dtable| TableFile { base: t.base, limit: t.limit.into() };
        StateFile {
            cs: SegmentFile::from_kvm(&sregs.cs),
            ds: SegmentFile::from_kvm(&sregs.ds),
            es: SegmentFile::from_kvm(&sregs.es),
            fs: SegmentFile::from_kvm(&sregs.fs),
            gs: SegmentFile::from_kvm(&sregs.gs),
            ss: SegmentFile::from_kvm(&sregs.ss),
            tr: SegmentFile::from_kvm(&sregs.tr),
            ldt: SegmentFile::from_kvm(&sregs.ldt),
            gdt: table(&sregs.gdt),
            idt: table(&sregs.idt),
            cr0: sregs.cr0,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
            rflags,
            cet: None,
        }
    }

    /// `base` with this file's registers in it (CR2, CR8, APIC base and interrupt bitmap are
    /// kept), and RFLAGS; `cet` is not among them. Fails when a descriptor-table limit does not fit KVM's 16 bits.
    pub fn to_kvm(&self, base: &kvm_sregs) -> Result<(kvm_sregs, u64), StateFileError> {
        let table = |name: &str, t: &TableFile| {
            let limit = u16::try_from(t.limit).map_err(|_| StateFileError::Field {
                field: format!("{name}.limit"),
                message: format!("{:#x} does not fit KVM's 16-bit descriptor-table limit", t.limit),
            })?;
            Ok(kvm_dtable { base: t.base, limit, padding: [0; 3] })
        };
        let mut sregs = *base;
        sregs.cs = self.cs.to_kvm();
        sregs.ds = self.ds.to_kvm();
        sregs.es = self.es.to_kvm();
        sregs.fs = self.fs.to_kvm();
        sregs.gs = self.gs.to_kvm();
        sregs.ss = self.ss.to_kvm();
        sregs.tr = self.tr.to_kvm();
        sregs.ldt = self.ldt.to_kvm();
        sregs.gdt = table("gdt", &self.gdt)?;
        sregs.idt = table("idt", &self.idt)?;
        sregs.cr0 = self.cr0;
        sregs.cr3 = self.cr3;
        sregs.cr4 = self.cr4;
        sregs.efer = self.efer;
        Ok((sregs, self.rflags))
    }

    /// The state KVM would enter on `platform` (see [`GuestState::from_kvm`]), keeping the
    /// full 32-bit descriptor-table limits.
    pub fn guest_state(&self, platform: &Platform) -> GuestState {
        let sregs = kvm_sregs {
            cs: self.cs.to_kvm(),
            ds: self.ds.to_kvm(),
            es: self.es.to_kvm(),
            fs: self.fs.to_kvm(),
            gs: self.gs.to_kvm(),
            ss: self.ss.to_kvm(),
            tr: self.tr.to_kvm(),
            ldt: self.ldt.to_kvm(),
            cr0: self.cr0,
            cr3: self.cr3,
            cr4: self.cr4,
            efer: self.efer,
            ..Default::default()
        };
        let mut state = GuestState::from_kvm(&sregs, self.rflags, platform);
        state.gdt = DescriptorTable { base: self.gdt.base, limit: self.gdt.limit };
        state.idt = DescriptorTable { base: self.idt.base, limit: self.idt.limit };
        state.cet = self.cet.map(CetState::from);
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StateFile {
        let code = kvm_segment {
            selector: 0x10,
            limit: 0xffff_ffff,
            type_: 11,
            present: 1,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let sregs = kvm_sregs { cs: code, cr0: 0x8000_0011, efer: 0x500, ..Default::default() };
        StateFile::from_kvm(&sregs, 2)
    }

    fn error(text: &str) -> String {
        StateFile::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn round_trips_through_json_and_kvm() {
        let state = sample();
        assert_eq!(StateFile::parse(&state.to_json()).unwrap(), state);
        let (sregs, rflags) = state.to_kvm(&kvm_sregs { cr2: 0x1234, ..Default::default() }).unwrap();
        assert_eq!((sregs.cs.l, sregs.cr2, sregs.efer, rflags), (1, 0x1234, 0x500, 2));
    }

    #[test]
    fn numbers_may_be_hex_strings() {
        let json = sample().to_json().replace("\"cr0\": 2147483665", "\"cr0\": \"0x80000011\"");
        assert_eq!(StateFile::parse(&json).unwrap().cr0, 0x8000_0011);
    }

    #[test]
    fn bad_files_name_the_field() {
        let json = sample().to_json();
        assert!(error("{ not json").starts_with("not a JSON state: key must be a string"));
        assert_eq!(error("[]"), "not a JSON state: expected a JSON object");
        assert_eq!(error(&json.replace("\"cr3\": 0,", "")), "not a JSON state: missing field `cr3`");
        let array = json.replacen("\"base\": 0", "\"base\": [0]", 1);
        assert_eq!(error(&array), "field cs.base: expected an object or a number, not an array");
        let no_limit = json.replacen("\"limit\": 4294967295,", "", 1);
        assert!(error(&no_limit).starts_with("field cs: missing field `limit`"), "{}", error(&no_limit));
        let dpl = json.replacen("\"dpl\": 0", "\"dpl\": 7", 1);
        assert_eq!(error(&dpl), "field cs.dpl: 7 is out of range (0-3)");
        let selector = json.replacen("\"selector\": 16", "\"selector\": 65536", 1);
        assert!(error(&selector).starts_with("field cs.selector: 0x10000 is larger than 0xffff"));
        let negative = json.replacen("\"base\": 0", "\"base\": -1", 1);
        assert!(error(&negative).starts_with("field cs.base: expected a non-negative integer"));
        let text = json.replacen("\"base\": 0", "\"base\": \"0xzz\"", 1);
        assert!(error(&text).starts_with("field cs.base: \"0xzz\" is not a number"));
        let unknown = json.replacen("\"avl\": 0", "\"avl\": 0, \"colour\": 1", 1);
        assert!(
            error(&unknown).starts_with("field cs.colour: unknown field `colour`"),
            "{}",
            error(&unknown)
        );
    }

    #[test]
    fn cet_state_is_optional() {
        let old = sample();
        assert!(!old.to_json().contains("cet"), "no CET state, no field: older carves read it");
        assert_eq!(StateFile::parse(&old.to_json()).unwrap().cet, None);
        assert_eq!(old.guest_state(&Platform::intel(true)).cet, None);

        let cet = CetFile { s_cet: 1 << 2, ssp: 0x7fff_f000, interrupt_ssp_table: 0xffff_8000_0000_1000 };
        let state = StateFile { cet: Some(cet), ..sample() };
        assert_eq!(StateFile::parse(&state.to_json()).unwrap(), state);
        let json = state.to_json().replace("\"ssp\": 2147479552", "\"ssp\": \"0x7fff_f000\"");
        assert_eq!(error(&json), "field cet.ssp: \"0x7fff_f000\" is not a number");
        let json = state.to_json().replace("\"ssp\": 2147479552", "\"ssp\": \"0x7ffff000\"");
        assert_eq!(StateFile::parse(&json).unwrap(), state);
        let expected = CetState { s_cet: 4, ssp: 0x7fff_f000, interrupt_ssp_table: 0xffff_8000_0000_1000 };
        assert_eq!(state.guest_state(&Platform::intel(true)).cet, Some(expected));
        let unknown = state.to_json().replace("\"ssp\"", "\"pl0_ssp\": 0, \"ssp\"");
        assert!(
            error(&unknown).starts_with("field cet.pl0_ssp: unknown field `pl0_ssp`"),
            "{}",
            error(&unknown)
        );
        let missing = state.to_json().replace("\"s_cet\": 4,", "");
        assert!(error(&missing).starts_with("field cet: missing field `s_cet`"), "{}", error(&missing));
    }

    #[test]
    fn oversized_table_limits_are_rules_not_parse_errors() {
        let mut state = sample();
        state.gdt.limit = 0x1_0000;
        let parsed = StateFile::parse(&state.to_json()).unwrap();
        assert_eq!(parsed.guest_state(&Platform::intel(true)).gdt.limit, 0x1_0000);
        let err = parsed.to_kvm(&kvm_sregs::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "field gdt.limit: 0x10000 does not fit KVM's 16-bit descriptor-table limit"
        );
    }
}
