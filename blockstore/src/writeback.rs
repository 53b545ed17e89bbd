//! Write-back of data blocks: a write may be acknowledged once its blocks
//! are in the data cache, and reach the disk later, many at once.
//!
//! The store's durability contract only promises what a flush or a FUA
//! write made durable, and both go through a commit. So a write can stage
//! its new blocks as *dirty* entries of the data cache (`insert_dirty`:
//! never evicted, never overwritten) and map them at once; readers find
//! them in the cache. The blocks are written later by [`WriteBack::flush`],
//! which takes every staged block, sorts them, and writes each run of
//! consecutive blocks with one I/O, gathered straight from the blocks'
//! cache slots (no copy). Copy-on-write allocation hands out
//! consecutive blocks to consecutive writes, so random 4 KiB writes reach
//! the disk as large sequential ones.
//!
//! What keeps it crash-safe:
//! - Every commit flushes all staged blocks after its capture and before
//!   its first sync (`Inner::commit_locked`), so the map it makes durable
//!   never points at a block that is not on disk. A write maps its blocks
//!   only after staging them, so everything the capture saw is staged.
//! - A block is freed only by a commit, and that commit wrote it first, so
//!   a staged block is never freed and taken again while its old contents
//!   wait to be written over its new owner's.
//! - A write that stages its blocks and then fails to map some of them
//!   (a raced compare, an error) abandons them through
//!   [`WriteBack::abandon`], which waits for any flush in progress (it may
//!   be writing them) before they return to the allocator.
//! - A flush takes the queue once and writes what it took (one pass: a
//!   commit needs only what its capture saw, which was queued before it,
//!   and writers must not keep a commit waiting). Whatever it took and did
//!   not write, because a run failed or because its future was dropped, is
//!   queued again before the flushing lock is released ([`Flight`]), so no
//!   commit's flush can miss it.
//! - A flush that fails keeps its blocks staged and fails the commit; the
//!   pool then refuses further commits (as for a failed metadata write). A
//!   write whose own batch flush fails returns that error.
//!
//! Limits: only writes of up to `MAX_STAGED_WRITE` blocks are staged
//! (larger ones are large I/Os already); at most `limit` blocks are staged
//! (then writes go to the disk themselves, as without write-back); a write
//! that finds `batch` blocks queued and no flush running flushes them
//! before it returns. Staged blocks below `batch` wait for the next write,
//! flush or commit: like a disk's volatile write cache, they are lost if
//! the process dies first, which the contract allows for writes not
//! flushed.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt;
use parking_lot::Mutex;

use crate::backend::{BLOCK_SIZE, Backend};
use crate::datacache::DataCache;
use crate::pool::consecutive_runs;

const BS: u64 = BLOCK_SIZE as u64;
/// Longest run written with one I/O, in blocks (1 MiB).
const MAX_RUN: usize = 256;
/// Runs written at once by a flush.
const RUNS_IN_FLIGHT: usize = 16;
/// Largest write staged, in blocks (64 KiB). Larger ones are already large
/// I/Os: staging would only add a copy (into the cache) and a second pass
/// over the run, so they go to the disk themselves.
pub(crate) const MAX_STAGED_WRITE: usize = 16;

pub(crate) struct WriteBack {
    /// Most blocks staged at once.
    limit: usize,
    /// Staged blocks at which a write flushes them.
    batch: usize,
    /// Staged blocks not yet taken by a flush, in staging order.
    queue: Mutex<Vec<u64>>,
    /// Blocks staged and not yet on disk (queued or being written).
    staged: AtomicUsize,
    /// One flush at a time (`abandon` takes it to wait for a running one).
    flushing: tokio::sync::Mutex<()>,
}

impl WriteBack {
    /// Write-back of up to `bytes` for a cache of `cache_blocks`, or `None`
    /// when `bytes` is 0. Staged blocks pin cache slots, so at most a
    /// quarter of the cache is staged, whatever `bytes` says.
    pub fn new(bytes: usize, cache_blocks: u64) -> Option<WriteBack> {
        let limit = (bytes / BLOCK_SIZE).min(cache_blocks as usize / 4);
        if limit == 0 {
            return None;
        }
        Some(WriteBack {
            limit,
            batch: (limit / 2).clamp(1, MAX_RUN),
            queue: Mutex::new(Vec::with_capacity(limit)),
            staged: AtomicUsize::new(0),
            flushing: tokio::sync::Mutex::new(()),
        })
    }

    /// Most blocks staged at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Blocks staged and not yet on disk.
    pub fn staged(&self) -> usize {
        self.staged.load(Ordering::Relaxed)
    }

