//! The text exposition format 0.0.4, written here rather than by
//! `prometheus-client`: that crate writes OpenMetrics (counters typed
//! without `_total`, `le="1.0"`, a closing `# EOF`), which would change
//! what scrapers of ipamd see.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

use super::{Histogram, LATENCY_BUCKETS, Metrics, lock};
use crate::model::{BlockUsage, FindingKind, PoolUsage};

/// Every series name starts with this.
pub const PREFIX: &str = "ferry_ipamd_";
/// The exposition format served.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Reconcile finding kinds, exported at 0 before the first one is seen.
const FINDING_KINDS: [FindingKind; 5] = FindingKind::ALL;

impl Metrics {
    /// The whole exposition: process, pools (from `pools` and `blocks`, as
    /// the core reports them now), gRPC requests and reconcile.
    pub fn render(&self, pools: &[PoolUsage], blocks: &[BlockUsage]) -> String {
        let mut t = Text::default();
        self.render_process(&mut t);
        render_pools(&mut t, pools, blocks);
        self.render_grpc(&mut t);
        self.render_reconcile(&mut t);
        t.0
    }

    fn render_process(&self, t: &mut Text) {
        t.family("up", "gauge", "1 while ipamd serves metrics.");
        t.sample("up", &[], 1);
        t.family(
            "build_info",
            "gauge",
            "Always 1; the labels carry ipamd's version and the gRPC API version it speaks.",
        );
        t.sample(
            "build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("api_version", ferry_proto::PROTOCOL_VERSION),
            ],
            1,
        );
        t.family(
            "start_time_seconds",
            "gauge",
            "When ipamd started, in seconds since the Unix epoch.",
        );
        let started = self
            .inner
            .started
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        t.sample("start_time_seconds", &[], float(started));
        if let Some(rss) = resident_memory_bytes() {
            t.family(
                "resident_memory_bytes",
                "gauge",
                "Resident set size of the ipamd process (from /proc/self/statm).",
            );
            t.sample("resident_memory_bytes", &[], rss);
        }
    }

    fn render_grpc(&self, t: &mut Text) {
        let grpc = lock(&self.inner.grpc);
        t.family(
            "grpc_requests_total",
            "counter",
            "gRPC requests handled, by service, method and gRPC status code (OK or the error).",
        );
        for ((service, method), stats) in grpc.iter() {
            for (code, n) in &stats.codes {
                t.sample(
                    "grpc_requests_total",
                    &[("service", service), ("method", method), ("code", code)],
                    n,
                );
            }
        }
        t.family(
            "grpc_request_duration_seconds",
            "histogram",
            "Time from receiving a gRPC request to its response headers, by service and method.",
        );
        for ((service, method), stats) in grpc.iter() {
            t.histogram(
                "grpc_request_duration_seconds",
                &[("service", service), ("method", method)],
                &stats.latency,
            );
        }
    }

    fn render_reconcile(&self, t: &mut Text) {
        // Every known kind shows, at 0 until first seen.
        let mut findings: BTreeMap<&str, u64> =
            FINDING_KINDS.iter().map(|k| (k.as_str(), 0)).collect();
        findings.extend(lock(&self.inner.findings).iter().map(|(k, n)| (*k, *n)));
        t.family(
            "reconcile_findings_total",
            "counter",
            "Differences reconcile found between IPAM state and the node, by kind, summed over passes.",
        );
        for (kind, n) in findings {
            t.sample("reconcile_findings_total", &[("kind", kind)], n);
        }
        t.family(
            "reconcile_released_total",
            "counter",
            "Addresses reconcile released because nothing on the node used them.",
        );
        t.sample(
            "reconcile_released_total",
            &[],
            self.inner.reconcile_released.load(Ordering::Relaxed),
        );
    }
}

fn render_pools(t: &mut Text, pools: &[PoolUsage], blocks: &[BlockUsage]) {
    let free_in_blocks = |pool: &str| -> u64 {
        blocks
            .iter()
            .filter(|b| b.claim.pool == pool)
            .map(|b| u64::from(b.size.saturating_sub(b.allocated.saturating_add(b.cooling))))
            .sum()
    };
    type Gauge = (&'static str, &'static str, fn(&PoolUsage) -> u64);
    let gauges: [Gauge; 4] = [
        (
            "pool_allocations",
            "Addresses allocated to pods, per pool.",
            |p| p.allocated,
        ),
        (
            "pool_cooling_addresses",
            "Released addresses still waiting out the cooldown before reuse, per pool.",
            |p| p.cooling,
        ),
        ("pool_blocks", "Blocks this node owns, per pool.", |p| {
            u64::from(p.blocks)
        }),
        (
            "pool_size_addresses",
            "Usable addresses in the whole pool CIDR (all nodes' blocks and unclaimed ones).",
            |p| p.size,
        ),
    ];
    for (name, help, value) in gauges {
        t.family(name, "gauge", help);
        for p in pools {
            t.sample(name, &[("pool", &p.pool.name)], value(p));
        }
    }
    t.family(
        "pool_free_addresses",
        "gauge",
        "Addresses allocatable right now in the blocks this node owns (not allocated, not cooling), \
         per pool; more blocks are claimed on demand while the pool has unclaimed ones.",
    );
    for p in pools {
        t.sample(
            "pool_free_addresses",
            &[("pool", &p.pool.name)],
            free_in_blocks(&p.pool.name),
        );
    }
}

/// `RSS pages * page size`; None where /proc is not there.
fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = u64::try_from(page).ok().filter(|p| *p > 0).unwrap_or(4096);
    Some(pages * page)
}

/// A float as Prometheus writes it.
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        v.to_string()
    }
}

/// Label values: backslash, double quote and newline are escaped.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text: backslash and newline are escaped.
pub(super) fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// The exposition being written; names get [`PREFIX`].
#[derive(Default)]
pub(super) struct Text(pub(super) String);

impl Text {
    pub(super) fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {PREFIX}{name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {PREFIX}{name} {kind}");
    }

    pub(super) fn sample(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl std::fmt::Display,
    ) {
        let _ = write!(self.0, "{PREFIX}{name}");
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label_value(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (bound, n) in LATENCY_BUCKETS.iter().zip(h.buckets) {
            cumulative += n;
            let le = float(*bound);
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, cumulative);
        }
        let mut with_le = labels.to_vec();
        with_le.push(("le", "+Inf"));
        self.sample(&bucket, &with_le, h.count);
        self.sample(&format!("{name}_sum"), labels, float(h.sum));
        self.sample(&format!("{name}_count"), labels, h.count);
    }
}
