//! One pool: its address arithmetic, and the rules one pool and a set of
//! pools follow. The configuration file, the admin API and the allocator all
//! read and check pools here, so each rule and its message exist once;
//! callers only say which key or request field an error is about. Pure
//! functions, no state.

use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::model::PoolSpec;

#[cfg(test)]
mod tests;

/// Blocks larger than this would make per-block bookkeeping (one bit per
/// address) needlessly large; /16 is already 65536 pods on one node.
pub const MIN_BLOCK_PREFIX: u8 = 16;

/// Longest pool or namespace name: a Kubernetes namespace is a DNS label.
pub const MAX_NAME_LEN: usize = 63;

/// Most namespaces (or allow-from pools) one pool may list.
pub const MAX_NAMES: usize = 1024;

/// Addresses in `net`, reserved ones included.
pub fn net_size(net: Ipv4Net) -> u64 {
    1u64 << (32 - u32::from(net.prefix_len()))
}

/// The pool's network and broadcast addresses are never handed out. A /31 or
/// /32 pool has neither (RFC 3021), so every address in it is usable.
pub fn is_reserved(pool: &PoolSpec, ip: Ipv4Addr) -> bool {
    pool.cidr.prefix_len() < 31 && (ip == pool.cidr.network() || ip == pool.cidr.broadcast())
}

/// Usable addresses of `pool` inside `net` (a block of the pool, or the pool
/// itself).
pub fn usable_in(pool: &PoolSpec, net: Ipv4Net) -> u64 {
    let reserved = if pool.cidr.prefix_len() < 31 {
        [pool.cidr.network(), pool.cidr.broadcast()]
            .iter()
            .filter(|ip| net.contains(*ip))
            .count() as u64
    } else {
        0
    };
    net_size(net).saturating_sub(reserved)
}

pub fn pool_size(pool: &PoolSpec) -> u64 {
    usable_in(pool, pool.cidr)
}

/// The block of `pool` that contains `ip`, if the pool contains it.
pub fn block_of(pool: &PoolSpec, ip: Ipv4Addr) -> Option<Ipv4Net> {
    if !pool.cidr.contains(&ip) {
        return None;
    }
    Ipv4Net::new(ip, pool.block_size).ok().map(|n| n.trunc())
}

pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

// ------------------------------------------------------------------ rules

/// A part of a pool, named as the configuration file and the admin API name
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolField {
    Name,
    Cidr,
    BlockSize,
    Namespaces,
    AllowFrom,
    SnatAddress,
}

impl PoolField {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolField::Name => "name",
            PoolField::Cidr => "cidr",
            PoolField::BlockSize => "block_size",
            PoolField::Namespaces => "namespaces",
            PoolField::AllowFrom => "allow_from",
            PoolField::SnatAddress => "snat_address",
        }
    }
}

impl fmt::Display for PoolField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is wrong with one field, worded to follow the field's name or key
/// ("invalid pools[0].cidr: 10.0.0.1/24 has host bits set; ...").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldProblem {
    #[error("must not be empty")]
    Empty,
    #[error("{head:?}... is {len} bytes long; at most {MAX_NAME_LEN} are allowed")]
    TooLong { head: String, len: usize },
    #[error("{0:?} must not contain '/' or NUL")]
    ForbiddenChar(String),
    #[error("{0:?} is not an IPv4 CIDR (like 10.244.0.0/16)")]
    NotACidr(String),
    #[error("{} has host bits set; did you mean {}?", .0, .0.trunc())]
    HostBits(Ipv4Net),
    #[error(
        "{size} must be between {lowest} (the pool's prefix length, and at most {} addresses per block) and 32",
        1u64 << (32 - MIN_BLOCK_PREFIX)
    )]
    BlockSize { size: u32, lowest: u8 },
    #[error("{0:?} is not an IPv4 address")]
    NotAnAddress(String),
    #[error("lists {0} names; at most {MAX_NAMES} are allowed")]
    TooMany(usize),
    #[error("entry {head:?}... is {len} bytes long; at most {MAX_NAME_LEN} are allowed")]
    EntryTooLong { head: String, len: usize },
    #[error("holds an empty name")]
    EmptyEntry,
    #[error("names unknown pool {0:?}")]
    UnknownPool(String),
}

/// A pool, or pools side by side, breaking a rule. [`PoolError::field`]
/// says which field it is about, so that the configuration can name its key
/// and the admin API its request field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// One field of one pool.
    #[error("{}", field_message(.pool, .field, .problem))]
    Field {
        pool: String,
        field: PoolField,
        problem: FieldProblem,
    },
    #[error("pool name {0:?} is used twice")]
    DuplicateName(String),
    #[error("pool {pool} ({cidr}) overlaps pool {other} ({other_cidr})")]
    Overlap {
        pool: String,
        cidr: Ipv4Net,
        other: String,
        other_cidr: Ipv4Net,
    },
    #[error(
        "pool {pool} would be a second default pool next to {other} (a default pool lists no namespaces)"
    )]
    SecondDefault { pool: String, other: String },
    #[error("namespace {namespace} is listed by both pool {pool} and pool {other}")]
    SharedNamespace {
        namespace: String,
        pool: String,
        other: String,
    },
    #[error("no default pool: exactly one pool must list no namespaces")]
    NoDefault,
}

