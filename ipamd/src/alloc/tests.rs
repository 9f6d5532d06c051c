use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::model::{AllocateParams, PodMeta};
use crate::store::Snapshot;

const COOLDOWN: i64 = 1_000;
const GRACE: i64 = 5_000;

fn spec(name: &str, cidr: &str, block: u8, namespaces: &[&str]) -> PoolSpec {
    let namespaces = namespaces.iter().map(|s| s.to_string()).collect();
    PoolSpec::new(name, cidr.parse().unwrap(), block, namespaces)
}

fn allocator(pools: &[PoolSpec]) -> Allocator {
    let mut a = Allocator::new(AllocConfig {
        node: "n1".into(),
        cooldown_ms: COOLDOWN,
        block_idle_grace_ms: GRACE,
    });
    let (_, muts) = a.plan_merge_pools(pools).unwrap();
    a.apply(&muts, 0);
    a
}

fn key(i: usize) -> AllocKey {
    AllocKey {
        network: "ferry".into(),
        container_id: format!("c{i:02}"),
        ifname: "eth0".into(),
    }
}

fn params(i: usize) -> AllocateParams {
    AllocateParams {
        key: key(i),
        pod: PodMeta {
            namespace: "ns".into(),
            name: format!("pod{i}"),
            uid: format!("uid{i}"),
            netns: format!("/run/netns/p{i}"),
        },
        requested_ips: vec![],
        pool_hint: None,
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// What the core does, synchronously, with a cluster in which `foreign`
/// belongs to another node and every other block is free.
fn drive(
    a: &mut Allocator,
    p: &AllocateParams,
    now: i64,
    foreign: &[BlockClaim],
) -> Result<Allocation, IpamError> {
    for _ in 0..8 {
        match a.plan_allocate(p, now)? {
            Plan::Existing(x) => return Ok(x),
            Plan::Allocate {
                allocation,
                mutations,
            } => {
                a.apply(&mutations, now);
                return Ok(allocation);
            }
            Plan::NeedBlock { pool, requested } => {
                a.set_foreign(&pool, foreign.to_vec());
                let candidates = a.block_candidates(&pool, requested, now)?;
                let m = a
                    .plan_block_claim(&pool, candidates[0], now)
                    .expect("candidate is claimable");
                a.apply(&[m], now);
            }
        }
    }
    panic!("allocation did not converge");
}

fn release(a: &mut Allocator, k: &AllocKey, now: i64) -> Option<Allocation> {
    let (x, muts) = a.plan_release(k, now)?;
    a.apply(&muts, now);
    Some(x)
}

fn snapshot_of(a: &Allocator) -> Snapshot {
    Snapshot {
        pools: a.pool_specs().cloned().collect(),
        blocks: a.block_claims(),
        allocations: a.allocations(&AllocationFilter::default()),
        cooling: a.cooling(),
    }
}

#[test]
fn pool_selection_order() {
    let a = allocator(&[
        spec("default", "10.0.0.0/24", 28, &[]),
        spec("blue", "10.1.0.0/24", 28, &["blue-ns"]),
        spec("red", "10.2.0.0/24", 28, &["red-ns"]),
    ]);
    let mut p = params(1);
    assert_eq!(a.select_pool(&p).unwrap().name, "default");
    p.pod.namespace = "blue-ns".into();
    assert_eq!(a.select_pool(&p).unwrap().name, "blue");
    p.pool_hint = Some("red".into());
    assert_eq!(a.select_pool(&p).unwrap().name, "red");
    p.requested_ips = vec![ip("10.0.0.7")];
    assert_eq!(a.select_pool(&p).unwrap().name, "default");
    p.requested_ips = vec![ip("10.9.0.7")];
    assert!(matches!(
        a.select_pool(&p),
        Err(IpamError::InvalidArgument(_))
    ));
    p.requested_ips = vec![];
    p.pool_hint = Some("green".into());
    assert!(matches!(a.select_pool(&p), Err(IpamError::UnknownPool(n)) if n == "green"));
    p.pool_hint = Some(String::new());
    assert_eq!(a.select_pool(&p).unwrap().name, "blue");
}

#[test]
fn never_hands_out_network_or_broadcast() {
    let mut a = allocator(&[spec("default", "10.0.0.0/30", 30, &[])]);
    let x = drive(&mut a, &params(1), 0, &[]).unwrap();
    let y = drive(&mut a, &params(2), 0, &[]).unwrap();
    assert_eq!((x.ip, y.ip), (ip("10.0.0.1"), ip("10.0.0.2")));
    let err = drive(&mut a, &params(3), 0, &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pool default (10.0.0.0/30, 2 usable addresses) is exhausted: 2 allocated, 0 cooling down"
    );
    release(&mut a, &key(1), 10);
    let err = drive(&mut a, &params(3), 20, &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pool default (10.0.0.0/30, 2 usable addresses) is exhausted: 1 allocated, 1 cooling down"
    );
    // After the cooldown the address comes back.
    let z = drive(&mut a, &params(3), 10 + COOLDOWN, &[]).unwrap();
    assert_eq!(z.ip, ip("10.0.0.1"));
    assert!(a.plan_allocate(&params(4), 10 + COOLDOWN).is_ok_and(
        |p| matches!(p, Plan::NeedBlock { ref pool, requested: None } if pool == "default")
    ));
}

#[test]
fn allocate_and_release_are_idempotent() {
    let mut a = allocator(&[spec("default", "10.0.0.0/24", 28, &[])]);
    let x = drive(&mut a, &params(1), 5, &[]).unwrap();
    let again = drive(&mut a, &params(1), 50, &[]).unwrap();
    assert_eq!(x, again);
    assert_eq!(a.allocation_count(), 1);
    assert!(release(&mut a, &key(1), 60).is_some());
    assert!(release(&mut a, &key(1), 61).is_none());
    assert!(a.plan_release(&key(9), 61).is_none());
}

#[test]
fn cooldown_is_fifo_and_prefers_never_used() {
    // First block 10.0.0.0/29: .1 to .7 usable (.0 is the pool's network).
    let mut a = allocator(&[spec("default", "10.0.0.0/27", 29, &[])]);
    // .1 to .6 taken; .7 stays never used.
    for i in 0..6 {
        drive(&mut a, &params(i), 0, &[]).unwrap();
    }
    assert_eq!(a.owned_blocks(), vec!["10.0.0.0/29".parse().unwrap()]);
    // Free .3 then .1; .7 is still never used and must come first.
    release(&mut a, &key(2), 100);
    release(&mut a, &key(0), 200);
    let n = drive(&mut a, &params(10), 5_000, &[]).unwrap();
    assert_eq!(n.ip, ip("10.0.0.7"));
    // Now the earliest freed (.3) before .1.
    let n = drive(&mut a, &params(11), 5_000, &[]).unwrap();
    assert_eq!(n.ip, ip("10.0.0.3"));
    let n = drive(&mut a, &params(12), 5_000, &[]).unwrap();
    assert_eq!(n.ip, ip("10.0.0.1"));
    // Block full (nothing cooled down): the next one claims a new block.
    let n = drive(&mut a, &params(13), 5_000, &[]).unwrap();
    assert_eq!(n.block, "10.0.0.8/29".parse().unwrap());
    assert_eq!(n.ip, ip("10.0.0.8"));
}

#[test]
fn claims_new_block_only_when_full() {
    let mut a = allocator(&[spec("default", "10.0.0.0/27", 29, &[])]);
    for i in 0..7 {
        drive(&mut a, &params(i), 0, &[]).unwrap();
    }
    assert_eq!(a.owned_blocks().len(), 1);
    // Freed but cooling: the block has no allocatable address, so claim.
    release(&mut a, &key(0), 10);
    let foreign = vec![BlockClaim {
        pool: "default".into(),
        cidr: "10.0.0.8/29".parse().unwrap(),
        node: "n2".into(),
        claimed_unix_ms: 0,
    }];
    let x = drive(&mut a, &params(20), 20, &foreign).unwrap();
    assert_eq!(x.block, "10.0.0.16/29".parse().unwrap());
}

#[test]
fn requested_addresses() {
    let mut a = allocator(&[
        spec("default", "10.0.0.0/27", 29, &[]),
        spec("blue", "10.1.0.0/27", 29, &["blue"]),
    ]);
    let foreign = vec![BlockClaim {
        pool: "default".into(),
        cidr: "10.0.0.24/29".parse().unwrap(),
        node: "n2".into(),
        claimed_unix_ms: 0,
    }];
    let mut p = params(1);
    p.requested_ips = vec![ip("10.0.0.12")];
    // Claims the block that holds it, even though no block is full.
    let x = drive(&mut a, &p, 0, &foreign).unwrap();
    assert_eq!(
        (x.ip, x.block),
        (ip("10.0.0.12"), "10.0.0.8/29".parse().unwrap())
    );
    // A requested address wins over the namespace.
    let mut p = params(2);
    p.pod.namespace = "blue".into();
    p.requested_ips = vec![ip("10.0.0.13"), ip("10.0.0.13")];
    assert_eq!(drive(&mut a, &p, 0, &foreign).unwrap().pool, "default");

    let unavailable = |a: &mut Allocator, i: usize, addr: &str, now: i64| {
        let mut p = params(i);
        p.requested_ips = vec![ip(addr)];
        match drive(a, &p, now, &foreign) {
            Err(IpamError::AddressUnavailable { ip: got, reason }) => {
                assert_eq!(got, ip(addr));
                reason
            }
            other => panic!("expected AddressUnavailable, got {other:?}"),
        }
    };
    assert!(unavailable(&mut a, 3, "10.0.0.12", 0).contains("allocated to container c01"));
    assert!(unavailable(&mut a, 3, "10.0.0.0", 0).contains("network or broadcast"));
    assert!(unavailable(&mut a, 3, "10.0.0.31", 0).contains("network or broadcast"));
    assert!(unavailable(&mut a, 3, "10.0.0.25", 0).contains("node n2"));
    release(&mut a, &key(1), 100);
    assert!(unavailable(&mut a, 3, "10.0.0.12", 200).contains("cooling down until unix ms 1100"));
    let mut p = params(3);
    p.requested_ips = vec![ip("10.0.0.12")];
    assert_eq!(
        drive(&mut a, &p, 1_100, &foreign).unwrap().ip,
        ip("10.0.0.12")
    );
    assert!(a.cooling().is_empty());
    // The same key asking for another address is refused, not moved.
    assert!(unavailable(&mut a, 3, "10.0.0.14", 1_100).contains("already holds 10.0.0.12"));
    // Two different addresses for one attachment cannot be met.
    let mut p = params(4);
    p.requested_ips = vec![ip("10.0.0.14"), ip("10.0.0.15")];
    assert!(matches!(
        drive(&mut a, &p, 0, &foreign),
        Err(IpamError::InvalidArgument(m)) if m.contains("10.0.0.14, 10.0.0.15")
    ));
}

#[test]
fn idle_blocks_are_released_but_the_last_is_kept() {
    let mut a = allocator(&[spec("default", "10.0.0.0/27", 29, &[])]);
    for i in 0..9 {
        drive(&mut a, &params(i), 0, &[]).unwrap();
    }
    assert_eq!(a.owned_blocks().len(), 2);
    for i in 0..9 {
        release(&mut a, &key(i), 100);
    }
    // Not yet past the grace period.
    assert!(a.plan_release_idle(100 + GRACE - 1).0.is_empty());
    let (gone, muts) = a.plan_release_idle(100 + GRACE);
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].cidr, "10.0.0.8/29".parse().unwrap());
    a.apply(&muts, 100 + GRACE);
    assert_eq!(a.owned_blocks(), vec!["10.0.0.0/29".parse().unwrap()]);
    // The released block's cooling entries went with it.
    assert!(a.cooling().iter().all(|(ip, _)| ip.octets()[3] < 8));
    assert!(a.plan_release_idle(100 + 10 * GRACE).0.is_empty());
}

