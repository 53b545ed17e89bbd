//! The data cache: reads served from memory are the same bytes the disk
//! holds, however blocks are freed and taken again underneath it.

mod common;
use common::*;
use keel_blockstore::{ErrorKind, PoolOptions};

const BS: usize = 4096;

fn cached(cache_bytes: usize) -> PoolOptions {
    PoolOptions { data_cache_bytes: cache_bytes, ..PoolOptions::default() }
}

/// A small pool (so blocks are freed and reused many times over) with a
/// cache bigger than it, against a model of every device's bytes: random
/// writes, zeroes, discards, snapshots taken and deleted, clones, flushes,
/// each followed by reads of random ranges of every device. No lookup may
/// find a block cached with another checksum (`stale`): the checksum check
/// would hide such a mistake from the reads.
#[tokio::test]
async fn reads_match_a_model_while_blocks_are_freed_and_reused() {
    model_run(cached(64 * MIB as usize)).await;
}

/// The same with write-back: writes are acknowledged once staged in the
/// cache, and reach the disk in batches, on flushes and commits.
#[tokio::test]
async fn reads_match_a_model_with_write_back() {
    model_run(PoolOptions { write_back_bytes: 256 * BS, ..cached(4 * MIB as usize) }).await;
}

/// Write-back with a cache so small that staged blocks fill whole shards:
/// writes that find no slot go to the disk themselves.
#[tokio::test]
async fn write_back_in_a_small_cache_matches_the_model_too() {
    model_run(PoolOptions { write_back_bytes: MIB as usize, ..cached(128 * BS) }).await;
}

/// The same with a cache of 64 blocks: most commits free more blocks than
/// that, so their entries are not dropped when released, and only the
/// write side (its invalidation, then its own insert) keeps reused blocks
/// from looking stale.
#[tokio::test]
async fn a_small_cache_matches_the_model_too() {
    model_run(cached(64 * BS)).await;
}

