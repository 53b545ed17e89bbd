//! Crash consistency, in the style of redb's `tests/crash_consistency.rs`.
//!
//! A seeded random workload (writes, FUA writes, flushes, discards, write
//! zeroes, snapshots, clones, deletes, re-creates, resizes, and growths of
//! the pool: the device gets longer, then `Pool::grow`) runs on a pool
//! whose backend ([`CrashBackend`]) loses power after a chosen number of
//! operations, anywhere: in a data write, among a commit's metadata writes,
//! in the sync before the commit point, in the superblock write, in the sync
//! after it. Writes not yet synced land whole, not at all, or torn. The crash
//! image is reopened with a plain [`MemBackend`] and checked against a model:
//!
//! * opening succeeds and `check()` finds nothing;
//! * every device a completed catalog operation created exists with the right
//!   size, every device one deleted is gone, no other device appears; a
//!   catalog operation cut by the crash may or may not show;
//! * the pool's size is that of its last completed growth, or, when the
//!   crash cut a growth, that or the size the growth gives (the one the run
//!   without a crash reached); growing the recovered pool again reaches the
//!   same size;
//! * every 512-byte sector reads either its value at the last durable point
//!   (a completed flush, FUA write or catalog operation: they all commit the
//!   whole pool) or a value written to it after that, acknowledged or not;
//!   snapshots read exactly what their volume held when they were taken;
//! * stronger, from the commit protocol (a commit captures the whole pool at
//!   one moment): one point of the workload between the last durable point
//!   and the crash explains every sector of every device at once;
//! * the recovered pool takes more writes, a snapshot and a flush, passes
//!   `check()` again, and reopens to the same data.
//!
//! `KEEL_CRASH_ITERATIONS=N` runs N crash points (seeds 0..N);
//! `KEEL_CRASH_SEED=N` runs seed N alone and logs every step.

mod common;
#[path = "common/crash_backend.rs"]
mod crash_backend;

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crash_backend::{CrashBackend, OpClass, TearPolicy, TearStats};
use keel_blockstore::backend::MemBackend;
use keel_blockstore::format::Superblock;
use keel_blockstore::{BLOCK_SIZE, Backend, DeviceKind, Error, ErrorKind, Pool, PoolOptions};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SECTOR: usize = 512;
const SECTORS_PER_BLOCK: usize = BLOCK_SIZE / SECTOR;
const POOL_BYTES: usize = 8 << 20;
/// Crash points run by default (seeds 0..DEFAULT_ITERATIONS).
const DEFAULT_ITERATIONS: u64 = 2000;
/// Volumes are grown up to this size (2.5 MiB) and shrunk down to 64 KiB.
const MAX_SECTORS: usize = 5120;
const MIN_SECTORS: usize = 128;
/// Backend reads allowed per workload run: far above what one needs, so a
/// store that loops on reads fails the seed instead of hanging the test.
const READ_LIMIT: u64 = 1_000_000;
/// Base volume names; deleted ones are re-created under the same name.
const BASE: [&str; 2] = ["v0", "v1"];
/// Growths of the device (and the pool) per workload, at most.
const MAX_GROWS: usize = 3;

// ---------------------------------------------------------------------------
// Sector contents: every written sector says which write and which sector it
// is, so a read tells exactly what landed where.

const SECTOR_MAGIC: u64 = 0x4B45_454C; // "KEEL"
static ZERO_SECTOR: [u8; SECTOR] = [0; SECTOR];

/// The bytes write `tag` puts at device sector `sector`: a header naming
/// both, then an 8-byte key derived from both, repeated.
fn fill_sector(tag: u32, sector: usize, out: &mut [u8]) {
    let mut key = ((tag as u64) << 32 | sector as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    key ^= key >> 29;
    out[0..8].copy_from_slice(&(SECTOR_MAGIC << 32 | tag as u64).to_le_bytes());
    out[8..16].copy_from_slice(&(sector as u64).to_le_bytes());
    out[16..24].copy_from_slice(&key.to_le_bytes());
    let mut filled = 8;
    while filled < SECTOR - 16 {
        let n = filled.min(SECTOR - 16 - filled);
        out.copy_within(16..16 + n, 16 + filled);
        filled += n;
    }
}

fn write_data(tag: u32, start: usize, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len * SECTOR];
    for (k, s) in data.chunks_exact_mut(SECTOR).enumerate() {
        fill_sector(tag, start + k, s);
    }
    data
}

/// Which write a sector read holds (0: zeros), or why it is garbage.
fn parse_sector(sector: usize, b: &[u8]) -> Result<u32, String> {
    if b == ZERO_SECTOR {
        return Ok(0);
    }
    let w0 = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
    let tag = w0 as u32;
    if w0 >> 32 != SECTOR_MAGIC || tag == 0 {
        return Err(format!("garbage (first bytes {:02x?})", &b[..16]));
    }
    let from = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    if from != sector as u64 {
        return Err(format!("data of write #{tag} for sector {from} found at sector {sector}"));
    }
    let mut want = [0u8; SECTOR];
    fill_sector(tag, sector, &mut want);
    if want[..] != *b {
        return Err(format!("write #{tag}'s header but damaged contents"));
    }
    Ok(tag)
}

// ---------------------------------------------------------------------------
// The model.

/// A change to a device's data since its last durable point.
#[derive(Clone, Copy, Debug)]
struct Pend {
    start: usize,
    end: usize,
    /// Write id, 0 for zeroes.
    tag: u32,
    /// The state index at which it took effect (see [`Model::applied`]).
    state: usize,
}

#[derive(Clone, Debug)]
struct Dev {
    /// `Some(volume)` for a snapshot of `volume`.
    snapshot_of: Option<String>,
    /// Creation order (the store's device ids grow the same way).
    seq: u64,
    /// Contents now: the write id of each sector (0 = zeros).
    cur: Vec<u32>,
    /// Contents at the last durable point.
    dur: Vec<u32>,
    /// Changes since the last durable point, in order.
    pending: Vec<Pend>,
}

impl Dev {
    fn sectors(&self) -> usize {
        self.cur.len()
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        name: String,
        sectors: usize,
    },
    Write {
        dev: String,
        start: usize,
        len: usize,
        tag: u32,
        fua: bool,
    },
    Zero {
        dev: String,
        start: usize,
        len: usize,
        fua: bool,
        discard: bool,
    },
    Flush {
        via: Option<String>,
    },
    Snapshot {
        vol: String,
        snap: String,
    },
    Clone {
        src: String,
        name: String,
    },
    DeleteSnapshot {
        vol: String,
        snap: String,
    },
    DeleteVolume {
        name: String,
    },
    Resize {
        name: String,
        sectors: usize,
    },
    /// The device grows to `bytes`, then `pool.grow()`.
    Grow {
        bytes: usize,
    },
}

impl Op {
    /// Durable when it returns Ok (it commits the pool).
    fn commits(&self) -> bool {
        match self {
            Op::Write { fua, .. } => *fua,
            Op::Zero { fua, discard, .. } => *fua && !*discard,
            _ => true,
        }
    }

    fn is_catalog(&self) -> bool {
        !matches!(self, Op::Write { .. } | Op::Zero { .. } | Op::Flush { .. })
    }

    fn describe(&self) -> String {
        let b = |s: usize| s * SECTOR;
        match self {
            Op::Create { name, sectors } => format!("create_volume({name}, {})", b(*sectors)),
            Op::Write { dev, start, len, tag, fua } => {
                format!("write #{tag} {dev} [{}, +{}) fua={fua}", b(*start), b(*len))
            }
            Op::Zero { dev, start, len, fua, discard } => {
                if *discard {
                    format!("discard {dev} [{}, +{})", b(*start), b(*len))
                } else {
                    format!("write_zeroes {dev} [{}, +{}) fua={fua}", b(*start), b(*len))
                }
            }
            Op::Flush { via: None } => "pool.flush()".into(),
            Op::Flush { via: Some(v) } => format!("{v}.flush()"),
            Op::Snapshot { vol, snap } => format!("snapshot({vol}, {snap})"),
            Op::Clone { src, name } => format!("clone_snapshot({src}, {name})"),
            Op::DeleteSnapshot { vol, snap } => format!("delete_snapshot({vol}, {snap})"),
            Op::DeleteVolume { name } => format!("delete_volume({name}, recursive)"),
            Op::Resize { name, sectors } => format!("resize({name}, {}, force)", b(*sectors)),
            Op::Grow { bytes } => format!("device to {bytes} bytes, pool.grow()"),
        }
    }
}

