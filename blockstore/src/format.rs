//! The on-disk format, byte by byte. All integers are little-endian. The
//! layout is documented in `ARCHITECTURE.md` ("On-disk format"); this module
//! is its only encoder and decoder.
//!
//! ```text
//! block 0            superblock copy 0   (written by even generations)
//! block 1            superblock copy 1   (written by odd generations)
//! slot map copy 0    slot_map_blocks     \ one bit per region page: which
//! slot map copy 1    slot_map_blocks     / copy of it is current
//! catalog slot 0     catalog_pages blocks  \ each catalog page exists twice;
//! catalog slot 1     catalog_pages blocks  / a commit writes the stale copy
//! refcount slot 0    refcount_pages blocks \ same for refcount pages
//! refcount slot 1    refcount_pages blocks /
//! data area          map pages and data blocks, reference counted
//! extension 1        (a pool that grew, format version 2; see [`Extension`])
//! extension 2 ...
//! ```

use std::ops::Range;

use crate::backend::BLOCK_SIZE;
use crate::error::{Error, Result};

/// Magic at the start of a superblock.
pub const SUPER_MAGIC: &[u8; 8] = b"KEELPOOL";
/// Newest format version: a pool that has grown, whose superblock carries an
/// extension table (see [`Extension`]). Bump on any incompatible change, and
/// keep a test that opens the previous version.
pub const FORMAT_VERSION: u32 = 2;
/// The version written for a pool that never grew: its layout is exactly
/// version 1's, so builds that know only version 1 keep opening it, while a
/// grown pool (version 2) is refused by them instead of opened at its old
/// size.
pub const FORMAT_VERSION_UNGROWN: u32 = 1;
/// Magic of a catalog page ("KCAT").
pub const CATALOG_MAGIC: u32 = u32::from_le_bytes(*b"KCAT");
/// Magic of a refcount page ("KREF").
pub const REFCOUNT_MAGIC: u32 = u32::from_le_bytes(*b"KREF");

/// Entries in a map page: 256 entries of 16 bytes fill one block.
pub const FANOUT: usize = 256;
/// log2(FANOUT).
pub const FANOUT_BITS: u32 = 8;
/// Bytes of a region page header (magic, crc, generation).
pub const REGION_HEADER: usize = 16;
/// Device records per catalog page.
pub const RECORDS_PER_PAGE: usize = (BLOCK_SIZE - REGION_HEADER) / RECORD_SIZE;
/// Bytes of one device record.
pub const RECORD_SIZE: usize = 128;
/// Reference counts per refcount page.
pub const COUNTS_PER_PAGE: usize = (BLOCK_SIZE - REGION_HEADER) / 4;
/// Longest device name, in bytes of UTF-8.
pub const MAX_NAME: usize = 64;
/// The offset of the stored crc in a superblock.
const SUPER_CRC_AT: usize = BLOCK_SIZE - 4;
/// Superblock offset of the extension count (version 2).
const EXT_COUNT_AT: usize = 116;
/// Superblock offset of the first block of slot map copy 0 (version 2).
const EXT_SLOT_MAP_AT: usize = 120;
/// Superblock offset of the extension table (version 2).
const EXT_TABLE_AT: usize = 128;
/// Bytes of one extension table entry.
const EXT_ENTRY: usize = 16;
/// Entries the extension table holds: a pool can grow this many times
/// (growths that need no new metadata extend the last entry instead).
pub const MAX_EXTENSIONS: usize = (SUPER_CRC_AT - EXT_TABLE_AT) / EXT_ENTRY;
/// A pool grows to at most this many blocks (16 TiB, as large as a volume
/// may be); the in-memory reference counts are laid out for it.
pub const MAX_POOL_BLOCKS: u64 = 1 << 32;
/// The least a growth must add for data, in blocks (as the least data area
/// of a new pool): less leaves the pool unchanged.
pub const MIN_GROWTH_BLOCKS: u64 = 64;
/// Slot map bits per block.
const BITS_PER_BLOCK: u64 = 8 * BLOCK_SIZE as u64;

/// One slot of a map page, and the root pointer of a device.
///
/// ```text
/// 0  u64 phys   pool block number; 0 = unmapped (reads as zeros)
/// 8  u32 crc    CRC32C of the 4096 bytes of that block
/// 12 u32 flags  reserved, 0
/// ```
/// Interior pages point at pages below them; leaf pages at data blocks. The
/// parent holds its child's checksum, so every block reachable from the
/// superblock is verified on the way down (a Merkle tree, as in ZFS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// Pool block number, 0 when unmapped.
    pub phys: u64,
    /// CRC32C of the block's 4096 bytes.
    pub crc: u32,
}

impl Entry {
    /// The unmapped entry.
    pub const ZERO: Entry = Entry { phys: 0, crc: 0 };

    /// True when mapped.
    pub fn is_mapped(&self) -> bool {
        self.phys != 0
    }

    fn encode(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.phys.to_le_bytes());
        out[8..12].copy_from_slice(&self.crc.to_le_bytes());
        out[12..16].copy_from_slice(&0u32.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Entry {
        Entry { phys: le64(&b[0..8]), crc: le32(&b[8..12]) }
    }
}

/// A map page in memory.
pub type Page = [Entry; FANOUT];

/// Serialize a map page into one block.
pub fn encode_page(page: &Page, out: &mut [u8]) {
    for (e, chunk) in page.iter().zip(out.chunks_exact_mut(16)) {
        e.encode(chunk);
    }
}

/// Parse a map page.
pub fn decode_page(b: &[u8]) -> Box<Page> {
    let mut page = Box::new([Entry::ZERO; FANOUT]);
    for (e, chunk) in page.iter_mut().zip(b.chunks_exact(16)) {
        *e = Entry::decode(chunk);
    }
    page
}

pub(crate) fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}
pub(crate) fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

