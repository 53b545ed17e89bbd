//! Catalog operations: volumes, snapshots, clones, resize, delete, stats.
//! Each is one commit, so it is durable when it returns.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::backend::{BLOCK_SIZE, Backend};
use crate::datacache::DataCacheStats;
use crate::error::{Error, Result};
use crate::format::{DeviceKind, DeviceRecord, Entry};
use crate::pool::{Pool, check_name, depth_for_size};
use crate::volume::{SECTOR, Volume};

const BS: u64 = BLOCK_SIZE as u64;

/// What a device is, as the catalog lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Stable id.
    pub id: u64,
    /// `vol` or `vol@snap`.
    pub name: String,
    /// Volume (clones included) or snapshot.
    pub kind: DeviceKind,
    /// Size in bytes.
    pub size: u64,
    /// Bytes of data blocks mapped (blocks shared with snapshots or clones
    /// count for each device that maps them).
    pub allocated_bytes: u64,
    /// A snapshot's volume; a clone's snapshot (`vol@snap`), if it still
    /// exists.
    pub origin: Option<String>,
    /// Creation time, unix seconds.
    pub created: u64,
}

/// Space in the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes of the data area (what volumes can use; grows with
    /// [`Pool::grow`]).
    pub total_bytes: u64,
    /// Bytes in use by data blocks and map pages, counted once however
    /// many devices share them.
    pub allocated_bytes: u64,
    /// `total_bytes - allocated_bytes`.
    pub free_bytes: u64,
    /// Sum of all volume sizes (thin overcommit when above total).
    pub provisioned_bytes: u64,
    /// Volumes and snapshots.
    pub devices: usize,
    /// Map pages held in memory.
    pub cached_pages: usize,
    /// The data cache's size, use and hits (all zero without one).
    pub data_cache: DataCacheStats,
}

impl<B: Backend> Pool<B> {
    /// Create a thin volume of `size` bytes (a multiple of 512). It takes no
    /// space until written.
    pub async fn create_volume(&self, name: &str, size: u64) -> Result<Volume<B>> {
        check_name(name)?;
        check_size(size)?;
        let dev = self
            .inner
            .commit_with(|l| {
                if l.cat.volume(name).is_some() {
                    return Err(Error::AlreadyExists(format!("volume {name}")));
                }
                l.add(DeviceRecord {
                    id: 0,
                    size,
                    root: Entry::ZERO,
                    kind: DeviceKind::Volume,
                    depth: depth_for_size(size),
                    parent: 0,
                    created: 0,
                    mapped: 0,
                    name: name.to_string(),
                })
            })
            .await?;
        Ok(Volume { pool: self.inner.clone(), dev, name: name.to_string() })
    }

    /// Open a volume (`vol`) or a snapshot (`vol@snap`, read-only).
    pub fn volume(&self, name: &str) -> Result<Volume<B>> {
        let dev = self.inner.catalog.read().find(name).cloned();
        let dev = dev.ok_or_else(|| Error::NotFound(name.to_string()))?;
        Ok(Volume { pool: self.inner.clone(), dev, name: name.to_string() })
    }

    /// Take a read-only snapshot of `volume` in O(1): it shares the whole
    /// map with the volume until either changes.
    pub async fn snapshot(&self, volume: &str, snap: &str) -> Result<Volume<B>> {
        check_name(snap)?;
        let dev = self
            .inner
            .commit_with(|l| {
                let vol = l.cat.volume(volume).cloned().ok_or_else(|| Error::NotFound(format!("volume {volume}")))?;
                if l.cat.snapshot(vol.id, snap).is_some() {
                    return Err(Error::AlreadyExists(format!("snapshot {volume}@{snap}")));
                }
                let st = l.state(vol.id).ok_or_else(|| Error::NotFound(format!("volume {volume}")))?;
                let rec = DeviceRecord {
                    id: 0,
                    size: st.rec.size,
                    root: st.rec.root,
                    kind: DeviceKind::Snapshot,
                    depth: st.rec.depth,
                    parent: vol.id,
                    created: 0,
                    mapped: st.rec.mapped,
                    name: snap.to_string(),
                };
                l.add(rec)
            })
            .await?;
        Ok(Volume { pool: self.inner.clone(), dev, name: format!("{volume}@{snap}") })
    }

    /// Make a writable volume `name` from snapshot `vol@snap` in O(1). It
    /// lives on if the snapshot or its volume is deleted.
    pub async fn clone_snapshot(&self, source: &str, name: &str) -> Result<Volume<B>> {
        check_name(name)?;
        let dev = self
            .inner
            .commit_with(|l| {
                if !source.contains('@') {
                    return Err(Error::Invalid(format!("clone source {source} must be a snapshot (VOLUME@SNAPSHOT)")));
                }
                let snap = l.cat.find(source).cloned().ok_or_else(|| Error::NotFound(source.to_string()))?;
                if l.cat.volume(name).is_some() {
                    return Err(Error::AlreadyExists(format!("volume {name}")));
                }
                let st = l.state(snap.id).ok_or_else(|| Error::NotFound(source.to_string()))?;
                let rec = DeviceRecord {
                    id: 0,
                    size: st.rec.size,
                    root: st.rec.root,
                    kind: DeviceKind::Volume,
                    depth: st.rec.depth,
                    parent: snap.id,
                    created: 0,
                    mapped: st.rec.mapped,
                    name: name.to_string(),
                };
                l.add(rec)
            })
            .await?;
        Ok(Volume { pool: self.inner.clone(), dev, name: name.to_string() })
    }

