//! Growing a pool online: the device under it got longer (a file, an LV
//! after `lvextend`, a loop device after `losetup -c`) and `Pool::grow`
//! takes the new space in while volumes are open and I/O runs. Shrinking is
//! refused. The crash side is in `crash_consistency.rs` (its workload grows
//! the pool too).

mod common;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use keel_blockstore::backend::MemBackend;
use keel_blockstore::format::{FORMAT_VERSION, FORMAT_VERSION_UNGROWN, Superblock};
use keel_blockstore::{AnyBackend, BLOCK_SIZE, Backend, Engine, ErrorKind, Pool, PoolOptions};

const BS: u64 = BLOCK_SIZE as u64;

/// Read all of device `name`.
async fn read_all<B: Backend>(pool: &Pool<B>, name: &str) -> Vec<u8> {
    let v = pool.volume(name).unwrap();
    let mut buf = vec![0u8; v.size() as usize];
    v.read(0, &mut buf).await.unwrap();
    buf
}

async fn check_clean<B: Backend>(pool: &Pool<B>, what: &str) {
    let problems = pool.check().await.unwrap();
    assert!(problems.is_empty(), "{what}: {problems:#?}");
}

/// Format versions of the two superblock copies.
fn versions(bytes: &[u8]) -> [u32; 2] {
    [0, 1].map(|k| u32::from_le_bytes(bytes[k * BLOCK_SIZE + 8..k * BLOCK_SIZE + 12].try_into().unwrap()))
}

/// Write 64 KiB pieces from `from` until the pool is full; returns where it
/// stopped.
async fn fill<B: Backend>(v: &keel_blockstore::Volume<B>, from: u64, seed: u64) -> u64 {
    let mut at = from;
    loop {
        match v.write(at, &pattern(seed ^ at, 65536), false).await {
            Ok(()) => at += 65536,
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
                return at;
            }
        }
        assert!(at < v.size(), "the volume is larger than the pool on purpose: it never filled");
    }
}

