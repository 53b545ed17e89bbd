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

/// Wait (up to `within`) until nothing is left to commit.
async fn settled(pool: &keel_blockstore::Pool<keel_blockstore::backend::MemBackend>, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if !pool.has_uncommitted() {
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
    assert!(settled(&pool, Duration::from_secs(10)).await, "the committer left writes uncommitted");

    let restarted = reopen(&pool).await;
    assert_eq!(read(&restarted, 0, a.len()).await, a);
    assert_eq!(read(&restarted, MIB, b.len()).await, b);
    assert_eq!(read(&restarted, 2 * MIB, c.len()).await, c);
    assert_consistent(&restarted).await;
    assert!(!committer.is_finished(), "the committer runs while the pool is in use");
    committer.abort();
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