fn field_message(pool: &str, field: &PoolField, problem: &FieldProblem) -> String {
    match field {
        // The problems of a name quote it.
        PoolField::Name => format!("pool name {problem}"),
        _ => format!("pool {pool}: {field} {problem}"),
    }
}

impl PoolError {
    /// The field of the pool at fault (the later one of two that clash);
    /// None for the set as a whole.
    pub fn field(&self) -> Option<PoolField> {
        match self {
            PoolError::Field { field, .. } => Some(*field),
            PoolError::DuplicateName(_) => Some(PoolField::Name),
            PoolError::Overlap { .. } => Some(PoolField::Cidr),
            PoolError::SecondDefault { .. } | PoolError::SharedNamespace { .. } => {
                Some(PoolField::Namespaces)
            }
            PoolError::NoDefault => None,
        }
    }

    /// The message for a caller that names the pool and the field itself
    /// (`invalid pools[2].cidr: ...`): a field's problem alone; a clash
    /// between pools names them, so it is the whole message.
    pub fn detail(&self) -> String {
        match self {
            PoolError::Field { problem, .. } => problem.to_string(),
            other => other.to_string(),
        }
    }
}

/// A [`PoolError`] in a set of pools, with the position of the pool at
/// fault (None: the set as a whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct PoolSetError {
    pub index: Option<usize>,
    pub error: PoolError,
}

/// One pool as a configuration file or a client spells it, before any check.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolParts<'a> {
    pub name: &'a str,
    pub cidr: &'a str,
    /// None: the default block size, or the pool's prefix if that is longer.
    pub block_size: Option<u32>,
    pub namespaces: &'a [String],
    pub nat_outgoing: bool,
    /// None or blank: no address of its own.
    pub snat_address: Option<&'a str>,
    pub isolated: bool,
    pub allow_from: &'a [String],
}

/// Reads a pool from its parts (names and addresses trimmed) and checks it
/// on its own ([`validate`]). Name, CIDR, block size and SNAT address are
/// read first, in the order a configuration file lists them.
pub fn parse(parts: &PoolParts<'_>, default_block_size: u8) -> Result<PoolSpec, PoolError> {
    let name = parts.name.trim();
    let bad = |field, problem| PoolError::Field {
        pool: name.to_string(),
        field,
        problem,
    };
    if name.is_empty() {
        return Err(bad(PoolField::Name, FieldProblem::Empty));
    }
    let cidr = parse_cidr(parts.cidr).map_err(|p| bad(PoolField::Cidr, p))?;
    let block_size = match parts.block_size {
        None => default_block_size.max(cidr.prefix_len()),
        Some(size) => checked_block_size(cidr, size).map_err(|p| bad(PoolField::BlockSize, p))?,
    };
    let snat_address = match parts.snat_address.map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(text.parse::<Ipv4Addr>().map_err(|_| {
            bad(
                PoolField::SnatAddress,
                FieldProblem::NotAnAddress(text.to_string()),
            )
        })?),
    };
    let spec = PoolSpec {
        name: name.to_string(),
        cidr,
        block_size,
        namespaces: PoolSpec::trimmed_names(parts.namespaces),
        nat_outgoing: parts.nat_outgoing,
        snat_address,
        isolated: parts.isolated,
        allow_from: PoolSpec::trimmed_names(parts.allow_from),
        runtime: false,
    };
    validate(&spec)?;
    Ok(spec)
}

/// A CIDR whose host bits are zero.
fn parse_cidr(text: &str) -> Result<Ipv4Net, FieldProblem> {
    let net: Ipv4Net = text
        .trim()
        .parse()
        .map_err(|_| FieldProblem::NotACidr(text.to_string()))?;
    if net.trunc() != net {
        return Err(FieldProblem::HostBits(net));
    }
    Ok(net)
}

/// A block size between the pool's prefix (and [`MIN_BLOCK_PREFIX`]) and 32.
fn checked_block_size(cidr: Ipv4Net, size: u32) -> Result<u8, FieldProblem> {
    let lowest = cidr.prefix_len().max(MIN_BLOCK_PREFIX);
    match u8::try_from(size) {
        Ok(b) if (lowest..=32).contains(&b) => Ok(b),
        _ => Err(FieldProblem::BlockSize { size, lowest }),
    }
}

