//! End-to-end: ferry as the CNI plugin of a real containerd.
//!
//! Each test builds its own little node: a fabric and a node network
//! namespace (the harness's `Fabric` and `Node`), ipamd in the node namespace
//! for ferry, and a private containerd in it too (the harness's
//! `containerd::Containerd`, whose docs say how it stays off the host's CNI
//! dirs and cleans up). The containers run busybox; no image is pulled.
//!
//! Every guard cleans up in `Drop`, even when an assertion fails: the
//! containers and containerd, then ipamd, then the namespaces.

use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use ferry_tests::containerd::{CNI_VERSION, Containerd, require_tools};
use ferry_tests::{
    DEL_SETTLE, Fabric, Ipamd, IpamdConfig, allocation_of, bin, cni_plugin_dir, conflist,
    ferry_plugin_conf, require_root, tail,
};
use serde_json::json;

/// Two busybox containers, started by a real containerd with ferry (+ portmap)
/// as the conflist, get pod IPs from ipamd, reach each other by pod IP, and
/// leave no allocation and no `fry*` link behind once deleted.
#[test]
fn containerd_runs_two_pods_on_ferry_and_cleans_up() -> Result<()> {
    require_root();
    require_tools()?;
    let fabric = Fabric::new()?;
    let node = fabric.add_node()?;
    let ipamd = Ipamd::start(&node, IpamdConfig::default())?;

    let mut ferry = ferry_plugin_conf(ipamd.socket());
    ferry["logFile"] = json!(node.path("cni.log").display().to_string());
    let list = conflist(
        CNI_VERSION,
        "ferry",
        vec![
            ferry,
            json!({"type": "portmap", "capabilities": {"portMappings": true}}),
        ],
    );
    let reference = cni_plugin_dir();
    let plugins = [
        ("ferry", bin("ferry")),
        ("portmap", reference.join("portmap")),
        ("loopback", reference.join("loopback")),
    ];
    let mut ctd = Containerd::start(&node, &list, &plugins)?;
    let cni_log = node.path("cni.log");
    let diag = |ctd: &Containerd| {
        format!(
            "\n--- ferry cni.log tail:\n{}\n--- ipamd log tail:\n{}\n--- containerd log tail:\n{}",
            tail(&cni_log, 30),
            ipamd.log_tail(30),
            ctd.log_tail(15)
        )
    };

    let ids = ["pod-a", "pod-b"];
    for id in ids {
        ctd.run(id)?;
    }
    for id in ids {
        ctd.wait_running(id)
            .with_context(|| format!("container {id} did not start{}", diag(&ctd)))?;
    }

    // Each container: eth0 holds IP/32, routed via 169.254.1.1; the address
    // is the one ipamd allocated to that container, and the host side is the
    // deterministic fry* veth with a /32 route to the pod.
    let allocs = ipamd.allocations()?;
    assert_eq!(
        allocs.len(),
        2,
        "ipamd should hold one allocation per container: {allocs:#?}"
    );
    let mut pod_ips = vec![];
    for id in ids {
        let (ip, len) = ctd.eth0_address(id)?;
        assert_eq!(len, 32, "{id}: eth0 should hold a /32, got {ip}/{len}");
        let cid = Containerd::cni_container_id(id);
        let alloc = allocation_of(&allocs, &cid)
            .with_context(|| format!("no allocation for container ID {cid}: {allocs:#?}"))?;
        assert_eq!(
            alloc["ip"].as_str(),
            Some(ip.to_string().as_str()),
            "{id}: eth0's address should be ipamd's allocation {alloc}"
        );
        assert_eq!(alloc["ifname"].as_str(), Some("eth0"), "{alloc}");
        let routes = ctd.exec_ok(id, &["/bin/ip", "-4", "route", "show"])?;
        assert!(
            routes
                .lines()
                .any(|l| l.starts_with("default via 169.254.1.1 dev eth0")),
            "{id}: expected `default via 169.254.1.1 dev eth0`, got:\n{routes}"
        );
        let veth = ferry_proto::host_veth_name(&cid, "eth0");
        assert!(
            node.ns.links()?.contains(&veth),
            "{id}: host veth {veth} missing in the node netns: {:?}",
            node.ns.links()?
        );
        let host_routes = node.ns.host_routes()?;
        assert!(
            host_routes.contains(&(ip.to_string(), veth.clone())),
            "{id}: node netns should route {ip}/32 to {veth}: {host_routes:?}"
        );
        pod_ips.push(ip);
    }
    assert_ne!(pod_ips[0], pod_ips[1], "the two pods got the same IP");

    // Pod to pod, both ways, by pod IP.
    ctd.ping(ids[0], pod_ips[1]).with_context(|| diag(&ctd))?;
    ctd.ping(ids[1], pod_ips[0]).with_context(|| diag(&ctd))?;

    // Delete both. The foreground `ctr run --rm` deletes task and container
    // and then calls CNI DEL; it exits with the task's status, 128+9 here
    // (1 if the teardown had failed).
    for id in ids {
        let (status, stderr) = ctd.stop(id)?;
        assert_eq!(
            status.code(),
            Some(137),
            "`ctr run {id}` should exit with the killed task's status 137 \
             after a clean CNI DEL; stderr:\n{stderr}{}",
            diag(&ctd)
        );
    }
    let containers = ctd.ctr_ok(&["container", "ls", "--quiet"])?;
    assert!(
        containers.trim().is_empty(),
        "containers left: {containers}"
    );
    let tasks = ctd.tasks()?;
    assert!(tasks.is_empty(), "tasks left: {tasks:?}");

    let allocs = ipamd.allocations()?;
    assert!(
        allocs.is_empty(),
        "allocations left after the containers were deleted: {allocs:#?}{}",
        diag(&ctd)
    );
    let fry = node.ns.ferry_links_after_del(DEL_SETTLE)?;
    assert!(fry.is_empty(), "fry* links left in the node netns: {fry:?}");
    let host_routes = node.ns.host_routes()?;
    for ip in &pod_ips {
        assert!(
            !host_routes.iter().any(|(dst, _)| *dst == ip.to_string()),
            "route to {ip} left in the node netns: {host_routes:?}"
        );
    }
    Ok(())
}

