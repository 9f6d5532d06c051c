//! The sled Store: one transaction per batch, group-committed flushes.
//!
//! Layout under `state_dir/db` (sled's own directory), one tree each:
//! - `pools`:       name -> JSON PoolSpec
//! - `blocks`:      pool \0 cidr -> JSON BlockClaim
//! - `allocations`: network \0 container_id \0 ifname -> JSON Allocation
//! - `ips`:         ip octets -> allocation key (the reverse index)
//! - `cooling`:     released_unix_ms (u64 BE) ++ ip octets -> empty,
//!   so iteration order is FIFO release order.
//! - `meta`:        `flushes` -> u64 BE, bumped by every group commit.
//!
//! Durability: sled 0.34's flush ends in `sync_file_range`, which does not
//! flush the disk cache nor file metadata (spacejam/sled#1452). After each
//! flush we therefore fdatasync sled's log file (`db/db`) and any blob files
//! ourselves. One background thread does this for every waiter at once
//! (group commit); batches applied while it syncs wait for its next round.
//! It is one thread on purpose: under CPU contention every extra thread
//! hand-off in the commit path costs a scheduling delay.
//!
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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use ::sled::transaction::{ConflictableTransactionError, TransactionError};
use ::sled::{Transactional, Tree};
use futures::future::BoxFuture;
use tokio::sync::watch;
use tracing::{debug, error, warn};

use super::{Mutation, Probe, Seq, Snapshot, Store, StoreError};
use crate::model::{AllocKey, Allocation, BlockClaim, PoolSpec};

const TREE_POOLS: &str = "pools";
const TREE_BLOCKS: &str = "blocks";
const TREE_ALLOCATIONS: &str = "allocations";
const TREE_IPS: &str = "ips";
const TREE_COOLING: &str = "cooling";
const TREE_META: &str = "meta";
const META_FLUSHES: &[u8] = b"flushes";
/// Beside the database (not in it): the lower bound of `meta/flushes`.
const FLUSHES_FILE: &str = "db.flushes";
/// The bound's file as kept inside a moved-aside database directory.
const FLUSHES_FILE_MOVED: &str = "ferry-flushes";
/// Directory mtimes are coarse: see `Flusher::blobs_seen`.
const BLOB_MTIME_MARGIN: Duration = Duration::from_secs(2);
/// The flusher rewrites `db.flushes` after this many flushes since it last
/// did, or at the first flush [`BOUND_EVERY`] after that, whichever comes
/// first. Each rewrite costs two fsyncs, so not on every flush.
const BOUND_EVERY_FLUSHES: u64 = 256;
const BOUND_EVERY: Duration = Duration::from_secs(2);

/// When the flusher advances `db.flushes`; tests shrink it.
#[derive(Debug, Clone, Copy)]
struct BoundPolicy {
    flushes: u64,
    interval: Duration,
}

