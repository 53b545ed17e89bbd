//! `keel`: the appliance daemon (`keel serve`) and its command line.
//!
//! `keel serve` opens (or creates) the default pool and the metadata
//! database in the data directory, reconciles them after a crash, and
//! serves the HTTP API, NBD, and (when wired in) iSCSI. The other commands
//! are the CLI, which talks to a running daemon over the HTTP API, and
//! `keel pool inspect`, which reads a stopped daemon's pool directly.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use keel_blockstore::{Engine, PoolOptions};
use keel_mgmt::cli::{self, Client, ExportCmd, IsoCmd, SnapshotCmd, UserCmd, VolumeCmd};
use keel_mgmt::model::{human, parse_size};
use keel_mgmt::serve::{self, FileConfig, Settings, parse_engine, pool_path};
use keel_vmm_glue::Accel;

#[derive(Parser)]
#[command(name = "keel", version, about = "Keel: a storage-centric virtualization appliance")]
struct Cli {
    /// The HTTP API: the address `keel serve` listens on, the URL the CLI
    /// talks to [default: 127.0.0.1:7450, http://127.0.0.1:7450].
    #[arg(long, global = true, env = "KEEL_API")]
    api: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the appliance.
    Serve(Box<ServeArgs>),
    /// Pools: list, show, create (file, device, LVM), grow, remove.
    #[command(subcommand)]
    Pool(PoolTop),
    /// Volumes: create, list, show, resize, delete, clone.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Snapshots: create, list, delete.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// The ISO store: upload, list, delete.
    #[command(subcommand)]
    Iso(IsoCmd),
    /// Users: create, list, delete, login.
    #[command(subcommand)]
    User(UserCmd),
    /// Exports: show, set (iSCSI initiator ACL and CHAP).
    #[command(subcommand)]
    Export(ExportCmd),
    /// Virtual machines: create, start, stop, clone, console, CD, disks.
    #[command(subcommand)]
    Vm(keel_mgmt::cli_vm::VmCmd),
    /// The appliance library: list, show, create from a VM, delete, verify.
    #[command(subcommand)]
    Appliance(keel_mgmt::cli_vm::ApplianceCmd),
    /// VM running time per user and hour (for billing).
    Usage {
        /// Only this user.
        #[arg(long)]
        user: Option<String>,
    },
    /// Long-running operations of the running daemon.
    #[command(subcommand)]
    Job(ListCmd),
    /// The event log.
    Event {
        #[command(subcommand)]
        cmd: ListCmd,
        /// Only events after this id.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many (the newest).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum PoolTop {
    /// Show a stopped appliance's default pool (reads the pool file).
    Inspect {
        /// Data directory.
        #[arg(long, env = "KEEL_DATA", default_value = "keel-data")]
        data: PathBuf,
    },
    #[command(flatten)]
    Api(keel_mgmt::cli::PoolCmd),
}

#[derive(Subcommand)]
enum ListCmd {
    /// List them.
    List,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file (keys: data, api, nbd, iscsi, pool_size, engine,
    /// cache, data_cache, write_back, commit_interval, nbd_tls_cert, nbd_tls_key, nbd_require_tls, api_tls_cert,
    /// api_tls_key, qemu, accel, vm_stop_timeout, token_ttl, export_auth); flags win.
    #[arg(long, env = "KEEL_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (pool, metadata, ISOs, credentials) [default: keel-data].
    #[arg(long, env = "KEEL_DATA")]
    data: Option<PathBuf>,
    /// NBD server address [default: 127.0.0.1:10809].
    #[arg(long, env = "KEEL_NBD")]
    nbd: Option<SocketAddr>,
    /// iSCSI portal address [default: 127.0.0.1:3260].
    #[arg(long, env = "KEEL_ISCSI")]
    iscsi: Option<SocketAddr>,
    /// Size of the default pool file when it is created (sparse) [default: 64G].
    #[arg(long, value_parser = parse_size)]
    pool_size: Option<u64>,
    /// I/O engine: auto, uring or sync [default: auto].
    #[arg(long, value_parser = parse_engine)]
    engine: Option<Engine>,
    /// Map page cache [default: 64M].
    #[arg(long, value_parser = parse_size)]
    cache: Option<u64>,
    /// Cache of verified data blocks for reads, shared by a volume, its
    /// snapshots and its clones; 0 turns it off [default: an eighth of
    /// the machine's memory, or of the cgroup's limit when lower].
    #[arg(long, value_parser = parse_size)]
    data_cache: Option<u64>,
    /// Written data that may wait in the data cache before it goes to the
    /// disk, batched into large writes (write-back; a flush or FUA write
    /// still waits for it, and what was not flushed was never promised);
    /// at most a quarter of the data cache; 0 turns it off [default: 64M].
    #[arg(long, value_parser = parse_size)]
    write_back: Option<u64>,
    /// Seconds between background commits of writes that no client has
    /// flushed: a killed or crashed appliance loses at most about this
    /// much of them. 0 turns them off (such writes then wait for a flush)
    /// [default: 5].
    #[arg(long, value_parser = parse_seconds)]
    commit_interval: Option<f64>,
    /// PEM certificate chain for NBD over TLS (NBD_OPT_STARTTLS).
    #[arg(long, requires = "nbd_tls_key")]
    nbd_tls_cert: Option<PathBuf>,
    /// PEM private key for NBD over TLS.
    #[arg(long, requires = "nbd_tls_cert")]
    nbd_tls_key: Option<PathBuf>,
    /// Refuse NBD clients that do not negotiate TLS.
    #[arg(long)]
    nbd_require_tls: bool,
    /// PEM certificate chain: serve the HTTP API over HTTPS (TLS 1.2/1.3,
    /// rustls). Without it the API speaks plain HTTP, meant for loopback.
    #[arg(long, requires = "api_tls_key")]
    api_tls_cert: Option<PathBuf>,
    /// PEM private key for the HTTPS API.
    #[arg(long, requires = "api_tls_cert")]
    api_tls_key: Option<PathBuf>,
    /// QEMU binary for VMs [default: qemu-system-x86_64].
    #[arg(long, env = "KEEL_QEMU")]
    qemu: Option<String>,
    /// VM accelerator: kvm, tcg, or auto (KVM when it really boots a
    /// guest here, else TCG) [default: auto].
    #[arg(long, env = "KEEL_ACCEL", value_parser = parse_accel)]
    accel: Option<Accel>,
    /// Volumes' data-plane access: `key` (NBD export names and iSCSI CHAP
    /// carry each volume's access key, which its URLs include) or `none`
    /// (any local client opens any volume by name) [default: key].
    #[arg(long, env = "KEEL_EXPORT_AUTH", value_parser = parse_export_auth)]
    export_auth: Option<bool>,
}

fn parse_export_auth(s: &str) -> Result<bool, String> {
    match s {
        "key" => Ok(true),
        "none" => Ok(false),
        _ => Err(format!("unknown export auth {s:?}: use key or none")),
    }
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    let v = s.parse::<f64>().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    seconds(v)
}

/// `v` if it is a number of seconds from 0 to 86400.
fn seconds(v: f64) -> Result<f64, String> {
    if v.is_finite() && (0.0..=86400.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a number of seconds from 0 to 86400"))
    }
}

fn parse_accel(s: &str) -> Result<Accel, String> {
    Accel::parse(s).ok_or_else(|| format!("unknown accelerator {s:?}: use kvm, tcg or auto"))
}

fn settings(a: ServeArgs, api: Option<&str>) -> Result<Settings> {
    let api = match api {
        Some(s) => {
            let t = s.trim_start_matches("http://").trim_end_matches('/').trim_end_matches("/api/v1");
            Some(
                t.parse::<SocketAddr>()
                    .map_err(|_| anyhow::anyhow!("--api {s:?} is not an address like 127.0.0.1:7450"))?,
            )
        }
        None => None,
    };
    let f = match &a.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let size = |flag: Option<u64>, file: &Option<String>, key: &str, default: u64| -> Result<u64> {
        match (flag, file) {
            (Some(v), _) => Ok(v),
            (None, Some(s)) => parse_size(s).map_err(|e| anyhow::anyhow!("config {key}: {e}")),
            (None, None) => Ok(default),
        }
    };
    let engine = match (a.engine, &f.engine) {
        (Some(e), _) => e,
        (None, Some(s)) => parse_engine(s).map_err(|e| anyhow::anyhow!("config engine: {e}"))?,
        (None, None) => Engine::Auto,
    };
    let nbd_tls = match (a.nbd_tls_cert.or(f.nbd_tls_cert), a.nbd_tls_key.or(f.nbd_tls_key)) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => bail!("NBD TLS needs both a certificate and a key"),
    };
    let api_tls = match (a.api_tls_cert.or(f.api_tls_cert), a.api_tls_key.or(f.api_tls_key)) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => bail!("API TLS needs both a certificate and a key"),
    };
    let nbd_require_tls = a.nbd_require_tls || f.nbd_require_tls.unwrap_or(false);
    if nbd_require_tls && nbd_tls.is_none() {
        bail!("--nbd-require-tls needs --nbd-tls-cert and --nbd-tls-key");
    }
    let accel = match (a.accel, &f.accel) {
        (Some(x), _) => x,
        (None, Some(s)) => parse_accel(s).map_err(|e| anyhow::anyhow!("config accel: {e}"))?,
        (None, None) => Accel::Auto,
    };
    let mut vms = keel_mgmt::vms::VmSettings { accel, ..Default::default() };
    if let Some(q) = a.qemu.or(f.qemu) {
        vms.qemu = q;
    }
    if let Some(t) = f.vm_stop_timeout {
        vms.stop_timeout = std::time::Duration::from_secs(t);
    }
    let d = |s: &str| s.parse::<SocketAddr>().expect("default addresses parse");
    Ok(Settings {
        data: a.data.or(f.data).unwrap_or_else(|| PathBuf::from("keel-data")),
        addrs: keel_mgmt::app::Addrs {
            api: api.or(f.api).unwrap_or_else(|| d("127.0.0.1:7450")),
            nbd: a.nbd.or(f.nbd).unwrap_or_else(|| d("127.0.0.1:10809")),
            iscsi: a.iscsi.or(f.iscsi).unwrap_or_else(|| d("127.0.0.1:3260")),
        },
        pool_size: size(a.pool_size, &f.pool_size, "pool_size", 64 << 30)?,
        engine,
        cache: size(a.cache, &f.cache, "cache", 64 << 20)?,
        data_cache: size(a.data_cache, &f.data_cache, "data_cache", keel_mgmt::serve::default_data_cache())?,
        write_back: size(a.write_back, &f.write_back, "write_back", 64 << 20)?,
        commit_interval: {
            let secs = match (a.commit_interval, f.commit_interval) {
                (Some(v), _) => v,
                (None, Some(v)) => seconds(v).map_err(|e| anyhow::anyhow!("config commit_interval: {e}"))?,
                (None, None) => 5.0,
            };
            (secs > 0.0).then(|| std::time::Duration::from_secs_f64(secs))
        },
        nbd_tls,
        nbd_require_tls,
        api_tls,
        vms,
        export_keys: match (a.export_auth, &f.export_auth) {
            (Some(k), _) => k,
            (None, Some(s)) => parse_export_auth(s).map_err(|e| anyhow::anyhow!("config export_auth: {e}"))?,
            (None, None) => true,
        },
        token_ttl: match std::env::var("KEEL_TOKEN_TTL") {
            Ok(v) => v.parse().map_err(|_| anyhow::anyhow!("KEEL_TOKEN_TTL {v:?} is not a number of seconds"))?,
            Err(_) => f.token_ttl.unwrap_or(keel_mgmt::app::DEFAULT_TOKEN_TTL),
        },
    })
}

