use futures::future::BoxFuture;

use super::*;
use crate::clock::ManualClock;
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
    let seen = Look {
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
    decide(obs, &seen, grace)
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
    let mut seen = Look {
        links: host.clone(),
        link_addresses: HashMap::from([
            ("fry00000000001".to_string(), "10.250.0.1".parse().unwrap()),
            ("fry00000000002".to_string(), "10.244.0.9".parse().unwrap()),
        ]),
        pool_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        now_ms: 1000 * S,
        ..Look::default()
    };
    let first = decide(&mut obs, &seen, GRACE);
    assert!(first.unplug.is_empty());
    seen.now_ms += 10 * GRACE.as_millis() as i64;
    let later = decide(&mut obs, &seen, GRACE);
    assert_eq!(later.unplug, vec![host[1].clone()]);
    let kept: Vec<&str> = later
        .findings
        .iter()
        .filter(|f| f.detail.contains("kept"))
        .map(|f| f.detail.as_str())
        .collect();
    assert!(
        kept.len() == 1 && kept[0].contains("fry00000000001 ") && kept[0].contains("10.250.0.1"),
        "{kept:?}"
    );
}

#[test]
fn a_live_netns_keeps_the_address_of_a_missing_veth() {
    let mut obs = Observations::default();
    let a = alloc("aaa", 0);
    let mut seen = Look {
        allocations: vec![Arc::new(a.clone())],
        live_netns: HashSet::from([a.pod.netns.clone()]),
        owned_blocks: vec!["10.244.0.0/26".parse().unwrap()],
        now_ms: 1000 * S,
        ..Look::default()
    };
    for _ in 0..3 {
        let d = decide(&mut obs, &seen, GRACE);
        assert!(d.release.is_empty(), "{d:?}");
        assert_eq!(d.findings.len(), 1);
        assert_eq!(d.findings[0].kind, FindingKind::MissingVeth);
        assert!(d.findings[0].detail.contains("kept"));
        seen.now_ms += 300 * S;
    }
    // The netns goes away: only now do the two looks begin.
    seen.live_netns.clear();
    assert!(decide(&mut obs, &seen, GRACE).release.is_empty());
    seen.now_ms += 300 * S;
    assert_eq!(decide(&mut obs, &seen, GRACE).release, vec![a]);
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
    let seen = Look {
        owned_blocks: vec![
            "10.244.0.0/26".parse().unwrap(),
            "10.244.0.64/26".parse().unwrap(),
        ],
        foreign_claims: vec![
            claim("10.244.0.64/26", "node-b"),
            claim("10.244.1.0/26", "node-c"),
        ],
        now_ms: 1000 * S,
        ..Look::default()
    };
    let d = decide(&mut obs, &seen, GRACE);
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
    let seen = Look {
        allocations: [&a, &b, &c].map(|x| Arc::new(x.clone())).to_vec(),
        links: links(&[&veth(&a), &veth(&b), &veth(&c)]),
        owned_blocks: vec!["10.244.0.0/26".parse().unwrap()],
        now_ms: 1000 * S,
        ..Look::default()
    };
    let d = decide(&mut obs, &seen, GRACE);
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

#[tokio::test]
async fn reconciler_releases_through_the_core() {
    use crate::node::fake::FakeHost;

    let (ipam, clock) = core_at(1_000_000).await;
    let host = Arc::new(FakeHost::default());
    let rec = Reconciler::new(ipam.clone(), host.clone(), GRACE);
    let mut keep = alloc("keep", 0);
    let mut gone = alloc("gone", 0);
    for a in [&mut keep, &mut gone] {
        *a = ipam.allocate(add_params(a)).await.unwrap();
    }
    host.set_links(&[&veth(&keep), "fryorphan00001"]);
    let advance = |secs: i64| clock.advance(secs * S);

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
async fn core_at(start_ms: i64) -> (Arc<Ipam>, Arc<ManualClock>) {
    use crate::cluster::local::LocalCluster;
    use crate::ipam::IpamOptions;
    use crate::store::memory::MemoryStore;

    let clock = ManualClock::at(start_ms);
    let ipam = Ipam::open_with_clock(
        IpamOptions::one_pool_for_tests(),
        Arc::new(MemoryStore::new()),
        Arc::new(LocalCluster),
        clock.clone(),
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

    let (ipam, clock) = core_at(1_000_000).await;
    let host = Arc::new(FakeHost::default());
    host.set_links(&[NEIGHBOUR]);
    let rec = Reconciler::new(ipam.clone(), host.clone(), GRACE);
    let advance = |secs: i64| clock.advance(secs * S);
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
    fn delete_link<'a>(&'a self, _link: &'a HostLink) -> BoxFuture<'a, Result<bool, NodeError>> {
        Box::pin(async { Ok(false) })
    }
    fn veth_addresses(&self) -> BoxFuture<'_, Result<Vec<VethAddress>, NodeError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

#[tokio::test]
async fn a_retried_add_during_the_release_keeps_the_address() {
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
    let rec = Reconciler::new(ipam.clone(), host.clone(), GRACE);
    let advance = |secs: i64| clock.advance(secs * S);
    advance(400);
    assert!(rec.run_once().await.unwrap().released.is_empty());
    advance(300);
    assert!(rec.run_once().await.unwrap().released.is_empty());
    assert_eq!(host.calls.load(std::sync::atomic::Ordering::SeqCst), 3);
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
