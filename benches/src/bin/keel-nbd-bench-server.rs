//! `keel-nbd-bench-server`: a Keel NBD server set up for benchmarking.
//!
//! It opens (or creates) a pool with [`AnyBackend::open`] (by default
//! [`Engine::Auto`]: io_uring with O_DIRECT), opens or creates one thin
//! volume, writes it once sequentially so that reads hit data (unless
//! `--no-prefill`), makes sure it has `--snapshots` snapshots, commits, and
//! then serves every device of the pool over NBD with
//! [`keel_nbd_server::serve`] on a tokio multi-thread runtime of `--threads`
//! workers. When it listens it prints one line on stdout:
//!
//! ```text
//! ready nbd://127.0.0.1:10809/bench size=2147483648 snapshots=3 engine=io_uring direct=1 data_cache_mib=0
//! ```
//!
//! It serves until SIGINT or SIGTERM, then commits the pool and exits.
//! Everything else goes to stderr.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use keel_blockstore::{AlignedBuf, AnyBackend, DeviceKind, Engine, Error, Pool, PoolOptions, Volume};
use keel_nbd_server::{PoolExports, ServerConfig, serve};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum EngineArg {
    /// io_uring + O_DIRECT if available, else the portable engine.
    Auto,
    /// io_uring + O_DIRECT, or fail.
    Uring,
    /// pread/pwrite (O_DIRECT when possible).
    Sync,
}

/// Serve a Keel volume (with snapshots) over NBD, for benchmarks.
#[derive(Parser, Debug)]
#[command(name = "keel-nbd-bench-server", version)]
struct Args {
    /// Pool file or block device. Reused when it exists.
    #[arg(long)]
    pool: PathBuf,
    /// Size of the pool file when this run creates it (default: 3x
    /// --volume-size, room for the volume and for copy-on-write of its
    /// snapshotted blocks).
    #[arg(long, value_parser = parse_size)]
    create: Option<u64>,
    /// When creating the pool file: make it sparse (set_len) instead of
    /// fallocating it.
    #[arg(long)]
    sparse: bool,
    /// Volume to export; created with --volume-size when missing.
    #[arg(long, default_value = "bench")]
    volume: String,
    /// Size of a volume this run creates (e.g. 2G).
    #[arg(long, value_parser = parse_size, default_value = "2G")]
    volume_size: u64,
    /// Do not write the volume before serving (reads of never-written
    /// blocks then do no I/O).
    #[arg(long)]
    no_prefill: bool,
    /// Writes in flight during the prefill (1 MiB each). With 1 the
    /// volume's blocks land in logical order on disk.
    #[arg(long, default_value_t = 1)]
    prefill_qd: u64,
    /// Make sure the volume has at least this many snapshots (taken after
    /// the prefill).
    #[arg(long, default_value_t = 3)]
    snapshots: usize,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: SocketAddr,
    /// Also serve every volume over iSCSI on this address (as
    /// `iqn.2026-11.io.keel:VOLUME`, LUN 0).
    #[arg(long)]
    iscsi: Option<SocketAddr>,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Requests served at once per NBD connection.
    #[arg(long)]
    max_inflight: Option<usize>,
    /// Backend engine.
    #[arg(long, value_enum, default_value = "auto")]
    engine: EngineArg,
    /// Map page cache, MiB.
    #[arg(long, default_value_t = 64)]
    cache_mib: usize,
    /// Data block cache, MiB (0: none, reads go to the disk).
    #[arg(long, default_value_t = 0)]
    data_cache_mib: usize,
    /// Written data that may wait in the data cache for the disk, MiB
    /// (write-back; 0: writes reach the disk before they are acknowledged).
    #[arg(long, default_value_t = 0)]
    write_back_mib: usize,
    /// Milliseconds between background commits of unflushed writes, as
    /// `keel serve --commit-interval` (its default: 5 s); 0 for none.
    #[arg(long, default_value_t = 5000)]
    commit_interval_ms: u64,
    /// RNG seed for the prefill data (default: from the clock).
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
    if args.volume_size == 0 || !args.volume_size.is_multiple_of(512) {
        bail!("--volume-size must be a positive multiple of 512");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .thread_name("keel-nbd")
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
            eprintln!("keel-nbd-bench-server: fallocate failed ({e}); making a sparse file instead");
        }
    }
    file.set_len(size).with_context(|| format!("sizing {}", path.display()))?;
    eprintln!("keel-nbd-bench-server: created {} ({size} bytes, {how})", path.display());
    Ok(())
}

