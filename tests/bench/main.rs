//! `bench`: ferry against ptp+host-local and bridge+host-local, in one run,
//! in network namespaces it creates and removes again.
//!
//! ```text
//! sudo cargo run --release -p ferry-tests --bin bench -- [--pods 200] [--burst 100] [--allocs 5000] [--json]
//! sudo cargo run --release -p ferry-tests --bin bench -- --only check [--check-clients 8] [--check-allocs 250] [--check-prefill 5000] [--check-gap-ms 20]
//! sudo cargo run --release -p ferry-tests --bin bench -- --only dataplane [--dataplane-runs 50]
//! ```
//!
//! The world: a fabric netns, a node netns wired to it (the harness's
//! [`Fabric`] and [`Node`]), one netns per pod, ipamd inside the node netns.
//! The CNI calls are made by a worker: this same binary, re-executed once
//! inside the node netns, which then spawns every plugin directly (no
//! `ip netns exec` per call) and times each exec. Nothing is created in the
//! root netns; only processes we started are signalled, by PID.
//!
//! The exit status is 0 whenever the bench ran, even when a target is missed;
//! non-zero only when it could not run.

mod alloc;
mod check;
mod dataplane;
mod report;
mod stats;
mod worker;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use ferry_tests::{
    ChildGuard, Fabric, Ipamd, IpamdConfig, Netns, cni_plugin_dir, ferry_netconf, is_root,
};
use serde_json::json;

use crate::report::{CheckOnlyReport, DataplaneOnlyReport, Report};
use crate::worker::{PluginSpec, Spec};

/// Benchmark ferry's CNI plugin and ipamd against the reference plugins.
#[derive(Parser, Debug, Clone)]
#[command(name = "bench", version)]
struct Args {
    /// Pods for the sequential ADD/DEL latency run (per plugin).
    #[arg(long, default_value_t = 200)]
    pods: usize,
    /// Concurrent ADDs in the burst (per plugin).
    #[arg(long, default_value_t = 100)]
    burst: usize,
    /// ferry pods held networked at once while ipamd's RSS is read.
    #[arg(long, default_value_t = 250)]
    hold: usize,
    /// Allocate calls per concurrency level (1, 8 and 32 clients).
    #[arg(long, default_value_t = 5000)]
    allocs: usize,
    /// The sequential run is split into this many rounds, the plugin order
    /// rotating each round, so background noise is shared fairly.
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Run only this scenario (`check`: Allocate with and without an
    /// `ipamctl check` loop; `dataplane`: the plugin's pod wiring alone;
    /// neither needs the reference plugins).
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// Check-loop scenario: concurrent Allocate clients.
    #[arg(long, default_value_t = 8)]
    check_clients: usize,
    /// Check-loop scenario: Allocates per run, in total over all clients.
    #[arg(long, default_value_t = 250)]
    check_allocs: usize,
    /// Check-loop scenario: allocations the store holds before each run, so
    /// that a check has a real store to read.
    #[arg(long, default_value_t = 5000)]
    check_prefill: usize,
    /// Check-loop scenario: each client's pause after each Allocate, in ms,
    /// so that the run spans several checks (0: back to back).
    #[arg(long, default_value_t = 20)]
    check_gap_ms: u64,
    /// Dataplane scenario: setups (each followed by its teardown) timed.
    #[arg(long, default_value_t = 50)]
    dataplane_runs: usize,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Internal: run as the worker inside the node netns with this spec file.
    #[arg(long, hide = true, requires = "worker_out")]
    worker_spec: Option<PathBuf>,
    /// Internal: where the worker writes its results.
    #[arg(long, hide = true)]
    worker_out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Only {
    /// Allocate latency with and without `ipamctl check` running in a loop.
    Check,
    /// One pod's setup and teardown in the plugin's dataplane code, with no
    /// plugin process and no ipamd.
    Dataplane,
}

/// Set by SIGINT/SIGTERM; every step checks it and unwinds through the guards.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let (Some(spec), Some(out)) = (&args.worker_spec, &args.worker_out) {
        return match worker::run(spec, out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench worker: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        let h = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, h);
        libc::signal(libc::SIGTERM, h);
    }
    match args.only {
        Some(Only::Check) => finish(run_check_only(&args), args.json, CheckOnlyReport::print),
        Some(Only::Dataplane) => finish(
            run_dataplane_only(&args),
            args.json,
            DataplaneOnlyReport::print,
        ),
        None => finish(run(&args), args.json, Report::print),
    }
}

