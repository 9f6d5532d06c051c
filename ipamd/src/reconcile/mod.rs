//! Reconcile: compare IPAM allocations with the host veths that carry them
//! and the pods' network namespaces.
//!
//! - An allocation whose host veth AND pod netns are both gone is a pod gone
//!   without a DEL (a reboot, a crash). It is released after two looks at
//!   least `stale_grace` apart with no Allocate or Check on its key since the
//!   first, so a slow or retried ADD never costs a pod its address. The
//!   release is conditional in the core ([`Ipam::release_if_idle`]): a
//!   retried ADD that got the address back in the meantime wins.
//! - An allocation whose veth is gone but whose netns still exists is
//!   reported and kept: the pod may be alive (or ipamd runs in the wrong
//!   netns, where it sees no veth of ours at all).
//! - A `fry*` veth with no allocation (a DEL whose background delete was
//!   lost to a crash) is deleted after two looks a grace apart, by ifindex.
//! - Duplicate addresses and allocations outside this node's blocks are
//!   reported; they need an operator.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::sync::Mutex;

use crate::error::IpamError;
use crate::ipam::Ipam;
use crate::model::{AllocKey, Allocation, BlockClaim, Finding, FindingKind};
use crate::node::scan::VethAddress;
use crate::node::{HostLink, HostLinks, NodeError};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("listing host veths: {0}")]
    Node(#[from] NodeError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error("ipamd is shutting down")]
    ShuttingDown,
}

/// Runs `f` on tokio's blocking pool; a panic in it goes on here.
async fn off_worker<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ReconcileError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(t) => Ok(t),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(ReconcileError::ShuttingDown),
    }
}

/// What one look saw.
#[derive(Debug, Default)]
pub struct Look {
    pub allocations: Vec<Arc<Allocation>>,
    /// The last Allocate or Check per key.
    pub activity: HashMap<AllocKey, i64>,
    pub links: Vec<HostLink>,
    /// The address each of ferry's veths routes (its pod's).
    pub link_addresses: HashMap<String, Ipv4Addr>,
    /// Every pool's CIDR.
    pub pool_cidrs: Vec<Ipv4Net>,
    /// The allocations' netns paths that exist.
    pub live_netns: HashSet<String>,
    pub owned_blocks: Vec<Ipv4Net>,
    /// Blocks the cluster store gives to other nodes.
    pub foreign_claims: Vec<BlockClaim>,
    pub now_ms: i64,
}

impl Look {
    fn has_link(&self, name: &str) -> bool {
        self.links.iter().any(|l| l.name == name)
    }

    fn netns_alive(&self, a: &Allocation) -> bool {
        !a.pod.netns.is_empty() && self.live_netns.contains(&a.pod.netns)
    }

    /// The address `link` routes, when it lies in no pool: a pod of a pool
    /// this node no longer knows (a run-time pool lost with a rebuilt
    /// database). Its veth is kept, so that `ipamctl pool add` can adopt it.
    fn unpooled_address(&self, link: &HostLink) -> Option<Ipv4Addr> {
        let ip = *self.link_addresses.get(&link.name)?;
        (!self.pool_cidrs.iter().any(|c| c.contains(&ip))).then_some(ip)
    }

    /// `fry*` links no allocation hangs off, by name.
    fn orphans(&self) -> Vec<&HostLink> {
        let expected: HashSet<String> =
            self.allocations.iter().map(|a| a.key.host_veth()).collect();
        let mut orphans: Vec<&HostLink> = self
            .links
            .iter()
            .filter(|l| !expected.contains(&l.name))
            .collect();
        orphans.sort();
        orphans
    }
}

/// When each suspect was first seen. Kept in memory only: after a restart
/// the two looks start over, which errs on the side of keeping things.
#[derive(Debug, Default)]
pub struct Observations {
    /// Key -> (allocation's created_unix_ms, first look that found it leaked).
    first_missing: HashMap<AllocKey, (i64, i64)>,
    /// Orphan veth -> first look that found it.
    first_orphan: HashMap<HostLink, i64>,
    /// Findings logged at the previous pass: repeating them every interval
    /// at warn level would bury everything else.
    logged: HashSet<String>,
}

/// The outcome of one look.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub findings: Vec<Finding>,
    /// Leaked at this look and at an earlier look at least `grace` ago.
    pub release: Vec<Allocation>,
    /// Orphan veths seen at this look and at one at least `grace` ago.
    pub unplug: Vec<HostLink>,
}

