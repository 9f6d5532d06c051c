//! The sled Store: one transaction per batch, group-committed flushes.
//!
//! Layout under `state_dir/db` (sled's own directory), one tree each:
//! - `pools`:       name -> JSON PoolSpec
//! - `blocks`:      pool \0 cidr -> JSON BlockClaim
//! - `allocations`: network \0 container_id \0 ifname -> JSON Allocation
//! - `ips`:         ip octets -> allocation key (the reverse index)
//! - `cooling`:     released_unix_ms (u64 BE) ++ ip octets -> empty,
//!   so iteration order is FIFO release order.
//!
//! Durability: sled 0.34's flush ends in `sync_file_range`, which does not
//! flush the disk cache nor file metadata (spacejam/sled#1452). After each
//! flush we therefore fdatasync sled's log file (`db/db`) and any blob files
//! ourselves. One background thread does this for every waiter at once.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use ::sled::transaction::{ConflictableTransactionError, TransactionError};
use ::sled::{Transactional, Tree};
use tokio::sync::watch;
use tracing::{debug, error};

use super::{BoxFuture, Mutation, Seq, Snapshot, Store, StoreError};
use crate::model::{AllocKey, Allocation, BlockClaim, PoolSpec};

const TREE_POOLS: &str = "pools";
const TREE_BLOCKS: &str = "blocks";
const TREE_ALLOCATIONS: &str = "allocations";
const TREE_IPS: &str = "ips";
const TREE_COOLING: &str = "cooling";

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
    dir: PathBuf,
    db: ::sled::Db,
    pools: Tree,
    blocks: Tree,
    allocations: Tree,
    ips: Tree,
    cooling: Tree,
    /// Held across each transaction so that seq order is commit order.
    write: Mutex<WriteState>,
    last_seq: Arc<AtomicU64>,
    flushed: watch::Receiver<FlushState>,
    wake: Option<mpsc::Sender<()>>,
    flusher: Option<JoinHandle<()>>,
    /// Tests set it to make the next flush fail as a failed fdatasync would.
    #[cfg_attr(not(test), allow(dead_code))]
    fail_next_flush: Arc<AtomicBool>,
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

impl SledStore {
    /// Opens (or creates) the database at `state_dir/db`.
    pub fn open(state_dir: &Path) -> Result<SledStore, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|e| io_err(state_dir, e))?;
        let dir = state_dir.join("db");
        let db = ::sled::Config::new().path(&dir).open()?;
        let log_path = dir.join("db");
        let log = File::open(&log_path).map_err(|e| io_err(&log_path, e))?;
        // sled writes `conf` once at creation without syncing it; the log's
        // and conf's directory entries must survive a power loss too.
        log.sync_all().map_err(|e| io_err(&log_path, e))?;
        for p in [dir.join("conf"), dir.clone(), state_dir.to_path_buf()] {
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_err(&p, e))?;
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

        let last_seq = Arc::new(AtomicU64::new(0));
        let (state_tx, state_rx) = watch::channel(FlushState::default());
        let (wake_tx, wake_rx) = mpsc::channel();
        let fail_next_flush = Arc::new(AtomicBool::new(false));
        let flusher = {
            let flusher = Flusher {
                db: db.clone(),
                log,
                log_path,
                blobs: dir.join("blobs"),
                last_seq: last_seq.clone(),
                fail_next: fail_next_flush.clone(),
            };
            std::thread::Builder::new()
                .name("ferry-store-flush".into())
                .spawn(move || flusher.run(wake_rx, state_tx))
                .map_err(|e| io_err(&dir, e))?
        };

        Ok(SledStore {
            pools: db.open_tree(TREE_POOLS)?,
            blocks: db.open_tree(TREE_BLOCKS)?,
            allocations: db.open_tree(TREE_ALLOCATIONS)?,
            ips: db.open_tree(TREE_IPS)?,
            cooling,
            db,
            dir,
            write: Mutex::new(WriteState { seq: 0, cooling_at }),
            last_seq,
            flushed: state_rx,
            wake: Some(wake_tx),
            flusher: Some(flusher),
            fail_next_flush,
        })
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

    /// The reverse index as stored, for consistency checks.
    pub fn ip_index(&self) -> Result<Vec<(Ipv4Addr, AllocKey)>, StoreError> {
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
        if let Err(e) = self.db.flush() {
            error!(error = %e, "final store flush failed");
        }
    }
}

/// The background flusher's handles.
struct Flusher {
    db: ::sled::Db,
    log: File,
    log_path: PathBuf,
    blobs: PathBuf,
    last_seq: Arc<AtomicU64>,
    fail_next: Arc<AtomicBool>,
}

