//! A damaged state database does not crash-loop ipamd, nor make it forget
//! the addresses live pods hold.
//!
//! Three pods are added with the real plugin, ipamd is stopped (SIGTERM),
//! its sled database is damaged, and ipamd is started again. It must come up
//! healthy, say loudly (error log, `ipamctl status` reason) that it moved the
//! database aside to a path that exists, hold exactly the three pods'
//! addresses (adopted from their host veths), give a new pod another
//! address, and after DEL of every pod hold nothing.
//!
//! sled 0.34 opens a truncated or overwritten log without an error (it keeps
//! the valid prefix, possibly nothing): those are the "garbage but openable"
//! cases, caught by ipamd's flush bound. A garbage `conf` makes sled::open
//! itself fail.
//!
//! The crash case: ipamd is SIGKILLed after enough work that its flusher
//! advanced the bound (`db.flushes`), and the log loses everything written
//! since ipamd started, as a disk that never got it would. No clean close
//! wrote the bound, so only the flusher's bound can catch it.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_tests::*;
use serde_json::json;

const PODS: usize = 3;

/// A node running ipamd (logging at info, as in production).
fn start() -> Result<OneNode> {
    require_root();
    OneNode::start(IpamdConfig {
        log_level: Some("info".into()),
        ..IpamdConfig::default()
    })
}

/// Adds `PODS` pods through the plugin; their addresses in order.
fn add_pods(w: &OneNode) -> Result<(Vec<Pod>, Vec<Ipv4Addr>)> {
    let pods: Vec<Pod> = (0..PODS).map(|_| Pod::new()).collect::<Result<_>>()?;
    let mut ips = Vec::new();
    for pod in &pods {
        ips.push(w.rt.add_pod(&w.list, pod)?);
    }
    Ok((pods, ips))
}

fn damaged_db_is_rebuilt(what: &str, damage: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut w = start()?;
    let (pods, ips) = add_pods(&w)?;
    let st = w.ipamd.terminate()?;
    ensure!(st.success(), "ipamd did not stop cleanly: {st}");
    let state = w.node.path("state");
    damage(&state.join("db")).with_context(|| format!("damaging the database ({what})"))?;
    restarts_rebuilt(what, &mut w, &pods, &ips)
}

/// Starts the stopped ipamd on its damaged database and checks what an
/// operator relies on: it says loudly where the old database went, holds
/// exactly the live pods' addresses again, and goes on working.
fn restarts_rebuilt(what: &str, w: &mut OneNode, pods: &[Pod], ips: &[Ipv4Addr]) -> Result<()> {
    let OneNode {
        rt,
        list,
        ipamd,
        node,
        ..
    } = w;
    let state = node.path("state");
    let log_before = ipamd.log().len();
    ipamd
        .restart()
        .with_context(|| format!("ipamd did not come back after {what}"))?;

    // Loud: an error line naming the moved-aside path, which exists.
    let log = ipamd.log()[log_before..].to_string();
    let moved: Vec<String> = std::fs::read_dir(&state)?
        .filter_map(|e| e.ok())
        .map(|e| e.path().display().to_string())
        .filter(|p| p.contains("/db.corrupt-"))
        .collect();
    ensure!(
        moved.len() == 1,
        "expected one moved-aside database in {}: {moved:?}",
        state.display()
    );
    let moved = &moved[0];
    ensure!(
        Path::new(moved).join("db").is_file(),
        "{moved} holds no sled log"
    );
    ensure!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains(moved.as_str())
            && l.contains(&format!("adopted {PODS} address"))),
        "{what}: no error line naming {moved} and {PODS} adopted addresses:\n{log}"
    );
    let status = ipamd.ipamctl_json(&["status"])?;
    ensure!(
        status["readiness"]
            .as_str()
            .is_some_and(|r| r.eq_ignore_ascii_case("ready")),
        "not ready after the rebuild: {status}"
    );
    let reason = status["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains(moved.as_str()) && reason.contains("rebuilt"),
        "the status reason does not tell about the rebuild: {status}"
    );

    // Exactly the pods' addresses, each under its host veth.
    let mut want: Vec<(Ipv4Addr, String)> = pods
        .iter()
        .zip(ips)
        .map(|(p, ip)| (*ip, format!("adopted:{}", p.host_veth())))
        .collect();
    want.sort();
    let got = ipamd.held()?;
    ensure!(
        got == want,
        "{what}: after the rebuild ipamd holds {got:?}, expected {want:?}"
    );

    // A new pod gets a free address.
    let newcomer = Pod::new()?;
    let new_ip = rt.add_pod(list, &newcomer)?;
    ensure!(
        !ips.contains(&new_ip),
        "the new pod got {new_ip}, which a live pod holds ({ips:?})"
    );
    let held: HashSet<Ipv4Addr> = ipamd.held()?.into_iter().map(|(ip, _)| ip).collect();
    ensure!(
        held.len() == PODS + 1,
        "expected {} allocations: {held:?}",
        PODS + 1
    );

    // DEL releases the adopted addresses too (by their host veth).
    for pod in pods.iter().chain([&newcomer]) {
        let out = rt.del(list, &CniCall::del(pod), &json!({}))?;
        ensure!(out.success(), "DEL failed: {out}");
    }
    let left = ipamd.held()?;
    ensure!(
        left.is_empty(),
        "{what}: allocations left after DEL of every pod: {left:?}"
    );
    let links = node.ns.ferry_links_after_del(DEL_SETTLE)?;
    ensure!(links.is_empty(), "host veths left after DEL: {links:?}");
    Ok(())
}

