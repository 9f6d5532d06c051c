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

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use ferry_tests::*;
use serde_json::{Value, json};

const PODS: usize = 3;

fn add(rt: &Runtime, list: &Value, pod: &Pod) -> Result<Ipv4Addr> {
    let out = rt.add(list, &CniCall::add(pod), &json!({}))?;
    ensure!(out.success(), "ADD failed: {out}");
    let ips = out.ips();
    ensure!(ips.len() == 1, "expected one address: {out}");
    Ok(ips[0])
}

fn damaged_db_is_rebuilt(what: &str, damage: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    require_root();
    let OneNode {
        rt,
        list,
        mut ipamd,
        node,
        fabric: _fabric,
    } = OneNode::start(IpamdConfig {
        log_level: Some("info".into()),
        ..IpamdConfig::default()
    })?;
    let pods: Vec<Pod> = (0..PODS).map(|_| Pod::new()).collect::<Result<_>>()?;
    let mut ips = Vec::new();
    for pod in &pods {
        ips.push(add(&rt, &list, pod)?);
    }

    let st = ipamd.terminate()?;
    ensure!(st.success(), "ipamd did not stop cleanly: {st}");
    let state = node.path("state");
    damage(&state.join("db")).with_context(|| format!("damaging the database ({what})"))?;
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
        .zip(&ips)
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
    let new_ip = add(&rt, &list, &newcomer)?;
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
        let out = rt.del(&list, &CniCall::del(pod), &json!({}))?;
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
