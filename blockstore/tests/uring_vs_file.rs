//! The io_uring engine against the portable engine and an in-memory model.
//!
//! Files are created in the system temp dir. On tmpfs, O_DIRECT is refused
//! and both engines fall back to buffered I/O, which these tests accept.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::FutureExt;
use keel_blockstore::backend::{AlignedBuf, AnyBackend, BLOCK_SIZE, Backend, Engine, FileBackend, UringBackend};
use proptest::prelude::*;
use tempfile::TempDir;

/// Generous bound on any single backend call: a hang fails the test instead
/// of blocking the run.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

fn temp_file(dir: &TempDir, name: &str, len: usize) -> PathBuf {
    let path = dir.path().join(name);
    File::create(&path).unwrap().set_len(len as u64).unwrap();
    path
}

fn open_uring(path: &Path) -> UringBackend {
    UringBackend::open(path).expect("io_uring must be available for these tests")
}

/// Deterministic bytes for `seed` (xorshift64*).
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

async fn timed<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(OP_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not complete within {OP_TIMEOUT:?}"))
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap())
}

// ---------------------------------------------------------------------------
// Property test: random aligned op sequences, uring == file == model.

const DEV_BLOCKS: usize = 64;
const DEV_LEN: usize = DEV_BLOCKS * BLOCK_SIZE;
const MAX_OP_BLOCKS: usize = 16;

#[derive(Clone, Debug)]
enum Op {
    Write {
        block: usize,
        blocks: usize,
        seed: u64,
    },
    /// A gather write at `block` of pieces of these many blocks, taken from
    /// separate places in memory.
    Writev {
        block: usize,
        pieces: Vec<usize>,
        seed: u64,
    },
    Read {
        block: usize,
        blocks: usize,
    },
    Sync,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let extent = (0..DEV_BLOCKS, 1..=MAX_OP_BLOCKS).prop_map(|(block, blocks)| (block, blocks.min(DEV_BLOCKS - block)));
    prop_oneof![
        5 => (extent.clone(), any::<u64>())
            .prop_map(|((block, blocks), seed)| Op::Write { block, blocks, seed }),
        3 => (0..DEV_BLOCKS, prop::collection::vec(1..=4usize, 1..=5), any::<u64>()).prop_map(
            |(block, mut pieces, seed)| {
                // Keep the pieces within the device.
                let mut room = DEV_BLOCKS - block;
                pieces.retain_mut(|p| {
                    *p = (*p).min(room);
                    room -= *p;
                    *p > 0
                });
                Op::Writev { block, pieces, seed }
            }
        ),
        5 => extent.prop_map(|(block, blocks)| Op::Read { block, blocks }),
        1 => Just(Op::Sync),
    ]
}

