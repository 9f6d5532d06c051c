//! ipamctl: the operator's view of one node's ipamd, over its Unix socket.
//! Human tables by default, `--json` (camelCase keys) for scripts. Errors
//! are one line on stderr, "ipamctl: <msg>", exit 1.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand};
use ferry_proto::v1 as pb;
use ferry_proto::v1::ipam_admin_client::IpamAdminClient;
use ferry_proto::v1::ipam_client::IpamClient;
use serde::Serialize;
use tonic::transport::Channel;

const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(name = "ipamctl", version, about = "inspect and repair ferry's ipamd")]
struct Cli {
    /// ipamd's Unix socket.
    #[arg(long, global = true, env = "FERRY_IPAMD_SOCKET", default_value = ferry_proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// JSON output (camelCase keys).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Readiness and counts; exits 0 only when ipamd is READY.
    Status,
    /// Pools, their options and their use (same as `pool ls`).
    Pools,
    /// Add, remove or list pools at run time.
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
    /// Blocks this ipamd knows of.
    Blocks {
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        pool: Option<String>,
    },
    /// Allocations, optionally filtered.
    Allocations {
        #[arg(long)]
        pool: Option<String>,
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long)]
        pod: Option<String>,
        /// A container ID or a unique prefix of one.
        #[arg(long)]
        container: Option<String>,
    },
    /// The state of an IP, or the allocations of a container (ID or prefix).
    Show { target: String },
    /// Force-release an IP, or every allocation of a container.
    Release { target: String },
    /// Compare allocations with the host veths (and the store).
    Check,
    /// Act on what `check` finds (release stale allocations, delete orphan
    /// veths); prints each action.
    Gc {
        /// Only print what would be done.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PoolCmd {
    /// Add a pool; it lasts across ipamd restarts until `pool rm`.
    Add(PoolAdd),
    /// Remove a pool added at run time; refused while it holds allocations.
    #[command(visible_alias = "remove")]
    Rm { name: String },
    /// List pools (same as `ipamctl pools`).
    #[command(visible_alias = "list")]
    Ls,
}

#[derive(Debug, clap::Args)]
struct PoolAdd {
    name: String,
    /// The pool's network, e.g. 10.50.0.0/24.
    cidr: String,
    /// Prefix length of the per-node blocks (default /26, or the pool's own
    /// prefix when it is smaller than that).
    #[arg(long, value_name = "N")]
    block_size: Option<u8>,
    /// A Kubernetes namespace this pool serves (repeatable). A pool with
    /// none would be a second default pool, which is refused.
    #[arg(long = "namespace", value_name = "NS")]
    namespaces: Vec<String>,
    /// Masquerade traffic leaving every cluster pool.
    #[arg(long)]
    nat_outgoing: bool,
    /// The source address for that SNAT (default: the node's).
    #[arg(long, value_name = "IP")]
    snat_address: Option<Ipv4Addr>,
    /// Drop traffic into this pool from other pools, except --allow-from.
    #[arg(long)]
    isolated: bool,
    /// A pool allowed into an isolated pool (repeatable).
    #[arg(long = "allow-from", value_name = "POOL")]
    allow_from: Vec<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ipamctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(socket: &Path) -> anyhow::Result<Channel> {
    ferry_proto::connect_uds(socket, TIMEOUT)
        .await
        .map_err(|e| match e {
            ferry_proto::ConnectError::NoSocket { path } => anyhow!(
                "ipamd is not running at {} (socket missing)",
                path.display()
            ),
            ferry_proto::ConnectError::Connect { path, source } => anyhow!(
                "cannot connect to ipamd at {}: {}",
                path.display(),
                ferry_proto::error_chain(&source)
            ),
        })
}

/// A failed call, named with the socket when the transport is at fault.
fn rpc_error(socket: &Path, s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unimplemented => anyhow!(
            "ipamd at {} does not support this command yet: {} (upgrade ipamd)",
            socket.display(),
            s.message()
        ),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => anyhow!(
            "ipamd at {} did not answer: {} ({:?})",
            socket.display(),
            s.message(),
            s.code()
        ),
        code => anyhow!("{} ({code:?})", s.message()),
    }
}

