//! The appliance's operations on pools (create, list, show, grow, remove)
//! and the move of a volume, with its snapshots, from one pool to another
//! while it is in use.
//!
//! A move copies what the store's change tracking says, never a whole
//! device: the oldest snapshot's allocated blocks, then each next
//! snapshot's differences from the one before (each snapshot re-made in
//! the target, so the blocks the chain shares stay shared there), then the
//! live volume in passes against temporary snapshots until what is left is
//! small. At the switch the volume's NBD connections are asked to end and
//! new ones are held in the handshake; the last differences are copied; the
//! volume's record names the new pool; held connections go on against the
//! copy. QEMU's NBD client (Keel's VMs use `reconnect-delay`) reconnects and
//! resends what was unanswered, so the guest sees a short pause, no error.
//! An `Intent::Move` record lets a restart finish or undo a move cut short
//! (see [`crate::reconcile`]).

use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keel_blockstore::{AnyBackend, DeviceKind, Pool, Volume};
use serde::Serialize;

use crate::app::{App, VolumeView, event, forbid_regular};
use crate::db::{INTENTS, POOLS, VOLUMES};
use crate::error::{ApiError, ApiResult};
use crate::model::{Intent, Role, User, VolumeMeta, now};
use crate::pools::{Content, DEFAULT_POOL, PoolRecord, PoolSource, Slot};

/// Smallest pool Keel makes (a file or an LV).
pub const MIN_POOL_BYTES: u64 = 16 << 20;
/// Largest pool (the store addresses 2^32 blocks).
pub const MAX_POOL_BYTES: u64 = 16 << 40;

/// A pool as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PoolView {
    /// Name.
    pub name: String,
    /// `file`, `device` or `lvm`.
    pub kind: &'static str,
    /// Tier label.
    pub tier: Option<String>,
    /// `online` or `offline`.
    pub state: &'static str,
    /// Why it is offline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Bytes of its data area.
    pub total_bytes: u64,
    /// Bytes in use.
    pub allocated_bytes: u64,
    /// Free bytes.
    pub free_bytes: u64,
    /// Sum of its volumes' sizes.
    pub provisioned_bytes: u64,
    /// Volumes and snapshots.
    pub devices: usize,
    /// Volumes.
    pub volumes: usize,
    /// The file or device it is on (managers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The volume group of an LVM pool (managers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vg: Option<String>,
    /// The logical volume of an LVM pool (managers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lv: Option<String>,
}

/// Request to make a pool: exactly one of `file`, `device`, `lvm`.
#[derive(Debug, Default)]
pub struct CreatePool {
    /// Name.
    pub name: String,
    /// A file to make (or an empty file, or a Keel pool file, to take).
    pub file: Option<String>,
    /// A block device to take.
    pub device: Option<String>,
    /// A volume group to make a logical volume in.
    pub lvm: Option<String>,
    /// Size (a new file or LV).
    pub size: Option<u64>,
    /// Tier label.
    pub tier: Option<String>,
    /// Take a device or file that holds something else.
    pub force: bool,
}

fn only_managers(actor: &User, what: &str) -> ApiResult<()> {
    if actor.role != Role::Manager {
        return Err(ApiError::forbidden(format!("only a manager may {what}")));
    }
    Ok(())
}

fn check_tier(t: &str) -> Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 32
        && t.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !t.starts_with('-');
    if ok { Ok(()) } else { Err(format!("tier {t:?}: 1 to 32 characters of a-z, 0-9 and '-'")) }
}

fn check_vg(vg: &str) -> Result<(), String> {
    let ok = !vg.is_empty()
        && vg.len() <= 127
        && vg.bytes().all(|c| c.is_ascii_alphanumeric() || b"+_.-".contains(&c))
        && !vg.starts_with('-')
        && vg != "."
        && vg != "..";
    if ok { Ok(()) } else { Err(format!("volume group {vg:?}: letters, digits and + _ . - only")) }
}

fn check_path(p: &str, what: &str) -> ApiResult<PathBuf> {
    if !p.starts_with('/') || p.chars().any(|c| c.is_control()) || p.split('/').any(|c| c == "..") {
        return Err(ApiError::bad(format!("{what} must be an absolute path without '..' or control characters")));
    }
    Ok(PathBuf::from(p))
}

