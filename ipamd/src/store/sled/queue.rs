//! The batches applied but not yet written to sled, and writing them.

use std::sync::Mutex;

use ::sled::transaction::{ConflictableTransactionError, TransactionError};
use ::sled::{Transactional, Tree};

use super::codec::{BLOCKS, Op, POOLS, TREE_ALLOCATIONS, decode_json};
use crate::model::Allocation;
use crate::store::StoreError;

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
pub(super) struct Shared {
    pub(super) trees: [Tree; 5],
    pub(super) queue: Mutex<Vec<Op>>,
    /// Held while queued ops are taken and written, so that they reach
    /// sled in queue order whoever writes them.
    pub(super) writer: Mutex<()>,
}

impl Shared {
    /// Writes every queued op to sled in one transaction.
    pub(super) fn write_queued(&self) -> Result<(), StoreError> {
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
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }
}

/// What the queued ops (oldest first) last did to one item: `Some(Some(v))`
/// put v, `Some(None)` deleted it, `None` left it alone.
pub(super) fn queued_value<'a>(
    queue: &'a [Op],
    touches: impl Fn(&'a Op) -> Option<Option<&'a [u8]>>,
) -> Option<Option<&'a [u8]>> {
    queue.iter().rev().find_map(touches)
}

/// The value of `key` in `tree` (`stored`) as of every batch applied: what
/// the queue last did to it, else what sled holds.
pub(super) fn current(
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
