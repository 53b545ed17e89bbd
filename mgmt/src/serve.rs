//! `keel serve`: configuration, first start, reconciliation, listeners.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use keel_blockstore::{AnyBackend, Engine, Pool, PoolOptions};
use serde::Deserialize;

use crate::app::{Addrs, App};
use crate::db::{ISOS, Meta, TOKENS, USERS};
use crate::model::{IsoMeta, Role, Token, User, human, now};
use crate::pools::{PoolRecord, Pools, Slot};
use crate::{auth, reconcile};

/// The settings of `keel serve`, from flags, environment and the TOML
/// config file, in that order of precedence, over the defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Data directory.
    pub data: Option<PathBuf>,
    /// HTTP API address.
    pub api: Option<SocketAddr>,
    /// NBD address.
    pub nbd: Option<SocketAddr>,
    /// iSCSI portal address.
    pub iscsi: Option<SocketAddr>,
    /// Size of a new pool file (`64G`).
    pub pool_size: Option<String>,
    /// I/O engine: auto, uring, sync.
    pub engine: Option<String>,
    /// Map page cache size (`64M`).
    pub cache: Option<String>,
    /// Data block cache size (`3G`; `0` for none).
    pub data_cache: Option<String>,
    /// Write-back size (`64M`; `0` for none).
    pub write_back: Option<String>,
    /// Seconds between background commits (`5`; `0` for none).
    pub commit_interval: Option<f64>,
    /// NBD TLS certificate (PEM).
    pub nbd_tls_cert: Option<PathBuf>,
    /// NBD TLS key (PEM).
    pub nbd_tls_key: Option<PathBuf>,
    /// Refuse NBD clients without TLS.
    pub nbd_require_tls: Option<bool>,
    /// HTTPS API certificate (PEM).
    pub api_tls_cert: Option<PathBuf>,
    /// HTTPS API key (PEM).
    pub api_tls_key: Option<PathBuf>,
    /// The QEMU binary for VMs.
    pub qemu: Option<String>,
    /// VM accelerator: kvm, tcg or auto.
    pub accel: Option<String>,
    /// Seconds a graceful VM stop waits before forcing.
    pub vm_stop_timeout: Option<u64>,
    /// Seconds an API token from `POST /api/v1/tokens` stays valid.
    pub token_ttl: Option<u64>,
    /// Data-plane access: `key` or `none` (see [`crate::access`]).
    pub export_auth: Option<String>,
}

impl FileConfig {
    /// Read a config file.
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config file {} is not valid", path.display()))
    }
}

/// Resolved settings.
#[derive(Debug)]
pub struct Settings {
    /// Data directory.
    pub data: PathBuf,
    /// Addresses.
    pub addrs: Addrs,
    /// Size of a new pool file.
    pub pool_size: u64,
    /// I/O engine.
    pub engine: Engine,
    /// Map page cache bytes.
    pub cache: u64,
    /// Data block cache bytes.
    pub data_cache: u64,
    /// Write-back bytes (capped by the store at a quarter of the cache).
    pub write_back: u64,
    /// Period of the background commits of unflushed writes; `None`: none.
    pub commit_interval: Option<std::time::Duration>,
    /// NBD TLS (cert, key).
    pub nbd_tls: Option<(PathBuf, PathBuf)>,
    /// Refuse NBD clients without TLS.
    pub nbd_require_tls: bool,
    /// HTTPS for the API (cert, key); plain HTTP when `None`.
    pub api_tls: Option<(PathBuf, PathBuf)>,
    /// How VMs run.
    pub vms: crate::vms::VmSettings,
    /// Seconds an API token stays valid.
    pub token_ttl: u64,
    /// Whether NBD and iSCSI clients need the volume's access key.
    pub export_keys: bool,
}

/// Parse an engine name.
pub fn parse_engine(s: &str) -> Result<Engine, String> {
    match s {
        "auto" => Ok(Engine::Auto),
        "uring" | "io_uring" => Ok(Engine::Uring),
        "sync" => Ok(Engine::Sync),
        _ => Err(format!("unknown engine {s:?}: use auto, uring or sync")),
    }
}

