//! The wrapper around each tonic service (a tower `Service`) that counts and
//! times every gRPC request into [`Metrics`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::Code;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

use super::Metrics;

impl Metrics {
    /// Wraps a tonic service so every request through it is counted by
    /// method and gRPC code and timed (until the response headers).
    pub fn grpc<S>(&self, inner: S) -> Timed<S> {
        Timed {
            inner,
            metrics: self.clone(),
        }
    }
}

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