/// The operation power was lost in.
#[derive(Clone, Debug)]
struct InFlight {
    op: Op,
    /// For a volume delete: its snapshots, in the order the store deletes
    /// them (creation order).
    snaps: Vec<String>,
}

#[derive(Clone, Debug)]
struct Model {
    devs: BTreeMap<String, Dev>,
    /// State index: operations completed so far. State `k` is the pool after
    /// the first `k` operations.
    applied: usize,
    /// The state index at the last durable point.
    durable: usize,
    seq: u64,
    inflight: Option<InFlight>,
    /// Bytes of the device (it grows when a growth is issued, whether or
    /// not the growth returns).
    device_bytes: usize,
    /// `Pool::stats().total_bytes` as created, then after the last
    /// completed growth (0: not known, any).
    pool_bytes: u64,
    /// Growths issued.
    grows: usize,
}

impl Model {
    fn new() -> Model {
        Model {
            devs: BTreeMap::new(),
            applied: 0,
            durable: 0,
            seq: 0,
            inflight: None,
            device_bytes: POOL_BYTES,
            pool_bytes: 0,
            grows: 0,
        }
    }

    fn writable(&self) -> Vec<String> {
        self.devs.iter().filter(|(_, d)| d.snapshot_of.is_none()).map(|(n, _)| n.clone()).collect()
    }

    fn snapshots(&self) -> Vec<String> {
        self.devs.iter().filter(|(_, d)| d.snapshot_of.is_some()).map(|(n, _)| n.clone()).collect()
    }

    /// Snapshots of `vol` in creation order.
    fn snapshots_of(&self, vol: &str) -> Vec<String> {
        let mut v: Vec<(u64, String)> = self
            .devs
            .iter()
            .filter(|(_, d)| d.snapshot_of.as_deref() == Some(vol))
            .map(|(n, d)| (d.seq, n.clone()))
            .collect();
        v.sort();
        v.into_iter().map(|(_, n)| n).collect()
    }

    fn all_durable(&mut self) {
        for d in self.devs.values_mut() {
            d.dur.clone_from(&d.cur);
            d.pending.clear();
        }
        self.durable = self.applied;
    }

    fn add(&mut self, name: String, snapshot_of: Option<String>, content: Vec<u32>) {
        self.seq += 1;
        let dev = Dev { snapshot_of, seq: self.seq, dur: content.clone(), cur: content, pending: Vec::new() };
        self.devs.insert(name, dev);
    }

    fn set(&mut self, dev: &str, start: usize, end: usize, tag: u32) {
        let state = self.applied + 1;
        let d = self.devs.get_mut(dev).expect("device in the model");
        d.cur[start..end].fill(tag);
        d.pending.push(Pend { start, end, tag, state });
    }

    /// Effects an operation has as soon as it is issued: the data it may
    /// leave behind even if it never returns.
    fn begin(&mut self, op: &Op) {
        match op {
            Op::Write { dev, start, len, tag, .. } => self.set(dev, *start, start + len, *tag),
            Op::Zero { dev, start, len, .. } => self.set(dev, *start, start + len, 0),
            Op::Resize { name, sectors } => {
                let old = self.devs[name].sectors();
                if *sectors < old {
                    // A forced shrink zeroes the tail before the size changes.
                    self.set(name, *sectors, old, 0);
                }
            }
            Op::Grow { bytes } => {
                self.device_bytes = *bytes;
                self.grows += 1;
            }
            _ => {}
        }
    }

    /// Effects of an operation that returned Ok (or that the recovered pool
    /// shows was committed).
    fn complete(&mut self, op: &Op) {
        self.applied += 1;
        if op.commits() {
            self.all_durable();
        }
        match op {
            Op::Create { name, sectors } => self.add(name.clone(), None, vec![0; *sectors]),
            Op::Snapshot { vol, snap } => {
                let content = self.devs[vol].cur.clone();
                self.add(format!("{vol}@{snap}"), Some(vol.clone()), content);
            }
            Op::Clone { src, name } => {
                let content = self.devs[src].cur.clone();
                self.add(name.clone(), None, content);
            }
            Op::DeleteSnapshot { vol, snap } => {
                self.devs.remove(&format!("{vol}@{snap}"));
            }
            Op::DeleteVolume { name } => {
                for s in self.snapshots_of(name) {
                    self.devs.remove(&s);
                }
                self.devs.remove(name);
            }
            Op::Resize { name, sectors } => {
                let d = self.devs.get_mut(name).expect("device in the model");
                d.cur.resize(*sectors, 0);
                d.dur.resize(*sectors, 0);
            }
            // The size it reached is set by the caller, who knows it.
            Op::Write { .. } | Op::Zero { .. } | Op::Flush { .. } | Op::Grow { .. } => {}
        }
    }
}

// ---------------------------------------------------------------------------
// The workload.

/// Per-seed tunables.
#[derive(Clone, Debug)]
struct Params {
    ops: usize,
    opts: PoolOptions,
}

impl Params {
    fn for_seed(seed: u64) -> Params {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5EED_0F0B_7500);
        let mut opts = PoolOptions { catalog_pages: 2, ..PoolOptions::default() };
        if rng.gen_bool(0.4) {
            // A tiny cache (two pages per shard): map pages are evicted and
            // read back (and checked). One page per shard livelocks, see
            // `map_lookup_with_a_small_page_cache_makes_progress`.
            opts.cache_bytes = 32 * BLOCK_SIZE;
        }
        if rng.gen_bool(0.4) {
            // A tiny dirty budget: writes trigger commits of their own.
            opts.dirty_limit_bytes = rng.gen_range(2..24) * BLOCK_SIZE;
        }
        if rng.gen_bool(0.5) {
            // A data cache, half the time with write-back: writes are then
            // acknowledged from memory and reach the disk in batches, on
            // flushes and commits (`writeback.rs`).
            opts.data_cache_bytes = rng.gen_range(16..512) * BLOCK_SIZE;
            if rng.gen_bool(0.5) {
                opts.write_back_bytes = rng.gen_range(1..256) * BLOCK_SIZE;
            }
        }
        Params { ops: rng.gen_range(24..=40), opts }
    }
}

struct Workload {
    rng: SmallRng,
    model: Model,
    /// `total_bytes` after each growth, by operation index: what this run
    /// reached, and what the run without a crash reached (a crash cuts a
    /// growth before it says).
    grown: BTreeMap<usize, u64>,
    expect_grown: BTreeMap<usize, u64>,
    next_tag: u32,
    next_name: u32,
    log: Vec<String>,
    verbose: bool,
}

enum RunEnd {
    /// Every operation returned Ok.
    Completed,
    /// Operation `index` failed.
    Failed { index: usize, error: Error },
}

impl Workload {
    fn new(seed: u64, verbose: bool) -> Workload {
        Workload {
            rng: SmallRng::seed_from_u64(seed),
            model: Model::new(),
            grown: BTreeMap::new(),
            expect_grown: BTreeMap::new(),
            next_tag: 1,
            next_name: 1,
            log: Vec::new(),
            verbose,
        }
    }

    fn pick<T: Clone>(&mut self, v: &[T]) -> T {
        v[self.rng.gen_range(0..v.len())].clone()
    }

    fn size(&mut self) -> usize {
        let blocks = self.rng.gen_range(64..=384);
        let extra = if self.rng.gen_bool(0.3) { self.rng.gen_range(1..SECTORS_PER_BLOCK) } else { 0 };
        blocks * SECTORS_PER_BLOCK + extra
    }

    /// A range of a device of `sectors`: mostly whole 4 KiB blocks, some
    /// 512-byte granular, some ending at the device's end.
    fn range(&mut self, sectors: usize, max_blocks: usize) -> (usize, usize) {
        let (mut start, len) = if self.rng.gen_bool(0.75) && sectors >= SECTORS_PER_BLOCK {
            let blocks = sectors / SECTORS_PER_BLOCK;
            let n = self.rng.gen_range(1..=max_blocks).min(blocks);
            (self.rng.gen_range(0..=blocks - n) * SECTORS_PER_BLOCK, n * SECTORS_PER_BLOCK)
        } else {
            let len = self.rng.gen_range(1..=max_blocks * SECTORS_PER_BLOCK).min(sectors);
            (self.rng.gen_range(0..=sectors - len), len)
        };
        if self.rng.gen_bool(0.1) {
            start = sectors - len;
        }
        (start, len)
    }

