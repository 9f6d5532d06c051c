use std::net::Ipv4Addr;
use std::sync::Arc;

use ferry_proto::v1 as pb;
use ferry_proto::v1::ipam_admin_server::IpamAdmin;
use ferry_proto::v1::ipam_server::Ipam as IpamRpc;
use tonic::Request;

use super::admin_service::{TargetRef, parse_target};
use super::convert::*;
use super::*;
use crate::cluster::ClusterError;
use crate::ipam::Ipam;
use crate::model::{AllocKey, Allocation, PodMeta};
use crate::node::Unplugger;
use crate::reconcile::Reconciler;
use crate::store::StoreError;

#[test]
fn every_ipam_error_maps_to_its_contract_code() {
    let cases: Vec<(IpamError, Code)> = vec![
        (
            IpamError::Exhausted {
                pool: "default".into(),
                cidr: "10.244.0.0/30".parse().unwrap(),
                size: 2,
                allocated: 1,
                cooling: 1,
            },
            Code::ResourceExhausted,
        ),
        (
            IpamError::AddressUnavailable {
                ip: Ipv4Addr::new(10, 244, 0, 5),
                reason: "taken".into(),
            },
            Code::AlreadyExists,
        ),
        (
            IpamError::InvalidArgument("x".into()),
            Code::InvalidArgument,
        ),
        (IpamError::UnknownPool("p".into()), Code::InvalidArgument),
        (IpamError::NotFound("n".into()), Code::NotFound),
        (
            IpamError::Held {
                remaining_secs: 3,
                reason: "rebuilt".into(),
            },
            Code::Unavailable,
        ),
        (IpamError::Conflict("c".into()), Code::Aborted),
        (
            IpamError::Cluster(ClusterError::Unavailable("etcd down".into())),
            Code::Unavailable,
        ),
        (IpamError::Store(StoreError::Closed), Code::Internal),
        (IpamError::Internal("bug".into()), Code::Internal),
    ];
    for (err, code) in cases {
        let text = err.to_string();
        let s = Status::from(err);
        assert_eq!(s.code(), code, "{text}");
        assert_eq!(s.message(), text);
    }
}

#[test]
fn exhausted_message_names_pool_and_use() {
    let s = Status::from(IpamError::Exhausted {
        pool: "team-a".into(),
        cidr: "10.9.0.0/30".parse().unwrap(),
        size: 2,
        allocated: 1,
        cooling: 1,
    });
    for part in ["team-a", "10.9.0.0/30", "2", "1 allocated", "1 cooling"] {
        assert!(s.message().contains(part), "{part}: {}", s.message());
    }
}

#[test]
fn version_check_names_both_versions() {
    assert!(check_version(ferry_proto::PROTOCOL_VERSION).is_ok());
    let s = check_version("99.0.0").unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(s.message().contains("99.0.0"));
    assert!(s.message().contains(ferry_proto::PROTOCOL_VERSION));
    assert_eq!(
        check_version("").unwrap_err().code(),
        Code::FailedPrecondition
    );
}

#[test]
fn keys_are_validated() {
    let good = pb::AllocationKey {
        network: "ferry".into(),
        container_id: "abc".into(),
        ifname: "eth0".into(),
    };
    assert!(parse_key(Some(good.clone()), "key").is_ok());
    let e = parse_key(None, "key").unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    for (k, field) in [
        (
            pb::AllocationKey {
                network: "".into(),
                ..good.clone()
            },
            "key.network",
        ),
        (
            pb::AllocationKey {
                container_id: " ".into(),
                ..good.clone()
            },
            "key.container_id",
        ),
        (
            pb::AllocationKey {
                ifname: "".into(),
                ..good.clone()
            },
            "key.ifname",
        ),
        (
            pb::AllocationKey {
                ifname: "a-very-long-ifname".into(),
                ..good.clone()
            },
            "key.ifname",
        ),
    ] {
        let e = parse_key(Some(k), "key").unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(field), "{}", e.message());
    }
}

