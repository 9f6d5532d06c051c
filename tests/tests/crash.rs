//! Crash safety: 200 ADDs, 8 at a time, while ipamd is SIGKILLed five times.
//!
//! A successful ADD must be durable (its address is in ipamd's allocations
//! after the crashes, under its container ID), no address is ever held twice,
//! a failed ADD leaves no veth behind, and DEL of all 200 (as a runtime does,
//! failed ones included) leaves nothing.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_tests::*;
use rand::Rng;

const PODS: usize = 200;
const WORKERS: usize = 8;
const CRASHES: usize = 5;

#[derive(Debug, Clone)]
struct Outcome {
    /// Exit code.
    code: i32,
    /// The CNI error code on stdout, for a failure.
    cni_code: Option<u64>,
    ips: Vec<Ipv4Addr>,
    detail: String,
}

/// Runs `f(i)` for every pod index on `WORKERS` threads.
fn parallel<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    storm::parallel(WORKERS, n, f)
}

#[test]
fn adds_survive_ipamd_crashes() -> Result<()> {
    require_root();
    let fabric = Fabric::new()?;
    let node = fabric.add_node()?;
    let mut ipamd = Ipamd::start(&node, IpamdConfig::default())?;
    let socket = ipamd.socket().to_path_buf();
    let cni = Cni::new(&node);
    let conf = ferry_netconf(&socket, "1.1.0");
    let pods: Vec<Pod> = (0..PODS).map(|_| Pod::new()).collect::<Result<_>>()?;

    // Crash points: after this many ADDs have completed (random, spread out).
    let mut rng = rand::rng();
    let mut crash_at: Vec<usize> = (0..CRASHES)
        .map(|k| {
            let span = PODS / (CRASHES + 1);
            span * (k + 1) - span / 2 + rng.random_range(0..span)
        })
        .collect();
    crash_at.sort();

    let done = AtomicUsize::new(0);
    let mut restarts = Ok(());
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let killer = s.spawn(|| -> Result<()> {
            let mut rng = rand::rng();
            for &at in &crash_at {
                wait_until("ADDs to progress", Duration::from_secs(300), || {
                    Ok((done.load(Ordering::Relaxed) >= at).then_some(()))
                })?;
                // Land the kill somewhere inside the ADDs now in flight.
                std::thread::sleep(Duration::from_millis(rng.random_range(0..40)));
                ipamd.kill();
                ipamd.restart().context("restarting ipamd after SIGKILL")?;
            }
            Ok(())
        });
        let outcomes = parallel(PODS, |i| {
            let out = cni.ferry(&CniCall::add(&pods[i]), &conf);
            done.fetch_add(1, Ordering::Relaxed);
            match out {
                Ok(o) => Outcome {
                    code: o.code,
                    cni_code: o.error_code(),
                    ips: if o.success() { o.ips() } else { vec![] },
                    detail: o.to_string(),
                },
                Err(e) => Outcome {
                    code: -1,
                    cni_code: None,
                    ips: vec![],
                    detail: format!("{e:#}"),
                },
            }
        });
        restarts = killer.join().expect("killer thread");
        outcomes
    });
    restarts?;
    ensure!(ipamd.is_running(), "ipamd is not running after the storm");

    let ok: Vec<usize> = (0..PODS).filter(|&i| outcomes[i].code == 0).collect();
    let failed: Vec<usize> = (0..PODS).filter(|&i| outcomes[i].code != 0).collect();
    let socket_s = socket.display().to_string();
    let mut wrong_codes: Vec<String> = vec![];
    let mut codes: HashMap<Option<u64>, usize> = HashMap::new();
    for &i in &failed {
        *codes.entry(outcomes[i].cni_code).or_default() += 1;
    }
    eprintln!(
        "crash storm: {} ADDs succeeded, {} failed (CNI error codes: {codes:?})",
        ok.len(),
        failed.len(),
    );
    ensure!(
        !ok.is_empty(),
        "no ADD succeeded at all: {}",
        outcomes[0].detail
    );
    for &i in &failed {
        // A failed ADD fails the CNI way: an error object on stdout, code 11
        // (try again: ipamd unreachable) for a crashed or restarting ipamd.
        let o = &outcomes[i];
        ensure!(
            o.code > 0 && !o.detail.contains("panicked"),
            "ADD {i} failed badly: {}",
            o.detail
        );
        // Checked last, so that the durability checks below still run.
        if o.cni_code != Some(11) || !o.detail.contains(&socket_s) {
            wrong_codes.push(format!(
                "ADD {i} failed with CNI code {:?}; expected 11 (try again) naming {socket_s}: {}",
                o.cni_code, o.detail
            ));
        }
    }

    // Every successful ADD holds exactly its address, durably.
    let allocs = ipamd.allocations()?;
    storm::ensure_no_duplicates(&allocs)?;
    let by_ip = storm::holders_by_ip(&allocs)?;
    let our_ids: HashSet<&str> = pods.iter().map(|p| p.container_id.as_str()).collect();
    for a in &allocs {
        ensure!(
            our_ids.contains(a["containerId"].as_str().unwrap_or("")),
            "allocation for a container we never added: {a}"
        );
    }
    let mut seen = HashSet::new();
    for &i in &ok {
        let o = &outcomes[i];
        ensure!(o.ips.len() == 1, "ADD {i} returned {:?}", o.ips);
        let ip = o.ips[0].to_string();
        ensure!(
            seen.insert(ip.clone()),
            "{ip} was handed to two successful ADDs"
        );
        let holders = by_ip.get(&ip).with_context(|| {
            format!(
                "{ip} (ADD {i}, which succeeded) is not in ipamd's allocations after the crashes"
            )
        })?;
        ensure!(
            holders == &vec![pods[i].container_id.clone()],
            "{ip} belongs to {holders:?}, not to ADD {i} ({})",
            pods[i].container_id
        );
        ensure!(
            pods[i].addrs()? == o.ips,
            "pod {i}'s eth0 does not hold {ip}"
        );
    }

    // Failed ADDs rolled back their veth: the fry links are exactly the successful ones.
    let links: HashSet<String> = node.ns.ferry_links()?.into_iter().collect();
    let expected: HashSet<String> = ok.iter().map(|&i| pods[i].host_veth()).collect();
    ensure!(
        links == expected,
        "fry links != successful ADDs: extra {:?}, missing {:?}",
        links.difference(&expected).collect::<Vec<_>>(),
        expected.difference(&links).collect::<Vec<_>>()
    );
    for &i in &failed {
        ensure!(
            !pods[i].ns.links()?.iter().any(|l| l == &pods[i].ifname),
            "failed ADD {i} left {} in its pod netns: {}",
            pods[i].ifname,
            outcomes[i].detail
        );
    }

    // DEL all 200, as a runtime would, failed ones included.
    let dels = parallel(PODS, |i| cni.ferry(&CniCall::del(&pods[i]), &conf));
    for (i, d) in dels.into_iter().enumerate() {
        let d = d?;
        ensure!(d.success(), "DEL {i} failed: {d}");
    }
    let allocs = ipamd.allocations()?;
    ensure!(allocs.is_empty(), "allocations left after DEL: {allocs:#?}");
    // The host veths (and their /32 routes) go shortly after, in ipamd.
    storm::wait_node_clean(&ipamd, &node, DEL_SETTLE)?;
    ensure!(
        wrong_codes.is_empty(),
        "{} ADDs failed with the wrong error while ipamd crashed; first: {}",
        wrong_codes.len(),
        wrong_codes[0]
    );
    Ok(())
}
