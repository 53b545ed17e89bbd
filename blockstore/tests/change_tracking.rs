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

/// Change tracking while commits run: a diff must never hold one device's
/// lock while it waits for another's (a commit takes them all, in catalog
/// order, and new readers queue behind a waiting writer; asking in the
/// order opposite to the catalog's, snapshot first, used to deadlock), and
/// a commit that writes a page the walk met dirty must not turn into a
/// checksum error (it used to: "Corrupt map page").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diffs_and_commits_running_together_never_deadlock() {
    // A deadlock blocks the runtime's threads, timers included: a plain
    // thread ends the test instead of letting it hang.
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let finished = finished.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(60));
            if !finished.load(std::sync::atomic::Ordering::SeqCst) {
                eprintln!("diffs and commits deadlocked");
                std::process::exit(101);
            }
        });
    }
    let pool = mem_pool(256 * MIB).await;
    let v = pool.create_volume("v", 16 * MIB).await.unwrap();
    v.write(0, &pattern(1, MIB as usize), false).await.unwrap();
    pool.snapshot("v", "s").await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (pool, stop) = (pool.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = pool.changed_ranges("v@s", "v").await.unwrap();
                assert!(r.iter().all(|x| x.end <= MIB), "the writer only rewrites the first MiB: {r:?}");
                n += 1;
                if n.is_multiple_of(16) {
                    tokio::task::yield_now().await;
                }
            }
            n
        }));
    }
    let writer = {
        let (v, stop) = (v.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                v.write((i % 256) * 4096, &pattern(i, 4096), false).await.unwrap();
                v.flush().await.unwrap();
                i += 1;
            }
            i
        })
    };
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let all = async {
        let mut diffs = 0;
        for t in tasks {
            diffs += t.await.unwrap();
        }
        (diffs, writer.await.unwrap())
    };
    let (diffs, commits) = all.await;
    finished.store(true, std::sync::atomic::Ordering::SeqCst);
    // Every diff answered (unwraps above) within what the writer touched,
    // and nothing hung.
    assert!(diffs > 100 && commits > 100, "too little overlap to mean anything: {diffs} diffs, {commits} commits");
}
