//! Space: reference counts of data-area blocks and the allocator.
//!
//! Every block of the data area (map pages and data blocks alike) has a
//! 32-bit reference count: the number of map entries and device roots that
//! point at it. A snapshot shares its volume's root (count 2); the first
//! write below a shared page copies it and increments its children, as in
//! dm-thin. A block whose count drops to zero is not reusable at once: the
//! last committed state may still point at it, so it waits in `pending`
//! until the next commit, and then until no reader that could have seen it
//! is still running (see [`crate::grace`]).
//!
//! The counts live in memory (4 bytes per 4 KiB block, 0.1% of the pool)
//! and in the refcount region on disk, one page of 1020 counts per 4 KiB,
//! each page twice (A/B), rewritten only when it changed. Each page has its
//! own lock: there is no global lock on the I/O path.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::format::COUNTS_PER_PAGE;

/// One page of counts.
pub(crate) struct CountPage {
    /// `COUNTS_PER_PAGE` counts once the page is part of the pool; empty
    /// before (a chunk's pages past the pool's end).
    pub counts: Box<[u32]>,
    /// Changed since the last commit captured it.
    pub dirty: bool,
    /// Which on-disk copy (0 or 1) holds the newest committed version.
    pub slot: u8,
    /// Blocks of this page whose count reached zero since the last capture.
    pub pending: Vec<u64>,
}

/// Count pages in the first chunk of [`RefTable`]; chunk `k` has
/// `FIRST_CHUNK << k` (256 MiB of pool in the first, then doubling).
const FIRST_CHUNK: usize = 64;
/// Chunks of [`RefTable`]: more pages than any pool has.
const CHUNKS: usize = 40;
// The last chunk alone holds more pages than a 64 PiB pool needs (2^34;
// a 16 TiB pool needs 4.2 million).
const _: () = assert!(FIRST_CHUNK << (CHUNKS - 1) > 1 << 34);

/// Chunk and index in it of page `p`.
fn chunk_of(p: usize) -> (usize, usize) {
    let i = p / FIRST_CHUNK + 1;
    let k = (usize::BITS - 1 - i.leading_zeros()) as usize;
    (k, p - ((1 << k) - 1) * FIRST_CHUNK)
}

/// All reference counts.
///
/// The pages sit in chunks that double in size, each set once behind a
/// `OnceLock` (a segmented vector: 40 chunks hold any pool). Growing sets
/// more chunks and gives pages their counts, and never moves a page, so the
/// I/O path keeps its one lock per page: a lookup is a division, a
/// leading-zero count, one acquire load and the page's lock, as before the
/// pool could grow. A chunk's pages beyond the pool's end have no counts
/// (56 bytes each), so a chunk costs little before it fills.
pub(crate) struct RefTable {
    chunks: [OnceLock<Box<[Mutex<CountPage>]>>; CHUNKS],
    /// Pages in use (the rest of a chunk has no counts yet).
    pages: AtomicUsize,
    data_start: u64,
    /// Blocks of the data area (grows with the pool).
    data_blocks: AtomicU64,
    referenced: AtomicU64,
    /// Blocks whose count reached zero since the last capture took them.
    pending: AtomicU64,
}

impl RefTable {
    pub fn new(data_start: u64, data_blocks: u64, pages: u64) -> RefTable {
        let t = RefTable {
            chunks: std::array::from_fn(|_| OnceLock::new()),
            pages: AtomicUsize::new(0),
            data_start,
            data_blocks: AtomicU64::new(0),
            referenced: AtomicU64::new(0),
            pending: AtomicU64::new(0),
        };
        t.grow(data_blocks, pages);
        t
    }

    /// Extend the table to `pages` pages (new ones all zero, clean, slot 0)
    /// over `data_blocks` blocks of data area. Callers serialize growths
    /// (the commit lock); lookups of blocks below the old end run
    /// meanwhile, and no one looks at the new pages before this returns.
    pub fn grow(&self, data_blocks: u64, pages: u64) {
        assert!(data_blocks <= pages * COUNTS_PER_PAGE as u64, "{pages} count pages for {data_blocks} blocks");
        let old = self.pages.load(Ordering::Acquire);
        for p in old..pages as usize {
            let (k, i) = chunk_of(p);
            let chunk = self.chunks[k].get_or_init(|| {
                (0..FIRST_CHUNK << k)
                    .map(|_| Mutex::new(CountPage { counts: Box::new([]), dirty: false, slot: 0, pending: Vec::new() }))
                    .collect()
            });
            chunk[i].lock().counts = vec![0; COUNTS_PER_PAGE].into_boxed_slice();
        }
        self.pages.fetch_max(pages as usize, Ordering::Release);
        self.data_blocks.fetch_max(data_blocks, Ordering::Release);
    }

