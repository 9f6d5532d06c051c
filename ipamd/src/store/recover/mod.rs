//! Opening the state database, and rebuilding it when it is damaged.
//!
//! A corrupt, truncated or overwritten database must not crash-loop ipamd,
//! nor be silently replaced by an empty one (which would hand out addresses
//! that live pods hold). So when opening fails because the database itself
//! is damaged ([`StoreError::is_damage`]), ipamd:
//!
//! 1. lists the node's live pod addresses from the host side (every `fry*`
//!    host veth carries a `IP/32 dev fryX scope link` route; see
//!    [`crate::node::scan`]) - before touching anything, so that a failed
//!    scan leaves the damaged database where it was;
//! 2. moves the database aside to `<state-dir>/db.corrupt-<unix-seconds>`;
//! 3. starts a fresh one and adopts every listed address: it claims the
//!    block holding it (in the configured pool whose CIDR contains it) and
//!    records an allocation under [`AllocKey::adopted`]`(<fry link>)`;
//! 4. says so: an error-level log line naming the moved path and the
//!    number of adopted addresses, and the same text as the readiness
//!    reason (`ipamctl status`, CNI STATUS stays a success) until restart.
//!
//! Errors that are not damage (permissions, a full disk, a held lock) still
//! stop ipamd: moving the database aside would not fix them.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ipnet::Ipv4Net;
use tracing::error;

use crate::cluster::{ClusterError, ClusterStore};
use crate::ipam::IpamOptions;
use crate::model::{AllocKey, Allocation, BlockClaim, PodMeta, PoolSpec};
use crate::node::scan::VethAddress;
use crate::node::{HostLinks, NodeError};
use crate::store::sled::SledStore;
use crate::store::{Mutation, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the state database is damaged ({cause}), and listing the host veths to rebuild it failed: {source}"
    )]
    Scan {
        cause: String,
        #[source]
        source: NodeError,
    },
    #[error(
        "the state database is damaged ({cause}), and claiming block {block} to rebuild it failed: {source}"
    )]
    Claim {
        cause: String,
        block: Ipv4Net,
        #[source]
        source: ClusterError,
    },
}

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuild {
    /// Why the old database was not used.
    pub cause: String,
    /// Where the old database now is.
    pub moved_to: PathBuf,
    pub adopted: Vec<Allocation>,
    /// Live addresses not adopted, and why.
    pub skipped: Vec<(VethAddress, String)>,
}

impl Rebuild {
    /// The operator-facing summary, logged and used as readiness reason.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "state database was damaged ({}); moved it to {} and rebuilt it from the \
             host: adopted {} address(es) of live fry* veths",
            self.cause,
            self.moved_to.display(),
            self.adopted.len()
        );
        if !self.skipped.is_empty() {
            let what: Vec<String> = self
                .skipped
                .iter()
                .map(|(v, why)| format!("{} on {}: {why}", v.ip, v.link))
                .collect();
            s.push_str(&format!("; NOT adopted: {}", what.join(", ")));
        }
        s
    }
}

/// Opens `state_dir/db`; rebuilds it from the host veths when it is
/// damaged (see the module docs). The second value says what a rebuild did.
pub async fn open_store(
    state_dir: &Path,
    opts: &IpamOptions,
    cluster: &dyn ClusterStore,
    host: &dyn HostLinks,
) -> Result<(SledStore, Option<Rebuild>), RecoverError> {
    let cause = match open_checked(state_dir) {
        Ok(store) => return Ok((store, None)),
        Err(e) if e.is_damage() => e.to_string(),
        Err(e) => return Err(e.into()),
    };
    error!(state_dir = %state_dir.display(), error = %cause,
        "the state database is damaged; rebuilding it from the host veths");
    let live = host
        .veth_addresses()
        .await
        .map_err(|source| RecoverError::Scan {
            cause: cause.clone(),
            source,
        })?;
    let now = SystemTime::now();
    let now_ms = crate::clock::unix_ms(now);
    let mut plan = plan_adoption(&opts.pools, &opts.node, &live, now_ms);
    // Claimed first: a block another node owns is not ours to fill.
    let mut refused: HashSet<Ipv4Net> = HashSet::new();
    for b in plan.blocks() {
        match cluster.claim_block(&b.pool, b.cidr, &opts.node).await {
            Ok(true) => {}
            Ok(false) => {
                refused.insert(b.cidr);
            }
            Err(source) => {
                return Err(RecoverError::Claim {
                    cause,
                    block: b.cidr,
                    source,
                });
            }
        }
    }
    plan.drop_blocks(&refused);

    let moved_to = SledStore::move_aside(state_dir, now)?;
    let store = SledStore::open(state_dir)?;
    let seq = store.apply(&plan.mutations(&opts.pools))?;
    store.durable(seq).await?;
    let rebuild = Rebuild {
        cause,
        moved_to,
        adopted: plan.adopted,
        skipped: plan.skipped,
    };
    let summary = rebuild.summary();
    error!(moved_to = %rebuild.moved_to.display(), adopted = rebuild.adopted.len(),
        skipped = rebuild.skipped.len(), "{summary}");
    store.set_notice(summary);
    Ok((store, Some(rebuild)))
}

