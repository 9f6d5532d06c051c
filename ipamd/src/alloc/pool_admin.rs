//! Pool administration: adding and removing a pool at run time, and merging
//! the configured pools into the stored ones at start.

use std::collections::HashSet;

use tracing::warn;

use super::Allocator;
use super::pool::{self, PoolError};
use crate::error::IpamError;
use crate::model::{BlockClaim, PoolSpec};
use crate::store::Mutation;

impl Allocator {
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
        pool::validate(spec)?;
        for other in self.pools.values() {
            pool::check_pair(spec, other)?;
        }
        pool::check_allow_from(spec, |name| self.pools.contains_key(name))?;
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
        let mut final_set: Vec<&PoolSpec> = configured.iter().collect();
        // The configuration checked its pools by the same rules.
        let broken = |rule: String| {
            IpamError::Internal(format!("a configured pool breaks a pool rule: {rule}"))
        };
        for spec in configured {
            pool::validate(spec).map_err(|e| broken(e.to_string()))?;
        }
        pool::check_together(&final_set).map_err(|e| broken(e.to_string()))?;
        let names: HashSet<&str> = configured.iter().map(|p| p.name.as_str()).collect();
        let held = |name: &str| self.allocations.values().filter(|a| a.pool == name).count();
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
        // A pool added at run time can clash with one configured since.
        pool::check_together(&final_set).map_err(|e| IpamError::from(e.error))?;
        if !final_set.iter().any(|p| p.is_default()) {
            // The configuration always has one.
            return Err(IpamError::Internal(PoolError::NoDefault.to_string()));
        }
        Ok((dropped, muts))
    }
}
