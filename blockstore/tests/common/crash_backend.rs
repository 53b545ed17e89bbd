//! A fault-injecting [`Backend`] for crash tests: it models a disk with a
//! volatile write cache and loses power after a chosen number of operations.
//!
//! * `write_at` lands in the cache: reads see it at once, but it is not
//!   durable. `sync` makes every write completed before it durable.
//! * Every `write_at` and every `sync` counts as one operation. When the
//!   countdown reaches zero the power is lost: that operation and every
//!   later one (reads included) fail with an I/O error. The write that was
//!   in flight when the power went may still reach the platter.
//! * [`CrashBackend::crash_image`] computes what the disk holds after the
//!   power cut: the durable bytes plus a random subset of the writes since
//!   the last sync, each kept, dropped or torn (only some of its 4 KiB blocks
//!   applied, and a 4 KiB block only partly applied at 512-byte sectors).
//!
//! Clones share one state, so a test keeps a clone to take the image after
//! the store has failed.

#![allow(dead_code)]

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use keel_blockstore::{BLOCK_SIZE, Backend};
use rand::Rng;

const SECTOR: usize = 512;

/// Where an operation fell, judged from the commit protocol's I/O pattern
/// (`pool.rs`: data blocks are written before a commit; a commit writes
/// catalog/refcount pages and map pages, syncs, writes one superblock copy
/// and syncs again). Only by offset: the metadata of a pool's extensions
/// (`Pool::grow`) lies past the data area's start and is classed as data
/// and map page writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpClass {
    /// A data block write outside a commit.
    DataWrite,
    /// A catalog or refcount page write (inside a commit).
    MetadataWrite,
    /// A data-area write after a metadata write and before the sync: a map
    /// page of a commit.
    MapPageWrite,
    /// The sync before the commit point.
    PreCommitSync,
    /// The superblock write (the commit point).
    SuperblockWrite,
    /// The sync after the superblock write.
    SuperblockSync,
}

impl OpClass {
    /// True for operations of a commit.
    pub fn in_commit(self) -> bool {
        self != OpClass::DataWrite
    }
}

/// The operation at which the power was lost.
#[derive(Clone, Debug)]
pub struct CrashInfo {
    /// 1-based index of the operation (counted since the last reset).
    pub op: u64,
    /// Its class.
    pub class: OpClass,
    /// `write 4096 bytes at 40960` or `sync`.
    pub desc: String,
}

/// How the writes since the last sync fare in the power cut.
#[derive(Clone, Copy, Debug)]
pub struct TearPolicy {
    /// Probability that a write lands whole.
    pub keep: f64,
    /// Probability that a write is lost whole (the rest are torn).
    pub drop: f64,
}

impl TearPolicy {
    /// Every unsynced write lands whole.
    pub const KEEP_ALL: TearPolicy = TearPolicy { keep: 1.0, drop: 0.0 };
    /// Every unsynced write is lost.
    pub const DROP_ALL: TearPolicy = TearPolicy { keep: 0.0, drop: 1.0 };
    /// A mix of whole, lost and torn writes.
    pub const MIXED: TearPolicy = TearPolicy { keep: 0.4, drop: 0.3 };
    /// Mostly torn writes.
    pub const TORN: TearPolicy = TearPolicy { keep: 0.15, drop: 0.15 };
}

/// What [`CrashBackend::crash_image`] did with the unsynced writes.
#[derive(Clone, Copy, Debug, Default)]
pub struct TearStats {
    /// Writes since the last sync (the one in flight included).
    pub volatile: usize,
    /// Landed whole.
    pub kept: usize,
    /// Lost whole.
    pub dropped: usize,
    /// Landed in part.
    pub torn: usize,
    /// 4 KiB blocks that landed in part (some sectors only).
    pub torn_blocks: usize,
}

struct State {
    /// What reads see: the durable bytes with every write since the last
    /// sync applied in order.
    live: Vec<u8>,
    /// Writes since the last sync, in order: (offset, bytes, the bytes they
    /// replaced in `live`; `None` for the write power was lost in, which
    /// `live` never saw). Undoing them all gives the durable bytes.
    volatile: Vec<(u64, Vec<u8>, Option<Vec<u8>>)>,
    /// Operations counted since the last reset.
    ops: u64,
    /// Reads so far, and the most allowed (a store that loops forever on
    /// reads gets an error instead of hanging the test).
    reads: u64,
    read_limit: u64,
    /// Operations left before the power is lost (`Some(1)`: the next fails).
    countdown: Option<u64>,
    crashed: Option<CrashInfo>,
    /// First byte of the data area (`u64::MAX` until known: every write
    /// past the superblocks then counts as metadata).
    data_start: u64,
    /// A catalog or refcount page was written since the last sync.
    metadata_since_sync: bool,
    /// The last operation was a superblock write.
    after_superblock: bool,
}

