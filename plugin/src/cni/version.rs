//! The CNI spec versions ferry speaks, and the VERSION reply.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    pub const ALL: [CniVersion; 5] = [
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];

    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// 0.3.x and 0.4.0 results carry `"version": "4"|"6"` on every ip; 1.x dropped it.
    pub fn ips_carry_version(self) -> bool {
        self < CniVersion::V1_0_0
    }

    /// CHECK arrived in 0.4.0.
    pub fn has_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// STATUS and GC arrived in 1.1.0.
    pub fn has_status_and_gc(self) -> bool {
        self >= CniVersion::V1_1_0
    }
}

impl std::fmt::Display for CniVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionReply {
    pub cni_version: &'static str,
    pub supported_versions: Vec<&'static str>,
}

/// Echoes the requested version when ferry speaks it, else answers in the
/// latest; the list is exactly what ferry can produce, never more.
pub fn version_reply(requested: Option<&str>) -> VersionReply {
    let cni_version = requested
        .and_then(CniVersion::parse)
        .unwrap_or(CniVersion::LATEST)
        .as_str();
    VersionReply {
        cni_version,
        supported_versions: CniVersion::ALL.iter().map(|v| v.as_str()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trips_every_supported_version() {
        for v in CniVersion::ALL {
            assert_eq!(CniVersion::parse(v.as_str()), Some(v));
        }
        for bad in ["0.1.0", "0.2.0", "1.2.0", "1.0", "", "v1.0.0"] {
            assert_eq!(CniVersion::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn verb_gates_follow_the_spec() {
        assert!(!CniVersion::V0_3_1.has_check());
        assert!(CniVersion::V0_4_0.has_check());
        assert!(!CniVersion::V1_0_0.has_status_and_gc());
        assert!(CniVersion::V1_1_0.has_status_and_gc());
        assert!(CniVersion::V0_4_0.ips_carry_version());
        assert!(!CniVersion::V1_0_0.ips_carry_version());
    }

    #[test]
    fn version_reply_lists_exactly_what_we_produce() {
        let json = serde_json::to_value(version_reply(Some("0.3.1"))).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "cniVersion": "0.3.1",
                "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
            })
        );
        // An unknown request is answered in the latest version, not echoed.
        let json = serde_json::to_value(version_reply(Some("1.5.0"))).unwrap();
        assert_eq!(json["cniVersion"], "1.1.0");
        let json = serde_json::to_value(version_reply(None)).unwrap();
        assert_eq!(json["cniVersion"], "1.1.0");
    }
}
