//! `ipamctl check`: memory against the store, without holding up Allocate.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use tracing::debug;

use super::Ipam;
use crate::alloc::Allocator;
use crate::error::IpamError;
use crate::model::{AllocKey, Allocation, BlockClaim};
use crate::store::{Probe, Snapshot, StoreError};

impl Ipam {
    /// Compares the in-memory state with what the store holds; each entry
    /// describes one difference. Empty means consistent.
    ///
    /// Allocate and Release go on meanwhile: the allocator lock is held only
    /// to copy memory, and at the end for a few point reads. The store is
    /// scanned without the lock once what memory held is durable, so a batch
    /// committed during the scan can make an item look different. Each such
    /// item is compared again under the lock, against the store's state as of
    /// the same batch (`Store::probe`), and reported only if it still differs.
    pub async fn check_consistency(&self) -> Result<Vec<String>, IpamError> {
        // Allocate waits on this lock: copy pointers under it, no more.
        let ((allocations, blocks, cooling), seq) = {
            let st = self.lock();
            let mem = (st.shared_allocations(), st.block_claims(), st.cooling());
            (mem, self.store.last_seq())
        };
        // Fails only on a poisoned store, whose queued batches the probe
        // below still sees: compare anyway.
        if let Err(e) = self.store.durable(seq).await {
            debug!(error = %e, "consistency check: store is not durable");
        }
        // Reading and comparing every record is CPU bound: off the async
        // workers, which serve Allocate.
        let store = self.store.clone();
        let compared = tokio::task::spawn_blocking(move || {
            let mem = Holdings::new(allocations, blocks, cooling);
            // One consistent state of memory: this needs no store.
            let mut out: Vec<String> = mem
                .allocations
                .values()
                .filter(|a| !mem.blocks.keys().any(|(_, b)| b.contains(&a.ip)))
                .map(|a| format!("allocation {} lies in no block this node owns", a.ip))
                .collect();
            out.sort();
            let disk = Holdings::of_snapshot(store.scan_written()?);
            Ok::<_, StoreError>((out, mem.differences(&disk)))
        });
        let (mut out, probe) = match compared.await {
            Ok(r) => r?,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return Err(StoreError::Closed.into()),
        };
        if probe == Probe::default() {
            return Ok(out);
        }
        let (mem, disk) = {
            let st = self.lock();
            let now = Holdings::of_memory_items(&st, &probe);
            (now, Holdings::of_snapshot(self.store.probe(&probe)?))
        };
        out.extend(mem.describe_differences(&disk));
        Ok(out)
    }
}

/// What [`Ipam::check_consistency`] compares, as memory or the store holds it.
#[derive(Debug, Default)]
struct Holdings {
    allocations: BTreeMap<AllocKey, Arc<Allocation>>,
    blocks: BTreeMap<(String, Ipv4Net), BlockClaim>,
    cooling: BTreeMap<Ipv4Addr, i64>,
}

impl Holdings {
    fn new(
        allocations: impl IntoIterator<Item = Arc<Allocation>>,
        blocks: Vec<BlockClaim>,
        cooling: Vec<(Ipv4Addr, i64)>,
    ) -> Self {
        Holdings {
            allocations: allocations
                .into_iter()
                .map(|a| (a.key.clone(), a))
                .collect(),
            blocks: blocks
                .into_iter()
                .map(|b| ((b.pool.clone(), b.cidr), b))
                .collect(),
            cooling: cooling.into_iter().collect(),
        }
    }

    /// Memory's view of just the probed items.
    fn of_memory_items(st: &Allocator, p: &Probe) -> Self {
        let wanted: BTreeSet<Ipv4Addr> = p.cooling.iter().copied().collect();
        let cooling = if wanted.is_empty() {
            Vec::new()
        } else {
            let mut all = st.cooling();
            all.retain(|(ip, _)| wanted.contains(ip));
            all
        };
        let mut blocks = st.block_claims();
        blocks.retain(|b| p.blocks.contains(&(b.pool.clone(), b.cidr)));
        Holdings::new(
            p.allocations.iter().filter_map(|k| st.get_shared(k)),
            blocks,
            cooling,
        )
    }

    fn of_snapshot(s: Snapshot) -> Self {
        Holdings::new(s.allocations.into_iter().map(Arc::new), s.blocks, s.cooling)
    }

    /// The items that differ between the two, to look at again.
    fn differences(&self, other: &Holdings) -> Probe {
        fn differ<K: Ord + Clone, V: PartialEq>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> Vec<K> {
            let keys: BTreeSet<&K> = a.keys().chain(b.keys()).collect();
            keys.into_iter()
                .filter(|k| a.get(k) != b.get(k))
                .cloned()
                .collect()
        }
        Probe {
            allocations: differ(&self.allocations, &other.allocations),
            blocks: differ(&self.blocks, &other.blocks),
            cooling: differ(&self.cooling, &other.cooling),
        }
    }

    /// One line per difference, memory being `self`.
    fn describe_differences(&self, disk: &Holdings) -> Vec<String> {
        let describe = |a: &Allocation| {
            format!(
                "{} {}/{}/{}",
                a.ip, a.key.network, a.key.container_id, a.key.ifname
            )
        };
        let mut out = Vec::new();
        for key in self.differences(disk).allocations {
            match (self.allocations.get(&key), disk.allocations.get(&key)) {
                (Some(m), Some(d)) if m.ip == d.ip => out.push(format!(
                    "allocation {} differs between memory and the store",
                    describe(m)
                )),
                (m, d) => {
                    if let Some(m) = m {
                        out.push(format!(
                            "allocation {} is in memory but not in the store",
                            describe(m)
                        ));
                    }
                    if let Some(d) = d {
                        out.push(format!(
                            "allocation {} is in the store but not in memory",
                            describe(d)
                        ));
                    }
                }
            }
        }
        for (pool, cidr) in self.differences(disk).blocks {
            out.push(format!(
                "block {cidr} of pool {pool} differs between memory and the store"
            ));
        }
        for ip in self.differences(disk).cooling {
            let show =
                |t: Option<&i64>| t.map_or("none".to_string(), |t| format!("released at {t}"));
            out.push(format!(
                "cooling entry of {ip} differs between memory ({}) and the store ({})",
                show(self.cooling.get(&ip)),
                show(disk.cooling.get(&ip))
            ));
        }
        out
    }
}
