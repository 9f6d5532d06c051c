//! Bad input: each row gets the documented CNI error code, a single JSON
//! error object on stdout ({cniVersion, code, msg}), a non-zero exit, and
//! never a panic or a stack trace.

use anyhow::{Context, Result, ensure};
use ferry_tests::*;
use serde_json::{Value, json};

/// Asserts the CNI error shape and returns the output for further checks.
fn expect_error(row: &str, out: &CniOutput, code: u64) -> Result<()> {
    for text in [&out.stdout, &out.stderr] {
        for bad in ["panicked", "stack backtrace", "RUST_BACKTRACE"] {
            ensure!(!text.contains(bad), "{row}: {bad:?} in the output: {out}");
        }
    }
    ensure!(out.code != 0, "{row}: exit code 0: {out}");
    let v: Value = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("{row}: stdout is not one JSON object: {out}"))?;
    ensure!(v.is_object(), "{row}: stdout is not a JSON object: {out}");
    ensure!(
        v["cniVersion"].is_string(),
        "{row}: error has no cniVersion: {out}"
    );
    ensure!(v["msg"].is_string(), "{row}: error has no msg: {out}");
    ensure!(
        v["code"].as_u64() == Some(code),
        "{row}: expected code {code}, got {}: {out}",
        v["code"]
    );
    Ok(())
}

#[test]
fn bad_input_rows() -> Result<()> {
    require_root();
    let fabric = Fabric::new()?;
    let node = fabric.add_node()?;
    let ipamd = Ipamd::start(&node, IpamdConfig::default())?;
    let cni = Cni::new(&node);
    let conf = ferry_netconf(ipamd.socket(), "1.1.0");
    let pod = Pod::new()?;
    let add = CniCall::add(&pod);

    // Malformed stdin -> 6.
    for (i, stdin) in ["{not json", "", "[1,2", "{\"cniVersion\": 1.1.0}"]
        .iter()
        .enumerate()
    {
        let out = cni.exec("ferry", &add, stdin.as_bytes())?;
        expect_error(&format!("malformed stdin #{i} {stdin:?}"), &out, 6)?;
    }

    // Unsupported cniVersion -> 1.
    for v in ["0.2.0", "9.9.9"] {
        let mut c = conf.clone();
        c["cniVersion"] = json!(v);
        let out = cni.ferry(&add, &c)?;
        expect_error(&format!("cniVersion {v}"), &out, 1)?;
    }

    // A missing CNI_* variable -> 4, and the message names it.
    for var in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME"] {
        let out = cni.ferry(&add.clone().without(var), &conf)?;
        expect_error(&format!("missing {var}"), &out, 4)?;
        ensure!(
            out.msg().contains(var),
            "missing {var}: the message does not name it: {out}"
        );
    }

    // A netns path that does not exist on ADD -> 103, naming the path.
    let gone = format!("/run/netns/{}-gone", unique("fy"));
    let out = cni.ferry(&add.clone().with_netns(Some(&gone)), &conf)?;
    expect_error("missing netns", &out, 103)?;
    ensure!(
        out.msg().contains(&gone),
        "missing netns: msg does not name {gone}: {out}"
    );
    ensure!(
        ipamd.allocations()?.is_empty(),
        "a failed ADD left an allocation"
    );

    // A mistyped or out-of-range config value -> 7, naming the field's
    // path, before Allocate: nothing is spent (mtu 10 used to reach the kernel).
    let rows: &[(&str, Value)] = &[
        ("mtu", json!("big")),
        ("mtu", json!(-1)),
        ("mtu", json!(10)),
        ("mtu", json!(65536)),
        ("ipamd.timeoutMs", json!("5s")),
        ("ipamd.timeoutMs", json!(0)),
        ("ipamd.timeoutMs", json!(600_001)),
        ("ipamd.socket", json!(5)),
        ("ipamd.socket", json!("")),
        ("ipamd.socket", json!("ipamd.sock")),
        ("logLevel", json!(3)),
        ("logLevel", json!("")),
        ("logLevel", json!("verbose")),
        ("logFile", json!(false)),
    ];
    for (field, value) in rows {
        let mut c = conf.clone();
        match field.split_once('.') {
            Some((outer, inner)) => c[outer][inner] = value.clone(),
            None => c[*field] = value.clone(),
        }
        let row = format!("{field} = {value}");
        let out = cni.ferry(&add, &c)?;
        expect_error(&row, &out, 7)?;
        ensure!(
            out.msg().contains(&format!("{field}: ")),
            "{row}: the message does not name {field}: {out}"
        );
    }
    // DEL does not use mtu or logLevel: a bad one must not wedge it.
    let mut c = conf.clone();
    c["mtu"] = json!(10);
    c["logLevel"] = json!("verbose");
    let out = cni.ferry(&CniCall::del(&pod), &c)?;
    ensure!(
        out.success(),
        "DEL with a bad mtu and logLevel failed: {out}"
    );

    // stdin over 1 MiB -> 6, though it is a valid config otherwise.
    let mut big = conf.clone();
    big["padding"] = json!("x".repeat(1024 * 1024));
    let out = cni.ferry(&add, &big)?;
    expect_error("stdin over 1 MiB", &out, 6)?;
    ensure!(
        out.msg().contains("larger than 1 MiB"),
        "stdin over 1 MiB: the message does not say so: {out}"
    );

    // CNI_NETNS naming the node's own netns (the plugin runs there) -> 4 on
    // ADD and CHECK, and nothing lands on the node. With a free ifname, ADD
    // would otherwise wire the node itself.
    let node_links = node.ns.links()?;
    let node_ns = node.ns.path().display().to_string();
    for netns in [node_ns.as_str(), "/proc/self/ns/net"] {
        for verb in ["ADD", "CHECK"] {
            let call = CniCall {
                ifname: Some("pod0".into()),
                ..add.clone().with_command(verb).with_netns(Some(netns))
            };
            let row = format!("{verb} with CNI_NETNS={netns}");
            let out = cni.ferry(&call, &conf)?;
            expect_error(&row, &out, 4)?;
            ensure!(
                out.msg().contains("CNI_NETNS") && out.msg().contains(netns),
                "{row}: the message does not name CNI_NETNS {netns}: {out}"
            );
        }
    }
    ensure!(
        node.ns.links()? == node_links,
        "an ADD in the node netns changed its links: {:?} -> {:?}",
        node_links,
        node.ns.links()?
    );

    // A CNI_IFNAME the kernel refuses or would rename (%) -> 4, naming it.
    for ifname in [
        "",
        ".",
        "..",
        "0123456789abcdef",
        "eth 0",
        "eth0\t",
        "a/b",
        "eth0:1",
        "eth%d",
    ] {
        let call = CniCall {
            ifname: Some(ifname.into()),
            ..add.clone()
        };
        let row = format!("CNI_IFNAME {ifname:?}");
        let out = cni.ferry(&call, &conf)?;
        expect_error(&row, &out, 4)?;
        ensure!(
            out.msg().contains("CNI_IFNAME"),
            "{row}: the message does not name CNI_IFNAME: {out}"
        );
    }
    ensure!(
        ipamd.allocations()?.is_empty(),
        "a refused ADD left an allocation: {:?}",
        ipamd.allocations()?
    );
    ensure!(
        node.ns.ferry_links()?.is_empty() && !pod.ns.links()?.iter().any(|l| l == "eth0"),
        "a refused ADD left a link"
    );

    // ipamd not running -> 11, naming the socket.
    let dead_socket = node.path("nobody-here.sock");
    let out = cni.ferry(&add, &ferry_netconf(&dead_socket, "1.1.0"))?;
    expect_error("ipamd not running", &out, 11)?;
    let dead = dead_socket.display().to_string();
    ensure!(
        out.msg().contains(&dead),
        "ipamd down: msg does not name {dead}: {out}"
    );
    ensure!(
        node.ns.ferry_links()?.is_empty(),
        "a failed ADD left a veth"
    );
    ensure!(
        !pod.ns.links()?.iter().any(|l| l == "eth0"),
        "a failed ADD left eth0"
    );

    Ok(())
}