    fn name(&mut self, prefix: &str) -> String {
        self.next_name += 1;
        format!("{prefix}{}", self.next_name)
    }

    /// The next operation: valid for the model's current state.
    fn gen_op(&mut self, index: usize) -> Op {
        if index < BASE.len() {
            let sectors = self.size();
            return Op::Create { name: BASE[index].to_string(), sectors };
        }
        let writable = self.model.writable();
        let snaps = self.model.snapshots();
        let clones = writable.iter().filter(|n| n.starts_with('c')).count();
        if self.model.grows < MAX_GROWS && self.rng.gen_bool(0.05) {
            // By 320 KiB to 4 MiB (a refcount page counts 4 MiB: some
            // growths need new pages, some fit in the last one), now and
            // then not by whole blocks (the pool uses whole blocks only).
            let mut by = self.rng.gen_range(80..=1024) * BLOCK_SIZE;
            if self.rng.gen_bool(0.3) {
                by += self.rng.gen_range(1..BLOCK_SIZE);
            }
            return Op::Grow { bytes: self.model.device_bytes + by };
        }
        loop {
            let roll = self.rng.gen_range(0..100);
            match roll {
                0..=41 if !writable.is_empty() => {
                    let dev = self.pick(&writable);
                    let (start, len) = self.range(self.model.devs[&dev].sectors(), 16);
                    let tag = self.next_tag;
                    self.next_tag += 1;
                    return Op::Write { dev, start, len, tag, fua: roll >= 34 };
                }
                42..=48 => {
                    let via =
                        if !writable.is_empty() && self.rng.gen_bool(0.3) { Some(self.pick(&writable)) } else { None };
                    return Op::Flush { via };
                }
                49..=58 if !writable.is_empty() => {
                    let dev = self.pick(&writable);
                    let (start, len) = self.range(self.model.devs[&dev].sectors(), 32);
                    let discard = roll < 54;
                    let fua = !discard && self.rng.gen_bool(0.5);
                    return Op::Zero { dev, start, len, fua, discard };
                }
                59..=66 if !writable.is_empty() && snaps.len() < 8 => {
                    let vol = self.pick(&writable);
                    if self.model.snapshots_of(&vol).len() < 3 {
                        let snap = self.name("s");
                        return Op::Snapshot { vol, snap };
                    }
                }
                67..=71 if !snaps.is_empty() && clones < 3 => {
                    let src = self.pick(&snaps);
                    let name = self.name("c");
                    return Op::Clone { src, name };
                }
                72..=76 if !snaps.is_empty() => {
                    let full = self.pick(&snaps);
                    let (vol, snap) = full.split_once('@').expect("vol@snap");
                    return Op::DeleteSnapshot { vol: vol.into(), snap: snap.into() };
                }
                77..=79 if !writable.is_empty() => {
                    let name = self.pick(&writable);
                    return Op::DeleteVolume { name };
                }
                80..=85 => {
                    let missing: Vec<&str> =
                        BASE.iter().copied().filter(|n| !self.model.devs.contains_key(*n)).collect();
                    if !missing.is_empty() {
                        let name = self.pick(&missing).to_string();
                        let sectors = self.size();
                        return Op::Create { name, sectors };
                    }
                }
                86..=92 if !writable.is_empty() => {
                    let name = self.pick(&writable);
                    let old = self.model.devs[&name].sectors();
                    if old + 8 <= MAX_SECTORS {
                        let grow = self.rng.gen_range(8..=1024).min(MAX_SECTORS - old);
                        let grow =
                            if self.rng.gen_bool(0.7) { grow.next_multiple_of(8).min(MAX_SECTORS - old) } else { grow };
                        return Op::Resize { name, sectors: old + grow };
                    }
                }
                93..=99 if !writable.is_empty() => {
                    let name = self.pick(&writable);
                    let old = self.model.devs[&name].sectors();
                    if old > MIN_SECTORS + 8 {
                        let new = self.rng.gen_range(MIN_SECTORS..old);
                        return Op::Resize { name, sectors: new };
                    }
                }
                _ => {}
            }
        }
    }

    /// Run `ops` operations; stop at the first error.
    async fn run<B: Backend + Grows>(&mut self, pool: &Pool<B>, ops: usize) -> RunEnd {
        for index in 0..ops {
            let op = self.gen_op(index);
            let desc = op.describe();
            if self.verbose {
                eprintln!("  op {index}: {desc}");
            }
            self.log.push(desc);
            let snaps = match &op {
                Op::DeleteVolume { name } => self.model.snapshots_of(name),
                _ => Vec::new(),
            };
            self.model.begin(&op);
            match exec(pool, &op).await {
                Ok(()) => {
                    self.model.complete(&op);
                    if let Op::Grow { .. } = op {
                        let total = pool.stats().total_bytes;
                        self.model.pool_bytes = total;
                        self.grown.insert(index, total);
                    }
                }
                Err(error) => {
                    self.model.inflight = Some(InFlight { op, snaps });
                    return RunEnd::Failed { index, error };
                }
            }
        }
        RunEnd::Completed
    }
}

/// A backend a test can make longer (a device that grows).
trait Grows {
    fn grow_device(&self, bytes: usize);
}

impl Grows for CrashBackend {
    fn grow_device(&self, bytes: usize) {
        self.grow_to(bytes);
    }
}

impl Grows for MemBackend {
    fn grow_device(&self, bytes: usize) {
        self.set_len(bytes as u64);
    }
}

