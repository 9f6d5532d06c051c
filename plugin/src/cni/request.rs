//! One invocation: the CNI_* environment and stdin, validated in the order
//! libcni's skel uses (environment, then stdin, then the version gates) so
//! that runtimes see the codes they expect.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde_json::Value;

use super::args::{self, CniArgs};
use super::config::{NetConf, ValidAttachment};
use super::error::{CniError, code};
use super::version::CniVersion;
use crate::ipam::{Key, PodInfo};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Verb {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Verb::Add,
            "DEL" => Verb::Del,
            "CHECK" => Verb::Check,
            "VERSION" => Verb::Version,
            "STATUS" => Verb::Status,
            "GC" => Verb::Gc,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub enum Request {
    /// `requested` is stdin's cniVersion, when there was one.
    Version {
        requested: Option<String>,
    },
    Add(Attachment),
    Del(Attachment),
    Check(Attachment),
    Status(StatusRequest),
    Gc(GcRequest),
}

/// ADD, DEL and CHECK: one interface of one container.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub version: CniVersion,
    pub conf: NetConf,
    pub container_id: String,
    /// None when CNI_NETNS is empty (allowed on DEL).
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: CniArgs,
    /// CNI_ARGS IP=, args.cni.ips, runtimeConfig.ips; ADD only.
    pub requested_ips: Vec<Ipv4Addr>,
    pub pool_hint: Option<String>,
    /// What DEL went on despite (bad CNI_ARGS, a bad `mtu` or `logLevel`),
    /// for the log: logging starts only after parsing.
    pub tolerated: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct StatusRequest {
    pub conf: NetConf,
}

#[derive(Debug, Clone)]
pub struct GcRequest {
    pub conf: NetConf,
    pub valid: Vec<ValidAttachment>,
    /// Bad values GC does not use, ignored: to be logged.
    pub tolerated: Vec<String>,
}

impl Attachment {
    pub fn key(&self) -> Key {
        Key {
            network: self.conf.name.clone(),
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }

    pub fn pod_info(&self) -> PodInfo {
        PodInfo {
            namespace: self.args.pod_namespace.clone().unwrap_or_default(),
            name: self.args.pod_name.clone().unwrap_or_default(),
            uid: self.args.pod_uid.clone().unwrap_or_default(),
            netns: self
                .netns
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        }
    }

    pub fn host_veth(&self) -> String {
        ferry_proto::host_veth_name(&self.container_id, &self.ifname)
    }
}

impl Request {
    /// The parsed config, for logging setup; VERSION has none.
    pub fn conf(&self) -> Option<&NetConf> {
        match self {
            Request::Version { .. } => None,
            Request::Add(a) | Request::Del(a) | Request::Check(a) => Some(&a.conf),
            Request::Status(s) => Some(&s.conf),
            Request::Gc(g) => Some(&g.conf),
        }
    }

    pub fn verb_name(&self) -> &'static str {
        match self {
            Request::Version { .. } => "VERSION",
            Request::Add(_) => "ADD",
            Request::Del(_) => "DEL",
            Request::Check(_) => "CHECK",
            Request::Status(_) => "STATUS",
            Request::Gc(_) => "GC",
        }
    }
}

/// The cniVersion to put on an error: stdin's when it has one, else the latest.
pub fn error_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| CniVersion::LATEST.as_str().to_string())
}

