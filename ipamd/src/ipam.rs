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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use tracing::{debug, info, warn};

use crate::alloc::{AllocConfig, Allocator, Plan};
use crate::cluster::ClusterStore;
use crate::error::IpamError;
use crate::model::{
    AddressInfo, AllocKey, AllocateParams, Allocation, AllocationFilter, BlockClaim, BlockUsage,
    PoolSpec, PoolUsage, Readiness,
};
use crate::node::scan::VethAddress;
use crate::store::recover;
use crate::store::{Mutation, Probe, Seq, Snapshot, Store, StoreError};

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

/// Current time in unix milliseconds. Injectable so tests can move time.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    })
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
    clock: Clock,
    gc_min_age_ms: i64,
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
        Self::open_with_clock(opts, store, cluster, system_clock()).await
    }

    /// [`Ipam::open`] with a chosen clock.
    pub async fn open_with_clock(
        opts: IpamOptions,
        store: Arc<dyn Store>,
        cluster: Arc<dyn ClusterStore>,
        clock: Clock,
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
            alloc.apply(&muts, clock());
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
        Ok(Ipam {
            node: opts.node,
            state: Mutex::new(alloc),
            activity: Mutex::new(HashMap::new()),
            claims: tokio::sync::Mutex::new(()),
            store,
            cluster,
            clock,
            gc_min_age_ms: millis(opts.gc_min_age),
        })
    }

    fn now(&self) -> i64 {
        (self.clock)()
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
        Ok(seq)
    }

    /// Idempotent on `params.key`; durable before it returns.
    pub async fn allocate(&self, params: AllocateParams) -> Result<Allocation, IpamError> {
        Ok(self.allocate_or_get(params).await?.0)
    }

    /// [`Ipam::allocate`], also telling whether this call created the
    /// allocation (false: the key already held it, a retried ADD).
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

    /// Releases whatever holds `ip` (looked up and released in one step);
    /// Ok(None) when nothing does. Does not log; the caller does.
    pub async fn release_ip(&self, ip: Ipv4Addr) -> Result<Option<Allocation>, IpamError> {
        self.release_where(|st| st.holder(ip).map(|a| a.key.clone()), |_, _| true)
            .await
    }

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

    /// Hands out no address not yet held until `until` (see
    /// [`Allocator::hold_fresh_until`]); readiness says why meanwhile.
    pub fn hold_fresh_until(&self, until: SystemTime, reason: String) {
        self.lock()
            .hold_fresh_until(crate::reconcile::unix_ms(until), reason);
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

    /// Blocks the cluster store gives to other nodes, in every pool.
    pub async fn foreign_claims(&self) -> Result<Vec<BlockClaim>, IpamError> {
        let mut claims = Vec::new();
        for pool in self.pool_specs() {
            claims.extend(self.cluster.foreign_blocks(&pool.name).await?);
        }
        Ok(claims)
    }

    /// The blocks this node owns, for blackhole routes.
    pub fn owned_blocks(&self) -> Vec<Ipv4Net> {
        self.lock().owned_blocks()
    }

    /// The blocks this node owns with their pools, for routes and the cluster.
    pub fn block_claims(&self) -> Vec<BlockClaim> {
        self.lock().block_claims()
    }

    /// The pool specs, by name.
    pub fn pool_specs(&self) -> Vec<PoolSpec> {
        self.lock().pool_specs().cloned().collect()
    }

    /// Compares the in-memory state with what the store holds; each entry
    /// describes one difference. Empty means consistent.
    ///
    /// Allocate and Release go on meanwhile: the allocator lock is held only
    /// to copy memory, and at the end for a few point reads. The store is
    /// scanned without the lock once what memory held is durable, so a batch
    /// committed during the scan can make an item look different. Each such
    /// item is compared again under the lock, against the store's state as of
    /// the same batch (`Store::probe`), and reported only if it still differs.
    pub async fn check_consistency(&self) -> Result<Vec<String>, IpamError> {
        // Allocate waits on this lock: copy pointers under it, no more.
        let ((allocations, blocks, cooling), seq) = {
            let st = self.lock();
            let mem = (st.shared_allocations(), st.block_claims(), st.cooling());
            (mem, self.store.last_seq())
        };
        // Fails only on a poisoned store, whose queued batches the probe
        // below still sees: compare anyway.
        if let Err(e) = self.store.durable(seq).await {
            debug!(error = %e, "consistency check: store is not durable");
        }
        // Reading and comparing every record is CPU bound: off the async
        // workers, which serve Allocate.
        let store = self.store.clone();
        let compared = tokio::task::spawn_blocking(move || {
            let mem = Holdings::new(allocations, blocks, cooling);
            // One consistent state of memory: this needs no store.
            let mut out: Vec<String> = mem
                .allocations
                .values()
                .filter(|a| !mem.blocks.keys().any(|(_, b)| b.contains(&a.ip)))
                .map(|a| format!("allocation {} lies in no block this node owns", a.ip))
                .collect();
            out.sort();
            let disk = Holdings::of_snapshot(store.scan_written()?);
            Ok::<_, StoreError>((out, mem.differences(&disk)))
        });
        let (mut out, probe) = match compared.await {
            Ok(r) => r?,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return Err(StoreError::Closed.into()),
        };
        if probe == Probe::default() {
            return Ok(out);
        }
        let (mem, disk) = {
            let st = self.lock();
            let now = Holdings::of_memory_items(&st, &probe);
            (now, Holdings::of_snapshot(self.store.probe(&probe)?))
        };
        out.extend(mem.describe_differences(&disk));
        Ok(out)
    }
}

