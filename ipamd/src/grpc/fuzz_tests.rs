//! Fuzzing ipamd's request validation: random and mutated requests straight
//! into the tonic handlers of `Ipam` and `IpamAdmin` (every RPC, including
//! CollectGarbage), over the real core on an in-memory store. One world
//! (runtime, core, services) per test; its state carries over from case to
//! case, so allocations, pools and releases interact.
//!
//! Properties: no handler panics, and every rejection is a status from the
//! documented mapping (INVALID_ARGUMENT, FAILED_PRECONDITION,
//! RESOURCE_EXHAUSTED, ALREADY_EXISTS, NOT_FOUND, ABORTED) with a message,
//! never INTERNAL or UNKNOWN; FAILED_PRECONDITION exactly when the client
//! version is incompatible; a successful Allocate is a /32 that Check then
//! finds under the same key; the core stays consistent with its store.
//!
//! Release's `host_link` stays unset: a handler that deletes links would
//! act on this (the test's) network namespace.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::local::LocalCluster;
use crate::grpc::{AdminService, IpamService};
use crate::ipam::{Ipam, IpamOptions};
use crate::model::PoolSpec;
use crate::node::fake::FakeHost;
use crate::reconcile::Reconciler;
use crate::store::memory::MemoryStore;
use ferry_proto::v1 as pb;
use ferry_proto::v1::ipam_admin_server::IpamAdmin;
use ferry_proto::v1::ipam_server::Ipam as IpamRpc;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use tonic::{Code, Request, Status};

const PLUGIN_CASES: u32 = 40_000;
const ADMIN_CASES: u32 = 30_000;

/// The codes ipamd's error mapping (`From<IpamError> for Status` in `grpc/mod.rs`) lets a
/// request end in, each of which the plugin turns into a CNI code.
/// UNAVAILABLE (cluster store down, or the hold after a database rebuild)
/// cannot happen here: the cluster store is local and the store in memory is
/// never rebuilt.
const DOCUMENTED: [Code; 6] = [
    Code::InvalidArgument,
    Code::FailedPrecondition,
    Code::ResourceExhausted,
    Code::AlreadyExists,
    Code::NotFound,
    Code::Aborted,
];

struct World {
    rt: tokio::runtime::Runtime,
    svc: IpamService,
    admin: AdminService,
    ipam: Arc<Ipam>,
}

impl World {
    fn new() -> World {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (svc, admin, ipam) = rt.block_on(async {
            let opts = IpamOptions {
                node: "n1".into(),
                pools: vec![PoolSpec::new(
                    "default",
                    "10.244.0.0/20".parse().unwrap(),
                    26,
                    vec![],
                )],
                cooldown: Duration::from_secs(1),
                block_idle_grace: Duration::from_secs(600),
                gc_min_age: Duration::ZERO,
            };
            let ipam = Arc::new(
                Ipam::open(opts, Arc::new(MemoryStore::new()), Arc::new(LocalCluster))
                    .await
                    .unwrap(),
            );
            // In memory: never the real netns.
            let host = Arc::new(FakeHost::default());
            let rec = Arc::new(Reconciler::new(
                ipam.clone(),
                host,
                Duration::from_secs(300),
            ));
            (
                IpamService::new(ipam.clone(), 1480, "/state".into(), 1),
                AdminService::new(ipam.clone(), rec),
                ipam,
            )
        });
        World {
            rt,
            svc,
            admin,
            ipam,
        }
    }
}

// ---- strategies -------------------------------------------------------------

fn nasty() -> impl Strategy<Value = String> {
    let fixed: Vec<&'static str> = vec![
        "",
        " ",
        "\0",
        "\t",
        "eth0 ",
        " c1",
        "a/b",
        "eth0:1",
        ".",
        "..",
        "0123456789abcdef",
        "ééééééé",
        "10.244.0.5",
        "10.244.0.5/32",
        "10.244.0.5/33",
        "10.244.0.5/-1",
        "10.244.0.5/",
        "10.244.0",
        "10.244.0.256",
        "300.1.1.1",
        "::1",
        "fd00::5/64",
        "0.0.0.0",
        "255.255.255.255",
        "10.244.0.0/20",
        "10.0.0.0/8",
        "0.0.0.0/0",
        "default",
        "blue",
        "ferry",
    ];
    prop_oneof![
        6 => prop::sample::select(fixed).prop_map(str::to_string),
        4 => "\\PC{0,20}",
        1 => any::<String>(),
        1 => (1usize..50_000, prop::sample::select(vec!["x", "é", "\0", "/"]))
            .prop_map(|(n, s)| s.repeat(n)),
    ]
}

