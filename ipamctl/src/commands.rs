//! One function per command: build the request, ask ipamd, print the answer.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::anyhow;
use ferry_proto::v1 as pb;

use crate::client::Ipamd;
use crate::{Cli, Cmd, PoolAdd, PoolCmd, render};

pub async fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let mut ipamd = Ipamd::connect(&cli.socket).await?;
    let json = cli.json;
    let now_ms = now_unix_ms();
    match &cli.cmd {
        Cmd::Status => return status(&mut ipamd, json, &cli.socket, now_ms).await,
        Cmd::Pools | Cmd::Pool { cmd: PoolCmd::Ls } => pools(&mut ipamd, json).await?,
        Cmd::Pool {
            cmd: PoolCmd::Add(add),
        } => add_pool(&mut ipamd, json, add).await?,
        Cmd::Pool {
            cmd: PoolCmd::Rm { name },
        } => remove_pool(&mut ipamd, json, name).await?,
        Cmd::Blocks { node, pool } => blocks(&mut ipamd, json, node, pool, now_ms).await?,
        Cmd::Allocations {
            pool,
            namespace,
            pod,
            container,
        } => {
            let filter = pb::AllocationFilter {
                pool: pool.clone().unwrap_or_default(),
                namespace: namespace.clone().unwrap_or_default(),
                pod: pod.clone().unwrap_or_default(),
                container_id: container.clone().unwrap_or_default(),
            };
            allocations(&mut ipamd, json, filter, now_ms).await?
        }
        Cmd::Show { target } => show(&mut ipamd, json, target, now_ms).await?,
        Cmd::Release { target } => release(&mut ipamd, json, target).await?,
        Cmd::Check => check(&mut ipamd, json).await?,
        Cmd::Gc { dry_run } => gc(&mut ipamd, json, *dry_run).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Exits 0 only when ipamd is READY, so scripts can wait on it.
async fn status(
    ipamd: &mut Ipamd,
    json: bool,
    socket: &Path,
    now_ms: i64,
) -> anyhow::Result<ExitCode> {
    let s = ipamd.call(pb::StatusRequest::default()).await?;
    render::status(json, &s, socket, now_ms)?;
    Ok(if s.readiness == pb::Readiness::Ready as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn pools(ipamd: &mut Ipamd, json: bool) -> anyhow::Result<()> {
    let pools = ipamd.call(pb::ListPoolsRequest::default()).await?.pools;
    render::pools(json, &pools)
}

async fn add_pool(ipamd: &mut Ipamd, json: bool, add: &PoolAdd) -> anyhow::Result<()> {
    let request = pb::AddPoolRequest {
        pool: Some(pool_request(add)),
        ..Default::default()
    };
    let added = ipamd.call(request).await?.pool.unwrap_or_default();
    render::pool_added(json, &added)
}

async fn remove_pool(ipamd: &mut Ipamd, json: bool, name: &str) -> anyhow::Result<()> {
    let request = pb::RemovePoolRequest {
        name: name.to_string(),
        ..Default::default()
    };
    ipamd.call(request).await?;
    render::pool_removed(json, name)
}

async fn blocks(
    ipamd: &mut Ipamd,
    json: bool,
    node: &Option<String>,
    pool: &Option<String>,
    now_ms: i64,
) -> anyhow::Result<()> {
    let request = pb::ListBlocksRequest {
        node: node.clone().unwrap_or_default(),
        pool: pool.clone().unwrap_or_default(),
        ..Default::default()
    };
    let blocks = ipamd.call(request).await?.blocks;
    render::blocks(json, &blocks, now_ms)
}

async fn allocations(
    ipamd: &mut Ipamd,
    json: bool,
    filter: pb::AllocationFilter,
    now_ms: i64,
) -> anyhow::Result<()> {
    let request = pb::ListAllocationsRequest {
        filter: Some(filter),
        ..Default::default()
    };
    let allocations = ipamd.call(request).await?.allocations;
    render::allocations(json, &allocations, now_ms)
}

/// An IP's state, or a container's allocations (an error when it has none).
async fn show(ipamd: &mut Ipamd, json: bool, target: &str, now_ms: i64) -> anyhow::Result<()> {
    let parsed = parse_target(target);
    let ip = match &parsed.target {
        Some(pb::target::Target::Ip(ip)) => Some(ip.clone()),
        _ => None,
    };
    let request = pb::ShowRequest {
        target: Some(parsed),
        ..Default::default()
    };
    let resp = ipamd.call(request).await?;
    match ip {
        Some(ip) => render::address(json, &ip, &resp, now_ms),
        None if resp.allocations.is_empty() => {
            Err(anyhow!("no allocations for container {target}"))
        }
        None => render::allocations(json, &resp.allocations, now_ms),
    }
}

async fn release(ipamd: &mut Ipamd, json: bool, target: &str) -> anyhow::Result<()> {
    let request = pb::ForceReleaseRequest {
        target: Some(parse_target(target)),
        ..Default::default()
    };
    let released = ipamd.call(request).await?.released;
    render::released(json, target, &released)
}

async fn check(ipamd: &mut Ipamd, json: bool) -> anyhow::Result<()> {
    let request = pb::CheckConsistencyRequest::default();
    let findings = ipamd.call(request).await?.findings;
    render::findings(json, &findings)
}

async fn gc(ipamd: &mut Ipamd, json: bool, dry_run: bool) -> anyhow::Result<()> {
    let request = pb::CollectGarbageRequest {
        dry_run,
        ..Default::default()
    };
    let actions = ipamd.call(request).await?.actions;
    render::actions(json, dry_run, &actions)
}

pub fn pool_request(a: &PoolAdd) -> pb::Pool {
    pb::Pool {
        name: a.name.clone(),
        cidr: a.cidr.clone(),
        // 0 lets ipamd pick its default.
        block_size: a.block_size.map(u32::from).unwrap_or(0),
        namespaces: a.namespaces.clone(),
        nat_outgoing: a.nat_outgoing,
        snat_address: a.snat_address.map(|ip| ip.to_string()).unwrap_or_default(),
        isolated: a.isolated,
        allow_from: a.allow_from.clone(),
        is_default: false,
    }
}

/// An IPv4 address (optionally with a prefix) is an IP; anything else is a
/// container ID or a prefix of one.
pub fn parse_target(t: &str) -> pb::Target {
    let t = t.trim();
    let addr = t.split_once('/').map_or(t, |(a, _)| a);
    let target = if addr.parse::<Ipv4Addr>().is_ok() {
        pb::target::Target::Ip(addr.to_string())
    } else {
        pb::target::Target::ContainerId(t.to_string())
    };
    pb::Target {
        target: Some(target),
    }
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
