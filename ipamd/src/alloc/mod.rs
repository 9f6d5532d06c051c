//! Pure allocation logic: pools, blocks, picking an address, cooldown. No I/O.
//!
//! The allocator never changes itself while deciding. Every decision comes
//! back as a list of store [`Mutation`]s; the core writes them to the store
//! and only then feeds the same list to [`Allocator::apply`]. Restoring from
//! a [`Snapshot`] goes through the same code, so the in-memory state is
//! always exactly what the store holds.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use tracing::warn;

use crate::error::IpamError;
use crate::model::{
    AddressInfo, AddressState, AllocKey, AllocateParams, Allocation, AllocationFilter, BlockClaim,
    BlockUsage, PoolSpec, PoolUsage,
};
use crate::store::{Mutation, Snapshot};

pub mod pool;

#[cfg(test)]
mod tests;

/// How many unowned blocks the core tries to claim per round before giving up.
const MAX_CANDIDATES: usize = 16;

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

/// A block this node owns, with the bookkeeping to pick addresses fast.
#[derive(Debug, Clone)]
struct BlockState {
    claim: BlockClaim,
    /// Bit i set: address `network + i` is allocated, cooling or reserved,
    /// so it is not "never used".
    used: Vec<u64>,
    allocated: u32,
    /// When the block last became empty; None while it holds allocations.
    empty_since: Option<i64>,
}

impl BlockState {
    fn index(&self, ip: Ipv4Addr) -> Option<usize> {
        let cidr = self.claim.cidr;
        if !cidr.contains(&ip) {
            return None;
        }
        Some((u32::from(ip) - u32::from(cidr.network())) as usize)
    }

    fn set_used(&mut self, ip: Ipv4Addr, used: bool) {
        if let Some(i) = self.index(ip)
            && let Some(word) = self.used.get_mut(i / 64)
        {
            if used {
                *word |= 1 << (i % 64);
            } else {
                *word &= !(1 << (i % 64));
            }
        }
    }

    /// Addresses whose bit is clear, lowest first.
    fn unused(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let n = pool::net_size(self.claim.cidr) as usize;
        let base = u32::from(self.claim.cidr.network());
        self.used
            .iter()
            .enumerate()
            .filter(|(_, word)| **word != u64::MAX)
            .flat_map(|(w, word)| {
                (0..64usize)
                    .filter(move |bit| word & (1 << bit) == 0)
                    .map(move |bit| w * 64 + bit)
            })
            .take_while(move |i| *i < n)
            .map(move |i| Ipv4Addr::from(base + i as u32))
    }
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

    /// Rebuilds the state the store holds.
    pub fn restore(cfg: AllocConfig, snap: &Snapshot) -> Self {
        let mut a = Allocator::new(cfg);
        let mut muts = Vec::new();
        muts.extend(snap.pools.iter().cloned().map(Mutation::PutPool));
        muts.extend(
            snap.allocations
                .iter()
                .cloned()
                .map(Mutation::PutAllocation),
        );
        muts.extend(
            snap.cooling
                .iter()
                .map(|&(ip, released_unix_ms)| Mutation::PutCooling {
                    ip,
                    released_unix_ms,
                }),
        );
        // Blocks last: PutBlock derives its bookkeeping from what it covers.
        muts.extend(snap.blocks.iter().cloned().map(Mutation::PutBlock));
        a.apply(&muts, 0);
        for b in &snap.blocks {
            if b.node != a.cfg.node {
                warn!(block = %b.cidr, owner = %b.node, node = %a.cfg.node,
                    "persisted block names another node; keeping it as ours");
            }
        }
        a
    }

    pub fn config(&self) -> &AllocConfig {
        &self.cfg
    }

    // ---------------------------------------------------------------- apply

    /// Applies mutations already written to the store. `now_ms` dates blocks
    /// that become empty.
    pub fn apply(&mut self, muts: &[Mutation], now_ms: i64) {
        for m in muts {
            self.apply_one(m, now_ms);
        }
    }

