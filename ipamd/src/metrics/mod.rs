//! Prometheus metrics for ipamd, one concern per file:
//! - here, the counters and histograms ipamd records into ([`Metrics`]);
//! - `layer`, the wrapper that counts and times every gRPC request
//!   ([`Metrics::grpc`]);
//! - `exposition`, the text format 0.0.4 a scrape gets ([`Metrics::render`]);
//! - `http`, the `GET /metrics` listener ([`bind`], [`serve`]).
//!
//! Pool gauges are not kept here: they are read from the core at scrape
//! time, so they can never drift from what `ipamctl pools` shows.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tonic::Code;

use crate::model::Finding;

mod exposition;
mod http;
mod layer;
#[cfg(test)]
mod tests;

pub use exposition::{CONTENT_TYPE, PREFIX, escape_label_value};
pub use http::{BindError, bind, serve};
pub use layer::Timed;

/// Upper bounds of the latency buckets in seconds: 0.1 ms to 1 s (the
/// plugin's own timeout is a few seconds; anything slower is just "+Inf").
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Distinct (service, method) series at most; further names count as
/// method "other", so a client inventing method names cannot grow memory.
const MAX_METHOD_SERIES: usize = 64;

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
}

/// The canonical gRPC code names, as the gRPC spec spells them; they are
/// the `code` label of `grpc_requests_total`.
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
