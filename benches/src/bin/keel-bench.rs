//! `keel-bench`: a fio-like load generator for the Keel block store on a file
//! or block device.
//!
//! It opens (or creates) a pool with [`AnyBackend::open`] (by default
//! [`Engine::Auto`]: io_uring with O_DIRECT), opens or creates one volume,
//! optionally prefills it and takes snapshots, then runs `--qd` tokio tasks
//! on a multi-thread runtime, each owning one [`AlignedBuf`] and issuing one
//! I/O at a time until the deadline. The result is one machine-readable line
//! on stdout:
//!
//! ```text
//! mode=randread bs=4096 qd=32 iops=123456 mbps=482.3 engine=io_uring direct=1 ...
//! ```
//!
//! `mbps` is MiB/s (fio's `bw` unit). Everything else goes to stderr.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use keel_blockstore::{AlignedBuf, AnyBackend, Backend, DeviceKind, Engine, Error, Pool, PoolOptions, Volume};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};

/// I/O pattern, named as fio's `--rw`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Randread => "randread",
            Mode::Randwrite => "randwrite",
            Mode::Read => "read",
            Mode::Write => "write",
        }
    }
    fn is_write(self) -> bool {
        matches!(self, Mode::Randwrite | Mode::Write)
    }
    fn is_random(self) -> bool {
        matches!(self, Mode::Randread | Mode::Randwrite)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum EngineArg {
    /// io_uring + O_DIRECT if available, else the portable engine.
    Auto,
    /// io_uring + O_DIRECT, or fail.
    Uring,
    /// pread/pwrite (O_DIRECT when possible).
    Sync,
}

/// fio-like workload on a Keel pool file.
#[derive(Parser, Debug)]
#[command(name = "keel-bench", version)]
struct Args {
    /// Pool file or block device. Reused when it exists.
    #[arg(long)]
    pool: PathBuf,
    /// Create the pool file with this size (e.g. 4G) when it does not exist,
    /// and format it.
    #[arg(long, value_parser = parse_size)]
    create: Option<u64>,
    /// With --create: make the file sparse (set_len) instead of fallocating
    /// it.
    #[arg(long)]
    sparse: bool,
    /// Volume to use; created with --volume-size when missing.
    #[arg(long, default_value = "bench")]
    volume: String,
    /// Size of a volume this run creates (e.g. 2G).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    volume_size: u64,
    /// I/O pattern.
    #[arg(long, value_enum, default_value = "randread")]
    mode: Mode,
    /// Block size (e.g. 4k, 1M); a multiple of 512.
    #[arg(long, value_parser = parse_size, default_value = "4k")]
    bs: u64,
    /// Queue depth: number of concurrent tasks, one I/O in flight each.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10.0)]
    runtime: f64,
    /// Seconds to run the workload before measuring (ignored with
    /// --first-write).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Write the whole volume sequentially first (skipped when it is already
    /// fully allocated), so that I/O hits allocated space.
    #[arg(long)]
    prefill: bool,
    /// Writes in flight during --prefill. With 1 the volume's blocks land
    /// in logical order on disk; with more, concurrent writers interleave
    /// their 1 MiB pieces.
    #[arg(long, default_value_t = 1)]
    prefill_qd: u64,
    /// Make sure the volume has at least this many snapshots (taken after
    /// the prefill, before measuring).
    #[arg(long, default_value_t = 0)]
    snapshots: usize,
    /// Measure writes into never-written space: a fresh volume of
    /// --volume-size, written once per block (sequentially for `write`, in a
    /// random permutation for `randwrite`); the run stops early when the
    /// volume is full. The volume is deleted afterwards unless --keep.
    #[arg(long)]
    first_write: bool,
    /// Keep the fresh volume made by --first-write.
    #[arg(long)]
    keep: bool,
    /// Make a writable clone of the volume as it is now (after --prefill,
    /// before --snapshots), named this, through a snapshot of the volume
    /// named `for-<clone>`. The clone maps the very blocks the volume does
    /// (the same layout on disk) and has no snapshots of its own: the fair
    /// baseline for reads of a volume with many snapshots.
    #[arg(long)]
    clone: Option<String>,
    /// Only prepare (create, prefill, clone, snapshots) and exit without
    /// measuring.
    #[arg(long)]
    setup_only: bool,
    /// Diagnostic: read the pool file through the store's backend directly
    /// (same engine, same offsets, no map lookup, no checksum), to tell the
    /// engine's per-I/O cost from the store's. Read modes only.
    #[arg(long)]
    raw: bool,
    /// Backend engine.
    #[arg(long, value_enum, default_value = "auto")]
    engine: EngineArg,
    /// Map page cache, MiB.
    #[arg(long, default_value_t = 64)]
    cache_mib: usize,
    /// Data block cache, MiB (0: none, reads go to the disk).
    #[arg(long, default_value_t = 0)]
    data_cache_mib: usize,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// RNG seed (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
}

/// Parse `4096`, `4k`, `1M`, `2G`, `1T` (binary units; optional `iB`/`B`).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower.strip_suffix("ib").or_else(|| lower.strip_suffix('b')).unwrap_or(&lower);
    let (num, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        _ => (body, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("bad size {s:?}: use e.g. 4096, 4k, 1M, 2G"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size {s:?} overflows"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.qd == 0 {
        bail!("--qd must be at least 1");
    }
    if args.bs == 0 || !args.bs.is_multiple_of(512) {
        bail!("--bs must be a positive multiple of 512");
    }
    if args.first_write && args.clone.is_some() {
        bail!("--clone goes with an existing volume, not --first-write");
    }
    if args.first_write && args.setup_only {
        bail!("--first-write makes a fresh volume for one measured run; it cannot go with --setup-only");
    }
    if args.raw && (args.mode.is_write() || args.first_write) {
        bail!("--raw only reads (writing the pool file behind the store would corrupt it)");
    }
    if args.first_write && !args.mode.is_write() {
        bail!("--first-write needs --mode write or randwrite");
    }
    if !args.runtime.is_finite() || args.runtime <= 0.0 || !args.warmup.is_finite() || args.warmup < 0.0 {
        bail!("--runtime must be positive and --warmup not negative");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(run(args))
}

/// Create `path` with `size` bytes, allocated at the file-system level
/// (fallocate) unless `sparse` or the file system cannot.
fn create_file(path: &Path, size: u64, sparse: bool) -> Result<()> {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let mut how = "sparse";
    if !sparse {
        let len = libc::off_t::try_from(size).context("pool size")?;
        // SAFETY: fallocate only reads its integer arguments; the fd is
        // owned by `file`, which is open for writing and outlives the call.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
        if rc == 0 {
            how = "fallocated";
        } else {
            let e = std::io::Error::last_os_error();
            eprintln!("keel-bench: fallocate failed ({e}); making a sparse file instead");
        }
    }
    file.set_len(size).with_context(|| format!("sizing {}", path.display()))?;
    eprintln!("keel-bench: created {} ({size} bytes, {how})", path.display());
    Ok(())
}

async fn open_pool(args: &Args) -> Result<Pool<AnyBackend>> {
    let exists = args.pool.exists();
    if !exists {
        let Some(size) = args.create else {
            bail!("{} does not exist: pass --create SIZE to make it", args.pool.display());
        };
        create_file(&args.pool, size, args.sparse)?;
    }
    let engine = match args.engine {
        EngineArg::Auto => Engine::Auto,
        EngineArg::Uring => Engine::Uring,
        EngineArg::Sync => Engine::Sync,
    };
    let backend = AnyBackend::open(&args.pool, engine).with_context(|| format!("opening {}", args.pool.display()))?;
    let opts = PoolOptions {
        cache_bytes: args.cache_mib << 20,
        data_cache_bytes: args.data_cache_mib << 20,
        ..PoolOptions::default()
    };
    let pool = if exists {
        Pool::open(backend, opts).await.with_context(|| format!("opening the pool on {}", args.pool.display()))?.0
    } else {
        Pool::create(backend, opts).await.with_context(|| format!("formatting {}", args.pool.display()))?
    };
    Ok(pool)
}

fn engine_of(pool: &Pool<AnyBackend>) -> (&'static str, bool) {
    let b = pool.backend();
    let direct = match b {
        AnyBackend::Uring(u) => u.is_direct(),
        AnyBackend::File(f) => f.is_direct(),
        AnyBackend::Mem(_) => false,
    };
    (b.engine_name(), direct)
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Write the whole volume sequentially, 1 MiB at a time, `qd` in flight.
async fn prefill(vol: &Volume<AnyBackend>, qd: u64, seed: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let size = vol.size();
    if vol.allocated_bytes() >= size {
        eprintln!("keel-bench: prefill: {} is already fully allocated", vol.name());
        return Ok(());
    }
    let t = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for k in 0..qd.max(1) {
        let vol = vol.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = AlignedBuf::new(CHUNK as usize);
            SmallRng::seed_from_u64(seed ^ k).fill_bytes(&mut buf);
            loop {
                let off = next.fetch_add(CHUNK, Ordering::Relaxed);
                if off >= size {
                    return Ok::<_, Error>(());
                }
                let len = CHUNK.min(size - off) as usize;
                vol.write(off, &buf[..len], false).await?;
            }
        }));
    }
    for t in tasks {
        t.await.context("prefill task panicked")??;
    }
    vol.flush().await?;
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "keel-bench: prefilled {} ({} MiB) in {secs:.2} s ({:.0} MiB/s)",
        vol.name(),
        size >> 20,
        size as f64 / (1 << 20) as f64 / secs
    );
    Ok(())
}