/// The same containerd set-up with the reference ptp + host-local plugins
/// instead of ferry: if this passes and the ferry test fails, look at ferry.
#[test]
fn containerd_harness_works_with_reference_ptp_plugin() -> Result<()> {
    require_root();
    require_tools()?;
    let fabric = Fabric::new()?;
    let node = fabric.add_node()?;
    let hl_dir = node.path("host-local");
    let list = conflist(
        CNI_VERSION,
        "ptp-e2e",
        vec![
            json!({"type": "ptp", "ipam": {"type": "host-local",
                "subnet": "10.250.0.0/24", "dataDir": hl_dir.display().to_string()}}),
            json!({"type": "portmap", "capabilities": {"portMappings": true}}),
        ],
    );
    let reference = cni_plugin_dir();
    let plugins: Vec<(&str, PathBuf)> = ["ptp", "host-local", "portmap", "loopback"]
        .into_iter()
        .map(|p| (p, reference.join(p)))
        .collect();
    let mut ctd = Containerd::start(&node, &list, &plugins)?;
    let ids = ["ptp-a", "ptp-b"];
    for id in ids {
        ctd.run(id)?;
    }
    let mut ips = vec![];
    for id in ids {
        ctd.wait_running(id)?;
        ips.push(ctd.eth0_address(id)?.0);
    }
    ctd.ping(ids[0], ips[1])?;
    ctd.ping(ids[1], ips[0])?;
    for id in ids {
        let (status, stderr) = ctd.stop(id)?;
        assert_eq!(status.code(), Some(137), "ctr run {id}: {stderr}");
    }
    // host-local keeps one file per leased IP: CNI DEL must have removed them.
    let leased: Vec<String> = fs::read_dir(hl_dir.join("ptp-e2e"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<Ipv4Addr>().is_ok())
        .collect();
    assert!(leased.is_empty(), "host-local leases left: {leased:?}");
    assert!(
        node.ns.links()?.iter().all(|l| !l.starts_with("veth")),
        "ptp veths left in the node netns"
    );
    Ok(())
}