fn client(cli: &Cli) -> Client {
    let data = std::env::var_os("KEEL_DATA").map_or_else(|| PathBuf::from("keel-data"), PathBuf::from);
    let api = cli.api.clone().unwrap_or_else(|| "http://127.0.0.1:7450".into());
    let api = if api.starts_with("http://") || api.starts_with("https://") { api } else { format!("http://{api}") };
    Client::new(&api, std::env::var("KEEL_TOKEN").ok(), &data, cli.json)
}

async fn run(cli: Cli) -> Result<()> {
    let c = client(&cli);
    match cli.command {
        Command::Serve(a) => serve::serve(settings(*a, cli.api.as_deref())?).await?,
        Command::Pool(PoolTop::Api(v)) => tokio::task::spawn_blocking(move || cli::pool(&c, v)).await??,
        Command::Pool(PoolTop::Inspect { data }) => {
            let path = pool_path(&data);
            if !path.exists() {
                bail!("no pool at {}: start `keel serve --data {}` first", path.display(), data.display());
            }
            let pool = serve::open_pool(&data, 0, Engine::Auto, PoolOptions::default()).await?;
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
        // The CLI is blocking (ureq): keep it off the runtime's workers.
        Command::Volume(v) => tokio::task::spawn_blocking(move || cli::volume(&c, v)).await??,
        Command::Snapshot(v) => tokio::task::spawn_blocking(move || cli::snapshot(&c, v)).await??,
        Command::Iso(v) => tokio::task::spawn_blocking(move || cli::iso(&c, v)).await??,
        Command::User(v) => tokio::task::spawn_blocking(move || cli::user(&c, v)).await??,
        Command::Export(v) => tokio::task::spawn_blocking(move || cli::export(&c, v)).await??,
        Command::Vm(v) => tokio::task::spawn_blocking(move || keel_mgmt::cli_vm::vm(&c, v)).await??,
        Command::Appliance(v) => tokio::task::spawn_blocking(move || keel_mgmt::cli_vm::appliance(&c, v)).await??,
        Command::Usage { user } => tokio::task::spawn_blocking(move || keel_mgmt::cli_vm::usage(&c, user)).await??,
        Command::Job(ListCmd::List) => {
            tokio::task::spawn_blocking(move || cli::jobs_and_events(&c, false, 0, 0)).await??
        }
        Command::Event { cmd: ListCmd::List, after, limit } => {
            tokio::task::spawn_blocking(move || cli::jobs_and_events(&c, true, after, limit)).await??
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        // A command line tool whose reader goes away (`keel vm list | head`)
        // ends quietly, as Unix tools do, instead of panicking on EPIPE.
        // SAFETY: setting a signal disposition to SIG_DFL before any thread
        // that could rely on SIGPIPE being ignored does I/O.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG").unwrap_or_else(|_| "info".into());
    // Structured logs: text by default, JSON lines with KEEL_LOG_FORMAT=json.
    if std::env::var("KEEL_LOG_FORMAT").as_deref() == Ok("json") {
        tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
