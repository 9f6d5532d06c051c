//! Reading every tree back into a [`Snapshot`], checking that its records
//! agree with each other.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;

use super::SledStore;
use super::codec::{
    TREE_ALLOCATIONS, TREE_BLOCKS, TREE_IPS, TREE_POOLS, alloc_key_bytes, block_key_bytes, corrupt,
    decode_cooling_key, decode_ip, decode_json,
};
use crate::model::{Allocation, BlockClaim, PoolSpec};
use crate::store::{Snapshot, StoreError};

impl SledStore {
    /// Reads every tree. It may run while the flusher writes, and sled's
    /// iterators are not snapshots, so what crosses records (an allocation
    /// and its reverse index entry) is only taken as damage once re-read with
    /// the writes held off (`confirm_index`); each record alone is always whole.
    pub(super) fn read_trees(&self) -> Result<Snapshot, StoreError> {
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