/// The pure core of reconcile: one look at `seen`, at `seen.now_ms`.
pub fn decide(obs: &mut Observations, seen: &Look, grace: Duration) -> Decision {
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    let now_ms = seen.now_ms;
    let mut decision = Decision::default();
    let mut still_missing = HashSet::new();

    for a in &seen.allocations {
        let veth = a.key.host_veth();
        let present = seen.has_link(&veth);
        let touched = seen.activity.get(&a.key).copied();
        let last_active = touched.map_or(a.created_unix_ms, |t| t.max(a.created_unix_ms));
        // Young or recently retried allocations may be mid-ADD, veth not
        // created yet.
        if present || now_ms.saturating_sub(last_active) < grace_ms {
            continue;
        }
        let who = format!(
            "{}/{} ({})",
            a.pod.namespace, a.pod.name, a.key.container_id
        );
        if seen.netns_alive(a) {
            decision.findings.push(Finding {
                kind: FindingKind::MissingVeth,
                detail: format!(
                    "host veth {veth} of {who} missing but its netns {} exists; {} kept",
                    a.pod.netns, a.ip
                ),
                allocation: Some(Allocation::clone(a)),
            });
            continue;
        }
        still_missing.insert(a.key.clone());
        let entry = obs
            .first_missing
            .entry(a.key.clone())
            .or_insert((a.created_unix_ms, now_ms));
        if entry.0 != a.created_unix_ms || touched.is_some_and(|t| t >= entry.1) {
            // The key was released and allocated again (a new allocation),
            // or an ADD or CHECK came since the first look: a new first look.
            *entry = (a.created_unix_ms, now_ms);
        }
        let first = entry.1;
        let missing_for = now_ms.saturating_sub(first);
        // Strictly an earlier look: with grace 0 one look is still not enough.
        let release = first < now_ms && missing_for >= grace_ms;
        let gone = format!("host veth {veth} and netns '{}' of {who} gone", a.pod.netns);
        let detail = if release {
            format!("{gone} since {missing_for} ms ago; releasing {}", a.ip)
        } else {
            format!(
                "{gone}; {} is released if still so {} s after the first look",
                a.ip,
                grace.as_secs()
            )
        };
        decision.findings.push(Finding {
            kind: FindingKind::LeakedAllocation,
            detail,
            allocation: Some(Allocation::clone(a)),
        });
        if release {
            decision.release.push(Allocation::clone(a));
        }
    }
    // Forget keys that are gone or whose veth came back.
    obs.first_missing.retain(|k, _| still_missing.contains(k));

    let (unpooled, orphans): (Vec<&HostLink>, Vec<&HostLink>) = seen
        .orphans()
        .into_iter()
        .partition(|l| seen.unpooled_address(l).is_some());
    decision
        .findings
        .extend(unpooled.into_iter().map(|l| kept_unpooled(seen, l)));
    obs.first_orphan.retain(|l, _| orphans.contains(&l));
    for link in orphans {
        let first = *obs.first_orphan.entry(link.clone()).or_insert(now_ms);
        let unplug = first < now_ms && now_ms.saturating_sub(first) >= grace_ms;
        let detail = if unplug {
            format!("host veth {} has no allocation; deleting it", link.name)
        } else {
            format!(
                "host veth {} has no allocation; deleted if still so {} s after the first look",
                link.name,
                grace.as_secs()
            )
        };
        decision.findings.push(Finding {
            kind: FindingKind::OrphanVeth,
            detail,
            allocation: None,
        });
        if unplug {
            decision.unplug.push(link.clone());
        }
    }
    decision.findings.extend(address_findings(seen));
    decision
}

fn kept_unpooled(seen: &Look, link: &HostLink) -> Finding {
    let ip = seen
        .unpooled_address(link)
        .map_or_else(String::new, |ip| ip.to_string());
    Finding {
        kind: FindingKind::OrphanVeth,
        detail: format!(
            "host veth {} has no allocation and routes {ip}, which lies in no pool; kept: \
             `ipamctl pool add` its pool (lost with a rebuilt database?) to adopt it, \
             or delete its pod",
            link.name
        ),
        allocation: None,
    }
}

