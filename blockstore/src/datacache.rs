//! The bounded cache of verified data blocks.
//!
//! A data block's contents never change while it is allocated: every write
//! goes to freshly allocated blocks (see `Volume::write_blocks`), and a block
//! freed by a commit returns to the allocator only after a grace period in
//! which no reader that mapped it can still be running (`grace.rs`). So the
//! cache is keyed by pool block number, and it is shared by every device
//! that maps a block: a volume, its snapshots and its clones read one copy.
//!
//! Two rules keep it right:
//! - A reader inserts a block only after its checksum passed, and only while
//!   it is inside a grace epoch, so it cannot insert a block's old contents
//!   after the block was freed and taken again.
//! - Before the map points at the blocks a write has just taken (while they
//!   are still the write's alone, so nobody can free them), the write
//!   replaces whatever the cache held for them from an earlier life with
//!   the bytes it wrote: once they are on disk, as ordinary entries
//!   (writes fill the cache as a page cache's do), or before, as *dirty*
//!   entries staged for write-back (`writeback.rs`), which are never
//!   evicted nor overwritten until written. A write that fails drops its
//!   blocks from the cache as it gives them back.
//!
//! Blocks freed by a commit are also dropped when their grace period ends
//! (`Inner::finish`), unless the batch is larger than the cache. That is not
//! needed for correctness but empties their slots at once: otherwise a
//! rewritten volume's old blocks would sit in the cache until evicted while
//! the new ones took fresh memory.
//!
//! Each entry also keeps the block's CRC32C, and a lookup must match the
//! checksum in the map entry it came from: a mistake in the rules above
//! would most likely show as a miss (counted as `stale`), not as wrong
//! data. That is a safety net, not a guarantee: CRC32C is linear, and
//! contents can be made to match a given checksum on purpose.
//!
//! The cache is sharded, each shard a CLOCK queue under its own lock; a hit
//! copies 4 KiB out under the shard lock. Each shard's slots are one
//! anonymous mapping made when the cache is built: the kernel provides (and
//! zeroes) its pages as they are first used, and they are never given back
//! until the pool closes, so filling the cache touches the allocator and
//! the page tables once, not on every I/O. A cache of zero bytes is not
//! built at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::backend::BLOCK_SIZE;
use crate::blockhash::BlockHash;

const SHARDS: usize = 64;

struct Shard {
    index: HashMap<u64, u32, BlockHash>,
    /// Per slot: its block (when in `index`), checksum and CLOCK bit.
    blocks: Vec<u64>,
    crcs: Vec<u32>,
    referenced: Vec<bool>,
    /// Per slot: holds a staged write not yet on disk (see `writeback.rs`):
    /// never evicted, never overwritten, until [`DataCache::clean`].
    dirty: Vec<bool>,
    /// Slots emptied by [`DataCache::invalidate`], reused first.
    free: Vec<u32>,
    mem: SlotMem,
    hand: usize,
    capacity: usize,
    /// Lookups that found the block with another checksum.
    stale: u64,
}

impl Shard {
    fn data(&self, slot: usize) -> &[u8] {
        self.mem.block(slot)
    }

    /// A slot for a new entry: one emptied by an invalidation, else a fresh
    /// one while the shard fills, else the first the CLOCK hand finds
    /// unreferenced and clean; `None` when two turns of the hand found only
    /// dirty slots. Emptied slots come first so the cache reuses memory it
    /// has already touched: the first touch of a page costs a fault and, in
    /// a virtual machine, the host's too (after a volume was rewritten, a
    /// cache growing into fresh pages halved random-read IOPS here). The
    /// hand only runs when `free` is empty, so it never picks a free slot.
    fn victim(&mut self) -> Option<usize> {
        if let Some(slot) = self.free.pop() {
            return Some(slot as usize);
        }
        if self.blocks.len() < self.capacity {
            let slot = self.blocks.len();
            self.blocks.push(u64::MAX);
            self.crcs.push(0);
            self.referenced.push(false);
            self.dirty.push(false);
            return Some(slot);
        }
        for _ in 0..2 * self.capacity {
            let slot = self.hand;
            self.hand = (self.hand + 1) % self.capacity;
            if self.dirty[slot] || std::mem::take(&mut self.referenced[slot]) {
                continue;
            }
            // `blocks[slot]` is a block in `index` exactly when the slot
            // holds it; the hand never meets a free slot (see above).
            let old = std::mem::replace(&mut self.blocks[slot], u64::MAX);
            if old != u64::MAX {
                self.index.remove(&old);
            }
            return Some(slot);
        }
        None
    }

