//! Pools and their life cycle, through the real plugin, ipamd and ipamctl in
//! a node namespace (privileged).
//!
//! What an operator checks: which pool a pod's address comes from (explicit
//! address > `ferry.dev/pool` annotation > namespace > default), the errors
//! for a taken or foreign address, `ipamctl pool add|rm|ls` and that their
//! changes survive a restart, blocks claimed only when full and given back
//! when idle (but never the last one), exhaustion (ADD code 100, STATUS 51,
//! recovery after the cooldown, STATUS 50 with ipamd down), and GC.
//!
//! Pools are tiny (/28 or /29 in /30 blocks) so that filling them is quick.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ferry_tests::*;
use ipnet::Ipv4Net;
use serde_json::{Value, json};

/// The world's conflist, with ferry declaring the capabilities containerd
/// needs to pass runtimeConfig `ips` and the pod annotations.
fn list_with_capabilities(w: &OneNode) -> Value {
    let mut plugin = ferry_plugin_conf(w.ipamd.socket());
    plugin["capabilities"] = json!({"ips": true, "io.kubernetes.cri.pod-annotations": true});
    conflist("1.1.0", "ferry-e2e", vec![plugin])
}

fn annotation(pool: &str) -> Value {
    json!({"io.kubernetes.cri.pod-annotations": {"ferry.dev/pool": pool}})
}

fn net(s: &str) -> Ipv4Net {
    s.parse().expect("a CIDR")
}

/// The pool ipamd recorded for `ip`.
fn pool_of(ipamd: &Ipamd, ip: Ipv4Addr) -> Result<String> {
    let all = ipamd.allocations()?;
    let ip_s = ip.to_string();
    let a = all
        .iter()
        .find(|a| a["ip"] == ip_s.as_str())
        .with_context(|| format!("no allocation of {ip}: {all:#?}"))?;
    Ok(a["pool"].as_str().unwrap_or_default().to_string())
}

/// `ipamctl <args>` that must fail: its one-line stderr.
fn ipamctl_fails(ipamd: &Ipamd, args: &[&str]) -> Result<String> {
    let out = ipamd.ipamctl(args)?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    ensure!(
        !out.status.success(),
        "ipamctl {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(
        stderr.starts_with("ipamctl: ") && stderr.lines().count() == 1,
        "ipamctl {args:?}: expected one \"ipamctl: <msg>\" line, got {stderr:?}"
    );
    Ok(stderr)
}

fn pool_json<'a>(pools: &'a Value, name: &str) -> Result<&'a Value> {
    pools
        .as_array()
        .context("pools --json is not an array")?
        .iter()
        .find(|p| p["name"] == name)
        .with_context(|| format!("no pool {name} in {pools:#}"))
}

/// DEL every pod, then wait (DEL unplugs asynchronously) until none of
/// their host veths is left on the node.
fn del_all(w: &OneNode, list: &Value, pods: &[&Pod]) -> Result<()> {
    for pod in pods {
        let out = w.rt.del(list, &CniCall::del(pod), &json!({}))?;
        ensure!(out.success(), "DEL failed: {out}");
    }
    let gone: Vec<String> = pods.iter().map(|p| p.host_veth()).collect();
    wait_until(
        "the pods' host veths to go",
        Duration::from_secs(20),
        || {
            let links = w.node.ns.ferry_links()?;
            Ok((!links.iter().any(|l| gone.contains(l))).then_some(()))
        },
    )
}

const POOLS_TOML: &str = r#"
[[pools]]
name = "blue"
cidr = "10.50.0.0/28"
block_size = 30
namespaces = ["blue"]

[[pools]]
name = "red"
cidr = "10.60.0.0/28"
block_size = 30
namespaces = ["red"]
nat_outgoing = true
snat_address = "192.0.2.10"
isolated = true
allow_from = ["blue"]
"#;

fn small_world(toml: &str, extra_args: &[&str], cooldown: u64) -> Result<OneNode> {
    OneNode::start(IpamdConfig {
        pod_cidr: "10.244.0.0/28".into(),
        block_size: Some(30),
        cooldown: Some(cooldown),
        config_toml: Some(toml.to_string()),
        extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        ..IpamdConfig::default()
    })
}

