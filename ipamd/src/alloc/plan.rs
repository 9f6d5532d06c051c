//! Planning an allocation, a release and a CNI GC: each returns the store
//! mutations to write, and changes nothing.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::{Allocator, Plan, pool};
use crate::error::IpamError;
use crate::model::{AllocKey, AllocateParams, Allocation, PoolSpec};
use crate::store::Mutation;

impl Allocator {
    /// First match wins: requested addresses, the pool hint, a pool listing
    /// the pod's namespace, the default pool.
    pub fn select_pool(&self, params: &AllocateParams) -> Result<&PoolSpec, IpamError> {
        if let Some(ip) = requested_ip(params)? {
            return self.pool_of(ip).ok_or_else(|| {
                let pools: Vec<String> = self
                    .pools
                    .values()
                    .map(|p| format!("{} {}", p.name, p.cidr))
                    .collect();
                IpamError::InvalidArgument(format!(
                    "requested address {ip} is outside every pool ({})",
                    pools.join(", ")
                ))
            });
        }
        if let Some(hint) = params.pool_hint.as_deref().filter(|h| !h.is_empty()) {
            return self
                .pools
                .get(hint)
                .ok_or_else(|| IpamError::UnknownPool(hint.to_string()));
        }
        let ns = params.pod.namespace.as_str();
        if !ns.is_empty()
            && let Some(p) = self
                .pools
                .values()
                .find(|p| p.namespaces.iter().any(|n| n == ns))
        {
            return Ok(p);
        }
        // Merging the configured pools at start requires a default, and
        // `pool rm` refuses to remove it.
        self.pools
            .values()
            .find(|p| p.is_default())
            .ok_or_else(|| IpamError::Internal("no default pool is configured".into()))
    }

    pub fn plan_allocate(&self, params: &AllocateParams, now_ms: i64) -> Result<Plan, IpamError> {
        validate_key(&params.key)?;
        let requested = requested_ip(params)?;
        if let Some(a) = self.allocations.get(&params.key) {
            if let Some(ip) = requested
                && ip != a.ip
            {
                return Err(IpamError::AddressUnavailable {
                    ip,
                    reason: format!("this attachment already holds {}", a.ip),
                });
            }
            return Ok(Plan::Existing(Allocation::clone(a)));
        }
        if let Some(held) = self.fresh_hold(now_ms) {
            return Err(held);
        }
        let p = self.select_pool(params)?;
        let ip = match requested {
            Some(ip) => {
                self.check_requested(p, ip, now_ms)?;
                let owned = self
                    .block_containing(ip)
                    .is_some_and(|b| b.claim.pool == p.name);
                if !owned {
                    return Ok(Plan::NeedBlock {
                        pool: p.name.clone(),
                        requested: Some(ip),
                    });
                }
                ip
            }
            None => match self.pick(p, now_ms) {
                Some(ip) => ip,
                None => {
                    return Ok(Plan::NeedBlock {
                        pool: p.name.clone(),
                        requested: None,
                    });
                }
            },
        };
        let Some(block) = self.block_containing(ip).map(|b| b.claim.cidr) else {
            // pick() and the ownership check above only return owned addresses.
            return Err(IpamError::Internal(format!("{ip} is in no owned block")));
        };
        let allocation = Allocation {
            key: params.key.clone(),
            ip,
            pool: p.name.clone(),
            block,
            pod: params.pod.clone(),
            created_unix_ms: now_ms,
        };
        let mut mutations = Vec::with_capacity(2);
        if self.cooling.contains_key(&ip) {
            mutations.push(Mutation::DeleteCooling { ip });
        }
        mutations.push(Mutation::PutAllocation(allocation.clone()));
        Ok(Plan::Allocate {
            allocation,
            mutations,
        })
    }

    fn check_requested(&self, p: &PoolSpec, ip: Ipv4Addr, now_ms: i64) -> Result<(), IpamError> {
        let unavailable = |reason: String| IpamError::AddressUnavailable { ip, reason };
        if pool::is_reserved(p, ip) {
            return Err(unavailable(format!(
                "it is the network or broadcast address of pool {} ({})",
                p.name, p.cidr
            )));
        }
        if let Some(a) = self.holder(ip) {
            return Err(unavailable(format!(
                "pool {} already has it allocated to container {} ifname {} (pod {}/{})",
                a.pool, a.key.container_id, a.key.ifname, a.pod.namespace, a.pod.name
            )));
        }
        if let Some(t) = self.cooling.get(&ip).copied()
            && self.reusable_at(t) > now_ms
        {
            return Err(unavailable(format!(
                "it was released from pool {} at unix ms {t} and is cooling down until unix ms {}",
                p.name,
                self.reusable_at(t)
            )));
        }
        if let Some(b) = self.block_containing(ip)
            && b.claim.pool != p.name
        {
            return Err(unavailable(format!(
                "its block {} belongs to pool {}",
                b.claim.cidr, b.claim.pool
            )));
        }
        Ok(())
    }