async fn check_filled<B: Backend>(v: &keel_blockstore::Volume<B>, from: u64, to: u64, seed: u64) {
    let mut buf = vec![0u8; 65536];
    for at in (from..to).step_by(65536) {
        v.read(at, &mut buf).await.unwrap();
        assert!(buf == pattern(seed ^ at, 65536), "{} at {at} reads wrong data", v.name());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_with_volumes_and_snapshots_grows_while_a_writer_runs() {
    let backend = MemBackend::new(16 * MIB);
    let pool = Pool::create(backend.clone(), PoolOptions::default()).await.unwrap();
    let v = pool.create_volume("v", 8 * MIB).await.unwrap();
    v.write(0, &pattern(1, 2 * MIB as usize), false).await.unwrap();
    pool.snapshot("v", "s1").await.unwrap();
    v.write(MIB, &pattern(2, MIB as usize), false).await.unwrap();
    pool.clone_snapshot("v@s1", "c").await.unwrap();
    pool.flush().await.unwrap();
    let mut want_v = pattern(1, 2 * MIB as usize);
    want_v[MIB as usize..].copy_from_slice(&pattern(2, MIB as usize));
    want_v.resize(8 * MIB as usize, 0);
    let mut want_s1 = pattern(1, 2 * MIB as usize);
    want_s1.resize(8 * MIB as usize, 0);

    // A writer that keeps rewriting its volume and checking what it reads.
    let w = pool.create_volume("w", 4 * MIB).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (w, stop) = (w.clone(), stop.clone());
        tokio::spawn(async move {
            let mut round = 0u64;
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let at = (round * 65536) % (4 * MIB);
                w.write(at, &pattern(1000 + round, 65536), round.is_multiple_of(7)).await.unwrap();
                w.read(at, &mut buf).await.unwrap();
                assert!(buf == pattern(1000 + round, 65536), "round {round} read back wrong data");
                tokio::task::yield_now().await;
            }
            round
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;

    let before = pool.stats();
    backend.set_len(48 * MIB);
    let report = pool.grow().await.unwrap();
    assert!(report.grew(), "{report:?}");
    assert_eq!(report.old_bytes, 16 * MIB);
    assert_eq!(report.new_bytes, 48 * MIB);
    assert_eq!(report.device_bytes, 48 * MIB);
    assert!(report.added_data_bytes > 31 * MIB && report.added_data_bytes < 32 * MIB, "{report:?}");
    let after = pool.stats();
    assert_eq!(after.total_bytes, before.total_bytes + report.added_data_bytes, "stats show the growth at once");
    assert!(after.free_bytes >= before.free_bytes + report.added_data_bytes - MIB, "{before:?} {after:?}");
    // Both superblock copies describe the grown pool, as version 2.
    assert_eq!(versions(&backend.snapshot()), [FORMAT_VERSION; 2]);

    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.await.unwrap();
    assert!(rounds > 0);
    let want_w = read_all(&pool, "w").await;

    // The new space is used: a volume larger than the old pool fills it.
    let big = pool.create_volume("big", 64 * MIB).await.unwrap();
    big.write(0, &pattern(3, 24 * MIB as usize), false).await.unwrap();
    pool.flush().await.unwrap();
    for (name, want) in [("v", &want_v), ("v@s1", &want_s1), ("c", &want_s1), ("w", &want_w)] {
        assert!(read_all(&pool, name).await == *want, "{name} changed in the growth");
    }
    check_clean(&pool, "after growing").await;

    // A restart sees the same pool.
    let stats = pool.stats();
    let again = reopen(&pool).await;
    assert_eq!(again.stats().total_bytes, stats.total_bytes);
    assert_eq!(again.stats().allocated_bytes, stats.allocated_bytes);
    for (name, want) in [("v", &want_v), ("v@s1", &want_s1), ("c", &want_s1), ("w", &want_w)] {
        assert!(read_all(&again, name).await == *want, "{name} after reopening");
    }
    let mut buf = vec![0u8; 24 * MIB as usize];
    again.volume("big").unwrap().read(0, &mut buf).await.unwrap();
    assert!(buf == pattern(3, 24 * MIB as usize));
    check_clean(&again, "after reopening").await;
}

#[tokio::test]
async fn the_new_space_is_used_only_after_growing() {
    let backend = MemBackend::new(8 * MIB);
    let pool = Pool::create(backend.clone(), PoolOptions::default()).await.unwrap();
    let v = pool.create_volume("v", 256 * MIB).await.unwrap();
    let full = fill(&v, 0, 1).await;
    assert!(full < 8 * MIB);
    // The device grows; until the pool is told, it stays full.
    backend.set_len(40 * MIB);
    assert_eq!(v.write(full, &pattern(9, 65536), false).await.unwrap_err().kind(), ErrorKind::NoSpace);
    let report = pool.grow().await.unwrap();
    assert!(report.grew(), "{report:?}");
    let more = fill(&v, full, 1).await;
    assert!(more > full + 31 * MIB, "only {} bytes more fit after growing by 32 MiB", more - full);
    assert!(more < 40 * MIB);
    let st = pool.stats();
    assert!(st.free_bytes < MIB, "{st:?}");
    check_filled(&v, 0, more, 1).await;
    check_clean(&pool, "full after growing").await;
    let again = reopen(&pool).await;
    check_filled(&again.volume("v").unwrap(), 0, more, 1).await;
    check_clean(&again, "reopened").await;
    // Blocks freed after the growth are reused as before.
    again.volume("v").unwrap().discard(0, 16 * MIB).await.unwrap();
    again.flush().await.unwrap();
    let v = again.volume("v").unwrap();
    let refill = fill(&v, 0, 2).await;
    assert!(refill >= 15 * MIB, "{refill}");
    check_filled(&v, 0, refill, 2).await;
    check_clean(&again, "refilled").await;
}

#[tokio::test]
async fn a_pool_grows_many_times() {
    let backend = MemBackend::new(8 * MIB);
    let pool = Pool::create(backend.clone(), PoolOptions::default()).await.unwrap();
    let v = pool.create_volume("v", 1 << 30).await.unwrap();
    assert_eq!(versions(&backend.snapshot()), [FORMAT_VERSION_UNGROWN; 2]);
    let mut written = fill(&v, 0, 5).await;
    let mut len = 8 * MIB;
    let (mut grew, mut merged) = (0, 0);
    let mut extensions = 0;
    // Steps from one block (too little: nothing changes) to several MiB
    // (new counts), and some within the reach of the last counts (the last
    // extension gets longer).
    for (i, step) in [4096, 3 * MIB, 12288, 256 * 1024, 5 * MIB + 4096, MIB, 7 * MIB, 64 * 1024, 2 * MIB]
        .into_iter()
        .cycle()
        .take(30)
        .enumerate()
    {
        len += step;
        backend.set_len(len);
        let before = pool.stats().total_bytes;
        let r = pool.grow().await.unwrap();
        assert_eq!(r.device_bytes, len);
        assert_eq!(pool.stats().total_bytes, before + r.added_data_bytes, "step {i}");
        if r.grew() {
            grew += 1;
            assert!(r.unchanged.is_none());
            assert!(r.new_bytes <= len && r.new_bytes > r.old_bytes);
            // The last partial block of the device is not used.
            assert_eq!(r.new_bytes, len / BS * BS);
            let mut image = vec![0u8; 2 * BLOCK_SIZE];
            backend.read_at(&mut image, 0).await.unwrap();
            let sb = [0, 1]
                .map(|k| Superblock::decode(&image[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE]).unwrap())
                .into_iter()
                .max_by_key(|sb| sb.generation)
                .unwrap();
            assert_eq!(sb.total_blocks * BS, r.new_bytes);
            if sb.extensions.len() == extensions {
                merged += 1;
            }
            extensions = sb.extensions.len();
        } else {
            assert!(r.unchanged.is_some(), "step {i}: {r:?}");
            assert_eq!(r.added_data_bytes, 0);
        }
        written = fill(&v, written, 5).await;
        if i % 7 == 3 {
            let again = reopen(&pool).await;
            assert_eq!(again.stats().total_bytes, pool.stats().total_bytes, "step {i}");
            check_filled(&again.volume("v").unwrap(), 0, written, 5).await;
        }
    }
    assert!(grew >= 15, "only {grew} growths");
    assert!(merged > 0 && merged < grew, "{merged} of {grew} growths extended the last extension");
    // Growing again without a larger device changes nothing (cut to the
    // pool's end: what the last steps added was too little to take).
    let end = pool.grow().await.unwrap().new_bytes;
    backend.set_len(end);
    let r = pool.grow().await.unwrap();
    assert!(!r.grew(), "{r:?}");
    assert!(r.unchanged.as_deref().is_some_and(|w| w.contains("has not grown")), "{r:?}");
    check_filled(&v, 0, written, 5).await;
    check_clean(&pool, "after many growths").await;
    let again = reopen(&pool).await;
    assert_eq!(again.stats().total_bytes, pool.stats().total_bytes);
    check_filled(&again.volume("v").unwrap(), 0, written, 5).await;
    check_clean(&again, "reopened after many growths").await;
}

#[tokio::test]
async fn a_device_that_shrank_is_refused() {
    let backend = MemBackend::new(8 * MIB);
    let pool = Pool::create(backend.clone(), PoolOptions::default()).await.unwrap();
    let v = pool.create_volume("v", 4 * MIB).await.unwrap();
    v.write(0, &pattern(1, MIB as usize), false).await.unwrap();
    backend.set_len(20 * MIB);
    assert!(pool.grow().await.unwrap().grew());
    let stats = pool.stats();
    // Cut below the pool's end: refused, nothing changes, I/O goes on (the
    // blocks in use are still there in this test).
    backend.set_len(12 * MIB);
    let err = pool.grow().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    assert!(err.to_string().contains("shrunk"), "{err}");
    assert_eq!(pool.stats().total_bytes, stats.total_bytes);
    v.write(MIB, &pattern(2, 4096), true).await.unwrap();
    // A pool on a device shorter than the pool does not open.
    let image = backend.snapshot();
    let err = Pool::open(MemBackend::from_bytes(image.clone()), PoolOptions::default()).await.err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Format, "{err}");
    assert!(err.to_string().contains("the pool needs"), "{err}");
    // Given back its size, it opens with everything.
    let mem = MemBackend::from_bytes(image);
    mem.set_len(20 * MIB);
    let (again, _) = Pool::open(mem, PoolOptions::default()).await.unwrap();
    assert_eq!(again.stats().total_bytes, stats.total_bytes);
    let mut want = pattern(1, MIB as usize);
    want.extend_from_slice(&pattern(2, 4096));
    want.resize(4 * MIB as usize, 0);
    assert!(read_all(&again, "v").await == want);
    check_clean(&again, "given back its size").await;
}

#[tokio::test]
async fn a_version_1_pool_grows_and_an_ungrown_pool_stays_version_1() {
    let backend = MemBackend::new(8 * MIB);
    let pool = Pool::create(backend.clone(), PoolOptions::default()).await.unwrap();
    let v = pool.create_volume("v", 2 * MIB).await.unwrap();
    v.write(0, &pattern(1, MIB as usize), false).await.unwrap();
    pool.flush().await.unwrap();
    pool.flush().await.unwrap();
    // Growing by nothing, or by too little, changes nothing on disk.
    let same = backend.snapshot();
    assert_eq!(versions(&same), [FORMAT_VERSION_UNGROWN; 2]);
    assert!(!pool.grow().await.unwrap().grew());
    backend.set_len(8 * MIB + 8192);
    let r = pool.grow().await.unwrap();
    assert!(!r.grew() && r.unchanged.is_some(), "{r:?}");
    assert!(backend.snapshot()[..8 * MIB as usize] == same[..]);
    backend.set_len(9 * MIB);
    assert!(pool.grow().await.unwrap().grew());
    let image = backend.snapshot();
    assert_eq!(versions(&image), [FORMAT_VERSION; 2]);
    // What a build that reads only version 1 does with it: refuse it.
    for k in 0..2 {
        let sb = Superblock::decode(&image[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE]).unwrap();
        assert_eq!(sb.total_blocks * BS, 9 * MIB);
        assert_eq!(sb.extensions.len(), 1);
    }
    let again = reopen(&pool).await;
    assert!(read_all(&again, "v").await[..MIB as usize] == pattern(1, MIB as usize)[..]);
    check_clean(&again, "a grown version 1 pool").await;
}

/// A directory on a real disk (O_DIRECT; tmpfs has none).
fn test_dir() -> PathBuf {
    PathBuf::from(std::env::var("KEEL_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()))
}

fn set_file_len(path: &Path, len: u64) {
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(len).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_backed_pool_grows_with_either_engine() {
    let dir = tempfile::tempdir_in(test_dir()).unwrap();
    for (engine, other) in [(Engine::Sync, Engine::Uring), (Engine::Uring, Engine::Sync)] {
        let path = dir.path().join(format!("{engine:?}.img"));
        std::fs::File::create(&path).unwrap().set_len(8 * MIB).unwrap();
        let pool = Pool::create(AnyBackend::open(&path, engine).unwrap(), PoolOptions::default()).await.unwrap();
        let v = pool.create_volume("v", 256 * MIB).await.unwrap();
        pool.snapshot("v", "empty").await.unwrap();
        let full = fill(&v, 0, 7).await;
        let old_total = pool.stats().total_bytes;

        // The file gets longer under the open pool (as a truncate -s, or an
        // LV growing); the pool learns of it only when asked.
        set_file_len(&path, 40 * MIB);
        assert_eq!(pool.backend().len(), 8 * MIB, "{engine:?}: len is what was read last");
        assert_eq!(v.write(full, &pattern(9, 65536), false).await.unwrap_err().kind(), ErrorKind::NoSpace);
        let r = pool.grow().await.unwrap();
        assert!(r.grew(), "{engine:?}: {r:?}");
        assert_eq!(pool.backend().len(), 40 * MIB);
        assert_eq!(pool.stats().total_bytes, old_total + r.added_data_bytes);
        let more = fill(&v, full, 7).await;
        assert!(more > full + 31 * MIB, "{engine:?}: only {} more bytes", more - full);
        check_filled(&v, 0, more, 7).await;
        check_clean(&pool, "after growing a file").await;

        // Grow again, and reopen with the other engine.
        set_file_len(&path, 48 * MIB);
        assert!(pool.grow().await.unwrap().grew());
        let more = fill(&v, more, 7).await;
        let total = pool.stats().total_bytes;
        drop(v);
        pool.close().await.unwrap();
        let (pool, report) = Pool::open(AnyBackend::open(&path, other).unwrap(), PoolOptions::default()).await.unwrap();
        assert!(report.superblock_fallback.is_none());
        assert_eq!(pool.stats().total_bytes, total, "{engine:?} then {other:?}");
        let v = pool.volume("v").unwrap();
        check_filled(&v, 0, more, 7).await;
        let mut buf = vec![1u8; MIB as usize];
        pool.volume("v@empty").unwrap().read(0, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        check_clean(&pool, "reopened with the other engine").await;
    }
}

/// A pool written before it could grow (the version 1 fixture) grows, and
/// reads the same after.
#[tokio::test]
async fn the_version_1_fixture_grows() {
    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pool-v1.blocks");
    let f = std::fs::read(FIXTURE).unwrap();
    let len = u64::from_le_bytes(f[..8].try_into().unwrap()) as usize;
    let mut bytes = vec![0u8; len];
    for rec in f[8..].chunks(8 + 4096) {
        let i = u64::from_le_bytes(rec[..8].try_into().unwrap()) as usize;
        bytes[i * 4096..(i + 1) * 4096].copy_from_slice(&rec[8..]);
    }
    let (pool, _) = Pool::open(MemBackend::from_bytes(bytes), PoolOptions::default()).await.unwrap();
    let before: Vec<Vec<u8>> = fixture_contents(&pool).await;
    pool.backend().set_len(len as u64 + 16 * MIB);
    assert!(pool.grow().await.unwrap().grew());
    assert_eq!(fixture_contents(&pool).await, before);
    let big = pool.create_volume("big", 64 * MIB).await.unwrap();
    big.write(0, &pattern(4, 12 * MIB as usize), true).await.unwrap();
    check_clean(&pool, "the grown fixture").await;
    let again = reopen(&pool).await;
    assert_eq!(fixture_contents(&again).await, before);
    check_clean(&again, "the grown fixture, reopened").await;
}

async fn fixture_contents<B: Backend>(pool: &Pool<B>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for name in ["disk0", "disk0@base", "vm2"] {
        out.push(read_all(pool, name).await);
    }
    out
}

/// On a block device: a loop device over a file that gets longer, resized
/// with `losetup -c`, as an LV is by `lvextend`. Needs root and loop
/// devices, so it runs only with `KEEL_TEST_LOOP=1` (it sets up and
/// detaches its own loop device).
#[tokio::test]
async fn a_pool_on_a_loop_device_grows_when_the_device_does() {
    if std::env::var_os("KEEL_TEST_LOOP").is_none() {
        eprintln!("set KEEL_TEST_LOOP=1 (as root) to run this on a loop device");
        return;
    }
    let dir = tempfile::tempdir_in(test_dir()).unwrap();
    let file = dir.path().join("loop.img");
    std::fs::File::create(&file).unwrap().set_len(8 * MIB).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("losetup").args(args).output().unwrap();
        assert!(out.status.success(), "losetup {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let dev = run(&["--find", "--show", file.to_str().unwrap()]);
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    for engine in [Engine::Sync, Engine::Uring] {
        let path = Path::new(&dev);
        let pool = Pool::create(AnyBackend::open(path, engine).unwrap(), PoolOptions::default()).await.unwrap();
        let v = pool.create_volume("v", 64 * MIB).await.unwrap();
        let full = fill(&v, 0, 11).await;
        set_file_len(&file, pool.backend().len() + 16 * MIB);
        // The device keeps its size until the loop driver is told.
        assert!(!pool.grow().await.unwrap().grew());
        run(&["-c", &dev]);
        let r = pool.grow().await.unwrap();
        assert!(r.grew(), "{engine:?}: {r:?}");
        assert_eq!(r.device_bytes, pool.backend().len());
        let more = fill(&v, full, 11).await;
        assert!(more > full + 15 * MIB, "{engine:?}");
        drop(v);
        pool.close().await.unwrap();
        let (pool, _) = Pool::open(AnyBackend::open(path, engine).unwrap(), PoolOptions::default()).await.unwrap();
        check_filled(&pool.volume("v").unwrap(), 0, more, 11).await;
        check_clean(&pool, "on a loop device").await;
    }
}

/// A sparse disk in memory: blocks never written read as zeros and take no
/// memory, so a test can grow a pool past 128 GiB.
#[derive(Clone, Default)]
struct Sparse {
    blocks: Arc<parking_lot::Mutex<std::collections::HashMap<u64, Box<[u8]>>>>,
    len: Arc<std::sync::atomic::AtomicU64>,
}

impl Backend for Sparse {
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        assert!(offset + buf.len() as u64 <= self.len(), "read beyond the end");
        let blocks = self.blocks.lock();
        for (k, b) in buf.chunks_mut(BLOCK_SIZE).enumerate() {
            match blocks.get(&(offset / BS + k as u64)) {
                Some(data) => b.copy_from_slice(data),
                None => b.fill(0),
            }
        }
        Ok(())
    }
    async fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        assert!(offset + buf.len() as u64 <= self.len(), "write beyond the end");
        let mut blocks = self.blocks.lock();
        for (k, b) in buf.chunks(BLOCK_SIZE).enumerate() {
            blocks.insert(offset / BS + k as u64, b.into());
        }
        Ok(())
    }
    async fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }
    fn refresh_len(&self) -> std::io::Result<u64> {
        Ok(self.len())
    }
}

/// The slot map (one bit per count page, 32768 a block) outgrows its block
/// past about 128 GiB and moves into the extension; the pool works on and
/// reopens from there.
#[tokio::test]
async fn the_slot_map_moves_into_an_extension_when_it_outgrows_its_block() {
    const GIB: u64 = 1 << 30;
    // More than the first 64 MiB holds, written after the growth: the last
    // pieces land in the extension.
    const PIECES: u64 = 72;
    let disk = Sparse::default();
    disk.len.store(64 * MIB, Ordering::Relaxed);
    let opts = PoolOptions { catalog_pages: 1, ..PoolOptions::default() };
    let pool = Pool::create(disk.clone(), opts).await.unwrap();
    let v = pool.create_volume("v", 256 * GIB).await.unwrap();
    v.write(0, &pattern(1, MIB as usize), false).await.unwrap();
    pool.snapshot("v", "s").await.unwrap();
    let superblock = |disk: &Sparse| {
        let blocks = disk.blocks.lock();
        [0u64, 1]
            .map(|k| blocks.get(&k).map(|b| Superblock::decode(b).unwrap()))
            .into_iter()
            .flatten()
            .max_by_key(|sb| sb.generation)
            .unwrap()
    };
    assert_eq!(superblock(&disk).slot_map_start(), 2);

    disk.len.store(130 * GIB, Ordering::Relaxed);
    let r = pool.grow().await.unwrap();
    assert!(r.grew(), "{r:?}");
    let sb = superblock(&disk);
    assert_eq!(sb.extensions.len(), 1);
    let e = sb.extensions[0];
    assert_eq!(e.slot_map_blocks, 2, "{sb:?}");
    assert_eq!(sb.slot_map_start(), e.start);
    assert_eq!(pool.stats().total_bytes, sb.usable_blocks() * BS);

    // The new space takes data (far out in a large volume), which a
    // snapshot and a clone share; its counts live in the extension.
    for i in 0..PIECES {
        v.write(100 * GIB + i * MIB, &pattern(2 + i, MIB as usize), false).await.unwrap();
    }
    let last = v.physical_block(100 * GIB + PIECES * MIB - BS).await.unwrap().unwrap();
    assert!(last >= e.data_start(), "block {last} is not in the extension ({e:?})");
    pool.snapshot("v", "t").await.unwrap();
    pool.clone_snapshot("v@t", "c").await.unwrap();
    pool.volume("c").unwrap().write(200 * GIB, &pattern(3, 65536), true).await.unwrap();
    check_clean(&pool, "after the slot map moved").await;
    let stats = pool.stats();
    drop(v);
    drop(pool);

    let (pool, report) = Pool::open(disk.clone(), PoolOptions::default()).await.unwrap();
    assert!(report.superblock_fallback.is_none());
    assert_eq!(pool.stats().total_bytes, stats.total_bytes);
    assert_eq!(pool.stats().allocated_bytes, stats.allocated_bytes);
    let mut buf = vec![0u8; MIB as usize];
    for (name, at, seed) in [("v", 0, 1), ("v@s", 0, 1)] {
        pool.volume(name).unwrap().read(at, &mut buf).await.unwrap();
        assert!(buf == pattern(seed, MIB as usize), "{name} at {at}");
    }
    for name in ["v", "c"] {
        for i in 0..PIECES {
            pool.volume(name).unwrap().read(100 * GIB + i * MIB, &mut buf).await.unwrap();
            assert!(buf == pattern(2 + i, MIB as usize), "{name} piece {i}");
        }
    }
    let mut small = vec![0u8; 65536];
    pool.volume("c").unwrap().read(200 * GIB, &mut small).await.unwrap();
    assert!(small == pattern(3, 65536));
    check_clean(&pool, "reopened after the slot map moved").await;

    // And it grows on from there (the slot map stays where it moved).
    disk.len.store(140 * GIB, Ordering::Relaxed);
    assert!(pool.grow().await.unwrap().grew());
    let sb = superblock(&disk);
    assert_eq!(sb.slot_map_start(), e.start);
    drop(pool);
    let (pool, _) = Pool::open(disk, PoolOptions::default()).await.unwrap();
    assert_eq!(pool.stats().total_bytes, sb.usable_blocks() * BS);
    check_clean(&pool, "grown again").await;
}
