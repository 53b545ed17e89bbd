//! Copies inside a device (`Volume::copy_within`, what SCSI EXTENDED COPY
//! uses): whole blocks are shared, not copied, and both sides live on
//! independently; any offsets and overlaps behave like `memmove`.

mod common;
use common::*;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[tokio::test]
async fn an_aligned_copy_shares_blocks_and_both_sides_live_on() {
    let pool = mem_pool(256 * MIB).await;
    let v = pool.create_volume("v", 64 * MIB).await.unwrap();
    let data = pattern(1, 16 * MIB as usize);
    v.write(0, &data, false).await.unwrap();
    v.flush().await.unwrap();
    let before = pool.stats().allocated_bytes;

    v.copy_within(0, 32 * MIB, 16 * MIB, true).await.unwrap();
    let mut got = vec![0u8; 16 * MIB as usize];
    v.read(32 * MIB, &mut got).await.unwrap();
    assert!(got == data, "the copy reads back different bytes");
    // No data was copied: only map pages were added.
    let grown = pool.stats().allocated_bytes - before;
    assert!(grown < MIB / 4, "a 16 MiB shared copy took {grown} bytes of new space");
    assert_eq!(v.physical_block(5 * MIB).await.unwrap(), v.physical_block(37 * MIB).await.unwrap());

    // Writing either side leaves the other alone.
    v.write(MIB, &pattern(2, 4096), false).await.unwrap();
    v.write(40 * MIB, &pattern(3, 8192), false).await.unwrap();
    v.read(32 * MIB, &mut got).await.unwrap();
    let mut want = data.clone();
    want[8 * MIB as usize..8 * MIB as usize + 8192].copy_from_slice(&pattern(3, 8192));
    assert!(got == want, "the copy changed with its source");
    v.read(0, &mut got).await.unwrap();
    let mut want = data.clone();
    want[MIB as usize..MIB as usize + 4096].copy_from_slice(&pattern(2, 4096));
    assert!(got == want, "the source changed with its copy");
    assert_consistent(&pool).await;

    // It survives a restart; discarding the source frees nothing the copy holds.
    let r = reopen(&pool).await;
    let v = r.volume("v").unwrap();
    v.discard(0, 16 * MIB).await.unwrap();
    v.read(32 * MIB + 16 * MIB - 4096, &mut got[..4096]).await.unwrap();
    assert!(got[..4096] == data[data.len() - 4096..]);
    assert_consistent(&r).await;
}

/// Random offsets (aligned, sharing the in-block offset, or not), lengths
/// and overlaps in both directions, against `copy_within` on a `Vec`.
#[tokio::test]
async fn copies_at_any_offsets_and_overlaps_behave_like_memmove() {
    let size = 4 * MIB;
    let pool = mem_pool(128 * MIB).await;
    let v = pool.create_volume("v", size).await.unwrap();
    let mut model = pattern(7, size as usize);
    v.write(0, &model, false).await.unwrap();
    let mut rng = SmallRng::seed_from_u64(0xC0FE);
    for round in 0..120 {
        // The store's unit is the 512-byte sector; its blocks are 4 KiB.
        let sectors = |r: std::ops::Range<u64>, rng: &mut SmallRng| rng.gen_range(r) * 512;
        let len = match rng.gen_range(0..4) {
            0 => sectors(1..18, &mut rng),
            1 => rng.gen_range(1..64) * 4096,
            _ => sectors(1..1200, &mut rng),
        };
        let src = sectors(0..(size - len) / 512 + 1, &mut rng);
        let dst = match rng.gen_range(0..4) {
            // Overlapping, either direction.
            0 => (src + sectors(0..len / 512, &mut rng)).min(size - len),
            1 => src.saturating_sub(sectors(0..len / 512, &mut rng)),
            // Same offset within a block: shares the middle.
            2 => (rng.gen_range(0..(size - len) / 4096) * 4096 + src % 4096).min(size - len),
            _ => sectors(0..(size - len) / 512 + 1, &mut rng),
        };
        v.copy_within(src, dst, len, false).await.unwrap();
        model.copy_within(src as usize..(src + len) as usize, dst as usize);
        if round % 10 == 9 {
            // A write between copies (shared blocks must split), then compare.
            let off = rng.gen_range(0..size / 4096) * 4096;
            let p = pattern(round, 4096);
            v.write(off, &p, false).await.unwrap();
            model[off as usize..off as usize + 4096].copy_from_slice(&p);
            let mut got = vec![0u8; size as usize];
            v.read(0, &mut got).await.unwrap();
            let differ = (0..size as usize).filter(|&i| got[i] != model[i]).count();
            assert_eq!(differ, 0, "round {round}: bytes differ from memmove's result");
        }
    }
    let mut got = vec![0u8; size as usize];
    v.read(0, &mut got).await.unwrap();
    assert!(got == model, "the volume differs from memmove's result");
    assert_consistent(&pool).await;
}

#[tokio::test]
async fn copies_are_checked_like_writes() {
    let pool = mem_pool(64 * MIB).await;
    let v = pool.create_volume("v", 4 * MIB).await.unwrap();
    assert!(v.copy_within(0, 4 * MIB - 4096, 8192, false).await.is_err(), "a copy past the end");
    assert!(v.copy_within(4 * MIB, 0, 1, false).await.is_err(), "a source past the end");
    pool.snapshot("v", "s").await.unwrap();
    let s = pool.volume("v@s").unwrap();
    assert!(s.copy_within(0, MIB, 4096, false).await.is_err(), "a copy into a snapshot");
    // A copy of a hole makes a hole.
    v.write(MIB, &pattern(1, 4096), false).await.unwrap();
    v.copy_within(2 * MIB, MIB, 4096, false).await.unwrap();
    let mut got = vec![1u8; 4096];
    v.read(MIB, &mut got).await.unwrap();
    assert!(got.iter().all(|&b| b == 0));
    assert_eq!(v.physical_block(MIB).await.unwrap(), None);
}
