//! What each command prints: the `--json` shapes (camelCase keys, a
//! contract for scripts) and the text tables for people.

use std::path::Path;

use anyhow::Context;
use ferry_proto::v1 as pb;
use serde::Serialize;

pub fn status(
    json: bool,
    s: &pb::StatusResponse,
    socket: &Path,
    now_ms: i64,
) -> anyhow::Result<()> {
    let readiness = readiness_name(s.readiness);
    if json {
        return print_json(&StatusJson {
            readiness,
            reason: s.reason.clone(),
            node: s.node.clone(),
            server_version: s.server_version.clone(),
            allocations: s.allocations,
            pools: s.pools,
            blocks: s.blocks,
            state_dir: s.state_dir.clone(),
            started_unix_ms: s.started_unix_ms,
            socket: socket.display().to_string(),
        });
    }
    println!("ipamd {} on node {}: {readiness}", s.server_version, s.node);
    if !s.reason.is_empty() {
        println!("  reason:      {}", s.reason);
    }
    println!("  socket:      {}", socket.display());
    println!("  state dir:   {}", s.state_dir);
    println!("  up:          {}", age(now_ms, s.started_unix_ms));
    println!(
        "  pools {}, blocks {}, allocations {}",
        s.pools, s.blocks, s.allocations
    );
    Ok(())
}

pub fn pools(json: bool, pools: &[pb::PoolUsage]) -> anyhow::Result<()> {
    print_list::<_, PoolJson>(json, pools, &POOL_HEADERS, pool_row)
}

pub fn pool_added(json: bool, added: &pb::Pool) -> anyhow::Result<()> {
    if json {
        return print_json(&PoolSpecJson::from(added));
    }
    println!(
        "added pool {} ({}, blocks /{}, namespaces {})",
        added.name,
        added.cidr,
        added.block_size,
        added.namespaces.join(",")
    );
    Ok(())
}

pub fn pool_removed(json: bool, name: &str) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::json!({ "removed": name }));
    }
    println!("removed pool {name}");
    Ok(())
}

pub fn blocks(json: bool, blocks: &[pb::Block], now_ms: i64) -> anyhow::Result<()> {
    let headers = [
        "CIDR",
        "POOL",
        "NODE",
        "SIZE",
        "ALLOCATED",
        "COOLING",
        "FREE",
        "AGE",
    ];
    print_list::<_, BlockJson>(json, blocks, &headers, |b| {
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
}

pub fn allocations(json: bool, all: &[pb::Allocation], now_ms: i64) -> anyhow::Result<()> {
    let headers = ["IP", "POOL", "NAMESPACE/POD", "CONTAINER", "IFNAME", "AGE"];
    print_list::<_, AllocationJson>(json, all, &headers, |a| {
        let a = AllocationJson::from(a);
        vec![
            a.ip,
            a.pool,
            format!("{}/{}", a.namespace, a.pod),
            short_id(&a.container_id),
            a.ifname,
            age(now_ms, a.created_unix_ms),
        ]
    })
}

/// `show` of one IP: its state, and who holds it.
pub fn address(json: bool, ip: &str, resp: &pb::ShowResponse, now_ms: i64) -> anyhow::Result<()> {
    let state = pb::AddressState::try_from(resp.state).unwrap_or(pb::AddressState::Unspecified);
    if json {
        return print_json(&ShowJson {
            ip: ip.to_string(),
            state: state_name(state),
            pool: resp.pool.clone(),
            block: resp.block.clone(),
            reusable_unix_ms: (state == pb::AddressState::Cooling).then_some(resp.reusable_unix_ms),
            allocations: resp.allocations.iter().map(AllocationJson::from).collect(),
        });
    }
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
        allocations(false, &resp.allocations, now_ms)?;
    }
    Ok(())
}

pub fn released(json: bool, target: &str, released: &[pb::Allocation]) -> anyhow::Result<()> {
    if json {
        return print_json(&ReleasedJson {
            released: released.iter().map(AllocationJson::from).collect(),
        });
    }
    if released.is_empty() {
        println!("nothing held by {target}; nothing released");
    }
    for a in released {
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
    Ok(())
}

/// `check`'s findings.
pub fn findings(json: bool, findings: &[pb::Finding]) -> anyhow::Result<()> {
    if findings.is_empty() && !json {
        println!("consistent: no findings");
        return Ok(());
    }
    print_list::<_, FindingJson>(json, findings, &["KIND", "DETAIL"], |f| {
        vec![f.kind.clone(), f.detail.clone()]
    })
}

/// What `gc` did, or with `dry_run` would do.
pub fn actions(json: bool, dry_run: bool, actions: &[pb::Finding]) -> anyhow::Result<()> {
    if actions.is_empty() && !json {
        println!("nothing to collect");
        return Ok(());
    }
    let headers = ["KIND", "ALLOCATION", "DETAIL"];
    print_list::<_, FindingJson>(json, actions, &headers, |f| {
        let allocation = f.allocation.as_ref().map_or("-".to_string(), |a| {
            let j = AllocationJson::from(a);
            format!("{} {} {}", j.ip, short_id(&j.container_id), j.ifname)
        });
        vec![f.kind.clone(), allocation, f.detail.clone()]
    })?;
    if dry_run && !json {
        println!("dry run: nothing was changed");
    }
    Ok(())
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn or_dash(s: String) -> String {
    if s.is_empty() { "-".to_string() } else { s }
}

pub fn pool_row(u: &pb::PoolUsage) -> Vec<String> {
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
}

pub const POOL_HEADERS: [&str; 12] = [
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

fn short_id(id: &str) -> String {
    id.chars().take(12).collect()
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v).context("encoding JSON")?;
    println!("{text}");
    Ok(())
}

/// `--json`: an array of one `J` per item; else a table of one row per item.
fn print_list<'a, T, J: Serialize + From<&'a T>>(
    json: bool,
    items: &'a [T],
    headers: &[&str],
    row: impl Fn(&'a T) -> Vec<String>,
) -> anyhow::Result<()> {
    if json {
        return print_json(&items.iter().map(J::from).collect::<Vec<_>>());
    }
    print_table(headers, items.iter().map(row).collect());
    Ok(())
}

/// Columns padded to their widest cell, two spaces apart; the last column
/// is not padded so lines carry no trailing blanks.
pub fn format_table(headers: &[&str], rows: &[Vec<String>]) -> String {
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

/// kubectl-style age: "42s", "7m", "3h", "12d".
pub fn age(now_ms: i64, then_ms: i64) -> String {
    if then_ms <= 0 {
        return "-".to_string();
    }
    duration_text(now_ms.saturating_sub(then_ms).max(0))
}

pub fn duration_text(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Unix milliseconds as an RFC 3339 UTC timestamp (second precision).
pub fn utc(ms: i64) -> String {
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
pub struct AllocationJson {
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
pub struct PoolJson {
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

impl From<&pb::Finding> for FindingJson {
    fn from(f: &pb::Finding) -> Self {
        FindingJson {
            kind: f.kind.clone(),
            detail: f.detail.clone(),
            allocation: f.allocation.as_ref().map(AllocationJson::from),
        }
    }
}
