//! Reads of the core for Status, ipamctl and metrics: readiness and usage,
//! each under one short hold of the allocator lock.

use std::net::Ipv4Addr;
use std::time::SystemTime;

use ipnet::Ipv4Net;

use super::{Ipam, Summary};
use crate::alloc::Allocator;
use crate::clock::unix_ms;
use crate::error::IpamError;
use crate::model::{
    AddressInfo, Allocation, AllocationFilter, BlockClaim, BlockUsage, PoolSpec, PoolUsage,
    Readiness,
};

impl Ipam {
    /// NotAvailable while the store cannot promise durability (after a
    /// failed fdatasync: ipamd must restart); otherwise Ready while the
    /// default pool can still hand out an address (from an owned block or a
    /// block nobody owns); NoAddresses when it cannot.
    pub fn readiness(&self) -> (Readiness, String) {
        let now = self.now();
        let st = self.lock();
        self.readiness_of(&st, now)
    }

    fn readiness_of(&self, st: &Allocator, now: i64) -> (Readiness, String) {
        if let Err(e) = self.store.health() {
            return (
                Readiness::NotAvailable,
                format!("store: {e}; ipamd must restart"),
            );
        }
        if let Some(held) = st.fresh_hold(now) {
            return (Readiness::NotAvailable, held.to_string());
        }
        let names: Vec<String> = st.pool_specs().map(|p| p.name.clone()).collect();
        // The default pool serves every namespace without a pool of its
        // own, so a full default pool fails most ADDs: not ready.
        if let Some(d) = st.pool_specs().find(|p| p.is_default())
            && !st.can_allocate(&d.name, now)
        {
            return (
                Readiness::NoAddresses,
                st.exhausted_error(&d.name, now).to_string(),
            );
        }
        if names.iter().any(|n| st.can_allocate(n, now)) {
            // Ready, but a rebuilt database is reported until restart.
            return (Readiness::Ready, self.store.notice().unwrap_or_default());
        }
        if names.is_empty() {
            return (Readiness::NoAddresses, "no pools are configured".into());
        }
        let why: Vec<String> = names
            .iter()
            .map(|n| st.exhausted_error(n, now).to_string())
            .collect();
        (Readiness::NoAddresses, why.join("; "))
    }

    /// Readiness and counts under one lock, for Status.
    pub fn summary(&self) -> Summary {
        let now = self.now();
        let st = self.lock();
        let (readiness, reason) = self.readiness_of(&st, now);
        Summary {
            readiness,
            reason,
            allocations: st.allocation_count(),
            pools: st.pool_specs().count(),
            blocks: st.block_count(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn pools(&self) -> Vec<PoolUsage> {
        let now = self.now();
        self.lock().pool_usage(now)
    }

    pub fn blocks(&self, pool: Option<&str>) -> Vec<BlockUsage> {
        let now = self.now();
        self.lock().block_usage(pool, now)
    }

    /// Sorted by IP.
    pub fn allocations(&self, filter: &AllocationFilter) -> Vec<Allocation> {
        self.lock().allocations(filter)
    }

    pub fn address(&self, ip: Ipv4Addr) -> AddressInfo {
        let now = self.now();
        self.lock().address(ip, now)
    }

    /// Allocations whose container ID starts with `prefix`, sorted by IP. An
    /// empty prefix matches nothing, so a slip cannot select everything.
    pub fn by_container(&self, prefix: &str) -> Vec<Allocation> {
        if prefix.is_empty() {
            return Vec::new();
        }
        self.allocations(&AllocationFilter {
            container_id: Some(prefix.to_string()),
            ..AllocationFilter::default()
        })
    }
    /// Hands out no address not yet held until `until` (see
    /// [`Allocator::hold_fresh_until`]); readiness says why meanwhile.
    pub fn hold_fresh_until(&self, until: SystemTime, reason: String) {
        self.lock().hold_fresh_until(unix_ms(until), reason);
    }
    /// Blocks the cluster store gives to other nodes, in every pool.
    pub async fn foreign_claims(&self) -> Result<Vec<BlockClaim>, IpamError> {
        let mut claims = Vec::new();
        for pool in self.pool_specs() {
            claims.extend(self.cluster.foreign_blocks(&pool.name).await?);
        }
        Ok(claims)
    }

    /// The blocks this node owns, as last published: no allocator lock.
    pub fn owned_blocks(&self) -> Vec<Ipv4Net> {
        self.owned.borrow().iter().map(|b| b.cidr).collect()
    }

    /// The blocks this node owns with their pools, as last published.
    pub fn block_claims(&self) -> Vec<BlockClaim> {
        self.owned.borrow().clone()
    }

    /// The pool specs, by name.
    pub fn pool_specs(&self) -> Vec<PoolSpec> {
        self.lock().pool_specs().cloned().collect()
    }
}