/// sled keeps only the valid prefix of a truncated log: here, nothing.
#[test]
fn truncated_log_is_rebuilt_from_host_veths() -> Result<()> {
    damaged_db_is_rebuilt("log truncated", |db| {
        std::fs::File::options()
            .write(true)
            .open(db.join("db"))?
            .set_len(300)?;
        Ok(())
    })
}

/// Overwritten bytes: sled opens it and finds nothing valid.
#[test]
fn overwritten_log_is_rebuilt_from_host_veths() -> Result<()> {
    damaged_db_is_rebuilt("log overwritten", |db| {
        std::fs::File::options()
            .write(true)
            .open(db.join("db"))?
            .write_all_at(&[0xA5; 4096], 0)?;
        Ok(())
    })
}

/// A garbage `conf`: sled::open itself fails.
#[test]
fn unreadable_conf_is_rebuilt_from_host_veths() -> Result<()> {
    damaged_db_is_rebuilt("conf garbage", |db| {
        std::fs::write(db.join("conf"), b"\xff\xfe not a sled config")?;
        Ok(())
    })
}

/// The bound `db.flushes` beside the database.
fn flush_bound(state: &Path) -> Result<u64> {
    let path = state.join("db.flushes");
    let s = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    s.trim()
        .parse()
        .with_context(|| format!("{} holds {s:?}", path.display()))
}

/// A crash (SIGKILL, so no clean close writes the bound) and a log that
/// lost everything written since ipamd started: caught by the bound the
/// flusher advanced while pods came and went.
#[test]
fn crash_losing_the_log_tail_is_rebuilt_from_host_veths() -> Result<()> {
    let mut w = start()?;
    let state = w.node.path("state");
    let log = state.join("db").join("db");
    // A fresh log grows as sled writes it, so this length is a clean
    // prefix: what ipamd had written when it became ready.
    let log_len = std::fs::metadata(&log)?.len();
    let bound_at_start = flush_bound(&state)?;
    let (pods, ips) = add_pods(&w)?;

    // ADD and DEL other pods until the flusher has advanced the bound (at
    // the first flush 2 s after the last write, or after 256 flushes).
    let mut churned = 0;
    let bound = wait_until(
        "the flusher to advance db.flushes",
        Duration::from_secs(60),
        || {
            let pod = Pod::new()?;
            w.rt.add_pod(&w.list, &pod)?;
            let out = w.rt.del(&w.list, &CniCall::del(&pod), &json!({}))?;
            ensure!(out.success(), "DEL failed: {out}");
            churned += 1;
            let bound = flush_bound(&state)?;
            Ok((bound > bound_at_start).then_some(bound))
        },
    )?;
    // Only the live pods' veths may be left for the rebuild to adopt.
    let mut want: Vec<String> = pods.iter().map(Pod::host_veth).collect();
    want.sort();
    wait_until("the churned pods' veths to go", DEL_SETTLE, || {
        let mut links = w.node.ns.ferry_links()?;
        links.sort();
        Ok((links == want).then_some(()))
    })?;

    w.ipamd.kill();
    std::fs::File::options()
        .write(true)
        .open(&log)?
        .set_len(log_len)?;
    restarts_rebuilt(
        &format!(
            "a crash losing the log after {log_len} bytes \
             (bound {bound_at_start} -> {bound}, {churned} pods churned)"
        ),
        &mut w,
        &pods,
        &ips,
    )
}