impl Flusher {
    fn run(self, wake: mpsc::Receiver<()>, state: watch::Sender<FlushState>) {
        let mut synced_blobs: HashSet<PathBuf> = HashSet::new();
        while wake.recv().is_ok() {
            // Everyone who asked so far is served by this one flush.
            while wake.try_recv().is_ok() {}
            let target = self.last_seq.load(Ordering::SeqCst);
            {
                let s = state.borrow();
                if s.error.is_some() || s.flushed >= target {
                    continue;
                }
            }
            let res = self.flush(&mut synced_blobs);
            match res {
                Ok(()) => {
                    debug!(seq = target, "store flushed");
                    state.send_modify(|s| {
                        s.flushed = s.flushed.max(target);
                        s.flushes += 1;
                    });
                }
                Err(e) => {
                    error!(error = %e, "store flush failed; durability can no longer be promised");
                    state.send_modify(|s| s.error = Some(e));
                }
            }
        }
    }

    fn flush(&self, synced_blobs: &mut HashSet<PathBuf>) -> Result<(), String> {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(format!(
                "fdatasync {}: injected failure",
                self.log_path.display()
            ));
        }
        self.db
            .flush()
            .map_err(|e| format!("sled flush: {e}"))
            .and_then(|_| {
                self.log
                    .sync_data()
                    .map_err(|e| format!("fdatasync {}: {e}", self.log_path.display()))
            })
            .and_then(|()| sync_blobs(&self.blobs, synced_blobs))
    }
}

/// sled writes large values as separate blob files and does not sync them.
fn sync_blobs(dir: &Path, synced: &mut HashSet<PathBuf>) -> Result<(), String> {
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
        if !synced.contains(&path) {
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
    *synced = live;
    Ok(())
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

impl Store for SledStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
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
            if by_ip.insert(a.ip, k.to_vec()).is_some() {
                return Err(corrupt(
                    TREE_ALLOCATIONS,
                    &k,
                    format!("{} is held by two allocations", a.ip),
                ));
            }
            snap.allocations.push(a);
        }
        let mut indexed = 0usize;
        for item in self.ips.iter() {
            let (k, v) = item?;
            let ip = decode_ip(TREE_IPS, &k)?;
            if by_ip.get(&ip).map(|x| x.as_slice()) != Some(&*v) {
                return Err(corrupt(
                    TREE_IPS,
                    &k,
                    "reverse index entry has no matching allocation",
                ));
            }
            indexed += 1;
        }
        if indexed != by_ip.len() {
            return Err(StoreError::Corrupt {
                key: TREE_IPS.into(),
                reason: format!(
                    "{} allocations but {indexed} reverse index entries",
                    by_ip.len()
                ),
            });
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

    fn apply(&self, batch: &[Mutation]) -> Result<Seq, StoreError> {
        let ops = encode(batch)?;
        let mut w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        // Poisoned: nothing written now could be made durable, and the core
        // applies a batch to memory only when this succeeds.
        self.health()?;
        let cooling_at = &w.cooling_at;
        let res = (
            &self.pools,
            &self.blocks,
            &self.allocations,
            &self.ips,
            &self.cooling,
        )
            .transaction(|(pools, blocks, allocs, ips, cooling)| {
                // Changes to the cooling-time index, published after commit.
                let mut overlay: HashMap<Ipv4Addr, Option<i64>> = HashMap::new();
                let cooling_time =
                    |overlay: &HashMap<Ipv4Addr, Option<i64>>, ip: &Ipv4Addr| match overlay.get(ip)
                    {
                        Some(t) => *t,
                        None => cooling_at.get(ip).copied(),
                    };
                for op in &ops {
                    match op {
                        Op::Put { tree, key, value } => {
                            let t = if *tree == POOLS { pools } else { blocks };
                            t.insert(key.as_slice(), value.as_slice())?;
                        }
                        Op::Del { tree, key } => {
                            let t = if *tree == POOLS { pools } else { blocks };
                            t.remove(key.as_slice())?;
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
                        Op::PutCooling { ip, t } => {
                            if let Some(old) = cooling_time(&overlay, ip) {
                                cooling.remove(&cooling_key(old, *ip))?;
                            }
                            cooling.insert(&cooling_key(*t, *ip), &[])?;
                            overlay.insert(*ip, Some(*t));
                        }
                        Op::DeleteCooling { ip } => {
                            if let Some(old) = cooling_time(&overlay, ip) {
                                cooling.remove(&cooling_key(old, *ip))?;
                            }
                            overlay.insert(*ip, None);
                        }
                    }
                }
                TxResult::Ok(overlay)
            });
        let overlay = match res {
            Ok(o) => o,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(StoreError::Sled(e)),
        };
        for (ip, t) in overlay {
            match t {
                Some(t) => w.cooling_at.insert(ip, t),
                None => w.cooling_at.remove(&ip),
            };
        }
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
}
