//! Prometheus metrics: the counters ipamd keeps ([`Metrics`]), a wrapper
//! that times and counts every gRPC request ([`Metrics::grpc`]), and a tiny
//! HTTP/1.1 responder for `GET /metrics` ([`bind`], [`serve`]) in the text
//! exposition format 0.0.4.
//!
//! Pool gauges are not kept here: they are read from the core at scrape
//! time, so they can never drift from what `ipamctl pools` shows.
//!
//! The HTTP side is hand-written on purpose: it answers one path, closes
//! every connection after one response, and needs no HTTP crate. It binds
//! 127.0.0.1 by default; the address is the operator's choice.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::Code;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tracing::{debug, warn};

use crate::ipam::Ipam;
use crate::model::{BlockUsage, Finding, FindingKind, PoolUsage};

/// Every series name starts with this.
pub const PREFIX: &str = "ferry_ipamd_";
/// The exposition format served.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Upper bounds of the latency buckets in seconds: 0.1 ms to 1 s (the
/// plugin's own timeout is a few seconds; anything slower is just "+Inf").
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Distinct (service, method) series at most; further names count as
/// method "other", so a client inventing method names cannot grow memory.
const MAX_METHOD_SERIES: usize = 64;
/// Reconcile finding kinds, exported at 0 before the first one is seen.
const FINDING_KINDS: [FindingKind; 5] = FindingKind::ALL;

/// ipamd's counters and histograms. Cheap to clone (one `Arc`); every clone
/// records into the same numbers.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    started: SystemTime,
    grpc: Mutex<BTreeMap<(&'static str, String), MethodStats>>,
    findings: Mutex<BTreeMap<&'static str, u64>>,
    reconcile_released: AtomicU64,
}

#[derive(Default)]
struct MethodStats {
    /// Requests by gRPC code name.
    codes: BTreeMap<&'static str, u64>,
    latency: Histogram,
}

/// A fixed-bucket histogram over [`LATENCY_BUCKETS`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Per bucket, not cumulative; observations above the last bound only
    /// show in `count`.
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += seconds;
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A poisoned lock only means a panic elsewhere mid-increment; the numbers
/// are still worth serving.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            inner: Arc::new(Inner {
                started: SystemTime::now(),
                grpc: Mutex::new(BTreeMap::new()),
                findings: Mutex::new(BTreeMap::new()),
                reconcile_released: AtomicU64::new(0),
            }),
        }
    }

    /// Counts one finished gRPC request and, for every method, its latency.
    pub fn record_request(&self, service: &'static str, method: &str, code: Code, took: Duration) {
        let mut grpc = lock(&self.inner.grpc);
        let key = (service, method.to_string());
        let key = if grpc.contains_key(&key) || grpc.len() < MAX_METHOD_SERIES {
            key
        } else {
            (service, "other".to_string())
        };
        let stats = grpc.entry(key).or_default();
        *stats.codes.entry(code_name(code)).or_default() += 1;
        stats.latency.observe(took.as_secs_f64());
    }

    /// Counts what one reconcile pass found, by kind.
    pub fn record_findings(&self, findings: &[Finding]) {
        if findings.is_empty() {
            return;
        }
        let mut counts = lock(&self.inner.findings);
        for f in findings {
            *counts.entry(f.kind.as_str()).or_default() += 1;
        }
    }

    /// Counts addresses reconcile released.
    pub fn record_reconcile_released(&self, n: usize) {
        self.inner
            .reconcile_released
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Wraps a tonic service so every request through it is counted by
    /// method and gRPC code and timed (until the response headers).
    pub fn grpc<S>(&self, inner: S) -> Timed<S> {
        Timed {
            inner,
            metrics: self.clone(),
        }
    }

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
                ("api_version", ferry_proto::CLIENT_VERSION),
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

/// The canonical gRPC code names (as in the gRPC spec and CONTRACTS.md).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
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
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// The exposition being written; names get [`PREFIX`].
#[derive(Default)]
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {PREFIX}{name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {PREFIX}{name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
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

// ---------------------------------------------------------------- gRPC

/// A tonic service whose requests [`Metrics`] counts and times. Made by
/// [`Metrics::grpc`]; keeps the inner service's name, so it is added to the
/// server like the service itself.
#[derive(Clone)]
pub struct Timed<S> {
    inner: S,
    metrics: Metrics,
}

impl<S: NamedService> NamedService for Timed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, RB> Service<http::Request<B>> for Timed<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + NamedService,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let pending = Pending {
            metrics: self.metrics.clone(),
            service: S::NAME,
            method: method_of(req.uri().path()).to_string(),
            start: Instant::now(),
            done: false,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut pending = pending;
            let res = fut.await;
            pending.finish(match &res {
                Ok(resp) => status_of(resp),
                Err(_) => Code::Unknown,
            });
            res
        })
    }
}

