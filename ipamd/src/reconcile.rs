//! Reconcile: compare IPAM allocations with the host veths that should carry
//! them. An allocation idle for `stale_grace` (since it was created and since
//! the last Allocate or Check on its key) whose veth is gone is released only
//! after two looks at least `stale_grace` apart with no activity on the key
//! since the first, so a slow or retried ADD or a passing glitch never costs
//! a pod its address. The release itself is conditional in the core
//! ([`Ipam::release_if_idle`]): a retried ADD that got the address back in
//! the meantime wins. Veths named `fry*` with no allocation are reported,
//! never deleted: the plugin owns the dataplane.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Mutex;

use crate::error::IpamError;
use crate::ipam::Ipam;
use crate::model::{AllocKey, Allocation, Finding, FindingKind};
use crate::node::{HostLinks, NodeError};

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
}

/// When each suspect allocation was first seen without its veth. Kept in
/// memory only: after a restart the two looks start over, which errs on
/// the side of keeping addresses.
#[derive(Debug, Default)]
pub struct Observations {
    /// Key -> (allocation's created_unix_ms, first look that found it missing).
    first_missing: HashMap<AllocKey, (i64, i64)>,
    /// Findings logged at the previous pass: repeating them every interval
    /// at warn level would bury everything else.
    logged: HashSet<String>,
}

/// The outcome of one look.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub findings: Vec<Finding>,
    /// Allocations missing their veth at this look and at an earlier look at
    /// least `grace` ago.
    pub release: Vec<Allocation>,
}