    fn apply_one(&mut self, m: &Mutation, now_ms: i64) {
        match m {
            Mutation::PutPool(spec) => {
                self.pools.insert(spec.name.clone(), spec.clone());
            }
            Mutation::DeletePool(name) => {
                self.pools.remove(name);
                self.blocks.retain(|_, b| b.claim.pool != *name);
                self.foreign.remove(name);
            }
            Mutation::PutBlock(claim) => self.put_block(claim.clone()),
            Mutation::DeleteBlock { cidr, .. } => {
                self.blocks.remove(cidr);
            }
            Mutation::PutAllocation(a) => {
                if let Some(old) = self.allocations.get(&a.key).cloned()
                    && old.ip != a.ip
                {
                    self.remove_allocation(&old.key, now_ms);
                }
                let fresh = !self.allocations.contains_key(&a.key);
                self.allocations.insert(a.key.clone(), Arc::new(a.clone()));
                self.by_ip.insert(a.ip, a.key.clone());
                if let Some(b) = self.block_mut(a.ip) {
                    b.set_used(a.ip, true);
                    if fresh {
                        b.allocated += 1;
                    }
                    b.empty_since = None;
                }
            }
            Mutation::DeleteAllocation { key, .. } => self.remove_allocation(key, now_ms),
            Mutation::PutCooling {
                ip,
                released_unix_ms,
            } => {
                if let Some(old) = self.cooling.insert(*ip, *released_unix_ms) {
                    self.fifo.remove(&(old, *ip));
                }
                self.fifo.insert((*released_unix_ms, *ip));
                if let Some(b) = self.block_mut(*ip) {
                    b.set_used(*ip, true);
                }
            }
            Mutation::DeleteCooling { ip } => {
                if let Some(old) = self.cooling.remove(ip) {
                    self.fifo.remove(&(old, *ip));
                }
                let keep = self.by_ip.contains_key(ip) || self.reserved(*ip);
                if let Some(b) = self.block_mut(*ip) {
                    b.set_used(*ip, keep);
                }
            }
        }
    }

    fn remove_allocation(&mut self, key: &AllocKey, now_ms: i64) {
        let Some(a) = self.allocations.remove(key) else {
            return;
        };
        if self.by_ip.get(&a.ip) == Some(key) {
            self.by_ip.remove(&a.ip);
        }
        let keep = self.cooling.contains_key(&a.ip) || self.reserved(a.ip);
        if let Some(b) = self.block_mut(a.ip) {
            b.set_used(a.ip, keep);
            b.allocated = b.allocated.saturating_sub(1);
            if b.allocated == 0 {
                b.empty_since = Some(now_ms);
            }
        }
    }

    fn put_block(&mut self, claim: BlockClaim) {
        if let Some(b) = self.blocks.get_mut(&claim.cidr) {
            b.claim = claim;
            return;
        }
        let cidr = claim.cidr;
        // Only a damaged store can hold a block this large; an empty bitmap
        // makes it unusable for new addresses instead of costing gigabytes.
        let words = if cidr.prefix_len() >= pool::MIN_BLOCK_PREFIX {
            (pool::net_size(cidr) as usize).div_ceil(64)
        } else {
            warn!(block = %cidr, "block larger than /{}; not allocating from it", pool::MIN_BLOCK_PREFIX);
            0
        };
        let mut b = BlockState {
            claim,
            used: vec![0; words],
            allocated: 0,
            empty_since: None,
        };
        let range = cidr.network()..=cidr.broadcast();
        for ip in self.by_ip.range(range.clone()).map(|(ip, _)| *ip) {
            b.set_used(ip, true);
            b.allocated += 1;
        }
        let mut last_release = b.claim.claimed_unix_ms;
        for (ip, released) in self.cooling.range(range) {
            b.set_used(*ip, true);
            last_release = last_release.max(*released);
        }
        if let Some(p) = self.pools.get(&b.claim.pool) {
            for ip in [p.cidr.network(), p.cidr.broadcast()] {
                if pool::is_reserved(p, ip) {
                    b.set_used(ip, true);
                }
            }
        }
        if b.allocated == 0 {
            b.empty_since = Some(last_release);
        }
        self.blocks.insert(cidr, b);
    }

