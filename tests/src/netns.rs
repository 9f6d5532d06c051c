//! Network namespace guards: [`Netns`], [`Fabric`], [`Node`], [`Pod`].

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::util::{Poll, look_every, random_container_id, unique};

/// A named network namespace (`/run/netns/<name>`), deleted on drop.
///
/// Names look like `fy<pid>x<n>-<role>`, unique per process and call.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `fy<pid>x<n>-<role>` and brings its `lo` up.
    pub fn new(role: &str) -> Result<Netns> {
        let name = format!("{}-{role}", unique("fy"));
        Self::create(&name)
    }

    /// Creates a namespace with exactly this name (and `lo` up).
    pub fn create(name: &str) -> Result<Netns> {
        run(Command::new("ip").args(["netns", "add", name]))
            .with_context(|| format!("ip netns add {name}"))?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: what a runtime passes as CNI_NETNS.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// A `Command` for `ip netns exec <name> <program>`; add args and run it.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `argv` inside the namespace and returns its output (any exit code).
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        let (prog, rest) = argv.split_first().context("empty argv")?;
        self.command(prog)
            .args(rest)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("ip netns exec {} {argv:?}", self.name))
    }

    /// Like [`Netns::exec`] but fails on a non-zero exit; returns stdout.
    pub fn exec_ok(&self, argv: &[&str]) -> Result<String> {
        let out = self.exec(argv)?;
        if !out.status.success() {
            bail!(
                "in netns {}: {argv:?} failed ({}): {}{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip -n <name> <args>`; fails on a non-zero exit, returns stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `ip -j -n <name> <args>` parsed as JSON (an empty output is `[]`).
    pub fn ip_json(&self, args: &[&str]) -> Result<Value> {
        let out = run(Command::new("ip").args(["-j", "-n", &self.name]).args(args))?;
        if out.trim().is_empty() {
            return Ok(Value::Array(vec![]));
        }
        serde_json::from_str(&out).with_context(|| format!("parsing ip -j {args:?}: {out}"))
    }

    /// Names of all links in the namespace.
    pub fn links(&self) -> Result<Vec<String>> {
        let v = self.ip_json(&["link", "show"])?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect())
    }

    /// Names of ferry's host-side veths (`fry` + 11 hex).
    pub fn ferry_links(&self) -> Result<Vec<String>> {
        Ok(self
            .links()?
            .into_iter()
            .filter(|n| ferry_proto::is_host_veth_name(n))
            .collect())
    }

    /// Waits (up to `timeout`) until no `fry*` link is left and returns
    /// what is left then: ipamd deletes host veths shortly after DEL.
    pub fn ferry_links_after_del(&self, timeout: std::time::Duration) -> Result<Vec<String>> {
        let every = std::time::Duration::from_millis(20);
        let outcome = look_every(timeout, every, || {
            let left = self.ferry_links()?;
            Ok(if left.is_empty() {
                Poll::Ready(left)
            } else {
                Poll::Pending(left)
            })
        })?;
        Ok(outcome.unwrap_or_else(|left| left))
    }

    /// Host routes (`/32`, main table) as `(destination, device)` pairs.
    pub fn host_routes(&self) -> Result<Vec<(String, String)>> {
        let v = self.ip_json(&["-4", "route", "show", "table", "main"])?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| {
                let dst = r["dst"].as_str()?;
                let is_host = dst.parse::<Ipv4Addr>().is_ok() || dst.ends_with("/32");
                is_host.then(|| {
                    (
                        dst.trim_end_matches("/32").to_string(),
                        r["dev"].as_str().unwrap_or("").to_string(),
                    )
                })
            })
            .collect())
    }

    /// The IPv4 addresses (without prefix length) on `dev`.
    pub fn ipv4_addrs(&self, dev: &str) -> Result<Vec<Ipv4Addr>> {
        let v = self.ip_json(&["-4", "addr", "show", "dev", dev])?;
        let mut out = vec![];
        for link in v.as_array().into_iter().flatten() {
            for a in link["addr_info"].as_array().into_iter().flatten() {
                if let Some(ip) = a["local"].as_str().and_then(|s| s.parse().ok()) {
                    out.push(ip);
                }
            }
        }
        Ok(out)
    }

    /// A plain HTTP/1.0 `GET <path>` to `host:port` from inside the namespace
    /// (bash's /dev/tcp, 3 s limit; Debian's static busybox wget crashes).
    /// Returns the whole response, headers included; an error if the
    /// connection fails or nothing comes back.
    pub fn http_get(&self, host: &str, port: u16, path: &str) -> Result<String> {
        let script = format!(
            "exec 3<>/dev/tcp/{host}/{port} && printf 'GET {path} HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n' >&3 && cat <&3"
        );
        let out = self.exec(&["timeout", "3", "bash", "-c", &script])?;
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() || body.is_empty() {
            bail!(
                "GET http://{host}:{port}{path} from {}: {} {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(body)
    }

    /// `ping -c1 -W2 <dst>` from inside the namespace, up to 3 attempts.
    pub fn ping(&self, dst: &str) -> bool {
        (0..3).any(|_| {
            self.exec(&["ping", "-n", "-c", "1", "-W", "2", dst])
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `cmd`, fails with its stderr on a non-zero exit, returns stdout.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The underlay: a namespace holding bridge `br0` (192.168.77.1/24, the
/// nodes' default gateway). Nodes get a veth to it and an address in
/// 192.168.77.0/24, which exists only inside our namespaces.
pub struct Fabric {
    /// The fabric's namespace (holds `br0` and the fabric ends of node veths).
    pub ns: Netns,
    next: AtomicU8,
}

/// The underlay subnet every [`Fabric`] uses (inside its own namespaces only).
pub const FABRIC_PREFIX: &str = "192.168.77";

impl Fabric {
    pub fn new() -> Result<Fabric> {
        let ns = Netns::new("fab")?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{FABRIC_PREFIX}.1/24"),
            "dev",
            "br0",
        ])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(Fabric {
            ns,
            next: AtomicU8::new(1),
        })
    }

    /// A new node: namespace `fy<pid>x<n>-node`, link `eth0` (MTU 1500) wired
    /// to `br0`, address `192.168.77.<10+i>/24`, default route via
    /// 192.168.77.1 (the fabric), lo up, a fresh temp dir.
    pub fn add_node(&self) -> Result<Node> {
        let idx = self.next.fetch_add(1, Ordering::Relaxed);
        if idx > 200 {
            bail!("too many nodes on one fabric");
        }
        let ns = Netns::new("node")?;
        let fab_end = format!("n{idx}");
        self.ns.ip(&[
            "link",
            "add",
            &fab_end,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        self.ns
            .ip(&["link", "set", &fab_end, "master", "br0", "up"])?;
        let ip: Ipv4Addr = format!("{FABRIC_PREFIX}.{}", 10 + idx as u32).parse()?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        // A real node has a default route; proxy ARP for the pods' gateway
        // (169.254.1.1) only answers when the node has a route to it.
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &format!("{FABRIC_PREFIX}.1"),
        ])?;
        let dir = tempfile::Builder::new()
            .prefix("ferry-e2e-")
            .tempdir()
            .context("creating the node's temp dir")?;
        Ok(Node {
            name: format!("node{idx}-{}", unique("")),
            ip,
            dir,
            ns,
        })
    }
}

/// A node: its own network namespace on the fabric, and a temp dir for
/// ipamd's socket, state and logs (removed on drop).
pub struct Node {
    /// The node name passed to ipamd (`--node-name`).
    pub name: String,
    /// The node's underlay address on `eth0`.
    pub ip: Ipv4Addr,
    /// The node's temp dir; [`Node::path`] joins under it.
    pub dir: tempfile::TempDir,
    /// The node's network namespace.
    pub ns: Netns,
}

impl Node {
    /// `<node temp dir>/<rel>`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

/// A pod sandbox: its network namespace, a container ID and an interface name.
pub struct Pod {
    pub ns: Netns,
    /// 64 hex characters, fresh per pod.
    pub container_id: String,
    /// `eth0` unless changed.
    pub ifname: String,
}

impl Pod {
    /// A new pod namespace `fy<pid>x<n>-pod` with a random container ID, ifname eth0.
    pub fn new() -> Result<Pod> {
        Ok(Pod {
            ns: Netns::new("pod")?,
            container_id: random_container_id(),
            ifname: "eth0".to_string(),
        })
    }

    /// CNI_NETNS for this pod: `/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        self.ns.path()
    }

    /// The IPv4 addresses on the pod's interface.
    pub fn addrs(&self) -> Result<Vec<Ipv4Addr>> {
        self.ns.ipv4_addrs(&self.ifname)
    }

    /// The name ferry gives the host side of this pod's veth.
    pub fn host_veth(&self) -> String {
        ferry_proto::host_veth_name(&self.container_id, &self.ifname)
    }
}
