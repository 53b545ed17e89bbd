//! The node's storage groups: the default pool (`DATA/pool.img`, made at
//! the first start) and the pools an admin adds on a file, a block device
//! (a disk, a partition, a loop device) or an LVM logical volume that Keel
//! creates with lvm2's own commands.
//!
//! Volume names are one namespace across the pools (NBD export names and
//! iSCSI IQNs carry them), so a device is found by its name, whichever pool
//! holds it. The only time two pools hold the same name is a volume move
//! (see [`crate::pool_ops`]): then [`Pools::set_home`] says which copy is
//! the volume, and the other is invisible until it is deleted.
//!
//! A pool that cannot be opened at start (its disk pulled, its volume group
//! not activated, a file gone) is kept as an offline [`Slot`] with the
//! reason; its volumes are shown unavailable and nothing else is affected.

use std::collections::HashMap;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_blockstore::{
    AnyBackend, DeviceInfo, DeviceKind, Engine, Error, Pool, PoolOptions, PoolStats, Result, Volume,
};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

/// The name of the pool every node has.
pub const DEFAULT_POOL: &str = "default";

/// What a pool lives on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PoolSource {
    /// A file (the default pool's is `DATA/pool.img`).
    File {
        /// Absolute path.
        path: PathBuf,
    },
    /// A block device given to Keel whole.
    Device {
        /// Absolute path of the device node.
        path: PathBuf,
    },
    /// A logical volume Keel made in volume group `vg` (`lvcreate`).
    Lvm {
        /// Volume group.
        vg: String,
        /// Logical volume (`keel-POOL`).
        lv: String,
    },
}

impl PoolSource {
    /// The kind as the API shows it: `file`, `device` or `lvm`.
    pub fn kind(&self) -> &'static str {
        match self {
            PoolSource::File { .. } => "file",
            PoolSource::Device { .. } => "device",
            PoolSource::Lvm { .. } => "lvm",
        }
    }
}

/// A pool's record in the metadata (`POOLS`); the default pool has none.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PoolRecord {
    /// Name.
    pub name: String,
    /// What it lives on.
    pub source: PoolSource,
    /// Free-form tier label (`fast`, `normal`, ...).
    #[serde(default)]
    pub tier: Option<String>,
    /// Unix seconds.
    pub created: u64,
    /// Keel made the file (and deletes it with the pool).
    #[serde(default)]
    pub made_file: bool,
}

/// One pool of the node: open, or offline with the reason.
pub struct Slot {
    /// What it is.
    pub record: PoolRecord,
    /// The open pool; `None` when offline.
    pub pool: Option<Pool<AnyBackend>>,
    /// Why it is offline.
    pub offline: Option<String>,
    /// The device node or file the pool is on (an LV's resolved path).
    pub path: PathBuf,
    /// Holds the device exclusively (`O_EXCL`) or the file locked
    /// (`flock`) while the pool is open.
    _hold: Option<std::fs::File>,
    /// The pool's background committer.
    committer: Option<tokio::task::AbortHandle>,
}

impl Slot {
    /// An open pool.
    pub fn online(
        record: PoolRecord,
        pool: Pool<AnyBackend>,
        path: PathBuf,
        hold: Option<std::fs::File>,
        commit: Option<Duration>,
    ) -> Slot {
        let committer = commit.map(|p| tokio::spawn(pool.committer(p)).abort_handle());
        Slot { record, pool: Some(pool), offline: None, path, _hold: hold, committer }
    }

    /// A pool that could not be opened.
    pub fn offline(record: PoolRecord, path: PathBuf, why: String) -> Slot {
        Slot { record, pool: None, offline: Some(why), path, _hold: None, committer: None }
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.record.name
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(c) = &self.committer {
            c.abort();
        }
    }
}

/// Every pool of the node.
pub struct Pools {
    slots: RwLock<Vec<Arc<Slot>>>,
    /// Volumes held by two pools (a move in progress): the pool whose copy
    /// is the volume.
    home: Mutex<HashMap<String, String>>,
    /// How pools are opened.
    pub engine: Engine,
    /// Options every pool is opened with.
    pub opts: PoolOptions,
    /// Background commit period of every pool.
    pub commit: Option<Duration>,
}

fn base(device: &str) -> &str {
    device.split_once('@').map_or(device, |(v, _)| v)
}

fn offline_error(slot: &Slot) -> Error {
    Error::Refused(format!("pool {} is offline: {}", slot.name(), slot.offline.as_deref().unwrap_or("not open")))
}

