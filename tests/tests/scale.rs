//! Scale: 250 pods on one node, through the real plugin binary as a runtime
//! calls it, 8 calls at a time.
//!
//! What a user checks: every ADD, CHECK and DEL succeeds; the 250 addresses
//! are unique and inside the node's blocks; afterwards nothing is left (no
//! allocation, no `fry*` veth, no /32 route).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use ferry_tests::storm::{ensure_no_duplicates, new_pods, parallel, wait_node_clean};
use ferry_tests::*;
use serde_json::json;

const PODS: usize = 250;
const WORKERS: usize = 8;

/// The first failure among `outs` (index, output), for the error message.
fn first_failure(what: &str, outs: &[Result<CniOutput>]) -> Result<()> {
    let failed: Vec<String> = outs
        .iter()
        .enumerate()
        .filter_map(|(i, o)| match o {
            Ok(o) if o.success() => None,
            Ok(o) => Some(format!("{what} {i}: {o}")),
            Err(e) => Some(format!("{what} {i}: {e:#}")),
        })
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of {PODS} {what}s failed; first: {}",
        failed.len(),
        failed[0]
    );
    Ok(())
}

#[test]
fn two_hundred_fifty_pods_on_one_node() -> Result<()> {
    require_root();
    let start = Instant::now();
    let w = OneNode::start(IpamdConfig::default())?;
    let pods = new_pods(PODS, WORKERS)?;
    let none = json!({});

    let adds = parallel(WORKERS, PODS, |i| {
        w.rt.add(&w.list, &CniCall::add(&pods[i]), &none)
    });
    first_failure("ADD", &adds)?;
    let t_add = start.elapsed();
    let ips: Vec<Ipv4Addr> = adds
        .iter()
        .flatten()
        .map(|o| match o.ips().as_slice() {
            [ip] => Ok(*ip),
            other => anyhow::bail!("ADD returned {other:?}: {o}"),
        })
        .collect::<Result<_>>()?;

    let unique: HashSet<&Ipv4Addr> = ips.iter().collect();
    ensure!(
        unique.len() == PODS,
        "{} distinct addresses for {PODS} pods",
        unique.len()
    );
    let cidrs = block_cidrs(&w.ipamd.blocks()?);
    for ip in &ips {
        ensure!(
            cidrs.iter().any(|c| c.contains(ip)),
            "{ip} is in none of the node's blocks {cidrs:?}"
        );
    }
    let allocs = w.ipamd.allocations()?;
    ensure!(
        allocs.len() == PODS,
        "{} allocations for {PODS} pods",
        allocs.len()
    );
    ensure_no_duplicates(&allocs)?;
    ensure!(
        w.node.ns.ferry_links()?.len() == PODS,
        "expected {PODS} fry links"
    );

    let checks = parallel(WORKERS, PODS, |i| {
        w.rt.check(&w.list, &CniCall::check(&pods[i]), &none)
    });
    first_failure("CHECK", &checks)?;
    let t_check = start.elapsed();

    let dels = parallel(WORKERS, PODS, |i| {
        w.rt.del(&w.list, &CniCall::del(&pods[i]), &none)
    });
    first_failure("DEL", &dels)?;
    let t_del = start.elapsed();
    wait_node_clean(&w.ipamd, &w.node, Duration::from_secs(30))?;
    eprintln!(
        "scale: {PODS} pods in {} blocks; ADD done at {t_add:?}, CHECK at {t_check:?}, \
         DEL at {t_del:?}, clean at {:?}",
        cidrs.len(),
        start.elapsed()
    );
    Ok(())
}
