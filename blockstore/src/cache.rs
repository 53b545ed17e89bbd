//! The bounded cache of clean map pages.
//!
//! Clean pages are immutable (a change always goes to a new block, see
//! `tree.rs`). A map lookup reads the one entry it needs from each page on
//! its path under that page's shard lock ([`PageCache::with`]), which costs
//! less than taking a reference; other readers get an `Arc<Page>` and use it
//! without holding any cache lock. The cache is split into shards, each with
//! its own lock and a CLOCK replacement queue, so lookups from many threads
//! do not meet on one lock. Pages written by a commit that has not finished
//! are pinned: they are not on disk yet and must not be evicted.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::blockhash::BlockHash;
use crate::format::Page;

const SHARDS: usize = 16;

struct Slot {
    page: Arc<Page>,
    referenced: bool,
    pinned: bool,
}

#[derive(Default)]
struct Shard {
    map: HashMap<u64, Slot, BlockHash>,
    clock: VecDeque<u64>,
}

/// Sharded CLOCK cache keyed by pool block number.
pub(crate) struct PageCache {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
}

impl PageCache {
    /// A cache of about `capacity_pages` pages (at least one per shard).
    pub fn new(capacity_pages: usize) -> PageCache {
        PageCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            // At least a few pages a shard, so one lookup's path fits.
            per_shard: capacity_pages.div_ceil(SHARDS).max(4),
        }
    }

    fn shard(&self, block: u64) -> &Mutex<Shard> {
        // Fibonacci hashing spreads neighbouring blocks over shards.
        let h = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60;
        &self.shards[h as usize % SHARDS]
    }

    pub fn get(&self, block: u64) -> Option<Arc<Page>> {
        self.with(block, Arc::clone)
    }

    /// Apply `f` to a cached page under its shard's lock, without taking a
    /// reference to it: a map lookup reads one entry of each page on its
    /// path, and the `Arc` count of a leaf page (one of thousands, read in
    /// no order) is a cache miss of its own, twice (clone and drop). Keep
    /// `f` short: the shard is locked while it runs.
    pub fn with<R>(&self, block: u64, f: impl FnOnce(&Arc<Page>) -> R) -> Option<R> {
        let mut shard = self.shard(block).lock();
        let slot = shard.map.get_mut(&block)?;
        slot.referenced = true;
        Some(f(&slot.page))
    }

    /// Insert a clean page; `pinned` keeps it until [`PageCache::unpin`].
    pub fn insert(&self, block: u64, page: Arc<Page>, pinned: bool) {
        let mut shard = self.shard(block).lock();
        if let Some(slot) = shard.map.get_mut(&block) {
            slot.page = page;
            slot.pinned |= pinned;
            return;
        }
        shard.map.insert(block, Slot { page, referenced: false, pinned });
        shard.clock.push_back(block);
        let mut budget = shard.clock.len() * 2;
        while shard.map.len() > self.per_shard && budget > 0 {
            budget -= 1;
            let Some(victim) = shard.clock.pop_front() else { break };
            let Some(slot) = shard.map.get_mut(&victim) else { continue };
            // Never the page just inserted: its reader has not used it yet.
            if slot.pinned || slot.referenced || victim == block {
                slot.referenced = false;
                shard.clock.push_back(victim);
            } else {
                shard.map.remove(&victim);
            }
        }
    }

    /// Allow eviction of a page a commit has made durable.
    pub fn unpin(&self, block: u64) {
        if let Some(slot) = self.shard(block).lock().map.get_mut(&block) {
            slot.pinned = false;
        }
    }

    /// Forget a block (freed; its number will be reused). Its clock slot is
    /// dropped lazily, when the clock hand reaches it.
    pub fn remove(&self, block: u64) {
        let mut shard = self.shard(block).lock();
        shard.map.remove(&block);
        if shard.clock.len() > 4 * self.per_shard + 64 {
            let Shard { map, clock } = &mut *shard;
            clock.retain(|b| map.contains_key(b));
        }
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Entry, FANOUT};

    #[test]
    fn cache_stays_bounded_and_keeps_pinned_pages() {
        let c = PageCache::new(32);
        for b in 0..1000u64 {
            c.insert(b, Arc::new([Entry { phys: b, crc: 0 }; FANOUT]), b == 3);
        }
        // 32 pages asked, but at least 4 a shard: 64, plus one over per shard
        // at most while a pinned page is skipped.
        assert!(c.len() <= 4 * SHARDS + SHARDS, "cache grew to {}", c.len());
        assert_eq!(c.get(3).unwrap()[0].phys, 3);
    }
}
