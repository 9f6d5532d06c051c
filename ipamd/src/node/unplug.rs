//! Deletes pods' host veths in the background after DEL released their
//! addresses: the kernel's veth unregister waits ~20 ms for RCU, which DEL
//! then need not wait out. A deletion lost to a crash is left to reconcile,
//! which deletes veths without an allocation.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

use super::{HostLink, HostLinks};

/// Deletions in flight at once: they serialise on the kernel's RTNL lock
/// anyway, but overlapping their RCU waits drains a DEL storm faster.
const PARALLEL: usize = 4;

#[derive(Clone)]
pub struct Unplugger {
    queue: mpsc::UnboundedSender<HostLink>,
}

impl Unplugger {
    /// Starts the worker on the current tokio runtime.
    pub fn start(links: Arc<dyn HostLinks>) -> Self {
        let (queue, mut jobs) = mpsc::unbounded_channel::<HostLink>();
        let slots = Arc::new(Semaphore::new(PARALLEL));
        tokio::spawn(async move {
            while let Some(link) = jobs.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let links = links.clone();
                tokio::spawn(async move {
                    match links.delete_link(&link).await {
                        Ok(true) => tracing::debug!(link = %link.name, "deleted host veth"),
                        Ok(false) => tracing::debug!(link = %link.name, "host veth already gone"),
                        Err(e) => tracing::warn!(link = %link.name, error = %e,
                            "cannot delete host veth; reconcile will retry"),
                    }
                    drop(slot);
                });
            }
        });
        Unplugger { queue }
    }

    /// False when the worker is gone (runtime shutting down): the caller
    /// deletes the link itself.
    pub fn queue(&self, link: HostLink) -> bool {
        self.queue.send(link).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::node::fake::FakeHost;

    #[tokio::test]
    async fn queued_links_are_deleted_by_index_and_name() {
        let host = Arc::new(FakeHost::default());
        host.set_links(&["fryaaa", "frybbb", "fryccc"]);
        let unplug = Unplugger::start(host.clone());
        assert!(unplug.queue(HostLink {
            name: "fryaaa".into(),
            index: 100
        }));
        // Same name, stale index: a re-created veth must survive.
        assert!(unplug.queue(HostLink {
            name: "frybbb".into(),
            index: 999
        }));
        assert!(unplug.queue(HostLink {
            name: "fryccc".into(),
            index: 102
        }));
        let deadline = Instant::now() + Duration::from_secs(5);
        while host.names() != ["frybbb"] {
            assert!(Instant::now() < deadline, "left: {:?}", host.names());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(host.deleted.lock().unwrap().len(), 2);
    }
}