async fn model_run(opts: PoolOptions) {
    let cache_bytes = opts.data_cache_bytes;
    let write_back = opts.write_back_bytes > 0;
    let mut max_staged = 0;
    let pool = mem_pool_with(24 * MIB, opts).await;
    let size = 2 * MIB as usize;
    let v = pool.create_volume("v", size as u64).await.unwrap();
    let mut model = vec![0u8; size];
    // (device name, its bytes)
    let mut frozen: Vec<(String, Vec<u8>)> = Vec::new();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut written_blocks = 0u64;
    for round in 0..1000u64 {
        match rnd(10) {
            0..=4 => {
                let blocks = 1 + rnd(128) as usize;
                let at = rnd((size / BS - blocks) as u64 + 1) as usize * BS;
                let data = pattern(round, blocks * BS);
                v.write(at as u64, &data, rnd(4) == 0).await.unwrap();
                model[at..at + data.len()].copy_from_slice(&data);
                written_blocks += blocks as u64;
            }
            5 => {
                let blocks = 1 + rnd(128) as usize;
                let at = rnd((size / BS - blocks) as u64 + 1) as usize * BS;
                if rnd(2) == 0 {
                    v.discard(at as u64, (blocks * BS) as u64).await.unwrap();
                } else {
                    v.write_zeroes(at as u64, (blocks * BS) as u64, false).await.unwrap();
                }
                model[at..at + blocks * BS].fill(0);
            }
            6 if frozen.len() < 4 => {
                let name = format!("s{round}");
                pool.snapshot("v", &name).await.unwrap();
                frozen.push((format!("v@{name}"), model.clone()));
                if rnd(2) == 0 {
                    let clone = format!("c{round}");
                    pool.clone_snapshot(&format!("v@{name}"), &clone).await.unwrap();
                    frozen.push((clone, model.clone()));
                }
            }
            6 | 7 if !frozen.is_empty() => {
                let (name, _) = frozen.remove(rnd(frozen.len() as u64) as usize);
                match name.split_once('@') {
                    Some((vol, snap)) => pool.delete_snapshot(vol, snap).await.unwrap(),
                    None => pool.delete_volume(&name, true).await.unwrap(),
                }
            }
            _ => pool.flush().await.unwrap(),
        }
        max_staged = max_staged.max(pool.stats().data_cache.staged_bytes);
        // Read back every device at a few random places, in pieces that
        // span cached and uncached blocks.
        let mut devices = vec![("v".to_string(), &model)];
        devices.extend(frozen.iter().map(|(n, m)| (n.clone(), m)));
        for (name, want) in devices {
            let dev = pool.volume(&name).unwrap();
            for _ in 0..3 {
                let blocks = 1 + rnd(32) as usize;
                let at = rnd((size / BS - blocks) as u64 + 1) as usize * BS;
                let mut got = vec![0u8; blocks * BS];
                dev.read(at as u64, &mut got).await.unwrap();
                assert!(got[..] == want[at..at + got.len()], "round {round}: {name} at {at}+{} differs", got.len());
            }
        }
    }
    let st = pool.stats();
    assert!(
        written_blocks * BS as u64 > 3 * st.total_bytes,
        "the workload must reuse the pool's blocks several times over: wrote {written_blocks} blocks into {}",
        st.total_bytes
    );
    assert!(st.data_cache.hits > 100, "{:?}", st.data_cache);
    if cache_bytes < size {
        // Writes fill the cache too, so only a cache smaller than the
        // volume sends reads to the disk.
        assert!(st.data_cache.misses > 100, "{:?}", st.data_cache);
    }
    assert_eq!(st.data_cache.stale, 0, "{:?}", st.data_cache);
    if write_back {
        assert!(max_staged > 0, "no write was staged");
        // The scrub reads the disk under roots taken inside a commit, which
        // writes the staged blocks first: none may look damaged.
        v.write(0, &pattern(u64::MAX, 2 * BS), false).await.unwrap();
        assert!(pool.stats().data_cache.staged_bytes > 0);
        let report = pool.scrub().await.unwrap();
        assert!(report.damage.is_empty(), "{report:?}");
        pool.flush().await.unwrap();
        assert_eq!(pool.stats().data_cache.staged_bytes, 0, "a commit writes every staged block");
    }
    pool.check().await.unwrap();
}

/// Readers on other threads see each block's newest version, or one being
/// written, never an older one and never another block's bytes, while
/// writers overwrite and flush so that freed blocks come back into use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_never_see_an_older_version() {
    concurrent_run(cached(32 * MIB as usize)).await;
}

/// The same with write-back, in batches of 32 blocks: writes flush staged
/// blocks while readers read them and commits write the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_with_write_back() {
    concurrent_run(PoolOptions { write_back_bytes: 64 * BS, ..cached(32 * MIB as usize) }).await;
}

