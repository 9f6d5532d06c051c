//! The sled Store: one transaction per batch, group-committed flushes.
//!
//! `apply` encodes a batch into writes (`codec`, which also holds the
//! layout of the trees) and queues them (`queue`). One flusher thread
//! (`flusher`) writes the queue to sled and flushes and fdatasyncs it
//! for every waiter at once, and now and then advances the flush bound
//! (`bound`), which tells at open that a database lost durable state.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::SystemTime;

use ::sled::Tree;
use futures::future::BoxFuture;
use tokio::sync::watch;
use tracing::error;

use super::{Mutation, Probe, Seq, Snapshot, Store, StoreError, io_is_damage};
use crate::model::{AllocKey, Allocation};
use bound::{
    BoundAdvancer, BoundPolicy, check_bound, move_bound_into, read_flush_bound, read_flushes,
    write_flush_bound,
};
use codec::{
    BLOCKS, COOLING, Op, TREE_ALLOCATIONS, TREE_BLOCKS, TREE_COOLING, TREE_IPS, TREE_META,
    TREE_POOLS, alloc_key_bytes, block_key_bytes, cooling_key, corrupt, decode_alloc_key,
    decode_cooling_key, decode_ip, decode_json, encode,
};
use flusher::{FlushState, Flusher};
use queue::{Shared, current, queued_value};

mod bound;
mod codec;
mod flusher;
mod queue;
mod read;
#[cfg(test)]
mod tests;

struct WriteState {
    seq: Seq,
    /// ip -> released_unix_ms of its cooling entry, to find the entry's key
    /// (which starts with the time) when only the ip is known.
    cooling_at: HashMap<Ipv4Addr, i64>,
}

pub struct SledStore {
    state_dir: PathBuf,
    dir: PathBuf,
    db: ::sled::Db,
    pools: Tree,
    blocks: Tree,
    allocations: Tree,
    ips: Tree,
    cooling: Tree,
    meta: Tree,
    shared: Arc<Shared>,
    /// Held while a batch is queued so that seq order is queue order.
    write: Mutex<WriteState>,
    last_seq: Arc<AtomicU64>,
    flushed: watch::Receiver<FlushState>,
    wake: Option<mpsc::Sender<()>>,
    flusher: Option<JoinHandle<()>>,
    /// Tests set it to make the next flush fail as a failed fdatasync would.
    #[cfg(test)]
    fail_next_flush: Arc<std::sync::atomic::AtomicBool>,
    /// Set by recovery: what happened to the previous database, reported
    /// in the readiness reason until restart.
    notice: Mutex<Option<String>>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("dir", &self.dir)
            .field("last_seq", &self.last_seq.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

/// The one place a sled error becomes a [`StoreError`], judged here for
/// damage: sled's own corruption, bug and unsupported-format reports are,
/// and so is I/O that read back something other than was written.
impl From<::sled::Error> for StoreError {
    fn from(e: ::sled::Error) -> StoreError {
        let damage = match &e {
            ::sled::Error::Corruption { .. }
            | ::sled::Error::ReportableBug(_)
            | ::sled::Error::Unsupported(_) => true,
            ::sled::Error::Io(io) => io_is_damage(io),
            _ => false,
        };
        StoreError::Backend {
            backend: "sled",
            damage,
            source: Box::new(e),
        }
    }
}

fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sync_path(p: &Path) -> Result<(), StoreError> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(p, e))
}

/// A database moved aside is `db.corrupt-<unix seconds>[-N]`.
const MOVED_ASIDE_PREFIX: &str = "db.corrupt-";