/// The pool file in a data directory.
pub fn pool_path(data: &Path) -> PathBuf {
    data.join("pool.img")
}

/// The first Manager's credentials file in a data directory.
pub fn credentials_path(data: &Path) -> PathBuf {
    data.join("credentials")
}

/// Open (or create) the default pool.
pub async fn open_pool(data: &Path, size: u64, engine: Engine, opts: PoolOptions) -> Result<Pool<AnyBackend>> {
    if !data.exists() {
        // The data directory holds the credentials and the metadata: only
        // its owner gets in.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data)
            .with_context(|| format!("creating data directory {}", data.display()))?;
    }
    // Also when it existed: the pool, the metadata (CHAP secrets) and the
    // credentials are for the owner alone, whatever the umask.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {} to its owner", data.display()))?;
    }
    let path = pool_path(data);
    let fresh = !path.exists();
    if fresh {
        // Create under a temporary name and rename once formatted, so a
        // crash while formatting leaves no half-made pool behind.
        let tmp = data.join("pool.img.new");
        let f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.set_len(size).with_context(|| format!("sizing {}", tmp.display()))?;
        drop(f);
        let backend = AnyBackend::open(&tmp, engine).with_context(|| format!("opening {}", tmp.display()))?;
        let engine_name = backend.engine_name();
        let pool = Pool::create(backend, opts.clone()).await?;
        pool.close().await?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        sync_dir(data).with_context(|| format!("syncing {}", data.display()))?;
        println!("created pool {} ({}, engine {engine_name})", path.display(), human(size));
    }
    let backend = AnyBackend::open(&path, engine).with_context(|| format!("opening {}", path.display()))?;
    let engine_name = backend.engine_name();
    let (pool, report) = Pool::open(backend, opts).await?;
    if !fresh {
        println!("opened pool {} at generation {} (engine {engine_name})", path.display(), report.generation);
    }
    if let Some(why) = report.superblock_fallback {
        println!("recovered: the newest superblock copy was unusable ({why}); opened the previous commit");
    }
    Ok(pool)
}

/// Make the first Manager when there is none: `admin` with a random
/// password and a token, written to `DATA/credentials` (mode 0600) before
/// the database, so a crash in between leaves a file, never a manager
/// nobody knows the password of.
fn first_manager(meta: &Meta, data: &Path, api: &str) -> Result<Option<PathBuf>> {
    let users: Vec<(String, User)> = meta.list(USERS)?;
    if users.iter().any(|(_, u)| u.role == Role::Manager) {
        return Ok(None);
    }
    let (password, token) = (auth::new_password(), auth::new_token());
    let path = credentials_path(data);
    let text = format!(
        "# The first Keel manager, made at the first start (unix time {}).\n# The CLI reads `token` from this file when KEEL_TOKEN is not set.\nuser = \"admin\"\npassword = \"{password}\"\ntoken = \"{token}\"\napi = \"{api}\"\n",
        now()
    );
    write_owner_only(&path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    let admin = User {
        name: "admin".into(),
        role: Role::Manager,
        parent: None,
        quota: None,
        password_hash: auth::hash_password(&password),
        created: now(),
    };
    meta.write(|w| {
        w.put(USERS, "admin", &admin)?;
        w.put(TOKENS, &auth::token_key(&token), &Token { user: "admin".into(), created: now(), expires: None })?;
        Ok::<_, crate::db::Error>(())
    })?;
    Ok(Some(path))
}

/// Bring the ISO store in step with its records after a crash: remove
/// unfinished uploads and `.iso` files whose upload was never recorded
/// (the client never got a success), and drop records whose file is gone
/// (a delete removes the file first).
fn reconcile_isos(meta: &Meta, data: &Path) -> Result<Vec<String>> {
    let mut said = Vec::new();
    let dir = data.join("isos");
    let records: Vec<(String, IsoMeta)> = meta.list(ISOS)?;
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let unfinished = name.starts_with('.') && name.contains(".upload-");
            let unrecorded = name
                .strip_suffix(".iso")
                .is_some_and(|stem| !name.starts_with('.') && !records.iter().any(|(k, _)| k == stem));
            if (unfinished || unrecorded) && std::fs::remove_file(e.path()).is_ok() {
                said.push(format!("removed {name} from the ISO store: its upload never completed"));
            }
        }
    }
    for (name, _) in records {
        if !dir.join(format!("{name}.iso")).exists() {
            meta.write(|w| w.remove(ISOS, &name))?;
            said.push(format!("dropped the record of ISO {name}: its file is gone"));
        }
    }
    Ok(said)
}