async fn exec<B: Backend + Grows>(pool: &Pool<B>, op: &Op) -> Result<(), Error> {
    let b = |s: usize| (s * SECTOR) as u64;
    match op {
        Op::Create { name, sectors } => pool.create_volume(name, b(*sectors)).await.map(drop),
        Op::Write { dev, start, len, tag, fua } => {
            let data = write_data(*tag, *start, *len);
            pool.volume(dev)?.write(b(*start), &data, *fua).await
        }
        Op::Zero { dev, start, len, fua, discard } => {
            let v = pool.volume(dev)?;
            if *discard { v.discard(b(*start), b(*len)).await } else { v.write_zeroes(b(*start), b(*len), *fua).await }
        }
        Op::Flush { via: None } => pool.flush().await,
        Op::Flush { via: Some(v) } => pool.volume(v)?.flush().await,
        Op::Snapshot { vol, snap } => pool.snapshot(vol, snap).await.map(drop),
        Op::Clone { src, name } => pool.clone_snapshot(src, name).await.map(drop),
        Op::DeleteSnapshot { vol, snap } => pool.delete_snapshot(vol, snap).await,
        Op::DeleteVolume { name } => pool.delete_volume(name, true).await,
        Op::Resize { name, sectors } => pool.resize(name, b(*sectors), true).await,
        Op::Grow { bytes } => {
            pool.backend().grow_device(*bytes);
            let before = pool.stats().total_bytes;
            let r = pool.grow().await?;
            // Every step is large enough to be taken.
            assert!(r.grew() && pool.stats().total_bytes > before, "{r:?}");
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------
// Verification of a (recovered) pool against the model.

#[derive(Default)]
struct Verified {
    /// What each device read, sector by sector (write ids, 0 = zeros).
    observed: BTreeMap<String, Vec<u32>>,
    /// The operation cut by the crash was a catalog operation ...
    catalog_inflight: bool,
    /// ... and the recovered pool shows it (in whole or in part).
    catalog_reflected: bool,
    /// The points of the workload (state indexes) that explain every device.
    explained_by: Vec<usize>,
    /// The operation cut by the crash was a growth ...
    grow_inflight: bool,
    /// ... and the recovered pool has the size it gives.
    grow_reflected: bool,
}

/// Mask of relative states `a..b`.
fn states(a: usize, b: usize) -> u128 {
    debug_assert!(a <= b && b <= 128);
    let hi = if b == 128 { u128::MAX } else { (1u128 << b) - 1 };
    let lo = if a == 128 { u128::MAX } else { (1u128 << a) - 1 };
    hi & !lo
}

/// Resolve the model against what the pool shows after a crash. On return
/// the model describes the recovered pool: the operation cut by the crash
/// is applied when the pool shows it.
fn resolve_inflight(
    listed: &BTreeMap<String, u64>,
    pool_bytes: u64,
    expect_grown: &BTreeMap<usize, u64>,
    m: &mut Model,
    v: &mut Verified,
) -> Result<(), String> {
    let Some(inflight) = m.inflight.clone() else { return Ok(()) };
    if let Op::Grow { bytes } = inflight.op {
        v.grow_inflight = true;
        let new = *expect_grown.get(&m.applied).ok_or("the run without a crash made no growth here")?;
        if pool_bytes == new {
            v.grow_reflected = true;
            m.complete(&inflight.op);
            m.pool_bytes = new;
            m.inflight = None;
        } else if !(pool_bytes == m.pool_bytes || m.pool_bytes == 0) {
            return Err(format!(
                "the pool has {pool_bytes} bytes after a crash in a growth to a {bytes}-byte device: want {} \
                 (before it) or {new}",
                m.pool_bytes
            ));
        }
        return Ok(());
    }
    if !inflight.op.is_catalog() {
        return Ok(());
    }
    v.catalog_inflight = true;
    let shows = |n: &str| listed.contains_key(n);
    let reflected = match &inflight.op {
        Op::Create { name, .. } | Op::Clone { name, .. } => shows(name),
        Op::Snapshot { vol, snap } => shows(&format!("{vol}@{snap}")),
        Op::DeleteSnapshot { vol, snap } => !shows(&format!("{vol}@{snap}")),
        Op::Flush { .. } | Op::Write { .. } | Op::Zero { .. } | Op::Grow { .. } => false,
        Op::Resize { name, sectors } => {
            let old = (m.devs[name].sectors() * SECTOR) as u64;
            match listed.get(name) {
                Some(&s) if s == (sectors * SECTOR) as u64 => true,
                Some(&s) if s == old => false,
                other => {
                    return Err(format!(
                        "{name} has size {other:?} after a crash in resize({name}, {}): want {old} or {}",
                        sectors * SECTOR,
                        sectors * SECTOR
                    ));
                }
            }
        }
        Op::DeleteVolume { name } => {
            // Snapshots go first, one commit each, in creation order, then
            // the volume.
            let gone: Vec<bool> = inflight.snaps.iter().map(|s| !shows(s)).collect();
            if let Some(i) = gone.windows(2).position(|w| !w[0] && w[1]) {
                return Err(format!(
                    "crash in delete_volume({name}): snapshot {} is gone but {} (deleted before it) is not",
                    inflight.snaps[i + 1],
                    inflight.snaps[i]
                ));
            }
            let vol_gone = !shows(name);
            if vol_gone && gone.iter().any(|g| !g) {
                return Err(format!("crash in delete_volume({name}): the volume is gone but not all its snapshots"));
            }
            if vol_gone || gone.iter().any(|&g| g) {
                v.catalog_reflected = true;
                m.applied += 1;
                m.all_durable();
                for (s, g) in inflight.snaps.iter().zip(&gone) {
                    if *g {
                        m.devs.remove(s);
                    }
                }
                if vol_gone {
                    m.devs.remove(name);
                }
            }
            m.inflight = None;
            return Ok(());
        }
    };
    if reflected {
        v.catalog_reflected = true;
        m.complete(&inflight.op);
        m.inflight = None;
    }
    Ok(())
}

/// Check `pool` against `model`: devices, sizes, every sector. Returns the
/// model resolved against the pool.
async fn verify<B: Backend>(
    pool: &Pool<B>,
    model: &Model,
    expect_grown: &BTreeMap<usize, u64>,
) -> Result<(Model, Verified), String> {
    let mut m = model.clone();
    let mut v = Verified::default();
    let list = pool.list();
    let listed: BTreeMap<String, u64> = list.iter().map(|d| (d.name.clone(), d.size)).collect();
    if listed.len() != list.len() {
        return Err(format!("duplicate device names in {listed:?}"));
    }
    let pool_bytes = pool.stats().total_bytes;
    resolve_inflight(&listed, pool_bytes, expect_grown, &mut m, &mut v)?;
    if m.pool_bytes == 0 {
        // Not known (the verifier's own tests): whatever it is.
        m.pool_bytes = pool_bytes;
    }
    if pool_bytes != m.pool_bytes {
        return Err(format!("the pool has {pool_bytes} bytes, want {} (its last growth)", m.pool_bytes));
    }

    // Devices.
    for (name, dev) in &m.devs {
        let want = (dev.sectors() * SECTOR) as u64;
        match listed.get(name) {
            None => return Err(format!("device {name} is missing")),
            Some(&got) if got != want => return Err(format!("device {name} has size {got}, want {want}")),
            Some(_) => {}
        }
        let kind = list.iter().find(|d| &d.name == name).map(|d| d.kind);
        let want_kind = if dev.snapshot_of.is_some() { DeviceKind::Snapshot } else { DeviceKind::Volume };
        if kind != Some(want_kind) {
            return Err(format!("device {name} is a {kind:?}, want {want_kind:?}"));
        }
    }
    let extra: Vec<&String> = listed.keys().filter(|n| !m.devs.contains_key(*n)).collect();
    if !extra.is_empty() {
        return Err(format!("devices that must not exist (deleted or never created): {extra:?}"));
    }

    // Data: which states (0 = the durable point, up to the crash) explain
    // each sector, and all of them at once.
    let last = m.applied + usize::from(m.inflight.is_some());
    let n = last - m.durable + 1;
    if n > 128 {
        return Err(format!("workload too long for the state mask ({n} states)"));
    }
    let mut all = states(0, n);
    let mut explained_by: Vec<(String, u128)> = Vec::new();
    for (name, dev) in &m.devs {
        let mut buf = vec![0u8; dev.sectors() * SECTOR];
        pool.volume(name)
            .map_err(|e| format!("opening {name}: {e}"))?
            .read(0, &mut buf)
            .await
            .map_err(|e| format!("reading {name}: {e}"))?;
        let mut obs = Vec::with_capacity(dev.sectors());
        for (s, bytes) in buf.chunks_exact(SECTOR).enumerate() {
            obs.push(parse_sector(s, bytes).map_err(|e| format!("{name} sector {s} (byte {}): {e}", s * SECTOR))?);
        }
        // Sweep the changes in order: sector s holds `val[s]` from relative
        // state `since[s]` on.
        let mut val = dev.dur.clone();
        let mut since = vec![0usize; dev.sectors()];
        let mut mask = vec![0u128; dev.sectors()];
        for p in &dev.pending {
            let at = p.state - m.durable;
            for s in p.start..p.end {
                if val[s] == obs[s] {
                    mask[s] |= states(since[s], at);
                }
                val[s] = p.tag;
                since[s] = at;
            }
        }
        let mut dev_mask = states(0, n);
        for s in 0..dev.sectors() {
            if val[s] == obs[s] {
                mask[s] |= states(since[s], n);
            }
            if mask[s] == 0 {
                let written: Vec<u32> =
                    dev.pending.iter().filter(|p| p.start <= s && s < p.end).map(|p| p.tag).collect();
                return Err(format!(
                    "{name} sector {s} (byte {}) reads write #{} (0 = zeros); legal: durable #{} or written since {written:?}",
                    s * SECTOR,
                    obs[s],
                    dev.dur[s]
                ));
            }
            dev_mask &= mask[s];
        }
        if dev_mask == 0 {
            return Err(format!(
                "{name}: every sector is legal on its own but no single point of the workload explains them all (states {}..={last})",
                m.durable
            ));
        }
        explained_by.push((name.clone(), dev_mask));
        v.observed.insert(name.clone(), obs);
        all &= dev_mask;
    }
    if all == 0 {
        let per: Vec<String> = explained_by
            .iter()
            .map(|(n, mask)| {
                let ks: Vec<usize> =
                    (0..n_bits(*mask)).filter(|&k| mask >> k & 1 == 1).map(|k| k + m.durable).collect();
                format!("{n}: states {ks:?}")
            })
            .collect();
        return Err(format!("devices were recovered at different points of the workload (not one commit): {per:?}"));
    }
    v.explained_by = (0..n).filter(|&k| all >> k & 1 == 1).map(|k| k + m.durable).collect();
    Ok((m, v))
}

fn n_bits(mask: u128) -> usize {
    128 - mask.leading_zeros() as usize
}

async fn check_clean<B: Backend>(pool: &Pool<B>, when: &str) -> Result<(), String> {
    let problems = pool.check().await.map_err(|e| format!("check() {when} failed: {e}"))?;
    if !problems.is_empty() {
        return Err(format!("check() {when} found: {problems:#?}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// One crash point.

#[derive(Clone, Copy, Debug, Default)]
struct PointStats {
    class: Option<OpClass>,
    after_end: bool,
    catalog_inflight: bool,
    catalog_reflected: bool,
    grow_inflight: bool,
    grow_reflected: bool,
    fallback: bool,
    tear: TearStats,
    backend_ops: u64,
}

fn data_start_bytes(backend: &CrashBackend) -> Result<u64, String> {
    let sb =
        Superblock::decode(&backend.durable_bytes(0, BLOCK_SIZE)).map_err(|e| format!("new pool's superblock: {e}"))?;
    Ok(sb.data_start * BLOCK_SIZE as u64)
}

fn tear_policy(rng: &mut SmallRng) -> TearPolicy {
    match rng.gen_range(0..8) {
        0 => TearPolicy::KEEP_ALL,
        1 => TearPolicy::DROP_ALL,
        2..=4 => TearPolicy::MIXED,
        _ => TearPolicy::TORN,
    }
}

async fn crash_point(seed: u64, verbose: bool) -> Result<PointStats, String> {
    let params = Params::for_seed(seed);
    let mut stats = PointStats::default();
    if verbose {
        eprintln!("seed {seed}: {} ops, {:?}", params.ops, params.opts);
    }

    // Pass 1: count the backend operations of the whole workload, and check
    // the model against the live pool (no crash).
    let probe = CrashBackend::new(POOL_BYTES);
    probe.set_read_limit(READ_LIMIT);
    let pool = Pool::create(probe.clone(), params.opts.clone()).await.map_err(|e| format!("create: {e}"))?;
    probe.reset_op_count();
    let mut w = Workload::new(seed, false);
    w.model.pool_bytes = pool.stats().total_bytes;
    if let RunEnd::Failed { index, error } = w.run(&pool, params.ops).await {
        return Err(format!("op {index} ({}) failed without a crash: {error}", w.log[index]));
    }
    let total = probe.ops();
    stats.backend_ops = total;
    let expect_grown = std::mem::take(&mut w.grown);
    // The live pool must read exactly the model's current contents.
    verify_live(&pool, &w.model).await.map_err(|e| format!("no crash, live pool: {e}"))?;
    check_clean(&pool, "without a crash").await?;
    drop(pool);

    // Pass 2: the same workload, with the power lost at a random operation.
    let mut crng = SmallRng::seed_from_u64(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0xC4A5);
    let backend = CrashBackend::new(POOL_BYTES);
    backend.set_read_limit(READ_LIMIT);
    let pool = Pool::create(backend.clone(), params.opts.clone()).await.map_err(|e| format!("create: {e}"))?;
    backend.set_data_start(data_start_bytes(&backend)?);
    backend.reset_op_count();
    // Now and then the power goes after the whole workload instead.
    let countdown = if crng.gen_bool(0.02) { total + 1 } else { crng.gen_range(1..=total) };
    backend.crash_at(countdown);
    if verbose {
        eprintln!(
            "seed {seed}: the workload issues {total} backend operations; power is lost at operation {countdown}"
        );
    }
    let mut w = Workload::new(seed, verbose);
    w.model.pool_bytes = pool.stats().total_bytes;
    w.expect_grown = expect_grown;
    let end = w.run(&pool, params.ops).await;
    let crash = backend.crashed();
    for (i, bytes) in &w.grown {
        if w.expect_grown.get(i) != Some(bytes) {
            return Err(format!("op {i} ({}) grew the pool to {bytes} bytes, not as without a crash", w.log[*i]));
        }
    }
    match (&end, &crash) {
        (RunEnd::Failed { index, error }, None) => {
            return Err(format!("op {index} ({}) failed without a crash: {error}", w.log[*index]));
        }
        (RunEnd::Failed { index, error }, Some(c)) => {
            if error.kind() != ErrorKind::Io {
                return Err(format!(
                    "op {index} ({}) hit the power cut ({}) but failed with {:?}: {error}",
                    w.log[*index],
                    c.desc,
                    error.kind()
                ));
            }
            if verbose {
                eprintln!(
                    "seed {seed}: power lost in backend op {} ({}, {:?}) during op {index}: {error}",
                    c.op, c.desc, c.class
                );
            }
            stats.class = Some(c.class);
        }
        (RunEnd::Completed, Some(c)) => {
            return Err(format!(
                "the power was lost in backend op {} ({}) but every operation returned Ok (the last: {})",
                c.op,
                c.desc,
                w.log.last().map(String::as_str).unwrap_or("-")
            ));
        }
        (RunEnd::Completed, None) => {
            if countdown <= total {
                return Err(format!(
                    "the workload issued fewer backend operations ({}) than the first run ({total})",
                    backend.ops()
                ));
            }
            backend.cut_power();
            stats.after_end = true;
            if verbose {
                eprintln!("seed {seed}: the workload completed; power is lost after it");
            }
        }
    }
    drop(pool);
    let policy = tear_policy(&mut crng);
    let (image, tear) = backend.crash_image(&mut crng, policy);
    stats.tear = tear;
    if verbose {
        eprintln!("seed {seed}: crash image with {policy:?}: {tear:?}");
    }

    // Recovery.
    let (pool, report) = Pool::open(MemBackend::from_bytes(image), PoolOptions::default())
        .await
        .map_err(|e| format!("opening the crash image failed: {e}"))?;
    stats.fallback = report.superblock_fallback.is_some();
    if verbose {
        eprintln!("seed {seed}: reopened: {report:?}");
    }
    let (m, v) = verify(&pool, &w.model, &w.expect_grown).await?;
    stats.catalog_inflight = v.catalog_inflight;
    stats.catalog_reflected = v.catalog_reflected;
    stats.grow_inflight = v.grow_inflight;
    stats.grow_reflected = v.grow_reflected;
    if verbose {
        eprintln!(
            "seed {seed}: the recovered pool is the state after the first k ops for k in {:?} (allowed: {}..={}); devices {:?}",
            v.explained_by,
            m.durable,
            m.applied + usize::from(m.inflight.is_some()),
            m.devs.keys().collect::<Vec<_>>()
        );
    }
    check_clean(&pool, "after recovery").await?;

    // Growing the recovered pool takes in what a growth cut by the crash
    // did not, and reaches the size that growth gives; otherwise nothing
    // changes.
    let regrow_to = if v.grow_inflight && !v.grow_reflected { w.expect_grown[&m.applied] } else { m.pool_bytes };
    let r = pool.grow().await.map_err(|e| format!("growing the recovered pool: {e}"))?;
    if pool.stats().total_bytes != regrow_to || r.grew() != (regrow_to != m.pool_bytes) {
        return Err(format!(
            "growing the recovered pool ({} bytes) gave {r:?} and {} bytes, want {regrow_to}",
            m.pool_bytes,
            pool.stats().total_bytes
        ));
    }
    check_clean(&pool, "after growing the recovered pool").await?;

    // The recovered pool is usable: what it read becomes the model.
    let mut m = pin_recovered(m, &v.observed);
    m.pool_bytes = regrow_to;
    let mut tag = 1_000_000 + seed as u32 % 1000;
    for name in m.writable() {
        for _ in 0..2 {
            let sectors = m.devs[&name].sectors();
            let blocks = sectors / SECTORS_PER_BLOCK;
            let start = crng.gen_range(0..blocks) * SECTORS_PER_BLOCK;
            let data = write_data(tag, start, SECTORS_PER_BLOCK);
            pool.volume(&name)
                .map_err(|e| format!("after recovery: {e}"))?
                .write((start * SECTOR) as u64, &data, false)
                .await
                .map_err(|e| format!("write to {name} after recovery: {e}"))?;
            m.set(&name, start, start + SECTORS_PER_BLOCK, tag);
            tag += 1;
        }
    }
    if let Some(vol) = m.writable().first().cloned() {
        let snap = Op::Snapshot { vol: vol.clone(), snap: "after".into() };
        exec(&pool, &snap).await.map_err(|e| format!("snapshot of {vol} after recovery: {e}"))?;
        m.complete(&snap);
    }
    pool.flush().await.map_err(|e| format!("flush after recovery: {e}"))?;
    m.applied += 1;
    m.all_durable();
    verify_live(&pool, &m).await.map_err(|e| format!("after recovery and more writes: {e}"))?;
    check_clean(&pool, "after recovery and more writes").await?;
    // A restart on the same bytes.
    let same = pool.backend().clone();
    drop(pool);
    let (pool, _) =
        Pool::open(same, PoolOptions::default()).await.map_err(|e| format!("reopening the recovered pool: {e}"))?;
    verify_live(&pool, &m).await.map_err(|e| format!("reopening the recovered pool: {e}"))?;
    check_clean(&pool, "reopening the recovered pool").await?;
    Ok(stats)
}

/// `verify` for a pool with no crash behind it: exact contents.
async fn verify_live<B: Backend>(pool: &Pool<B>, m: &Model) -> Result<(), String> {
    let mut exact = m.clone();
    exact.inflight = None;
    exact.all_durable();
    verify(pool, &exact, &BTreeMap::new()).await.map(drop)
}

/// Make what the recovered pool read (verified legal) the model's contents,
/// so later checks are exact.
fn pin_recovered(mut m: Model, observed: &BTreeMap<String, Vec<u32>>) -> Model {
    for (name, dev) in m.devs.iter_mut() {
        dev.cur.clone_from(&observed[name]);
        dev.dur.clone_from(&dev.cur);
        dev.pending.clear();
    }
    m.inflight = None;
    m.durable = m.applied;
    m
}

// ---------------------------------------------------------------------------
// The driver.

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

fn run_seed(seed: u64, verbose: bool) -> Result<PointStats, String> {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("tokio runtime");
    match std::panic::catch_unwind(AssertUnwindSafe(|| rt.block_on(crash_point(seed, verbose)))) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            Err(format!("panicked: {msg}"))
        }
    }
}

#[derive(Default)]
struct Totals {
    points: u64,
    backend_ops: u64,
    by_class: BTreeMap<String, u64>,
    in_commit: u64,
    outside_commit: u64,
    after_end: u64,
    catalog_inflight: u64,
    catalog_reflected: u64,
    grow_inflight: u64,
    grow_reflected: u64,
    fallback: u64,
    torn_images: u64,
    failures: Vec<(u64, String)>,
}

impl Totals {
    fn add(&mut self, s: &PointStats) {
        self.points += 1;
        self.backend_ops += s.backend_ops;
        match s.class {
            Some(c) => {
                *self.by_class.entry(format!("{c:?}")).or_default() += 1;
                if c.in_commit() {
                    self.in_commit += 1;
                } else {
                    self.outside_commit += 1;
                }
            }
            None => self.after_end += 1,
        }
        self.catalog_inflight += u64::from(s.catalog_inflight);
        self.catalog_reflected += u64::from(s.catalog_reflected);
        self.grow_inflight += u64::from(s.grow_inflight);
        self.grow_reflected += u64::from(s.grow_reflected);
        self.fallback += u64::from(s.fallback);
        self.torn_images += u64::from(s.tear.torn > 0);
    }
}

#[test]
fn crash_at_every_point_recovers_a_consistent_pool() {
    if let Some(seed) = env_u64("KEEL_CRASH_SEED") {
        let r = run_seed(seed, true);
        eprintln!("seed {seed}: {r:?}");
        if let Err(e) = r {
            panic!("crash consistency failed for seed {seed}: {e}");
        }
        return;
    }
    let iterations = env_u64("KEEL_CRASH_ITERATIONS").unwrap_or(DEFAULT_ITERATIONS);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8);
    let next = AtomicU64::new(0);
    let totals = Mutex::new(Totals::default());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= iterations {
                        break;
                    }
                    let r = run_seed(seed, false);
                    let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
                    match r {
                        Ok(s) => t.add(&s),
                        Err(e) => {
                            eprintln!("crash consistency FAILED at seed {seed} (KEEL_CRASH_SEED={seed}): {e}");
                            t.failures.push((seed, e));
                            t.points += 1;
                        }
                    }
                }
            });
        }
    });
    let t = totals.into_inner().unwrap_or_else(|e| e.into_inner());
    let elapsed: Duration = started.elapsed();
    eprintln!(
        "crash_consistency: {} crash points in {:.1}s ({} threads; {} backend ops in the workloads): \
         {} inside a commit {:?}, {} in data writes, {} after the workload; \
         {} in a catalog op ({} of them reflected after recovery); \
         {} in a growth ({} of them at the new size after recovery); \
         {} torn images; {} opened on the older superblock; {} failed",
        t.points,
        elapsed.as_secs_f64(),
        threads,
        t.backend_ops,
        t.in_commit,
        t.by_class,
        t.outside_commit,
        t.after_end,
        t.catalog_inflight,
        t.catalog_reflected,
        t.grow_inflight,
        t.grow_reflected,
        t.torn_images,
        t.fallback,
        t.failures.len(),
    );
    if !t.failures.is_empty() {
        let mut seeds: Vec<u64> = t.failures.iter().map(|(s, _)| *s).collect();
        seeds.sort_unstable();
        let (first, msg) = t.failures.iter().min_by_key(|(s, _)| *s).expect("a failure");
        panic!(
            "{} of {} crash points failed (seeds {seeds:?}); first: seed {first}: {msg}\nreproduce with KEEL_CRASH_SEED={first}",
            t.failures.len(),
            t.points
        );
    }
    // The run must have exercised what it claims to.
    assert_eq!(t.points, iterations);
    if iterations >= 500 {
        assert!(t.in_commit > iterations / 10, "too few crashes inside a commit: {}", t.in_commit);
        assert!(t.outside_commit > iterations / 10, "too few crashes in data writes: {}", t.outside_commit);
        for class in ["SuperblockWrite", "SuperblockSync", "PreCommitSync", "MetadataWrite", "DataWrite"] {
            assert!(t.by_class.get(class).copied().unwrap_or(0) > 0, "no crash landed in a {class}");
        }
        assert!(t.fallback > 0, "no crash image tore the newest superblock");
        assert!(t.catalog_reflected > 0 && t.catalog_reflected < t.catalog_inflight);
        assert!(
            t.grow_reflected > 0 && t.grow_reflected < t.grow_inflight,
            "crashes in growths: {} ({} at the new size)",
            t.grow_inflight,
            t.grow_reflected
        );
    }
}

