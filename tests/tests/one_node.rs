//! One node, twenty pods: the real ferry plugin and ipamd in a node netns.
//!
//! What a user checks: every pod gets a unique address from the node's blocks,
//! pods reach each other and the node, CHECK passes, and after DEL nothing is
//! left: no allocation, no `fry*` veth, no /32 route; a repeated DEL succeeds.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};
use ferry_tests::*;
use serde_json::json;

const PODS: usize = 20;

#[test]
fn one_node_twenty_pods() -> Result<()> {
    require_root();
    let fabric = Fabric::new()?;
    let node = fabric.add_node()?;
    let ipamd = Ipamd::start(&node, IpamdConfig::default())?;
    let rt = Runtime::new(Cni::new(&node));
    let list = conflist(
        "1.1.0",
        "ferry-e2e",
        vec![ferry_plugin_conf(ipamd.socket())],
    );
    let list_031 = conflist(
        "0.3.1",
        "ferry-e2e",
        vec![ferry_plugin_conf(ipamd.socket())],
    );
    let none = json!({});

    let pods: Vec<Pod> = (0..PODS).map(|_| Pod::new()).collect::<Result<_>>()?;
    let mut ips: Vec<Ipv4Addr> = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        // Pod 0 is added by an older runtime speaking CNI 0.3.1.
        let l = if i == 0 { &list_031 } else { &list };
        let out = rt.add(l, &CniCall::add(pod), &none)?;
        ensure!(out.success(), "ADD of pod {i} failed: {out}");
        let res = out.json.clone().context("ADD printed no JSON")?;
        if i == 0 {
            ensure!(res["cniVersion"] == "0.3.1", "0.3.1 ADD answered {res}");
            ensure!(
                res["ips"][0]["version"] == "4",
                "0.3.1 result must carry \"version\":\"4\": {res}"
            );
        } else {
            ensure!(res["cniVersion"] == "1.1.0", "1.1.0 ADD answered {res}");
        }
        let got = out.ips();
        ensure!(got.len() == 1, "pod {i}: expected one IPv4 address: {res}");
        let on_eth0 = pod.addrs()?;
        ensure!(
            on_eth0 == got,
            "pod {i}: eth0 holds {on_eth0:?}, the result says {got:?}"
        );
        ips.push(got[0]);
    }

    // Unique, and inside the node's blocks.
    let unique_ips: HashSet<_> = ips.iter().collect();
    ensure!(unique_ips.len() == PODS, "duplicate addresses: {ips:?}");
    let blocks = ipamd.blocks()?;
    let cidrs = block_cidrs(&blocks);
    ensure!(
        !cidrs.is_empty(),
        "ipamctl blocks shows no block: {blocks:?}"
    );
    for ip in &ips {
        ensure!(
            cidrs.iter().any(|c| c.contains(ip)),
            "{ip} is in none of the node's blocks {cidrs:?}"
        );
    }
    let allocs = ipamd.allocations()?;
    ensure!(
        allocs.len() == PODS,
        "{} allocations for {PODS} pods: {allocs:#?}",
        allocs.len()
    );
    for (pod, ip) in pods.iter().zip(&ips) {
        let ip_s = ip.to_string();
        ensure!(
            allocs
                .iter()
                .any(|a| a["containerId"] == pod.container_id.as_str() && a["ip"] == ip_s.as_str()),
            "no allocation of {ip} to {}: {allocs:#?}",
            pod.container_id
        );
    }
    ensure!(
        node.ns.ferry_links()?.len() == PODS,
        "expected {PODS} fry links"
    );
    ensure!(
        node.ns.host_routes()?.len() == PODS,
        "expected {PODS} /32 routes: {:?}",
        node.ns.host_routes()?
    );

    // Connectivity: two other pods and the node's fabric address.
    let node_ip = node.ip.to_string();
    for (i, pod) in pods.iter().enumerate() {
        for j in [(i + 1) % PODS, (i + 7) % PODS] {
            let dst = ips[j].to_string();
            ensure!(
                pod.ns.ping(&dst),
                "pod {i} ({}) cannot ping pod {j} ({dst})",
                ips[i]
            );
        }
        ensure!(
            pod.ns.ping(&node_ip),
            "pod {i} cannot ping the node at {node_ip}"
        );
    }

    // CHECK (1.1.0 pods; CNI 0.3.1 has no CHECK).
    for (i, pod) in pods.iter().enumerate().skip(1) {
        let out = rt.check(&list, &CniCall::check(pod), &none)?;
        ensure!(out.success(), "CHECK of pod {i} failed: {out}");
    }

    // DEL everything.
    for (i, pod) in pods.iter().enumerate() {
        let l = if i == 0 { &list_031 } else { &list };
        let out = rt.del(l, &CniCall::del(pod), &none)?;
        ensure!(out.success(), "DEL of pod {i} failed: {out}");
    }
    let allocs = ipamd.allocations()?;
    ensure!(allocs.is_empty(), "allocations left after DEL: {allocs:#?}");
    // The host veths (and their /32 routes) go shortly after, in ipamd.
    storm::wait_node_clean(&ipamd, &node, DEL_SETTLE)?;
    for (i, pod) in pods.iter().enumerate() {
        ensure!(
            !pod.ns.links()?.iter().any(|l| l == "eth0"),
            "pod {i} still has eth0 after DEL"
        );
    }

    // A second DEL (no cached result any more) is a success too.
    for (i, pod) in pods.iter().enumerate() {
        let l = if i == 0 { &list_031 } else { &list };
        let out = rt.del(l, &CniCall::del(pod), &none)?;
        ensure!(out.success(), "second DEL of pod {i} failed: {out}");
    }
    Ok(())
}