    /// Grow a volume online. Shrinking is refused unless `force`, because it
    /// destroys the data past the new end.
    pub async fn resize(&self, name: &str, new_size: u64, force: bool) -> Result<()> {
        check_size(new_size)?;
        let vol = self.volume(name)?;
        if vol.read_only() {
            return Err(Error::ReadOnly(name.to_string()));
        }
        let old = vol.size();
        if new_size < old {
            if !force {
                return Err(Error::Refused(format!(
                    "shrinking {name} from {old} to {new_size} bytes would destroy the data past the new end; use force to do it anyway"
                )));
            }
            // Zero (and so deallocate) everything past the new end, so the
            // space returns and a later grow reads zeros there.
            vol.write_zeroes(new_size, old - new_size, false).await?;
        }
        {
            let mut st = vol.dev.state.write();
            st.grow_depth(&self.inner.tree_cx(), depth_for_size(new_size))?;
            st.rec.size = new_size;
        }
        self.inner.flush().await
    }

    /// Delete a volume. Refused while it has snapshots unless `recursive`,
    /// which deletes them too. Clones made from its snapshots live on.
    pub async fn delete_volume(&self, name: &str, recursive: bool) -> Result<()> {
        let vol = self.volume(name)?;
        if vol.read_only() {
            return Err(Error::Invalid(format!("{name} is a snapshot: delete it as a snapshot")));
        }
        let snaps: Vec<String> = self
            .inner
            .catalog
            .read()
            .devices
            .values()
            .filter(|d| d.kind == DeviceKind::Snapshot && d.parent == vol.dev.id)
            .map(|d| d.name.clone())
            .collect();
        if !snaps.is_empty() && !recursive {
            return Err(Error::Refused(format!(
                "volume {name} has {} snapshot(s) ({}); delete them first or delete recursively",
                snaps.len(),
                snaps.join(", ")
            )));
        }
        for s in snaps {
            self.delete_device(&format!("{name}@{s}")).await?;
        }
        self.delete_device(name).await
    }

    /// Delete snapshot `vol@snap`. Clones made from it live on.
    pub async fn delete_snapshot(&self, volume: &str, snap: &str) -> Result<()> {
        self.delete_device(&format!("{volume}@{snap}")).await
    }

    async fn delete_device(&self, full: &str) -> Result<()> {
        let inner = &self.inner;
        let mut cs = inner.commit.lock().await;
        let dev = {
            let mut cat = inner.catalog.write();
            let dev = cat.find(full).cloned().ok_or_else(|| Error::NotFound(full.to_string()))?;
            cat.devices.remove(&dev.id);
            cat.free_records.insert(dev.record);
            dev
        };
        let (root, depth) = {
            let st = dev.state.read();
            (st.rec.root, st.rec.depth)
        };
        // Walk with the commit lock held: no commit can see the catalog
        // without the device but the counts still holding its references.
        inner.release_tree(&dev, root, depth).await?;
        inner.commit_locked(&mut cs, |_| Ok(())).await
    }

    /// Every volume and snapshot.
    pub fn list(&self) -> Vec<DeviceInfo> {
        let cat = self.inner.catalog.read();
        cat.devices
            .values()
            .map(|d| {
                let st = d.state.read();
                let origin = cat.devices.get(&d.parent).map(|p| cat.full_name(p));
                DeviceInfo {
                    id: d.id,
                    name: cat.full_name(d),
                    kind: d.kind,
                    size: st.rec.size,
                    allocated_bytes: st.rec.mapped * BS,
                    origin,
                    created: st.rec.created,
                }
            })
            .collect()
    }

    /// Space in the pool.
    pub fn stats(&self) -> PoolStats {
        // Blocks that hold map pages and data: the data area less the
        // metadata of the pool's extensions, which is never allocated.
        let total = self.inner.usable_blocks.load(Ordering::Relaxed) * BS;
        let allocated = self.inner.refs.referenced() * BS;
        let cat = self.inner.catalog.read();
        let provisioned =
            cat.devices.values().filter(|d| d.kind == DeviceKind::Volume).map(|d| d.state.read().rec.size).sum();
        PoolStats {
            total_bytes: total,
            allocated_bytes: allocated,
            free_bytes: total - allocated,
            provisioned_bytes: provisioned,
            devices: cat.devices.len(),
            cached_pages: self.inner.cache.len(),
            data_cache: DataCacheStats {
                staged_bytes: self.inner.writeback.as_ref().map_or(0, |w| (w.staged() * BLOCK_SIZE) as u64),
                ..self.inner.data_cache.as_ref().map(|c| c.stats()).unwrap_or_default()
            },
        }
    }

    /// All devices as handles (for servers that export everything).
    pub fn devices(&self) -> Vec<Volume<B>> {
        let cat = self.inner.catalog.read();
        cat.devices
            .values()
            .map(|d| Volume { pool: self.inner.clone(), dev: Arc::clone(d), name: cat.full_name(d) })
            .collect()
    }
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(SECTOR) {
        return Err(Error::Invalid(format!("size {size} must be a positive multiple of {SECTOR} bytes")));
    }
    if size > (1u64 << 50) {
        return Err(Error::Invalid(format!("size {size} is above the 1 PiB limit")));
    }
    Ok(())
}
