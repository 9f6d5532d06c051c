//! Pool administration and block give-back: the changes that go to the
//! cluster store as well as to the node's store.

use std::collections::HashSet;

use ipnet::Ipv4Net;
use tracing::{info, warn};

use super::Ipam;
use crate::error::IpamError;
use crate::model::{Allocation, BlockClaim, PoolSpec};
use crate::node::scan::VethAddress;
use crate::store::Seq;
use crate::store::recover;

impl Ipam {
    /// Adds a pool and, in the same batch, adopts the `live` addresses of
    /// ferry's host veths that lie in it, with their blocks: after a
    /// database rebuild an operator re-adds a run-time pool whose addresses
    /// pods still hold, and none of them may be handed out again.
    pub async fn add_pool(
        &self,
        pool: PoolSpec,
        live: &[VethAddress],
    ) -> Result<(PoolSpec, Vec<Allocation>), IpamError> {
        // Held so no other pool change or claim runs until the batch is in.
        let _claims = self.claims.lock().await;
        // Refused pools claim nothing.
        self.lock().plan_add_pool(&pool)?;
        let now = self.now();
        let inside: Vec<VethAddress> = live
            .iter()
            .filter(|v| pool.cidr.contains(&v.ip))
            .cloned()
            .collect();
        let mut plan =
            recover::plan_adoption(std::slice::from_ref(&pool), &self.node, &inside, now);
        let mut claimed = Vec::new();
        let mut refused = HashSet::new();
        for b in plan.blocks() {
            match self.cluster.claim_block(&b.pool, b.cidr, &self.node).await {
                Ok(true) => claimed.push(b.cidr),
                Ok(false) => {
                    refused.insert(b.cidr);
                }
                Err(e) => {
                    self.give_back_all(&pool.name, &claimed).await;
                    return Err(e.into());
                }
            }
        }
        plan.drop_blocks(&refused);
        let committed = {
            let mut st = self.lock();
            st.plan_add_pool(&pool).and_then(|mut muts| {
                muts.extend(plan.adoptions());
                self.commit(&mut st, &muts, now)
            })
        };
        let seq = match committed {
            Ok(seq) => seq,
            Err(e) => {
                self.give_back_all(&pool.name, &claimed).await;
                return Err(e);
            }
        };
        self.store.durable(seq).await?;
        for (v, why) in &plan.skipped {
            warn!(pool = %pool.name, ip = %v.ip, link = %v.link, reason = %why,
                "live address in the new pool NOT adopted");
        }
        info!(pool = %pool.name, cidr = %pool.cidr, block_size = pool.block_size,
            adopted = plan.adopted.len(), "pool added");
        Ok((pool, plan.adopted))
    }

    async fn give_back_all(&self, pool: &str, blocks: &[Ipv4Net]) {
        for b in blocks {
            self.give_back(pool, *b).await;
        }
    }

    /// Refused while the pool holds allocations.
    pub async fn remove_pool(&self, name: &str) -> Result<(), IpamError> {
        // Held so no claim for this pool runs between our decision and the
        // cluster releases.
        let _claims = self.claims.lock().await;
        let (blocks, seq) = {
            let now = self.now();
            let mut st = self.lock();
            let (blocks, muts) = st.plan_remove_pool(name)?;
            (blocks, self.commit(&mut st, &muts, now)?)
        };
        self.store.durable(seq).await?;
        for b in &blocks {
            self.give_back(&b.pool, b.cidr).await;
        }
        info!(pool = %name, blocks = blocks.len(), "pool removed");
        Ok(())
    }

    /// Gives back blocks empty for longer than the grace period, keeping one
    /// per pool in use. Returns what was released.
    pub async fn release_idle_blocks(&self) -> Result<Vec<Ipv4Net>, IpamError> {
        // Forget the blocks locally (durably) first, then tell the cluster:
        // a crash in between leaves a block claimed in the cluster but unused
        // here, never one used here that the cluster thinks is free.
        let _claims = self.claims.lock().await;
        let (blocks, seq): (Vec<BlockClaim>, Seq) = {
            let now = self.now();
            let mut st = self.lock();
            let (blocks, muts) = st.plan_release_idle(now);
            (blocks, self.commit(&mut st, &muts, now)?)
        };
        self.store.durable(seq).await?;
        // Forgotten here already: one block the cluster refuses must not
        // keep the others claimed there.
        let mut out = Vec::with_capacity(blocks.len());
        for b in blocks {
            if self.give_back(&b.pool, b.cidr).await {
                info!(pool = %b.pool, block = %b.cidr, "released idle block");
            }
            out.push(b.cidr);
        }
        Ok(out)
    }
}
