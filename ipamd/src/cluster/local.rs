//! One node, no coordination: every block of every pool is this node's to claim.

use futures::future::BoxFuture;
use ipnet::Ipv4Net;

use super::{ClusterError, ClusterStore};
use crate::model::BlockClaim;

#[derive(Debug, Default)]
pub struct LocalCluster;

impl ClusterStore for LocalCluster {
    fn claim_block<'a>(
        &'a self,
        _pool: &'a str,
        _cidr: Ipv4Net,
        _node: &'a str,
    ) -> BoxFuture<'a, Result<bool, ClusterError>> {
        Box::pin(async { Ok(true) })
    }

    fn release_block<'a>(
        &'a self,
        _pool: &'a str,
        _cidr: Ipv4Net,
        _node: &'a str,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        Box::pin(async { Ok(()) })
    }

    fn foreign_blocks<'a>(
        &'a self,
        _pool: &'a str,
    ) -> BoxFuture<'a, Result<Vec<BlockClaim>, ClusterError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}