    /// Never-used addresses first (lowest block, lowest address); then the
    /// cooled-down address released earliest.
    pub(super) fn pick(&self, p: &PoolSpec, now_ms: i64) -> Option<Ipv4Addr> {
        for b in self.pool_blocks(&p.name) {
            // The bitmap already excludes taken addresses; re-checked because
            // a wrong answer here would hand out a taken address.
            let free = b.unused().find(|ip| {
                !pool::is_reserved(p, *ip)
                    && !self.by_ip.contains_key(ip)
                    && !self.cooling.contains_key(ip)
            });
            if free.is_some() {
                return free;
            }
        }
        for &(released, ip) in &self.fifo {
            if self.reusable_at(released) > now_ms {
                // FIFO: everything after this was released later still.
                break;
            }
            if self
                .block_containing(ip)
                .is_some_and(|b| b.claim.pool == p.name)
                && !self.by_ip.contains_key(&ip)
                && !pool::is_reserved(p, ip)
            {
                return Some(ip);
            }
        }
        None
    }

    /// None for an unknown key (release is idempotent).
    pub fn plan_release(&self, key: &AllocKey, now_ms: i64) -> Option<(Allocation, Vec<Mutation>)> {
        let a = self.get(key)?;
        Some((a.clone(), release_mutations(a, now_ms)))
    }

    /// Releases the allocations of `network` not in `valid` and created at
    /// or before `created_by_ms`.
    pub fn plan_gc(
        &self,
        network: &str,
        valid: &[AllocKey],
        created_by_ms: i64,
        now_ms: i64,
    ) -> (Vec<Allocation>, Vec<Mutation>) {
        let valid: HashSet<&AllocKey> = valid.iter().collect();
        let mut gone: Vec<Allocation> = self
            .allocations
            .values()
            .filter(|a| {
                a.key.network == network
                    && !valid.contains(&a.key)
                    && a.created_unix_ms <= created_by_ms
            })
            .map(|a| Allocation::clone(a))
            .collect();
        gone.sort_by_key(|a| a.ip);
        let muts = gone
            .iter()
            .flat_map(|a| release_mutations(a, now_ms))
            .collect();
        (gone, muts)
    }
}

/// The mutations freeing one allocation: the address goes into cooldown.
fn release_mutations(a: &Allocation, now_ms: i64) -> Vec<Mutation> {
    vec![
        Mutation::DeleteAllocation {
            key: a.key.clone(),
            ip: a.ip,
        },
        Mutation::PutCooling {
            ip: a.ip,
            released_unix_ms: now_ms,
        },
    ]
}

/// The single requested address, if any. One attachment gets one IPv4
/// address, so several distinct requests cannot be met.
fn requested_ip(params: &AllocateParams) -> Result<Option<Ipv4Addr>, IpamError> {
    let mut ips: Vec<Ipv4Addr> = params.requested_ips.clone();
    ips.sort();
    ips.dedup();
    match ips.as_slice() {
        [] => Ok(None),
        [ip] => Ok(Some(*ip)),
        many => {
            let mut list = String::new();
            for (i, ip) in many.iter().enumerate() {
                let _ = write!(list, "{}{ip}", if i > 0 { ", " } else { "" });
            }
            Err(IpamError::InvalidArgument(format!(
                "one address per attachment, but {} were requested: {list}",
                many.len()
            )))
        }
    }
}

/// The key's parts are joined with NUL in the store, so none may contain it.
pub fn validate_key(key: &AllocKey) -> Result<(), IpamError> {
    if key.container_id.is_empty() {
        return Err(IpamError::InvalidArgument("container ID is empty".into()));
    }
    if key.ifname.is_empty() {
        return Err(IpamError::InvalidArgument("ifname is empty".into()));
    }
    if [&key.network, &key.container_id, &key.ifname]
        .iter()
        .any(|s| s.contains('\0'))
    {
        return Err(IpamError::InvalidArgument(
            "network, container ID and ifname must not contain NUL".into(),
        ));
    }
    Ok(())
}
