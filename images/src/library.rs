//! The appliance library: descriptors plus disks stored as content-addressed,
//! compressed chunks, each kept once however many appliances hold it.
//!
//! # Format (version 1)
//!
//! A library is a directory:
//!
//! ```text
//! LIB/chunks/AB/ABCDEF...     one chunk: a zstd frame of CHUNK_SIZE bytes of
//!                             disk data (less for a disk's last chunk),
//!                             named by the BLAKE3 hash (hex) of the
//!                             uncompressed bytes, in a directory named by
//!                             the hash's first two hex digits
//! LIB/appliances/NAME.json    one appliance: its [`Descriptor`]
//! LIB/tmp/                    files being written (emptied at open)
//! ```
//!
//! A disk is cut into fixed [`CHUNK_SIZE`] pieces at fixed offsets; its
//! manifest ([`DiskManifest`]) lists, per piece, the chunk's hash, or `""`
//! for a piece that is all zeros (never stored). Fixed offsets make an
//! incremental backup a matter of re-reading the pieces the store's change
//! tracking says changed and copying the other hashes from the previous
//! manifest; every manifest is complete, so appliances never depend on one
//! another, only on the chunks they name.
//!
//! # Durability and concurrency
//!
//! Chunks are written to a temporary name and renamed into place; before a
//! descriptor is written the file system is synced (`syncfs`), then the
//! descriptor goes through a temporary file, fsync, rename and a directory
//! fsync. A crash therefore leaves either no appliance or a complete one,
//! plus perhaps chunks nothing names, which the next garbage collection
//! removes. Backups hold the library's lock shared for their whole run; the
//! garbage collector holds it exclusively, so it never removes a chunk a
//! running backup has found already stored and is about to name.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use keel_blockstore::{AlignedBuf, Backend, Volume};
use serde::{Deserialize, Serialize};

/// Bytes per chunk.
pub const CHUNK_SIZE: u64 = 1 << 20;
/// zstd level: -1, zstd's fast mode. On half-compressible disk data it
/// compresses at about twice level 1's speed for the same ratio here (1004
/// against 454 MB/s per core), which keeps a backup above 300 MB/s on two
/// cores; the library's format does not depend on the level.
const ZSTD_LEVEL: i32 = -1;
/// Chunks read, hashed and compressed at once.
const PARALLEL: usize = 4;

/// Library failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No such appliance.
    #[error("appliance {0} not found")]
    NotFound(String),
    /// The name is taken.
    #[error("appliance {0} already exists")]
    Exists(String),
    /// A chunk is missing or does not hash to its name.
    #[error("chunk {hash} is damaged: {detail}")]
    Corrupt {
        /// The chunk.
        hash: String,
        /// What is wrong.
        detail: String,
    },
    /// The name cannot name an appliance (it would not be a plain file
    /// name in the library's directory).
    #[error("{0:?} is not an appliance name")]
    BadName(String),
    /// The library's disk is full.
    #[error("the library's disk is full ({0})")]
    NoSpace(PathBuf),
    /// The block store failed.
    #[error(transparent)]
    Store(#[from] keel_blockstore::Error),
    /// A descriptor does not parse.
    #[error("descriptor {path}: {detail}")]
    Descriptor {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            Error::NoSpace(path.to_path_buf())
        } else {
            Error::Io { path: path.to_path_buf(), source }
        }
    }
}

/// One disk of an appliance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskManifest {
    /// The disk's id in the VM (`disk0`, ...).
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes per chunk ([`CHUNK_SIZE`]).
    pub chunk_size: u64,
    /// Per chunk: BLAKE3 hex of its bytes, or `""` when all zeros.
    pub chunks: Vec<String>,
}

impl DiskManifest {
    /// The byte range of chunk `i`.
    pub fn range(&self, i: usize) -> Range<u64> {
        let start = i as u64 * self.chunk_size;
        start..(start + self.chunk_size).min(self.size)
    }
}

/// An appliance: what a VM made from it looks like, and its disks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Name (the file name).
    pub name: String,
    /// Owning user.
    pub owner: String,
    /// Unix seconds.
    pub created: u64,
    /// The VM it was backed up from.
    pub source_vm: Option<String>,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest memory.
    pub memory_bytes: u64,
    /// Boot order (`disk`, `cdrom`, `network`).
    pub boot: Vec<String>,
    /// Disks in order.
    pub disks: Vec<DiskManifest>,
}