fn client_version() -> impl Strategy<Value = String> {
    let v = ferry_proto::PROTOCOL_VERSION;
    prop_oneof![
        12 => Just(v.to_string()),
        1 => Just(format!("{v}-rc1")),
        1 => Just("99.0.0".to_string()),
        1 => Just("0".to_string()),
        1 => nasty(),
    ]
}

/// Mostly a small set of well-formed keys (so requests meet earlier ones),
/// sometimes a broken or missing one.
fn key() -> impl Strategy<Value = Option<pb::AllocationKey>> {
    let part = |good: Vec<&'static str>| {
        prop_oneof![
            8 => prop::sample::select(good).prop_map(str::to_string),
            1 => nasty(),
        ]
    };
    let good = (
        part(vec!["ferry", "ferry", "other"]),
        (0u8..40).prop_map(|i| format!("c{i}")),
        part(vec!["eth0", "eth0", "net1"]),
    )
        .prop_map(|(network, container_id, ifname)| pb::AllocationKey {
            network,
            container_id,
            ifname,
        });
    prop_oneof![
        10 => good.prop_map(Some),
        2 => (nasty(), nasty(), nasty()).prop_map(|(network, container_id, ifname)| {
            Some(pb::AllocationKey { network, container_id, ifname })
        }),
        1 => Just(None),
    ]
}

fn ip_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0u8..16, any::<u8>()).prop_map(|(c, d)| format!("10.244.{c}.{d}")),
        1 => (0u8..16, any::<u8>(), 0u8..40).prop_map(|(c, d, p)| format!("10.244.{c}.{d}/{p}")),
        1 => (0u8..4, any::<u8>()).prop_map(|(c, d)| format!("10.9.{c}.{d}")),
        1 => any::<u32>().prop_map(|n| std::net::Ipv4Addr::from(n).to_string()),
        2 => nasty(),
    ]
}

fn pod() -> impl Strategy<Value = Option<pb::PodMeta>> {
    prop::option::of((nasty(), nasty(), nasty(), nasty()).prop_map(
        |(namespace, name, uid, netns)| pb::PodMeta {
            namespace,
            name,
            uid,
            netns,
        },
    ))
}

fn pool_name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec!["default", "blue", "red", "team-a"]).prop_map(str::to_string),
        1 => nasty(),
    ]
}

fn pool() -> impl Strategy<Value = Option<pb::Pool>> {
    let cidr = prop_oneof![
        6 => prop::sample::select(vec![
            "10.9.0.0/24", "10.9.0.0/22", "10.10.0.0/16", "10.11.0.0/28",
            "10.244.0.0/24", "10.244.0.0/16", "10.9.0.1/24", "0.0.0.0/0",
            "10.12.0.0/33", "fd00::/64", "10.13.0.0", ""
        ]).prop_map(str::to_string),
        1 => (any::<u32>(), 0u8..=34).prop_map(|(n, p)| format!("{}/{p}", std::net::Ipv4Addr::from(n))),
        1 => nasty(),
    ];
    let block_size = prop_oneof![
        4 => Just(0u32),
        4 => 16u32..=32,
        1 => prop::sample::select(vec![1u32, 8, 15, 33, 256, 1000, u32::MAX]),
    ];
    let strings = || prop::collection::vec(pool_name(), 0..3);
    prop::option::weighted(
        0.95,
        (
            pool_name(),
            cidr,
            block_size,
            strings(),
            any::<bool>(),
            prop_oneof![3 => Just(String::new()), 1 => ip_text()],
            any::<bool>(),
            strings(),
            any::<bool>(),
        )
            .prop_map(
                |(name, cidr, block_size, namespaces, nat, snat, isolated, allow_from, dflt)| {
                    pb::Pool {
                        name,
                        cidr,
                        block_size,
                        namespaces,
                        nat_outgoing: nat,
                        snat_address: snat,
                        isolated,
                        allow_from,
                        is_default: dflt,
                    }
                },
            ),
    )
}

