//! Loss detection: sled 0.34 opens a truncated or overwritten log without an
//! error, recovering only the valid prefix (possibly nothing). So every
//! commit also bumps `meta/flushes`, and `state_dir/db.flushes` keeps a
//! lower bound of it: written at open, at a clean close, and by the flusher
//! thread after a flush once 256 flushes or 2 s have passed since it last
//! wrote it, whichever comes first (`BOUND_EVERY_FLUSHES`, `BOUND_EVERY`).
//! That check runs only when a flush happens (there is no timer): an idle
//! store writes nothing. A database holding fewer flushes than the bound has
//! lost durable state: `open` reports it as [`StoreError::Lost`], and ipamd
//! rebuilds (see `recover`). After a crash, losing only the flushes since the
//! bound was last written still goes unnoticed.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ::sled::Tree;
use tracing::{debug, warn};

use super::codec::{TREE_META, corrupt};
use super::{io_err, sync_path};
use crate::store::StoreError;

/// The key in the `meta` tree of the commit count, a u64 big-endian.
pub(super) const META_FLUSHES: &[u8] = b"flushes";
/// Beside the database (not in it): the lower bound of `meta/flushes`.
pub(super) const FLUSHES_FILE: &str = "db.flushes";
/// The bound's file as kept inside a moved-aside database directory.
pub(super) const FLUSHES_FILE_MOVED: &str = "ferry-flushes";
/// The flusher rewrites `db.flushes` after this many flushes since it last
/// did, or at the first flush [`BOUND_EVERY`] after that, whichever comes
/// first. Each rewrite costs two fsyncs, so not on every flush.
const BOUND_EVERY_FLUSHES: u64 = 256;
const BOUND_EVERY: Duration = Duration::from_secs(2);

/// When the flusher advances `db.flushes`; tests shrink it.
#[derive(Debug, Clone, Copy)]
pub(super) struct BoundPolicy {
    pub(super) flushes: u64,
    pub(super) interval: Duration,
}

impl Default for BoundPolicy {
    fn default() -> Self {
        BoundPolicy {
            flushes: BOUND_EVERY_FLUSHES,
            interval: BOUND_EVERY,
        }
    }
}

/// The bound in `state_dir/db.flushes`; None when there is none yet.
pub(super) fn read_flush_bound(state_dir: &Path) -> Result<Option<u64>, StoreError> {
    let path = state_dir.join(FLUSHES_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse().map(Some).map_err(|e| StoreError::Lost {
            path: path.clone(),
            reason: format!("{} does not hold a number ({e})", path.display()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path, e)),
    }
}

/// Replaces `state_dir/db.flushes` atomically and durably.
pub(super) fn write_flush_bound(state_dir: &Path, flushes: u64) -> Result<(), StoreError> {
    let path = state_dir.join(FLUSHES_FILE);
    let tmp = state_dir.join(format!("{FLUSHES_FILE}.tmp"));
    File::create(&tmp)
        .and_then(|mut f| {
            writeln!(f, "{flushes}")?;
            f.sync_all()
        })
        .map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
    sync_path(state_dir)
}

/// `meta/flushes`: the commits the database holds.
pub(super) fn read_flushes(meta: &Tree) -> Result<u64, StoreError> {
    match meta.get(META_FLUSHES)? {
        None => Ok(0),
        Some(v) => {
            let b: [u8; 8] = v.as_ref().try_into().map_err(|_| {
                corrupt(TREE_META, META_FLUSHES, format!("{} bytes, not 8", v.len()))
            })?;
            Ok(u64::from_be_bytes(b))
        }
    }
}

/// Err([`StoreError::Lost`]) when the database at `dir`, holding `flushes`
/// commits, holds fewer than `bound` says were once durable.
pub(super) fn check_bound(dir: &Path, flushes: u64, bound: Option<u64>) -> Result<(), StoreError> {
    if let Some(bound) = bound
        && flushes < bound
    {
        return Err(StoreError::Lost {
            path: dir.to_path_buf(),
            reason: format!(
                "it holds {flushes} commits but {bound} were durable before; \
                 it was truncated, overwritten or replaced"
            ),
        });
    }
    Ok(())
}

/// Moves `state_dir/db.flushes`, if there is one, into the moved-aside
/// database directory `to`, so that the fresh database starts unbound.
pub(super) fn move_bound_into(state_dir: &Path, to: &Path) -> Result<(), StoreError> {
    let bound = state_dir.join(FLUSHES_FILE);
    match std::fs::rename(&bound, to.join(FLUSHES_FILE_MOVED)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(&bound, e)),
    }
}

/// The flusher's side of the bound: advances `db.flushes` when the policy
/// says it is due.
pub(super) struct BoundAdvancer {
    state_dir: PathBuf,
    policy: BoundPolicy,
    /// The commit count when `db.flushes` was last written (or tried), and when.
    tried: u64,
    tried_at: Instant,
}

impl BoundAdvancer {
    /// `flushes`: the commit count the bound was written with at open.
    pub(super) fn new(state_dir: PathBuf, policy: BoundPolicy, flushes: u64) -> BoundAdvancer {
        BoundAdvancer {
            state_dir,
            policy,
            tried: flushes,
            tried_at: Instant::now(),
        }
    }

    /// Rewrites `db.flushes` with `flushes`, the commits made so far, when
    /// due. Call only after a successful flush: that count is durable then,
    /// and the bound must never promise more than the disk holds.
    pub(super) fn advance(&mut self, flushes: u64) {
        if flushes - self.tried < self.policy.flushes
            && self.tried_at.elapsed() < self.policy.interval
        {
            return;
        }
        // A failure does not poison the store: every commit is still durable,
        // and an older bound only widens what a crash can lose unnoticed.
        // Retried when due again, not on every flush of a failing disk.
        match write_flush_bound(&self.state_dir, flushes) {
            Ok(()) => debug!(flushes, "flush bound advanced"),
            Err(e) => warn!(
                error = %e,
                flushes,
                "could not advance the flush bound; a lost log tail may go unnoticed"
            ),
        }
        self.tried = flushes;
        self.tried_at = Instant::now();
    }
}
