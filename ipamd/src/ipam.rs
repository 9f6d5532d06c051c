//! The IPAM core: the pure allocator behind a lock, the store for durability,
//! the cluster store for block claims. gRPC, reconcile and the admin API all
//! go through here.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::cluster::ClusterStore;
use crate::error::IpamError;
use crate::model::{
    AddressInfo, AllocKey, AllocateParams, Allocation, AllocationFilter, BlockUsage, PoolSpec,
    PoolUsage, Readiness,
};
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct IpamOptions {
    pub node: String,
    /// Pools from configuration; exactly one has no namespaces (the default).
    pub pools: Vec<PoolSpec>,
    /// How long a freed address waits before reuse.
    pub cooldown: Duration,
    /// How long a block must sit empty before it is given back.
    pub block_idle_grace: Duration,
}

pub struct Ipam {
    _store: Arc<dyn Store>,
    _cluster: Arc<dyn ClusterStore>,
}

#[allow(clippy::todo, unused_variables)]
impl Ipam {
    /// Loads the persisted state; configured pools are added or updated, and a
    /// persisted pool that still has allocations is kept even if removed from
    /// the configuration.
    pub async fn open(
        opts: IpamOptions,
        store: Arc<dyn Store>,
        cluster: Arc<dyn ClusterStore>,
    ) -> Result<Self, IpamError> {
        todo!()
    }

    /// Idempotent on `params.key`; durable before it returns.
    pub async fn allocate(&self, params: AllocateParams) -> Result<Allocation, IpamError> {
        todo!()
    }

    /// Idempotent: an unknown key is Ok(None). Durable before it returns.
    pub async fn release(&self, key: &AllocKey) -> Result<Option<Allocation>, IpamError> {
        todo!()
    }

    pub fn get(&self, key: &AllocKey) -> Option<Allocation> {
        todo!()
    }

    /// Releases every allocation of `network` whose key is not in `valid`.
    pub async fn gc(
        &self,
        network: &str,
        valid: &[AllocKey],
    ) -> Result<Vec<Allocation>, IpamError> {
        todo!()
    }

    pub fn readiness(&self) -> (Readiness, String) {
        todo!()
    }

    pub fn node(&self) -> &str {
        todo!()
    }

    pub fn pools(&self) -> Vec<PoolUsage> {
        todo!()
    }

    pub fn blocks(&self, pool: Option<&str>) -> Vec<BlockUsage> {
        todo!()
    }

    pub fn allocations(&self, filter: &AllocationFilter) -> Vec<Allocation> {
        todo!()
    }

    pub fn address(&self, ip: Ipv4Addr) -> AddressInfo {
        todo!()
    }

    /// Allocations whose container ID starts with `prefix`.
    pub fn by_container(&self, prefix: &str) -> Vec<Allocation> {
        todo!()
    }

    /// Releases whatever holds `ip`; Ok(None) when nothing does.
    pub async fn release_ip(&self, ip: Ipv4Addr) -> Result<Option<Allocation>, IpamError> {
        todo!()
    }

    pub async fn add_pool(&self, pool: PoolSpec) -> Result<PoolSpec, IpamError> {
        todo!()
    }

    /// Refused while the pool holds allocations.
    pub async fn remove_pool(&self, name: &str) -> Result<(), IpamError> {
        todo!()
    }

    /// Gives back blocks empty for longer than the grace period, keeping one
    /// per pool in use. Returns what was released.
    pub async fn release_idle_blocks(&self) -> Result<Vec<Ipv4Net>, IpamError> {
        todo!()
    }

    /// The blocks this node owns, for blackhole routes.
    pub fn owned_blocks(&self) -> Vec<Ipv4Net> {
        todo!()
    }
}
