//! ipamd's Prometheus endpoint as a node-local scraper sees it: scraped
//! from inside the node namespace, the pool gauges agree with `ipamctl
//! pools`/`blocks`, every ADD and DEL shows in the request histograms, a
//! rejected ADD shows under its gRPC code, and the listener sits on the
//! node namespace's loopback only. A taken address stops ipamd at start.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ferry_tests::*;
use serde_json::{Value, json};

/// Any port works: the node namespace is ours alone.
const PORT: u16 = 19641;
const IPAM: &str = "service=\"ferry.ipam.v1.Ipam\"";

/// One scrape: series (name plus labels, as written) to value.
fn scrape(node: &Node) -> Result<BTreeMap<String, f64>> {
    let resp = node.ns.http_get("127.0.0.1", PORT, "/metrics")?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header end in {resp:?}"))?;
    ensure!(head.starts_with("HTTP/1.1 200 "), "status: {head}");
    ensure!(
        head.lines()
            .any(|l| l
                .eq_ignore_ascii_case("content-type: text/plain; version=0.0.4; charset=utf-8")),
        "content type: {head}"
    );
    let mut out = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("bad sample line {line:?}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .with_context(|| format!("bad value in {line:?}"))?,
        };
        ensure!(
            out.insert(series.to_string(), value).is_none(),
            "{series} twice"
        );
    }
    Ok(out)
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

fn duration_count(m: &BTreeMap<String, f64>, method: &str) -> f64 {
    get(
        m,
        &format!("ferry_ipamd_grpc_request_duration_seconds_count{{{IPAM},method=\"{method}\"}}"),
    )
}

fn requests(m: &BTreeMap<String, f64>, method: &str, code: &str) -> f64 {
    get(
        m,
        &format!("ferry_ipamd_grpc_requests_total{{{IPAM},method=\"{method}\",code=\"{code}\"}}"),
    )
}

/// Every pool gauge equals what ipamctl reports for that pool.
fn check_pools(w: &OneNode, m: &BTreeMap<String, f64>) -> Result<()> {
    let pools = w.ipamd.ipamctl_json(&["pools"])?;
    let blocks = w.ipamd.blocks()?;
    let pools = pools.as_array().context("pools is not a list")?;
    ensure!(!pools.is_empty(), "no pools");
    for p in pools {
        let name = p["name"].as_str().context("pool without a name")?;
        let free: u64 = blocks
            .iter()
            .filter(|b| b["pool"] == name)
            .map(|b| {
                let n = |k: &str| b[k].as_u64().unwrap_or(0);
                n("size").saturating_sub(n("allocated") + n("cooling"))
            })
            .sum();
        let want = [
            ("pool_allocations", p["allocated"].as_u64()),
            ("pool_cooling_addresses", p["cooling"].as_u64()),
            ("pool_blocks", p["blocks"].as_u64()),
            ("pool_size_addresses", p["size"].as_u64()),
            ("pool_free_addresses", Some(free)),
        ];
        for (gauge, want) in want {
            let want = want.with_context(|| format!("ipamctl pools lacks {gauge}: {p}"))?;
            let series = format!("ferry_ipamd_{gauge}{{pool=\"{name}\"}}");
            let got = m
                .get(&series)
                .with_context(|| format!("{series} missing from the scrape"))?;
            ensure!(
                *got == want as f64,
                "{series} = {got}, ipamctl says {want} (pool {p}, blocks {blocks:?})"
            );
        }
    }
    Ok(())
}

/// Sockets listening on `port` in a /proc/<pid>/net/tcp{,6} table:
/// (local address hex, socket inode).
fn listeners(table: &str, port: u16) -> Vec<(String, String)> {
    let port = format!("{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (addr, p) = f.get(1)?.rsplit_once(':')?;
            let inode = f.get(9)?;
            (p == port && f.get(3) == Some(&"0A")).then(|| (addr.to_string(), inode.to_string()))
        })
        .collect()
}