    fn block_containing(&self, ip: Ipv4Addr) -> Option<&BlockState> {
        let probe = Ipv4Net::new(ip, 32).ok()?;
        self.blocks
            .range(..=probe)
            .next_back()
            .map(|(_, b)| b)
            .filter(|b| b.claim.cidr.contains(&ip))
    }

    fn block_mut(&mut self, ip: Ipv4Addr) -> Option<&mut BlockState> {
        let probe = Ipv4Net::new(ip, 32).ok()?;
        self.blocks
            .range_mut(..=probe)
            .next_back()
            .map(|(_, b)| b)
            .filter(|b| b.claim.cidr.contains(&ip))
    }

    // ------------------------------------------------------------- queries

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

    // ------------------------------------------------------------ planning

    /// First match wins: requested addresses, the pool hint, a pool listing
    /// the pod's namespace, the default pool.
    pub fn select_pool(&self, params: &AllocateParams) -> Result<&PoolSpec, IpamError> {
        if let Some(ip) = requested_ip(params)? {
            return self.pool_of(ip).ok_or_else(|| {
                let pools: Vec<String> = self
                    .pools
                    .values()
                    .map(|p| format!("{} {}", p.name, p.cidr))
                    .collect();
                IpamError::InvalidArgument(format!(
                    "requested address {ip} is outside every pool ({})",
                    pools.join(", ")
                ))
            });
        }
        if let Some(hint) = params.pool_hint.as_deref().filter(|h| !h.is_empty()) {
            return self
                .pools
                .get(hint)
                .ok_or_else(|| IpamError::UnknownPool(hint.to_string()));
        }
        let ns = params.pod.namespace.as_str();
        if !ns.is_empty()
            && let Some(p) = self
                .pools
                .values()
                .find(|p| p.namespaces.iter().any(|n| n == ns))
        {
            return Ok(p);
        }
        self.pools
            .values()
            .find(|p| p.is_default())
            .ok_or_else(|| IpamError::InvalidArgument("no default pool is configured".into()))
    }

    pub fn plan_allocate(&self, params: &AllocateParams, now_ms: i64) -> Result<Plan, IpamError> {
        validate_key(&params.key)?;
        let requested = requested_ip(params)?;
        if let Some(a) = self.allocations.get(&params.key) {
            if let Some(ip) = requested
                && ip != a.ip
            {
                return Err(IpamError::AddressUnavailable {
                    ip,
                    reason: format!("this attachment already holds {}", a.ip),
                });
            }
            return Ok(Plan::Existing(Allocation::clone(a)));
        }
        if let Some(held) = self.fresh_hold(now_ms) {
            return Err(held);
        }
        let p = self.select_pool(params)?;
        let ip = match requested {
            Some(ip) => {
                self.check_requested(p, ip, now_ms)?;
                let owned = self
                    .block_containing(ip)
                    .is_some_and(|b| b.claim.pool == p.name);
                if !owned {
                    return Ok(Plan::NeedBlock {
                        pool: p.name.clone(),
                        requested: Some(ip),
                    });
                }
                ip
            }
            None => match self.pick(p, now_ms) {
                Some(ip) => ip,
                None => {
                    return Ok(Plan::NeedBlock {
                        pool: p.name.clone(),
                        requested: None,
                    });
                }
            },
        };
        let Some(block) = self.block_containing(ip).map(|b| b.claim.cidr) else {
            // pick() and the ownership check above only return owned addresses.
            return Err(IpamError::InvalidArgument(format!(
                "internal: {ip} is in no owned block"
            )));
        };
        let allocation = Allocation {
            key: params.key.clone(),
            ip,
            pool: p.name.clone(),
            block,
            pod: params.pod.clone(),
            created_unix_ms: now_ms,
        };
        let mut mutations = Vec::with_capacity(2);
        if self.cooling.contains_key(&ip) {
            mutations.push(Mutation::DeleteCooling { ip });
        }
        mutations.push(Mutation::PutAllocation(allocation.clone()));
        Ok(Plan::Allocate {
            allocation,
            mutations,
        })
    }