#[test]
fn selection_order_and_requested_address_errors() -> Result<()> {
    require_root();
    let w = small_world(POOLS_TOML, &[], 1)?;
    let list = list_with_capabilities(&w);
    let none = json!({});
    let pods: Vec<Pod> = (0..6).map(|_| Pod::new()).collect::<Result<_>>()?;

    // 4. No hint at all: the default pool.
    let ip =
        w.rt.add_one(&list, &CniCall::add_in(&pods[0], "elsewhere"), &none)?;
    ensure!(net("10.244.0.0/28").contains(&ip), "default pod got {ip}");
    ensure!(pool_of(&w.ipamd, ip)? == "default");

    // 3. The pool listing the pod's namespace.
    let ip =
        w.rt.add_one(&list, &CniCall::add_in(&pods[1], "blue"), &none)?;
    ensure!(net("10.50.0.0/28").contains(&ip), "blue pod got {ip}");
    ensure!(pool_of(&w.ipamd, ip)? == "blue");
    let blue_ip = ip;

    // 2. The annotation beats the namespace.
    let ip = w.rt.add_one(
        &list,
        &CniCall::add_in(&pods[2], "blue"),
        &annotation("red"),
    )?;
    ensure!(net("10.60.0.0/28").contains(&ip), "annotated pod got {ip}");
    ensure!(pool_of(&w.ipamd, ip)? == "red");

    // 1. An explicit address beats both: runtimeConfig ips ...
    let rc = json!({
        "ips": ["10.244.0.9/32"],
        "io.kubernetes.cri.pod-annotations": {"ferry.dev/pool": "red"}
    });
    let ip =
        w.rt.add_one(&list, &CniCall::add_in(&pods[3], "blue"), &rc)?;
    ensure!(
        ip == "10.244.0.9".parse::<Ipv4Addr>()?,
        "runtimeConfig ips gave {ip}"
    );
    ensure!(pool_of(&w.ipamd, ip)? == "default");

    // ... CNI_ARGS IP= ...
    let call = CniCall::add_in(&pods[4], "blue")
        .with_args(&format!("{};IP=10.60.0.6", k8s_args("blue", "p4")));
    let ip = w.rt.add_one(&list, &call, &annotation("blue"))?;
    ensure!(ip == "10.60.0.6".parse::<Ipv4Addr>()?, "IP= gave {ip}");
    ensure!(pool_of(&w.ipamd, ip)? == "red");

    // ... and args.cni.ips in the network config.
    let mut conf = Runtime::plugin_netconf(&list, 0, None, &none)?;
    conf["args"] = json!({"cni": {"ips": ["10.50.0.9"]}});
    let out = w.rt.cni.ferry(&CniCall::add_in(&pods[5], "red"), &conf)?;
    ensure!(out.success(), "ADD with args.cni.ips failed: {out}");
    ensure!(out.ips() == ["10.50.0.9".parse::<Ipv4Addr>()?], "{out}");
    ensure!(pool_of(&w.ipamd, out.ips()[0])? == "blue");

    // A taken address: code 101, naming the address and its pool.
    let taken = Pod::new()?;
    let call = CniCall::add_in(&taken, "elsewhere")
        .with_args(&format!("{};IP={blue_ip}", k8s_args("elsewhere", "t")));
    let out = w.rt.add(&list, &call, &none)?;
    ensure!(out.error_code() == Some(101), "taken address: {out}");
    ensure!(
        out.msg().contains(&blue_ip.to_string()) && out.msg().contains("pool blue"),
        "taken address msg: {}",
        out.msg()
    );
    // An address outside every pool: code 7, saying so.
    let out = w.rt.add(
        &list,
        &CniCall::add_in(&taken, "x"),
        &json!({"ips": ["192.168.200.5"]}),
    )?;
    ensure!(out.error_code() == Some(7), "foreign address: {out}");
    ensure!(
        out.msg().contains("192.168.200.5") && out.msg().contains("outside every pool"),
        "foreign address msg: {}",
        out.msg()
    );
    // Neither failure left anything behind.
    ensure!(w.ipamd.allocations()?.len() == 6);
    ensure!(!taken.ns.links()?.iter().any(|l| l == "eth0"));

    // An unknown pool in the annotation is a config error naming it.
    let out =
        w.rt.add(&list, &CniCall::add_in(&taken, "x"), &annotation("nope"))?;
    ensure!(
        out.error_code() == Some(7) && out.msg().contains("nope"),
        "{out}"
    );

    let out = w.rt.cni.ferry(&CniCall::del(&pods[5]), &conf)?;
    ensure!(out.success(), "DEL failed: {out}");
    del_all(&w, &list, &pods.iter().take(5).collect::<Vec<_>>())?;
    ensure!(w.ipamd.allocations()?.is_empty());
    Ok(())
}