/// The method name: the last segment of `/package.Service/Method`.
fn method_of(path: &str) -> &str {
    match path.rsplit_once('/') {
        Some((_, m)) if !m.is_empty() => m,
        _ => "unknown",
    }
}

/// tonic sends an error as a trailers-only response (grpc-status in the
/// headers); a success has no grpc-status there (it comes in the trailers).
fn status_of<RB>(resp: &http::Response<RB>) -> Code {
    match resp.headers().get("grpc-status") {
        Some(v) => Code::from_bytes(v.as_bytes()),
        None if resp.status() == http::StatusCode::OK => Code::Ok,
        None => Code::Unknown,
    }
}

/// One request in flight; recorded as CANCELLED if its future is dropped
/// before the handler answers (the client went away or gave up).
struct Pending {
    metrics: Metrics,
    service: &'static str,
    method: String,
    start: Instant,
    done: bool,
}

impl Pending {
    fn finish(&mut self, code: Code) {
        self.done = true;
        self.metrics
            .record_request(self.service, &self.method, code, self.start.elapsed());
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            self.finish(Code::Cancelled);
        }
    }
}

// ---------------------------------------------------------------- HTTP

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen for metrics on {addr}: {source} (choose another --metrics-addr / metrics_addr, or \"\" to disable metrics)"
)]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the metrics listener; done early at start so a taken address
/// stops ipamd before it serves anything.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Connections served at once; more are closed at once (only a scraper or
/// an operator's curl should ever be here).
const MAX_CONNECTIONS: usize = 16;
/// A connection gets this long to send its request and take the answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request head read; a GET for /metrics is a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;