/// A disk to back up.
pub struct BackupDisk<'a, B: Backend> {
    /// Its id.
    pub id: String,
    /// The point in time to read (a snapshot).
    pub source: &'a Volume<B>,
    /// The previous backup of this disk and the byte ranges that changed
    /// since it: only those are read.
    pub base: Option<(DiskManifest, Vec<Range<u64>>)>,
}

/// What a backup did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BackupStats {
    /// Logical bytes of the disks.
    pub logical_bytes: u64,
    /// Bytes read from the store.
    pub read_bytes: u64,
    /// Chunks newly stored.
    pub new_chunks: u64,
    /// Compressed bytes newly stored.
    pub new_bytes: u64,
    /// Chunks found already stored.
    pub dedup_chunks: u64,
}

/// Space of one appliance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Sum of its disks' sizes.
    pub logical_bytes: u64,
    /// Compressed bytes of the distinct chunks it names.
    pub stored_bytes: u64,
    /// Of those, the bytes no other appliance names (what deleting it frees).
    pub unique_bytes: u64,
}

/// What a garbage collection removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Chunks removed.
    pub chunks: u64,
    /// Bytes removed.
    pub bytes: u64,
}

/// A damaged chunk and who names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Damage {
    /// The chunk.
    pub hash: String,
    /// What is wrong.
    pub detail: String,
    /// Appliances naming it.
    pub appliances: Vec<String>,
}

/// The library.
pub struct Library {
    dir: PathBuf,
    lock: tokio::sync::RwLock<()>,
}

fn chunk_path(dir: &Path, hash: &str) -> PathBuf {
    dir.join("chunks").join(&hash[..2]).join(hash)
}

fn is_zero(b: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only splits the
        // slice at alignment boundaries.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|x| *x == 0) && body.iter().all(|x| *x == 0) && tail.iter().all(|x| *x == 0)
}

/// Decompress chunk `hash` from `path` and check it hashes to its name.
fn load_chunk(path: &Path, hash: &str) -> Result<Vec<u8>> {
    let corrupt = |detail: String| Error::Corrupt { hash: hash.to_string(), detail };
    let packed = match std::fs::read(path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(corrupt("missing".into())),
        Err(e) => return Err(io(path)(e)),
    };
    let data =
        zstd::bulk::decompress(&packed, CHUNK_SIZE as usize).map_err(|e| corrupt(format!("undecodable: {e}")))?;
    let got = blake3::hash(&data).to_hex();
    if got.as_str() != hash {
        return Err(corrupt(format!("its data hashes to {got}")));
    }
    Ok(data)
}

impl Library {
    /// Open (or create) the library in `dir`, clearing what an interrupted
    /// run left in `tmp/`.
    pub fn open(dir: &Path) -> Result<Library> {
        for d in ["chunks", "appliances", "tmp"] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        let tmp = dir.join("tmp");
        for e in std::fs::read_dir(&tmp).map_err(io(&tmp))?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        Ok(Library { dir: dir.to_path_buf(), lock: tokio::sync::RwLock::new(()) })
    }

