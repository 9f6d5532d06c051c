//! Chaining: conflist [ferry, portmap] run libcni-style inside a node netns.
//!
//! portmap must get ferry's result as a valid prevResult on ADD and succeed
//! with a result that still carries ferry's address; the port mapping must
//! actually forward (a client on the fabric fetches a page served in the pod
//! by busybox httpd, through nodeIP:18080); CHECK and DEL (twice) go through the whole chain.
//! portmap's iptables/nftables rules live only in the node namespace.

use std::fs;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_tests::*;
use serde_json::{Value, json};

const HOST_PORT: u16 = 18080;

/// Everything portmap may have written in the node netns: iptables and nftables.
fn firewall_dump(ns: &Netns) -> String {
    let mut s = String::new();
    for argv in [&["iptables-save"][..], &["nft", "list", "ruleset"][..]] {
        if let Ok(o) = ns.exec(argv) {
            s.push_str(&String::from_utf8_lossy(&o.stdout));
        }
    }
    s
}

#[test]
fn ferry_then_portmap() -> Result<()> {
    require_root();
    let fabric = Fabric::new()?;
    let node = fabric.add_node()?;
    // A plain host on the fabric, playing a client outside the node.
    let client = fabric.add_node()?;
    let ipamd = Ipamd::start(&node, IpamdConfig::default())?;
    let rt = Runtime::new(Cni::new(&node));
    // Debian's portmap (containernetworking-plugins 1.1) speaks CNI up to 1.0.0,
    // so a chain with it is a 1.0.0 conflist, as a runtime would write it.
    let list = conflist(
        "1.0.0",
        "ferry-chain",
        vec![
            ferry_plugin_conf(ipamd.socket()),
            json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
        ],
    );
    let rc =
        json!({"portMappings": [{"hostPort": HOST_PORT, "containerPort": 80, "protocol": "tcp"}]});
    let pod = Pod::new()?;
    let call = CniCall::add(&pod);

    // ADD: ferry, then portmap with ferry's result as prevResult.
    let ferry_only = Runtime::plugin_netconf(&list, 0, None, &rc)?;
    ensure!(ferry_only.get("runtimeConfig").is_none());
    let out = rt.add(&list, &call, &rc)?;
    ensure!(out.success(), "ADD through [ferry, portmap] failed: {out}");
    let final_result = out.json.clone().context("no result")?;
    let ips = out.ips();
    ensure!(
        ips.len() == 1,
        "the chain's result lost ferry's address: {final_result}"
    );
    ensure!(
        pod.addrs()? == ips,
        "pod eth0 holds {:?}, the result says {ips:?}",
        pod.addrs()?
    );
    let allocs = ipamd.allocations()?;
    ensure!(
        allocs
            .iter()
            .any(|a| a["ip"] == ips[0].to_string().as_str()),
        "{} is not allocated in ipamd: {allocs:?}",
        ips[0]
    );
    let interfaces = final_result["interfaces"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(
        interfaces.iter().any(|i| i["name"] == "eth0"),
        "result has no eth0 interface: {final_result}"
    );

    // portmap's rules are in the node netns.
    let rules = firewall_dump(&node.ns);
    ensure!(
        rules.contains(&HOST_PORT.to_string()),
        "no rule for port {HOST_PORT} in the node netns:\n{rules}"
    );

    // The mapping forwards: busybox httpd on pod:80, fetched via node:18080 from the client.
    let www = tempfile::tempdir()?;
    fs::write(www.path().join("index.html"), "hello from the pod\n")?;
    let server = pod
        .ns
        .command("busybox")
        .args(["httpd", "-f", "-p", "80", "-h"])
        .arg(www.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting busybox httpd in the pod")?;
    let _server = ChildGuard::new(server);
    let url = format!("http://{}:{HOST_PORT}/", node.ip);
    let node_ip = node.ip.to_string();
    let page = wait_until(
        "the page through the port mapping",
        Duration::from_secs(20),
        || Ok(Some(client.ns.http_get(&node_ip, HOST_PORT, "/")?)),
    )?;
    ensure!(
        page.contains("hello from the pod"),
        "got {page:?} from {url}"
    );

    // CHECK through the chain. ferry's CHECK (first, with the chain's final
    // result as prevResult) must pass. Debian's portmap 1.1.1 has a known bug
    // (containernetworking/plugins#819, fixed upstream in 1.2): its CHECK looks
    // for ip6tables rules an IPv4-only pod never had. Only that exact failure
    // is tolerated for portmap's step.
    let steps = rt.check_steps(&list, &CniCall::check(&pod), &rc)?;
    ensure!(steps.len() == 2, "CHECK ran {} plugins", steps.len());
    let (ty, ferry_check) = &steps[0];
    ensure!(
        ty == "ferry" && ferry_check.success(),
        "ferry's CHECK in the chain failed: {ferry_check}"
    );
    let (_, portmap_check) = &steps[1];
    if !portmap_check.success() {
        ensure!(
            portmap_check.msg().contains("could not check ipv6 dnat"),
            "portmap's CHECK failed: {portmap_check}"
        );
        eprintln!(
            "note: portmap CHECK hit containernetworking/plugins#819 (IPv6 check on an IPv4-only pod); tolerated"
        );
    }

    // DEL through the chain (reverse order, cached prevResult), then again.
    let out = rt.del(&list, &CniCall::del(&pod), &rc)?;
    ensure!(out.success(), "DEL through the chain failed: {out}");
    let out = rt.del(&list, &CniCall::del(&pod), &rc)?;
    ensure!(out.success(), "second DEL through the chain failed: {out}");

    let rules = firewall_dump(&node.ns);
    ensure!(
        !rules.contains(&format!("dport {HOST_PORT}"))
            && !rules.contains(&format!("--dport {HOST_PORT}")),
        "portmap rules for {HOST_PORT} left after DEL:\n{rules}"
    );
    let allocs: Vec<Value> = ipamd.allocations()?;
    ensure!(allocs.is_empty(), "allocations left: {allocs:?}");
    ensure!(
        node.ns.ferry_links()?.is_empty(),
        "fry links left after DEL"
    );
    ensure!(
        node.ns.host_routes()?.is_empty(),
        "/32 routes left after DEL"
    );
    Ok(())
}
