//! Power cuts in the middle of shared copies (`Volume::copy_within`): at
//! every operation of a workload of copies, overwrites of their sources and
//! flushes, the pool reopens, its consistency check (every reference count
//! recomputed from the trees) passes, and every block of a copy's
//! destination holds its old data or the copied data, never anything else;
//! what a completed flush made durable is exactly there.

mod common;
#[path = "common/crash_backend.rs"]
mod crash_backend;

use crash_backend::{CrashBackend, TearPolicy};
use keel_blockstore::backend::MemBackend;
use keel_blockstore::{BLOCK_SIZE, Pool, PoolOptions};
use rand::SeedableRng;
use rand::rngs::SmallRng;

const MIB: u64 = 1 << 20;
const BS: usize = BLOCK_SIZE;

/// The blocks of `data` (4 KiB each).
fn blocks(data: &[u8]) -> Vec<&[u8]> {
    data.chunks_exact(BS).collect()
}

/// The workload after the durable setup; returns the number of flushes
/// that completed.
async fn workload(pool: &Pool<CrashBackend>) -> usize {
    let mut flushed = 0;
    let Ok(v) = pool.volume("v") else { return flushed };
    // Copy A over B (shared), overwrite a block of A, flush; move the copy
    // up by 5 blocks (overlapping, shared), flush.
    if v.copy_within(0, 2 * MIB, MIB, false).await.is_err() {
        return flushed;
    }
    if v.write(8192, &common::pattern(3, BS), false).await.is_err() {
        return flushed;
    }
    if v.flush().await.is_err() {
        return flushed;
    }
    flushed += 1;
    if v.copy_within(2 * MIB, 2 * MIB + 5 * BS as u64, MIB - 5 * BS as u64, false).await.is_err() {
        return flushed;
    }
    if v.flush().await.is_ok() {
        flushed += 1;
    }
    flushed
}

#[test]
fn copies_cut_by_power_loss_leave_old_or_copied_blocks() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let a = common::pattern(1, MIB as usize);
        let b = common::pattern(2, MIB as usize);
        let setup = || async {
            let backend = CrashBackend::new(16 << 20);
            let pool = Pool::create(backend.clone(), PoolOptions::default()).await.unwrap();
            let v = pool.create_volume("v", 4 * MIB).await.unwrap();
            v.write(0, &a, false).await.unwrap();
            v.write(2 * MIB, &b, false).await.unwrap();
            pool.flush().await.unwrap();
            backend.reset_op_count();
            (backend, pool)
        };
        // A dry run counts the workload's operations.
        let (backend, pool) = setup().await;
        assert_eq!(workload(&pool).await, 2);
        let total = backend.ops();
        assert!(total > 4, "{total} operations");
        eprintln!("{total} operations: {} crash images", 3 * total);

        // States a block of the destination [2 MiB, 3 MiB) may show: B
        // (nothing durable yet), A (first copy; block 2 of A may already be
        // the overwrite, which happened after the copy read it, so no), and
        // after the move: the first copy's block 5 lower.
        let a_blocks = blocks(&a);
        let b_blocks = blocks(&b);
        let mut rng = SmallRng::seed_from_u64(7);
        let mut cuts = 0;
        for cut in 1..=total {
            for policy in [TearPolicy::KEEP_ALL, TearPolicy::DROP_ALL, TearPolicy::MIXED] {
                let (backend, pool) = setup().await;
                backend.crash_at(cut);
                let flushed = workload(&pool).await;
                drop(pool);
                let (image, _) = backend.crash_image(&mut rng, policy);
                let (pool, _) = Pool::open(MemBackend::from_bytes(image), PoolOptions::default())
                    .await
                    .unwrap_or_else(|e| panic!("cut {cut}: the pool does not reopen: {e}"));
                let problems = pool.check().await.unwrap();
                assert!(problems.is_empty(), "cut {cut}: {problems:#?}");
                let v = pool.volume("v").unwrap();
                let mut src = vec![0u8; MIB as usize];
                v.read(0, &mut src).await.unwrap();
                let mut dst = vec![0u8; MIB as usize];
                v.read(2 * MIB, &mut dst).await.unwrap();
                let overwrite = common::pattern(3, BS);
                for (i, got) in blocks(&src).into_iter().enumerate() {
                    let ok = got == a_blocks[i] || (i == 2 && got == overwrite.as_slice());
                    assert!(ok, "cut {cut}: source block {i} holds neither A nor its overwrite");
                    if flushed >= 1 && i == 2 {
                        assert_eq!(got, overwrite.as_slice(), "cut {cut}: a flushed overwrite is lost");
                    }
                }
                for (i, got) in blocks(&dst).into_iter().enumerate() {
                    let first_copy = got == a_blocks[i];
                    let moved = i >= 5 && got == a_blocks[i - 5];
                    let old = got == b_blocks[i];
                    assert!(first_copy || moved || old, "cut {cut}: destination block {i} holds foreign data");
                    if flushed >= 1 {
                        assert!(!old, "cut {cut}: block {i} of a flushed copy reads its old data");
                    }
                    if flushed == 2 && i >= 5 {
                        assert!(moved, "cut {cut}: block {i} of the flushed move is not there");
                    }
                }
                // The recovered pool goes on: the shared blocks split on write.
                v.write(2 * MIB, &common::pattern(9, BS), true).await.unwrap();
                let problems = pool.check().await.unwrap();
                assert!(problems.is_empty(), "cut {cut}, after more writes: {problems:#?}");
                cuts += 1;
            }
        }
        assert!(cuts >= 3 * total as usize);
    });
}