async fn concurrent_run(opts: PoolOptions) {
    let pool = mem_pool_with(8 * MIB, opts).await;
    let blocks = 64u64;
    let v = pool.create_volume("v", blocks * BS as u64).await.unwrap();
    // Block b at version n: b, n, then a pattern of both.
    let contents = |b: u64, n: u64| {
        let mut d = pattern(b << 32 | n, BS);
        d[..8].copy_from_slice(&b.to_le_bytes());
        d[8..16].copy_from_slice(&n.to_le_bytes());
        d
    };
    let mut init = Vec::new();
    for b in 0..blocks {
        init.extend(contents(b, 0));
    }
    v.write(0, &init, false).await.unwrap();
    let versions: std::sync::Arc<Vec<std::sync::atomic::AtomicU64>> =
        std::sync::Arc::new((0..blocks).map(|_| Default::default()).collect());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (v, pool, versions) = (v.clone(), pool.clone(), versions.clone());
        tokio::spawn(async move {
            for n in 1..=4000u64 {
                let b = n * 7 % blocks;
                v.write(b * BS as u64, &contents(b, n), false).await.unwrap();
                versions[b as usize].store(n, std::sync::atomic::Ordering::SeqCst);
                if n % 50 == 0 {
                    pool.flush().await.unwrap();
                }
            }
        })
    };
    let mut readers = Vec::new();
    for r in 0..3u64 {
        let (v, versions, done) = (v.clone(), versions.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            let mut reads = 0u64;
            let mut buf = vec![0u8; BS];
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let b = (reads * 13 + r) % blocks;
                let floor = versions[b as usize].load(std::sync::atomic::Ordering::SeqCst);
                v.read(b * BS as u64, &mut buf).await.unwrap();
                let got_b = u64::from_le_bytes(buf[..8].try_into().unwrap());
                let got_n = u64::from_le_bytes(buf[8..16].try_into().unwrap());
                assert_eq!(got_b, b, "block {b} holds block {got_b}'s bytes");
                assert!(got_n >= floor, "block {b}: read version {got_n} after version {floor} was written");
                assert!(buf == contents(b, got_n), "block {b} version {got_n} is torn");
                reads += 1;
                tokio::task::yield_now().await;
            }
            reads
        }));
    }
    writer.await.unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    for r in readers {
        assert!(r.await.unwrap() > 100);
    }
    let st = pool.stats();
    assert!(st.data_cache.hits > 0, "{:?}", st.data_cache);
    assert_eq!(st.data_cache.stale, 0, "{:?}", st.data_cache);
}

/// A block corrupted on disk after it was cached still reads right from
/// memory (it was verified when it went in), but the scrub reads the disk
/// and reports it, and once evicted the read fails as without a cache.
#[tokio::test]
async fn the_scrub_reads_the_disk_not_the_cache() {
    let pool = mem_pool_with(64 * MIB, cached(MIB as usize)).await;
    let v = pool.create_volume("v", 8 * MIB).await.unwrap();
    v.write(0, &pattern(1, 4 * BS), false).await.unwrap();
    pool.flush().await.unwrap();
    let mut buf = vec![0u8; BS];
    v.read(BS as u64, &mut buf).await.unwrap();
    let phys = v.physical_block(BS as u64).await.unwrap().expect("mapped");
    pool.backend().with_bytes_mut(|b| b[phys as usize * BS + 9] ^= 0x10);
    v.read(BS as u64, &mut buf).await.unwrap();
    assert!(buf[..] == pattern(1, 4 * BS)[BS..2 * BS]);
    let report = pool.scrub().await.unwrap();
    assert_eq!(report.damage.len(), 1, "{report:?}");
    assert_eq!(report.damage[0].block, phys);
    // Push it out of the 1 MiB cache by reading 8 MiB of other blocks.
    v.write(4 * BS as u64, &pattern(2, 8 * MIB as usize - 4 * BS), false).await.unwrap();
    let mut big = vec![0u8; 8 * MIB as usize - 4 * BS];
    v.read(4 * BS as u64, &mut big).await.unwrap();
    assert_eq!(v.read(BS as u64, &mut buf).await.unwrap_err().kind(), ErrorKind::Corrupt);
}

/// Rewriting a cached volume frees its old blocks; their slots are emptied
/// when the grace period ends, so later rounds reuse the same memory
/// instead of growing into more. A round's writes go into the cache while
/// the previous round's blocks are still mapped (until the flush commits
/// the change), so the cache holds two rounds at the peak, never more.
#[tokio::test]
async fn a_rewritten_volume_reuses_its_cache_memory() {
    let pool = mem_pool_with(64 * MIB, cached(32 * MIB as usize)).await;
    let v = pool.create_volume("v", 8 * MIB).await.unwrap();
    let mut buf = vec![0u8; 8 * MIB as usize];
    for round in 0..4u64 {
        let data = pattern(round, 8 * MIB as usize);
        v.write(0, &data, false).await.unwrap();
        pool.flush().await.unwrap();
        v.read(0, &mut buf).await.unwrap();
        assert!(buf == data, "round {round}");
    }
    let st = pool.stats().data_cache;
    assert_eq!(st.used_bytes, 8 * MIB, "{st:?}");
    // A shard may take a few fresh slots when the new blocks hash unevenly.
    assert!(st.resident_bytes < 17 * MIB, "four rounds of 8 MiB grew the cache to {st:?}");
    // Every read found what the writes had put in.
    assert_eq!((st.hits, st.misses), (4 * 2048, 0), "{st:?}");
}

