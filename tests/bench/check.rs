//! Allocate latency while `ipamctl check` runs in a loop: the check used to
//! hold the allocator lock while it read the whole store, stalling every
//! Allocate.
//!
//! Three runs, each on a fresh node netns with a fresh ipamd and state dir
//! whose store already holds `prefill` allocations (so a check has real work
//! to do). In each, `clients` gRPC clients make `allocs` Allocates in total,
//! each client pausing `gap` after each call; meanwhile a thread execs
//! nothing, `ipamctl status` (the control: the same process churn on a
//! 2-core box, next to no work in ipamd), or `ipamctl check`, back to back
//! inside the node netns (as the harness runs ipamctl) until they are done.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_tests::{Fabric, Ipamd, IpamdConfig, Netns};
use serde::Serialize;

use crate::alloc::{Op, client, pass, pass_paced};
use crate::stats::Summary;

/// Key tags (`bench-c<tag>-<i>`): the prefill's and the measured run's keys
/// must not collide.
const PREFILL_TAG: usize = 9000;
const MEASURE_TAG: usize = 9001;
/// Connections used to prefill the store (not measured).
const PREFILL_CLIENTS: usize = 32;

#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub clients: usize,
    /// Allocates per run, in total over all clients.
    pub allocs: usize,
    /// Allocations made (and kept) before each run.
    pub prefill: usize,
    /// Pause of each client after each Allocate. Back to back (0), 250
    /// Allocates take a few tens of ms, less than one check.
    pub gap: Duration,
}

/// One run: with or without an ipamctl loop.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckRun {
    /// The ipamctl subcommand run in a loop during the Allocates, if any.
    pub loop_command: Option<String>,
    pub allocs: usize,
    pub errors: usize,
    pub wall_ms: f64,
    pub allocs_per_sec: f64,
    pub latency: Summary,
    /// One `ipamctl --json check` after the prefill, nothing else running:
    /// what a check costs on this store.
    pub solo_check_ms: f64,
    pub solo_check_findings: usize,
    /// Loop commands that completed while the Allocates ran.
    pub loop_completed: usize,
    /// Loop commands that failed (whole loop).
    pub loop_failed: usize,
    /// Share of the Allocate window (0-1) during which a loop ipamctl
    /// process was running (exec to exit).
    pub loop_busy_share: f64,
    /// Wall time of each successful loop command, exec to exit.
    pub loop_exec: Summary,
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckLoad {
    pub clients: usize,
    pub allocs_per_run: usize,
    pub prefill: usize,
    pub gap_ms: f64,
    pub without_check: CheckRun,
    /// Control: an `ipamctl status` loop.
    pub with_status: CheckRun,
    pub with_check: CheckRun,
    /// p99 with the check loop / p99 without a loop.
    pub p99_ratio: Option<f64>,
    /// p99 with the check loop / p99 with the status loop.
    pub p99_ratio_vs_status: Option<f64>,
}

impl CheckLoad {
    /// No loop, the status loop, the check loop: the order they print in.
    pub fn runs(&self) -> [&CheckRun; 3] {
        [&self.without_check, &self.with_status, &self.with_check]
    }
}

fn p99_ratio(a: &CheckRun, b: &CheckRun) -> Option<f64> {
    let (a, b) = (&a.latency, &b.latency);
    (a.count > 0 && b.count > 0 && b.p99_ms > 0.0).then(|| a.p99_ms / b.p99_ms)
}

/// The three runs, in this order.
pub fn run(
    fabric: &Fabric,
    ipamctl: &Path,
    rt: &tokio::runtime::Runtime,
    p: Params,
    stop: &'static AtomicBool,
) -> Result<CheckLoad> {
    let without_check = one_run(fabric, ipamctl, rt, p, None, stop)
        .context("Allocate run without an ipamctl loop")?;
    let with_status = one_run(fabric, ipamctl, rt, p, Some("status"), stop)
        .context("Allocate run with the ipamctl status loop")?;
    let with_check = one_run(fabric, ipamctl, rt, p, Some("check"), stop)
        .context("Allocate run with the ipamctl check loop")?;
    Ok(CheckLoad {
        clients: p.clients,
        allocs_per_run: p.allocs,
        prefill: p.prefill,
        gap_ms: p.gap.as_secs_f64() * 1e3,
        p99_ratio: p99_ratio(&with_check, &without_check),
        p99_ratio_vs_status: p99_ratio(&with_check, &with_status),
        without_check,
        with_status,
        with_check,
    })
}