impl State {
    fn classify_write(&self, offset: u64) -> OpClass {
        if offset < 2 * BLOCK_SIZE as u64 {
            OpClass::SuperblockWrite
        } else if offset < self.data_start {
            OpClass::MetadataWrite
        } else if self.metadata_since_sync {
            OpClass::MapPageWrite
        } else {
            OpClass::DataWrite
        }
    }

    /// The durable bytes: `live` with the unsynced writes undone.
    fn durable(&self) -> Vec<u8> {
        let mut image = self.live.clone();
        for (offset, _, old) in self.volatile.iter().rev() {
            if let Some(old) = old {
                let at = *offset as usize;
                image[at..at + old.len()].copy_from_slice(old);
            }
        }
        image
    }

    /// Count one operation; true when it is the one the power is lost in.
    fn tick(&mut self) -> bool {
        self.ops += 1;
        match &mut self.countdown {
            Some(n) => {
                *n -= 1;
                *n == 0
            }
            None => false,
        }
    }
}

fn power_lost() -> io::Error {
    io::Error::other("power lost (CrashBackend)")
}

fn range(offset: u64, len: usize, total: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let end = start.checked_add(len).filter(|&e| e <= total).ok_or_else(|| {
        io::Error::new(io::ErrorKind::UnexpectedEof, format!("I/O at {offset}+{len} beyond end {total}"))
    })?;
    Ok(start..end)
}

/// The fault-injecting backend. Cloning shares the same disk.
#[derive(Clone)]
pub struct CrashBackend {
    state: Arc<Mutex<State>>,
}

impl CrashBackend {
    /// A zeroed disk of `len` bytes with power that never fails.
    pub fn new(len: usize) -> CrashBackend {
        CrashBackend::from_bytes(vec![0; len])
    }