fn target() -> impl Strategy<Value = Option<pb::Target>> {
    use pb::target::Target;
    prop_oneof![
        4 => ip_text().prop_map(|ip| Some(pb::Target { target: Some(Target::Ip(ip)) })),
        4 => prop_oneof![
            4 => (0u8..40).prop_map(|i| format!("c{i}")),
            2 => Just("c".to_string()),
            1 => nasty(),
        ]
        .prop_map(|c| Some(pb::Target { target: Some(Target::ContainerId(c)) })),
        1 => Just(Some(pb::Target { target: None })),
        1 => Just(None),
    ]
}

#[derive(Debug, Clone)]
enum Req {
    Allocate(pb::AllocateRequest),
    Release(pb::ReleaseRequest),
    Check(pb::CheckRequest),
    Gc(pb::GcRequest),
    Status(pb::StatusRequest),
    ListPools(pb::ListPoolsRequest),
    ListBlocks(pb::ListBlocksRequest),
    ListAllocations(pb::ListAllocationsRequest),
    Show(pb::ShowRequest),
    ForceRelease(pb::ForceReleaseRequest),
    CheckConsistency(pb::CheckConsistencyRequest),
    AddPool(pb::AddPoolRequest),
    RemovePool(pb::RemovePoolRequest),
    CollectGarbage(pb::CollectGarbageRequest),
}

impl Req {
    fn client_version(&self) -> &str {
        match self {
            Req::Allocate(r) => &r.client_version,
            Req::Release(r) => &r.client_version,
            Req::Check(r) => &r.client_version,
            Req::Gc(r) => &r.client_version,
            Req::Status(r) => &r.client_version,
            Req::ListPools(r) => &r.client_version,
            Req::ListBlocks(r) => &r.client_version,
            Req::ListAllocations(r) => &r.client_version,
            Req::Show(r) => &r.client_version,
            Req::ForceRelease(r) => &r.client_version,
            Req::CheckConsistency(r) => &r.client_version,
            Req::AddPool(r) => &r.client_version,
            Req::RemovePool(r) => &r.client_version,
            Req::CollectGarbage(r) => &r.client_version,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Req::Allocate(_) => "Allocate",
            Req::Release(_) => "Release",
            Req::Check(_) => "Check",
            Req::Gc(_) => "Gc",
            Req::Status(_) => "Status",
            Req::ListPools(_) => "ListPools",
            Req::ListBlocks(_) => "ListBlocks",
            Req::ListAllocations(_) => "ListAllocations",
            Req::Show(_) => "Show",
            Req::ForceRelease(_) => "ForceRelease",
            Req::CheckConsistency(_) => "CheckConsistency",
            Req::AddPool(_) => "AddPool",
            Req::RemovePool(_) => "RemovePool",
            Req::CollectGarbage(_) => "CollectGarbage",
        }
    }
}

/// The plugin's requests: Allocate, Release, Check, Gc, Status.
fn plugin_req() -> impl Strategy<Value = Req> {
    let hint = prop_oneof![4 => Just(String::new()), 1 => pool_name()];
    prop_oneof![
        8 => (client_version(), key(), pod(), prop::collection::vec(ip_text(), 0..3), hint)
            .prop_map(|(client_version, key, pod, requested_ips, pool_hint)| {
                Req::Allocate(pb::AllocateRequest {
                    client_version,
                    key,
                    pod,
                    requested_ips,
                    pool_hint,
                })
            }),
        5 => (client_version(), key()).prop_map(|(client_version, key)| {
            Req::Release(pb::ReleaseRequest { client_version, key, ..Default::default() })
        }),
        3 => (client_version(), key())
            .prop_map(|(client_version, key)| Req::Check(pb::CheckRequest { client_version, key })),
        // Rare: a Gc of "ferry" with a short list releases most of the state.
        1 => (
            client_version(),
            prop_oneof![4 => Just("other".to_string()), 1 => Just("ferry".to_string()), 2 => nasty()],
            prop::collection::vec(key(), 0..6),
        )
            .prop_map(|(client_version, network, valid)| {
                Req::Gc(pb::GcRequest {
                    client_version,
                    network,
                    valid: valid.into_iter().flatten().collect(),
                })
            }),
        1 => client_version().prop_map(|client_version| Req::Status(pb::StatusRequest { client_version })),
    ]
}

