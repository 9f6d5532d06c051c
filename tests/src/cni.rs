//! Invoking CNI plugins the way a container runtime does.

use std::collections::HashMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::netns::{Node, Pod};
use crate::util::{bin_dir, cni_plugin_dir};

/// The CNI_* environment of one plugin call. `None` leaves a variable unset.
#[derive(Clone, Debug)]
pub struct CniCall {
    /// CNI_COMMAND: ADD, DEL, CHECK, VERSION, STATUS, GC.
    pub command: Option<String>,
    pub container_id: Option<String>,
    /// CNI_NETNS (a path such as `/run/netns/<name>`).
    pub netns: Option<String>,
    pub ifname: Option<String>,
    /// CNI_ARGS, e.g. `IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p`.
    pub args: Option<String>,
    /// Further variables, set after the ones above (they may override them).
    pub extra_env: Vec<(String, String)>,
}

impl CniCall {
    /// `command` for `pod`: its container ID, netns path and ifname, with
    /// Kubernetes-style CNI_ARGS (namespace `default`, pod name = netns name).
    pub fn new(command: &str, pod: &Pod) -> CniCall {
        CniCall {
            command: Some(command.to_string()),
            container_id: Some(pod.container_id.clone()),
            netns: Some(pod.netns_path().display().to_string()),
            ifname: Some(pod.ifname.clone()),
            args: Some(k8s_args("default", pod.ns.name())),
            extra_env: vec![],
        }
    }

    pub fn add(pod: &Pod) -> CniCall {
        Self::new("ADD", pod)
    }

    /// ADD for `pod` as a pod of Kubernetes namespace `namespace` (K8S_POD_* in CNI_ARGS).
    pub fn add_in(pod: &Pod, namespace: &str) -> CniCall {
        CniCall::add(pod).with_args(&k8s_args(namespace, pod.ns.name()))
    }

    pub fn del(pod: &Pod) -> CniCall {
        Self::new("DEL", pod)
    }

    pub fn check(pod: &Pod) -> CniCall {
        Self::new("CHECK", pod)
    }

    /// A call with only CNI_COMMAND set (VERSION, STATUS, GC).
    pub fn bare(command: &str) -> CniCall {
        CniCall {
            command: Some(command.to_string()),
            container_id: None,
            netns: None,
            ifname: None,
            args: None,
            extra_env: vec![],
        }
    }

    /// The same call with another CNI_COMMAND.
    pub fn with_command(mut self, command: &str) -> CniCall {
        self.command = Some(command.to_string());
        self
    }

    /// The same call with CNI_NETNS replaced (or unset with `None`).
    pub fn with_netns(mut self, netns: Option<&str>) -> CniCall {
        self.netns = netns.map(str::to_string);
        self
    }

    /// The same call with CNI_ARGS replaced.
    pub fn with_args(mut self, args: &str) -> CniCall {
        self.args = Some(args.to_string());
        self
    }

    /// The same call with one CNI_* variable left unset, by its name
    /// (`CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS`).
    pub fn without(mut self, var: &str) -> CniCall {
        match var {
            "CNI_COMMAND" => self.command = None,
            "CNI_CONTAINERID" => self.container_id = None,
            "CNI_NETNS" => self.netns = None,
            "CNI_IFNAME" => self.ifname = None,
            "CNI_ARGS" => self.args = None,
            other => panic!("unknown CNI variable {other}"),
        }
        self
    }
}

/// CNI_ARGS the way containerd's CRI plugin sets them for a pod.
pub fn k8s_args(namespace: &str, pod_name: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod_name};\
         K8S_POD_INFRA_CONTAINER_ID=sandbox;K8S_POD_UID=uid-{pod_name}"
    )
}

/// What a plugin call returned.
#[derive(Clone, Debug)]
pub struct CniOutput {
    /// The exit code (-1 when killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// stdout parsed as JSON, when it is JSON.
    pub json: Option<Value>,
    pub elapsed: Duration,
}

impl CniOutput {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// The `ips[].address` of a result, without prefix length.
    pub fn ips(&self) -> Vec<Ipv4Addr> {
        result_ips(self.json.as_ref().unwrap_or(&Value::Null))
    }

    /// The CNI error `code` on stdout, if stdout is an error object.
    pub fn error_code(&self) -> Option<u64> {
        self.json.as_ref()?.get("code")?.as_u64()
    }

