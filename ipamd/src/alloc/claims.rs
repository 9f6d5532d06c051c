//! Which blocks to claim through the cluster store, recording a claim, and
//! which idle blocks to give back.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::block::BlockState;
use super::{Allocator, pool};
use crate::error::IpamError;
use crate::model::{BlockClaim, PoolSpec};
use crate::store::Mutation;

/// How many unowned blocks the core tries to claim per round before giving up.
const MAX_CANDIDATES: usize = 16;

impl Allocator {
    /// Blocks of `p` that nobody we know of owns and that hold a usable
    /// address, lowest first.
    pub(super) fn free_blocks(&self, p: &PoolSpec, limit: usize) -> Vec<Ipv4Net> {
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
}
