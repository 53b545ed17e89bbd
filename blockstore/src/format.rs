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
//! ```

use crate::backend::BLOCK_SIZE;
use crate::error::{Error, Result};

/// Magic at the start of a superblock.
pub const SUPER_MAGIC: &[u8; 8] = b"KEELPOOL";
/// Current format version. Bump on any incompatible change, and keep a test
/// that opens the previous version.
pub const FORMAT_VERSION: u32 = 1;
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

/// Where everything is, fixed when the pool is created.
///
/// Superblock layout (block 0 and block 1, one per generation parity):
/// ```text
/// 0    [u8;8] magic "KEELPOOL"
/// 8    u32    format version (1)
/// 12   u32    block size (4096)
/// 16   u64    generation of the commit that wrote this copy
/// 24   u64    total blocks of the pool device
/// 32   u64    first block of catalog slot 0
/// 40   u64    catalog pages per slot
/// 48   u64    first block of refcount slot 0
/// 56   u64    refcount pages per slot
/// 64   u64    first block of the data area
/// 72   u64    next device id
/// 80   [u8;16] pool uuid
/// 96   u64    data blocks reserved for metadata (never given to data writes)
/// 104  u64    blocks of one slot map copy
/// 112  u32    CRC32C of this copy's slot map (all its blocks)
/// 116  ..     zero
/// 4092 u32    CRC32C of bytes 0..4092
/// ```
///
/// Superblock copy `k` goes with slot map copy `k`. The slot map has one bit
/// per region page, catalog pages first, then refcount pages (bit `i` is
/// bit `i % 8` of byte `i / 8`): 0 when the page's current copy is in slot
/// 0, 1 when in slot 1. A page is read only from its current copy; if that
/// copy is damaged the pool is refused rather than silently opened on the
/// older one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Commit generation.
    pub generation: u64,
    /// Blocks of the whole pool device.
    pub total_blocks: u64,
    /// First block of catalog slot 0.
    pub catalog_start: u64,
    /// Catalog pages per slot.
    pub catalog_pages: u64,
    /// First block of refcount slot 0.
    pub refcount_start: u64,
    /// Refcount pages per slot.
    pub refcount_pages: u64,
    /// First block of the data area.
    pub data_start: u64,
    /// Next device id to hand out.
    pub next_device_id: u64,
    /// Pool identity.
    pub uuid: [u8; 16],
    /// Blocks kept back for map pages.
    pub meta_reserve: u64,
    /// Blocks of one slot map copy.
    pub slot_map_blocks: u64,
    /// CRC32C of the slot map that goes with this copy.
    pub slot_map_crc: u32,
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
            meta_reserve: (data_blocks / 64).clamp(16, 4096),
            slot_map_blocks,
            slot_map_crc: 0,
        })
    }

    /// First block of slot map copy `copy` (0 or 1).
    pub fn slot_map_block(&self, copy: u8) -> u64 {
        2 + copy as u64 * self.slot_map_blocks
    }

    /// Bits in the slot map: catalog pages, then refcount pages.
    pub fn slot_map_bits(&self) -> u64 {
        self.catalog_pages + self.refcount_pages
    }

    /// Blocks of the data area.
    pub fn data_blocks(&self) -> u64 {
        self.total_blocks - self.data_start
    }

    /// Block holding catalog page `page` in `slot`.
    pub fn catalog_block(&self, slot: u8, page: u64) -> u64 {
        self.catalog_start + slot as u64 * self.catalog_pages + page
    }

    /// Block holding refcount page `page` in `slot`.
    pub fn refcount_block(&self, slot: u8, page: u64) -> u64 {
        self.refcount_start + slot as u64 * self.refcount_pages + page
    }

    /// Encode into one block.
    pub fn encode(&self, out: &mut [u8]) {
        out[..BLOCK_SIZE].fill(0);
        out[0..8].copy_from_slice(SUPER_MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
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
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version} is not supported by this build (it reads version {FORMAT_VERSION})"
            ));
        }
        let bs = le32(&b[12..16]);
        if bs as usize != BLOCK_SIZE {
            return Err(format!("block size {bs} is not supported"));
        }
        let f = |i: usize| le64(&b[16 + i * 8..]);
        let sb = Superblock {
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
        };
        let expect = Superblock::layout(sb.total_blocks, sb.catalog_pages, sb.uuid).map_err(|e| e.to_string())?;
        let geometry =
            |s: &Superblock| (s.catalog_start, s.refcount_start, s.refcount_pages, s.data_start, s.slot_map_blocks);
        if geometry(&sb) != geometry(&expect) {
            return Err("superblock geometry is inconsistent".into());
        }
        Ok(sb)
    }
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