fn version() -> String {
    ferry_proto::CLIENT_VERSION.to_string()
}

async fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let channel = connect(&cli.socket).await?;
    let socket = cli.socket.as_path();
    let mut ipam = IpamClient::new(channel.clone());
    let mut admin = IpamAdminClient::new(channel);
    let err = |s| rpc_error(socket, s);
    let now_ms = now_unix_ms();

    match &cli.cmd {
        Cmd::Status => {
            let s = ipam
                .status(pb::StatusRequest {
                    client_version: version(),
                })
                .await
                .map_err(err)?
                .into_inner();
            let readiness = readiness_name(s.readiness);
            if cli.json {
                print_json(&StatusJson {
                    readiness,
                    reason: s.reason.clone(),
                    node: s.node.clone(),
                    server_version: s.server_version.clone(),
                    allocations: s.allocations,
                    pools: s.pools,
                    blocks: s.blocks,
                    state_dir: s.state_dir.clone(),
                    started_unix_ms: s.started_unix_ms,
                    socket: cli.socket.display().to_string(),
                })?;
            } else {
                println!("ipamd {} on node {}: {readiness}", s.server_version, s.node);
                if !s.reason.is_empty() {
                    println!("  reason:      {}", s.reason);
                }
                println!("  socket:      {}", cli.socket.display());
                println!("  state dir:   {}", s.state_dir);
                println!("  up:          {}", age(now_ms, s.started_unix_ms));
                println!(
                    "  pools {}, blocks {}, allocations {}",
                    s.pools, s.blocks, s.allocations
                );
            }
            let ready = s.readiness == pb::Readiness::Ready as i32;
            return Ok(if ready {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Cmd::Pools | Cmd::Pool { cmd: PoolCmd::Ls } => {
            let pools = admin
                .list_pools(pb::ListPoolsRequest {
                    client_version: version(),
                })
                .await
                .map_err(err)?
                .into_inner()
                .pools;
            if cli.json {
                print_json(&pools.iter().map(PoolJson::from).collect::<Vec<_>>())?;
            } else {
                print_pools(&pools);
            }
        }
        Cmd::Pool {
            cmd: PoolCmd::Add(a),
        } => {
            let added = admin
                .add_pool(pb::AddPoolRequest {
                    client_version: version(),
                    pool: Some(pool_request(a)),
                })
                .await
                .map_err(err)?
                .into_inner()
                .pool
                .unwrap_or_default();
            if cli.json {
                print_json(&PoolSpecJson::from(&added))?;
            } else {
                println!(
                    "added pool {} ({}, blocks /{}, namespaces {})",
                    added.name,
                    added.cidr,
                    added.block_size,
                    added.namespaces.join(",")
                );
            }
        }
        Cmd::Pool {
            cmd: PoolCmd::Rm { name },
        } => {
            admin
                .remove_pool(pb::RemovePoolRequest {
                    client_version: version(),
                    name: name.clone(),
                })
                .await
                .map_err(err)?;
            if cli.json {
                print_json(&serde_json::json!({ "removed": name }))?;
            } else {
                println!("removed pool {name}");
            }
        }
        Cmd::Blocks { node, pool } => {
            let blocks = admin
                .list_blocks(pb::ListBlocksRequest {
                    client_version: version(),
                    node: node.clone().unwrap_or_default(),
                    pool: pool.clone().unwrap_or_default(),
                })
                .await
                .map_err(err)?
                .into_inner()
                .blocks;
            if cli.json {
                print_json(&blocks.iter().map(BlockJson::from).collect::<Vec<_>>())?;
            } else {
                let rows = blocks
                    .iter()
                    .map(|b| {
                        vec![
                            b.cidr.clone(),
                            b.pool.clone(),
                            b.node.clone(),
                            b.size.to_string(),
                            b.allocated.to_string(),
                            b.cooling.to_string(),
                            block_free(b).to_string(),
                            age(now_ms, b.claimed_unix_ms),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "CIDR",
                        "POOL",
                        "NODE",
                        "SIZE",
                        "ALLOCATED",
                        "COOLING",
                        "FREE",
                        "AGE",
                    ],
                    rows,
                );
            }
        }
        Cmd::Allocations {
            pool,
            namespace,
            pod,
            container,
        } => {
            let allocations = admin
                .list_allocations(pb::ListAllocationsRequest {
                    client_version: version(),
                    filter: Some(pb::AllocationFilter {
                        pool: pool.clone().unwrap_or_default(),
                        namespace: namespace.clone().unwrap_or_default(),
                        pod: pod.clone().unwrap_or_default(),
                        container_id: container.clone().unwrap_or_default(),
                    }),
                })
                .await
                .map_err(err)?
                .into_inner()
                .allocations;
            print_allocations(cli.json, &allocations, now_ms)?;
        }
        Cmd::Show { target } => {
            let resp = admin
                .show(pb::ShowRequest {
                    client_version: version(),
                    target: Some(parse_target(target)),
                })
                .await
                .map_err(err)?
                .into_inner();
            return show(cli.json, target, &resp, now_ms);
        }
        Cmd::Release { target } => {
            let released = admin
                .force_release(pb::ForceReleaseRequest {
                    client_version: version(),
                    target: Some(parse_target(target)),
                })
                .await
                .map_err(err)?
                .into_inner()
                .released;
            if cli.json {
                print_json(&ReleasedJson {
                    released: released.iter().map(AllocationJson::from).collect(),
                })?;
            } else if released.is_empty() {
                println!("nothing held by {target}; nothing released");
            } else {
                for a in &released {
                    let j = AllocationJson::from(a);
                    println!(
                        "released {} (pool {}, pod {}/{}, container {}, {})",
                        j.ip,
                        j.pool,
                        j.namespace,
                        j.pod,
                        short_id(&j.container_id),
                        j.ifname
                    );
                }
            }
        }
        Cmd::Check => {
            let findings = admin
                .check_consistency(pb::CheckConsistencyRequest {
                    client_version: version(),
                })
                .await
                .map_err(err)?
                .into_inner()
                .findings;
            if cli.json {
                print_json(
                    &findings
                        .iter()
                        .map(|f| FindingJson {
                            kind: f.kind.clone(),
                            detail: f.detail.clone(),
                            allocation: f.allocation.as_ref().map(AllocationJson::from),
                        })
                        .collect::<Vec<_>>(),
                )?;
            } else if findings.is_empty() {
                println!("consistent: no findings");
            } else {
                let rows = findings
                    .iter()
                    .map(|f| vec![f.kind.clone(), f.detail.clone()])
                    .collect();
                print_table(&["KIND", "DETAIL"], rows);
            }
        }
        Cmd::Gc { dry_run } => {
            let actions = admin
                .collect_garbage(pb::CollectGarbageRequest {
                    client_version: version(),
                    dry_run: *dry_run,
                })
                .await
                .map_err(err)?
                .into_inner()
                .actions;
            print_actions(cli.json, *dry_run, &actions)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn pool_request(a: &PoolAdd) -> pb::Pool {
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

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn or_dash(s: String) -> String {
    if s.is_empty() { "-".to_string() } else { s }
}

fn pool_rows(pools: &[pb::PoolUsage]) -> Vec<Vec<String>> {
    pools
        .iter()
        .map(|u| {
            let p = u.pool.clone().unwrap_or_default();
            vec![
                p.name,
                p.cidr,
                format!("/{}", p.block_size),
                if p.is_default {
                    "(default)".to_string()
                } else {
                    p.namespaces.join(",")
                },
                yes_no(p.nat_outgoing),
                or_dash(p.snat_address),
                yes_no(p.isolated),
                or_dash(p.allow_from.join(",")),
                u.size.to_string(),
                u.allocated.to_string(),
                u.cooling.to_string(),
                u.blocks.to_string(),
            ]
        })
        .collect()
}

const POOL_HEADERS: [&str; 12] = [
    "NAME",
    "CIDR",
    "BLOCK",
    "NAMESPACES",
    "NAT",
    "SNAT",
    "ISOLATED",
    "ALLOW-FROM",
    "SIZE",
    "ALLOCATED",
    "COOLING",
    "BLOCKS",
];

fn print_pools(pools: &[pb::PoolUsage]) {
    print_table(&POOL_HEADERS, pool_rows(pools));
}

fn print_actions(json: bool, dry_run: bool, actions: &[pb::Finding]) -> anyhow::Result<()> {
    if json {
        return print_json(
            &actions
                .iter()
                .map(|f| FindingJson {
                    kind: f.kind.clone(),
                    detail: f.detail.clone(),
                    allocation: f.allocation.as_ref().map(AllocationJson::from),
                })
                .collect::<Vec<_>>(),
        );
    }
    if actions.is_empty() {
        println!("nothing to collect");
        return Ok(());
    }
    let rows = actions
        .iter()
        .map(|f| {
            let allocation = f.allocation.as_ref().map_or("-".to_string(), |a| {
                let j = AllocationJson::from(a);
                format!("{} {} {}", j.ip, short_id(&j.container_id), j.ifname)
            });
            vec![f.kind.clone(), allocation, f.detail.clone()]
        })
        .collect();
    print_table(&["KIND", "ALLOCATION", "DETAIL"], rows);
    if dry_run {
        println!("dry run: nothing was changed");
    }
    Ok(())
}

/// An IPv4 address (optionally with a prefix) is an IP; anything else is a
/// container ID or a prefix of one.
fn parse_target(t: &str) -> pb::Target {
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

fn show(
    json: bool,
    target: &str,
    resp: &pb::ShowResponse,
    now_ms: i64,
) -> anyhow::Result<ExitCode> {
    let by_ip = matches!(parse_target(target).target, Some(pb::target::Target::Ip(_)));
    if !by_ip {
        if resp.allocations.is_empty() {
            return Err(anyhow!("no allocations for container {target}"));
        }
        print_allocations(json, &resp.allocations, now_ms)?;
        return Ok(ExitCode::SUCCESS);
    }
    let state = pb::AddressState::try_from(resp.state).unwrap_or(pb::AddressState::Unspecified);
    if json {
        print_json(&ShowJson {
            ip: parse_target_ip(target),
            state: state_name(state),
            pool: resp.pool.clone(),
            block: resp.block.clone(),
            reusable_unix_ms: (state == pb::AddressState::Cooling).then_some(resp.reusable_unix_ms),
            allocations: resp.allocations.iter().map(AllocationJson::from).collect(),
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    let ip = parse_target_ip(target);
    let place = if resp.block.is_empty() {
        String::new()
    } else {
        format!(" (pool {}, block {})", resp.pool, resp.block)
    };
    let what = match state {
        pb::AddressState::NotOwned => "not owned by this node".to_string(),
        pb::AddressState::Free => "free".to_string(),
        pb::AddressState::Allocated => "allocated".to_string(),
        pb::AddressState::Cooling => {
            let left = resp.reusable_unix_ms.saturating_sub(now_ms);
            format!(
                "cooling until {} (reusable in {})",
                utc(resp.reusable_unix_ms),
                duration_text(left.max(0))
            )
        }
        pb::AddressState::Reserved => "reserved (never handed out)".to_string(),
        pb::AddressState::Unspecified => "unknown".to_string(),
    };
    println!("{ip}: {what}{place}");
    if !resp.allocations.is_empty() {
        print_allocations(false, &resp.allocations, now_ms)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_target_ip(target: &str) -> String {
    let t = target.trim();
    t.split_once('/').map_or(t, |(a, _)| a).to_string()
}

fn print_allocations(json: bool, all: &[pb::Allocation], now_ms: i64) -> anyhow::Result<()> {
    if json {
        return print_json(&all.iter().map(AllocationJson::from).collect::<Vec<_>>());
    }
    let rows = all
        .iter()
        .map(AllocationJson::from)
        .map(|a| {
            vec![
                a.ip,
                a.pool,
                format!("{}/{}", a.namespace, a.pod),
                short_id(&a.container_id),
                a.ifname,
                age(now_ms, a.created_unix_ms),
            ]
        })
        .collect();
    print_table(
        &["IP", "POOL", "NAMESPACE/POD", "CONTAINER", "IFNAME", "AGE"],
        rows,
    );
    Ok(())
}

fn short_id(id: &str) -> String {
    id.chars().take(12).collect()
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v).context("encoding JSON")?;
    println!("{text}");
    Ok(())
}

/// Columns padded to their widest cell, two spaces apart; the last column
/// is not padded so lines carry no trailing blanks.
fn format_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push('\n');
    }
    out
}

fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    print!("{}", format_table(headers, &rows));
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// kubectl-style age: "42s", "7m", "3h", "12d".
fn age(now_ms: i64, then_ms: i64) -> String {
    if then_ms <= 0 {
        return "-".to_string();
    }
    duration_text(now_ms.saturating_sub(then_ms).max(0))
}

fn duration_text(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Unix milliseconds as an RFC 3339 UTC timestamp (second precision).
fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn readiness_name(r: i32) -> &'static str {
    match pb::Readiness::try_from(r) {
        Ok(pb::Readiness::Ready) => "READY",
        Ok(pb::Readiness::NotAvailable) => "NOT_AVAILABLE",
        Ok(pb::Readiness::NoAddresses) => "NO_ADDRESSES",
        _ => "UNKNOWN",
    }
}

fn state_name(s: pb::AddressState) -> &'static str {
    match s {
        pb::AddressState::NotOwned => "not-owned",
        pb::AddressState::Free => "free",
        pb::AddressState::Allocated => "allocated",
        pb::AddressState::Cooling => "cooling",
        pb::AddressState::Reserved => "reserved",
        pb::AddressState::Unspecified => "unknown",
    }
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct AllocationJson {
    ip: String,
    container_id: String,
    ifname: String,
    network: String,
    pool: String,
    block: String,
    namespace: String,
    pod: String,
    pod_uid: String,
    netns: String,
    created_unix_ms: i64,
}

impl From<&pb::Allocation> for AllocationJson {
    fn from(a: &pb::Allocation) -> Self {
        let key = a.key.clone().unwrap_or_default();
        let pod = a.pod.clone().unwrap_or_default();
        AllocationJson {
            ip: a.ip.clone(),
            container_id: key.container_id,
            ifname: key.ifname,
            network: key.network,
            pool: a.pool.clone(),
            block: a.block.clone(),
            namespace: pod.namespace,
            pod: pod.name,
            pod_uid: pod.uid,
            netns: pod.netns,
            created_unix_ms: a.created_unix_ms,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusJson {
    readiness: &'static str,
    reason: String,
    node: String,
    server_version: String,
    allocations: u64,
    pools: u32,
    blocks: u32,
    state_dir: String,
    started_unix_ms: i64,
    socket: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PoolJson {
    #[serde(flatten)]
    pool: PoolSpecJson,
    size: u64,
    allocated: u64,
    cooling: u64,
    blocks: u32,
}

impl From<&pb::PoolUsage> for PoolJson {
    fn from(u: &pb::PoolUsage) -> Self {
        PoolJson {
            pool: PoolSpecJson::from(&u.pool.clone().unwrap_or_default()),
            size: u.size,
            allocated: u.allocated,
            cooling: u.cooling,
            blocks: u.blocks,
        }
    }
}

/// A pool without its use, as `pool add` prints it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PoolSpecJson {
    name: String,
    cidr: String,
    block_size: u32,
    namespaces: Vec<String>,
    nat_outgoing: bool,
    snat_address: String,
    isolated: bool,
    allow_from: Vec<String>,
    is_default: bool,
}

impl From<&pb::Pool> for PoolSpecJson {
    fn from(p: &pb::Pool) -> Self {
        PoolSpecJson {
            name: p.name.clone(),
            cidr: p.cidr.clone(),
            block_size: p.block_size,
            namespaces: p.namespaces.clone(),
            nat_outgoing: p.nat_outgoing,
            snat_address: p.snat_address.clone(),
            isolated: p.isolated,
            allow_from: p.allow_from.clone(),
            is_default: p.is_default,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BlockJson {
    cidr: String,
    pool: String,
    node: String,
    size: u32,
    allocated: u32,
    cooling: u32,
    free: u32,
    claimed_unix_ms: i64,
}

/// Addresses of the block that can be handed out now.
fn block_free(b: &pb::Block) -> u32 {
    b.size.saturating_sub(b.allocated).saturating_sub(b.cooling)
}

impl From<&pb::Block> for BlockJson {
    fn from(b: &pb::Block) -> Self {
        BlockJson {
            cidr: b.cidr.clone(),
            pool: b.pool.clone(),
            node: b.node.clone(),
            size: b.size,
            allocated: b.allocated,
            cooling: b.cooling,
            free: block_free(b),
            claimed_unix_ms: b.claimed_unix_ms,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ShowJson {
    ip: String,
    state: &'static str,
    pool: String,
    block: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    reusable_unix_ms: Option<i64>,
    allocations: Vec<AllocationJson>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReleasedJson {
    released: Vec<AllocationJson>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FindingJson {
    kind: String,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    allocation: Option<AllocationJson>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_flag_works_before_or_after_the_subcommand() {
        let a = Cli::try_parse_from(["ipamctl", "--json", "status"]).unwrap();
        let b = Cli::try_parse_from(["ipamctl", "status", "--json"]).unwrap();
        assert!(a.json && b.json);
        let c =
            Cli::try_parse_from(["ipamctl", "show", "10.0.0.1", "--socket", "/x.sock"]).unwrap();
        assert_eq!(c.socket, PathBuf::from("/x.sock"));
    }

    #[test]
    fn pool_and_gc_commands_parse() {
        let c = Cli::try_parse_from([
            "ipamctl",
            "pool",
            "add",
            "blue",
            "10.50.0.0/24",
            "--block-size",
            "28",
            "--namespace",
            "a",
            "--namespace",
            "b",
            "--nat-outgoing",
            "--snat-address",
            "192.0.2.7",
            "--isolated",
            "--allow-from",
            "default",
            "--json",
        ])
        .unwrap();
        assert!(c.json);
        let Cmd::Pool {
            cmd: PoolCmd::Add(a),
        } = &c.cmd
        else {
            panic!("{c:?}")
        };
        let p = pool_request(a);
        assert_eq!(
            (p.name.as_str(), p.cidr.as_str(), p.block_size),
            ("blue", "10.50.0.0/24", 28)
        );
        assert_eq!(p.namespaces, ["a", "b"]);
        assert!(p.nat_outgoing && p.isolated);
        assert_eq!(p.snat_address, "192.0.2.7");
        assert_eq!(p.allow_from, ["default"]);
        assert!(
            Cli::try_parse_from([
                "ipamctl",
                "pool",
                "add",
                "x",
                "10.0.0.0/24",
                "--snat-address",
                "nope"
            ])
            .is_err()
        );
        for argv in [["ipamctl", "pool", "ls"], ["ipamctl", "pool", "list"]] {
            let c = Cli::try_parse_from(argv).unwrap();
            assert!(matches!(c.cmd, Cmd::Pool { cmd: PoolCmd::Ls }));
        }
        let c = Cli::try_parse_from(["ipamctl", "pool", "rm", "blue"]).unwrap();
        assert!(matches!(c.cmd, Cmd::Pool { cmd: PoolCmd::Rm { ref name } } if name == "blue"));
        let c = Cli::try_parse_from(["ipamctl", "gc", "--dry-run", "--json"]).unwrap();
        assert!(c.json && matches!(c.cmd, Cmd::Gc { dry_run: true }));
        let c = Cli::try_parse_from(["ipamctl", "gc"]).unwrap();
        assert!(matches!(c.cmd, Cmd::Gc { dry_run: false }));
    }

    #[test]
    fn pool_rows_show_every_option() {
        let u = pb::PoolUsage {
            pool: Some(pb::Pool {
                name: "blue".into(),
                cidr: "10.50.0.0/24".into(),
                block_size: 28,
                namespaces: vec!["a".into(), "b".into()],
                nat_outgoing: true,
                snat_address: "192.0.2.7".into(),
                isolated: true,
                allow_from: vec!["default".into()],
                is_default: false,
            }),
            size: 254,
            allocated: 3,
            cooling: 1,
            blocks: 1,
        };
        assert_eq!(
            pool_rows(std::slice::from_ref(&u)),
            vec![vec![
                "blue",
                "10.50.0.0/24",
                "/28",
                "a,b",
                "yes",
                "192.0.2.7",
                "yes",
                "default",
                "254",
                "3",
                "1",
                "1"
            ]]
        );
        assert_eq!(pool_rows(&[u])[0].len(), POOL_HEADERS.len());
        let v = serde_json::to_value(PoolJson::from(&pb::PoolUsage::default())).unwrap();
        for k in [
            "name",
            "cidr",
            "blockSize",
            "namespaces",
            "natOutgoing",
            "snatAddress",
            "isolated",
            "allowFrom",
            "isDefault",
            "size",
            "allocated",
            "cooling",
            "blocks",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
    }

    #[test]
    fn targets() {
        assert!(matches!(
            parse_target("10.244.0.5").target,
            Some(pb::target::Target::Ip(ip)) if ip == "10.244.0.5"
        ));
        assert!(matches!(
            parse_target("10.244.0.5/32").target,
            Some(pb::target::Target::Ip(ip)) if ip == "10.244.0.5"
        ));
        assert!(matches!(
            parse_target("abcdef012345").target,
            Some(pb::target::Target::ContainerId(c)) if c == "abcdef012345"
        ));
    }

    #[test]
    fn allocation_json_has_contract_keys() {
        let a = pb::Allocation {
            key: Some(pb::AllocationKey {
                network: "ferry".into(),
                container_id: "c".into(),
                ifname: "eth0".into(),
            }),
            ip: "10.0.0.1".into(),
            pool: "default".into(),
            block: "10.0.0.0/26".into(),
            pod: Some(pb::PodMeta {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u".into(),
                netns: "/n".into(),
            }),
            created_unix_ms: 5,
        };
        let v = serde_json::to_value(AllocationJson::from(&a)).unwrap();
        for k in [
            "ip",
            "containerId",
            "ifname",
            "network",
            "pool",
            "block",
            "namespace",
            "pod",
            "podUid",
            "netns",
            "createdUnixMs",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
    }

    #[test]
    fn tables_align() {
        let t = format_table(
            &["IP", "POOL"],
            &[
                vec!["10.0.0.1".into(), "default".into()],
                vec!["10.0.0.10".into(), "a".into()],
            ],
        );
        assert_eq!(t, "IP         POOL\n10.0.0.1   default\n10.0.0.10  a\n");
    }

    #[test]
    fn times() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000_500), "2023-11-14T22:13:20Z");
        assert_eq!(duration_text(5_000), "5s");
        assert_eq!(duration_text(600_000), "10m");
        assert_eq!(duration_text(3 * 86_400_000), "3d");
        assert_eq!(age(10, 0), "-");
    }
}
