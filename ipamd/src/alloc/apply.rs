//! Changing the allocator: rebuilding it from a store snapshot, and applying
//! mutations the store has already taken. Nothing else changes its state.

use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use tracing::warn;

use super::block::BlockState;
use super::{AllocConfig, Allocator, pool};
use crate::model::{AllocKey, BlockClaim};
use crate::store::{Mutation, Snapshot};

impl Allocator {
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
        let mut b = BlockState::new(claim);
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

    fn block_mut(&mut self, ip: Ipv4Addr) -> Option<&mut BlockState> {
        let probe = Ipv4Net::new(ip, 32).ok()?;
        self.blocks
            .range_mut(..=probe)
            .next_back()
            .map(|(_, b)| b)
            .filter(|b| b.claim.cidr.contains(&ip))
    }
}
