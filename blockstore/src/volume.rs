//! The data path: reads, writes, discards of one device.
//!
//! A write takes fresh blocks from the device's extent (one allocator lock
//! per extent, not per I/O), writes the data there, and only then points the
//! map at them under the device's lock: a crash can lose an unflushed write
//! but never exposes a block whose data did not land, and a checksum always
//! describes bytes that were written whole (copy-on-write; no block a
//! committed state can see is ever overwritten). Partial blocks are
//! read-modify-written with an optimistic check that nobody changed the
//! block in between.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;

use crate::backend::{AlignedBuf, BLOCK_SIZE, Backend};
use crate::error::{Error, Result};
use crate::format::{DeviceKind, Entry, crc, prefetch};
use crate::pool::{Device, Held, Inner, PIECE_BLOCKS};
use crate::scratch::{Arrays, Scratch};
use crate::tree::{DevState, Stop, TreeCtx};
use crate::writeback::MAX_STAGED_WRITE;

const BS: u64 = BLOCK_SIZE as u64;
/// Requests must be aligned to this many bytes.
pub const SECTOR: u64 = 512;

/// Ranges of at least this many bytes find their allocation by a walk of
/// the map's mapped subtrees rather than a lookup per block.
const WALK_ABOVE: u64 = 1 << 30;

/// A contiguous range with one allocation state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u64,
    /// True when the range holds data blocks; false for holes (read as
    /// zeros, take no space).
    pub allocated: bool,
}

/// An open volume or snapshot. Cheap to clone; every clone is the same
/// device.
pub struct Volume<B: Backend> {
    pub(crate) pool: Arc<Inner<B>>,
    pub(crate) dev: Arc<Device>,
    pub(crate) name: String,
}

impl<B: Backend> Clone for Volume<B> {
    fn clone(&self) -> Self {
        Volume { pool: self.pool.clone(), dev: self.dev.clone(), name: self.name.clone() }
    }
}

impl<B: Backend> std::fmt::Debug for Volume<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume").field("name", &self.name).field("id", &self.dev.id).finish()
    }
}

/// The next piece of an I/O that has `left` bytes to go at byte `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    /// `len` bytes at `within` inside block `block` (read-modify-write).
    Partial { block: u64, within: usize, len: usize },
    /// `blocks` whole blocks from `block` (at most one bounce buffer's worth).
    Whole { block: u64, blocks: usize },
}

impl Piece {
    fn at(off: u64, left: u64) -> Piece {
        let block = off / BS;
        let within = (off % BS) as usize;
        if within != 0 || left < BS {
            Piece::Partial { block, within, len: (BLOCK_SIZE - within).min(left as usize) }
        } else {
            Piece::Whole { block, blocks: (left / BS).min(PIECE_BLOCKS as u64) as usize }
        }
    }

    /// Bytes this piece covers.
    fn bytes(&self) -> usize {
        match *self {
            Piece::Partial { len, .. } => len,
            Piece::Whole { blocks, .. } => blocks * BLOCK_SIZE,
        }
    }
}

/// End of the run starting at `i`: blocks mapped to consecutive physical
/// blocks (one I/O), or unmapped blocks.
fn run_end(entries: &[Entry], i: usize) -> usize {
    let mapped = entries[i].is_mapped();
    let mut j = i + 1;
    while j < entries.len() && if mapped { entries[j].phys == entries[j - 1].phys + 1 } else { !entries[j].is_mapped() }
    {
        j += 1;
    }
    j
}

fn is_aligned(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(BLOCK_SIZE) && buf.len().is_multiple_of(BLOCK_SIZE)
}