    /// A disk holding `bytes` (all durable).
    pub fn from_bytes(bytes: Vec<u8>) -> CrashBackend {
        CrashBackend {
            state: Arc::new(Mutex::new(State {
                live: bytes,
                volatile: Vec::new(),
                ops: 0,
                reads: 0,
                read_limit: u64::MAX,
                countdown: None,
                crashed: None,
                data_start: u64::MAX,
                metadata_since_sync: false,
                after_superblock: false,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tell the classifier where the data area starts (in bytes).
    pub fn set_data_start(&self, bytes: u64) {
        self.lock().data_start = bytes;
    }

    /// Start counting operations from zero.
    pub fn reset_op_count(&self) {
        self.lock().ops = 0;
    }

    /// Operations counted since the last reset.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Fail every read after the first `n` .
    pub fn set_read_limit(&self, n: u64) {
        self.lock().read_limit = n;
    }

    /// Reads so far.
    pub fn reads(&self) -> u64 {
        self.lock().reads
    }

    /// Lose power in the `n`-th operation from now (`n >= 1`).
    pub fn crash_at(&self, n: u64) {
        assert!(n >= 1, "the countdown counts operations from 1");
        self.lock().countdown = Some(n);
    }

    /// Lose power now, between operations (recorded with the op count so
    /// far and, for want of a better one, the class `DataWrite`).
    pub fn cut_power(&self) {
        let mut s = self.lock();
        if s.crashed.is_none() {
            let op = s.ops;
            s.crashed = Some(CrashInfo { op, class: OpClass::DataWrite, desc: "between operations".into() });
        }
    }

    /// Make the disk `len` bytes long, zeros at the end (a device that
    /// grew; the new size is durable at once, as an `lvextend` is). Not an
    /// operation of the countdown.
    pub fn grow_to(&self, len: usize) {
        let mut s = self.lock();
        assert!(len >= s.live.len(), "the crash disk only grows");
        // Not `resize`, which goes byte by byte in an unoptimized build.
        let mut grown = vec![0u8; len];
        grown[..s.live.len()].copy_from_slice(&s.live);
        s.live = grown;
    }

    /// Where the power was lost, if it was.
    pub fn crashed(&self) -> Option<CrashInfo> {
        self.lock().crashed.clone()
    }

    /// `len` durable bytes at `offset` (the superblock, say).
    pub fn durable_bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        let s = self.lock();
        let mut out = s.live[offset..offset + len].to_vec();
        for (at, _, old) in s.volatile.iter().rev() {
            let (at, old) = match old {
                Some(old) => (*at as usize, old),
                None => continue,
            };
            let (lo, hi) = (at.max(offset), (at + old.len()).min(offset + len));
            if lo < hi {
                out[lo - offset..hi - offset].copy_from_slice(&old[lo - at..hi - at]);
            }
        }
        out
    }

    /// The bytes that survive a power cut for sure.
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable()
    }

    /// What the disk holds after the power cut: the durable bytes plus each
    /// unsynced write (in order) kept, dropped or torn as `policy` and `rng`
    /// decide.
    pub fn crash_image(&self, rng: &mut impl Rng, policy: TearPolicy) -> (Vec<u8>, TearStats) {
        let s = self.lock();
        let mut image = s.durable();
        let mut stats = TearStats { volatile: s.volatile.len(), ..TearStats::default() };
        for (offset, bytes, _) in &s.volatile {
            let at = *offset as usize;
            let roll: f64 = rng.r#gen();
            if roll < policy.keep {
                stats.kept += 1;
                image[at..at + bytes.len()].copy_from_slice(bytes);
                continue;
            }
            if roll < policy.keep + policy.drop {
                stats.dropped += 1;
                continue;
            }
            stats.torn += 1;
            let blocks: Vec<(usize, &[u8])> =
                bytes.chunks(BLOCK_SIZE).enumerate().map(|(i, b)| (at + i * BLOCK_SIZE, b)).collect();
            let single = blocks.len() == 1;
            for (pos, block) in blocks {
                // A multi-block write tears at block boundaries, sometimes
                // inside a block too; a single block tears at sectors.
                let r: f64 = rng.r#gen();
                if !single && r < 0.4 {
                    image[pos..pos + block.len()].copy_from_slice(block);
                } else if !single && r < 0.8 {
                    // lost
                } else {
                    stats.torn_blocks += 1;
                    for (k, sector) in block.chunks(SECTOR).enumerate() {
                        if rng.gen_bool(0.5) {
                            let p = pos + k * SECTOR;
                            image[p..p + sector.len()].copy_from_slice(sector);
                        }
                    }
                }
            }
        }
        (image, stats)
    }
}

impl Backend for CrashBackend {
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut s = self.lock();
        if s.crashed.is_some() {
            return Err(power_lost());
        }
        s.reads += 1;
        if s.reads > s.read_limit {
            return Err(io::Error::other(format!(
                "read limit of {} exceeded (the store is looping on reads: livelock?)",
                s.read_limit
            )));
        }
        let r = range(offset, buf.len(), s.live.len())?;
        buf.copy_from_slice(&s.live[r]);
        Ok(())
    }

    async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.lock();
        if s.crashed.is_some() {
            return Err(power_lost());
        }
        let r = range(offset, buf.len(), s.live.len())?;
        let class = s.classify_write(offset);
        let crash = s.tick();
        s.after_superblock = class == OpClass::SuperblockWrite;
        if class == OpClass::MetadataWrite {
            s.metadata_since_sync = true;
        }
        if crash {
            // Even the write the power is lost in may reach the platter.
            s.volatile.push((offset, buf.to_vec(), None));
            let op = s.ops;
            s.crashed = Some(CrashInfo { op, class, desc: format!("write {} bytes at {offset}", buf.len()) });
            return Err(power_lost());
        }
        let old = s.live[r.clone()].to_vec();
        s.live[r].copy_from_slice(buf);
        s.volatile.push((offset, buf.to_vec(), Some(old)));
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        let mut s = self.lock();
        if s.crashed.is_some() {
            return Err(power_lost());
        }
        let class = if s.after_superblock { OpClass::SuperblockSync } else { OpClass::PreCommitSync };
        if s.tick() {
            let op = s.ops;
            s.crashed = Some(CrashInfo { op, class, desc: "sync".into() });
            return Err(power_lost());
        }
        s.volatile.clear();
        s.metadata_since_sync = false;
        s.after_superblock = false;
        Ok(())
    }

    fn len(&self) -> u64 {
        self.lock().live.len() as u64
    }

    fn refresh_len(&self) -> io::Result<u64> {
        let s = self.lock();
        if s.crashed.is_some() {
            return Err(power_lost());
        }
        Ok(s.live.len() as u64)
    }
}
