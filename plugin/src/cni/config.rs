//! The network configuration on stdin: the CNI fields ferry reads and its
//! own plugin fields (`ipamd.socket`, `ipamd.timeoutMs`, `mtu`, `logFile`,
//! `logLevel`; README.md, "The conflist"). Everything else is ignored so
//! that a field ferry never uses cannot fail a pod.

use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;
use serde_json::Value;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

use super::args::parse_requested_ip;
use super::error::{CniError, code};

pub const DEFAULT_LOG_FILE: &str = "/var/log/ferry/cni.log";
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// A runtime gives up on a plugin long before ten minutes.
pub const MAX_TIMEOUT_MS: u64 = 600_000;
/// IPv4's minimum MTU (RFC 791), also the kernel's floor for a veth.
pub const MIN_MTU: u32 = 68;
pub const MAX_MTU: u32 = 65535;
/// `sun_path` holds 108 bytes, the last one a NUL.
pub const MAX_SOCKET_PATH: usize = 107;
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

fn invalid(field: &str, why: impl std::fmt::Display) -> CniError {
    CniError::new(
        code::INVALID_CONFIG,
        format!("invalid network config: {field}: {why}"),
    )
}

impl NetConf {
    /// [`NetConf::decode`] and [`NetConf::check_tunables`], as every verb
    /// but DEL has them.
    #[cfg(test)]
    pub fn from_value(v: Value) -> Result<Self, CniError> {
        let conf = Self::decode(v)?;
        conf.check_tunables()?;
        Ok(conf)
    }

    /// The config's shape, and the fields every verb uses (`name`,
    /// `ipamd`). Well-formed JSON with the wrong shape is an invalid config
    /// (7), naming the field's path; JSON that does not parse at all is a
    /// decode error (6), raised by the caller.
    pub fn decode(v: Value) -> Result<Self, CniError> {
        let conf: NetConf = serde_path_to_error::deserialize(v).map_err(|e| {
            CniError::new(code::INVALID_CONFIG, format!("invalid network config: {e}"))
        })?;
        if conf.name.is_empty() {
            return Err(invalid("name", "missing: the network name is required"));
        }
        check_socket(&conf.ipamd.socket).map_err(|why| invalid("ipamd.socket", why))?;
        let timeout = conf.ipamd.timeout_ms;
        if !(1..=MAX_TIMEOUT_MS).contains(&timeout) {
            return Err(invalid(
                "ipamd.timeoutMs",
                format!("{timeout} is out of range (1..={MAX_TIMEOUT_MS})"),
            ));
        }
        Ok(conf)
    }

    /// `mtu` and `logLevel`, which DEL can do without: it sets no MTU, and
    /// logs at info when `logLevel` is bad.
    pub fn check_tunables(&self) -> Result<(), CniError> {
        let mtu = self.mtu;
        if mtu != 0 && !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            // The kernel would refuse it only after Allocate.
            return Err(invalid(
                "mtu",
                format!(
                    "{mtu} is out of range (0 = the MTU ipamd detects, else {MIN_MTU}..={MAX_MTU})"
                ),
            ));
        }
        log_directive(&self.log_level).map_err(|why| invalid("logLevel", why))?;
        Ok(())
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
            for (i, item) in items.iter().enumerate() {
                let s = item.as_str().ok_or_else(|| {
                    CniError::new(
                        code::INVALID_CONFIG,
                        format!("{field}[{i}]: {item} is not a string"),
                    )
                })?;
                let ip = parse_requested_ip(s).map_err(|why| {
                    CniError::new(code::INVALID_CONFIG, format!("{field}[{i}]: {why}"))
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

/// Where the plugin dials ipamd: an absolute path that fits a Unix socket address.
fn check_socket(path: &Path) -> Result<(), String> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Err("must not be empty".into());
    }
    if !path.is_absolute() {
        // Relative to whatever directory the runtime runs the plugin in.
        return Err(format!("{} is not an absolute path", path.display()));
    }
    if bytes.contains(&0) {
        return Err("contains a NUL byte".into());
    }
    if bytes.len() > MAX_SOCKET_PATH {
        return Err(format!(
            "{} is {} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH}",
            path.display(),
            bytes.len()
        ));
    }
    Ok(())
}

/// The tracing filter for `logLevel`: a bare level is for ferry's own code
/// (at debug, h2/hyper would log every frame); anything with `=` or `,` is
/// a filter as it stands.
pub fn log_directive(level: &str) -> Result<String, String> {
    const LEVELS: &str = "off, error, warn, info, debug, trace";
    let level = level.trim();
    if level.is_empty() {
        return Err(format!("must not be empty (one of {LEVELS}, or a filter)"));
    }
    // EnvFilter reads a bare word that is no level as a target name, so a
    // typo such as "debgu" would silently log nothing.
    for d in level.split(',').map(str::trim) {
        if !d.contains(['=', '[']) && d.parse::<LevelFilter>().is_err() {
            return Err(format!("{d:?} is not a level ({LEVELS})"));
        }
    }
    let directive = if level.contains(['=', ',']) {
        level.to_string()
    } else {
        format!("warn,ferry={level},ferry_proto={level}")
    };
    EnvFilter::try_new(&directive)
        .map_err(|e| format!("{level:?} is not a level ({LEVELS}) or a tracing filter: {e}"))?;
    Ok(directive)
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
mod tests;
