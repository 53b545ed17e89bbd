//! A pool: the superblocks, the catalog of devices, the reference counts and
//! the commit protocol that makes them durable together.
//!
//! # Commit protocol
//!
//! All changes accumulate in memory (dirty map pages, changed counts and
//! device records) while data blocks are written straight to freshly
//! allocated blocks. A commit (every `flush()`, every FUA write, every
//! catalog change, and whenever dirty pages exceed their budget):
//!
//! 1. *Capture*, under the catalog lock and every device's lock (memory
//!    only, no I/O): dirty map pages are checksummed bottom-up (a parent
//!    stores its child's CRC32C), encoded and moved to the page cache as
//!    clean, pinned pages; changed refcount pages and catalog pages are
//!    encoded with generation `N` for the copy that does *not* hold their
//!    newest committed version; blocks whose count fell to zero are taken.
//! 2. Write all of that (data blocks were already written before their map
//!    entries changed), then `sync`.
//! 3. Write superblock copy `N % 2` with generation `N`, then `sync`. This
//!    single-block write is the commit point.
//! 4. Unpin the pages, note which copies are now current, and hand the
//!    freed blocks to the grace-period queue (they become allocatable when
//!    no reader can still be using them).
//!
//! A crash before step 3 completes leaves superblock `N-1` and, for every
//! page, a valid copy of generation `<= N-1`; nothing that state points at
//! was overwritten, because only blocks free in it were written. On open,
//! region copies newer than the superblock are erased before anything else
//! is written, so a later commit cannot mistake them for current.
//!
//! # Growing
//!
//! [`Pool::grow`] takes in the space of a device that got longer, online:
//! it lays out an extension (`format::Extension`), writes its counts, and
//! makes it part of the pool with one commit, whose superblock is the commit
//! point of the growth too. The geometry that grows lives in the commit
//! state, under the commit lock; the data path sees only the reference
//! table (chunks set once, never moved), the allocator (grown under its own
//! lock) and two atomics.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use parking_lot::{Mutex, RwLock};

use crate::backend::{AlignedBuf, BLOCK_SIZE, Backend};
use crate::cache::PageCache;
use crate::datacache::DataCache;
use crate::error::{Error, Result};
use crate::format::{
    CATALOG_MAGIC, COUNTS_PER_PAGE, DeviceKind, DeviceRecord, Entry, FANOUT, Growth, MAX_NAME, Page, RECORD_SIZE,
    RECORDS_PER_PAGE, REFCOUNT_MAGIC, REGION_HEADER, Superblock, crc, crc_fresh, decode_page, depth_for, encode_page,
    le32, open_region_page, seal_region_page, set_slot_bit, slot_bit,
};
use crate::grace::Grace;
use crate::space::{Allocator, RefTable};
use crate::tree::{DevState, TreeCtx};
use crate::writeback::WriteBack;

const BS: u64 = BLOCK_SIZE as u64;

/// Tunables of an open pool.
#[derive(Clone, Debug)]
pub struct PoolOptions {
    /// Bytes of clean map pages kept in memory.
    pub cache_bytes: usize,
    /// Bytes of verified data blocks kept in memory for reads (0: none).
    /// Shared by every device that maps a block; see `datacache.rs`.
    pub data_cache_bytes: usize,
    /// Bytes of written data that may wait in the data cache for the disk
    /// (0: every write goes to the disk before it is acknowledged). Needs
    /// a data cache, and is capped at a quarter of it; see `writeback.rs`.
    pub write_back_bytes: usize,
    /// Bytes of dirty map pages allowed before a write forces a commit.
    pub dirty_limit_bytes: usize,
    /// Catalog pages per copy when creating a pool (31 devices each).
    pub catalog_pages: u64,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            cache_bytes: 64 << 20,
            data_cache_bytes: 0,
            write_back_bytes: 0,
            dirty_limit_bytes: 32 << 20,
            catalog_pages: 128,
        }
    }
}

/// What opening a pool found and repaired.
#[derive(Clone, Debug, Default)]
pub struct OpenReport {
    /// Generation of the commit the pool opened at.
    pub generation: u64,
    /// Set when the newest superblock copy was unusable (a torn write at
    /// the moment of a crash) and the older one was used.
    pub superblock_fallback: Option<String>,
}

/// What [`Pool::grow`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrowReport {
    /// Bytes the backend holds now (re-read by the growth).
    pub device_bytes: u64,
    /// Bytes of the device the pool used before: its end.
    pub old_bytes: u64,
    /// Bytes of the device the pool uses now (`old_bytes` when nothing
    /// changed; less than `device_bytes` when the growth would have been
    /// too small or the pool reached the largest size a pool may have).
    pub new_bytes: u64,
    /// Bytes the pool gained for data: [`crate::PoolStats::total_bytes`]
    /// grew by this much. The rest of the growth holds the counts of the new
    /// blocks (about 0.2 %, see [`crate::format::Extension`]).
    pub added_data_bytes: u64,
    /// Why nothing changed, when nothing did.
    pub unchanged: Option<String>,
}

impl GrowReport {
    /// True when the pool grew.
    pub fn grew(&self) -> bool {
        self.new_bytes > self.old_bytes
    }
}

/// A device (volume or snapshot).
pub(crate) struct Device {
    pub id: u64,
    pub record: u32,
    pub kind: DeviceKind,
    pub name: String,
    pub parent: u64,
    pub state: RwLock<DevState>,
    /// Blocks taken from the allocator for this device's data writes:
    /// `next..end`.
    pub cursor: Mutex<(u64, u64)>,
}

pub(crate) struct Catalog {
    pub devices: BTreeMap<u64, Arc<Device>>,
    pub next_id: u64,
    pub free_records: BTreeSet<u32>,
}

impl Catalog {
    /// The volume called `name`.
    pub fn volume(&self, name: &str) -> Option<&Arc<Device>> {
        self.devices.values().find(|d| d.kind == DeviceKind::Volume && d.name == name)
    }

    /// Snapshot `snap` of volume `vol`.
    pub fn snapshot(&self, vol: u64, snap: &str) -> Option<&Arc<Device>> {
        self.devices.values().find(|d| d.kind == DeviceKind::Snapshot && d.parent == vol && d.name == snap)
    }

