//! Durable IPAM state. The core applies a batch of mutations atomically while
//! it holds its lock, then awaits durability outside the lock, so concurrent
//! requests share one flush (group commit).

use std::net::Ipv4Addr;

use futures::future::BoxFuture;
use ipnet::Ipv4Net;

use crate::model::{AllocKey, Allocation, BlockClaim, PoolSpec};

pub mod memory;
pub mod recover;
pub mod sled;

/// A position in the store's write order. Durable(seq) covers every batch
/// applied at or before seq.
pub type Seq = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    PutPool(PoolSpec),
    DeletePool(String),
    PutBlock(BlockClaim),
    DeleteBlock {
        pool: String,
        cidr: Ipv4Net,
    },
    /// Also writes the ip -> key reverse index.
    PutAllocation(Allocation),
    /// Also removes the reverse index entry for `ip`.
    DeleteAllocation {
        key: AllocKey,
        ip: Ipv4Addr,
    },
    /// A freed address, reusable from `released_unix_ms + cooldown`.
    PutCooling {
        ip: Ipv4Addr,
        released_unix_ms: i64,
    },
    DeleteCooling {
        ip: Ipv4Addr,
    },
}

/// Everything persisted, as loaded at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub pools: Vec<PoolSpec>,
    pub blocks: Vec<BlockClaim>,
    pub allocations: Vec<Allocation>,
    /// (ip, released_unix_ms), oldest release first.
    pub cooling: Vec<(Ipv4Addr, i64)>,
}

/// The items [`Store::probe`] looks up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    pub allocations: Vec<AllocKey>,
    /// (pool, cidr), the store's key of a block.
    pub blocks: Vec<(String, Ipv4Net)>,
    pub cooling: Vec<Ipv4Addr>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage engine (`backend`) failed; `damage` is whether that
    /// failure means the database itself is damaged.
    #[error("{backend}: {source}")]
    Backend {
        backend: &'static str,
        damage: bool,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("I/O on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt record {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
    /// The database opened, but holds less than was durable before.
    #[error("database {path} lost durable state: {reason}")]
    Lost {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("store is closed")]
    Closed,
}

impl StoreError {
    /// True when the database itself is damaged (unreadable, truncated,
    /// overwritten), so that rebuilding it is the way out; false for
    /// errors a restart or an operator can fix (permissions, a full disk,
    /// another process holding the lock).
    pub fn is_damage(&self) -> bool {
        match self {
            StoreError::Corrupt { .. } | StoreError::Lost { .. } => true,
            StoreError::Backend { damage, .. } => *damage,
            StoreError::Io { source, .. } => io_is_damage(source),
            StoreError::Closed => false,
        }
    }
}

/// True when an I/O error says the bytes read are not what was written
/// (cut short or malformed), rather than that they could not be read.
fn io_is_damage(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::InvalidData)
}

pub trait Store: Send + Sync {
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// What the store has written so far, read beside writers: every batch
    /// durable before the call, maybe parts of later ones. Unlike `load` it
    /// never waits for a flush in progress, so it may run while Allocate does.
    fn scan_written(&self) -> Result<Snapshot, StoreError> {
        self.load()
    }
    /// Just the probed items that exist (pools empty), as of every batch
    /// applied so far, written or still queued. Never waits for a flush:
    /// cheap enough to call under the allocator lock, where it is exact.
    fn probe(&self, items: &Probe) -> Result<Snapshot, StoreError>;
    /// Applies the whole batch atomically (all or nothing) and returns its
    /// position. Not yet durable.
    fn apply(&self, batch: &[Mutation]) -> Result<Seq, StoreError>;
    /// The position of the newest applied batch.
    fn last_seq(&self) -> Seq;
    /// Resolves once every batch up to `seq` survives a crash.
    fn durable(&self, seq: Seq) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Err once the store can no longer promise durability (a failed
    /// fdatasync): from then on `apply` refuses every batch, so memory never
    /// runs ahead of what could be made durable, and ipamd must restart.
    fn health(&self) -> Result<(), StoreError>;
    /// Something an operator must hear about until restart, such as a
    /// database that was rebuilt at start; reported in the readiness reason.
    fn notice(&self) -> Option<String> {
        None
    }
}
