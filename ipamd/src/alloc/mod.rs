//! Pure allocation logic: pools, blocks, picking an address, cooldown. No I/O.
//!
//! The allocator never changes itself while deciding. Every decision comes
//! back as a list of store [`Mutation`]s; the core writes them to the store
//! and only then feeds the same list to [`Allocator::apply`]. Restoring from
//! a [`Snapshot`] goes through the same code, so the in-memory state is
//! always exactly what the store holds.
//!
//! This file holds the state and the read-only queries. The rest, by concern:
//! `apply` (restore, apply mutations), `plan` (allocate, release, GC),
//! `claims` (blocks to claim and give back), `pool_admin` (add, remove,
//! merge pools), `pool` (address arithmetic and pool rules), `block` (the
//! per-block bitmap).
//!
//! [`Snapshot`]: crate::store::Snapshot

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;

use crate::error::IpamError;
use crate::model::{
    AddressInfo, AddressState, AllocKey, Allocation, AllocationFilter, BlockClaim, BlockUsage,
    PoolSpec, PoolUsage,
};
use crate::store::Mutation;

mod apply;
mod block;
mod claims;
mod plan;
pub mod pool;
mod pool_admin;

use block::BlockState;
pub use plan::validate_key;

#[cfg(test)]
mod tests;

#[derive(Debug, Clone)]
pub struct AllocConfig {
    pub node: String,
    pub cooldown_ms: i64,
    pub block_idle_grace_ms: i64,
}

/// What to do for an allocate request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The key already holds this allocation (idempotent retry).
    Existing(Allocation),
    /// Write `mutations`; then `allocation` is the answer.
    Allocate {
        allocation: Allocation,
        mutations: Vec<Mutation>,
    },
    /// This node's blocks of `pool` have no allocatable address (or, with
    /// `requested`, the block holding that address is not ours): claim a
    /// block through the cluster store and plan again.
    NeedBlock {
        pool: String,
        requested: Option<Ipv4Addr>,
    },
}

#[derive(Debug, Clone)]
pub struct Allocator {
    cfg: AllocConfig,
    pools: BTreeMap<String, PoolSpec>,
    /// Blocks this node owns, keyed by CIDR (blocks never overlap).
    blocks: BTreeMap<Ipv4Net, BlockState>,
    /// Shared so a look at all of them under the lock copies pointers only.
    allocations: HashMap<AllocKey, Arc<Allocation>>,
    by_ip: BTreeMap<Ipv4Addr, AllocKey>,
    /// ip -> released_unix_ms.
    cooling: BTreeMap<Ipv4Addr, i64>,
    /// (released_unix_ms, ip): FIFO order of reuse.
    fifo: BTreeSet<(i64, Ipv4Addr)>,
    /// Other nodes' blocks per pool, as last reported by the cluster store.
    foreign: HashMap<String, Vec<BlockClaim>>,
    /// No address is newly handed out before this time (unix ms), and why.
    fresh_hold: Option<(i64, String)>,
}

impl Allocator {
    pub fn new(cfg: AllocConfig) -> Self {
        Allocator {
            cfg,
            pools: BTreeMap::new(),
            blocks: BTreeMap::new(),
            allocations: HashMap::new(),
            by_ip: BTreeMap::new(),
            cooling: BTreeMap::new(),
            fifo: BTreeSet::new(),
            foreign: HashMap::new(),
            fresh_hold: None,
        }
    }

    /// Refuses to hand out any address not yet held until `until_ms`
    /// (retried ADDs still get theirs): which freed addresses were still
    /// cooling down is unknown after a database rebuild.
    pub fn hold_fresh_until(&mut self, until_ms: i64, reason: String) {
        self.fresh_hold = Some((until_ms, reason));
    }

    /// The hold in force at `now_ms`, as the error an allocation gets.
    pub fn fresh_hold(&self, now_ms: i64) -> Option<IpamError> {
        let (until, reason) = self.fresh_hold.as_ref()?;
        let left_ms = until.checked_sub(now_ms).filter(|ms| *ms > 0)?;
        Some(IpamError::Held {
            remaining_secs: (left_ms as u64).div_ceil(1000),
            reason: reason.clone(),
        })
    }

    pub fn config(&self) -> &AllocConfig {
        &self.cfg
    }

    pub fn node(&self) -> &str {
        &self.cfg.node
    }

    pub fn pool(&self, name: &str) -> Option<&PoolSpec> {
        self.pools.get(name)
    }

    pub fn pool_specs(&self) -> impl Iterator<Item = &PoolSpec> {
        self.pools.values()
    }

    pub fn pool_of(&self, ip: Ipv4Addr) -> Option<&PoolSpec> {
        self.pools.values().find(|p| p.cidr.contains(&ip))
    }

    fn reserved(&self, ip: Ipv4Addr) -> bool {
        self.pool_of(ip).is_some_and(|p| pool::is_reserved(p, ip))
    }

    fn block_containing(&self, ip: Ipv4Addr) -> Option<&BlockState> {
        let probe = Ipv4Net::new(ip, 32).ok()?;
        self.blocks
            .range(..=probe)
            .next_back()
            .map(|(_, b)| b)
            .filter(|b| b.claim.cidr.contains(&ip))
    }

    pub fn get(&self, key: &AllocKey) -> Option<&Allocation> {
        self.allocations.get(key).map(Arc::as_ref)
    }