// ---------------------------------------------------------------------------
// The harness itself must be able to fail.

#[test]
fn crash_backend_keeps_only_synced_writes_for_sure() {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(async {
        let b = CrashBackend::new(4 * BLOCK_SIZE);
        b.write_at(&[1u8; BLOCK_SIZE], 0).await.unwrap();
        b.sync().await.unwrap();
        b.write_at(&[2u8; 2 * BLOCK_SIZE], BLOCK_SIZE as u64).await.unwrap();
        let mut r = vec![0u8; 3 * BLOCK_SIZE];
        b.read_at(&mut r, 0).await.unwrap();
        assert!(r[..BLOCK_SIZE].iter().all(|&x| x == 1) && r[BLOCK_SIZE..].iter().all(|&x| x == 2));
        b.crash_at(2);
        b.write_at(&[3u8; BLOCK_SIZE], 3 * BLOCK_SIZE as u64).await.unwrap();
        assert!(b.sync().await.is_err(), "the countdown must fail the second operation");
        assert!(b.read_at(&mut r, 0).await.is_err(), "reads fail once the power is lost");
        assert!(b.write_at(&[4u8; BLOCK_SIZE], 0).await.is_err());
        let mut rng = SmallRng::seed_from_u64(1);
        let (img, _) = b.crash_image(&mut rng, TearPolicy::DROP_ALL);
        assert!(img[..BLOCK_SIZE].iter().all(|&x| x == 1), "synced data survives");
        assert!(img[BLOCK_SIZE..].iter().all(|&x| x == 0), "unsynced data is dropped");
        let (img, _) = b.crash_image(&mut rng, TearPolicy::KEEP_ALL);
        assert!(img[3 * BLOCK_SIZE..].iter().all(|&x| x == 3));
        // Torn images hold every sector from one of its versions, and over
        // many draws some are torn inside a block.
        let mut torn_blocks = 0;
        for _ in 0..50 {
            let (img, st) = b.crash_image(&mut rng, TearPolicy::TORN);
            torn_blocks += st.torn_blocks;
            for (i, s) in img.chunks(SECTOR).enumerate() {
                let v = s[0];
                assert!(s.iter().all(|&x| x == v), "sector {i} is torn inside");
                let ok = match i / SECTORS_PER_BLOCK {
                    0 => v == 1,
                    1 | 2 => v == 0 || v == 2,
                    _ => v == 0 || v == 3,
                };
                assert!(ok, "sector {i} holds {v}");
            }
        }
        assert!(torn_blocks > 0);
    });
}

