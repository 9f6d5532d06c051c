//! install.sh round trip, into temp dirs, inside a node netns (no systemd).
//!
//! After install: ipamd is healthy under its supervisor, the conflist is there
//! and valid and works, the binaries and config are in place, and a killed
//! ipamd comes back. After `--uninstall`: processes, socket, conflist,
//! binaries and config are gone (state kept); `--uninstall --purge` leaves no
//! file at all in the tree.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_tests::*;
use serde_json::{Value, json};

struct Layout {
    root: PathBuf,
}

impl Layout {
    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn socket(&self) -> PathBuf {
        self.p("run/ipamd.sock")
    }

    fn args(&self, node: &Node) -> Vec<String> {
        let d = |rel: &str| self.p(rel).display().to_string();
        vec![
            "--from".into(),
            bin_dir().display().to_string(),
            "--prefix".into(),
            d("usr"),
            "--cni-bin-dir".into(),
            d("cni/bin"),
            "--cni-conf-dir".into(),
            d("cni/net.d"),
            "--config-dir".into(),
            d("etc"),
            "--socket".into(),
            d("run/ipamd.sock"),
            "--state-dir".into(),
            d("state"),
            "--log-dir".into(),
            d("log"),
            "--unit-dir".into(),
            d("systemd"),
            "--node-name".into(),
            node.name.clone(),
            "--pod-cidr".into(),
            "10.245.0.0/16".into(),
            "--no-systemd".into(),
        ]
    }
}

fn install_sh(node: &Node, args: &[String], extra: &[&str]) -> Result<Output> {
    node.ns
        .command(workspace_root().join("install.sh"))
        .args(args)
        .args(extra)
        .stdin(std::process::Stdio::null())
        .output()
        .context("running install.sh")
}

fn show(o: &Output) -> String {
    format!(
        "{}\n--- stdout:\n{}--- stderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn read_pid(path: &Path) -> Result<u32> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    s.trim()
        .parse()
        .with_context(|| format!("{} holds {s:?}", path.display()))
}

/// Running and not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// True when /proc/<pid>/cmdline mentions `needle` (so we only ever touch
/// processes our own install started).
fn cmdline_mentions(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(needle))
        .unwrap_or(false)
}