async fn open_pool(args: &Args) -> Result<Pool<AnyBackend>> {
    let exists = args.pool.exists();
    if !exists {
        let size = args.create.unwrap_or(args.volume_size.saturating_mul(3));
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
        write_back_bytes: args.write_back_mib << 20,
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

/// Write the whole volume sequentially, 1 MiB at a time, `qd` in flight
/// (skipped when it is already fully allocated).
async fn prefill(vol: &Volume<AnyBackend>, qd: u64, seed: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let size = vol.size();
    if vol.allocated_bytes() >= size {
        eprintln!("keel-nbd-bench-server: prefill: {} is already fully allocated", vol.name());
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
        "keel-nbd-bench-server: prefilled {} ({} MiB) in {secs:.2} s ({:.0} MiB/s)",
        vol.name(),
        size >> 20,
        size as f64 / (1 << 20) as f64 / secs
    );
    Ok(())
}

/// Make sure `vol` has at least `want` snapshots; returns how many it has.
async fn ensure_snapshots(pool: &Pool<AnyBackend>, vol: &Volume<AnyBackend>, want: usize) -> Result<usize> {
    let prefix = format!("{}@", vol.name());
    let count = || pool.list().iter().filter(|d| d.kind == DeviceKind::Snapshot && d.name.starts_with(&prefix)).count();
    let have = count();
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
    eprintln!("keel-nbd-bench-server: took {made} snapshots of {} in {:.3} s", vol.name(), t.elapsed().as_secs_f64());
    Ok(count())
}

async fn run(args: Args) -> Result<()> {
    let seed = args.seed.unwrap_or_else(unix_nanos);
    let pool = open_pool(&args).await?;
    let (engine, direct) = engine_of(&pool);
    eprintln!("keel-nbd-bench-server: engine={engine} direct={direct} pool={}", args.pool.display());
    if engine != "io_uring" || !direct {
        eprintln!("keel-nbd-bench-server: WARNING: not io_uring + O_DIRECT");
    }
    if args.commit_interval_ms > 0 {
        tokio::spawn(pool.committer(Duration::from_millis(args.commit_interval_ms)));
    }
    let vol = match pool.volume(&args.volume) {
        Ok(v) => {
            if v.size() != args.volume_size {
                eprintln!(
                    "keel-nbd-bench-server: using existing volume {} of {} bytes (not --volume-size {})",
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
    };
    if !args.no_prefill {
        prefill(&vol, args.prefill_qd, seed).await?;
    }
    let snapshots = ensure_snapshots(&pool, &vol, args.snapshots).await?;
    // Serve from a committed state, with nothing dirty.
    pool.flush().await?;
    let (name, size, allocated) = (vol.name().to_string(), vol.size(), vol.allocated_bytes());
    drop(vol);

    let mut config = ServerConfig::default();
    if let Some(n) = args.max_inflight {
        config.max_inflight = n.max(1);
    }
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let server = serve(listener, Arc::new(PoolExports::new(pool.clone())), Arc::new(config));
    eprintln!(
        "keel-nbd-bench-server: serving {name} ({size} bytes, {allocated} allocated, {snapshots} snapshots) on {addr} \
         with {} worker threads",
        args.threads.max(1)
    );
    println!(
        "ready nbd://{addr}/{name} size={size} snapshots={snapshots} engine={engine} direct={} data_cache_mib={} write_back_mib={}",
        u8::from(direct),
        args.data_cache_mib,
        args.write_back_mib
    );
    if let Some(iscsi) = args.iscsi {
        let listener = TcpListener::bind(iscsi).await.with_context(|| format!("listening on {iscsi}"))?;
        let addr = listener.local_addr()?;
        let targets = Arc::new(keel_iscsi_target::PoolTargets::new(pool.clone()));
        let server = keel_iscsi_target::Server::new(targets, keel_iscsi_target::ServerConfig::default());
        tokio::spawn(server.serve(listener));
        println!("ready iscsi://{addr}/{}{name}/0", keel_iscsi_target::IQN_PREFIX);
    }

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = server => r.context("serving NBD")?,
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    eprintln!("keel-nbd-bench-server: stopping; committing the pool");
    pool.close().await.context("committing the pool")?;
    Ok(())
}
