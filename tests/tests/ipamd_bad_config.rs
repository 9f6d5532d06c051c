//! ipamd refuses a bad setting at start: each row (a flag or an
//! `ipamd.toml` key, mistyped, out of range or unknown) makes the real
//! binary exit non-zero with a message naming the key, before it serves or
//! stores anything.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_tests::*;

/// One row: flags over the harness's own, an optional config file, and
/// what stderr must name.
struct Row {
    flags: &'static [(&'static str, &'static str)],
    toml: Option<&'static str>,
    names: &'static str,
}

const ROWS: &[Row] = &[
    Row {
        flags: &[("--mtu", "10")],
        toml: None,
        names: "mtu",
    },
    Row {
        flags: &[("--mtu", "big")],
        toml: None,
        names: "--mtu",
    },
    Row {
        flags: &[("--block-size", "40")],
        toml: None,
        names: "block_size",
    },
    Row {
        flags: &[("--reconcile-interval", "0")],
        toml: None,
        names: "reconcile_interval",
    },
    Row {
        flags: &[("--stale-grace", "99999999999")],
        toml: None,
        names: "stale_grace",
    },
    Row {
        flags: &[("--log-level", "verbose")],
        toml: None,
        names: "log_level",
    },
    Row {
        flags: &[("--socket", "ipamd.sock")],
        toml: None,
        names: "socket",
    },
    Row {
        flags: &[("--state-dir", "state")],
        toml: None,
        names: "state_dir",
    },
    Row {
        flags: &[("--metrics-addr", "nowhere")],
        toml: None,
        names: "metrics_addr",
    },
    Row {
        flags: &[],
        toml: Some("mtu = \"big\""),
        names: "mtu: invalid type",
    },
    Row {
        flags: &[],
        toml: Some("mtu = 10"),
        names: "mtu",
    },
    Row {
        flags: &[],
        toml: Some("block_size = 300"),
        names: "block_size: invalid value",
    },
    Row {
        flags: &[],
        toml: Some("cooldown = -5"),
        names: "cooldown: invalid value",
    },
    Row {
        flags: &[],
        toml: Some("block_idle_grace = 99999999999"),
        names: "block_idle_grace",
    },
    Row {
        flags: &[],
        toml: Some("log_level = \"debgu\""),
        names: "log_level",
    },
    Row {
        flags: &[],
        toml: Some("sokcet = \"/run/x.sock\""),
        names: "sokcet",
    },
    Row {
        flags: &[],
        toml: Some("[[pools]]\nname = \"a\"\ncidrr = \"10.9.0.0/24\""),
        names: "pools[0].cidrr",
    },
];

#[test]
fn ipamd_exits_naming_the_bad_key() -> Result<()> {
    require_root();
    let fabric = Fabric::new()?;
    let node = fabric.add_node()?;
    let socket = node.path("ipamd.sock");
    for (i, row) in ROWS.iter().enumerate() {
        let what = format!("row {i} {:?} {:?}", row.flags, row.toml);
        let state = node.path(&format!("state-{i}"));
        let mut args: Vec<(&str, String)> = vec![
            ("--socket", socket.display().to_string()),
            ("--state-dir", state.display().to_string()),
            ("--node-name", node.name.clone()),
            ("--metrics-addr", String::new()),
        ];
        // A flag given twice is clap's error, not the one under test.
        for (flag, value) in row.flags {
            args.retain(|(f, _)| f != flag);
            args.push((flag, value.to_string()));
        }
        let mut cmd = node.ns.command(bin("ipamd"));
        for (flag, value) in &args {
            cmd.arg(flag).arg(value);
        }
        if let Some(toml) = row.toml {
            let path = node.path(&format!("bad-{i}.toml"));
            std::fs::write(&path, toml)?;
            cmd.arg("--config").arg(&path);
        }
        // A relative path given by a row lands in the node's temp dir.
        cmd.current_dir(node.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut guard = ChildGuard::new(cmd.spawn().context("spawning ipamd")?);
        let status = wait_until(
            &format!("ipamd to exit ({what})"),
            Duration::from_secs(10),
            || {
                let child = guard.child_mut().context("ipamd gone")?;
                Ok(child.try_wait()?)
            },
        )?;
        let child = guard.child_mut().context("ipamd gone")?;
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut stderr)?;
        }
        ensure!(!status.success(), "{what}: ipamd exited 0: {stderr}");
        ensure!(
            stderr.contains(row.names),
            "{what}: stderr does not name {}: {stderr}",
            row.names
        );
        ensure!(
            !socket.exists() && !state.exists(),
            "{what}: ipamd created its socket or state before refusing"
        );
    }
    Ok(())
}