async fn run_ops(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let uring = open_uring(&temp_file(&dir, "uring.img", DEV_LEN));
    let file = FileBackend::open(&temp_file(&dir, "file.img", DEV_LEN)).unwrap();
    prop_assert_eq!(uring.len(), DEV_LEN as u64);
    prop_assert_eq!(uring.is_direct(), file.is_direct());
    let mut model = vec![0u8; DEV_LEN];

    // Room for the largest gather write too: 5 pieces of 4 blocks, with
    // gaps between them.
    let mut wbuf = AlignedBuf::new(MAX_OP_BLOCKS.max(5 * 5) * BLOCK_SIZE);
    let mut rbuf_u = AlignedBuf::new(MAX_OP_BLOCKS * BLOCK_SIZE);
    let mut rbuf_f = AlignedBuf::new(MAX_OP_BLOCKS * BLOCK_SIZE);

    for op in ops.iter().cloned().chain([Op::Read { block: 0, blocks: MAX_OP_BLOCKS }]) {
        match op {
            Op::Write { block, blocks, seed } => {
                let (off, len) = (block * BLOCK_SIZE, blocks * BLOCK_SIZE);
                fill(&mut wbuf[..len], seed);
                timed("uring write", uring.write_at(&wbuf[..len], off as u64)).await.unwrap();
                timed("file write", file.write_at(&wbuf[..len], off as u64)).await.unwrap();
                model[off..off + len].copy_from_slice(&wbuf[..len]);
            }
            Op::Writev { block, pieces, seed } => {
                // Piece k sits k blocks further on in `wbuf` than the end
                // of piece k - 1: a gap of one block between pieces.
                fill(&mut wbuf, seed);
                let mut bufs: Vec<&[u8]> = Vec::new();
                let mut at = 0;
                for p in &pieces {
                    bufs.push(&wbuf[at * BLOCK_SIZE..(at + p) * BLOCK_SIZE]);
                    at += p + 1;
                }
                let off = (block * BLOCK_SIZE) as u64;
                timed("uring writev", uring.write_vectored_at(&bufs, off)).await.unwrap();
                timed("file writev", file.write_vectored_at(&bufs, off)).await.unwrap();
                let mut m = block * BLOCK_SIZE;
                for b in &bufs {
                    model[m..m + b.len()].copy_from_slice(b);
                    m += b.len();
                }
            }
            Op::Read { block, blocks } => {
                let (off, len) = (block * BLOCK_SIZE, blocks * BLOCK_SIZE);
                // Poison the buffers so a read that transfers nothing shows.
                rbuf_u[..len].fill(0xa5);
                rbuf_f[..len].fill(0x5a);
                timed("uring read", uring.read_at(&mut rbuf_u[..len], off as u64)).await.unwrap();
                timed("file read", file.read_at(&mut rbuf_f[..len], off as u64)).await.unwrap();
                prop_assert!(rbuf_u[..len] == rbuf_f[..len], "uring != file at block {block}");
                prop_assert!(rbuf_u[..len] == model[off..off + len], "uring != model at {block}");
            }
            Op::Sync => {
                timed("uring sync", uring.sync()).await.unwrap();
                timed("file sync", file.sync()).await.unwrap();
            }
        }
    }

    // Whole device, through both engines, at the end.
    let mut all_u = AlignedBuf::new(DEV_LEN);
    let mut all_f = AlignedBuf::new(DEV_LEN);
    timed("uring full read", uring.read_at(&mut all_u, 0)).await.unwrap();
    timed("file full read", file.read_at(&mut all_f, 0)).await.unwrap();
    prop_assert!(all_u[..] == model[..], "uring image differs from model");
    prop_assert!(all_f[..] == model[..], "file image differs from model");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn uring_matches_file_and_model(ops in prop::collection::vec(op_strategy(), 1..48)) {
        runtime().block_on(run_ops(ops))?;
    }
}

// ---------------------------------------------------------------------------
// Concurrency: many tasks in flight on one backend.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_tasks_see_their_own_data() {
    const TASKS: usize = 64;
    const REGION_BLOCKS: usize = 4;
    const ROUNDS: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let path = temp_file(&dir, "concurrent.img", TASKS * REGION_BLOCKS * BLOCK_SIZE);
    let backend = Arc::new(open_uring(&path));

    // Vary the extent so requests of different sizes interleave, and sync
    // now and then between them.
    own_regions(Arc::clone(&backend), 0..TASKS, REGION_BLOCKS, ROUNDS, Some(16)).await;

    // Each region's first block holds its task's last write; check it through
    // the portable engine too.
    let file = FileBackend::open(&path).unwrap();
    let mut expect = AlignedBuf::new(REGION_BLOCKS * BLOCK_SIZE);
    let mut got = AlignedBuf::new(BLOCK_SIZE);
    for t in 0..TASKS {
        let round = ROUNDS - 1;
        let blocks = 1 + (round as usize + t) % REGION_BLOCKS;
        fill(&mut expect[..blocks * BLOCK_SIZE], (t as u64) << 32 | round);
        file.read_at(&mut got, (t * REGION_BLOCKS * BLOCK_SIZE) as u64).await.unwrap();
        assert!(got[..] == expect[..BLOCK_SIZE], "task {t}: final data not on disk");
    }
}