impl Pools {
    /// A set with the default pool only.
    pub fn new(default: Slot, engine: Engine, opts: PoolOptions, commit: Option<Duration>) -> Pools {
        Pools { slots: RwLock::new(vec![Arc::new(default)]), home: Mutex::new(HashMap::new()), engine, opts, commit }
    }

    /// One default pool, `pool` (for tests and tools).
    pub fn single(pool: Pool<AnyBackend>) -> Pools {
        let record = PoolRecord {
            name: DEFAULT_POOL.into(),
            source: PoolSource::File { path: PathBuf::from("pool.img") },
            tier: None,
            created: 0,
            made_file: false,
        };
        let slot = Slot { record, pool: Some(pool), offline: None, path: PathBuf::new(), _hold: None, committer: None };
        Pools::new(slot, Engine::Auto, PoolOptions::default(), None)
    }

    /// Every pool, the default first.
    pub fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots.read().clone()
    }

    /// Pool `name`.
    pub fn slot(&self, name: &str) -> Option<Arc<Slot>> {
        self.slots.read().iter().find(|s| s.name() == name).cloned()
    }

    /// The default pool (always open: the daemon does not start without it).
    pub fn default_pool(&self) -> Pool<AnyBackend> {
        self.slots.read()[0].pool.clone().expect("the default pool is open")
    }

    /// Add a pool, or replace the one of the same name.
    pub fn put(&self, slot: Slot) {
        let mut slots = self.slots.write();
        match slots.iter().position(|s| s.name() == slot.name()) {
            Some(i) => slots[i] = Arc::new(slot),
            None => slots.push(Arc::new(slot)),
        }
    }

    /// Forget pool `name`; returns it.
    pub fn take(&self, name: &str) -> Option<Arc<Slot>> {
        let mut slots = self.slots.write();
        let i = slots.iter().position(|s| s.name() == name)?;
        Some(slots.remove(i))
    }

    /// Say which pool holds `volume` while two do (`None`: the one that
    /// has it, once only one does).
    pub fn set_home(&self, volume: &str, pool: Option<&str>) {
        let mut h = self.home.lock();
        match pool {
            Some(p) => h.insert(volume.to_string(), p.to_string()),
            None => h.remove(volume),
        };
    }

    fn visible(&self, home: &HashMap<String, String>, slot: &str, device: &str) -> bool {
        home.get(base(device)).is_none_or(|h| h == slot)
    }

    /// The pool holding volume `volume` (a plain volume name), with its name.
    pub fn holder(&self, volume: &str) -> Option<(String, Pool<AnyBackend>)> {
        let home = self.home.lock().get(volume).cloned();
        let slots = self.slots.read();
        for s in slots.iter() {
            if home.as_deref().is_some_and(|h| h != s.name()) {
                continue;
            }
            if let Some(p) = &s.pool
                && p.volume(volume).is_ok()
            {
                return Some((s.name().to_string(), p.clone()));
            }
        }
        None
    }

    /// The name of the pool holding `device` (`VOLUME` or `VOLUME@SNAP`).
    pub fn pool_of(&self, device: &str) -> Option<String> {
        self.holder(base(device)).map(|(n, _)| n)
    }

    fn route(&self, device: &str) -> Result<Pool<AnyBackend>> {
        self.holder(base(device)).map(|(_, p)| p).ok_or_else(|| Error::NotFound(device.to_string()))
    }

    /// Open `pool`, or say why not.
    pub fn open_pool(&self, pool: &str) -> Result<Pool<AnyBackend>> {
        let s = self.slot(pool).ok_or_else(|| Error::NotFound(format!("pool {pool}")))?;
        s.pool.clone().ok_or_else(|| offline_error(&s))
    }

    /// Device `name` (`VOLUME` or `VOLUME@SNAP`) of whichever pool holds it.
    pub fn volume(&self, name: &str) -> Result<Volume<AnyBackend>> {
        self.route(name)?.volume(name)
    }

    /// Every device of every open pool.
    pub fn list(&self) -> Vec<DeviceInfo> {
        self.located().into_iter().map(|(_, d)| d).collect()
    }

    /// Every device of every open pool, with its pool's name.
    pub fn located(&self) -> Vec<(String, DeviceInfo)> {
        let home = self.home.lock().clone();
        let mut out = Vec::new();
        for s in self.slots.read().iter() {
            if let Some(p) = &s.pool {
                for d in p.list() {
                    if self.visible(&home, s.name(), &d.name) {
                        out.push((s.name().to_string(), d));
                    }
                }
            }
        }
        out
    }

    /// A new volume in the default pool.
    pub async fn create_volume(&self, name: &str, size: u64) -> Result<Volume<AnyBackend>> {
        self.create_volume_in(DEFAULT_POOL, name, size).await
    }

    /// A new volume in pool `pool`; the name must be free in every pool.
    pub async fn create_volume_in(&self, pool: &str, name: &str, size: u64) -> Result<Volume<AnyBackend>> {
        if self.holder(name).is_some() {
            return Err(Error::AlreadyExists(name.to_string()));
        }
        self.open_pool(pool)?.create_volume(name, size).await
    }

    /// Resize a volume.
    pub async fn resize(&self, name: &str, size: u64, force: bool) -> Result<()> {
        self.route(name)?.resize(name, size, force).await
    }

    /// Delete a volume (and its snapshots when `recursive`).
    pub async fn delete_volume(&self, name: &str, recursive: bool) -> Result<()> {
        self.route(name)?.delete_volume(name, recursive).await
    }

    /// Snapshot a volume.
    pub async fn snapshot(&self, volume: &str, snap: &str) -> Result<Volume<AnyBackend>> {
        self.route(volume)?.snapshot(volume, snap).await
    }

    /// Delete a snapshot.
    pub async fn delete_snapshot(&self, volume: &str, snap: &str) -> Result<()> {
        self.route(volume)?.delete_snapshot(volume, snap).await
    }

    /// A writable clone of `source` (`VOLUME@SNAP`), in the source's pool
    /// (it shares the source's blocks).
    pub async fn clone_snapshot(&self, source: &str, name: &str) -> Result<Volume<AnyBackend>> {
        if self.holder(name).is_some() {
            return Err(Error::AlreadyExists(name.to_string()));
        }
        self.route(source)?.clone_snapshot(source, name).await
    }

    /// Byte ranges that differ between two devices of one volume.
    pub async fn changed_ranges(&self, from: &str, to: &str) -> Result<Vec<Range<u64>>> {
        self.route(from)?.changed_ranges(from, to).await
    }

    /// Space of every open pool together.
    pub fn stats(&self) -> PoolStats {
        let mut total: Option<PoolStats> = None;
        for s in self.slots.read().iter() {
            if let Some(p) = &s.pool {
                let st = p.stats();
                match &mut total {
                    None => total = Some(st),
                    Some(t) => {
                        t.total_bytes += st.total_bytes;
                        t.allocated_bytes += st.allocated_bytes;
                        t.free_bytes += st.free_bytes;
                        t.provisioned_bytes += st.provisioned_bytes;
                        t.devices += st.devices;
                    }
                }
            }
        }
        total.expect("the default pool is open")
    }

    /// Make every acknowledged write of every pool durable.
    pub async fn flush(&self) -> Result<()> {
        for s in self.slots() {
            if let Some(p) = &s.pool {
                p.flush().await?;
            }
        }
        Ok(())
    }

    /// Commit and close every pool.
    pub async fn close(&self) -> Result<()> {
        let slots: Vec<Arc<Slot>> = std::mem::take(&mut *self.slots.write());
        for s in slots {
            if let Some(c) = &s.committer {
                c.abort();
            }
            if let Some(p) = s.pool.clone() {
                p.close().await?;
            }
        }
        Ok(())
    }

    /// Volumes of pool `pool` (user volumes and the daemon's own), when open.
    pub fn volumes_in(&self, pool: &str) -> Vec<DeviceInfo> {
        self.slot(pool)
            .and_then(|s| s.pool.clone())
            .map(|p| p.list().into_iter().filter(|d| d.kind == DeviceKind::Volume).collect())
            .unwrap_or_default()
    }
}