#[test]
fn pool_add_rm_ls_through_ipamctl_survive_restarts() -> Result<()> {
    require_root();
    let mut w = small_world(POOLS_TOML, &[], 1)?;
    let list = list_with_capabilities(&w);

    // Every configured field is shown, in JSON and in the table.
    let pools = w.ipamd.ipamctl_json(&["pools"])?;
    let red = pool_json(&pools, "red")?;
    for (k, v) in [
        ("cidr", json!("10.60.0.0/28")),
        ("blockSize", json!(30)),
        ("namespaces", json!(["red"])),
        ("natOutgoing", json!(true)),
        ("snatAddress", json!("192.0.2.10")),
        ("isolated", json!(true)),
        ("allowFrom", json!(["blue"])),
        ("isDefault", json!(false)),
        ("size", json!(14)),
    ] {
        ensure!(red[k] == v, "red.{k} is {}, want {v}", red[k]);
    }
    ensure!(pool_json(&pools, "default")?["isDefault"] == true);
    ensure!(
        w.ipamd.ipamctl_json(&["pool", "ls"])? == pools,
        "pool ls --json differs from pools --json"
    );
    let table = w.ipamd.ipamctl_ok(&["pools"])?;
    ensure!(
        table == w.ipamd.ipamctl_ok(&["pool", "ls"])?,
        "pool ls differs from pools"
    );
    let header = table.lines().next().unwrap_or_default();
    for col in [
        "NAME",
        "CIDR",
        "BLOCK",
        "NAMESPACES",
        "NAT",
        "SNAT",
        "ISOLATED",
        "ALLOW-FROM",
    ] {
        ensure!(header.contains(col), "no {col} column: {table}");
    }
    let red_row = table
        .lines()
        .find(|l| l.starts_with("red "))
        .context("no red row")?;
    let cells: Vec<&str> = red_row.split_whitespace().collect();
    ensure!(
        cells[..8]
            == [
                "red",
                "10.60.0.0/28",
                "/30",
                "red",
                "yes",
                "192.0.2.10",
                "yes",
                "blue"
            ],
        "red row: {red_row}"
    );

    // pool add, every option.
    let added = w.ipamd.ipamctl_json(&[
        "pool",
        "add",
        "green",
        "10.70.0.0/28",
        "--block-size",
        "30",
        "--namespace",
        "green",
        "--namespace",
        "lime",
        "--nat-outgoing",
        "--snat-address",
        "192.0.2.20",
        "--isolated",
        "--allow-from",
        "blue",
    ])?;
    ensure!(
        added["name"] == "green" && added["cidr"] == "10.70.0.0/28",
        "{added}"
    );
    let green = w.ipamd.ipamctl_json(&["pool", "ls"])?;
    let green = pool_json(&green, "green")?.clone();
    ensure!(
        green["namespaces"] == json!(["green", "lime"])
            && green["blockSize"] == 30
            && green["natOutgoing"] == true
            && green["snatAddress"] == "192.0.2.20"
            && green["isolated"] == true
            && green["allowFrom"] == json!(["blue"]),
        "green as listed: {green}"
    );

    // Overlap is refused, naming both pools and both CIDRs.
    let e = ipamctl_fails(
        &w.ipamd,
        &[
            "pool",
            "add",
            "clash",
            "10.70.0.8/29",
            "--namespace",
            "clash",
        ],
    )?;
    for part in ["clash", "10.70.0.8/29", "green", "10.70.0.0/28"] {
        ensure!(e.contains(part), "overlap error lacks {part}: {e}");
    }
    let e = ipamctl_fails(
        &w.ipamd,
        &["pool", "add", "green", "10.80.0.0/28", "--namespace", "x"],
    )?;
    ensure!(e.contains("already exists"), "{e}");

    // The new pool serves its namespace at once.
    let pod = Pod::new()?;
    let ip =
        w.rt.add_one(&list, &CniCall::add_in(&pod, "lime"), &json!({}))?;
    ensure!(net("10.70.0.0/28").contains(&ip), "lime pod got {ip}");

    // Removal while in use is refused with the count; a configured pool is
    // refused too (it would come back at the next start).
    let e = ipamctl_fails(&w.ipamd, &["pool", "rm", "green"])?;
    ensure!(e.contains("green") && e.contains("1 allocation"), "{e}");
    let e = ipamctl_fails(&w.ipamd, &["pool", "rm", "red"])?;
    ensure!(e.contains("configuration"), "{e}");
    let e = ipamctl_fails(&w.ipamd, &["pool", "rm", "nope"])?;
    ensure!(e.contains("nope"), "{e}");

    // The added pools survive a restart, with their options, whether in use
    // (green, with its pod) or not (teal).
    w.ipamd
        .ipamctl_ok(&["pool", "add", "teal", "10.90.0.0/28", "--namespace", "teal"])?;
    w.ipamd.restart()?;
    let pools = w.ipamd.ipamctl_json(&["pools"])?;
    let teal = pool_json(&pools, "teal")?;
    ensure!(
        teal["cidr"] == "10.90.0.0/28" && teal["namespaces"] == json!(["teal"]),
        "teal after restart: {teal}"
    );
    let mut after = pool_json(&pools, "green")?.clone();
    ensure!(after["allocated"] == 1, "green after restart: {after}");
    after["allocated"] = green["allocated"].clone();
    after["blocks"] = green["blocks"].clone();
    ensure!(
        after == green,
        "green changed over the restart: {after} vs {green}"
    );

    del_all(&w, &list, &[&pod])?;
    let out = w.ipamd.ipamctl_json(&["pool", "rm", "green"])?;
    ensure!(out == json!({"removed": "green"}), "{out}");
    ensure!(
        w.ipamd
            .ipamctl_ok(&["pool", "rm", "teal"])?
            .contains("removed pool teal")
    );
    ensure!(
        w.ipamd
            .ipamctl_ok(&["pools"])?
            .lines()
            .all(|l| !l.starts_with("green "))
    );
    // ... and the removal survives one too.
    w.ipamd.restart()?;
    let pools = w.ipamd.ipamctl_json(&["pools"])?;
    ensure!(
        pool_json(&pools, "green").is_err() && pool_json(&pools, "teal").is_err(),
        "a removed pool is back: {pools:#}"
    );
    ensure!(pool_json(&pools, "red").is_ok());
    let pod = Pod::new()?;
    let ip =
        w.rt.add_one(&list, &CniCall::add_in(&pod, "lime"), &json!({}))?;
    ensure!(
        net("10.244.0.0/28").contains(&ip),
        "lime now belongs to the default pool: {ip}"
    );
    del_all(&w, &list, &[&pod])?;

    // ipamctl gc: nothing leaked, nothing to do.
    let v = w.ipamd.ipamctl_json(&["gc", "--dry-run"])?;
    ensure!(
        v.as_array().is_some_and(Vec::is_empty),
        "nothing to collect, yet: {v}"
    );
    Ok(())
}

