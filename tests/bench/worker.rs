//! The half of the bench that runs *inside* the node netns.
//!
//! The orchestrator re-executes this binary once with `ip netns exec <node>`
//! (so `ip netns exec` is paid once, not per call), handing it a [`Spec`]
//! file. From here every CNI plugin is spawned directly, the way a container
//! runtime on that node would: CNI_* environment, network config on stdin,
//! the wall time of the exec measured from just before spawn to just after
//! the exit is reaped. Pod netns exist beforehand and are not timed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::stats::Summary;

/// One CNI plugin configuration to measure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginSpec {
    /// Short label for the report ("ferry", "ptp+host-local", ...).
    pub label: String,
    /// The plugin executable.
    pub binary: PathBuf,
    /// The network configuration (cniVersion, name, type, ...), without prevResult.
    pub conf: Value,
}

/// Everything the worker needs, written by the orchestrator as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub plugins: Vec<PluginSpec>,
    /// Pod netns paths (/run/netns/...), at least max(pods, burst) of them.
    pub netns: Vec<PathBuf>,
    pub pods: usize,
    pub burst: usize,
    /// CNI_PATH given to every plugin (host-local is found there).
    pub cni_path: String,
    /// Pause between plugins so deferred kernel work (veth teardown) settles.
    pub settle_ms: u64,
    /// The sequential run is split into this many rounds (plugin order rotates).
    pub rounds: usize,
    /// VERSION execs per plugin: the cost of just starting the process.
    pub version_calls: usize,
    /// ferry pods held at once while ipamd's RSS is read.
    pub hold: usize,
    pub ipamd_pid: Option<u32>,
}

/// ipamd with `pods` ferry pods networked at once.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Hold {
    pub pods: usize,
    pub failures: usize,
    /// VmRSS while they were all up.
    pub ipamd_rss_kib: Option<u64>,
}

/// What happened to one plugin.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PluginResult {
    pub label: String,
    /// VERSION: process start and exit only, the floor under every verb.
    pub version: Summary,
    pub add: Summary,
    pub del: Summary,
    /// From the last DEL of a round returning until no host veth is left:
    /// ferry deletes them in the background, the reference plugins inline.
    pub del_settle: Summary,
    pub add_failures: usize,
    pub del_failures: usize,
    pub burst_add_wall_ms: f64,
    pub burst_add: Summary,
    pub burst_add_failures: usize,
    pub burst_del_wall_ms: f64,
    pub burst_del: Summary,
    pub burst_del_failures: usize,
    /// The first few failure messages, for the report.
    pub errors: Vec<String>,
}

/// The worker's answer, written as JSON to the file the orchestrator names.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Output {
    pub plugins: Vec<PluginResult>,
    pub hold: Option<Hold>,
}

/// Set by SIGTERM (the orchestrator asks us to stop); checked between calls.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn stopping() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Entry point of `bench --worker-spec SPEC --worker-out OUT`.
pub fn run(spec_path: &Path, out_path: &Path) -> Result<()> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let spec: Spec = serde_json::from_slice(
        &std::fs::read(spec_path).with_context(|| format!("reading {}", spec_path.display()))?,
    )
    .context("decoding the worker spec")?;
    if spec.netns.len() < spec.pods.max(spec.burst).max(spec.hold) {
        bail!("worker spec has too few pod netns");
    }
    let plugins = measure_all(&spec)?;
    let hold = match spec.plugins.first() {
        Some(ferry) if spec.hold > 0 => Some(hold(&spec, ferry)?),
        _ => None,
    };
    let out = Output { plugins, hold };
    std::fs::write(out_path, serde_json::to_vec(&out)?)
        .with_context(|| format!("writing {}", out_path.display()))?;
    Ok(())
}

/// A short tag from a label, for pod names.
fn tag(label: &str) -> String {
    label
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect()
}

