//! The per-block bitmap: which addresses of an owned block were never used.

use std::net::Ipv4Addr;

use tracing::warn;

use super::pool;
use crate::model::BlockClaim;

/// A block this node owns, with the bookkeeping to pick addresses fast.
#[derive(Debug, Clone)]
pub(super) struct BlockState {
    pub(super) claim: BlockClaim,
    /// Bit i set: address `network + i` is allocated, cooling or reserved,
    /// so it is not "never used".
    pub(super) used: Vec<u64>,
    pub(super) allocated: u32,
    /// When the block last became empty; None while it holds allocations.
    pub(super) empty_since: Option<i64>,
}

impl BlockState {
    /// A block with every address unused and nothing allocated.
    pub(super) fn new(claim: BlockClaim) -> Self {
        let cidr = claim.cidr;
        // Only a damaged store can hold a block this large; an empty bitmap
        // makes it unusable for new addresses instead of costing gigabytes.
        let words = if cidr.prefix_len() >= pool::MIN_BLOCK_PREFIX {
            (pool::net_size(cidr) as usize).div_ceil(64)
        } else {
            warn!(block = %cidr, "block larger than /{}; not allocating from it", pool::MIN_BLOCK_PREFIX);
            0
        };
        BlockState {
            claim,
            used: vec![0; words],
            allocated: 0,
            empty_since: None,
        }
    }

    fn index(&self, ip: Ipv4Addr) -> Option<usize> {
        let cidr = self.claim.cidr;
        if !cidr.contains(&ip) {
            return None;
        }
        Some((u32::from(ip) - u32::from(cidr.network())) as usize)
    }

    pub(super) fn set_used(&mut self, ip: Ipv4Addr, used: bool) {
        if let Some(i) = self.index(ip)
            && let Some(word) = self.used.get_mut(i / 64)
        {
            if used {
                *word |= 1 << (i % 64);
            } else {
                *word &= !(1 << (i % 64));
            }
        }
    }

    /// Addresses whose bit is clear, lowest first.
    pub(super) fn unused(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let n = pool::net_size(self.claim.cidr) as usize;
        let base = u32::from(self.claim.cidr.network());
        self.used
            .iter()
            .enumerate()
            .filter(|(_, word)| **word != u64::MAX)
            .flat_map(|(w, word)| {
                (0..64usize)
                    .filter(move |bit| word & (1 << bit) == 0)
                    .map(move |bit| w * 64 + bit)
            })
            .take_while(move |i| *i < n)
            .map(move |i| Ipv4Addr::from(base + i as u32))
    }
}
