//! CNI errors: `{cniVersion, code, msg, details}` on stdout with a non-zero
//! exit. Every ipamd and dataplane error becomes a code here, once; README.md
//! ("Error codes") documents each code.

use serde::Serialize;

use crate::ipam::IpamClientError;
use ferry::dataplane::DataplaneError;

/// The codes ferry uses; 1-11 are the spec's, 50/51 STATUS, 100+ ferry's own.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    // Spec codes ferry has no use for yet; listed so the table is whole.
    #[allow(dead_code)]
    pub const UNSUPPORTED_FIELD: u32 = 2;
    #[allow(dead_code)]
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const NO_ADDRESSES: u32 = 51;
    pub const POOL_EXHAUSTED: u32 = 100;
    pub const ADDRESS_UNAVAILABLE: u32 = 101;
    pub const IPAMD_VERSION: u32 = 102;
    pub const NETNS: u32 = 103;
    pub const INTERFACE_EXISTS: u32 = 104;
    pub const DATAPLANE: u32 = 105;
    pub const INTERNAL: u32 = 106;
    pub const CHECK_MISMATCH: u32 = 107;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorJson<'a> {
    cni_version: &'a str,
    code: u32,
    msg: &'a str,
    details: &'a str,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The error as the runtime reads it from stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        let body = ErrorJson {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        };
        // Serializing a struct of strings and an integer cannot fail; the
        // fallback keeps stdout valid JSON regardless.
        serde_json::to_string(&body).unwrap_or_else(|_| {
            format!(
                r#"{{"cniVersion":"{cni_version}","code":{},"msg":"internal error","details":""}}"#,
                code::INTERNAL
            )
        })
    }
}

impl From<IpamClientError> for CniError {
    fn from(e: IpamClientError) -> Self {
        let code = match &e {
            IpamClientError::Unreachable(_) | IpamClientError::Unavailable(_) => code::TRY_AGAIN,
            IpamClientError::Exhausted(_) => code::POOL_EXHAUSTED,
            IpamClientError::AddressUnavailable(_) => code::ADDRESS_UNAVAILABLE,
            IpamClientError::InvalidRequest(_) => code::INVALID_CONFIG,
            IpamClientError::VersionMismatch(_) => code::IPAMD_VERSION,
            IpamClientError::Internal(_) => code::INTERNAL,
        };
        CniError::new(code, e.to_string())
    }
}

impl From<DataplaneError> for CniError {
    fn from(e: DataplaneError) -> Self {
        let code = match &e {
            DataplaneError::NetnsMissing { .. } | DataplaneError::Netns { .. } => code::NETNS,
            DataplaneError::InterfaceExists { .. } => code::INTERFACE_EXISTS,
            DataplaneError::Netlink { .. } | DataplaneError::Sysctl { .. } => code::DATAPLANE,
            DataplaneError::Mismatch(_) => code::CHECK_MISMATCH,
        };
        CniError::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn error_json_has_the_spec_shape() {
        let e = CniError::new(code::DECODE, "bad stdin").with_details("line 1");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion":"1.0.0","code":6,"msg":"bad stdin","details":"line 1"})
        );
    }

    #[test]
    fn ipam_errors_map_once() {
        let cases = [
            (IpamClientError::Unreachable("x".into()), 11),
            (IpamClientError::Unavailable("x".into()), 11),
            (IpamClientError::Exhausted("x".into()), 100),
            (IpamClientError::AddressUnavailable("x".into()), 101),
            (IpamClientError::VersionMismatch("x".into()), 102),
            (IpamClientError::InvalidRequest("x".into()), 7),
            (IpamClientError::Internal("x".into()), 106),
        ];
        for (e, want) in cases {
            assert_eq!(CniError::from(e).code, want);
        }
    }

    #[test]
    fn dataplane_errors_map_once() {
        let p = PathBuf::from("/run/netns/x");
        let cases = [
            (DataplaneError::NetnsMissing { path: p.clone() }, 103),
            (
                DataplaneError::InterfaceExists {
                    ifname: "eth0".into(),
                    netns: p,
                    attached: false,
                },
                104,
            ),
            (
                DataplaneError::Netlink {
                    op: "add link".into(),
                    detail: "EPERM".into(),
                },
                105,
            ),
            (DataplaneError::Mismatch("route".into()), 107),
        ];
        for (e, want) in cases {
            assert_eq!(CniError::from(e).code, want);
        }
    }
}
