use super::*;

fn veth(link: &str, ip: &str) -> VethAddress {
    VethAddress {
        link: link.into(),
        ip: ip.parse().unwrap(),
    }
}

fn pools() -> Vec<PoolSpec> {
    vec![
        PoolSpec::new("default", "10.244.0.0/16".parse().unwrap(), 26, vec![]),
        PoolSpec::new(
            "batch",
            "10.250.0.0/24".parse().unwrap(),
            28,
            vec!["jobs".into()],
        ),
    ]
}

#[test]
fn adopts_into_the_containing_pool_and_block() {
    let live = [
        veth("fry00000000001", "10.244.0.5"),
        veth("fry00000000002", "10.244.0.9"),
        veth("fry00000000003", "10.250.0.20"),
        veth("fry00000000004", "192.168.1.5"),
        veth("fry00000000005", "10.244.0.9"),
    ];
    let plan = plan_adoption(&pools(), "n1", &live, 7);
    let got: Vec<(String, Ipv4Addr, String, Ipv4Net)> = plan
        .adopted
        .iter()
        .map(|a| (a.key.host_veth(), a.ip, a.pool.clone(), a.block))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "fry00000000001".into(),
                "10.244.0.5".parse().unwrap(),
                "default".into(),
                "10.244.0.0/26".parse().unwrap()
            ),
            (
                "fry00000000002".into(),
                "10.244.0.9".parse().unwrap(),
                "default".into(),
                "10.244.0.0/26".parse().unwrap()
            ),
            (
                "fry00000000003".into(),
                "10.250.0.20".parse().unwrap(),
                "batch".into(),
                "10.250.0.16/28".parse().unwrap()
            ),
        ]
    );
    let a = &plan.adopted[0];
    assert_eq!(a.key, AllocKey::adopted("fry00000000001"));
    assert_eq!((a.key.network.as_str(), a.key.ifname.as_str()), ("", ""));
    assert_eq!(a.pod, PodMeta::default());
    let blocks: Vec<(String, Ipv4Net, String)> = plan
        .blocks()
        .into_iter()
        .map(|b| (b.pool, b.cidr, b.node))
        .collect();
    assert_eq!(
        blocks,
        vec![
            (
                "default".into(),
                "10.244.0.0/26".parse().unwrap(),
                "n1".into()
            ),
            (
                "batch".into(),
                "10.250.0.16/28".parse().unwrap(),
                "n1".into()
            ),
        ]
    );
    let skipped: Vec<&str> = plan.skipped.iter().map(|(v, _)| v.link.as_str()).collect();
    assert_eq!(skipped, vec!["fry00000000004", "fry00000000005"]);
}

#[test]
fn new_addresses_wait_out_the_cooldown_lost_in_the_last_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let at = |secs: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    let cooldown = std::time::Duration::from_secs(30);
    assert_eq!(fresh_hold(dir.path(), cooldown, at(1_000)), None);
    for name in [
        "db.corrupt-900",
        "db.corrupt-1000",
        "db.corrupt-1000-1",
        "db",
    ] {
        std::fs::create_dir(dir.path().join(name)).unwrap();
    }
    let (until, why) = fresh_hold(dir.path(), cooldown, at(1_010)).unwrap();
    assert_eq!(until, at(1_031));
    assert!(why.contains("rebuilt at unix time 1000"), "{why}");
    assert!(fresh_hold(dir.path(), cooldown, at(1_030)).is_some());
    assert_eq!(fresh_hold(dir.path(), cooldown, at(1_031)), None);
    assert_eq!(
        fresh_hold(dir.path(), std::time::Duration::ZERO, at(1_001)),
        None
    );
    // Renamed while the clock ran an hour ahead: held from now on, not
    // until an hour from now.
    std::fs::create_dir(dir.path().join("db.corrupt-4600")).unwrap();
    let (until, _) = fresh_hold(dir.path(), cooldown, at(1_010)).unwrap();
    assert_eq!(until, at(1_041));
}

#[test]
fn refused_blocks_are_not_adopted() {
    let live = [
        veth("fry00000000001", "10.244.0.5"),
        veth("fry00000000002", "10.244.1.5"),
    ];
    let mut plan = plan_adoption(&pools(), "n1", &live, 7);
    plan.drop_blocks(&HashSet::from(["10.244.1.0/26".parse().unwrap()]));
    assert_eq!(plan.adopted.len(), 1);
    assert_eq!(plan.blocks().len(), 1);
    assert_eq!(plan.skipped.len(), 1);
    assert!(
        plan.skipped[0].1.contains("another node"),
        "{:?}",
        plan.skipped
    );
    let r = Rebuild {
        cause: "x".into(),
        moved_to: "/s/db.corrupt-1".into(),
        adopted: plan.adopted.clone(),
        skipped: plan.skipped.clone(),
    };
    let s = r.summary();
    assert!(
        s.contains("/s/db.corrupt-1") && s.contains("adopted 1 "),
        "{s}"
    );
    assert!(
        s.contains("NOT adopted: 10.244.1.5 on fry00000000002"),
        "{s}"
    );
}

/// The rebuilt database holds the adopted allocations and their blocks,
/// and the IPAM core opens on it with them in use.
#[tokio::test]
async fn rebuilt_store_opens_with_the_adoptions() {
    let dir = tempfile::tempdir().unwrap();
    let live = [veth("fry00000000001", "10.244.0.5")];
    let plan = plan_adoption(&pools(), "n1", &live, 7);
    let store = SledStore::open(dir.path()).unwrap();
    let seq = store.apply(&plan.mutations(&pools())).unwrap();
    store.durable(seq).await.unwrap();
    let opts = IpamOptions {
        node: "n1".into(),
        pools: pools(),
        cooldown: std::time::Duration::from_secs(1),
        block_idle_grace: std::time::Duration::from_secs(600),
        gc_min_age: std::time::Duration::ZERO,
    };
    let ipam = crate::ipam::Ipam::open(
        opts,
        std::sync::Arc::new(store),
        std::sync::Arc::new(crate::cluster::local::LocalCluster),
    )
    .await
    .unwrap();
    let held: Vec<Ipv4Addr> = ipam
        .allocations(&Default::default())
        .iter()
        .map(|a| a.ip)
        .collect();
    assert_eq!(held, vec!["10.244.0.5".parse::<Ipv4Addr>().unwrap()]);
    assert!(ipam.check_consistency().await.unwrap().is_empty());
}
