//! [`Ipamd`]: the real ipamd, run inside a node's namespace, plus ipamctl helpers.

use std::fs::OpenOptions;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ipnet::Ipv4Net;
use serde_json::Value;

use crate::netns::Node;
use crate::util::{ChildGuard, bin, signal, tail, wait_timeout, wait_until};

/// How to run ipamd. `None` leaves a flag out (ipamd's own default applies).
#[derive(Clone, Debug)]
pub struct IpamdConfig {
    /// `--pod-cidr`, default `10.244.0.0/16`.
    pub pod_cidr: String,
    /// `--block-size`.
    pub block_size: Option<u8>,
    /// `--cooldown` seconds; default 1 so tests are not slowed by reuse delays.
    pub cooldown: Option<u64>,
    /// `--reconcile-interval` seconds; default 3600 (reconcile stays out of the way).
    pub reconcile_interval: Option<u64>,
    /// `--stale-grace` seconds; default 300.
    pub stale_grace: Option<u64>,
    /// `--log-level`; default `debug`.
    pub log_level: Option<String>,
    /// When set, written to `<node dir>/ipamd.toml` and passed as `--config`.
    pub config_toml: Option<String>,
    /// Appended to the command line as they are.
    pub extra_args: Vec<String>,
    /// How long to wait for `ipamctl status` to succeed after a start; default 30 s.
    pub startup_timeout: Duration,
}

impl Default for IpamdConfig {
    fn default() -> Self {
        Self {
            pod_cidr: "10.244.0.0/16".to_string(),
            block_size: None,
            cooldown: Some(1),
            reconcile_interval: Some(3600),
            stale_grace: Some(300),
            log_level: Some("debug".to_string()),
            config_toml: None,
            extra_args: vec![],
            startup_timeout: Duration::from_secs(30),
        }
    }
}

/// A running ipamd inside a node's namespace.
///
/// Socket `<node dir>/ipamd.sock`, state `<node dir>/state`, stdout and stderr
/// appended to `<node dir>/ipamd.log` (kept across restarts). Dropping it
/// SIGKILLs the process by PID.
pub struct Ipamd {
    netns: String,
    node_name: String,
    socket: PathBuf,
    state_dir: PathBuf,
    log_path: PathBuf,
    config_path: Option<PathBuf>,
    cfg: IpamdConfig,
    child: Option<ChildGuard>,
}

impl Ipamd {
    /// Spawns ipamd in `node`'s namespace and waits (polling `ipamctl status`,
    /// with a deadline) until it is healthy.
    pub fn start(node: &Node, cfg: IpamdConfig) -> Result<Ipamd> {
        let config_path = match &cfg.config_toml {
            Some(toml) => {
                let p = node.path("ipamd.toml");
                std::fs::write(&p, toml)?;
                Some(p)
            }
            None => None,
        };
        let mut d = Ipamd {
            netns: node.ns.name().to_string(),
            node_name: node.name.clone(),
            socket: node.path("ipamd.sock"),
            state_dir: node.path("state"),
            log_path: node.path("ipamd.log"),
            config_path,
            cfg,
            child: None,
        };
        d.spawn()?;
        d.wait_healthy()?;
        Ok(d)
    }