/// CRC32C of a block.
pub fn crc(b: &[u8]) -> u32 {
    crc32c::crc32c(b)
}

/// CRC32C of bytes just read from the disk: with O_DIRECT the device wrote
/// them into memory by DMA, and no CPU cache holds them yet. The CRC
/// instructions take their operands straight from memory and stall on each
/// line in turn (in a 4 KiB random read the CRC was the largest part of the
/// store's own CPU time, and skipping it, as an experiment, gave 7% more
/// IOPS); asking for every line first lets their misses overlap. Same
/// result as [`crc`].
pub fn crc_fresh(b: &[u8]) -> u32 {
    // 4 KiB at a time, each asked for just ahead of its CRC: one block's 64
    // lines fit the core's outstanding-miss slots and its L1 many times
    // over, while a megabyte asked for at once would evict itself.
    let mut chunks = b.chunks(4096).peekable();
    if let Some(first) = chunks.peek() {
        prefetch(first);
    }
    let mut c = 0;
    while let Some(chunk) = chunks.next() {
        if let Some(next) = chunks.peek() {
            prefetch(next);
        }
        c = crc32c::crc32c_append(c, chunk);
    }
    c
}

/// Ask the CPU to start loading `b` into its caches (a hint; nothing on
/// targets without a prefetch instruction wired up here).
pub(crate) fn prefetch(b: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in b.chunks(64) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: a prefetch is only a hint and never faults; the address
        // is inside `b` anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = b;
}

/// Where everything is: laid out when the pool is created, and added to at
/// its end each time it grows (see [`Extension`]).
///
/// Superblock layout (block 0 and block 1, one per generation parity):
/// ```text
/// 0    [u8;8] magic "KEELPOOL"
/// 8    u32    format version (1; 2 once the pool has grown)
/// 12   u32    block size (4096)
/// 16   u64    generation of the commit that wrote this copy
/// 24   u64    total blocks of the pool (its end on the device)
/// 32   u64    first block of catalog slot 0
/// 40   u64    catalog pages per slot
/// 48   u64    first block of refcount slot 0
/// 56   u64    refcount pages per slot (of this first refcount region)
/// 64   u64    first block of the data area
/// 72   u64    next device id
/// 80   [u8;16] pool uuid
/// 96   u64    data blocks reserved for metadata (never given to data writes)
/// 104  u64    blocks of one slot map copy
/// 112  u32    CRC32C of this copy's slot map (all its blocks)
/// 116  u32    extensions n: 0 in version 1, 1..=247 in version 2
/// 120  u64    version 2: first block of slot map copy 0 (copy 1 follows)
/// 128  [16]*n version 2: the extension table, oldest first, each:
///               0  u64  first block of the extension (the pool's end before)
///               8  u32  refcount pages per slot in the extension
///               12 u32  blocks of one slot map copy when the slot map moved
///                       to the start of the extension, else 0
/// ..          zero
/// 4092 u32    CRC32C of bytes 0..4092
/// ```
///
/// Superblock copy `k` goes with slot map copy `k`. The slot map has one bit
/// per region page, catalog pages first, then refcount pages (bit `i` is
/// bit `i % 8` of byte `i / 8`): 0 when the page's current copy is in slot
/// 0, 1 when in slot 1. A page is read only from its current copy; if that
/// copy is damaged the pool is refused rather than silently opened on the
/// older one.
///
/// A pool that never grew is written as version 1, byte for byte what
/// builds before growing wrote, so they still open it; a grown pool is
/// version 2, which those builds refuse (they would open it at its first
/// size and lose what lies beyond).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Commit generation.
    pub generation: u64,
    /// Blocks of the pool: its end on the device.
    pub total_blocks: u64,
    /// First block of catalog slot 0.
    pub catalog_start: u64,
    /// Catalog pages per slot.
    pub catalog_pages: u64,
    /// First block of refcount slot 0.
    pub refcount_start: u64,
    /// Refcount pages per slot in the first refcount region (extensions
    /// add their own; see [`Superblock::all_refcount_pages`]).
    pub refcount_pages: u64,
    /// First block of the data area.
    pub data_start: u64,
    /// Next device id to hand out.
    pub next_device_id: u64,
    /// Pool identity.
    pub uuid: [u8; 16],
    /// Blocks kept back for map pages.
    pub meta_reserve: u64,
    /// Blocks of one slot map copy (the slot map in use, wherever it is).
    pub slot_map_blocks: u64,
    /// CRC32C of the slot map that goes with this copy.
    pub slot_map_crc: u32,
    /// Space added since the pool was created, oldest first (empty in
    /// version 1).
    pub extensions: Vec<Extension>,
}

