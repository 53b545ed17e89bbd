//! `keel`: the appliance daemon and its command line.
//!
//! Today `keel serve` brings up the block store and its NBD server: it opens
//! (or creates) the default pool in the data directory with the best I/O
//! engine the machine offers, reports its state, serves every volume over
//! NBD, and keeps running until stopped, committing on the way out. The HTTP
//! API, the CLI verbs and the iSCSI target come with their issues (see
//! README.md, "Status").

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use keel_blockstore::{AnyBackend, Engine, Pool, PoolOptions};

#[derive(Parser)]
#[command(name = "keel", version, about = "Keel: a storage-centric virtualization appliance")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the appliance with embedded defaults.
    Serve(ServeArgs),
    /// Show the default pool's state without serving it.
    Pool {
        /// Data directory.
        #[arg(long, env = "KEEL_DATA", default_value = "keel-data")]
        data: PathBuf,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Data directory (holds the default pool file).
    #[arg(long, env = "KEEL_DATA", default_value = "keel-data")]
    data: PathBuf,
    /// Size of the default pool file when it is created (sparse; bytes, or
    /// with a K/M/G/T suffix).
    #[arg(long, default_value = "64G", value_parser = parse_size)]
    pool_size: u64,
    /// I/O engine: auto, uring or sync.
    #[arg(long, default_value = "auto", value_parser = parse_engine)]
    engine: Engine,
    /// Map page cache, in bytes or with a suffix.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    cache: u64,
    /// Address of the NBD server (every volume exported under its name,
    /// every snapshot read-only as VOLUME@SNAPSHOT).
    #[arg(long, env = "KEEL_NBD", default_value = "127.0.0.1:10809")]
    nbd: std::net::SocketAddr,
    /// PEM certificate chain for NBD over TLS (NBD_OPT_STARTTLS).
    #[arg(long, requires = "nbd_tls_key")]
    nbd_tls_cert: Option<PathBuf>,
    /// PEM private key for NBD over TLS.
    #[arg(long, requires = "nbd_tls_cert")]
    nbd_tls_key: Option<PathBuf>,
    /// Refuse NBD clients that do not negotiate TLS.
    #[arg(long, requires = "nbd_tls_cert")]
    nbd_require_tls: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_engine(s: &str) -> Result<Engine, String> {
    match s {
        "auto" => Ok(Engine::Auto),
        "uring" | "io_uring" => Ok(Engine::Uring),
        "sync" => Ok(Engine::Sync),
        _ => Err(format!("unknown engine {s:?}: use auto, uring or sync")),
    }
}

fn pool_path(data: &Path) -> PathBuf {
    data.join("pool.img")
}

async fn open_pool(data: &Path, size: u64, engine: Engine, opts: PoolOptions) -> Result<Pool<AnyBackend>> {
    std::fs::create_dir_all(data).with_context(|| format!("creating data directory {}", data.display()))?;
    let path = pool_path(data);
    let fresh = !path.exists();
    if fresh {
        let f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        f.set_len(size).with_context(|| format!("sizing {}", path.display()))?;
    }
    let backend = AnyBackend::open(&path, engine).with_context(|| format!("opening {}", path.display()))?;
    let engine_name = backend.engine_name();
    let pool = if fresh {
        println!("created pool {} ({} bytes, engine {engine_name})", path.display(), size);
        Pool::create(backend, opts).await?
    } else {
        let (pool, report) = Pool::open(backend, opts).await?;
        println!("opened pool {} at generation {} (engine {engine_name})", path.display(), report.generation);
        if let Some(why) = report.superblock_fallback {
            println!("recovered: the newest superblock copy was unusable ({why}); opened the previous commit");
        }
        pool
    };
    Ok(pool)
}

fn print_state(pool: &Pool<AnyBackend>) {
    let s = pool.stats();
    println!(
        "pool: {} total, {} allocated, {} free, {} provisioned in {} device(s)",
        human(s.total_bytes),
        human(s.allocated_bytes),
        human(s.free_bytes),
        human(s.provisioned_bytes),
        s.devices
    );
    for d in pool.list() {
        println!("  {:<32} {:>10} {:>10} allocated", d.name, human(d.size), human(d.allocated_bytes));
    }
}

fn human(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(a) => {
            let opts = PoolOptions { cache_bytes: a.cache as usize, ..Default::default() };
            let pool = open_pool(&a.data, a.pool_size, a.engine, opts).await?;
            print_state(&pool);
            let tls = match (&a.nbd_tls_cert, &a.nbd_tls_key) {
                (Some(c), Some(k)) => Some(keel_nbd_server::tls::acceptor_from_pem(c, k)?),
                _ => None,
            };
            let config = keel_nbd_server::ServerConfig { tls, require_tls: a.nbd_require_tls, ..Default::default() };
            let listener = tokio::net::TcpListener::bind(a.nbd)
                .await
                .with_context(|| format!("binding the NBD server to {}", a.nbd))?;
            let exports = std::sync::Arc::new(keel_nbd_server::PoolExports::new(pool.clone()));
            let nbd = tokio::spawn(keel_nbd_server::serve(listener, exports, std::sync::Arc::new(config)));
            println!("NBD on nbd://{}/VOLUME{}", a.nbd, if a.nbd_require_tls { " (TLS required)" } else { "" });
            println!("keel is up (the HTTP API and iSCSI target are not built yet); Ctrl-C stops it");
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            nbd.abort();
            pool.close().await?;
            println!("pool committed; bye");
        }
        Command::Pool { data } => {
            let path = pool_path(&data);
            if !path.exists() {
                anyhow::bail!("no pool at {}: start `keel serve --data {}` first", path.display(), data.display());
            }
            let pool = open_pool(&data, 0, Engine::Auto, PoolOptions::default()).await?;
            print_state(&pool);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert!(parse_size("5X").is_err());
        assert!(parse_size("G").is_err());
    }
}
