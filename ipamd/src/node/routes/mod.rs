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
        let mut first_err = None;
        for block in want.difference(&self.installed.clone()) {
            match self.routes.add_blackhole(*block).await {
                Ok(()) => {
                    info!(%block, "added blackhole route for owned block");
                    self.installed.insert(*block);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        for block in self.installed.clone().difference(&want) {
            match self.routes.remove_blackhole(*block).await {
                Ok(()) => {
                    info!(%block, "removed blackhole route of released block");
                    self.installed.remove(block);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Follows `owned` until `stop`: converges after every change, and
    /// reads the kernel's routes again every `resync_every`, which also
    /// retries what failed.
    pub async fn run(
        mut self,
        mut owned: watch::Receiver<Vec<BlockClaim>>,
        resync_every: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut resync =
            tokio::time::interval_at(tokio::time::Instant::now() + resync_every, resync_every);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let full = tokio::select! {
                changed = owned.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    false
                }
                _ = resync.tick() => true,
                _ = stop.wait_for(|s| *s) => return,
            };
            let blocks = owned.borrow_and_update().clone();
            let done = if full {
                self.sync(&blocks).await
            } else {
                self.converge(&blocks).await
            };
            if let Err(e) = done {
                warn!(error = %e, "blackhole route sync failed; retrying at the next resync");
            }
        }
    }
}

#[cfg(test)]
mod tests;