/// The pure core of reconcile: one look at `allocations` (with `activity`,
/// the last Allocate or Check per key) and the `fry*` links present, at `now`.
pub fn decide(
    obs: &mut Observations,
    activity: &HashMap<AllocKey, i64>,
    allocations: &[Allocation],
    links: &HashSet<String>,
    now_ms: i64,
    grace: Duration,
) -> Decision {
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    let mut decision = Decision::default();
    let mut expected = HashSet::new();
    let mut still_missing = HashSet::new();

    for a in allocations {
        let veth = ferry_proto::host_veth_name(&a.key.container_id, &a.key.ifname);
        let present = links.contains(&veth);
        expected.insert(veth.clone());
        let touched = activity.get(&a.key).copied();
        let last_active = touched.map_or(a.created_unix_ms, |t| t.max(a.created_unix_ms));
        // Young or recently retried allocations may be mid-ADD, veth not
        // created yet.
        if present || now_ms.saturating_sub(last_active) < grace_ms {
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
        let detail = if release {
            format!(
                "host veth {veth} of {}/{} ({}) missing since {} ms ago; releasing {}",
                a.pod.namespace, a.pod.name, a.key.container_id, missing_for, a.ip
            )
        } else {
            format!(
                "host veth {veth} of {}/{} ({}) missing; {} is released if still missing {} s after the first look",
                a.pod.namespace,
                a.pod.name,
                a.key.container_id,
                a.ip,
                grace.as_secs()
            )
        };
        decision.findings.push(Finding {
            kind: FindingKind::MissingVeth,
            detail,
            allocation: Some(a.clone()),
        });
        if release {
            decision.release.push(a.clone());
        }
    }
    // Forget keys that are gone or whose veth came back.
    obs.first_missing.retain(|k, _| still_missing.contains(k));

    // An ipamd started outside the node's netns sees no veth at all and would
    // free every live pod's address. Without one visible veth of ours there is
    // no telling that apart from a node whose pods are all gone, so wait: the
    // first pod networked here lifts the hold.
    let any_ours = links
        .iter()
        .any(|l| l.starts_with(ferry_proto::HOST_VETH_PREFIX));
    if !any_ours && !decision.release.is_empty() {
        decision.findings.push(Finding {
            kind: FindingKind::ReleasesHeld,
            detail: format!(
                "{} stale allocation(s) kept: no fry* veth is visible at all; \
                 is ipamd running in the node's network namespace?",
                decision.release.len()
            ),
            allocation: None,
        });
        decision.release.clear();
    }

    let mut orphans: Vec<&String> = links
        .iter()
        .filter(|l| l.starts_with(ferry_proto::HOST_VETH_PREFIX) && !expected.contains(*l))
        .collect();
    orphans.sort();
    for link in orphans {
        decision.findings.push(Finding {
            kind: FindingKind::OrphanVeth,
            detail: format!("host veth {link} has no allocation (left alone)"),
            allocation: None,
        });
    }
    decision
}

pub struct Reconciler {
    ipam: Arc<Ipam>,
    links: Arc<dyn HostLinks>,
    clock: Arc<dyn Clock>,
    grace: Duration,
    obs: Mutex<Observations>,
}

impl Reconciler {
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

    async fn observe(&self, obs: &mut Observations) -> Result<Decision, ReconcileError> {
        let links: HashSet<String> = self.links.fry_links().await?.into_iter().collect();
        let (allocations, activity) = self.ipam.allocations_with_activity();
        Ok(decide(
            obs,
            &activity,
            &allocations,
            &links,
            self.clock.now_unix_ms(),
            self.grace,
        ))
    }

    /// One look, for CheckConsistency: records what it saw (it is a real
    /// observation) but releases nothing.
    pub async fn look(&self) -> Result<Vec<Finding>, ReconcileError> {
        let mut obs = self.obs.lock().await;
        Ok(self.observe(&mut obs).await?.findings)
    }

    /// One pass: look, log the findings, release what has been missing for
    /// two looks a grace period apart. Returns what it released.
    pub async fn run_once(&self) -> Result<Vec<Allocation>, ReconcileError> {
        let mut obs = self.obs.lock().await;
        let decision = self.observe(&mut obs).await?;
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
        if decision.release.is_empty() {
            return Ok(Vec::new());
        }
        // Look at the host once more right before releasing: a veth that
        // reappeared in the meantime wins.
        let links: HashSet<String> = self.links.fry_links().await?.into_iter().collect();
        let mut released = Vec::new();
        for a in decision.release {
            let veth = ferry_proto::host_veth_name(&a.key.container_id, &a.key.ifname);
            if links.contains(&veth) {
                continue;
            }
            let Some(&(_, first_look)) = obs.first_missing.get(&a.key) else {
                continue;
            };
            // Only the very allocation we watched, and only if no ADD or
            // CHECK reached it since the first look: decided and done under
            // the core's lock, so a retried ADD cannot slip in between.
            match self.ipam.release_if_idle(&a, first_look).await {
                Ok(Some(r)) => {
                    tracing::warn!(
                        ip = %r.ip,
                        container = %r.key.container_id,
                        ifname = %r.key.ifname,
                        "reconcile released an address whose host veth is gone"
                    );
                    obs.first_missing.remove(&a.key);
                    released.push(r);
                }
                Ok(None) => {
                    // Gone, replaced or touched: the looks start over.
                    obs.first_missing.remove(&a.key);
                }
                Err(e) => {
                    tracing::error!(ip = %a.ip, error = %e, "reconcile could not release");
                }
            }
        }
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
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
        ferry_proto::host_veth_name(&a.key.container_id, &a.key.ifname)
    }

    /// Another pod's veth: proof that ipamd looks at the node's namespace.
    const NEIGHBOUR: &str = "fry0neighbour0";

    fn none_active() -> HashMap<AllocKey, i64> {
        HashMap::new()
    }

    fn links(names: &[&str]) -> HashSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn present_veth_is_fine_and_young_allocations_are_left_alone() {
        let mut obs = Observations::default();
        let a = alloc("aaa", 0);
        let d = decide(
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
        let d = decide(
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
        let d = decide(
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
            .filter(|f| f.kind == FindingKind::MissingVeth)
            .collect();
        assert_eq!(missing.len(), 1, "{d:?}");
        assert!(d.release.is_empty());
        // Another look before the grace has passed: still only suspect.
        let d = decide(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &none,
            t0 + 299 * S,
            GRACE,
        );
        assert!(d.release.is_empty());
        // A grace period after the first look: released.
        let d = decide(
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
        decide(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &links(&[NEIGHBOUR]),
            t0,
            GRACE,
        );
        decide(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &links(&[&veth(&a)]),
            t0 + 100 * S,
            GRACE,
        );
        let d = decide(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &links(&[NEIGHBOUR]),
            t0 + 300 * S,
            GRACE,
        );
        assert!(d.release.is_empty(), "first look was reset by the veth");
        let d = decide(
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
        let d = decide(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &links(&[NEIGHBOUR]),
            10 * S,
            Duration::ZERO,
        );
        assert!(d.release.is_empty());
        let d = decide(
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
        decide(
            &mut obs,
            &none_active(),
            &[old],
            &links(&[NEIGHBOUR]),
            t0,
            GRACE,
        );
        let new = alloc("aaa", t0 - 400 * S + 1);
        let d = decide(
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
    fn orphan_veths_are_reported_not_released() {
        let mut obs = Observations::default();
        let a = alloc("aaa", 0);
        let d = decide(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &links(&[&veth(&a), "fryorphan00001", "eth0"]),
            1000 * S,
            GRACE,
        );
        assert_eq!(d.findings.len(), 1);
        assert_eq!(d.findings[0].kind, FindingKind::OrphanVeth);
        assert!(d.findings[0].detail.contains("fryorphan00001"));
        assert!(d.release.is_empty());
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
        assert!(rec.run_once().await.unwrap().is_empty(), "first look only");
        advance(100);
        assert!(
            rec.run_once().await.unwrap().is_empty(),
            "not a grace apart yet"
        );
        // The veth came back just before the release would happen.
        advance(200);
        host.set_links(&[&veth(&keep), &veth(&gone)]);
        assert!(rec.run_once().await.unwrap().is_empty());
        host.set_links(&[&veth(&keep)]);
        advance(1);
        assert!(rec.run_once().await.unwrap().is_empty(), "clock restarted");
        advance(300);
        let released = rec.run_once().await.unwrap();
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].key, gone.key);
        assert!(ipam.get(&gone.key).is_none());
        assert!(ipam.get(&keep.key).is_some());
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
        assert!(rec.run_once().await.unwrap().is_empty(), "first look");
        advance(300);
        // The runtime ADDs the same key again: it gets the same address and
        // is about to create the veth.
        assert_eq!(ipam.allocate(add_params(&a)).await.unwrap(), a);
        assert!(
            rec.run_once().await.unwrap().is_empty(),
            "the address was just handed out again"
        );
        advance(299);
        assert!(rec.run_once().await.unwrap().is_empty(), "still young");
        // Still no veth a grace after the ADD: two fresh looks are needed.
        advance(1);
        assert!(rec.run_once().await.unwrap().is_empty(), "new first look");
        advance(300);
        let released = rec.run_once().await.unwrap();
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
        fn fry_links(&self) -> crate::store::BoxFuture<'_, Result<Vec<String>, NodeError>> {
            let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            Box::pin(async move {
                if n == self.call {
                    self.ipam.allocate(self.params.clone()).await.unwrap();
                }
                Ok(vec![NEIGHBOUR.to_string()])
            })
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
        assert!(rec.run_once().await.unwrap().is_empty());
        advance(300);
        assert!(rec.run_once().await.unwrap().is_empty());
        assert_eq!(host.calls.load(Ordering::SeqCst), 3);
        assert_eq!(ipam.get(&a.key), Some(a));
    }

    #[test]
    fn activity_after_the_first_look_restarts_it() {
        let mut obs = Observations::default();
        let a = alloc("aaa", 0);
        let t0 = 1000 * S;
        decide(
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
        let d = decide(
            &mut obs,
            &touched,
            std::slice::from_ref(&a),
            &links(&[NEIGHBOUR]),
            t0 + 400 * S,
            GRACE,
        );
        assert!(d.release.is_empty());
        assert_eq!(obs.first_missing[&a.key], (0, t0 + 400 * S));
        let d = decide(
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
        decide(
            &mut obs,
            &none_active(),
            &[a],
            &links(&[NEIGHBOUR]),
            1000 * S,
            GRACE,
        );
        assert_eq!(obs.first_missing.len(), 1);
        decide(
            &mut obs,
            &none_active(),
            &[],
            &links(&[NEIGHBOUR]),
            1001 * S,
            GRACE,
        );
        assert!(obs.first_missing.is_empty());
    }

    #[test]
    fn no_visible_veth_at_all_holds_every_release() {
        let mut obs = Observations::default();
        let a = alloc("aaa", 0);
        let t0 = 1000 * S;
        decide(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &links(&[]),
            t0,
            GRACE,
        );
        let d = decide(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &links(&[]),
            t0 + 300 * S,
            GRACE,
        );
        assert!(d.release.is_empty(), "released blind: {d:?}");
        assert!(
            d.findings
                .iter()
                .any(|f| f.kind == FindingKind::ReleasesHeld)
        );
        // The first pod networked here shows ipamd sees the node: the hold lifts.
        let d = decide(
            &mut obs,
            &none_active(),
            std::slice::from_ref(&a),
            &links(&[NEIGHBOUR]),
            t0 + 301 * S,
            GRACE,
        );
        assert_eq!(d.release, vec![a]);
    }
}