impl Default for BoundPolicy {
    fn default() -> Self {
        BoundPolicy {
            flushes: BOUND_EVERY_FLUSHES,
            interval: BOUND_EVERY,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct FlushState {
    flushed: Seq,
    /// Completed flushes, to observe group commit.
    flushes: u64,
    /// Sticky: after a failed fsync the kernel may have dropped the dirty
    /// pages, so a later "successful" fsync proves nothing. ipamd must restart.
    error: Option<String>,
}

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
    #[cfg_attr(not(test), allow(dead_code))]
    fail_next_flush: Arc<AtomicBool>,
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

/// The bound in `state_dir/db.flushes`; None when there is none yet.
fn read_flush_bound(state_dir: &Path) -> Result<Option<u64>, StoreError> {
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
fn write_flush_bound(state_dir: &Path, flushes: u64) -> Result<(), StoreError> {
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

fn read_flushes(meta: &Tree) -> Result<u64, StoreError> {
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
        if let Some(bound) = bound
            && flushes < bound
        {
            return Err(StoreError::Lost {
                path: dir,
                reason: format!(
                    "it holds {flushes} commits but {bound} were durable before; \
                     it was truncated, overwritten or replaced"
                ),
            });
        }
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
        let fail_next_flush = Arc::new(AtomicBool::new(false));
        let flusher = Flusher {
            shared: shared.clone(),
            db: db.clone(),
            meta: meta.clone(),
            flushes,
            last_seq: last_seq.clone(),
            fail_next: fail_next_flush.clone(),
            log,
            log_path,
            blobs: dir.join("blobs"),
            blobs_seen: None,
            synced_blobs: HashSet::new(),
            state_dir: state_dir.to_path_buf(),
            policy,
            bound_tried: flushes,
            bound_tried_at: Instant::now(),
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
        let mut to = state_dir.join(format!("db.corrupt-{secs}"));
        let mut n = 1;
        while to.symlink_metadata().is_ok() {
            to = state_dir.join(format!("db.corrupt-{secs}-{n}"));
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
        let bound = state_dir.join(FLUSHES_FILE);
        match std::fs::rename(&bound, to.join(FLUSHES_FILE_MOVED)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&bound, e)),
        }
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

/// The background flusher: one sled flush and one fdatasync for every
/// batch applied since the last one, and now and then the flush bound.
struct Flusher {
    shared: Arc<Shared>,
    db: ::sled::Db,
    meta: Tree,
    /// `meta/flushes` as last written.
    flushes: u64,
    last_seq: Arc<AtomicU64>,
    fail_next: Arc<AtomicBool>,
    log: File,
    log_path: PathBuf,
    blobs: PathBuf,
    /// The blob directory's mtime when it was last listed, if the listing
    /// began well after that mtime: a new blob file then gives the
    /// directory a newer mtime (timestamps are coarse, hence the margin),
    /// so an unchanged mtime means nothing new to sync.
    blobs_seen: Option<SystemTime>,
    synced_blobs: HashSet<PathBuf>,
    /// Where `db.flushes` lives, and when to advance it.
    state_dir: PathBuf,
    policy: BoundPolicy,
    /// `flushes` when `db.flushes` was last written (or tried), and when.
    bound_tried: u64,
    bound_tried_at: Instant,
}

impl Flusher {
    fn run(mut self, wake: mpsc::Receiver<()>, state: watch::Sender<FlushState>) {
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
                    self.advance_bound();
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

    /// Rewrites `db.flushes` with `self.flushes` when due. Call only after
    /// a successful flush: that count is durable then, and the bound must
    /// never promise more than the disk holds.
    fn advance_bound(&mut self) {
        if self.flushes - self.bound_tried < self.policy.flushes
            && self.bound_tried_at.elapsed() < self.policy.interval
        {
            return;
        }
        // A failure does not poison the store: every commit is still durable,
        // and an older bound only widens what a crash can lose unnoticed.
        // Retried when due again, not on every flush of a failing disk.
        match write_flush_bound(&self.state_dir, self.flushes) {
            Ok(()) => debug!(flushes = self.flushes, "flush bound advanced"),
            Err(e) => warn!(
                error = %e,
                flushes = self.flushes,
                "could not advance the flush bound; a lost log tail may go unnoticed"
            ),
        }
        self.bound_tried = self.flushes;
        self.bound_tried_at = Instant::now();
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

// ------------------------------------------------------------------ codecs

fn alloc_key_bytes(k: &AllocKey) -> Vec<u8> {
    let mut v = Vec::with_capacity(k.network.len() + k.container_id.len() + k.ifname.len() + 2);
    v.extend_from_slice(k.network.as_bytes());
    v.push(0);
    v.extend_from_slice(k.container_id.as_bytes());
    v.push(0);
    v.extend_from_slice(k.ifname.as_bytes());
    v
}

fn block_key_bytes(pool: &str, cidr: ipnet::Ipv4Net) -> Vec<u8> {
    format!("{pool}\0{cidr}").into_bytes()
}

fn cooling_key(released_unix_ms: i64, ip: Ipv4Addr) -> [u8; 12] {
    // Times before 1970 do not occur; clamping keeps the key unsigned.
    let t = u64::try_from(released_unix_ms).unwrap_or(0);
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&t.to_be_bytes());
    k[8..].copy_from_slice(&ip.octets());
    k
}

fn show_key(tree: &str, k: &[u8]) -> String {
    match (tree, k.len()) {
        (TREE_IPS, 4) => format!("{tree}/{}", Ipv4Addr::new(k[0], k[1], k[2], k[3])),
        (TREE_COOLING, 12) => {
            let mut t = [0u8; 8];
            t.copy_from_slice(&k[..8]);
            format!(
                "{tree}/{}@{}",
                Ipv4Addr::new(k[8], k[9], k[10], k[11]),
                u64::from_be_bytes(t)
            )
        }
        _ => format!("{tree}/{}", String::from_utf8_lossy(k).replace('\0', "\\0")),
    }
}

fn corrupt(tree: &str, k: &[u8], reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: show_key(tree, k),
        reason: reason.into(),
    }
}

fn decode_ip(tree: &str, k: &[u8]) -> Result<Ipv4Addr, StoreError> {
    let o: [u8; 4] = k.try_into().map_err(|_| {
        corrupt(
            tree,
            k,
            format!("{} bytes where an IPv4 address was expected", k.len()),
        )
    })?;
    Ok(Ipv4Addr::from(o))
}

fn decode_cooling_key(k: &[u8]) -> Result<(i64, Ipv4Addr), StoreError> {
    if k.len() != 12 {
        return Err(corrupt(
            TREE_COOLING,
            k,
            format!("key of {} bytes, expected 12", k.len()),
        ));
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&k[..8]);
    let t = i64::try_from(u64::from_be_bytes(t))
        .map_err(|_| corrupt(TREE_COOLING, k, "release time out of range"))?;
    Ok((t, decode_ip(TREE_COOLING, &k[8..])?))
}

/// Decodes an allocation key stored as a value (the `ips` tree) or key.
fn decode_alloc_key(tree: &str, k: &[u8], v: &[u8]) -> Result<AllocKey, StoreError> {
    let s = std::str::from_utf8(v).map_err(|e| corrupt(tree, k, format!("not UTF-8: {e}")))?;
    let mut parts = s.split('\0');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(network), Some(container_id), Some(ifname), None) => Ok(AllocKey {
            network: network.into(),
            container_id: container_id.into(),
            ifname: ifname.into(),
        }),
        _ => Err(corrupt(
            tree,
            k,
            "allocation key must have three NUL-separated parts",
        )),
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(
    tree: &str,
    k: &[u8],
    v: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| corrupt(tree, k, format!("bad JSON: {e}")))
}

fn to_json<T: serde::Serialize>(what: &str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt {
        key: what.to_string(),
        reason: format!("cannot encode: {e}"),
    })
}

/// A mutation with its bytes computed up front, so that the transaction body
/// cannot fail on encoding (it may run more than once).
enum Op {
    Put {
        tree: usize,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Del {
        tree: usize,
        key: Vec<u8>,
    },
    PutAllocation {
        key: Vec<u8>,
        ip: [u8; 4],
        value: Vec<u8>,
    },
    DeleteAllocation {
        key: Vec<u8>,
        ip: [u8; 4],
    },
    PutCooling {
        ip: Ipv4Addr,
        t: i64,
    },
    DeleteCooling {
        ip: Ipv4Addr,
    },
}

const POOLS: usize = 0;
const BLOCKS: usize = 1;
const COOLING: usize = 2;

fn encode(batch: &[Mutation]) -> Result<Vec<Op>, StoreError> {
    batch
        .iter()
        .map(|m| {
            Ok(match m {
                Mutation::PutPool(p) => Op::Put {
                    tree: POOLS,
                    key: p.name.as_bytes().to_vec(),
                    value: to_json(&p.name, p)?,
                },
                Mutation::DeletePool(name) => Op::Del {
                    tree: POOLS,
                    key: name.as_bytes().to_vec(),
                },
                Mutation::PutBlock(b) => Op::Put {
                    tree: BLOCKS,
                    key: block_key_bytes(&b.pool, b.cidr),
                    value: to_json(&b.cidr.to_string(), b)?,
                },
                Mutation::DeleteBlock { pool, cidr } => Op::Del {
                    tree: BLOCKS,
                    key: block_key_bytes(pool, *cidr),
                },
                Mutation::PutAllocation(a) => Op::PutAllocation {
                    key: alloc_key_bytes(&a.key),
                    ip: a.ip.octets(),
                    value: to_json(&a.ip.to_string(), a)?,
                },
                Mutation::DeleteAllocation { key, ip } => Op::DeleteAllocation {
                    key: alloc_key_bytes(key),
                    ip: ip.octets(),
                },
                Mutation::PutCooling {
                    ip,
                    released_unix_ms,
                } => Op::PutCooling {
                    ip: *ip,
                    t: *released_unix_ms,
                },
                Mutation::DeleteCooling { ip } => Op::DeleteCooling { ip: *ip },
            })
        })
        .collect()
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

/// What `apply` and the flusher share: the batches applied but not yet
/// written to sled, and the trees to write them to.
///
/// Why a queue: in sled 0.34 a transaction takes a global write lock that
/// `flush` holds (read) for as long as the disk write takes. Writing in
/// `apply` would stall every request, and the allocator lock it runs
/// under, for each flush. Instead the flusher writes all queued batches in
/// one transaction (atomic, in order) right before it flushes, on its own
/// thread; `apply` only queues.
struct Shared {
    trees: [Tree; 5],
    queue: Mutex<Vec<Op>>,
    /// Held while queued ops are taken and written, so that they reach
    /// sled in queue order whoever writes them.
    writer: Mutex<()>,
}

impl Shared {
    /// Writes every queued op to sled in one transaction.
    fn write_queued(&self) -> Result<(), StoreError> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let ops = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
        if ops.is_empty() {
            return Ok(());
        }
        let res = self.transact(&ops);
        if res.is_err() {
            // All or nothing: keep them queued, in order, for the next try.
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let later = std::mem::replace(&mut *q, ops);
            q.extend(later);
        }
        res
    }

    fn transact(&self, ops: &[Op]) -> Result<(), StoreError> {
        let [pools, blocks, allocations, ips, cooling] = &self.trees;
        let res = (pools, blocks, allocations, ips, cooling).transaction(
            |(pools, blocks, allocs, ips, cooling)| {
                let tree = |t: usize| match t {
                    POOLS => pools,
                    BLOCKS => blocks,
                    _ => cooling,
                };
                for op in ops {
                    match op {
                        Op::Put {
                            tree: t,
                            key,
                            value,
                        } => {
                            tree(*t).insert(key.as_slice(), value.as_slice())?;
                        }
                        Op::Del { tree: t, key } => {
                            tree(*t).remove(key.as_slice())?;
                        }
                        Op::PutAllocation { key, ip, value } => {
                            if let Some(old) = allocs.insert(key.as_slice(), value.as_slice())? {
                                let old: Allocation = decode_json(TREE_ALLOCATIONS, key, &old)
                                    .map_err(ConflictableTransactionError::Abort)?;
                                let old_ip = old.ip.octets();
                                if old_ip != *ip
                                    && ips.get(old_ip)?.as_deref() == Some(key.as_slice())
                                {
                                    ips.remove(&old_ip)?;
                                }
                            }
                            ips.insert(ip, key.as_slice())?;
                        }
                        Op::DeleteAllocation { key, ip } => {
                            allocs.remove(key.as_slice())?;
                            if ips.get(ip)?.as_deref() == Some(key.as_slice()) {
                                ips.remove(ip)?;
                            }
                        }
                        // Resolved to Put/Del in `apply`.
                        Op::PutCooling { .. } | Op::DeleteCooling { .. } => {}
                    }
                }
                TxResult::Ok(())
            },
        );
        match res {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(StoreError::Sled(e)),
        }
    }
}

impl SledStore {
    /// Reads every tree. It may run while the flusher writes, and sled's
    /// iterators are not snapshots, so what crosses records (an allocation
    /// and its reverse index entry) is only taken as damage once re-read with
    /// the writes held off (`confirm_index`); each record alone is always whole.
    fn read_trees(&self) -> Result<Snapshot, StoreError> {
        let mut snap = Snapshot::default();
        for item in self.pools.iter() {
            let (k, v) = item?;
            let p: PoolSpec = decode_json(TREE_POOLS, &k, &v)?;
            if p.name.as_bytes() != &*k {
                return Err(corrupt(
                    TREE_POOLS,
                    &k,
                    format!("record names pool {:?}", p.name),
                ));
            }
            snap.pools.push(p);
        }
        for item in self.blocks.iter() {
            let (k, v) = item?;
            let b: BlockClaim = decode_json(TREE_BLOCKS, &k, &v)?;
            if block_key_bytes(&b.pool, b.cidr) != *k {
                return Err(corrupt(
                    TREE_BLOCKS,
                    &k,
                    format!("record is block {} of pool {}", b.cidr, b.pool),
                ));
            }
            snap.blocks.push(b);
        }
        // ip -> the allocation keys seen with it, for confirm_index.
        let mut doubts: BTreeMap<Ipv4Addr, BTreeSet<Vec<u8>>> = BTreeMap::new();
        let mut by_ip: HashMap<Ipv4Addr, Vec<u8>> = HashMap::new();
        for item in self.allocations.iter() {
            let (k, v) = item?;
            let a: Allocation = decode_json(TREE_ALLOCATIONS, &k, &v)?;
            if alloc_key_bytes(&a.key) != *k {
                return Err(corrupt(
                    TREE_ALLOCATIONS,
                    &k,
                    "record holds a different key",
                ));
            }
            if let Some(other) = by_ip.insert(a.ip, k.to_vec()) {
                doubts.entry(a.ip).or_default().extend([other, k.to_vec()]);
            }
            snap.allocations.push(a);
        }
        let mut indexed = HashSet::new();
        for item in self.ips.iter() {
            let (k, v) = item?;
            let ip = decode_ip(TREE_IPS, &k)?;
            match by_ip.get(&ip) {
                Some(held) if *held == *v => {
                    indexed.insert(ip);
                }
                held => {
                    let d = doubts.entry(ip).or_default();
                    d.insert(v.to_vec());
                    d.extend(held.cloned());
                }
            }
        }
        for (ip, k) in &by_ip {
            if !indexed.contains(ip) {
                doubts.entry(*ip).or_default().insert(k.clone());
            }
        }
        if !doubts.is_empty() {
            self.confirm_index(&doubts)?;
        }
        for item in self.cooling.iter() {
            let (k, _) = item?;
            let (t, ip) = decode_cooling_key(&k)?;
            snap.cooling.push((ip, t));
        }
        // Same order as every other Store: blocks by cidr, allocations by ip,
        // cooling oldest first (the tree's order already).
        snap.blocks.sort_by_key(|b| b.cidr);
        snap.allocations.sort_by_key(|a| a.ip);
        Ok(snap)
    }

    /// Re-reads the reverse index entry of each doubted ip and the
    /// allocations seen with it while no batch is being written (`writer`
    /// held: a few point reads), and reports the first that still disagrees.
    fn confirm_index(
        &self,
        doubts: &BTreeMap<Ipv4Addr, BTreeSet<Vec<u8>>>,
    ) -> Result<(), StoreError> {
        let _w = self.shared.writer.lock().unwrap_or_else(|e| e.into_inner());
        for (ip, seen) in doubts {
            let ik = ip.octets();
            let indexed = self.ips.get(ik)?;
            let mut keys = seen.clone();
            keys.extend(indexed.iter().map(|v| v.to_vec()));
            let mut holders = Vec::new();
            for k in &keys {
                if let Some(v) = self.allocations.get(k)? {
                    let a: Allocation = decode_json(TREE_ALLOCATIONS, k, &v)?;
                    if a.ip == *ip {
                        holders.push(k);
                    }
                }
            }
            match (indexed, holders.as_slice()) {
                (None, []) => {}
                (Some(i), [h]) if i.as_ref() == h.as_slice() => {}
                (_, [_, second, ..]) => {
                    return Err(corrupt(
                        TREE_ALLOCATIONS,
                        second,
                        format!("{ip} is held by two allocations"),
                    ));
                }
                (Some(_), _) => {
                    return Err(corrupt(
                        TREE_IPS,
                        &ik,
                        "reverse index entry has no matching allocation",
                    ));
                }
                (None, [_]) => {
                    return Err(corrupt(
                        TREE_IPS,
                        &ik,
                        "allocation has no reverse index entry",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// What the queued ops (oldest first) last did to one item: `Some(Some(v))`
/// put v, `Some(None)` deleted it, `None` left it alone.
fn queued_value<'a>(
    queue: &'a [Op],
    touches: impl Fn(&'a Op) -> Option<Option<&'a [u8]>>,
) -> Option<Option<&'a [u8]>> {
    queue.iter().rev().find_map(touches)
}

/// The value of `key` in `tree` (`stored`) as of every batch applied: what
/// the queue last did to it, else what sled holds.
fn current(
    queue: &[Op],
    tree: usize,
    stored: &Tree,
    key: &[u8],
) -> Result<Option<Vec<u8>>, StoreError> {
    let queued = queued_value(queue, |op| match op {
        Op::Put {
            tree: t,
            key: k,
            value,
        } if *t == tree && k == key => Some(Some(value.as_slice())),
        Op::Del { tree: t, key: k } if *t == tree && k == key => Some(None),
        _ => None,
    });
    Ok(match queued {
        Some(v) => v.map(<[u8]>::to_vec),
        None => stored.get(key)?.map(|v| v.to_vec()),
    })
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::PodMeta;

    fn pool() -> PoolSpec {
        PoolSpec {
            name: "default".into(),
            cidr: "10.0.0.0/24".parse().unwrap(),
            block_size: 28,
            namespaces: vec![],
            nat_outgoing: true,
            snat_address: None,
            isolated: false,
            allow_from: vec![],
            runtime: true,
        }
    }

    fn block() -> BlockClaim {
        BlockClaim {
            pool: "default".into(),
            cidr: "10.0.0.0/28".parse().unwrap(),
            node: "n1".into(),
            claimed_unix_ms: 1,
        }
    }

    fn alloc(i: u8) -> Allocation {
        Allocation {
            key: AllocKey {
                network: "ferry".into(),
                container_id: format!("c{i}"),
                ifname: "eth0".into(),
            },
            ip: Ipv4Addr::new(10, 0, 0, i),
            pool: "default".into(),
            block: "10.0.0.0/28".parse().unwrap(),
            pod: PodMeta {
                namespace: "ns".into(),
                name: format!("p{i}"),
                uid: "u".into(),
                netns: "/run/netns/x".into(),
            },
            created_unix_ms: 42,
        }
    }

    #[test]
    fn sled_writes_the_files_we_sync() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        assert!(dir.path().join("db").join("db").is_file());
        assert!(dir.path().join("db").join("conf").is_file());
        drop(s);
    }

    #[tokio::test]
    async fn apply_durable_reopen_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let before = {
            let s = SledStore::open(dir.path()).unwrap();
            s.apply(&[Mutation::PutPool(pool()), Mutation::PutBlock(block())])
                .unwrap();
            let seq = s
                .apply(&[
                    Mutation::PutAllocation(alloc(1)),
                    Mutation::PutAllocation(alloc(2)),
                    Mutation::PutAllocation(alloc(3)),
                ])
                .unwrap();
            s.apply(&[
                Mutation::DeleteAllocation {
                    key: alloc(2).key,
                    ip: alloc(2).ip,
                },
                Mutation::PutCooling {
                    ip: alloc(2).ip,
                    released_unix_ms: 500,
                },
                Mutation::PutCooling {
                    ip: Ipv4Addr::new(10, 0, 0, 9),
                    released_unix_ms: 100,
                },
            ])
            .unwrap();
            // Re-cooling an ip moves its entry rather than adding a second one.
            let last = s
                .apply(&[Mutation::PutCooling {
                    ip: Ipv4Addr::new(10, 0, 0, 9),
                    released_unix_ms: 700,
                }])
                .unwrap();
            assert!(last > seq);
            s.durable(last).await.unwrap();
            s.load().unwrap()
        };
        assert_eq!(before.allocations, vec![alloc(1), alloc(3)]);
        assert_eq!(
            before.cooling,
            vec![
                (Ipv4Addr::new(10, 0, 0, 2), 500),
                (Ipv4Addr::new(10, 0, 0, 9), 700)
            ]
        );
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.load().unwrap(), before);
        assert_eq!(s.last_seq(), 0);
        s.durable(0).await.unwrap();
        // The time index was rebuilt: deleting by ip alone still works.
        s.apply(&[Mutation::DeleteCooling {
            ip: Ipv4Addr::new(10, 0, 0, 9),
        }])
        .unwrap();
        assert_eq!(
            s.load().unwrap().cooling,
            vec![(Ipv4Addr::new(10, 0, 0, 2), 500)]
        );
    }

    #[test]
    fn batch_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        s.apply(&[Mutation::PutPool(pool()), Mutation::PutAllocation(alloc(1))])
            .unwrap();
        // Put a corrupt record behind the store's back, then a batch whose
        // second step must decode it: the whole batch has to be rolled back.
        s.allocations
            .insert(alloc_key_bytes(&alloc(5).key), b"not json".to_vec())
            .unwrap();
        let before_seq = s.last_seq();
        let err = s
            .apply(&[
                Mutation::PutAllocation(alloc(2)),
                Mutation::PutAllocation(alloc(5)),
            ])
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt { ref key, .. } if key.contains("c5")),
            "{err}"
        );
        assert_eq!(s.last_seq(), before_seq);
        assert!(
            s.allocations
                .get(alloc_key_bytes(&alloc(2).key))
                .unwrap()
                .is_none()
        );
        assert!(s.ips.get(alloc(2).ip.octets()).unwrap().is_none());
    }

    #[test]
    fn corrupt_record_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        s.pools.insert("broken", b"{".to_vec()).unwrap();
        match s.load() {
            Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "pools/broken"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn reverse_index_follows_allocations() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        s.apply(&[
            Mutation::PutAllocation(alloc(1)),
            Mutation::PutAllocation(alloc(2)),
        ])
        .unwrap();
        // Moving a key to another ip drops its old index entry.
        let mut moved = alloc(1);
        moved.ip = Ipv4Addr::new(10, 0, 0, 7);
        s.apply(&[Mutation::PutAllocation(moved.clone())]).unwrap();
        s.apply(&[Mutation::DeleteAllocation {
            key: alloc(2).key,
            ip: alloc(2).ip,
        }])
        .unwrap();
        assert_eq!(s.ip_index().unwrap(), vec![(moved.ip, moved.key.clone())]);
        assert_eq!(s.load().unwrap().allocations, vec![moved]);
        // A stale index entry is reported as corruption.
        s.ips
            .insert([10, 0, 0, 99], alloc_key_bytes(&alloc(9).key))
            .unwrap();
        assert!(matches!(s.load(), Err(StoreError::Corrupt { key, .. }) if key == "ips/10.0.0.99"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_durable_calls_all_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(SledStore::open(dir.path()).unwrap());
        let mut tasks = Vec::new();
        for i in 0..64u8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let seq = s.apply(&[Mutation::PutAllocation(alloc(i))]).unwrap();
                s.durable(seq).await.unwrap();
                seq
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort();
        assert_eq!(seqs, (1..=64).collect::<Vec<_>>());
        assert!(s.flushed.borrow().flushed >= 64);
        assert_eq!(s.load().unwrap().allocations.len(), 64);
        // Waiting for something already durable returns at once, and a seq
        // beyond the newest batch does not hang.
        s.durable(10).await.unwrap();
        s.durable(1_000).await.unwrap();
    }

    #[tokio::test]
    async fn poisoned_store_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let seq = s.apply(&[Mutation::PutAllocation(alloc(1))]).unwrap();
        s.durable(seq).await.unwrap();
        assert!(s.health().is_ok());
        s.fail_next_flush();
        let seq = s.apply(&[Mutation::PutAllocation(alloc(2))]).unwrap();
        let err = s.durable(seq).await.unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{err}");
        // Sticky: reported by health, and nothing more is written.
        assert!(s.health().is_err());
        let before = s.last_seq();
        assert!(s.apply(&[Mutation::PutAllocation(alloc(3))]).is_err());
        assert_eq!(s.last_seq(), before);
        let held: Vec<Ipv4Addr> = s.load().unwrap().allocations.iter().map(|a| a.ip).collect();
        assert_eq!(held, vec![alloc(1).ip, alloc(2).ip]);
        assert!(s.durable(seq).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn waiters_share_one_flush() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(SledStore::open(dir.path()).unwrap());
        let mut seqs = Vec::new();
        for i in 0..50u8 {
            seqs.push(s.apply(&[Mutation::PutAllocation(alloc(i))]).unwrap());
        }
        let before = s.flush_count();
        let tasks: Vec<_> = seqs
            .into_iter()
            .map(|seq| {
                let s = s.clone();
                tokio::spawn(async move { s.durable(seq).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        // The first flush covers every batch applied before it started.
        assert_eq!(s.flush_count() - before, 1);
    }

    /// What sled 0.34 itself does with a damaged log: it opens it without
    /// an error, keeping only the valid prefix. The flush bound catches it.
    #[tokio::test]
    async fn truncated_or_overwritten_log_is_reported_lost() {
        use std::os::unix::fs::FileExt;
        type Damage = (&'static str, fn(&Path));
        let damage: [Damage; 3] = [
            ("truncated to 0", |log| {
                File::options()
                    .write(true)
                    .open(log)
                    .unwrap()
                    .set_len(0)
                    .unwrap()
            }),
            ("truncated to 300 bytes", |log| {
                File::options()
                    .write(true)
                    .open(log)
                    .unwrap()
                    .set_len(300)
                    .unwrap()
            }),
            ("head overwritten", |log| {
                File::options()
                    .write(true)
                    .open(log)
                    .unwrap()
                    .write_all_at(&[0xA5; 512], 0)
                    .unwrap()
            }),
        ];
        for (what, hurt) in damage {
            let dir = tempfile::tempdir().unwrap();
            {
                let s = SledStore::open(dir.path()).unwrap();
                s.apply(&[Mutation::PutPool(pool()), Mutation::PutBlock(block())])
                    .unwrap();
                for i in 1..=20u8 {
                    let seq = s.apply(&[Mutation::PutAllocation(alloc(i))]).unwrap();
                    s.durable(seq).await.unwrap();
                }
            }
            // A clean reopen is fine and keeps everything.
            assert_eq!(
                SledStore::open(dir.path())
                    .unwrap()
                    .load()
                    .unwrap()
                    .allocations
                    .len(),
                20,
                "{what}"
            );
            hurt(&dir.path().join("db").join("db"));
            match SledStore::open(dir.path()) {
                Err(e @ StoreError::Lost { .. }) => assert!(e.is_damage(), "{what}: {e}"),
                Err(e) => assert!(e.is_damage(), "{what}: not damage: {e}"),
                Ok(s) => panic!(
                    "{what}: opened with {} allocations",
                    s.load().map(|l| l.allocations.len()).unwrap_or(0)
                ),
            }
            // Moved aside, a fresh database opens, and so does the next start.
            let moved = SledStore::move_aside(dir.path(), SystemTime::UNIX_EPOCH).unwrap();
            assert_eq!(moved, dir.path().join("db.corrupt-0"));
            assert!(moved.join("db").is_file() && moved.join(FLUSHES_FILE_MOVED).is_file());
            assert!(
                SledStore::open(dir.path())
                    .unwrap()
                    .load()
                    .unwrap()
                    .allocations
                    .is_empty()
            );
            SledStore::open(dir.path()).unwrap();
            // A second move in the same second does not clobber the first.
            let again = SledStore::move_aside(dir.path(), SystemTime::UNIX_EPOCH).unwrap();
            assert_eq!(again, dir.path().join("db.corrupt-0-1"));
        }
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let dest = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &dest);
            } else {
                std::fs::copy(entry.path(), dest).unwrap();
            }
        }
    }

    /// A crash that loses the log's tail written since open: the bound the
    /// flusher advanced meanwhile catches it. (A clean close would too, but
    /// after a crash only the flusher's bound is there.)
    #[tokio::test]
    async fn flusher_advances_the_bound_so_a_lost_tail_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let at_open_copy = dir.path().join("db.at-open");
        let every = 8;
        let policy = BoundPolicy {
            flushes: every,
            interval: Duration::from_secs(3600),
        };
        {
            // Something for the log to hold at the open below.
            let s = SledStore::open(dir.path()).unwrap();
            let seq = s
                .apply(&[Mutation::PutPool(pool()), Mutation::PutBlock(block())])
                .unwrap();
            s.durable(seq).await.unwrap();
        }
        let (at_open, crashed_bound) = {
            let s = SledStore::open_with(dir.path(), policy).unwrap();
            let at_open = read_flush_bound(dir.path()).unwrap().unwrap();
            // sled 0.34 fills a preallocated segment after a reopen, so
            // truncating the log to its length at open would cut nothing.
            copy_dir(&db, &at_open_copy);
            // One flush each: every durable() returns before the next apply.
            for i in 1..=(3 * every) as u8 {
                let seq = s.apply(&[Mutation::PutAllocation(alloc(i))]).unwrap();
                s.durable(seq).await.unwrap();
            }
            let durable = read_flushes(&s.meta).unwrap();
            let bound = read_flush_bound(dir.path()).unwrap().unwrap();
            // The write after flush N is done before flush N + 1 begins.
            assert!(
                bound >= at_open + 2 * every && bound <= durable,
                "bound {bound}: {at_open} at open, {durable} durable"
            );
            (at_open, bound)
        };
        // As the crash left it: the log as it was at open (its tail never
        // reached the disk) and the flusher's bound, not the clean close's.
        std::fs::remove_dir_all(&db).unwrap();
        std::fs::rename(&at_open_copy, &db).unwrap();
        write_flush_bound(dir.path(), crashed_bound).unwrap();
        match SledStore::open(dir.path()) {
            Err(e @ StoreError::Lost { .. }) => assert!(e.is_damage(), "{e}"),
            Err(e) => panic!("expected Lost, got {e}"),
            Ok(s) => panic!(
                "opened with {} allocations",
                s.load().map(|l| l.allocations.len()).unwrap_or(0)
            ),
        }
        // sled itself sees nothing wrong: only the bound tells.
        std::fs::remove_file(dir.path().join(FLUSHES_FILE)).unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(read_flushes(&s.meta).unwrap(), at_open);
        assert_eq!(s.load().unwrap().pools, vec![pool()]);
    }

    /// The time trigger alone: checked at each flush, no timer of its own.
    #[tokio::test]
    async fn bound_interval_is_checked_at_flush_time() {
        let dir = tempfile::tempdir().unwrap();
        let open = |interval| {
            let policy = BoundPolicy {
                flushes: u64::MAX,
                interval,
            };
            SledStore::open_with(dir.path(), policy).unwrap()
        };
        let bound = || read_flush_bound(dir.path()).unwrap().unwrap();
        let s = open(Duration::from_secs(3600));
        for i in 1..=3 {
            let seq = s.apply(&[Mutation::PutAllocation(alloc(i))]).unwrap();
            s.durable(seq).await.unwrap();
        }
        assert_eq!(bound(), 0, "not due yet");
        drop(s);
        let at_open = bound();
        let s = open(Duration::ZERO);
        for i in 4..=6 {
            let seq = s.apply(&[Mutation::PutAllocation(alloc(i))]).unwrap();
            s.durable(seq).await.unwrap();
        }
        // Due at every flush; the last write may still be under way.
        assert!(bound() >= at_open + 2, "{} after {at_open}", bound());
    }

    #[test]
    fn garbage_conf_is_damage_and_other_errors_are_not() {
        let dir = tempfile::tempdir().unwrap();
        drop(SledStore::open(dir.path()).unwrap());
        std::fs::write(dir.path().join("db").join("conf"), b"\xff garbage").unwrap();
        let e = SledStore::open(dir.path()).unwrap_err();
        assert!(e.is_damage(), "{e}");
        let denied = StoreError::Io {
            path: dir.path().into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert!(!denied.is_damage());
        assert!(!StoreError::Closed.is_damage());
    }

    #[test]
    fn notice_is_kept_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.notice(), None);
        s.set_notice("rebuilt".into());
        assert_eq!(s.notice().as_deref(), Some("rebuilt"));
    }
}