    /// Stage blocks `extents` (runs of pool blocks), whose contents are
    /// `src` with checksums `crcs`, as dirty cache entries. False, with
    /// nothing staged, when that would pass the limit or a shard has no
    /// slot: the caller writes them to the disk itself.
    pub fn stage(&self, cache: &DataCache, extents: &[(u64, u64)], src: &[u8], crcs: &[u32]) -> bool {
        let n = src.len() / BLOCK_SIZE;
        if n > MAX_STAGED_WRITE {
            return false;
        }
        if self.staged.fetch_add(n, Ordering::AcqRel) + n > self.limit {
            self.staged.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        let blocks = || extents.iter().flat_map(|&(s, l)| s..s + l);
        let mut data = src.chunks_exact(BLOCK_SIZE).zip(crcs);
        for (k, b) in blocks().enumerate() {
            let (d, &c) = data.next().expect("one data block per extent block");
            if !cache.insert_dirty(b, c, d) {
                for undo in blocks().take(k) {
                    cache.discard(undo);
                }
                self.staged.fetch_sub(n, Ordering::AcqRel);
                return false;
            }
        }
        self.queue.lock().extend(blocks());
        true
    }

    /// After a write: if `batch` blocks are queued and no flush is
    /// running, flush them.
    pub async fn flush_if_due<B: Backend>(&self, backend: &B, cache: &DataCache) -> io::Result<()> {
        if self.queue.lock().len() < self.batch {
            return Ok(());
        }
        match self.flushing.try_lock() {
            Ok(lock) => self.flush_locked(lock, backend, cache).await,
            Err(_) => Ok(()),
        }
    }

    /// Write every block staged so far to the disk (without syncing),
    /// after a flush already running. On error the blocks that were not
    /// written stay staged. One pass: blocks staged meanwhile wait for the
    /// next flush (a commit needs only those its capture saw, which were
    /// queued before it, and writers must not keep it going forever).
    pub async fn flush<B: Backend>(&self, backend: &B, cache: &DataCache) -> io::Result<()> {
        let lock = self.flushing.lock().await;
        self.flush_locked(lock, backend, cache).await
    }

    /// [`WriteBack::flush`], with `flushing` held.
    async fn flush_locked<B: Backend>(
        &self,
        lock: tokio::sync::MutexGuard<'_, ()>,
        backend: &B,
        cache: &DataCache,
    ) -> io::Result<()> {
        let mut flight = Flight { wb: self, cache, blocks: std::mem::take(&mut *self.queue.lock()), _lock: lock };
        let blocks = &mut flight.blocks;
        blocks.sort_unstable();
        blocks.dedup();
        let mut runs: VecDeque<_> = consecutive_runs(blocks.len(), |k| blocks[k], MAX_RUN).collect();
        let mut writes = futures::stream::FuturesUnordered::new();
        let mut failed = None;
        loop {
            while writes.len() < RUNS_IN_FLIGHT {
                let Some((i, j)) = runs.pop_front() else { break };
                // The run is written straight from the blocks' cache slots.
                // Every queued block is staged (only `abandon` discards
                // staged blocks, and it holds `flushing`); were one not,
                // the run would end before it and go on after it.
                let mut slots = Vec::with_capacity(j - i);
                while i + slots.len() < j {
                    let b = blocks[i + slots.len()];
                    // SAFETY: `flushing` is held until this flush ends, and
                    // a block is cleaned below only once its run's write,
                    // which owns `slots`, has completed.
                    match unsafe { cache.dirty_bytes(b) } {
                        Some(bytes) => slots.push(bytes),
                        None => {
                            debug_assert!(false, "queued block {b} is not staged");
                            if i + slots.len() + 1 < j {
                                runs.push_front((i + slots.len() + 1, j));
                            }
                            break;
                        }
                    }
                }
                if !slots.is_empty() {
                    writes.push(write_run(backend, blocks[i], slots));
                }
            }
            let Some((start, len, r)) = writes.next().await else { break };
            match r {
                Ok(()) => {
                    for b in start..start + len as u64 {
                        cache.clean(b);
                    }
                    self.staged.fetch_sub(len, Ordering::AcqRel);
                }
                // Its blocks stay dirty: `Flight` queues them again.
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Give up staged blocks that no map points at (a write that could not
    /// map them), before they return to the allocator: waits for a running
    /// flush, which may be writing them, then drops them.
    pub async fn abandon(&self, cache: &DataCache, blocks: impl Iterator<Item = u64>) {
        let _flush = self.flushing.lock().await;
        let mut queue = self.queue.lock();
        for b in blocks {
            if cache.discard(b) {
                self.staged.fetch_sub(1, Ordering::AcqRel);
                if let Some(k) = queue.iter().position(|&q| q == b) {
                    queue.swap_remove(k);
                }
            }
        }
    }
}

/// The blocks one flush took from the queue. Whatever of them is still
/// dirty when it ends (a run that failed, or every run not yet written when
/// the flush's future was dropped) goes back to the queue, before the
/// flushing lock (dropped after this) lets a commit's flush look at it.
struct Flight<'a> {
    wb: &'a WriteBack,
    cache: &'a DataCache,
    blocks: Vec<u64>,
    _lock: tokio::sync::MutexGuard<'a, ()>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let back: Vec<u64> = self.blocks.iter().copied().filter(|&b| self.cache.is_dirty(b)).collect();
        if !back.is_empty() {
            self.wb.queue.lock().extend(back);
        }
    }
}

/// Write a run of staged blocks, from `start`, gathered from their cache
/// slots. The slots are borrowed until it returns.
async fn write_run<B: Backend>(backend: &B, start: u64, slots: Vec<&[u8]>) -> (u64, usize, io::Result<()>) {
    let r = backend.write_vectored_at(&slots, start * BS).await;
    (start, slots.len(), r)
}