/// `env` returns a variable's value; empty counts as unset, as in libcni.
pub fn parse(env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Request, CniError> {
    let get = |name: &str| env(name).filter(|v| !v.is_empty());

    let command = get("CNI_COMMAND")
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set"))?;
    let verb = Verb::parse(&command).ok_or_else(|| {
        CniError::new(
            code::INVALID_ENV,
            format!("CNI_COMMAND {command:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"),
        )
    })?;

    if verb == Verb::Version {
        // stdin is optional here: older runtimes send nothing.
        let requested = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string));
        return Ok(Request::Version { requested });
    }

    let per_container = matches!(verb, Verb::Add | Verb::Del | Verb::Check);
    let mut container_id = String::new();
    let mut ifname = String::new();
    if per_container {
        let missing: Vec<&str> = ["CNI_CONTAINERID", "CNI_IFNAME"]
            .into_iter()
            .filter(|v| get(v).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "required environment variable(s) not set: {}",
                    missing.join(", ")
                ),
            ));
        }
        container_id = get("CNI_CONTAINERID").unwrap_or_default();
        ifname = get("CNI_IFNAME").unwrap_or_default();
        validate_container_id(&container_id)?;
        validate_ifname(&ifname)?;
    }

    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(code::DECODE, "cannot decode the network config on stdin")
            .with_details(e.to_string())
    })?;
    if !value.is_object() {
        return Err(CniError::new(
            code::DECODE,
            "the network config on stdin is not a JSON object",
        ));
    }
    let version = match value.get("cniVersion") {
        Some(Value::String(s)) => CniVersion::parse(s).ok_or_else(|| incompatible(s))?,
        // libcni reads a missing cniVersion as 0.1.0, which ferry does not speak.
        None => return Err(incompatible("0.1.0 (cniVersion not set)")),
        Some(other) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("cniVersion must be a string, got {other}"),
            ));
        }
    };
    let conf = NetConf::decode(value)?;
    validate_network_name(&conf.name)?;
    let mut tolerated = Vec::new();
    match conf.check_tunables() {
        Ok(()) => {}
        // Cleanup (DEL, GC) must not wedge on values it does not use.
        Err(e) if verb == Verb::Del => tolerated.push(format!("ignored on DEL: {e}")),
        Err(e) if verb == Verb::Gc => tolerated.push(format!("ignored on GC: {e}")),
        Err(e) => return Err(e),
    }

    match verb {
        Verb::Check if !version.has_check() => {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("config version {version} does not allow CHECK (needs 0.4.0 or later)"),
            ));
        }
        Verb::Status | Verb::Gc if !version.has_status_and_gc() => {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("config version {version} does not allow {command} (needs 1.1.0 or later)"),
            ));
        }
        _ => {}
    }

    match verb {
        Verb::Status => return Ok(Request::Status(StatusRequest { conf })),
        Verb::Gc => {
            let valid = conf.valid_attachments.clone().ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    "GC needs cni.dev/valid-attachments; refusing to release every address",
                )
            })?;
            return Ok(Request::Gc(GcRequest {
                conf,
                valid,
                tolerated,
            }));
        }
        _ => {}
    }

    let raw_args = get("CNI_ARGS").unwrap_or_default();
    let cni_args = match args::parse(&raw_args) {
        Ok(a) => a,
        // DEL must not wedge on arguments it does not need.
        Err(e) if verb == Verb::Del => {
            tolerated.push(format!("ignored on DEL: {e}"));
            CniArgs::default()
        }
        Err(e) => return Err(e),
    };
    let (requested_ips, pool_hint) = if verb == Verb::Add {
        let mut ips = cni_args.ips.clone();
        for ip in conf.requested_ips()? {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        (ips, conf.pool_hint())
    } else {
        (Vec::new(), None)
    };
    let attachment = Attachment {
        version,
        netns: get("CNI_NETNS").map(PathBuf::from),
        conf,
        container_id,
        ifname,
        args: cni_args,
        requested_ips,
        pool_hint,
        tolerated,
    };
    Ok(match verb {
        Verb::Add => Request::Add(attachment),
        Verb::Del => Request::Del(attachment),
        _ => Request::Check(attachment),
    })
}

fn incompatible(requested: &str) -> CniError {
    let supported: Vec<&str> = CniVersion::ALL.iter().map(|v| v.as_str()).collect();
    CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!("incompatible CNI version {requested}"),
    )
    .with_details(format!("ferry supports {}", supported.join(", ")))
}

/// libcni's rule for container IDs and network names: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn validate_container_id(id: &str) -> Result<(), CniError> {
    if valid_name(id) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_CONTAINERID {id:?} contains invalid characters"),
        ))
    }
}

fn validate_network_name(name: &str) -> Result<(), CniError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_CONFIG,
            format!("network name {name:?} contains invalid characters"),
        ))
    }
}

/// The kernel's rule (dev_valid_name): 1-15 bytes, not . or .., no / : or
/// whitespace; and no `%`, which would make the kernel pick the name itself.
fn validate_ifname(name: &str) -> Result<(), CniError> {
    let bad = |why: &str| {
        Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_IFNAME {name:?} {why}"),
        ))
    };
    if name.len() > 15 {
        return bad("is longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("is not a valid interface name");
    }
    if name
        .chars()
        .any(|c| matches!(c, '/' | ':' | '%') || c.is_whitespace())
    {
        return bad("contains '/', ':', '%' or whitespace");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