fn measure_all(spec: &Spec) -> Result<Vec<PluginResult>> {
    let n = spec.plugins.len();
    let mut results: Vec<PluginResult> = spec
        .plugins
        .iter()
        .map(|p| PluginResult {
            label: p.label.clone(),
            ..Default::default()
        })
        .collect();

    // Warm-up: the first execs of a binary pay page-cache misses and, for
    // ferry, the first block claim. Not counted, but they must work.
    for plugin in &spec.plugins {
        for w in 0..3 {
            stopping()?;
            let mut a = attachment(spec, 0, &format!("warm{w}-{}", tag(&plugin.label)));
            let add = exec(spec, plugin, "ADD", &a)?;
            if !add.ok {
                bail!(
                    "warm-up ADD failed: {}",
                    add.error_text("ADD", &plugin.label)
                );
            }
            a.prev_result = serde_json::from_slice(&add.stdout).ok();
            let del = exec(spec, plugin, "DEL", &a)?;
            if !del.ok {
                bail!(
                    "warm-up DEL failed: {}",
                    del.error_text("DEL", &plugin.label)
                );
            }
        }
        // The plugins share the pod netns: the next one needs eth0 free.
        host_veths_gone()?;
    }

    // The floor: VERSION does no work, so its exec time is the process cost.
    let mut version_ms = vec![Vec::new(); n];
    for _ in 0..spec.version_calls {
        for (i, plugin) in spec.plugins.iter().enumerate() {
            let a = attachment(spec, 0, "version");
            version_ms[i].push(exec(spec, plugin, "VERSION", &a)?.elapsed_ms);
        }
    }

    // Sequential, in rounds: each round every plugin ADDs its share of the
    // pods one exec at a time, then DELs them, the plugin order rotating from
    // round to round so that a noisy neighbour hurts every plugin alike.
    let rounds = spec.rounds.clamp(1, spec.pods.max(1));
    let mut add_ms = vec![Vec::with_capacity(spec.pods); n];
    let mut del_ms = vec![Vec::with_capacity(spec.pods); n];
    let mut settle_ms = vec![Vec::with_capacity(rounds); n];
    for round in 0..rounds {
        let first = spec.pods * round / rounds;
        let last = spec.pods * (round + 1) / rounds;
        for k in 0..n {
            let i = (round + k) % n;
            let plugin = &spec.plugins[i];
            let res = &mut results[i];
            eprintln!(
                "bench: round {}/{rounds}: {} sequential ADD+DEL of pods {first}..{last}",
                round + 1,
                plugin.label
            );
            let mut pods: Vec<Attachment> = (first..last)
                .map(|p| attachment(spec, p, &format!("seq-{}", tag(&plugin.label))))
                .collect();
            for a in &mut pods {
                stopping()?;
                let call = exec(spec, plugin, "ADD", a)?;
                add_ms[i].push(call.elapsed_ms);
                record(
                    &mut res.errors,
                    &mut res.add_failures,
                    &call,
                    "ADD",
                    &plugin.label,
                );
                a.prev_result = serde_json::from_slice(&call.stdout).ok();
            }
            for a in &pods {
                stopping()?;
                let call = exec(spec, plugin, "DEL", a)?;
                del_ms[i].push(call.elapsed_ms);
                record(
                    &mut res.errors,
                    &mut res.del_failures,
                    &call,
                    "DEL",
                    &plugin.label,
                );
            }
            settle_ms[i].push(host_veths_gone()?);
            std::thread::sleep(Duration::from_millis(spec.settle_ms / 4));
        }
    }

    // Burst: every ADD at once, then every DEL at once, one plugin at a time.
    for (i, plugin) in spec.plugins.iter().enumerate() {
        std::thread::sleep(Duration::from_millis(spec.settle_ms));
        stopping()?;
        eprintln!(
            "bench: {}: burst of {} ADDs, then DELs",
            plugin.label, spec.burst
        );
        burst(spec, plugin, &mut results[i])?;
    }

    for (i, res) in results.iter_mut().enumerate() {
        res.version = Summary::of(&version_ms[i]);
        res.add = Summary::of(&add_ms[i]);
        res.del = Summary::of(&del_ms[i]);
        res.del_settle = Summary::of(&settle_ms[i]);
    }
    Ok(results)
}