fn finish<T: serde::Serialize>(report: Result<T>, json: bool, print: fn(&T)) -> ExitCode {
    match report {
        Ok(report) => print_report(&report, json, print),
        Err(e) => {
            eprintln!("bench: could not run: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where ferry's binaries are: `$FERRY_BIN_DIR`, else `<workspace>/target/release`.
fn ferry_bin_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("FERRY_BIN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => ferry_tests::workspace_root().join("target").join("release"),
    };
    for name in ["ferry", "ipamd", "ipamctl"] {
        if !dir.join(name).is_file() {
            bail!(
                "{} is missing: run `cargo build --release -p ferry -p ferry-ipamd -p ferry-ipamctl` first (or set FERRY_BIN_DIR)",
                dir.join(name).display()
            );
        }
    }
    Ok(dir)
}

fn print_report<T: serde::Serialize>(report: &T, json: bool, print: fn(&T)) -> ExitCode {
    if json {
        match serde_json::to_string_pretty(report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print(report);
    }
    ExitCode::SUCCESS
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn check_params(args: &Args) -> Result<check::Params> {
    if args.check_clients == 0 || args.check_allocs == 0 {
        bail!("--check-clients and --check-allocs must be at least 1");
    }
    // Both fit in ipamd's 10.96.0.0/12 with room to spare.
    if args.check_prefill + args.check_allocs > 500_000 {
        bail!("--check-prefill + --check-allocs must be at most 500000");
    }
    Ok(check::Params {
        clients: args.check_clients,
        allocs: args.check_allocs,
        prefill: args.check_prefill,
        gap: Duration::from_millis(args.check_gap_ms),
    })
}

fn need_root() -> Result<()> {
    if !is_root() {
        bail!("the bench needs root: it creates network namespaces");
    }
    Ok(())
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// `--only check`: a fabric and one fresh node per run, nothing else.
fn run_check_only(args: &Args) -> Result<CheckOnlyReport> {
    need_root()?;
    let params = check_params(args)?;
    let bin_dir = ferry_bin_dir()?;
    let started = Instant::now();
    let load_average_start = load_average();
    let fabric = Fabric::new().context("creating the fabric netns")?;
    let rt = tokio_runtime()?;
    let c = check::run(&fabric, &bin_dir.join("ipamctl"), &rt, params, &STOP)?;
    Ok(CheckOnlyReport::new(
        c,
        started.elapsed().as_secs_f64(),
        load_average_start,
    ))
}

/// `--only dataplane`: a fabric, one node and one pod, no binaries.
fn run_dataplane_only(args: &Args) -> Result<DataplaneOnlyReport> {
    need_root()?;
    if args.dataplane_runs == 0 {
        bail!("--dataplane-runs must be at least 1");
    }
    let started = Instant::now();
    let load_average_start = load_average();
    let fabric = Fabric::new().context("creating the fabric netns")?;
    let times = dataplane::run(&fabric, args.dataplane_runs, &STOP)?;
    Ok(DataplaneOnlyReport::new(
        times,
        started.elapsed().as_secs_f64(),
        load_average_start,
    ))
}

fn run(args: &Args) -> Result<Report> {
    need_root()?;
    if args.pods == 0 || args.burst == 0 || args.allocs == 0 || args.rounds == 0 {
        bail!("--pods, --burst, --allocs and --rounds must be at least 1");
    }
    let check_params = check_params(args)?;
    let bin_dir = ferry_bin_dir()?;
    let cni_dir = cni_plugin_dir();
    for p in ["ptp", "bridge", "host-local"] {
        if !cni_dir.join(p).is_file() {
            bail!(
                "{} is missing: apt-get install containernetworking-plugins (or set FERRY_CNI_PLUGIN_DIR)",
                cni_dir.join(p).display()
            );
        }
    }
    let started = Instant::now();
    let load_average_start = load_average();

    // The world. Guards drop in reverse order: pods, ipamd, node, fabric.
    eprintln!("bench: creating the fabric, the node and pod namespaces ...");
    let fabric = Fabric::new().context("creating the fabric netns")?;
    let node = fabric.add_node().context("creating the node netns")?;
    let n_pods = args.pods.max(args.burst).max(args.hold);
    let mut pods: Vec<Netns> = Vec::with_capacity(n_pods);
    for _ in 0..n_pods {
        check_stop()?;
        pods.push(Netns::new("p").context("creating a pod netns")?);
    }
    check_stop()?;

    let mut ipamd = Ipamd::start(
        &node,
        IpamdConfig {
            pod_cidr: "10.244.0.0/16".into(),
            cooldown: None,
            log_level: Some("info".into()),
            ..IpamdConfig::default()
        },
    )
    .context("starting ipamd for the plugin runs")?;
    let rss_idle = ipamd.pid().and_then(|p| rss_kib(p, "VmRSS:"));

    let spec = Spec {
        plugins: plugin_specs(&bin_dir, &cni_dir, ipamd.socket(), node.dir.path()),
        netns: pods.iter().map(Netns::path).collect(),
        pods: args.pods,
        burst: args.burst,
        cni_path: cni_dir.display().to_string(),
        settle_ms: 2000,
        rounds: args.rounds,
        version_calls: 20,
        hold: args.hold,
        ipamd_pid: ipamd.pid(),
    };
    let spec_path = node.path("bench-spec.json");
    let out_path = node.path("bench-out.json");
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec)?)?;

    // The worker: this binary again, inside the node netns, in its own process
    // group so a Ctrl-C reaches only us; we stop it by PID.
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let mut cmd = node.ns.command(&exe);
    cmd.arg("--worker-spec")
        .arg(&spec_path)
        .arg("--worker-out")
        .arg(&out_path)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .process_group(0);
    let child = cmd.spawn().context("spawning the worker")?;
    let mut worker = ChildGuard::new(child);
    // Generous: sequential calls are ~10-50 ms, bursts a few seconds.
    let limit = Duration::from_secs(120 + (args.pods as u64 + args.burst as u64) * 3 / 2);
    let status = wait_worker(&mut worker, limit)?;
    if !status.success() {
        bail!(
            "the worker failed ({status}); ipamd log tail:\n{}",
            ipamd.log_tail(20)
        );
    }
    let plugin_out: worker::Output =
        serde_json::from_slice(&std::fs::read(&out_path).context("reading the worker's results")?)?;
    let rss_plugins = ipamd.pid().and_then(peak_rss_kib);
    let ferry_log = node.path("ferry-cni.log");
    let ferry_log_bytes = std::fs::metadata(&ferry_log).map(|m| m.len()).unwrap_or(0);
    let _ = ipamd.terminate();
    drop(pods);
    check_stop()?;

    // ipamd alone: Allocate throughput, on a fresh node (fresh state dir).
    let node2 = fabric
        .add_node()
        .context("creating the second node netns")?;
    let mut ipamd2 = Ipamd::start(
        &node2,
        IpamdConfig {
            pod_cidr: "10.96.0.0/12".into(),
            cooldown: None,
            log_level: Some("info".into()),
            ..IpamdConfig::default()
        },
    )
    .context("starting ipamd for the Allocate runs")?;
    let rt = tokio_runtime()?;
    let levels = rt.block_on(alloc::run(
        ipamd2.socket(),
        ipamd2.pid(),
        &[1, 8, 32],
        args.allocs,
        &STOP,
    ))?;
    let rss_alloc = ipamd2.pid().and_then(peak_rss_kib);
    let _ = ipamd2.terminate();
    drop(ipamd2);
    drop(node2);
    check_stop()?;

    // Allocate while `ipamctl check` loops, against the same without it.
    let check_load = check::run(&fabric, &bin_dir.join("ipamctl"), &rt, check_params, &STOP)?;

    let size = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    Ok(Report::new(
        args.pods,
        args.burst,
        args.allocs,
        plugin_out.plugins,
        levels,
        Some(check_load),
        report::Resources {
            ipamd_rss_kib_idle: rss_idle,
            held_pods: plugin_out.hold.as_ref().map_or(0, |h| h.pods - h.failures),
            ipamd_rss_kib_holding: plugin_out.hold.as_ref().and_then(|h| h.ipamd_rss_kib),
            ipamd_peak_rss_kib_plugin_runs: rss_plugins,
            ipamd_peak_rss_kib_allocate_runs: rss_alloc,
            ferry_binary_bytes: size(bin_dir.join("ferry")),
            ipamd_binary_bytes: size(bin_dir.join("ipamd")),
            ptp_binary_bytes: size(cni_dir.join("ptp")),
            bridge_binary_bytes: size(cni_dir.join("bridge")),
            host_local_binary_bytes: size(cni_dir.join("host-local")),
            ferry_log_bytes,
        },
        started.elapsed().as_secs_f64(),
        load_average_start,
    ))
}

/// The three plugin configurations, all cniVersion 1.0.0 (the newest the
/// Debian reference plugins speak), each with its own pod subnet.
fn plugin_specs(bin_dir: &Path, cni_dir: &Path, socket: &Path, dir: &Path) -> Vec<PluginSpec> {
    let host_local = |subnet: &str, data: &str| {
        json!({
            "type": "host-local",
            "ranges": [[{"subnet": subnet}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": dir.join(data),
        })
    };
    vec![
        PluginSpec {
            label: "ferry".into(),
            binary: bin_dir.join("ferry"),
            conf: {
                // The harness's ferry config, logging as the default conflist does.
                let mut c = ferry_netconf(socket, "1.0.0");
                c["name"] = json!("bench-ferry");
                c["logFile"] = json!(dir.join("ferry-cni.log"));
                c["logLevel"] = json!("info");
                c
            },
        },
        PluginSpec {
            label: "ptp+host-local".into(),
            binary: cni_dir.join("ptp"),
            conf: json!({
                "cniVersion": "1.0.0",
                "name": "bench-ptp",
                "type": "ptp",
                "ipMasq": false,
                "ipam": host_local("10.97.0.0/16", "host-local-ptp"),
            }),
        },
        PluginSpec {
            label: "bridge+host-local".into(),
            binary: cni_dir.join("bridge"),
            conf: json!({
                "cniVersion": "1.0.0",
                "name": "bench-bridge",
                "type": "bridge",
                "bridge": "fybr0",
                "isGateway": true,
                "ipMasq": false,
                "ipam": host_local("10.98.0.0/16", "host-local-bridge"),
            }),
        },
    ]
}

/// Waits for the worker, passing on a Ctrl-C as SIGTERM (by its PID) and
/// enforcing `limit`.
fn wait_worker(worker: &mut ChildGuard, limit: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        let child = worker.child_mut().context("worker is gone")?;
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if STOP.load(Ordering::SeqCst) || Instant::now() >= deadline {
            let why = if STOP.load(Ordering::SeqCst) {
                "interrupted"
            } else {
                "the worker ran past its time limit"
            };
            // SIGTERM by its PID, then SIGKILL if it is still there after 20 s.
            let _ = worker.terminate(Duration::from_secs(20));
            bail!("{why}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// VmHWM (peak resident set) of `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    rss_kib(pid, "VmHWM:")
}

/// A `kB` line (`VmRSS:`, `VmHWM:`) of `/proc/<pid>/status`.
pub fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
