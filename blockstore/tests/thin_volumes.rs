//! Thin volumes: unwritten space reads as zeros and costs nothing, writes
//! read back, space is reported, data survives a reopen.

mod common;
use common::*;
use keel_blockstore::ErrorKind;

#[tokio::test]
async fn unwritten_space_reads_zero_and_takes_no_space() {
    let pool = mem_pool(64 * MIB).await;
    let before = pool.stats();
    let v = pool.create_volume("thin", 10 << 30).await.unwrap(); // 10 GiB on a 64 MiB pool
    let mut buf = vec![0xAAu8; 1 << 20];
    v.read(5 << 30, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(v.allocated_bytes(), 0);
    assert_eq!(pool.stats().allocated_bytes, before.allocated_bytes);
    assert_eq!(pool.stats().provisioned_bytes, 10 << 30);
}

#[tokio::test]
async fn writes_read_back_at_every_alignment_and_survive_reopen() {
    let pool = mem_pool(64 * MIB).await;
    let size = 8 * MIB;
    let v = pool.create_volume("v", size).await.unwrap();
    let mut model = vec![0u8; size as usize];
    let cases: &[(u64, usize)] = &[
        (0, 4096),
        (4096 * 3, 3 * 4096),
        (512, 512),
        (4096 * 10 + 1024, 6656),
        (MIB - 512, 1024),
        (2 * MIB, 1 << 20),
        (3 * MIB + 512, (1 << 20) + 3072),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = pattern(i as u64, len);
        v.write(off, &data, false).await.unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
        let mut back = vec![0u8; len];
        v.read(off, &mut back).await.unwrap();
        assert!(back == data, "case {i} at {off}+{len} read back wrong");
    }
    let mut all = vec![0u8; size as usize];
    v.read(0, &mut all).await.unwrap();
    assert!(all == model, "volume differs from the model");
    // Reads at every sector alignment and length, over data and holes, into
    // buffers that are not 4096-aligned in memory either.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..2000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (size / 512)) * 512;
        let len = (((x >> 32) % 256 + 1) * 512).min(size - off) as usize;
        let mut back = vec![0u8; len + 1];
        v.read(off, &mut back[1..]).await.unwrap();
        assert!(back[1..] == model[off as usize..off as usize + len], "read at {off}+{len} differs from the model");
    }
    pool.flush().await.unwrap();
    let reopened = reopen(&pool).await;
    let mut all = vec![0u8; size as usize];
    reopened.volume("v").unwrap().read(0, &mut all).await.unwrap();
    assert!(all == model, "volume differs from the model after reopen");
    assert_consistent(&reopened).await;
}

#[tokio::test]
async fn allocation_reports_holes_and_data() {
    let pool = mem_pool(64 * MIB).await;
    let v = pool.create_volume("v", 4 * MIB).await.unwrap();
    v.write(MIB, &pattern(1, 8192), false).await.unwrap();
    let ext = v.allocation(0, 4 * MIB).await.unwrap();
    let got: Vec<(u64, u64, bool)> = ext.iter().map(|e| (e.offset, e.length, e.allocated)).collect();
    assert_eq!(got, vec![(0, MIB, false), (MIB, 8192, true), (MIB + 8192, 3 * MIB - 8192, false)]);
    assert_eq!(v.allocated_bytes(), 8192);
}

/// A whole-disk allocation query of a large sparse volume walks the map's
/// mapped subtrees; it must say exactly what the per-block lookups of the
/// same range say, for a volume, its snapshot and a clone, with data,
/// holes, discards and zeroes, at the edges and in the middle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_of_a_whole_large_volume_matches_block_by_block() {
    const GIB: u64 = 1 << 30;
    let pool = mem_pool(64 * MIB).await;
    let size = 8 * GIB + 12288;
    let v = pool.create_volume("v", size).await.unwrap();
    for (off, len) in [(0, 4096), (GIB - 4096, 8192), (3 * GIB + 4096 * 300, 1 << 20), (size - 12288, 12288)] {
        v.write(off, &pattern(off, len as usize), false).await.unwrap();
    }
    v.discard(3 * GIB + 4096 * 310, 4096 * 2).await.unwrap();
    pool.snapshot("v", "s").await.unwrap();
    v.write(5 * GIB, &pattern(9, 4096), false).await.unwrap();
    v.write_zeroes(0, 4096, false).await.unwrap();
    pool.clone_snapshot("v@s", "c").await.unwrap();
    let c = pool.volume("c").unwrap();
    c.write(7 * GIB, &pattern(10, 65536), false).await.unwrap();
    pool.create_volume("e", 4 * GIB).await.unwrap();
    for name in ["v", "v@s", "c", "e"] {
        let d = pool.volume(name).unwrap();
        let size = d.size();
        let walked = d.allocation(0, size).await.unwrap();
        // The same range in pieces under the walk's threshold.
        let mut pieces: Vec<keel_blockstore::Extent> = Vec::new();
        let mut at = 0;
        while at < size {
            let n = (512 * MIB).min(size - at);
            for e in d.allocation(at, n).await.unwrap() {
                match pieces.last_mut() {
                    Some(l) if l.allocated == e.allocated && l.offset + l.length == e.offset => l.length += e.length,
                    _ => pieces.push(e),
                }
            }
            at += n;
        }
        assert_eq!(walked, pieces, "{name}");
        assert_eq!(walked.iter().map(|e| e.length).sum::<u64>(), size, "{name}");
        let mapped: u64 = walked.iter().filter(|e| e.allocated).map(|e| e.length).sum();
        assert_eq!(mapped, d.allocated_bytes(), "{name}");
    }
    // A part of the volume, above the threshold, off the block grid.
    let part = v.allocation(GIB - 6000, 2 * GIB + 5).await.unwrap();
    assert_eq!(part.first().map(|e| (e.offset, e.allocated)), Some((GIB - 6000, false)));
    assert_eq!(part.iter().map(|e| e.length).sum::<u64>(), 2 * GIB + 5);
    assert!(part.iter().any(|e| e.allocated && e.offset == GIB - 4096 && e.length == 8192), "{part:?}");
}