    fn check_requested(&self, p: &PoolSpec, ip: Ipv4Addr, now_ms: i64) -> Result<(), IpamError> {
        let unavailable = |reason: String| IpamError::AddressUnavailable { ip, reason };
        if pool::is_reserved(p, ip) {
            return Err(unavailable(format!(
                "it is the network or broadcast address of pool {} ({})",
                p.name, p.cidr
            )));
        }
        if let Some(a) = self.holder(ip) {
            return Err(unavailable(format!(
                "pool {} already has it allocated to container {} ifname {} (pod {}/{})",
                a.pool, a.key.container_id, a.key.ifname, a.pod.namespace, a.pod.name
            )));
        }
        if let Some(t) = self.cooling.get(&ip).copied()
            && self.reusable_at(t) > now_ms
        {
            return Err(unavailable(format!(
                "it was released from pool {} at unix ms {t} and is cooling down until unix ms {}",
                p.name,
                self.reusable_at(t)
            )));
        }
        if let Some(b) = self.block_containing(ip)
            && b.claim.pool != p.name
        {
            return Err(unavailable(format!(
                "its block {} belongs to pool {}",
                b.claim.cidr, b.claim.pool
            )));
        }
        Ok(())
    }

    /// Never-used addresses first (lowest block, lowest address); then the
    /// cooled-down address released earliest.
    fn pick(&self, p: &PoolSpec, now_ms: i64) -> Option<Ipv4Addr> {
        for b in self.pool_blocks(&p.name) {
            // The bitmap already excludes taken addresses; re-checked because
            // a wrong answer here would hand out a taken address.
            let free = b.unused().find(|ip| {
                !pool::is_reserved(p, *ip)
                    && !self.by_ip.contains_key(ip)
                    && !self.cooling.contains_key(ip)
            });
            if free.is_some() {
                return free;
            }
        }
        for &(released, ip) in &self.fifo {
            if self.reusable_at(released) > now_ms {
                // FIFO: everything after this was released later still.
                break;
            }
            if self
                .block_containing(ip)
                .is_some_and(|b| b.claim.pool == p.name)
                && !self.by_ip.contains_key(&ip)
                && !pool::is_reserved(p, ip)
            {
                return Some(ip);
            }
        }
        None
    }

    /// Blocks of `p` that nobody we know of owns and that hold a usable
    /// address, lowest first.
    fn free_blocks(&self, p: &PoolSpec, limit: usize) -> Vec<Ipv4Net> {
        let foreign: HashSet<Ipv4Net> = self
            .foreign
            .get(&p.name)
            .map(|v| v.iter().map(|b| b.cidr).collect())
            .unwrap_or_default();
        let Ok(subnets) = p.cidr.subnets(p.block_size) else {
            return Vec::new();
        };
        subnets
            .filter(|c| {
                !self.blocks.contains_key(c) && !foreign.contains(c) && pool::usable_in(p, *c) > 0
            })
            .take(limit)
            .collect()
    }

    /// Records other nodes' blocks of `pool`, as the cluster store reports them.
    pub fn set_foreign(&mut self, pool: &str, blocks: Vec<BlockClaim>) {
        self.foreign.insert(pool.to_string(), blocks);
    }