#[test]
fn idle_block_with_address_still_cooling_is_kept() {
    let mut a = Allocator::new(AllocConfig {
        node: "n1".into(),
        cooldown_ms: 10 * GRACE,
        block_idle_grace_ms: GRACE,
    });
    let (_, muts) = a
        .plan_merge_pools(&[spec("default", "10.0.0.0/27", 29, &[])])
        .unwrap();
    a.apply(&muts, 0);
    for i in 0..8 {
        drive(&mut a, &params(i), 0, &[]).unwrap();
    }
    release(&mut a, &key(7), 10);
    assert!(a.plan_release_idle(10 + 2 * GRACE).0.is_empty());
    let (gone, _) = a.plan_release_idle(10 + 10 * GRACE);
    assert_eq!(gone.len(), 1);
}

#[test]
fn pool_merge_and_admin_rules() {
    let mut a = allocator(&[spec("default", "10.0.0.0/24", 28, &[])]);
    // Overlap, second default, duplicate namespace.
    assert!(matches!(
        a.plan_add_pool(&spec("x", "10.0.0.128/25", 28, &["x"])),
        Err(IpamError::InvalidArgument(m)) if m.contains("overlaps pool default")
    ));
    assert!(matches!(
        a.plan_add_pool(&spec("x", "10.5.0.0/24", 28, &[])),
        Err(IpamError::Conflict(m)) if m.contains("second default")
    ));
    let m = a
        .plan_add_pool(&spec("blue", "10.1.0.0/24", 28, &["b"]))
        .unwrap();
    a.apply(&m, 0);
    assert!(matches!(
        a.plan_add_pool(&spec("green", "10.2.0.0/24", 28, &["b"])),
        Err(IpamError::InvalidArgument(m)) if m.contains("namespace b")
    ));
    assert!(matches!(
        a.plan_add_pool(&spec("blue", "10.3.0.0/24", 28, &["q"])),
        Err(IpamError::Conflict(_))
    ));
    // Remove: default refused, held refused, unknown not found.
    assert!(matches!(
        a.plan_remove_pool("default"),
        Err(IpamError::Conflict(_))
    ));
    assert!(matches!(
        a.plan_remove_pool("nope"),
        Err(IpamError::NotFound(_))
    ));
    // A pool another pool admits traffic from stays until that one lets go.
    let mut teal = spec("teal", "10.4.0.0/24", 28, &["t"]);
    teal.allow_from = vec!["blue".into()];
    a.apply(&a.plan_add_pool(&teal).unwrap(), 0);
    assert!(matches!(
        a.plan_remove_pool("blue"),
        Err(IpamError::Conflict(m)) if m.contains("allow_from of pool(s) teal")
    ));
    let (_, muts) = a.plan_remove_pool("teal").unwrap();
    a.apply(&muts, 0);
    let mut p = params(1);
    p.pool_hint = Some("blue".into());
    drive(&mut a, &p, 0, &[]).unwrap();
    assert!(
        matches!(a.plan_remove_pool("blue"), Err(IpamError::Conflict(m)) if m.contains("1 allocation"))
    );
    release(&mut a, &key(1), 1);
    let (blocks, muts) = a.plan_remove_pool("blue").unwrap();
    assert_eq!(blocks.len(), 1);
    a.apply(&muts, 2);
    assert!(a.pool("blue").is_none());
    assert_eq!(a.owned_blocks().len(), 0);

    // At start: a changed cidr under allocations is refused; a pool that is
    // no longer configured survives while it holds allocations.
    drive(&mut a, &params(2), 0, &[]).unwrap();
    assert!(matches!(
        a.plan_merge_pools(&[spec("default", "10.9.0.0/24", 28, &[])]),
        Err(IpamError::Conflict(m)) if m.contains("holds 1 allocation")
    ));
    let (_, muts) = a
        .plan_merge_pools(&[
            spec("main", "10.9.0.0/24", 28, &["ns"]),
            spec("other", "10.8.0.0/24", 28, &["x"]),
        ])
        .unwrap();
    a.apply(&muts, 0);
    assert!(a.pool("default").is_some());
    assert!(a.pool("main").is_some());
    // No default at all is refused.
    let empty = allocator(&[spec("default", "10.0.0.0/24", 28, &[])]);
    assert!(
        empty
            .plan_merge_pools(&[spec("main", "10.9.0.0/24", 28, &["ns"])])
            .is_err()
    );
}