    /// The CNI error `msg` on stdout ("" if none).
    pub fn msg(&self) -> &str {
        self.json
            .as_ref()
            .and_then(|j| j.get("msg"))
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

impl std::fmt::Display for CniOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {} after {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.code,
            self.elapsed,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// The `ips[].address` values of a CNI result (any version), without prefix.
pub fn result_ips(result: &Value) -> Vec<Ipv4Addr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

/// Runs CNI plugin binaries inside one node's namespace.
///
/// CNI_PATH is `<bin_dir>:<cni_plugin_dir>` so both `ferry` and the reference
/// plugins (portmap, ...) are found, as in a runtime's plugin dirs.
#[derive(Clone, Debug)]
pub struct Cni {
    netns: String,
    cni_path: Vec<PathBuf>,
    timeout: Duration,
}

impl Cni {
    pub fn new(node: &Node) -> Cni {
        Self::in_netns(node.ns.name())
    }

    /// A runner for the namespace called `netns`.
    pub fn in_netns(netns: &str) -> Cni {
        Cni {
            netns: netns.to_string(),
            cni_path: vec![bin_dir(), cni_plugin_dir()],
            timeout: Duration::from_secs(60),
        }
    }

    /// The same runner with another plugin search path.
    pub fn with_cni_path(mut self, dirs: Vec<PathBuf>) -> Cni {
        self.cni_path = dirs;
        self
    }

    /// Kill a plugin that runs longer than this (default 60 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Cni {
        self.timeout = timeout;
        self
    }

    /// Where `plugin` is found in CNI_PATH.
    pub fn find_plugin(&self, plugin: &str) -> Result<PathBuf> {
        self.cni_path
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.is_file())
            .with_context(|| format!("plugin {plugin} not found in {:?}", self.cni_path))
    }

    /// Runs `plugin` (found in CNI_PATH) in the node netns with `call`'s
    /// environment and `stdin` as its standard input.
    pub fn exec(&self, plugin: &str, call: &CniCall, stdin: &[u8]) -> Result<CniOutput> {
        let path = self.find_plugin(plugin)?;
        self.exec_path(&path, call, stdin)
    }

    /// Like [`Cni::exec`], for a plugin given by path.
    pub fn exec_path(&self, plugin: &Path, call: &CniCall, stdin: &[u8]) -> Result<CniOutput> {
        let cni_path = std::env::join_paths(&self.cni_path)?;
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(plugin)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .env("CNI_PATH", cni_path);
        let vars = [
            ("CNI_COMMAND", &call.command),
            ("CNI_CONTAINERID", &call.container_id),
            ("CNI_NETNS", &call.netns),
            ("CNI_IFNAME", &call.ifname),
            ("CNI_ARGS", &call.args),
        ];
        for (k, v) in vars {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        for (k, v) in &call.extra_env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", plugin.display()))?;
        {
            let mut sin = child.stdin.take().context("stdin")?;
            // A plugin that exits before reading all of stdin is not our error.
            let _ = sin.write_all(stdin);
        }
        // Read output on helper threads so a hung plugin can be killed.
        let mut so = child.stdout.take().context("stdout")?;
        let mut se = child.stderr.take().context("stderr")?;
        let t_out = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = std::io::Read::read_to_end(&mut so, &mut s);
            s
        });
        let t_err = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = std::io::Read::read_to_end(&mut se, &mut s);
            s
        });
        let status = match crate::util::wait_timeout(&mut child, self.timeout) {
            Some(st) => st,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} {:?} did not finish within {:?}; killed it",
                    plugin.display(),
                    call.command,
                    self.timeout
                );
            }
        };
        let elapsed = start.elapsed();
        let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
        let json = serde_json::from_str(stdout.trim()).ok();
        Ok(CniOutput {
            code: status.code().unwrap_or(-1),
            stdout,
            stderr,
            json,
            elapsed,
        })
    }

    /// Runs the `ferry` plugin with `netconf` (one network config, not a list) on stdin.
    pub fn ferry(&self, call: &CniCall, netconf: &Value) -> Result<CniOutput> {
        self.exec("ferry", call, netconf.to_string().as_bytes())
    }
}

