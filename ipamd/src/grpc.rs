//! The gRPC face of ipamd: `ferry.ipam.v1.Ipam` for the plugin and
//! `IpamAdmin` for ipamctl, over the core [`crate::ipam::Ipam`]. This module
//! owns the wire: version checks, request validation, model <-> proto
//! conversion, and the one mapping from [`IpamError`] to a gRPC status.

use std::net::Ipv4Addr;
use std::sync::Arc;

use ferry_proto::v1 as pb;
use ferry_proto::v1::ipam_admin_server::IpamAdmin;
use ferry_proto::v1::ipam_server::Ipam as IpamRpc;
use tonic::{Code, Request, Response, Status};

use crate::alloc::pool;
use crate::config::DEFAULT_BLOCK_SIZE;
use crate::error::IpamError;
use crate::ipam::Ipam;
use crate::model::{
    AddressState, AllocKey, AllocateParams, Allocation, AllocationFilter, BlockUsage, Finding,
    PodMeta, PoolSpec, PoolUsage, Readiness,
};
use crate::node::{HostLink, Unplugger};
use crate::reconcile::{ReconcileError, Reconciler};

/// The one place an [`IpamError`] becomes a gRPC status. The plugin picks
/// its CNI code (and whether the runtime retries) from the code, so every
/// variant is mapped explicitly.
pub fn ipam_status(err: &IpamError) -> Status {
    let code = match err {
        IpamError::Exhausted { .. } => Code::ResourceExhausted,
        IpamError::AddressUnavailable { .. } => Code::AlreadyExists,
        IpamError::InvalidArgument(_) | IpamError::UnknownPool(_) => Code::InvalidArgument,
        IpamError::NotFound(_) => Code::NotFound,
        IpamError::Conflict(_) => Code::Aborted,
        IpamError::Cluster(_) | IpamError::Held { .. } => Code::Unavailable,
        IpamError::Store(_) | IpamError::Internal(_) => Code::Internal,
    };
    Status::new(code, err.to_string())
}

fn reconcile_status(err: &ReconcileError) -> Status {
    match err {
        ReconcileError::Ipam(e) => ipam_status(e),
        ReconcileError::Node(e) => Status::internal(format!("reconcile: {e}")),
        ReconcileError::ShuttingDown => Status::unavailable(err.to_string()),
    }
}

/// FAILED_PRECONDITION naming both versions when they are not compatible.
pub fn check_version(client_version: &str) -> Result<(), Status> {
    let server = ferry_proto::CLIENT_VERSION;
    if ferry_proto::versions_compatible(client_version, server) {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "client version {client_version:?} is not compatible with ipamd version {server:?}; upgrade the plugin/ipamctl and ipamd together"
        )))
    }
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// Bounds on what a request may carry, checked before anything is stored:
/// an allocation keeps these strings for as long as its pod lives.
mod limits {
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
fn bounded(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(invalid(format!(
            "{field} is {} bytes long; at most {max} are allowed",
            value.len()
        )));
    }
    Ok(())
}