    /// True when a NeedBlock for (`pool`, `requested`) no longer needs a
    /// claim, because one landed meanwhile.
    pub fn need_satisfied(&self, pool: &str, requested: Option<Ipv4Addr>, now_ms: i64) -> bool {
        let Some(p) = self.pools.get(pool) else {
            // Planning again reports the missing pool.
            return true;
        };
        match requested {
            Some(ip) => self.block_containing(ip).is_some(),
            None => self.pick(p, now_ms).is_some(),
        }
    }

    /// Blocks to try claiming, in order. Call after `set_foreign`.
    pub fn block_candidates(
        &self,
        pool_name: &str,
        requested: Option<Ipv4Addr>,
        now_ms: i64,
    ) -> Result<Vec<Ipv4Net>, IpamError> {
        let p = self
            .pools
            .get(pool_name)
            .ok_or_else(|| IpamError::UnknownPool(pool_name.to_string()))?;
        if let Some(ip) = requested {
            let Some(cidr) = pool::block_of(p, ip) else {
                return Err(IpamError::InvalidArgument(format!(
                    "requested address {ip} is not in pool {}",
                    p.name
                )));
            };
            if let Some(owner) = self
                .foreign
                .get(&p.name)
                .and_then(|v| v.iter().find(|b| b.cidr == cidr))
            {
                return Err(IpamError::AddressUnavailable {
                    ip,
                    reason: format!("its block {cidr} belongs to node {}", owner.node),
                });
            }
            return Ok(vec![cidr]);
        }
        let c = self.free_blocks(p, MAX_CANDIDATES);
        if c.is_empty() {
            return Err(self.exhausted_error(pool_name, now_ms));
        }
        Ok(c)
    }

    /// The mutation recording a block just claimed through the cluster store;
    /// None if the pool is gone or the block is already ours.
    pub fn plan_block_claim(&self, pool: &str, cidr: Ipv4Net, now_ms: i64) -> Option<Mutation> {
        let p = self.pools.get(pool)?;
        if self.blocks.contains_key(&cidr) || !p.cidr.contains(&cidr) {
            return None;
        }
        if self.blocks.keys().any(|b| pool::overlaps(*b, cidr)) {
            return None;
        }
        Some(Mutation::PutBlock(BlockClaim {
            pool: pool.to_string(),
            cidr,
            node: self.cfg.node.clone(),
            claimed_unix_ms: now_ms,
        }))
    }

    /// None for an unknown key (release is idempotent).
    pub fn plan_release(&self, key: &AllocKey, now_ms: i64) -> Option<(Allocation, Vec<Mutation>)> {
        let a = self.get(key)?;
        Some((a.clone(), release_mutations(a, now_ms)))
    }

    /// Releases the allocations of `network` not in `valid` and created at
    /// or before `created_by_ms`.
    pub fn plan_gc(
        &self,
        network: &str,
        valid: &[AllocKey],
        created_by_ms: i64,
        now_ms: i64,
    ) -> (Vec<Allocation>, Vec<Mutation>) {
        let valid: HashSet<&AllocKey> = valid.iter().collect();
        let mut gone: Vec<Allocation> = self
            .allocations
            .values()
            .filter(|a| {
                a.key.network == network
                    && !valid.contains(&a.key)
                    && a.created_unix_ms <= created_by_ms
            })
            .map(|a| Allocation::clone(a))
            .collect();
        gone.sort_by_key(|a| a.ip);
        let muts = gone
            .iter()
            .flat_map(|a| release_mutations(a, now_ms))
            .collect();
        (gone, muts)
    }