#[test]
fn ips_parse_with_or_without_prefix() {
    assert_eq!(
        parse_ip("ip", "10.1.2.3").unwrap(),
        Ipv4Addr::new(10, 1, 2, 3)
    );
    assert_eq!(
        parse_ip("ip", "10.1.2.3/24").unwrap(),
        Ipv4Addr::new(10, 1, 2, 3)
    );
    for bad in ["", "10.1.2", "10.1.2.3/40", "fe80::1", "x"] {
        let e = parse_ip("requested_ips[0]", bad).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("requested_ips[0]"));
    }
}

#[test]
fn targets_and_pools_are_validated() {
    assert!(matches!(parse_target(None), Err(s) if s.code() == Code::InvalidArgument));
    let t = pb::Target {
        target: Some(pb::target::Target::ContainerId(" ".into())),
    };
    assert!(parse_target(Some(t)).is_err());
    let t = pb::Target {
        target: Some(pb::target::Target::Ip("10.0.0.1".into())),
    };
    assert!(matches!(parse_target(Some(t)), Ok(TargetRef::Ip(_))));

    let pool = pb::Pool {
        name: "a".into(),
        cidr: "10.9.0.0/24".into(),
        namespaces: vec!["a".into()],
        ..Default::default()
    };
    let spec = pool_from_pb(Some(pool.clone())).unwrap();
    assert_eq!(spec.block_size, 26);
    let bad = pb::Pool {
        block_size: 8,
        ..pool.clone()
    };
    let e = pool_from_pb(Some(bad)).unwrap_err();
    assert!(e.message().contains("pool.block_size"), "{}", e.message());
    let bad = pb::Pool {
        cidr: "10.9.0.1/24".into(),
        ..pool.clone()
    };
    assert!(
        pool_from_pb(Some(bad))
            .unwrap_err()
            .message()
            .contains("pool.cidr")
    );
    // Each bad field is named the way the config file's error is worded.
    for (bad, want) in [
        (
            pb::Pool {
                name: " ".into(),
                ..pool.clone()
            },
            "invalid pool.name: must not be empty",
        ),
        (
            pb::Pool {
                block_size: 300,
                ..pool.clone()
            },
            "invalid pool.block_size: 300 must be between 24",
        ),
        (
            pb::Pool {
                snat_address: "nope".into(),
                ..pool.clone()
            },
            "invalid pool.snat_address: \"nope\" is not an IPv4 address",
        ),
        (
            pb::Pool {
                namespaces: vec!["a".into(), " ".into()],
                ..pool.clone()
            },
            "invalid pool.namespaces: holds an empty name",
        ),
    ] {
        let e = pool_from_pb(Some(bad)).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(want), "{}", e.message());
    }
    assert!(pool_from_pb(None).is_err());
    let spec = pool_from_pb(Some(pool)).unwrap();
    assert!(spec.runtime && spec.snat_address.is_none());
}

async fn services() -> (IpamService, AdminService, Arc<crate::node::fake::FakeHost>) {
    services_on(Arc::new(crate::store::memory::MemoryStore::new())).await
}

async fn services_on(
    store: Arc<crate::store::memory::MemoryStore>,
) -> (IpamService, AdminService, Arc<crate::node::fake::FakeHost>) {
    use crate::cluster::local::LocalCluster;
    use crate::ipam::IpamOptions;
    use std::time::Duration;

    let ipam = Arc::new(
        Ipam::open(
            IpamOptions::one_pool_for_tests(),
            store,
            Arc::new(LocalCluster),
        )
        .await
        .unwrap(),
    );
    let host = Arc::new(crate::node::fake::FakeHost::default());
    let rec = Arc::new(Reconciler::new(
        ipam.clone(),
        host.clone(),
        Duration::from_secs(300),
    ));
    (
        IpamService::new(ipam.clone(), 1480, "/state".into(), 1)
            .with_unplugger(Unplugger::start(host.clone())),
        AdminService::new(ipam, rec),
        host,
    )
}

fn key(container: &str) -> Option<pb::AllocationKey> {
    Some(pb::AllocationKey {
        network: "ferry".into(),
        container_id: container.into(),
        ifname: "eth0".into(),
    })
}