// ----- the NBD exports over every pool -----

/// Every device of every pool as an NBD export (`VOLUME`, and
/// `VOLUME@SNAP` read-only), with the hooks a volume move needs: its
/// connections can be evicted (the client reconnects) and new ones held
/// while the volume switches pools.
pub struct PoolsExports {
    pools: Arc<Pools>,
    /// Per volume: bumped to evict its connections.
    evictions: Mutex<HashMap<String, tokio::sync::watch::Sender<u64>>>,
    /// Per volume being switched: `true` while opens must wait.
    held: Mutex<HashMap<String, tokio::sync::watch::Sender<bool>>>,
}

impl PoolsExports {
    /// Export the devices of `pools`.
    pub fn new(pools: Arc<Pools>) -> PoolsExports {
        PoolsExports { pools, evictions: Mutex::new(HashMap::new()), held: Mutex::new(HashMap::new()) }
    }

    /// Hold new connections to `volume` (and its snapshots) until
    /// [`PoolsExports::release`].
    pub fn hold(&self, volume: &str) {
        self.held
            .lock()
            .entry(volume.to_string())
            .or_insert_with(|| tokio::sync::watch::channel(true).0)
            .send_replace(true);
    }

    /// Let held connections to `volume` go on.
    pub fn release(&self, volume: &str) {
        if let Some(tx) = self.held.lock().remove(volume) {
            tx.send_replace(false);
        }
    }