/// Make `path` hold `bytes`, readable by its owner only, all or nothing
/// across a crash: written to `PATH.new` (mode 0600) and synced, renamed,
/// and the directory synced.
pub(crate) fn write_owner_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Make the renames and creations in directory `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Bind the daemon's private NBD socket (for its own QEMU and qemu-img),
/// owner-only: a stale socket from an earlier run is replaced; VMs still
/// running reconnect to the new one.
fn bind_private_socket(path: &Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the stale socket {}", path.display())),
    }
    let l = tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(l)
}

/// The data cache when none is configured: an eighth of the memory this
/// process may use: the machine's (`MemTotal` in `/proc/meminfo`), or its
/// cgroup's limit (`memory.max`) when that is lower; none when neither can
/// be read.
pub fn default_data_cache() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    // cgroup v2: "max" (no limit) does not parse and leaves the total.
    let limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    total.min(limit) / 8
}

/// The default pool's record (it has none in the metadata).
pub fn default_record(data: &Path) -> crate::pools::PoolRecord {
    let path = std::path::absolute(pool_path(data)).unwrap_or_else(|_| pool_path(data));
    crate::pools::PoolRecord {
        name: crate::pools::DEFAULT_POOL.into(),
        source: crate::pools::PoolSource::File { path },
        tier: None,
        created: 0,
        made_file: false,
    }
}

/// Every pool of the node: the default one (open already) and those in the
/// metadata, each open or, when it cannot be opened, offline with the
/// reason.
async fn open_pools(s: &Settings, default: Pool<AnyBackend>, meta: &Meta, opts: PoolOptions) -> Result<Arc<Pools>> {
    let slot = Slot::online(default_record(&s.data), default, pool_path(&s.data), None, s.commit_interval);
    let pools = Arc::new(Pools::new(slot, s.engine, opts.clone(), s.commit_interval));
    for (_, rec) in meta.list::<PoolRecord>(crate::db::POOLS)? {
        match crate::pools::open_record(&rec, s.engine, opts.clone()).await {
            Ok((p, path, hold)) => {
                println!("opened pool {} on {}", rec.name, path.display());
                pools.put(Slot::online(rec, p, path, Some(hold), s.commit_interval));
            }
            Err(why) => {
                println!("pool {} is offline: {why}", rec.name);
                tracing::warn!("pool {} is offline: {why}", rec.name);
                let path = match &rec.source {
                    crate::pools::PoolSource::File { path } | crate::pools::PoolSource::Device { path } => path.clone(),
                    crate::pools::PoolSource::Lvm { vg, lv } => PathBuf::from(format!("/dev/{vg}/{lv}")),
                };
                pools.put(Slot::offline(rec, path, why));
            }
        }
    }
    Ok(pools)
}

/// Run the appliance until SIGINT or SIGTERM.
pub async fn serve(s: Settings) -> Result<()> {
    let opts = PoolOptions {
        cache_bytes: s.cache as usize,
        data_cache_bytes: s.data_cache as usize,
        write_back_bytes: s.write_back as usize,
        ..Default::default()
    };
    let pool = open_pool(&s.data, s.pool_size, s.engine, opts.clone()).await?;
    let wb = pool.write_back_bytes();
    match pool.stats().data_cache.capacity_bytes {
        0 if s.data_cache > 0 => {
            println!("data cache off: {} is less than a block or could not be mapped", human(s.data_cache))
        }
        0 => println!("data cache off"),
        n if wb > 0 => println!("data cache {}, write-back up to {}", human(n), human(wb)),
        n => println!("data cache {}, write-back off", human(n)),
    }
    let (meta, found) = Meta::open(&s.data.join("keel.redb")).context("opening the metadata database")?;
    if found < crate::db::SCHEMA_VERSION {
        println!("metadata: schema migrated from version {found} to {}", crate::db::SCHEMA_VERSION);
    }
    let scheme = if s.api_tls.is_some() { "https" } else { "http" };
    let made = first_manager(&meta, &s.data, &format!("{scheme}://{}", s.addrs.api))?;
    let pools = open_pools(&s, pool, &meta, opts).await?;
    let mut said = reconcile::reconcile(&pools, &meta).await.context("reconciling metadata with the block store")?;
    said.extend(reconcile_isos(&meta, &s.data)?);
    if said.is_empty() {
        println!("reconciled: metadata and the block store agree");
    }
    for line in &said {
        println!("reconciled: {line}");
        tracing::info!(target: "keel::reconcile", "{line}");
    }
    match s.commit_interval {
        Some(period) => {
            println!("unflushed writes committed every {:.3} s", period.as_secs_f64());
        }
        None => println!("background commits off: unflushed writes wait for a flush"),
    }

    // Scratch space of OVA imports and exports an earlier run left.
    let _ = std::fs::remove_dir_all(s.data.join("tmp"));
    let access = crate::access::AccessKeys::load(&s.data, s.export_keys).context("loading the access key secret")?;
    let mut app =
        App::new(pools.clone(), meta, s.addrs, s.data.clone(), access).context("opening the appliance library")?;
    app.vms = crate::vms::VmRuntime::new(s.vms.clone());
    app.token_ttl = s.token_ttl;
    for line in app.resume_jobs().context("reading the job records")? {
        println!("reconciled: {line}");
        said.push(line);
    }
    match app.salt_legacy_volumes().context("giving old volumes access keys")? {
        0 => {}
        n => {
            let line = format!("gave {n} volume(s) from before access keys a key of their own (their URLs changed)");
            println!("reconciled: {line}");
            said.push(line);
        }
    }
    let app = Arc::new(app);
    for line in &said {
        app.log_event("keel", "reconcile", "", line);
    }

    let api_tls = match &s.api_tls {
        Some((c, k)) => Some(keel_nbd_server::tls::acceptor_from_pem(c, k).context("the API's TLS certificate")?),
        None => None,
    };
    if api_tls.is_none() && !s.addrs.api.ip().is_loopback() {
        tracing::warn!(
            "the HTTP API listens on {} without TLS: passwords and tokens cross the network in the clear; give it \
             --api-tls-cert and --api-tls-key",
            s.addrs.api
        );
    }
    let tls = match &s.nbd_tls {
        Some((c, k)) => Some(keel_nbd_server::tls::acceptor_from_pem(c, k)?),
        None => None,
    };
    let config = keel_nbd_server::ServerConfig { tls, require_tls: s.nbd_require_tls, ..Default::default() };
    let nbd_listener = tokio::net::TcpListener::bind(s.addrs.nbd)
        .await
        .with_context(|| format!("binding the NBD server to {}", s.addrs.nbd))?;
    let api_listener = tokio::net::TcpListener::bind(s.addrs.api)
        .await
        .with_context(|| format!("binding the HTTP API to {}", s.addrs.api))?;
    let iscsi_listener = tokio::net::TcpListener::bind(s.addrs.iscsi)
        .await
        .with_context(|| format!("binding the iSCSI target to {}", s.addrs.iscsi))?;
    let exports = Arc::new(crate::access::AppExports::new(app.clone()));
    let nbd = tokio::spawn(keel_nbd_server::serve(nbd_listener, exports, Arc::new(config)));
    let private = bind_private_socket(&app.nbd_socket)?;
    let private_config = Arc::new(keel_nbd_server::ServerConfig::default());
    let nbd_private = tokio::spawn(keel_nbd_server::serve_unix(private, app.nbd.clone(), private_config));
    let targets = Arc::new(crate::iscsi::AppTargets::new(app.clone()));
    let iscsi_server = keel_iscsi_target::Server::new(targets, keel_iscsi_target::ServerConfig::default());
    let iscsi = tokio::spawn(iscsi_server.serve(iscsi_listener));
    // VMs that ran while keel was down: adopt their QEMUs or record them
    // crashed. QEMU's NBD client reconnects to the server started above.
    for line in app.adopt_vms().await.map_err(|e| anyhow::anyhow!("{e}"))? {
        println!("vms: {line}");
        tracing::info!(target: "keel::vm", "{line}");
        app.log_event("keel", "vm.adopt", "", &line);
    }
    for line in app.drop_stray_snapshots().await.map_err(|e| anyhow::anyhow!("{e}"))? {
        println!("reconciled: {line}");
        tracing::info!(target: "keel::reconcile", "{line}");
        app.log_event("keel", "reconcile", "", &line);
    }
    app.spawn_metering();
    app.spawn_pool_watch(std::time::Duration::from_secs(5));
    {
        // Probe the accelerator now, not at the first VM start.
        let app = app.clone();
        tokio::spawn(async move { app.accel().await });
    }
    let router = crate::api::router(app.clone());
    let api = tokio::spawn(crate::http::serve(api_listener, router, api_tls));

    for slot in pools.slots() {
        match &slot.pool {
            Some(p) => {
                let st = p.stats();
                println!(
                    "pool {}: {} total, {} allocated, {} free, {} provisioned in {} device(s)",
                    slot.name(),
                    human(st.total_bytes),
                    human(st.allocated_bytes),
                    human(st.free_bytes),
                    human(st.provisioned_bytes),
                    st.devices
                );
            }
            None => println!("pool {}: offline: {}", slot.name(), slot.offline.as_deref().unwrap_or("")),
        }
    }
    println!("HTTP API on {scheme}://{}/api/v1 (OpenAPI at /api/v1/openapi.json, metrics at /metrics)", s.addrs.api);
    println!("web UI on {scheme}://{}/ (log in with a user's name and password)", s.addrs.api);
    let keyed = if s.export_keys { " (export names carry the volume's access key: see its nbd_url)" } else { "" };
    let tls = if s.nbd_require_tls { " (TLS required)" } else { "" };
    println!("NBD on nbd://{}/VOLUME{tls}{keyed}", s.addrs.nbd);
    let chap = if s.export_keys { " (CHAP with the volume's access key unless set: see its iscsi_url)" } else { "" };
    println!("iSCSI on iscsi://{}/{}VOLUME/0{chap}", s.addrs.iscsi, crate::model::IQN_PREFIX);
    println!("VMs: QEMU {}, accelerator {}", s.vms.qemu, s.vms.accel);
    match made {
        Some(p) => println!("first start: manager credentials written to {}", p.display()),
        None => println!("manager credentials of the first start: {}", credentials_path(&s.data).display()),
    }
    println!("keel is up; Ctrl-C or SIGTERM stops it");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        r = api => { r?.context("the HTTP API stopped")?; }
    }
    // Let a catalog change in flight finish (an interrupted one would be
    // reconciled at the next start anyway), then commit and stop. VMs keep
    // running; the next start adopts them.
    let quiet = app.quiesce().await;
    app.meter_all();
    nbd.abort();
    nbd_private.abort();
    iscsi.abort();
    pools.close().await?;
    drop(quiet);
    println!("pool committed; bye");
    Ok(())
}