/// Space a pool gained when its device grew (format version 2): the blocks
/// from `start` (the pool's end before) to the next extension's start, or
/// to the superblock's `total_blocks` for the last one.
///
/// ```text
/// start             slot map copy 0  slot_map_blocks \ only when the slot map
///                   slot map copy 1  slot_map_blocks / outgrew its blocks
/// refcount_start()  refcount slot 0  refcount_pages  \ counts for the blocks
///                   refcount slot 1  refcount_pages  / no earlier page counts
/// data_start()      data blocks, to the extension's end
/// ```
///
/// The data area stays one range, from the superblock's `data_start` to
/// `total_blocks`: an extension continues it. Refcount pages are numbered
/// densely over all of it, whichever region holds them: page `p` counts
/// data-area blocks `p * 1020 ..`; an extension's pages follow the pages
/// before it, and their slot map bits follow those pages' bits. An
/// extension's own metadata blocks lie inside the data area and are never
/// allocated (their count stays 0; the check and the space figures leave
/// them out). So the store finds a block's count with one division, as in
/// a pool that never grew, and its in-memory table just gets longer.
///
/// The slot map stays one bitmap under one checksum. When its bits outgrow
/// its blocks, a larger pair of copies is placed at the start of the
/// extension and the old pair is abandoned: a few blocks lost per move, one
/// move per 128 GiB of growth (32768 refcount pages). One slot map piece per
/// extension, each with its checksum, was the alternative; it makes every
/// commit write one more scattered block per growth, for ever.
///
/// Everything here follows from the sizes (the pool's first size, then the
/// end of each growth): [`Superblock::decode`] replays the layout rule and
/// refuses a table that disagrees, as it does for the first layout.
///
/// Growing (`Pool::grow`) writes copy 0 of the extension's refcount pages
/// (zero counts, sealed with the generation of the commit that adds the
/// extension) before that commit's first sync, and its superblock (the
/// commit point) after it; the extension's blocks are handed to the
/// allocator only once that commit is durable. A crash before the commit
/// point leaves the previous superblock, which ends where the pool ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extension {
    /// First block: the end of the pool before it grew.
    pub start: u64,
    /// Refcount pages per slot in the extension (0 when the pages before it
    /// already count every block up to its end).
    pub refcount_pages: u64,
    /// Blocks of one slot map copy, when the slot map moved to the start of
    /// the extension; 0 when it stayed where it was.
    pub slot_map_blocks: u64,
    /// Index of its first refcount page among all of them (derived).
    first_page: u64,
    /// Blocks of one slot map copy before the extension (derived).
    slot_map_before: u64,
}

impl Extension {
    /// The layout rule: the extension from `start` to `end` of a pool whose
    /// data area starts at `data_start`, after `pages_before` refcount pages
    /// and a slot map of `slot_map_before` blocks per copy.
    fn plan(
        catalog_pages: u64,
        data_start: u64,
        pages_before: u64,
        slot_map_before: u64,
        start: u64,
        end: u64,
    ) -> Extension {
        let counted = pages_before * COUNTS_PER_PAGE as u64;
        let refcount_pages = end.saturating_sub(data_start).saturating_sub(counted).div_ceil(COUNTS_PER_PAGE as u64);
        let need = (catalog_pages + pages_before + refcount_pages).div_ceil(BITS_PER_BLOCK).max(1);
        let slot_map_blocks = if need > slot_map_before { need } else { 0 };
        Extension { start, refcount_pages, slot_map_blocks, first_page: pages_before, slot_map_before }
    }

    /// Index of the extension's first refcount page among all the pool's.
    pub fn first_page(&self) -> u64 {
        self.first_page
    }

    /// First block of the extension's refcount slot 0.
    pub fn refcount_start(&self) -> u64 {
        self.start + 2 * self.slot_map_blocks
    }

    /// First block of the extension that holds data.
    pub fn data_start(&self) -> u64 {
        self.refcount_start() + 2 * self.refcount_pages
    }

    /// The extension's metadata blocks (inside the data area, never
    /// allocated).
    pub fn metadata(&self) -> Range<u64> {
        self.start..self.data_start()
    }
}

/// What growing a pool's layout to a larger device gives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Growth {
    /// The new layout (generation, next id and slot map checksum are the
    /// old ones: the commit that writes it fills them in).
    Grown(Superblock),
    /// Nothing to add, and why.
    Unchanged(String),
}

impl Superblock {
    /// Lay out a pool of `total_blocks` with room for `catalog_pages` pages
    /// of device records per slot.
    pub fn layout(total_blocks: u64, catalog_pages: u64, uuid: [u8; 16]) -> Result<Superblock> {
        // The slot map's size depends on the number of refcount pages, which
        // depends on what the slot map leaves: iterate to the fixed point.
        let mut slot_map_blocks = 1u64;
        let (catalog_start, refcount_start, refcount_pages) = loop {
            let catalog_start = 2 + 2 * slot_map_blocks;
            let refcount_start = catalog_start + 2 * catalog_pages;
            let rest = total_blocks.saturating_sub(refcount_start);
            let refcount_pages = rest.div_ceil(COUNTS_PER_PAGE as u64 + 2).max(1);
            let need = (catalog_pages + refcount_pages).div_ceil(8).div_ceil(BLOCK_SIZE as u64).max(1);
            if need <= slot_map_blocks {
                break (catalog_start, refcount_start, refcount_pages);
            }
            slot_map_blocks = need;
        };
        let data_start = refcount_start + 2 * refcount_pages;
        let data_blocks = total_blocks.saturating_sub(data_start);
        if data_blocks < 64 {
            return Err(Error::Format(format!(
                "device of {} bytes is too small for a pool (need at least {} bytes)",
                total_blocks * BLOCK_SIZE as u64,
                (data_start + 64) * BLOCK_SIZE as u64
            )));
        }
        Ok(Superblock {
            generation: 0,
            total_blocks,
            catalog_start,
            catalog_pages,
            refcount_start,
            refcount_pages,
            data_start,
            next_device_id: 1,
            uuid,
            meta_reserve: meta_reserve_for(data_blocks),
            slot_map_blocks,
            slot_map_crc: 0,
            extensions: Vec::new(),
        })
    }

    /// The format version this superblock is written as.
    pub fn version(&self) -> u32 {
        if self.extensions.is_empty() { FORMAT_VERSION_UNGROWN } else { FORMAT_VERSION }
    }

    /// Blocks of the pool when it was created (where its first extension
    /// starts).
    pub fn first_total_blocks(&self) -> u64 {
        self.extensions.first().map_or(self.total_blocks, |e| e.start)
    }

    /// First block of slot map copy 0: after the superblocks, or at the
    /// start of the extension it last moved to.
    pub fn slot_map_start(&self) -> u64 {
        self.extensions.iter().rev().find(|e| e.slot_map_blocks > 0).map_or(2, |e| e.start)
    }