/// Make sure `vol` has at least `want` snapshots.
async fn ensure_snapshots(pool: &Pool<AnyBackend>, vol: &Volume<AnyBackend>, want: usize) -> Result<usize> {
    let prefix = format!("{}@", vol.name());
    let have = pool.list().iter().filter(|d| d.kind == DeviceKind::Snapshot && d.name.starts_with(&prefix)).count();
    if have >= want {
        return Ok(have);
    }
    let t = Instant::now();
    let mut made = 0;
    let mut i = have;
    while have + made < want {
        match pool.snapshot(vol.name(), &format!("s{i}")).await {
            Ok(_) => made += 1,
            Err(Error::AlreadyExists(_)) => {}
            Err(e) => return Err(e).context("taking a snapshot"),
        }
        i += 1;
    }
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "keel-bench: took {made} snapshots of {} in {secs:.2} s ({:.0} us each); it has {want} now",
        vol.name(),
        secs * 1e6 / made as f64
    );
    Ok(want)
}

/// Where each task's next I/O goes.
enum Pattern {
    /// Uniformly random block.
    Random,
    /// Shared sequential cursor, wrapping at the end.
    Seq,
    /// Every block once, in order; stop at the end.
    FirstSeq,
    /// Every block once, in this order; stop at the end.
    FirstPerm(Vec<u32>),
}

