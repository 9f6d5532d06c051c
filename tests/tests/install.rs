//! install.sh, into temp dirs, inside a node netns (no systemd).
//!
//! After install: ipamd is healthy under its supervisor, the conflist is there
//! and valid and works, the binaries and config are in place, and a killed
//! ipamd comes back. After `--uninstall`: processes, socket, conflist,
//! binaries, config and ferry's blackhole routes are gone (state kept), while
//! a running pod keeps its veth and route; `--uninstall --purge` leaves no
//! file at all in the tree. Also: purge only ever removes ipamd's own files,
//! a pidfile naming someone else's process is not signalled, re-running
//! install.sh over a live node fails no ADD, and the unit's ExecStart is
//! quoted the way systemd reads it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// `args` with the value of `flag` replaced by `value`, or dropped with `None`.
fn with_flag(args: &[String], flag: &str, value: Option<&str>) -> Vec<String> {
    let mut out = vec![];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == flag {
            it.next();
            if let Some(v) = value {
                out.extend([a.clone(), v.to_string()]);
            }
        } else {
            out.push(a.clone());
        }
    }
    out
}

/// Runs install.sh inside network namespace `netns`.
fn install_sh_in(
    netns: &str,
    args: &[String],
    extra: &[&str],
    env: &[(&str, &str)],
) -> Result<Output> {
    Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(workspace_root().join("install.sh"))
        .args(args)
        .args(extra)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .context("running install.sh")
}

fn install_sh(node: &Node, args: &[String], extra: &[&str]) -> Result<Output> {
    install_sh_in(node.ns.name(), args, extra, &[])
}