fn one_run(
    fabric: &Fabric,
    ipamctl: &Path,
    rt: &tokio::runtime::Runtime,
    p: Params,
    loop_command: Option<&str>,
    stop: &'static AtomicBool,
) -> Result<CheckRun> {
    // A fresh node per run: every run starts from the same store.
    let node = fabric.add_node().context("creating a node netns")?;
    let mut ipamd = Ipamd::start(
        &node,
        IpamdConfig {
            pod_cidr: "10.96.0.0/12".into(),
            cooldown: None,
            log_level: Some("info".into()),
            ..IpamdConfig::default()
        },
    )
    .context("starting ipamd")?;
    let socket = ipamd.socket().to_path_buf();

    let what = loop_command.map_or("no ipamctl loop".into(), |c| format!("an ipamctl {c} loop"));
    eprintln!(
        "bench: prefilling ipamd with {} allocations (run with {what}) ...",
        p.prefill
    );
    rt.block_on(async {
        let mut conns = Vec::with_capacity(PREFILL_CLIENTS);
        for _ in 0..PREFILL_CLIENTS {
            conns.push(client(&socket).await?);
        }
        let pre = pass(&conns, PREFILL_TAG, p.prefill, Op::Allocate, stop).await?;
        if pre.errors > 0 {
            bail!(
                "prefill: {} of {} Allocates failed: {}",
                pre.errors,
                p.prefill,
                pre.first_error.unwrap_or_default()
            );
        }
        Ok(())
    })?;

    let (solo_check_ms, solo_check_findings) =
        solo_check(&node.ns, ipamctl, &socket).context("ipamctl check before the run")?;

    let conns = rt.block_on(async {
        let mut conns = Vec::with_capacity(p.clients);
        for _ in 0..p.clients {
            conns.push(client(&socket).await?);
        }
        anyhow::Ok(conns)
    })?;

    eprintln!(
        "bench: ipamd Allocate with {} clients, with {what} ...",
        p.clients
    );
    let measure = || -> Result<(crate::alloc::Pass, Instant, Instant)> {
        let t0 = Instant::now();
        let r = rt.block_on(pass_paced(
            &conns,
            MEASURE_TAG,
            p.allocs,
            Op::Allocate,
            p.gap,
            stop,
        ))?;
        Ok((r, t0, Instant::now()))
    };
    let (res, t0, t1, execs) = if let Some(cmd) = loop_command {
        let done = AtomicBool::new(false);
        std::thread::scope(|s| -> Result<_> {
            // Stops the loop on every way out, or the scope would wait for it forever.
            let _stop_loop = SetOnDrop(&done);
            let (tx, rx) = mpsc::channel();
            let (ns, socket, done) = (&node.ns, socket.as_path(), &done);
            s.spawn(move || run_loop(ns, ipamctl, socket, cmd, done, stop, tx));
            // Measure only once the loop demonstrably works.
            let first = rx
                .recv_timeout(Duration::from_secs(30))
                .with_context(|| format!("waiting for the first ipamctl {cmd} of the loop"))?;
            if let Some(e) = &first.error {
                bail!("{e}");
            }
            let (res, t0, t1) = measure()?;
            done.store(true, Ordering::SeqCst);
            // Disconnects once the loop has ended (its last exec included).
            let mut execs = vec![first];
            execs.extend(rx.iter());
            Ok((res, t0, t1, execs))
        })?
    } else {
        let (res, t0, t1) = measure()?;
        (res, t0, t1, Vec::new())
    };
    let _ = ipamd.terminate();

    let window = t1.duration_since(t0).as_secs_f64();
    let busy: f64 = execs
        .iter()
        .map(|c| {
            let (s, e) = (c.start.max(t0), c.end.min(t1));
            e.saturating_duration_since(s).as_secs_f64()
        })
        .sum();
    let ok: Vec<&ExecRec> = execs.iter().filter(|c| c.error.is_none()).collect();
    let exec_ms: Vec<f64> = ok
        .iter()
        .map(|c| c.end.duration_since(c.start).as_secs_f64() * 1e3)
        .collect();
    let n = res.latencies_ms.len();
    Ok(CheckRun {
        loop_command: loop_command.map(str::to_string),
        allocs: p.allocs,
        errors: res.errors,
        wall_ms: res.wall_ms,
        allocs_per_sec: n as f64 / (res.wall_ms / 1e3),
        latency: Summary::of(&res.latencies_ms),
        solo_check_ms,
        solo_check_findings,
        loop_completed: ok.iter().filter(|c| c.end >= t0 && c.end <= t1).count(),
        loop_failed: execs.len() - ok.len(),
        loop_busy_share: if window > 0.0 { busy / window } else { 0.0 },
        loop_exec: Summary::of(&exec_ms),
        first_error: res
            .first_error
            .or_else(|| execs.iter().find_map(|c| c.error.clone())),
    })
}

struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

struct ExecRec {
    start: Instant,
    end: Instant,
    error: Option<String>,
}

/// `ip netns exec <node> ipamctl --socket S <args>`, as the harness runs
/// ipamctl. Bounded by ipamctl's own 5 s deadline, so no kill is needed.
fn ipamctl_cmd(ns: &Netns, ipamctl: &Path, socket: &Path, args: &[&str]) -> Command {
    let mut c = ns.command(ipamctl);
    c.arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null());
    c
}

/// `ipamctl <cmd>` back to back until `done`, one record per exec.
fn run_loop(
    ns: &Netns,
    ipamctl: &Path,
    socket: &Path,
    cmd: &str,
    done: &AtomicBool,
    stop: &AtomicBool,
    tx: mpsc::Sender<ExecRec>,
) {
    while !done.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
        let start = Instant::now();
        // The output is not read: only the time and the outcome matter.
        let out = ipamctl_cmd(ns, ipamctl, socket, &[cmd])
            .stdout(Stdio::null())
            .output();
        let error = match out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!(
                "ipamctl {cmd}: {}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Some(format!("running ipamctl {cmd}: {e}")),
        };
        let rec = ExecRec {
            start,
            end: Instant::now(),
            error,
        };
        if tx.send(rec).is_err() {
            break;
        }
    }
}

/// One `ipamctl --json check`: its wall time (ms) and how many findings.
fn solo_check(ns: &Netns, ipamctl: &Path, socket: &Path) -> Result<(f64, usize)> {
    let t = Instant::now();
    let out = ipamctl_cmd(ns, ipamctl, socket, &["--json", "check"])
        .output()
        .context("running ipamctl check")?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!(
            "ipamctl check: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("ipamctl --json check printed non-JSON")?;
    Ok((ms, v.as_array().map_or(0, Vec::len)))
}