/// The first 16 characters of a name too long to show whole.
fn head(name: &str) -> String {
    name.chars().take(16).collect()
}

/// Checks one pool on its own; how it sits beside others is
/// [`check_pair`]'s.
pub fn validate(spec: &PoolSpec) -> Result<(), PoolError> {
    use FieldProblem::*;
    let bad = |field, problem| {
        Err(PoolError::Field {
            pool: spec.name.clone(),
            field,
            problem,
        })
    };
    let name = &spec.name;
    if name.trim().is_empty() {
        return bad(PoolField::Name, Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return bad(
            PoolField::Name,
            TooLong {
                head: head(name),
                len: name.len(),
            },
        );
    }
    for (field, names) in [
        (PoolField::Namespaces, &spec.namespaces),
        (PoolField::AllowFrom, &spec.allow_from),
    ] {
        if names.len() > MAX_NAMES {
            return bad(field, TooMany(names.len()));
        }
        if let Some(long) = names.iter().find(|n| n.len() > MAX_NAME_LEN) {
            return bad(
                field,
                EntryTooLong {
                    head: head(long),
                    len: long.len(),
                },
            );
        }
    }
    if name.contains(['\0', '/']) {
        return bad(PoolField::Name, ForbiddenChar(name.clone()));
    }
    if spec.cidr != spec.cidr.trunc() {
        return bad(PoolField::Cidr, HostBits(spec.cidr));
    }
    if let Err(problem) = checked_block_size(spec.cidr, spec.block_size.into()) {
        return bad(PoolField::BlockSize, problem);
    }
    if spec.namespaces.iter().any(|n| n.trim().is_empty()) {
        return bad(PoolField::Namespaces, EmptyEntry);
    }
    Ok(())
}

/// `spec` beside `other`: distinct names, no overlap, not both the default,
/// no namespace in both.
pub fn check_pair(spec: &PoolSpec, other: &PoolSpec) -> Result<(), PoolError> {
    if spec.name == other.name {
        return Err(PoolError::DuplicateName(spec.name.clone()));
    }
    if overlaps(spec.cidr, other.cidr) {
        return Err(PoolError::Overlap {
            pool: spec.name.clone(),
            cidr: spec.cidr,
            other: other.name.clone(),
            other_cidr: other.cidr,
        });
    }
    if spec.is_default() && other.is_default() {
        return Err(PoolError::SecondDefault {
            pool: spec.name.clone(),
            other: other.name.clone(),
        });
    }
    if let Some(ns) = spec
        .namespaces
        .iter()
        .find(|n| other.namespaces.contains(n))
    {
        return Err(PoolError::SharedNamespace {
            namespace: ns.clone(),
            pool: spec.name.clone(),
            other: other.name.clone(),
        });
    }
    Ok(())
}

/// Every allow_from entry of `spec` names itself or a pool `known` knows.
pub fn check_allow_from(spec: &PoolSpec, known: impl Fn(&str) -> bool) -> Result<(), PoolError> {
    match spec
        .allow_from
        .iter()
        .find(|n| **n != spec.name && !known(n))
    {
        Some(unknown) => Err(PoolError::Field {
            pool: spec.name.clone(),
            field: PoolField::AllowFrom,
            problem: FieldProblem::UnknownPool(unknown.clone()),
        }),
        None => Ok(()),
    }
}

/// Pools that can serve side by side: every pair passes [`check_pair`].
/// Neither each pool's own rules nor its allow_from entries are checked, so
/// that stored pools keep working after a rule tightens or a pool they name
/// is gone.
pub fn check_together(pools: &[&PoolSpec]) -> Result<(), PoolSetError> {
    for (i, spec) in pools.iter().enumerate() {
        for other in &pools[..i] {
            check_pair(spec, other).map_err(|error| PoolSetError {
                index: Some(i),
                error,
            })?;
        }
    }
    Ok(())
}

/// A configuration's pools: each valid on its own ([`validate`]), all of
/// them together ([`check_together`]), one of them the default, and every
/// allow_from entry naming one of them.
pub fn validate_set(pools: &[PoolSpec]) -> Result<(), PoolSetError> {
    let at = |i: usize| {
        move |error| PoolSetError {
            index: Some(i),
            error,
        }
    };
    for (i, spec) in pools.iter().enumerate() {
        validate(spec).map_err(at(i))?;
    }
    check_together(&pools.iter().collect::<Vec<_>>())?;
    if !pools.iter().any(PoolSpec::is_default) {
        return Err(PoolSetError {
            index: None,
            error: PoolError::NoDefault,
        });
    }
    for (i, spec) in pools.iter().enumerate() {
        check_allow_from(spec, |name| pools.iter().any(|p| p.name == name)).map_err(at(i))?;
    }
    Ok(())
}