    /// The Unix socket ipamd serves on (put it in the plugin config).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The PID of the running ipamd, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.pid())
    }

    /// The whole ipamd log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `n` lines of the log (for error messages).
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_path, n)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(bin("ipamd"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--node-name", &self.node_name])
            .args(["--pod-cidr", &self.cfg.pod_cidr]);
        if let Some(p) = &self.config_path {
            cmd.arg("--config").arg(p);
        }
        let c = &self.cfg;
        let opts: [(&str, Option<String>); 5] = [
            ("--block-size", c.block_size.map(|v| v.to_string())),
            ("--cooldown", c.cooldown.map(|v| v.to_string())),
            (
                "--reconcile-interval",
                c.reconcile_interval.map(|v| v.to_string()),
            ),
            ("--stale-grace", c.stale_grace.map(|v| v.to_string())),
            ("--log-level", c.log_level.clone()),
        ];
        for (flag, v) in opts {
            if let Some(v) = v {
                cmd.args([flag, &v]);
            }
        }
        cmd.args(&c.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("spawning ipamd")?;
        self.child = Some(ChildGuard::new(child));
        Ok(())
    }

    /// Polls `ipamctl --socket S status` until it exits 0 (deadline:
    /// `startup_timeout`). Fails early, with the log tail, if ipamd exits.
    pub fn wait_healthy(&mut self) -> Result<()> {
        self.wait_status(true)
    }

    /// `ready`: until `ipamctl status` exits 0; else until ipamd answers it
    /// at all (it prints a status whatever its readiness).
    fn wait_status(&mut self, ready: bool) -> Result<()> {
        let socket = self.socket.clone();
        let netns = self.netns.clone();
        let child = &mut self.child;
        let what = if ready {
            "ipamd to become healthy"
        } else {
            "ipamd to answer"
        };
        let res = wait_until(what, self.cfg.startup_timeout, || {
            if let Some(c) = child.as_mut().and_then(|g| g.child_mut())
                && let Some(st) = c.try_wait()?
            {
                bail!("ipamd exited early: {st}");
            }
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &netns])
                .arg(bin("ipamctl"))
                .arg("--socket")
                .arg(&socket)
                .arg("status")
                .stdin(Stdio::null())
                .output()?;
            if out.status.success() || (!ready && !out.stdout.is_empty()) {
                Ok(Some(()))
            } else {
                bail!(
                    "ipamctl status: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            }
        });
        res.with_context(|| format!("ipamd log tail:\n{}", self.log_tail(30)))
    }

    /// True while the process we spawned has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().and_then(|g| g.child_mut()) {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL (a crash) and reap. No-op when not running.
    pub fn kill(&mut self) {
        if let Some(mut g) = self.child.take() {
            g.kill();
        }
    }

    /// SIGTERM and wait up to 15 s for a graceful exit; returns its status
    /// (an error if it had to be SIGKILLed).
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let mut g = self.child.take().context("ipamd is not running")?;
        let pid = g.pid().context("ipamd is not running")?;
        let child = g.child_mut().context("ipamd is not running")?;
        signal(pid, libc::SIGTERM);
        match wait_timeout(child, Duration::from_secs(15)) {
            Some(st) => Ok(st),
            None => {
                g.kill();
                bail!("ipamd ignored SIGTERM for 15 s; killed it")
            }
        }
    }

    /// Starts ipamd again (SIGKILLing it first if it is running) and waits
    /// until it is healthy. Same socket, state dir and flags.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_healthy()
    }

    /// [`Ipamd::restart`], waiting only until ipamd answers, ready or not.
    pub fn restart_answering(&mut self) -> Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_status(false)
    }

    /// Replaces the `--config` file; ipamd reads it at its next start.
    pub fn rewrite_config(&self, toml: &str) -> Result<()> {
        let path = self
            .config_path
            .as_ref()
            .context("this ipamd was started without --config")?;
        std::fs::write(path, toml).with_context(|| format!("write {}", path.display()))
    }

    /// Starts ipamd again only if it is not running (no wait for health).
    pub fn spawn_if_stopped(&mut self) -> Result<()> {
        if !self.is_running() {
            self.spawn()?;
        }
        Ok(())
    }

    /// `ipamctl --socket S <args>` inside the node namespace (any exit code).
    pub fn ipamctl(&self, args: &[&str]) -> Result<Output> {
        ipamctl_in(&self.netns, &self.socket, args)
    }

    /// `ipamctl --socket S --json <args>`, must exit 0, stdout parsed as JSON.
    pub fn ipamctl_json(&self, args: &[&str]) -> Result<Value> {
        ipamctl_json_in(&self.netns, &self.socket, args)
    }

    /// `ipamctl --json allocations` as a list of objects (ip, containerId, ifname, ...).
    pub fn allocations(&self) -> Result<Vec<Value>> {
        as_list(self.ipamctl_json(&["allocations"])?)
    }

    /// `ipamctl --json blocks` as a list of objects.
    pub fn blocks(&self) -> Result<Vec<Value>> {
        as_list(self.ipamctl_json(&["blocks"])?)
    }

    /// Every allocation as (ip, containerId), sorted.
    pub fn held(&self) -> Result<Vec<(Ipv4Addr, String)>> {
        let mut held = self
            .allocations()?
            .iter()
            .map(|a| {
                let ip = a["ip"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .with_context(|| format!("allocation without ip: {a}"))?;
                let cid = a["containerId"]
                    .as_str()
                    .with_context(|| format!("allocation without containerId: {a}"))?;
                Ok((ip, cid.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        held.sort();
        Ok(held)
    }

    /// `ipamctl <args>`, which must exit 0; its stdout.
    pub fn ipamctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ipamctl(args)?;
        ensure!(
            out.status.success(),
            "ipamctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }
}

impl Drop for Ipamd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn as_list(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        // Tolerate a wrapper object such as {"allocations": [...]}.
        Value::Object(m) if m.len() == 1 => match m.into_iter().next() {
            Some((_, Value::Array(a))) => Ok(a),
            Some((k, other)) => bail!("expected a JSON array under {k}, got {other}"),
            None => unreachable!(),
        },
        other => bail!("expected a JSON array, got {other}"),
    }
}

fn ipamctl_in(netns: &str, socket: &Path, args: &[&str]) -> Result<Output> {
    std::process::Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(bin("ipamctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ipamctl")
}

fn ipamctl_json_in(netns: &str, socket: &Path, args: &[&str]) -> Result<Value> {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = ipamctl_in(netns, socket, &full)?;
    if !out.status.success() {
        bail!(
            "ipamctl {full:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let s = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&s).with_context(|| format!("ipamctl {full:?} printed non-JSON: {s}"))
}

/// `ipamctl --socket <socket> <args>` run inside `node`'s namespace (any exit code).
pub fn ipamctl(node: &Node, socket: &Path, args: &[&str]) -> Result<Output> {
    ipamctl_in(node.ns.name(), socket, args)
}

/// `ipamctl --socket <socket> --json <args>`: must exit 0; stdout parsed.
pub fn ipamctl_json(node: &Node, socket: &Path, args: &[&str]) -> Result<Value> {
    ipamctl_json_in(node.ns.name(), socket, args)
}

/// `ipamctl --json allocations` as a list of objects.
pub fn ipamctl_allocations(node: &Node, socket: &Path) -> Result<Vec<Value>> {
    as_list(ipamctl_json(node, socket, &["allocations"])?)
}

/// The entry of `ipamctl --json allocations` for CNI container ID `container_id`.
pub fn allocation_of(allocs: &[Value], container_id: &str) -> Option<Value> {
    allocs
        .iter()
        .find(|a| a["containerId"].as_str() == Some(container_id))
        .cloned()
}

/// The CIDRs in `ipamctl --json blocks` output.
pub fn block_cidrs(blocks: &[Value]) -> Vec<Ipv4Net> {
    blocks
        .iter()
        .filter_map(|b| b["cidr"].as_str()?.parse::<Ipv4Net>().ok())
        .collect()
}

/// `ipamctl --json blocks` as a list of objects.
pub fn ipamctl_blocks(node: &Node, socket: &Path) -> Result<Vec<Value>> {
    as_list(ipamctl_json(node, socket, &["blocks"])?)
}
