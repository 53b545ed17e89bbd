//! Walks over whole trees: change tracking (diff of two maps), the
//! consistency check, and the scrub.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::backend::{AlignedBuf, BLOCK_SIZE, Backend};
use crate::error::{Error, Result};
use crate::format::{Entry, FANOUT, FANOUT_BITS, crc_fresh};
use crate::pool::{Device, Inner, Pool};
use crate::tree::DevState;

const BS: u64 = BLOCK_SIZE as u64;

/// A pointer into a tree: `entry` refers to a page at `level` (0 = a data
/// block). A shallower tree compared with a deeper one is lifted: its root
/// acts as child 0 of virtual pages above it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Node {
    entry: Entry,
    level: u8,
}

impl<B: Backend> Inner<B> {
    /// The 256 children of `n` seen as a page at `at` level.
    async fn children(&self, dev: &Device, n: Node, at: u8) -> Result<[Node; FANOUT]> {
        let mut out = [Node { entry: Entry::ZERO, level: at - 1 }; FANOUT];
        if !n.entry.is_mapped() {
            return Ok(out);
        }
        if n.level < at {
            out[0] = n;
            return Ok(out);
        }
        let page = self.page_of(dev, n.entry).await?;
        for (o, e) in out.iter_mut().zip(page.iter()) {
            o.entry = *e;
        }
        Ok(out)
    }

    /// Block ranges where devices `a` and `b` map differently. Subtrees the
    /// two share (same page) are skipped without being read, so the cost is
    /// proportional to what changed, not to the size.
    ///
    /// The walk runs outside the device locks. A root taken while a page
    /// on its path is dirty carries that page's old checksum, and once a
    /// commit has written the page, reading it fails the check: a diff that
    /// fails so while commits ran is started again, and after
    /// [`DIFF_TRIES`] such tries takes both roots inside a commit, where
    /// every page is clean.
    pub async fn diff(&self, a: &Device, b: &Device) -> Result<Vec<Range<u64>>> {
        let _g = self.grace.enter();
        for _ in 0..DIFF_TRIES {
            let seen = self.captures.load(Ordering::SeqCst);
            // One lock at a time: holding `a`'s while waiting for `b`'s
            // could deadlock with a commit, which takes every device's lock
            // in catalog order (and parking_lot queues new readers behind a
            // waiting writer).
            let (ra, rb) = (root_of(a), root_of(b));
            match self.diff_from(a, b, ra, rb).await {
                Err(Error::Corrupt { .. }) if self.captures.load(Ordering::SeqCst) != seen => continue,
                r => return r,
            }
        }
        let (ra, rb) = self
            .commit_with(|l| {
                let mut root =
                    |d: &Device| l.state(d.id).map(|st| root_in(st)).ok_or_else(|| Error::NotFound(d.name.clone()));
                Ok((root(a)?, root(b)?))
            })
            .await?;
        self.diff_from(a, b, ra, rb).await
    }

    /// Byte ranges device `a` maps (holds data blocks for), found by
    /// walking its tree against an empty one: unmapped subtrees are skipped
    /// without being read, so the cost is proportional to what is
    /// allocated, not to the size. `None` for a tree too shallow to walk so.
    /// Roots are taken as [`Inner::diff`] takes them.
    pub(crate) async fn mapped_ranges(&self, a: &Device) -> Result<Option<Vec<Range<u64>>>> {
        let _g = self.grace.enter();
        let empty = |(r, size): (Node, u64)| (Node { entry: Entry::ZERO, level: r.level }, size);
        for _ in 0..DIFF_TRIES {
            let seen = self.captures.load(Ordering::SeqCst);
            let ra = root_of(a);
            if !ra.0.entry.is_mapped() {
                return Ok(Some(Vec::new()));
            }
            if ra.0.level == 0 {
                return Ok(None);
            }
            match self.diff_from(a, a, ra, empty(ra)).await {
                Err(Error::Corrupt { .. }) if self.captures.load(Ordering::SeqCst) != seen => continue,
                r => return r.map(Some),
            }
        }
        let ra = self
            .commit_with(|l| l.state(a.id).map(|st| root_in(st)).ok_or_else(|| Error::NotFound(a.name.clone())))
            .await?;
        if ra.0.level == 0 {
            return Ok(None);
        }
        self.diff_from(a, a, ra, empty(ra)).await.map(Some)
    }

