//! Helpers for the storm tests (scale, hard crash, reboot): many plugin calls
//! at once, and the checks a user makes on the node afterwards.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::ipamd::Ipamd;
use crate::netns::{Node, Pod};
use crate::util::wait_until;

/// Runs `f(i)` for every `i` in `0..n` on `workers` threads; results in
/// index order.
pub fn parallel<T: Send>(workers: usize, n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let r = f(i);
                    results.lock().unwrap()[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every index ran"))
        .collect()
}

/// `n` fresh pods (netns + container ID), created on `workers` threads.
pub fn new_pods(n: usize, workers: usize) -> Result<Vec<Pod>> {
    parallel(workers, n, |_| Pod::new()).into_iter().collect()
}

/// `ipamctl --json allocations` output as ip -> the container IDs holding it.
pub fn holders_by_ip(allocs: &[Value]) -> Result<BTreeMap<String, Vec<String>>> {
    let mut by_ip: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for a in allocs {
        let ip = a["ip"].as_str().context("allocation without ip")?;
        let cid = a["containerId"]
            .as_str()
            .context("allocation without containerId")?;
        by_ip
            .entry(ip.to_string())
            .or_default()
            .push(cid.to_string());
    }
    Ok(by_ip)
}

/// Fails, naming them, when an address is held by more than one allocation.
pub fn ensure_no_duplicates(allocs: &[Value]) -> Result<()> {
    let dups: Vec<_> = holders_by_ip(allocs)?
        .into_iter()
        .filter(|(_, holders)| holders.len() > 1)
        .collect();
    if !dups.is_empty() {
        bail!("addresses held twice: {dups:?}");
    }
    Ok(())
}

/// What is left of pods on a node: allocations, `fry*` links, /32 routes.
#[derive(Debug, Default)]
pub struct Leftovers {
    pub allocations: Vec<Value>,
    pub links: Vec<String>,
    pub routes: Vec<(String, String)>,
}

impl Leftovers {
    pub fn read(ipamd: &Ipamd, node: &Node) -> Result<Leftovers> {
        Ok(Leftovers {
            allocations: ipamd.allocations()?,
            links: node.ns.ferry_links()?,
            routes: node.ns.host_routes()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.allocations.is_empty() && self.links.is_empty() && self.routes.is_empty()
    }
}

/// Polls until the node holds no allocation, no `fry*` link and no /32
/// route (DEL hands the host veth to ipamd, which deletes it shortly after
/// replying). The error lists what is still there.
pub fn wait_node_clean(ipamd: &Ipamd, node: &Node, timeout: Duration) -> Result<()> {
    let last = Mutex::new(Leftovers::default());
    wait_until("the node to be clean after DEL", timeout, || {
        let left = Leftovers::read(ipamd, node)?;
        let clean = left.is_empty();
        *last.lock().unwrap() = left;
        Ok(clean.then_some(()))
    })
    .with_context(|| {
        let l = last.lock().unwrap();
        format!(
            "left: {} allocations {:?}, fry links {:?}, /32 routes {:?}",
            l.allocations.len(),
            l.allocations
                .iter()
                .map(|a| format!("{}={}", a["ip"], a["containerId"]))
                .collect::<Vec<_>>(),
            l.links,
            l.routes
        )
    })
}