/// ipamctl's requests, with some Allocates so there is something to act on.
fn admin_req() -> impl Strategy<Value = Req> {
    let opt = || prop_oneof![3 => Just(String::new()), 1 => pool_name(), 1 => nasty()];
    prop_oneof![
        1 => client_version().prop_map(|client_version| Req::ListPools(pb::ListPoolsRequest { client_version })),
        1 => (client_version(), opt(), opt()).prop_map(|(client_version, node, pool)| {
            Req::ListBlocks(pb::ListBlocksRequest { client_version, node, pool })
        }),
        1 => (client_version(), opt(), opt(), opt(), opt()).prop_map(
            |(client_version, pool, namespace, pod, container_id)| {
                Req::ListAllocations(pb::ListAllocationsRequest {
                    client_version,
                    filter: Some(pb::AllocationFilter { pool, namespace, pod, container_id }),
                })
            }
        ),
        3 => (client_version(), target())
            .prop_map(|(client_version, target)| Req::Show(pb::ShowRequest { client_version, target })),
        3 => (client_version(), target()).prop_map(|(client_version, target)| {
            Req::ForceRelease(pb::ForceReleaseRequest { client_version, target })
        }),
        1 => client_version().prop_map(|client_version| {
            Req::CheckConsistency(pb::CheckConsistencyRequest { client_version })
        }),
        3 => (client_version(), pool())
            .prop_map(|(client_version, pool)| Req::AddPool(pb::AddPoolRequest { client_version, pool })),
        2 => (client_version(), pool_name())
            .prop_map(|(client_version, name)| Req::RemovePool(pb::RemovePoolRequest { client_version, name })),
        1 => (client_version(), any::<bool>()).prop_map(|(client_version, dry_run)| {
            Req::CollectGarbage(pb::CollectGarbageRequest { client_version, dry_run })
        }),
        4 => plugin_req(),
    ]
}

// ---- the property -----------------------------------------------------------

/// Runs one request: `Ok(None)` when it succeeded, `Ok(Some(code))` for a
/// rejection that keeps the contract, `Err` when a property broke.
fn call(w: &World, req: &Req) -> Result<Option<Code>, TestCaseError> {
    let outcome: Result<Result<(), Status>, String> = w.rt.block_on(async {
        let status = match req.clone() {
            Req::Allocate(r) => match w.svc.allocate(Request::new(r.clone())).await {
                Ok(resp) => {
                    return check_allocation(w, &r.client_version, r.key, &resp.into_inner())
                        .await
                        .map(Ok);
                }
                Err(s) => Err(s),
            },
            Req::Release(r) => w.svc.release(Request::new(r)).await.map(drop),
            Req::Check(r) => w.svc.check(Request::new(r)).await.map(drop),
            Req::Gc(r) => w.svc.gc(Request::new(r)).await.map(drop),
            Req::Status(r) => w.svc.status(Request::new(r)).await.map(drop),
            Req::ListPools(r) => w.admin.list_pools(Request::new(r)).await.map(drop),
            Req::ListBlocks(r) => w.admin.list_blocks(Request::new(r)).await.map(drop),
            Req::ListAllocations(r) => w.admin.list_allocations(Request::new(r)).await.map(drop),
            Req::Show(r) => w.admin.show(Request::new(r)).await.map(drop),
            Req::ForceRelease(r) => w.admin.force_release(Request::new(r)).await.map(drop),
            Req::CheckConsistency(r) => w.admin.check_consistency(Request::new(r)).await.map(drop),
            Req::AddPool(r) => w.admin.add_pool(Request::new(r)).await.map(drop),
            Req::RemovePool(r) => w.admin.remove_pool(Request::new(r)).await.map(drop),
            Req::CollectGarbage(r) => w.admin.collect_garbage(Request::new(r)).await.map(drop),
        };
        Ok(status)
    });
    let outcome = outcome.map_err(|e| TestCaseError::fail(format!("{}: {e}", req.name())))?;
    let compatible =
        ferry_proto::versions_compatible(req.client_version(), ferry_proto::PROTOCOL_VERSION);
    match outcome {
        Ok(()) => {
            prop_assert!(
                compatible,
                "{} accepted client version {:?}",
                req.name(),
                req.client_version()
            );
            Ok(None)
        }
        Err(s) => {
            prop_assert!(
                DOCUMENTED.contains(&s.code()),
                "{} ended in {:?}: {}",
                req.name(),
                s.code(),
                s.message()
            );
            prop_assert!(
                !s.message().trim().is_empty(),
                "{} {:?} without a message",
                req.name(),
                s.code()
            );
            prop_assert_eq!(
                s.code() == Code::FailedPrecondition,
                !compatible,
                "{} with client version {:?}: {:?} {}",
                req.name(),
                req.client_version(),
                s.code(),
                s.message()
            );
            Ok(Some(s.code()))
        }
    }
}

