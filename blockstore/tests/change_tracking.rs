//! Change tracking: what differs between two snapshots, or a snapshot and
//! the live volume, found from the maps alone.

mod common;
use common::*;

#[tokio::test]
async fn changed_ranges_are_exactly_what_was_written() {
    let pool = mem_pool(256 * MIB).await;
    let v = pool.create_volume("v", 64 * MIB).await.unwrap();
    v.write(0, &pattern(1, 8 * MIB as usize), false).await.unwrap();
    pool.snapshot("v", "a").await.unwrap();
    assert_eq!(v.changed_since("a").await.unwrap(), vec![]);

    v.write(MIB, &pattern(2, 8192), false).await.unwrap();
    v.write(40 * MIB, &pattern(3, 4096), false).await.unwrap(); // a never-written area
    v.discard(5 * MIB, 3 * 4096).await.unwrap();
    v.write(7 * MIB + 512, &pattern(4, 512), false).await.unwrap(); // sub-block: whole block differs
    let want = vec![MIB..MIB + 8192, 5 * MIB..5 * MIB + 12288, 7 * MIB..7 * MIB + 4096, 40 * MIB..40 * MIB + 4096];
    assert_eq!(v.changed_since("a").await.unwrap(), want);

    pool.snapshot("v", "b").await.unwrap();
    assert_eq!(pool.changed_ranges("v@a", "v@b").await.unwrap(), want);
    assert_eq!(v.changed_since("b").await.unwrap(), vec![]);
    v.write(63 * MIB, &pattern(5, 4096), false).await.unwrap();
    assert_eq!(v.changed_since("b").await.unwrap(), vec![63 * MIB..63 * MIB + 4096]);
    // Unwritten-then-discarded space does not count as changed.
    v.discard(50 * MIB, MIB).await.unwrap();
    assert_eq!(v.changed_since("b").await.unwrap(), vec![63 * MIB..63 * MIB + 4096]);
    // The same question through the snapshot handle and after a reopen.
    let r = reopen(&pool).await;
    assert_eq!(r.changed_ranges("v@a", "v@b").await.unwrap(), want);
}

#[tokio::test]
async fn changes_across_a_grow_and_in_a_clone() {
    let pool = mem_pool(256 * MIB).await;
    let v = pool.create_volume("v", MIB).await.unwrap();
    v.write(0, &pattern(1, 65536), false).await.unwrap();
    pool.snapshot("v", "small").await.unwrap();
    pool.resize("v", 1 << 30, false).await.unwrap(); // deeper tree
    v.write(512 * MIB, &pattern(2, 4096), false).await.unwrap();
    assert_eq!(v.changed_since("small").await.unwrap(), vec![512 * MIB..512 * MIB + 4096]);

    let c = pool.clone_snapshot("v@small", "c").await.unwrap();
    c.write(4096, &pattern(3, 4096), false).await.unwrap();
    assert_eq!(pool.changed_ranges("v@small", "c").await.unwrap(), vec![4096..8192]);
}
