//! Reads, writes, bounds and the errors the standard names for them.

mod scsi_common;
use scsi_common::*;

#[tokio::test]
async fn written_blocks_read_back_and_fua_writes_succeed() {
    let (_p, lu) = lu(8 * MIB).await;
    let n = nexus(1, "iqn.i1");
    let data = pattern(1, 8 * 512);
    assert_good(&exec(&lu, &n, &write10(100, 8), &data).await);
    let r = exec(&lu, &n, &read10(100, 8), &[]).await;
    assert_good(&r);
    assert_eq!(r.data_in, data);
    let mut fua = write16(200, 8);
    fua[1] = 0x08;
    assert_good(&exec(&lu, &n, &fua, &data).await);
    assert_eq!(exec(&lu, &n, &read16(200, 8), &[]).await.data_in, data);
    // READ(6) with length 0 transfers 256 blocks.
    let r = exec(&lu, &n, &[0x08, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(r.data_in.len(), 256 * 512);
}

#[tokio::test]
async fn ranges_beyond_the_end_are_lba_out_of_range() {
    let (_p, lu) = lu(8 * MIB).await;
    let n = nexus(1, "iqn.i1");
    let blocks = 8 * MIB / 512;
    assert_eq!(sense(&exec(&lu, &n, &read10(blocks as u32, 1), &[]).await), (5, 0x21, 0));
    assert_eq!(sense(&exec(&lu, &n, &read16(blocks - 1, 2), &[]).await), (5, 0x21, 0));
    assert_eq!(sense(&exec(&lu, &n, &read16(u64::MAX, 1), &[]).await), (5, 0x21, 0));
    assert_eq!(sense(&exec(&lu, &n, &write10(blocks as u32 + 1, 0), &[]).await), (5, 0x21, 0));
    assert_eq!(sense(&exec(&lu, &n, &write16(blocks, 1), &[0; 512]).await), (5, 0x21, 0));
    // The last block itself is fine; zero blocks transfer nothing.
    assert_good(&exec(&lu, &n, &read16(blocks - 1, 1), &[]).await);
    let r = exec(&lu, &n, &read10(0, 0), &[]).await;
    assert_good(&r);
    assert!(r.data_in.is_empty());
}

#[tokio::test]
async fn protection_fields_and_unknown_opcodes_are_rejected() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    let mut c = read10(0, 1);
    c[1] = 0x20; // RDPROTECT 001b
    assert_eq!(sense(&exec(&lu, &n, &c, &[]).await), (5, 0x24, 0));
    assert_eq!(sense(&exec(&lu, &n, &[0xC1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await), (5, 0x20, 0));
}

#[tokio::test]
async fn writes_to_a_read_only_volume_are_write_protected() {
    let (_p, lu) = read_only_lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    assert_eq!(sense(&exec(&lu, &n, &write10(0, 1), &[0; 512]).await), (7, 0x27, 0));
    assert_eq!(sense(&exec(&lu, &n, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &[0; 24]).await), (7, 0x27, 0));
    assert_good(&exec(&lu, &n, &read10(0, 1), &[]).await);
    // MODE SENSE reports WP.
    let r = exec(&lu, &n, &[0x1A, 0, 0x3F, 0, 255, 0], &[]).await;
    assert_eq!(r.data_in[2] & 0x80, 0x80);
}

#[tokio::test]
async fn verify_with_bytchk_reports_miscompare_offset() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    let data = pattern(3, 1024);
    assert_good(&exec(&lu, &n, &write10(4, 2), &data).await);
    let verify = [0x2F, 0x02, 0, 0, 0, 4, 0, 0, 2, 0];
    assert_good(&exec(&lu, &n, &verify, &data).await);
    let mut bad = data.clone();
    bad[700] ^= 1;
    let r = exec(&lu, &n, &verify, &bad).await;
    assert_eq!(sense(&r), (0x0E, 0x1D, 0));
    assert_eq!(u32::from_be_bytes(r.sense[3..7].try_into().unwrap()), 700);
    // BYTCHK 0 only checks the medium.
    assert_good(&exec(&lu, &n, &[0x2F, 0, 0, 0, 0, 4, 0, 0, 2, 0], &[]).await);
}

#[tokio::test]
async fn compare_and_write_writes_on_match_and_reports_miscompare() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    let old = pattern(5, 1024);
    let new = pattern(6, 1024);
    assert_good(&exec(&lu, &n, &write10(10, 2), &old).await);
    let caw = [0x89, 0, 0, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 2, 0, 0];
    assert_eq!(lu.data_out_len(&caw), 2048);
    let mut buf = old.clone();
    buf.extend_from_slice(&new);
    assert_good(&exec(&lu, &n, &caw, &buf).await);
    assert_eq!(exec(&lu, &n, &read10(10, 2), &[]).await.data_in, new);
    // Now the compare half (old) no longer matches at byte 0 of block 0.
    let r = exec(&lu, &n, &caw, &buf).await;
    assert_eq!(sense(&r), (0x0E, 0x1D, 0));
    let at = old.iter().zip(&new).position(|(a, b)| a != b).unwrap() as u32;
    assert_eq!(u32::from_be_bytes(r.sense[3..7].try_into().unwrap()), at);
    assert_eq!(exec(&lu, &n, &read10(10, 2), &[]).await.data_in, new, "a miscompare writes nothing");
}

#[tokio::test]
async fn orwrite_ors_the_data_in() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    assert_good(&exec(&lu, &n, &write10(0, 1), &[0x0F; 512]).await);
    let orw = [0x8B, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0];
    assert_good(&exec(&lu, &n, &orw, &[0xF0; 512]).await);
    assert_eq!(exec(&lu, &n, &read10(0, 1), &[]).await.data_in, vec![0xFF; 512]);
}

