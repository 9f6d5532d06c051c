//! After a database rebuild ipamd hands out no address twice, through the
//! real binaries.
//!
//! A pool added at run time (`ipamctl pool add`) is lost with a damaged
//! database, and the rebuild adopts only addresses inside configured pools.
//! When the operator adds the pool again, ipamd must adopt what live pods
//! hold in it (the allocator hands out the lowest addresses first: exactly
//! theirs), and until then neither reconcile nor gc may unplug those
//! pods. And the cooldowns lost with the old database must still hold
//! back addresses freed just before it: until the cooldown has passed since
//! the rebuild, no new address is handed out (ADD answers 11, STATUS 50).

use anyhow::{Context, Result, ensure};
use ferry_tests::*;
use serde_json::json;

/// Long enough for the checks made during the hold after the rebuild.
const COOLDOWN_SECS: u64 = 8;
const TEAM_CIDR: &str = "10.250.0.0/24";

#[test]
fn a_rebuilt_database_hands_out_no_live_or_cooling_address() -> Result<()> {
    require_root();
    let OneNode {
        rt,
        list,
        mut ipamd,
        node,
        fabric: _fabric,
    } = OneNode::start(IpamdConfig {
        cooldown: Some(COOLDOWN_SECS),
        log_level: Some("info".into()),
        ..IpamdConfig::default()
    })?;
    ipamd.ipamctl_ok(&["pool", "add", "team", TEAM_CIDR, "--namespace", "team"])?;
    let team: Vec<Pod> = (0..3).map(|_| Pod::new()).collect::<Result<_>>()?;
    let mut team_ips = Vec::new();
    for pod in &team {
        team_ips.push(rt.add_one(&list, &CniCall::add_in(pod, "team"), &json!({}))?);
    }
    ensure!(
        team_ips.iter().all(|ip| TEAM_CIDR
            .parse::<ipnet::Ipv4Net>()
            .is_ok_and(|n| n.contains(ip))),
        "team pods outside {TEAM_CIDR}: {team_ips:?}"
    );
    // The last team pod goes: its address is cooling down at the damage.
    let out = rt.del(&list, &CniCall::del(&team[2]), &json!({}))?;
    ensure!(out.success(), "DEL failed: {out}");
    let (live, live_ips) = (&team[..2], &team_ips[..2]);

    let st = ipamd.terminate()?;
    ensure!(st.success(), "ipamd did not stop cleanly: {st}");
    std::fs::File::options()
        .write(true)
        .open(node.path("state").join("db").join("db"))?
        .set_len(300)?;
    ipamd
        .restart_answering()
        .context("ipamd did not come back after the damage")?;

    // Until the lost cooldowns have passed: no new address, and it says why.
    let newcomer = Pod::new()?;
    let out = rt.add(
        &list,
        &CniCall::add(&newcomer).with_args(&k8s_args("default", newcomer.ns.name())),
        &json!({}),
    )?;
    ensure!(
        out.error_code() == Some(11) && out.msg().contains("rebuilt"),
        "ADD right after the rebuild: {out}\nipamd log:\n{}",
        ipamd.log_tail(30)
    );
    let status = rt.status(&list)?;
    ensure!(
        status.error_code() == Some(50) && status.msg().contains("held"),
        "STATUS right after the rebuild: {status}"
    );

    // The run-time pool is gone with the old database, so nothing holds
    // the team pods' addresses: gc must still not unplug them.
    let gc = ipamd.ipamctl_ok(&["gc"])?;
    let links = node.ns.ferry_links()?;
    for pod in live {
        let veth = pod.host_veth();
        ensure!(
            links.contains(&veth) && gc.lines().any(|l| l.contains(&veth) && l.contains("kept")),
            "gc before the pool is back: {veth} unplugged or not said to be kept\n{gc}\nlinks: {links:?}"
        );
    }

    // Adding the pool again adopts what the live team pods hold.
    ipamd.ipamctl_ok(&["pool", "add", "team", TEAM_CIDR, "--namespace", "team"])?;
    let held = ipamd.held()?;
    for (pod, ip) in live.iter().zip(live_ips) {
        let want = (*ip, format!("adopted:{}", pod.host_veth()));
        ensure!(
            held.contains(&want),
            "pool add did not adopt {ip} of {}: ipamd holds {held:?}",
            pod.host_veth()
        );
    }
    // Their blocks get a blackhole, as a claim at Allocate does: the route
    // reconciler follows the core's blocks, so poll briefly.
    wait_until(
        "a blackhole route to cover every adopted address",
        std::time::Duration::from_secs(5),
        || {
            let blackholes: Vec<ipnet::Ipv4Net> = node
                .ns
                .ip(&["-4", "route", "show", "proto", "102", "type", "blackhole"])?
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
                .collect();
            let uncovered: Vec<_> = live_ips
                .iter()
                .filter(|ip| !blackholes.iter().any(|b| b.contains(*ip)))
                .collect();
            ensure!(
                uncovered.is_empty(),
                "no blackhole route covers the adopted {uncovered:?}: {blackholes:?}"
            );
            Ok(Some(()))
        },
    )?;

    wait_until(
        "STATUS to succeed once the cooldown has passed",
        std::time::Duration::from_secs(COOLDOWN_SECS + 20),
        || Ok(rt.status(&list)?.success().then_some(())),
    )?;
    let fresh = Pod::new()?;
    let ip = rt.add_one(&list, &CniCall::add_in(&fresh, "team"), &json!({}))?;
    ensure!(
        !live_ips.contains(&ip),
        "a new team pod got {ip}, which a live pod holds ({live_ips:?})"
    );
    for pod in live {
        ensure!(
            pod.ns.ping(&node.ip.to_string()),
            "a live team pod lost its network"
        );
    }

    for pod in live.iter().chain([&fresh]) {
        let out = rt.del(&list, &CniCall::del(pod), &json!({}))?;
        ensure!(out.success(), "DEL failed: {out}");
    }
    let left = ipamd.held()?;
    ensure!(left.is_empty(), "allocations left after DEL: {left:?}");
    Ok(())
}
