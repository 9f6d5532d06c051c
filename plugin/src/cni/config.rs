//! The network configuration on stdin: the CNI fields ferry reads and its
//! own plugin fields (CONTRACTS.md "Plugin config"). Everything else is
//! ignored so that a field ferry never uses cannot fail a pod.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::Deserialize;
use serde_json::Value;

use super::args::parse_requested_ip;
use super::error::{CniError, code};

pub const DEFAULT_LOG_FILE: &str = "/var/log/ferry/cni.log";
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
const POD_ANNOTATIONS: &str = "io.kubernetes.cri.pod-annotations";
const POOL_ANNOTATION: &str = "ferry.dev/pool";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    // cniVersion is read (and gated) by request.rs before this parse.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub ipamd: IpamdConf,
    /// 0 = the MTU ipamd returns.
    #[serde(default)]
    pub mtu: u32,
    /// "" = stderr only.
    #[serde(default = "default_log_file")]
    pub log_file: String,
    #[serde(default = "default_log_level")]
    pub log_level: String,
    #[serde(default)]
    pub args: Option<Value>,
    #[serde(default)]
    pub runtime_config: Option<Value>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamdConf {
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl Default for IpamdConf {
    fn default() -> Self {
        IpamdConf {
            socket: default_socket(),
            timeout_ms: DEFAULT_TIMEOUT_MS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

fn default_socket() -> PathBuf {
    PathBuf::from(ferry_proto::DEFAULT_SOCKET)
}
fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_log_file() -> String {
    DEFAULT_LOG_FILE.to_string()
}
fn default_log_level() -> String {
    "info".to_string()
}

impl NetConf {
    /// Well-formed JSON with the wrong shape is an invalid config (7); JSON
    /// that does not parse at all is a decode error (6), raised by the caller.
    pub fn from_value(v: Value) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_value(v).map_err(|e| {
            CniError::new(code::INVALID_CONFIG, format!("invalid network config: {e}"))
        })?;
        if conf.name.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid network config: missing network name",
            ));
        }
        if conf.ipamd.timeout_ms == 0 {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid network config: ipamd.timeoutMs must be greater than 0",
            ));
        }
        Ok(conf)
    }

    /// Explicit addresses from `args.cni.ips` and `runtimeConfig.ips`.
    pub fn requested_ips(&self) -> Result<Vec<Ipv4Addr>, CniError> {
        let from_args = self
            .args
            .as_ref()
            .and_then(|a| a.get("cni"))
            .and_then(|c| c.get("ips"));
        let from_runtime = self.runtime_config.as_ref().and_then(|r| r.get("ips"));
        let mut out = Vec::new();
        for (field, list) in [
            ("args.cni.ips", from_args),
            ("runtimeConfig.ips", from_runtime),
        ] {
            let Some(list) = list else { continue };
            let Some(items) = list.as_array() else {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("{field} must be an array of addresses"),
                ));
            };
            for item in items {
                let s = item.as_str().ok_or_else(|| {
                    CniError::new(
                        code::INVALID_CONFIG,
                        format!("{field}: {item} is not a string"),
                    )
                })?;
                let ip = parse_requested_ip(s).map_err(|why| {
                    CniError::new(code::INVALID_CONFIG, format!("{field}: {why}"))
                })?;
                out.push(ip);
            }
        }
        Ok(out)
    }

    /// The pod annotation `ferry.dev/pool`, when the runtime passes pod annotations.
    pub fn pool_hint(&self) -> Option<String> {
        self.runtime_config
            .as_ref()?
            .get(POD_ANNOTATIONS)?
            .get(POOL_ANNOTATION)?
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    }
}

/// The gateway a prevResult gives one of `addresses`, if it names one.
pub fn prev_result_gateway(prev: &Value, addresses: &[Ipv4Net]) -> Option<std::net::Ipv4Addr> {
    prev.get("ips")?.as_array()?.iter().find_map(|ip| {
        let address: Ipv4Net = ip.get("address")?.as_str()?.parse().ok()?;
        if !addresses.contains(&address) {
            return None;
        }
        ip.get("gateway")?.as_str()?.parse().ok()
    })
}

/// The IPv4 addresses a prevResult (any version from 0.1.0 to 1.1.0)
/// assigns to `ifname`: ips whose `interface` index names `ifname`, plus
/// ips with no index. A pre-0.3.0 result (`ip4`) counts as `ifname`'s.
pub fn prev_result_addresses(prev: &Value, ifname: &str) -> Result<Vec<Ipv4Net>, String> {
    let mut out = Vec::new();
    if let Some(ip4) = prev.get("ip4") {
        let s = ip4
            .get("ip")
            .and_then(Value::as_str)
            .ok_or("prevResult.ip4.ip is missing")?;
        out.push(parse_prev_address(s)?);
        return Ok(out);
    }
    let interfaces = prev
        .get("interfaces")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let Some(ips) = prev.get("ips") else {
        return Ok(out);
    };
    let ips = ips.as_array().ok_or("prevResult.ips is not an array")?;
    for ip in ips {
        let address = ip
            .get("address")
            .and_then(Value::as_str)
            .ok_or("prevResult.ips[].address is missing")?;
        if address.contains(':') {
            continue;
        }
        let ours = match ip.get("interface").and_then(Value::as_u64) {
            None => true,
            Some(i) => {
                usize::try_from(i)
                    .ok()
                    .and_then(|i| interfaces.get(i))
                    .and_then(|iface| iface.get("name"))
                    .and_then(Value::as_str)
                    == Some(ifname)
            }
        };
        if ours {
            out.push(parse_prev_address(address)?);
        }
    }
    Ok(out)
}