    /// First block of slot map copy `copy` (0 or 1).
    pub fn slot_map_block(&self, copy: u8) -> u64 {
        self.slot_map_start() + copy as u64 * self.slot_map_blocks
    }

    /// Refcount pages per slot, of every region.
    pub fn all_refcount_pages(&self) -> u64 {
        self.extensions.last().map_or(self.refcount_pages, |e| e.first_page + e.refcount_pages)
    }

    /// Bits in the slot map: catalog pages, then refcount pages.
    pub fn slot_map_bits(&self) -> u64 {
        self.catalog_pages + self.all_refcount_pages()
    }

    /// Blocks of the data area, from `data_start` to the pool's end
    /// (extensions' metadata included: the reference counts cover it).
    pub fn data_blocks(&self) -> u64 {
        self.total_blocks - self.data_start
    }

    /// The extensions' metadata blocks, which lie in the data area but are
    /// never allocated, in block order.
    pub fn extension_metadata(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.extensions.iter().map(Extension::metadata).filter(|r| !r.is_empty())
    }

    /// Blocks of the data area that hold map pages and data: all of it but
    /// the extensions' metadata.
    pub fn usable_blocks(&self) -> u64 {
        self.data_blocks() - self.extension_metadata().map(|r| r.end - r.start).sum::<u64>()
    }

    /// Block holding catalog page `page` in `slot`.
    pub fn catalog_block(&self, slot: u8, page: u64) -> u64 {
        self.catalog_start + slot as u64 * self.catalog_pages + page
    }

    /// Block holding refcount page `page` (of all of them, see
    /// [`Extension`]) in `slot`.
    pub fn refcount_block(&self, slot: u8, page: u64) -> u64 {
        if page < self.refcount_pages {
            return self.refcount_start + slot as u64 * self.refcount_pages + page;
        }
        // The last extension whose pages start at or before `page` (those
        // without pages share their successor's first page).
        let k = self.extensions.partition_point(|e| e.first_page <= page);
        let e = &self.extensions[k.checked_sub(1).expect("refcount page beyond the first region")];
        debug_assert!(page < e.first_page + e.refcount_pages, "refcount page {page} beyond the pool");
        e.refcount_start() + slot as u64 * e.refcount_pages + (page - e.first_page)
    }

    /// The refcount regions: (first page, first block of slot 0, pages per
    /// slot), the first region then each extension's that has pages.
    pub fn refcount_regions(&self) -> Vec<(u64, u64, u64)> {
        let mut v = vec![(0, self.refcount_start, self.refcount_pages)];
        v.extend(
            self.extensions
                .iter()
                .filter(|e| e.refcount_pages > 0)
                .map(|e| (e.first_page, e.refcount_start(), e.refcount_pages)),
        );
        v
    }

    /// The layout after the device grew to `device_blocks`: the last
    /// extension made longer when that needs no new metadata, else a new
    /// extension from the pool's end. `Err` when the device is smaller than
    /// the pool (shrinking is refused) or the extension table is full.
    pub fn grow_to(&self, device_blocks: u64) -> Result<Growth, String> {
        let bytes = |b: u64| b * BLOCK_SIZE as u64;
        if device_blocks < self.total_blocks {
            return Err(format!(
                "the device holds {} bytes, less than the {} bytes of the pool on it: it has shrunk, and a \
                 pool cannot shrink (give the device back its size)",
                bytes(device_blocks),
                bytes(self.total_blocks)
            ));
        }
        let limit = MAX_POOL_BLOCKS.max(self.total_blocks);
        let end = device_blocks.min(limit);
        if end == self.total_blocks {
            return Ok(Growth::Unchanged(if device_blocks > end {
                format!("the pool is at the largest size a pool may have ({} bytes)", bytes(limit))
            } else {
                "the device has not grown".into()
            }));
        }
        let mut next = self.clone();
        let merged = self.extensions.last().is_some_and(|last| {
            let again = Extension::plan(
                self.catalog_pages,
                self.data_start,
                last.first_page,
                last.slot_map_before,
                last.start,
                end,
            );
            again == *last
        });
        if merged {
            next.total_blocks = end;
        } else {
            let ext = Extension::plan(
                self.catalog_pages,
                self.data_start,
                self.all_refcount_pages(),
                self.slot_map_blocks,
                self.total_blocks,
                end,
            );
            if ext.data_start() >= end {
                return Ok(Growth::Unchanged(format!(
                    "the device grew by {} bytes, less than the {} bytes of metadata the new space needs",
                    bytes(end - self.total_blocks),
                    bytes(ext.data_start() - ext.start)
                )));
            }
            if self.extensions.len() >= MAX_EXTENSIONS {
                return Err(format!(
                    "the pool has grown {MAX_EXTENSIONS} times, as many as its superblock records: grow it in \
                     larger steps, or move its volumes to a new pool"
                ));
            }
            if ext.slot_map_blocks > 0 {
                next.slot_map_blocks = ext.slot_map_blocks;
            }
            next.extensions.push(ext);
            next.total_blocks = end;
        }
        let added = next.usable_blocks() - self.usable_blocks();
        if added < MIN_GROWTH_BLOCKS {
            return Ok(Growth::Unchanged(format!(
                "the device grew by {} bytes, which would add {} bytes for data, less than the least a growth \
                 adds ({} bytes)",
                bytes(end - self.total_blocks),
                bytes(added),
                bytes(MIN_GROWTH_BLOCKS)
            )));
        }
        next.meta_reserve = meta_reserve_for(next.usable_blocks()).max(self.meta_reserve);
        Ok(Growth::Grown(next))
    }