// ---------------------------------------------------------------------------
// Edge cases.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_past_end_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = 8;
    let backend = open_uring(&temp_file(&dir, "small.img", blocks * BLOCK_SIZE));
    let mut buf = AlignedBuf::new(2 * BLOCK_SIZE);

    // Entirely past the end.
    let err = timed("read past end", backend.read_at(&mut buf[..BLOCK_SIZE], backend.len())).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
    // Straddling the end: a short read, then end of file.
    let off = ((blocks - 1) * BLOCK_SIZE) as u64;
    let err = timed("read across end", backend.read_at(&mut buf, off)).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
    // Far past the end.
    let err = timed("read far past end", backend.read_at(&mut buf, 1 << 40)).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");

    // The backend still works afterwards.
    timed("read last block", backend.read_at(&mut buf[..BLOCK_SIZE], off)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_in_flight_futures_wait_and_release_their_slot() {
    // More iterations than the backend has slots: a dropped future that kept
    // its slot would make a later call wait forever (caught by `timed`).
    const ITERS: u64 = 1000;
    const BLOCKS: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let path = temp_file(&dir, "cancel.img", BLOCKS * BLOCK_SIZE);
    let backend = open_uring(&path);
    let mut w = AlignedBuf::new(BLOCK_SIZE);
    let mut r = AlignedBuf::new(BLOCK_SIZE);

    for i in 0..ITERS {
        let off = ((i as usize % BLOCKS) * BLOCK_SIZE) as u64;
        fill(&mut w, i);
        // Poll once (submits the SQE) and drop. Dropping waits for the CQE,
        // so by the time `now_or_never` returns the write has landed.
        // `unconstrained`: with tokio's cooperative budget spent, the slot
        // semaphore would return Pending on that one poll and nothing would
        // be submitted at all.
        let _ = tokio::task::unconstrained(backend.write_at(&w, off)).now_or_never();
        let _ = tokio::task::unconstrained(backend.read_at(&mut r, off)).now_or_never();
        if i % 64 == 0 {
            let _ = tokio::task::unconstrained(backend.sync()).now_or_never();
        }
        r.fill(0);
        timed("read back", backend.read_at(&mut r, off)).await.unwrap();
        assert!(r[..] == w[..], "iteration {i}: dropped write did not land");
    }
    timed("sync", backend.sync()).await.unwrap();

    // Cancellation through a timer, from many tasks at once.
    let backend = Arc::new(backend);
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let backend = Arc::clone(&backend);
        tasks.push(tokio::spawn(async move {
            let mut buf = AlignedBuf::new(BLOCK_SIZE);
            for _ in 0..50 {
                let off = ((t as usize % BLOCKS) * BLOCK_SIZE) as u64;
                let _ = tokio::time::timeout(Duration::ZERO, backend.read_at(&mut buf, off)).await;
            }
            timed("read after cancels", backend.read_at(&mut buf, 0)).await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn unaligned_direct_io_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open_uring(&temp_file(&dir, "align.img", 4 * BLOCK_SIZE));
    if !backend.is_direct() {
        eprintln!("O_DIRECT unavailable in the temp dir; skipping");
        return;
    }
    let mut buf = AlignedBuf::new(2 * BLOCK_SIZE);
    let err = backend.read_at(&mut buf[1..BLOCK_SIZE + 1], 0).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    let err = backend.write_at(&buf[..BLOCK_SIZE], 512).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    let err = backend.write_at(&buf[..100], 0).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
}

#[tokio::test]
async fn a_gather_write_of_more_pieces_than_one_sqe_takes_lands_whole() {
    // 1500 one-block pieces, every other block of the source buffer: the
    // kernel takes at most 1024 buffers per vectored write.
    const PIECES: usize = 1500;
    let dir = tempfile::tempdir().unwrap();
    let backend = open_uring(&temp_file(&dir, "gather.img", PIECES * BLOCK_SIZE));
    let mut src = AlignedBuf::new(2 * PIECES * BLOCK_SIZE);
    fill(&mut src, 7);
    let bufs: Vec<&[u8]> = (0..PIECES).map(|k| &src[2 * k * BLOCK_SIZE..(2 * k + 1) * BLOCK_SIZE]).collect();
    backend.write_vectored_at(&bufs, 0).await.unwrap();
    let mut back = AlignedBuf::new(PIECES * BLOCK_SIZE);
    backend.read_at(&mut back, 0).await.unwrap();
    for (k, b) in bufs.iter().enumerate() {
        assert!(back[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE] == **b, "piece {k} differs");
    }
    if backend.is_direct() {
        let err = backend.write_vectored_at(&[&src[..BLOCK_SIZE], &src[1..BLOCK_SIZE + 1]], 0).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    }
}

#[tokio::test]
async fn any_backend_opens_the_uring_engine() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp_file(&dir, "any.img", 4 * BLOCK_SIZE);
    for engine in [Engine::Uring, Engine::Auto] {
        let backend = AnyBackend::open(&path, engine).unwrap();
        assert_eq!(backend.engine_name(), "io_uring");
        let mut buf = AlignedBuf::new(BLOCK_SIZE);
        fill(&mut buf, 7);
        backend.write_at(&buf, BLOCK_SIZE as u64).await.unwrap();
        backend.sync().await.unwrap();
        let mut back = AlignedBuf::new(BLOCK_SIZE);
        backend.read_at(&mut back, BLOCK_SIZE as u64).await.unwrap();
        assert!(back[..] == buf[..]);
    }
}

/// Opened outside any tokio runtime, the engine reaps completions on its own
/// thread (inside a runtime it uses the runtime's reactor): both must work.
#[test]
fn completion_thread_mode_outside_a_runtime() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("t.img");
    std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
    let b = keel_blockstore::backend::UringBackend::open(&path).unwrap();
    let mut w = AlignedBuf::new(8192);
    w.iter_mut().enumerate().for_each(|(i, x)| *x = (i * 7) as u8);
    let mut r = AlignedBuf::new(8192);
    futures::executor::block_on(async {
        b.write_at(&w, 65536).await.unwrap();
        b.sync().await.unwrap();
        b.read_at(&mut r, 65536).await.unwrap();
    });
    assert!(r[..] == w[..]);
}

// ---------------------------------------------------------------------------
// Reaping: who finds the completions (polls, the reactor, the fallback
// thread) must not matter for correctness.

/// `tasks` tasks on the current runtime, each writing, reading back and
/// checking its own region `rounds` times.
async fn own_region_round_trips(backend: Arc<UringBackend>, tasks: usize, rounds: u64) {
    own_regions(backend, 0..tasks, 2, rounds, None).await
}

/// One task per region in `regions` (of `region_blocks` blocks each), each
/// `rounds` times writing 1 to `region_blocks` blocks of its own pattern,
/// reading them back and checking them; with `sync_every`, a sync after
/// every that many writes.
async fn own_regions(
    backend: Arc<UringBackend>,
    regions: std::ops::Range<usize>,
    region_blocks: usize,
    rounds: u64,
    sync_every: Option<u64>,
) {
    assert!(backend.len() >= (regions.end * region_blocks * BLOCK_SIZE) as u64);
    let mut handles = Vec::new();
    for t in regions {
        let backend = Arc::clone(&backend);
        handles.push(tokio::spawn(async move {
            let base = (t * region_blocks * BLOCK_SIZE) as u64;
            let mut w = AlignedBuf::new(region_blocks * BLOCK_SIZE);
            let mut r = AlignedBuf::new(region_blocks * BLOCK_SIZE);
            for round in 0..rounds {
                let len = (1 + (round as usize + t) % region_blocks) * BLOCK_SIZE;
                fill(&mut w[..len], (t as u64) << 32 | round);
                timed("write", backend.write_at(&w[..len], base)).await.unwrap();
                if sync_every.is_some_and(|k| round % k == k - 1) {
                    timed("sync", backend.sync()).await.unwrap();
                }
                r[..len].fill(0);
                timed("read", backend.read_at(&mut r[..len], base)).await.unwrap();
                assert!(r[..len] == w[..len], "task {t} round {round}: data mismatch");
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
}

/// One thread submits, polls and parks: completions are found by its polls
/// or by the reactor while it waits in `epoll_wait`, never needing the
/// fallback thread to make progress.
#[test]
fn many_tasks_on_a_current_thread_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(open_uring(&temp_file(&dir, "ct.img", 128 * 2 * BLOCK_SIZE)));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(own_region_round_trips(Arc::clone(&backend), 128, 30));
    let stats = backend.reap_stats();
    eprintln!("{stats:?}");
    let total = stats.by_poll + stats.by_reactor + stats.by_thread;
    assert_eq!(total, 128 * 30 * 2, "{stats:?}");
    // The fallback thread only reaps on its watchdog tick here.
    assert!(stats.by_thread * 4 < total, "most completions should be reaped by the runtime's thread: {stats:?}");
}

/// Submission is combined (one thread enters the kernel for everyone's
/// queued SQEs): many OS threads, each with a runtime of its own, submit to
/// one ring at once, and every I/O completes with its own data. (A later
/// submission would carry an SQE stranded by a submitter that stopped too
/// early, so this test alone may miss that; the suite's single-waiter tests
/// hang on it, which was checked by breaking the hand-over.)
#[test]
fn many_threads_submitting_at_once_lose_no_sqe() {
    const THREADS: usize = 8;
    const TASKS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(open_uring(&temp_file(&dir, "mt.img", THREADS * TASKS * 2 * BLOCK_SIZE)));
    let threads: Vec<_> = (0..THREADS)
        .map(|i| {
            let backend = Arc::clone(&backend);
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(own_regions(backend, i * TASKS..(i + 1) * TASKS, 2, 200, None));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = backend.reap_stats();
    assert_eq!(stats.by_poll + stats.by_reactor + stats.by_thread, (THREADS * TASKS * 200 * 2) as u64);
}

/// A runtime without an I/O driver gives the engine no reactor: the fallback
/// thread must complete every I/O its polls do not find.
#[test]
fn runtime_without_io_driver_relies_on_the_fallback_thread() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(open_uring(&temp_file(&dir, "noio.img", 32 * 2 * BLOCK_SIZE)));
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    rt.block_on(own_region_round_trips(Arc::clone(&backend), 32, 20));
    assert_eq!(backend.reap_stats().by_reactor, 0);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_time().build().unwrap();
    rt.block_on(own_region_round_trips(backend, 32, 20));
}

/// The reactor registration belongs to the first runtime; when that runtime
/// is gone the fallback thread takes over, and a later runtime registers
/// anew.
#[test]
fn backend_outlives_the_runtime_it_was_first_used_in() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(open_uring(&temp_file(&dir, "rt.img", 32 * 2 * BLOCK_SIZE)));
    for _ in 0..2 {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(own_region_round_trips(Arc::clone(&backend), 32, 10));
        drop(rt);
        // No runtime at all.
        let mut buf = AlignedBuf::new(BLOCK_SIZE);
        futures::executor::block_on(backend.read_at(&mut buf, 0)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(own_region_round_trips(Arc::clone(&backend), 32, 10));
    }
    // A current-thread runtime kept but not driven holds the registration:
    // I/O from elsewhere still completes (the fallback thread's watchdog).
    let idle = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    idle.block_on(own_region_round_trips(Arc::clone(&backend), 4, 2));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(own_region_round_trips(backend, 8, 10));
    drop(idle);
}

/// Futures dropped in flight while other tasks on other threads keep reaping
/// (their polls may take the dropped future's CQE before its own drop does):
/// no hang, no slot lost, no completion delivered to the wrong slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn futures_dropped_while_other_threads_reap_their_completions() {
    const BLOCKS: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let path = temp_file(&dir, "race.img", BLOCKS * BLOCK_SIZE);
    let backend = Arc::new(open_uring(&path));
    // Known contents: block b holds fill(b).
    let mut w = AlignedBuf::new(BLOCK_SIZE);
    for b in 0..BLOCKS {
        fill(&mut w, b as u64);
        backend.write_at(&w, (b * BLOCK_SIZE) as u64).await.unwrap();
    }
    let mut tasks = Vec::new();
    for t in 0..24u64 {
        let backend = Arc::clone(&backend);
        tasks.push(tokio::spawn(async move {
            let mut buf = AlignedBuf::new(BLOCK_SIZE);
            let mut expect = AlignedBuf::new(BLOCK_SIZE);
            for i in 0..200u64 {
                let b = ((t * 7 + i * 13) % BLOCKS as u64) as usize;
                if (t + i) % 3 == 0 {
                    // Cancel after a varying delay: before, during or after
                    // the I/O, whoever reaps it.
                    let delay = Duration::from_micros((t * 31 + i * 17) % 150);
                    let _ = tokio::time::timeout(delay, backend.read_at(&mut buf, (b * BLOCK_SIZE) as u64)).await;
                } else {
                    buf.fill(0);
                    timed("read", backend.read_at(&mut buf, (b * BLOCK_SIZE) as u64)).await.unwrap();
                    fill(&mut expect, b as u64);
                    assert!(buf[..] == expect[..], "task {t} iteration {i}: block {b} read wrong data");
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Dropping the backend closes the pool file for good: the ring registers
/// the file and holds a reference of its own, which the kernel would
/// otherwise drop only when it tears the ring down in the background. A
/// write lease is granted only when no one else has the file open.
#[tokio::test]
async fn a_dropped_backend_leaves_its_file_closed() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let path = temp_file(&dir, "closed.img", 4 * BLOCK_SIZE);
    for round in 0..20 {
        let backend = open_uring(&path);
        let mut buf = AlignedBuf::new(BLOCK_SIZE);
        timed("read", backend.read_at(&mut buf, 0)).await.unwrap();
        drop(backend);
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        // SAFETY: plain fcntl calls on an fd we own.
        let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) };
        assert_eq!(rc, 0, "round {round}: the file is still open elsewhere: {}", std::io::Error::last_os_error());
        // SAFETY: as above.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    }
}
