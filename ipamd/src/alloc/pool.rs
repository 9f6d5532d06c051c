//! Address arithmetic on pools and blocks. Pure functions, no state.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::model::PoolSpec;

/// Blocks larger than this would make per-block bookkeeping (one bit per
/// address) needlessly large; /16 is already 65536 pods on one node.
pub const MIN_BLOCK_PREFIX: u8 = 16;

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

/// Longest pool or namespace name: a Kubernetes namespace is a DNS label.
pub const MAX_NAME_LEN: usize = 63;

/// Most namespaces (or allow-from pools) one pool may list.
pub const MAX_NAMES: usize = 1024;

/// Checks one pool on its own; overlap with other pools is checked by the
/// allocator, which knows them.
pub fn validate(spec: &PoolSpec) -> Result<(), String> {
    if spec.name.trim().is_empty() {
        return Err("pool name must not be empty".into());
    }
    if spec.name.len() > MAX_NAME_LEN {
        return Err(format!(
            "pool name {:?}... is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            spec.name.chars().take(16).collect::<String>(),
            spec.name.len()
        ));
    }
    for (field, names) in [
        ("namespaces", &spec.namespaces),
        ("allow_from", &spec.allow_from),
    ] {
        if names.len() > MAX_NAMES {
            return Err(format!(
                "pool {}: {field} lists {} names; at most {MAX_NAMES} are allowed",
                spec.name,
                names.len()
            ));
        }
        if let Some(long) = names.iter().find(|n| n.len() > MAX_NAME_LEN) {
            return Err(format!(
                "pool {}: {field} entry {:?}... is {} bytes long; at most {MAX_NAME_LEN} are allowed",
                spec.name,
                long.chars().take(16).collect::<String>(),
                long.len()
            ));
        }
    }
    if spec.name.contains('\0') || spec.name.contains('/') {
        return Err(format!(
            "pool name {:?} must not contain '/' or NUL",
            spec.name
        ));
    }
    if spec.cidr != spec.cidr.trunc() {
        return Err(format!(
            "pool {}: cidr {} has host bits set (did you mean {}?)",
            spec.name,
            spec.cidr,
            spec.cidr.trunc()
        ));
    }
    let prefix = spec.cidr.prefix_len();
    if spec.block_size < prefix || spec.block_size > 32 {
        return Err(format!(
            "pool {}: block size /{} must lie between the pool prefix /{} and /32",
            spec.name, spec.block_size, prefix
        ));
    }
    if spec.block_size < MIN_BLOCK_PREFIX {
        return Err(format!(
            "pool {}: block size /{} is larger than the largest supported block /{}",
            spec.name, spec.block_size, MIN_BLOCK_PREFIX
        ));
    }
    if spec.namespaces.iter().any(|n| n.trim().is_empty()) {
        return Err(format!("pool {}: empty namespace name", spec.name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cidr: &str, block: u8) -> PoolSpec {
        PoolSpec::new("p", cidr.parse().unwrap(), block, vec![])
    }

    #[test]
    fn sizes_exclude_network_and_broadcast() {
        let p = pool("10.0.0.0/27", 29);
        assert_eq!(pool_size(&p), 30);
        assert_eq!(usable_in(&p, "10.0.0.0/29".parse().unwrap()), 7);
        assert_eq!(usable_in(&p, "10.0.0.8/29".parse().unwrap()), 8);
        assert_eq!(usable_in(&p, "10.0.0.24/29".parse().unwrap()), 7);
        assert!(is_reserved(&p, "10.0.0.0".parse().unwrap()));
        assert!(is_reserved(&p, "10.0.0.31".parse().unwrap()));
        assert!(!is_reserved(&p, "10.0.0.1".parse().unwrap()));
        assert_eq!(pool_size(&pool("10.0.0.0/31", 31)), 2);
        assert_eq!(pool_size(&pool("10.0.0.7/32", 32)), 1);
    }

    #[test]
    fn block_of_truncates_to_block_size() {
        let p = pool("10.0.0.0/27", 29);
        assert_eq!(
            block_of(&p, "10.0.0.13".parse().unwrap()),
            Some("10.0.0.8/29".parse().unwrap())
        );
        assert_eq!(block_of(&p, "10.0.1.13".parse().unwrap()), None);
    }

    #[test]
    fn validate_rejects_bad_specs() {
        assert!(validate(&pool("10.0.0.0/24", 26)).is_ok());
        assert!(
            validate(&pool("10.0.0.1/24", 26))
                .unwrap_err()
                .contains("host bits")
        );
        assert!(validate(&pool("10.0.0.0/24", 23)).is_err());
        assert!(
            validate(&pool("10.0.0.0/8", 8))
                .unwrap_err()
                .contains("largest")
        );
        let mut p = pool("10.0.0.0/24", 26);
        p.name = " ".into();
        assert!(validate(&p).is_err());
        p.name = "x".repeat(MAX_NAME_LEN + 1);
        assert!(validate(&p).unwrap_err().contains("at most 63"));
        let mut p = pool("10.0.0.0/24", 26);
        p.namespaces = vec!["n".repeat(MAX_NAME_LEN + 1)];
        assert!(validate(&p).unwrap_err().contains("namespaces entry"));
        let mut p = pool("10.0.0.0/24", 26);
        p.allow_from = vec!["a".into(); MAX_NAMES + 1];
        assert!(validate(&p).unwrap_err().contains("allow_from lists"));
    }
}