    fn locate(&self, block: u64) -> (usize, usize) {
        debug_assert!(self.contains(block), "block {block} outside the data area");
        let i = block - self.data_start;
        ((i / COUNTS_PER_PAGE as u64) as usize, (i % COUNTS_PER_PAGE as u64) as usize)
    }

    pub fn page(&self, index: usize) -> &Mutex<CountPage> {
        let (k, i) = chunk_of(index);
        &self.chunks[k].get().expect("count page beyond the table")[i]
    }

    pub fn page_count(&self) -> usize {
        self.pages.load(Ordering::Acquire)
    }

    /// Blocks of the data area.
    pub fn data_blocks(&self) -> u64 {
        self.data_blocks.load(Ordering::Acquire)
    }

    /// True when `block` lies in the data area.
    pub fn contains(&self, block: u64) -> bool {
        block >= self.data_start && block < self.data_start + self.data_blocks()
    }

    pub fn get(&self, block: u64) -> u32 {
        let (p, i) = self.locate(block);
        self.page(p).lock().counts[i]
    }

    /// Add one reference.
    pub fn inc(&self, block: u64) {
        let (p, i) = self.locate(block);
        let mut page = self.page(p).lock();
        if page.counts[i] == 0 {
            self.referenced.fetch_add(1, Ordering::Relaxed);
        }
        page.counts[i] = page.counts[i].checked_add(1).expect("reference count overflow");
        page.dirty = true;
    }

    /// Drop one reference; returns the count left. A block reaching zero is
    /// queued for release at the next commit.
    pub fn dec(&self, block: u64) -> u32 {
        let (p, i) = self.locate(block);
        let mut page = self.page(p).lock();
        let c = page.counts[i];
        assert!(c > 0, "reference count underflow on block {block}");
        page.counts[i] = c - 1;
        page.dirty = true;
        if c == 1 {
            self.referenced.fetch_sub(1, Ordering::Relaxed);
            self.pending.fetch_add(1, Ordering::Relaxed);
            page.pending.push(block);
        }
        c - 1
    }

    /// Blocks freed since the last capture (reusable after the next
    /// commit).
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// A capture took `n` pending blocks.
    pub fn took_pending(&self, n: u64) {
        self.pending.fetch_sub(n, Ordering::Relaxed);
    }

    /// Blocks with at least one reference.
    pub fn referenced(&self) -> u64 {
        self.referenced.load(Ordering::Relaxed)
    }

    /// Set after loading from disk.
    pub fn recount(&self) {
        let n: u64 =
            (0..self.page_count()).map(|i| self.page(i).lock().counts.iter().filter(|&&c| c > 0).count() as u64).sum();
        self.referenced.store(n, Ordering::Relaxed);
    }
}

/// Free-block bitmap over the data area, with a roving cursor. Volumes take
/// whole extents from it (see `Device::cursor`), so its lock is taken once per
/// extent, not once per I/O.
pub(crate) struct Allocator {
    /// Bit set = block free and reusable.
    bits: Vec<u64>,
    free: u64,
    hint: u64,
    n: u64,
    base: u64,
}

impl Allocator {
    /// An allocator over `n` blocks starting at pool block `base`, all taken.
    pub fn new(base: u64, n: u64) -> Allocator {
        Allocator { bits: vec![0; n.div_ceil(64) as usize], free: 0, hint: 0, n, base }
    }

    pub fn free_blocks(&self) -> u64 {
        self.free
    }

    /// Cover `n` blocks from the same base (the pool grew), the new ones
    /// taken: the caller releases those that may be allocated.
    pub fn grow(&mut self, n: u64) {
        debug_assert!(n >= self.n, "the allocator only grows");
        self.bits.resize(n.div_ceil(64) as usize, 0);
        self.n = n;
    }

