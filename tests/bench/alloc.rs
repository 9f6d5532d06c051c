//! ipamd Allocate throughput: N concurrent gRPC clients, each with its own
//! connection (as N plugin processes would have), unique keys, every reply
//! durable before it is sent (ipamd's contract).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_proto::v1::ipam_client::IpamClient;
use ferry_proto::v1::{AllocateRequest, AllocationKey, PodMeta, ReleaseRequest};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::stats::Summary;

const NETWORK: &str = "bench";

/// The figures for one level of concurrency.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AllocLevel {
    pub clients: usize,
    pub allocs: usize,
    pub errors: usize,
    pub wall_ms: f64,
    pub allocs_per_sec: f64,
    pub latency: Summary,
    pub releases_per_sec: f64,
    pub release_errors: usize,
    pub first_error: Option<String>,
    /// ipamd's CPU time (user + system) per Allocate, in microseconds.
    pub ipamd_cpu_us_per_alloc: Option<f64>,
    /// This bench's own CPU time per Allocate (the gRPC clients), in microseconds.
    pub client_cpu_us_per_alloc: Option<f64>,
}

/// user + system CPU time of `pid` (or of this process when `None`), in µs.
fn cpu_us(pid: Option<u32>) -> Option<f64> {
    let stat = match pid {
        Some(p) => std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?,
        None => std::fs::read_to_string("/proc/self/stat").ok()?,
    };
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks * 1e6 / hz as f64)
}

fn key(level: usize, i: usize) -> AllocationKey {
    AllocationKey {
        network: NETWORK.into(),
        container_id: format!("bench-c{level}-{i:08}"),
        ifname: "eth0".into(),
    }
}

pub(crate) async fn client(socket: &Path) -> Result<IpamClient<Channel>> {
    let channel = ferry_proto::connect_uds(socket, Duration::from_secs(10))
        .await
        .context("connecting to ipamd")?;
    Ok(IpamClient::new(channel))
}

/// Runs Allocate at each concurrency level in `levels`, `allocs` per level,
/// then releases that level's addresses (also timed) before the next.
pub async fn run(
    socket: &Path,
    ipamd_pid: Option<u32>,
    levels: &[usize],
    allocs: usize,
    stop: &'static AtomicBool,
) -> Result<Vec<AllocLevel>> {
    // Warm-up: the first block claim and the first flush, not counted.
    let mut warm = client(socket).await?;
    for i in 0..16 {
        let k = key(0, i);
        warm.allocate(allocate_request(&k))
            .await
            .context("warm-up Allocate")?;
        warm.release(release_request(&k))
            .await
            .context("warm-up Release")?;
    }

    let mut out = Vec::new();
    for &clients in levels {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        eprintln!("bench: ipamd Allocate with {clients} client(s) ...");
        out.push(level(socket, ipamd_pid, clients, allocs, stop).await?);
    }
    Ok(out)
}

fn allocate_request(k: &AllocationKey) -> AllocateRequest {
    AllocateRequest {
        client_version: ferry_proto::PROTOCOL_VERSION.into(),
        key: Some(k.clone()),
        pod: Some(PodMeta {
            namespace: "bench".into(),
            name: k.container_id.clone(),
            uid: k.container_id.clone(),
            netns: String::new(),
        }),
        requested_ips: vec![],
        pool_hint: String::new(),
    }
}

fn release_request(k: &AllocationKey) -> ReleaseRequest {
    ReleaseRequest {
        client_version: ferry_proto::PROTOCOL_VERSION.into(),
        key: Some(k.clone()),
        host_link: None,
    }
}

#[derive(Clone, Copy)]
pub(crate) enum Op {
    Allocate,
    Release,
}

pub(crate) struct Pass {
    pub wall_ms: f64,
    pub latencies_ms: Vec<f64>,
    pub errors: usize,
    pub first_error: Option<String>,
}

