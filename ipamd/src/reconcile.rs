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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use tokio::sync::Mutex;

use crate::error::IpamError;
use crate::ipam::Ipam;
use crate::model::{AllocKey, Allocation, BlockClaim, Finding, FindingKind};
use crate::node::scan::VethAddress;
use crate::node::{HostLink, HostLinks, NodeError};

pub trait Clock: Send + Sync {
    fn now_unix_ms(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> i64 {
        unix_ms(SystemTime::now())
    }
}

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

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
pub struct Snapshot {
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

impl Snapshot {
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

/// The pure core of reconcile: one look at `snap`, at `snap.now_ms`.
pub fn decide(obs: &mut Observations, snap: &Snapshot, grace: Duration) -> Decision {
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    let now_ms = snap.now_ms;
    let mut decision = Decision::default();
    let mut still_missing = HashSet::new();

    for a in &snap.allocations {
        let veth = a.key.host_veth();
        let present = snap.has_link(&veth);
        let touched = snap.activity.get(&a.key).copied();
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
        if snap.netns_alive(a) {
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

    let (unpooled, orphans): (Vec<&HostLink>, Vec<&HostLink>) = snap
        .orphans()
        .into_iter()
        .partition(|l| snap.unpooled_address(l).is_some());
    decision
        .findings
        .extend(unpooled.into_iter().map(|l| kept_unpooled(snap, l)));
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
    decision.findings.extend(address_findings(snap));
    decision
}

fn kept_unpooled(snap: &Snapshot, link: &HostLink) -> Finding {
    let ip = snap
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
fn address_findings(snap: &Snapshot) -> Vec<Finding> {
    let mut findings = Vec::new();
    for block in &snap.owned_blocks {
        for claim in snap
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
    for a in &snap.allocations {
        by_ip.entry(a.ip).or_default().push(a);
        if !snap.owned_blocks.iter().any(|b| b.contains(&a.ip)) {
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
    clock: Arc<dyn Clock>,
    grace: Duration,
    obs: Mutex<Observations>,
}

impl Reconciler {
    /// The addresses ferry's host veths carry now.
    pub async fn live_addresses(&self) -> Result<Vec<VethAddress>, NodeError> {
        self.links.veth_addresses().await
    }

    pub fn new(
        ipam: Arc<Ipam>,
        links: Arc<dyn HostLinks>,
        clock: Arc<dyn Clock>,
        grace: Duration,
    ) -> Self {
        Reconciler {
            ipam,
            links,
            clock,
            grace,
            obs: Mutex::new(Observations::default()),
        }
    }

    /// What the host and the core hold now. A stat per allocation's netns
    /// and a map per key add up on a full node: the work after the netlink
    /// dump and the core's (short) lock runs off the async workers, which
    /// serve Allocate.
    async fn snapshot(&self) -> Result<Snapshot, ReconcileError> {
        let (links, addresses) = self.links.fry_links_and_addresses().await?;
        let link_addresses = addresses.into_iter().map(|v| (v.link, v.ip)).collect();
        let pool_cidrs = self.ipam.pool_specs().iter().map(|p| p.cidr).collect();
        let with_activity = self.ipam.allocations_with_activity();
        let owned_blocks = self.ipam.owned_blocks();
        let foreign_claims = self.ipam.foreign_claims().await?;
        let now_ms = self.clock.now_unix_ms();
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
            Snapshot {
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
    async fn decide(
        &self,
        obs: &mut Observations,
        snap: Snapshot,
    ) -> Result<Decision, ReconcileError> {
        let grace = self.grace;
        // Should the closure panic, the looks start over: that only keeps
        // things longer.
        let mut taken = std::mem::take(obs);
        let (back, decision) = off_worker(move || {
            let d = decide(&mut taken, &snap, grace);
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
        let snap = self.snapshot().await?;
        Ok(self.decide(&mut obs, snap).await?.findings)
    }

    /// One pass: look, log the findings, release and delete what has been
    /// stale for two looks a grace period apart.
    pub async fn run_once(&self) -> Result<Outcome, ReconcileError> {
        let mut obs = self.obs.lock().await;
        let snap = self.snapshot().await?;
        let decision = self.decide(&mut obs, snap).await?;
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
        let snap = self.snapshot().await?;
        let mut actions = Vec::new();
        for a in &snap.allocations {
            let veth = a.key.host_veth();
            if snap.has_link(&veth) || snap.netns_alive(a) {
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
            } else if self.release_leaked(a, snap.now_ms + 1).await.is_some() {
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
        for link in snap.orphans() {
            if snap.unpooled_address(link).is_some() {
                actions.push(kept_unpooled(&snap, link));
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
mod tests {
    use futures::future::BoxFuture;

    use super::*;
    use crate::model::PodMeta;

    const GRACE: Duration = Duration::from_secs(300);
    const S: i64 = 1000;

    fn alloc(container: &str, created_ms: i64) -> Allocation {
        Allocation {
            key: AllocKey {
                network: "ferry".into(),
                container_id: container.into(),
                ifname: "eth0".into(),
            },
            ip: "10.244.0.5".parse().unwrap(),
            pool: "default".into(),
            block: "10.244.0.0/26".parse().unwrap(),
            pod: PodMeta {
                namespace: "ns".into(),
                name: "pod".into(),
                uid: "uid".into(),
                netns: "/var/run/netns/x".into(),
            },
            created_unix_ms: created_ms,
        }
    }

    fn veth(a: &Allocation) -> String {
        a.key.host_veth()
    }

    /// Another pod's veth: proof that ipamd looks at the node's namespace.
    const NEIGHBOUR: &str = "fry0neighbour0";

    fn none_active() -> HashMap<AllocKey, i64> {
        HashMap::new()
    }

    fn links(names: &[&str]) -> Vec<HostLink> {
        names
            .iter()
            .zip(100..)
            .map(|(name, index)| HostLink {
                name: name.to_string(),
                index,
            })
            .collect()
    }

    /// One look in a world where every pod netns is gone and the node owns
    /// the test allocations' block.
    fn look_at(
        obs: &mut Observations,
        activity: &HashMap<AllocKey, i64>,
        allocations: &[Allocation],
        links: &[HostLink],
        now_ms: i64,
        grace: Duration,
    ) -> Decision {
        let snap = Snapshot {
            allocations: allocations.iter().cloned().map(Arc::new).collect(),
            activity: activity.clone(),
            links: links.to_vec(),
            link_addresses: HashMap::new(),
            pool_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            live_netns: HashSet::new(),
            owned_blocks: vec!["10.244.0.0/26".parse().unwrap()],
            foreign_claims: Vec::new(),
            now_ms,
        };
        decide(obs, &snap, grace)
    }

    #[test]
    fn present_veth_is_fine_and_young_allocations_are_left_alone() {
        let mut obs = Observations::default();
        let a = alloc("aaa", 0);
        let d = look_at(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &links(&[&veth(&a)]),
            1000 * S,
            GRACE,
        );
        assert_eq!(d, Decision::default());
        // Missing but younger than the grace: maybe an ADD in progress.
        let young = alloc("bbb", 900 * S);
        let d = look_at(
            &mut obs,
            &none_active(),
            &[young],
            &links(&[]),
            1000 * S,
            GRACE,
        );
        assert_eq!(d, Decision::default());
        assert!(obs.first_missing.is_empty());
    }

    #[test]
    fn release_needs_two_looks_a_grace_apart() {
        let mut obs = Observations::default();
        let a = alloc("aaa", 0);
        let none = links(&[NEIGHBOUR]);
        let t0 = 1000 * S;
        let d = look_at(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &none,
            t0,
            GRACE,
        );
        let missing: Vec<_> = d
            .findings
            .iter()
            .filter(|f| f.kind == FindingKind::LeakedAllocation)
            .collect();
        assert_eq!(missing.len(), 1, "{d:?}");
        assert!(d.release.is_empty());
        // Another look before the grace has passed: still only suspect.
        let d = look_at(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &none,
            t0 + 299 * S,
            GRACE,
        );
        assert!(d.release.is_empty());
        // A grace period after the first look: released.
        let d = look_at(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &none,
            t0 + 300 * S,
            GRACE,
        );
        assert_eq!(d.release, vec![a]);
    }

    #[test]
    fn a_veth_that_comes_back_resets_the_clock() {
        let mut obs = Observations::default();
        let a = alloc("aaa", 0);
        let t0 = 1000 * S;
        look_at(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &links(&[NEIGHBOUR]),
            t0,
            GRACE,
        );
        look_at(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &links(&[&veth(&a)]),
            t0 + 100 * S,
            GRACE,
        );
        let d = look_at(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &links(&[NEIGHBOUR]),
            t0 + 300 * S,
            GRACE,
        );
        assert!(d.release.is_empty(), "first look was reset by the veth");
        let d = look_at(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &links(&[NEIGHBOUR]),
            t0 + 600 * S,
            GRACE,
        );
        assert_eq!(d.release, vec![a]);
    }

    #[test]
    fn zero_grace_still_needs_an_earlier_look() {
        let mut obs = Observations::default();
        let a = alloc("aaa", 0);
        let d = look_at(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &links(&[NEIGHBOUR]),
            10 * S,
            Duration::ZERO,
        );
        assert!(d.release.is_empty());
        let d = look_at(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &links(&[NEIGHBOUR]),
            11 * S,
            Duration::ZERO,
        );
        assert_eq!(d.release, vec![a]);
    }

    #[test]
    fn reallocated_key_starts_over() {
        let mut obs = Observations::default();
        let old = alloc("aaa", 0);
        let t0 = 1000 * S;
        look_at(
            &mut obs,
            &none_active(),
            &[old],
            &links(&[NEIGHBOUR]),
            t0,
            GRACE,
        );
        let new = alloc("aaa", t0 - 400 * S + 1);
        let d = look_at(
            &mut obs,
            &none_active(),
            &[new],
            &links(&[NEIGHBOUR]),
            t0 + 300 * S,
            GRACE,
        );
        assert!(d.release.is_empty());
    }

    #[test]
    fn orphan_veths_are_deleted_after_two_looks_a_grace_apart() {
        let mut obs = Observations::default();
        let a = alloc("aaa", 0);
        let host = links(&[&veth(&a), "fryorphan00001"]);
        let t0 = 1000 * S;
        let d = look_at(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &host,
            t0,
            GRACE,
        );
        assert_eq!(d.findings.len(), 1);
        assert_eq!(d.findings[0].kind, FindingKind::OrphanVeth);
        assert!(d.findings[0].detail.contains("fryorphan00001"));
        assert!(d.release.is_empty() && d.unplug.is_empty());
        let d = look_at(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &host,
            t0 + 299 * S,
            GRACE,
        );
        assert!(d.unplug.is_empty());
        let d = look_at(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &host,
            t0 + 300 * S,
            GRACE,
        );
        assert_eq!(d.unplug, vec![host[1].clone()]);
        // Re-created under the same name (a new index): a new first look.
        let recreated = vec![
            host[0].clone(),
            HostLink {
                name: "fryorphan00001".into(),
                index: 7,
            },
        ];
        let d = look_at(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &recreated,
            t0 + 301 * S,
            GRACE,
        );
        assert!(d.unplug.is_empty());
    }

    /// A veth whose address lies in no pool belongs to a pod of a pool
    /// lost with a rebuilt database: kept for `ipamctl pool add` to adopt,
    /// however long it stays. One routing a pool's address goes as usual.
    #[test]
    fn an_orphan_routing_an_address_in_no_pool_is_kept() {
        let mut obs = Observations::default();
        let host = links(&["fry00000000001", "fry00000000002"]);
        let mut snap = Snapshot {
            links: host.clone(),
            link_addresses: HashMap::from([
                ("fry00000000001".to_string(), "10.250.0.1".parse().unwrap()),
                ("fry00000000002".to_string(), "10.244.0.9".parse().unwrap()),
            ]),
            pool_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            now_ms: 1000 * S,
            ..Snapshot::default()
        };
        let first = decide(&mut obs, &snap, GRACE);
        assert!(first.unplug.is_empty());
        snap.now_ms += 10 * GRACE.as_millis() as i64;
        let later = decide(&mut obs, &snap, GRACE);
        assert_eq!(later.unplug, vec![host[1].clone()]);
        let kept: Vec<&str> = later
            .findings
            .iter()
            .filter(|f| f.detail.contains("kept"))
            .map(|f| f.detail.as_str())
            .collect();
        assert!(
            kept.len() == 1
                && kept[0].contains("fry00000000001 ")
                && kept[0].contains("10.250.0.1"),
            "{kept:?}"
        );
    }

    #[test]
    fn a_live_netns_keeps_the_address_of_a_missing_veth() {
        let mut obs = Observations::default();
        let a = alloc("aaa", 0);
        let mut snap = Snapshot {
            allocations: vec![Arc::new(a.clone())],
            live_netns: HashSet::from([a.pod.netns.clone()]),
            owned_blocks: vec!["10.244.0.0/26".parse().unwrap()],
            now_ms: 1000 * S,
            ..Snapshot::default()
        };
        for _ in 0..3 {
            let d = decide(&mut obs, &snap, GRACE);
            assert!(d.release.is_empty(), "{d:?}");
            assert_eq!(d.findings.len(), 1);
            assert_eq!(d.findings[0].kind, FindingKind::MissingVeth);
            assert!(d.findings[0].detail.contains("kept"));
            snap.now_ms += 300 * S;
        }
        // The netns goes away: only now do the two looks begin.
        snap.live_netns.clear();
        assert!(decide(&mut obs, &snap, GRACE).release.is_empty());
        snap.now_ms += 300 * S;
        assert_eq!(decide(&mut obs, &snap, GRACE).release, vec![a]);
    }

    #[test]
    fn a_block_the_cluster_gives_to_another_node_is_reported() {
        let mut obs = Observations::default();
        let claim = |cidr: &str, node: &str| BlockClaim {
            pool: "default".into(),
            cidr: cidr.parse().unwrap(),
            node: node.into(),
            claimed_unix_ms: 0,
        };
        let snap = Snapshot {
            owned_blocks: vec![
                "10.244.0.0/26".parse().unwrap(),
                "10.244.0.64/26".parse().unwrap(),
            ],
            foreign_claims: vec![
                claim("10.244.0.64/26", "node-b"),
                claim("10.244.1.0/26", "node-c"),
            ],
            now_ms: 1000 * S,
            ..Snapshot::default()
        };
        let d = decide(&mut obs, &snap, GRACE);
        assert_eq!(d.findings.len(), 1, "{d:?}");
        assert_eq!(d.findings[0].kind, FindingKind::ForeignBlock);
        let detail = &d.findings[0].detail;
        assert!(
            detail.contains("10.244.0.64/26") && detail.contains("node-b"),
            "{detail}"
        );
        assert!(d.release.is_empty() && d.unplug.is_empty());
    }

    #[test]
    fn duplicates_and_foreign_blocks_are_reported() {
        let mut obs = Observations::default();
        let a = alloc("aaa", 0);
        let b = alloc("bbb", 0);
        let mut c = alloc("ccc", 0);
        c.ip = "10.9.9.9".parse().unwrap();
        let snap = Snapshot {
            allocations: [&a, &b, &c].map(|x| Arc::new(x.clone())).to_vec(),
            links: links(&[&veth(&a), &veth(&b), &veth(&c)]),
            owned_blocks: vec!["10.244.0.0/26".parse().unwrap()],
            now_ms: 1000 * S,
            ..Snapshot::default()
        };
        let d = decide(&mut obs, &snap, GRACE);
        let kinds: Vec<_> = d.findings.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            [FindingKind::ForeignBlock, FindingKind::DuplicateAddress]
        );
        assert!(d.findings[0].detail.contains("10.9.9.9"));
        assert!(
            d.findings[1].detail.contains("aaa, bbb"),
            "{}",
            d.findings[1].detail
        );
    }

    /// A clock both the core and reconcile read, moved by the test.
    struct TestClock(std::sync::atomic::AtomicI64);

    impl Clock for TestClock {
        fn now_unix_ms(&self) -> i64 {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[tokio::test]
    async fn reconciler_releases_through_the_core() {
        use crate::node::fake::FakeHost;
        use std::sync::atomic::Ordering;

        let (ipam, clock) = core_at(1_000_000).await;
        let host = Arc::new(FakeHost::default());
        let rec = Reconciler::new(ipam.clone(), host.clone(), clock.clone(), GRACE);
        let mut keep = alloc("keep", 0);
        let mut gone = alloc("gone", 0);
        for a in [&mut keep, &mut gone] {
            *a = ipam.allocate(add_params(a)).await.unwrap();
        }
        host.set_links(&[&veth(&keep), "fryorphan00001"]);
        let advance = |secs: i64| clock.0.fetch_add(secs * S, Ordering::SeqCst);

        // Young: nothing to say but the orphan.
        let f = rec.look().await.unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].kind, FindingKind::OrphanVeth);

        advance(400);
        assert!(
            rec.run_once().await.unwrap().released.is_empty(),
            "first look only"
        );
        advance(100);
        assert!(
            rec.run_once().await.unwrap().released.is_empty(),
            "not a grace apart yet"
        );
        // The veth came back just before the release would happen.
        advance(200);
        host.set_links(&[&veth(&keep), &veth(&gone)]);
        assert!(rec.run_once().await.unwrap().released.is_empty());
        host.set_links(&[&veth(&keep)]);
        advance(1);
        assert!(
            rec.run_once().await.unwrap().released.is_empty(),
            "clock restarted"
        );
        advance(300);
        let released = rec.run_once().await.unwrap().released;
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].key, gone.key);
        assert!(ipam.get(&gone.key).is_none());
        assert!(ipam.get(&keep.key).is_some());
        assert_eq!(host.names(), [veth(&keep)], "the orphan veth was deleted");
    }

    /// A core and a reconcile sharing one test clock.
    async fn core_at(start_ms: i64) -> (Arc<Ipam>, Arc<TestClock>) {
        use crate::cluster::local::LocalCluster;
        use crate::ipam::IpamOptions;
        use crate::store::memory::MemoryStore;

        let clock = Arc::new(TestClock(std::sync::atomic::AtomicI64::new(start_ms)));
        let core_clock = clock.clone();
        let ipam = Ipam::open_with_clock(
            IpamOptions::one_pool_for_tests(),
            Arc::new(MemoryStore::new()),
            Arc::new(LocalCluster),
            Arc::new(move || core_clock.now_unix_ms()),
        )
        .await
        .unwrap();
        (Arc::new(ipam), clock)
    }

    fn add_params(a: &Allocation) -> crate::model::AllocateParams {
        crate::model::AllocateParams {
            key: a.key.clone(),
            pod: a.pod.clone(),
            requested_ips: vec![],
            pool_hint: None,
        }
    }

    #[tokio::test]
    async fn a_retried_add_makes_the_allocation_young_again() {
        use crate::node::fake::FakeHost;
        use std::sync::atomic::Ordering;

        let (ipam, clock) = core_at(1_000_000).await;
        let host = Arc::new(FakeHost::default());
        host.set_links(&[NEIGHBOUR]);
        let rec = Reconciler::new(ipam.clone(), host.clone(), clock.clone(), GRACE);
        let advance = |secs: i64| clock.0.fetch_add(secs * S, Ordering::SeqCst);
        let a = ipam.allocate(add_params(&alloc("stale", 0))).await.unwrap();

        advance(400);
        assert!(
            rec.run_once().await.unwrap().released.is_empty(),
            "first look"
        );
        advance(300);
        // The runtime ADDs the same key again: it gets the same address and
        // is about to create the veth.
        assert_eq!(ipam.allocate(add_params(&a)).await.unwrap(), a);
        assert!(
            rec.run_once().await.unwrap().released.is_empty(),
            "the address was just handed out again"
        );
        advance(299);
        assert!(
            rec.run_once().await.unwrap().released.is_empty(),
            "still young"
        );
        // Still no veth a grace after the ADD: two fresh looks are needed.
        advance(1);
        assert!(
            rec.run_once().await.unwrap().released.is_empty(),
            "new first look"
        );
        advance(300);
        let released = rec.run_once().await.unwrap().released;
        assert_eq!(released, vec![a]);
    }

    /// Host links whose `call`-th listing lets a retried ADD of `params`
    /// reach the core first, as if it arrived while reconcile was deciding.
    struct RacingHost {
        ipam: Arc<Ipam>,
        params: crate::model::AllocateParams,
        calls: std::sync::atomic::AtomicUsize,
        call: usize,
    }

    impl HostLinks for RacingHost {
        fn fry_links(&self) -> BoxFuture<'_, Result<Vec<HostLink>, NodeError>> {
            let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            Box::pin(async move {
                if n == self.call {
                    self.ipam.allocate(self.params.clone()).await.unwrap();
                }
                Ok(links(&[NEIGHBOUR]))
            })
        }
        fn delete_link<'a>(
            &'a self,
            _link: &'a HostLink,
        ) -> BoxFuture<'a, Result<bool, NodeError>> {
            Box::pin(async { Ok(false) })
        }
        fn veth_addresses(&self) -> BoxFuture<'_, Result<Vec<VethAddress>, NodeError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
    }

    #[tokio::test]
    async fn a_retried_add_during_the_release_keeps_the_address() {
        use std::sync::atomic::Ordering;

        let (ipam, clock) = core_at(1_000_000).await;
        let a = ipam.allocate(add_params(&alloc("stale", 0))).await.unwrap();
        // Listings: 1 = first look, 2 = second look, 3 = the re-read just
        // before releasing, during which the ADD lands.
        let host = Arc::new(RacingHost {
            ipam: ipam.clone(),
            params: add_params(&a),
            calls: Default::default(),
            call: 3,
        });
        let rec = Reconciler::new(ipam.clone(), host.clone(), clock.clone(), GRACE);
        let advance = |secs: i64| clock.0.fetch_add(secs * S, Ordering::SeqCst);
        advance(400);
        assert!(rec.run_once().await.unwrap().released.is_empty());
        advance(300);
        assert!(rec.run_once().await.unwrap().released.is_empty());
        assert_eq!(host.calls.load(Ordering::SeqCst), 3);
        assert_eq!(ipam.get(&a.key), Some(a));
    }

    #[test]
    fn activity_after_the_first_look_restarts_it() {
        let mut obs = Observations::default();
        let a = alloc("aaa", 0);
        let t0 = 1000 * S;
        look_at(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &links(&[NEIGHBOUR]),
            t0,
            GRACE,
        );
        // Touched after the first look, but longer than a grace ago by the
        // second (no look in between saw it young).
        let touched = HashMap::from([(a.key.clone(), t0 + S)]);
        let d = look_at(
            &mut obs,
            &touched,
            std::slice::from_ref(&a),
            &links(&[NEIGHBOUR]),
            t0 + 400 * S,
            GRACE,
        );
        assert!(d.release.is_empty());
        assert_eq!(obs.first_missing[&a.key], (0, t0 + 400 * S));
        let d = look_at(
            &mut obs,
            &touched,
            std::slice::from_ref(&a),
            &links(&[NEIGHBOUR]),
            t0 + 700 * S,
            GRACE,
        );
        assert_eq!(d.release, vec![a]);
    }

    #[test]
    fn forgotten_keys_are_dropped() {
        let mut obs = Observations::default();
        let a = alloc("aaa", 0);
        look_at(
            &mut obs,
            &none_active(),
            &[a],
            &links(&[NEIGHBOUR]),
            1000 * S,
            GRACE,
        );
        assert_eq!(obs.first_missing.len(), 1);
        look_at(
            &mut obs,
            &none_active(),
            &[],
            &links(&[NEIGHBOUR]),
            1001 * S,
            GRACE,
        );
        assert!(obs.first_missing.is_empty());
    }
}