#[test]
fn run_time_pools_outlive_restarts_and_configured_ones_stay() {
    let configured = [
        spec("default", "10.0.0.0/24", 28, &[]),
        spec("blue", "10.1.0.0/24", 28, &["blue"]),
    ];
    let mut a = allocator(&configured);
    let mut green = spec("green", "10.2.0.0/24", 28, &["green"]);
    green.allow_from = vec!["nope".into()];
    assert!(matches!(
        a.plan_add_pool(&green),
        Err(IpamError::InvalidArgument(m)) if m.contains("unknown pool \"nope\"")
    ));
    green.allow_from = vec!["blue".into()];
    let m = a.plan_add_pool(&green).unwrap();
    a.apply(&m, 0);
    assert!(a.pool("green").is_some_and(|p| p.runtime));
    // A configured pool would come back at the next start: refused, and
    // the message says what to do instead.
    assert!(matches!(
        a.plan_remove_pool("blue"),
        Err(IpamError::Conflict(m)) if m.contains("configuration")
    ));
    // Restart with the same configuration: green is kept though empty.
    let (_, muts) = a.plan_merge_pools(&configured).unwrap();
    a.apply(&muts, 1);
    assert!(a.pool("green").is_some_and(|p| p.runtime));
    // A configured pool dropped from the configuration goes (it is empty).
    let (_, muts) = a.plan_merge_pools(&configured[..1]).unwrap();
    a.apply(&muts, 2);
    assert!(a.pool("blue").is_none());
    assert!(a.pool("green").is_some());
    // A run-time pool overlapping a newly configured one stops the start,
    // naming both.
    assert!(matches!(
        a.plan_merge_pools(&[configured[0].clone(), spec("g2", "10.2.0.0/25", 28, &["g2"])]),
        Err(IpamError::InvalidArgument(m)) if m.contains("green") && m.contains("g2")
    ));
    // Configuring a pool of the same name takes it over from run time.
    let (_, muts) = a
        .plan_merge_pools(&[
            configured[0].clone(),
            spec("green", "10.2.0.0/24", 28, &["green"]),
        ])
        .unwrap();
    a.apply(&muts, 3);
    assert!(a.pool("green").is_some_and(|p| !p.runtime));
}