fn parse_prev_address(s: &str) -> Result<Ipv4Net, String> {
    s.parse::<Ipv4Net>()
        .map_err(|e| format!("prevResult address {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_apply() {
        let c = NetConf::from_value(json!({"cniVersion":"1.0.0","name":"ferry","type":"ferry"}))
            .unwrap();
        assert_eq!(c.ipamd.socket, PathBuf::from("/run/ferry/ipamd.sock"));
        assert_eq!(c.ipamd.timeout_ms, 5000);
        assert_eq!(c.mtu, 0);
        assert_eq!(c.log_file, "/var/log/ferry/cni.log");
        assert_eq!(c.log_level, "info");
    }

    #[test]
    fn plugin_fields_parse() {
        let c = NetConf::from_value(json!({
            "cniVersion":"1.1.0","name":"n","type":"ferry",
            "ipamd":{"socket":"/tmp/s.sock","timeoutMs":250},
            "mtu":1400,"logFile":"","logLevel":"debug"
        }))
        .unwrap();
        assert_eq!(c.ipamd.socket, PathBuf::from("/tmp/s.sock"));
        assert_eq!(c.ipamd.timeout_ms, 250);
        assert_eq!(c.mtu, 1400);
        assert_eq!(c.log_file, "");
    }

    #[test]
    fn wrong_shapes_are_invalid_config() {
        for v in [
            json!({"cniVersion":"1.0.0","type":"ferry"}),
            json!({"cniVersion":"1.0.0","name":"n","mtu":"big"}),
            json!({"cniVersion":"1.0.0","name":"n","ipamd":{"timeoutMs":0}}),
            json!({"cniVersion":"1.0.0","name":"n","ipamd":{"socket":5}}),
        ] {
            assert_eq!(NetConf::from_value(v).unwrap_err().code, 7);
        }
    }

    #[test]
    fn fields_we_never_read_do_not_fail_the_config() {
        // cni-plugin's RuntimeConfig would reject the sctp mapping.
        let c = NetConf::from_value(json!({
            "cniVersion":"1.0.0","name":"n","type":"ferry","ipMasq":"yes",
            "runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"protocol":"sctp"}]}
        }));
        assert!(c.is_ok());
    }

    #[test]
    fn requested_ips_from_args_and_runtime_config() {
        let c = NetConf::from_value(json!({
            "cniVersion":"1.0.0","name":"n",
            "args":{"cni":{"ips":["10.0.0.5/24"]}},
            "runtimeConfig":{"ips":["10.0.0.6"]}
        }))
        .unwrap();
        assert_eq!(
            c.requested_ips().unwrap(),
            vec![Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(10, 0, 0, 6)]
        );
        let bad = NetConf::from_value(json!({"cniVersion":"1.0.0","name":"n",
            "runtimeConfig":{"ips":["fd00::5/64"]}}))
        .unwrap();
        assert_eq!(bad.requested_ips().unwrap_err().code, 7);
    }

    #[test]
    fn pool_hint_from_pod_annotations() {
        let c = NetConf::from_value(json!({"cniVersion":"1.0.0","name":"n",
            "runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"ferry.dev/pool":"blue","x":"y"}}}))
        .unwrap();
        assert_eq!(c.pool_hint().as_deref(), Some("blue"));
        let none = NetConf::from_value(json!({"cniVersion":"1.0.0","name":"n"})).unwrap();
        assert_eq!(none.pool_hint(), None);
    }

    #[test]
    fn prev_result_addresses_any_version() {
        let v04 = json!({"cniVersion":"0.4.0",
            "interfaces":[{"name":"fryabc"},{"name":"eth0","sandbox":"/x"},{"name":"net1","sandbox":"/x"}],
            "ips":[{"version":"4","address":"10.0.0.2/32","interface":1},
                   {"version":"4","address":"10.9.0.2/24","interface":2},
                   {"version":"6","address":"fd00::2/128","interface":1}]});
        assert_eq!(
            prev_result_addresses(&v04, "eth0").unwrap(),
            vec!["10.0.0.2/32".parse::<Ipv4Net>().unwrap()]
        );
        let v1 = json!({"cniVersion":"1.0.0","ips":[{"address":"10.0.0.3/32"}]});
        assert_eq!(prev_result_addresses(&v1, "eth0").unwrap().len(), 1);
        let v02 = json!({"cniVersion":"0.2.0","ip4":{"ip":"10.0.0.4/32"}});
        assert_eq!(prev_result_addresses(&v02, "eth0").unwrap().len(), 1);
        assert!(
            prev_result_addresses(&json!({}), "eth0")
                .unwrap()
                .is_empty()
        );
        assert!(prev_result_addresses(&json!({"ips":[{"address":"x"}]}), "eth0").is_err());
    }
}
