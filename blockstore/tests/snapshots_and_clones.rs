//! Snapshots and clones: O(1), point-in-time, independent lives, shared
//! space until written.

mod common;
use common::*;
use keel_blockstore::{DeviceKind, ErrorKind};

#[tokio::test]
async fn snapshot_keeps_its_point_in_time_while_the_volume_moves_on() {
    let pool = mem_pool(64 * MIB).await;
    let v = pool.create_volume("v", 4 * MIB).await.unwrap();
    v.write(0, &pattern(1, MIB as usize), false).await.unwrap();
    let s1 = pool.snapshot("v", "s1").await.unwrap();
    v.write(4096, &pattern(2, 8192), false).await.unwrap();
    v.discard(MIB / 2, 65536).await.unwrap();
    let s2 = pool.snapshot("v", "s2").await.unwrap();
    v.write(0, &pattern(3, 4096), false).await.unwrap();

    let mut buf = vec![0u8; MIB as usize];
    s1.read(0, &mut buf).await.unwrap();
    assert!(buf == pattern(1, MIB as usize), "s1 changed");
    let mut want2 = pattern(1, MIB as usize);
    want2[4096..12288].copy_from_slice(&pattern(2, 8192));
    want2[MIB as usize / 2..MIB as usize / 2 + 65536].fill(0);
    s2.read(0, &mut buf).await.unwrap();
    assert!(buf == want2, "s2 wrong");
    let mut want_v = want2.clone();
    want_v[..4096].copy_from_slice(&pattern(3, 4096));
    v.read(0, &mut buf).await.unwrap();
    assert!(buf == want_v, "volume wrong");

    assert!(s1.read_only());
    assert_eq!(s1.write(0, &[0u8; 4096], false).await.unwrap_err().kind(), ErrorKind::ReadOnly);
    assert_eq!(s1.discard(0, 4096).await.unwrap_err().kind(), ErrorKind::ReadOnly);
    assert_eq!(pool.snapshot("v", "s1").await.unwrap_err().kind(), ErrorKind::AlreadyExists);
    assert_eq!(pool.volume("v@s2").unwrap().name(), "v@s2");
    assert_consistent(&pool).await;
    let r = reopen(&pool).await;
    r.volume("v@s1").unwrap().read(0, &mut buf).await.unwrap();
    assert!(buf == pattern(1, MIB as usize), "s1 wrong after reopen");
    assert_consistent(&r).await;
}

#[tokio::test]
async fn snapshot_costs_the_same_whatever_the_volume_holds() {
    // O(1): a snapshot of a volume with 16 MiB mapped allocates no space.
    let pool = mem_pool(128 * MIB).await;
    let v = pool.create_volume("big", 64 * MIB).await.unwrap();
    for i in 0..16u64 {
        v.write(i * MIB, &pattern(i, MIB as usize), false).await.unwrap();
    }
    pool.flush().await.unwrap();
    let before = pool.stats().allocated_bytes;
    pool.snapshot("big", "s").await.unwrap();
    assert_eq!(pool.stats().allocated_bytes, before, "a snapshot must not copy anything");
    // The first write after it copies only the path to one block.
    v.write(0, &pattern(99, 4096), false).await.unwrap();
    let grown = pool.stats().allocated_bytes - before;
    assert!(grown <= 4 * 4096, "first write after a snapshot allocated {grown} bytes");
}

#[tokio::test]
async fn clone_lives_on_when_its_origin_and_snapshot_are_deleted() {
    let pool = mem_pool(64 * MIB).await;
    let v = pool.create_volume("base", 2 * MIB).await.unwrap();
    v.write(0, &pattern(7, 2 * MIB as usize), false).await.unwrap();
    pool.snapshot("base", "gold").await.unwrap();
    let c = pool.clone_snapshot("base@gold", "vm1").await.unwrap();
    assert!(!c.read_only());
    let shared = pool.stats().allocated_bytes;
    c.write(8192, &pattern(8, 4096), false).await.unwrap();
    assert!(pool.stats().allocated_bytes - shared < 8 * 4096, "clone copies only what it writes");
    let info = pool.list().into_iter().find(|d| d.name == "vm1").unwrap();
    assert_eq!(info.kind, DeviceKind::Volume);
    assert_eq!(info.origin.as_deref(), Some("base@gold"));

    assert_eq!(pool.delete_volume("base", false).await.unwrap_err().kind(), ErrorKind::Refused);
    pool.delete_volume("base", true).await.unwrap();
    assert_eq!(pool.volume("base@gold").unwrap_err().kind(), ErrorKind::NotFound);
    let mut want = pattern(7, 2 * MIB as usize);
    want[8192..12288].copy_from_slice(&pattern(8, 4096));
    let mut buf = vec![0u8; 2 * MIB as usize];
    c.read(0, &mut buf).await.unwrap();
    assert!(buf == want, "clone damaged by deleting its origin");
    assert_consistent(&pool).await;
    // Deleting the clone returns everything.
    pool.delete_volume("vm1", false).await.unwrap();
    pool.flush().await.unwrap();
    assert_eq!(pool.stats().allocated_bytes, 0);
    assert_consistent(&pool).await;
}

#[tokio::test]
async fn reads_are_right_through_a_thousand_snapshots() {
    let pool = mem_pool(64 * MIB).await;
    let v = pool.create_volume("v", MIB).await.unwrap();
    let mut model = vec![0u8; MIB as usize];
    for i in 0..1000u64 {
        let off = (i * 7919 % 256) * 4096;
        let data = pattern(i, 4096);
        v.write(off, &data, false).await.unwrap();
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
        pool.snapshot("v", &format!("s{i}")).await.unwrap();
    }
    let mut buf = vec![0u8; MIB as usize];
    v.read(0, &mut buf).await.unwrap();
    assert!(buf == model);
    // An early snapshot still sees only the first write.
    let mut first = vec![0u8; MIB as usize];
    first[..4096].copy_from_slice(&pattern(0, 4096));
    pool.volume("v@s0").unwrap().read(0, &mut buf).await.unwrap();
    assert!(buf == first);
    assert_eq!(pool.list().len(), 1001);
    assert_consistent(&pool).await;
}