    /// Ask every open connection to `volume` and its snapshots to end.
    pub fn evict(&self, volume: &str) {
        if let Some(tx) = self.evictions.lock().get(volume) {
            tx.send_modify(|v| *v += 1);
        }
    }
}

impl keel_nbd_server::Exports for PoolsExports {
    type Device = Volume<AnyBackend>;

    fn open(&self, name: &str) -> Option<Arc<Volume<AnyBackend>>> {
        self.pools.volume(name).ok().map(Arc::new)
    }

    fn names(&self) -> Vec<String> {
        self.pools.list().into_iter().map(|d| d.name).collect()
    }

    fn bitmaps(&self, name: &str) -> Vec<String> {
        let prefix = format!("{}@", base(name));
        self.pools
            .list()
            .into_iter()
            .filter(|d| d.kind == DeviceKind::Snapshot)
            .filter_map(|d| d.name.strip_prefix(&prefix).map(str::to_string))
            .collect()
    }

    fn ready(&self, name: &str) -> impl std::future::Future<Output = ()> + Send {
        let rx = self.held.lock().get(base(name)).map(|tx| tx.subscribe());
        async move {
            if let Some(mut rx) = rx {
                let _ = rx.wait_for(|held| !*held).await;
            }
        }
    }

    fn eviction(&self, name: &str) -> Option<tokio::sync::watch::Receiver<u64>> {
        let mut e = self.evictions.lock();
        Some(e.entry(base(name).to_string()).or_insert_with(|| tokio::sync::watch::channel(0).0).subscribe())
    }
}

// ----- what is on a device -----

/// What the start of a device or file holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Content {
    /// Zeros (or nothing at all).
    Empty,
    /// A Keel pool.
    KeelPool,
    /// Something else, said in words: "an ext2/3/4 file system".
    Other(String),
}

/// Bytes of a device read to tell what it holds.
const PROBE_BYTES: usize = 1 << 20;

/// Look at the first MiB of `path` and say what it holds: the signatures of
/// the common file systems, partition tables, LVM, RAID, swap and
/// encryption, or any non-zero byte (data of an unknown kind).
pub fn probe(path: &Path) -> std::io::Result<Content> {
    let mut f = std::fs::File::open(path)?;
    let mut b = vec![0u8; PROBE_BYTES];
    let mut n = 0;
    while n < b.len() {
        match f.read(&mut b[n..])? {
            0 => break,
            k => n += k,
        }
    }
    b.truncate(n);
    Ok(classify(&b))
}

/// [`probe`] on bytes already read.
pub fn classify(b: &[u8]) -> Content {
    let at = |off: usize, sig: &[u8]| b.len() >= off + sig.len() && &b[off..off + sig.len()] == sig;
    if at(0, b"KEELPOOL") || at(4096, b"KEELPOOL") {
        return Content::KeelPool;
    }
    let known: [(usize, &[u8], &str); 14] = [
        (512, b"EFI PART", "a GPT partition table"),
        (1080, &[0x53, 0xef], "an ext2/3/4 file system"),
        (0, b"XFSB", "an XFS file system"),
        (0x10040, b"_BHRfS_M", "a btrfs file system"),
        (512, b"LABELONE", "an LVM physical volume"),
        (0, b"LABELONE", "an LVM physical volume"),
        (4086, b"SWAPSPACE2", "a swap area"),
        (4086, b"SWAP-SPACE", "a swap area"),
        (0, b"LUKS\xba\xbe", "a LUKS encrypted volume"),
        (32769, b"CD001", "an ISO 9660 image"),
        (4096, &[0xfc, 0x4e, 0x2b, 0xa9], "an MD RAID member"),
        (3, b"NTFS    ", "an NTFS file system"),
        (82, b"FAT32   ", "a FAT file system"),
        (54, b"FAT1", "a FAT file system"),
    ];
    for (off, sig, what) in known {
        if at(off, sig) {
            return Content::Other(what.to_string());
        }
    }
    if at(510, &[0x55, 0xaa]) {
        return Content::Other("a partition table or boot sector (MBR)".into());
    }
    match b.iter().position(|&x| x != 0) {
        None => Content::Empty,
        Some(i) => Content::Other(format!("data of an unknown kind (a non-zero byte at offset {i})")),
    }
}