fn check_pool_size(size: u64) -> ApiResult<()> {
    if !(MIN_POOL_BYTES..=MAX_POOL_BYTES).contains(&size) || !size.is_multiple_of(4096) {
        return Err(ApiError::bad(format!(
            "size {size}: a pool is a multiple of 4096 bytes from {MIN_POOL_BYTES} (16 MiB) to {MAX_POOL_BYTES} (16 TiB)"
        )));
    }
    Ok(())
}

/// Format `path` (held already) as a pool, or open the Keel pool it holds.
async fn format_or_adopt(
    path: &Path,
    app: &App,
    content: &Content,
) -> Result<(Pool<AnyBackend>, bool), keel_blockstore::Error> {
    let backend = AnyBackend::open(path, app.pools.engine)
        .map_err(|e| keel_blockstore::Error::Io { op: "opening the pool's device", source: e })?;
    if *content == Content::KeelPool {
        let (p, _) = Pool::open(backend, app.pools.opts.clone()).await?;
        Ok((p, true))
    } else {
        Ok((Pool::create(backend, app.pools.opts.clone()).await?, false))
    }
}

impl App {
    /// A pool's view: `actor` sees host paths only as a manager.
    fn pool_view_of(&self, actor: &User, s: &Slot) -> PoolView {
        let st = s.pool.as_ref().map(|p| p.stats());
        let volumes = s.pool.as_ref().map_or(0, |p| p.list().iter().filter(|d| d.kind == DeviceKind::Volume).count());
        let manager = actor.role == Role::Manager;
        let (vg, lv) = match &s.record.source {
            PoolSource::Lvm { vg, lv } if manager => (Some(vg.clone()), Some(lv.clone())),
            _ => (None, None),
        };
        PoolView {
            name: s.name().to_string(),
            kind: s.record.source.kind(),
            tier: s.record.tier.clone(),
            state: if s.pool.is_some() { "online" } else { "offline" },
            reason: s.offline.as_ref().map(|r| if manager { r.clone() } else { crate::error::redact_paths(r) }),
            total_bytes: st.as_ref().map_or(0, |s| s.total_bytes),
            allocated_bytes: st.as_ref().map_or(0, |s| s.allocated_bytes),
            free_bytes: st.as_ref().map_or(0, |s| s.free_bytes),
            provisioned_bytes: st.as_ref().map_or(0, |s| s.provisioned_bytes),
            devices: st.as_ref().map_or(0, |s| s.devices),
            volumes,
            // The default pool's file is in the data directory, which the
            // API never names.
            path: (manager && s.name() != DEFAULT_POOL).then(|| s.path.display().to_string()),
            vg,
            lv,
        }
    }

    /// Every pool (managers and power users).
    pub fn list_pools(&self, actor: &User) -> ApiResult<Vec<PoolView>> {
        forbid_regular(actor, "see pools")?;
        Ok(self.pools.slots().iter().map(|s| self.pool_view_of(actor, s)).collect())
    }

    /// One pool.
    pub fn show_pool(&self, actor: &User, name: &str) -> ApiResult<PoolView> {
        forbid_regular(actor, "see pools")?;
        let s = self.pools.slot(name).ok_or_else(|| pool_not_found(name))?;
        Ok(self.pool_view_of(actor, &s))
    }

    /// Pool `name` if it can take volumes now: 404 when unknown, 503 when
    /// offline.
    pub(crate) fn usable_pool(&self, name: &str) -> ApiResult<Pool<AnyBackend>> {
        let s = self.pools.slot(name).ok_or_else(|| pool_not_found(name))?;
        s.pool.clone().ok_or_else(|| {
            let why = crate::error::redact_paths(s.offline.as_deref().unwrap_or("not open"));
            ApiError::unavailable(format!("pool {name} is offline: {why}"))
        })
    }

