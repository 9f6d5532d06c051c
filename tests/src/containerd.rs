//! [`Containerd`]: a private containerd inside a node's network namespace,
//! running busybox containers networked by the CNI plugins of a conflist.
//!
//! * containerd runs in the node's network namespace (a [`Node`]), in a
//!   private mount namespace (see `tests/fixtures/containerd/node-mounts.sh`)
//!   with its own root, state, socket and config
//!   (`tests/fixtures/containerd/config.toml`), all in a temp dir. `ctr` runs
//!   in the same namespaces (`nsenter` into containerd's), so `ctr run --cni`,
//!   which execs the CNI plugins itself and only knows the fixed dirs
//!   `/etc/cni/net.d` and `/opt/cni/bin`, sees our conflist and plugins
//!   there, bind-mounted over private overlays; the host's dirs are never
//!   touched;
//! * the containers run busybox from a rootfs directory built from Debian's
//!   busybox-static (`ctr run --rootfs`): no image is pulled.
//!
//! Debian's ctr (containerd 1.6) sets the network up (CNI ADD) between creating
//! and starting the task, and tears it down (CNI DEL) only in a *foreground*
//! `ctr run` once the task has exited, so every container runs as a foreground
//! `ctr run --rm --cni` child of the test and is stopped with `ctr task kill`.
//!
//! Everything is cleaned up in `Drop`, even when an assertion fails: the
//! containers through containerd (task kill, task rm, container rm), then, as
//! a backstop, leftover shims and container processes by PID (only ours: they
//! are the processes in our containers' uniquely named cgroups and the shims
//! whose command line names our containerd's unique socket path),
//! then containerd itself (SIGTERM, SIGKILL after a deadline) and the temp
//! dir. Nothing is killed by name.

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::netns::Node;
use crate::util::{ChildGuard, Poll, poll, signal, tail, unique, wait_timeout};

const CONFIG_TEMPLATE: &str = include_str!("../fixtures/containerd/config.toml");
const NODE_MOUNTS_SH: &str = include_str!("../fixtures/containerd/node-mounts.sh");

/// The containerd namespace our containers live in. ctr passes
/// `<namespace>-<container>` to CNI as the container ID.
const CTR_NAMESPACE: &str = "ferry-e2e";

/// The conflist's cniVersion. Debian's containerd 1.6 (its libcni) rejects a
/// 1.1.0 result (`unsupported CNI result version "1.1.0"`), and Debian's
/// portmap 1.1.1 supports up to 1.0.0, so the conflist asks for 1.0.0, which
/// ferry supports too.
pub const CNI_VERSION: &str = "1.0.0";

/// How long any single ctr command may take before we give up on it.
const CTR_TIMEOUT: Duration = Duration::from_secs(60);

