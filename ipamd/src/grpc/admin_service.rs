//! ipamctl's service: what the node holds, and the operator's changes.

use std::net::Ipv4Addr;
use std::sync::Arc;

use ferry_proto::v1 as pb;
use ferry_proto::v1::ipam_admin_server::IpamAdmin;
use tonic::{Request, Response, Status};

use super::check_version;
use super::convert::*;
use crate::ipam::Ipam;
use crate::model::{AddressState, Allocation, AllocationFilter};
use crate::reconcile::Reconciler;

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

pub(super) enum TargetRef {
    Ip(Ipv4Addr),
    Container(String),
}

pub(super) fn parse_target(t: Option<pb::Target>) -> Result<TargetRef, Status> {
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
                if let Some(a) = self.ipam.release_ip(ip).await? {
                    released.push(a);
                }
            }
            TargetRef::Container(prefix) => {
                for a in self.one_container(&prefix)? {
                    if let Some(r) = self.ipam.release_exact(&a).await? {
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
        let findings = self.reconciler.look().await?;
        let mut findings: Vec<pb::Finding> = findings.iter().map(finding_to_pb).collect();
        // The core's own self-check: memory against what the store holds.
        let store_diffs = self.ipam.check_consistency().await?;
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
            .map_err(|e| Status::internal(format!("adding the pool: {e}")))??;
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
        self.ipam.remove_pool(&name).await?;
        Ok(Response::new(pb::RemovePoolResponse {}))
    }

    async fn collect_garbage(
        &self,
        request: Request<pb::CollectGarbageRequest>,
    ) -> Result<Response<pb::CollectGarbageResponse>, Status> {
        let req = request.into_inner();
        check_version(&req.client_version)?;
        let actions = self.reconciler.collect_garbage(req.dry_run).await?;
        Ok(Response::new(pb::CollectGarbageResponse {
            actions: actions.iter().map(finding_to_pb).collect(),
        }))
    }
}
