//! The node's routes for blocks, converged on what the core publishes.
//!
//! Today that is one blackhole route per block this node owns, so a packet
//! to a free address in it is dropped here instead of following the default
//! route out and back. Cluster mode feeds the blocks of other nodes into the
//! same reconciler on a second channel.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{BlockRoutes, NodeError};
use crate::model::BlockClaim;

/// The first retry after a failed route change.
const FIRST_RETRY: Duration = Duration::from_secs(1);

pub struct RouteReconciler {
    routes: Arc<dyn BlockRoutes>,
    /// What this reconciler added or found in place and has not removed.
    installed: BTreeSet<Ipv4Net>,
}

impl RouteReconciler {
    pub fn new(routes: Arc<dyn BlockRoutes>) -> Self {
        RouteReconciler {
            routes,
            installed: BTreeSet::new(),
        }
    }

    /// Reads the kernel's routes and converges them on `owned`: repairs
    /// routes someone else removed and removes ours for blocks given back.
    /// Every change is tried; the first failure is returned.
    pub async fn sync(&mut self, owned: &[BlockClaim]) -> Result<(), NodeError> {
        self.installed = self.routes.blackholes().await?.into_iter().collect();
        self.converge(owned).await
    }

    /// Converges on `owned` from what this reconciler installed, without
    /// reading the kernel's routes: the cheap step after each change.
    pub async fn converge(&mut self, owned: &[BlockClaim]) -> Result<(), NodeError> {
        let want: BTreeSet<Ipv4Net> = owned.iter().map(|b| b.cidr).collect();
        let to_add: Vec<Ipv4Net> = want.difference(&self.installed).copied().collect();
        let to_remove: Vec<Ipv4Net> = self.installed.difference(&want).copied().collect();
        let mut first_err = None;
        for block in to_add {
            match self.routes.add_blackhole(block).await {
                Ok(()) => {
                    info!(%block, "added blackhole route for owned block");
                    self.installed.insert(block);
                }
                Err(e) => {
                    warn!(%block, error = %e, "cannot add blackhole route");
                    first_err.get_or_insert(e);
                }
            }
        }
        for block in to_remove {
            match self.routes.remove_blackhole(block).await {
                Ok(()) => {
                    info!(%block, "removed blackhole route of released block");
                    self.installed.remove(&block);
                }
                Err(e) => {
                    warn!(%block, error = %e, "cannot remove blackhole route");
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Follows `owned` until `stop`: converges after every change, and
    /// reads the kernel's routes again every `resync_every`. What failed is
    /// retried after 1 s, then 2 s, 4 s... up to `resync_every`.
    pub async fn run(
        mut self,
        mut owned: watch::Receiver<Vec<BlockClaim>>,
        resync_every: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut resync =
            tokio::time::interval_at(tokio::time::Instant::now() + resync_every, resync_every);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = FIRST_RETRY;
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let full = tokio::select! {
                changed = owned.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    false
                }
                _ = resync.tick() => true,
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)),
                    if retry_at.is_some() => true,
                _ = stop.wait_for(|s| *s) => return,
            };
            let blocks = owned.borrow_and_update().clone();
            let done = if full {
                self.sync(&blocks).await
            } else {
                self.converge(&blocks).await
            };
            match done {
                Ok(()) => {
                    backoff = FIRST_RETRY;
                    retry_at = None;
                }
                Err(_) => {
                    // The failed block was logged by name; only schedule.
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(resync_every);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