struct Shared {
    vol: Volume<AnyBackend>,
    /// Set with --raw: read through this pool's backend, not the volume.
    raw: Option<Pool<AnyBackend>>,
    pattern: Pattern,
    write: bool,
    bs: u64,
    blocks: u64,
    next: AtomicU64,
    measure_from: Instant,
    end: Instant,
}

/// What one task measured: I/Os completed in the window and the time of the
/// last one.
struct TaskResult {
    ops: u64,
    last: Option<Instant>,
}

async fn worker(sh: Arc<Shared>, seed: u64) -> Result<TaskResult> {
    let bs = sh.bs as usize;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut buf = AlignedBuf::new(bs);
    if sh.write {
        rng.fill_bytes(&mut buf);
    }
    let mut res = TaskResult { ops: 0, last: None };
    loop {
        if Instant::now() >= sh.end {
            return Ok(res);
        }
        let block = match &sh.pattern {
            Pattern::Random => rng.gen_range(0..sh.blocks),
            Pattern::Seq => sh.next.fetch_add(1, Ordering::Relaxed) % sh.blocks,
            Pattern::FirstSeq => {
                let i = sh.next.fetch_add(1, Ordering::Relaxed);
                if i >= sh.blocks {
                    return Ok(res);
                }
                i
            }
            Pattern::FirstPerm(perm) => {
                let i = sh.next.fetch_add(1, Ordering::Relaxed);
                match perm.get(i as usize) {
                    Some(&b) => u64::from(b),
                    None => return Ok(res),
                }
            }
        };
        let off = block * sh.bs;
        let r = if let Some(pool) = &sh.raw {
            pool.backend().read_at(&mut buf[..bs], off).await.map_err(anyhow::Error::from)
        } else if sh.write {
            sh.vol.write(off, &buf[..bs], false).await.map_err(anyhow::Error::from)
        } else {
            sh.vol.read(off, &mut buf[..bs]).await.map_err(anyhow::Error::from)
        };
        r.with_context(|| format!("{} of {bs} bytes at {off}", if sh.write { "write" } else { "read" }))?;
        let done = Instant::now();
        if done >= sh.measure_from && done <= sh.end {
            res.ops += 1;
            res.last = Some(done);
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let seed = args.seed.unwrap_or_else(unix_nanos);
    let pool = open_pool(&args).await?;
    let (engine, direct) = engine_of(&pool);
    eprintln!("keel-bench: engine={engine} direct={direct} pool={}", args.pool.display());
    if engine != "io_uring" || !direct {
        eprintln!("keel-bench: WARNING: not io_uring + O_DIRECT; figures are not comparable with fio --direct=1");
    }

    let vol = if args.first_write {
        let name = format!("fw-{}", unix_nanos());
        pool.create_volume(&name, args.volume_size).await.context("creating the first-write volume")?
    } else {
        match pool.volume(&args.volume) {
            Ok(v) => {
                if v.size() != args.volume_size {
                    eprintln!(
                        "keel-bench: using existing volume {} of {} bytes (not --volume-size {})",
                        v.name(),
                        v.size(),
                        args.volume_size
                    );
                }
                v
            }
            Err(Error::NotFound(_)) => pool
                .create_volume(&args.volume, args.volume_size)
                .await
                .with_context(|| format!("creating volume {}", args.volume))?,
            Err(e) => return Err(e).context("opening the volume"),
        }
    };
    if args.prefill && !args.first_write {
        prefill(&vol, args.prefill_qd, seed).await?;
    }
    if let Some(clone) = &args.clone {
        let snap = format!("for-{clone}");
        pool.snapshot(vol.name(), &snap).await.context("taking the clone's snapshot")?;
        pool.clone_snapshot(&format!("{}@{snap}", vol.name()), clone).await.context("making the clone")?;
        eprintln!("keel-bench: cloned {} as {clone}", vol.name());
    }
    let snapshots = if args.first_write { 0 } else { ensure_snapshots(&pool, &vol, args.snapshots).await? };
    if !args.mode.is_write() && vol.allocated_bytes() < vol.size() {
        eprintln!(
            "keel-bench: WARNING: {} has {} of {} bytes allocated; reads of holes do no I/O (use --prefill)",
            vol.name(),
            vol.allocated_bytes(),
            vol.size()
        );
    }
    // Start from a committed state, with nothing dirty.
    pool.flush().await?;
    if args.setup_only {
        eprintln!(
            "keel-bench: setup done: {} ({} bytes, {} allocated, {snapshots} snapshots)",
            vol.name(),
            vol.size(),
            vol.allocated_bytes()
        );
        drop(vol);
        pool.close().await?;
        return Ok(());
    }

    let blocks = vol.size() / args.bs;
    if blocks == 0 {
        bail!("volume of {} bytes is smaller than one {}-byte block", vol.size(), args.bs);
    }
    let pattern = match (args.first_write, args.mode.is_random()) {
        (false, true) => Pattern::Random,
        (false, false) => Pattern::Seq,
        (true, false) => Pattern::FirstSeq,
        (true, true) => {
            let n = u32::try_from(blocks).context("too many blocks for --first-write randwrite")?;
            let mut perm: Vec<u32> = (0..n).collect();
            perm.shuffle(&mut SmallRng::seed_from_u64(seed));
            Pattern::FirstPerm(perm)
        }
    };
    let warmup = if args.first_write { 0.0 } else { args.warmup };
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(warmup);
    let end = measure_from + Duration::from_secs_f64(args.runtime);
    let sh = Arc::new(Shared {
        vol: vol.clone(),
        raw: args.raw.then(|| pool.clone()),
        pattern,
        write: args.mode.is_write(),
        bs: args.bs,
        blocks,
        next: AtomicU64::new(0),
        measure_from,
        end,
    });
    let tasks: Vec<_> = (0..args.qd as u64)
        .map(|k| tokio::spawn(worker(sh.clone(), seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15))))
        .collect();
    let mut ops = 0u64;
    let mut last: Option<Instant> = None;
    for t in tasks {
        let r = t.await.context("I/O task panicked")??;
        ops += r.ops;
        last = last.max(r.last);
    }
    let finished = Instant::now();
    // A first-write run that filled the volume stopped early: measure up to
    // its last completion.
    let filled = args.first_write && sh.next.load(Ordering::Relaxed) >= blocks;
    let secs = if filled {
        last.map_or(0.0, |l| l.duration_since(measure_from).as_secs_f64())
    } else {
        end.min(finished).duration_since(measure_from).as_secs_f64()
    };
    let iops = if secs > 0.0 { ops as f64 / secs } else { 0.0 };
    let mbps = iops * args.bs as f64 / (1u64 << 20) as f64;

    let t = Instant::now();
    pool.flush().await?;
    let flush_ms = t.elapsed().as_secs_f64() * 1e3;
    if args.first_write {
        if filled {
            eprintln!("keel-bench: first-write volume full after {secs:.2} s");
        }
        if !args.keep {
            pool.delete_volume(vol.name(), true).await.context("deleting the first-write volume")?;
        }
    }
    drop(sh);
    drop(vol);
    if let AnyBackend::Uring(u) = pool.backend() {
        let s = u.reap_stats();
        eprintln!(
            "keel-bench: io_uring completions reaped by polls {}, by the reactor {}, by the fallback thread {}",
            s.by_poll, s.by_reactor, s.by_thread
        );
    }
    pool.close().await?;

    println!(
        "mode={} bs={} qd={} iops={iops:.0} mbps={mbps:.1} engine={engine} direct={} runtime={secs:.2} \
         snapshots={snapshots} first_write={} raw={} ops={ops} final_flush_ms={flush_ms:.1}",
        args.mode.name(),
        args.bs,
        args.qd,
        u8::from(direct),
        u8::from(args.first_write),
        u8::from(args.raw),
    );
    Ok(())
}
