//! Reboot: the node goes down hard with pods on it and
//! comes back without them, and no runtime ever calls DEL. ipamd must notice
//! by itself (reconcile: the pod's host veth and its netns path are both
//! gone, two looks a grace period apart) and free every leaked address.
//!
//! The "reboot": SIGKILL ipamd, delete the pods' netns (their veths vanish
//! with them), start a new ipamd on the same state dir.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ferry_tests::storm::new_pods;
use ferry_tests::*;
use serde_json::json;

const PODS: usize = 5;

/// True when `line` names `ip` as a whole address (10.244.0.1 is not 10.244.0.10).
fn names_ip(line: &str, ip: &str) -> bool {
    line.match_indices(ip).any(|(at, _)| {
        let after = line[at + ip.len()..].chars().next();
        let before = line[..at].chars().next_back();
        !after.is_some_and(|c| c.is_ascii_digit() || c == '.')
            && !before.is_some_and(|c| c.is_ascii_digit() || c == '.')
    })
}

#[test]
fn leaked_addresses_come_back_after_a_reboot() -> Result<()> {
    require_root();
    let start = Instant::now();
    let cfg = IpamdConfig {
        stale_grace: Some(2),
        reconcile_interval: Some(1),
        ..IpamdConfig::default()
    };
    let mut w = OneNode::start(cfg)?;
    let pods = new_pods(PODS, PODS)?;
    let mut ips = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let out = w.rt.add(&w.list, &CniCall::add(pod), &json!({}))?;
        ensure!(out.success(), "ADD {i} failed: {out}");
        ips.push(out.ips().first().copied().context("ADD gave no address")?);
    }
    ensure!(
        w.ipamd.allocations()?.len() == PODS,
        "expected {PODS} allocations"
    );

    // The crash: ipamd dies, the pods' namespaces go, nobody calls DEL.
    w.ipamd.kill();
    let netns_paths: Vec<_> = pods.iter().map(|p| p.netns_path()).collect();
    drop(pods);
    wait_until(
        "the pods' veths to vanish with their netns",
        Duration::from_secs(30),
        || Ok(w.node.ns.ferry_links()?.is_empty().then_some(())),
    )?;
    for p in &netns_paths {
        ensure!(!p.exists(), "{} still exists", p.display());
    }

    let log_before = w.ipamd.log().len();
    w.ipamd.restart()?;
    let left = wait_until(
        "reconcile to free every leaked address",
        Duration::from_secs(30),
        || {
            let allocs = w.ipamd.allocations()?;
            Ok(allocs.is_empty().then_some(()))
        },
    );
    let log = w.ipamd.log();
    let new_log = log.get(log_before..).unwrap_or_default();
    let check = w.ipamd.ipamctl(&["check"])?;
    if let Err(e) = left {
        let allocs = w.ipamd.allocations().unwrap_or_default();
        anyhow::bail!(
            "{e:#}\nstill allocated: {:?}\n`ipamctl check` says: {}{}\nipamd log since the restart (tail):\n{}",
            allocs
                .iter()
                .map(|a| format!("{}={}", a["ip"], a["containerId"]))
                .collect::<Vec<_>>(),
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr),
            new_log
                .lines()
                .rev()
                .take(25)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // The releases are on record, one per leaked address.
    for ip in &ips {
        let ip = ip.to_string();
        ensure!(
            new_log
                .lines()
                .any(|l| names_ip(l, &ip) && l.to_ascii_lowercase().contains("releas")),
            "ipamd's log does not report the release of {ip}:\n{new_log}"
        );
    }
    ensure!(
        w.node.ns.host_routes()?.is_empty(),
        "/32 routes left: {:?}",
        w.node.ns.host_routes()?
    );
    eprintln!(
        "reboot: {PODS} leaked addresses freed; test took {:?}",
        start.elapsed()
    );
    Ok(())
}