    /// A device by full name: `vol` or `vol@snap`.
    pub fn find(&self, full: &str) -> Option<&Arc<Device>> {
        match full.split_once('@') {
            None => self.volume(full),
            Some((v, s)) => self.snapshot(self.volume(v)?.id, s),
        }
    }

    /// Full name of a device: `vol` or `vol@snap`.
    pub fn full_name(&self, d: &Device) -> String {
        match d.kind {
            DeviceKind::Volume => d.name.clone(),
            DeviceKind::Snapshot => match self.devices.get(&d.parent) {
                Some(v) => format!("{}@{}", v.name, d.name),
                None => format!("?@{}", d.name),
            },
        }
    }
}

pub(crate) struct CatPage {
    bytes: Box<[u8]>,
    slot: u8,
}

pub(crate) struct CommitState {
    pub generation: u64,
    /// The layout the next commit's superblock describes: the pool's
    /// geometry, extensions included (generation, next device id and slot
    /// map checksum are filled in by each capture). Commits and growths
    /// both hold the commit lock, so this is where the geometry that grows
    /// lives; the I/O path needs only the atomics in [`Inner`].
    pub sb: Superblock,
    catalog: Vec<CatPage>,
    limbo: VecDeque<(u64, Vec<u64>)>,
}

pub(crate) struct Inner<B> {
    pub backend: B,
    /// Blocks of the data area that can hold map pages and data
    /// ([`Superblock::usable_blocks`]; grows with the pool).
    pub usable_blocks: AtomicU64,
    /// Blocks kept back for map pages ([`Superblock::meta_reserve`]).
    pub meta_reserve: AtomicU64,
    pub catalog: RwLock<Catalog>,
    pub refs: RefTable,
    pub alloc: Mutex<Allocator>,
    pub meta_cursor: Mutex<(u64, u64)>,
    pub cache: PageCache,
    pub data_cache: Option<DataCache>,
    /// Only with a data cache, whose dirty entries hold the staged blocks.
    pub writeback: Option<WriteBack>,
    pub grace: Grace,
    pub commit: tokio::sync::Mutex<CommitState>,
    /// Captures begun; a flush that sees this move past its start knows a
    /// commit covering its writes has finished.
    pub captures: AtomicU64,
    pub dirty_pages: AtomicUsize,
    pub failed: AtomicBool,
    /// Set by `Pool::close` before its last commit: a committer that gets
    /// the commit lock after that commits no more.
    closed: AtomicBool,
    pub opts: PoolOptions,
    bounce: Mutex<Vec<AlignedBuf>>,
}

/// A pool of thin volumes, snapshots and clones on one backend.
pub struct Pool<B: Backend> {
    pub(crate) inner: Arc<Inner<B>>,
}

impl<B: Backend> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Pool { inner: self.inner.clone() }
    }
}

/// Pages an operation loaded and keeps until it is done (see
/// [`TreeCtx`]).
#[derive(Default)]
pub(crate) struct Held {
    at: Vec<u64>,
    pages: Vec<Arc<Page>>,
}

impl Held {
    /// Hold `page` (block `at`) too, unless it is held already.
    pub fn hold(&mut self, at: u64, page: Arc<Page>) {
        if !self.at.contains(&at) {
            self.at.push(at);
            self.pages.push(page);
        }
    }
}

/// Size of a bounce buffer: the largest piece the data path handles at once.
pub(crate) const PIECE_BLOCKS: usize = FANOUT;

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Check a volume or snapshot name.
pub(crate) fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(Error::Invalid(format!("name {name:?} must be 1 to {MAX_NAME} bytes")));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) || name.starts_with('.') {
        return Err(Error::Invalid(format!(
            "name {name:?} may only hold letters, digits, '-', '_', '.' and ':' and must not start with '.'"
        )));
    }
    Ok(())
}

impl<B: Backend> Pool<B> {
    /// Format `backend` as an empty pool (everything on it is lost).
    pub async fn create(backend: B, opts: PoolOptions) -> Result<Pool<B>> {
        let total = backend.len() / BS;
        let mut uuid = [0u8; 16];
        let seed = now() ^ (std::process::id() as u64) << 32 ^ total;
        uuid[..8].copy_from_slice(&seed.to_le_bytes());
        uuid[8..].copy_from_slice(&crc(&seed.to_le_bytes()).to_le_bytes().repeat(2));
        let sb = Superblock::layout(total, opts.catalog_pages.max(1), uuid)?;
        // Copy 0 of every region page valid and empty at generation 0; the
        // slot map (all zeros) says copy 0 is current, so whatever an
        // earlier pool left in the copy-1 slots is never read.
        write_region(&backend, CATALOG_MAGIC, 0, sb.catalog_start, sb.catalog_pages).await?;
        write_region(&backend, REFCOUNT_MAGIC, 0, sb.refcount_start, sb.refcount_pages).await?;
        let map = AlignedBuf::new(sb.slot_map_blocks as usize * BLOCK_SIZE);
        let mut sb = sb;
        sb.slot_map_crc = crc(&map);
        backend.write_at(&map, sb.slot_map_block(0) * BS).await.map_err(Error::io("writing the slot map"))?;
        let mut b = AlignedBuf::new(2 * BLOCK_SIZE);
        sb.encode(&mut b[..BLOCK_SIZE]);
        backend.write_at(&b, 0).await.map_err(Error::io("writing the superblocks"))?;
        backend.sync().await.map_err(Error::io("syncing a new pool"))?;
        Ok(Pool::open(backend, opts).await?.0)
    }