/// A write keeps what it wrote in the cache (as a page cache does), so a
/// read right after it comes from memory: here it still returns the
/// written bytes after the block was damaged on disk, which a read from the
/// disk could not. The scrub still finds the damage.
#[tokio::test]
async fn written_blocks_are_read_from_the_cache() {
    let pool = mem_pool_with(64 * MIB, cached(MIB as usize)).await;
    let v = pool.create_volume("v", 8 * MIB).await.unwrap();
    let data = pattern(7, 4 * BS);
    v.write(0, &data, false).await.unwrap();
    let phys = v.physical_block(2 * BS as u64).await.unwrap().expect("mapped");
    pool.backend().with_bytes_mut(|b| b[phys as usize * BS + 100] ^= 0x01);
    let mut buf = vec![0u8; 4 * BS];
    v.read(0, &mut buf).await.unwrap();
    assert!(buf == data);
    let st = pool.stats().data_cache;
    assert_eq!((st.hits, st.misses, st.stale), (4, 0, 0), "{st:?}");
    let report = pool.scrub().await.unwrap();
    assert_eq!(report.damage.len(), 1, "{report:?}");
    assert_eq!(report.damage[0].block, phys);
}

/// A commit that frees more blocks than the cache holds does not drop them
/// from it when they are released (see `Inner::finish`), so when such a
/// block is taken again only the write side's invalidation stands between
/// its old cached contents and its new ones. Round 0 caches a volume twice
/// the cache's size; later rounds rewrite it in one commit each, without
/// reading (so nothing evicts round 0's entries), until the small pool's
/// allocator comes back to round 0's blocks; each offset that lands on one
/// of them is read back then.
#[tokio::test]
async fn a_block_taken_again_never_meets_its_old_cached_contents() {
    let pool = mem_pool_with(8 * MIB, cached(64 * BS)).await;
    let blocks = 128usize;
    let v = pool.create_volume("v", (blocks * BS) as u64).await.unwrap();
    let mut buf = vec![0u8; BS];
    let mut round0 = std::collections::HashSet::new();
    let mut reused = 0;
    for round in 0..60u64 {
        let data = pattern(round, blocks * BS);
        v.write(0, &data, false).await.unwrap();
        pool.flush().await.unwrap();
        pool.flush().await.unwrap();
        for b in 0..blocks {
            let phys = v.physical_block((b * BS) as u64).await.unwrap().expect("written");
            let read = if round == 0 { round0.insert(phys) } else { round0.remove(&phys) };
            if read {
                v.read((b * BS) as u64, &mut buf).await.unwrap();
                assert!(buf[..] == data[b * BS..(b + 1) * BS], "round {round} block {b}");
                reused += usize::from(round > 0);
            }
        }
    }
    let st = pool.stats().data_cache;
    assert!(reused > 64, "only {reused} of round 0's blocks were taken again: the test proves nothing");
    assert_eq!(st.stale, 0, "{st:?}");
}

/// A backend whose writes wait while a gate is closed, to stop a flush
/// halfway.
#[derive(Clone)]
struct Gated {
    inner: std::sync::Arc<keel_blockstore::backend::MemBackend>,
    closed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl keel_blockstore::Backend for Gated {
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset).await
    }
    async fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        while self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        self.inner.write_at(buf, offset).await
    }
    async fn sync(&self) -> std::io::Result<()> {
        self.inner.sync().await
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn refresh_len(&self) -> std::io::Result<u64> {
        self.inner.refresh_len()
    }
}