    /// Encode into one block.
    pub fn encode(&self, out: &mut [u8]) {
        out[..BLOCK_SIZE].fill(0);
        out[0..8].copy_from_slice(SUPER_MAGIC);
        out[8..12].copy_from_slice(&self.version().to_le_bytes());
        out[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        let fields = [
            self.generation,
            self.total_blocks,
            self.catalog_start,
            self.catalog_pages,
            self.refcount_start,
            self.refcount_pages,
            self.data_start,
            self.next_device_id,
        ];
        for (i, v) in fields.iter().enumerate() {
            out[16 + i * 8..24 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        out[80..96].copy_from_slice(&self.uuid);
        out[96..104].copy_from_slice(&self.meta_reserve.to_le_bytes());
        out[104..112].copy_from_slice(&self.slot_map_blocks.to_le_bytes());
        out[112..116].copy_from_slice(&self.slot_map_crc.to_le_bytes());
        if !self.extensions.is_empty() {
            assert!(self.extensions.len() <= MAX_EXTENSIONS, "extension table overflow");
            out[EXT_COUNT_AT..EXT_COUNT_AT + 4].copy_from_slice(&(self.extensions.len() as u32).to_le_bytes());
            out[EXT_SLOT_MAP_AT..EXT_SLOT_MAP_AT + 8].copy_from_slice(&self.slot_map_start().to_le_bytes());
            for (k, e) in self.extensions.iter().enumerate() {
                let at = EXT_TABLE_AT + k * EXT_ENTRY;
                out[at..at + 8].copy_from_slice(&e.start.to_le_bytes());
                out[at + 8..at + 12].copy_from_slice(&(e.refcount_pages as u32).to_le_bytes());
                out[at + 12..at + 16].copy_from_slice(&(e.slot_map_blocks as u32).to_le_bytes());
            }
        }
        let c = crc(&out[..SUPER_CRC_AT]);
        out[SUPER_CRC_AT..BLOCK_SIZE].copy_from_slice(&c.to_le_bytes());
    }

    /// Decode and verify one superblock copy.
    pub fn decode(b: &[u8]) -> Result<Superblock, String> {
        if &b[0..8] != SUPER_MAGIC {
            return Err("no Keel pool magic".into());
        }
        let stored = le32(&b[SUPER_CRC_AT..]);
        if crc(&b[..SUPER_CRC_AT]) != stored {
            return Err("superblock checksum mismatch (torn or corrupted write)".into());
        }
        let version = le32(&b[8..12]);
        if version != FORMAT_VERSION && version != FORMAT_VERSION_UNGROWN {
            return Err(format!(
                "format version {version} is not supported by this build (it reads versions \
                 {FORMAT_VERSION_UNGROWN} and {FORMAT_VERSION})"
            ));
        }
        let bs = le32(&b[12..16]);
        if bs as usize != BLOCK_SIZE {
            return Err(format!("block size {bs} is not supported"));
        }
        let f = |i: usize| le64(&b[16 + i * 8..]);
        let mut sb = Superblock {
            generation: f(0),
            total_blocks: f(1),
            catalog_start: f(2),
            catalog_pages: f(3),
            refcount_start: f(4),
            refcount_pages: f(5),
            data_start: f(6),
            next_device_id: f(7),
            uuid: b[80..96].try_into().expect("16 bytes"),
            meta_reserve: le64(&b[96..]),
            slot_map_blocks: le64(&b[104..]),
            slot_map_crc: le32(&b[112..]),
            extensions: Vec::new(),
        };
        let n = le32(&b[EXT_COUNT_AT..]) as usize;
        match version {
            FORMAT_VERSION_UNGROWN if n != 0 => return Err("a version 1 superblock with an extension table".into()),
            FORMAT_VERSION if n == 0 || n > MAX_EXTENSIONS => {
                return Err(format!("a version 2 superblock with {n} extensions (1 to {MAX_EXTENSIONS})"));
            }
            _ => {}
        }
        let entry = |k: usize| {
            let at = EXT_TABLE_AT + k * EXT_ENTRY;
            (le64(&b[at..]), le32(&b[at + 8..]) as u64, le32(&b[at + 12..]) as u64)
        };
        let first_total = if n > 0 { entry(0).0 } else { sb.total_blocks };
        if first_total > sb.total_blocks {
            return Err("superblock geometry is inconsistent (an extension beyond the pool's end)".into());
        }
        let expect = Superblock::layout(first_total, sb.catalog_pages, sb.uuid).map_err(|e| e.to_string())?;
        let geometry = |s: &Superblock| (s.catalog_start, s.refcount_start, s.refcount_pages, s.data_start);
        if geometry(&sb) != geometry(&expect) {
            return Err("superblock geometry is inconsistent".into());
        }
        // Replay every growth: each extension must be what the layout rule
        // makes of its start and end.
        let (mut pages, mut slot_map) = (expect.refcount_pages, expect.slot_map_blocks);
        for k in 0..n {
            let (start, refcount_pages, slot_map_blocks) = entry(k);
            let end = if k + 1 < n { entry(k + 1).0 } else { sb.total_blocks };
            let ext = Extension::plan(sb.catalog_pages, sb.data_start, pages, slot_map, start, end);
            if start >= end
                || ext.refcount_pages != refcount_pages
                || ext.slot_map_blocks != slot_map_blocks
                || ext.data_start() > end
            {
                return Err(format!("superblock geometry is inconsistent (extension {k} of {n})"));
            }
            pages += ext.refcount_pages;
            if ext.slot_map_blocks > 0 {
                slot_map = ext.slot_map_blocks;
            }
            sb.extensions.push(ext);
        }
        if sb.slot_map_blocks != slot_map || (n > 0 && le64(&b[EXT_SLOT_MAP_AT..]) != sb.slot_map_start()) {
            return Err("superblock geometry is inconsistent (slot map)".into());
        }
        Ok(sb)
    }
}

/// Blocks of the metadata reserve for a data area of `blocks`.
fn meta_reserve_for(blocks: u64) -> u64 {
    (blocks / 64).clamp(16, 4096)
}

/// Header of a catalog or refcount page:
/// ```text
/// 0  u32 magic   "KCAT" or "KREF"
/// 4  u32 crc     CRC32C of the whole page with this field zeroed
/// 8  u64 generation     generation of the commit that wrote this copy
/// ```
/// A copy is valid when magic and crc match and generation is not newer than the
/// superblock's; of two valid copies the newer wins.
pub fn seal_region_page(magic: u32, generation: u64, page: &mut [u8]) {
    page[0..4].copy_from_slice(&magic.to_le_bytes());
    page[4..8].fill(0);
    page[8..16].copy_from_slice(&generation.to_le_bytes());
    let c = crc(&page[..BLOCK_SIZE]);
    page[4..8].copy_from_slice(&c.to_le_bytes());
}

/// Read bit `i` of a slot map.
pub fn slot_bit(map: &[u8], i: u64) -> u8 {
    (map[(i / 8) as usize] >> (i % 8)) & 1
}

/// Set bit `i` of a slot map to `slot`.
pub fn set_slot_bit(map: &mut [u8], i: u64, slot: u8) {
    let (byte, bit) = ((i / 8) as usize, i % 8);
    map[byte] = (map[byte] & !(1 << bit)) | ((slot & 1) << bit);
}

/// Check a region page copy; returns its generation when valid.
pub fn open_region_page(magic: u32, page: &mut [u8]) -> Option<u64> {
    if le32(&page[0..4]) != magic {
        return None;
    }
    let stored = le32(&page[4..8]);
    page[4..8].fill(0);
    let ok = crc(&page[..BLOCK_SIZE]) == stored;
    page[4..8].copy_from_slice(&stored.to_le_bytes());
    ok.then(|| le64(&page[8..16]))
}

/// What a device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// A writable thin volume (clones are volumes too).
    Volume = 1,
    /// A read-only point-in-time image of a volume.
    Snapshot = 2,
}

/// A device record in the catalog (128 bytes):
/// ```text
/// 0   u64 id          0 = free record
/// 8   u64 size        bytes
/// 16  u64 root phys   root map page (0 = empty device)
/// 24  u32 root crc
/// 28  u8  kind        1 volume, 2 snapshot
/// 29  u8  depth       levels of map pages under the root (>= 1)
/// 30  u8  name length
/// 31  u8  reserved
/// 32  u64 parent      snapshot: its volume; clone: its snapshot; else 0
/// 40  u64 created     unix seconds
/// 48  u64 mapped      data blocks mapped (allocated bytes / 4096)
/// 56  u64 reserved
/// 64  [u8;64] name    UTF-8
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Stable id, never reused.
    pub id: u64,
    /// Size in bytes.
    pub size: u64,
    /// Root of the map tree.
    pub root: Entry,
    /// Volume or snapshot.
    pub kind: DeviceKind,
    /// Levels of map pages.
    pub depth: u8,
    /// Parent device (see layout).
    pub parent: u64,
    /// Creation time, unix seconds.
    pub created: u64,
    /// Mapped data blocks.
    pub mapped: u64,
    /// Name (a snapshot's name is unique within its volume).
    pub name: String,
}

impl DeviceRecord {
    /// Encode into 128 bytes.
    pub fn encode(&self, out: &mut [u8]) {
        out[..RECORD_SIZE].fill(0);
        out[0..8].copy_from_slice(&self.id.to_le_bytes());
        out[8..16].copy_from_slice(&self.size.to_le_bytes());
        out[16..24].copy_from_slice(&self.root.phys.to_le_bytes());
        out[24..28].copy_from_slice(&self.root.crc.to_le_bytes());
        out[28] = self.kind as u8;
        out[29] = self.depth;
        out[30] = self.name.len() as u8;
        out[32..40].copy_from_slice(&self.parent.to_le_bytes());
        out[40..48].copy_from_slice(&self.created.to_le_bytes());
        out[48..56].copy_from_slice(&self.mapped.to_le_bytes());
        out[64..64 + self.name.len()].copy_from_slice(self.name.as_bytes());
    }