/// What [`Ipam::check_consistency`] compares, as memory or the store holds it.
#[derive(Debug, Default)]
struct Holdings {
    allocations: BTreeMap<AllocKey, Arc<Allocation>>,
    blocks: BTreeMap<(String, Ipv4Net), BlockClaim>,
    cooling: BTreeMap<Ipv4Addr, i64>,
}

impl Holdings {
    fn new(
        allocations: impl IntoIterator<Item = Arc<Allocation>>,
        blocks: Vec<BlockClaim>,
        cooling: Vec<(Ipv4Addr, i64)>,
    ) -> Self {
        Holdings {
            allocations: allocations
                .into_iter()
                .map(|a| (a.key.clone(), a))
                .collect(),
            blocks: blocks
                .into_iter()
                .map(|b| ((b.pool.clone(), b.cidr), b))
                .collect(),
            cooling: cooling.into_iter().collect(),
        }
    }

    /// Memory's view of just the probed items.
    fn of_memory_items(st: &Allocator, p: &Probe) -> Self {
        let wanted: BTreeSet<Ipv4Addr> = p.cooling.iter().copied().collect();
        let cooling = if wanted.is_empty() {
            Vec::new()
        } else {
            let mut all = st.cooling();
            all.retain(|(ip, _)| wanted.contains(ip));
            all
        };
        let mut blocks = st.block_claims();
        blocks.retain(|b| p.blocks.contains(&(b.pool.clone(), b.cidr)));
        Holdings::new(
            p.allocations.iter().filter_map(|k| st.get_shared(k)),
            blocks,
            cooling,
        )
    }

    fn of_snapshot(s: Snapshot) -> Self {
        Holdings::new(s.allocations.into_iter().map(Arc::new), s.blocks, s.cooling)
    }

    /// The items that differ between the two, to look at again.
    fn differences(&self, other: &Holdings) -> Probe {
        fn differ<K: Ord + Clone, V: PartialEq>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> Vec<K> {
            let keys: BTreeSet<&K> = a.keys().chain(b.keys()).collect();
            keys.into_iter()
                .filter(|k| a.get(k) != b.get(k))
                .cloned()
                .collect()
        }
        Probe {
            allocations: differ(&self.allocations, &other.allocations),
            blocks: differ(&self.blocks, &other.blocks),
            cooling: differ(&self.cooling, &other.cooling),
        }
    }