/// Duplicate addresses, allocations outside the node's blocks and blocks
/// the cluster store gives to another node: the core's invariants, checked
/// against what it actually holds.
fn address_findings(seen: &Look) -> Vec<Finding> {
    let mut findings = Vec::new();
    for block in &seen.owned_blocks {
        for claim in seen
            .foreign_claims
            .iter()
            .filter(|c| c.cidr.contains(&block.network()) || block.contains(&c.cidr.network()))
        {
            findings.push(Finding {
                kind: FindingKind::ForeignBlock,
                detail: format!(
                    "block {block} is held by this node, but the cluster store gives {} (pool {}) to node {}",
                    claim.cidr, claim.pool, claim.node
                ),
                allocation: None,
            });
        }
    }
    let mut by_ip: HashMap<Ipv4Addr, Vec<&Allocation>> = HashMap::new();
    for a in &seen.allocations {
        by_ip.entry(a.ip).or_default().push(a);
        if !seen.owned_blocks.iter().any(|b| b.contains(&a.ip)) {
            findings.push(Finding {
                kind: FindingKind::ForeignBlock,
                detail: format!(
                    "{} of {} is in no block this node owns (recorded block {})",
                    a.ip, a.key.container_id, a.block
                ),
                allocation: Some(Allocation::clone(a)),
            });
        }
    }
    let mut dups: Vec<_> = by_ip.into_iter().filter(|(_, v)| v.len() > 1).collect();
    dups.sort_by_key(|(ip, _)| *ip);
    for (ip, holders) in dups {
        let who: Vec<&str> = holders
            .iter()
            .map(|a| a.key.container_id.as_str())
            .collect();
        findings.push(Finding {
            kind: FindingKind::DuplicateAddress,
            detail: format!(
                "{ip} is held by {} allocations: {}",
                who.len(),
                who.join(", ")
            ),
            allocation: Some(Allocation::clone(holders[0])),
        });
    }
    findings
}

/// What a pass did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub findings: Vec<Finding>,
    pub released: Vec<Allocation>,
    pub unplugged: Vec<HostLink>,
}

pub struct Reconciler {
    ipam: Arc<Ipam>,
    links: Arc<dyn HostLinks>,
    grace: Duration,
    obs: Mutex<Observations>,
}

impl Reconciler {
    /// The addresses ferry's host veths carry now.
    pub async fn live_addresses(&self) -> Result<Vec<VethAddress>, NodeError> {
        self.links.veth_addresses().await
    }

    /// Reads time from the core's clock, which stamps the activity it
    /// compares against.
    pub fn new(ipam: Arc<Ipam>, links: Arc<dyn HostLinks>, grace: Duration) -> Self {
        Reconciler {
            ipam,
            links,
            grace,
            obs: Mutex::new(Observations::default()),
        }
    }

    /// What the host and the core hold now. A stat per allocation's netns
    /// and a map per key add up on a full node: the work after the netlink
    /// dump and the core's (short) lock runs off the async workers, which
    /// serve Allocate.
    async fn take_look(&self) -> Result<Look, ReconcileError> {
        let (links, addresses) = self.links.fry_links_and_addresses().await?;
        let link_addresses = addresses.into_iter().map(|v| (v.link, v.ip)).collect();
        let pool_cidrs = self.ipam.pool_specs().iter().map(|p| p.cidr).collect();
        let with_activity = self.ipam.allocations_with_activity();
        let owned_blocks = self.ipam.owned_blocks();
        let foreign_claims = self.ipam.foreign_claims().await?;
        let now_ms = self.ipam.now();
        off_worker(move || {
            let live_netns = with_activity
                .iter()
                .map(|(a, _)| &a.pod.netns)
                .filter(|p| !p.is_empty() && std::path::Path::new(p).exists())
                .cloned()
                .collect();
            let activity = with_activity
                .iter()
                .filter_map(|(a, t)| Some((a.key.clone(), (*t)?)))
                .collect();
            // Findings come out in the allocations' order: by IP.
            let mut allocations: Vec<Arc<Allocation>> =
                with_activity.into_iter().map(|(a, _)| a).collect();
            allocations.sort_by_key(|a| a.ip);
            Look {
                allocations,
                activity,
                links,
                link_addresses,
                pool_cidrs,
                live_netns,
                owned_blocks,
                foreign_claims,
                now_ms,
            }
        })
        .await
    }

    /// [`decide`] off the async workers (a hash per allocation).
    async fn decide(&self, obs: &mut Observations, seen: Look) -> Result<Decision, ReconcileError> {
        let grace = self.grace;
        // Should the closure panic, the looks start over: that only keeps
        // things longer.
        let mut taken = std::mem::take(obs);
        let (back, decision) = off_worker(move || {
            let d = decide(&mut taken, &seen, grace);
            (taken, d)
        })
        .await?;
        *obs = back;
        Ok(decision)
    }

    /// One look, for CheckConsistency: records what it saw (it is a real
    /// observation) but changes nothing.
    pub async fn look(&self) -> Result<Vec<Finding>, ReconcileError> {
        let mut obs = self.obs.lock().await;
        let seen = self.take_look().await?;
        Ok(self.decide(&mut obs, seen).await?.findings)
    }

