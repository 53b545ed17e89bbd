//! The map of one device: a copy-on-write radix tree of 4 KiB pages.
//!
//! A device's record holds the root entry and the depth. Each page holds 256
//! entries; leaf entries point at data blocks, interior entries at pages one
//! level down. Block `b` of a device is found by taking 8 bits of `b` per
//! level, most significant first: lookups cost `depth` page reads whatever
//! the number of snapshots, because every snapshot and clone has a whole
//! tree of its own that shares pages with its origin (dm-thin's model).
//!
//! Pages are never changed where a committed state can see them. A page is
//! changed in place only when it is *dirty*: created in the current
//! transaction by this device (it sits in `DevState::dirty`, has count 1 and
//! no committed state points at it). Any other page is first *shadowed*:
//! copied to a freshly allocated block. If the old page was shared (count >
//! 1), its children gain a parent (their counts go up); if it was this
//! device's alone, the copy takes over its children and the old block is
//! released at the next commit. Everything here runs under the device's
//! lock and never waits for I/O: a page that is not in memory is reported as
//! a [`Miss`] and the caller loads it and tries again.

use std::collections::HashMap;
use std::sync::Arc;

use crate::blockhash::BlockHash;
use crate::cache::PageCache;
use crate::error::{Error, Result};
use crate::format::{DeviceRecord, Entry, FANOUT, FANOUT_BITS, Page};
use crate::space::{Allocator, RefTable};
use parking_lot::Mutex;

/// A page that must be loaded from disk before the operation can go on.
#[derive(Debug)]
pub(crate) struct Miss(pub Entry);

/// Why a tree operation stopped.
pub(crate) enum Stop {
    Miss(Miss),
    Err(Error),
    /// A read-modify-write found the block changed since it was read.
    Raced,
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Err(e)
    }
}

/// The mutable state of a device, under its lock.
pub(crate) struct DevState {
    pub rec: DeviceRecord,
    /// Pages created in this transaction, not yet written.
    pub dirty: HashMap<u64, Box<Page>, BlockHash>,
    /// Set when the device was deleted while handles were open.
    pub deleted: bool,
}

/// What the tree operations need from the pool.
pub(crate) struct TreeCtx<'a> {
    pub cache: &'a PageCache,
    pub refs: &'a RefTable,
    pub alloc: &'a Mutex<Allocator>,
    /// Blocks taken for map pages, `next..end`: map pages of one commit
    /// land next to each other, so the commit writes them in long runs.
    pub meta_cursor: &'a Mutex<(u64, u64)>,
    pub dirty_pages: &'a std::sync::atomic::AtomicUsize,
    /// Blocks that can hold pages and data (for `NoSpace`; grows with the
    /// pool).
    pub usable_blocks: &'a std::sync::atomic::AtomicU64,
    /// Pages the caller loaded for this operation and holds, so a retry
    /// after a miss makes progress even if the cache evicted them again.
    pub held: &'a [Arc<Page>],
    pub held_at: &'a [u64],
}

impl TreeCtx<'_> {
    /// A clean page from the held set or the cache.
    fn clean(&self, phys: u64) -> Option<Arc<Page>> {
        self.with_clean(phys, Arc::clone)
    }

    /// [`TreeCtx::clean`], applied to `f` without taking a reference.
    fn with_clean<R>(&self, phys: u64, f: impl FnOnce(&Arc<Page>) -> R) -> Option<R> {
        match self.held_at.iter().position(|&b| b == phys) {
            Some(i) => Some(f(&self.held[i])),
            None => self.cache.with(phys, f),
        }
    }
}

/// Index of `block` in the page at `level` (1 = leaf).
fn index(block: u64, level: u8) -> usize {
    ((block >> (FANOUT_BITS * (level as u32 - 1))) & (FANOUT as u64 - 1)) as usize
}

/// Reference counts and the device's mapped count for a leaf entry that
/// went from `old` to `new`.
fn account(rec: &mut DeviceRecord, cx: &TreeCtx<'_>, old: Entry, new: Entry) {
    if old == new {
        return;
    }
    if new.is_mapped() {
        cx.refs.inc(new.phys);
        if !old.is_mapped() {
            rec.mapped += 1;
        }
    }
    if old.is_mapped() {
        cx.refs.dec(old.phys);
        if !new.is_mapped() {
            rec.mapped -= 1;
        }
    }
}

/// Blocks covered by one entry of a page at `level`.
fn span(level: u8) -> u64 {
    1u64 << (FANOUT_BITS * (level as u32 - 1))
}

