//! Appliances: live backups of VMs into the library, VMs made from
//! appliances, restores, and the library's upkeep, over
//! [`keel_images::Library`] in `DATA/library`.
//!
//! A backup snapshots the VM's disks at one instant (as a clone does), runs
//! as a job that streams the snapshots into the library, and keeps the
//! newest backup's snapshots as the VM's *backup base*: the next backup of
//! the VM reads only the ranges the store says changed since them. A
//! failed or interrupted backup drops its snapshots (at start,
//! [`App::drop_stray_snapshots`] removes any a crash left).
//!
//! A VM made from an appliance gets clones of the appliance's *base
//! volumes* (`_a:APP:N`, internal, snapshot `base`), which the first VM
//! made from it imports; every later one is an O(1) clone.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use keel_blockstore::DeviceKind;
use keel_images::library::Error as LibError;
use keel_images::{BackupDisk, Descriptor, Library};
use serde::Serialize;

use crate::app::{App, JobView, event, forbid_regular};
use crate::auth;
use crate::db::{USERS, VMS};
use crate::error::{ApiError, ApiResult, redact_paths};
use crate::model::{BackupBase, User, VmMeta, VmState, now};
use crate::names;

/// Longest appliance name (its base volumes are `_a:NAME:N`).
pub use crate::names::MAX_APPLIANCE_NAME;

impl From<LibError> for ApiError {
    fn from(e: LibError) -> ApiError {
        match e {
            LibError::NotFound(n) => ApiError::not_found(format!(
                "appliance {n} not found: `keel appliance list` shows the appliances you can use"
            )),
            LibError::Exists(n) => ApiError::conflict(format!("appliance {n} already exists: pick another name")),
            LibError::NoSpace(p) => {
                ApiError::no_space("the appliance library's disk is full: delete appliances you no longer need")
                    .with_detail(p.display())
            }
            LibError::BadName(n) => ApiError::bad(format!("{n:?} is not an appliance name")),
            LibError::Store(e) => e.into(),
            e @ LibError::Corrupt { .. } => {
                ApiError::internal(format!("{e}: the library is damaged; `keel appliance verify` lists what"), "")
            }
            e => ApiError::internal("the appliance library failed", e),
        }
    }
}

/// An appliance as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ApplianceView {
    /// Name.
    pub name: String,
    /// Owner.
    pub owner: String,
    /// Unix seconds.
    pub created: u64,
    /// The VM it came from.
    pub source_vm: Option<String>,
    /// vCPUs of a VM made from it.
    pub cpus: u32,
    /// Memory of a VM made from it.
    pub memory_bytes: u64,
    /// Boot order.
    pub boot: Vec<String>,
    /// Disks.
    pub disks: Vec<ApplianceDisk>,
    /// Sum of the disks' sizes.
    pub logical_bytes: u64,
    /// Compressed bytes of the chunks it names.
    pub stored_bytes: u64,
    /// Of those, the bytes no other appliance names.
    pub unique_bytes: u64,
}

/// A disk of an appliance.
#[derive(Clone, Debug, Serialize)]
pub struct ApplianceDisk {
    /// Id.
    pub id: String,
    /// Size.
    pub size_bytes: u64,
}

fn base_volume(app: &str, i: usize) -> String {
    format!("_a:{app}:{i}")
}

impl App {
    fn view_appliance(
        &self,
        d: &Descriptor,
        usage: &std::collections::HashMap<String, keel_images::Usage>,
    ) -> ApplianceView {
        let u = usage.get(&d.name).copied().unwrap_or_default();
        ApplianceView {
            name: d.name.clone(),
            owner: d.owner.clone(),
            created: d.created,
            source_vm: d.source_vm.clone(),
            cpus: d.cpus,
            memory_bytes: d.memory_bytes,
            boot: d.boot.clone(),
            disks: d.disks.iter().map(|m| ApplianceDisk { id: m.id.clone(), size_bytes: m.size }).collect(),
            logical_bytes: u.logical_bytes,
            stored_bytes: u.stored_bytes,
            unique_bytes: u.unique_bytes,
        }
    }

    fn may_see(&self, actor: &User, owner: &str) -> ApiResult<bool> {
        if actor.role == crate::model::Role::Manager {
            return Ok(true);
        }
        Ok(self.meta.get::<User>(USERS, owner)?.is_some_and(|o| auth::can_see_owned(actor, &o)))
    }

