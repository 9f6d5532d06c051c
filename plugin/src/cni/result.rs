//! The ADD result, written in the version the config asked for. A chained
//! prevResult is carried through as raw JSON with ferry's entries appended,
//! so later plugins (portmap, bandwidth) see every field earlier ones wrote.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use cni_plugin::reply::{Dns, Route};
use ipnet::Ipv4Net;
use ipnetwork::{IpNetwork, Ipv4Network};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::error::{CniError, code};
use super::version::CniVersion;

/// An interface entry. Not the crate's: `sandbox` must be absent on the
/// host side, and MACs are written in lower case as the spec examples do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interface {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    /// Index into this result's own `interfaces`.
    pub interface: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct AddResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

/// What ADD wired: the host veth, the pod interface, its addresses.
pub struct Wired<'a> {
    pub host_veth: &'a str,
    pub host_mac: [u8; 6],
    pub ifname: &'a str,
    pub pod_mac: [u8; 6],
    pub netns: &'a Path,
    pub addresses: &'a [Ipv4Net],
    pub gateway: Ipv4Addr,
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl AddResult {
    /// interfaces[0] = host veth, interfaces[1] = pod side; one ip per
    /// address on interface 1; a default route via the gateway.
    pub fn for_pod(w: &Wired<'_>) -> Result<Self, CniError> {
        let any = Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0)
            .map_err(|e| CniError::new(code::INTERNAL, format!("default route: {e}")))?;
        Ok(AddResult {
            interfaces: vec![
                Interface {
                    name: w.host_veth.to_string(),
                    mac: Some(format_mac(w.host_mac)),
                    sandbox: None,
                },
                Interface {
                    name: w.ifname.to_string(),
                    mac: Some(format_mac(w.pod_mac)),
                    sandbox: Some(w.netns.display().to_string()),
                },
            ],
            ips: w
                .addresses
                .iter()
                .map(|a| IpConfig {
                    address: *a,
                    gateway: Some(w.gateway),
                    interface: Some(1),
                })
                .collect(),
            routes: vec![Route {
                dst: IpNetwork::V4(any),
                gw: Some(IpAddr::V4(w.gateway)),
            }],
            dns: Dns::default(),
        })
    }

    /// The result JSON for `version`, appended to `prev` when chained.
    pub fn render(&self, version: CniVersion, prev: Option<&Value>) -> Result<Value, CniError> {
        let list = |key: &str| -> Vec<Value> {
            prev.and_then(|p| p.get(key))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let mut interfaces = list("interfaces");
        let mut ips = list("ips");
        let mut routes = list("routes");
        let offset = interfaces.len();

        for iface in &self.interfaces {
            interfaces.push(to_value(iface)?);
        }
        for ip in &self.ips {
            let mut entry = Map::new();
            entry.insert("address".into(), Value::String(ip.address.to_string()));
            if let Some(gw) = ip.gateway {
                entry.insert("gateway".into(), Value::String(gw.to_string()));
            }
            if let Some(i) = ip.interface {
                entry.insert("interface".into(), json!(i + offset));
            }
            ips.push(Value::Object(entry));
        }
        for route in &self.routes {
            routes.push(to_value(route)?);
        }
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            set_ip_version(ip, version);
        }
        let dns = match prev.and_then(|p| p.get("dns")) {
            Some(d) if d.is_object() => d.clone(),
            _ => to_value(&self.dns)?,
        };
        Ok(json!({
            "cniVersion": version.as_str(),
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
            "dns": dns,
        }))
    }
}

/// 0.3.x/0.4.0 require `version` on each ip; 1.x removed it.
fn set_ip_version(ip: &mut Map<String, Value>, version: CniVersion) {
    if !version.ips_carry_version() {
        ip.remove("version");
        return;
    }
    if ip.contains_key("version") {
        return;
    }
    let family = match ip.get("address").and_then(Value::as_str) {
        Some(a) if a.contains(':') => "6",
        _ => "4",
    };
    ip.insert("version".into(), Value::String(family.into()));
}

fn to_value<T: Serialize>(v: &T) -> Result<Value, CniError> {
    serde_json::to_value(v)
        .map_err(|e| CniError::new(code::INTERNAL, format!("cannot encode the result: {e}")))
}

#[cfg(test)]
mod tests;
