//! `Volume::write_atomic`: all or nothing, whatever commits run alongside.
//!
//! The stress test below checks the invariant after every commit, but the
//! window in which a commit could split a write is narrow (a map-page load
//! between two entries), so it rarely opens on its own: a non-atomic write
//! path can pass it too. The argument for atomicity is in
//! `Volume::write_atomic`'s documentation; this test guards the results.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{MIB, mem_pool_with, reopen};
use keel_blockstore::{ErrorKind, PoolOptions, Volume};

const REGION: usize = 1 << 20;
/// Regions start half a leaf page off alignment, so each spans two leaves.
const BASE: u64 = 512 * 1024;
const REGIONS: u64 = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commits_never_capture_half_an_atomic_write() {
    // A tiny page cache, so the writes meet misses and must load pages
    // midway; a snapshot, so every write shadows shared map pages.
    let opts = PoolOptions { cache_bytes: 4 * 4096, ..PoolOptions::default() };
    let pool = mem_pool_with(256 * MIB, opts).await;
    let vol = pool.create_volume("v", 64 * MIB).await.unwrap();
    for r in 0..REGIONS {
        vol.write_atomic(BASE + r * 2 * MIB, &vec![1u8; REGION], false).await.unwrap();
    }
    pool.snapshot("v", "s").await.unwrap();
    pool.flush().await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for r in 0..REGIONS {
        let vol: Volume<_> = pool.volume("v").unwrap();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut seed = 2u8;
            while !stop.load(Ordering::Relaxed) {
                vol.write_atomic(BASE + r * 2 * MIB, &vec![seed; REGION], false).await.unwrap();
                seed = seed.wrapping_add(1).max(2);
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut images = 0;
    for _ in 0..20 {
        pool.flush().await.unwrap();
        let again = reopen(&pool).await;
        let v = again.volume("v").unwrap();
        let mut buf = vec![0u8; REGION];
        for r in 0..REGIONS {
            v.read(BASE + r * 2 * MIB, &mut buf).await.unwrap();
            let first = buf[0];
            assert!(
                buf.iter().all(|&b| b == first),
                "region {r} holds parts of two atomic writes after a commit ({first} and {})",
                buf.iter().find(|&&b| b != first).unwrap()
            );
        }
        images += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(images, 20);
}

#[tokio::test]
async fn atomic_writes_take_whole_blocks_up_to_the_limit() {
    let pool = mem_pool_with(64 * MIB, PoolOptions::default()).await;
    let vol = pool.create_volume("v", 8 * MIB).await.unwrap();
    let e = vol.write_atomic(512, &[1u8; 4096], false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    let e = vol.write_atomic(0, &[1u8; 1000], false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    let e = vol
        .write_atomic(0, &vec![1u8; Volume::<keel_blockstore::backend::MemBackend>::ATOMIC_MAX + 4096], false)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    let e = vol.write_atomic(8 * MIB - 4096, &[1u8; 8192], false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange);
    vol.write_atomic(4096, &[7u8; 8192], true).await.unwrap();
    let mut buf = vec![0u8; 16384];
    vol.read(0, &mut buf).await.unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0));
    assert!(buf[4096..12288].iter().all(|&b| b == 7));
    assert!(buf[12288..].iter().all(|&b| b == 0));
}
