//! The whole daemon started in-process by `daemon::run`, over its real
//! Unix socket and a real sled store, with an in-memory host: what a client
//! sees, and the blackhole routes following the blocks the core owns.

use std::sync::Arc;
use std::time::Duration;

use super::{self as daemon, Host};
use crate::config::{Cli, Config, FileConfig};
use crate::node::fake::{FakeHost, eventually};
use clap::Parser;
use ferry_proto::v1 as pb;
use ferry_proto::v1::ipam_admin_client::IpamAdminClient;
use ferry_proto::v1::ipam_client::IpamClient;
use ipnet::Ipv4Net;
use tokio::sync::oneshot;

fn config(dir: &std::path::Path) -> Config {
    let socket = dir.join("ipamd.sock");
    let state = dir.join("state");
    let cli = Cli::try_parse_from([
        "ipamd",
        "--socket",
        socket.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--pod-cidr",
        "10.99.0.0/24",
        "--block-size",
        "28",
        "--metrics-addr",
        "",
        "--mtu",
        "1400",
    ])
    .unwrap();
    Config::merge(cli, FileConfig::default(), || Some("node-1".into())).unwrap()
}

const WITHIN: Duration = Duration::from_secs(5);

fn routes(host: &FakeHost) -> Vec<Ipv4Net> {
    host.routes.lock().unwrap().iter().copied().collect()
}

fn key(container: &str) -> Option<pb::AllocationKey> {
    Some(pb::AllocationKey {
        network: "ferry".into(),
        container_id: container.into(),
        ifname: "eth0".into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_follows_owned_blocks_with_routes_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let socket = config.socket.clone();
    let fake = Arc::new(FakeHost::default());
    let host = Host {
        links: fake.clone(),
        routes: fake.clone(),
        setup: fake.clone(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let daemon = tokio::spawn(daemon::run(config, host, async {
        let _ = stopped.await;
    }));
    eventually("the socket is served", WITHIN, || socket.exists()).await;
    let channel = ferry_proto::connect_uds(&socket, Duration::from_secs(5))
        .await
        .unwrap();
    let mut ipam = IpamClient::new(channel.clone());
    let mut admin = IpamAdminClient::new(channel);
    let version = ferry_proto::PROTOCOL_VERSION.to_string();

    let lease = ipam
        .allocate(pb::AllocateRequest {
            client_version: version.clone(),
            key: key("c1"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.addresses, ["10.99.0.1/32"]);
    assert_eq!(lease.mtu, 1400);
    let block: Ipv4Net = "10.99.0.0/28".parse().unwrap();
    eventually("the claimed block has its blackhole route", WITHIN, || {
        routes(&fake) == [block]
    })
    .await;

    // A run-time pool: its block gets a route, and removing the pool takes
    // the route away at once, not at the next periodic sync.
    admin
        .add_pool(pb::AddPoolRequest {
            client_version: version.clone(),
            pool: Some(pb::Pool {
                name: "extra".into(),
                cidr: "10.98.0.0/24".into(),
                block_size: 28,
                namespaces: vec!["team-x".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    ipam.allocate(pb::AllocateRequest {
        client_version: version.clone(),
        key: key("c2"),
        pool_hint: "extra".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let extra: Ipv4Net = "10.98.0.0/28".parse().unwrap();
    eventually("the run-time pool's block is routed", WITHIN, || {
        routes(&fake) == [extra, block]
    })
    .await;
    ipam.release(pb::ReleaseRequest {
        client_version: version.clone(),
        key: key("c2"),
        ..Default::default()
    })
    .await
    .unwrap();
    admin
        .remove_pool(pb::RemovePoolRequest {
            client_version: version.clone(),
            name: "extra".into(),
        })
        .await
        .unwrap();
    eventually("the removed pool's route is gone", WITHIN, || {
        routes(&fake) == [block]
    })
    .await;

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), daemon)
        .await
        .expect("the daemon stops when told")
        .unwrap()
        .unwrap();
    assert!(!socket.exists(), "the socket is removed on stop");
}

#[tokio::test]
async fn a_live_socket_is_not_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let _live = std::os::unix::net::UnixListener::bind(&config.socket).unwrap();
    let fake = Arc::new(FakeHost::default());
    let host = Host {
        links: fake.clone(),
        routes: fake.clone(),
        setup: fake,
    };
    let err = daemon::run(config, host, std::future::pending())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("another ipamd is already serving"),
        "{err}"
    );
}
