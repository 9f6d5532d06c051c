use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::*;
use crate::clock::ManualClock;
use crate::cluster::ClusterError;
use crate::cluster::local::LocalCluster;
use crate::model::AllocationFilter;
use crate::model::{AddressState, PodMeta};
use crate::node::scan::VethAddress;
use crate::store::StoreError;
use crate::store::memory::MemoryStore;
use crate::store::sled::SledStore;
use futures::future::BoxFuture;
use std::time::UNIX_EPOCH;

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

/// A clock the test moves, and the core's handle on it.
fn test_clock() -> (Arc<ManualClock>, Arc<dyn Clock>) {
    let c = ManualClock::at(1_700_000_000_000);
    (c.clone(), c)
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

async fn open_mem(pools: Vec<PoolSpec>) -> (Ipam, Arc<MemoryStore>, Arc<ManualClock>) {
    let store = Arc::new(MemoryStore::new());
    let (tc, clock) = test_clock();
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
    let adopted: Vec<(AllocKey, Ipv4Addr)> = adopted.into_iter().map(|a| (a.key, a.ip)).collect();
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
    let now = tc.now_unix_ms();
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
    let first_look = tc.now_unix_ms();
    tc.advance(1_000);
    assert_eq!(ipam.allocate(params(1)).await.unwrap(), a);
    assert_eq!(ipam.release_if_idle(&a, first_look).await.unwrap(), None);
    assert_eq!(ipam.get(&a.key), Some(a.clone()));
    // A CHECK is activity too; get() is not.
    tc.advance(1_000);
    let later_look = tc.now_unix_ms();
    assert_eq!(ipam.check(&a.key), Some(a.clone()));
    assert_eq!(ipam.release_if_idle(&a, later_look).await.unwrap(), None);
    tc.advance(1);
    let idle_since = tc.now_unix_ms();
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
    let t0 = tc.now_unix_ms();
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
    let (tc, clock) = test_clock();
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
    let (tc, clock) = test_clock();
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
    let (_tc, clock) = test_clock();
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
    let (_tc, clock) = test_clock();
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
    let (tc, clock) = test_clock();
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

/// Allocates and releases from 8 tasks until told to stop, counting rounds
/// in `rounds`; cooldown 0, so addresses also move from key to key while
/// the checks run.
fn churn(
    ipam: &Arc<Ipam>,
    stop: &Arc<AtomicBool>,
    rounds: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..8)
        .map(|w| {
            let (ipam, stop, rounds) = (ipam.clone(), stop.clone(), rounds.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    ipam.allocate(params(w * 100 + n % 8)).await.unwrap();
                    ipam.release(&params(w * 100 + (n + 4) % 8).key)
                        .await
                        .unwrap();
                    n += 1;
                    rounds.fetch_add(1, Ordering::SeqCst);
                }
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
    let rounds = Arc::new(AtomicUsize::new(0));
    let workers = churn(&ipam, &stop, &rounds);
    // At least 200 checks, and on until the workers have changed the state
    // many times meanwhile: a fast check must not finish before the churn.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut checks = 0;
    while checks < 200 || rounds.load(Ordering::SeqCst) < 400 {
        let diffs = ipam.check_consistency().await.unwrap();
        assert!(diffs.is_empty(), "check {checks} under churn: {diffs:?}");
        checks += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "the churn made only {} rounds in a minute",
            rounds.load(Ordering::SeqCst)
        );
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
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

#[tokio::test]
async fn owned_blocks_are_published_on_every_change_to_them() {
    let (ipam, _store, _tc) = open_mem(vec![spec("default", "10.244.0.0/16", 26, &[])]).await;
    let cidrs = |v: &[BlockClaim]| v.iter().map(|b| b.cidr).collect::<Vec<_>>();
    let mut owned = ipam.watch_owned_blocks();
    assert!(owned.borrow_and_update().is_empty());

    let a = ipam.allocate(params(1)).await.unwrap();
    assert!(owned.has_changed().unwrap(), "a claim is published");
    assert_eq!(cidrs(&owned.borrow_and_update()), vec![a.block]);
    ipam.allocate(params(2)).await.unwrap();
    assert!(
        !owned.has_changed().unwrap(),
        "an address in an owned block changes no block"
    );

    ipam.add_pool(spec("team", "10.50.0.0/24", 28, &["team"]), &[])
        .await
        .unwrap();
    let mut in_team = params(3);
    in_team.pool_hint = Some("team".into());
    let t = ipam.allocate(in_team.clone()).await.unwrap();
    assert_eq!(cidrs(&owned.borrow_and_update()), vec![t.block, a.block]);
    ipam.release(&in_team.key).await.unwrap();
    ipam.remove_pool("team").await.unwrap();
    assert!(
        owned.has_changed().unwrap(),
        "a removed pool's blocks are published"
    );
    assert_eq!(cidrs(&owned.borrow_and_update()), vec![a.block]);
}