#[test]
fn scraped_in_the_node_matches_ipamctl_and_counts_requests() -> Result<()> {
    require_root();
    let w = OneNode::start(IpamdConfig {
        pod_cidr: "10.244.0.0/24".into(),
        block_size: Some(28),
        // Released addresses stay cooling, so the gauges hold still between
        // the scrape and ipamctl.
        cooldown: Some(600),
        extra_args: vec!["--metrics-addr".into(), format!("127.0.0.1:{PORT}")],
        ..IpamdConfig::default()
    })?;

    let before = scrape(&w.node)?;
    ensure!(get(&before, "ferry_ipamd_up") == 1.0, "up: {before:?}");
    ensure!(
        before
            .keys()
            .any(|k| k.starts_with("ferry_ipamd_build_info{version=")),
        "no build_info: {before:?}"
    );
    check_pools(&w, &before)?;

    let pods: Vec<Pod> = (0..2).map(|_| Pod::new()).collect::<Result<_>>()?;
    for pod in &pods {
        let out = w.rt.add(&w.list, &CniCall::add(pod), &json!({}))?;
        ensure!(out.success(), "ADD: {out}");
    }
    let after_add = scrape(&w.node)?;
    check_pools(&w, &after_add)?;
    ensure!(
        get(&after_add, "ferry_ipamd_pool_allocations{pool=\"default\"}") == 2.0,
        "two pods, allocations gauge {:?}",
        after_add.get("ferry_ipamd_pool_allocations{pool=\"default\"}")
    );
    ensure!(
        duration_count(&after_add, "Allocate") == duration_count(&before, "Allocate") + 2.0,
        "Allocate histogram count {} -> {} after 2 ADDs",
        duration_count(&before, "Allocate"),
        duration_count(&after_add, "Allocate")
    );
    ensure!(
        requests(&after_add, "Allocate", "OK") == requests(&before, "Allocate", "OK") + 2.0,
        "Allocate OK counter: {after_add:?}"
    );
    // Buckets are cumulative and +Inf holds them all.
    let inf = get(
        &after_add,
        &format!(
            "ferry_ipamd_grpc_request_duration_seconds_bucket{{{IPAM},method=\"Allocate\",le=\"+Inf\"}}"
        ),
    );
    ensure!(
        inf == duration_count(&after_add, "Allocate"),
        "+Inf bucket {inf}"
    );

    // A requested address outside every pool: INVALID_ARGUMENT (CNI 7).
    let stray = Pod::new()?;
    let out = w.rt.add(
        &w.list,
        &CniCall::add(&stray).with_args("IgnoreUnknown=1;IP=10.99.0.5"),
        &json!({}),
    )?;
    ensure!(out.error_code() == Some(7), "ADD of 10.99.0.5: {out}");
    let after_bad = scrape(&w.node)?;
    ensure!(
        requests(&after_bad, "Allocate", "INVALID_ARGUMENT")
            == requests(&after_add, "Allocate", "INVALID_ARGUMENT") + 1.0,
        "no INVALID_ARGUMENT counted: {:?}",
        after_bad
            .iter()
            .filter(|(k, _)| k.starts_with("ferry_ipamd_grpc_requests_total"))
            .collect::<Vec<_>>()
    );
    ensure!(
        duration_count(&after_bad, "Allocate") == duration_count(&after_add, "Allocate") + 1.0,
        "the rejected Allocate is timed too"
    );

    for pod in &pods {
        let out = w.rt.del(&w.list, &CniCall::del(pod), &json!({}))?;
        ensure!(out.success(), "DEL: {out}");
    }
    let after_del = scrape(&w.node)?;
    check_pools(&w, &after_del)?;
    ensure!(
        duration_count(&after_del, "Release") == duration_count(&before, "Release") + 2.0,
        "Release histogram count {} -> {} after 2 DELs",
        duration_count(&before, "Release"),
        duration_count(&after_del, "Release")
    );
    ensure!(
        get(
            &after_del,
            "ferry_ipamd_pool_cooling_addresses{pool=\"default\"}"
        ) == 2.0,
        "both released addresses cool: {after_del:?}"
    );

    // Anything but /metrics is a 404.
    let other = w.node.ns.http_get("127.0.0.1", PORT, "/")?;
    ensure!(other.starts_with("HTTP/1.1 404 "), "GET /: {other}");

    // Reachability by binding, not by probing: ipamd's one listener on the
    // port is bound to 127.0.0.1 in the node's namespace, which is not ours.
    let pid = w.ipamd.pid().context("ipamd not running")?;
    let node_ns = std::fs::read_link(format!("/proc/{pid}/ns/net"))?;
    let root_ns = std::fs::read_link("/proc/self/ns/net")?;
    ensure!(
        node_ns != root_ns,
        "ipamd runs in the test's own netns {root_ns:?}"
    );
    let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp"))?;
    let tcp6 = std::fs::read_to_string(format!("/proc/{pid}/net/tcp6")).unwrap_or_default();
    let v4 = listeners(&tcp, PORT);
    ensure!(
        v4.len() == 1 && v4[0].0 == "0100007F" && listeners(&tcp6, PORT).is_empty(),
        "listeners on :{PORT} in the node netns: v4 {v4:?}, v6 {:?}",
        listeners(&tcp6, PORT)
    );
    let inode = format!("socket:[{}]", v4[0].1);
    let owned = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|l| l.to_string_lossy() == inode);
    ensure!(owned, "the 127.0.0.1:{PORT} listener is not ipamd's");
    Ok(())
}

#[test]
fn a_taken_metrics_address_stops_ipamd_at_start() -> Result<()> {
    require_root();
    let w = OneNode::start(IpamdConfig {
        extra_args: vec!["--metrics-addr".into(), format!("127.0.0.1:{PORT}")],
        ..IpamdConfig::default()
    })?;
    // A second ipamd in the same node with its own socket and state, but
    // the metrics address the first one holds.
    let second = w
        .node
        .ns
        .command(bin("ipamd"))
        .arg("--socket")
        .arg(w.node.path("second.sock"))
        .arg("--state-dir")
        .arg(w.node.path("second-state"))
        .args(["--node-name", "second"])
        .args(["--metrics-addr", &format!("127.0.0.1:{PORT}")])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut guard = ChildGuard::new(second);
    let status = wait_until("the second ipamd to exit", Duration::from_secs(20), || {
        let child = guard.child_mut().context("no child")?;
        Ok(child.try_wait()?)
    })?;
    ensure!(!status.success(), "second ipamd exited 0");
    let mut stderr = String::new();
    if let Some(mut e) = guard.child_mut().and_then(|c| c.stderr.take()) {
        use std::io::Read;
        e.read_to_string(&mut stderr)?;
    }
    ensure!(
        stderr.contains(&format!("127.0.0.1:{PORT}")) && stderr.contains("metrics"),
        "the error should name the metrics address: {stderr}"
    );
    ensure!(
        !w.node.path("second.sock").exists(),
        "the second ipamd got as far as its socket"
    );
    // The first one is untouched and still answers.
    let m = scrape(&w.node)?;
    if get(&m, "ferry_ipamd_up") != 1.0 {
        bail!("first ipamd's metrics: {m:?}");
    }
    let _: Value = w.ipamd.ipamctl_json(&["status"])?;
    Ok(())
}