    /// [`Inner::diff`] from roots taken (with sizes).
    async fn diff_from(
        &self,
        a: &Device,
        b: &Device,
        (ra, size_a): (Node, u64),
        (rb, size_b): (Node, u64),
    ) -> Result<Vec<Range<u64>>> {
        let size = size_a.max(size_b);
        let top = ra.level.max(rb.level);
        let mut blocks: Vec<Range<u64>> = Vec::new();
        let mut stack = vec![(top, ra, rb, 0u64)];
        while let Some((level, na, nb, base)) = stack.pop() {
            let ca = self.children(a, na, level).await?;
            let cb = self.children(b, nb, level).await?;
            let span = 1u64 << (FANOUT_BITS * (level as u32 - 1));
            // Push in reverse so ranges come out in order.
            for i in (0..FANOUT).rev() {
                let (x, y) = (ca[i], cb[i]);
                if x == y || (!x.entry.is_mapped() && !y.entry.is_mapped()) {
                    continue;
                }
                let start = base + i as u64 * span;
                if level == 1 {
                    match blocks.last_mut() {
                        Some(r) if r.start == start + 1 => r.start = start,
                        _ => blocks.push(start..start + 1),
                    }
                } else {
                    stack.push((level - 1, x, y, start));
                }
            }
            // Leaf levels push ranges in reverse order; normalise below.
        }
        blocks.sort_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::new();
        for r in blocks {
            let (s, e) = (r.start * BS, (r.end * BS).min(size));
            if s >= e {
                continue;
            }
            match out.last_mut() {
                Some(l) if l.end == s => l.end = e,
                _ => out.push(s..e),
            }
        }
        Ok(out)
    }
}

/// How often a diff restarts when commits overtake it before it takes its
/// roots inside a commit.
const DIFF_TRIES: usize = 3;

/// A device's root and size, under its lock alone.
fn root_of(d: &Device) -> (Node, u64) {
    root_in(&d.state.read())
}

/// The root and size in a device's state.
fn root_in(st: &DevState) -> (Node, u64) {
    (Node { entry: st.rec.root, level: st.rec.depth }, st.rec.size)
}

/// A problem found by [`Pool::check`].
pub type CheckReport = Vec<String>;

/// Damage found by [`Pool::scrub`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// Device that maps the damaged block (the first one met).
    pub device: String,
    /// Byte offset in that device (None for a map page).
    pub offset: Option<u64>,
    /// Pool block.
    pub block: u64,
    /// "data block" or "map page".
    pub what: &'static str,
}

/// What a scrub read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Distinct blocks read and verified.
    pub blocks_checked: u64,
    /// Blocks whose checksum failed.
    pub damage: Vec<Damage>,
}

impl<B: Backend> Pool<B> {
    /// Byte ranges that differ between two devices (`vol`, `vol@snap`):
    /// between two snapshots, or a snapshot and its volume now.
    pub async fn changed_ranges(&self, from: &str, to: &str) -> Result<Vec<Range<u64>>> {
        let (a, b) = {
            let cat = self.inner.catalog.read();
            (
                cat.find(from).cloned().ok_or_else(|| Error::NotFound(from.to_string()))?,
                cat.find(to).cloned().ok_or_else(|| Error::NotFound(to.to_string()))?,
            )
        };
        self.inner.diff(&a, &b).await
    }