fn target(t: pb::target::Target) -> Option<pb::Target> {
    Some(pb::Target { target: Some(t) })
}

#[tokio::test]
async fn release_hands_the_pods_own_veth_to_the_unplugger() {
    let (svc, admin, host) = services().await;
    let v = ferry_proto::PROTOCOL_VERSION.to_string();
    let veth = ferry_proto::host_veth_name("aaaa1", "eth0");
    host.set_links(&[&veth, "fryneighbour0"]);
    svc.allocate(Request::new(pb::AllocateRequest {
        client_version: v.clone(),
        key: key("aaaa1"),
        ..Default::default()
    }))
    .await
    .unwrap();
    let release = |name: &str, ifindex: u32| pb::ReleaseRequest {
        client_version: v.clone(),
        key: key("aaaa1"),
        host_link: Some(pb::HostLink {
            name: name.to_string(),
            ifindex,
        }),
    };
    // Another pod's veth, or no index: refused, and nothing released.
    for bad in [release("fryneighbour0", 101), release(&veth, 0)] {
        let err = svc.release(Request::new(bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    }
    let resp = svc
        .release(Request::new(release(&veth, 100)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.released.len(), 1);
    assert!(resp.unplug_queued);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while host.names() != ["fryneighbour0"] {
        assert!(std::time::Instant::now() < deadline, "{:?}", host.names());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Nothing leaked and no orphan: gc has nothing to do.
    let gc = admin
        .collect_garbage(Request::new(pb::CollectGarbageRequest {
            client_version: v.clone(),
            dry_run: false,
        }))
        .await
        .unwrap()
        .into_inner();
    let kinds: Vec<&str> = gc.actions.iter().map(|a| a.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["orphan-veth"],
        "only the neighbour has no allocation"
    );
}

#[tokio::test]
async fn collect_garbage_dry_run_changes_nothing_then_acts() {
    let (svc, admin, host) = services().await;
    let v = ferry_proto::PROTOCOL_VERSION.to_string();
    let mut req = pb::AllocateRequest {
        client_version: v.clone(),
        key: key("leaked1"),
        ..Default::default()
    };
    // A netns path that does not exist: the pod is gone.
    req.pod = Some(pb::PodMeta {
        netns: "/nonexistent/ferry-test-netns".into(),
        ..Default::default()
    });
    svc.allocate(Request::new(req)).await.unwrap();
    host.set_links(&["fryorphan0001"]);
    let gc = |dry_run| {
        admin.collect_garbage(Request::new(pb::CollectGarbageRequest {
            client_version: v.clone(),
            dry_run,
        }))
    };
    let plan = gc(true).await.unwrap().into_inner().actions;
    assert_eq!(plan.len(), 2, "{plan:?}");
    assert!(
        plan.iter().all(|a| a.detail.starts_with("would ")),
        "{plan:?}"
    );
    assert_eq!(host.names(), ["fryorphan0001"]);
    let done = gc(false).await.unwrap().into_inner().actions;
    let details: Vec<&str> = done.iter().map(|a| a.detail.as_str()).collect();
    assert!(details[0].starts_with("released "), "{details:?}");
    assert!(
        details[1].starts_with("deleted host veth fryorphan0001"),
        "{details:?}"
    );
    assert!(host.names().is_empty());
    assert!(gc(false).await.unwrap().into_inner().actions.is_empty());
}

#[tokio::test]
async fn services_over_a_real_core() {
    let (svc, admin, _host) = services().await;
    let v = ferry_proto::PROTOCOL_VERSION.to_string();
    let resp = svc
        .allocate(Request::new(pb::AllocateRequest {
            client_version: v.clone(),
            key: key("aaaa1"),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.mtu, 1480);
    assert_eq!(resp.gateway, "169.254.1.1");
    assert!(resp.addresses[0].ends_with("/32"));
    svc.allocate(Request::new(pb::AllocateRequest {
        client_version: v.clone(),
        key: key("aaaa2"),
        ..Default::default()
    }))
    .await
    .unwrap();

    let e = svc
        .allocate(Request::new(pb::AllocateRequest {
            client_version: "9.9.9".into(),
            key: key("x"),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = svc
        .allocate(Request::new(pb::AllocateRequest {
            client_version: v.clone(),
            key: key("x"),
            requested_ips: vec!["nope".into()],
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let status = svc
        .status(Request::new(pb::StatusRequest {
            client_version: v.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.readiness, pb::Readiness::Ready as i32);
    assert_eq!(status.allocations, 2);
    assert_eq!(status.node, "n1");

    let ip = resp.addresses[0].trim_end_matches("/32").to_string();
    let show = admin
        .show(Request::new(pb::ShowRequest {
            client_version: v.clone(),
            target: target(pb::target::Target::Ip(ip.clone())),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(show.state, pb::AddressState::Allocated as i32);
    assert_eq!(show.allocations.len(), 1);

    // An ambiguous prefix releases nothing.
    let e = admin
        .force_release(Request::new(pb::ForceReleaseRequest {
            client_version: v.clone(),
            target: target(pb::target::Target::ContainerId("aaaa".into())),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let released = admin
        .force_release(Request::new(pb::ForceReleaseRequest {
            client_version: v.clone(),
            target: target(pb::target::Target::ContainerId("aaaa1".into())),
        }))
        .await
        .unwrap()
        .into_inner()
        .released;
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].ip, ip);
    let show = admin
        .show(Request::new(pb::ShowRequest {
            client_version: v.clone(),
            target: target(pb::target::Target::Ip(ip)),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(show.state, pb::AddressState::Cooling as i32);
    assert!(show.reusable_unix_ms > 0);

    let findings = admin
        .check_consistency(Request::new(pb::CheckConsistencyRequest {
            client_version: v.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .findings;
    assert!(findings.is_empty(), "{findings:?}");
}

async fn status_of(svc: &IpamService) -> pb::StatusResponse {
    let req = Request::new(pb::StatusRequest {
        client_version: ferry_proto::PROTOCOL_VERSION.to_string(),
    });
    svc.status(req).await.unwrap().into_inner()
}

#[tokio::test]
async fn status_counts_and_reports_a_poisoned_store() {
    let store = Arc::new(crate::store::memory::MemoryStore::new());
    let (svc, _admin, _host) = services_on(store.clone()).await;
    let v = ferry_proto::PROTOCOL_VERSION.to_string();
    for c in ["c1", "c2", "c3"] {
        svc.allocate(Request::new(pb::AllocateRequest {
            client_version: v.clone(),
            key: key(c),
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    let s = status_of(&svc).await;
    assert_eq!(
        (s.readiness, s.allocations, s.pools, s.blocks),
        (pb::Readiness::Ready as i32, 3, 1, 1)
    );
    store.poison(true);
    let s = status_of(&svc).await;
    assert_eq!(s.readiness, pb::Readiness::NotAvailable as i32);
    assert!(s.reason.contains("store"), "{}", s.reason);
    let e = svc
        .allocate(Request::new(pb::AllocateRequest {
            client_version: v.clone(),
            key: key("c4"),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert_eq!(status_of(&svc).await.allocations, 3);
}

#[test]
fn allocation_converts_to_wire() {
    let a = Allocation {
        key: AllocKey {
            network: "ferry".into(),
            container_id: "c1".into(),
            ifname: "eth0".into(),
        },
        ip: Ipv4Addr::new(10, 244, 0, 7),
        pool: "default".into(),
        block: "10.244.0.0/26".parse().unwrap(),
        pod: PodMeta {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
            netns: "/n".into(),
        },
        created_unix_ms: 42,
    };
    let p = allocation_to_pb(&a);
    assert_eq!(p.ip, "10.244.0.7");
    assert_eq!(p.block, "10.244.0.0/26");
    assert_eq!(p.key.unwrap().container_id, "c1");
    assert_eq!(p.pod.unwrap().uid, "u");
    assert_eq!(p.created_unix_ms, 42);
}
