//! The figures, the ratios, and the targets (PASS/MISS), as a table or JSON.

use serde::Serialize;

use crate::alloc::AllocLevel;
use crate::check::{CheckLoad, CheckRun};
use crate::dataplane::DataplaneTimes;
use crate::worker::PluginResult;

/// Sizes and memory, gathered by the orchestrator.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Resources {
    /// VmRSS right after start, before any pod.
    pub ipamd_rss_kib_idle: Option<u64>,
    /// VmRSS with `held_pods` ferry pods networked at once.
    pub ipamd_rss_kib_holding: Option<u64>,
    pub held_pods: usize,
    pub ipamd_peak_rss_kib_plugin_runs: Option<u64>,
    pub ipamd_peak_rss_kib_allocate_runs: Option<u64>,
    pub ferry_binary_bytes: u64,
    pub ipamd_binary_bytes: u64,
    pub ptp_binary_bytes: u64,
    pub bridge_binary_bytes: u64,
    pub host_local_binary_bytes: u64,
    /// Size of ferry's CNI log after all the plugin runs.
    pub ferry_log_bytes: u64,
}

/// ferry's figure divided by a reference plugin's (lower is better for ferry).
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub metric: String,
    pub ferry_over_ptp: Option<f64>,
    pub ferry_over_bridge: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    /// Human-readable figures, as printed.
    pub measured: String,
    pub required: String,
    /// The same as numbers (ms, failures, or allocs/s).
    pub measured_value: f64,
    pub limit_value: f64,
    pub pass: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub pods: usize,
    pub burst: usize,
    pub allocs_per_level: usize,
    pub cpus: usize,
    pub elapsed_s: f64,
    /// /proc/loadavg (1, 5, 15 min) when the bench started: other load on
    /// the machine inflates every figure, the references' as much as ferry's.
    pub load_average_start: String,
    pub plugins: Vec<PluginResult>,
    pub ratios: Vec<Ratio>,
    pub allocate: Vec<AllocLevel>,
    /// Allocate with and without `ipamctl check` running in a loop.
    pub check_load: Option<CheckLoad>,
    pub resources: Resources,
    pub targets: Vec<Target>,
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pods: usize,
        burst: usize,
        allocs_per_level: usize,
        plugins: Vec<PluginResult>,
        allocate: Vec<AllocLevel>,
        check_load: Option<CheckLoad>,
        resources: Resources,
        elapsed_s: f64,
        load_average_start: String,
    ) -> Report {
        let find = |label: &str| plugins.iter().find(|p| p.label == label).cloned();
        let ferry = find("ferry").unwrap_or_default();
        let ptp = find("ptp+host-local").unwrap_or_default();
        let bridge = find("bridge+host-local").unwrap_or_default();

        type Metric = (&'static str, fn(&PluginResult) -> f64);
        let metrics: [Metric; 7] = [
            ("VERSION p50", |p| p.version.p50_ms),
            ("ADD p50", |p| p.add.p50_ms),
            ("ADD p99", |p| p.add.p99_ms),
            ("DEL p50", |p| p.del.p50_ms),
            ("DEL p99", |p| p.del.p99_ms),
            ("burst ADD wall", |p| p.burst_add_wall_ms),
            ("burst ADD p99", |p| p.burst_add.p99_ms),
        ];
        let ratios = metrics
            .iter()
            .map(|(name, f)| Ratio {
                metric: name.to_string(),
                ferry_over_ptp: ratio(f(&ferry), f(&ptp)),
                ferry_over_bridge: ratio(f(&ferry), f(&bridge)),
            })
            .collect();

        let mut targets = vec![
            Target {
                name: "ferry ADD p50 <= 0.5 x ptp+host-local ADD p50".into(),
                measured: format!("{:.2} ms", ferry.add.p50_ms),
                required: format!("<= {:.2} ms", 0.5 * ptp.add.p50_ms),
                measured_value: ferry.add.p50_ms,
                limit_value: 0.5 * ptp.add.p50_ms,
                pass: ferry.add.count > 0 && ferry.add.p50_ms <= 0.5 * ptp.add.p50_ms,
            },
            Target {
                name: "ferry DEL p50 <= ptp+host-local DEL p50".into(),
                measured: format!("{:.2} ms", ferry.del.p50_ms),
                required: format!("<= {:.2} ms", ptp.del.p50_ms),
                measured_value: ferry.del.p50_ms,
                limit_value: ptp.del.p50_ms,
                pass: ferry.del.count > 0 && ferry.del.p50_ms <= ptp.del.p50_ms,
            },
            Target {
                name: format!("ferry burst of {burst} concurrent ADDs (and DELs) without failures"),
                measured: format!(
                    "{} ADD + {} DEL failures",
                    ferry.burst_add_failures, ferry.burst_del_failures
                ),
                required: "0".into(),
                measured_value: (ferry.burst_add_failures + ferry.burst_del_failures) as f64,
                limit_value: 0.0,
                pass: ferry.burst_add.count > 0
                    && ferry.burst_add_failures == 0
                    && ferry.burst_del_failures == 0,
            },
        ];
        let at32 = allocate.iter().find(|l| l.clients == 32);
        targets.push(Target {
            name: "ipamd durable Allocate throughput, 32 clients".into(),
            measured: at32.map_or("not run".into(), |l| {
                format!("{:.0} allocs/s, {} errors", l.allocs_per_sec, l.errors)
            }),
            required: ">= 5000 allocs/s, 0 errors".into(),
            measured_value: at32.map_or(0.0, |l| l.allocs_per_sec),
            limit_value: 5000.0,
            pass: at32.is_some_and(|l| l.allocs_per_sec >= 5000.0 && l.errors == 0),
        });
        if resources.held_pods > 0 || resources.ipamd_rss_kib_holding.is_some() {
            let rss_mib = resources.ipamd_rss_kib_holding.map(|k| k as f64 / 1024.0);
            targets.push(Target {
                name: format!("ipamd RSS holding {} pods < 30 MiB", resources.held_pods),
                measured: rss_mib.map_or("not read".into(), |m| format!("{m:.1} MiB")),
                required: "< 30 MiB".into(),
                measured_value: rss_mib.unwrap_or(f64::INFINITY),
                limit_value: 30.0,
                pass: rss_mib.is_some_and(|m| m < 30.0),
            });
        }

        Report {
            pods,
            burst,
            allocs_per_level,
            cpus: cpus(),
            elapsed_s,
            load_average_start,
            plugins,
            ratios,
            allocate,
            check_load,
            resources,
            targets,
        }
    }

    pub fn print(&self) {
        println!();
        println!(
            "ferry bench: {} sequential pods, burst of {}, {} Allocate calls per level, {} CPU(s), {:.0} s",
            self.pods, self.burst, self.allocs_per_level, self.cpus, self.elapsed_s
        );
        println!(
            "load average at start: {} (anything near the CPU count inflates every figure)",
            self.load_average_start
        );
        println!();
        println!("CNI plugin exec wall time (ms; spawn to exit, inside the node netns)");
        let mut header = format!("{:<24}", "");
        for p in &self.plugins {
            header.push_str(&format!("{:>19}", p.label));
        }
        println!("{header}");
        type Row = (&'static str, fn(&PluginResult) -> String);
        let rows: [Row; 16] = [
            ("VERSION p50 (floor)", |p| {
                format!("{:.2}", p.version.p50_ms)
            }),
            ("ADD p50", |p| format!("{:.2}", p.add.p50_ms)),
            ("ADD p99", |p| format!("{:.2}", p.add.p99_ms)),
            ("ADD mean", |p| format!("{:.2}", p.add.mean_ms)),
            ("ADD failures", |p| {
                format!("{}/{}", p.add_failures, p.add.count)
            }),
            ("DEL p50", |p| format!("{:.2}", p.del.p50_ms)),
            ("DEL p99", |p| format!("{:.2}", p.del.p99_ms)),
            ("DEL mean", |p| format!("{:.2}", p.del.mean_ms)),
            ("veths gone after DELs p50", |p| {
                format!("{:.2}", p.del_settle.p50_ms)
            }),
            ("DEL failures", |p| {
                format!("{}/{}", p.del_failures, p.del.count)
            }),
            ("burst ADD wall", |p| format!("{:.1}", p.burst_add_wall_ms)),
            ("burst ADD p50", |p| format!("{:.2}", p.burst_add.p50_ms)),
            ("burst ADD p99", |p| format!("{:.2}", p.burst_add.p99_ms)),
            ("burst ADD failures", |p| {
                format!("{}/{}", p.burst_add_failures, p.burst_add.count)
            }),
            ("burst DEL wall", |p| format!("{:.1}", p.burst_del_wall_ms)),
            ("burst DEL failures", |p| {
                format!("{}/{}", p.burst_del_failures, p.burst_del.count)
            }),
        ];
        for (name, f) in rows {
            let mut line = format!("  {name:<22}");
            for p in &self.plugins {
                line.push_str(&format!("{:>19}", f(p)));
            }
            println!("{line}");
        }
        println!();
        println!("Ratios (ferry / reference; below 1 means ferry is faster)");
        println!("  {:<22}{:>12}{:>14}", "", "ferry/ptp", "ferry/bridge");
        let fmt = |r: Option<f64>| r.map_or("-".to_string(), |v| format!("{v:.2}x"));
        for r in &self.ratios {
            println!(
                "  {:<22}{:>12}{:>14}",
                r.metric,
                fmt(r.ferry_over_ptp),
                fmt(r.ferry_over_bridge)
            );
        }
        println!();
        println!(
            "ipamd Allocate, durable commit before reply (unique keys, one connection per client)"
        );
        println!(
            "  {:>7}{:>12}{:>10}{:>10}{:>10}{:>8}{:>14}{:>18}{:>18}",
            "clients",
            "allocs/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "errors",
            "releases/s",
            "ipamd CPU/alloc",
            "client CPU/alloc"
        );
        let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} us"));
        for l in &self.allocate {
            println!(
                "  {:>7}{:>12.0}{:>10.3}{:>10.3}{:>10.3}{:>8}{:>14.0}{:>18}{:>18}",
                l.clients,
                l.allocs_per_sec,
                l.latency.p50_ms,
                l.latency.p99_ms,
                l.latency.max_ms,
                l.errors + l.release_errors,
                l.releases_per_sec,
                us(l.ipamd_cpu_us_per_alloc),
                us(l.client_cpu_us_per_alloc)
            );
        }
        if let Some(c) = &self.check_load {
            println!();
            print_check_load(c);
        }
        println!();
        let r = &self.resources;
        let mib =
            |k: Option<u64>| k.map_or("-".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
        let mb = |b: u64| format!("{:.2} MB", b as f64 / 1e6);
        println!(
            "ipamd RSS (VmRSS): {} idle, {} holding {} pods",
            mib(r.ipamd_rss_kib_idle),
            mib(r.ipamd_rss_kib_holding),
            r.held_pods
        );
        println!(
            "ipamd peak RSS (VmHWM): {} after the plugin runs, {} after the Allocate runs",
            mib(r.ipamd_peak_rss_kib_plugin_runs),
            mib(r.ipamd_peak_rss_kib_allocate_runs)
        );
        println!(
            "binary sizes: ferry {}, ipamd {}; ptp {}, bridge {}, host-local {}",
            mb(r.ferry_binary_bytes),
            mb(r.ipamd_binary_bytes),
            mb(r.ptp_binary_bytes),
            mb(r.bridge_binary_bytes),
            mb(r.host_local_binary_bytes)
        );
        println!();
        println!("Targets");
        for t in &self.targets {
            println!(
                "  {}  {:<62} measured {}, required {}",
                if t.pass { "PASS" } else { "MISS" },
                t.name,
                t.measured,
                t.required
            );
        }
        let errors: Vec<&String> = self.plugins.iter().flat_map(|p| &p.errors).collect();
        let alloc_errors: Vec<&String> = self
            .allocate
            .iter()
            .filter_map(|l| l.first_error.as_ref())
            .chain(
                self.check_load
                    .iter()
                    .flat_map(|c| c.runs().into_iter().filter_map(|r| r.first_error.as_ref())),
            )
            .collect();
        if !errors.is_empty() || !alloc_errors.is_empty() {
            println!();
            println!("First failures");
            for e in errors.into_iter().chain(alloc_errors) {
                println!("  {e}");
            }
        }
    }
}

/// `bench --only check`: just that scenario.
#[derive(Debug, Clone, Serialize)]
pub struct CheckOnlyReport {
    pub cpus: usize,
    pub elapsed_s: f64,
    pub load_average_start: String,
    pub check_load: CheckLoad,
}

impl CheckOnlyReport {
    pub fn new(check_load: CheckLoad, elapsed_s: f64, load_average_start: String) -> Self {
        Self {
            cpus: cpus(),
            elapsed_s,
            load_average_start,
            check_load,
        }
    }

    pub fn print(&self) {
        print_part_header("check", self.cpus, self.elapsed_s, &self.load_average_start);
        print_check_load(&self.check_load);
        let errors: Vec<&String> = self
            .check_load
            .runs()
            .into_iter()
            .filter_map(|r| r.first_error.as_ref())
            .collect();
        if !errors.is_empty() {
            println!();
            println!("First failures");
            for e in errors {
                println!("  {e}");
            }
        }
    }
}

/// `bench --only dataplane`: just that scenario.
#[derive(Debug, Clone, Serialize)]
pub struct DataplaneOnlyReport {
    pub cpus: usize,
    pub elapsed_s: f64,
    pub load_average_start: String,
    pub dataplane: DataplaneTimes,
}

impl DataplaneOnlyReport {
    pub fn new(dataplane: DataplaneTimes, elapsed_s: f64, load_average_start: String) -> Self {
        Self {
            cpus: cpus(),
            elapsed_s,
            load_average_start,
            dataplane,
        }
    }

    pub fn print(&self) {
        print_part_header(
            "dataplane",
            self.cpus,
            self.elapsed_s,
            &self.load_average_start,
        );
        let d = &self.dataplane;
        println!(
            "ferry's dataplane code alone, one pod set up and torn down {} times in a node netns (ms)",
            d.runs
        );
        println!(
            "  {:<10}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "", "p50", "p90", "p99", "max", "mean"
        );
        for (name, s) in [("setup", &d.setup), ("teardown", &d.teardown)] {
            println!(
                "  {name:<10}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
                s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms, s.mean_ms
            );
        }
        println!(
            "  teardown deletes the host veth and waits for the kernel's veth unregister, \
             which ferry's DEL leaves to ipamd"
        );
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// The lines every `--only` report starts with.
fn print_part_header(part: &str, cpus: usize, elapsed_s: f64, load_average_start: &str) {
    println!();
    println!("ferry bench --only {part}: {cpus} CPU(s), {elapsed_s:.0} s");
    println!(
        "load average at start: {load_average_start} (anything near the CPU count inflates every figure)"
    );
    println!();
}

/// The table of the check-loop scenario: no loop, status loop, check loop.
fn print_check_load(c: &CheckLoad) {
    println!(
        "ipamd Allocate while `ipamctl check` runs in a loop ({} clients, {} Allocates per run in total, \
         each client pausing {:.0} ms after each; fresh ipamd per run holding {} allocations)",
        c.clients, c.allocs_per_run, c.gap_ms, c.prefill
    );
    println!(
        "  {:<34}{:>16}{:>16}{:>16}",
        "", "no loop", "status loop", "check loop"
    );
    let runs = c.runs();
    let row = |name: &str, f: &dyn Fn(&CheckRun) -> String| {
        let mut line = format!("  {name:<34}");
        for r in runs {
            line.push_str(&format!("{:>16}", f(r)));
        }
        println!("{line}");
    };
    row("Allocate p50 ms", &|r| format!("{:.3}", r.latency.p50_ms));
    row("Allocate p99 ms", &|r| format!("{:.3}", r.latency.p99_ms));
    row("Allocate max ms", &|r| format!("{:.3}", r.latency.max_ms));
    row("run wall ms (allocs/s)", &|r| {
        format!("{:.0} ({:.0})", r.wall_ms, r.allocs_per_sec)
    });
    row("Allocate errors", &|r| format!("{}/{}", r.errors, r.allocs));
    row("ipamctl check alone ms (findings)", &|r| {
        format!("{:.1} ({})", r.solo_check_ms, r.solo_check_findings)
    });
    let looped = |f: fn(&CheckRun) -> String| {
        move |r: &CheckRun| {
            if r.loop_command.is_some() {
                f(r)
            } else {
                "-".into()
            }
        }
    };
    row(
        "loop execs completed during run",
        &looped(|r| r.loop_completed.to_string()),
    );
    row(
        "window with a loop exec running",
        &looped(|r| format!("{:.0}%", r.loop_busy_share * 100.0)),
    );
    row(
        "loop exec p50 / max ms",
        &looped(|r| format!("{:.1} / {:.1}", r.loop_exec.p50_ms, r.loop_exec.max_ms)),
    );
    row("loop execs failed", &looped(|r| r.loop_failed.to_string()));
    let x = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}x"));
    println!(
        "  Allocate p99, check loop / no loop: {}; check loop / status loop: {}",
        x(c.p99_ratio),
        x(c.p99_ratio_vs_status)
    );
}