    /// Verify the pool's invariants: every reachable page passes its
    /// checksum, every block's reference count equals the number of
    /// references found by walking all trees, no referenced block is free,
    /// and each device's mapped count is right. Commits first; call it with
    /// no I/O in flight. Returns the problems found (empty when sound).
    pub async fn check(&self) -> Result<CheckReport> {
        self.flush().await?;
        let inner = &self.inner;
        let cs = inner.commit.lock().await;
        let _g = inner.grace.enter();
        let devs: Vec<_> = inner.catalog.read().devices.values().cloned().collect();
        let mut found: HashMap<u64, u32> = HashMap::new();
        let mut seen_pages: HashSet<u64> = HashSet::new();
        let mut problems = Vec::new();
        for d in &devs {
            let (root, depth, mapped, name) = {
                let st = d.state.read();
                (st.rec.root, st.rec.depth, st.rec.mapped, st.rec.name.clone())
            };
            let mut leaves = 0u64;
            let mut stack = vec![(root, depth, true)];
            while let Some((e, level, counted)) = stack.pop() {
                if !e.is_mapped() {
                    continue;
                }
                if counted {
                    *found.entry(e.phys).or_default() += 1;
                }
                if level == 0 {
                    leaves += 1;
                    continue;
                }
                let page = match inner.load_page(e).await {
                    Ok(p) => p,
                    Err(err) => {
                        problems.push(format!("device {name}: {err}"));
                        continue;
                    }
                };
                // A shared page's children are referenced once, by the page.
                let first = seen_pages.insert(e.phys);
                for c in page.iter().filter(|c| c.is_mapped()) {
                    stack.push((*c, level - 1, first));
                }
            }
            if leaves != mapped {
                problems.push(format!("device {name}: record says {mapped} mapped blocks, tree has {leaves}"));
            }
        }
        // The extensions' metadata lies in the data area: nothing may point
        // at it, and the allocator must never hand it out.
        let meta: Vec<Range<u64>> = cs.sb.extension_metadata().collect();
        let alloc = inner.alloc.lock();
        for r in &meta {
            if let Some(b) = r.clone().find(|&b| alloc.is_free_block(b)) {
                problems.push(format!("block {b} holds an extension's metadata but the allocator holds it as free"));
            }
        }
        for (&b, &n) in &found {
            if !inner.refs.contains(b) {
                problems.push(format!("block {b} is referenced but outside the data area"));
                continue;
            }
            if meta.iter().any(|r| r.contains(&b)) {
                problems.push(format!("block {b} is referenced but holds an extension's metadata"));
            }
            if alloc.is_free_block(b) {
                problems.push(format!("block {b} is referenced but the allocator holds it as free"));
            }
            let c = inner.refs.get(b);
            if c != n {
                problems.push(format!("block {b}: count {c}, references found {n}"));
            }
        }
        drop(alloc);
        let referenced = inner.refs.referenced();
        if referenced != found.len() as u64 {
            problems
                .push(format!("{referenced} blocks have a count but {} are reachable (leaked blocks)", found.len()));
        }
        Ok(problems)
    }

    /// Read every block reachable from any device and verify its checksum.
    /// Shared blocks are read once.
    pub async fn scrub(&self) -> Result<ScrubReport> {
        let inner = &self.inner;
        let _g = inner.grace.enter();
        // Roots taken inside a commit: every page under them is clean (a
        // root taken outside could carry a dirty page's old checksum, which
        // a concurrent commit would make look like damage), every data block
        // under them is on disk (the commit writes what write-back staged
        // before its capture), and the grace period keeps them from reuse
        // until the scrub ends.
        let devs: Vec<(Arc<Device>, String, Entry, u8)> = inner
            .commit_with(|l| {
                let devs: Vec<Arc<Device>> = l.cat.devices.values().cloned().collect();
                Ok(devs
                    .into_iter()
                    .filter_map(|d| {
                        let name = l.cat.full_name(&d);
                        let st = l.state(d.id)?;
                        let (root, depth) = (st.rec.root, st.rec.depth);
                        Some((d, name, root, depth))
                    })
                    .collect())
            })
            .await?;
        let mut report = ScrubReport::default();
        let mut seen: HashSet<u64> = HashSet::new();
        let mut buf = AlignedBuf::new(BLOCK_SIZE);
        for (d, name, root, depth) in &devs {
            let (root, depth) = (*root, *depth);
            let mut stack = vec![(root, depth, 0u64)];
            while let Some((e, level, base)) = stack.pop() {
                if !e.is_mapped() || !seen.insert(e.phys) {
                    continue;
                }
                report.blocks_checked += 1;
                if level == 0 {
                    inner.backend.read_at(&mut buf, e.phys * BS).await.map_err(Error::io("scrubbing"))?;
                    if crc_fresh(&buf) != e.crc {
                        report.damage.push(Damage {
                            device: name.clone(),
                            offset: Some(base * BS),
                            block: e.phys,
                            what: "data block",
                        });
                    }
                    continue;
                }
                let page = match inner.page_of(d, e).await {
                    Ok(p) => p,
                    Err(Error::Corrupt { .. }) => {
                        report.damage.push(Damage {
                            device: name.clone(),
                            offset: None,
                            block: e.phys,
                            what: "map page",
                        });
                        continue;
                    }
                    Err(err) => return Err(err),
                };
                let span = 1u64 << (FANOUT_BITS * (level as u32 - 1));
                for (i, c) in page.iter().enumerate() {
                    stack.push((*c, level - 1, base + i as u64 * span));
                }
            }
        }
        Ok(report)
    }
}