/// The programs the test runs, and the Debian packages that provide them.
const TOOLS: [(&str, &str); 6] = [
    ("containerd", "containerd"),
    ("containerd-shim-runc-v2", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("unshare", "util-linux"),
    ("nsenter", "util-linux"),
];

/// Fails with the packages to install when a program the test runs is not
/// in PATH.
pub fn require_tools() -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<(&str, &str)> = TOOLS
        .iter()
        .copied()
        .filter(|(tool, _)| !std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
        .collect();
    ensure!(
        missing.is_empty(),
        "not found in PATH: {missing:?}; install the packages \
         (apt-get install -y containerd runc containernetworking-plugins busybox-static)"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The busybox root filesystem
// ---------------------------------------------------------------------------

/// Where Debian's busybox-static installs busybox (merged /usr or not).
fn busybox_binary() -> Result<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("busybox not found: apt-get install busybox-static")
}

/// True when the ELF file at `path` has no program interpreter (PT_INTERP),
/// i.e. it is statically linked and runs in an empty rootfs.
fn is_static_elf(path: &Path) -> Result<bool> {
    let b = fs::read(path)?;
    ensure!(
        b.len() > 64 && &b[..4] == b"\x7fELF" && b[4] == 2 && b[5] == 1,
        "{} is not a little-endian 64-bit ELF file",
        path.display()
    );
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[32..40].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        ensure!(o + 4 <= b.len(), "truncated ELF program header table");
        if u32::from_le_bytes(b[o..o + 4].try_into()?) == 3 {
            return Ok(false); // PT_INTERP: dynamically linked
        }
    }
    Ok(true)
}

/// Builds a minimal busybox root filesystem in `dir`: `bin/busybox` (a copy
/// of the static host binary), applet symlinks, `/etc/passwd`, `/etc/group`
/// and the empty mount points runc expects.
fn build_busybox_rootfs(dir: &Path) -> Result<()> {
    let busybox = busybox_binary()?;
    ensure!(
        is_static_elf(&busybox)?,
        "{} is dynamically linked; the container needs a static busybox \
         (apt-get install busybox-static)",
        busybox.display()
    );
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "run"] {
        fs::create_dir_all(dir.join(d))?;
    }
    fs::copy(&busybox, dir.join("bin/busybox"))
        .with_context(|| format!("copying {}", busybox.display()))?;
    for applet in ["sh", "ping", "ip", "sleep", "cat", "ls", "true"] {
        symlink("busybox", dir.join("bin").join(applet))?;
    }
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    fs::write(dir.join("etc/group"), "root:x:0:\n")?;
    fs::write(dir.join("etc/hosts"), "127.0.0.1 localhost\n")?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Running commands with a deadline
// ---------------------------------------------------------------------------

/// Runs `cmd` (stdin /dev/null) and returns its output, killing it (by PID)
/// if it is still running after `timeout`.
fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let out_file = tempfile::tempfile()?;
    let err_file = tempfile::tempfile()?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out_file.try_clone()?)
        .stderr(err_file.try_clone()?)
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let status = match wait_timeout(&mut child, timeout) {
        Some(st) => st,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}; killed it");
        }
    };
    Ok(Output {
        status,
        stdout: read_all(out_file)?,
        stderr: read_all(err_file)?,
    })
}

fn read_all(mut f: fs::File) -> Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    f.seek(SeekFrom::Start(0))?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