fn blocks(ipamd: &Ipamd) -> Result<Vec<(Ipv4Net, u64, u64)>> {
    ipamd
        .blocks()?
        .iter()
        .map(|b| {
            Ok((
                b["cidr"].as_str().context("cidr")?.parse()?,
                b["size"].as_u64().context("size")?,
                b["allocated"].as_u64().context("allocated")?,
            ))
        })
        .collect()
}

#[test]
fn blocks_are_claimed_when_full_and_given_back_when_idle() -> Result<()> {
    require_root();
    let grace = 2;
    let w = small_world("", &["--block-idle-grace", "2"], 1)?;
    let list = list_with_capabilities(&w);
    let none = json!({});
    let pods: Vec<Pod> = (0..5).map(|_| Pod::new()).collect::<Result<_>>()?;
    let first = net("10.244.0.0/30");

    // The first /30 holds 3 usable addresses (.0 is the pool's network).
    let mut ips = Vec::new();
    for pod in &pods[..3] {
        ips.push(w.rt.add_one(&list, &CniCall::add(pod), &none)?);
    }
    ensure!(
        blocks(&w.ipamd)? == [(first, 3, 3)],
        "{:?}",
        blocks(&w.ipamd)?
    );

    // A freed address of an owned block is reused (after the cooldown)
    // before any new block is claimed.
    let out = w.rt.del(&list, &CniCall::del(&pods[1]), &none)?;
    ensure!(out.success(), "{out}");
    let freed = ips[1].to_string();
    wait_until(
        "the freed address to cool down",
        Duration::from_secs(30),
        || {
            let v = w.ipamd.ipamctl_json(&["show", &freed])?;
            Ok((v["state"] == "free").then_some(()))
        },
    )?;
    let ip = w.rt.add_one(&list, &CniCall::add(&pods[3]), &none)?;
    ensure!(ip == ips[1], "got {ip}, not the freed {}", ips[1]);
    ensure!(
        blocks(&w.ipamd)? == [(first, 3, 3)],
        "{:?}",
        blocks(&w.ipamd)?
    );

    // Full: the next pod claims a second block.
    let ip = w.rt.add_one(&list, &CniCall::add(&pods[4]), &none)?;
    let second = net("10.244.0.4/30");
    ensure!(second.contains(&ip), "fifth pod got {ip}");
    ensure!(
        blocks(&w.ipamd)? == [(first, 3, 3), (second, 4, 1)],
        "{:?}",
        blocks(&w.ipamd)?
    );
    let table = w.ipamd.ipamctl_ok(&["blocks"])?;
    let row = table
        .lines()
        .find(|l| l.starts_with("10.244.0.4/30 "))
        .context("no row for the second block")?;
    let cells: Vec<&str> = row.split_whitespace().collect();
    ensure!(
        cells[3..7] == ["4", "1", "0", "3"],
        "SIZE ALLOCATED COOLING FREE: {row}"
    );

    // Empty for the grace: given back; the block in use stays.
    del_all(&w, &list, &[&pods[4]])?;
    wait_until(
        "the idle block to be given back",
        Duration::from_secs(30),
        || {
            let b = blocks(&w.ipamd)?;
            Ok((b == [(first, 3, 3)]).then_some(()))
        },
    )?;
    ensure!(
        w.ipamd.log().contains("released idle block"),
        "nothing logged"
    );

    // The last block of the pool is kept even when empty. Keeping is the
    // absence of an event, so watch for several idle checks past the grace.
    del_all(&w, &list, &[&pods[0], &pods[2], &pods[3]])?;
    let until = Instant::now() + Duration::from_secs(3 * grace + 1);
    while Instant::now() < until {
        let b = blocks(&w.ipamd)?;
        ensure!(b == [(first, 3, 0)], "the last block changed: {b:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

#[test]
fn a_pool_dropped_from_the_file_while_in_use_stays_until_pool_rm() -> Result<()> {
    require_root();
    let mut w = small_world(POOLS_TOML, &[], 1)?;
    let list = list_with_capabilities(&w);
    let pod = Pod::new()?;
    let ip =
        w.rt.add_one(&list, &CniCall::add_in(&pod, "blue"), &json!({}))?;
    ensure!(net("10.50.0.0/28").contains(&ip), "blue pod got {ip}");

    // The operator drops both pools from the file: red is empty and goes,
    // blue holds the pod and stays.
    w.ipamd.rewrite_config("")?;
    w.ipamd.restart()?;
    let pools = w.ipamd.ipamctl_json(&["pools"])?;
    ensure!(pool_json(&pools, "red").is_err(), "red is still there");
    ensure!(
        pool_json(&pools, "blue")?["allocated"] == 1,
        "blue after restart: {pools:#}"
    );
    ensure!(
        w.ipamd.log().contains("no longer configured"),
        "keeping blue was not logged"
    );
    let e = ipamctl_fails(&w.ipamd, &["pool", "rm", "blue"])?;
    ensure!(e.contains("1 allocation"), "{e}");

    // Once its pod is gone, pool rm removes it, for good.
    del_all(&w, &list, &[&pod])?;
    w.ipamd.ipamctl_ok(&["pool", "rm", "blue"])?;
    w.ipamd.restart()?;
    let pools = w.ipamd.ipamctl_json(&["pools"])?;
    ensure!(
        pool_json(&pools, "blue").is_err(),
        "blue is back: {pools:#}"
    );
    Ok(())
}

#[test]
fn exhaustion_status_and_recovery() -> Result<()> {
    require_root();
    // 10.244.0.0/29 in /30 blocks: 6 usable addresses; blue has room.
    let mut w = OneNode::start(IpamdConfig {
        pod_cidr: "10.244.0.0/29".into(),
        block_size: Some(30),
        cooldown: Some(3),
        config_toml: Some(POOLS_TOML.to_string()),
        ..IpamdConfig::default()
    })?;
    let list = list_with_capabilities(&w);
    let none = json!({});
    let status = |w: &OneNode| w.rt.status(&list);

    let out = status(&w)?;
    ensure!(out.success(), "STATUS of a fresh node: {out}");
    let pods: Vec<Pod> = (0..7).map(|_| Pod::new()).collect::<Result<_>>()?;
    for pod in &pods[..6] {
        w.rt.add_one(&list, &CniCall::add(pod), &none)?;
    }
    let out = w.rt.add(&list, &CniCall::add(&pods[6]), &none)?;
    ensure!(out.error_code() == Some(100), "ADD into a full pool: {out}");
    for part in ["pool default", "10.244.0.0/29", "6 usable", "6 allocated"] {
        ensure!(
            out.msg().contains(part),
            "exhaustion msg lacks {part:?}: {}",
            out.msg()
        );
    }
    ensure!(
        !pods[6].ns.links()?.iter().any(|l| l == "eth0"),
        "failed ADD left eth0"
    );

    // Another pool still has room, but the default one serves most pods.
    let out = status(&w)?;
    ensure!(
        out.error_code() == Some(51),
        "STATUS with the default pool full: {out}"
    );
    ensure!(out.msg().contains("pool default"), "{}", out.msg());
    let blue_pod = Pod::new()?;
    w.rt.add_one(&list, &CniCall::add_in(&blue_pod, "blue"), &none)?;

    // Freeing one address: usable again once it has cooled down.
    let out = w.rt.del(&list, &CniCall::del(&pods[0]), &none)?;
    ensure!(out.success(), "{out}");
    let out = w.rt.add(&list, &CniCall::add(&pods[6]), &none)?;
    ensure!(
        out.error_code() == Some(100) && out.msg().contains("1 cooling down"),
        "ADD during the cooldown: {out}"
    );
    wait_until(
        "STATUS to answer ready again",
        Duration::from_secs(20),
        || {
            let out = status(&w)?;
            Ok(out.success().then_some(()))
        },
    )?;
    w.rt.add_one(&list, &CniCall::add(&pods[6]), &none)?;

    // ipamd down: STATUS 50, naming the socket.
    w.ipamd.kill();
    let out = status(&w)?;
    ensure!(
        out.error_code() == Some(50),
        "STATUS with ipamd down: {out}"
    );
    ensure!(
        out.msg().contains(&w.ipamd.socket().display().to_string()),
        "{}",
        out.msg()
    );
    Ok(())
}

/// ipamd's `--gc-min-age` here: long enough for four ADDs and the GC sent
/// right after them on a slow machine, short enough to wait for.
const GC_MIN_AGE_SECS: u64 = 6;

#[test]
fn gc_releases_what_is_not_valid_and_removes_its_veths() -> Result<()> {
    require_root();
    let w = OneNode::start(IpamdConfig {
        extra_args: vec!["--gc-min-age".into(), GC_MIN_AGE_SECS.to_string()],
        ..IpamdConfig::default()
    })?;
    let list = list_with_capabilities(&w);
    let other = conflist(
        "1.1.0",
        "other-net",
        vec![ferry_plugin_conf(w.ipamd.socket())],
    );
    let none = json!({});
    let pods: Vec<Pod> = (0..3).map(|_| Pod::new()).collect::<Result<_>>()?;
    let mut ips = Vec::new();
    let first_add = std::time::Instant::now();
    for pod in &pods {
        ips.push(w.rt.add_one(&list, &CniCall::add(pod), &none)?);
    }
    let bystander = Pod::new()?;
    w.rt.add_one(&other, &CniCall::add(&bystander), &none)?;

    let mut conf = Runtime::plugin_netconf(&list, 0, None, &none)?;
    conf["cni.dev/valid-attachments"] =
        json!([{"containerID": pods[0].container_id, "ifname": pods[0].ifname}]);
    let gc = || -> Result<String> {
        let out = w.rt.cni.ferry(&CniCall::bare("GC"), &conf)?;
        ensure!(out.success(), "GC failed: {out}");
        Ok(out.stderr)
    };
    // A runtime that listed the valid attachments before these ADDs sends
    // GC now: the pods are younger than the grace and keep everything.
    gc()?;
    let took = first_add.elapsed();
    ensure!(
        took < Duration::from_secs(GC_MIN_AGE_SECS),
        "the ADDs and the GC took {took:?}, more than --gc-min-age: nothing to show"
    );
    ensure!(
        w.ipamd.allocations()?.len() == 4,
        "GC right after ADD released a new pod: {:?}",
        w.ipamd.allocations()?
    );
    for pod in &pods {
        ensure!(
            pod.ns.ping(&w.node.ip.to_string()),
            "GC right after ADD unplugged {}",
            pod.container_id
        );
    }

    // Once older than the grace, what is not valid goes. The plugin's log
    // (stderr here) names each attachment it collected.
    let mut plugin_log = String::new();
    wait_until(
        "GC to release the pods that are not valid",
        Duration::from_secs(GC_MIN_AGE_SECS + 20),
        || {
            plugin_log.push_str(&gc()?);
            Ok((w.ipamd.allocations()?.len() == 2).then_some(()))
        },
    )?;
    for pod in &pods[1..] {
        ensure!(
            plugin_log
                .lines()
                .any(|l| l.contains("GC released attachment")
                    && l.contains(&pod.container_id)
                    && l.contains(&pod.host_veth())),
            "the plugin log does not name {}: {plugin_log}",
            pod.container_id
        );
    }

    // Only the valid attachment and the other network's remain.
    let mut left: Vec<String> = w
        .ipamd
        .allocations()?
        .iter()
        .map(|a| a["containerId"].as_str().unwrap_or_default().to_string())
        .collect();
    left.sort();
    let mut want = vec![pods[0].container_id.clone(), bystander.container_id.clone()];
    want.sort();
    ensure!(left == want, "allocations after GC: {left:?}");
    let mut want_links = vec![pods[0].host_veth(), bystander.host_veth()];
    want_links.sort();
    wait_until("GC's host veths to go", Duration::from_secs(20), || {
        let mut links = w.node.ns.ferry_links()?;
        links.sort();
        Ok((links == want_links).then_some(()))
    })?;
    for pod in &pods[1..] {
        ensure!(
            !pod.ns.links()?.iter().any(|l| l == "eth0"),
            "eth0 left in a collected pod"
        );
    }
    ensure!(
        pods[0].ns.ping(&w.node.ip.to_string()),
        "the valid pod lost its network"
    );
    // What GC freed is in ipamd's log, address by address.
    let log = w.ipamd.log();
    for ip in &ips[1..] {
        ensure!(
            log.lines()
                .any(|l| l.contains("released by GC") && l.contains(&ip.to_string())),
            "ipamd did not log GC of {ip}"
        );
    }

    let out = w.rt.del(&other, &CniCall::del(&bystander), &none)?;
    ensure!(out.success(), "{out}");
    del_all(&w, &list, &[&pods[0]])?;
    Ok(())
}