/// Answers `GET /metrics` on `listener` with the numbers from `metrics` and
/// the pools from `ipam`, until `stop` turns true. Open connections are
/// cut at stop, so no handle to the core outlives this function.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    ipam: Arc<Ipam>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            a = listener.accept() => a,
        };
        while conns.try_join_next().is_some() {}
        match accepted {
            Ok((stream, peer)) => {
                if conns.len() >= MAX_CONNECTIONS {
                    debug!(%peer, "metrics: too many connections; closing");
                    continue;
                }
                let (metrics, ipam) = (metrics.clone(), ipam.clone());
                conns.spawn(async move {
                    let render = || metrics.render(&ipam.pools(), &ipam.blocks(None));
                    match tokio::time::timeout(CONNECTION_TIMEOUT, handle(stream, render)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => debug!(%peer, error = %e, "metrics connection failed"),
                        Err(_) => debug!(%peer, "metrics connection timed out"),
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off a little
                // instead of spinning on the error.
                warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    conns.shutdown().await;
}

/// What to answer.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics { head_only: bool },
    MethodNotAllowed,
    NotFound,
    BadRequest,
}

fn route(request_line: &str) -> Route {
    let mut parts = request_line.split_ascii_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if parts.next().is_some() || !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path != "/metrics" {
        return Route::NotFound;
    }
    match method {
        "GET" => Route::Metrics { head_only: false },
        "HEAD" => Route::Metrics { head_only: true },
        _ => Route::MethodNotAllowed,
    }
}

/// Reads the request head, answers once, closes.
async fn handle(mut stream: TcpStream, render: impl FnOnce() -> String) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    // The whole head is read before answering: closing a socket with
    // unread input resets it, and the client may lose the answer.
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if head.len() > MAX_HEAD {
            break false;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break false;
        }
        head.extend_from_slice(&chunk[..n]);
    };
    if head.is_empty() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&head);
    let request_line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    let route = if complete {
        route(request_line)
    } else {
        Route::BadRequest
    };
    let (status, content_type, body, head_only, allow) = match route {
        Route::Metrics { head_only } => ("200 OK", CONTENT_TYPE, render(), head_only, false),
        Route::NotFound => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; metrics are at /metrics\n".to_string(),
            false,
            false,
        ),
        Route::MethodNotAllowed => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET and HEAD\n".to_string(),
            false,
            true,
        ),
        Route::BadRequest => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "bad request\n".to_string(),
            false,
            false,
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if allow {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BlockClaim, PoolSpec};

    fn pool(
        name: &str,
        cidr: &str,
        size: u64,
        allocated: u64,
        cooling: u64,
        blocks: u32,
    ) -> PoolUsage {
        PoolUsage {
            pool: PoolSpec::new(name, cidr.parse().unwrap(), 26, vec![]),
            is_default: name == "default",
            size,
            allocated,
            cooling,
            blocks,
        }
    }

    fn block(pool: &str, cidr: &str, size: u32, allocated: u32, cooling: u32) -> BlockUsage {
        BlockUsage {
            claim: BlockClaim {
                pool: pool.into(),
                cidr: cidr.parse().unwrap(),
                node: "n1".into(),
                claimed_unix_ms: 0,
            },
            size,
            allocated,
            cooling,
        }
    }

    /// The value of the one sample line that starts with `series` (name and
    /// labels exactly as written).
    fn value(text: &str, series: &str) -> Option<String> {
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')
                .map(str::to_string)
        })
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label_value("x\ny"), "x\\ny");
        assert_eq!(escape_help("a\\b\nc"), "a\\\\b\\nc");
        let mut t = Text::default();
        t.sample("x", &[("pool", "we\"ird\\\n"), ("b", "ok")], 3);
        assert_eq!(t.0, "ferry_ipamd_x{pool=\"we\\\"ird\\\\\\n\",b=\"ok\"} 3\n");
        let mut t = Text::default();
        t.family("x", "gauge", "line one\nline \\two");
        assert_eq!(
            t.0,
            "# HELP ferry_ipamd_x line one\\nline \\\\two\n# TYPE ferry_ipamd_x gauge\n"
        );
    }

    #[test]
    fn pool_gauges_per_pool() {
        let pools = [
            pool("default", "10.244.0.0/16", 65534, 3, 1, 2),
            pool("team-a", "10.99.0.0/24", 254, 0, 0, 0),
        ];
        let blocks = [
            // 64 - 2 - 1 and 64 - 1 - 0: 61 + 63.
            block("default", "10.244.0.0/26", 64, 2, 1),
            block("default", "10.244.0.64/26", 64, 1, 0),
            // A block's cooling can exceed what is left; never negative.
            block("gone", "10.1.0.0/30", 2, 2, 5),
        ];
        let m = Metrics::new();
        let text = m.render(&pools, &blocks);
        let v = |s: &str| value(&text, s).unwrap_or_else(|| panic!("no {s} in\n{text}"));
        assert_eq!(v("ferry_ipamd_pool_allocations{pool=\"default\"}"), "3");
        assert_eq!(v("ferry_ipamd_pool_allocations{pool=\"team-a\"}"), "0");
        assert_eq!(
            v("ferry_ipamd_pool_cooling_addresses{pool=\"default\"}"),
            "1"
        );
        assert_eq!(v("ferry_ipamd_pool_blocks{pool=\"default\"}"), "2");
        assert_eq!(v("ferry_ipamd_pool_blocks{pool=\"team-a\"}"), "0");
        assert_eq!(v("ferry_ipamd_pool_size_addresses{pool=\"team-a\"}"), "254");
        assert_eq!(
            v("ferry_ipamd_pool_free_addresses{pool=\"default\"}"),
            "124"
        );
        assert_eq!(v("ferry_ipamd_pool_free_addresses{pool=\"team-a\"}"), "0");
        assert!(!text.contains("pool=\"gone\""), "{text}");
        assert_eq!(v("ferry_ipamd_up"), "1");
        assert!(
            text.contains(&format!(
                "ferry_ipamd_build_info{{version=\"{}\",api_version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION"),
                ferry_proto::CLIENT_VERSION
            )),
            "{text}"
        );
        let rss: u64 = v("ferry_ipamd_resident_memory_bytes").parse().unwrap();
        assert!(rss > 0);
        // Every family is announced once, with its type, before its samples.
        for name in [
            "pool_allocations",
            "pool_free_addresses",
            "grpc_requests_total",
            "grpc_request_duration_seconds",
            "reconcile_findings_total",
        ] {
            assert_eq!(
                text.matches(&format!("# TYPE ferry_ipamd_{name} ")).count(),
                1,
                "{name}"
            );
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let m = Metrics::new();
        let svc = "ferry.ipam.v1.Ipam";
        m.record_request(svc, "Allocate", Code::Ok, Duration::from_micros(50));
        m.record_request(svc, "Allocate", Code::Ok, Duration::from_millis(3));
        m.record_request(
            svc,
            "Allocate",
            Code::ResourceExhausted,
            Duration::from_secs(2),
        );
        m.record_request(svc, "Release", Code::Ok, Duration::from_millis(1));
        let text = m.render(&[], &[]);
        let labels = "service=\"ferry.ipam.v1.Ipam\",method=\"Allocate\"";
        let v = |s: String| value(&text, &s).unwrap_or_else(|| panic!("no {s} in\n{text}"));
        let bucket = |le: &str| {
            v(format!(
                "ferry_ipamd_grpc_request_duration_seconds_bucket{{{labels},le=\"{le}\"}}"
            ))
        };
        assert_eq!(bucket("0.0001"), "1");
        assert_eq!(bucket("0.0025"), "1");
        assert_eq!(bucket("0.005"), "2");
        assert_eq!(bucket("1"), "2");
        assert_eq!(bucket("+Inf"), "3");
        assert_eq!(
            v(format!(
                "ferry_ipamd_grpc_request_duration_seconds_count{{{labels}}}"
            )),
            "3"
        );
        let sum: f64 = v(format!(
            "ferry_ipamd_grpc_request_duration_seconds_sum{{{labels}}}"
        ))
        .parse()
        .unwrap();
        assert!((sum - 2.00305).abs() < 1e-9, "{sum}");
        assert_eq!(
            v(format!(
                "ferry_ipamd_grpc_requests_total{{{labels},code=\"OK\"}}"
            )),
            "2"
        );
        assert_eq!(
            v(format!(
                "ferry_ipamd_grpc_requests_total{{{labels},code=\"RESOURCE_EXHAUSTED\"}}"
            )),
            "1"
        );
        // The bucket lines come in ascending order of le, +Inf last.
        let les: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("_bucket{") && l.contains("method=\"Release\""))
            .map(|l| l.split("le=\"").nth(1).unwrap().split('"').next().unwrap())
            .collect();
        assert_eq!(les.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!(les.last(), Some(&"+Inf"));
    }

    #[test]
    fn method_series_are_bounded() {
        let m = Metrics::new();
        for i in 0..(MAX_METHOD_SERIES + 10) {
            m.record_request("s", &format!("M{i}"), Code::Unimplemented, Duration::ZERO);
        }
        let text = m.render(&[], &[]);
        let n = text
            .lines()
            .filter(|l| l.starts_with("ferry_ipamd_grpc_requests_total{"))
            .count();
        assert_eq!(n, MAX_METHOD_SERIES + 1, "{text}");
        assert_eq!(
            value(
                &text,
                "ferry_ipamd_grpc_requests_total{service=\"s\",method=\"other\",code=\"UNIMPLEMENTED\"}"
            )
            .as_deref(),
            Some("10")
        );
    }

    #[test]
    fn reconcile_counters() {
        let m = Metrics::new();
        let text = m.render(&[], &[]);
        for kind in FindingKind::ALL.map(FindingKind::as_str) {
            assert_eq!(
                value(
                    &text,
                    &format!("ferry_ipamd_reconcile_findings_total{{kind=\"{kind}\"}}")
                )
                .as_deref(),
                Some("0"),
                "{text}"
            );
        }
        let f = |kind| Finding {
            kind,
            detail: String::new(),
            allocation: None,
        };
        m.clone()
            .record_findings(&[f(FindingKind::OrphanVeth), f(FindingKind::OrphanVeth)]);
        m.record_findings(&[f(FindingKind::MissingVeth)]);
        m.record_reconcile_released(2);
        m.record_reconcile_released(1);
        let text = m.render(&[], &[]);
        let v = |s: &str| value(&text, s);
        assert_eq!(
            v("ferry_ipamd_reconcile_findings_total{kind=\"orphan-veth\"}").as_deref(),
            Some("2")
        );
        assert_eq!(
            v("ferry_ipamd_reconcile_findings_total{kind=\"missing-veth\"}").as_deref(),
            Some("1")
        );
        assert_eq!(
            v("ferry_ipamd_reconcile_released_total").as_deref(),
            Some("3")
        );
    }

    #[test]
    fn routes() {
        assert_eq!(
            route("GET /metrics HTTP/1.1"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            route("GET /metrics?x=1 HTTP/1.0"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            route("HEAD /metrics HTTP/1.1"),
            Route::Metrics { head_only: true }
        );
        assert_eq!(route("POST /metrics HTTP/1.1"), Route::MethodNotAllowed);
        assert_eq!(route("GET / HTTP/1.1"), Route::NotFound);
        assert_eq!(route("GET /metrics/ HTTP/1.1"), Route::NotFound);
        assert_eq!(route("GET /metrics"), Route::BadRequest);
        assert_eq!(route("garbage"), Route::BadRequest);
        assert_eq!(route("GET /metrics SPDY/3"), Route::BadRequest);
    }

    /// A stand-in tonic service answering like generated code: an error as
    /// a trailers-only response with grpc-status in the headers.
    #[derive(Clone)]
    struct Fake;

    impl NamedService for Fake {
        const NAME: &'static str = "test.Fake";
    }

    impl Service<http::Request<()>> for Fake {
        type Response = http::Response<()>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<http::Response<()>, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            let path = req.uri().path().to_string();
            Box::pin(async move {
                let mut resp = http::Response::new(());
                match path.as_str() {
                    "/test.Fake/Fail" => {
                        resp.headers_mut()
                            .insert("grpc-status", http::HeaderValue::from_static("9"));
                    }
                    "/test.Fake/Hang" => std::future::pending::<()>().await,
                    _ => {}
                }
                Ok(resp)
            })
        }
    }

    fn req(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    #[tokio::test]
    async fn grpc_wrapper_counts_codes_from_headers() {
        let m = Metrics::new();
        let mut svc = m.grpc(Fake);
        svc.call(req("/test.Fake/Allocate")).await.unwrap();
        svc.call(req("/test.Fake/Allocate")).await.unwrap();
        svc.call(req("/test.Fake/Fail")).await.unwrap();
        // Dropped before it answers: the client went away.
        let hung = svc.call(req("/test.Fake/Hang"));
        assert!(
            tokio::time::timeout(Duration::from_millis(10), hung)
                .await
                .is_err()
        );
        let text = m.render(&[], &[]);
        let v = |method: &str, code: &str| {
            value(
                &text,
                &format!(
                    "ferry_ipamd_grpc_requests_total{{service=\"test.Fake\",method=\"{method}\",code=\"{code}\"}}"
                ),
            )
        };
        assert_eq!(v("Allocate", "OK").as_deref(), Some("2"), "{text}");
        assert_eq!(
            v("Fail", "FAILED_PRECONDITION").as_deref(),
            Some("1"),
            "{text}"
        );
        assert_eq!(v("Hang", "CANCELLED").as_deref(), Some("1"), "{text}");
        assert_eq!(
            value(
                &text,
                "ferry_ipamd_grpc_request_duration_seconds_count{service=\"test.Fake\",method=\"Allocate\"}"
            )
            .as_deref(),
            Some("2")
        );
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_over_a_real_core_and_404_elsewhere() {
        use crate::cluster::local::LocalCluster;
        use crate::ipam::IpamOptions;
        use crate::model::{AllocKey, AllocateParams, PodMeta};
        use crate::store::memory::MemoryStore;

        let ipam = Arc::new(
            Ipam::open(
                IpamOptions::one_pool_for_tests(),
                Arc::new(MemoryStore::new()),
                Arc::new(LocalCluster),
            )
            .await
            .unwrap(),
        );
        ipam.allocate(AllocateParams {
            key: AllocKey {
                network: "net".into(),
                container_id: "c1".into(),
                ifname: "eth0".into(),
            },
            pod: PodMeta::default(),
            requested_ips: vec![],
            pool_hint: None,
        })
        .await
        .unwrap();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve(listener, Metrics::new(), ipam.clone(), stop_rx));

        let resp = get(addr, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await;
        let (head, body) = resp.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        // 10.244.0.0/24 in /26 blocks: one block of 64 with one allocation;
        // the pool's network and broadcast addresses are not usable.
        let usage = &ipam.pools()[0];
        let block = &ipam.blocks(None)[0];
        assert_eq!(
            value(body, "ferry_ipamd_pool_allocations{pool=\"default\"}").as_deref(),
            Some("1")
        );
        assert_eq!(
            value(body, "ferry_ipamd_pool_size_addresses{pool=\"default\"}"),
            Some(usage.size.to_string())
        );
        assert_eq!(
            value(body, "ferry_ipamd_pool_free_addresses{pool=\"default\"}"),
            Some((block.size - 1).to_string()),
            "{body}"
        );

        let resp = get(addr, "GET /other HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.1 404 "), "{resp}");
        let resp = get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            resp.starts_with("HTTP/1.1 200 ") && resp.ends_with("\r\n\r\n"),
            "{resp}"
        );
        let resp = get(addr, "DELETE /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            resp.starts_with("HTTP/1.1 405 ") && resp.contains("Allow: GET"),
            "{resp}"
        );

        // A client that connects and says nothing does not hold up stop.
        let _idle = TcpStream::connect(addr).await.unwrap();
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve stops")
            .unwrap();
        assert_eq!(Arc::strong_count(&ipam), 1, "a connection kept the core");
    }

    #[tokio::test]
    async fn a_taken_address_is_a_clear_error() {
        let first = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = first.local_addr().unwrap();
        let e = bind(addr).await.unwrap_err().to_string();
        assert!(
            e.contains(&addr.to_string()) && e.contains("metrics"),
            "{e}"
        );
    }
}