fn describe(out: &Output) -> String {
    format!(
        "{}; stdout: {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

// ---------------------------------------------------------------------------
// The private containerd
// ---------------------------------------------------------------------------

/// `ctr` in the mount and network namespaces of process `pid` (our
/// containerd), talking to `address`, in our containerd namespace.
fn ctr_command_at(pid: u32, address: &Path) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--target={pid}"))
        .args(["--mount", "--net", "--", "ctr", "--address"])
        .arg(address)
        .args(["--namespace", CTR_NAMESPACE]);
    c
}

/// One container: a foreground `ctr run --rm --cni` child of the test.
struct Container {
    id: String,
    /// The cgroup name (one level, under each hierarchy's root), so that
    /// runc's cleanup leaves no directory behind.
    cgroup: String,
    /// The foreground `ctr run`; `None` once it has exited and been reaped.
    run: Option<Child>,
    /// Where that ctr writes its stderr (plugin errors end up here).
    stderr_path: PathBuf,
}

/// A containerd of our own, inside a node's network namespace.
///
/// Dropping it removes the containers, stops containerd and deletes its
/// temp dir (see the module docs).
pub struct Containerd {
    /// Holds root, state, socket, logs, the CNI dirs and the rootfs dirs.
    dir: tempfile::TempDir,
    address: PathBuf,
    log_path: PathBuf,
    daemon: Option<ChildGuard>,
    /// containerd's PID: `ctr` joins its mount and network namespaces.
    pid: u32,
    containers: Vec<Container>,
    exec_seq: u32,
}

impl Containerd {
    /// Starts containerd in `node`'s network namespace with `conflist` as the
    /// only CNI network config, and `plugins` (name, binary) in its CNI bin
    /// dir; waits (polling `ctr version`) until it serves.
    pub fn start(node: &Node, conflist: &Value, plugins: &[(&str, PathBuf)]) -> Result<Containerd> {
        let dir = tempfile::Builder::new()
            .prefix("ferry-ctd-")
            .tempdir()
            .context("creating containerd's temp dir")?;
        let d = dir.path();
        ensure!(
            !d.starts_with("/run") && !node.dir.path().starts_with("/run"),
            "the temp dir {} is under /run, which containerd's mount namespace \
             replaces with a tmpfs; set TMPDIR elsewhere",
            d.display()
        );
        for sub in [
            "root", "state", "net.d", "bin", "cache", "cgroup", "scratch", "rootfs",
        ] {
            fs::create_dir_all(d.join(sub))?;
        }
        fs::write(
            d.join("net.d/10-ferry-e2e.conflist"),
            serde_json::to_vec_pretty(conflist)?,
        )?;
        // Copies, not symlinks: a link into /opt/cni/bin would point at the
        // very dir our bin dir is mounted over.
        for (name, src) in plugins {
            fs::copy(src, d.join("bin").join(name))
                .with_context(|| format!("copying CNI plugin {}", src.display()))?;
        }
        let address = d.join("containerd.sock");
        let config = CONFIG_TEMPLATE
            .replace("@ROOT@", &d.join("root").display().to_string())
            .replace("@STATE@", &d.join("state").display().to_string())
            .replace("@ADDRESS@", &address.display().to_string());
        fs::write(d.join("config.toml"), config)?;
        let log_path = d.join("containerd.log");
        let log = fs::File::create(&log_path)?;

        // unshare and nsenter exec (no fork), and so does the script: the
        // PID we get is containerd's.
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--"])
            .arg("nsenter")
            .arg(format!("--net={}", node.ns.path().display()))
            .args(["--", "sh", "-c", NODE_MOUNTS_SH, "node-mounts.sh"])
            .arg(d)
            .arg("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .args(["--log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning containerd (is the containerd package installed?)")?;
        let pid = child.id();
        let mut ctd = Containerd {
            dir,
            address,
            log_path,
            daemon: Some(ChildGuard::new(child)),
            pid,
            containers: vec![],
            exec_seq: 0,
        };
        ctd.wait_ready()?;
        Ok(ctd)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let res = poll("containerd to answer `ctr version`", CTR_TIMEOUT, || {
            if let Some(c) = self.daemon.as_mut().and_then(|g| g.child_mut())
                && let Some(st) = c.try_wait()?
            {
                bail!("containerd exited early: {st}");
            }
            let out = self.ctr(&["version"])?;
            Ok(if out.status.success() {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("ctr version: {}", describe(&out)))
            })
        });
        res.with_context(|| format!("containerd log tail:\n{}", self.log_tail(30)))
    }

    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_path, n)
    }

    /// A `ctr` command in containerd's mount and network namespaces, talking
    /// to our socket, in our containerd namespace.
    fn ctr_command(&self) -> Command {
        ctr_command_at(self.pid, &self.address)
    }

    /// Runs `ctr <args>` (any exit code).
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        output_with_timeout(self.ctr_command().args(args), CTR_TIMEOUT)
    }

    /// Runs `ctr <args>`; fails unless it exits 0; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr(args)?;
        if !out.status.success() {
            bail!("ctr {args:?} failed: {}", describe(&out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The CNI container ID ctr uses for container `id`.
    pub fn cni_container_id(id: &str) -> String {
        format!("{CTR_NAMESPACE}-{id}")
    }

    /// Starts container `id` running `sleep` as a foreground
    /// `ctr run --rm --cni` (see the module docs for why foreground), from a
    /// fresh busybox rootfs. Does not wait: see [`Containerd::wait_running`].
    pub fn run(&mut self, id: &str) -> Result<()> {
        let rootfs = self.dir.path().join("rootfs").join(id);
        build_busybox_rootfs(&rootfs)?;
        let cgroup = format!("/{}-{id}", unique("ferry-e2e-"));
        let stderr_path = self.dir.path().join(format!("ctr-run-{id}.log"));
        let mut cmd = self.ctr_command();
        cmd.args(["run", "--rm", "--cni", "--null-io", "--env", "PATH=/bin"])
            .args(["--cgroup", &cgroup, "--rootfs"])
            .arg(&rootfs)
            .args([id, "/bin/sleep", "3600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr_path)?);
        let child = cmd.spawn().context("spawning ctr run")?;
        self.containers.push(Container {
            id: id.to_string(),
            cgroup,
            run: Some(child),
            stderr_path,
        });
        Ok(())
    }

    fn container_mut(&mut self, id: &str) -> Result<&mut Container> {
        self.containers
            .iter_mut()
            .find(|c| c.id == id)
            .with_context(|| format!("no container {id}"))
    }

    /// `(id, pid, status)` rows of `ctr task ls`.
    pub fn tasks(&self) -> Result<Vec<(String, u32, String)>> {
        let out = self.ctr_ok(&["task", "ls"])?;
        let mut rows = vec![];
        for line in out.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let [id, pid, status] = f[..] {
                rows.push((id.to_string(), pid.parse()?, status.to_string()));
            }
        }
        Ok(rows)
    }

    /// Waits until container `id`'s task is RUNNING (ctr starts the task only
    /// after CNI ADD succeeded); fails early if its `ctr run` exits.
    pub fn wait_running(&mut self, id: &str) -> Result<u32> {
        let res = poll(&format!("container {id} to run"), CTR_TIMEOUT, || {
            let c = self.container_mut(id)?;
            let stderr_path = c.stderr_path.clone();
            let run = c.run.as_mut().context("ctr run already reaped")?;
            if let Some(st) = run.try_wait()? {
                c.run = None;
                bail!(
                    "`ctr run {id}` exited early ({st}): {}",
                    tail(&stderr_path, 40)
                );
            }
            let tasks = self.tasks()?;
            Ok(
                match tasks
                    .iter()
                    .find(|(tid, _, st)| tid == id && st == "RUNNING")
                {
                    Some((_, pid, _)) => Poll::Ready(*pid),
                    None => Poll::Pending(format!("tasks: {tasks:?}")),
                },
            )
        });
        res.with_context(|| format!("containerd log tail:\n{}", self.log_tail(20)))
    }

    /// `ctr task exec` of `argv` in container `id` (any exit code).
    pub fn exec(&mut self, id: &str, argv: &[&str]) -> Result<Output> {
        self.exec_seq += 1;
        let exec_id = format!("e2e-exec-{}", self.exec_seq);
        let mut args = vec!["task", "exec", "--exec-id", &exec_id, id];
        args.extend_from_slice(argv);
        self.ctr(&args)
    }

    /// Like [`Containerd::exec`], failing on a non-zero exit; returns stdout.
    pub fn exec_ok(&mut self, id: &str, argv: &[&str]) -> Result<String> {
        let out = self.exec(id, argv)?;
        if !out.status.success() {
            bail!("in container {id}: {argv:?} failed: {}", describe(&out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Kills container `id`'s task and waits for its foreground `ctr run` to
    /// finish: it deletes the task and the container, then runs CNI DEL.
    /// Returns that ctr's exit status and stderr.
    pub fn stop(&mut self, id: &str) -> Result<(ExitStatus, String)> {
        self.ctr_ok(&["task", "kill", "--signal", "SIGKILL", id])?;
        let c = self.container_mut(id)?;
        let mut run = c.run.take().context("ctr run already reaped")?;
        let stderr_path = c.stderr_path.clone();
        match wait_timeout(&mut run, CTR_TIMEOUT) {
            Some(st) => Ok((st, fs::read_to_string(&stderr_path).unwrap_or_default())),
            None => {
                let _ = run.kill();
                let _ = run.wait();
                bail!(
                    "`ctr run {id}` did not finish within {CTR_TIMEOUT:?} after its task \
                     was killed: {}",
                    tail(&stderr_path, 40)
                )
            }
        }
    }

    /// The IPv4 address on eth0 inside container `id`, with its prefix length,
    /// from busybox `ip -4 -o addr show dev eth0`.
    pub fn eth0_address(&mut self, id: &str) -> Result<(Ipv4Addr, u8)> {
        let out = self.exec_ok(id, &["/bin/ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
        let cidr = out
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .with_context(|| format!("no IPv4 address on eth0 in {id}: {out}"))?;
        let (ip, len) = cidr
            .split_once('/')
            .with_context(|| format!("odd address {cidr}"))?;
        Ok((ip.parse()?, len.parse()?))
    }

    /// Pings `dst` from inside container `id`: `ping -c1 -W2`, up to 3 attempts.
    pub fn ping(&mut self, id: &str, dst: Ipv4Addr) -> Result<()> {
        let dst = dst.to_string();
        let mut last = String::new();
        for _ in 0..3 {
            let out = self.exec(id, &["/bin/ping", "-c", "1", "-W", "2", &dst])?;
            if out.status.success() {
                return Ok(());
            }
            last = describe(&out);
        }
        bail!("container {id} cannot ping {dst}: {last}")
    }

    /// Best-effort removal of every container through containerd (task kill,
    /// task rm, container rm), which also makes each foreground `ctr run`
    /// finish. Once one ctr call hangs, containerd is taken as wedged: no
    /// more ctr calls, and the `ctr run` children are killed right away.
    fn remove_containers(&mut self) {
        let short = Duration::from_secs(10);
        let mut responsive = true;
        for i in 0..self.containers.len() {
            let id = self.containers[i].id.clone();
            for args in [
                vec!["task", "kill", "--signal", "SIGKILL", &id],
                vec!["task", "rm", "--force", &id],
                vec!["container", "rm", &id],
            ] {
                if responsive {
                    responsive = output_with_timeout(self.ctr_command().args(&args), short).is_ok();
                }
            }
            if let Some(mut run) = self.containers[i].run.take() {
                let wait = if responsive { short } else { Duration::ZERO };
                if wait_timeout(&mut run, wait).is_none() {
                    let _ = run.kill();
                    let _ = run.wait();
                }
            }
        }
    }

    /// Our containers' cgroup dirs that still exist, in every hierarchy
    /// (`/sys/fs/cgroup/<controller>/` with cgroup v1, `/sys/fs/cgroup/`
    /// itself with v2).
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let root = PathBuf::from("/sys/fs/cgroup");
        let mut hierarchies = vec![root.clone()];
        if let Ok(entries) = fs::read_dir(&root) {
            hierarchies.extend(entries.flatten().map(|h| h.path()));
        }
        let mut dirs = vec![];
        for c in &self.containers {
            for h in &hierarchies {
                let p = h.join(c.cgroup.trim_start_matches('/'));
                if p.is_dir() {
                    dirs.push(p);
                }
            }
        }
        dirs
    }

    /// PIDs of leftover processes that are ours: those in our containers'
    /// cgroups (named uniquely per run), and the shims started by our
    /// containerd (their command line names our unique socket path).
    fn leftover_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .cgroup_dirs()
            .iter()
            .flat_map(|d| {
                fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        let address = self.address.display().to_string();
        if let Ok(entries) = fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
                if pid != self.pid
                    && cmdline
                        .split(|b| *b == 0)
                        .any(|arg| arg == address.as_bytes())
                {
                    pids.push(pid);
                }
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_containers();
        // Backstop for a wedged containerd: SIGKILL what is left of ours.
        for pid in self.leftover_pids() {
            signal(pid, libc::SIGKILL);
        }
        if let Some(mut d) = self.daemon.take() {
            d.terminate(Duration::from_secs(10));
        }
        for pid in self.leftover_pids() {
            signal(pid, libc::SIGKILL);
        }
        // runc removes a container's cgroups when its task is deleted; if
        // that never happened, remove ours once their processes are gone.
        let dirs = self.cgroup_dirs();
        if !dirs.is_empty() {
            let _ = poll(
                "our cgroups to be removable",
                Duration::from_secs(5),
                || {
                    let left: Vec<&PathBuf> = dirs
                        .iter()
                        .filter(|d| d.exists() && fs::remove_dir(d).is_err())
                        .collect();
                    Ok(if left.is_empty() {
                        Poll::Ready(())
                    } else {
                        Poll::Pending(format!("{left:?}"))
                    })
                },
            );
        }
        // The temp dir goes when `dir` drops, right after this.
    }
}