/// Milliseconds until this netns has no host veth of any plugin left
/// (ferry's `fry*`, the reference plugins' `veth*`), polled every 0.5 ms.
fn host_veths_gone() -> Result<f64> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    loop {
        let left = std::fs::read_dir("/sys/class/net")?
            .filter_map(|e| e.ok())
            .any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with(ferry_proto::HOST_VETH_PREFIX) || name.starts_with("veth")
            });
        if !left {
            return Ok(started.elapsed().as_secs_f64() * 1000.0);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("host veths still present 30 s after the DELs");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Networks `spec.hold` pods with ferry (50 at a time), reads ipamd's RSS
/// while they are all up, then deletes them.
fn hold(spec: &Spec, ferry: &PluginSpec) -> Result<Hold> {
    eprintln!("bench: {}: holding {} pods", ferry.label, spec.hold);
    let mut pods: Vec<Attachment> = (0..spec.hold)
        .map(|i| attachment(spec, i, "hold"))
        .collect();
    let mut failures = 0;
    for chunk in pods.chunks_mut(50) {
        stopping()?;
        let (_, calls) = concurrently(spec, ferry, "ADD", chunk)?;
        for (a, call) in chunk.iter_mut().zip(&calls) {
            failures += usize::from(!call.ok);
            a.prev_result = serde_json::from_slice(&call.stdout).ok();
        }
    }
    let ipamd_rss_kib = spec.ipamd_pid.and_then(|p| crate::rss_kib(p, "VmRSS:"));
    for chunk in pods.chunks(50) {
        concurrently(spec, ferry, "DEL", chunk)?;
    }
    host_veths_gone()?;
    Ok(Hold {
        pods: spec.hold,
        failures,
        ipamd_rss_kib,
    })
}

fn burst(spec: &Spec, plugin: &PluginSpec, res: &mut PluginResult) -> Result<()> {
    let mut pods: Vec<Attachment> = (0..spec.burst)
        .map(|i| attachment(spec, i, &format!("burst-{}", tag(&plugin.label))))
        .collect();
    let (wall, calls) = concurrently(spec, plugin, "ADD", &pods)?;
    res.burst_add_wall_ms = wall;
    res.burst_add = Summary::of(&calls.iter().map(|c| c.elapsed_ms).collect::<Vec<_>>());
    for (a, call) in pods.iter_mut().zip(&calls) {
        record(
            &mut res.errors,
            &mut res.burst_add_failures,
            call,
            "burst ADD",
            &plugin.label,
        );
        a.prev_result = serde_json::from_slice(&call.stdout).ok();
    }
    // Always DEL, even after an interrupt request: the pods must be clean.
    let (wall, calls) = concurrently(spec, plugin, "DEL", &pods)?;
    res.burst_del_wall_ms = wall;
    res.burst_del = Summary::of(&calls.iter().map(|c| c.elapsed_ms).collect::<Vec<_>>());
    for call in &calls {
        record(
            &mut res.errors,
            &mut res.burst_del_failures,
            call,
            "burst DEL",
            &plugin.label,
        );
    }
    // The next plugin's pods reuse these netns.
    host_veths_gone()?;
    Ok(())
}

/// One attachment: the pod netns, the container ID, and (after ADD) the result.
struct Attachment {
    netns: PathBuf,
    container_id: String,
    pod_name: String,
    prev_result: Option<Value>,
}

/// The outcome of one exec.
struct Call {
    elapsed_ms: f64,
    ok: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Call {
    fn error_text(&self, what: &str, label: &str) -> String {
        let out = String::from_utf8_lossy(&self.stdout);
        let err = String::from_utf8_lossy(&self.stderr);
        let mut s = format!("{label} {what}: {} {}", out.trim(), err.trim());
        s.truncate(400);
        s
    }
}

fn record(errors: &mut Vec<String>, failures: &mut usize, call: &Call, what: &str, label: &str) {
    if !call.ok {
        *failures += 1;
        if errors.len() < 5 {
            errors.push(call.error_text(what, label));
        }
    }
}

fn attachment(spec: &Spec, i: usize, phase: &str) -> Attachment {
    let container_id: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    Attachment {
        netns: spec.netns[i].clone(),
        container_id,
        pod_name: format!("{phase}-{i}"),
        prev_result: None,
    }
}

/// Runs `command` for every attachment at the same moment, one thread each.
/// Returns the wall time from the start signal to the last exit, and each call.
fn concurrently(
    spec: &Spec,
    plugin: &PluginSpec,
    command: &str,
    attachments: &[Attachment],
) -> Result<(f64, Vec<Call>)> {
    let barrier = Arc::new(Barrier::new(attachments.len() + 1));
    let (wall, calls) = std::thread::scope(|s| {
        let handles: Vec<_> = attachments
            .iter()
            .map(|a| {
                let barrier = barrier.clone();
                s.spawn(move || {
                    barrier.wait();
                    exec(spec, plugin, command, a)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let calls: Vec<Result<Call>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("thread panicked")))
            })
            .collect();
        (start.elapsed().as_secs_f64() * 1e3, calls)
    });
    Ok((wall, calls.into_iter().collect::<Result<Vec<_>>>()?))
}

/// Execs the plugin once, exactly as a runtime would, and times it.
fn exec(spec: &Spec, plugin: &PluginSpec, command: &str, a: &Attachment) -> Result<Call> {
    let mut conf = plugin.conf.clone();
    // libcni hands the cached ADD result to DEL as prevResult.
    if let (true, Some(obj), Some(prev)) = (command == "DEL", conf.as_object_mut(), &a.prev_result)
        && prev.get("code").is_none()
    {
        obj.insert("prevResult".into(), prev.clone());
    }
    let stdin = serde_json::to_vec(&conf)?;
    let cni_args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        a.pod_name,
        a.container_id,
        &a.container_id[..32]
    );
    let mut cmd = Command::new(&plugin.binary);
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &a.container_id)
        .env("CNI_NETNS", &a.netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", cni_args)
        .env("CNI_PATH", &spec.cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {}", plugin.binary.display()))?;
    if let Some(mut input) = child.stdin.take() {
        // A plugin that exits without reading stdin is its own failure, seen below.
        let _ = input.write_all(&stdin);
    }
    let output = child.wait_with_output()?;
    let elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(Call {
        elapsed_ms,
        ok: output.status.success(),
        stdout: output.stdout,
        stderr: output.stderr,
    })
}