    /// One line per difference, memory being `self`.
    fn describe_differences(&self, disk: &Holdings) -> Vec<String> {
        let describe = |a: &Allocation| {
            format!(
                "{} {}/{}/{}",
                a.ip, a.key.network, a.key.container_id, a.key.ifname
            )
        };
        let mut out = Vec::new();
        for key in self.differences(disk).allocations {
            match (self.allocations.get(&key), disk.allocations.get(&key)) {
                (Some(m), Some(d)) if m.ip == d.ip => out.push(format!(
                    "allocation {} differs between memory and the store",
                    describe(m)
                )),
                (m, d) => {
                    if let Some(m) = m {
                        out.push(format!(
                            "allocation {} is in memory but not in the store",
                            describe(m)
                        ));
                    }
                    if let Some(d) = d {
                        out.push(format!(
                            "allocation {} is in the store but not in memory",
                            describe(d)
                        ));
                    }
                }
            }
        }
        for (pool, cidr) in self.differences(disk).blocks {
            out.push(format!(
                "block {cidr} of pool {pool} differs between memory and the store"
            ));
        }
        for ip in self.differences(disk).cooling {
            let show =
                |t: Option<&i64>| t.map_or("none".to_string(), |t| format!("released at {t}"));
            out.push(format!(
                "cooling entry of {ip} differs between memory ({}) and the store ({})",
                show(self.cooling.get(&ip)),
                show(disk.cooling.get(&ip))
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

    use futures::future::BoxFuture;

    use super::*;
    use crate::cluster::ClusterError;
    use crate::cluster::local::LocalCluster;
    use crate::model::{AddressState, PodMeta};
    use crate::node::scan::VethAddress;
    use crate::store::StoreError;
    use crate::store::memory::MemoryStore;
    use crate::store::sled::SledStore;

    const COOLDOWN_MS: i64 = 30_000;

    fn spec(name: &str, cidr: &str, block: u8, namespaces: &[&str]) -> PoolSpec {
        let namespaces = namespaces.iter().map(|s| s.to_string()).collect();
        PoolSpec {
            // Options on, so that a round trip through the store must keep them.
            nat_outgoing: true,
            ..PoolSpec::new(name, cidr.parse().unwrap(), block, namespaces)
        }
    }

    fn opts(pools: Vec<PoolSpec>) -> IpamOptions {
        IpamOptions {
            node: "node-a".into(),
            pools,
            cooldown: Duration::from_millis(COOLDOWN_MS as u64),
            block_idle_grace: Duration::from_secs(600),
            gc_min_age: Duration::ZERO,
        }
    }

    struct TestClock(Arc<AtomicI64>);

    impl TestClock {
        fn new() -> (Self, Clock) {
            let t = Arc::new(AtomicI64::new(1_700_000_000_000));
            let c = t.clone();
            (TestClock(t), Arc::new(move || c.load(Ordering::SeqCst)))
        }
        fn advance(&self, ms: i64) {
            self.0.fetch_add(ms, Ordering::SeqCst);
        }
    }

    fn params(i: usize) -> AllocateParams {
        AllocateParams {
            key: AllocKey {
                network: "ferry".into(),
                container_id: format!("{i:04x}{}", "f".repeat(60)),
                ifname: "eth0".into(),
            },
            pod: PodMeta {
                namespace: "default".into(),
                name: format!("pod-{i}"),
                uid: format!("uid-{i}"),
                netns: format!("/var/run/netns/cni-{i}"),
            },
            requested_ips: vec![],
            pool_hint: None,
        }
    }

    async fn open_mem(pools: Vec<PoolSpec>) -> (Ipam, Arc<MemoryStore>, TestClock) {
        let store = Arc::new(MemoryStore::new());
        let (tc, clock) = TestClock::new();
        let ipam = Ipam::open_with_clock(opts(pools), store.clone(), Arc::new(LocalCluster), clock)
            .await
            .unwrap();
        (ipam, store, tc)
    }

    /// A core on a real sled store in `dir`, with one small default pool.
    async fn open_sled(dir: &std::path::Path) -> (Ipam, Arc<SledStore>) {
        let store = Arc::new(SledStore::open(dir).unwrap());
        let pools = vec![spec("default", "10.0.0.0/24", 28, &[])];
        let ipam = Ipam::open(opts(pools), store.clone(), Arc::new(LocalCluster))
            .await
            .unwrap();
        (ipam, store)
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn allocate_release_idempotent() {
        let (ipam, store, _tc) = open_mem(vec![spec("default", "10.244.0.0/16", 26, &[])]).await;
        let a = ipam.allocate(params(1)).await.unwrap();
        assert_eq!(a.ip, ip("10.244.0.1"));
        assert_eq!(a.block, "10.244.0.0/26".parse::<Ipv4Net>().unwrap());
        assert_eq!(ipam.allocate(params(1)).await.unwrap(), a);
        let b = ipam.allocate(params(2)).await.unwrap();
        assert_ne!(a.ip, b.ip);
        assert_eq!(ipam.get(&params(1).key), Some(a.clone()));
        assert_eq!(
            ipam.owned_blocks(),
            vec!["10.244.0.0/26".parse::<Ipv4Net>().unwrap()]
        );
        assert_eq!(
            ipam.by_container(&params(1).key.container_id[..12]),
            vec![a.clone()]
        );
        assert!(ipam.by_container("").is_empty());

        assert_eq!(ipam.release(&params(1).key).await.unwrap(), Some(a.clone()));
        assert_eq!(ipam.release(&params(1).key).await.unwrap(), None);
        assert!(matches!(
            ipam.address(a.ip).state,
            AddressState::Cooling { .. }
        ));
        // A new key does not get the cooling address.
        let c = ipam.allocate(params(3)).await.unwrap();
        assert_ne!(c.ip, a.ip);
        assert_eq!(
            ipam.allocations(&AllocationFilter::default())
                .iter()
                .map(|x| x.ip)
                .collect::<Vec<_>>(),
            vec![b.ip, c.ip]
        );
        assert_eq!(
            ipam.release_ip(b.ip).await.unwrap().map(|x| x.key),
            Some(params(2).key)
        );
        assert_eq!(ipam.release_ip(b.ip).await.unwrap(), None);
        assert_eq!(store.ip_index(), vec![(c.ip, params(3).key)]);

        // An operator's release names what it was shown: once the key has
        // moved on to another address, the old listing releases nothing.
        let shown = c.clone();
        ipam.release(&params(3).key).await.unwrap();
        let next = ipam.allocate(params(3)).await.unwrap();
        assert_ne!(next.ip, shown.ip);
        assert_eq!(ipam.release_exact(&shown).await.unwrap(), None);
        assert_eq!(ipam.release_ip(shown.ip).await.unwrap(), None);
        assert_eq!(ipam.get(&params(3).key), Some(next.clone()));
        assert_eq!(ipam.release_exact(&next).await.unwrap(), Some(next));
        assert!(ipam.check_consistency().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn exhaustion_cooldown_and_readiness() {
        let (ipam, _store, tc) = open_mem(vec![spec("default", "10.0.0.0/29", 30, &[])]).await;
        assert_eq!(ipam.readiness().0, Readiness::Ready);
        let mut held = Vec::new();
        for i in 0..6 {
            held.push(ipam.allocate(params(i)).await.unwrap().ip);
        }
        assert_eq!(ipam.owned_blocks().len(), 2);
        let err = ipam.allocate(params(6)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "pool default (10.0.0.0/29, 6 usable addresses) is exhausted: 6 allocated, 0 cooling down"
        );
        let (r, why) = ipam.readiness();
        assert_eq!(r, Readiness::NoAddresses);
        assert!(why.contains("pool default"), "{why}");

        ipam.release(&params(2).key).await.unwrap();
        tc.advance(1);
        ipam.release(&params(0).key).await.unwrap();
        let err = ipam.allocate(params(6)).await.unwrap_err();
        assert!(
            err.to_string().ends_with("4 allocated, 2 cooling down"),
            "{err}"
        );
        tc.advance(COOLDOWN_MS - 2);
        assert!(ipam.allocate(params(6)).await.is_err());
        tc.advance(1);
        assert_eq!(ipam.readiness().0, Readiness::Ready);
        // FIFO: .3 was released first, and .1 is not cooled down yet.
        assert_eq!(ipam.allocate(params(6)).await.unwrap().ip, held[2]);
        assert!(matches!(
            ipam.allocate(params(7)).await,
            Err(IpamError::Exhausted { .. })
        ));
        tc.advance(1);
        assert_eq!(ipam.allocate(params(7)).await.unwrap().ip, held[0]);
        let usage = ipam.pools();
        assert_eq!(
            (usage[0].size, usage[0].allocated, usage[0].blocks),
            (6, 6, 2)
        );
    }

    #[tokio::test]
    async fn pool_selection_through_the_core() {
        let (ipam, _store, _tc) = open_mem(vec![
            spec("default", "10.244.0.0/16", 26, &[]),
            spec("team-a", "10.50.0.0/24", 28, &["team-a"]),
        ])
        .await;
        let mut p = params(1);
        p.pod.namespace = "team-a".into();
        assert_eq!(ipam.allocate(p).await.unwrap().pool, "team-a");
        let mut p = params(2);
        p.pool_hint = Some("team-a".into());
        assert_eq!(ipam.allocate(p).await.unwrap().ip, ip("10.50.0.2"));
        let mut p = params(3);
        p.pool_hint = Some("nope".into());
        assert!(matches!(
            ipam.allocate(p).await,
            Err(IpamError::UnknownPool(_))
        ));
        let mut p = params(4);
        p.requested_ips = vec![ip("10.244.7.9")];
        let a = ipam.allocate(p).await.unwrap();
        assert_eq!(
            (a.ip, a.block),
            (ip("10.244.7.9"), "10.244.7.0/26".parse().unwrap())
        );
        let mut p = params(5);
        p.requested_ips = vec![ip("10.244.7.9")];
        assert!(matches!(
            ipam.allocate(p).await,
            Err(IpamError::AddressUnavailable { reason, .. }) if reason.contains("allocated to container")
        ));
        assert_eq!(ipam.blocks(Some("team-a")).len(), 1);
        assert_eq!(ipam.blocks(None).len(), 2);
    }

    #[tokio::test]
    async fn add_pool_adopts_what_live_veths_hold_in_it() {
        let (ipam, store, _tc) = open_mem(vec![spec("default", "10.244.0.0/16", 26, &[])]).await;
        let live = [
            VethAddress {
                link: "fry00000000001".into(),
                ip: ip("10.1.0.1"),
            },
            VethAddress {
                link: "fry00000000002".into(),
                ip: ip("10.1.0.70"),
            },
            // In another pool: not this call's business.
            VethAddress {
                link: "fry00000000003".into(),
                ip: ip("10.244.0.9"),
            },
        ];
        let (_, adopted) = ipam
            .add_pool(spec("x", "10.1.0.0/24", 26, &["x"]), &live)
            .await
            .unwrap();
        let adopted: Vec<(AllocKey, Ipv4Addr)> =
            adopted.into_iter().map(|a| (a.key, a.ip)).collect();
        assert_eq!(
            adopted,
            vec![
                (AllocKey::adopted("fry00000000001"), ip("10.1.0.1")),
                (AllocKey::adopted("fry00000000002"), ip("10.1.0.70")),
            ]
        );
        assert_eq!(ipam.blocks(Some("x")).len(), 2);
        // Durable with the pool: a restart keeps them.
        let snap = store.load().unwrap();
        assert_eq!(snap.allocations.iter().filter(|a| a.pool == "x").count(), 2);
        // New pods in the pool get the addresses nobody holds.
        let mut p = params(1);
        p.pool_hint = Some("x".into());
        assert_eq!(ipam.allocate(p).await.unwrap().ip, ip("10.1.0.2"));
        assert!(ipam.check_consistency().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_fresh_hold_refuses_new_addresses_but_not_retries() {
        let (ipam, _store, tc) = open_mem(vec![spec("default", "10.244.0.0/24", 28, &[])]).await;
        let held = ipam.allocate(params(1)).await.unwrap();
        let now = tc.0.load(Ordering::SeqCst);
        let until = UNIX_EPOCH + Duration::from_millis((now + 30_000) as u64);
        ipam.hold_fresh_until(until, "the database was rebuilt".into());
        match ipam.allocate(params(2)).await {
            Err(IpamError::Held {
                remaining_secs,
                reason,
            }) => {
                assert_eq!(remaining_secs, 30);
                assert_eq!(reason, "the database was rebuilt");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ipam.allocate(params(1)).await.unwrap(), held);
        let (r, why) = ipam.readiness();
        assert_eq!(r, Readiness::NotAvailable);
        assert!(why.contains("held for another 30 s"), "{why}");
        tc.advance(30_000);
        ipam.allocate(params(2)).await.unwrap();
        assert_eq!(ipam.readiness().0, Readiness::Ready);
    }

    #[tokio::test]
    async fn pool_admin() {
        let (ipam, _store, _tc) = open_mem(vec![spec("default", "10.244.0.0/16", 26, &[])]).await;
        assert!(matches!(
            ipam.add_pool(spec("", "10.1.0.0/24", 26, &["x"]), &[])
                .await,
            Err(IpamError::InvalidArgument(_))
        ));
        assert!(matches!(
            ipam.add_pool(spec("x", "10.1.0.0/24", 23, &["x"]), &[])
                .await,
            Err(IpamError::InvalidArgument(_))
        ));
        assert!(matches!(
            ipam.add_pool(spec("x", "10.244.128.0/24", 26, &["x"]), &[])
                .await,
            Err(IpamError::InvalidArgument(_))
        ));
        assert!(matches!(
            ipam.add_pool(spec("x", "10.1.0.0/24", 26, &[]), &[]).await,
            Err(IpamError::Conflict(_))
        ));
        ipam.add_pool(spec("x", "10.1.0.0/24", 26, &["x"]), &[])
            .await
            .unwrap();
        let mut p = params(1);
        p.pool_hint = Some("x".into());
        let a = ipam.allocate(p).await.unwrap();
        assert!(matches!(
            ipam.remove_pool("x").await,
            Err(IpamError::Conflict(_))
        ));
        assert!(matches!(
            ipam.remove_pool("default").await,
            Err(IpamError::Conflict(_))
        ));
        assert!(matches!(
            ipam.remove_pool("y").await,
            Err(IpamError::NotFound(_))
        ));
        ipam.release(&a.key).await.unwrap();
        ipam.remove_pool("x").await.unwrap();
        assert_eq!(ipam.pools().len(), 1);
        assert!(ipam.owned_blocks().is_empty());
    }

    #[tokio::test]
    async fn idle_blocks_go_back_but_one_stays() {
        let (ipam, _store, tc) = open_mem(vec![spec("default", "10.0.0.0/24", 30, &[])]).await;
        // Blocks of 3, 4 and 4 usable addresses.
        for i in 0..8 {
            ipam.allocate(params(i)).await.unwrap();
        }
        assert_eq!(ipam.owned_blocks().len(), 3);
        for i in 0..8 {
            ipam.release(&params(i).key).await.unwrap();
        }
        assert!(ipam.release_idle_blocks().await.unwrap().is_empty());
        tc.advance(600_000);
        let gone = ipam.release_idle_blocks().await.unwrap();
        assert_eq!(gone.len(), 2);
        assert_eq!(
            ipam.owned_blocks(),
            vec!["10.0.0.0/30".parse::<Ipv4Net>().unwrap()]
        );
        assert!(ipam.check_consistency().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn failed_store_write_changes_nothing() {
        let (ipam, store, _tc) = open_mem(vec![spec("default", "10.0.0.0/24", 28, &[])]).await;
        let a = ipam.allocate(params(1)).await.unwrap();
        store.fail_applies(true);
        assert!(matches!(
            ipam.allocate(params(2)).await,
            Err(IpamError::Store(_))
        ));
        assert!(matches!(
            ipam.release(&a.key).await,
            Err(IpamError::Store(_))
        ));
        store.fail_applies(false);
        assert_eq!(
            ipam.allocations(&AllocationFilter::default()),
            vec![a.clone()]
        );
        assert!(ipam.check_consistency().await.unwrap().is_empty());
        assert_ne!(ipam.allocate(params(2)).await.unwrap().ip, a.ip);
    }

    #[tokio::test]
    async fn release_if_idle_respects_activity_and_identity() {
        let (ipam, _store, tc) = open_mem(vec![spec("default", "10.0.0.0/24", 28, &[])]).await;
        let a = ipam.allocate(params(1)).await.unwrap();
        // Reconcile's first missing look, then a retried ADD of the same key.
        tc.advance(400_000);
        let first_look = tc.0.load(Ordering::SeqCst);
        tc.advance(1_000);
        assert_eq!(ipam.allocate(params(1)).await.unwrap(), a);
        assert_eq!(ipam.release_if_idle(&a, first_look).await.unwrap(), None);
        assert_eq!(ipam.get(&a.key), Some(a.clone()));
        // A CHECK is activity too; get() is not.
        tc.advance(1_000);
        let later_look = tc.0.load(Ordering::SeqCst);
        assert_eq!(ipam.check(&a.key), Some(a.clone()));
        assert_eq!(ipam.release_if_idle(&a, later_look).await.unwrap(), None);
        tc.advance(1);
        let idle_since = tc.0.load(Ordering::SeqCst);
        ipam.get(&a.key);
        tc.advance(1);
        // Not the allocation that was watched: same key, another address.
        let mut other = a.clone();
        other.ip = ip("10.0.0.9");
        assert_eq!(
            ipam.release_if_idle(&other, idle_since).await.unwrap(),
            None
        );
        let mut older = a.clone();
        older.created_unix_ms -= 1;
        assert_eq!(
            ipam.release_if_idle(&older, idle_since).await.unwrap(),
            None
        );
        // Untouched since the look and still the same allocation: released.
        assert_eq!(
            ipam.release_if_idle(&a, idle_since).await.unwrap(),
            Some(a.clone())
        );
        assert_eq!(ipam.get(&a.key), None);
        assert!(ipam.activity.lock().unwrap().is_empty());
        assert!(ipam.check_consistency().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn activity_is_reported_and_forgotten_with_the_allocation() {
        let (ipam, _store, tc) = open_mem(vec![spec("default", "10.0.0.0/24", 28, &[])]).await;
        let t0 = tc.0.load(Ordering::SeqCst);
        ipam.allocate(params(1)).await.unwrap();
        ipam.allocate(params(2)).await.unwrap();
        tc.advance(5);
        ipam.allocate(params(2)).await.unwrap();
        let activity: HashMap<AllocKey, Option<i64>> = ipam
            .allocations_with_activity()
            .into_iter()
            .map(|(a, t)| (a.key.clone(), t))
            .collect();
        assert_eq!(activity.len(), 2);
        assert_eq!(activity[&params(1).key], Some(t0));
        assert_eq!(activity[&params(2).key], Some(t0 + 5));
        ipam.release(&params(1).key).await.unwrap();
        ipam.gc("ferry", &[]).await.unwrap();
        assert!(ipam.activity.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn gc_spares_what_was_created_or_used_within_the_grace() {
        let store = Arc::new(MemoryStore::new());
        let (tc, clock) = TestClock::new();
        let options = IpamOptions {
            gc_min_age: Duration::from_secs(10),
            ..opts(vec![spec("default", "10.0.0.0/24", 28, &[])])
        };
        let ipam = Ipam::open_with_clock(options, store, Arc::new(LocalCluster), clock)
            .await
            .unwrap();
        let old = ipam.allocate(params(1)).await.unwrap();
        let reused = ipam.allocate(params(2)).await.unwrap();
        tc.advance(9_000);
        // A retried ADD of params(2) counts as use.
        ipam.allocate(params(2)).await.unwrap();
        tc.advance(2_000);
        let fresh = ipam.allocate(params(3)).await.unwrap();
        // The runtime listed nothing as valid: only params(1) is old enough.
        let gone = ipam.gc("ferry", &[]).await.unwrap();
        assert_eq!(gone, vec![old]);
        assert_eq!(ipam.get(&params(2).key), Some(reused.clone()));
        assert_eq!(ipam.get(&params(3).key), Some(fresh.clone()));
        tc.advance(10_000);
        let gone = ipam.gc("ferry", &[]).await.unwrap();
        assert_eq!(gone, vec![reused, fresh]);
    }

    #[tokio::test]
    async fn poisoned_store_makes_ipamd_not_available() {
        let (ipam, store, _tc) = open_mem(vec![spec("default", "10.0.0.0/24", 28, &[])]).await;
        let a = ipam.allocate(params(1)).await.unwrap();
        assert_eq!(ipam.readiness().0, Readiness::Ready);
        store.poison(true);
        let (r, why) = ipam.readiness();
        assert_eq!(r, Readiness::NotAvailable);
        assert!(why.contains("injected fdatasync failure"), "{why}");
        assert_eq!(ipam.summary().readiness, Readiness::NotAvailable);
        assert!(matches!(
            ipam.allocate(params(2)).await,
            Err(IpamError::Store(_))
        ));
        assert!(matches!(
            ipam.allocate(params(1)).await,
            Err(IpamError::Store(_))
        ));
        // Nothing is held in memory for the failed Allocate.
        assert_eq!(ipam.allocations(&AllocationFilter::default()), vec![a]);
        assert!(ipam.check_consistency().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn failed_fdatasync_stops_sled_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (ipam, store) = open_sled(dir.path()).await;
        ipam.allocate(params(1)).await.unwrap();
        store.fail_next_flush();
        assert!(matches!(
            ipam.allocate(params(2)).await,
            Err(IpamError::Store(_))
        ));
        assert_eq!(ipam.readiness().0, Readiness::NotAvailable);
        // The store refuses before writing, so memory does not move either.
        assert!(matches!(
            ipam.allocate(params(3)).await,
            Err(IpamError::Store(_))
        ));
        assert!(matches!(
            ipam.release(&params(1).key).await,
            Err(IpamError::Store(_))
        ));
        assert!(ipam.get(&params(3).key).is_none());
        assert!(ipam.get(&params(1).key).is_some());
        assert_eq!(ipam.summary().allocations, 2);
        assert!(ipam.check_consistency().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn summary_counts_match_the_listings() {
        let (ipam, _store, _tc) = open_mem(vec![
            spec("default", "10.0.0.0/24", 30, &[]),
            spec("blue", "10.1.0.0/24", 28, &["blue"]),
        ])
        .await;
        for i in 0..5 {
            ipam.allocate(params(i)).await.unwrap();
        }
        let s = ipam.summary();
        assert_eq!(
            s,
            Summary {
                readiness: Readiness::Ready,
                reason: String::new(),
                allocations: 5,
                pools: 2,
                blocks: 2,
            }
        );
        assert_eq!(s.blocks, ipam.blocks(None).len());
        assert_eq!(s.pools, ipam.pools().len());
    }

    /// A cluster that refuses the first block given back.
    #[derive(Default)]
    struct FlakyRelease {
        released: Mutex<Vec<Ipv4Net>>,
    }

    impl ClusterStore for FlakyRelease {
        fn claim_block<'a>(
            &'a self,
            _pool: &'a str,
            _cidr: Ipv4Net,
            _node: &'a str,
        ) -> BoxFuture<'a, Result<bool, ClusterError>> {
            Box::pin(async { Ok(true) })
        }
        fn release_block<'a>(
            &'a self,
            _pool: &'a str,
            cidr: Ipv4Net,
            _node: &'a str,
        ) -> BoxFuture<'a, Result<(), ClusterError>> {
            let mut released = self.released.lock().unwrap();
            released.push(cidr);
            let r = if released.len() == 1 {
                Err(ClusterError::Unavailable("no quorum".into()))
            } else {
                Ok(())
            };
            Box::pin(async move { r })
        }
        fn foreign_blocks<'a>(
            &'a self,
            _pool: &'a str,
        ) -> BoxFuture<'a, Result<Vec<BlockClaim>, ClusterError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
    }

    #[tokio::test]
    async fn idle_block_release_goes_on_after_a_cluster_error() {
        let cluster = Arc::new(FlakyRelease::default());
        let (tc, clock) = TestClock::new();
        let ipam = Ipam::open_with_clock(
            opts(vec![spec("default", "10.0.0.0/24", 30, &[])]),
            Arc::new(MemoryStore::new()),
            cluster.clone(),
            clock,
        )
        .await
        .unwrap();
        for i in 0..8 {
            ipam.allocate(params(i)).await.unwrap();
        }
        for i in 0..8 {
            ipam.release(&params(i).key).await.unwrap();
        }
        tc.advance(600_000);
        let gone = ipam.release_idle_blocks().await.unwrap();
        assert_eq!(gone.len(), 2);
        // Both were offered to the cluster, although the first was refused.
        assert_eq!(*cluster.released.lock().unwrap(), gone);
        assert_eq!(ipam.owned_blocks().len(), 1);
        assert!(ipam.check_consistency().await.unwrap().is_empty());
    }

    /// A cluster in which another node owns some blocks and races us for
    /// others.
    struct Contested {
        foreign: Vec<BlockClaim>,
        lose: Vec<Ipv4Net>,
        down: bool,
    }

    impl ClusterStore for Contested {
        fn claim_block<'a>(
            &'a self,
            _pool: &'a str,
            cidr: Ipv4Net,
            _node: &'a str,
        ) -> BoxFuture<'a, Result<bool, ClusterError>> {
            let r = if self.down {
                Err(ClusterError::Unavailable("no quorum".into()))
            } else {
                Ok(!self.lose.contains(&cidr))
            };
            Box::pin(async move { r })
        }
        fn release_block<'a>(
            &'a self,
            _pool: &'a str,
            _cidr: Ipv4Net,
            _node: &'a str,
        ) -> BoxFuture<'a, Result<(), ClusterError>> {
            Box::pin(async { Ok(()) })
        }
        fn foreign_blocks<'a>(
            &'a self,
            _pool: &'a str,
        ) -> BoxFuture<'a, Result<Vec<BlockClaim>, ClusterError>> {
            let r = self.foreign.clone();
            Box::pin(async move { Ok(r) })
        }
    }

    #[tokio::test]
    async fn never_uses_other_nodes_blocks() {
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let cluster = Arc::new(Contested {
            foreign: vec![BlockClaim {
                pool: "default".into(),
                cidr: net("10.0.0.0/28"),
                node: "node-b".into(),
                claimed_unix_ms: 0,
            }],
            lose: vec![net("10.0.0.16/28")],
            down: false,
        });
        let (_tc, clock) = TestClock::new();
        let ipam = Ipam::open_with_clock(
            opts(vec![spec("default", "10.0.0.0/24", 28, &[])]),
            Arc::new(MemoryStore::new()),
            cluster,
            clock,
        )
        .await
        .unwrap();
        let a = ipam.allocate(params(1)).await.unwrap();
        assert_eq!(a.block, net("10.0.0.32/28"));
        let mut p = params(2);
        p.requested_ips = vec![ip("10.0.0.5")];
        assert!(matches!(
            ipam.allocate(p).await,
            Err(IpamError::AddressUnavailable { reason, .. }) if reason.contains("node-b")
        ));
        let mut p = params(3);
        p.requested_ips = vec![ip("10.0.0.20")];
        assert!(matches!(
            ipam.allocate(p).await,
            Err(IpamError::AddressUnavailable { .. })
        ));

        // Cluster down: owned blocks still serve, a new claim fails as Cluster.
        let (_tc, clock) = TestClock::new();
        let down = Arc::new(Contested {
            foreign: vec![],
            lose: vec![],
            down: true,
        });
        let ipam = Ipam::open_with_clock(
            opts(vec![spec("default", "10.0.0.0/24", 28, &[])]),
            Arc::new(MemoryStore::new()),
            down,
            clock,
        )
        .await
        .unwrap();
        assert!(matches!(
            ipam.allocate(params(1)).await,
            Err(IpamError::Cluster(_))
        ));
    }

    #[tokio::test]
    async fn open_validates_pools() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let cluster: Arc<dyn ClusterStore> = Arc::new(LocalCluster);
        let bad = [
            vec![
                spec("default", "10.0.0.0/16", 26, &[]),
                spec("b", "10.0.1.0/24", 26, &["b"]),
            ],
            vec![
                spec("default", "10.0.0.0/16", 26, &[]),
                spec("b", "10.1.0.0/16", 26, &[]),
            ],
            vec![spec("b", "10.1.0.0/16", 26, &["b"])],
            vec![spec("default", "10.0.0.0/16", 12, &[])],
        ];
        for pools in bad {
            assert!(
                Ipam::open(opts(pools.clone()), store.clone(), cluster.clone())
                    .await
                    .is_err(),
                "{pools:?} accepted"
            );
        }
        assert!(store.load().unwrap().pools.is_empty());
    }

    #[tokio::test]
    async fn state_survives_reopen_of_sled() {
        let dir = tempfile::tempdir().unwrap();
        let (tc, clock) = TestClock::new();
        let pools = vec![
            spec("default", "10.244.0.0/16", 26, &[]),
            spec("blue", "10.50.0.0/24", 28, &["blue"]),
        ];
        let (before_allocs, before_blocks, before_pools, released) = {
            let store = Arc::new(SledStore::open(dir.path()).unwrap());
            let ipam = Ipam::open_with_clock(
                opts(pools.clone()),
                store,
                Arc::new(LocalCluster),
                clock.clone(),
            )
            .await
            .unwrap();
            for i in 0..20 {
                let mut p = params(i);
                if i % 3 == 0 {
                    p.pod.namespace = "blue".into();
                }
                ipam.allocate(p).await.unwrap();
            }
            let released = ipam.release(&params(4).key).await.unwrap().unwrap();
            ipam.release(&params(9).key).await.unwrap();
            (
                ipam.allocations(&AllocationFilter::default()),
                ipam.blocks(None),
                ipam.pools(),
                released,
            )
        };
        // Reopen without the "blue" pool in the configuration: it still
        // holds allocations, so it is kept, as a run-time pool.
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        let ipam = Ipam::open_with_clock(
            opts(pools[..1].to_vec()),
            store.clone(),
            Arc::new(LocalCluster),
            clock,
        )
        .await
        .unwrap();
        assert_eq!(
            ipam.allocations(&AllocationFilter::default()),
            before_allocs
        );
        assert_eq!(ipam.blocks(None), before_blocks);
        let mut expected_pools = before_pools;
        for usage in &mut expected_pools {
            usage.pool.runtime = usage.pool.name == "blue";
        }
        assert_eq!(ipam.pools(), expected_pools);
        assert!(ipam.check_consistency().await.unwrap().is_empty());
        // The cooldown survived the restart.
        let mut p = params(100);
        p.requested_ips = vec![released.ip];
        assert!(matches!(
            ipam.allocate(p.clone()).await,
            Err(IpamError::AddressUnavailable { reason, .. }) if reason.contains("cooling")
        ));
        tc.advance(COOLDOWN_MS);
        assert_eq!(ipam.allocate(p).await.unwrap().ip, released.ip);
        // Idempotency across the restart.
        let one = before_allocs
            .iter()
            .find(|a| a.key == params(1).key)
            .unwrap();
        assert_eq!(&ipam.allocate(params(1)).await.unwrap(), one);
        let index: HashSet<Ipv4Addr> = store
            .ip_index()
            .unwrap()
            .into_iter()
            .map(|(ip, _)| ip)
            .collect();
        assert_eq!(index.len(), 19);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_allocations_on_sled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        let ipam = Arc::new(
            Ipam::open(
                opts(vec![spec("default", "10.244.0.0/22", 28, &[])]),
                store.clone(),
                Arc::new(LocalCluster),
            )
            .await
            .unwrap(),
        );
        let mut tasks = Vec::new();
        for i in 0..200 {
            let ipam = ipam.clone();
            tasks.push(tokio::spawn(async move {
                // Every key twice, concurrently: both must get the same answer.
                let (a, b) = tokio::join!(ipam.allocate(params(i)), ipam.allocate(params(i)));
                let (a, b) = (a.unwrap(), b.unwrap());
                assert_eq!(a, b);
                a
            }));
        }
        let mut ips = HashSet::new();
        for t in tasks {
            assert!(ips.insert(t.await.unwrap().ip));
        }
        // 200 addresses in /28 blocks (16 each) need exactly 13 blocks:
        // no block was claimed that was not needed.
        assert_eq!(ipam.owned_blocks().len(), 13);
        assert!(ipam.check_consistency().await.unwrap().is_empty());
        drop(ipam);
        assert!(Arc::strong_count(&store) == 1);
        let snap = store.load().unwrap();
        assert_eq!(snap.allocations.len(), 200);
    }

    /// Allocates and releases from 8 tasks until told to stop; cooldown 0,
    /// so addresses also move from key to key while the checks run.
    fn churn(ipam: &Arc<Ipam>, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<usize>> {
        (0..8)
            .map(|w| {
                let (ipam, stop) = (ipam.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) {
                        ipam.allocate(params(w * 100 + n % 8)).await.unwrap();
                        ipam.release(&params(w * 100 + (n + 4) % 8).key)
                            .await
                            .unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect()
    }

    async fn check_stays_clean_under_churn(store: Arc<dyn Store>) {
        let ipam = Arc::new(
            Ipam::open(
                IpamOptions {
                    cooldown: Duration::ZERO,
                    ..opts(vec![spec("default", "10.244.0.0/22", 28, &[])])
                },
                store,
                Arc::new(LocalCluster),
            )
            .await
            .unwrap(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let workers = churn(&ipam, &stop);
        for i in 0..200 {
            let diffs = ipam.check_consistency().await.unwrap();
            assert!(diffs.is_empty(), "check {i} under churn: {diffs:?}");
        }
        stop.store(true, Ordering::SeqCst);
        let mut rounds = 0;
        for w in workers {
            rounds += w.await.unwrap();
        }
        assert!(rounds > 0, "the checks ran without any churn");
        assert!(ipam.check_consistency().await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn check_reports_nothing_under_concurrent_changes_on_sled() {
        let dir = tempfile::tempdir().unwrap();
        check_stays_clean_under_churn(Arc::new(SledStore::open(dir.path()).unwrap())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn check_reports_nothing_under_concurrent_changes_in_memory() {
        check_stays_clean_under_churn(Arc::new(MemoryStore::new())).await;
    }

    /// What the store holds behind the core's back is reported, item by item.
    #[tokio::test]
    async fn check_reports_real_differences() {
        let dir = tempfile::tempdir().unwrap();
        let (ipam, store) = open_sled(dir.path()).await;
        let a = ipam.allocate(params(1)).await.unwrap();
        let b = ipam.allocate(params(2)).await.unwrap();
        let stray = Allocation {
            key: params(3).key,
            ip: ip("10.0.0.9"),
            ..a.clone()
        };
        let seq = store
            .apply(&[
                Mutation::PutAllocation(stray),
                Mutation::DeleteAllocation {
                    key: b.key.clone(),
                    ip: b.ip,
                },
                Mutation::PutCooling {
                    ip: ip("10.0.0.12"),
                    released_unix_ms: 5,
                },
            ])
            .unwrap();
        let mut diffs = ipam.check_consistency().await.unwrap();
        diffs.sort();
        let id = |i: usize| params(i).key.container_id;
        assert_eq!(
            diffs,
            vec![
                format!(
                    "allocation 10.0.0.2 ferry/{}/eth0 is in memory but not in the store",
                    id(2)
                ),
                format!(
                    "allocation 10.0.0.9 ferry/{}/eth0 is in the store but not in memory",
                    id(3)
                ),
                "cooling entry of 10.0.0.12 differs between memory (none) and the store \
                 (released at 5)"
                    .to_string(),
            ]
        );
        // The same once the batch is written and durable.
        store.durable(seq).await.unwrap();
        let mut again = ipam.check_consistency().await.unwrap();
        again.sort();
        assert_eq!(again, diffs);
    }

    #[test]
    fn store_error_is_reported() {
        let e = IpamError::from(StoreError::Closed);
        assert_eq!(e.to_string(), "store: store is closed");
    }
}