/// Claim block device `path` for this process alone: `O_EXCL` on a block
/// device fails (EBUSY) while it is mounted, in an LVM or RAID set, or
/// claimed by another program (another Keel).
pub fn claim_device(path: &Path) -> std::result::Result<std::fs::File, String> {
    let md = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !md.file_type().is_block_device() {
        return Err(format!("{} is not a block device", path.display()));
    }
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            format!(
                "{} is in use (mounted, part of an LVM or RAID set, or held by another program): Keel takes a device \
                 only for itself",
                path.display()
            )
        } else {
            format!("{}: {e}", path.display())
        }
    })
}

/// Lock pool file `path` for this process alone (`flock`).
pub fn lock_file(path: &Path) -> std::result::Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!("{} is in use by another pool or program (it is locked)", path.display()));
    }
    Ok(f)
}

/// Run an lvm2 command; its error output is the error.
pub async fn lvm(args: &[&str]) -> std::result::Result<String, String> {
    let out = tokio::process::Command::new(args[0])
        .args(&args[1..])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("running {}: {e} (is lvm2 installed?)", args[0]))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>().join("; ");
        Err(format!("{} failed: {}", args.join(" "), err.trim()))
    }
}

/// The device node of logical volume `vg/lv`.
pub async fn lv_path(vg: &str, lv: &str) -> std::result::Result<PathBuf, String> {
    let p = lvm(&["lvs", "--noheadings", "-o", "lv_dm_path", &format!("{vg}/{lv}")]).await?;
    let p = PathBuf::from(p.trim());
    if !p.exists() {
        return Err(format!("logical volume {vg}/{lv} is not active ({} is missing)", p.display()));
    }
    Ok(p)
}

/// Where a pool of `record` lives now (an LV's node looked up).
pub async fn resolve(record: &PoolRecord) -> std::result::Result<PathBuf, String> {
    match &record.source {
        PoolSource::File { path } | PoolSource::Device { path } => Ok(path.clone()),
        PoolSource::Lvm { vg, lv } => lv_path(vg, lv).await,
    }
}

/// Open the pool of `record` (at start, or after it was made): exclusive
/// hold, backend, pool. An error is the reason it stays offline.
pub async fn open_record(
    record: &PoolRecord,
    engine: Engine,
    opts: PoolOptions,
) -> std::result::Result<(Pool<AnyBackend>, PathBuf, std::fs::File), String> {
    let path = resolve(record).await?;
    if !path.exists() {
        return Err(format!("{} is missing", path.display()));
    }
    let hold = match record.source {
        PoolSource::File { .. } => lock_file(&path)?,
        _ => claim_device(&path)?,
    };
    {
        use std::io::Seek;
        let len = (&hold).seek(std::io::SeekFrom::End(0)).unwrap_or(0);
        if len == 0 {
            return Err(format!("{} has no medium (0 bytes): the disk is missing or detached", path.display()));
        }
    }
    let backend = AnyBackend::open(&path, engine).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let (pool, _) = Pool::open(backend, opts).await.map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((pool, path, hold))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_names_what_a_device_holds() {
        assert_eq!(classify(&[]), Content::Empty);
        assert_eq!(classify(&vec![0u8; 1 << 20]), Content::Empty);
        let mut b = vec![0u8; 1 << 20];
        b[1080] = 0x53;
        b[1081] = 0xef;
        assert_eq!(classify(&b), Content::Other("an ext2/3/4 file system".into()));
        let mut b = vec![0u8; 8192];
        b[510] = 0x55;
        b[511] = 0xaa;
        assert!(matches!(classify(&b), Content::Other(s) if s.contains("MBR")));
        b[512..520].copy_from_slice(b"EFI PART");
        assert_eq!(classify(&b), Content::Other("a GPT partition table".into()));
        let mut b = vec![0u8; 8192];
        b[0..8].copy_from_slice(b"KEELPOOL");
        assert_eq!(classify(&b), Content::KeelPool);
        let mut b = vec![0u8; 8192];
        b[700] = 1;
        assert!(matches!(classify(&b), Content::Other(s) if s.contains("offset 700")));
    }
}