#[test]
fn exhausted_pool_is_code_100() -> Result<()> {
    require_root();
    let fabric = Fabric::new()?;
    let node = fabric.add_node()?;
    let cidr = "10.99.0.0/29";
    let ipamd = Ipamd::start(
        &node,
        IpamdConfig {
            pod_cidr: cidr.to_string(),
            block_size: Some(29),
            ..IpamdConfig::default()
        },
    )?;
    let cni = Cni::new(&node);
    let conf = ferry_netconf(ipamd.socket(), "1.1.0");

    let mut pods = Vec::new();
    let exhausted = loop {
        ensure!(
            pods.len() <= 8,
            "a /29 pool handed out more than 8 addresses"
        );
        let pod = Pod::new()?;
        let out = cni.ferry(&CniCall::add(&pod), &conf)?;
        pods.push(pod);
        if !out.success() {
            break out;
        }
    };
    let filled = pods.len() - 1;
    ensure!(
        filled >= 4,
        "a /29 pool gave only {filled} addresses before: {exhausted}"
    );
    expect_error("pool exhausted", &exhausted, 100)?;
    let msg = exhausted.msg();
    ensure!(msg.contains("default"), "msg does not name the pool: {msg}");
    ensure!(
        msg.contains(cidr),
        "msg does not name the pool's CIDR {cidr}: {msg}"
    );
    ensure!(
        [filled, filled + 1].iter().any(|n| msg
            .split(|c: char| !c.is_ascii_digit())
            .any(|w| w == n.to_string())),
        "msg does not tell how many addresses are in use ({filled}): {msg}"
    );
    // The failed ADD rolled back: one veth per successful pod, nothing in the last pod.
    ensure!(
        node.ns.ferry_links()?.len() == filled,
        "fry links != successful ADDs"
    );
    let last = pods.last().context("no pod")?;
    ensure!(
        !last.ns.links()?.iter().any(|l| l == "eth0"),
        "exhausted ADD left eth0"
    );
    ensure!(
        ipamd.allocations()?.len() == filled,
        "allocations != successful ADDs"
    );

    for pod in &pods {
        let out = cni.ferry(&CniCall::del(pod), &conf)?;
        ensure!(out.success(), "DEL failed: {out}");
    }
    ensure!(
        ipamd.allocations()?.is_empty(),
        "allocations left after DEL"
    );
    Ok(())
}