    /// Blocks empty for longer than the grace period, none of whose addresses
    /// is still cooling down, except that every pool keeps its last block.
    /// Also drops expired cooling entries that are no longer in an owned
    /// block (nothing else would ever remove them).
    pub fn plan_release_idle(&self, now_ms: i64) -> (Vec<BlockClaim>, Vec<Mutation>) {
        let mut release = Vec::new();
        let mut by_pool: BTreeMap<&str, Vec<&BlockState>> = BTreeMap::new();
        for b in self.blocks.values() {
            by_pool.entry(b.claim.pool.as_str()).or_default().push(b);
        }
        for (pool_name, blocks) in by_pool {
            if !self.pools.contains_key(pool_name) {
                // A block of a deleted pool: nothing can allocate from it.
                if blocks.iter().all(|b| b.allocated == 0) {
                    release.extend(blocks.iter().map(|b| b.claim.clone()));
                }
                continue;
            }
            let idle: Vec<&BlockState> = blocks
                .iter()
                .copied()
                .filter(|b| {
                    b.allocated == 0
                        && b.empty_since.is_some_and(|t| {
                            t.saturating_add(self.cfg.block_idle_grace_ms) <= now_ms
                        })
                        && self.cooling_in(b.claim.cidr, now_ms) == 0
                })
                .collect();
            let skip = usize::from(idle.len() == blocks.len());
            release.extend(idle.iter().skip(skip).map(|b| b.claim.clone()));
        }
        let mut muts = Vec::new();
        for c in &release {
            for ip in self
                .cooling
                .range(c.cidr.network()..=c.cidr.broadcast())
                .map(|(ip, _)| *ip)
            {
                muts.push(Mutation::DeleteCooling { ip });
            }
            muts.push(Mutation::DeleteBlock {
                pool: c.pool.clone(),
                cidr: c.cidr,
            });
        }
        for (&ip, &t) in &self.cooling {
            if self.block_containing(ip).is_none() && self.reusable_at(t) <= now_ms {
                muts.push(Mutation::DeleteCooling { ip });
            }
        }
        (release, muts)
    }

    // ----------------------------------------------------------- pool admin

    /// Checks `spec` against itself and every other pool (except one named
    /// like it, which it would replace).
    pub fn validate_pool(&self, spec: &PoolSpec) -> Result<(), IpamError> {
        pool::validate(spec).map_err(IpamError::InvalidArgument)?;
        let others: Vec<&PoolSpec> = self
            .pools
            .values()
            .filter(|p| p.name != spec.name)
            .collect();
        check_pool_set(spec, &others)
    }

    /// Mutations adding a new pool at run time. The pool is marked as added
    /// at run time, so that it outlives restarts although the configuration
    /// does not name it.
    pub fn plan_add_pool(&self, spec: &PoolSpec) -> Result<Vec<Mutation>, IpamError> {
        if let Some(old) = self.pools.get(&spec.name) {
            return Err(IpamError::Conflict(format!(
                "pool {} already exists ({}); remove it first to change it",
                spec.name, old.cidr
            )));
        }
        self.validate_pool(spec)?;
        if let Some(unknown) = spec
            .allow_from
            .iter()
            .find(|n| **n != spec.name && !self.pools.contains_key(n.as_str()))
        {
            return Err(IpamError::InvalidArgument(format!(
                "pool {}: allow_from names unknown pool {unknown:?}",
                spec.name
            )));
        }
        Ok(vec![Mutation::PutPool(PoolSpec {
            runtime: true,
            ..spec.clone()
        })])
    }