/// Undoes the install even when the test fails half way.
struct Cleanup<'a> {
    node: &'a Node,
    layout: &'a Layout,
    args: Vec<String>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let pids: Vec<u32> = ["run/ipamd-supervisor.pid", "run/ipamd.pid"]
            .iter()
            .filter_map(|f| read_pid(&self.layout.p(f)).ok())
            .collect();
        let _ = install_sh(self.node, &self.args, &["--uninstall", "--purge"]);
        let root = self.layout.root.display().to_string();
        for pid in pids {
            if alive(pid) && cmdline_mentions(pid, &root) {
                // SAFETY: kill(2) on a PID our install started (checked by its cmdline).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

/// Every non-directory under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn help_lists_the_options() -> Result<()> {
    let o = std::process::Command::new(workspace_root().join("install.sh"))
        .arg("--help")
        .output()?;
    ensure!(o.status.success(), "install.sh --help: {}", show(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--prefix",
        "--cni-bin-dir",
        "--cni-conf-dir",
        "--config-dir",
        "--socket",
        "--state-dir",
        "--no-systemd",
        "--uninstall",
        "--purge",
        "--from",
    ] {
        ensure!(text.contains(flag), "--help does not mention {flag}");
    }
    Ok(())
}

#[test]
fn install_then_uninstall() -> Result<()> {
    require_root();
    let fabric = Fabric::new()?;
    let node = fabric.add_node()?;
    let layout = Layout {
        root: node.path("tree"),
    };
    std::fs::create_dir(&layout.root)?;
    let args = layout.args(&node);
    let _cleanup = Cleanup {
        node: &node,
        layout: &layout,
        args: args.clone(),
    };

    let o = install_sh(&node, &args, &[])?;
    ensure!(o.status.success(), "install.sh failed: {}", show(&o));

    // ipamd is up under its supervisor, in the node netns.
    let sup = read_pid(&layout.p("run/ipamd-supervisor.pid"))?;
    let ipamd_pid = read_pid(&layout.p("run/ipamd.pid"))?;
    ensure!(alive(sup), "supervisor {sup} is not running");
    ensure!(alive(ipamd_pid), "ipamd {ipamd_pid} is not running");
    let ipamctl = layout.p("usr/bin/ipamctl");
    let status = |what: &str| -> Result<()> {
        let o = node
            .ns
            .command(&ipamctl)
            .arg("--socket")
            .arg(layout.socket())
            .arg("status")
            .output()?;
        ensure!(o.status.success(), "{what}: ipamctl status: {}", show(&o));
        Ok(())
    };
    status("after install")?;

    // Files in place.
    for f in ["cni/bin/ferry", "usr/bin/ipamd", "usr/bin/ipamctl"] {
        let p = layout.p(f);
        let meta = std::fs::metadata(&p).with_context(|| format!("{} missing", p.display()))?;
        ensure!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0,
            "{} is not executable",
            p.display()
        );
    }
    let toml = std::fs::read_to_string(layout.p("etc/ipamd.toml"))?;
    ensure!(
        toml.contains(&layout.socket().display().to_string()) && toml.contains("10.245.0.0/16"),
        "ipamd.toml does not hold our settings:\n{toml}"
    );
    let conflist_path = layout.p("cni/net.d/10-ferry.conflist");
    let text = std::fs::read_to_string(&conflist_path)
        .with_context(|| format!("{} missing", conflist_path.display()))?;
    let list: Value = serde_json::from_str(&text).context("the conflist is not valid JSON")?;
    ensure!(list["name"] == "ferry", "conflist name: {list}");
    ensure!(
        list["plugins"][0]["type"] == "ferry",
        "first plugin: {list}"
    );
    ensure!(
        list["plugins"][0]["ipamd"]["socket"] == layout.socket().display().to_string().as_str(),
        "the conflist does not point at our socket: {list}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(layout.p("cni/net.d"))?
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "10-ferry.conflist")
        .collect();
    ensure!(
        leftovers.is_empty(),
        "temp files next to the conflist: {leftovers:?}"
    );

    // The conflist works as written, with the installed plugin.
    let rt = Runtime::new(Cni::new(&node).with_cni_path(vec![layout.p("cni/bin")]));
    let pod = Pod::new()?;
    let out = rt.add(&list, &CniCall::add(&pod), &json!({}))?;
    ensure!(out.success(), "ADD with the installed conflist: {out}");
    ensure!(
        pod.ns.ping(&node.ip.to_string()),
        "the pod cannot reach its node"
    );
    let out = rt.del(&list, &CniCall::del(&pod), &json!({}))?;
    ensure!(out.success(), "DEL with the installed conflist: {out}");

    // The supervisor restarts a crashed ipamd.
    // SAFETY: kill(2) on the ipamd our install started.
    unsafe { libc::kill(ipamd_pid as libc::pid_t, libc::SIGKILL) };
    let new_pid = wait_until(
        "the supervisor to restart ipamd",
        Duration::from_secs(30),
        || {
            Ok(read_pid(&layout.p("run/ipamd.pid"))
                .ok()
                .filter(|p| *p != ipamd_pid && alive(*p)))
        },
    )?;
    wait_until("ipamd to be ready again", Duration::from_secs(30), || {
        Ok(status("after restart").is_ok().then_some(()))
    })?;

    // Uninstall, keeping state.
    let o = install_sh(&node, &args, &["--uninstall"])?;
    ensure!(
        o.status.success(),
        "install.sh --uninstall failed: {}",
        show(&o)
    );
    ensure!(!alive(sup), "supervisor {sup} still runs after uninstall");
    ensure!(
        !alive(new_pid),
        "ipamd {new_pid} still runs after uninstall"
    );
    for f in [
        "run/ipamd.sock",
        "run/ipamd.pid",
        "run/ipamd-supervisor.pid",
        "cni/net.d/10-ferry.conflist",
        "cni/bin/ferry",
        "usr/bin/ipamd",
        "usr/bin/ipamctl",
        "usr/bin/ferry-ipamd-supervisor",
        "etc/ipamd.toml",
    ] {
        ensure!(!layout.p(f).exists(), "{f} is left after uninstall");
    }
    ensure!(
        layout.p("state").is_dir(),
        "uninstall without --purge dropped the state"
    );

    // Purge: nothing left but empty directories.
    let o = install_sh(&node, &args, &["--uninstall", "--purge"])?;
    ensure!(
        o.status.success(),
        "install.sh --uninstall --purge failed: {}",
        show(&o)
    );
    let files = files_under(&layout.root);
    ensure!(
        files.is_empty(),
        "left after --uninstall --purge: {files:?}"
    );
    Ok(())
}
