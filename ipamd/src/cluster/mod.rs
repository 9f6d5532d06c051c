//! Cluster-wide block ownership. Only block claims go through here; pod
//! allocations never leave the node.

use futures::future::BoxFuture;
use ipnet::Ipv4Net;

use crate::model::BlockClaim;

pub mod local;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster store unavailable: {0}")]
    Unavailable(String),
}

pub trait ClusterStore: Send + Sync {
    /// Takes `cidr` in `pool` for `node`. Ok(false) when another node owns it.
    fn claim_block<'a>(
        &'a self,
        pool: &'a str,
        cidr: Ipv4Net,
        node: &'a str,
    ) -> BoxFuture<'a, Result<bool, ClusterError>>;
    fn release_block<'a>(
        &'a self,
        pool: &'a str,
        cidr: Ipv4Net,
        node: &'a str,
    ) -> BoxFuture<'a, Result<(), ClusterError>>;
    /// Blocks of `pool` owned by other nodes; the allocator never picks them.
    fn foreign_blocks<'a>(
        &'a self,
        pool: &'a str,
    ) -> BoxFuture<'a, Result<Vec<BlockClaim>, ClusterError>>;
}