    /// Empty `slot`, which holds `block`, and put it on the free list.
    fn empty(&mut self, block: u64, slot: u32) {
        self.index.remove(&block);
        self.blocks[slot as usize] = u64::MAX;
        self.referenced[slot as usize] = false;
        self.dirty[slot as usize] = false;
        self.free.push(slot);
    }
}

/// Private anonymous memory for a shard's slots: mapped at once, backed by
/// pages only as they are first written, unmapped on drop.
struct SlotMem {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value alone; it is only
// reached through `&mut self` (and, in the cache, under the shard's lock).
unsafe impl Send for SlotMem {}

impl SlotMem {
    fn new(blocks: usize) -> Option<SlotMem> {
        let len = blocks * BLOCK_SIZE;
        // SAFETY: a new private anonymous mapping; no existing memory is
        // affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(SlotMem { ptr: std::ptr::NonNull::new(p.cast())?, len })
    }

    fn at(&self, slot: usize) -> *mut u8 {
        let at = slot * BLOCK_SIZE;
        assert!(at + BLOCK_SIZE <= self.len, "slot {slot} beyond the shard");
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { self.ptr.as_ptr().add(at) }
    }

    fn block(&self, slot: usize) -> &[u8] {
        // SAFETY: a slot of the mapping, which lives as long as `self`;
        // slots are only changed through `block_mut`, which needs `&mut
        // self`, and never while a flush holds one (`DataCache::dirty_bytes`).
        unsafe { std::slice::from_raw_parts(self.at(slot), BLOCK_SIZE) }
    }

    fn block_mut(&mut self, slot: usize) -> &mut [u8] {
        // SAFETY: a slot of the mapping, which lives as long as `self`;
        // `&mut self` makes the borrow exclusive (a flush's borrow of a
        // dirty slot, `DataCache::dirty_bytes`, is of a slot never passed
        // here while dirty).
        unsafe { std::slice::from_raw_parts_mut(self.at(slot), BLOCK_SIZE) }
    }
}

impl Drop for SlotMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `new`; no borrow of
        // it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Counters of a data cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataCacheStats {
    /// Bytes the cache may hold.
    pub capacity_bytes: u64,
    /// Bytes it holds now.
    pub used_bytes: u64,
    /// Bytes of memory its slots have touched so far (held or emptied).
    pub resident_bytes: u64,
    /// Blocks of reads answered from the cache.
    pub hits: u64,
    /// Blocks of reads that looked in the cache and went to the disk (a
    /// read is answered from memory only when all its blocks are cached).
    pub misses: u64,
    /// Lookups that found a block cached with another checksum than its
    /// map entry's. Zero unless the rules in the module doc are broken;
    /// the tests assert it.
    pub stale: u64,
    /// Bytes of written data held for write-back, not yet on disk.
    pub staged_bytes: u64,
}

/// Where an entry's contents come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Put {
    /// A verified read: an entry of the same block and checksum is this
    /// very life's, and is kept.
    Read,
    /// A write that is on disk: replaces any entry.
    Written,
    /// A write staged for write-back (a dirty entry).
    Staged,
}