/// A granted address is a /32 with the pod gateway, and Check finds it
/// under the same key.
async fn check_allocation(
    w: &World,
    client_version: &str,
    key: Option<pb::AllocationKey>,
    resp: &pb::AllocateResponse,
) -> Result<(), String> {
    let [addr] = resp.addresses.as_slice() else {
        return Err(format!("Allocate returned {:?}", resp.addresses));
    };
    let ip = addr
        .strip_suffix("/32")
        .and_then(|a| a.parse::<std::net::Ipv4Addr>().ok())
        .ok_or_else(|| format!("Allocate returned {addr:?}, not a /32"))?;
    if resp.gateway != ferry_proto::POD_GATEWAY.to_string() {
        return Err(format!("gateway {:?}", resp.gateway));
    }
    let found = w
        .svc
        .check(Request::new(pb::CheckRequest {
            client_version: client_version.to_string(),
            key,
        }))
        .await
        .map_err(|s| format!("Check after Allocate: {s:?}"))?
        .into_inner()
        .allocation
        .ok_or("Check after Allocate found nothing")?;
    if found.ip != ip.to_string() {
        return Err(format!("Allocate gave {ip}, Check says {}", found.ip));
    }
    Ok(())
}

/// Runs `cases` requests from `strategy` against one world, then checks the
/// core against its store and that the run saw each outcome in `expect`.
///
/// On a thread of its own with a large stack: proptest builds each case's
/// value tree on the stack, and in a debug build these strategies' trees
/// take more than a test thread's 2 MiB.
fn run<S: Strategy<Value = Req>>(cases: u32, strategy: fn() -> S, expect: &[&str]) {
    std::thread::scope(|s| {
        let cases_thread = std::thread::Builder::new()
            .name("fuzz-cases".into())
            .stack_size(64 << 20)
            .spawn_scoped(s, || run_cases(cases, strategy(), expect))
            .expect("spawn the fuzz thread");
        if let Err(panic) = cases_thread.join() {
            std::panic::resume_unwind(panic);
        }
    });
}

fn run_cases(cases: u32, strategy: impl Strategy<Value = Req>, expect: &[&str]) {
    let world = World::new();
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let tally: RefCell<BTreeMap<String, u32>> = RefCell::default();
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |req| {
        let label = match call(&world, &req)? {
            None => format!("{} ok", req.name()),
            Some(code) => format!("{} {code:?}", req.name()),
        };
        let mut tally = tally.borrow_mut();
        *tally.entry(label).or_default() += 1;
        if tally.values().sum::<u32>() % 1000 == 0 {
            let diffs = world
                .rt
                .block_on(world.ipam.check_consistency())
                .map_err(|e| TestCaseError::fail(format!("check_consistency failed: {e}")))?;
            prop_assert!(diffs.is_empty(), "core and store differ: {:?}", diffs);
        }
        Ok(())
    });
    let tally = tally.into_inner();
    eprintln!("{tally:#?}");
    if let Err(e) = result {
        panic!("{e}");
    }
    let total: u32 = tally.values().sum();
    assert!(total >= cases, "only {total} of {cases} cases ran");
    let diffs = world.rt.block_on(world.ipam.check_consistency()).unwrap();
    assert!(diffs.is_empty(), "core and store differ: {diffs:?}");
    // A generator that never reaches an outcome tests nothing there.
    for want in expect {
        assert!(tally.contains_key(*want), "never saw {want:?}: {tally:#?}");
    }
}

