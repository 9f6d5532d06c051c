//! In-memory Store for tests of the core. Every batch is "durable" at once.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use ipnet::Ipv4Net;

use super::{Mutation, Probe, Seq, Snapshot, Store, StoreError};
use crate::model::{AllocKey, Allocation, BlockClaim, PoolSpec};

#[derive(Debug, Default)]
struct State {
    seq: Seq,
    pools: BTreeMap<String, PoolSpec>,
    blocks: BTreeMap<(String, Ipv4Net), BlockClaim>,
    allocations: BTreeMap<AllocKey, Allocation>,
    ips: BTreeMap<Ipv4Addr, AllocKey>,
    cooling: BTreeMap<Ipv4Addr, i64>,
}

#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    fail: AtomicBool,
    poisoned: AtomicBool,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts from `snap`, as if it had been loaded from disk.
    pub fn with_snapshot(snap: &Snapshot) -> Self {
        let s = Self::new();
        let mut muts: Vec<Mutation> = snap.pools.iter().cloned().map(Mutation::PutPool).collect();
        muts.extend(snap.blocks.iter().cloned().map(Mutation::PutBlock));
        muts.extend(
            snap.allocations
                .iter()
                .cloned()
                .map(Mutation::PutAllocation),
        );
        muts.extend(snap.cooling.iter().map(|&(ip, t)| Mutation::PutCooling {
            ip,
            released_unix_ms: t,
        }));
        let mut st = s.lock();
        apply_to(&mut st, &muts);
        st.seq = 0;
        drop(st);
        s
    }

    /// While set, every apply fails (and changes nothing), to test that the
    /// core's state never runs ahead of its store.
    pub fn fail_applies(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    /// While set, the store behaves like a sled store after a failed
    /// fdatasync: `durable` and `apply` fail and `health` reports it.
    pub fn poison(&self, poisoned: bool) {
        self.poisoned.store(poisoned, Ordering::SeqCst);
    }

    fn poisoned_error() -> StoreError {
        StoreError::Io {
            path: "memory".into(),
            source: std::io::Error::other("injected fdatasync failure"),
        }
    }

    /// The reverse index, for consistency checks in tests.
    pub fn ip_index(&self) -> Vec<(Ipv4Addr, AllocKey)> {
        self.lock()
            .ips
            .iter()
            .map(|(ip, k)| (*ip, k.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic under this lock is a test bug; the state is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn apply_to(st: &mut State, batch: &[Mutation]) {
    for m in batch {
        match m {
            Mutation::PutPool(p) => {
                st.pools.insert(p.name.clone(), p.clone());
            }
            Mutation::DeletePool(name) => {
                st.pools.remove(name);
            }
            Mutation::PutBlock(b) => {
                st.blocks.insert((b.pool.clone(), b.cidr), b.clone());
            }
            Mutation::DeleteBlock { pool, cidr } => {
                st.blocks.remove(&(pool.clone(), *cidr));
            }
            Mutation::PutAllocation(a) => {
                if let Some(old) = st.allocations.insert(a.key.clone(), a.clone())
                    && old.ip != a.ip
                    && st.ips.get(&old.ip) == Some(&a.key)
                {
                    st.ips.remove(&old.ip);
                }
                st.ips.insert(a.ip, a.key.clone());
            }
            Mutation::DeleteAllocation { key, ip } => {
                st.allocations.remove(key);
                if st.ips.get(ip) == Some(key) {
                    st.ips.remove(ip);
                }
            }
            Mutation::PutCooling {
                ip,
                released_unix_ms,
            } => {
                st.cooling.insert(*ip, *released_unix_ms);
            }
            Mutation::DeleteCooling { ip } => {
                st.cooling.remove(ip);
            }
        }
    }
}

impl Store for MemoryStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let st = self.lock();
        let mut allocations: Vec<Allocation> = st.allocations.values().cloned().collect();
        allocations.sort_by_key(|a| a.ip);
        let mut cooling: Vec<(Ipv4Addr, i64)> =
            st.cooling.iter().map(|(ip, t)| (*ip, *t)).collect();
        cooling.sort_by_key(|&(ip, t)| (t, ip));
        let mut blocks: Vec<BlockClaim> = st.blocks.values().cloned().collect();
        blocks.sort_by_key(|b| b.cidr);
        Ok(Snapshot {
            pools: st.pools.values().cloned().collect(),
            blocks,
            allocations,
            cooling,
        })
    }

    fn probe(&self, items: &Probe) -> Result<Snapshot, StoreError> {
        let st = self.lock();
        let mut cooling: Vec<(Ipv4Addr, i64)> = items
            .cooling
            .iter()
            .filter_map(|ip| st.cooling.get(ip).map(|t| (*ip, *t)))
            .collect();
        cooling.sort_by_key(|&(ip, t)| (t, ip));
        Ok(Snapshot {
            pools: Vec::new(),
            blocks: items
                .blocks
                .iter()
                .filter_map(|k| st.blocks.get(k).cloned())
                .collect(),
            allocations: items
                .allocations
                .iter()
                .filter_map(|k| st.allocations.get(k).cloned())
                .collect(),
            cooling,
        })
    }

    fn apply(&self, batch: &[Mutation]) -> Result<Seq, StoreError> {
        self.health()?;
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Io {
                path: "memory".into(),
                source: std::io::Error::other("injected failure"),
            });
        }
        let mut st = self.lock();
        apply_to(&mut st, batch);
        st.seq += 1;
        Ok(st.seq)
    }

    fn last_seq(&self) -> Seq {
        self.lock().seq
    }

    fn durable(&self, _seq: Seq) -> BoxFuture<'_, Result<(), StoreError>> {
        let r = self.health();
        Box::pin(async move { r })
    }

    fn health(&self) -> Result<(), StoreError> {
        if self.poisoned.load(Ordering::SeqCst) {
            Err(Self::poisoned_error())
        } else {
            Ok(())
        }
    }
}