/// Sharded CLOCK cache of verified data blocks, keyed by pool block number.
pub(crate) struct DataCache {
    shards: Box<[Mutex<Shard>]>,
    blocks: u64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl DataCache {
    /// A cache of about `bytes` (at least one block per shard), or `None`
    /// for zero bytes (or if the memory cannot be mapped).
    pub fn new(bytes: usize) -> Option<DataCache> {
        if bytes < BLOCK_SIZE {
            return None;
        }
        let per_shard = (bytes / BLOCK_SIZE).div_ceil(SHARDS).max(1);
        let shards = (0..SHARDS)
            .map(|_| {
                Some(Mutex::new(Shard {
                    index: HashMap::default(),
                    blocks: Vec::new(),
                    crcs: Vec::new(),
                    referenced: Vec::new(),
                    dirty: Vec::new(),
                    free: Vec::new(),
                    mem: SlotMem::new(per_shard)?,
                    hand: 0,
                    capacity: per_shard,
                    stale: 0,
                }))
            })
            .collect::<Option<_>>()?;
        Some(DataCache {
            shards,
            blocks: (per_shard * SHARDS) as u64,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// Blocks the cache can hold.
    pub fn capacity_blocks(&self) -> u64 {
        self.blocks
    }

    fn shard(&self, block: u64) -> &Mutex<Shard> {
        let h = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58;
        &self.shards[h as usize % SHARDS]
    }

    /// Copy block `block` into `dst` if it is cached with checksum `crc`.
    pub fn get(&self, block: u64, crc: u32, dst: &mut [u8]) -> bool {
        let mut s = self.shard(block).lock();
        let slot = match s.index.get(&block) {
            Some(&slot) if s.crcs[slot as usize] == crc => slot as usize,
            Some(_) => {
                s.stale += 1;
                return false;
            }
            None => return false,
        };
        s.referenced[slot] = true;
        dst.copy_from_slice(s.data(slot));
        true
    }

    /// Count a read of `blocks` mapped blocks: served from the cache
    /// (`hit`), or from the disk after a lookup missed.
    pub fn record(&self, hit: bool, blocks: u64) {
        let counter = if hit { &self.hits } else { &self.misses };
        counter.fetch_add(blocks, Ordering::Relaxed);
    }

    /// Keep a copy of block `block`, whose verified contents are `src`.
    /// A block already cached with the same checksum holds these very
    /// contents (a block does not change while allocated): it is kept, not
    /// copied again, as happens to the cached blocks of a read that was
    /// only partly cached.
    pub fn insert(&self, block: u64, crc: u32, src: &[u8]) {
        self.put(block, crc, src, Put::Read);
    }

    /// Keep block `block`, which a write has just put on the disk with
    /// contents `src` (checksum `crc`), before mapping it. Whatever the
    /// cache held for the block, from an earlier life, is replaced (never
    /// kept for an equal checksum, which does not prove equal contents),
    /// so the write need not drop it first.
    pub fn insert_written(&self, block: u64, crc: u32, src: &[u8]) {
        self.put(block, crc, src, Put::Written);
    }

    /// Keep block `block`, whose contents `src` (checksum `crc`) a write
    /// has staged and not yet written to the disk: the entry stays, and
    /// reads find it, until [`DataCache::clean`] after the write. False
    /// (and nothing kept) when the block's shard has no slot to spare.
    pub fn insert_dirty(&self, block: u64, crc: u32, src: &[u8]) -> bool {
        self.put(block, crc, src, Put::Staged)
    }

    fn put(&self, block: u64, crc: u32, src: &[u8], how: Put) -> bool {
        let dirty = how == Put::Staged;
        let mut s = self.shard(block).lock();
        let slot = match s.index.get(&block) {
            // A staged block is only ever written by its flush.
            Some(&slot) if s.dirty[slot as usize] => return !dirty && s.crcs[slot as usize] == crc,
            Some(&slot) if s.crcs[slot as usize] == crc && how == Put::Read => return true,
            Some(&slot) => slot as usize,
            None => {
                let Some(slot) = s.victim() else { return false };
                s.index.insert(block, slot as u32);
                s.blocks[slot] = block;
                slot
            }
        };
        s.crcs[slot] = crc;
        s.dirty[slot] = dirty;
        s.mem.block_mut(slot).copy_from_slice(src);
        true
    }

    /// The bytes of staged block `block`, for its flush to write without
    /// copying them; `None` if it is not cached dirty.
    ///
    /// # Safety
    /// The slice stays valid, and unchanged, while the block stays dirty: a
    /// dirty slot is never evicted nor written over, and only
    /// [`DataCache::discard`] empties it. The caller holds the write-back's
    /// flushing lock, which keeps `discard` out (its one caller,
    /// `WriteBack::abandon`, takes it), and drops the slice before it calls
    /// [`DataCache::clean`] for the block.
    pub unsafe fn dirty_bytes(&self, block: u64) -> Option<&[u8]> {
        let s = self.shard(block).lock();
        let slot = *s.index.get(&block)? as usize;
        if !s.dirty[slot] {
            return None;
        }
        let p = s.mem.at(slot);
        // SAFETY: a slot of this cache's mappings, which live as long as
        // `self`; unchanged while dirty (see above and `put`).
        Some(unsafe { std::slice::from_raw_parts(p, BLOCK_SIZE) })
    }

    /// Whether block `block` is cached dirty (staged, not yet on disk).
    pub fn is_dirty(&self, block: u64) -> bool {
        let s = self.shard(block).lock();
        s.index.get(&block).is_some_and(|&slot| s.dirty[slot as usize])
    }

    /// Block `block` is on disk now: its entry becomes an ordinary one.
    pub fn clean(&self, block: u64) {
        let mut s = self.shard(block).lock();
        if let Some(&slot) = s.index.get(&block) {
            s.dirty[slot as usize] = false;
        }
    }

    /// Forget block `block`, staged or not (a staged write abandoned before
    /// anything mapped it). True if it was staged.
    pub fn discard(&self, block: u64) -> bool {
        let mut s = self.shard(block).lock();
        match s.index.get(&block) {
            Some(&slot) => {
                let was = s.dirty[slot as usize];
                s.empty(block, slot);
                was
            }
            None => false,
        }
    }

    /// Forget blocks `start..start + n`. None of them may be staged: a
    /// staged block is mapped (so not free to be taken again) or abandoned
    /// through [`DataCache::discard`], and every commit writes all staged
    /// blocks before it frees any.
    pub fn invalidate(&self, start: u64, n: u64) {
        for block in start..start + n {
            let mut s = self.shard(block).lock();
            if let Some(&slot) = s.index.get(&block) {
                // A staged slot is never emptied here, even if that rule
                // were broken: a flush may be writing from it.
                if s.dirty[slot as usize] {
                    debug_assert!(false, "invalidating staged block {block}");
                    continue;
                }
                s.empty(block, slot);
            }
        }
    }

    pub fn stats(&self) -> DataCacheStats {
        let mut st = DataCacheStats::default();
        for s in self.shards.iter() {
            let s = s.lock();
            st.capacity_bytes += (s.capacity * BLOCK_SIZE) as u64;
            st.used_bytes += (s.index.len() * BLOCK_SIZE) as u64;
            st.resident_bytes += (s.blocks.len() * BLOCK_SIZE) as u64;
            st.stale += s.stale;
        }
        st.hits = self.hits.load(Ordering::Relaxed);
        st.misses = self.misses.load(Ordering::Relaxed);
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(fill: u8) -> Vec<u8> {
        vec![fill; BLOCK_SIZE]
    }

    #[test]
    fn a_hit_needs_the_same_block_and_checksum() {
        let c = DataCache::new(1 << 20).unwrap();
        let mut out = block(0);
        assert!(!c.get(7, 1, &mut out));
        c.insert(7, 1, &block(0xAB));
        assert!(c.get(7, 1, &mut out));
        assert_eq!(out, block(0xAB));
        assert!(!c.get(7, 2, &mut out), "another checksum is another block's contents");
        assert!(!c.get(8, 1, &mut out));
        c.invalidate(5, 3);
        assert!(!c.get(7, 1, &mut out));
        let st = c.stats();
        assert_eq!((st.stale, st.used_bytes), (1, 0));
    }

    #[test]
    fn a_written_block_replaces_an_entry_of_the_same_checksum() {
        // Equal checksums do not prove equal bytes: a block written again
        // (taken again after its old life was freed, its entry still
        // cached) must read the bytes written, whatever their checksum.
        let c = DataCache::new(1 << 20).unwrap();
        let mut out = block(0);
        c.insert(7, 5, &block(0x11));
        c.insert_written(7, 5, &block(0x22));
        assert!(c.get(7, 5, &mut out));
        assert_eq!(out, block(0x22), "a write kept an old entry with its checksum");
        // A read's insert of a block cached with its checksum is the same
        // life's contents: kept, not copied again.
        c.insert(7, 5, &block(0x33));
        assert!(c.get(7, 5, &mut out));
        assert_eq!(out, block(0x22));
    }

    #[test]
    fn it_stays_within_its_size_and_keeps_what_is_used() {
        // Two slots per shard.
        let c = DataCache::new(2 * SHARDS * BLOCK_SIZE).unwrap();
        let mut out = block(0);
        c.insert(1, 1, &block(1));
        for b in 2..2000u64 {
            // Block 1 is read between inserts, so CLOCK keeps it while
            // its shard's other entries come and go.
            assert!(c.get(1, 1, &mut out), "block 1 evicted before block {b}");
            c.insert(b, b as u32, &block(b as u8));
        }
        let st = c.stats();
        assert!(st.used_bytes <= st.capacity_bytes, "{st:?}");
        assert_eq!(st.capacity_bytes, (2 * SHARDS * BLOCK_SIZE) as u64);
        // The newest block of every shard is there, with its own contents.
        assert!(c.get(1999, 1999, &mut out));
        assert_eq!(out, block(1999u64 as u8));
    }

    #[test]
    fn emptied_slots_are_reused_before_fresh_memory() {
        let c = DataCache::new(64 << 20).unwrap();
        for b in 0..4096u64 {
            c.insert(b, 0, &block(b as u8));
        }
        let before = c.stats();
        assert_eq!(before.resident_bytes, 4096 * BLOCK_SIZE as u64);
        c.invalidate(0, 4096);
        let mut out = block(0);
        for b in 10_000..14_096u64 {
            c.insert(b, 7, &block(b as u8));
        }
        let after = c.stats();
        // Blocks hash to shards, so a shard may get a few more new blocks
        // than it emptied: those few take fresh slots.
        assert!(after.resident_bytes <= before.resident_bytes * 51 / 50, "{after:?}");
        assert_eq!(after.used_bytes, 4096 * BLOCK_SIZE as u64);
        for b in (10_000..14_096u64).step_by(97) {
            assert!(c.get(b, 7, &mut out));
            assert_eq!(out, block(b as u8));
        }
        assert!(!c.get(5, 0, &mut out));
    }

    #[test]
    fn zero_bytes_builds_no_cache() {
        assert!(DataCache::new(0).is_none());
    }
}