/// A write whose future is dropped while it flushes staged blocks (its
/// own and others') must not lose them: the next commit writes them all,
/// and the pool reopened from its bytes reads back every write.
#[tokio::test]
async fn a_flush_dropped_halfway_loses_nothing() {
    use keel_blockstore::Pool;
    use keel_blockstore::backend::MemBackend;
    let backend = Gated {
        inner: std::sync::Arc::new(MemBackend::new(16 * MIB)),
        closed: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    // 64 blocks of write-back: a write that finds 32 queued flushes them.
    let opts = PoolOptions { write_back_bytes: 64 * BS, ..cached(4 * MIB as usize) };
    let pool = Pool::create(backend.clone(), opts).await.unwrap();
    let v = pool.create_volume("v", 4 * MIB).await.unwrap();
    let data = pattern(11, 32 * BS);
    for k in 0..31 {
        v.write((k * BS) as u64, &data[k * BS..(k + 1) * BS], false).await.unwrap();
    }
    assert_eq!(pool.stats().data_cache.staged_bytes, 31 * BS as u64);
    // The 32nd write stages itself, finds 32 queued, and starts the flush,
    // whose disk writes wait at the gate; then the write is dropped.
    backend.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    {
        let mut w = std::pin::pin!(v.write((31 * BS) as u64, &data[31 * BS..], false));
        for _ in 0..10 {
            assert!(futures::poll!(w.as_mut()).is_pending(), "the flush must wait at the gate");
        }
    }
    backend.closed.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(pool.stats().data_cache.staged_bytes, 32 * BS as u64, "nothing was written, nothing was forgotten");
    pool.flush().await.unwrap();
    assert_eq!(pool.stats().data_cache.staged_bytes, 0);
    let bytes = backend.inner.snapshot();
    drop(pool);
    let (again, _) = Pool::open(MemBackend::from_bytes(bytes), PoolOptions::default()).await.unwrap();
    let mut buf = vec![0u8; 32 * BS];
    again.volume("v").unwrap().read(0, &mut buf).await.unwrap();
    assert!(buf == data);
}

/// Staged blocks leave through the io_uring engine's gather writes
/// (straight from the data cache's slots): after a flush, a pool reopened
/// from the file with no cache at all reads every block back from the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_writes_reach_an_io_uring_pool_file_intact() {
    use keel_blockstore::Pool;
    use keel_blockstore::backend::UringBackend;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.img");
    std::fs::File::create(&path).unwrap().set_len(64 * MIB).unwrap();
    let opts = PoolOptions { write_back_bytes: 1024 * BS, ..cached(16 * MIB as usize) };
    let pool = Pool::create(UringBackend::open(&path).unwrap(), opts).await.unwrap();
    let vol = pool.create_volume("v", 16 * MIB).await.unwrap();
    // 300 writes of one or two blocks, all over the volume and some over
    // others: each is staged, and write-back gathers the runs.
    let blocks = 16 * MIB / BS as u64;
    let mut model = vec![0u8; 16 * MIB as usize];
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for k in 0..300u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = 1 + (x % 2) as usize;
        let b = (x >> 8) % (blocks - 1);
        let data = pattern(k + 1, n * BS);
        let off = b * BS as u64;
        vol.write(off, &data, false).await.unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    assert!(pool.stats().data_cache.used_bytes > 0);
    pool.flush().await.unwrap();
    drop(vol);
    pool.close().await.unwrap();

    let (pool, _) = Pool::open(UringBackend::open(&path).unwrap(), PoolOptions::default()).await.unwrap();
    let vol = pool.volume("v").unwrap();
    let mut back = vec![0u8; model.len()];
    vol.read(0, &mut back).await.unwrap();
    assert!(back == model, "the volume read from the disk differs from what was written");
}