    /// Open an existing pool, recovering from an interrupted commit.
    pub async fn open(backend: B, opts: PoolOptions) -> Result<(Pool<B>, OpenReport)> {
        let mut report = OpenReport::default();
        let mut b = AlignedBuf::new(2 * BLOCK_SIZE);
        backend.read_at(&mut b, 0).await.map_err(Error::io("reading the superblocks"))?;
        // A copy is usable when its header and the slot map that goes with
        // it both pass their checksums.
        let mut copies: Vec<Result<(Superblock, AlignedBuf), String>> = Vec::new();
        for k in 0..2u8 {
            let header = &b[k as usize * BLOCK_SIZE..(k as usize + 1) * BLOCK_SIZE];
            copies.push(match Superblock::decode(header) {
                Err(e) => Err(e),
                Ok(sb) if sb.total_blocks > backend.len() / BS => {
                    Err(format!("the pool needs {} bytes but the device has {}", sb.total_blocks * BS, backend.len()))
                }
                Ok(sb) => {
                    let mut map = AlignedBuf::new(sb.slot_map_blocks as usize * BLOCK_SIZE);
                    backend
                        .read_at(&mut map, sb.slot_map_block(k) * BS)
                        .await
                        .map_err(Error::io("reading the slot map"))?;
                    if crc(&map) == sb.slot_map_crc {
                        Ok((sb, map))
                    } else {
                        Err(format!("slot map copy {k} fails its checksum"))
                    }
                }
            });
        }
        let [c0, c1]: [_; 2] = copies.try_into().map_err(|_| Error::Format("superblock copies".into()))?;
        let (sb, slot_map) = match (c0, c1) {
            (Ok(a), Ok(c)) => {
                if a.0.generation >= c.0.generation {
                    a
                } else {
                    c
                }
            }
            (Ok(a), Err(e)) | (Err(e), Ok(a)) => {
                // The other copy is normal on a pool that never committed
                // past generation 0; otherwise it is a torn commit.
                if a.0.generation > 0 {
                    tracing::warn!("one superblock copy is unusable ({e}); opened generation {}", a.0.generation);
                    report.superblock_fallback = Some(e.clone());
                }
                a
            }
            (Err(e0), Err(e1)) => {
                return Err(Error::Format(format!("both superblock copies are unusable: copy 0: {e0}; copy 1: {e1}")));
            }
        };
        report.generation = sb.generation;

        // Catalog pages.
        let cat_pages =
            read_region(&backend, &sb, &slot_map, (0, 0), CATALOG_MAGIC, sb.catalog_start, sb.catalog_pages).await?;
        // Refcount pages: the first region's, then each extension's.
        let refs = RefTable::new(sb.data_start, sb.data_blocks(), sb.all_refcount_pages());
        let mut rc_pages = Vec::with_capacity(sb.all_refcount_pages() as usize);
        for (first, start, pages) in sb.refcount_regions() {
            let bit = sb.catalog_pages + first;
            rc_pages.extend(read_region(&backend, &sb, &slot_map, (bit, first), REFCOUNT_MAGIC, start, pages).await?);
        }
        // Blocks with no reference are free, but for the extensions' own
        // metadata, which lies in the data area and is never allocated.
        let mut alloc = Allocator::new(sb.data_start, sb.data_blocks());
        let mut meta = sb.extension_metadata().peekable();
        for (i, (bytes, slot)) in rc_pages.into_iter().enumerate() {
            let mut p = refs.page(i).lock();
            p.slot = slot;
            for (k, c) in bytes[REGION_HEADER..].chunks_exact(4).enumerate() {
                p.counts[k] = le32(c);
                let block = i as u64 * COUNTS_PER_PAGE as u64 + k as u64;
                if block >= sb.data_blocks() {
                    continue;
                }
                let b = sb.data_start + block;
                while meta.peek().is_some_and(|r| r.end <= b) {
                    meta.next();
                }
                let is_meta = meta.peek().is_some_and(|r| r.contains(&b));
                if is_meta && p.counts[k] != 0 {
                    return Err(Error::Format(format!(
                        "refcount page {i} counts references to block {b}, which holds the metadata of an \
                         extension of the pool"
                    )));
                }
                if p.counts[k] == 0 && !is_meta {
                    alloc.release(b, 1);
                }
            }
        }
        drop(meta);
        refs.recount();

        let mut catalog =
            Catalog { devices: BTreeMap::new(), next_id: sb.next_device_id, free_records: BTreeSet::new() };
        let mut cat_state = Vec::new();
        for (pi, (bytes, slot)) in cat_pages.into_iter().enumerate() {
            for r in 0..RECORDS_PER_PAGE {
                let idx = (pi * RECORDS_PER_PAGE + r) as u32;
                let at = REGION_HEADER + r * RECORD_SIZE;
                match DeviceRecord::decode(&bytes[at..at + RECORD_SIZE]).map_err(Error::Format)? {
                    None => {
                        catalog.free_records.insert(idx);
                    }
                    Some(rec) => {
                        if rec.root.is_mapped() && !refs.contains(rec.root.phys) {
                            return Err(Error::Format(format!("device {} points outside the data area", rec.name)));
                        }
                        catalog.next_id = catalog.next_id.max(rec.id + 1);
                        catalog.devices.insert(rec.id, Arc::new(Device::new(rec, idx)));
                    }
                }
            }
            cat_state.push(CatPage { bytes: bytes[REGION_HEADER..].into(), slot });
        }
        let data_cache = DataCache::new(opts.data_cache_bytes);
        let writeback = data_cache.as_ref().and_then(|c| WriteBack::new(opts.write_back_bytes, c.capacity_blocks()));
        let inner = Inner {
            usable_blocks: AtomicU64::new(sb.usable_blocks()),
            meta_reserve: AtomicU64::new(sb.meta_reserve),
            catalog: RwLock::new(catalog),
            refs,
            alloc: Mutex::new(alloc),
            meta_cursor: Mutex::new((0, 0)),
            cache: PageCache::new(opts.cache_bytes / BLOCK_SIZE),
            data_cache,
            writeback,
            grace: Grace::default(),
            commit: tokio::sync::Mutex::new(CommitState {
                generation: sb.generation,
                sb,
                catalog: cat_state,
                limbo: VecDeque::new(),
            }),
            captures: AtomicU64::new(0),
            dirty_pages: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            opts,
            bounce: Mutex::new(Vec::new()),
            backend,
        };
        Ok((Pool { inner: Arc::new(inner) }, report))
    }

    /// The backend (for tests that inspect or damage it).
    pub fn backend(&self) -> &B {
        &self.inner.backend
    }