impl DevState {
    /// Fill `out` with the leaf entries of blocks `first..first + out.len()`.
    pub fn lookup(&self, cx: &TreeCtx<'_>, first: u64, out: &mut [Entry]) -> Result<(), Miss> {
        let mut done = 0usize;
        while done < out.len() {
            let b = first + done as u64;
            let mut e = self.rec.root;
            let mut level = self.rec.depth;
            loop {
                if !e.is_mapped() {
                    // Everything under this entry is unmapped.
                    let covered = span(level + 1) - (b & (span(level + 1) - 1));
                    let n = (covered as usize).min(out.len() - done);
                    out[done..done + n].fill(Entry::ZERO);
                    done += n;
                    break;
                }
                if level == 1 {
                    let i = index(b, 1);
                    let n = (FANOUT - i).min(out.len() - done);
                    let dst = &mut out[done..done + n];
                    self.with_page(cx, e, |page| dst.copy_from_slice(&page[i..i + n]))?;
                    done += n;
                    break;
                }
                e = self.with_page(cx, e, |page| page[index(b, level)])?;
                level -= 1;
            }
        }
        Ok(())
    }

    /// Every clean page on the paths to blocks `first..first + n`, so a
    /// caller can hold them and then make a series of [`DevState::set`]s
    /// that cannot meet a miss (all of them under one lock: an atomic
    /// write).
    pub fn clean_path_pages(&self, cx: &TreeCtx<'_>, first: u64, n: usize) -> Result<Vec<(u64, Arc<Page>)>, Miss> {
        let mut out: Vec<(u64, Arc<Page>)> = Vec::new();
        for b in first..first + n as u64 {
            let mut e = self.rec.root;
            let mut level = self.rec.depth;
            while e.is_mapped() && level >= 1 {
                let next = match self.dirty.get(&e.phys) {
                    Some(p) => p[index(b, level)],
                    None => {
                        let p = cx.clean(e.phys).ok_or(Miss(e))?;
                        let next = p[index(b, level)];
                        if !out.iter().any(|(at, _)| *at == e.phys) {
                            out.push((e.phys, p));
                        }
                        next
                    }
                };
                if level == 1 {
                    break;
                }
                e = next;
                level -= 1;
            }
        }
        Ok(out)
    }

    /// Apply `f` to the page `e` points at, dirty or clean, without taking
    /// a reference to a cached one (the lookup path; see
    /// [`PageCache::with`]).
    fn with_page<R>(&self, cx: &TreeCtx<'_>, e: Entry, f: impl FnOnce(&Page) -> R) -> Result<R, Miss> {
        if let Some(p) = self.dirty.get(&e.phys) {
            return Ok(f(p));
        }
        cx.with_clean(e.phys, |p| f(p)).ok_or(Miss(e))
    }

    /// Point block `b` at `new`, shadowing the path as needed, and return
    /// the entry it replaced. Unmapping a block that is already unmapped
    /// (even one whose whole path is absent) changes nothing. With `expect`,
    /// the change is made only if the current entry equals it
    /// (read-modify-write), else `Ok(None)`.
    pub fn set(&mut self, cx: &TreeCtx<'_>, b: u64, new: Entry, expect: Option<Entry>) -> Result<Option<Entry>, Stop> {
        let depth = self.rec.depth;
        // Look first: this meets any miss before anything is changed.
        let mut cur = [Entry::ZERO; 1];
        self.lookup(cx, b, &mut cur).map_err(Stop::Miss)?;
        let old_leaf = cur[0];
        if expect.is_some_and(|x| x != old_leaf) {
            return Ok(None);
        }
        if old_leaf == new {
            return Ok(Some(old_leaf));
        }
        // Shadow from the root down.
        let mut root = self.rec.root;
        let mut phys = self.writable(cx, &mut root)?;
        self.rec.root = root;
        for level in (2..=depth).rev() {
            let i = index(b, level);
            let mut child = self.dirty[&phys][i];
            let child_phys = self.writable(cx, &mut child)?;
            self.dirty.get_mut(&phys).expect("dirty page")[i] = child;
            phys = child_phys;
        }
        let leaf = self.dirty.get_mut(&phys).expect("dirty leaf");
        let old = std::mem::replace(&mut leaf[index(b, 1)], new);
        account(&mut self.rec, cx, old, new);
        Ok(Some(old))
    }

