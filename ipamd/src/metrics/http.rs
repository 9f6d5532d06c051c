//! `GET /metrics` over a hand-written HTTP/1.1 responder: it answers one
//! path, closes every connection after one response, and needs no HTTP
//! crate. It binds 127.0.0.1 by default; the address is the operator's
//! choice.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::{CONTENT_TYPE, Metrics};
use crate::ipam::Ipam;

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
pub(super) enum Route {
    Metrics { head_only: bool },
    MethodNotAllowed,
    NotFound,
    BadRequest,
}

pub(super) fn route(request_line: &str) -> Route {
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