#[test]
fn verifier_rejects_lost_flushes_wrong_data_and_resurrected_devices() {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(async {
        let backend = CrashBackend::new(POOL_BYTES);
        let opts = PoolOptions { catalog_pages: 2, ..PoolOptions::default() };
        let pool = Pool::create(backend.clone(), opts).await.unwrap();
        let mut m = Model::new();
        let ops = [
            Op::Create { name: "v0".into(), sectors: 512 },
            Op::Write { dev: "v0".into(), start: 8, len: 16, tag: 1, fua: false },
            Op::Flush { via: None },
        ];
        for op in &ops {
            m.begin(op);
            exec(&pool, op).await.unwrap();
            m.complete(op);
        }
        let before_write = backend.durable_image();
        let ops2 = [
            Op::Write { dev: "v0".into(), start: 8, len: 8, tag: 2, fua: false },
            Op::Flush { via: None },
            Op::Create { name: "v1".into(), sectors: 64 },
        ];
        let mut m2 = m.clone();
        for op in &ops2 {
            m2.begin(op);
            exec(&pool, op).await.unwrap();
            m2.complete(op);
        }
        let now = backend.durable_image();
        let reopen =
            |b: Vec<u8>| async move { Pool::open(MemBackend::from_bytes(b), PoolOptions::default()).await.unwrap().0 };

        // The true image passes.
        verify_with(&reopen(now.clone()).await, &m2).await.expect("the real image must verify");
        // An image that lost the flushed write (and the created volume) fails.
        let err = verify_with(&reopen(before_write.clone()).await, &m2).await.err().expect("lost flush must fail");
        assert!(err.contains("missing") || err.contains("sector"), "{err}");
        // Same with the volume there: the sector check catches the lost write.
        let mut m3 = m2.clone();
        m3.devs.remove("v1");
        let err = verify_with(&reopen(before_write).await, &m3).await.err().expect("lost flush must fail");
        assert!(err.contains("sector 8"), "{err}");
        // A device the model says was deleted must not exist.
        let mut m4 = m2.clone();
        m4.devs.remove("v0");
        let err = verify_with(&reopen(now.clone()).await, &m4).await.err().expect("resurrected device must fail");
        assert!(err.contains("must not exist"), "{err}");
        // Wrong data: sector contents swapped by the store would fail.
        let p = reopen(now.clone()).await;
        p.volume("v0").unwrap().write(0, &write_data(1, 8, 1), false).await.unwrap();
        let err = verify_with(&p, &m2).await.err().expect("misplaced data must fail");
        assert!(err.contains("found at sector 0"), "{err}");
        // Two acknowledged, unflushed writes to two volumes; the image holds
        // the later one but not the earlier one. Each sector is legal on its
        // own; together they are no point of the workload (a commit that is
        // not atomic).
        let mut m5 = m2.clone();
        let earlier = Op::Write { dev: "v0".into(), start: 100, len: 8, tag: 10, fua: false };
        let later = Op::Write { dev: "v1".into(), start: 0, len: 8, tag: 11, fua: false };
        for op in [&earlier, &later] {
            m5.begin(op);
            m5.complete(op);
        }
        let p = reopen(now.clone()).await;
        exec(&p, &later).await.unwrap();
        let err = verify_with(&p, &m5).await.err().expect("a later write without an earlier one must fail");
        assert!(err.contains("different points"), "{err}");
        // With both, or with neither, it verifies.
        exec(&p, &earlier).await.unwrap();
        verify_with(&p, &m5).await.expect("both writes landed");
        verify_with(&reopen(now.clone()).await, &m5).await.expect("neither write landed");
    });
}