#[tokio::test]
async fn out_of_range_and_misaligned_io_is_refused() {
    let pool = mem_pool(64 * MIB).await;
    let v = pool.create_volume("v", MIB).await.unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(v.read(MIB - 2048, &mut buf).await.unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(v.write(MIB, &buf, false).await.unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(v.write(100, &buf[..512], false).await.unwrap_err().kind(), ErrorKind::Invalid);
    assert_eq!(v.read(u64::MAX - 10, &mut buf).await.unwrap_err().kind(), ErrorKind::OutOfRange);
}

#[tokio::test]
async fn names_are_checked_and_unique() {
    let pool = mem_pool(64 * MIB).await;
    pool.create_volume("a", MIB).await.unwrap();
    assert_eq!(pool.create_volume("a", MIB).await.unwrap_err().kind(), ErrorKind::AlreadyExists);
    assert_eq!(pool.create_volume("a@b", MIB).await.unwrap_err().kind(), ErrorKind::Invalid);
    assert_eq!(pool.create_volume("", MIB).await.unwrap_err().kind(), ErrorKind::Invalid);
    assert_eq!(pool.create_volume("x", 1000).await.unwrap_err().kind(), ErrorKind::Invalid);
    assert_eq!(pool.volume("nope").unwrap_err().kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn grow_online_and_refuse_shrink_unless_forced() {
    let pool = mem_pool(64 * MIB).await;
    let v = pool.create_volume("v", MIB).await.unwrap();
    v.write(0, &pattern(5, 65536), false).await.unwrap();
    // Grow across a depth boundary (1 MiB = 256 blocks, 2 GiB needs 3 levels).
    pool.resize("v", 2 << 30, false).await.unwrap();
    assert_eq!(v.size(), 2 << 30);
    let mut back = vec![0u8; 65536];
    v.read(0, &mut back).await.unwrap();
    assert_eq!(back, pattern(5, 65536));
    v.write((2 << 30) - 4096, &pattern(6, 4096), false).await.unwrap();
    let err = pool.resize("v", MIB / 2, false).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused);
    assert!(err.to_string().contains("force"), "{err}");
    pool.resize("v", 32768, true).await.unwrap();
    assert_eq!(v.allocated_bytes(), 32768);
    pool.resize("v", MIB, false).await.unwrap();
    let mut tail = vec![1u8; MIB as usize - 32768];
    v.read(32768, &mut tail).await.unwrap();
    assert!(tail.iter().all(|&b| b == 0), "grown space after a shrink must read zeros");
    assert_consistent(&pool).await;
    let r = reopen(&pool).await;
    assert_eq!(r.volume("v").unwrap().size(), MIB);
    assert_consistent(&r).await;
}

#[tokio::test]
async fn concurrent_writers_and_readers_see_their_data() {
    let pool = mem_pool(256 * MIB).await;
    let v = pool.create_volume("v", 64 * MIB).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let v = v.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..20u64 {
                let off = t * 4 * MIB + (round % 8) * 65536;
                let data = pattern(t * 1000 + round, 65536);
                v.write(off, &data, round % 7 == 0).await.unwrap();
                let mut back = vec![0u8; 65536];
                v.read(off, &mut back).await.unwrap();
                assert_eq!(back, data);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_consistent(&pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sector_writes_into_one_block_lose_nothing() {
    // Eight writers, each owning one 512-byte sector of the same 4 KiB
    // blocks: every read-modify-write must see the others' sectors.
    let pool = mem_pool(64 * MIB).await;
    let v = pool.create_volume("v", MIB).await.unwrap();
    let mut tasks = Vec::new();
    for s in 0..8u64 {
        let v = v.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..50u64 {
                for blk in 0..4u64 {
                    v.write(blk * 4096 + s * 512, &pattern(s * 1000 + round, 512), false).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut buf = vec![0u8; 16384];
    v.read(0, &mut buf).await.unwrap();
    for blk in 0..4usize {
        for s in 0..8usize {
            let at = blk * 4096 + s * 512;
            assert!(
                buf[at..at + 512] == pattern(s as u64 * 1000 + 49, 512)[..],
                "block {blk} sector {s} lost its last write"
            );
        }
    }
    assert_consistent(&pool).await;
}