    /// [`DevState::set`] without `expect` for blocks `first..first + n`,
    /// block `first + i` to `new(i)`, walking (and shadowing) the path to
    /// each leaf once: the first block of a leaf goes through `set`, the
    /// rest of that leaf's blocks are changed in place, the leaf being
    /// dirty now. On a stop (a page to load), `Err` says how many blocks
    /// were done before it.
    pub fn set_run(
        &mut self,
        cx: &TreeCtx<'_>,
        first: u64,
        n: usize,
        new: impl Fn(usize) -> Entry,
    ) -> Result<(), (usize, Stop)> {
        let mut i = 0;
        while i < n {
            let b = first + i as u64;
            self.set(cx, b, new(i), None).map_err(|s| (i, s))?;
            i += 1;
            if i == n || index(first + i as u64, 1) == 0 {
                continue; // no more blocks in this leaf
            }
            // `set` leaves the path dirty unless it changed nothing.
            let Some(leaf) = self.dirty_leaf(b) else { continue };
            let page = self.dirty.get_mut(&leaf).expect("dirty leaf");
            while i < n && index(first + i as u64, 1) != 0 {
                let e = new(i);
                let old = std::mem::replace(&mut page[index(first + i as u64, 1)], e);
                account(&mut self.rec, cx, old, e);
                i += 1;
            }
        }
        Ok(())
    }

    /// The block of the leaf holding block `b`, if every page on its path
    /// is dirty (changeable in place).
    fn dirty_leaf(&self, b: u64) -> Option<u64> {
        let root = self.rec.root;
        if !root.is_mapped() {
            return None;
        }
        let mut phys = root.phys;
        for level in (2..=self.rec.depth).rev() {
            let e = self.dirty.get(&phys)?[index(b, level)];
            if !e.is_mapped() {
                return None;
            }
            phys = e.phys;
        }
        self.dirty.contains_key(&phys).then_some(phys)
    }

    /// Make the page behind `e` dirty (changeable) and return its block:
    /// allocate it when absent, shadow it when clean.
    fn writable(&mut self, cx: &TreeCtx<'_>, e: &mut Entry) -> Result<u64, Stop> {
        if e.is_mapped() && self.dirty.contains_key(&e.phys) {
            return Ok(e.phys);
        }
        let page: Box<Page> = if e.is_mapped() {
            let clean = cx.clean(e.phys).ok_or(Stop::Miss(Miss(*e)))?;
            Box::new(*clean)
        } else {
            Box::new([Entry::ZERO; FANOUT])
        };
        let new = alloc_meta(cx)?;
        cx.refs.inc(new);
        if e.is_mapped() {
            // Atomically: shared pages keep their other owners and the copy
            // adds a reference to each child; a page that was ours alone
            // hands its children over to the copy.
            if cx.refs.dec(e.phys) > 0 {
                for c in page.iter().filter(|c| c.is_mapped()) {
                    cx.refs.inc(c.phys);
                }
            } else {
                cx.cache.remove(e.phys);
            }
        }
        self.dirty.insert(new, page);
        cx.dirty_pages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *e = Entry { phys: new, crc: 0 };
        Ok(new)
    }

    /// Grow the tree so it addresses `blocks` blocks.
    pub fn grow_depth(&mut self, cx: &TreeCtx<'_>, depth: u8) -> Result<()> {
        while self.rec.depth < depth {
            if self.rec.root.is_mapped() {
                let mut page = Box::new([Entry::ZERO; FANOUT]);
                page[0] = self.rec.root;
                let new = alloc_meta(cx)?;
                cx.refs.inc(new);
                self.dirty.insert(new, page);
                cx.dirty_pages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.rec.root = Entry { phys: new, crc: 0 };
            }
            self.rec.depth += 1;
        }
        Ok(())
    }
}

/// One block for a map page. Map pages may use the reserve that data writes
/// leave alone, so a full pool can still unmap and discard.
fn alloc_meta(cx: &TreeCtx<'_>) -> Result<u64> {
    let mut c = cx.meta_cursor.lock();
    if c.0 == c.1 {
        let mut a = cx.alloc.lock();
        let (s, n) = a.take(64, 0).ok_or_else(|| Error::NoSpace {
            free_blocks: a.free_blocks(),
            total_blocks: cx.usable_blocks.load(std::sync::atomic::Ordering::Relaxed),
        })?;
        *c = (s, s + n);
    }
    c.0 += 1;
    Ok(c.0 - 1)
}