    /// Make every write acknowledged so far durable.
    pub async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    /// Whether a commit would make anything durable: changed map pages,
    /// blocks staged by write-back, or blocks freed since the last commit.
    pub fn has_uncommitted(&self) -> bool {
        let inner = &self.inner;
        inner.dirty_pages.load(Ordering::Relaxed) > 0
            || inner.writeback.as_ref().is_some_and(|w| w.staged() > 0)
            || inner.refs.pending() > 0
    }

    /// Commit every `period` while there is something to commit, so that
    /// writes no client flushed reach the disk within about `period`, as
    /// dm-thin commits its metadata every second. Without it they wait for
    /// the next flush, FUA write or catalog change, and a killed process
    /// loses every write since. The future holds no handle between
    /// commits: it ends once the pool's other handles are gone, once
    /// [`Pool::close`] has begun (no commit follows close's), or after a
    /// commit fails (the pool then refuses commits). The caller spawns it.
    pub fn committer(&self, period: Duration) -> impl Future<Output = ()> + Send + 'static {
        let pool = Arc::downgrade(&self.inner);
        async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(inner) = pool.upgrade() else { return };
                let pool = Pool { inner };
                if pool.inner.closed.load(Ordering::SeqCst) {
                    return;
                }
                if !pool.has_uncommitted() {
                    continue;
                }
                let inner = &pool.inner;
                let mut cs = inner.commit.lock().await;
                // Checked under the commit lock, which `close` takes after
                // setting the flag: no commit follows close's own.
                if inner.closed.load(Ordering::SeqCst) {
                    return;
                }
                if !pool.has_uncommitted() {
                    continue;
                }
                if let Err(e) = inner.commit_locked(&mut cs, |_| Ok(())).await {
                    tracing::error!("periodic commit failed, no more will be tried: {e}");
                    return;
                }
            }
        }
    }

    /// Bytes of written data that may wait for the disk (write-back), as
    /// built: 0 without a data cache or with `write_back_bytes` 0.
    pub fn write_back_bytes(&self) -> u64 {
        self.inner.writeback.as_ref().map_or(0, |w| (w.limit() * BLOCK_SIZE) as u64)
    }

    /// Take in the space a grown device gained, online: volumes stay open
    /// and I/O goes on. Re-reads the backend's size
    /// ([`Backend::refresh_len`]; for a block device, after `lvextend` or
    /// `losetup -c`) and, when it exceeds the pool's end by enough for data
    /// (at least [`crate::format::MIN_GROWTH_BLOCKS`] blocks once the new
    /// counts are placed), adds it and commits the new layout before it
    /// returns: the space is durable and [`Pool::stats`] shows it at once. A
    /// device that did not grow, or grew too little, leaves the pool as it
    /// was and says why in the report. Can be called any number of times;
    /// each growth that needs new counts takes one of the superblock's
    /// [`crate::format::MAX_EXTENSIONS`] extension entries (growths within
    /// the reach of the last entry's counts take none).
    ///
    /// Errors: [`Error::Refused`] when the device is now smaller than the
    /// pool (a pool cannot shrink; nothing is changed) or the extension
    /// table is full; [`Error::Io`] when the size cannot be read or the
    /// commit fails (the pool then refuses commits until it is reopened, as
    /// after any failed commit).
    ///
    /// Crash safety: the new refcount pages (copy 0, zero counts) are
    /// written before the commit's first sync, and the superblock that
    /// first describes the extension after it (the commit point). The new
    /// blocks go to the allocator only once that commit is durable, so
    /// nothing uses them before then. A crash at any point reopens the pool
    /// at its old size or its new one, with everything committed. A second
    /// commit then writes the other superblock copy too, so that neither
    /// copy still describes the old layout, and a build that reads only
    /// version 1 refuses the pool rather than falling back to that copy and
    /// opening it at its old size.
    pub async fn grow(&self) -> Result<GrowReport> {
        let inner = &self.inner;
        inner.check_failed()?;
        let mut cs = inner.commit.lock().await;
        inner.check_failed()?;
        let device_bytes = inner.backend.refresh_len().map_err(Error::io("re-reading the size of the pool device"))?;
        let old = cs.sb.clone();
        let mut report = GrowReport {
            device_bytes,
            old_bytes: old.total_blocks * BS,
            new_bytes: old.total_blocks * BS,
            ..GrowReport::default()
        };
        let next = match old.grow_to(device_bytes / BS).map_err(Error::Refused)? {
            Growth::Unchanged(why) => {
                report.unchanged = Some(why);
                return Ok(report);
            }
            Growth::Grown(next) => next,
        };
        // A new extension's counts: copy 0 of each page, current (the slot
        // map's bits for them are 0) and valid from the commit below on.
        // They lie beyond the pool's end until its superblock is durable,
        // and its first sync comes after these writes. A failure here
        // changes nothing.
        let new_ext = next.extensions.last().filter(|_| next.extensions.len() > old.extensions.len());
        if let Some(ext) = new_ext {
            let generation = cs.generation + 1;
            write_region(&inner.backend, REFCOUNT_MAGIC, generation, ext.refcount_start(), ext.refcount_pages).await?;
        }
        inner.refs.grow(next.data_blocks(), next.all_refcount_pages());
        cs.sb = next.clone();
        inner.commit_locked(&mut cs, |_| Ok(())).await?;

        // Durable: the new blocks may be used.
        {
            let mut a = inner.alloc.lock();
            a.grow(next.data_blocks());
            let mut at = old.total_blocks;
            for meta in next.extension_metadata().filter(|r| r.end > old.total_blocks) {
                if meta.start > at {
                    a.release(at, meta.start - at);
                }
                at = at.max(meta.end);
            }
            if next.total_blocks > at {
                a.release(at, next.total_blocks - at);
            }
        }
        inner.meta_reserve.store(next.meta_reserve, Ordering::Relaxed);
        inner.usable_blocks.store(next.usable_blocks(), Ordering::Relaxed);
        report.new_bytes = next.total_blocks * BS;
        report.added_data_bytes = (next.usable_blocks() - old.usable_blocks()) * BS;
        tracing::info!(
            "pool grew from {} to {} bytes ({} bytes more for data)",
            report.old_bytes,
            report.new_bytes,
            report.added_data_bytes
        );
        inner.commit_locked(&mut cs, |_| Ok(())).await?;
        Ok(report)
    }

    /// Commit and stop using the pool.
    pub async fn close(self) -> Result<()> {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.flush().await
    }
}