impl<B: Backend> Volume<B> {
    /// Full name: `vol` or `vol@snap`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.dev.state.read().rec.size
    }

    /// True for snapshots.
    pub fn read_only(&self) -> bool {
        self.dev.kind == DeviceKind::Snapshot
    }

    /// Bytes of data blocks this device maps (shared ones included).
    pub fn allocated_bytes(&self) -> u64 {
        self.dev.state.read().rec.mapped * BS
    }

    fn check(&self, offset: u64, len: u64, write: bool) -> Result<()> {
        self.pool.check_failed()?;
        if write && self.read_only() {
            return Err(Error::ReadOnly(self.name.clone()));
        }
        let size = {
            let st = self.dev.state.read();
            if st.deleted {
                return Err(Error::NotFound(self.name.clone()));
            }
            st.rec.size
        };
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange { name: self.name.clone(), offset, len, size });
        }
        if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(Error::Invalid(format!(
                "I/O at {offset}+{len} on {} is not aligned to {SECTOR} bytes",
                self.name
            )));
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset`. Unwritten ranges read as zeros.
    /// A block that fails its checksum fails the read.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64, false)?;
        // A read that is not whole aligned blocks but fits one bounce buffer
        // (say 4 KiB at a 512-byte offset, which spans two blocks): map and
        // read every block it touches at once, then copy out, rather than
        // piece by piece (two map lookups and two I/Os one after the other).
        let bs = BLOCK_SIZE as u64;
        let first = offset / bs;
        let end = (offset + buf.len() as u64).div_ceil(bs);
        let unaligned = !offset.is_multiple_of(bs) || !(buf.len() as u64).is_multiple_of(bs) || !is_aligned(buf);
        if unaligned && !buf.is_empty() && end - first <= PIECE_BLOCKS as u64 {
            let n = (end - first) as usize;
            let mut tmp = self.pool.bounce();
            let r = self.read_blocks(first, n, &mut tmp[..n * BLOCK_SIZE]).await;
            if r.is_ok() {
                let at = (offset - first * bs) as usize;
                buf.copy_from_slice(&tmp[at..at + buf.len()]);
            }
            self.pool.bounce_back(tmp);
            return r;
        }
        let mut pos = 0usize;
        while pos < buf.len() {
            let piece = Piece::at(offset + pos as u64, (buf.len() - pos) as u64);
            let dst = &mut buf[pos..pos + piece.bytes()];
            match piece {
                Piece::Partial { block, within, len } => {
                    let mut tmp = self.pool.bounce();
                    let r = self.read_blocks(block, 1, &mut tmp[..BLOCK_SIZE]).await;
                    if r.is_ok() {
                        dst.copy_from_slice(&tmp[within..within + len]);
                    }
                    self.pool.bounce_back(tmp);
                    r?;
                }
                Piece::Whole { block, blocks } if is_aligned(dst) => self.read_blocks(block, blocks, dst).await?,
                Piece::Whole { block, blocks } => {
                    let mut tmp = self.pool.bounce();
                    let r = self.read_blocks(block, blocks, &mut tmp[..dst.len()]).await;
                    if r.is_ok() {
                        dst.copy_from_slice(&tmp[..dst.len()]);
                    }
                    self.pool.bounce_back(tmp);
                    r?;
                }
            }
            pos += piece.bytes();
        }
        Ok(())
    }

    /// Map `n` blocks from `first` into `out`, loading pages as needed.
    async fn map(&self, first: u64, out: &mut [Entry]) -> Result<()> {
        let mut held = Held::default();
        loop {
            let miss = {
                let st = self.dev.state.read();
                if st.deleted {
                    return Err(Error::NotFound(self.name.clone()));
                }
                match st.lookup(&self.pool.tree_cx_holding(&held), first, out) {
                    Ok(()) => return Ok(()),
                    Err(m) => m,
                }
            };
            self.pool.load_held(miss.0, &mut held).await?;
        }
    }

    /// Read whole blocks into an aligned buffer.
    async fn read_blocks(&self, first: u64, n: usize, dst: &mut [u8]) -> Result<()> {
        let _g = self.pool.grace.enter();
        let mut s = Scratch::take();
        let entries = &mut s.entries[..n];
        self.map(first, entries).await?;
        self.read_mapped(entries, dst).await
    }

    /// Read mapped blocks into `dst` (holes as zeros) and verify every
    /// block's checksum. Physically contiguous runs are one I/O each; a
    /// fragmented range issues all its runs at once. The common cases (one
    /// run, or runs and holes) allocate nothing; only a range split into
    /// several physical runs builds a set of futures.
    async fn read_mapped(&self, entries: &[Entry], dst: &mut [u8]) -> Result<()> {
        let n = entries.len();
        // Zero the holes, count the mapped runs and blocks, and remember the
        // first run.
        let mut count = 0;
        let mut mapped = 0u64;
        let mut first_run = (0, 0);
        let mut i = 0;
        while i < n {
            let j = run_end(entries, i);
            if entries[i].is_mapped() {
                if count == 0 {
                    first_run = (i, j);
                }
                count += 1;
                mapped += (j - i) as u64;
            } else {
                dst[i * BLOCK_SIZE..j * BLOCK_SIZE].fill(0);
            }
            i = j;
        }
        let cache = self.pool.data_cache.as_ref();
        if let Some(cache) = cache
            && count > 0
        {
            let hit = entries.iter().enumerate().all(|(k, e)| {
                !e.is_mapped() || cache.get(e.phys, e.crc, &mut dst[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE])
            });
            cache.record(hit, mapped);
            if hit {
                return Ok(());
            }
        }
        let backend = &self.pool.backend;
        match count {
            0 => {}
            1 => {
                let (s, e) = first_run;
                backend
                    .read_at(&mut dst[s * BLOCK_SIZE..e * BLOCK_SIZE], entries[s].phys * BS)
                    .await
                    .map_err(Error::io("reading data"))?;
            }
            _ => {
                let mut reads = futures::stream::FuturesUnordered::new();
                let mut rest = &mut dst[..];
                let mut at = 0usize;
                let mut s = 0;
                while s < n {
                    let e = run_end(entries, s);
                    if entries[s].is_mapped() {
                        let (_, tail) = std::mem::take(&mut rest).split_at_mut((s - at) * BLOCK_SIZE);
                        let (part, tail) = tail.split_at_mut((e - s) * BLOCK_SIZE);
                        rest = tail;
                        at = e;
                        reads.push(backend.read_at(part, entries[s].phys * BS));
                    }
                    s = e;
                }
                while let Some(r) = reads.next().await {
                    r.map_err(Error::io("reading data"))?;
                }
            }
        }
        // The blocks came from the disk, by DMA with O_DIRECT, so no CPU
        // cache holds them: each is asked for ahead of its CRC, whose loads
        // would otherwise stall one line at a time (see `crc_fresh`, which
        // cannot skip the holes here).
        if let Some(first) = entries.iter().position(|e| e.is_mapped()) {
            prefetch(&dst[first * BLOCK_SIZE..(first + 1) * BLOCK_SIZE]);
        }
        for (k, e) in entries.iter().enumerate() {
            if entries.get(k + 1).is_some_and(|e| e.is_mapped()) {
                prefetch(&dst[(k + 1) * BLOCK_SIZE..(k + 2) * BLOCK_SIZE]);
            }
            let block = &mut dst[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE];
            if e.is_mapped() && crc(block) != e.crc && !self.restaged(e, block).await? {
                return Err(Error::Corrupt { what: "data block", block: e.phys });
            }
        }
        // Verified, and the caller is inside a grace epoch: see
        // `datacache.rs` for why that makes the insert safe.
        if let Some(cache) = cache {
            for (k, e) in entries.iter().enumerate().filter(|(_, e)| e.is_mapped()) {
                cache.insert(e.phys, e.crc, &dst[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE]);
            }
        }
        Ok(())
    }

    /// A block read from the disk did not match its checksum: it may be a
    /// block staged by write-back and not written yet (a read that was only
    /// partly cached reads all its blocks from the disk), whose contents
    /// are in the cache; or one whose flush finished after the disk read,
    /// so a second read finds it. True if `block` now holds the right
    /// contents.
    async fn restaged(&self, e: &Entry, block: &mut [u8]) -> Result<bool> {
        let Some((_, cache)) = self.pool.staging() else { return Ok(false) };
        if cache.get(e.phys, e.crc, block) {
            return Ok(true);
        }
        let mut tmp = self.pool.bounce();
        let r = self.pool.backend.read_at(&mut tmp[..BLOCK_SIZE], e.phys * BS).await;
        let ok = r.is_ok() && crc(&tmp[..BLOCK_SIZE]) == e.crc;
        if ok {
            block.copy_from_slice(&tmp[..BLOCK_SIZE]);
        }
        self.pool.bounce_back(tmp);
        r.map_err(Error::io("reading data"))?;
        Ok(ok)
    }

    /// Write `data` at `offset`. With `fua`, the data is durable when this
    /// returns.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check(offset, data.len() as u64, true)?;
        let mut pos = 0usize;
        while pos < data.len() {
            let piece = Piece::at(offset + pos as u64, (data.len() - pos) as u64);
            let src = &data[pos..pos + piece.bytes()];
            match piece {
                Piece::Partial { block, within, len } => self.rmw(block, within, Some(src), len).await?,
                Piece::Whole { block, blocks } if is_aligned(src) => {
                    self.write_blocks(block, blocks, src, None, false).await?;
                }
                Piece::Whole { block, blocks } => {
                    let mut tmp = self.pool.bounce();
                    tmp[..src.len()].copy_from_slice(src);
                    let r = self.write_blocks(block, blocks, &tmp[..src.len()], None, false).await;
                    self.pool.bounce_back(tmp);
                    r?;
                }
            }
            pos += piece.bytes();
        }
        self.after_write(fua).await
    }

    async fn after_write(&self, fua: bool) -> Result<()> {
        if !fua && let Some((wb, cache)) = self.pool.staging() {
            // On error the blocks stay staged for the next flush; the
            // error goes to this write's caller, as the disk's would.
            wb.flush_if_due(&self.pool.backend, cache).await.map_err(Error::io("writing staged data"))?;
        }
        let limit = self.pool.opts.dirty_limit_bytes / BLOCK_SIZE;
        if fua || self.pool.dirty_pages.load(Ordering::Relaxed) > limit || self.pool.should_commit_for_space() {
            self.pool.flush().await?;
        }
        Ok(())
    }

    /// Read-modify-write one block: `data` (or zeros) at `within`.
    async fn rmw(&self, b: u64, within: usize, data: Option<&[u8]>, n: usize) -> Result<()> {
        let mut tmp = self.pool.bounce();
        let r = async {
            loop {
                let mut e = [Entry::ZERO; 1];
                {
                    let _g = self.pool.grace.enter();
                    self.map(b, &mut e).await?;
                    if data.is_none() && !e[0].is_mapped() {
                        return Ok(()); // zeroing a hole
                    }
                    self.read_mapped(&e, &mut tmp[..BLOCK_SIZE]).await?;
                }
                match data {
                    Some(d) => tmp[within..within + n].copy_from_slice(d),
                    None => tmp[within..within + n].fill(0),
                }
                if self.write_blocks(b, 1, &tmp[..BLOCK_SIZE], Some(e[0]), false).await? {
                    return Ok(());
                }
            }
        }
        .await;
        self.pool.bounce_back(tmp);
        r
    }

    /// Write whole, aligned blocks all or nothing: after a crash (or to any
    /// reader) either every block holds the new data or none does. The data
    /// goes to new blocks first, then every map entry changes under one hold
    /// of the device's lock, which a commit also takes, so no commit can
    /// capture half of it. At most [`Volume::ATOMIC_MAX`] bytes. (If the pool
    /// runs out of space for map pages midway, the write fails and the
    /// blocks already remapped keep their new data.)
    pub async fn write_atomic(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let bs = BLOCK_SIZE as u64;
        if !offset.is_multiple_of(bs) || !(data.len() as u64).is_multiple_of(bs) || data.len() > Self::ATOMIC_MAX {
            return Err(Error::Invalid(format!(
                "an atomic write must be whole {BLOCK_SIZE}-byte blocks, at most {} bytes",
                Self::ATOMIC_MAX
            )));
        }
        self.check(offset, data.len() as u64, true)?;
        if data.is_empty() {
            return Ok(());
        }
        let n = data.len() / BLOCK_SIZE;
        if is_aligned(data) {
            self.write_blocks(offset / bs, n, data, None, true).await?;
        } else {
            let mut tmp = self.pool.bounce();
            tmp[..data.len()].copy_from_slice(data);
            let r = self.write_blocks(offset / bs, n, &tmp[..data.len()], None, true).await;
            self.pool.bounce_back(tmp);
            r?;
        }
        self.after_write(fua).await
    }

    /// The largest [`Volume::write_atomic`].
    pub const ATOMIC_MAX: usize = PIECE_BLOCKS * BLOCK_SIZE;

    /// Write whole blocks from an aligned buffer to new blocks and map them.
    /// With `expect` (one block), map only if the block still maps to it;
    /// returns false when it did not. With `atomic`, every page on the
    /// blocks' paths is held before the first entry changes, so all of them
    /// change under one hold of the lock.
    async fn write_blocks(
        &self,
        first: u64,
        n: usize,
        src: &[u8],
        expect: Option<Entry>,
        atomic: bool,
    ) -> Result<bool> {
        let mut scratch = Scratch::take();
        let Arrays { crcs, extents, .. } = &mut *scratch;
        let checksums = |crcs: &mut [u32]| {
            for (c, blk) in crcs.iter_mut().zip(src.chunks_exact(BLOCK_SIZE)) {
                *c = crc(blk);
            }
        };
        // Staging needs the checksums first; a write too large to be staged
        // computes them while its data is on the way to the disk.
        let staging = self.pool.staging().filter(|_| n <= MAX_STAGED_WRITE);
        let stageable = staging.is_some();
        if stageable {
            checksums(&mut crcs[..]);
        }
        let mut count = 0;
        let mut got = 0u64;
        let mut reclaimed = false;
        let seen = self.pool.captures.load(Ordering::SeqCst);
        while got < n as u64 {
            match self.pool.take_data_blocks(&self.dev, n as u64 - got) {
                Some(x) => {
                    extents[count] = x;
                    count += 1;
                    got += x.1;
                }
                None if !reclaimed => {
                    reclaimed = true;
                    for &(s, l) in &extents[..count] {
                        self.pool.give_back(s, l);
                    }
                    count = 0;
                    got = 0;
                    self.pool.reclaim(seen).await?;
                }
                None => {
                    for &(s, l) in &extents[..count] {
                        self.pool.give_back(s, l);
                    }
                    return Err(self.pool.no_space());
                }
            }
        }
        let extents = &extents[..count];
        // Data first: staged in the data cache for write-back (which puts
        // the new contents over whatever the cache kept of these blocks'
        // earlier lives), or written now, every extent at once.
        let staged = staging.is_some_and(|(wb, cache)| wb.stage(cache, extents, src, &crcs[..n]));
        if !staged {
            // Whatever the data cache kept of these blocks' earlier lives
            // must be gone before the new contents can be mapped: the
            // inserts below, once the write is on disk, replace it (nobody
            // reads these blocks meanwhile: they are not mapped, and no
            // reader of their earlier lives is left, see `grace.rs`); a
            // failed write drops it.
            let write = async {
                if let [(s, _)] = extents {
                    self.pool.backend.write_at(src, s * BS).await
                } else {
                    let mut at = 0usize;
                    let mut writes = futures::stream::FuturesUnordered::new();
                    for &(s, l) in extents {
                        let len = l as usize * BLOCK_SIZE;
                        writes.push(self.pool.backend.write_at(&src[at..at + len], s * BS));
                        at += len;
                    }
                    let mut r = Ok(());
                    while let Some(x) = writes.next().await {
                        r = r.and(x);
                    }
                    r
                }
            };
            // Polled in this order, the write is submitted before the
            // checksums are computed.
            let (written, ()) = futures::join!(write, async {
                if !stageable {
                    checksums(&mut crcs[..]);
                }
            });
            if let Err(e) = written {
                for &(s, l) in extents {
                    if let Some(cache) = &self.pool.data_cache {
                        cache.invalidate(s, l);
                    }
                    self.pool.give_back(s, l);
                }
                return Err(Error::io("writing data")(e));
            }
            // The new contents are on disk and the blocks are still this
            // write's alone (not mapped yet, so nobody can free them): keep
            // them for readers, as a page cache would.
            if let Some(cache) = &self.pool.data_cache {
                let mut blocks = src.chunks_exact(BLOCK_SIZE).zip(crcs.iter());
                for &(s, l) in extents {
                    for (b, (data, &c)) in (s..s + l).zip(blocks.by_ref()) {
                        cache.insert_written(b, c, data);
                    }
                }
            }
        }
        // Then the map.
        let phys_of = |i: usize| {
            let mut i = i as u64;
            for &(s, l) in extents {
                if i < l {
                    return s + i;
                }
                i -= l;
            }
            unreachable!("block beyond its extents")
        };
        let _g = self.pool.grace.enter();
        let mut held = Held::default();
        let mut i = 0usize;
        while i < n {
            let stop = {
                let mut st = self.dev.state.write();
                let mut stop = None;
                if atomic && i == 0 {
                    let pins = st.clean_path_pages(&self.pool.tree_cx_holding(&held), first, n);
                    match pins {
                        Ok(pins) => pins.into_iter().for_each(|(at, p)| held.hold(at, p)),
                        Err(m) => stop = Some(Stop::Miss(m)),
                    }
                }
                let cx = self.pool.tree_cx_holding(&held);
                if stop.is_none() && expect.is_none() && !atomic && !st.deleted {
                    // A leaf's path walked once for all its blocks.
                    let from = i;
                    match st.set_run(&cx, first + from as u64, n - from, |k| Entry {
                        phys: phys_of(from + k),
                        crc: crcs[from + k],
                    }) {
                        Ok(()) => i = n,
                        Err((done, s)) => {
                            i = from + done;
                            stop = Some(s);
                        }
                    }
                }
                while stop.is_none() && i < n && !st.deleted {
                    let e = Entry { phys: phys_of(i), crc: crcs[i] };
                    match st.set(&cx, first + i as u64, e, expect) {
                        Ok(Some(_)) => i += 1,
                        Ok(None) => {
                            stop = Some(Stop::Raced);
                            break;
                        }
                        Err(s) => {
                            stop = Some(s);
                            break;
                        }
                    }
                }
                if st.deleted && i < n {
                    stop = Some(Stop::Err(Error::NotFound(self.name.clone())));
                }
                stop
            };
            match stop {
                None => {}
                Some(Stop::Miss(m)) => {
                    debug_assert!(!atomic || i == 0, "an atomic write met a miss after its first change");
                    if let Err(e) = self.pool.load_held(m.0, &mut held).await {
                        self.give_back_from(i, n, &phys_of, staged).await;
                        return Err(e);
                    }
                }
                Some(Stop::Raced) => {
                    self.give_back_from(i, n, &phys_of, staged).await;
                    return Ok(false);
                }
                Some(Stop::Err(e)) => {
                    self.give_back_from(i, n, &phys_of, staged).await;
                    return Err(e);
                }
            }
        }
        Ok(true)
    }

    /// Return blocks `i..n` of a write, which it could not map, to the
    /// allocator (abandoning them first if they were staged).
    async fn give_back_from(&self, i: usize, n: usize, phys_of: &(dyn Fn(usize) -> u64 + Sync), staged: bool) {
        if staged && let Some((wb, cache)) = self.pool.staging() {
            wb.abandon(cache, (i..n).map(phys_of)).await;
        }
        for k in i..n {
            self.pool.give_back(phys_of(k), 1);
        }
    }

    /// Copy `len` bytes from offset `src` to offset `dst` of this device,
    /// as `memmove` would (the ranges may overlap). Where both offsets sit
    /// at the same place within a block, the whole blocks are not copied
    /// but shared: the destination maps the source's blocks (their
    /// reference counts go up, so each side's later writes stay its own),
    /// in O(blocks) map updates, no data I/O and no new data space. Partial
    /// blocks, and ranges whose offsets differ within a block, are copied
    /// through a buffer. Durable on return when `fua`.
    pub async fn copy_within(&self, src: u64, dst: u64, len: u64, fua: bool) -> Result<()> {
        self.check(src, len, false)?;
        self.check(dst, len, true)?;
        if len == 0 || src == dst {
            return self.after_write(fua).await;
        }
        let backward = dst > src && dst < src + len;
        // Where both offsets sit at the same place within a block, the whole
        // blocks between the partial head and tail are shared; otherwise
        // the head is everything.
        let head = if src % BS == dst % BS { ((BS - src % BS) % BS).min(len) } else { len };
        let mid = (len - head) / BS * BS;
        let mut parts = [(0, head, false), (head, mid, true), (head + mid, len - head - mid, false)];
        if backward {
            parts.reverse();
        }
        for (at, n, share) in parts {
            if n == 0 {
                continue;
            }
            if share {
                self.share_blocks((src + at) / BS, (dst + at) / BS, n / BS, backward).await?;
            } else {
                self.copy_bytes(src + at, dst + at, n, backward).await?;
            }
        }
        self.after_write(fua).await
    }

    /// Copy through a buffer, a piece at a time, back to front when
    /// `backward` (an overlapping move to a higher offset).
    async fn copy_bytes(&self, src: u64, dst: u64, len: u64, backward: bool) -> Result<()> {
        let mut buf = self.pool.bounce();
        let step = buf.len() as u64;
        let r = async {
            let mut done = 0u64;
            while done < len {
                let n = step.min(len - done);
                let at = if backward { len - done - n } else { done };
                let b = &mut buf[..n as usize];
                self.read(src + at, b).await?;
                self.write(dst + at, b, false).await?;
                done += n;
            }
            Ok(())
        }
        .await;
        self.pool.bounce_back(buf);
        r
    }

    /// Map `n` blocks from `dst_first` to the blocks `src_first..` maps,
    /// one block at a time in the safe order for an overlapping move, each
    /// entry read right before it is copied and under the same hold of the
    /// device's lock, so the source still holds the block when its count
    /// goes up (a block whose count fell to zero is never revived).
    async fn share_blocks(&self, src_first: u64, dst_first: u64, n: u64, backward: bool) -> Result<()> {
        /// Blocks shared per hold of the lock (others get their turn).
        const BATCH: u64 = 256;
        let mut done = 0u64;
        while done < n {
            // A grace period (and the pages held under it) per batch, so a
            // long copy does not keep the blocks freed meanwhile from reuse.
            let grace = self.pool.grace.enter();
            let mut held = Held::default();
            let batch_end = (done + BATCH).min(n);
            self.change_map(&mut held, |st, cx| {
                while done < batch_end {
                    let k = if backward { n - 1 - done } else { done };
                    let mut e = [Entry::ZERO; 1];
                    if let Err(m) = st.lookup(cx, src_first + k, &mut e) {
                        return Some(Stop::Miss(m));
                    }
                    if let Err(s) = st.set(cx, dst_first + k, e[0], None) {
                        return Some(s);
                    }
                    done += 1;
                }
                None
            })
            .await?;
            drop(held);
            drop(grace);
            self.after_write(false).await?;
        }
        Ok(())
    }

    /// Read a range into the data cache (NBD_CMD_CACHE), up to what the
    /// cache holds, so that later reads of it need no disk I/O. Holes take
    /// no room. Without a data cache there is nothing to fill: it returns
    /// at once. A block that fails its checksum fails it, as a read would.
    pub async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len, false)?;
        let Some(cache) = &self.pool.data_cache else { return Ok(()) };
        let bs = BLOCK_SIZE as u64;
        let first = offset / bs;
        let end = (offset + len).div_ceil(bs).min(first + cache.capacity_blocks());
        let mut tmp = self.pool.bounce();
        let mut b = first;
        let mut r = Ok(());
        while b < end && r.is_ok() {
            let n = (end - b).min(PIECE_BLOCKS as u64) as usize;
            r = self.read_blocks(b, n, &mut tmp[..n * BLOCK_SIZE]).await;
            b += n as u64;
        }
        self.pool.bounce_back(tmp);
        r
    }

    /// Make every write acknowledged so far durable (the whole pool's).
    pub async fn flush(&self) -> Result<()> {
        self.pool.flush().await
    }

    /// Deallocate `len` bytes at `offset`: whole blocks are unmapped (their
    /// space returns to the pool unless a snapshot holds them), partial
    /// blocks are zeroed. The range reads as zeros afterwards.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, false).await
    }

    /// Make `len` bytes at `offset` read as zeros, deallocating whole blocks.
    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.zero_range(offset, len, fua).await
    }

    async fn zero_range(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check(offset, len, true)?;
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let piece = Piece::at(off, end - off);
            match piece {
                Piece::Partial { block, within, len } => self.rmw(block, within, None, len).await?,
                Piece::Whole { block, blocks } => self.unmap_blocks(block, blocks).await?,
            }
            off += piece.bytes() as u64;
        }
        self.after_write(fua).await
    }

    async fn unmap_blocks(&self, first: u64, n: usize) -> Result<()> {
        let _g = self.pool.grace.enter();
        let mut s = Scratch::take();
        let entries = &mut s.entries[..n];
        self.map(first, entries).await?;
        if !entries.iter().any(|e| e.is_mapped()) {
            return Ok(());
        }
        let mut held = Held::default();
        let mut i = 0;
        self.change_map(&mut held, |st, cx| {
            while i < n {
                if entries[i].is_mapped()
                    && let Err(s) = st.set(cx, first + i as u64, Entry::ZERO, None)
                {
                    return Some(s);
                }
                i += 1;
            }
            None
        })
        .await
    }

    /// Run `step` under the device's write lock until it reports nothing
    /// left to do (`None`), loading each map page it misses and holding it
    /// (in `held`) for the retry; `step` keeps its own progress. For changes
    /// that do not compare (no [`Stop::Raced`]).
    async fn change_map(
        &self,
        held: &mut Held,
        mut step: impl FnMut(&mut DevState, &TreeCtx<'_>) -> Option<Stop>,
    ) -> Result<()> {
        loop {
            let stop = {
                let mut st = self.dev.state.write();
                if st.deleted {
                    return Err(Error::NotFound(self.name.clone()));
                }
                step(&mut st, &self.pool.tree_cx_holding(held))
            };
            match stop {
                None => return Ok(()),
                Some(Stop::Miss(m)) => self.pool.load_held(m.0, held).await?,
                Some(Stop::Err(e)) => return Err(e),
                Some(Stop::Raced) => unreachable!("this map change does not compare"),
            }
        }
    }

    /// Allocation status of `len` bytes at `offset`, as extents in order
    /// (holes are unwritten or discarded ranges, which read as zeros).
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange { name: self.name.clone(), offset, len, size });
        }
        let mut out: Vec<Extent> = Vec::new();
        let end = offset + len;
        // A large range (a whole disk, for a backup or a copy): walk the
        // map's mapped subtrees instead of looking up every block, which
        // for a sparse 2 TiB volume meant 512 M lookups and seconds of a
        // runtime worker.
        if len >= WALK_ABOVE
            && let Some(mapped) = self.pool.mapped_ranges(&self.dev).await?
        {
            let mut at = offset;
            let mut push = |s: u64, e: u64, allocated: bool| {
                if s < e {
                    out.push(Extent { offset: s, length: e - s, allocated });
                }
            };
            for r in mapped.iter().filter(|r| r.end > offset && r.start < end) {
                let (s, e) = (r.start.max(offset), r.end.min(end));
                push(at, s, false);
                push(s, e, true);
                at = e;
            }
            push(at, end, false);
            return Ok(out);
        }
        let mut b = offset / BS;
        let mut scratch = Scratch::take();
        let _g = self.pool.grace.enter();
        while b * BS < end {
            let n = ((end.div_ceil(BS) - b) as usize).min(PIECE_BLOCKS);
            let entries = &mut scratch.entries[..n];
            self.map(b, entries).await?;
            for (k, e) in entries.iter().enumerate() {
                let s = ((b + k as u64) * BS).max(offset);
                let t = ((b + k as u64 + 1) * BS).min(end);
                let allocated = e.is_mapped();
                match out.last_mut() {
                    Some(x) if x.allocated == allocated => x.length = t - x.offset,
                    _ => out.push(Extent { offset: s, length: t - s, allocated }),
                }
            }
            b += n as u64;
        }
        Ok(out)
    }

    /// Byte ranges that differ between snapshot `snapshot` of this volume and
    /// this device now (a volume: its live state; found by comparing maps,
    /// not data).
    pub async fn changed_since(&self, snapshot: &str) -> Result<Vec<Range<u64>>> {
        let base = {
            let cat = self.pool.catalog.read();
            let vol_id = match self.dev.kind {
                DeviceKind::Volume => self.dev.id,
                DeviceKind::Snapshot => self.dev.parent,
            };
            cat.snapshot(vol_id, snapshot)
                .cloned()
                .ok_or_else(|| Error::NotFound(format!("snapshot {snapshot} of {}", self.name)))?
        };
        self.pool.diff(&base, &self.dev).await
    }
}

/// Used by tests to damage a data block behind the store's back.
impl<B: Backend> Volume<B> {
    /// The pool block holding byte `offset`, if mapped.
    pub async fn physical_block(&self, offset: u64) -> Result<Option<u64>> {
        let mut e = [Entry::ZERO; 1];
        self.map(offset / BS, &mut e).await?;
        Ok(e[0].is_mapped().then_some(e[0].phys))
    }
}

#[allow(dead_code)]
fn _assert_send<B: Backend>(v: &Volume<B>) {
    fn is_send<T: Send>(_: T) {}
    let mut buf = AlignedBuf::new(4096);
    is_send(v.read(0, &mut buf));
    is_send(v.write(0, &[], false));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_block_boundaries() {
        assert_eq!(Piece::at(512, 8192), Piece::Partial { block: 0, within: 512, len: 3584 });
        assert_eq!(Piece::at(4096, 1024), Piece::Partial { block: 1, within: 0, len: 1024 });
        assert_eq!(Piece::at(8192, 12288 + 512), Piece::Whole { block: 2, blocks: 3 });
        assert_eq!(Piece::at(0, 2 << 20), Piece::Whole { block: 0, blocks: PIECE_BLOCKS });
    }
}
