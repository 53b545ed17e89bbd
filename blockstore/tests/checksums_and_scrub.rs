//! A damaged block is an error to the reader, never wrong data; the scrub
//! finds it.

mod common;
use common::*;
use keel_blockstore::ErrorKind;

#[tokio::test]
async fn corrupt_data_block_fails_the_read_and_the_scrub_reports_it() {
    let pool = mem_pool(64 * MIB).await;
    let v = pool.create_volume("v", 4 * MIB).await.unwrap();
    v.write(0, &pattern(1, MIB as usize), false).await.unwrap();
    pool.flush().await.unwrap();
    assert_eq!(pool.scrub().await.unwrap().damage, vec![]);

    let phys = v.physical_block(65536).await.unwrap().expect("mapped");
    pool.backend().with_bytes_mut(|b| b[phys as usize * 4096 + 100] ^= 0x40);
    let mut buf = vec![0u8; 4096];
    let err = v.read(65536, &mut buf).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("checksum"), "{err}");
    // Neighbours still read.
    v.read(61440, &mut buf).await.unwrap();
    assert!(buf[..] == pattern(1, MIB as usize)[61440..65536]);
    // A larger read spanning the bad block fails as a whole.
    let mut big = vec![0u8; 256 * 1024];
    assert_eq!(v.read(0, &mut big).await.unwrap_err().kind(), ErrorKind::Corrupt);

    let report = pool.scrub().await.unwrap();
    assert_eq!(report.damage.len(), 1);
    assert_eq!(report.damage[0].block, phys);
    assert_eq!(report.damage[0].offset, Some(65536));
    assert_eq!(report.damage[0].device, "v");
    assert!(report.blocks_checked >= 256);

    // Rewriting the block heals the volume (the new data goes elsewhere).
    v.write(65536, &pattern(2, 4096), false).await.unwrap();
    v.read(65536, &mut buf).await.unwrap();
    assert!(buf == pattern(2, 4096));
}

#[tokio::test]
async fn corrupt_map_page_is_detected_on_load() {
    let pool = mem_pool(64 * MIB).await;
    let v = pool.create_volume("v", 4 * MIB).await.unwrap();
    v.write(0, &pattern(1, 8192), false).await.unwrap();
    pool.flush().await.unwrap();
    let data_block = v.physical_block(0).await.unwrap().unwrap();
    // Damage every block except the data blocks, superblocks and metadata
    // regions: the map pages are what is left in the data area.
    let bytes = pool.backend().snapshot();
    let reopened_bytes = {
        let mut b = bytes.clone();
        let second = v.physical_block(4096).await.unwrap().unwrap();
        let start = (data_block.min(second) as usize).saturating_sub(64) * 4096;
        for blk in (start / 4096)..(start / 4096 + 128) {
            if blk as u64 != data_block && blk as u64 != second && blk * 4096 < b.len() {
                b[blk * 4096 + 7] ^= 0xff;
            }
        }
        b
    };
    let r = keel_blockstore::Pool::open(
        keel_blockstore::backend::MemBackend::from_bytes(reopened_bytes),
        Default::default(),
    )
    .await;
    match r {
        Err(e) => assert!(matches!(e.kind(), ErrorKind::Format), "{e}"),
        Ok((p, _)) => {
            let mut buf = vec![0u8; 4096];
            let got = p.volume("v").unwrap().read(0, &mut buf).await;
            match got {
                Err(e) => assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}"),
                Ok(()) => assert!(buf == pattern(1, 8192)[..4096], "damaged metadata returned wrong data"),
            }
        }
    }
}

/// A scrub on a pool being written and committed finds no damage: a map
/// page that was dirty when the walk met its parent, and that a commit then
/// wrote, is not damage (the scrub takes its roots inside a commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrub_under_writes_and_commits_reports_no_false_damage() {
    let pool = mem_pool(256 * MIB).await;
    let v = pool.create_volume("v", 64 * MIB).await.unwrap();
    v.write(0, &pattern(1, 16 * MIB as usize), false).await.unwrap();
    pool.snapshot("v", "s").await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (v, stop) = (v.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                v.write((i * 7919 % 4096) * 4096, &pattern(i, 4096), false).await.unwrap();
                if i.is_multiple_of(4) {
                    v.flush().await.unwrap();
                }
                i += 1;
            }
            i
        })
    };
    let mut scrubs = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(3) {
        let r = pool.scrub().await.unwrap();
        assert!(r.damage.is_empty(), "damage reported on a sound pool under load: {:?}", r.damage);
        assert!(r.blocks_checked > 4096, "{r:?}");
        scrubs += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(scrubs > 2 && writes > 100, "too little overlap: {scrubs} scrubs, {writes} writes");
    assert_consistent(&pool).await;
}