    /// Decode 128 bytes; `None` for a free record.
    pub fn decode(b: &[u8]) -> Result<Option<DeviceRecord>, String> {
        let id = le64(&b[0..8]);
        if id == 0 {
            return Ok(None);
        }
        let kind = match b[28] {
            1 => DeviceKind::Volume,
            2 => DeviceKind::Snapshot,
            k => return Err(format!("device {id} has unknown kind {k}")),
        };
        let name_len = b[30] as usize;
        if name_len > MAX_NAME {
            return Err(format!("device {id} has a name of {name_len} bytes"));
        }
        let name = std::str::from_utf8(&b[64..64 + name_len])
            .map_err(|_| format!("device {id} has a name that is not UTF-8"))?
            .to_string();
        Ok(Some(DeviceRecord {
            id,
            size: le64(&b[8..16]),
            root: Entry { phys: le64(&b[16..24]), crc: le32(&b[24..28]) },
            kind,
            depth: b[29],
            parent: le64(&b[32..40]),
            created: le64(&b[40..48]),
            mapped: le64(&b[48..56]),
            name,
        }))
    }
}

/// Levels of map pages needed to address `blocks` data blocks.
pub fn depth_for(blocks: u64) -> u8 {
    let mut depth = 1u8;
    let mut reach = FANOUT as u64;
    while reach < blocks {
        depth += 1;
        reach = reach.saturating_mul(FANOUT as u64);
    }
    depth
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_fresh_equals_crc() {
        // Odd lengths and starts off a line, across chunk boundaries; and
        // the known CRC32C of "123456789".
        assert_eq!(crc_fresh(b"123456789"), 0xE306_9283);
        let data: Vec<u8> = (0..(1 << 20) + 4200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for (start, len) in
            [(0, 0), (0, 1), (3, 63), (0, 4096), (1, 4096), (7, 4097), (0, 8192), (5, 1 << 20), (0, data.len())]
        {
            let b = &data[start..start + len.min(data.len() - start)];
            assert_eq!(crc_fresh(b), crc(b), "start {start} len {len}");
        }
    }

    #[test]
    fn superblock_round_trips_and_detects_damage() {
        let sb = Superblock::layout(100_000, 8, [7; 16]).unwrap();
        let mut b = vec![0u8; BLOCK_SIZE];
        sb.encode(&mut b);
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
        b[20] ^= 1;
        assert!(Superblock::decode(&b).unwrap_err().contains("checksum"));
    }

    fn grown(sb: &Superblock, blocks: u64) -> Superblock {
        match sb.grow_to(blocks).unwrap() {
            Growth::Grown(next) => next,
            Growth::Unchanged(why) => panic!("growing to {blocks} blocks changed nothing: {why}"),
        }
    }

    fn round_trip(sb: &Superblock) {
        let mut b = vec![0u8; BLOCK_SIZE];
        sb.encode(&mut b);
        assert_eq!(le32(&b[8..12]), sb.version());
        assert_eq!(Superblock::decode(&b).as_ref(), Ok(sb));
    }

    /// Every region of the layout, in block order, must tile the device:
    /// superblocks, the slot map in use, the first regions, then each
    /// extension's metadata and data.
    fn assert_tiles(sb: &Superblock) {
        assert!(sb.slot_map_bits() <= sb.slot_map_blocks * BITS_PER_BLOCK, "slot map too small");
        let data_end = |k: usize| sb.extensions.get(k + 1).map_or(sb.total_blocks, |e| e.start);
        let mut end = sb.first_total_blocks();
        let mut pages = sb.refcount_pages;
        for (k, e) in sb.extensions.iter().enumerate() {
            assert_eq!(e.start, end, "extension {k} does not follow the pool's end");
            assert_eq!(e.first_page(), pages);
            assert!(e.data_start() <= data_end(k));
            end = data_end(k);
            pages += e.refcount_pages;
        }
        assert_eq!(end, sb.total_blocks);
        // The pages count every block of the data area.
        assert!(sb.all_refcount_pages() * COUNTS_PER_PAGE as u64 >= sb.data_blocks());
        // Each region's pages are where refcount_block says, inside it.
        for (first, start, n) in sb.refcount_regions() {
            for page in [first, first + n - 1] {
                for slot in 0..2u8 {
                    let b = sb.refcount_block(slot, page);
                    assert!(b >= start && b < start + 2 * n, "page {page} slot {slot} at {b}");
                }
            }
        }
        let metadata: u64 = sb.extension_metadata().map(|r| r.end - r.start).sum();
        assert_eq!(sb.usable_blocks() + metadata, sb.data_blocks());
    }

    #[test]
    fn a_grown_superblock_round_trips_and_its_table_is_checked() {
        let sb = Superblock::layout(10_000, 8, [7; 16]).unwrap();
        assert_eq!(sb.version(), FORMAT_VERSION_UNGROWN);
        round_trip(&sb);
        let g = grown(&sb, 30_000);
        assert_eq!(g.version(), FORMAT_VERSION);
        assert_eq!(g.extensions.len(), 1);
        let e = g.extensions[0];
        assert_eq!(e.start, 10_000);
        assert_eq!(e.slot_map_blocks, 0, "the slot map has room");
        assert_eq!(e.first_page(), sb.refcount_pages);
        assert!(e.refcount_pages > 0);
        assert_eq!(g.slot_map_start(), 2);
        assert!(g.usable_blocks() > sb.usable_blocks() + 19_000);
        assert!(g.meta_reserve >= sb.meta_reserve);
        assert_tiles(&g);
        round_trip(&g);

        // A table that is not what the layout rule makes of the sizes is
        // refused, checksum or not.
        let mut b = vec![0u8; BLOCK_SIZE];
        g.encode(&mut b);
        // (A start moved by a block or two can give the same layout, as a
        // version 1 total can: the check is of the geometry, the checksum
        // is of the bytes.)
        for (at, what) in [(EXT_TABLE_AT + 8, "pages"), (EXT_TABLE_AT + 2, "start"), (EXT_SLOT_MAP_AT, "slot map")] {
            let mut bad = b.clone();
            bad[at] ^= 0x10;
            let c = crc(&bad[..SUPER_CRC_AT]);
            bad[SUPER_CRC_AT..].copy_from_slice(&c.to_le_bytes());
            let err = Superblock::decode(&bad).unwrap_err();
            assert!(err.contains("inconsistent"), "{what}: {err}");
        }
        // Version 1 with a table, version 2 without: refused.
        let mut bad = b.clone();
        bad[8..12].copy_from_slice(&1u32.to_le_bytes());
        let c = crc(&bad[..SUPER_CRC_AT]);
        bad[SUPER_CRC_AT..].copy_from_slice(&c.to_le_bytes());
        assert!(Superblock::decode(&bad).is_err());
        let mut v1 = vec![0u8; BLOCK_SIZE];
        sb.encode(&mut v1);
        v1[8..12].copy_from_slice(&2u32.to_le_bytes());
        let c = crc(&v1[..SUPER_CRC_AT]);
        v1[SUPER_CRC_AT..].copy_from_slice(&c.to_le_bytes());
        assert!(Superblock::decode(&v1).is_err());
    }

    #[test]
    fn growing_refuses_shrinking_and_ignores_too_little() {
        let sb = Superblock::layout(10_000, 8, [7; 16]).unwrap();
        assert!(sb.grow_to(9_999).unwrap_err().contains("shrunk"));
        assert!(matches!(sb.grow_to(10_000), Ok(Growth::Unchanged(_))));
        // Too little for data once the counts are placed.
        let g = grown(&sb, 30_000);
        assert!(matches!(g.grow_to(30_010), Ok(Growth::Unchanged(_))));
        // Beyond the largest pool: up to it, then no more.
        let big = grown(&g, MAX_POOL_BLOCKS + 5000);
        assert_eq!(big.total_blocks, MAX_POOL_BLOCKS);
        assert_tiles(&big);
        match big.grow_to(MAX_POOL_BLOCKS + 10_000) {
            Ok(Growth::Unchanged(why)) => assert!(why.contains("largest"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn growths_that_need_no_new_counts_extend_the_last_extension() {
        let sb = Superblock::layout(10_000, 8, [7; 16]).unwrap();
        let g = grown(&sb, 30_000);
        let pages = g.all_refcount_pages();
        // The last page counts up to data_start + pages * 1020.
        let counted_end = g.data_start + pages * COUNTS_PER_PAGE as u64;
        assert!(counted_end > 30_000 + MIN_GROWTH_BLOCKS, "the test needs room in the last page");
        let m = grown(&g, counted_end);
        assert_eq!(m.extensions.len(), 1, "merged into the last extension");
        assert_eq!(m.all_refcount_pages(), pages);
        assert_eq!(m.usable_blocks() - g.usable_blocks(), counted_end - 30_000);
        assert_tiles(&m);
        round_trip(&m);
        // One block more needs another page: a new extension.
        let n = grown(&m, counted_end + 1000);
        assert_eq!(n.extensions.len(), 2);
        assert_tiles(&n);
        round_trip(&n);
        // A pool whose first pages already count the new blocks grows
        // without any metadata.
        let sb = Superblock::layout(10_100, 8, [7; 16]).unwrap();
        let counted_end = sb.data_start + sb.refcount_pages * COUNTS_PER_PAGE as u64;
        assert!(counted_end >= 10_100 + MIN_GROWTH_BLOCKS);
        let z = grown(&sb, counted_end);
        assert_eq!(z.extensions[0].metadata(), 10_100..10_100);
        assert_eq!(z.usable_blocks() - sb.usable_blocks(), counted_end - 10_100);
        assert_tiles(&z);
        round_trip(&z);
    }

    #[test]
    fn the_slot_map_moves_when_its_bits_outgrow_it() {
        // 4 GiB grown to 16 TiB in 128 GiB steps: the slot map outgrows its
        // blocks at nearly every step and moves into the new extension.
        let mut sb = Superblock::layout(1 << 20, 128, [7; 16]).unwrap();
        assert_eq!(sb.slot_map_blocks, 1);
        let mut moves = 0;
        let mut total = 1u64 << 20;
        while total < MAX_POOL_BLOCKS {
            total = (total + (1 << 25)).min(MAX_POOL_BLOCKS);
            let next = grown(&sb, total);
            let e = *next.extensions.last().unwrap();
            if e.slot_map_blocks > 0 {
                moves += 1;
                assert_eq!(next.slot_map_start(), e.start);
                assert_eq!(next.slot_map_blocks, e.slot_map_blocks);
                assert!(e.slot_map_blocks > sb.slot_map_blocks);
                assert_eq!(e.refcount_start(), e.start + 2 * e.slot_map_blocks);
            } else {
                assert_eq!(next.slot_map_start(), sb.slot_map_start());
            }
            assert_tiles(&next);
            round_trip(&next);
            sb = next;
        }
        assert_eq!(sb.total_blocks, MAX_POOL_BLOCKS);
        assert!(moves >= 100, "{moves} moves");
        assert_eq!(sb.slot_map_blocks, sb.slot_map_bits().div_ceil(BITS_PER_BLOCK));
    }

    #[test]
    fn the_extension_table_has_an_end() {
        let mut sb = Superblock::layout(10_000, 8, [7; 16]).unwrap();
        for _ in 0..MAX_EXTENSIONS {
            // Each step needs one more page: a new entry each time.
            sb = grown(&sb, sb.total_blocks + 2 * COUNTS_PER_PAGE as u64);
        }
        assert_eq!(sb.extensions.len(), MAX_EXTENSIONS);
        assert_tiles(&sb);
        round_trip(&sb);
        let err = sb.grow_to(sb.total_blocks + 4 * COUNTS_PER_PAGE as u64).unwrap_err();
        assert!(err.contains("times"), "{err}");
    }

    #[test]
    fn record_round_trips() {
        let r = DeviceRecord {
            id: 9,
            size: 1 << 30,
            root: Entry { phys: 77, crc: 0xdead_beef },
            kind: DeviceKind::Snapshot,
            depth: 3,
            parent: 4,
            created: 1_700_000_000,
            mapped: 12,
            name: "nightly".into(),
        };
        let mut b = [0u8; RECORD_SIZE];
        r.encode(&mut b);
        assert_eq!(DeviceRecord::decode(&b).unwrap(), Some(r));
    }

    #[test]
    fn region_page_seal_detects_a_flipped_bit() {
        let mut p = vec![3u8; BLOCK_SIZE];
        seal_region_page(REFCOUNT_MAGIC, 5, &mut p);
        assert_eq!(open_region_page(REFCOUNT_MAGIC, &mut p), Some(5));
        p[1000] ^= 0x10;
        assert_eq!(open_region_page(REFCOUNT_MAGIC, &mut p), None);
    }

    #[test]
    fn depth_grows_by_fanout() {
        assert_eq!(depth_for(1), 1);
        assert_eq!(depth_for(256), 1);
        assert_eq!(depth_for(257), 2);
        assert_eq!(depth_for(65536), 2);
        assert_eq!(depth_for(65537), 3);
    }
}
