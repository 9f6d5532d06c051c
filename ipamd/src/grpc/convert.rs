//! Requests in, answers out: bounds and parsing of what a client sends,
//! and the model's types as the wire spells them.

use std::net::Ipv4Addr;

use ferry_proto::v1 as pb;
use tonic::Status;

use crate::alloc::pool;
use crate::config::DEFAULT_BLOCK_SIZE;
use crate::model::{
    AllocKey, Allocation, BlockUsage, Finding, PodMeta, PoolSpec, PoolUsage, Readiness,
};
use crate::node::HostLink;

pub(super) fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// Bounds on what a request may carry, checked before anything is stored:
/// an allocation keeps these strings for as long as its pod lives.
pub(super) mod limits {
    /// CNI network names and container IDs (runtimes use 64 hex characters).
    pub const ID: usize = 256;
    /// Kubernetes object names (DNS subdomains) and UIDs.
    pub const K8S_NAME: usize = 253;
    /// PATH_MAX.
    pub const PATH: usize = 4096;
    pub const REQUESTED_IPS: usize = 16;
    /// A node's attachments, with room to spare (110 to 250 pods is usual).
    pub const GC_VALID: usize = 65_536;
}

/// INVALID_ARGUMENT naming `field` when `value` is longer than `max` bytes.
pub(super) fn bounded(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(invalid(format!(
            "{field} is {} bytes long; at most {max} are allowed",
            value.len()
        )));
    }
    Ok(())
}

pub(super) fn at_most<T>(field: &str, items: &[T], max: usize) -> Result<(), Status> {
    if items.len() > max {
        return Err(invalid(format!(
            "{field} has {} entries; at most {max} are allowed",
            items.len()
        )));
    }
    Ok(())
}

/// The host veth the plugin asks ipamd to delete: it must be the one this
/// key's pod hangs off, so a confused client cannot unplug anything else.
pub(super) fn parse_host_link(link: pb::HostLink, key: &AllocKey) -> Result<HostLink, Status> {
    let expected = key.host_veth();
    if link.name != expected {
        return Err(invalid(format!(
            "host_link {:?} is not the host veth of this key (expected {expected:?})",
            link.name
        )));
    }
    if link.ifindex == 0 {
        return Err(invalid("host_link.ifindex is 0"));
    }
    Ok(HostLink {
        name: link.name,
        index: link.ifindex,
    })
}

pub(super) fn parse_key(key: Option<pb::AllocationKey>, field: &str) -> Result<AllocKey, Status> {
    let key = key.ok_or_else(|| invalid(format!("{field} is missing")))?;
    let key = AllocKey {
        network: key.network.trim().to_string(),
        container_id: key.container_id.trim().to_string(),
        ifname: key.ifname.trim().to_string(),
    };
    check_key(&key, field)?;
    Ok(key)
}

pub(super) fn check_key(key: &AllocKey, field: &str) -> Result<(), Status> {
    bounded(&format!("{field}.network"), &key.network, limits::ID)?;
    bounded(
        &format!("{field}.container_id"),
        &key.container_id,
        limits::ID,
    )?;
    if key.network.is_empty() {
        return Err(invalid(format!("{field}.network is empty")));
    }
    if key.container_id.is_empty() {
        return Err(invalid(format!("{field}.container_id is empty")));
    }
    if key.ifname.is_empty() {
        return Err(invalid(format!("{field}.ifname is empty")));
    }
    // IFNAMSIZ - 1: the kernel would refuse a longer name anyway.
    if key.ifname.len() > 15 || key.ifname.contains(['/', ' ', '\0']) {
        return Err(invalid(format!(
            "{field}.ifname {:?} is not a valid interface name",
            key.ifname
        )));
    }
    Ok(())
}

/// An IPv4 address, optionally written as a CIDR ("10.0.0.5/24", as CNI's
/// `ips` carries it); the prefix is ignored since pods get a /32.
pub(super) fn parse_ip(field: &str, text: &str) -> Result<Ipv4Addr, Status> {
    let text = text.trim();
    let addr = text.split_once('/').map_or(text, |(a, _)| a);
    let ok_prefix = text
        .split_once('/')
        .is_none_or(|(_, p)| p.parse::<u8>().is_ok_and(|p| p <= 32));
    match addr.parse::<Ipv4Addr>() {
        Ok(ip) if ok_prefix => Ok(ip),
        _ => Err(invalid(format!("{field} {text:?} is not an IPv4 address"))),
    }
}