async fn level(
    socket: &Path,
    ipamd_pid: Option<u32>,
    clients: usize,
    allocs: usize,
    stop: &'static AtomicBool,
) -> Result<AllocLevel> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(client(socket).await?);
    }
    let (ipamd_before, client_before) = (cpu_us(ipamd_pid), cpu_us(None));
    let alloc = pass(&conns, clients, allocs, Op::Allocate, stop).await?;
    let (ipamd_after, client_after) = (cpu_us(ipamd_pid), cpu_us(None));
    let per_alloc = |before: Option<f64>, after: Option<f64>| {
        let n = alloc.latencies_ms.len();
        match (before, after) {
            (Some(b), Some(a)) if n > 0 && ipamd_pid.is_some() => Some((a - b) / n as f64),
            _ => None,
        }
    };
    let ipamd_cpu_us_per_alloc = per_alloc(ipamd_before, ipamd_after);
    let client_cpu_us_per_alloc = per_alloc(client_before, client_after);
    let release = pass(&conns, clients, allocs, Op::Release, stop).await?;
    let ok = alloc.latencies_ms.len();
    Ok(AllocLevel {
        clients,
        allocs,
        errors: alloc.errors,
        wall_ms: alloc.wall_ms,
        allocs_per_sec: ok as f64 / (alloc.wall_ms / 1e3),
        latency: Summary::of(&alloc.latencies_ms),
        releases_per_sec: release.latencies_ms.len() as f64 / (release.wall_ms / 1e3),
        release_errors: release.errors,
        first_error: alloc.first_error.or(release.first_error),
        ipamd_cpu_us_per_alloc,
        client_cpu_us_per_alloc,
    })
}

/// `allocs` operations spread over the connections, each client taking the
/// next index from a shared counter until none are left. `level` only names
/// the keys (`bench-c<level>-<i>`).
pub(crate) async fn pass(
    conns: &[IpamClient<Channel>],
    level: usize,
    allocs: usize,
    op: Op,
    stop: &'static AtomicBool,
) -> Result<Pass> {
    pass_paced(conns, level, allocs, op, Duration::ZERO, stop).await
}

/// [`pass`] where each client pauses `gap` after each call (the clients'
/// starts spread over one `gap`), so the pass lasts longer at the same count.
pub(crate) async fn pass_paced(
    conns: &[IpamClient<Channel>],
    level: usize,
    allocs: usize,
    op: Op,
    gap: Duration,
    stop: &'static AtomicBool,
) -> Result<Pass> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let n = conns.len().max(1) as u32;
    let tasks: Vec<_> = conns
        .iter()
        .cloned()
        .enumerate()
        .map(|(j, mut c)| {
            let next = next.clone();
            tokio::spawn(async move {
                if !gap.is_zero() {
                    tokio::time::sleep(gap * j as u32 / n).await;
                }
                let mut lat = Vec::new();
                let mut errors = 0usize;
                let mut first_error = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= allocs || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let k = key(level, i);
                    let t = Instant::now();
                    let r = match op {
                        Op::Allocate => c.allocate(allocate_request(&k)).await.map(|_| ()),
                        Op::Release => c.release(release_request(&k)).await.map(|_| ()),
                    };
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    match r {
                        Ok(()) => lat.push(ms),
                        Err(status) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| {
                                format!("{:?}: {}", status.code(), status.message())
                            });
                        }
                    }
                    if !gap.is_zero() {
                        tokio::time::sleep(gap).await;
                    }
                }
                (lat, errors, first_error)
            })
        })
        .collect();
    let mut latencies_ms = Vec::with_capacity(allocs);
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (lat, e, fe) = t.await.context("client task")?;
        latencies_ms.extend(lat);
        errors += e;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    let wall_ms = start.elapsed().as_secs_f64() * 1e3;
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(Pass {
        wall_ms,
        latencies_ms,
        errors,
        first_error,
    })
}