fn at_most<T>(field: &str, items: &[T], max: usize) -> Result<(), Status> {
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
fn parse_host_link(link: pb::HostLink, key: &AllocKey) -> Result<HostLink, Status> {
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

fn parse_key(key: Option<pb::AllocationKey>, field: &str) -> Result<AllocKey, Status> {
    let key = key.ok_or_else(|| invalid(format!("{field} is missing")))?;
    let key = AllocKey {
        network: key.network.trim().to_string(),
        container_id: key.container_id.trim().to_string(),
        ifname: key.ifname.trim().to_string(),
    };
    check_key(&key, field)?;
    Ok(key)
}

fn check_key(key: &AllocKey, field: &str) -> Result<(), Status> {
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
fn parse_ip(field: &str, text: &str) -> Result<Ipv4Addr, Status> {
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

fn pod_from(pod: Option<pb::PodMeta>) -> Result<PodMeta, Status> {
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

fn non_empty(s: String) -> Option<String> {
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

fn allocations_to_pb<'a>(all: impl IntoIterator<Item = &'a Allocation>) -> Vec<pb::Allocation> {
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

fn pool_usage_to_pb(u: &PoolUsage) -> pb::PoolUsage {
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

fn block_to_pb(b: &BlockUsage) -> pb::Block {
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

fn finding_to_pb(f: &Finding) -> pb::Finding {
    pb::Finding {
        kind: f.kind.as_str().to_string(),
        detail: f.detail.clone(),
        allocation: f.allocation.as_ref().map(allocation_to_pb),
    }
}

/// A pool from AddPool, read and checked by the config file's rules.
fn pool_from_pb(p: Option<pb::Pool>) -> Result<PoolSpec, Status> {
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

fn readiness_to_pb(r: Readiness) -> pb::Readiness {
    match r {
        Readiness::Ready => pb::Readiness::Ready,
        Readiness::NotAvailable => pb::Readiness::NotAvailable,
        Readiness::NoAddresses => pb::Readiness::NoAddresses,
    }
}

/// The plugin's service.
pub struct IpamService {
    ipam: Arc<Ipam>,
    /// The pod MTU handed out on every Allocate (the core does not know it).
    mtu: u32,
    state_dir: String,
    started_unix_ms: i64,
    unplugger: Option<Unplugger>,
}

impl IpamService {
    /// Release then deletes the host veth the plugin names, in the background.
    pub fn with_unplugger(mut self, unplugger: Unplugger) -> Self {
        self.unplugger = Some(unplugger);
        self
    }

    pub fn new(ipam: Arc<Ipam>, mtu: u32, state_dir: String, started_unix_ms: i64) -> Self {
        IpamService {
            ipam,
            mtu,
            state_dir,
            started_unix_ms,
            unplugger: None,
        }
    }
}

#[tonic::async_trait]
impl IpamRpc for IpamService {
    async fn allocate(
        &self,
        request: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let req = request.into_inner();
        check_version(&req.client_version)?;
        let key = parse_key(req.key, "key")?;
        at_most("requested_ips", &req.requested_ips, limits::REQUESTED_IPS)?;
        bounded("pool_hint", &req.pool_hint, pool::MAX_NAME_LEN)?;
        let requested_ips = req
            .requested_ips
            .iter()
            .enumerate()
            .map(|(i, s)| parse_ip(&format!("requested_ips[{i}]"), s))
            .collect::<Result<Vec<_>, _>>()?;
        let params = AllocateParams {
            key,
            pod: pod_from(req.pod)?,
            requested_ips,
            pool_hint: non_empty(req.pool_hint),
        };
        let (a, created) = self.ipam.allocate_or_get(params).await.map_err(|e| {
            tracing::warn!(error = %e, "allocate failed");
            ipam_status(&e)
        })?;
        Ok(Response::new(pb::AllocateResponse {
            addresses: vec![format!("{}/32", a.ip)],
            gateway: ferry_proto::POD_GATEWAY.to_string(),
            mtu: self.mtu,
            pool: a.pool,
            created,
        }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let req = request.into_inner();
        check_version(&req.client_version)?;
        let key = parse_key(req.key, "key")?;
        let host_link = req
            .host_link
            .map(|l| parse_host_link(l, &key))
            .transpose()?;
        // The core logs the release.
        let mut released = self.ipam.release(&key).await.map_err(|e| ipam_status(&e))?;
        if released.is_none()
            && let Some(link) = &host_link
        {
            // After a database rebuild the address is held under its veth.
            released = self
                .ipam
                .release(&AllocKey::adopted(&link.name))
                .await
                .map_err(|e| ipam_status(&e))?;
        }
        if released.is_none() {
            tracing::debug!(container = %key.container_id, "release of unknown key");
        }
        // Only after the release is durable: a crash before this point
        // leaves the pod wired to an address it still holds.
        let unplug_queued = match (host_link, &self.unplugger) {
            (Some(link), Some(unplugger)) => unplugger.queue(link),
            _ => false,
        };
        Ok(Response::new(pb::ReleaseResponse {
            released: allocations_to_pb(&released),
            unplug_queued,
        }))
    }

    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let req = request.into_inner();
        check_version(&req.client_version)?;
        let key = parse_key(req.key, "key")?;
        Ok(Response::new(pb::CheckResponse {
            // A CHECK counts as activity: reconcile leaves the key alone.
            allocation: self.ipam.check(&key).as_ref().map(allocation_to_pb),
        }))
    }

    async fn gc(
        &self,
        request: Request<pb::GcRequest>,
    ) -> Result<Response<pb::GcResponse>, Status> {
        let req = request.into_inner();
        check_version(&req.client_version)?;
        let network = req.network.trim().to_string();
        if network.is_empty() {
            return Err(invalid("network is empty"));
        }
        bounded("network", &network, limits::ID)?;
        at_most("valid", &req.valid, limits::GC_VALID)?;
        let valid = req
            .valid
            .into_iter()
            .enumerate()
            .map(|(i, k)| {
                let key = AllocKey {
                    // An attachment without a network belongs to this GC's.
                    network: non_empty(k.network).unwrap_or_else(|| network.clone()),
                    container_id: k.container_id.trim().to_string(),
                    ifname: k.ifname.trim().to_string(),
                };
                check_key(&key, &format!("valid[{i}]")).map(|()| key)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let released = self
            .ipam
            .gc(&network, &valid)
            .await
            .map_err(|e| ipam_status(&e))?;
        Ok(Response::new(pb::GcResponse {
            released: allocations_to_pb(&released),
        }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        check_version(&request.get_ref().client_version)?;
        let sum = self.ipam.summary();
        Ok(Response::new(pb::StatusResponse {
            readiness: readiness_to_pb(sum.readiness) as i32,
            reason: sum.reason,
            node: self.ipam.node().to_string(),
            server_version: ferry_proto::CLIENT_VERSION.to_string(),
            allocations: sum.allocations as u64,
            pools: u32::try_from(sum.pools).unwrap_or(u32::MAX),
            blocks: u32::try_from(sum.blocks).unwrap_or(u32::MAX),
            state_dir: self.state_dir.clone(),
            started_unix_ms: self.started_unix_ms,
        }))
    }
}

/// ipamctl's service.
pub struct AdminService {
    ipam: Arc<Ipam>,
    reconciler: Arc<Reconciler>,
}

impl AdminService {
    pub fn new(ipam: Arc<Ipam>, reconciler: Arc<Reconciler>) -> Self {
        AdminService { ipam, reconciler }
    }

    /// A container-ID prefix must name one container: ForceRelease must not
    /// take down the neighbours of a too-short prefix.
    fn one_container(&self, prefix: &str) -> Result<Vec<Allocation>, Status> {
        let found = self.ipam.by_container(prefix);
        let mut ids: Vec<&str> = found.iter().map(|a| a.key.container_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() > 1 {
            return Err(invalid(format!(
                "container ID prefix {prefix:?} is ambiguous: it matches {}",
                ids.join(", ")
            )));
        }
        Ok(found)
    }
}

enum TargetRef {
    Ip(Ipv4Addr),
    Container(String),
}

fn parse_target(t: Option<pb::Target>) -> Result<TargetRef, Status> {
    match t.and_then(|t| t.target) {
        Some(pb::target::Target::Ip(ip)) => Ok(TargetRef::Ip(parse_ip("target.ip", &ip)?)),
        Some(pb::target::Target::ContainerId(c)) => match non_empty(c) {
            Some(c) => Ok(TargetRef::Container(c)),
            None => Err(invalid("target.container_id is empty")),
        },
        None => Err(invalid("target is missing (an IP or a container ID)")),
    }
}

#[tonic::async_trait]
impl IpamAdmin for AdminService {
    async fn list_pools(
        &self,
        request: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        check_version(&request.get_ref().client_version)?;
        Ok(Response::new(pb::ListPoolsResponse {
            pools: self.ipam.pools().iter().map(pool_usage_to_pb).collect(),
        }))
    }

    async fn list_blocks(
        &self,
        request: Request<pb::ListBlocksRequest>,
    ) -> Result<Response<pb::ListBlocksResponse>, Status> {
        let req = request.into_inner();
        check_version(&req.client_version)?;
        let pool = non_empty(req.pool);
        let node = non_empty(req.node);
        let blocks = self
            .ipam
            .blocks(pool.as_deref())
            .iter()
            .filter(|b| node.as_ref().is_none_or(|n| *n == b.claim.node))
            .map(block_to_pb)
            .collect();
        Ok(Response::new(pb::ListBlocksResponse { blocks }))
    }

    async fn list_allocations(
        &self,
        request: Request<pb::ListAllocationsRequest>,
    ) -> Result<Response<pb::ListAllocationsResponse>, Status> {
        let req = request.into_inner();
        check_version(&req.client_version)?;
        let f = req.filter.unwrap_or_default();
        let filter = AllocationFilter {
            pool: non_empty(f.pool),
            namespace: non_empty(f.namespace),
            pod: non_empty(f.pod),
            container_id: non_empty(f.container_id),
        };
        Ok(Response::new(pb::ListAllocationsResponse {
            allocations: allocations_to_pb(&self.ipam.allocations(&filter)),
        }))
    }

    async fn show(
        &self,
        request: Request<pb::ShowRequest>,
    ) -> Result<Response<pb::ShowResponse>, Status> {
        let req = request.into_inner();
        check_version(&req.client_version)?;
        let resp = match parse_target(req.target)? {
            TargetRef::Ip(ip) => {
                let info = self.ipam.address(ip);
                let (state, reusable_unix_ms) = match info.state {
                    AddressState::NotOwned => (pb::AddressState::NotOwned, 0),
                    AddressState::Free => (pb::AddressState::Free, 0),
                    AddressState::Allocated => (pb::AddressState::Allocated, 0),
                    AddressState::Cooling { reusable_unix_ms } => {
                        (pb::AddressState::Cooling, reusable_unix_ms)
                    }
                    AddressState::Reserved => (pb::AddressState::Reserved, 0),
                };
                pb::ShowResponse {
                    allocations: allocations_to_pb(&info.allocation),
                    state: state as i32,
                    block: info.block.map(|b| b.to_string()).unwrap_or_default(),
                    pool: info.pool.unwrap_or_default(),
                    reusable_unix_ms,
                }
            }
            TargetRef::Container(prefix) => pb::ShowResponse {
                allocations: allocations_to_pb(&self.ipam.by_container(&prefix)),
                ..Default::default()
            },
        };
        Ok(Response::new(resp))
    }

    async fn force_release(
        &self,
        request: Request<pb::ForceReleaseRequest>,
    ) -> Result<Response<pb::ForceReleaseResponse>, Status> {
        let req = request.into_inner();
        check_version(&req.client_version)?;
        let mut released = Vec::new();
        match parse_target(req.target)? {
            TargetRef::Ip(ip) => {
                if let Some(a) = self
                    .ipam
                    .release_ip(ip)
                    .await
                    .map_err(|e| ipam_status(&e))?
                {
                    released.push(a);
                }
            }
            TargetRef::Container(prefix) => {
                for a in self.one_container(&prefix)? {
                    if let Some(r) = self
                        .ipam
                        .release_exact(&a)
                        .await
                        .map_err(|e| ipam_status(&e))?
                    {
                        released.push(r);
                    }
                }
            }
        }
        for a in &released {
            tracing::warn!(ip = %a.ip, container = %a.key.container_id, ifname = %a.key.ifname, "force-released by operator");
        }
        Ok(Response::new(pb::ForceReleaseResponse {
            released: allocations_to_pb(&released),
        }))
    }

    async fn check_consistency(
        &self,
        request: Request<pb::CheckConsistencyRequest>,
    ) -> Result<Response<pb::CheckConsistencyResponse>, Status> {
        check_version(&request.get_ref().client_version)?;
        let findings = self
            .reconciler
            .look()
            .await
            .map_err(|e| reconcile_status(&e))?;
        let mut findings: Vec<pb::Finding> = findings.iter().map(finding_to_pb).collect();
        // The core's own self-check: memory against what the store holds.
        let store_diffs = self
            .ipam
            .check_consistency()
            .await
            .map_err(|e| ipam_status(&e))?;
        findings.extend(store_diffs.into_iter().map(|detail| pb::Finding {
            kind: "store-mismatch".to_string(),
            detail,
            allocation: None,
        }));
        Ok(Response::new(pb::CheckConsistencyResponse { findings }))
    }

    async fn add_pool(
        &self,
        request: Request<pb::AddPoolRequest>,
    ) -> Result<Response<pb::AddPoolResponse>, Status> {
        let req = request.into_inner();
        check_version(&req.client_version)?;
        let pool = pool_from_pb(req.pool)?;
        // Addresses that pods hold in the new CIDR are adopted, not handed
        // out again (a pool re-added after a database rebuild).
        let live = self
            .reconciler
            .live_addresses()
            .await
            .map_err(|e| Status::internal(format!("listing ferry's host veths: {e}")))?;
        // Its own task: the request timeout must not drop it between a
        // cluster claim and the commit (the claim would never be given back).
        let ipam = self.ipam.clone();
        let (added, _adopted) = tokio::spawn(async move { ipam.add_pool(pool, &live).await })
            .await
            .map_err(|e| Status::internal(format!("adding the pool: {e}")))?
            .map_err(|e| ipam_status(&e))?;
        Ok(Response::new(pb::AddPoolResponse {
            pool: Some(pool_to_pb(&added)),
        }))
    }

    async fn remove_pool(
        &self,
        request: Request<pb::RemovePoolRequest>,
    ) -> Result<Response<pb::RemovePoolResponse>, Status> {
        let req = request.into_inner();
        check_version(&req.client_version)?;
        let name = non_empty(req.name).ok_or_else(|| invalid("name is empty"))?;
        self.ipam
            .remove_pool(&name)
            .await
            .map_err(|e| ipam_status(&e))?;
        Ok(Response::new(pb::RemovePoolResponse {}))
    }

    async fn collect_garbage(
        &self,
        request: Request<pb::CollectGarbageRequest>,
    ) -> Result<Response<pb::CollectGarbageResponse>, Status> {
        let req = request.into_inner();
        check_version(&req.client_version)?;
        let actions = self
            .reconciler
            .collect_garbage(req.dry_run)
            .await
            .map_err(|e| reconcile_status(&e))?;
        Ok(Response::new(pb::CollectGarbageResponse {
            actions: actions.iter().map(finding_to_pb).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterError;
    use crate::store::StoreError;

    #[test]
    fn every_ipam_error_maps_to_its_contract_code() {
        let cases: Vec<(IpamError, Code)> = vec![
            (
                IpamError::Exhausted {
                    pool: "default".into(),
                    cidr: "10.244.0.0/30".parse().unwrap(),
                    size: 2,
                    allocated: 1,
                    cooling: 1,
                },
                Code::ResourceExhausted,
            ),
            (
                IpamError::AddressUnavailable {
                    ip: Ipv4Addr::new(10, 244, 0, 5),
                    reason: "taken".into(),
                },
                Code::AlreadyExists,
            ),
            (
                IpamError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (IpamError::UnknownPool("p".into()), Code::InvalidArgument),
            (IpamError::NotFound("n".into()), Code::NotFound),
            (
                IpamError::Held {
                    remaining_secs: 3,
                    reason: "rebuilt".into(),
                },
                Code::Unavailable,
            ),
            (IpamError::Conflict("c".into()), Code::Aborted),
            (
                IpamError::Cluster(ClusterError::Unavailable("etcd down".into())),
                Code::Unavailable,
            ),
            (IpamError::Store(StoreError::Closed), Code::Internal),
            (IpamError::Internal("bug".into()), Code::Internal),
        ];
        for (err, code) in cases {
            let s = ipam_status(&err);
            assert_eq!(s.code(), code, "{err}");
            assert_eq!(s.message(), err.to_string());
        }
    }

    #[test]
    fn exhausted_message_names_pool_and_use() {
        let s = ipam_status(&IpamError::Exhausted {
            pool: "team-a".into(),
            cidr: "10.9.0.0/30".parse().unwrap(),
            size: 2,
            allocated: 1,
            cooling: 1,
        });
        for part in ["team-a", "10.9.0.0/30", "2", "1 allocated", "1 cooling"] {
            assert!(s.message().contains(part), "{part}: {}", s.message());
        }
    }

    #[test]
    fn version_check_names_both_versions() {
        assert!(check_version(ferry_proto::CLIENT_VERSION).is_ok());
        let s = check_version("99.0.0").unwrap_err();
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("99.0.0"));
        assert!(s.message().contains(ferry_proto::CLIENT_VERSION));
        assert_eq!(
            check_version("").unwrap_err().code(),
            Code::FailedPrecondition
        );
    }

    #[test]
    fn keys_are_validated() {
        let good = pb::AllocationKey {
            network: "ferry".into(),
            container_id: "abc".into(),
            ifname: "eth0".into(),
        };
        assert!(parse_key(Some(good.clone()), "key").is_ok());
        let e = parse_key(None, "key").unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        for (k, field) in [
            (
                pb::AllocationKey {
                    network: "".into(),
                    ..good.clone()
                },
                "key.network",
            ),
            (
                pb::AllocationKey {
                    container_id: " ".into(),
                    ..good.clone()
                },
                "key.container_id",
            ),
            (
                pb::AllocationKey {
                    ifname: "".into(),
                    ..good.clone()
                },
                "key.ifname",
            ),
            (
                pb::AllocationKey {
                    ifname: "a-very-long-ifname".into(),
                    ..good.clone()
                },
                "key.ifname",
            ),
        ] {
            let e = parse_key(Some(k), "key").unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(e.message().contains(field), "{}", e.message());
        }
    }

    #[test]
    fn ips_parse_with_or_without_prefix() {
        assert_eq!(
            parse_ip("ip", "10.1.2.3").unwrap(),
            Ipv4Addr::new(10, 1, 2, 3)
        );
        assert_eq!(
            parse_ip("ip", "10.1.2.3/24").unwrap(),
            Ipv4Addr::new(10, 1, 2, 3)
        );
        for bad in ["", "10.1.2", "10.1.2.3/40", "fe80::1", "x"] {
            let e = parse_ip("requested_ips[0]", bad).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(e.message().contains("requested_ips[0]"));
        }
    }

    #[test]
    fn targets_and_pools_are_validated() {
        assert!(matches!(parse_target(None), Err(s) if s.code() == Code::InvalidArgument));
        let t = pb::Target {
            target: Some(pb::target::Target::ContainerId(" ".into())),
        };
        assert!(parse_target(Some(t)).is_err());
        let t = pb::Target {
            target: Some(pb::target::Target::Ip("10.0.0.1".into())),
        };
        assert!(matches!(parse_target(Some(t)), Ok(TargetRef::Ip(_))));

        let pool = pb::Pool {
            name: "a".into(),
            cidr: "10.9.0.0/24".into(),
            namespaces: vec!["a".into()],
            ..Default::default()
        };
        let spec = pool_from_pb(Some(pool.clone())).unwrap();
        assert_eq!(spec.block_size, 26);
        let bad = pb::Pool {
            block_size: 8,
            ..pool.clone()
        };
        let e = pool_from_pb(Some(bad)).unwrap_err();
        assert!(e.message().contains("pool.block_size"), "{}", e.message());
        let bad = pb::Pool {
            cidr: "10.9.0.1/24".into(),
            ..pool.clone()
        };
        assert!(
            pool_from_pb(Some(bad))
                .unwrap_err()
                .message()
                .contains("pool.cidr")
        );
        // Each bad field is named the way the config file's error is worded.
        for (bad, want) in [
            (
                pb::Pool {
                    name: " ".into(),
                    ..pool.clone()
                },
                "invalid pool.name: must not be empty",
            ),
            (
                pb::Pool {
                    block_size: 300,
                    ..pool.clone()
                },
                "invalid pool.block_size: 300 must be between 24",
            ),
            (
                pb::Pool {
                    snat_address: "nope".into(),
                    ..pool.clone()
                },
                "invalid pool.snat_address: \"nope\" is not an IPv4 address",
            ),
            (
                pb::Pool {
                    namespaces: vec!["a".into(), " ".into()],
                    ..pool.clone()
                },
                "invalid pool.namespaces: holds an empty name",
            ),
        ] {
            let e = pool_from_pb(Some(bad)).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(e.message().starts_with(want), "{}", e.message());
        }
        assert!(pool_from_pb(None).is_err());
        let spec = pool_from_pb(Some(pool)).unwrap();
        assert!(spec.runtime && spec.snat_address.is_none());
    }

    async fn services() -> (IpamService, AdminService, Arc<crate::node::fake::FakeHost>) {
        services_on(Arc::new(crate::store::memory::MemoryStore::new())).await
    }

    async fn services_on(
        store: Arc<crate::store::memory::MemoryStore>,
    ) -> (IpamService, AdminService, Arc<crate::node::fake::FakeHost>) {
        use crate::cluster::local::LocalCluster;
        use crate::ipam::IpamOptions;
        use std::time::Duration;

        let ipam = Arc::new(
            Ipam::open(
                IpamOptions::one_pool_for_tests(),
                store,
                Arc::new(LocalCluster),
            )
            .await
            .unwrap(),
        );
        let host = Arc::new(crate::node::fake::FakeHost::default());
        let rec = Arc::new(Reconciler::new(
            ipam.clone(),
            host.clone(),
            Duration::from_secs(300),
        ));
        (
            IpamService::new(ipam.clone(), 1480, "/state".into(), 1)
                .with_unplugger(Unplugger::start(host.clone())),
            AdminService::new(ipam, rec),
            host,
        )
    }

    fn key(container: &str) -> Option<pb::AllocationKey> {
        Some(pb::AllocationKey {
            network: "ferry".into(),
            container_id: container.into(),
            ifname: "eth0".into(),
        })
    }

    fn target(t: pb::target::Target) -> Option<pb::Target> {
        Some(pb::Target { target: Some(t) })
    }

    #[tokio::test]
    async fn release_hands_the_pods_own_veth_to_the_unplugger() {
        let (svc, admin, host) = services().await;
        let v = ferry_proto::CLIENT_VERSION.to_string();
        let veth = ferry_proto::host_veth_name("aaaa1", "eth0");
        host.set_links(&[&veth, "fryneighbour0"]);
        svc.allocate(Request::new(pb::AllocateRequest {
            client_version: v.clone(),
            key: key("aaaa1"),
            ..Default::default()
        }))
        .await
        .unwrap();
        let release = |name: &str, ifindex: u32| pb::ReleaseRequest {
            client_version: v.clone(),
            key: key("aaaa1"),
            host_link: Some(pb::HostLink {
                name: name.to_string(),
                ifindex,
            }),
        };
        // Another pod's veth, or no index: refused, and nothing released.
        for bad in [release("fryneighbour0", 101), release(&veth, 0)] {
            let err = svc.release(Request::new(bad)).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        }
        let resp = svc
            .release(Request::new(release(&veth, 100)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.released.len(), 1);
        assert!(resp.unplug_queued);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while host.names() != ["fryneighbour0"] {
            assert!(std::time::Instant::now() < deadline, "{:?}", host.names());
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // Nothing leaked and no orphan: gc has nothing to do.
        let gc = admin
            .collect_garbage(Request::new(pb::CollectGarbageRequest {
                client_version: v.clone(),
                dry_run: false,
            }))
            .await
            .unwrap()
            .into_inner();
        let kinds: Vec<&str> = gc.actions.iter().map(|a| a.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["orphan-veth"],
            "only the neighbour has no allocation"
        );
    }

    #[tokio::test]
    async fn collect_garbage_dry_run_changes_nothing_then_acts() {
        let (svc, admin, host) = services().await;
        let v = ferry_proto::CLIENT_VERSION.to_string();
        let mut req = pb::AllocateRequest {
            client_version: v.clone(),
            key: key("leaked1"),
            ..Default::default()
        };
        // A netns path that does not exist: the pod is gone.
        req.pod = Some(pb::PodMeta {
            netns: "/nonexistent/ferry-test-netns".into(),
            ..Default::default()
        });
        svc.allocate(Request::new(req)).await.unwrap();
        host.set_links(&["fryorphan0001"]);
        let gc = |dry_run| {
            admin.collect_garbage(Request::new(pb::CollectGarbageRequest {
                client_version: v.clone(),
                dry_run,
            }))
        };
        let plan = gc(true).await.unwrap().into_inner().actions;
        assert_eq!(plan.len(), 2, "{plan:?}");
        assert!(
            plan.iter().all(|a| a.detail.starts_with("would ")),
            "{plan:?}"
        );
        assert_eq!(host.names(), ["fryorphan0001"]);
        let done = gc(false).await.unwrap().into_inner().actions;
        let details: Vec<&str> = done.iter().map(|a| a.detail.as_str()).collect();
        assert!(details[0].starts_with("released "), "{details:?}");
        assert!(
            details[1].starts_with("deleted host veth fryorphan0001"),
            "{details:?}"
        );
        assert!(host.names().is_empty());
        assert!(gc(false).await.unwrap().into_inner().actions.is_empty());
    }

    #[tokio::test]
    async fn services_over_a_real_core() {
        let (svc, admin, _host) = services().await;
        let v = ferry_proto::CLIENT_VERSION.to_string();
        let resp = svc
            .allocate(Request::new(pb::AllocateRequest {
                client_version: v.clone(),
                key: key("aaaa1"),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.mtu, 1480);
        assert_eq!(resp.gateway, "169.254.1.1");
        assert!(resp.addresses[0].ends_with("/32"));
        svc.allocate(Request::new(pb::AllocateRequest {
            client_version: v.clone(),
            key: key("aaaa2"),
            ..Default::default()
        }))
        .await
        .unwrap();

        let e = svc
            .allocate(Request::new(pb::AllocateRequest {
                client_version: "9.9.9".into(),
                key: key("x"),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        let e = svc
            .allocate(Request::new(pb::AllocateRequest {
                client_version: v.clone(),
                key: key("x"),
                requested_ips: vec!["nope".into()],
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);

        let status = svc
            .status(Request::new(pb::StatusRequest {
                client_version: v.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.readiness, pb::Readiness::Ready as i32);
        assert_eq!(status.allocations, 2);
        assert_eq!(status.node, "n1");

        let ip = resp.addresses[0].trim_end_matches("/32").to_string();
        let show = admin
            .show(Request::new(pb::ShowRequest {
                client_version: v.clone(),
                target: target(pb::target::Target::Ip(ip.clone())),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(show.state, pb::AddressState::Allocated as i32);
        assert_eq!(show.allocations.len(), 1);

        // An ambiguous prefix releases nothing.
        let e = admin
            .force_release(Request::new(pb::ForceReleaseRequest {
                client_version: v.clone(),
                target: target(pb::target::Target::ContainerId("aaaa".into())),
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let released = admin
            .force_release(Request::new(pb::ForceReleaseRequest {
                client_version: v.clone(),
                target: target(pb::target::Target::ContainerId("aaaa1".into())),
            }))
            .await
            .unwrap()
            .into_inner()
            .released;
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].ip, ip);
        let show = admin
            .show(Request::new(pb::ShowRequest {
                client_version: v.clone(),
                target: target(pb::target::Target::Ip(ip)),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(show.state, pb::AddressState::Cooling as i32);
        assert!(show.reusable_unix_ms > 0);

        let findings = admin
            .check_consistency(Request::new(pb::CheckConsistencyRequest {
                client_version: v.clone(),
            }))
            .await
            .unwrap()
            .into_inner()
            .findings;
        assert!(findings.is_empty(), "{findings:?}");
    }

    async fn status_of(svc: &IpamService) -> pb::StatusResponse {
        let req = Request::new(pb::StatusRequest {
            client_version: ferry_proto::CLIENT_VERSION.to_string(),
        });
        svc.status(req).await.unwrap().into_inner()
    }

    #[tokio::test]
    async fn status_counts_and_reports_a_poisoned_store() {
        let store = Arc::new(crate::store::memory::MemoryStore::new());
        let (svc, _admin, _host) = services_on(store.clone()).await;
        let v = ferry_proto::CLIENT_VERSION.to_string();
        for c in ["c1", "c2", "c3"] {
            svc.allocate(Request::new(pb::AllocateRequest {
                client_version: v.clone(),
                key: key(c),
                ..Default::default()
            }))
            .await
            .unwrap();
        }
        let s = status_of(&svc).await;
        assert_eq!(
            (s.readiness, s.allocations, s.pools, s.blocks),
            (pb::Readiness::Ready as i32, 3, 1, 1)
        );
        store.poison(true);
        let s = status_of(&svc).await;
        assert_eq!(s.readiness, pb::Readiness::NotAvailable as i32);
        assert!(s.reason.contains("store"), "{}", s.reason);
        let e = svc
            .allocate(Request::new(pb::AllocateRequest {
                client_version: v.clone(),
                key: key("c4"),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Internal);
        assert_eq!(status_of(&svc).await.allocations, 3);
    }

    #[test]
    fn allocation_converts_to_wire() {
        let a = Allocation {
            key: AllocKey {
                network: "ferry".into(),
                container_id: "c1".into(),
                ifname: "eth0".into(),
            },
            ip: Ipv4Addr::new(10, 244, 0, 7),
            pool: "default".into(),
            block: "10.244.0.0/26".parse().unwrap(),
            pod: PodMeta {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u".into(),
                netns: "/n".into(),
            },
            created_unix_ms: 42,
        };
        let p = allocation_to_pb(&a);
        assert_eq!(p.ip, "10.244.0.7");
        assert_eq!(p.block, "10.244.0.0/26");
        assert_eq!(p.key.unwrap().container_id, "c1");
        assert_eq!(p.pod.unwrap().uid, "u");
        assert_eq!(p.created_unix_ms, 42);
    }
}