/// When the database was last rebuilt: the newest `db.corrupt-<unix
/// seconds>[-N]` beside it. The cooldowns of addresses freed before then
/// were lost with the old database.
pub fn last_rebuild(state_dir: &Path) -> Option<SystemTime> {
    let entries = std::fs::read_dir(state_dir).ok()?;
    entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            crate::store::sled::moved_aside_at(&name)
        })
        .max()
}

/// Until when new addresses must wait after the last rebuild, and why:
/// an address freed just before it may have been cooling down. None once
/// `cooldown` has passed since (the name holds whole seconds: one more is
/// added). A name in the future (the clock was ahead then) counts as now,
/// so a corrected clock cannot stretch the hold.
pub fn fresh_hold(
    state_dir: &Path,
    cooldown: std::time::Duration,
    now: SystemTime,
) -> Option<(SystemTime, String)> {
    let rebuilt = last_rebuild(state_dir)?.min(now);
    let until = rebuilt + cooldown + std::time::Duration::from_secs(1);
    let secs = rebuilt
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (until > now).then(|| {
        (
            until,
            format!(
                "the state database was rebuilt at unix time {secs} (see db.corrupt-{secs}* in \
                 {}), and which freed addresses were still in their {} s cooldown was lost",
                state_dir.display(),
                cooldown.as_secs()
            ),
        )
    })
}

/// Opens and fully reads the store, so that damage anywhere shows now. A
/// panic inside sled on garbage counts as damage too.
fn open_checked(state_dir: &Path) -> Result<SledStore, StoreError> {
    let opened = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let store = SledStore::open(state_dir)?;
        store.load()?;
        Ok(store)
    }));
    opened.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(StoreError::Corrupt {
            key: state_dir.join("db").display().to_string(),
            reason: format!("sled panicked while opening it: {what}"),
        })
    })
}

/// The adoption of live addresses: into an empty database, or into a pool
/// added at run time (see [`crate::ipam::Ipam::add_pool`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    claims: BTreeMap<Ipv4Net, BlockClaim>,
    pub(crate) adopted: Vec<Allocation>,
    pub(crate) skipped: Vec<(VethAddress, String)>,
}

impl Plan {
    pub(crate) fn blocks(&self) -> Vec<BlockClaim> {
        self.claims.values().cloned().collect()
    }

    /// Forgets blocks another node owns, and the addresses in them.
    pub(crate) fn drop_blocks(&mut self, refused: &HashSet<Ipv4Net>) {
        if refused.is_empty() {
            return;
        }
        self.claims.retain(|cidr, _| !refused.contains(cidr));
        let (keep, gone): (Vec<Allocation>, Vec<Allocation>) = std::mem::take(&mut self.adopted)
            .into_iter()
            .partition(|a| !refused.contains(&a.block));
        self.adopted = keep;
        for a in gone {
            self.skipped.push((
                VethAddress {
                    link: a.key.host_veth(),
                    ip: a.ip,
                },
                format!("block {} belongs to another node", a.block),
            ));
        }
    }

    /// One batch: the configured pools, the claimed blocks, the adopted
    /// allocations.
    fn mutations(&self, pools: &[PoolSpec]) -> Vec<Mutation> {
        let mut m: Vec<Mutation> = pools.iter().cloned().map(Mutation::PutPool).collect();
        m.extend(self.adoptions());
        m
    }

    /// The claimed blocks, then the adopted allocations.
    pub(crate) fn adoptions(&self) -> Vec<Mutation> {
        let mut m: Vec<Mutation> = self
            .claims
            .values()
            .cloned()
            .map(Mutation::PutBlock)
            .collect();
        m.extend(self.adopted.iter().cloned().map(Mutation::PutAllocation));
        m
    }
}

pub(crate) fn plan_adoption(
    pools: &[PoolSpec],
    node: &str,
    live: &[VethAddress],
    now_ms: i64,
) -> Plan {
    let mut plan = Plan::default();
    let mut seen: HashSet<Ipv4Addr> = HashSet::new();
    for v in live {
        let Some(pool) = pools.iter().find(|p| p.cidr.contains(&v.ip)) else {
            plan.skipped
                .push((v.clone(), "outside every configured pool".into()));
            continue;
        };
        if !seen.insert(v.ip) {
            plan.skipped
                .push((v.clone(), "another fry* veth already holds it".into()));
            continue;
        }
        let block = Ipv4Net::new(v.ip, pool.block_size)
            .map(|n| n.trunc())
            .unwrap_or(pool.cidr);
        plan.claims.entry(block).or_insert_with(|| BlockClaim {
            pool: pool.name.clone(),
            cidr: block,
            node: node.to_string(),
            claimed_unix_ms: now_ms,
        });
        plan.adopted.push(Allocation {
            key: AllocKey::adopted(&v.link),
            ip: v.ip,
            pool: pool.name.clone(),
            block,
            pod: PodMeta::default(),
            created_unix_ms: now_ms,
        });
    }
    plan
}

#[cfg(test)]
mod tests;