/// When the database named `name` was moved aside, if it was.
pub fn moved_aside_at(name: &str) -> Option<SystemTime> {
    let rest = name.strip_prefix(MOVED_ASIDE_PREFIX)?;
    let secs = rest.split('-').next()?.parse::<u64>().ok()?;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

impl SledStore {
    /// Opens (or creates) the database at `state_dir/db`. Fails with
    /// [`StoreError::Lost`] when the database holds less than was once
    /// durable (truncated, overwritten or removed behind our back).
    pub fn open(state_dir: &Path) -> Result<SledStore, StoreError> {
        SledStore::open_with(state_dir, BoundPolicy::default())
    }

    fn open_with(state_dir: &Path, policy: BoundPolicy) -> Result<SledStore, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|e| io_err(state_dir, e))?;
        let bound = read_flush_bound(state_dir)?;
        let dir = state_dir.join("db");
        // We flush (and fdatasync) ourselves; sled's own periodic flush
        // would only add disk traffic to every commit's fdatasync.
        let db = ::sled::Config::new()
            .path(&dir)
            .flush_every_ms(None)
            .open()?;
        let meta = db.open_tree(TREE_META)?;
        let flushes = read_flushes(&meta)?;
        check_bound(&dir, flushes, bound)?;
        let log_path = dir.join("db");
        let log = File::open(&log_path).map_err(|e| io_err(&log_path, e))?;
        // sled writes `conf` once at creation without syncing it; the log's
        // and conf's directory entries must survive a power loss too.
        log.sync_all().map_err(|e| io_err(&log_path, e))?;
        for p in [dir.join("conf"), dir.clone(), state_dir.to_path_buf()] {
            sync_path(&p)?;
        }
        if bound != Some(flushes) {
            write_flush_bound(state_dir, flushes)?;
        }

        let cooling = db.open_tree(TREE_COOLING)?;
        let mut cooling_at = HashMap::new();
        for item in cooling.iter() {
            let (k, _) = item?;
            let (t, ip) = decode_cooling_key(&k)?;
            if cooling_at.insert(ip, t).is_some() {
                return Err(corrupt(
                    TREE_COOLING,
                    &k,
                    "second cooling entry for the same ip",
                ));
            }
        }

        let pools = db.open_tree(TREE_POOLS)?;
        let blocks = db.open_tree(TREE_BLOCKS)?;
        let allocations = db.open_tree(TREE_ALLOCATIONS)?;
        let ips = db.open_tree(TREE_IPS)?;
        let shared = Arc::new(Shared {
            trees: [
                pools.clone(),
                blocks.clone(),
                allocations.clone(),
                ips.clone(),
                cooling.clone(),
            ],
            queue: Mutex::new(Vec::new()),
            writer: Mutex::new(()),
        });
        let last_seq = Arc::new(AtomicU64::new(0));
        let (state_tx, state_rx) = watch::channel(FlushState::default());
        let (wake_tx, wake_rx) = mpsc::channel();
        #[cfg(test)]
        let fail_next_flush = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flusher = Flusher {
            shared: shared.clone(),
            db: db.clone(),
            meta: meta.clone(),
            flushes,
            last_seq: last_seq.clone(),
            #[cfg(test)]
            fail_next: fail_next_flush.clone(),
            log,
            log_path,
            blobs: dir.join("blobs"),
            blobs_seen: None,
            synced_blobs: HashSet::new(),
            bound: BoundAdvancer::new(state_dir.to_path_buf(), policy, flushes),
        };
        let flusher = std::thread::Builder::new()
            .name("ferry-store-flush".into())
            .spawn(move || flusher.run(wake_rx, state_tx))
            .map_err(|e| io_err(&dir, e))?;

        Ok(SledStore {
            pools,
            blocks,
            allocations,
            ips,
            cooling,
            meta,
            shared,
            db,
            state_dir: state_dir.to_path_buf(),
            dir,
            write: Mutex::new(WriteState { seq: 0, cooling_at }),
            last_seq,
            flushed: state_rx,
            wake: Some(wake_tx),
            flusher: Some(flusher),
            #[cfg(test)]
            fail_next_flush,
            notice: Mutex::new(None),
        })
    }

    /// Renames `state_dir/db` to `state_dir/db.corrupt-<unix seconds>` (with
    /// a `-N` suffix if taken) so that a fresh database can be created, and
    /// moves the flush bound into it. Returns the new path. The database
    /// must not be open.
    pub fn move_aside(state_dir: &Path, now: SystemTime) -> Result<PathBuf, StoreError> {
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let from = state_dir.join("db");
        let mut to = state_dir.join(format!("{MOVED_ASIDE_PREFIX}{secs}"));
        let mut n = 1;
        while to.symlink_metadata().is_ok() {
            to = state_dir.join(format!("{MOVED_ASIDE_PREFIX}{secs}-{n}"));
            n += 1;
        }
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            // Nothing to keep; the new directory still marks what happened.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&to).map_err(|e| io_err(&to, e))?
            }
            Err(e) => return Err(io_err(&from, e)),
        }
        move_bound_into(state_dir, &to)?;
        sync_path(&to)?;
        sync_path(state_dir)?;
        Ok(to)
    }

    /// Makes the next flush fail, as a failed fdatasync would: the store is
    /// poisoned from then on.
    #[cfg(test)]
    pub(crate) fn fail_next_flush(&self) {
        self.fail_next_flush.store(true, Ordering::SeqCst);
    }

    /// The sticky flush error as a StoreError.
    fn poisoned(&self, error: &str) -> StoreError {
        StoreError::Io {
            path: self.dir.clone(),
            source: std::io::Error::other(error.to_string()),
        }
    }

    /// Where the database lives (`state_dir/db`).
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// How many flushes (sled flush + fdatasync) have completed; with group
    /// commit this grows slower than the number of durable() callers.
    pub fn flush_count(&self) -> u64 {
        self.flushed.borrow().flushes
    }

    /// Sets the text [`Store::notice`] reports until restart.
    pub fn set_notice(&self, notice: String) {
        *self.notice.lock().unwrap_or_else(|e| e.into_inner()) = Some(notice);
    }

    /// The reverse index as stored, for consistency checks.
    pub fn ip_index(&self) -> Result<Vec<(Ipv4Addr, AllocKey)>, StoreError> {
        self.shared.write_queued()?;
        let mut out = Vec::new();
        for item in self.ips.iter() {
            let (k, v) = item?;
            out.push((
                decode_ip(TREE_IPS, &k)?,
                decode_alloc_key(TREE_IPS, &k, &v)?,
            ));
        }
        Ok(out)
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // Closing the channel ends the flusher; joining it releases its
        // handle on the db, so the directory can be reopened at once.
        self.wake.take();
        if let Some(h) = self.flusher.take()
            && h.join().is_err()
        {
            error!("store flusher thread panicked");
        }
        // A clean close leaves the tightest bound for the next open. Only
        // what is durable may be promised, and never after a failed sync.
        if self.health().is_err() {
            return;
        }
        let closed = self.shared.write_queued().and_then(|()| {
            let n = read_flushes(&self.meta)?;
            self.db.flush()?;
            sync_path(&self.dir.join("db"))?;
            write_flush_bound(&self.state_dir, n)
        });
        if let Err(e) = closed {
            error!(error = %e, "final store flush failed");
        }
    }
}