    /// Mutations removing a pool and its blocks; the blocks come back too so
    /// the core can give them back to the cluster store.
    pub fn plan_remove_pool(
        &self,
        name: &str,
    ) -> Result<(Vec<BlockClaim>, Vec<Mutation>), IpamError> {
        let p = self
            .pools
            .get(name)
            .ok_or_else(|| IpamError::NotFound(format!("no pool named {name:?}")))?;
        if p.is_default() {
            return Err(IpamError::Conflict(format!(
                "pool {name} is the default pool and cannot be removed"
            )));
        }
        let held = self.allocations.values().filter(|a| a.pool == name).count();
        if held > 0 {
            return Err(IpamError::Conflict(format!(
                "pool {name} still holds {held} allocation(s); delete those pods or release them (ipamctl allocations --pool {name}) first"
            )));
        }
        if !p.runtime {
            // It would come back at the next start: refusing keeps every
            // change `pool rm` makes durable.
            return Err(IpamError::Conflict(format!(
                "pool {name} comes from ipamd's configuration and would return at the next start; remove it from the configuration and restart ipamd instead"
            )));
        }
        let mut referers: Vec<&str> = self
            .pools
            .values()
            .filter(|o| o.name != name && o.allow_from.iter().any(|f| f == name))
            .map(|o| o.name.as_str())
            .collect();
        if !referers.is_empty() {
            referers.sort_unstable();
            return Err(IpamError::Conflict(format!(
                "pool {name} is named in allow_from of pool(s) {}; remove it there first",
                referers.join(", ")
            )));
        }
        let blocks: Vec<BlockClaim> = self.pool_blocks(name).map(|b| b.claim.clone()).collect();
        let mut muts: Vec<Mutation> = blocks
            .iter()
            .map(|b| Mutation::DeleteBlock {
                pool: b.pool.clone(),
                cidr: b.cidr,
            })
            .collect();
        muts.push(Mutation::DeletePool(name.to_string()));
        Ok((blocks, muts))
    }

    /// Merges the configured pools into the persisted ones at start:
    /// configured pools are added or updated; a persisted pool missing from
    /// the configuration is kept if it was added at run time (`pool add`) or
    /// while it holds allocations, dropped otherwise. Returns the blocks to
    /// give back and the mutations.
    pub fn plan_merge_pools(
        &self,
        configured: &[PoolSpec],
    ) -> Result<(Vec<BlockClaim>, Vec<Mutation>), IpamError> {
        let mut names = HashSet::new();
        for spec in configured {
            pool::validate(spec).map_err(IpamError::InvalidArgument)?;
            if !names.insert(spec.name.as_str()) {
                return Err(IpamError::InvalidArgument(format!(
                    "pool {} is configured twice",
                    spec.name
                )));
            }
        }
        let held = |name: &str| self.allocations.values().filter(|a| a.pool == name).count();
        let mut final_set: Vec<&PoolSpec> = configured.iter().collect();
        let mut muts = Vec::new();
        let mut dropped: Vec<BlockClaim> = Vec::new();
        let drop_blocks = |name: &str, dropped: &mut Vec<BlockClaim>, muts: &mut Vec<Mutation>| {
            for b in self.pool_blocks(name) {
                dropped.push(b.claim.clone());
                muts.push(Mutation::DeleteBlock {
                    pool: b.claim.pool.clone(),
                    cidr: b.claim.cidr,
                });
            }
        };
        for old in self.pools.values() {
            if names.contains(old.name.as_str()) {
                continue;
            }
            if old.runtime {
                final_set.push(old);
                continue;
            }
            let n = held(&old.name);
            if n > 0 {
                // As a run-time pool, `pool rm` can remove it once it is empty.
                warn!(pool = %old.name, allocations = n,
                    "pool is no longer configured but still holds allocations; keeping it as a run-time pool (ipamctl pool rm it once empty)");
                muts.push(Mutation::PutPool(PoolSpec {
                    runtime: true,
                    ..old.clone()
                }));
                final_set.push(old);
            } else {
                drop_blocks(&old.name, &mut dropped, &mut muts);
                muts.push(Mutation::DeletePool(old.name.clone()));
            }
        }
        for spec in configured {
            match self.pools.get(&spec.name) {
                Some(old) if old == spec => {}
                Some(old) if old.cidr != spec.cidr || old.block_size != spec.block_size => {
                    let n = held(&spec.name);
                    if n > 0 {
                        return Err(IpamError::Conflict(format!(
                            "pool {} changed from {} (blocks /{}) to {} (blocks /{}) while it holds {n} allocation(s); release them first or keep the old cidr",
                            spec.name, old.cidr, old.block_size, spec.cidr, spec.block_size
                        )));
                    }
                    drop_blocks(&spec.name, &mut dropped, &mut muts);
                    muts.push(Mutation::PutPool(spec.clone()));
                }
                _ => muts.push(Mutation::PutPool(spec.clone())),
            }
        }
        // Blocks whose pool is gone altogether (left over by an older state).
        for b in self.blocks.values() {
            if !self.pools.contains_key(&b.claim.pool) && b.allocated == 0 {
                dropped.push(b.claim.clone());
                muts.push(Mutation::DeleteBlock {
                    pool: b.claim.pool.clone(),
                    cidr: b.claim.cidr,
                });
            }
        }
        for (i, spec) in final_set.iter().enumerate() {
            let others: Vec<&PoolSpec> = final_set
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| *p)
                .collect();
            check_pool_set(spec, &others)?;
        }
        if !final_set.iter().any(|p| p.is_default()) {
            return Err(IpamError::InvalidArgument(
                "no default pool: exactly one pool must list no namespaces".into(),
            ));
        }
        Ok((dropped, muts))
    }
}