fn show(o: &Output) -> String {
    format!(
        "{}\n--- stdout:\n{}--- stderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Fails with the whole output unless install.sh succeeded; returns stdout
/// and stderr together (what a user reads on the terminal).
fn succeeded(o: Output, what: &str) -> Result<String> {
    ensure!(o.status.success(), "install.sh {what} failed: {}", show(&o));
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    ))
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
struct Cleanup {
    netns: String,
    root: PathBuf,
    args: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let pids: Vec<u32> = ["run/ipamd-supervisor.pid", "run/ipamd.pid"]
            .iter()
            .filter_map(|f| read_pid(&self.root.join(f)).ok())
            .collect();
        let _ = install_sh_in(&self.netns, &self.args, &["--uninstall", "--purge"], &[]);
        let root = self.root.display().to_string();
        for pid in pids {
            if alive(pid) && cmdline_mentions(pid, &root) {
                // SAFETY: kill(2) on a PID our install started (checked by its cmdline).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

/// A node with an install tree; fields drop in order, so the install is
/// undone while the node's namespace still exists.
struct World {
    _cleanup: Cleanup,
    layout: Layout,
    args: Vec<String>,
    node: Node,
    _fabric: Fabric,
}

impl World {
    fn new() -> Result<World> {
        require_root();
        let fabric = Fabric::new()?;
        let node = fabric.add_node()?;
        let layout = Layout {
            root: node.path("tree"),
        };
        std::fs::create_dir(&layout.root)?;
        let args = layout.args(&node);
        Ok(World {
            _cleanup: Cleanup {
                netns: node.ns.name().to_string(),
                root: layout.root.clone(),
                args: args.clone(),
            },
            layout,
            args,
            node,
            _fabric: fabric,
        })
    }

    /// install.sh with our args plus `extra`; fails unless it succeeded.
    fn run(&self, extra: &[&str]) -> Result<String> {
        succeeded(install_sh(&self.node, &self.args, extra)?, &extra.join(" "))
    }

    /// A runtime that finds ferry where install.sh put it.
    fn runtime(&self) -> Runtime {
        Runtime::new(Cni::new(&self.node).with_cni_path(vec![self.layout.p("cni/bin")]))
    }

    fn conflist(&self) -> Result<Value> {
        let path = self.layout.p("cni/net.d/10-ferry.conflist");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{} missing", path.display()))?;
        serde_json::from_str(&text).context("the conflist is not valid JSON")
    }

    /// ferry's blackhole routes in the node netns (route protocol 0x66).
    fn blackholes(&self) -> Result<String> {
        self.node
            .ns
            .ip(&["-4", "route", "show", "proto", "102", "type", "blackhole"])
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

/// A copy of the binaries in `bin_dir()`, with `changed` made different
/// (trailing bytes, which an ELF loader ignores): a new build to upgrade to.
fn new_build(dir: &Path, changed: &str, tag: u8) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    for b in ["ferry", "ipamd", "ipamctl"] {
        let mut bytes = std::fs::read(bin(b))?;
        if b == changed {
            bytes.extend(std::iter::repeat_n(tag, 4096));
        }
        let dest = dir.join(b);
        std::fs::write(&dest, &bytes)?;
        std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    Ok(dir.to_path_buf())
}

#[test]
fn help_lists_the_options() -> Result<()> {
    let o = Command::new(workspace_root().join("install.sh"))
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
        "--print-unit",
        "--uninstall",
        "--purge",
        "--from",
    ] {
        ensure!(text.contains(flag), "--help does not mention {flag}");
    }
    Ok(())
}

/// systemd splits ExecStart at spaces outside quotes, expands %-specifiers
/// everywhere and $VARIABLES in arguments, and refuses quotes and
/// backslashes in the executable's path.
#[test]
fn unit_exec_start_is_quoted_for_systemd() -> Result<()> {
    let print_unit = |prefix: &str, config_dir: &str| {
        Command::new(workspace_root().join("install.sh"))
            .args([
                "--print-unit",
                "--prefix",
                prefix,
                "--config-dir",
                config_dir,
            ])
            .output()
    };
    let o = print_unit("/opt/fer ry/100%", r#"/etc/my ferry/$HOME "q" \x %n"#)?;
    ensure!(o.status.success(), "install.sh --print-unit: {}", show(&o));
    let unit = String::from_utf8_lossy(&o.stdout);
    let exec: Vec<_> = unit
        .lines()
        .filter(|l| l.starts_with("ExecStart="))
        .collect();
    // argv: ["/opt/fer ry/100%/bin/ipamd", "--config",
    //        "/etc/my ferry/$HOME \"q\" \\x %n/ipamd.toml"]
    let want = r#"ExecStart="/opt/fer ry/100%%/bin/ipamd" --config "/etc/my ferry/$$HOME \"q\" \\x %%n/ipamd.toml""#;
    ensure!(exec == [want], "got {exec:?}, want {want}\n{unit}");

    let o = print_unit(r#"/opt/"q""#, "/etc/ferry")?;
    ensure!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("quote or backslash"),
        "a binary path systemd refuses was not refused: {}",
        show(&o)
    );
    Ok(())
}

#[test]
fn install_then_uninstall() -> Result<()> {
    let w = World::new()?;
    let (layout, node) = (&w.layout, &w.node);

    w.run(&[])?;

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
    let list = w.conflist()?;
    ensure!(list["name"] == "ferry", "conflist name: {list}");
    ensure!(
        list["plugins"][0]["type"] == "ferry",
        "first plugin: {list}"
    );
    ensure!(
        list["plugins"][0]["ipamd"]["socket"] == layout.socket().display().to_string().as_str(),
        "the conflist does not point at our socket: {list}"
    );
    for dir in ["cni/net.d", "cni/bin", "usr/bin", "etc"] {
        let temps: Vec<_> = std::fs::read_dir(layout.p(dir))?
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        ensure!(temps.is_empty(), "temp files left in {dir}: {temps:?}");
    }

    // The conflist works as written, with the installed plugin.
    let rt = w.runtime();
    let pod = Pod::new()?;
    let out = rt.add(&list, &CniCall::add(&pod), &json!({}))?;
    ensure!(out.success(), "ADD with the installed conflist: {out}");
    ensure!(
        pod.ns.ping(&node.ip.to_string()),
        "the pod cannot reach its node"
    );
    let out = rt.del(&list, &CniCall::del(&pod), &json!({}))?;
    ensure!(out.success(), "DEL with the installed conflist: {out}");
    drop(pod);
    // So that the running pod below is the only one on the node.
    wait_until("the deleted pod's veth to go", DEL_SETTLE, || {
        Ok(node.ns.ferry_links()?.is_empty().then_some(()))
    })?;

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

    // A pod that still runs when ferry is uninstalled.
    let running = Pod::new()?;
    let out = rt.add(&list, &CniCall::add(&running), &json!({}))?;
    ensure!(out.success(), "ADD of the running pod: {out}");
    let running_ip = out.ips()[0].to_string();
    let veth = running.host_veth();
    wait_until(
        "ipamd to add a blackhole route for its block",
        Duration::from_secs(5),
        || Ok((!w.blackholes()?.trim().is_empty()).then_some(())),
    )?;

    // Uninstall, keeping state.
    let said = w.run(&["--uninstall"])?;
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
    let left = w.blackholes()?;
    ensure!(
        left.trim().is_empty(),
        "ferry's blackhole routes are left after uninstall:\n{left}\n{said}"
    );
    ensure!(
        said.contains("removed ferry's blackhole routes"),
        "uninstall does not say it removed the blackhole routes:\n{said}"
    );
    // The running pod is left alone, and uninstall says so.
    ensure!(
        node.ns.links()?.contains(&veth),
        "uninstall removed the running pod's veth {veth}"
    );
    ensure!(
        node.ns
            .host_routes()?
            .contains(&(running_ip.clone(), veth.clone())),
        "uninstall removed the running pod's route {running_ip} dev {veth}"
    );
    ensure!(
        said.contains("left 1 running pod(s) alone"),
        "uninstall does not say it left the running pod alone:\n{said}"
    );

    // Purge: nothing left but empty directories.
    w.run(&["--uninstall", "--purge"])?;
    let files = files_under(&layout.root);
    ensure!(
        files.is_empty(),
        "left after --uninstall --purge: {files:?}"
    );
    Ok(())
}

/// --purge removes ipamd's database and nothing else; a mistaken state dir
/// (flag or environment) loses no file.
#[test]
fn purge_removes_only_ipamds_files() -> Result<()> {
    let w = World::new()?;
    let state = w.layout.p("state");
    std::fs::create_dir_all(state.join("db.corrupt-1700000000"))?;
    std::fs::write(state.join("db.corrupt-1700000000/db"), "old")?;
    std::fs::write(state.join("notes.txt"), "someone else's")?;

    w.run(&[])?;
    for f in ["db", "db.flushes"] {
        ensure!(state.join(f).exists(), "ipamd did not create state/{f}");
    }
    let said = w.run(&["--uninstall", "--purge"])?;
    for f in ["db", "db.flushes", "db.corrupt-1700000000"] {
        ensure!(!state.join(f).exists(), "--purge left state/{f}:\n{said}");
    }
    ensure!(
        std::fs::read_to_string(state.join("notes.txt"))
            .ok()
            .as_deref()
            == Some("someone else's"),
        "--purge touched a file that is not ferry's:\n{said}"
    );
    ensure!(
        said.contains("removed ipamd's database")
            && said.contains("kept")
            && said.contains("not ferry's: notes.txt"),
        "--purge does not say what it removed and kept:\n{said}"
    );

    // Someone else's tree given as the state dir, by flag and by environment.
    let kubelet = w.layout.p("var lib/kubelet");
    let theirs = ["config.yaml", "pods/uid-1/volumes/data", ".hidden"];
    for f in theirs {
        let p = kubelet.join(f);
        std::fs::create_dir_all(p.parent().unwrap())?;
        std::fs::write(&p, f)?;
    }
    let kubelet_s = kubelet.display().to_string();
    let by_flag = with_flag(&w.args, "--state-dir", Some(&kubelet_s));
    let by_env = with_flag(&w.args, "--state-dir", None);
    for (how, args, env) in [
        ("--state-dir", by_flag, vec![]),
        (
            "FERRY_STATE_DIR",
            by_env,
            vec![("FERRY_STATE_DIR", kubelet_s.as_str())],
        ),
    ] {
        let o = install_sh_in(w.node.ns.name(), &args, &["--uninstall", "--purge"], &env)?;
        let said = succeeded(o, &format!("--uninstall --purge with {how}"))?;
        for f in theirs {
            ensure!(
                std::fs::read_to_string(kubelet.join(f)).ok().as_deref() == Some(f),
                "--purge with {how} removed {f}:\n{said}"
            );
        }
        ensure!(
            said.contains("holds none of ipamd's files"),
            "--purge with {how} does not say it removed nothing:\n{said}"
        );
    }
    Ok(())
}

/// A pidfile naming a live process that is not ferry's (the PID was reused)
/// never gets it signalled, by install or uninstall, and both say so.
#[test]
fn pidfile_naming_a_stranger_is_not_signalled() -> Result<()> {
    let w = World::new()?;
    let mut stranger = ChildGuard::new(
        Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .spawn()?,
    );
    let pid = stranger.pid().context("sleep has no pid")?;
    let plant = || -> Result<()> {
        std::fs::create_dir_all(w.layout.p("run"))?;
        for f in ["run/ipamd.pid", "run/ipamd-supervisor.pid"] {
            std::fs::write(w.layout.p(f), format!("{pid}\n"))?;
        }
        Ok(())
    };
    let untouched = |stranger: &mut ChildGuard, what: &str, said: &str| -> Result<()> {
        let child = stranger.child_mut().context("no child")?;
        ensure!(
            child.try_wait()?.is_none(),
            "{what} signalled pid {pid} (sleep), which is not ferry's:\n{said}"
        );
        ensure!(
            said.contains(&format!("names pid {pid}, which is not ferry's")),
            "{what} does not say it left pid {pid} alone:\n{said}"
        );
        Ok(())
    };

    plant()?;
    let said = w.run(&[])?;
    untouched(&mut stranger, "install", &said)?;
    let ipamd_pid = read_pid(&w.layout.p("run/ipamd.pid"))?;
    ensure!(ipamd_pid != pid && alive(ipamd_pid), "no new ipamd");

    w.run(&["--uninstall"])?;
    ensure!(!alive(ipamd_pid), "uninstall did not stop ipamd");
    plant()?;
    let said = w.run(&["--uninstall"])?;
    untouched(&mut stranger, "uninstall", &said)?;
    Ok(())
}

/// Re-running install.sh over a live node while pods come and go: the
/// runtime always finds a whole ferry binary and a whole conflist, ipamd is
/// not restarted when it did not change, so no ADD (nor VERSION) fails; a
/// new ipamd is restarted.
#[test]
fn upgrade_while_adding_pods_fails_no_add() -> Result<()> {
    let w = World::new()?;
    w.run(&[])?;
    let ipamd_pid = read_pid(&w.layout.p("run/ipamd.pid"))?;
    let builds = [
        new_build(&w.node.path("build-a"), "ferry", b'a')?,
        new_build(&w.node.path("build-b"), "ferry", b'b')?,
    ];
    let installed_ferry = w.layout.p("cni/bin/ferry");
    let rt = w.runtime();
    let stop = AtomicBool::new(false);
    let adds = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::<String>::new());

    std::thread::scope(|s| -> Result<()> {
        let looper = s.spawn(|| {
            let fail = |m: String| failures.lock().unwrap().push(m);
            while !stop.load(Ordering::Relaxed) {
                let step = || -> Result<()> {
                    let list = w.conflist()?;
                    let pod = Pod::new()?;
                    let out = rt.add(&list, &CniCall::add(&pod), &json!({}))?;
                    ensure!(out.success(), "ADD: {out}");
                    adds.fetch_add(1, Ordering::Relaxed);
                    let out = rt.del(&list, &CniCall::del(&pod), &json!({}))?;
                    ensure!(out.success(), "DEL: {out}");
                    Ok(())
                };
                if let Err(e) = step() {
                    fail(format!("{e:#}"));
                }
            }
        });
        // Runtimes also exec ferry for VERSION; cheap, so many land mid-upgrade.
        let versions = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let out = rt.cni.exec(
                    "ferry",
                    &CniCall::bare("VERSION"),
                    br#"{"cniVersion":"1.0.0"}"#,
                );
                match out {
                    Ok(o) if o.success() => {}
                    Ok(o) => failures.lock().unwrap().push(format!("VERSION: {o}")),
                    Err(e) => failures.lock().unwrap().push(format!("VERSION: {e:#}")),
                }
            }
        });
        let upgrades = || -> Result<()> {
            for i in 0..8 {
                let from = &builds[i % 2];
                // Each upgrade overlaps a running ADD/DEL loop.
                let before = adds.load(Ordering::Relaxed);
                wait_until("the ADD loop to go on", Duration::from_secs(60), || {
                    Ok((adds.load(Ordering::Relaxed) > before).then_some(()))
                })?;
                let said = w.run(&["--from", &from.display().to_string()])?;
                ensure!(
                    said.contains(&format!("installed {}", installed_ferry.display()))
                        && said.contains("not restarting it"),
                    "upgrade {i} did not replace only ferry:\n{said}"
                );
                ensure!(
                    std::fs::read(&installed_ferry)? == std::fs::read(from.join("ferry"))?,
                    "upgrade {i} did not install {}",
                    from.display()
                );
            }
            let before = adds.load(Ordering::Relaxed);
            wait_until("an ADD after the upgrades", Duration::from_secs(60), || {
                Ok((adds.load(Ordering::Relaxed) > before).then_some(()))
            })?;
            Ok(())
        };
        let result = upgrades();
        stop.store(true, Ordering::Relaxed);
        looper.join().expect("the ADD loop panicked");
        versions.join().expect("the VERSION loop panicked");
        result
    })?;

    let failures = failures.into_inner().unwrap();
    let adds = adds.into_inner();
    ensure!(
        failures.is_empty(),
        "{} plugin calls failed during upgrades ({adds} ADDs succeeded); first: {}",
        failures.len(),
        failures[0]
    );
    ensure!(
        read_pid(&w.layout.p("run/ipamd.pid"))? == ipamd_pid && alive(ipamd_pid),
        "ipamd was restarted by upgrades that did not change it"
    );

    // A new ipamd is installed and restarted.
    let from = new_build(&w.node.path("build-c"), "ipamd", b'c')?;
    let said = w.run(&["--from", &from.display().to_string()])?;
    let new_pid = read_pid(&w.layout.p("run/ipamd.pid"))?;
    ensure!(
        new_pid != ipamd_pid && alive(new_pid) && !alive(ipamd_pid),
        "a new ipamd binary did not restart ipamd:\n{said}"
    );
    Ok(())
}
