//! The plugin's service: Allocate, Release, Check, GC and Status.

use std::sync::Arc;

use ferry_proto::v1 as pb;
use ferry_proto::v1::ipam_server::Ipam as IpamRpc;
use tonic::{Request, Response, Status};

use super::check_version;
use super::convert::*;
use crate::alloc::pool;
use crate::ipam::Ipam;
use crate::model::{AllocKey, AllocateParams};
use crate::node::Unplugger;

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
        let (a, created) = self
            .ipam
            .allocate_or_get(params)
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "allocate failed"))?;
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
        let mut released = self.ipam.release(&key).await?;
        if released.is_none()
            && let Some(link) = &host_link
        {
            // After a database rebuild the address is held under its veth.
            released = self.ipam.release(&AllocKey::adopted(&link.name)).await?;
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
        let released = self.ipam.gc(&network, &valid).await?;
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
            server_version: ferry_proto::PROTOCOL_VERSION.to_string(),
            allocations: sum.allocations as u64,
            pools: u32::try_from(sum.pools).unwrap_or(u32::MAX),
            blocks: u32::try_from(sum.blocks).unwrap_or(u32::MAX),
            state_dir: self.state_dir.clone(),
            started_unix_ms: self.started_unix_ms,
        }))
    }
}
