//! Pools written by format version 1 and version 2 (a pool that grew),
//! checked in as fixtures, must keep opening and reading the same. If the
//! format changes, bump `FORMAT_VERSION`, keep these fixtures, and teach
//! `Pool::open` to read them.
//!
//! Fixture layout (`fixtures/pool-v1.blocks`, `fixtures/pool-v2.blocks`):
//! the pool size as a u64, then for each non-zero 4 KiB block its index
//! (u64) and its bytes; all little-endian. Regenerate (only when adding a
//! new version's fixture) with `KEEL_WRITE_FIXTURE=1 cargo test -p
//! keel-blockstore --test format_compat`, which writes the fixtures whose
//! files are missing.

mod common;
use common::*;
use keel_blockstore::backend::MemBackend;
use keel_blockstore::format::{FORMAT_VERSION, Superblock};
use keel_blockstore::{BLOCK_SIZE, Pool, PoolOptions};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pool-v1.blocks");
const FIXTURE_V2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pool-v2.blocks");

/// The content the fixture was made with.
async fn build() -> Pool<MemBackend> {
    let opts = PoolOptions { catalog_pages: 1, ..Default::default() };
    let pool = mem_pool_with(4 * MIB, opts).await;
    let v = pool.create_volume("disk0", 2 * MIB).await.unwrap();
    v.write(0, &pattern(1, 65536), false).await.unwrap();
    v.write(MIB, &pattern(2, 4096), false).await.unwrap();
    pool.snapshot("disk0", "base").await.unwrap();
    v.write(4096, &pattern(3, 4096), false).await.unwrap();
    pool.clone_snapshot("disk0@base", "vm2").await.unwrap();
    pool.flush().await.unwrap();
    pool
}

fn encode(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u64).to_le_bytes().to_vec();
    for (i, blk) in bytes.chunks(4096).enumerate() {
        if blk.iter().any(|&b| b != 0) {
            out.extend_from_slice(&(i as u64).to_le_bytes());
            out.extend_from_slice(blk);
        }
    }
    out
}

fn decode(f: &[u8]) -> Vec<u8> {
    let len = u64::from_le_bytes(f[..8].try_into().unwrap()) as usize;
    let mut bytes = vec![0u8; len];
    for rec in f[8..].chunks(8 + 4096) {
        let i = u64::from_le_bytes(rec[..8].try_into().unwrap()) as usize;
        bytes[i * 4096..(i + 1) * 4096].copy_from_slice(&rec[8..]);
    }
    bytes
}

/// Whether to write the fixture at `path` (asked for, and missing: a
/// checked-in fixture is never rewritten).
fn write_fixture(path: &str) -> bool {
    std::env::var_os("KEEL_WRITE_FIXTURE").is_some() && !std::path::Path::new(path).exists()
}

#[tokio::test]
async fn version_1_pool_opens_and_reads_the_same() {
    if write_fixture(FIXTURE) {
        let pool = build().await;
        std::fs::write(FIXTURE, encode(&pool.backend().snapshot())).unwrap();
    }
    let bytes = decode(&std::fs::read(FIXTURE).expect("fixture present"));
    let (pool, report) = Pool::open(MemBackend::from_bytes(bytes), PoolOptions::default()).await.unwrap();
    assert!(report.superblock_fallback.is_none());
    let mut names: Vec<String> = pool.list().into_iter().map(|d| d.name).collect();
    names.sort();
    assert_eq!(names, ["disk0", "disk0@base", "vm2"]);

    let mut want = vec![0u8; 2 * MIB as usize];
    want[..65536].copy_from_slice(&pattern(1, 65536));
    want[MIB as usize..MIB as usize + 4096].copy_from_slice(&pattern(2, 4096));
    let mut buf = vec![0u8; 2 * MIB as usize];
    for name in ["disk0@base", "vm2"] {
        pool.volume(name).unwrap().read(0, &mut buf).await.unwrap();
        assert!(buf == want, "{name} reads differently from what version 1 wrote");
    }
    want[4096..8192].copy_from_slice(&pattern(3, 4096));
    pool.volume("disk0").unwrap().read(0, &mut buf).await.unwrap();
    assert!(buf == want, "disk0 reads differently from what version 1 wrote");
    assert_eq!(pool.changed_ranges("disk0@base", "disk0").await.unwrap(), vec![4096..8192]);
    assert_consistent(&pool).await;
}