#[test]
fn a_pool_dropped_from_the_configuration_while_in_use_can_be_removed_once_empty() {
    let configured = [
        spec("default", "10.0.0.0/24", 28, &[]),
        spec("blue", "10.1.0.0/24", 28, &["blue"]),
    ];
    let mut a = allocator(&configured);
    let mut p = params(1);
    p.pool_hint = Some("blue".into());
    drive(&mut a, &p, 0, &[]).unwrap();
    let (_, muts) = a.plan_merge_pools(&configured[..1]).unwrap();
    a.apply(&muts, 1);
    assert!(a.pool("blue").is_some_and(|p| p.runtime));
    assert!(matches!(
        a.plan_remove_pool("blue"),
        Err(IpamError::Conflict(m)) if m.contains("1 allocation")
    ));
    release(&mut a, &key(1), 2);
    let (_, muts) = a.plan_remove_pool("blue").unwrap();
    a.apply(&muts, 3);
    assert!(a.pool("blue").is_none());
}

#[test]
fn requested_address_errors_name_the_address_and_the_pool() {
    let mut a = allocator(&[spec("default", "10.0.0.0/24", 28, &[])]);
    let mut p = params(1);
    p.requested_ips = vec![ip("10.0.0.5")];
    drive(&mut a, &p, 0, &[]).unwrap();
    let mut q = params(2);
    q.requested_ips = vec![ip("10.0.0.5")];
    let e = drive(&mut a, &q, 0, &[]).unwrap_err().to_string();
    assert!(
        e.contains("10.0.0.5") && e.contains("pool default") && e.contains("c01"),
        "{e}"
    );
    q.requested_ips = vec![ip("192.168.9.9")];
    let e = drive(&mut a, &q, 0, &[]).unwrap_err().to_string();
    assert!(
        e.contains("192.168.9.9 is outside every pool (default 10.0.0.0/24)"),
        "{e}"
    );
}

