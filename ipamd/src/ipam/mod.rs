//! The IPAM core: the pure allocator behind a lock, the store for durability,
//! the cluster store for block claims. gRPC, reconcile and the admin API all
//! go through here.
//!
//! Every change follows one pattern: under the allocator lock, decide (a list
//! of mutations), write it to the store, apply it in memory; drop the lock;
//! then await durability of that batch before answering. Concurrent requests
//! thus share one flush. Block claims go to the cluster store with the lock
//! dropped, serialised by a separate async lock so that two requests do not
//! claim two blocks where one is enough.
//!
//! Log lines about an event (allocated, released, ...) are written here, once
//! each, after the allocator lock is dropped and the change is durable.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::alloc::{AllocConfig, Allocator, Plan};
use crate::clock::{Clock, SystemClock};
use crate::cluster::ClusterStore;
use crate::error::IpamError;
use crate::model::{AllocKey, AllocateParams, Allocation, BlockClaim, PoolSpec, Readiness};
use crate::store::{Mutation, Seq, Store};

mod consistency;
mod pools;
mod status;

/// Claim rounds per allocate before giving up: each round claims a block and
/// plans again, so more than a few means other requests keep filling them.
const MAX_ROUNDS: usize = 8;

#[derive(Debug, Clone)]
pub struct IpamOptions {
    pub node: String,
    /// Pools from configuration; exactly one has no namespaces (the default).
    pub pools: Vec<PoolSpec>,
    /// How long a freed address waits before reuse.
    pub cooldown: Duration,
    /// How long a block must sit empty before it is given back.
    pub block_idle_grace: Duration,
    /// CNI GC spares allocations created or used more recently than this.
    pub gc_min_age: Duration,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// What `Status` reports, read under one lock without copying allocations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub readiness: Readiness,
    pub reason: String,
    pub allocations: usize,
    pub pools: usize,
    pub blocks: usize,
}

#[cfg(test)]
impl IpamOptions {
    /// Node n1 with the default pool 10.244.0.0/24 in /26 blocks, for tests.
    pub(crate) fn one_pool_for_tests() -> Self {
        IpamOptions {
            node: "n1".into(),
            pools: vec![PoolSpec::new(
                "default",
                "10.244.0.0/24".parse().expect("a CIDR"),
                26,
                vec![],
            )],
            cooldown: Duration::from_secs(30),
            block_idle_grace: Duration::from_secs(600),
            gc_min_age: Duration::ZERO,
        }
    }
}

pub struct Ipam {
    node: String,
    state: Mutex<Allocator>,
    /// Per key, the last time a successful Allocate (new or existing) or a
    /// Check saw it: reconcile must not take the address of an attachment a
    /// runtime is still working on. In memory only (a restart restarts
    /// reconcile's looks too). Locked only while `state` is held (lock
    /// order: state, then activity), so a stamp and the allocation it
    /// concerns change together; entries go with their allocation.
    activity: Mutex<HashMap<AllocKey, i64>>,
    /// Serialises block claims and releases with the cluster store.
    claims: tokio::sync::Mutex<()>,
    store: Arc<dyn Store>,
    cluster: Arc<dyn ClusterStore>,
    clock: Arc<dyn Clock>,
    gc_min_age_ms: i64,
    /// The blocks this node owns, republished by every change to them; the
    /// node's route reconciler follows it.
    owned: watch::Sender<Vec<BlockClaim>>,
}

enum Step {
    /// The allocation, its batch, and whether it is new.
    Done(Allocation, Seq, bool),
    Claim(String, Option<Ipv4Addr>),
}

impl Ipam {
    /// Loads the persisted state; configured pools are added or updated, and a
    /// persisted pool that still has allocations is kept even if removed from
    /// the configuration.
    pub async fn open(
        opts: IpamOptions,
        store: Arc<dyn Store>,
        cluster: Arc<dyn ClusterStore>,
    ) -> Result<Self, IpamError> {
        Self::open_with_clock(opts, store, cluster, Arc::new(SystemClock)).await
    }

