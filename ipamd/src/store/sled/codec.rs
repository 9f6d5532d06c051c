//! How records are laid out in sled, and a batch of mutations as writes.
//!
//! Layout under `state_dir/db` (sled's own directory), one tree each:
//! - `pools`:       name -> JSON PoolSpec
//! - `blocks`:      pool \0 cidr -> JSON BlockClaim
//! - `allocations`: network \0 container_id \0 ifname -> JSON Allocation
//! - `ips`:         ip octets -> allocation key (the reverse index)
//! - `cooling`:     released_unix_ms (u64 BE) ++ ip octets -> empty,
//!   so iteration order is FIFO release order.
//! - `meta`:        `flushes` -> u64 BE, bumped by every group commit.

use std::net::Ipv4Addr;

use crate::model::AllocKey;
use crate::store::{Mutation, StoreError};

pub(super) const TREE_POOLS: &str = "pools";
pub(super) const TREE_BLOCKS: &str = "blocks";
pub(super) const TREE_ALLOCATIONS: &str = "allocations";
pub(super) const TREE_IPS: &str = "ips";
pub(super) const TREE_COOLING: &str = "cooling";
pub(super) const TREE_META: &str = "meta";

pub(super) fn alloc_key_bytes(k: &AllocKey) -> Vec<u8> {
    let mut v = Vec::with_capacity(k.network.len() + k.container_id.len() + k.ifname.len() + 2);
    v.extend_from_slice(k.network.as_bytes());
    v.push(0);
    v.extend_from_slice(k.container_id.as_bytes());
    v.push(0);
    v.extend_from_slice(k.ifname.as_bytes());
    v
}

pub(super) fn block_key_bytes(pool: &str, cidr: ipnet::Ipv4Net) -> Vec<u8> {
    format!("{pool}\0{cidr}").into_bytes()
}

pub(super) fn cooling_key(released_unix_ms: i64, ip: Ipv4Addr) -> [u8; 12] {
    // Times before 1970 do not occur; clamping keeps the key unsigned.
    let t = u64::try_from(released_unix_ms).unwrap_or(0);
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&t.to_be_bytes());
    k[8..].copy_from_slice(&ip.octets());
    k
}

fn show_key(tree: &str, k: &[u8]) -> String {
    match (tree, k.len()) {
        (TREE_IPS, 4) => format!("{tree}/{}", Ipv4Addr::new(k[0], k[1], k[2], k[3])),
        (TREE_COOLING, 12) => {
            let mut t = [0u8; 8];
            t.copy_from_slice(&k[..8]);
            format!(
                "{tree}/{}@{}",
                Ipv4Addr::new(k[8], k[9], k[10], k[11]),
                u64::from_be_bytes(t)
            )
        }
        _ => format!("{tree}/{}", String::from_utf8_lossy(k).replace('\0', "\\0")),
    }
}

pub(super) fn corrupt(tree: &str, k: &[u8], reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: show_key(tree, k),
        reason: reason.into(),
    }
}

pub(super) fn decode_ip(tree: &str, k: &[u8]) -> Result<Ipv4Addr, StoreError> {
    let o: [u8; 4] = k.try_into().map_err(|_| {
        corrupt(
            tree,
            k,
            format!("{} bytes where an IPv4 address was expected", k.len()),
        )
    })?;
    Ok(Ipv4Addr::from(o))
}

pub(super) fn decode_cooling_key(k: &[u8]) -> Result<(i64, Ipv4Addr), StoreError> {
    if k.len() != 12 {
        return Err(corrupt(
            TREE_COOLING,
            k,
            format!("key of {} bytes, expected 12", k.len()),
        ));
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&k[..8]);
    let t = i64::try_from(u64::from_be_bytes(t))
        .map_err(|_| corrupt(TREE_COOLING, k, "release time out of range"))?;
    Ok((t, decode_ip(TREE_COOLING, &k[8..])?))
}

/// Decodes an allocation key stored as a value (the `ips` tree) or key.
pub(super) fn decode_alloc_key(tree: &str, k: &[u8], v: &[u8]) -> Result<AllocKey, StoreError> {
    let s = std::str::from_utf8(v).map_err(|e| corrupt(tree, k, format!("not UTF-8: {e}")))?;
    let mut parts = s.split('\0');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(network), Some(container_id), Some(ifname), None) => Ok(AllocKey {
            network: network.into(),
            container_id: container_id.into(),
            ifname: ifname.into(),
        }),
        _ => Err(corrupt(
            tree,
            k,
            "allocation key must have three NUL-separated parts",
        )),
    }
}

pub(super) fn decode_json<T: serde::de::DeserializeOwned>(
    tree: &str,
    k: &[u8],
    v: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| corrupt(tree, k, format!("bad JSON: {e}")))
}

fn to_json<T: serde::Serialize>(what: &str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt {
        key: what.to_string(),
        reason: format!("cannot encode: {e}"),
    })
}

/// A mutation with its bytes computed up front, so that the transaction body
/// cannot fail on encoding (it may run more than once).
pub(super) enum Op {
    Put {
        tree: usize,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Del {
        tree: usize,
        key: Vec<u8>,
    },
    PutAllocation {
        key: Vec<u8>,
        ip: [u8; 4],
        value: Vec<u8>,
    },
    DeleteAllocation {
        key: Vec<u8>,
        ip: [u8; 4],
    },
    PutCooling {
        ip: Ipv4Addr,
        t: i64,
    },
    DeleteCooling {
        ip: Ipv4Addr,
    },
}

/// The tree an [`Op::Put`] or [`Op::Del`] writes.
pub(super) const POOLS: usize = 0;
pub(super) const BLOCKS: usize = 1;
pub(super) const COOLING: usize = 2;

pub(super) fn encode(batch: &[Mutation]) -> Result<Vec<Op>, StoreError> {
    batch
        .iter()
        .map(|m| {
            Ok(match m {
                Mutation::PutPool(p) => Op::Put {
                    tree: POOLS,
                    key: p.name.as_bytes().to_vec(),
                    value: to_json(&p.name, p)?,
                },
                Mutation::DeletePool(name) => Op::Del {
                    tree: POOLS,
                    key: name.as_bytes().to_vec(),
                },
                Mutation::PutBlock(b) => Op::Put {
                    tree: BLOCKS,
                    key: block_key_bytes(&b.pool, b.cidr),
                    value: to_json(&b.cidr.to_string(), b)?,
                },
                Mutation::DeleteBlock { pool, cidr } => Op::Del {
                    tree: BLOCKS,
                    key: block_key_bytes(pool, *cidr),
                },
                Mutation::PutAllocation(a) => Op::PutAllocation {
                    key: alloc_key_bytes(&a.key),
                    ip: a.ip.octets(),
                    value: to_json(&a.ip.to_string(), a)?,
                },
                Mutation::DeleteAllocation { key, ip } => Op::DeleteAllocation {
                    key: alloc_key_bytes(key),
                    ip: ip.octets(),
                },
                Mutation::PutCooling {
                    ip,
                    released_unix_ms,
                } => Op::PutCooling {
                    ip: *ip,
                    t: *released_unix_ms,
                },
                Mutation::DeleteCooling { ip } => Op::DeleteCooling { ip: *ip },
            })
        })
        .collect()
}