/// ferry's plugin entry for a conflist, talking to `socket`; logs to stderr
/// only (`logFile` ""), level debug, MTU auto.
pub fn ferry_plugin_conf(socket: &Path) -> Value {
    json!({
        "type": "ferry",
        "ipamd": {"socket": socket.display().to_string(), "timeoutMs": 5000},
        "mtu": 0,
        "logFile": "",
        "logLevel": "debug"
    })
}

/// A single-plugin network config for ferry (what a runtime puts on stdin):
/// [`ferry_plugin_conf`] plus `name` "ferry-e2e" and `cniVersion`.
pub fn ferry_netconf(socket: &Path, cni_version: &str) -> Value {
    let mut v = ferry_plugin_conf(socket);
    v["name"] = json!("ferry-e2e");
    v["cniVersion"] = json!(cni_version);
    v
}

/// A conflist: `{"cniVersion", "name", "plugins": [...]}`.
pub fn conflist(cni_version: &str, name: &str, plugins: Vec<Value>) -> Value {
    json!({"cniVersion": cni_version, "name": name, "plugins": plugins})
}

/// Runs whole conflists the way libcni does, and caches ADD results like a
/// runtime, keyed by (container ID, ifname):
///
/// * ADD: plugins in order; each gets `name` and `cniVersion` from the list,
///   the previous plugin's result as `prevResult`, and `runtimeConfig` holding
///   the keys of the caller's runtime config that it declares in
///   `capabilities`. Stops at the first failure. The last result is cached.
/// * CHECK: plugins in order, each with the cached result as `prevResult`.
/// * DEL: plugins in reverse order, each with the cached result as
///   `prevResult` (none if there is no cached result). The cache entry is
///   dropped once every plugin succeeded.
pub struct Runtime {
    pub cni: Cni,
    cache: Mutex<HashMap<(String, String), Value>>,
}

