use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::alloc::pool::PoolError;
use crate::cluster::ClusterError;
use crate::store::StoreError;

/// Everything ipamd's core can refuse or fail with. Mapped to a gRPC status
/// once, in `grpc/mod.rs` (`From<IpamError> for Status`).
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(
        "pool {pool} ({cidr}, {size} usable addresses) is exhausted: {allocated} allocated, {cooling} cooling down"
    )]
    Exhausted {
        pool: String,
        cidr: Ipv4Net,
        size: u64,
        allocated: u64,
        cooling: u64,
    },
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("address {ip} cannot be allocated: {reason}")]
    AddressUnavailable { ip: Ipv4Addr, reason: String },
    #[error("no pool named {0:?}")]
    UnknownPool(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// After a database rebuild, until the lost cooldowns have run out.
    #[error("new addresses are held for another {remaining_secs} s: {reason}")]
    Held { remaining_secs: u64, reason: String },
    #[error("cluster store: {0}")]
    Cluster(#[from] ClusterError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A broken invariant of ipamd itself, which no request or
    /// configuration can cause: a bug to report, not an input to fix.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<PoolError> for IpamError {
    fn from(e: PoolError) -> Self {
        match e {
            // The request is well formed; the pools as they are stand in its way.
            PoolError::SecondDefault { .. } => IpamError::Conflict(e.to_string()),
            _ => IpamError::InvalidArgument(e.to_string()),
        }
    }
}