/// Version 2: a pool of 72 blocks, nearly filled, then grown twice, with
/// data in the extension.
const V2_FIRST_BLOCKS: u64 = 72;
const V2_BEFORE: usize = 40;
const V2_AFTER: usize = 16;

async fn build_v2() -> Pool<MemBackend> {
    let opts = PoolOptions { catalog_pages: 1, ..Default::default() };
    let pool = mem_pool_with(V2_FIRST_BLOCKS * 4096, opts).await;
    let v = pool.create_volume("disk0", 2 * MIB).await.unwrap();
    for i in 0..V2_BEFORE {
        v.write(i as u64 * 4096, &pattern(10 + i as u64, 4096), false).await.unwrap();
    }
    pool.snapshot("disk0", "base").await.unwrap();
    pool.backend().set_len(8 * MIB);
    assert!(pool.grow().await.unwrap().grew());
    for i in 0..V2_AFTER {
        v.write(MIB + i as u64 * 4096, &pattern(100 + i as u64, 4096), false).await.unwrap();
    }
    pool.clone_snapshot("disk0@base", "vm2").await.unwrap();
    pool.backend().set_len(8 * MIB + 512 * 1024);
    assert!(pool.grow().await.unwrap().grew());
    pool.flush().await.unwrap();
    pool
}

#[tokio::test]
async fn version_2_pool_opens_and_reads_the_same() {
    if write_fixture(FIXTURE_V2) {
        let pool = build_v2().await;
        std::fs::write(FIXTURE_V2, encode(&pool.backend().snapshot())).unwrap();
    }
    let bytes = decode(&std::fs::read(FIXTURE_V2).expect("fixture present"));
    let sb = Superblock::decode(&bytes[..BLOCK_SIZE]).unwrap();
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), FORMAT_VERSION);
    assert_eq!(sb.first_total_blocks(), V2_FIRST_BLOCKS);
    assert!(!sb.extensions.is_empty() && sb.extensions[0].refcount_pages > 0, "{sb:?}");
    let (pool, report) = Pool::open(MemBackend::from_bytes(bytes), PoolOptions::default()).await.unwrap();
    assert!(report.superblock_fallback.is_none());
    assert_eq!(pool.stats().total_bytes, sb.usable_blocks() * 4096);
    let mut names: Vec<String> = pool.list().into_iter().map(|d| d.name).collect();
    names.sort();
    assert_eq!(names, ["disk0", "disk0@base", "vm2"]);

    let mut want = vec![0u8; 2 * MIB as usize];
    for i in 0..V2_BEFORE {
        want[i * 4096..(i + 1) * 4096].copy_from_slice(&pattern(10 + i as u64, 4096));
    }
    let mut buf = vec![0u8; 2 * MIB as usize];
    for name in ["disk0@base", "vm2"] {
        pool.volume(name).unwrap().read(0, &mut buf).await.unwrap();
        assert!(buf == want, "{name} reads differently from what version 2 wrote");
    }
    let at = MIB as usize;
    for i in 0..V2_AFTER {
        want[at + i * 4096..at + (i + 1) * 4096].copy_from_slice(&pattern(100 + i as u64, 4096));
    }
    let disk0 = pool.volume("disk0").unwrap();
    disk0.read(0, &mut buf).await.unwrap();
    assert!(buf == want, "disk0 reads differently from what version 2 wrote");
    // Some of that lives in the extension.
    let last = disk0.physical_block(MIB + (V2_AFTER as u64 - 1) * 4096).await.unwrap().unwrap();
    assert!(last >= V2_FIRST_BLOCKS, "block {last}: the fixture has no data in its extension");
    assert_consistent(&pool).await;
}
