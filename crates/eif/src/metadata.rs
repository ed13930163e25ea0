//! The metadata section (compact JSON, nitro-cli's `EifIdentityInfo`) and how describe-eif
//! shows it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// nitro-cli refuses `--metadata` files larger than this.
pub const MAX_CUSTOM_METADATA: u64 = 4096;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuildInfo {
    #[serde(rename = "BuildTime")]
    pub build_time: String,
    #[serde(rename = "BuildTool")]
    pub build_tool: String,
    #[serde(rename = "BuildToolVersion")]
    pub build_tool_version: String,
    #[serde(rename = "OperatingSystem")]
    pub operating_system: String,
    #[serde(rename = "KernelVersion")]
    pub kernel_version: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IdentityInfo {
    #[serde(rename = "ImageName")]
    pub image_name: String,
    #[serde(rename = "ImageVersion")]
    pub image_version: String,
    #[serde(rename = "BuildMetadata")]
    pub build_info: BuildInfo,
    #[serde(rename = "DockerInfo")]
    pub docker_info: Value,
    #[serde(rename = "CustomMetadata")]
    pub custom_metadata: Value,
}

impl IdentityInfo {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("identity info always serializes")
    }

    pub fn parse(bytes: &[u8]) -> Result<IdentityInfo, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// describe-eif's `Metadata`: the build info, DockerInfo, and the custom metadata's keys
/// flattened into the same object.
#[derive(Serialize)]
pub struct MetadataDescription {
    #[serde(rename = "BuildTime")]
    build_time: String,
    #[serde(rename = "BuildTool")]
    build_tool: String,
    #[serde(rename = "BuildToolVersion")]
    build_tool_version: String,
    #[serde(rename = "OperatingSystem")]
    operating_system: String,
    #[serde(rename = "KernelVersion")]
    kernel_version: String,
    #[serde(rename = "DockerInfo")]
    docker_info: Value,
    #[serde(flatten)]
    custom: serde_json::Map<String, Value>,
}

impl From<IdentityInfo> for MetadataDescription {
    fn from(info: IdentityInfo) -> Self {
        let custom = match info.custom_metadata {
            Value::Object(map) => map,
            Value::Null => Default::default(),
            other => [("CustomMetadata".to_string(), other)].into_iter().collect(),
        };
        let build = info.build_info;
        MetadataDescription {
            build_time: build.build_time,
            build_tool: build.build_tool,
            build_tool_version: build.build_tool_version,
            operating_system: build.operating_system,
            kernel_version: build.kernel_version,
            docker_info: info.docker_info,
            custom,
        }
    }
}

/// OS and version from a kernel `.config`'s third line
/// (`# Linux/x86_64 6.1.0 Kernel Configuration` → `Linux`, `6.1.0`), as nitro-cli reads them.
pub fn kernel_identity(config: &str) -> (String, String) {
    let line = config.lines().nth(2).unwrap_or("");
    let words: Vec<&str> = line.split([' ', '/', '-']).collect();
    let word = |i: usize| words.get(i).filter(|w| !w.is_empty()).unwrap_or(&"Unknown").to_string();
    (word(1), word(3))
}

/// Now, as RFC 3339 with nanoseconds and `+00:00` (chrono's `to_rfc3339`, which nitro-cli uses).
pub fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    rfc3339_at(now.as_secs(), now.subsec_nanos())
}

/// RFC 3339 (UTC) of a Unix time in seconds.
pub fn rfc3339(secs: u64) -> String {
    rfc3339_at(secs, 0)
}

fn rfc3339_at(secs: u64, nanos: u32) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}+00:00",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        nanos
    )
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_identity_reads_the_third_config_line() {
        let config = "#\n# Automatically generated file; DO NOT EDIT.\n# Linux/x86_64 4.14.177-104.253.amzn2.x86_64 Kernel Configuration\n";
        assert_eq!(kernel_identity(config), ("Linux".into(), "4.14.177".into()));
        assert_eq!(kernel_identity("short"), ("Unknown".into(), "Unknown".into()));
    }

    #[test]
    fn dates_are_gregorian() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
        let now = rfc3339_now();
        assert_eq!((now.len(), &now[now.len() - 6..]), (35, "+00:00"), "{now}");
    }

    #[test]
    fn custom_metadata_is_flattened_in_describe_output() {
        let info = IdentityInfo {
            image_name: "hello".into(),
            image_version: "1.0".into(),
            build_info: BuildInfo {
                build_time: "t".into(),
                build_tool: "carve".into(),
                build_tool_version: "0.1.0".into(),
                operating_system: "Linux".into(),
                kernel_version: "6.1".into(),
            },
            docker_info: serde_json::json!({}),
            custom_metadata: serde_json::json!({"team": "blue"}),
        };
        let text = serde_json::to_string(&MetadataDescription::from(info.clone())).unwrap();
        assert!(text.ends_with(r#""DockerInfo":{},"team":"blue"}"#), "{text}");
        assert_eq!(IdentityInfo::parse(&info.to_json()).unwrap(), info);
        assert!(String::from_utf8(info.to_json())
            .unwrap()
            .starts_with(r#"{"ImageName":"hello","ImageVersion":"1.0","BuildMetadata":{"BuildTime""#));
    }
}