#[tokio::test]
async fn sync_cache_prefetch_and_their_bounds() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    assert_good(&exec(&lu, &n, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await);
    assert_good(&exec(&lu, &n, &[0x34, 0, 0, 0, 0, 0, 0, 0, 8, 0], &[]).await);
    assert_eq!(sense(&exec(&lu, &n, &[0x35, 0, 0, 0, 0x10, 0, 0, 0, 1, 0], &[]).await), (5, 0x21, 0));
    assert_eq!(sense(&exec(&lu, &n, &[0x34, 0, 0, 0, 0x10, 0, 0, 0, 1, 0], &[]).await), (5, 0x21, 0));
}

#[tokio::test]
async fn pre_fetch_fills_the_data_cache() {
    use keel_blockstore::backend::MemBackend;
    use keel_blockstore::{Pool, PoolOptions};
    use keel_iscsi_target::scsi::LogicalUnit;
    // 256 KiB written and committed, then the pool reopened: its data
    // cache starts empty.
    let opts = PoolOptions { data_cache_bytes: 4 * MIB as usize, ..PoolOptions::default() };
    let first = Pool::create(MemBackend::new(72 * MIB), opts.clone()).await.unwrap();
    let data = pattern(7, 256 * 1024);
    first.create_volume("v", 8 * MIB).await.unwrap().write(0, &data, false).await.unwrap();
    first.flush().await.unwrap();
    let pool = Pool::open(MemBackend::from_bytes(first.backend().snapshot()), opts).await.unwrap().0;
    let lu = LogicalUnit::new(std::sync::Arc::new(pool.volume("v").unwrap()), identity());
    let n = nexus(1, "iqn.i1");
    assert_eq!(pool.stats().data_cache.used_bytes, 0);

    // PRE-FETCH(10) of the 512 blocks written: GOOD, and they are cached.
    assert_good(&exec(&lu, &n, &[0x34, 0, 0, 0, 0, 0, 0, 0x02, 0, 0], &[]).await);
    assert_eq!(pool.stats().data_cache.used_bytes, data.len() as u64);
    let misses = pool.stats().data_cache.misses;
    let r = exec(&lu, &n, &read10(0, 512), &[]).await;
    assert_good(&r);
    assert_eq!(r.data_in, data);
    assert_eq!(pool.stats().data_cache.misses, misses, "the read after PRE-FETCH went to the disk");

    // PRE-FETCH(16) with IMMED, length 0 (to the end of the LU): GOOD at
    // once; out of range is still refused before anything starts.
    let mut pf16 = [0u8; 16];
    pf16[0] = 0x90;
    pf16[1] = 0x02;
    pf16[9] = 0x80; // LBA 128
    assert_good(&exec(&lu, &n, &pf16, &[]).await);
    pf16[2] = 0xFF;
    assert_eq!(sense(&exec(&lu, &n, &pf16, &[]).await), (5, 0x21, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_compare_and_write_increments_are_never_lost() {
    let (_p, lu) = lu(MIB).await;
    let lu = std::sync::Arc::new(lu);
    let n = nexus(1, "iqn.i1");
    assert_good(&exec(&lu, &n, &write10(0, 1), &[0; 512]).await);
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let (lu, n) = (lu.clone(), nexus(t + 1, &format!("iqn.i{t}")));
        tasks.push(tokio::spawn(async move {
            let caw = [0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0];
            let mut done = 0;
            while done < 25 {
                let cur = exec(&lu, &n, &read10(0, 1), &[]).await.data_in;
                let v = u64::from_le_bytes(cur[..8].try_into().unwrap());
                let mut buf = cur.clone();
                buf.extend_from_slice(&(v + 1).to_le_bytes());
                buf.extend_from_slice(&[0; 504]);
                // Plain writes elsewhere in the block's neighbourhood run alongside.
                assert_good(&exec(&lu, &n, &write10(8 + t as u32, 1), &[t as u8; 512]).await);
                let r = exec(&lu, &n, &caw, &buf).await;
                match r.status {
                    0 => done += 1,
                    _ => assert_eq!(sense(&r), (0x0E, 0x1D, 0)),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let r = exec(&lu, &n, &read10(0, 1), &[]).await;
    assert_eq!(u64::from_le_bytes(r.data_in[..8].try_into().unwrap()), 100);
}

#[tokio::test]
async fn short_data_out_writes_nothing_and_long_data_out_writes_the_transfer_length() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    assert_good(&exec(&lu, &n, &write10(0, 2), &[b'a'; 1024]).await);
    // EDTL below the transfer length: INVALID FIELD IN COMMAND INFORMATION UNIT.
    assert_eq!(sense(&exec(&lu, &n, &write10(0, 2), &[b'b'; 200]).await), (5, 0x0E, 0x03));
    assert_eq!(exec(&lu, &n, &read10(0, 2), &[]).await.data_in, vec![b'a'; 1024]);
    // EDTL above it: only the transfer length is written.
    assert_good(&exec(&lu, &n, &write10(0, 1), &[b'b'; 1024]).await);
    let r = exec(&lu, &n, &read10(0, 2), &[]).await.data_in;
    assert_eq!((&r[..512], &r[512..]), (&[b'b'; 512][..], &[b'a'; 512][..]));
    // COMPARE AND WRITE wants exactly twice its blocks.
    let caw = [0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0];
    assert_eq!(exec(&lu, &n, &caw, &[b'b'; 2048]).await.status, 2);
}
