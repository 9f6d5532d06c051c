//! ipamd as an operator meets it: the socket is private, gRPC health answers,
//! every ipamctl command tells the truth, the CNI STATUS and GC verbs work
//! through ipamd, and SIGTERM stops it cleanly.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_tests::*;
use serde_json::{Value, json};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn health(socket: &std::path::Path) -> Result<ServingStatus> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let channel = ferry_proto::connect_uds(socket, Duration::from_secs(5)).await?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: ferry_proto::HEALTH_SERVICE.to_string(),
            })
            .await?;
        Ok(reply.into_inner().status())
    })
}

#[test]
fn socket_health_ipamctl_status_gc_and_sigterm() -> Result<()> {
    require_root();
    let fabric = Fabric::new()?;
    let node = fabric.add_node()?;
    let mut ipamd = Ipamd::start(
        &node,
        IpamdConfig {
            pod_cidr: "10.244.0.0/24".into(),
            block_size: Some(28),
            // The GC below comes right after the ADDs; pools.rs covers the grace.
            extra_args: vec!["--gc-min-age".into(), "0".into()],
            ..IpamdConfig::default()
        },
    )?;
    let socket = ipamd.socket().to_path_buf();

    let meta = std::fs::metadata(&socket)?;
    ensure!(
        meta.file_type().is_socket(),
        "{} is not a socket",
        socket.display()
    );
    let mode = meta.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "socket mode is {mode:o}, want 600");
    ensure!(
        health(&socket)? == ServingStatus::Serving,
        "gRPC health does not report SERVING"
    );

    let cni = Cni::new(&node);
    let netconf = ferry_netconf(&socket, "1.1.0");
    let status = cni.ferry(&CniCall::bare("STATUS"), &netconf)?;
    ensure!(status.success(), "STATUS with ipamd ready: {status}");

    let rt = Runtime::new(Cni::new(&node));
    let list = conflist("1.1.0", "ferry-e2e", vec![ferry_plugin_conf(&socket)]);
    let pods: Vec<Pod> = (0..3).map(|_| Pod::new()).collect::<Result<_>>()?;
    let ips: Vec<String> = pods
        .iter()
        .map(|p| Ok(rt.add_pod(&list, p)?.to_string()))
        .collect::<Result<_>>()?;

    let st: Value = ipamd.ipamctl_json(&["status"])?;
    ensure!(
        st["readiness"] == "READY" && st["allocations"] == 3,
        "status: {st}"
    );
    let pools = ipamd.ipamctl_json(&["pools"])?;
    let default = pools
        .as_array()
        .and_then(|p| p.iter().find(|p| p["isDefault"] == true))
        .context("no default pool")?;
    ensure!(
        default["cidr"] == "10.244.0.0/24" && default["allocated"] == 3 && default["blocks"] == 1,
        "default pool: {default}"
    );
    let blocks = ipamd.blocks()?;
    ensure!(
        blocks.len() == 1 && blocks[0]["node"] == node.name.as_str() && blocks[0]["allocated"] == 3,
        "blocks: {blocks:?}"
    );

    // show, by IP and by container ID prefix.
    let shown = ipamd.ipamctl_json(&["show", &ips[0]])?;
    ensure!(
        shown["state"] == "allocated"
            && shown["allocations"][0]["containerId"] == pods[0].container_id.as_str(),
        "show {}: {shown}",
        ips[0]
    );
    let by_cid = ipamd.ipamctl_json(&["show", &pods[1].container_id[..12]])?;
    ensure!(
        by_cid[0]["ip"] == ips[1].as_str() && by_cid.as_array().map(Vec::len) == Some(1),
        "show by container: {by_cid}"
    );
    let human = ipamd.ipamctl_ok(&["allocations"])?;
    ensure!(
        ips.iter().all(|ip| human.contains(ip.as_str())),
        "table lacks an IP:\n{human}"
    );

    // release by IP: the address goes to cooldown; the pod's own DEL still succeeds later.
    let released = ipamd.ipamctl_json(&["release", &ips[0]])?;
    ensure!(
        released["released"][0]["ip"] == ips[0].as_str(),
        "release: {released}"
    );
    let shown = ipamd.ipamctl_json(&["show", &ips[0]])?;
    ensure!(shown["state"] == "cooling", "after release: {shown}");
    let out = rt.del(&list, &CniCall::del(&pods[0]), &json!({}))?;
    ensure!(out.success(), "DEL after force-release: {out}");

    // GC keeps only pods[1]: pods[2] loses its address and its host veth.
    let mut gc_conf = netconf.clone();
    gc_conf["cni.dev/valid-attachments"] =
        json!([{"containerID": pods[1].container_id, "ifname": "eth0"}]);
    let gc = cni.ferry(&CniCall::bare("GC"), &gc_conf)?;
    ensure!(gc.success(), "GC failed: {gc}");
    let held: Vec<String> = ipamd
        .allocations()?
        .iter()
        .filter_map(|a| a["ip"].as_str().map(str::to_string))
        .collect();
    ensure!(
        held == vec![ips[1].clone()],
        "after GC ipamd holds {held:?}"
    );
    let links = node.ns.ferry_links()?;
    ensure!(
        links == vec![pods[1].host_veth()],
        "after GC the fry links are {links:?}"
    );
    let out = rt.del(&list, &CniCall::del(&pods[1]), &json!({}))?;
    ensure!(out.success(), "DEL: {out}");

    let code = ipamd.terminate()?;
    ensure!(code.success(), "SIGTERM: ipamd exited with {code}");
    ensure!(!socket.exists(), "the socket outlived ipamd");
    let status = cni.ferry(&CniCall::bare("STATUS"), &netconf)?;
    ensure!(
        status.error_code() == Some(50),
        "STATUS with ipamd stopped: {status}"
    );
    Ok(())
}

#[test]
fn status_answers_51_when_the_pool_is_exhausted() -> Result<()> {
    require_root();
    let fabric = Fabric::new()?;
    let node = fabric.add_node()?;
    // A /30 pool: two usable addresses (network and broadcast are never handed out).
    let ipamd = Ipamd::start(
        &node,
        IpamdConfig {
            pod_cidr: "10.244.0.0/30".into(),
            block_size: Some(30),
            ..IpamdConfig::default()
        },
    )?;
    let cni = Cni::new(&node);
    let netconf = ferry_netconf(ipamd.socket(), "1.1.0");
    let rt = Runtime::new(Cni::new(&node));
    let list = conflist(
        "1.1.0",
        "ferry-e2e",
        vec![ferry_plugin_conf(ipamd.socket())],
    );
    let pods: Vec<Pod> = (0..2).map(|_| Pod::new()).collect::<Result<_>>()?;
    for pod in &pods {
        rt.add_pod(&list, pod)?;
    }
    let status = cni.ferry(&CniCall::bare("STATUS"), &netconf)?;
    ensure!(
        status.error_code() == Some(51),
        "STATUS with no address left: {status}"
    );
    ensure!(
        status.msg().contains("default"),
        "STATUS should name the pool: {status}"
    );

    for pod in &pods {
        let out = rt.del(&list, &CniCall::del(pod), &json!({}))?;
        ensure!(out.success(), "DEL: {out}");
    }
    Ok(())
}