    /// [`Ipam::open`] with a chosen clock.
    pub async fn open_with_clock(
        opts: IpamOptions,
        store: Arc<dyn Store>,
        cluster: Arc<dyn ClusterStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, IpamError> {
        let snap = store.load()?;
        let cfg = AllocConfig {
            node: opts.node.clone(),
            cooldown_ms: millis(opts.cooldown),
            block_idle_grace_ms: millis(opts.block_idle_grace),
        };
        let mut alloc = Allocator::restore(cfg, &snap);
        let (dropped, muts) = alloc.plan_merge_pools(&opts.pools)?;
        if !muts.is_empty() {
            let seq = store.apply(&muts)?;
            alloc.apply(&muts, clock.now_unix_ms());
            store.durable(seq).await?;
        }
        for b in &dropped {
            // Best effort: a block we no longer record must not stay ours
            // in the cluster, but failing to say so is not fatal.
            if let Err(e) = cluster.release_block(&b.pool, b.cidr, &opts.node).await {
                warn!(pool = %b.pool, block = %b.cidr, error = %e, "could not give back block");
            }
        }
        info!(
            node = %opts.node,
            pools = alloc.pool_specs().count(),
            blocks = alloc.owned_blocks().len(),
            allocations = alloc.allocation_count(),
            cooling = snap.cooling.len(),
            "IPAM state loaded"
        );
        let (owned, _) = watch::channel(alloc.block_claims());
        Ok(Ipam {
            node: opts.node,
            state: Mutex::new(alloc),
            activity: Mutex::new(HashMap::new()),
            claims: tokio::sync::Mutex::new(()),
            store,
            cluster,
            clock,
            gc_min_age_ms: millis(opts.gc_min_age),
            owned,
        })
    }

    /// The core's clock, which reconcile reads too.
    pub fn now(&self) -> i64 {
        self.clock.now_unix_ms()
    }

    /// The blocks this node owns (by CIDR), now and after
    /// every change.
    pub fn watch_owned_blocks(&self) -> watch::Receiver<Vec<BlockClaim>> {
        self.owned.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Allocator> {
        // The allocator only changes after a successful store write, in
        // apply(), which does not panic; a poisoned lock still holds a
        // consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take only with the allocator lock held (see `activity`).
    fn activity(&self, _st: &Allocator) -> MutexGuard<'_, HashMap<AllocKey, i64>> {
        // Plain inserts and removes: a poisoned lock still holds a usable map.
        self.activity.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `muts` and mirrors them in memory. Call with the lock held.
    fn commit(&self, st: &mut Allocator, muts: &[Mutation], now: i64) -> Result<Seq, IpamError> {
        if muts.is_empty() {
            return Ok(self.store.last_seq());
        }
        let seq = self.store.apply(muts)?;
        st.apply(muts, now);
        let blocks_changed = muts.iter().any(|m| {
            matches!(
                m,
                Mutation::PutBlock(_) | Mutation::DeleteBlock { .. } | Mutation::DeletePool(_)
            )
        });
        if blocks_changed {
            // Under the lock: publications follow the order of the changes.
            let claims = st.block_claims();
            self.owned.send_if_modified(|cur| {
                let changed = *cur != claims;
                *cur = claims;
                changed
            });
        }
        Ok(seq)
    }

    /// Tests' shorthand for [`Ipam::allocate_or_get`].
    #[cfg(test)]
    pub async fn allocate(&self, params: AllocateParams) -> Result<Allocation, IpamError> {
        Ok(self.allocate_or_get(params).await?.0)
    }

    /// Idempotent on `params.key`; durable before it returns. Also tells
    /// whether this call created the allocation (false: the key already held
    /// it, a retried ADD).
    pub async fn allocate_or_get(
        &self,
        params: AllocateParams,
    ) -> Result<(Allocation, bool), IpamError> {
        for _ in 0..MAX_ROUNDS {
            let step = {
                let now = self.now();
                let mut st = self.lock();
                match st.plan_allocate(&params, now)? {
                    // An earlier request for this key may still be flushing.
                    Plan::Existing(a) => {
                        // A retried ADD: its veth may not exist yet.
                        self.activity(&st).insert(a.key.clone(), now);
                        Step::Done(a, self.store.last_seq(), false)
                    }
                    Plan::Allocate {
                        allocation,
                        mutations,
                    } => {
                        let seq = self.commit(&mut st, &mutations, now)?;
                        self.activity(&st).insert(allocation.key.clone(), now);
                        Step::Done(allocation, seq, true)
                    }
                    Plan::NeedBlock { pool, requested } => Step::Claim(pool, requested),
                }
            };
            match step {
                Step::Done(a, seq, new) => {
                    self.store.durable(seq).await?;
                    if new {
                        info!(ip = %a.ip, pool = %a.pool,
                            container = %a.key.container_id, ifname = %a.key.ifname,
                            pod = %format_args!("{}/{}", a.pod.namespace, a.pod.name),
                            "allocated");
                    }
                    return Ok((a, new));
                }
                Step::Claim(pool, requested) => self.claim_block_for(&pool, requested).await?,
            }
        }
        let pool = self.lock().select_pool(&params)?.name.clone();
        warn!(%pool, "gave up allocating after {MAX_ROUNDS} block claims");
        Err(self.lock().exhausted_error(&pool, self.now()))
    }

    /// Claims one block of `pool` (the one holding `requested`, if given).
    /// Returns Ok once a block was recorded or one already landed meanwhile.
    async fn claim_block_for(
        &self,
        pool: &str,
        requested: Option<Ipv4Addr>,
    ) -> Result<(), IpamError> {
        let _claims = self.claims.lock().await;
        if self.lock().need_satisfied(pool, requested, self.now()) {
            return Ok(());
        }
        let foreign = self.cluster.foreign_blocks(pool).await?;
        let candidates = {
            let mut st = self.lock();
            st.set_foreign(pool, foreign);
            st.block_candidates(pool, requested, self.now())?
        };
        for cidr in candidates {
            if !self.cluster.claim_block(pool, cidr, &self.node).await? {
                debug!(%pool, block = %cidr, "block taken by another node");
                continue;
            }
            let recorded = {
                let now = self.now();
                let mut st = self.lock();
                match st.plan_block_claim(pool, cidr, now) {
                    Some(m) => self.commit(&mut st, &[m], now).map(Some),
                    None => Ok(None),
                }
            };
            match recorded {
                // The allocation that follows is a later batch; its flush
                // makes this claim durable too.
                Ok(Some(_)) => {
                    info!(%pool, block = %cidr, node = %self.node, "claimed block");
                    return Ok(());
                }
                Ok(None) => {
                    // The pool vanished meanwhile; planning again reports it.
                    self.give_back(pool, cidr).await;
                    return Ok(());
                }
                Err(e) => {
                    self.give_back(pool, cidr).await;
                    return Err(e);
                }
            }
        }
        match requested {
            Some(ip) => Err(IpamError::AddressUnavailable {
                ip,
                reason: "its block belongs to another node".into(),
            }),
            None => Err(self.lock().exhausted_error(pool, self.now())),
        }
    }

    /// Tells the cluster a block is no longer ours; a failure is logged, not
    /// returned (the block is already forgotten here). True when it worked.
    async fn give_back(&self, pool: &str, cidr: Ipv4Net) -> bool {
        match self.cluster.release_block(pool, cidr, &self.node).await {
            Ok(()) => true,
            Err(e) => {
                warn!(%pool, block = %cidr, error = %e, "could not give back block");
                false
            }
        }
    }

    /// Idempotent: an unknown key is Ok(None). Durable before it returns.
    pub async fn release(&self, key: &AllocKey) -> Result<Option<Allocation>, IpamError> {
        let released = self
            .release_where(|_| Some(key.clone()), |_, _| true)
            .await?;
        if let Some(a) = &released {
            info!(ip = %a.ip, pool = %a.pool, container = %a.key.container_id,
                ifname = %a.key.ifname, "released");
        }
        Ok(released)
    }

    /// Reconcile's release: only if `key` still holds the very allocation
    /// `expected` (same IP and creation time) and no Allocate or Check has
    /// seen it at or after `not_touched_since_ms`. Checked and released in one
    /// step under the allocator lock, so a retried ADD that gets the address
    /// back either comes first (and the address stays) or finds the key gone
    /// (and gets a new one). Ok(None) when refused. Does not log; the caller
    /// says why it released.
    pub async fn release_if_idle(
        &self,
        expected: &Allocation,
        not_touched_since_ms: i64,
    ) -> Result<Option<Allocation>, IpamError> {
        self.release_where(
            |_| Some(expected.key.clone()),
            |current, last_activity| {
                current.same_lease(expected)
                    && last_activity.is_none_or(|t| t < not_touched_since_ms)
            },
        )
        .await
    }

    /// An operator's release of an allocation it was shown: only if its key
    /// still holds that very allocation, never the next one the same key got
    /// meanwhile. Ok(None) when it is gone. Does not log; the caller does.
    pub async fn release_exact(
        &self,
        expected: &Allocation,
    ) -> Result<Option<Allocation>, IpamError> {
        self.release_where(
            |_| Some(expected.key.clone()),
            |current, _| current.same_lease(expected),
        )
        .await
    }

    /// Releases the key `find` picks if `keep_going(allocation, last
    /// activity)` says so: both decided in one hold of the lock, so what
    /// goes is exactly what was looked up.
    async fn release_where(
        &self,
        find: impl FnOnce(&Allocator) -> Option<AllocKey>,
        keep_going: impl FnOnce(&Allocation, Option<i64>) -> bool,
    ) -> Result<Option<Allocation>, IpamError> {
        let (released, seq) = {
            let now = self.now();
            let mut st = self.lock();
            let planned = find(&st).and_then(|key| st.plan_release(&key, now));
            match planned {
                Some((a, muts)) => {
                    let last = self.activity(&st).get(&a.key).copied();
                    if !keep_going(&a, last) {
                        return Ok(None);
                    }
                    let seq = self.commit(&mut st, &muts, now)?;
                    self.activity(&st).remove(&a.key);
                    (Some(a), seq)
                }
                // A concurrent release of this key may still be flushing.
                None => (None, self.store.last_seq()),
            }
        };
        self.store.durable(seq).await?;
        Ok(released)
    }

    /// The allocation of `key`, without side effects.
    pub fn get(&self, key: &AllocKey) -> Option<Allocation> {
        self.lock().get(key).cloned()
    }

    /// The plugin's CHECK: [`Ipam::get`] that also counts as activity on the
    /// key, like an Allocate (a runtime is working with this attachment).
    pub fn check(&self, key: &AllocKey) -> Option<Allocation> {
        let st = self.lock();
        let a = st.get(key).cloned();
        if a.is_some() {
            self.activity(&st).insert(key.clone(), self.now());
        }
        a
    }

    /// Every allocation (unordered) with its last Allocate or Check, if
    /// any. Under the lock only pointers and times are copied.
    pub fn allocations_with_activity(&self) -> Vec<(Arc<Allocation>, Option<i64>)> {
        let st = self.lock();
        let activity = self.activity(&st);
        st.shared_allocations()
            .into_iter()
            .map(|a| {
                let t = activity.get(&a.key).copied();
                (a, t)
            })
            .collect()
    }

    /// Releases every allocation of `network` whose key is not in `valid`,
    /// except those created or used within `gc_min_age`: a runtime that
    /// listed the valid attachments before an ADD may send GC after it.
    pub async fn gc(
        &self,
        network: &str,
        valid: &[AllocKey],
    ) -> Result<Vec<Allocation>, IpamError> {
        let (gone, seq) = {
            let now = self.now();
            let since = now.saturating_sub(self.gc_min_age_ms);
            let mut st = self.lock();
            let mut spared: Vec<AllocKey> = valid.to_vec();
            spared.extend(
                self.activity(&st)
                    .iter()
                    .filter(|&(_, &t)| t > since)
                    .map(|(k, _)| k.clone()),
            );
            let (gone, muts) = st.plan_gc(network, &spared, since, now);
            let seq = self.commit(&mut st, &muts, now)?;
            let mut activity = self.activity(&st);
            for a in &gone {
                activity.remove(&a.key);
            }
            (gone, seq)
        };
        self.store.durable(seq).await?;
        for a in &gone {
            info!(ip = %a.ip, container = %a.key.container_id, ifname = %a.key.ifname,
                "released by GC");
        }
        Ok(gone)
    }

    /// Releases whatever holds `ip` (looked up and released in one step);
    /// Ok(None) when nothing does. Does not log; the caller does.
    pub async fn release_ip(&self, ip: Ipv4Addr) -> Result<Option<Allocation>, IpamError> {
        self.release_where(|st| st.holder(ip).map(|a| a.key.clone()), |_, _| true)
            .await
    }
}

#[cfg(test)]
mod tests;