#[test]
fn gc_releases_only_unlisted_keys_of_the_network() {
    let mut a = allocator(&[spec("default", "10.0.0.0/24", 28, &[])]);
    for i in 0..4 {
        drive(&mut a, &params(i), 0, &[]).unwrap();
    }
    let mut other = params(9);
    other.key.network = "other-net".into();
    drive(&mut a, &other, 0, &[]).unwrap();
    drive(&mut a, &params(4), 5, &[]).unwrap();
    drive(&mut a, &params(5), 8, &[]).unwrap();
    // The cut-off is 5: key(4) is exactly that old, key(5) is younger.
    let (gone, muts) = a.plan_gc("ferry", &[key(1), key(3)], 5, 10);
    a.apply(&muts, 10);
    assert_eq!(
        gone.iter().map(|g| g.key.clone()).collect::<Vec<_>>(),
        vec![key(0), key(2), key(4)]
    );
    assert_eq!(a.allocation_count(), 4);
}

#[test]
fn address_states() {
    let mut a = allocator(&[spec("default", "10.0.0.0/27", 29, &[])]);
    drive(&mut a, &params(1), 0, &[]).unwrap();
    drive(&mut a, &params(2), 0, &[]).unwrap();
    release(&mut a, &key(2), 10);
    assert_eq!(a.address(ip("10.0.0.0"), 20).state, AddressState::Reserved);
    assert_eq!(a.address(ip("10.0.0.1"), 20).state, AddressState::Allocated);
    assert_eq!(
        a.address(ip("10.0.0.2"), 20).state,
        AddressState::Cooling {
            reusable_unix_ms: 10 + COOLDOWN
        }
    );
    assert_eq!(
        a.address(ip("10.0.0.2"), 10 + COOLDOWN).state,
        AddressState::Free
    );
    assert_eq!(a.address(ip("10.0.0.3"), 20).state, AddressState::Free);
    assert_eq!(a.address(ip("10.0.0.9"), 20).state, AddressState::NotOwned);
    assert_eq!(a.address(ip("192.168.0.1"), 20).pool, None);
}

