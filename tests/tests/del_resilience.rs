//! DEL in the situations that leave pods stuck in Terminating elsewhere:
//! CNI_NETNS empty, CNI_NETNS pointing at a namespace that is gone, and ipamd
//! down. In the last case DEL tears down the dataplane and succeeds, and
//! ipamd's reconcile frees the address once it is back.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_tests::*;
use serde_json::{Value, json};

/// A veth named like ferry's, with no pod or allocation behind it: what a
/// crash between a DEL's release and its veth delete leaves.
fn add_orphan_veth(ns: &Netns, name: &str) -> Result<()> {
    ns.ip(&[
        "link",
        "add",
        name,
        "type",
        "veth",
        "peer",
        "name",
        "orphanpeer",
    ])?;
    Ok(())
}

#[test]
fn del_with_empty_or_vanished_netns_frees_everything() -> Result<()> {
    require_root();
    // Bound fabric first so that it drops last, after ipamd and the node.
    let OneNode {
        fabric: _fabric,
        node,
        ipamd,
        list,
        rt,
    } = OneNode::start(IpamdConfig::default())?;

    let empty = Pod::new()?;
    rt.add_pod(&list, &empty)?;
    let out = rt.del(
        &list,
        &CniCall::del(&empty).with_netns(Some("")),
        &json!({}),
    )?;
    ensure!(out.success(), "DEL with empty CNI_NETNS failed: {out}");

    let Pod {
        ns,
        container_id,
        ifname,
    } = Pod::new()?;
    let netns_path = ns.path().display().to_string();
    let vanished = Pod {
        ns,
        container_id: container_id.clone(),
        ifname: ifname.clone(),
    };
    rt.add_pod(&list, &vanished)?;
    let call = CniCall::del(&vanished);
    // The runtime removed the sandbox before calling DEL.
    drop(vanished);
    ensure!(
        !std::path::Path::new(&netns_path).exists(),
        "{netns_path} still exists"
    );
    let out = rt.del(&list, &call, &json!({}))?;
    ensure!(out.success(), "DEL with a vanished netns failed: {out}");
    let again = rt.del(&list, &call, &json!({}))?;
    ensure!(again.success(), "second DEL failed: {again}");

    ensure!(
        ipamd.held()?.is_empty(),
        "allocations left: {:?}",
        ipamd.held()?
    );
    let links = node.ns.ferry_links_after_del(DEL_SETTLE)?;
    ensure!(links.is_empty(), "fry links left: {links:?}");
    Ok(())
}

#[test]
fn del_while_ipamd_is_down_then_reconcile_frees_the_address() -> Result<()> {
    require_root();
    let OneNode {
        fabric: _fabric,
        node,
        mut ipamd,
        list,
        rt,
    } = OneNode::start(IpamdConfig {
        reconcile_interval: Some(1),
        stale_grace: Some(2),
        ..IpamdConfig::default()
    })?;

    let gone = Pod::new()?;
    let kept = Pod::new()?;
    let gone_ip = rt.add_pod(&list, &gone)?;
    let kept_ip = rt.add_pod(&list, &kept)?;

    ipamd.kill();
    let out = rt.del(&list, &CniCall::del(&gone), &json!({}))?;
    ensure!(out.success(), "DEL with ipamd down failed: {out}");
    let links = node.ns.ferry_links()?;
    ensure!(
        !links.contains(&gone.host_veth()),
        "DEL left the host veth {}: {links:?}",
        gone.host_veth()
    );
    ensure!(
        gone.addrs().map(|a| a.is_empty()).unwrap_or(true),
        "pod side still addressed"
    );
    // The runtime removes the netns after DEL; reconcile frees an address
    // only once both the veth and the netns are gone.
    drop(gone);

    ipamd.restart()?;
    // The address is still recorded right after the restart: nothing was released blindly.
    let held = ipamd.held()?;
    ensure!(
        held.iter().any(|(ip, _)| *ip == gone_ip),
        "ipamd forgot {gone_ip} without reconciling: {held:?}"
    );
    wait_until(
        "reconcile to free the orphaned address",
        Duration::from_secs(30),
        || {
            let held = ipamd.held()?;
            Ok((!held.iter().any(|(ip, _)| *ip == gone_ip)).then_some(()))
        },
    )
    .with_context(|| ipamd.log_tail(40))?;

    // The pod whose veth still exists keeps its address through reconcile.
    let held = ipamd.held()?;
    ensure!(
        held == vec![(kept_ip, kept.container_id.clone())],
        "after reconcile ipamd holds {held:?}, expected only {kept_ip}"
    );
    ensure!(
        kept.ns.ping(&node.ip.to_string()),
        "the kept pod lost connectivity"
    );

    let out = rt.del(&list, &CniCall::del(&kept), &json!({}))?;
    ensure!(out.success(), "DEL failed: {out}");
    ensure!(ipamd.held()?.is_empty(), "allocations left");
    Ok(())
}

#[test]
fn a_foreign_interface_survives_the_failed_add_and_the_del_after_it() -> Result<()> {
    require_root();
    let OneNode {
        fabric: _fabric,
        node: _node,
        ipamd,
        list,
        rt,
    } = OneNode::start(IpamdConfig::default())?;

    let pod = Pod::new()?;
    pod.ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "other0",
    ])?;
    let out = rt.add(&list, &CniCall::add(&pod), &json!({}))?;
    ensure!(
        out.error_code() == Some(104),
        "ADD over a foreign eth0: {out}"
    );
    // The runtime calls DEL after a failed ADD.
    let out = rt.del(&list, &CniCall::del(&pod), &json!({}))?;
    ensure!(out.success(), "DEL after the failed ADD: {out}");

    let links = pod.ns.links()?;
    ensure!(
        links.iter().any(|l| l == "eth0") && links.iter().any(|l| l == "other0"),
        "ferry deleted an interface that was not its own: {links:?}"
    );
    ensure!(ipamd.held()?.is_empty(), "the failed ADD kept an address");
    Ok(())
}