impl Runtime {
    pub fn new(cni: Cni) -> Runtime {
        Runtime {
            cni,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn key(call: &CniCall) -> (String, String) {
        (
            call.container_id.clone().unwrap_or_default(),
            call.ifname.clone().unwrap_or_default(),
        )
    }

    /// The cached ADD result for this call's container and ifname.
    pub fn cached_result(&self, call: &CniCall) -> Option<Value> {
        self.cache.lock().unwrap().get(&Self::key(call)).cloned()
    }

    /// The stdin one plugin of `list` gets (see the type's docs).
    pub fn plugin_netconf(
        list: &Value,
        index: usize,
        prev_result: Option<&Value>,
        runtime_config: &Value,
    ) -> Result<Value> {
        let plugins = list["plugins"]
            .as_array()
            .context("conflist has no plugins")?;
        let mut conf = plugins.get(index).context("no such plugin")?.clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        if let Some(prev) = prev_result {
            conf["prevResult"] = prev.clone();
        }
        let mut rc = serde_json::Map::new();
        if let Some(caps) = conf.get("capabilities").and_then(Value::as_object) {
            for (cap, on) in caps {
                if on.as_bool() == Some(true)
                    && let Some(v) = runtime_config.get(cap)
                {
                    rc.insert(cap.clone(), v.clone());
                }
            }
        }
        if !rc.is_empty() {
            conf["runtimeConfig"] = Value::Object(rc);
        }
        Ok(conf)
    }

    fn plugin_types(list: &Value) -> Result<Vec<String>> {
        list["plugins"]
            .as_array()
            .context("conflist has no plugins")?
            .iter()
            .map(|p| {
                p["type"]
                    .as_str()
                    .map(str::to_string)
                    .context("plugin without type")
            })
            .collect()
    }

    /// ADD through the chain. Returns the failing plugin's output or the last one's.
    pub fn add(&self, list: &Value, call: &CniCall, runtime_config: &Value) -> Result<CniOutput> {
        let call = call.clone().with_command("ADD");
        let mut prev: Option<Value> = None;
        let mut last = None;
        for (i, ty) in Self::plugin_types(list)?.iter().enumerate() {
            let conf = Self::plugin_netconf(list, i, prev.as_ref(), runtime_config)?;
            let out = self.cni.exec(ty, &call, conf.to_string().as_bytes())?;
            if !out.success() {
                return Ok(out);
            }
            prev = Some(
                out.json
                    .clone()
                    .with_context(|| format!("{ty} ADD printed no JSON result: {out}"))?,
            );
            last = Some(out);
        }
        let out = last.context("empty conflist")?;
        if let Some(res) = prev {
            self.cache.lock().unwrap().insert(Self::key(&call), res);
        }
        Ok(out)
    }

    /// ADD that must succeed with exactly one address, which it returns.
    pub fn add_one(
        &self,
        list: &Value,
        call: &CniCall,
        runtime_config: &Value,
    ) -> Result<Ipv4Addr> {
        let out = self.add(list, call, runtime_config)?;
        ensure!(out.success(), "ADD failed: {out}");
        match out.ips()[..] {
            [ip] => Ok(ip),
            _ => bail!("expected one address: {out}"),
        }
    }

    /// [`Runtime::add_one`] of `pod`, without runtime config.
    pub fn add_pod(&self, list: &Value, pod: &Pod) -> Result<Ipv4Addr> {
        self.add_one(list, &CniCall::add(pod), &json!({}))
    }

    /// STATUS of the conflist's first plugin (CNI 1.1.0 sends STATUS to the
    /// first plugin only).
    pub fn status(&self, list: &Value) -> Result<CniOutput> {
        let types = Self::plugin_types(list)?;
        let first = types.first().context("empty conflist")?;
        let conf = Self::plugin_netconf(list, 0, None, &json!({}))?;
        self.cni
            .exec(first, &CniCall::bare("STATUS"), conf.to_string().as_bytes())
    }

    /// CHECK through the chain with the cached result. Like libcni, refuses
    /// (an `Err`) for a cniVersion before 0.4.0, which has no CHECK.
    pub fn check(&self, list: &Value, call: &CniCall, runtime_config: &Value) -> Result<CniOutput> {
        let steps = self.check_steps(list, call, runtime_config)?;
        let failed = steps.iter().position(|(_, o)| !o.success());
        let (_, out) = match failed {
            Some(i) => steps.into_iter().nth(i),
            None => steps.into_iter().last(),
        }
        .context("empty conflist")?;
        Ok(out)
    }

    /// CHECK every plugin of the chain (in order, each with the cached result
    /// as prevResult) without stopping at a failure; returns `(type, output)`
    /// per plugin, so a test can tell whose CHECK failed.
    pub fn check_steps(
        &self,
        list: &Value,
        call: &CniCall,
        runtime_config: &Value,
    ) -> Result<Vec<(String, CniOutput)>> {
        if !version_at_least(list, (0, 4, 0)) {
            bail!("CHECK needs cniVersion 0.4.0 or later");
        }
        let call = call.clone().with_command("CHECK");
        let cached = self
            .cached_result(&call)
            .context("CHECK without a cached ADD result")?;
        let mut steps = vec![];
        for (i, ty) in Self::plugin_types(list)?.iter().enumerate() {
            let conf = Self::plugin_netconf(list, i, Some(&cached), runtime_config)?;
            let out = self.cni.exec(ty, &call, conf.to_string().as_bytes())?;
            steps.push((ty.clone(), out));
        }
        Ok(steps)
    }

    /// DEL through the chain in reverse, with the cached result if any
    /// (like libcni, only for cniVersion 0.4.0 and later).
    pub fn del(&self, list: &Value, call: &CniCall, runtime_config: &Value) -> Result<CniOutput> {
        let call = call.clone().with_command("DEL");
        let cached = if version_at_least(list, (0, 4, 0)) {
            self.cached_result(&call)
        } else {
            None
        };
        let mut last = None;
        let types = Self::plugin_types(list)?;
        for (i, ty) in types.iter().enumerate().rev() {
            let conf = Self::plugin_netconf(list, i, cached.as_ref(), runtime_config)?;
            let out = self.cni.exec(ty, &call, conf.to_string().as_bytes())?;
            if !out.success() {
                return Ok(out);
            }
            last = Some(out);
        }
        self.cache.lock().unwrap().remove(&Self::key(&call));
        last.context("empty conflist")
    }
}

/// True when the config's `cniVersion` is at least `min` (major, minor, patch).
pub fn version_at_least(conf: &Value, min: (u32, u32, u32)) -> bool {
    let v = conf["cniVersion"].as_str().unwrap_or("0.0.0");
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let got = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    got >= min
}