    fn is_free(&self, i: u64) -> bool {
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// True when pool block `b` is free for allocation.
    pub fn is_free_block(&self, b: u64) -> bool {
        self.is_free(b - self.base)
    }

    /// Mark `len` blocks from pool block `start` free.
    pub fn release(&mut self, start: u64, len: u64) {
        for b in start..start + len {
            let i = b - self.base;
            debug_assert!(!self.is_free(i), "double free of block {b}");
            self.bits[(i / 64) as usize] |= 1 << (i % 64);
        }
        self.free += len;
    }

    /// Take up to `max` contiguous free blocks, leaving at least `keep`
    /// blocks free. Returns (first pool block, count).
    pub fn take(&mut self, max: u64, keep: u64) -> Option<(u64, u64)> {
        if self.free <= keep || max == 0 {
            return None;
        }
        let max = max.min(self.free - keep);
        let words = self.bits.len() as u64;
        let start_word = self.hint / 64;
        for k in 0..=words {
            let w = ((start_word + k) % words) as usize;
            let mut word = self.bits[w];
            if k == 0 {
                // Only bits at or after the hint on the first pass.
                word &= !0u64 << (self.hint % 64);
            }
            if word == 0 {
                continue;
            }
            let first = w as u64 * 64 + word.trailing_zeros() as u64;
            if first >= self.n {
                continue;
            }
            let mut len = 0;
            while len < max && first + len < self.n && self.is_free(first + len) {
                let i = first + len;
                self.bits[(i / 64) as usize] &= !(1 << (i % 64));
                len += 1;
            }
            self.free -= len;
            self.hint = (first + len) % self.n;
            return Some((self.base + first, len));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_hands_out_extents_and_keeps_the_reserve() {
        let mut a = Allocator::new(100, 200);
        a.release(100, 200);
        assert_eq!(a.take(50, 0), Some((100, 50)));
        assert_eq!(a.take(50, 0), Some((150, 50)));
        a.release(120, 10);
        // Roving: continues after the last extent, then wraps.
        assert_eq!(a.take(200, 0), Some((200, 100)));
        assert_eq!(a.take(200, 5), Some((120, 5)));
        assert_eq!(a.take(1, 5), None);
        assert_eq!(a.take(10, 0), Some((125, 5)));
        assert_eq!(a.take(1, 0), None);
    }

    #[test]
    fn chunks_double_and_tile_the_pages() {
        let mut next = 0;
        for k in 0..12 {
            for i in 0..FIRST_CHUNK << k {
                assert_eq!(chunk_of(next), (k, i), "page {next}");
                next += 1;
            }
        }
    }

    #[test]
    fn the_table_and_the_allocator_grow_in_place() {
        let t = RefTable::new(10, 100, 1);
        t.inc(10);
        let first = t.page(0) as *const _;
        t.grow(1020 * 70, 70);
        assert_eq!(t.page(0) as *const _, first, "pages never move");
        assert_eq!(t.page_count(), 70);
        assert!(t.contains(10 + 1020 * 70 - 1) && !t.contains(10 + 1020 * 70));
        t.inc(10 + 1020 * 69);
        assert_eq!(t.get(10), 1);
        assert_eq!(t.referenced(), 2);
        assert!(t.page(69).lock().dirty && !t.page(68).lock().dirty);

        let mut a = Allocator::new(100, 100);
        a.release(150, 50);
        assert_eq!(a.take(40, 0), Some((150, 40)));
        a.grow(300);
        a.release(200, 200);
        assert_eq!(a.free_blocks(), 210);
        // The cursor goes on where it was, into the new blocks.
        assert_eq!(a.take(100, 0), Some((190, 100)));
        assert_eq!(a.take(500, 0), Some((290, 110)));
        assert_eq!(a.take(1, 0), None);
    }

    #[test]
    fn counts_queue_blocks_that_reach_zero() {
        let t = RefTable::new(10, 3000, 3);
        t.inc(10);
        t.inc(10);
        t.inc(2500);
        assert_eq!(t.referenced(), 2);
        assert_eq!(t.dec(10), 1);
        assert_eq!(t.dec(2500), 0);
        assert_eq!(t.referenced(), 1);
        assert_eq!(t.page(2).lock().pending, vec![2500]);
    }
}
