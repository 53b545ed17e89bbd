//! Test data and scratch space shared by every crate's integration tests.

use std::path::PathBuf;

use keel_blockstore::{AnyBackend, Engine, Pool, PoolOptions};

/// `len` pseudo-random bytes (xorshift64) from `seed`: distinct for each
/// seed, the same on every run.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
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

/// A directory on a real disk for pool files (`KEEL_TEST_DIR`, default
/// `/var/tmp`): O_DIRECT does not work on tmpfs.
pub fn scratch() -> PathBuf {
    let p = PathBuf::from(std::env::var("KEEL_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()));
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// A fresh pool on a sparse file of `bytes` in a new directory under
/// [`scratch`] (removed when the returned directory is dropped), on the best
/// engine the machine has.
pub async fn temp_pool(prefix: &str, bytes: u64) -> (tempfile::TempDir, Pool<AnyBackend>) {
    temp_pool_with(prefix, bytes, PoolOptions::default()).await
}

/// [`temp_pool`] with options of its own (say, a data cache).
pub async fn temp_pool_with(prefix: &str, bytes: u64, opts: PoolOptions) -> (tempfile::TempDir, Pool<AnyBackend>) {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(scratch()).unwrap();
    let path = dir.path().join("pool.img");
    std::fs::File::create(&path).unwrap().set_len(bytes).unwrap();
    let backend = AnyBackend::open(&path, Engine::Auto).unwrap();
    let pool = Pool::create(backend, opts).await.unwrap();
    (dir, pool)
}