pub(super) fn pod_from(pod: Option<pb::PodMeta>) -> Result<PodMeta, Status> {
    let pod = pod.unwrap_or_default();
    bounded("pod.namespace", &pod.namespace, limits::K8S_NAME)?;
    bounded("pod.name", &pod.name, limits::K8S_NAME)?;
    bounded("pod.uid", &pod.uid, limits::K8S_NAME)?;
    bounded("pod.netns", &pod.netns, limits::PATH)?;
    Ok(PodMeta {
        namespace: pod.namespace,
        name: pod.name,
        uid: pod.uid,
        netns: pod.netns,
    })
}

pub(super) fn non_empty(s: String) -> Option<String> {
    let s = s.trim().to_string();
    (!s.is_empty()).then_some(s)
}

pub fn allocation_to_pb(a: &Allocation) -> pb::Allocation {
    pb::Allocation {
        key: Some(pb::AllocationKey {
            network: a.key.network.clone(),
            container_id: a.key.container_id.clone(),
            ifname: a.key.ifname.clone(),
        }),
        ip: a.ip.to_string(),
        pool: a.pool.clone(),
        block: a.block.to_string(),
        pod: Some(pb::PodMeta {
            namespace: a.pod.namespace.clone(),
            name: a.pod.name.clone(),
            uid: a.pod.uid.clone(),
            netns: a.pod.netns.clone(),
        }),
        created_unix_ms: a.created_unix_ms,
    }
}

pub(super) fn allocations_to_pb<'a>(
    all: impl IntoIterator<Item = &'a Allocation>,
) -> Vec<pb::Allocation> {
    all.into_iter().map(allocation_to_pb).collect()
}

pub fn pool_to_pb(p: &PoolSpec) -> pb::Pool {
    pb::Pool {
        name: p.name.clone(),
        cidr: p.cidr.to_string(),
        block_size: u32::from(p.block_size),
        namespaces: p.namespaces.clone(),
        nat_outgoing: p.nat_outgoing,
        snat_address: p.snat_address.map(|a| a.to_string()).unwrap_or_default(),
        isolated: p.isolated,
        allow_from: p.allow_from.clone(),
        is_default: p.is_default(),
    }
}

pub(super) fn pool_usage_to_pb(u: &PoolUsage) -> pb::PoolUsage {
    let mut pool = pool_to_pb(&u.pool);
    pool.is_default = u.is_default;
    pb::PoolUsage {
        pool: Some(pool),
        size: u.size,
        allocated: u.allocated,
        cooling: u.cooling,
        blocks: u.blocks,
    }
}

pub(super) fn block_to_pb(b: &BlockUsage) -> pb::Block {
    pb::Block {
        pool: b.claim.pool.clone(),
        cidr: b.claim.cidr.to_string(),
        node: b.claim.node.clone(),
        size: b.size,
        allocated: b.allocated,
        cooling: b.cooling,
        claimed_unix_ms: b.claim.claimed_unix_ms,
    }
}

pub(super) fn finding_to_pb(f: &Finding) -> pb::Finding {
    pb::Finding {
        kind: f.kind.as_str().to_string(),
        detail: f.detail.clone(),
        allocation: f.allocation.as_ref().map(allocation_to_pb),
    }
}

/// A pool from AddPool, read and checked by the config file's rules.
pub(super) fn pool_from_pb(p: Option<pb::Pool>) -> Result<PoolSpec, Status> {
    let p = p.ok_or_else(|| invalid("pool is missing"))?;
    let parts = pool::PoolParts {
        name: &p.name,
        cidr: &p.cidr,
        // 0: not given.
        block_size: (p.block_size != 0).then_some(p.block_size),
        namespaces: &p.namespaces,
        nat_outgoing: p.nat_outgoing,
        snat_address: Some(&p.snat_address),
        isolated: p.isolated,
        allow_from: &p.allow_from,
    };
    let spec = pool::parse(&parts, DEFAULT_BLOCK_SIZE).map_err(|e| {
        let field = e.field().map_or(String::new(), |f| format!(".{f}"));
        invalid(format!("invalid pool{field}: {}", e.detail()))
    })?;
    Ok(PoolSpec {
        runtime: true,
        ..spec
    })
}

pub(super) fn readiness_to_pb(r: Readiness) -> pb::Readiness {
    match r {
        Readiness::Ready => pb::Readiness::Ready,
        Readiness::NotAvailable => pb::Readiness::NotAvailable,
        Readiness::NoAddresses => pb::Readiness::NoAddresses,
    }
}