    fn visible_appliance(&self, actor: &User, name: &str) -> ApiResult<Descriptor> {
        forbid_regular(actor, "use appliances")?;
        let d = self.library.get(name)?;
        if !self.may_see(actor, &d.owner)? {
            return Err(LibError::NotFound(name.to_string()).into());
        }
        Ok(d)
    }

    /// Appliances `actor` may see.
    pub fn list_appliances(&self, actor: &User) -> ApiResult<Vec<ApplianceView>> {
        forbid_regular(actor, "use appliances")?;
        let usage = self.library.usage()?;
        let mut out = Vec::new();
        for d in self.library.list()? {
            if self.may_see(actor, &d.owner)? {
                out.push(self.view_appliance(&d, &usage));
            }
        }
        Ok(out)
    }

    /// One appliance.
    pub fn show_appliance(&self, actor: &User, name: &str) -> ApiResult<ApplianceView> {
        let d = self.visible_appliance(actor, name)?;
        Ok(self.view_appliance(&d, &self.library.usage()?))
    }

    /// Delete an appliance (and its base volumes); chunks nothing else
    /// names go. VMs made from it keep their disks.
    pub async fn delete_appliance(&self, actor: &User, name: &str) -> ApiResult<keel_images::GcReport> {
        let d = self.visible_appliance(actor, name)?;
        let _g = self.ops.lock().await;
        for i in 0..d.disks.len() {
            match self.pools.delete_volume(&base_volume(name, i), true).await {
                Ok(()) => {}
                Err(e) if e.kind() == keel_blockstore::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        let gc = self.library.delete(name).await?;
        let detail = format!("{} chunk(s), {} bytes freed", gc.chunks, gc.bytes);
        self.meta.write(|w| w.event(&event(&actor.name, "appliance.delete", name, &detail)))?;
        Ok(gc)
    }

    /// Re-hash every chunk of an appliance; the damage found.
    pub async fn verify_appliance(&self, actor: &User, name: &str) -> ApiResult<Vec<keel_images::Damage>> {
        self.visible_appliance(actor, name)?;
        let damage = self.library.verify(Some(name)).await?;
        let detail = format!("{} damaged chunk(s)", damage.len());
        self.meta.write(|w| w.event(&event(&actor.name, "appliance.verify", name, &detail)))?;
        Ok(damage)
    }

    /// Back up VM `vm` (running or not) as appliance `name`: a job. The
    /// VM's disks are snapshotted at one instant before this returns.
    pub async fn backup_vm(self: &Arc<Self>, actor: &User, vm: &str, name: &str) -> ApiResult<JobView> {
        forbid_regular(actor, "back up VMs")?;
        names::check_appliance(name).map_err(ApiError::bad)?;
        let m = self.visible_vm(actor, vm)?;
        if self.library.exists(name) {
            return Err(LibError::Exists(name.to_string()).into());
        }
        let lock = self.vms.lock(vm);
        let vm_guard = lock.lock_owned().await;
        let m = self.visible_vm(actor, &m.name)?;
        if matches!(m.state, VmState::Starting | VmState::Stopping) {
            return Err(ApiError::conflict(format!("VM {vm} is {}: try again in a moment", m.state.as_str())));
        }
        let snap = format!(
            "keel-backup-{}",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
        );
        let (paused_ms, consistency) = self.snapshot_disks(&m, &snap).await?;
        drop(vm_guard);
        let total: u64 = m.disks.iter().map(|d| self.pools.volume(&d.volume).map(|v| v.size()).unwrap_or(0)).sum();
        let job = self.start_job("vm.backup", name, &actor.name, total);
        let view = self.show_job(actor, job.id)?;
        let job = job.detach();
        let app = self.clone();
        let (actor, name) = (actor.clone(), name.to_string());
        tokio::spawn(async move {
            let job = app.adopt_job(job);
            let t0 = Instant::now();
            let r = app.run_backup(&actor, &m, &name, &snap, &job).await;
            match r {
                Ok(stats) => {
                    let secs = t0.elapsed().as_secs_f64();
                    let result = serde_json::json!({
                        "appliance": name,
                        "logical_bytes": stats.logical_bytes,
                        "read_bytes": stats.read_bytes,
                        "new_chunks": stats.new_chunks,
                        "new_bytes": stats.new_bytes,
                        "dedup_chunks": stats.dedup_chunks,
                        "seconds": secs,
                        "paused_ms": paused_ms,
                        "consistency": consistency,
                    });
                    let detail = format!(
                        "VM {} ({consistency}, paused {paused_ms:.1} ms): {} logical bytes, {} read, {} new in {:.2} s",
                        m.name, stats.logical_bytes, stats.read_bytes, stats.new_bytes, secs
                    );
                    app.log_event(&actor.name, "vm.backup", &name, &detail);
                    job.set_result(result);
                    job.finish(None);
                }
                Err(e) => {
                    app.log_event(&actor.name, "vm.backup-failed", &name, &e.message);
                    // Chunks it stored that nothing names (a full disk, say).
                    if let Err(g) = app.library.gc().await {
                        tracing::warn!("collecting after the failed backup {name}: {g}");
                    }
                    job.finish(Some(e.message));
                }
            }
        });
        Ok(view)
    }

    async fn run_backup(
        &self,
        actor: &User,
        m: &VmMeta,
        name: &str,
        snap: &str,
        job: &crate::app::Job,
    ) -> ApiResult<keel_images::BackupStats> {
        let r = self.run_backup_inner(actor, m, name, snap, job).await;
        // The new snapshots become the VM's backup base, or go.
        let keep = r.is_ok() && self.meta.get::<VmMeta>(VMS, &m.name)?.is_some();
        let old = m.backup_base.as_ref().map(|b| b.snapshot.clone());
        if keep {
            self.update_vm(&m.name, None, |v| {
                v.backup_base = Some(BackupBase { snapshot: snap.to_string(), appliance: name.to_string() })
            })?;
        }
        let drop_snap = if keep { old } else { Some(snap.to_string()) };
        if let Some(s) = drop_snap {
            for d in &m.disks {
                let _ = self.pools.delete_snapshot(&d.volume, &s).await;
            }
        }
        r
    }

    async fn run_backup_inner(
        &self,
        actor: &User,
        m: &VmMeta,
        name: &str,
        snap: &str,
        job: &crate::app::Job,
    ) -> ApiResult<keel_images::BackupStats> {
        // The previous backup, if its snapshots and appliance are still
        // there: only what changed since is read.
        let prev =
            m.backup_base.as_ref().and_then(|b| Some((b.snapshot.clone(), self.library.get(&b.appliance).ok()?)));
        let mut sources = Vec::new();
        for d in &m.disks {
            sources.push(self.pools.volume(&format!("{}@{snap}", d.volume))?);
        }
        let mut disks = Vec::new();
        for (d, src) in m.disks.iter().zip(&sources) {
            let mut base = None;
            if let Some((psnap, papp)) = &prev
                && let Some(pm) = papp.disks.iter().find(|x| x.id == d.id)
            {
                let from = format!("{}@{psnap}", d.volume);
                if let Ok(changed) = self.pools.changed_ranges(&from, &format!("{}@{snap}", d.volume)).await {
                    base = Some((pm.clone(), changed));
                }
            }
            disks.push(BackupDisk { id: d.id.clone(), source: src, base });
        }
        let head = Descriptor {
            name: name.to_string(),
            owner: actor.name.clone(),
            created: now(),
            source_vm: Some(m.name.clone()),
            cpus: m.cpus,
            memory_bytes: m.memory_bytes,
            boot: m.boot.clone(),
            disks: Vec::new(),
        };
        let progress = |b: u64| job.done.store(b, Ordering::Relaxed);
        let (_, stats) = self.library.backup(head, disks, &progress).await?;
        Ok(stats)
    }

    /// Appliance `d`'s base snapshots (`_a:APP:N@base`), importing the
    /// appliance into its base volumes first if this is their first use (or
    /// an import was interrupted). Call with the catalog lock held.
    pub(crate) async fn ensure_bases(&self, d: &Descriptor) -> ApiResult<Vec<String>> {
        let mut out = Vec::new();
        for (i, disk) in d.disks.iter().enumerate() {
            let base = base_volume(&d.name, i);
            let full = format!("{base}@base");
            if self.pools.volume(&full).is_err() {
                let _ = self.pools.delete_volume(&base, true).await;
                let vol = self.pools.create_volume(&base, disk.size).await?;
                let imported = self.library.restore_disk(disk, &vol, true, &|_| {}).await;
                drop(vol);
                if let Err(e) = imported {
                    let _ = self.pools.delete_volume(&base, true).await;
                    return Err(e.into());
                }
                self.pools.snapshot(&base, "base").await?;
            }
            out.push(full);
        }
        Ok(out)
    }

    /// The disks of a new VM made from appliance `app`: clones of its base
    /// volumes, imported first if this is the first VM made from it. Call
    /// with the catalog lock held.
    pub(crate) async fn disks_from_appliance(
        &self,
        actor: &User,
        app: &str,
        vm: &str,
        owner: &str,
    ) -> ApiResult<Vec<String>> {
        let d = self.visible_appliance(actor, app)?;
        let bases = self.ensure_bases(&d).await?;
        let mut made: Vec<String> = Vec::new();
        for (i, full) in bases.iter().enumerate() {
            let name = format!("{vm}-disk{i}");
            let r = async {
                self.begin_create(&name, owner, Some(full))?;
                let r = self.pools.clone_snapshot(full, &name).await;
                self.finish_create(actor, r.map(drop), &name, owner, Some(full), "volume.clone", full)
            }
            .await;
            if let Err(e) = r {
                for v in &made {
                    let _ = self.delete_volume_locked(actor, v.as_str(), true).await;
                }
                return Err(e);
            }
            made.push(name);
        }
        Ok(made)
    }

    /// A QEMU `json:` file name for device `device` of this daemon, over
    /// its private NBD socket (no key on qemu-img's command line).
    fn nbd_json(&self, device: &str) -> String {
        let spec = serde_json::json!({"driver": "raw", "file": {"driver": "nbd", "export": device,
            "server": {"type": "unix", "path": self.nbd_socket}}});
        format!("json:{spec}")
    }

    /// A scratch directory under `DATA/tmp` (removed at start).
    fn scratch(&self, what: &str) -> ApiResult<PathBuf> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let p = self.data.join("tmp").join(format!("{what}-{nanos}"));
        std::fs::create_dir_all(&p)
            .map_err(|e| ApiError::internal("making a scratch directory", format!("{}: {e}", p.display())))?;
        Ok(p)
    }

    /// Export appliance `app` as an OVA (OVF descriptor plus
    /// streamOptimized VMDK disks); returns the file, in a scratch
    /// directory the caller removes.
    pub async fn export_ova(&self, actor: &User, app: &str) -> ApiResult<PathBuf> {
        let d = self.visible_appliance(actor, app)?;
        let bases = {
            let _g = self.ops.lock().await;
            self.ensure_bases(&d).await?
        };
        let dir = self.scratch("export")?;
        let r = async {
            let mut files = Vec::new();
            let mut disks = Vec::new();
            for (i, (disk, base)) in d.disks.iter().zip(&bases).enumerate() {
                let file = format!("{app}-disk{i}.vmdk");
                let path = dir.join(&file);
                qemu_img(&["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", &self.nbd_json(base)], &path)
                    .await?;
                let file_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                disks.push(keel_images::ova::OvfDisk { file: file.clone(), capacity_bytes: disk.size, file_bytes });
                files.push((file, path));
            }
            let sys = keel_images::ova::OvfSystem {
                name: app.to_string(),
                cpus: d.cpus,
                memory_bytes: d.memory_bytes,
                disks,
            };
            let ova = dir.join(format!("{app}.ova"));
            keel_images::ova::write_ova(&ova, &format!("{app}.ovf"), &keel_images::ova::ovf_xml(&sys), &files)
                .map_err(|e| ApiError::internal("writing the OVA", e))?;
            for (_, p) in &files {
                let _ = std::fs::remove_file(p);
            }
            Ok::<_, ApiError>(ova)
        }
        .await;
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let ova = r?;
        self.log_event(&actor.name, "appliance.export", app, "OVA");
        Ok(ova)
    }

    /// Import the OVA at `ova` as appliance `name` (the OVF's name when
    /// `None`): its disks are converted into the appliance's base volumes,
    /// then stored in the library.
    pub async fn import_ova(
        &self,
        actor: &User,
        name: Option<&str>,
        ova: &std::path::Path,
    ) -> ApiResult<ApplianceView> {
        forbid_regular(actor, "import appliances")?;
        let dir = ova.parent().map(|p| p.join("extracted")).unwrap_or_else(|| PathBuf::from("extracted"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::internal("unpacking the OVA", format!("{}: {e}", dir.display())))?;
        let (xml, _files) = keel_images::ova::read_ova(ova, &dir)
            .map_err(|e| ApiError::bad(format!("not an OVA Keel can import: {}", redact_paths(&e.to_string()))))?;
        let sys = keel_images::ova::parse_ovf(&xml).map_err(|e| ApiError::bad(format!("the OVF descriptor: {e}")))?;
        let name = match name {
            Some(n) => n.to_string(),
            None => sys
                .name
                .to_lowercase()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' })
                .collect(),
        };
        names::check_appliance(&name).map_err(ApiError::bad)?;
        if self.library.exists(&name) {
            return Err(LibError::Exists(name).into());
        }
        if sys.disks.is_empty() {
            return Err(ApiError::bad("the OVA has no disks"));
        }
        let _g = self.ops.lock().await;
        let mut made = Vec::new();
        let r = async {
            for (i, disk) in sys.disks.iter().enumerate() {
                let base = base_volume(&name, i);
                let _ = self.pools.delete_volume(&base, true).await;
                let size = disk.capacity_bytes.div_ceil(512).saturating_mul(512);
                crate::model::check_volume_size(&format!("the OVA's disk {i} capacity"), size)
                    .map_err(ApiError::bad)?;
                self.pools.create_volume(&base, size).await?;
                made.push(base.clone());
                let src = dir.join(&disk.file);
                keel_images::ova::check_sparse_vmdk(&src).map_err(|e| {
                    ApiError::bad(format!("not an OVA Keel can import: {}", redact_paths(&e.to_string())))
                })?;
                qemu_img_to(&src, &self.nbd_json(&base)).await?;
                self.nbd.forget(&base);
                self.pools.snapshot(&base, "base").await?;
            }
            let snaps: Vec<_> =
                made.iter().map(|b| self.pools.volume(&format!("{b}@base"))).collect::<Result<_, _>>()?;
            let disks = snaps
                .iter()
                .enumerate()
                .map(|(i, v)| BackupDisk { id: format!("disk{i}"), source: v, base: None })
                .collect();
            let head = Descriptor {
                name: name.clone(),
                owner: actor.name.clone(),
                created: now(),
                source_vm: None,
                cpus: sys.cpus.max(1),
                memory_bytes: sys.memory_bytes.max(16 << 20),
                boot: vec!["disk".into(), "cdrom".into()],
                disks: Vec::new(),
            };
            self.library.backup(head, disks, &|_| {}).await?;
            Ok::<_, ApiError>(())
        }
        .await;
        if let Err(e) = r {
            for b in &made {
                let _ = self.pools.delete_volume(b, true).await;
            }
            return Err(e);
        }
        let detail = format!("{} disk(s) from {}", sys.disks.len(), sys.name);
        self.meta.write(|w| w.event(&event(&actor.name, "appliance.import", &name, &detail)))?;
        let d = self.library.get(&name)?;
        Ok(self.view_appliance(&d, &self.library.usage()?))
    }

    /// Overwrite stopped VM `vm`'s disks with appliance `app`'s content.
    pub async fn restore_vm(&self, actor: &User, vm: &str, app: &str) -> ApiResult<crate::vms::VmView> {
        forbid_regular(actor, "restore VMs")?;
        let d = self.visible_appliance(actor, app)?;
        self.visible_vm(actor, vm)?;
        let lock = self.vms.lock(vm);
        let _vm = lock.lock().await;
        let m = self.visible_vm(actor, vm)?;
        if m.state.has_qemu() {
            return Err(ApiError::conflict(format!(
                "VM {vm} is {}: stop it before restoring over its disks",
                m.state.as_str()
            )));
        }
        if d.disks.len() != m.disks.len() {
            return Err(ApiError::conflict(format!(
                "appliance {app} has {} disk(s) and VM {vm} {}: make a new VM from it instead",
                d.disks.len(),
                m.disks.len()
            )));
        }
        for (disk, vd) in d.disks.iter().zip(&m.disks) {
            let vol = self.pools.volume(&vd.volume)?;
            if vol.size() < disk.size {
                return Err(ApiError::conflict(format!(
                    "volume {} ({} bytes) is smaller than the appliance's disk {} ({} bytes)",
                    vd.volume,
                    vol.size(),
                    disk.id,
                    disk.size
                )));
            }
        }
        let job = self.start_job("vm.restore", vm, &actor.name, d.disks.iter().map(|x| x.size).sum());
        let mut done = 0u64;
        for (disk, vd) in d.disks.iter().zip(&m.disks) {
            let vol = self.pools.volume(&vd.volume)?;
            let progress = |b: u64| job.done.store(done + b, Ordering::Relaxed);
            if let Err(e) = self.library.restore_disk(disk, &vol, false, &progress).await {
                let e = ApiError::from(e);
                job.finish(Some(e.message.clone()));
                return Err(e);
            }
            done += disk.size;
        }
        job.finish(None);
        // The disks changed under the backup base: the next backup reads all.
        let old = m.backup_base.as_ref().map(|b| b.snapshot.clone());
        let m = self.update_vm(vm, Some((&actor.name, "vm.restore", app)), |v| v.backup_base = None)?;
        if let Some(b) = old {
            for d in &m.disks {
                let _ = self.pools.delete_snapshot(&d.volume, &b).await;
            }
        }
        self.show_vm(actor, vm)
    }

    /// Drop snapshots a crash left behind: clone snapshots, and backup
    /// snapshots that are no VM's backup base. Returns what it did.
    pub async fn drop_stray_snapshots(&self) -> ApiResult<Vec<String>> {
        let bases: std::collections::HashSet<String> =
            self.meta.list::<VmMeta>(VMS)?.into_iter().filter_map(|(_, m)| m.backup_base.map(|b| b.snapshot)).collect();
        let mut said = Vec::new();
        for d in self.pools.list().into_iter().filter(|d| d.kind == DeviceKind::Snapshot) {
            let Some((vol, snap)) = d.name.split_once('@') else { continue };
            let stray = snap.starts_with("keel-clone-") || (snap.starts_with("keel-backup-") && !bases.contains(snap));
            if stray && self.pools.delete_snapshot(vol, snap).await.is_ok() {
                said.push(format!("dropped snapshot {} left by an interrupted clone or backup", d.name));
            }
        }
        // Chunks of a backup that never committed.
        let gc = self.library.gc().await?;
        if gc.chunks > 0 {
            said.push(format!("removed {} chunk(s) ({} bytes) no appliance holds", gc.chunks, gc.bytes));
        }
        // A base volume without its snapshot is an interrupted import.
        for d in self.pools.list().into_iter().filter(|d| d.kind == DeviceKind::Volume && d.name.starts_with("_a:")) {
            if self.pools.volume(&format!("{}@base", d.name)).is_err()
                && self.pools.delete_volume(&d.name, true).await.is_ok()
            {
                said.push(format!("dropped {}, an appliance import that did not finish", d.name));
            }
        }
        Ok(said)
    }
}

/// `qemu-img ARGS... OUT` (the output file last).
async fn qemu_img(args: &[&str], out: &std::path::Path) -> ApiResult<()> {
    let o = tokio::process::Command::new("qemu-img")
        .args(args)
        .arg(out)
        .output()
        .await
        .map_err(|e| ApiError::internal("running qemu-img (is qemu-utils installed?)", e))?;
    if !o.status.success() {
        return Err(ApiError::internal(format!("qemu-img {}", args[0]), String::from_utf8_lossy(&o.stderr).trim()));
    }
    Ok(())
}

/// Convert the sparse VMDK `src` (checked by `check_sparse_vmdk`) into the
/// existing raw target `dst` (a `json:` file name). The format is forced and
/// the backing file off, so qemu-img opens `src` and nothing else: an
/// uploaded image never makes it read another file of the host.
async fn qemu_img_to(src: &std::path::Path, dst: &str) -> ApiResult<()> {
    let source = serde_json::json!({
        "driver": "vmdk",
        "backing": null,
        "file": { "driver": "file", "filename": src },
    });
    let o = tokio::process::Command::new("qemu-img")
        .args(["convert", "-n", "-O", "raw"])
        .arg(format!("json:{source}"))
        .arg(dst)
        .output()
        .await
        .map_err(|e| ApiError::internal("running qemu-img (is qemu-utils installed?)", e))?;
    if !o.status.success() {
        return Err(ApiError::bad(format!(
            "disk {} of the OVA could not be read: {}",
            src.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
            redact_paths(String::from_utf8_lossy(&o.stderr).trim())
        )));
    }
    Ok(())
}

/// Open the library of data directory `data`.
pub fn open_library(data: &std::path::Path) -> Result<Library, LibError> {
    Library::open(&data.join("library"))
}