    /// One pass: look, log the findings, release and delete what has been
    /// stale for two looks a grace period apart.
    pub async fn run_once(&self) -> Result<Outcome, ReconcileError> {
        let mut obs = self.obs.lock().await;
        let seen = self.take_look().await?;
        let decision = self.decide(&mut obs, seen).await?;
        let mut logged = HashSet::new();
        for f in &decision.findings {
            if obs.logged.contains(&f.detail) {
                tracing::debug!(kind = f.kind.as_str(), "{}", f.detail);
            } else {
                tracing::warn!(kind = f.kind.as_str(), "{}", f.detail);
            }
            logged.insert(f.detail.clone());
        }
        obs.logged = logged;
        let mut outcome = Outcome {
            findings: decision.findings,
            ..Outcome::default()
        };
        if decision.release.is_empty() && decision.unplug.is_empty() {
            return Ok(outcome);
        }
        // Look at the host once more right before acting: a veth that
        // reappeared in the meantime wins.
        let names: HashSet<String> = self
            .links
            .fry_links()
            .await?
            .into_iter()
            .map(|l| l.name)
            .collect();
        for a in decision.release {
            if names.contains(&a.key.host_veth()) {
                continue;
            }
            let Some(&(_, first_look)) = obs.first_missing.get(&a.key) else {
                continue;
            };
            if let Some(r) = self.release_leaked(&a, first_look).await {
                obs.first_missing.remove(&a.key);
                outcome.released.push(r);
            } else {
                // Gone, replaced, touched or failed: the looks start over.
                obs.first_missing.remove(&a.key);
            }
        }
        for link in decision.unplug {
            obs.first_orphan.remove(&link);
            if self.unplug_orphan(&link).await {
                outcome.unplugged.push(link);
            }
        }
        Ok(outcome)
    }

    /// Acts on every leaked allocation and orphan veth at once, without
    /// waiting for a second look (ipamctl gc). A leaked allocation's netns is
    /// gone, so no ADD can be in flight for it; the release still loses to
    /// any Allocate or Check that reaches the key after this look.
    pub async fn collect_garbage(&self, dry_run: bool) -> Result<Vec<Finding>, ReconcileError> {
        let _obs = self.obs.lock().await;
        let seen = self.take_look().await?;
        let mut actions = Vec::new();
        for a in &seen.allocations {
            let veth = a.key.host_veth();
            if seen.has_link(&veth) || seen.netns_alive(a) {
                continue;
            }
            let what = format!(
                "{} of {} (veth {veth} and netns gone)",
                a.ip, a.key.container_id
            );
            let detail = if dry_run {
                format!("would release {what}")
            // Activity stamped in the very millisecond of the look counts as
            // before it: with the netns gone no ADD of this key can succeed.
            } else if self.release_leaked(a, seen.now_ms + 1).await.is_some() {
                format!("released {what}")
            } else {
                format!("kept {what}: it changed or could not be released")
            };
            actions.push(Finding {
                kind: FindingKind::LeakedAllocation,
                detail,
                allocation: Some(Allocation::clone(a)),
            });
        }
        for link in seen.orphans() {
            if seen.unpooled_address(link).is_some() {
                actions.push(kept_unpooled(&seen, link));
                continue;
            }
            let detail = if dry_run {
                format!("would delete host veth {} (no allocation)", link.name)
            } else if self.unplug_orphan(link).await {
                format!("deleted host veth {} (no allocation)", link.name)
            } else {
                format!(
                    "host veth {} was already gone or could not be deleted",
                    link.name
                )
            };
            actions.push(Finding {
                kind: FindingKind::OrphanVeth,
                detail,
                allocation: None,
            });
        }
        Ok(actions)
    }

    async fn release_leaked(
        &self,
        a: &Allocation,
        not_touched_since_ms: i64,
    ) -> Option<Allocation> {
        // Only the very allocation we watched, and only if no ADD or CHECK
        // reached it since: decided under the core's lock, so a retried ADD
        // cannot slip in between.
        match self.ipam.release_if_idle(a, not_touched_since_ms).await {
            Ok(Some(r)) => {
                tracing::warn!(
                    ip = %r.ip,
                    container = %r.key.container_id,
                    ifname = %r.key.ifname,
                    "reconcile released an address whose pod is gone"
                );
                Some(r)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(ip = %a.ip, error = %e, "reconcile could not release");
                None
            }
        }
    }

    async fn unplug_orphan(&self, link: &HostLink) -> bool {
        match self.links.delete_link(link).await {
            Ok(deleted) => {
                if deleted {
                    tracing::warn!(link = %link.name, "reconcile deleted a host veth without allocation");
                }
                deleted
            }
            Err(e) => {
                tracing::error!(link = %link.name, error = %e, "reconcile could not delete a host veth");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests;
