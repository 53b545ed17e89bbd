//! `Pool::committer`: writes no client flushed become durable within its
//! period, without a flush, and it ends with the pool.

mod common;

use std::time::{Duration, Instant};

use common::*;
use keel_blockstore::PoolOptions;

const BS: usize = 4096;

/// A pool with a data cache and write-back, so unflushed writes are in
/// both places a commit must cover: staged blocks, and map changes.
async fn pool() -> keel_blockstore::Pool<keel_blockstore::backend::MemBackend> {
    let opts = PoolOptions { data_cache_bytes: 4 * MIB as usize, write_back_bytes: 64 * BS, ..PoolOptions::default() };
    mem_pool_with(64 * MIB, opts).await
}

async fn read(pool: &keel_blockstore::Pool<keel_blockstore::backend::MemBackend>, off: u64, len: usize) -> Vec<u8> {
    let vol = pool.volume("v").unwrap();
    let mut buf = vec![0u8; len];
    vol.read(off, &mut buf).await.unwrap();
    buf
}

/// Restart images (a copy of the backend's bytes, as after a crash) taken
/// every few milliseconds for up to `within`, until one holds `want` at
/// each offset. Only a finished commit makes a copy hold them: an image
/// taken mid-commit still has the old superblock.
async fn durable_within(
    pool: &keel_blockstore::Pool<keel_blockstore::backend::MemBackend>,
    want: &[(u64, &[u8])],
    within: Duration,
) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        let restarted = reopen(pool).await;
        let mut all = true;
        for (off, data) in want {
            all &= read(&restarted, *off, data.len()).await == *data;
        }
        if all {
            assert_consistent(&restarted).await;
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

#[tokio::test]
async fn unflushed_writes_are_durable_after_a_period_without_a_flush() {
    let pool = pool().await;
    let vol = pool.create_volume("v", 8 * MIB).await.unwrap();
    pool.flush().await.unwrap();
    assert!(!pool.has_uncommitted(), "a flushed pool has nothing to commit");

    // Without the committer, a restart loses what was not flushed: the
    // baseline that makes the check below mean something.
    let a = pattern(1, 2 * BS);
    vol.write(0, &a, false).await.unwrap();
    assert!(pool.has_uncommitted());
    assert_eq!(read(&reopen(&pool).await, 0, a.len()).await, vec![0u8; a.len()], "written without any commit");

    let committer = tokio::spawn(pool.committer(Duration::from_millis(20)));
    // A small write (staged in the data cache) and a large one (written
    // straight to the disk), both unflushed.
    let b = pattern(2, BS);
    let c = pattern(3, 256 * 1024);
    vol.write(MIB, &b, false).await.unwrap();
    vol.write(2 * MIB, &c, false).await.unwrap();
    let want: [(u64, &[u8]); 3] = [(0, &a), (MIB, &b), (2 * MIB, &c)];
    assert!(durable_within(&pool, &want, Duration::from_secs(10)).await, "the committer left writes uncommitted");
    assert!(!committer.is_finished(), "the committer runs while the pool is in use");
    committer.abort();
}

#[tokio::test]
async fn no_commit_follows_close() {
    let pool = pool().await;
    let vol = pool.create_volume("v", 8 * MIB).await.unwrap();
    let committer = tokio::spawn(pool.committer(Duration::from_millis(1)));
    vol.write(0, &pattern(4, BS), false).await.unwrap();
    let other = pool.clone();
    pool.close().await.unwrap();
    // A handle is left (the committer could still upgrade its own), yet it
    // must stop instead of committing after close.
    tokio::time::timeout(Duration::from_secs(5), committer).await.expect("the committer went on after close").unwrap();
    drop(other);
}

#[tokio::test]
async fn the_committer_ends_with_the_pool() {
    let pool = pool().await;
    let committer = tokio::spawn(pool.committer(Duration::from_millis(10)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!committer.is_finished());
    drop(pool);
    tokio::time::timeout(Duration::from_secs(5), committer).await.expect("the committer outlived its pool").unwrap();
}