    /// The library's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `appliances/NAME.json`, for a name that is a plain file name of
    /// `a-z 0-9 . - _` (not starting with `.`). The caller checks names by
    /// its own, stricter rule; this one keeps any name that slipped past it
    /// inside the library's directory.
    fn descriptor_path(&self, name: &str) -> Result<PathBuf> {
        let plain = !name.is_empty()
            && name.len() <= 200
            && !name.starts_with('.')
            && name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b".-_".contains(&c));
        if !plain {
            let shown: String = name.chars().take(64).collect();
            return Err(Error::BadName(shown));
        }
        Ok(self.dir.join("appliances").join(format!("{name}.json")))
    }

    /// One appliance.
    pub fn get(&self, name: &str) -> Result<Descriptor> {
        let p = self.descriptor_path(name)?;
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::NotFound(name.to_string())),
            Err(e) => return Err(io(&p)(e)),
        };
        serde_json::from_str(&text).map_err(|e| Error::Descriptor { path: p, detail: e.to_string() })
    }

    /// Whether appliance `name` exists.
    pub fn exists(&self, name: &str) -> bool {
        self.descriptor_path(name).is_ok_and(|p| p.exists())
    }

    /// Every appliance, by name.
    pub fn list(&self) -> Result<Vec<Descriptor>> {
        let d = self.dir.join("appliances");
        let mut names: Vec<String> = std::fs::read_dir(&d)
            .map_err(io(&d))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(str::to_string))
            .collect();
        names.sort();
        names.iter().map(|n| self.get(n)).collect()
    }

    /// Back up `disks` as appliance `head.name` (its `disks` field is
    /// filled in). Reads only what changed since each disk's base, stores
    /// only chunks the library lacks, and commits the descriptor last;
    /// `progress` gets the logical bytes done so far.
    pub async fn backup<B: Backend>(
        &self,
        mut head: Descriptor,
        disks: Vec<BackupDisk<'_, B>>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(Descriptor, BackupStats)> {
        let _shared = self.lock.read().await;
        self.descriptor_path(&head.name)?;
        if self.exists(&head.name) {
            return Err(Error::Exists(head.name));
        }
        let mut stats = BackupStats::default();
        let done = AtomicU64::new(0);
        head.disks.clear();
        for d in disks {
            let m = self.backup_disk(&d, &mut stats, &done, progress).await?;
            head.disks.push(m);
        }
        self.sync()?;
        self.write_descriptor(&head)?;
        Ok((head, stats))
    }

    async fn backup_disk<B: Backend>(
        &self,
        d: &BackupDisk<'_, B>,
        stats: &mut BackupStats,
        done: &AtomicU64,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<DiskManifest> {
        let size = d.source.size();
        let n = size.div_ceil(CHUNK_SIZE) as usize;
        let mut m = DiskManifest { id: d.id.clone(), size, chunk_size: CHUNK_SIZE, chunks: vec![String::new(); n] };
        stats.logical_bytes += size;
        // Which chunks to read: all, or those the changes touch.
        let mut dirty = vec![true; n];
        if let Some((base, changed)) = &d.base
            && base.size == size
            && base.chunk_size == CHUNK_SIZE
        {
            dirty.fill(false);
            m.chunks.clone_from(&base.chunks);
            for r in changed {
                let (a, b) = ((r.start / CHUNK_SIZE) as usize, (r.end.div_ceil(CHUNK_SIZE) as usize).min(n));
                dirty[a..b].fill(true);
            }
        }
        // Unwritten chunks are zeros: no need to read them.
        let mut allocated = vec![false; n];
        let extents = d.source.allocation(0, size).await?;
        for e in extents.iter().filter(|e| e.allocated) {
            let (a, b) =
                ((e.offset / CHUNK_SIZE) as usize, ((e.offset + e.length).div_ceil(CHUNK_SIZE) as usize).min(n));
            allocated[a..b].fill(true);
        }
        let mut skipped = 0u64;
        for i in 0..n {
            if dirty[i] && !allocated[i] {
                m.chunks[i].clear();
            }
            if !(dirty[i] && allocated[i]) {
                skipped += m.range(i).end - m.range(i).start;
            }
        }
        progress(done.fetch_add(skipped, Ordering::Relaxed) + skipped);

        let todo: Vec<usize> = (0..n).filter(|&i| dirty[i] && allocated[i]).collect();
        let dir = Arc::new(self.dir.clone());
        let manifest = &m;
        let mut results = futures::stream::iter(todo)
            .map(|i| {
                let dir = dir.clone();
                async move {
                    let r = manifest.range(i);
                    let len = (r.end - r.start) as usize;
                    let mut buf = AlignedBuf::new(CHUNK_SIZE as usize);
                    d.source.read(r.start, &mut buf[..len]).await?;
                    let stored = tokio::task::spawn_blocking(move || store_chunk(&dir, &buf[..len]))
                        .await
                        .expect("chunk task panicked")?;
                    Ok::<_, Error>((i, len as u64, stored))
                }
            })
            .buffer_unordered(PARALLEL);
        let mut out = Vec::new();
        while let Some(r) = results.next().await {
            let (i, len, stored) = r?;
            stats.read_bytes += len;
            match &stored {
                Stored::Zero => {}
                Stored::New { bytes, .. } => {
                    stats.new_chunks += 1;
                    stats.new_bytes += bytes;
                }
                Stored::Had(_) => stats.dedup_chunks += 1,
            }
            out.push((i, stored));
            progress(done.fetch_add(len, Ordering::Relaxed) + len);
        }
        drop(results);
        for (i, s) in out {
            m.chunks[i] = match s {
                Stored::Zero => String::new(),
                Stored::New { hash, .. } | Stored::Had(hash) => hash,
            };
        }
        Ok(m)
    }

    fn sync(&self) -> Result<()> {
        let f = std::fs::File::open(&self.dir).map_err(io(&self.dir))?;
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs on a file descriptor we own for the call.
        if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
            return Err(io(&self.dir)(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn write_descriptor(&self, d: &Descriptor) -> Result<()> {
        let dst = self.descriptor_path(&d.name)?;
        let tmp = self.dir.join("tmp").join(format!("{}.json", d.name));
        let json = serde_json::to_vec(d).expect("descriptors serialize");
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&json).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        if dst.exists() {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Exists(d.name.clone()));
        }
        std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
        let dir = self.dir.join("appliances");
        std::fs::File::open(&dir).and_then(|f| f.sync_all()).map_err(io(&dir))?;
        Ok(())
    }

    /// Write disk `m` of an appliance into `vol` (at least `m.size` bytes),
    /// verifying every chunk: a damaged one fails the restore. With `fresh`
    /// (a new, unwritten volume) zero chunks are skipped; otherwise they are
    /// written as zeros (which the store turns into holes).
    pub async fn restore_disk<B: Backend>(
        &self,
        m: &DiskManifest,
        vol: &Volume<B>,
        fresh: bool,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<()> {
        let dir = Arc::new(self.dir.clone());
        let done = AtomicU64::new(0);
        let mut results = futures::stream::iter(0..m.chunks.len())
            .map(|i| {
                let dir = dir.clone();
                let done = &done;
                async move {
                    let r = m.range(i);
                    let len = r.end - r.start;
                    let hash = m.chunks[i].clone();
                    if hash.is_empty() {
                        if !fresh {
                            vol.write_zeroes(r.start, len, false).await?;
                        }
                    } else {
                        let data = tokio::task::spawn_blocking(move || load_chunk(&chunk_path(&dir, &hash), &hash))
                            .await
                            .expect("chunk task panicked")?;
                        if data.len() as u64 != len {
                            return Err(Error::Corrupt {
                                hash: m.chunks[i].clone(),
                                detail: format!("{} bytes where {len} belong", data.len()),
                            });
                        }
                        vol.write(r.start, &data, false).await?;
                    }
                    progress(done.fetch_add(len, Ordering::Relaxed) + len);
                    Ok::<_, Error>(())
                }
            })
            .buffer_unordered(PARALLEL);
        while let Some(r) = results.next().await {
            r?;
        }
        drop(results);
        vol.flush().await?;
        Ok(())
    }

    /// The compressed size of every chunk file, by hash.
    fn chunk_sizes(&self) -> Result<HashMap<String, u64>> {
        let mut out = HashMap::new();
        let root = self.dir.join("chunks");
        for sub in std::fs::read_dir(&root).map_err(io(&root))?.flatten() {
            for e in std::fs::read_dir(sub.path()).map_err(io(&sub.path()))?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.len() == 64 {
                    out.insert(name, e.metadata().map(|m| m.len()).unwrap_or(0));
                }
            }
        }
        Ok(out)
    }

    /// Space of every appliance.
    pub fn usage(&self) -> Result<HashMap<String, Usage>> {
        let all = self.list()?;
        let sizes = self.chunk_sizes()?;
        let mut holders: HashMap<&str, u32> = HashMap::new();
        let sets: Vec<HashSet<&str>> = all
            .iter()
            .map(|d| {
                d.disks.iter().flat_map(|m| m.chunks.iter().map(String::as_str)).filter(|h| !h.is_empty()).collect()
            })
            .collect();
        for s in &sets {
            for h in s {
                *holders.entry(h).or_default() += 1;
            }
        }
        let mut out = HashMap::new();
        for (d, set) in all.iter().zip(&sets) {
            let mut u = Usage { logical_bytes: d.disks.iter().map(|m| m.size).sum(), ..Default::default() };
            for h in set {
                let b = sizes.get(*h).copied().unwrap_or(0);
                u.stored_bytes += b;
                if holders.get(h) == Some(&1) {
                    u.unique_bytes += b;
                }
            }
            out.insert(d.name.clone(), u);
        }
        Ok(out)
    }

    /// Bytes of every chunk file.
    pub fn stored_bytes(&self) -> Result<u64> {
        Ok(self.chunk_sizes()?.values().sum())
    }

    /// Delete appliance `name`, then collect the chunks nothing names.
    pub async fn delete(&self, name: &str) -> Result<GcReport> {
        let p = self.descriptor_path(name)?;
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::NotFound(name.to_string())),
            Err(e) => return Err(io(&p)(e)),
        }
        self.gc().await
    }

    /// Remove every chunk no appliance names. Waits for running backups.
    pub async fn gc(&self) -> Result<GcReport> {
        let _exclusive = self.lock.write().await;
        let live: HashSet<String> =
            self.list()?.into_iter().flat_map(|d| d.disks.into_iter().flat_map(|m| m.chunks)).collect();
        let mut r = GcReport::default();
        for (hash, bytes) in self.chunk_sizes()? {
            if !live.contains(&hash) {
                let p = chunk_path(&self.dir, &hash);
                std::fs::remove_file(&p).map_err(io(&p))?;
                r.chunks += 1;
                r.bytes += bytes;
            }
        }
        Ok(r)
    }

    /// Re-hash every chunk appliance `name` names (every appliance's when
    /// `None`); returns the damaged ones.
    pub async fn verify(&self, name: Option<&str>) -> Result<Vec<Damage>> {
        let _shared = self.lock.read().await;
        let all = match name {
            Some(n) => vec![self.get(n)?],
            None => self.list()?,
        };
        let mut who: HashMap<String, Vec<String>> = HashMap::new();
        for d in &all {
            for h in d.disks.iter().flat_map(|m| &m.chunks).filter(|h| !h.is_empty()) {
                let v = who.entry(h.clone()).or_default();
                if v.last() != Some(&d.name) {
                    v.push(d.name.clone());
                }
            }
        }
        let dir = Arc::new(self.dir.clone());
        let mut results = futures::stream::iter(who)
            .map(|(hash, apps)| {
                let dir = dir.clone();
                async move {
                    tokio::task::spawn_blocking(move || match load_chunk(&chunk_path(&dir, &hash), &hash) {
                        Ok(_) => Ok(None),
                        Err(Error::Corrupt { hash, detail }) => Ok(Some(Damage { hash, detail, appliances: apps })),
                        Err(e) => Err(e),
                    })
                    .await
                    .expect("verify task panicked")
                }
            })
            .buffer_unordered(PARALLEL);
        let mut damage = Vec::new();
        while let Some(r) = results.next().await {
            if let Some(d) = r? {
                damage.push(d);
            }
        }
        damage.sort_by(|a, b| a.hash.cmp(&b.hash));
        Ok(damage)
    }
}

enum Stored {
    Zero,
    New { hash: String, bytes: u64 },
    Had(String),
}

/// Hash `data`, and store it compressed unless it is zeros or stored.
fn store_chunk(dir: &Path, data: &[u8]) -> Result<Stored> {
    if is_zero(data) {
        return Ok(Stored::Zero);
    }
    let hash = blake3::hash(data).to_hex().to_string();
    let path = chunk_path(dir, &hash);
    if path.exists() {
        return Ok(Stored::Had(hash));
    }
    let packed = zstd::bulk::compress(data, ZSTD_LEVEL).map_err(io(&path))?;
    let parent = path.parent().expect("chunk paths have a parent");
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = dir.join("tmp").join(format!("{hash}.{:x}", std::thread::current().id().as_u64_compat()));
    std::fs::write(&tmp, &packed).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(Stored::New { hash, bytes: packed.len() as u64 })
}

/// A number for the current thread (for unique temporary names).
trait ThreadNum {
    fn as_u64_compat(&self) -> u64;
}

impl ThreadNum for std::thread::ThreadId {
    fn as_u64_compat(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}