    /// 503 when volume `m`'s pool is offline.
    pub(crate) fn volume_online(&self, m: &VolumeMeta) -> ApiResult<()> {
        if self.pools.holder(&m.name).is_some() {
            return Ok(());
        }
        match self.pools.slot(m.pool()) {
            Some(s) if s.pool.is_none() => Err(ApiError::unavailable(format!(
                "volume {} is unavailable: its pool {} is offline: {}",
                m.name,
                m.pool(),
                crate::error::redact_paths(s.offline.as_deref().unwrap_or("not open"))
            ))),
            None => Err(ApiError::unavailable(format!(
                "volume {} is unavailable: its pool {} is not configured on this node",
                m.name,
                m.pool()
            ))),
            Some(_) => Ok(()),
        }
    }

    /// 409 while volume `name` is being moved.
    pub(crate) fn not_moving(&self, name: &str) -> ApiResult<()> {
        if self.moving.lock().contains(name) {
            return Err(ApiError::conflict(format!(
                "volume {name} is being moved to another pool: try again when the move is over (`keel job list`)"
            )));
        }
        Ok(())
    }

    /// Make a pool (managers only).
    pub async fn create_pool(&self, actor: &User, req: CreatePool) -> ApiResult<PoolView> {
        only_managers(actor, "add pools")?;
        crate::names::check_pool(&req.name).map_err(ApiError::bad)?;
        if let Some(t) = &req.tier {
            check_tier(t).map_err(ApiError::bad)?;
        }
        let given = [req.file.is_some(), req.device.is_some(), req.lvm.is_some()].iter().filter(|&&b| b).count();
        if given != 1 {
            return Err(ApiError::bad("give exactly one of file, device or lvm: what the pool lives on"));
        }
        if let Some(size) = req.size {
            check_pool_size(size)?;
        }
        let _g = self.ops.lock().await;
        if self.pools.slot(&req.name).is_some() {
            return Err(ApiError::conflict(format!("pool {} already exists", req.name)));
        }
        let (source, path, hold, content, made_file) = if let Some(f) = &req.file {
            let path = check_path(f, "file")?;
            self.pool_path_free(&path)?;
            let made = !path.exists();
            if made {
                let size = req.size.ok_or_else(|| ApiError::bad("a new pool file needs a size"))?;
                let parent = path.parent().unwrap_or(Path::new("/"));
                if !parent.is_dir() {
                    return Err(ApiError::bad(format!("{} is not a directory", parent.display())));
                }
                room_for(&path, size)?;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| ApiError::conflict(format!("creating {}: {e}", path.display())))?;
                if let Err(e) = f.set_len(size) {
                    let _ = std::fs::remove_file(&path);
                    return Err(ApiError::no_space(format!("sizing {} to {size} bytes: {e}", path.display())));
                }
            } else if !std::fs::metadata(&path).map(|m| m.is_file()).unwrap_or(false) {
                return Err(ApiError::bad(format!(
                    "{} exists and is not a regular file (a block device is given with `device`)",
                    path.display()
                )));
            }
            let undo = |e: ApiError| {
                if made {
                    let _ = std::fs::remove_file(&path);
                }
                e
            };
            let hold = crate::pools::lock_file(&path).map_err(ApiError::conflict).map_err(undo)?;
            if !made && let Some(size) = req.size {
                let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                if size > len
                    && let Err(e) = std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(size))
                {
                    return Err(ApiError::no_space(format!("sizing {}: {e}", path.display())));
                }
            }
            let content = crate::pools::probe(&path).map_err(|e| undo(ApiError::conflict(e.to_string())))?;
            (PoolSource::File { path: path.clone() }, path, hold, content, made)
        } else if let Some(d) = &req.device {
            let path = check_path(d, "device")?;
            if req.size.is_some() {
                return Err(ApiError::bad("a device pool is as large as its device: give no size"));
            }
            self.pool_path_free(&path)?;
            let hold = crate::pools::claim_device(&path).map_err(ApiError::conflict)?;
            let content = crate::pools::probe(&path).map_err(|e| ApiError::conflict(e.to_string()))?;
            (PoolSource::Device { path: path.clone() }, path, hold, content, false)
        } else {
            let vg = req.lvm.clone().unwrap_or_default();
            check_vg(&vg).map_err(ApiError::bad)?;
            let size = req.size.ok_or_else(|| ApiError::bad("an LVM pool needs a size (the logical volume's)"))?;
            let lv = format!("keel-{}", req.name);
            let made = crate::pools::lvm(&[
                "lvcreate",
                "--yes",
                "--wipesignatures",
                "y",
                "--zero",
                "y",
                "-L",
                &format!("{size}b"),
                "-n",
                &lv,
                &vg,
            ])
            .await;
            made.map_err(ApiError::conflict)?;
            let undo = |e: ApiError| {
                let target = format!("{vg}/{lv}");
                let _ = std::process::Command::new("lvremove").args(["-y", &target]).output();
                e
            };
            let path = crate::pools::lv_path(&vg, &lv).await.map_err(ApiError::conflict).map_err(undo)?;
            let hold = crate::pools::claim_device(&path).map_err(ApiError::conflict).map_err(undo)?;
            // lvcreate wiped the start: what is left further on is never
            // read (the store reads only blocks it wrote).
            (PoolSource::Lvm { vg, lv }, path, hold, Content::Empty, false)
        };
        let cleanup = |e: ApiError| -> ApiError {
            match &source {
                PoolSource::File { path } if made_file => {
                    let _ = std::fs::remove_file(path);
                }
                PoolSource::Lvm { vg, lv } => {
                    let _ = std::process::Command::new("lvremove").args(["-y", &format!("{vg}/{lv}")]).output();
                }
                _ => {}
            }
            e
        };
        if let Content::Other(what) = &content
            && !req.force
        {
            return Err(cleanup(ApiError::conflict(format!(
                "{} holds {what}: Keel takes only an empty device or file, or a Keel pool; give force to overwrite it",
                path.display()
            ))));
        }
        let (pool, adopted) = format_or_adopt(&path, self, &content).await.map_err(|e| cleanup(e.into()))?;
        // An adopted pool's volumes join the node's namespace: no clashes.
        let theirs: Vec<String> =
            pool.list().into_iter().filter(|d| d.kind == DeviceKind::Volume).map(|d| d.name).collect();
        if let Some(clash) = theirs.iter().find(|n| self.pools.holder(n).is_some()) {
            let _ = pool.close().await;
            return Err(ApiError::conflict(format!(
                "the Keel pool on {} holds volume {clash}, a name this node already uses: rename or remove one first",
                path.display()
            )));
        }
        let record = PoolRecord {
            name: req.name.clone(),
            source: source.clone(),
            tier: req.tier.clone(),
            created: now(),
            made_file,
        };
        let adopt: Vec<VolumeMeta> = theirs
            .iter()
            .filter(|n| !n.starts_with('_'))
            .map(|n| VolumeMeta {
                name: n.clone(),
                owner: actor.name.clone(),
                created: now(),
                origin: None,
                iscsi: Default::default(),
                key_salt: crate::model::new_key_salt(),
                pool: Some(req.name.clone()),
            })
            .collect();
        let detail = match (adopted, &record.source) {
            (true, _) => format!("took the Keel pool on {} with {} volume(s)", path.display(), adopt.len()),
            (false, PoolSource::Lvm { vg, lv }) => format!("made logical volume {vg}/{lv}"),
            (false, _) => format!("formatted {}", path.display()),
        };
        let r = self.meta.write(|w| {
            w.put(POOLS, &req.name, &record)?;
            for m in &adopt {
                w.put(VOLUMES, &m.name, m)?;
            }
            w.event(&event(&actor.name, "pool.create", &req.name, &detail))?;
            Ok::<_, crate::db::Error>(())
        });
        if let Err(e) = r {
            let _ = pool.close().await;
            return Err(cleanup(e.into()));
        }
        self.pools.put(Slot::online(record, pool, path, Some(hold), self.pools.commit));
        self.show_pool(actor, &req.name)
    }

    /// 409 when `path` is already a pool's.
    fn pool_path_free(&self, path: &Path) -> ApiResult<()> {
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let want = canon(path);
        for s in self.pools.slots() {
            if canon(&s.path) == want {
                return Err(ApiError::conflict(format!("{} is already pool {}", path.display(), s.name())));
            }
        }
        Ok(())
    }

    /// Grow a pool online: a file to `size`, an LVM pool's logical volume
    /// to `size` (`lvextend`); then the pool takes whatever its file or
    /// device now has (a device, or a file or LV grown underneath, with no
    /// size given). Shrinking is refused.
    pub async fn grow_pool(&self, actor: &User, name: &str, size: Option<u64>) -> ApiResult<PoolView> {
        only_managers(actor, "grow pools")?;
        // Whole blocks (LVM rounds up to its extents anyway); smaller than
        // the pool is the shrink refused below.
        let size = size.map(|s| s.div_ceil(4096) * 4096);
        if let Some(size) = size
            && size > MAX_POOL_BYTES
        {
            return Err(ApiError::bad(format!("size {size}: a pool is at most {MAX_POOL_BYTES} bytes (16 TiB)")));
        }
        let _g = self.ops.lock().await;
        let slot = self.pools.slot(name).ok_or_else(|| pool_not_found(name))?;
        let pool = self.usable_pool(name)?;
        let before = pool.stats().total_bytes;
        let current = device_len(&slot.path).map_err(|e| ApiError::internal("sizing the pool's device", e))?;
        if let Some(size) = size
            && size < current
        {
            return Err(ApiError::conflict(format!(
                "pool {name} is {current} bytes: shrinking it to {size} is refused (it would cut volumes' data)"
            )));
        }
        match (&slot.record.source, size) {
            (PoolSource::File { path }, Some(size)) if size > current => {
                room_for(path, size - current)?;
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(size))
                    .map_err(|e| ApiError::no_space(format!("growing the pool file to {size} bytes: {e}")))?;
            }
            (PoolSource::Device { .. }, Some(_)) => {
                return Err(ApiError::bad(
                    "a device pool grows with its device: grow the device, then grow the pool with no size",
                ));
            }
            (PoolSource::Lvm { vg, lv }, Some(size)) if size > current => {
                crate::pools::lvm(&["lvextend", "-L", &format!("{size}b"), &format!("{vg}/{lv}")])
                    .await
                    .map_err(ApiError::conflict)?;
            }
            _ => {}
        }
        pool.grow().await?;
        let after = pool.stats().total_bytes;
        self.meta.write(|w| {
            w.event(&event(&actor.name, "pool.grow", name, &format!("{before} -> {after} bytes of data area")))
        })?;
        self.show_pool(actor, name)
    }

    /// Watch every pool's file or device: one that grew underneath (a
    /// disk resized by the hypervisor or SAN, an `lvextend` by hand, a
    /// longer file) is grown online, every `period`.
    pub fn spawn_pool_watch(self: &std::sync::Arc<Self>, period: Duration) {
        let app = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            let mut seen: std::collections::HashMap<String, u64> = Default::default();
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(app) = app.upgrade() else { return };
                for s in app.pools.slots() {
                    let Some(pool) = s.pool.clone() else { continue };
                    let Ok(len) = device_len(&s.path) else { continue };
                    // First sight of a pool: grow it anyway (a no-op unless
                    // its device grew since it was opened).
                    let was = seen.get(s.name()).copied();
                    if was.is_some_and(|w| len <= w) {
                        continue;
                    }
                    let was = was.unwrap_or(0);
                    seen.insert(s.name().to_string(), len);
                    let _g = app.ops.lock().await;
                    let before = pool.stats().total_bytes;
                    match pool.grow().await {
                        Ok(r) => {
                            tracing::debug!("pool {}: watched growth: {r:?}", s.name());
                            let after = pool.stats().total_bytes;
                            if after > before {
                                let line =
                                    format!("{was} -> {len} bytes underneath: {before} -> {after} bytes of data area");
                                app.log_event("keel", "pool.grow", s.name(), &line);
                            }
                        }
                        Err(e) => tracing::warn!("pool {}: its device grew, growing the pool failed: {e}", s.name()),
                    }
                }
            }
        });
    }

    /// Remove a pool that holds no volumes: a file Keel made is deleted, an
    /// LV Keel made is removed (`lvremove`), a device is left as it is.
    /// `force` forgets an offline pool and the records of its volumes.
    pub async fn remove_pool(&self, actor: &User, name: &str, force: bool) -> ApiResult<()> {
        only_managers(actor, "remove pools")?;
        if name == DEFAULT_POOL {
            return Err(ApiError::conflict("the default pool cannot be removed"));
        }
        let _g = self.ops.lock().await;
        let offline = self.pools.slot(name).ok_or_else(|| pool_not_found(name))?.pool.is_none();
        let recorded: Vec<String> = self
            .meta
            .list::<VolumeMeta>(VOLUMES)?
            .into_iter()
            .filter(|(_, m)| m.pool() == name)
            .map(|(n, _)| n)
            .collect();
        let held: Vec<String> = self.pools.volumes_in(name).into_iter().map(|d| d.name).collect();
        if !held.is_empty() {
            return Err(ApiError::conflict(format!(
                "pool {name} holds volume(s) {}: move them to another pool (`keel volume move`) or delete them first",
                held.join(", ")
            )));
        }
        if !(recorded.is_empty() || force && offline) {
            return Err(ApiError::conflict(format!(
                "pool {name} is offline and holds volume(s) {}: bring it back, or remove it with force, which forgets \
                 them",
                recorded.join(", ")
            )));
        }
        let slot = self.pools.take(name).ok_or_else(|| pool_not_found(name))?;
        let record = slot.record.clone();
        if let Some(p) = slot.pool.clone()
            && let Err(e) = p.close().await
        {
            tracing::warn!("closing pool {name}: {e}");
        }
        // The last handles on the device go with the slot (its exclusive
        // hold, the pool, the committer, which its abort drops shortly).
        drop(slot);
        let mut detail = String::new();
        match &record.source {
            PoolSource::File { path } if record.made_file => {
                let _ = std::fs::remove_file(path);
                detail = "deleted its file".into();
            }
            PoolSource::Lvm { vg, lv } => {
                let target = format!("{vg}/{lv}");
                let mut tries = 0;
                detail = loop {
                    match crate::pools::lvm(&["lvremove", "-y", &target]).await {
                        Ok(_) => break format!("removed logical volume {target}"),
                        Err(e) if tries >= 50 => {
                            tracing::warn!("pool {name}: {e}");
                            break format!("left logical volume {target}: {e}");
                        }
                        Err(_) => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                };
            }
            _ => {}
        }
        self.meta.write(|w| {
            w.remove(POOLS, name)?;
            for v in &recorded {
                w.remove(VOLUMES, v)?;
            }
            w.event(&event(&actor.name, "pool.remove", name, &detail))?;
            Ok::<_, crate::db::Error>(())
        })?;
        Ok(())
    }

    /// Move volume `name`, with its snapshots, to pool `target`, online.
    pub async fn move_volume(&self, actor: &User, name: &str, target: &str) -> ApiResult<VolumeView> {
        let m = self.visible_volume(actor, name)?;
        crate::names::check_pool(target).map_err(ApiError::bad)?;
        self.volume_online(&m)?;
        let dst = self.usable_pool(target)?;
        let (from, src) =
            self.pools.holder(name).ok_or_else(|| ApiError::not_found(format!("volume {name} not found")))?;
        if from == target {
            return Err(ApiError::conflict(format!("volume {name} is in pool {target} already")));
        }
        {
            let _g = self.ops.lock().await;
            self.not_moving(name)?;
            let iscsi = self.sessions.on_volume(name);
            if iscsi > 0 {
                return Err(ApiError::conflict(format!(
                    "{name} has {iscsi} iSCSI session(s): log the initiators out first (NBD clients and VMs may stay \
                     connected: they reconnect)"
                )));
            }
            let need: u64 = src
                .list()
                .iter()
                .filter(|d| d.name == name || d.name.starts_with(&format!("{name}@")))
                .map(|d| d.allocated_bytes)
                .sum();
            let free = dst.stats().free_bytes;
            if need > free {
                return Err(ApiError::no_space(format!(
                    "pool {target} has {free} bytes free; {name} and its snapshots map up to {need}"
                )));
            }
            let intent = Intent::Move { name: name.into(), from: from.clone(), to: target.into() };
            self.meta.put(INTENTS, name, &intent)?;
            self.pools.set_home(name, Some(&from));
            self.moving.lock().insert(name.to_string());
        }
        let total: u64 = src
            .list()
            .iter()
            .filter(|d| d.name == name || d.name.starts_with(&format!("{name}@")))
            .map(|d| d.allocated_bytes)
            .sum();
        let job = self.start_job("volume.move", name, &actor.name, total);
        let r = self.move_copy(name, &src, &dst, &job).await;
        let r = match r {
            Ok(last) => {
                self.crash_point("move:copied");
                self.move_switch(actor, name, &from, target, &src, &dst, &last, &job).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &r {
            // Undo: the source stays the volume; the copy goes.
            self.nbd.inner().release(name);
            let _ = dst.delete_volume(name, true).await;
            for d in src.list() {
                if let Some(s) = d.name.strip_prefix(&format!("{name}@")).filter(|s| s.starts_with(TEMP_SNAP)) {
                    let _ = src.delete_snapshot(name, s).await;
                }
            }
            self.pools.set_home(name, None);
            let _ = self.meta.write(|w| w.remove(INTENTS, name));
            self.moving.lock().remove(name);
            job.finish(Some(e.to_string()));
            return Err(r.unwrap_err());
        }
        job.set_result(serde_json::json!({ "volume": name, "from": from, "to": target }));
        job.finish(None);
        self.show_volume(actor, name)
    }

    /// Copy the snapshots oldest first, then the live volume in passes;
    /// returns the last temporary snapshot of the source.
    async fn move_copy(
        &self,
        name: &str,
        src: &Pool<AnyBackend>,
        dst: &Pool<AnyBackend>,
        job: &crate::app::Job,
    ) -> ApiResult<String> {
        let prefix = format!("{name}@");
        let mut snaps: Vec<keel_blockstore::DeviceInfo> =
            src.list().into_iter().filter(|d| d.kind == DeviceKind::Snapshot && d.name.starts_with(&prefix)).collect();
        snaps.sort_by_key(|d| d.id);
        let first_size = snaps.first().map_or_else(|| src.volume(name).map(|v| v.size()).unwrap_or(0), |d| d.size);
        let out = dst.create_volume(name, first_size).await?;
        let mut prev: Option<String> = None;
        for s in &snaps {
            let snap = s.name.strip_prefix(&prefix).expect("prefix").to_string();
            copy_diff(src, prev.as_deref(), &s.name, &out, job).await?;
            dst.snapshot(name, &snap).await?;
            prev = Some(s.name.clone());
        }
        // The live volume: passes against temporary snapshots until little
        // is left for the switch.
        let mut last_temp: Option<String> = None;
        for pass in 0..6 {
            let temp = format!("{TEMP_SNAP}{pass}");
            src.snapshot(name, &temp).await?;
            let full = format!("{name}@{temp}");
            let copied = copy_diff(src, prev.as_deref(), &full, &out, job).await?;
            if let Some(t) = last_temp.take() {
                let _ = src.delete_snapshot(name, &t).await;
            }
            last_temp = Some(temp);
            prev = Some(full);
            if copied < 64 << 20 {
                break;
            }
        }
        Ok(last_temp.expect("one pass at least"))
    }

    /// Evict and hold the volume's connections, copy the last changes,
    /// make the copy the volume, let the connections go on, drop the source.
    #[allow(clippy::too_many_arguments)]
    async fn move_switch(
        &self,
        actor: &User,
        name: &str,
        from: &str,
        target: &str,
        src: &Pool<AnyBackend>,
        dst: &Pool<AnyBackend>,
        last: &str,
        job: &crate::app::Job,
    ) -> ApiResult<()> {
        let _g = self.ops.lock().await;
        let exports = self.nbd.inner();
        exports.hold(name);
        let started = Instant::now();
        loop {
            exports.evict(name);
            if self.volume_sessions(name) == 0 {
                break;
            }
            if started.elapsed() > Duration::from_secs(20) {
                return Err(ApiError::conflict(format!(
                    "{name}: {} NBD connection(s) did not close within 20 s; the volume stays in pool {from}",
                    self.volume_sessions(name)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.sessions.on_volume(name) > 0 {
            return Err(ApiError::conflict(format!(
                "{name}: an iSCSI initiator logged in during the move; it stays in pool {from}"
            )));
        }
        let out = dst.volume(name)?;
        let live = src.volume(name)?;
        if live.size() > out.size() {
            dst.resize(name, live.size(), false).await?;
        }
        let base = format!("{name}@{last}");
        copy_diff(src, Some(&base), name, &dst.volume(name)?, job).await?;
        dst.flush().await?;
        let mut m: VolumeMeta =
            self.meta.get(VOLUMES, name)?.ok_or_else(|| ApiError::not_found(format!("volume {name} not found")))?;
        m.pool = Some(target.to_string());
        self.meta.write(|w| {
            w.put(VOLUMES, name, &m)?;
            w.event(&event(&actor.name, "volume.move", name, &format!("pool {from} -> {target}")))?;
            Ok::<_, crate::db::Error>(())
        })?;
        self.crash_point("move:switched");
        self.pools.set_home(name, Some(target));
        exports.release(name);
        let waited = started.elapsed();
        tracing::info!(target: "keel::move", volume = name, "switched pools; connections held {:.3} s", waited.as_secs_f64());
        // From here on the copy is the volume: nothing undoes the move. The
        // source copy goes; if that fails (or the daemon dies first), the
        // intent stays and the next start drops it (the record names the
        // target), and until then the source copy stays hidden.
        let dropped = async {
            src.delete_volume(name, true).await?;
            src.flush().await
        };
        match dropped.await {
            Ok(()) => {
                self.pools.set_home(name, None);
                if let Err(e) = self.meta.write(|w| w.remove(INTENTS, name)) {
                    tracing::error!(target: "keel::move", volume = name, "dropping the move's intent: {e}");
                }
            }
            Err(e) => tracing::error!(
                target: "keel::move",
                volume = name,
                "moved to {target}, but dropping the copy in {from} failed ({e}); the next start drops it"
            ),
        }
        self.moving.lock().remove(name);
        Ok(())
    }
}

/// Temporary snapshots a move takes of its source: `keel-move-N`.
pub(crate) const TEMP_SNAP: &str = "keel-move-";

/// Copy into `out` what device `to` of `src` holds where it differs from
/// `from` (all its allocated data when `from` is `None`): data where `to`
/// maps blocks, holes where it has none. Returns bytes of data copied.
async fn copy_diff(
    src: &Pool<AnyBackend>,
    from: Option<&str>,
    to: &str,
    out: &Volume<AnyBackend>,
    job: &crate::app::Job,
) -> ApiResult<u64> {
    let dev = src.volume(to)?;
    let ranges: Vec<Range<u64>> = match from {
        Some(f) => src.changed_ranges(f, to).await?,
        None => std::iter::once(0..dev.size()).collect(),
    };
    let mut copied = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for r in ranges {
        let r = r.start..r.end.min(dev.size());
        if r.is_empty() {
            continue;
        }
        for e in dev.allocation(r.start, r.end - r.start).await? {
            if !e.allocated {
                if from.is_some() {
                    out.discard(e.offset, e.length).await?;
                }
                continue;
            }
            let mut off = e.offset;
            let end = e.offset + e.length;
            while off < end {
                let n = ((end - off) as usize).min(buf.len());
                dev.read(off, &mut buf[..n]).await?;
                out.write(off, &buf[..n], false).await?;
                off += n as u64;
                copied += n as u64;
                job.done.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
    Ok(copied)
}

/// 507 unless the file system holding `path` has `extra` bytes free: a
/// pool file is sparse, but a pool bigger than its file system would fail
/// its writes long before it looks full.
fn room_for(path: &Path, extra: u64) -> ApiResult<()> {
    use std::os::unix::ffi::OsStrExt;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| ApiError::bad("a path with a NUL"))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(ApiError::bad(format!("{}: {}", dir.display(), std::io::Error::last_os_error())));
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    if extra > free {
        return Err(ApiError::no_space(format!(
            "the pool file's file system has {free} bytes free, less than the {extra} the file would grow by"
        )));
    }
    Ok(())
}

/// Bytes of a file or block device now.
fn device_len(path: &Path) -> std::io::Result<u64> {
    let f = std::fs::File::open(path)?;
    let md = f.metadata()?;
    if md.is_file() {
        return Ok(md.len());
    }
    use std::io::Seek;
    let mut f = f;
    f.seek(std::io::SeekFrom::End(0))
}

fn pool_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("pool {name} not found: `keel pool list` shows this node's pools"))
}
