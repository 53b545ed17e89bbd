//! Space: discard and write-zeroes return what no snapshot holds; a full
//! pool fails writes with a distinct error, harms nothing, and recovers.

mod common;
use common::*;
use keel_blockstore::{ErrorKind, PoolOptions};

#[tokio::test]
async fn discard_returns_space_unless_a_snapshot_holds_it() {
    let pool = mem_pool(64 * MIB).await;
    let v = pool.create_volume("v", 8 * MIB).await.unwrap();
    v.write(0, &pattern(1, 4 * MIB as usize), false).await.unwrap();
    pool.flush().await.unwrap();
    let full = pool.stats().allocated_bytes;
    assert!(full >= 4 * MIB);

    pool.snapshot("v", "keep").await.unwrap();
    v.discard(0, 2 * MIB).await.unwrap();
    pool.flush().await.unwrap();
    // The snapshot still holds the data: only map pages may change.
    assert!(pool.stats().allocated_bytes >= full, "space the snapshot holds came back");
    assert_eq!(v.allocated_bytes(), 2 * MIB);
    let mut buf = vec![1u8; 2 * MIB as usize];
    v.read(0, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0));

    pool.delete_snapshot("v", "keep").await.unwrap();
    let after_delete = pool.stats().allocated_bytes;
    assert!(after_delete <= full - 2 * MIB + 16 * 4096, "deleting the snapshot returned too little: {after_delete}");
    v.write_zeroes(2 * MIB, MIB, false).await.unwrap();
    pool.flush().await.unwrap();
    assert!(pool.stats().allocated_bytes <= after_delete - MIB + 4096);
    // A partial-block zero leaves the rest of the block intact.
    v.write_zeroes(3 * MIB + 512, 1024, false).await.unwrap();
    let mut blk = vec![0u8; 4096];
    v.read(3 * MIB, &mut blk).await.unwrap();
    let mut want = pattern(1, 4 * MIB as usize)[3 * MIB as usize..3 * MIB as usize + 4096].to_vec();
    want[512..1536].fill(0);
    assert!(blk == want);
    assert_consistent(&pool).await;
}

#[tokio::test]
async fn full_pool_fails_writes_cleanly_and_recovers_when_space_is_freed() {
    let pool = mem_pool(16 * MIB).await;
    let a = pool.create_volume("a", 64 * MIB).await.unwrap(); // overcommitted
    let mut written = 0u64;
    let err = loop {
        match a.write(written, &pattern(written, 65536), false).await {
            Ok(()) => written += 65536,
            Err(e) => break e,
        }
        assert!(written < 64 * MIB, "the pool never filled");
    };
    assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
    assert!(err.to_string().contains("out of space"), "{err}");
    assert!(written > 8 * MIB, "pool filled too early: {written}");
    // Everything acknowledged is intact, before and after a flush.
    pool.flush().await.unwrap();
    for off in (0..written).step_by(65536) {
        let mut buf = vec![0u8; 65536];
        a.read(off, &mut buf).await.unwrap();
        assert!(buf == pattern(off, 65536), "data at {off} harmed by the full pool");
    }
    // A full pool can still discard, and then writes succeed again.
    a.discard(0, 4 * MIB).await.unwrap();
    a.write(written, &pattern(1, 65536), false).await.unwrap();
    a.write(written + 65536, &pattern(2, 65536), true).await.unwrap();
    let mut buf = vec![0u8; 65536];
    a.read(written + 65536, &mut buf).await.unwrap();
    assert!(buf == pattern(2, 65536));
    assert_consistent(&pool).await;
}

#[tokio::test]
async fn mapping_many_times_the_cache_still_works() {
    // 64 pages of cache (256 KiB); the volume's map needs ~1100 pages.
    let opts = PoolOptions { cache_bytes: 64 * 4096, dirty_limit_bytes: 32 * 4096, ..Default::default() };
    let pool = mem_pool_with(1200 * MIB, opts).await;
    let v = pool.create_volume("v", 1100 * MIB).await.unwrap();
    // One block in every 1 MiB: one leaf page per write.
    for i in 0..1100u64 {
        v.write(i * MIB + (i % 256) * 4096, &pattern(i, 4096), false).await.unwrap();
    }
    pool.flush().await.unwrap();
    assert!(pool.stats().cached_pages <= 64 + 16, "cache grew to {}", pool.stats().cached_pages);
    for i in (0..1100u64).rev() {
        let mut buf = vec![0u8; 4096];
        v.read(i * MIB + (i % 256) * 4096, &mut buf).await.unwrap();
        assert!(buf == pattern(i, 4096), "block {i}");
    }
    assert!(pool.stats().cached_pages <= 64 + 16, "cache grew to {}", pool.stats().cached_pages);
    let r = reopen(&pool).await;
    let mut buf = vec![0u8; 4096];
    r.volume("v").unwrap().read(500 * MIB + 244 * 4096, &mut buf).await.unwrap();
    assert!(buf == pattern(500, 4096));
}