    /// [`Allocator::get`], shared.
    pub fn get_shared(&self, key: &AllocKey) -> Option<Arc<Allocation>> {
        self.allocations.get(key).cloned()
    }

    pub fn holder(&self, ip: Ipv4Addr) -> Option<&Allocation> {
        self.by_ip.get(&ip).and_then(|k| self.get(k))
    }

    /// Allocations matching `filter`, sorted by IP.
    pub fn allocations(&self, filter: &AllocationFilter) -> Vec<Allocation> {
        self.by_ip
            .values()
            .filter_map(|k| self.get(k))
            .filter(|a| filter.matches(a))
            .cloned()
            .collect()
    }

    /// Every allocation, unordered: cheap enough to take under a lock that
    /// Allocate waits on (one pointer each), where a deep copy is not.
    pub fn shared_allocations(&self) -> Vec<Arc<Allocation>> {
        self.allocations.values().cloned().collect()
    }

    pub fn allocation_count(&self) -> usize {
        self.allocations.len()
    }

    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    pub fn owned_blocks(&self) -> Vec<Ipv4Net> {
        self.blocks.keys().copied().collect()
    }

    pub fn block_claims(&self) -> Vec<BlockClaim> {
        self.blocks.values().map(|b| b.claim.clone()).collect()
    }

    /// Cooling entries, oldest release first.
    pub fn cooling(&self) -> Vec<(Ipv4Addr, i64)> {
        self.fifo.iter().map(|&(t, ip)| (ip, t)).collect()
    }

    fn reusable_at(&self, released: i64) -> i64 {
        released.saturating_add(self.cfg.cooldown_ms)
    }

    /// Cooling entries inside `net` that are still waiting out the cooldown.
    fn cooling_in(&self, net: Ipv4Net, now_ms: i64) -> u64 {
        self.cooling
            .range(net.network()..=net.broadcast())
            .filter(|(_, t)| self.reusable_at(**t) > now_ms)
            .count() as u64
    }

    fn allocated_in(&self, net: Ipv4Net) -> u64 {
        self.by_ip.range(net.network()..=net.broadcast()).count() as u64
    }

    fn pool_blocks<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a BlockState> + 'a {
        self.blocks.values().filter(move |b| b.claim.pool == name)
    }

    pub fn pool_usage(&self, now_ms: i64) -> Vec<PoolUsage> {
        self.pools
            .values()
            .map(|p| PoolUsage {
                pool: p.clone(),
                is_default: p.is_default(),
                size: pool::pool_size(p),
                allocated: self.allocated_in(p.cidr),
                cooling: self.cooling_in(p.cidr, now_ms),
                blocks: self.pool_blocks(&p.name).count() as u32,
            })
            .collect()
    }

    pub fn block_usage(&self, pool_name: Option<&str>, now_ms: i64) -> Vec<BlockUsage> {
        self.blocks
            .values()
            .filter(|b| pool_name.is_none_or(|p| b.claim.pool == p))
            .map(|b| {
                let cidr = b.claim.cidr;
                let size = match self.pools.get(&b.claim.pool) {
                    Some(p) => pool::usable_in(p, cidr),
                    None => pool::net_size(cidr),
                };
                BlockUsage {
                    claim: b.claim.clone(),
                    size: u32::try_from(size).unwrap_or(u32::MAX),
                    allocated: b.allocated,
                    cooling: u32::try_from(self.cooling_in(cidr, now_ms)).unwrap_or(u32::MAX),
                }
            })
            .collect()
    }

    pub fn address(&self, ip: Ipv4Addr, now_ms: i64) -> AddressInfo {
        let pool = self.pool_of(ip);
        let block = self.block_containing(ip).map(|b| b.claim.cidr);
        let allocation = self.holder(ip).cloned();
        let state = if allocation.is_some() {
            AddressState::Allocated
        } else if pool.is_some_and(|p| pool::is_reserved(p, ip)) {
            AddressState::Reserved
        } else if let Some(t) = self.cooling.get(&ip).copied()
            && self.reusable_at(t) > now_ms
        {
            AddressState::Cooling {
                reusable_unix_ms: self.reusable_at(t),
            }
        } else if block.is_some() {
            AddressState::Free
        } else {
            AddressState::NotOwned
        };
        AddressInfo {
            ip,
            state,
            pool: pool
                .map(|p| p.name.clone())
                .or_else(|| allocation.as_ref().map(|a| a.pool.clone())),
            block,
            allocation,
        }
    }

    /// Can `pool` hand out an address now, from an owned block or from a
    /// block not yet claimed by anyone we know of?
    pub fn can_allocate(&self, pool_name: &str, now_ms: i64) -> bool {
        let Some(p) = self.pools.get(pool_name) else {
            return false;
        };
        self.pick(p, now_ms).is_some() || !self.free_blocks(p, 1).is_empty()
    }

    pub fn exhausted_error(&self, pool_name: &str, now_ms: i64) -> IpamError {
        match self.pools.get(pool_name) {
            Some(p) => IpamError::Exhausted {
                pool: p.name.clone(),
                cidr: p.cidr,
                size: pool::pool_size(p),
                allocated: self.allocated_in(p.cidr),
                cooling: self.cooling_in(p.cidr, now_ms),
            },
            None => IpamError::UnknownPool(pool_name.to_string()),
        }
    }
}