impl Store for SledStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        // Everything applied so far, as sled will hold it once flushed.
        self.shared.write_queued()?;
        self.read_trees()
    }

    fn scan_written(&self) -> Result<Snapshot, StoreError> {
        // No write_queued here: its transaction waits for a flush in
        // progress, and while it waits sled's global lock holds back every
        // reader, `apply`'s under the allocator lock included.
        self.read_trees()
    }

    fn probe(&self, items: &Probe) -> Result<Snapshot, StoreError> {
        let cooling_at: Vec<(Ipv4Addr, i64)> = {
            let w = self.write.lock().unwrap_or_else(|e| e.into_inner());
            items
                .cooling
                .iter()
                .filter_map(|ip| w.cooling_at.get(ip).map(|t| (*ip, *t)))
                .collect()
        };
        // With `writer` held no batch is half-way from the queue into sled,
        // so the trees plus the queue hold every batch applied.
        let _w = self.shared.writer.lock().unwrap_or_else(|e| e.into_inner());
        let queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        let mut snap = Snapshot::default();
        for key in &items.allocations {
            let k = alloc_key_bytes(key);
            let v = match queued_value(&queue, |op| match op {
                Op::PutAllocation { key, value, .. } if *key == k => Some(Some(value.as_slice())),
                Op::DeleteAllocation { key, .. } if *key == k => Some(None),
                _ => None,
            }) {
                Some(v) => v.map(<[u8]>::to_vec),
                None => self.allocations.get(&k)?.map(|v| v.to_vec()),
            };
            if let Some(v) = v {
                snap.allocations
                    .push(decode_json(TREE_ALLOCATIONS, &k, &v)?);
            }
        }
        for (pool, cidr) in &items.blocks {
            let k = block_key_bytes(pool, *cidr);
            if let Some(v) = current(&queue, BLOCKS, &self.blocks, &k)? {
                snap.blocks.push(decode_json(TREE_BLOCKS, &k, &v)?);
            }
        }
        for (ip, t) in cooling_at {
            if current(&queue, COOLING, &self.cooling, &cooling_key(t, ip))?.is_some() {
                snap.cooling.push((ip, t));
            }
        }
        snap.cooling.sort_by_key(|&(ip, t)| (t, ip));
        Ok(snap)
    }

    fn apply(&self, batch: &[Mutation]) -> Result<Seq, StoreError> {
        let ops = encode(batch)?;
        let mut w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        // Poisoned: nothing written now could be made durable, and the core
        // applies a batch to memory only when this succeeds.
        self.health()?;
        // The one thing the transaction could trip over is a corrupt
        // allocation it replaces: find it now, while refusing changes nothing.
        for op in &ops {
            if let Op::PutAllocation { key, .. } = op
                && let Some(old) = self.allocations.get(key)?
            {
                decode_json::<Allocation>(TREE_ALLOCATIONS, key, &old)?;
            }
        }
        // Cooling entries are keyed by time: resolve them to plain puts and
        // deletes with the time index, which is thereby up to date at once.
        let mut queued = Vec::with_capacity(ops.len() + 1);
        for op in ops {
            match op {
                Op::PutCooling { ip, t } => {
                    if let Some(old) = w.cooling_at.insert(ip, t) {
                        queued.push(Op::Del {
                            tree: COOLING,
                            key: cooling_key(old, ip).to_vec(),
                        });
                    }
                    queued.push(Op::Put {
                        tree: COOLING,
                        key: cooling_key(t, ip).to_vec(),
                        value: Vec::new(),
                    });
                }
                Op::DeleteCooling { ip } => {
                    if let Some(old) = w.cooling_at.remove(&ip) {
                        queued.push(Op::Del {
                            tree: COOLING,
                            key: cooling_key(old, ip).to_vec(),
                        });
                    }
                }
                other => queued.push(other),
            }
        }
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(queued);
        w.seq += 1;
        let seq = w.seq;
        self.last_seq.store(seq, Ordering::SeqCst);
        Ok(seq)
    }

    fn last_seq(&self) -> Seq {
        self.last_seq.load(Ordering::SeqCst)
    }

    fn durable(&self, seq: Seq) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            // Nothing past the newest batch can be waited for.
            let seq = seq.min(self.last_seq());
            let mut rx = self.flushed.clone();
            let check = |s: &FlushState| -> Option<Result<(), StoreError>> {
                if s.flushed >= seq {
                    Some(Ok(()))
                } else {
                    s.error.as_deref().map(|e| Err(self.poisoned(e)))
                }
            };
            if let Some(r) = check(&rx.borrow_and_update()) {
                return r;
            }
            let wake = self.wake.as_ref().ok_or(StoreError::Closed)?;
            wake.send(()).map_err(|_| StoreError::Closed)?;
            let s = rx
                .wait_for(|s| s.flushed >= seq || s.error.is_some())
                .await
                .map_err(|_| StoreError::Closed)?;
            check(&s).unwrap_or(Err(StoreError::Closed))
        })
    }

    fn health(&self) -> Result<(), StoreError> {
        match self.flushed.borrow().error.as_deref() {
            Some(e) => Err(self.poisoned(e)),
            None => Ok(()),
        }
    }

    fn notice(&self) -> Option<String> {
        self.notice
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
