//! Durability: sled 0.34's flush ends in `sync_file_range`, which does not
//! flush the disk cache nor file metadata (spacejam/sled#1452). After each
//! flush we therefore fdatasync sled's log file (`db/db`) and any blob files
//! ourselves. One background thread does this for every waiter at once
//! (group commit); batches applied while it syncs wait for its next round.
//! It is one thread on purpose: under CPU contention every extra thread
//! hand-off in the commit path costs a scheduling delay.

use std::collections::HashSet;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, SystemTime};

use ::sled::Tree;
use tokio::sync::watch;
use tracing::{debug, error};

use super::bound::{BoundAdvancer, META_FLUSHES};
use super::queue::Shared;
use crate::store::Seq;

/// Directory mtimes are coarse: see `Flusher::blobs_seen`.
const BLOB_MTIME_MARGIN: Duration = Duration::from_secs(2);

/// What the flusher has made durable, watched by `durable` and `health`.
#[derive(Debug, Clone, Default)]
pub(super) struct FlushState {
    pub(super) flushed: Seq,
    /// Completed flushes, to observe group commit.
    pub(super) flushes: u64,
    /// Sticky: after a failed fsync the kernel may have dropped the dirty
    /// pages, so a later "successful" fsync proves nothing. ipamd must restart.
    pub(super) error: Option<String>,
}

/// The background flusher: one sled flush and one fdatasync for every
/// batch applied since the last one, and now and then the flush bound.
pub(super) struct Flusher {
    pub(super) shared: Arc<Shared>,
    pub(super) db: ::sled::Db,
    pub(super) meta: Tree,
    /// `meta/flushes` as last written.
    pub(super) flushes: u64,
    pub(super) last_seq: Arc<AtomicU64>,
    /// See `SledStore::fail_next_flush`.
    #[cfg(test)]
    pub(super) fail_next: Arc<std::sync::atomic::AtomicBool>,
    pub(super) log: File,
    pub(super) log_path: PathBuf,
    pub(super) blobs: PathBuf,
    /// The blob directory's mtime when it was last listed, if the listing
    /// began well after that mtime: a new blob file then gives the
    /// directory a newer mtime (timestamps are coarse, hence the margin),
    /// so an unchanged mtime means nothing new to sync.
    pub(super) blobs_seen: Option<SystemTime>,
    pub(super) synced_blobs: HashSet<PathBuf>,
    /// Advances `db.flushes` now and then, off the commit path.
    pub(super) bound: BoundAdvancer,
}

impl Flusher {
    pub(super) fn run(mut self, wake: mpsc::Receiver<()>, state: watch::Sender<FlushState>) {
        while wake.recv().is_ok() {
            // Everyone who asked so far is served by this one flush.
            while wake.try_recv().is_ok() {}
            let target = self.last_seq.load(Ordering::SeqCst);
            if state.borrow().flushed >= target {
                continue;
            }
            match self.flush() {
                Ok(()) => {
                    debug!(seq = target, "store flushed");
                    state.send_modify(|s| {
                        s.flushed = s.flushed.max(target);
                        s.flushes += 1;
                    });
                    // After the wake-up: the bound is off the commit path.
                    self.bound.advance(self.flushes);
                }
                Err(e) => {
                    error!(error = %e, "store flush failed; durability can no longer be promised");
                    state.send_modify(|s| s.error = Some(e));
                    // Sticky: nothing more is flushed.
                    return;
                }
            }
        }
    }

    fn flush(&mut self) -> Result<(), String> {
        #[cfg(test)]
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(format!(
                "fdatasync {}: injected failure",
                self.log_path.display()
            ));
        }
        self.shared
            .write_queued()
            .map_err(|e| format!("sled write: {e}"))?;
        // The bump lands in the log after every batch up to the target, so
        // a log holding it holds them too (sled recovers a prefix).
        self.flushes += 1;
        self.meta
            .insert(META_FLUSHES, &self.flushes.to_be_bytes())
            .and_then(|_| self.db.flush())
            .map_err(|e| format!("sled flush: {e}"))?;
        self.log
            .sync_data()
            .map_err(|e| format!("fdatasync {}: {e}", self.log_path.display()))?;
        self.sync_blobs()
    }

    /// sled writes large values as separate blob files and does not sync them.
    fn sync_blobs(&mut self) -> Result<(), String> {
        let dir = &self.blobs;
        let mtime = match std::fs::metadata(dir).and_then(|m| m.modified()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("stat {}: {e}", dir.display())),
        };
        if self.blobs_seen == Some(mtime) {
            return Ok(());
        }
        let listed_at = SystemTime::now();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("read {}: {e}", dir.display())),
        };
        let mut live = HashSet::new();
        let mut new = false;
        for entry in entries {
            let path = entry
                .map_err(|e| format!("read {}: {e}", dir.display()))?
                .path();
            if !self.synced_blobs.contains(&path) {
                File::open(&path)
                    .and_then(|f| f.sync_data())
                    .map_err(|e| format!("fdatasync {}: {e}", path.display()))?;
                new = true;
            }
            live.insert(path);
        }
        if new {
            File::open(dir)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("fsync {}: {e}", dir.display()))?;
        }
        self.synced_blobs = live;
        self.blobs_seen = mtime
            .checked_add(BLOB_MTIME_MARGIN)
            .filter(|t| *t < listed_at)
            .map(|_| mtime);
        Ok(())
    }
}