#[test]
fn plugin_requests_are_validated_into_documented_codes() {
    run(
        PLUGIN_CASES,
        plugin_req,
        &[
            "Allocate ok",
            "Allocate InvalidArgument",
            "Allocate FailedPrecondition",
            "Allocate AlreadyExists",
            "Release ok",
            "Release InvalidArgument",
            "Check ok",
            "Gc ok",
            "Status ok",
        ],
    );
}

#[test]
fn admin_requests_are_validated_into_documented_codes() {
    run(
        ADMIN_CASES,
        admin_req,
        &[
            "Allocate ok",
            "AddPool ok",
            "AddPool InvalidArgument",
            "RemovePool ok",
            "ForceRelease ok",
            "ForceRelease InvalidArgument",
            "Show ok",
            "CheckConsistency ok",
            "CollectGarbage ok",
        ],
    );
}

/// Every string a request stores, and every list, has a bound: one byte or
/// entry over it is INVALID_ARGUMENT naming the field, and nothing is
/// stored; at the bound the request goes through.
#[test]
fn oversized_fields_are_refused_naming_the_field_before_anything_is_stored() {
    let w = World::new();
    let v = ferry_proto::PROTOCOL_VERSION.to_string();
    let key = |container_id: String| pb::AllocationKey {
        network: "ferry".into(),
        container_id,
        ifname: "eth0".into(),
    };
    let pod = |netns: String, name: String| pb::PodMeta {
        namespace: "default".into(),
        name,
        uid: "uid-1".into(),
        netns,
    };
    let allocate = |key: pb::AllocationKey, pod: pb::PodMeta, requested_ips: Vec<String>| {
        pb::AllocateRequest {
            client_version: v.clone(),
            key: Some(key),
            pod: Some(pod),
            requested_ips,
            pool_hint: String::new(),
        }
    };
    let ok_pod = || pod("/var/run/netns/p".into(), "p".into());
    let rows: Vec<(&str, pb::AllocateRequest)> = vec![
        (
            "key.container_id",
            allocate(key("c".repeat(257)), ok_pod(), vec![]),
        ),
        (
            "pod.netns",
            allocate(key("c1".into()), pod("/".repeat(4097), "p".into()), vec![]),
        ),
        (
            "pod.name",
            allocate(key("c1".into()), pod("/n".into(), "p".repeat(254)), vec![]),
        ),
        (
            "requested_ips",
            allocate(
                key("c1".into()),
                ok_pod(),
                (1..=17).map(|i| format!("10.244.0.{i}")).collect(),
            ),
        ),
    ];
    for (field, req) in rows {
        let err =
            w.rt.block_on(w.svc.allocate(Request::new(req)))
                .expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    let pool = |name: String, namespaces: Vec<String>| pb::AddPoolRequest {
        client_version: v.clone(),
        pool: Some(pb::Pool {
            name,
            cidr: "10.250.0.0/24".into(),
            block_size: 28,
            namespaces,
            ..Default::default()
        }),
    };
    for (field, req) in [
        ("name", pool("p".repeat(64), vec!["team".into()])),
        ("namespaces", pool("team".into(), vec!["n".repeat(64)])),
    ] {
        let err =
            w.rt.block_on(w.admin.add_pool(Request::new(req)))
                .expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    let gc = pb::GcRequest {
        client_version: v.clone(),
        network: "ferry".into(),
        valid: vec![key("c1".into()); 65_537],
    };
    let err = w.rt.block_on(w.svc.gc(Request::new(gc))).expect_err("gc");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("valid"), "{}", err.message());
    assert_eq!(w.ipam.summary().allocations, 0);
    assert_eq!(w.ipam.summary().pools, 1);

    // At the bounds everything is accepted.
    let at_bound = allocate(
        key("c".repeat(256)),
        pod("/".repeat(4096), "p".repeat(253)),
        vec!["10.244.0.9".into()],
    );
    w.rt.block_on(w.svc.allocate(Request::new(at_bound)))
        .expect("a request at the bounds");
    w.rt.block_on(
        w.admin
            .add_pool(Request::new(pool("p".repeat(63), vec!["n".repeat(63)]))),
    )
    .expect("a pool at the bounds");
    assert_eq!(w.ipam.summary().allocations, 1);
    assert_eq!(w.ipam.summary().pools, 2);
}