async fn verify_with<B: Backend>(pool: &Pool<B>, model: &Model) -> Result<(Model, Verified), String> {
    verify(pool, model, &BTreeMap::new()).await
}

// ---------------------------------------------------------------------------
// Damaged superblocks and catalog pages.

fn superblock_generation(bytes: &[u8], copy: usize) -> Option<u64> {
    Superblock::decode(&bytes[copy * BLOCK_SIZE..(copy + 1) * BLOCK_SIZE]).ok().map(|s| s.generation)
}

/// Generation stored in a region page copy's header (valid or not).
fn region_generation(bytes: &[u8], block: u64) -> u64 {
    let at = block as usize * BLOCK_SIZE + 8;
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

async fn read_all(pool: &Pool<MemBackend>, name: &str) -> Result<Vec<u8>, Error> {
    let v = pool.volume(name)?;
    let mut buf = vec![0u8; v.size() as usize];
    v.read(0, &mut buf).await?;
    Ok(buf)
}

#[tokio::test]
async fn torn_or_corrupt_superblock_is_detected() {
    const VOL: usize = 1 << 20;
    let opts = PoolOptions { catalog_pages: 2, ..PoolOptions::default() };
    let backend = MemBackend::new(POOL_BYTES as u64);
    let pool = Pool::create(backend.clone(), opts).await.unwrap();
    let v = pool.create_volume("v", VOL as u64).await.unwrap();
    let mut states: Vec<(u64, Vec<u8>)> = Vec::new(); // (generation, contents) per flush
    let mut model = vec![0u8; VOL];
    for (i, off) in [0usize, 65536, 131072, 0].into_iter().enumerate() {
        let data = common::pattern(100 + i as u64, 16384);
        v.write(off as u64, &data, false).await.unwrap();
        model[off..off + data.len()].copy_from_slice(&data);
        pool.flush().await.unwrap();
        let g =
            Pool::open(MemBackend::from_bytes(backend.snapshot()), PoolOptions::default()).await.unwrap().1.generation;
        states.push((g, model.clone()));
    }
    drop(v);
    drop(pool);
    let clean = backend.snapshot();
    let (newest, newest_data) = states.last().cloned().unwrap();
    let (older, older_data) = states[states.len() - 2].clone();
    assert_eq!(older + 1, newest, "each flush is one commit");
    assert_eq!(superblock_generation(&clean, (newest % 2) as usize), Some(newest));
    assert_eq!(superblock_generation(&clean, (older % 2) as usize), Some(older));

    // The undamaged image opens at the newest generation.
    let (p, report) = Pool::open(MemBackend::from_bytes(clean.clone()), PoolOptions::default()).await.unwrap();
    assert_eq!(report.generation, newest);
    assert!(report.superblock_fallback.is_none());
    assert!(read_all(&p, "v").await.unwrap() == newest_data);
    drop(p);

    // (a) The newest superblock copy damaged (a flipped bit, or torn: its
    // last sectors from the copy it replaced) opens at the older generation
    // with the data of the older commit, and the pool works on from there.
    let newest_block = (newest % 2) as usize * BLOCK_SIZE;
    let older_block = (older % 2) as usize * BLOCK_SIZE;
    let flip = |b: &mut Vec<u8>| b[newest_block + 200] ^= 0x40;
    let tear = |b: &mut Vec<u8>| {
        let old: Vec<u8> = b[older_block + 2048..older_block + BLOCK_SIZE].to_vec();
        b[newest_block + 2048..newest_block + BLOCK_SIZE].copy_from_slice(&old);
    };
    for (what, damage) in [("flipped bit", &flip as &dyn Fn(&mut Vec<u8>)), ("torn write", &tear)] {
        let mem = MemBackend::from_bytes(clean.clone());
        mem.with_bytes_mut(|b| damage(b));
        let (p, report) =
            Pool::open(mem.clone(), PoolOptions::default()).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(report.generation, older, "{what}");
        let why = report.superblock_fallback.clone().unwrap_or_else(|| panic!("{what}: no fallback reported"));
        assert!(why.contains("checksum"), "{what}: {why}");
        assert!(read_all(&p, "v").await.unwrap() == older_data, "{what}: data of the older commit");
        assert_consistent(&p, what).await;
        let more = common::pattern(7, 8192);
        p.volume("v").unwrap().write(4096, &more, false).await.unwrap();
        p.flush().await.unwrap();
        let mut want = older_data.clone();
        want[4096..4096 + 8192].copy_from_slice(&more);
        drop(p);
        let (p, report) = Pool::open(MemBackend::from_bytes(mem.snapshot()), PoolOptions::default()).await.unwrap();
        assert!(report.superblock_fallback.is_none(), "{what}: the next commit rewrote the damaged copy");
        assert!(read_all(&p, "v").await.unwrap() == want, "{what}: data after a commit on the older generation");
        assert_consistent(&p, what).await;
    }

    // (b) Both copies damaged: a Format error that says so.
    let mem = MemBackend::from_bytes(clean.clone());
    mem.with_bytes_mut(|b| {
        b[100] ^= 1;
        b[BLOCK_SIZE + 100] ^= 1;
    });
    let err = Pool::open(mem, PoolOptions::default()).await.err().expect("both superblocks damaged must not open");
    assert_eq!(err.kind(), ErrorKind::Format, "{err}");
    assert!(err.to_string().contains("superblock"), "{err}");

    // (c) Both copies of catalog page 0 (the one holding "v") damaged: a
    // Format error naming the page. (One damaged copy: see
    // `damaged_newest_catalog_copy_is_not_silently_used`.)
    let sb = Superblock::decode(&clean[..BLOCK_SIZE]).unwrap();
    let copies = [sb.catalog_block(0, 0), sb.catalog_block(1, 0)];
    let mem = MemBackend::from_bytes(clean.clone());
    mem.with_bytes_mut(|b| {
        b[copies[0] as usize * BLOCK_SIZE + 300] ^= 0x08;
        b[copies[1] as usize * BLOCK_SIZE + 300] ^= 0x08;
    });
    let err = Pool::open(mem, PoolOptions::default()).await.err().expect("both catalog copies damaged must not open");
    assert_eq!(err.kind(), ErrorKind::Format, "{err}");
    assert!(err.to_string().contains("catalog page 0"), "{err}");
}

/// Case (c) of `torn_or_corrupt_superblock_is_detected` with one copy
/// damaged: the newest copy of a catalog page is damaged. Found by this file
/// (the pool used to open silently on the older copy, losing a flushed write
/// and leaving counts that freed blocks still in use); the slot map now says
/// which copy is current, and a damaged current copy refuses the pool.
#[tokio::test]
async fn damaged_newest_catalog_copy_is_not_silently_used() {
    let opts = PoolOptions { catalog_pages: 2, ..PoolOptions::default() };
    let backend = MemBackend::new(POOL_BYTES as u64);
    let pool = Pool::create(backend.clone(), opts).await.unwrap();
    let v = pool.create_volume("v", 1 << 20).await.unwrap();
    v.write(0, &common::pattern(1, 16384), false).await.unwrap();
    pool.flush().await.unwrap();
    v.write(0, &common::pattern(2, 16384), false).await.unwrap();
    pool.flush().await.unwrap();
    drop(v);
    drop(pool);
    let clean = backend.snapshot();
    let sb = Superblock::decode(&clean[..BLOCK_SIZE]).unwrap();
    let copies = [sb.catalog_block(0, 0), sb.catalog_block(1, 0)];
    let gens = copies.map(|c| region_generation(&clean, c));
    let newest = if gens[0] >= gens[1] { copies[0] } else { copies[1] };
    let mem = MemBackend::from_bytes(clean);
    mem.with_bytes_mut(|b| b[newest as usize * BLOCK_SIZE + 300] ^= 0x08);
    match Pool::open(mem, PoolOptions::default()).await {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Format, "{e}"),
        Ok((p, report)) => {
            let mut buf = vec![0u8; 16384];
            let read = p.volume("v").unwrap().read(0, &mut buf).await;
            assert!(
                !(read.is_ok() && buf == common::pattern(1, 16384)),
                "catalog page 0 copies have generations {gens:?}; with the newest damaged the pool opened \
                 ({report:?}) and v silently reads the data the last flush replaced"
            );
            let problems = p.check().await.unwrap();
            assert!(problems.is_empty(), "opened with inconsistent counts: {problems:#?}");
        }
    }
}