/// The mutations freeing one allocation: the address goes into cooldown.
fn release_mutations(a: &Allocation, now_ms: i64) -> Vec<Mutation> {
    vec![
        Mutation::DeleteAllocation {
            key: a.key.clone(),
            ip: a.ip,
        },
        Mutation::PutCooling {
            ip: a.ip,
            released_unix_ms: now_ms,
        },
    ]
}

/// `spec` against the other pools: no overlap, one default, a namespace in
/// at most one pool.
fn check_pool_set(spec: &PoolSpec, others: &[&PoolSpec]) -> Result<(), IpamError> {
    for o in others {
        if pool::overlaps(o.cidr, spec.cidr) {
            return Err(IpamError::InvalidArgument(format!(
                "pool {} ({}) overlaps pool {} ({})",
                spec.name, spec.cidr, o.name, o.cidr
            )));
        }
        if spec.is_default() && o.is_default() {
            return Err(IpamError::Conflict(format!(
                "pool {} would be a second default pool next to {} (a default pool lists no namespaces)",
                spec.name, o.name
            )));
        }
        if let Some(ns) = spec.namespaces.iter().find(|n| o.namespaces.contains(n)) {
            return Err(IpamError::InvalidArgument(format!(
                "namespace {ns} is listed by both pool {} and pool {}",
                spec.name, o.name
            )));
        }
    }
    Ok(())
}

/// The single requested address, if any. One attachment gets one IPv4
/// address, so several distinct requests cannot be met.
fn requested_ip(params: &AllocateParams) -> Result<Option<Ipv4Addr>, IpamError> {
    let mut ips: Vec<Ipv4Addr> = params.requested_ips.clone();
    ips.sort();
    ips.dedup();
    match ips.as_slice() {
        [] => Ok(None),
        [ip] => Ok(Some(*ip)),
        many => {
            let mut list = String::new();
            for (i, ip) in many.iter().enumerate() {
                let _ = write!(list, "{}{ip}", if i > 0 { ", " } else { "" });
            }
            Err(IpamError::InvalidArgument(format!(
                "one address per attachment, but {} were requested: {list}",
                many.len()
            )))
        }
    }
}

/// The key's parts are joined with NUL in the store, so none may contain it.
pub fn validate_key(key: &AllocKey) -> Result<(), IpamError> {
    if key.container_id.is_empty() {
        return Err(IpamError::InvalidArgument("container ID is empty".into()));
    }
    if key.ifname.is_empty() {
        return Err(IpamError::InvalidArgument("ifname is empty".into()));
    }
    if [&key.network, &key.container_id, &key.ifname]
        .iter()
        .any(|s| s.contains('\0'))
    {
        return Err(IpamError::InvalidArgument(
            "network, container ID and ifname must not contain NUL".into(),
        ));
    }
    Ok(())
}