impl Device {
    pub fn new(rec: DeviceRecord, record: u32) -> Device {
        Device {
            id: rec.id,
            record,
            kind: rec.kind,
            name: rec.name.clone(),
            parent: rec.parent,
            state: RwLock::new(DevState { rec, dirty: Default::default(), deleted: false }),
            cursor: Mutex::new((0, 0)),
        }
    }
}

/// Write copy 0 of every page of a region, sealed with `generation` and
/// empty (no sync).
async fn write_region<B: Backend>(backend: &B, magic: u32, generation: u64, start: u64, pages: u64) -> Result<()> {
    const CHUNK: u64 = 256;
    let mut buf = AlignedBuf::new(CHUNK as usize * BLOCK_SIZE);
    let mut p = 0;
    while p < pages {
        let n = CHUNK.min(pages - p);
        for i in 0..n as usize {
            let page = &mut buf[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
            page.fill(0);
            seal_region_page(magic, generation, page);
        }
        backend
            .write_at(&buf[..n as usize * BLOCK_SIZE], (start + p) * BS)
            .await
            .map_err(Error::io("formatting the pool"))?;
        p += n;
    }
    Ok(())
}

/// Read the current copy (as the slot map says, from bit `first_bit` on)
/// of every page of a region, whose first page is page `first_page` of its
/// kind (for messages). A current copy that is damaged, or newer than the
/// superblock, refuses the pool: the other copy is older, and using it
/// would silently lose committed changes.
async fn read_region<B: Backend>(
    backend: &B,
    sb: &Superblock,
    slot_map: &[u8],
    (first_bit, first_page): (u64, u64),
    magic: u32,
    start: u64,
    pages: u64,
) -> Result<Vec<(Vec<u8>, u8)>> {
    const CHUNK: u64 = 256;
    let what = if magic == CATALOG_MAGIC { "catalog" } else { "refcount" };
    let mut out = Vec::with_capacity(pages as usize);
    let mut copies = [AlignedBuf::new(CHUNK as usize * BLOCK_SIZE), AlignedBuf::new(CHUNK as usize * BLOCK_SIZE)];
    let mut p = 0;
    while p < pages {
        let n = CHUNK.min(pages - p);
        let len = n as usize * BLOCK_SIZE;
        let slots: Vec<u8> = (0..n).map(|i| slot_bit(slot_map, first_bit + p + i)).collect();
        for (slot, buf) in copies.iter_mut().enumerate() {
            if slots.contains(&(slot as u8)) {
                backend
                    .read_at(&mut buf[..len], (start + slot as u64 * pages + p) * BS)
                    .await
                    .map_err(Error::io("reading metadata"))?;
            }
        }
        for (i, &slot) in slots.iter().enumerate() {
            let page = first_page + p + i as u64;
            let bytes = &mut copies[slot as usize][i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
            match open_region_page(magic, bytes) {
                Some(g) if g <= sb.generation => out.push((bytes.to_vec(), slot)),
                Some(g) => {
                    return Err(Error::Format(format!(
                        "{what} page {page}: its current copy has generation {g}, newer than the superblock's {}",
                        sb.generation
                    )));
                }
                None => {
                    return Err(Error::Format(format!(
                        "{what} page {page}: its current copy (slot {slot}) is damaged; the other copy is older and \
                         would silently lose committed changes"
                    )));
                }
            }
        }
        p += n;
    }
    Ok(out)
}

/// What a capture produced for the write phase.
struct Plan {
    generation: u64,
    /// (first block, bytes) runs to write before the superblock.
    runs: Vec<(u64, AlignedBuf)>,
    superblock: AlignedBuf,
    pinned: Vec<u64>,
    rc_slots: Vec<(usize, u8)>,
    cat_pages: Vec<(usize, Box<[u8]>, u8)>,
    frees: Vec<u64>,
}

/// Access to the device states locked by a capture, for catalog changes made
/// atomically with it.
pub(crate) struct Locked<'a, 'g> {
    pub cat: &'a mut Catalog,
    devs: &'a [Arc<Device>],
    guards: &'a mut [parking_lot::RwLockWriteGuard<'g, DevState>],
    pub refs: &'a RefTable,
}

impl Locked<'_, '_> {
    /// The locked state of device `id` (devices that existed when the
    /// capture started).
    pub fn state(&mut self, id: u64) -> Option<&mut DevState> {
        let i = self.devs.iter().position(|d| d.id == id)?;
        Some(&mut *self.guards[i])
    }

    /// Add a device record to the catalog.
    pub fn add(&mut self, mut rec: DeviceRecord) -> Result<Arc<Device>> {
        let Some(&idx) = self.cat.free_records.iter().next() else {
            return Err(Error::Refused(format!(
                "the catalog is full ({} devices): delete snapshots or volumes first",
                self.cat.devices.len()
            )));
        };
        self.cat.free_records.remove(&idx);
        rec.id = self.cat.next_id;
        self.cat.next_id += 1;
        rec.created = now();
        if rec.root.is_mapped() {
            self.refs.inc(rec.root.phys);
        }
        let dev = Arc::new(Device::new(rec, idx));
        self.cat.devices.insert(dev.id, dev.clone());
        Ok(dev)
    }
}

impl<B: Backend> Inner<B> {
    pub fn tree_cx(&self) -> TreeCtx<'_> {
        static NOTHING_HELD: Held = Held { at: Vec::new(), pages: Vec::new() };
        self.tree_cx_holding(&NOTHING_HELD)
    }

    /// A tree context that also sees the pages in `held`.
    pub fn tree_cx_holding<'a>(&'a self, held: &'a Held) -> TreeCtx<'a> {
        TreeCtx {
            cache: &self.cache,
            refs: &self.refs,
            alloc: &self.alloc,
            meta_cursor: &self.meta_cursor,
            dirty_pages: &self.dirty_pages,
            usable_blocks: &self.usable_blocks,
            held: &held.pages,
            held_at: &held.at,
        }
    }

    /// Load the page a tree operation missed and keep it in `held` for the
    /// retry.
    pub async fn load_held(&self, e: Entry, held: &mut Held) -> Result<()> {
        let page = self.load_page(e).await?;
        held.at.push(e.phys);
        held.pages.push(page);
        Ok(())
    }

    pub fn check_failed(&self) -> Result<()> {
        if self.failed.load(Ordering::Relaxed) {
            return Err(Error::Io {
                op: "using a pool whose last commit failed",
                source: std::io::Error::other("the pool must be reopened"),
            });
        }
        Ok(())
    }

    /// A 1 MiB aligned buffer from the pool's free list.
    pub fn bounce(&self) -> AlignedBuf {
        self.bounce.lock().pop().unwrap_or_else(|| AlignedBuf::new(PIECE_BLOCKS * BLOCK_SIZE))
    }

    pub fn bounce_back(&self, b: AlignedBuf) {
        let mut l = self.bounce.lock();
        if l.len() < 64 {
            l.push(b);
        }
    }

    /// Read a clean map page into the cache, checking it against the
    /// checksum its parent holds.
    pub async fn load_page(&self, e: Entry) -> Result<Arc<Page>> {
        if let Some(p) = self.cache.get(e.phys) {
            return Ok(p);
        }
        if !self.refs.contains(e.phys) {
            return Err(Error::Corrupt { what: "map entry (points outside the data area)", block: e.phys });
        }
        let mut buf = AlignedBuf::new(BLOCK_SIZE);
        self.backend.read_at(&mut buf, e.phys * BS).await.map_err(Error::io("reading a map page"))?;
        if crc_fresh(&buf) != e.crc {
            return Err(Error::Corrupt { what: "map page", block: e.phys });
        }
        let page: Arc<Page> = Arc::from(decode_page(&buf));
        self.cache.insert(e.phys, page.clone(), false);
        Ok(page)
    }

    /// A page of `dev` for reading outside the device lock (a copy when it
    /// is dirty).
    pub async fn page_of(&self, dev: &Device, e: Entry) -> Result<Arc<Page>> {
        if let Some(p) = dev.state.read().dirty.get(&e.phys) {
            return Ok(Arc::new(**p));
        }
        self.load_page(e).await
    }

    /// Flush: commit unless a commit that began after this call has already
    /// finished.
    pub async fn flush(&self) -> Result<()> {
        self.check_failed()?;
        let start = self.captures.load(Ordering::SeqCst);
        let mut cs = self.commit.lock().await;
        if self.captures.load(Ordering::SeqCst) > start {
            return self.check_failed();
        }
        self.commit_locked(&mut cs, |_| Ok(())).await
    }

    /// Commit with the commit lock held; `hook` changes the catalog
    /// atomically with the capture.
    pub async fn commit_locked<R>(
        &self,
        cs: &mut CommitState,
        hook: impl FnOnce(&mut Locked<'_, '_>) -> Result<R>,
    ) -> Result<R> {
        self.check_failed()?;
        // The capture has already turned dirty pages clean, so the plan is
        // written even when the hook refused its change (the hook's error
        // is returned after): skipping it would lose those pages.
        let (plan, r) = self.capture(cs, hook);
        // Every block the captured maps point at must be on disk before
        // the sync that precedes the commit point.
        if let Err(e) = self.flush_staged().await {
            self.failed.store(true, Ordering::SeqCst);
            return Err(e);
        }
        if let Err(e) = self.write_plan(&plan).await {
            self.failed.store(true, Ordering::SeqCst);
            return Err(e);
        }
        self.finish(cs, plan);
        r
    }

    /// Write every block staged by write-back to the disk (no sync).
    pub async fn flush_staged(&self) -> Result<()> {
        match self.staging() {
            Some((wb, cache)) => wb.flush(&self.backend, cache).await.map_err(Error::io("writing staged data")),
            None => Ok(()),
        }
    }

    /// Write-back and the data cache whose dirty entries hold its staged
    /// blocks, when the pool has write-back.
    pub fn staging(&self) -> Option<(&WriteBack, &DataCache)> {
        Some((self.writeback.as_ref()?, self.data_cache.as_ref()?))
    }

    /// Commit with a catalog change.
    pub async fn commit_with<R>(&self, hook: impl FnOnce(&mut Locked<'_, '_>) -> Result<R>) -> Result<R> {
        let mut cs = self.commit.lock().await;
        self.commit_locked(&mut cs, hook).await
    }

    fn capture<R>(
        &self,
        cs: &mut CommitState,
        hook: impl FnOnce(&mut Locked<'_, '_>) -> Result<R>,
    ) -> (Plan, Result<R>) {
        let generation = cs.generation + 1;
        let mut cat = self.catalog.write();
        let devs: Vec<Arc<Device>> = cat.devices.values().cloned().collect();
        let mut guards: Vec<_> = devs.iter().map(|d| d.state.write()).collect();
        self.captures.fetch_add(1, Ordering::SeqCst);

        // 1. Map pages, bottom-up.
        let mut pages: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut pinned = Vec::new();
        for g in guards.iter_mut() {
            let st: &mut DevState = g;
            if st.dirty.is_empty() {
                continue;
            }
            let mut root = st.rec.root;
            self.flush_node(st, &mut root, &mut pages, &mut pinned);
            st.rec.root = root;
            debug_assert!(st.dirty.is_empty(), "dirty pages unreachable from the root");
            let left = std::mem::take(&mut st.dirty);
            self.dirty_pages.fetch_sub(left.len(), Ordering::Relaxed);
        }

        // 2. Catalog changes made under the same locks.
        let r = {
            let mut locked = Locked { cat: &mut cat, devs: &devs, guards: &mut guards, refs: &self.refs };
            hook(&mut locked)
        };

        // 3. Catalog pages.
        let mut cat_pages = Vec::new();
        let mut images: Vec<Vec<u8>> = vec![vec![0u8; BLOCK_SIZE - REGION_HEADER]; cs.catalog.len()];
        for (id, d) in &cat.devices {
            let at = d.record as usize % RECORDS_PER_PAGE * RECORD_SIZE;
            let page = d.record as usize / RECORDS_PER_PAGE;
            let rec = match devs.iter().position(|x| x.id == *id) {
                Some(i) => guards[i].rec.clone(),
                None => d.state.read().rec.clone(),
            };
            rec.encode(&mut images[page][at..at + RECORD_SIZE]);
        }
        for (i, img) in images.into_iter().enumerate() {
            if *img != *cs.catalog[i].bytes {
                let slot = 1 - cs.catalog[i].slot;
                let mut page = vec![0u8; BLOCK_SIZE];
                page[REGION_HEADER..].copy_from_slice(&img);
                seal_region_page(CATALOG_MAGIC, generation, &mut page);
                pages.push((cs.sb.catalog_block(slot, i as u64), page));
                cat_pages.push((i, img.into_boxed_slice(), slot));
            }
        }

        // 4. Refcount pages, and the slot map that says which copy of every
        // region page is current after this commit.
        let mut slot_map = AlignedBuf::new(cs.sb.slot_map_blocks as usize * BLOCK_SIZE);
        for (i, c) in cs.catalog.iter().enumerate() {
            set_slot_bit(&mut slot_map, i as u64, c.slot);
        }
        for (i, _, slot) in &cat_pages {
            set_slot_bit(&mut slot_map, *i as u64, *slot);
        }
        let mut rc_slots = Vec::new();
        let mut frees = Vec::new();
        for i in 0..self.refs.page_count() {
            let mut p = self.refs.page(i).lock();
            let bit = cs.sb.catalog_pages + i as u64;
            if !p.dirty {
                set_slot_bit(&mut slot_map, bit, p.slot);
                continue;
            }
            let slot = 1 - p.slot;
            set_slot_bit(&mut slot_map, bit, slot);
            let mut page = vec![0u8; BLOCK_SIZE];
            for (k, c) in p.counts.iter().enumerate() {
                let at = REGION_HEADER + k * 4;
                page[at..at + 4].copy_from_slice(&c.to_le_bytes());
            }
            seal_region_page(REFCOUNT_MAGIC, generation, &mut page);
            pages.push((cs.sb.refcount_block(slot, i as u64), page));
            rc_slots.push((i, slot));
            self.refs.took_pending(p.pending.len() as u64);
            frees.append(&mut p.pending);
            p.dirty = false;
        }
        drop(guards);

        // 5. Superblock.
        let mut sb = cs.sb.clone();
        sb.generation = generation;
        sb.next_device_id = cat.next_id;
        sb.slot_map_crc = crc(&slot_map);
        let copy = (generation % 2) as u8;
        for (k, blk) in slot_map.chunks_exact(BLOCK_SIZE).enumerate() {
            pages.push((sb.slot_map_block(copy) + k as u64, blk.to_vec()));
        }
        drop(cat);
        let mut superblock = AlignedBuf::new(BLOCK_SIZE);
        sb.encode(&mut superblock);

        // Coalesce into runs of consecutive blocks.
        pages.sort_unstable_by_key(|p| p.0);
        let runs = consecutive_runs(pages.len(), |k| pages[k].0, 256)
            .map(|(i, j)| {
                let mut buf = AlignedBuf::new((j - i) * BLOCK_SIZE);
                for (k, (_, bytes)) in pages[i..j].iter().enumerate() {
                    buf[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE].copy_from_slice(bytes);
                }
                (pages[i].0, buf)
            })
            .collect();
        (Plan { generation, runs, superblock, pinned, rc_slots, cat_pages, frees }, r)
    }

    /// Checksum and encode the dirty page behind `e` and the dirty pages
    /// under it; store the checksum in `e`.
    fn flush_node(&self, st: &mut DevState, e: &mut Entry, out: &mut Vec<(u64, Vec<u8>)>, pinned: &mut Vec<u64>) {
        let Some(mut page) = st.dirty.remove(&e.phys) else { return };
        self.dirty_pages.fetch_sub(1, Ordering::Relaxed);
        for c in page.iter_mut() {
            if c.is_mapped() && st.dirty.contains_key(&c.phys) {
                self.flush_node(st, c, out, pinned);
            }
        }
        let mut bytes = vec![0u8; BLOCK_SIZE];
        encode_page(&page, &mut bytes);
        e.crc = crc(&bytes);
        out.push((e.phys, bytes));
        self.cache.insert(e.phys, Arc::from(page), true);
        pinned.push(e.phys);
    }

    async fn write_plan(&self, plan: &Plan) -> Result<()> {
        let backend = &self.backend;
        // Up to 32 writes in flight. (A plain function rather than a
        // closure keeps the future Send: closures returning futures that
        // borrow their argument trip a higher-ranked lifetime limitation.)
        let mut inflight = futures::stream::FuturesUnordered::new();
        let mut runs = plan.runs.iter();
        loop {
            while inflight.len() < 32 {
                let Some((blk, buf)) = runs.next() else { break };
                inflight.push(write_run(backend, *blk, buf));
            }
            match inflight.next().await {
                Some(r) => r.map_err(Error::io("writing metadata"))?,
                None => break,
            }
        }
        backend.sync().await.map_err(Error::io("syncing before the commit point"))?;
        backend
            .write_at(&plan.superblock, (plan.generation % 2) * BS)
            .await
            .map_err(Error::io("writing the superblock"))?;
        backend.sync().await.map_err(Error::io("syncing the superblock"))?;
        Ok(())
    }

    fn finish(&self, cs: &mut CommitState, plan: Plan) {
        cs.generation = plan.generation;
        for b in plan.pinned {
            self.cache.unpin(b);
        }
        for (i, slot) in plan.rc_slots {
            self.refs.page(i).lock().slot = slot;
        }
        for (i, bytes, slot) in plan.cat_pages {
            cs.catalog[i] = CatPage { bytes, slot };
        }
        if !plan.frees.is_empty() {
            cs.limbo.push_back((self.grace.epoch(), plan.frees));
        }
        // Two steps when no reader holds them back: then this commit's frees
        // are reusable at once.
        self.grace.try_advance();
        let epoch = self.grace.try_advance();
        while cs.limbo.front().is_some_and(|(e, _)| e + 2 <= epoch) {
            let (_, blocks) = cs.limbo.pop_front().expect("front");
            // No reader can still insert these into the data cache (the
            // grace period is over): empty their slots for reuse now rather
            // than when the blocks are next written. Not for a batch larger
            // than the cache (deleting a big volume): that would hold the
            // commit lock for a lookup per block, and its entries age out.
            if let Some(dc) = &self.data_cache
                && blocks.len() as u64 <= dc.capacity_blocks()
            {
                for &b in &blocks {
                    dc.invalidate(b, 1);
                }
            }
            let mut a = self.alloc.lock();
            for b in blocks {
                // A block may have been referenced again only if it was
                // never free: counts at zero stay zero until allocated.
                debug_assert_eq!(self.refs.get(b), 0);
                self.cache.remove(b);
                a.release(b, 1);
            }
        }
    }

    /// Blocks whose release waits for a commit or a grace period.
    pub fn pending_release(&self, cs: &CommitState) -> u64 {
        cs.limbo.iter().map(|(_, v)| v.len() as u64).sum()
    }

    /// Take up to `want` blocks for `dev`'s data, from its cursor extent.
    pub fn take_data_blocks(&self, dev: &Device, want: u64) -> Option<(u64, u64)> {
        let mut c = dev.cursor.lock();
        if c.0 == c.1 {
            let keep = self.meta_reserve.load(Ordering::Relaxed);
            let (s, n) = self.alloc.lock().take(want.max(64), keep)?;
            *c = (s, s + n);
        }
        let n = want.min(c.1 - c.0);
        let s = c.0;
        c.0 += n;
        Some((s, n))
    }

    /// Give blocks that were taken but never mapped back.
    pub fn give_back(&self, start: u64, n: u64) {
        self.alloc.lock().release(start, n);
    }

    /// Return every device's unused cursor extent, and the map pages'
    /// one, to the allocator.
    pub fn drain_cursors(&self) {
        {
            let mut c = self.meta_cursor.lock();
            if c.1 > c.0 {
                self.give_back(c.0, c.1 - c.0);
            }
            *c = (0, 0);
        }
        let devs: Vec<_> = self.catalog.read().devices.values().cloned().collect();
        for d in devs {
            let mut c = d.cursor.lock();
            if c.1 > c.0 {
                self.give_back(c.0, c.1 - c.0);
            }
            *c = (0, 0);
        }
    }

    /// Try to make room: unused extents back, a commit so freed blocks can
    /// be released, and a second commit to pass the grace period.
    ///
    /// `seen` is the capture count when the caller's allocation failed: if
    /// two commits have been captured since, someone else already reclaimed
    /// and the caller just retries (one reclaim serves every writer that
    /// ran out at the same time).
    pub async fn reclaim(&self, seen: u64) -> Result<()> {
        let mut cs = self.commit.lock().await;
        if self.captures.load(Ordering::SeqCst) >= seen + 2 {
            return Ok(());
        }
        self.drain_cursors();
        self.commit_locked(&mut cs, |_| Ok(())).await?;
        if self.pending_release(&cs) > 0 {
            self.commit_locked(&mut cs, |_| Ok(())).await?;
        }
        Ok(())
    }

    /// True when free space is low while blocks wait for a commit to be
    /// released: copy-on-write overwrites then recycle space by committing
    /// before the pool runs dry, instead of every writer hitting the wall.
    pub fn should_commit_for_space(&self) -> bool {
        let pending = self.refs.pending();
        if pending == 0 {
            return false;
        }
        let free = self.alloc.lock().free_blocks();
        let usable = self.usable_blocks.load(Ordering::Relaxed);
        let low = (usable / 8).max(1024);
        free < low && pending >= (free / 4).max(256).min(usable / 64 + 1)
    }

    pub fn no_space(&self) -> Error {
        Error::NoSpace {
            free_blocks: self.alloc.lock().free_blocks(),
            total_blocks: self.usable_blocks.load(Ordering::Relaxed),
        }
    }

    /// Drop every reference held by a tree (a deleted device), freeing what
    /// no other device holds. Runs with the commit lock held, so no commit
    /// sees it half done.
    pub async fn release_tree(&self, dev: &Device, root: Entry, depth: u8) -> Result<()> {
        let _g = self.grace.enter();
        let mut stack = vec![(root, depth)];
        while let Some((e, level)) = stack.pop() {
            if !e.is_mapped() {
                continue;
            }
            if level == 0 {
                self.refs.dec(e.phys);
                continue;
            }
            if self.refs.get(e.phys) > 1 && self.refs.dec(e.phys) > 0 {
                continue;
            }
            let page = self.page_of(dev, e).await?;
            if self.refs.get(e.phys) > 0 {
                self.refs.dec(e.phys);
            }
            stack.extend(page.iter().filter(|c| c.is_mapped()).map(|c| (*c, level - 1)));
        }
        let mut st = dev.state.write();
        let n = st.dirty.len();
        st.dirty.clear();
        st.deleted = true;
        self.dirty_pages.fetch_sub(n, Ordering::Relaxed);
        drop(st);
        let mut c = dev.cursor.lock();
        if c.1 > c.0 {
            self.give_back(c.0, c.1 - c.0);
        }
        *c = (0, 0);
        Ok(())
    }
}

/// Runs of consecutive block numbers among `n` sorted ones (`block(k)` is
/// the k-th), at most `max` long, as index ranges `i..j`.
pub(crate) fn consecutive_runs(
    n: usize,
    block: impl Fn(usize) -> u64,
    max: usize,
) -> impl Iterator<Item = (usize, usize)> {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= n {
            return None;
        }
        let mut j = i + 1;
        while j < n && block(j) == block(j - 1) + 1 && j - i < max {
            j += 1;
        }
        let run = (i, j);
        i = j;
        Some(run)
    })
}

fn write_run<'a, B: Backend>(
    backend: &'a B,
    blk: u64,
    buf: &'a [u8],
) -> impl std::future::Future<Output = std::io::Result<()>> + Send + 'a {
    backend.write_at(buf, blk * BS)
}

/// Depth for a device of `size` bytes.
pub(crate) fn depth_for_size(size: u64) -> u8 {
    depth_for(size.div_ceil(BS).max(1))
}