/// The same for a refcount page: opening on older counts would let the next
/// write take the blocks of the last flushed write. Opening must refuse
/// (Format) or recover consistent counts.
#[tokio::test]
async fn damaged_newest_refcount_copy_is_not_silently_used() {
    let opts = PoolOptions { catalog_pages: 2, ..PoolOptions::default() };
    let backend = MemBackend::new(POOL_BYTES as u64);
    let pool = Pool::create(backend.clone(), opts).await.unwrap();
    let v = pool.create_volume("v", 1 << 20).await.unwrap();
    v.write(0, &common::pattern(1, 16384), false).await.unwrap();
    pool.flush().await.unwrap();
    v.write(65536, &common::pattern(2, 16384), false).await.unwrap();
    pool.flush().await.unwrap();
    drop(v);
    drop(pool);
    let clean = backend.snapshot();
    let sb = Superblock::decode(&clean[..BLOCK_SIZE]).unwrap();
    let copies = [sb.refcount_block(0, 0), sb.refcount_block(1, 0)];
    let gens = copies.map(|c| region_generation(&clean, c));
    let newest = if gens[0] >= gens[1] { copies[0] } else { copies[1] };
    let mem = MemBackend::from_bytes(clean);
    mem.with_bytes_mut(|b| b[newest as usize * BLOCK_SIZE + 3000] ^= 0x08);
    match Pool::open(mem, PoolOptions::default()).await {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Format, "{e}"),
        Ok((p, report)) => {
            let problems = p.check().await.unwrap();
            assert!(
                problems.is_empty(),
                "refcount page 0 copies have generations {gens:?}; with the newest damaged the pool opened \
                 ({report:?}) on the older counts: {problems:#?}"
            );
        }
    }
}

async fn assert_consistent(pool: &Pool<MemBackend>, what: &str) {
    let problems = pool.check().await.unwrap();
    assert!(problems.is_empty(), "{what}: {problems:#?}");
}

// ---------------------------------------------------------------------------
// Found by this file: map lookups used to livelock with a small page cache.

/// The page cache shard of a pool block (`cache.rs`: Fibonacci hashing).
fn cache_shard(block: u64) -> u64 {
    (block.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) % 16
}

/// Found by the crash workload (seeds with a 64 KiB cache): with one page per
/// cache shard, a lookup whose root and leaf pages share a shard used to loop
/// forever (loading the leaf evicted the root and back). Lookups now hold the
/// pages they loaded across the retry, and the cache keeps at least a few
/// pages a shard. The read limit of `CrashBackend` turns an endless loop into
/// an error.
#[test]
fn map_lookup_with_a_small_page_cache_makes_progress() {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(async {
        const MIB: u64 = 1 << 20;
        const LEAVES: u64 = 64;
        let opts = PoolOptions { catalog_pages: 2, ..PoolOptions::default() };
        let pool = Pool::create(MemBackend::new(POOL_BYTES as u64), opts).await.unwrap();
        let v = pool.create_volume("v", LEAVES * MIB).await.unwrap();
        for i in 0..LEAVES {
            v.write(i * MIB, &common::pattern(i, BLOCK_SIZE), false).await.unwrap();
        }
        pool.flush().await.unwrap();
        let image = pool.backend().snapshot();
        drop(v);
        drop(pool);

        // Where the map pages are (from the on-disk format).
        let sb = Superblock::decode(&image[..BLOCK_SIZE]).unwrap();
        let cat = |slot: u8| {
            let at = sb.catalog_block(slot, 0) as usize * BLOCK_SIZE;
            (region_generation(&image, sb.catalog_block(slot, 0)), at)
        };
        let (_, at) = [cat(0), cat(1)].into_iter().max().unwrap();
        let rec = keel_blockstore::format::DeviceRecord::decode(&image[at + 16..at + 16 + 128]).unwrap().unwrap();
        let root = rec.root.phys;
        let root_page =
            keel_blockstore::format::decode_page(&image[root as usize * BLOCK_SIZE..(root as usize + 1) * BLOCK_SIZE]);
        let same_shard: Vec<u64> =
            (0..LEAVES).filter(|&i| cache_shard(root_page[i as usize].phys) == cache_shard(root)).collect();

        let backend = CrashBackend::from_bytes(image);
        backend.set_read_limit(10_000);
        let small = PoolOptions { cache_bytes: 16 * BLOCK_SIZE, ..PoolOptions::default() };
        let (pool, _) = Pool::open(backend.clone(), small).await.unwrap();
        let v = pool.volume("v").unwrap();
        for i in 0..LEAVES {
            let mut buf = vec![0u8; BLOCK_SIZE];
            let before = backend.reads();
            let r = v.read(i * MIB, &mut buf).await;
            assert!(
                r.is_ok(),
                "reading 4 KiB at {i} MiB took {} backend reads and failed: {:?} \
                 (root page {root} and the leaf pages of MiB {same_shard:?} share cache shard {})",
                backend.reads() - before,
                r.err().map(|e| format!("{e}: {:?}", std::error::Error::source(&e))),
                cache_shard(root)
            );
            assert!(buf == common::pattern(i, BLOCK_SIZE), "MiB {i} reads wrong data");
        }
    });
}