#[test]
fn ipamctl_gc_cleans_up_after_pods_gone_without_del() -> Result<()> {
    require_root();
    let OneNode {
        fabric: _fabric,
        node,
        ipamd,
        list,
        rt,
    } = OneNode::start(IpamdConfig::default())?;
    let kept = Pod::new()?;
    let kept_ip = rt.add_pod(&list, &kept)?;
    let lost = Pod::new()?;
    let lost_ip = rt.add_pod(&list, &lost)?;
    // The pod's netns goes without a DEL (a crash, a reboot): its veth with
    // it, once the kernel has cleaned the namespace up.
    let lost_veth = lost.host_veth();
    drop(lost);
    wait_until("the lost pod's veth to go", Duration::from_secs(30), || {
        Ok((!node.ns.ferry_links()?.contains(&lost_veth)).then_some(()))
    })?;
    // And a host veth of ours that nothing holds.
    add_orphan_veth(&node.ns, "fry0dead00beef")?;

    let actions = |v: &Value, field: &str| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|f| format!("{} {}", f["kind"].as_str().unwrap_or(""), f[field]))
            .collect()
    };
    let plan = ipamd.ipamctl_json(&["gc", "--dry-run"])?;
    let planned = actions(&plan, "detail");
    ensure!(planned.len() == 2, "gc --dry-run: {planned:?}");
    ensure!(
        planned
            .iter()
            .any(|p| p.starts_with("leaked-allocation") && p.contains(&lost_ip.to_string())),
        "{planned:?}"
    );
    ensure!(
        planned
            .iter()
            .any(|p| p.starts_with("orphan-veth") && p.contains("fry0dead00beef")),
        "{planned:?}"
    );
    ensure!(ipamd.held()?.len() == 2, "a dry run changed the state");
    ensure!(
        node.ns
            .ferry_links()?
            .contains(&"fry0dead00beef".to_string())
    );

    let done = actions(&ipamd.ipamctl_json(&["gc"])?, "detail");
    ensure!(
        done.iter()
            .filter(|d| d.contains("released ") || d.contains("deleted host veth"))
            .count()
            == 2,
        "gc: {done:?}"
    );
    ensure!(
        ipamd.held()? == vec![(kept_ip, kept.container_id.clone())],
        "after gc: {:?}",
        ipamd.held()?
    );
    ensure!(node.ns.ferry_links()? == vec![kept.host_veth()]);
    ensure!(kept.ns.ping(&node.ip.to_string()), "gc hurt the live pod");
    let again = ipamd.ipamctl_json(&["gc"])?;
    ensure!(
        again.as_array().is_some_and(Vec::is_empty),
        "second gc: {again}"
    );
    let out = rt.del(&list, &CniCall::del(&kept), &json!({}))?;
    ensure!(out.success(), "DEL failed: {out}");
    Ok(())
}

/// Reconcile and `ipamctl gc` delete only ferry's own host veths: named
/// `fry` + 11 hex and of kind veth. An operator's `frybr0` bridge and
/// `fry-other` veth survive two reconcile looks and a gc, while a real
/// orphan of ferry's is deleted beside them (proof that the looks ran).
#[test]
fn reconcile_and_gc_leave_links_that_only_look_like_ferrys_alone() -> Result<()> {
    require_root();
    let OneNode {
        fabric: _fabric,
        node,
        ipamd,
        list,
        rt,
    } = OneNode::start(IpamdConfig {
        reconcile_interval: Some(1),
        stale_grace: Some(1),
        ..IpamdConfig::default()
    })?;
    // A live pod: reconcile acts only while it sees a ferry veth at all.
    let pod = Pod::new()?;
    rt.add_pod(&list, &pod)?;
    node.ns.ip(&["link", "add", "frybr0", "type", "bridge"])?;
    node.ns.ip(&[
        "link",
        "add",
        "fry-other",
        "type",
        "veth",
        "peer",
        "name",
        "otherpeer",
    ])?;
    let orphan = "fry0dead00beef";
    add_orphan_veth(&node.ns, orphan)?;

    wait_until(
        "reconcile to delete the orphan veth",
        Duration::from_secs(30),
        || Ok((!node.ns.links()?.iter().any(|l| l == orphan)).then_some(())),
    )
    .with_context(|| ipamd.log_tail(40))?;
    let gc = ipamd.ipamctl_json(&["gc"])?;
    ensure!(gc.as_array().is_some_and(Vec::is_empty), "gc acted: {gc}");
    let links = node.ns.links()?;
    for name in ["frybr0", "fry-other", "otherpeer"] {
        ensure!(
            links.iter().any(|l| l == name),
            "{name} was deleted: {links:?}\n{}",
            ipamd.log_tail(40)
        );
    }
    ensure!(
        pod.ns.ping(&node.ip.to_string()),
        "the live pod lost connectivity"
    );
    let out = rt.del(&list, &CniCall::del(&pod), &json!({}))?;
    ensure!(out.success(), "DEL failed: {out}");
    Ok(())
}
