//! Helpers shared by the scenario tests.
#![allow(dead_code)]

use keel_blockstore::backend::MemBackend;
use keel_blockstore::{Pool, PoolOptions};

pub const MIB: u64 = 1 << 20;

/// A fresh pool on `bytes` of memory.
pub async fn mem_pool(bytes: u64) -> Pool<MemBackend> {
    Pool::create(MemBackend::new(bytes), PoolOptions::default()).await.unwrap()
}

/// A fresh pool with custom options.
pub async fn mem_pool_with(bytes: u64, opts: PoolOptions) -> Pool<MemBackend> {
    Pool::create(MemBackend::new(bytes), opts).await.unwrap()
}

/// Reopen the same bytes as a new pool (what a restart sees).
pub async fn reopen(pool: &Pool<MemBackend>) -> Pool<MemBackend> {
    let bytes = pool.backend().snapshot();
    Pool::open(MemBackend::from_bytes(bytes), PoolOptions::default()).await.unwrap().0
}

/// A block of bytes derived from a seed, so every write is distinct.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Assert the pool's invariants hold.
pub async fn assert_consistent(pool: &Pool<MemBackend>) {
    let problems = pool.check().await.unwrap();
    assert!(problems.is_empty(), "consistency check failed: {problems:#?}");
}