#[test]
fn restore_rebuilds_the_same_state() {
    let mut a = allocator(&[spec("default", "10.0.0.0/27", 29, &[])]);
    for i in 0..10 {
        drive(&mut a, &params(i), 0, &[]).unwrap();
    }
    release(&mut a, &key(3), 7);
    release(&mut a, &key(8), 9);
    let b = Allocator::restore(a.config().clone(), &snapshot_of(&a));
    assert_eq!(snapshot_of(&b), snapshot_of(&a));
    // And it decides the same.
    assert_eq!(
        b.plan_allocate(&params(20), 100).unwrap(),
        a.plan_allocate(&params(20), 100).unwrap()
    );
    assert_eq!(b.block_usage(None, 100), a.block_usage(None, 100));
}

// ------------------------------------------------------------- properties

#[derive(Debug, Clone)]
enum Op {
    Allocate(usize),
    Request(usize, u8),
    Release(usize),
    Advance(i64),
    ReleaseIdle,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..26usize).prop_map(Op::Allocate),
        2 => (0..26usize, 0..32u8).prop_map(|(k, o)| Op::Request(k, o)),
        5 => (0..26usize).prop_map(Op::Release),
        3 => (0..1_500i64).prop_map(Op::Advance),
        1 => Just(Op::ReleaseIdle),
        1 => Just(Op::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn allocator_invariants(ops in proptest::collection::vec(op(), 1..120)) {
        let pool = spec("default", "10.0.0.0/27", 29, &[]);
        let foreign_block: Ipv4Net = "10.0.0.16/29".parse().unwrap();
        let foreign = vec![BlockClaim {
            pool: "default".into(),
            cidr: foreign_block,
            node: "n2".into(),
            claimed_unix_ms: 0,
        }];
        let mut a = allocator(std::slice::from_ref(&pool));
        let mut now = 0i64;
        let mut held: HashMap<AllocKey, Ipv4Addr> = HashMap::new();
        let mut released_at: HashMap<Ipv4Addr, i64> = HashMap::new();

        for op in ops {
            match op {
                Op::Allocate(k) | Op::Request(k, _) => {
                    let mut p = params(k);
                    if let Op::Request(_, o) = op {
                        p.requested_ips = vec![Ipv4Addr::new(10, 0, 0, o)];
                    }
                    match drive(&mut a, &p, now, &foreign) {
                        Ok(x) => {
                            if let Some(prev) = held.get(&key(k)) {
                                // (d) idempotent
                                prop_assert_eq!(*prev, x.ip);
                            } else {
                                // (c) cooldown respected
                                if let Some(t) = released_at.get(&x.ip) {
                                    prop_assert!(now >= t + COOLDOWN,
                                        "{} released at {} reused at {}", x.ip, t, now);
                                }
                                held.insert(key(k), x.ip);
                            }
                        }
                        Err(IpamError::Exhausted { allocated, cooling, size, .. }) => {
                            prop_assert!(matches!(op, Op::Allocate(_)));
                            prop_assert_eq!(size, 30);
                            // Every usable address outside the foreign block is
                            // held or cooling.
                            prop_assert_eq!(allocated + cooling, 22);
                            prop_assert_eq!(allocated as usize, held.len());
                        }
                        Err(IpamError::AddressUnavailable { .. }) => {
                            prop_assert!(matches!(op, Op::Request(..)));
                        }
                        Err(e) => prop_assert!(false, "unexpected error {e}"),
                    }
                }
                Op::Release(k) => {
                    let r = release(&mut a, &key(k), now);
                    prop_assert_eq!(r.as_ref().map(|x| x.ip), held.remove(&key(k)));
                    if let Some(x) = r {
                        released_at.insert(x.ip, now);
                    }
                }
                Op::Advance(ms) => now += ms,
                Op::ReleaseIdle => {
                    let (_, muts) = a.plan_release_idle(now);
                    a.apply(&muts, now);
                }
                Op::Restart => {
                    let snap = snapshot_of(&a);
                    a = Allocator::restore(a.config().clone(), &snap);
                    prop_assert_eq!(snapshot_of(&a), snap);
                }
            }

            // (a) one holder per address, and the allocator agrees with the model.
            let all = a.allocations(&AllocationFilter::default());
            prop_assert_eq!(all.len(), held.len());
            let mut seen = std::collections::HashSet::new();
            let owned = a.owned_blocks();
            for x in &all {
                prop_assert!(seen.insert(x.ip), "{} held twice", x.ip);
                prop_assert_eq!(held.get(&x.key), Some(&x.ip));
                // (b) inside an owned block, never a foreign or reserved one.
                prop_assert!(owned.iter().any(|b| b.contains(&x.ip) && *b == x.block));
                prop_assert!(!foreign_block.contains(&x.ip));
                prop_assert!(!pool::is_reserved(&pool, x.ip));
            }
            prop_assert!(!owned.contains(&foreign_block));
            prop_assert!(!owned.is_empty() || held.is_empty());
        }
    }
}
