use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::sync::watch;

use super::RouteReconciler;
use crate::model::BlockClaim;
use crate::node::fake::{FakeHost, eventually};

const WITHIN: Duration = Duration::from_secs(5);

fn claim(cidr: &str) -> BlockClaim {
    BlockClaim {
        pool: "default".into(),
        cidr: cidr.parse().unwrap(),
        node: "n1".into(),
        claimed_unix_ms: 0,
    }
}

fn routes(host: &FakeHost) -> Vec<Ipv4Net> {
    host.routes.lock().unwrap().iter().copied().collect()
}

#[tokio::test]
async fn sync_repairs_and_converge_touches_only_changes() {
    let host = Arc::new(FakeHost::default());
    let (a, b) = (claim("10.244.0.0/26"), claim("10.244.0.64/26"));
    let stale: Ipv4Net = "10.244.9.0/26".parse().unwrap();
    host.routes.lock().unwrap().insert(stale);
    let mut rr = RouteReconciler::new(host.clone());
    rr.sync(std::slice::from_ref(&a)).await.unwrap();
    assert_eq!(
        routes(&host),
        vec![a.cidr],
        "stale route removed, owned added"
    );

    host.route_ops.lock().unwrap().clear();
    rr.converge(std::slice::from_ref(&a)).await.unwrap();
    assert!(
        host.route_ops.lock().unwrap().is_empty(),
        "no change, no netlink"
    );
    rr.converge(&[a.clone(), b.clone()]).await.unwrap();
    assert_eq!(
        *host.route_ops.lock().unwrap(),
        vec![format!("add {}", b.cidr)]
    );
    rr.converge(std::slice::from_ref(&a)).await.unwrap();
    assert_eq!(
        routes(&host),
        vec![a.cidr],
        "a given-back block loses its route"
    );

    // Someone deletes our route: the next full sync puts it back.
    host.routes.lock().unwrap().clear();
    rr.sync(std::slice::from_ref(&a)).await.unwrap();
    assert_eq!(routes(&host), vec![a.cidr]);
}

#[tokio::test]
async fn the_task_follows_every_publication_until_stopped() {
    let host = Arc::new(FakeHost::default());
    let (tx, rx) = watch::channel(vec![claim("10.244.0.0/26")]);
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(RouteReconciler::new(host.clone()).run(
        rx,
        Duration::from_secs(3600),
        stop_rx,
    ));
    tx.send_replace(vec![claim("10.244.0.0/26"), claim("10.244.0.64/26")]);
    let both: Vec<Ipv4Net> = vec![
        "10.244.0.0/26".parse().unwrap(),
        "10.244.0.64/26".parse().unwrap(),
    ];
    eventually("both blocks are routed", WITHIN, || routes(&host) == both).await;
    tx.send_replace(vec![]);
    eventually("no route is left", WITHIN, || routes(&host).is_empty()).await;
    stop_tx.send_replace(true);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the task stops when told")
        .unwrap();
}

#[tokio::test]
async fn a_failed_route_change_is_retried_before_the_resync() {
    let host = Arc::new(FakeHost::default());
    *host.failing_route_ops.lock().unwrap() = 2;
    let (tx, rx) = watch::channel(vec![]);
    let (_stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(RouteReconciler::new(host.clone()).run(rx, Duration::from_secs(3600), stop_rx));
    tx.send_replace(vec![claim("10.244.0.0/26")]);
    // Retries at 1 s and then 2 s later, an hour before the resync.
    eventually(
        "a retry, not the hourly resync, adds the route",
        Duration::from_secs(20),
        || !routes(&host).is_empty(),
    )
    .await;
    assert_eq!(
        *host.failing_route_ops.lock().unwrap(),
        0,
        "both failures were hit"
    );
}
