//! Virtual machines: records, lifecycle, clones of running VMs, metering.
//!
//! A VM's disks are Keel volumes that QEMU reaches through its own NBD
//! client at the volume's NBD URL, the path any remote host would use. QEMU
//! runs daemonized (see [`keel_vmm_glue::process`]) with its QMP socket,
//! guest-agent socket, pid file and serial console log in `DATA/vms/NAME/`,
//! so VMs keep running while the daemon restarts; [`App::adopt_vms`] finds
//! them again at start.
//!
//! One watcher task per running VM waits for QEMU's QMP socket to close and
//! records the end: `stopped` when a stop was asked or the guest powered
//! itself off (a QMP `SHUTDOWN` event from the guest), `crashed` otherwise.
//! It is the only place an exit is recorded; a stop waits for it.
//!
//! Running time is recorded per owner, VM and hour in [`crate::db::USAGE`]
//! ([`App::meter`]): at every stop or crash, every minute while running,
//! and before usage is read.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keel_vmm_glue::accel::Choice;
use keel_vmm_glue::config::CDROM_DEVICE;
use keel_vmm_glue::{Accel, BootDevice, DirectBoot, DiskSource, NetBackend, Qmp, VmConfig, VmDisk, VmNic, process};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::app::{App, event, forbid_regular};
use crate::auth;
use crate::db::{self, ISOS, USAGE, USERS, VMS, VOLUMES};
use crate::error::{ApiError, ApiResult};
use crate::model::{
    IsoMeta, KernelBoot, Network, Role, UsageRow, User, VmDiskMeta, VmEvent, VmMeta, VmNicMeta, VmState, VolumeMeta,
    now, split_hours,
};
use crate::names;

/// How VMs are run on this host.
#[derive(Clone, Debug)]
pub struct VmSettings {
    /// The QEMU binary (a name looked up in `PATH`, or a path).
    pub qemu: String,
    /// Accelerator setting.
    pub accel: Accel,
    /// How long a graceful stop waits for the guest before forcing.
    pub stop_timeout: Duration,
}

impl Default for VmSettings {
    fn default() -> Self {
        VmSettings {
            qemu: keel_vmm_glue::DEFAULT_QEMU.into(),
            accel: Accel::Auto,
            stop_timeout: Duration::from_secs(30),
        }
    }
}

/// A VM whose QEMU runs.
struct Running {
    qmp: Arc<Qmp>,
    pid: i32,
    cfg: VmConfig,
    /// A stop was asked: its exit is not a crash.
    stopping: AtomicBool,
    /// Set by the watcher once the exit is recorded.
    exited: watch::Receiver<bool>,
}

/// The VMs' runtime state.
pub struct VmRuntime {
    /// Settings.
    pub settings: VmSettings,
    choice: tokio::sync::OnceCell<Choice>,
    running: Mutex<HashMap<String, Arc<Running>>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl VmRuntime {
    /// Runtime with `settings`.
    pub fn new(settings: VmSettings) -> VmRuntime {
        VmRuntime {
            settings,
            choice: tokio::sync::OnceCell::new(),
            running: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// Operations on one VM run one at a time.
    pub(crate) fn lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().entry(name.to_string()).or_default().clone()
    }

    fn running(&self, name: &str) -> Option<Arc<Running>> {
        self.running.lock().get(name).cloned()
    }
}

/// A VM as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct VmView {
    /// Name.
    pub name: String,
    /// Owner.
    pub owner: String,
    /// State.
    pub state: VmState,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest memory.
    pub memory_bytes: u64,
    /// Disks.
    pub disks: Vec<VmDiskView>,
    /// ISO in the CD-ROM.
    pub cdrom: Option<String>,
    /// NICs.
    pub nics: Vec<VmNicMeta>,
    /// Boot order.
    pub boot: Vec<String>,
    /// Direct kernel boot.
    pub kernel: Option<KernelBoot>,
    /// QEMU's pid while running.
    pub pid: Option<i32>,
    /// Why it last failed.
    pub error: Option<String>,
    /// Unix seconds.
    pub created: u64,
    /// When the current run started.
    pub started: Option<u64>,
}

/// A disk as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct VmDiskView {
    /// Device id.
    pub id: String,
    /// Volume.
    pub volume: String,
    /// The URL QEMU uses.
    pub nbd_url: String,
}

/// A request to create a VM.
#[derive(Clone, Debug, Default)]
pub struct CreateVm {
    /// Name.
    pub name: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest memory.
    pub memory_bytes: u64,
    /// Existing volumes to attach.
    pub disks: Vec<String>,
    /// Size of a new empty disk `NAME-disk0`, attached first.
    pub blank_disk: Option<u64>,
    /// ISO for the CD-ROM.
    pub iso: Option<String>,
    /// NICs (default: one user-mode NIC).
    pub nics: Option<Vec<Network>>,
    /// Boot order (default: disk, cdrom).
    pub boot: Option<Vec<String>>,
    /// Direct kernel boot.
    pub kernel: Option<KernelBoot>,
    /// Owner (default: the caller).
    pub owner: Option<String>,
    /// Appliance whose disks the VM gets (clones of its base volumes).
    pub from_appliance: Option<String>,
}

fn vm_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("VM {name} not found: `keel vm list` shows the VMs you can use"))
}

fn qmp_err(name: &str, e: keel_vmm_glue::QmpError) -> ApiError {
    // QEMU refusing a command (a bridge it may not join, a device the guest
    // will not let go) is the VM's state: a 409 with QEMU's words.
    if let keel_vmm_glue::QmpError::Command { .. } = &e {
        return ApiError::conflict(format!("VM {name}: {}", crate::error::redact_paths(&e.to_string())));
    }
    ApiError::internal(format!("talking to VM {name}'s QEMU"), e)
}

/// A random locally administered MAC in QEMU's 52:54:00 range.
fn random_mac() -> String {
    use rand::Rng;
    let b: [u8; 3] = rand::thread_rng().r#gen();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

fn boot_device(s: &str) -> ApiResult<BootDevice> {
    match s {
        "cdrom" => Ok(BootDevice::Cdrom),
        "disk" => Ok(BootDevice::Disk),
        "network" => Ok(BootDevice::Network),
        _ => Err(ApiError::bad(format!("boot device {s:?} is not one of cdrom, disk, network"))),
    }
}

/// Check a NIC's network. A tap or bridge puts the VM on a host network
/// (QEMU runs as root: it opens any tap, and its bridge helper joins what
/// `/etc/qemu/bridge.conf` allows): a manager's decision, like a host
/// kernel file.
fn check_network(actor: &User, n: &Network) -> ApiResult<()> {
    let name = match n {
        Network::User => return Ok(()),
        Network::Tap(i) | Network::Bridge(i) => i,
    };
    if actor.role != Role::Manager {
        return Err(ApiError::forbidden(
            "only a manager may connect a VM to a host tap or bridge; use the user network (\"user\")",
        ));
    }
    let ok =
        !name.is_empty() && name.len() < 16 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok { Ok(()) } else { Err(ApiError::bad(format!("{name:?} is not a network interface name"))) }
}

/// The first free `PREFIXn`.
fn next_id<'a>(prefix: &str, used: impl Iterator<Item = &'a str>) -> String {
    let used: Vec<&str> = used.collect();
    (0..).map(|i| format!("{prefix}{i}")).find(|id| !used.contains(&id.as_str())).expect("ids are unbounded")
}

impl App {
    // ----- records and rights -----

    /// `DATA/vms/NAME`, for a name that passes [`names::path_safe`].
    pub(crate) fn vm_dir(&self, name: &str) -> ApiResult<PathBuf> {
        Ok(self.data.join("vms").join(names::path_safe(name)?))
    }

    /// The VM `name` if `actor` may see it (a regular user: its own).
    pub(crate) fn visible_vm(&self, actor: &User, name: &str) -> ApiResult<VmMeta> {
        let m: VmMeta = self.meta.get(VMS, name)?.ok_or_else(|| vm_not_found(name))?;
        if actor.role == Role::Manager {
            return Ok(m);
        }
        match self.meta.get::<User>(USERS, &m.owner)? {
            Some(o) if auth::can_see_owned(actor, &o) => Ok(m),
            _ => Err(vm_not_found(name)),
        }
    }

    fn vm_view(&self, m: &VmMeta) -> VmView {
        VmView {
            name: m.name.clone(),
            owner: m.owner.clone(),
            state: m.state,
            cpus: m.cpus,
            memory_bytes: m.memory_bytes,
            disks: m
                .disks
                .iter()
                .map(|d| VmDiskView {
                    id: d.id.clone(),
                    volume: d.volume.clone(),
                    nbd_url: self.device_nbd_url(&d.volume),
                })
                .collect(),
            cdrom: m.cdrom.clone(),
            nics: m.nics.clone(),
            boot: m.boot.clone(),
            kernel: m.kernel.clone(),
            pid: m.pid,
            error: m.error.clone(),
            created: m.created,
            started: m.started,
        }
    }

    /// VMs `actor` may see.
    pub fn list_vms(&self, actor: &User) -> ApiResult<Vec<VmView>> {
        let users = self.users_by_name()?;
        Ok(self
            .meta
            .list::<VmMeta>(VMS)?
            .into_iter()
            .filter(|(_, m)| {
                actor.role == Role::Manager || users.get(&m.owner).is_some_and(|o| auth::can_see_owned(actor, o))
            })
            .map(|(_, m)| self.vm_view(&m))
            .collect())
    }

    /// One VM.
    pub fn show_vm(&self, actor: &User, name: &str) -> ApiResult<VmView> {
        Ok(self.vm_view(&self.visible_vm(actor, name)?))
    }

    /// VMs that have `volume` attached.
    pub fn volume_vms(&self, volume: &str) -> ApiResult<Vec<String>> {
        Ok(self
            .meta
            .list::<VmMeta>(VMS)?
            .into_iter()
            .filter(|(_, m)| m.disks.iter().any(|d| d.volume == volume))
            .map(|(k, _)| k)
            .collect())
    }

    /// VMs with ISO `iso` in their CD-ROM.
    pub fn iso_vms(&self, iso: &str) -> ApiResult<Vec<String>> {
        Ok(self
            .meta
            .list::<VmMeta>(VMS)?
            .into_iter()
            .filter(|(_, m)| m.cdrom.as_deref() == Some(iso))
            .map(|(k, _)| k)
            .collect())
    }

    /// Update VM `name`'s record in one transaction (with an event when
    /// `action` is given).
    pub(crate) fn update_vm(
        &self,
        name: &str,
        ev: Option<(&str, &str, &str)>,
        mut f: impl FnMut(&mut VmMeta),
    ) -> ApiResult<VmMeta> {
        self.meta.write(|w| {
            let mut m: VmMeta = w.get(VMS, name)?.ok_or_else(|| vm_not_found(name))?;
            f(&mut m);
            w.put(VMS, name, &m)?;
            if let Some((user, action, detail)) = ev {
                w.event(&event(user, action, name, detail))?;
            }
            Ok::<_, ApiError>(m)
        })
    }

    /// CPUs and memory the VMs of Power User `tenant`'s tenant have.
    fn tenant_vm_usage(&self, tenant: &str) -> ApiResult<(u32, u64)> {
        let users = self.users_by_name()?;
        let mut cpus = 0u32;
        let mut mem = 0u64;
        for (_, m) in self.meta.list::<VmMeta>(VMS)? {
            if users.get(&m.owner).and_then(auth::tenant_of) == Some(tenant) {
                cpus = cpus.saturating_add(m.cpus);
                mem = mem.saturating_add(m.memory_bytes);
            }
        }
        Ok((cpus, mem))
    }

    /// The vCPUs and memory `actor`'s tenant may still give VMs (`None`:
    /// no quota applies).
    pub fn vm_quota_left(&self, actor: &User) -> ApiResult<Option<(u32, u64)>> {
        let Some(tenant) = auth::tenant_of(actor) else { return Ok(None) };
        let Some(q) = self.user(tenant)?.and_then(|t| t.quota) else { return Ok(None) };
        let (cpus, mem) = self.tenant_vm_usage(tenant)?;
        Ok(Some((q.cpus.saturating_sub(cpus), q.memory_bytes.saturating_sub(mem))))
    }

    fn check_vm_quota(&self, owner: &User, cpus: u32, memory: u64) -> ApiResult<()> {
        let Some(tenant) = auth::tenant_of(owner) else { return Ok(()) };
        let Some(q) = self.user(tenant)?.and_then(|t| t.quota) else { return Ok(()) };
        let (used_cpus, used_mem) = self.tenant_vm_usage(tenant)?;
        if used_cpus.saturating_add(cpus) > q.cpus {
            return Err(ApiError::no_space(format!(
                "CPU quota of {tenant} exceeded: {used_cpus} vCPUs in VMs + {cpus} requested > {} allowed; ask a manager to raise the quota",
                q.cpus
            )));
        }
        if used_mem.saturating_add(memory) > q.memory_bytes {
            return Err(ApiError::no_space(format!(
                "memory quota of {tenant} exceeded: {used_mem} bytes in VMs + {memory} requested > {} allowed; ask a manager to raise the quota",
                q.memory_bytes
            )));
        }
        Ok(())
    }

    /// Resolve and check the owner of a new VM.
    fn vm_owner(&self, actor: &User, owner: Option<&str>, cpus: u32, memory: u64) -> ApiResult<User> {
        let owner = match owner {
            None => actor.clone(),
            Some(o) => {
                let u = self.user(o)?.filter(|u| auth::can_see_user(actor, u));
                u.ok_or_else(|| ApiError::not_found(format!("user {o} not found")))?
            }
        };
        if owner.role == Role::Regular {
            if owner.parent.is_none() && actor.role != Role::Manager {
                return Err(ApiError::forbidden("only a manager may give VMs to users outside a tenant"));
            }
            if let Some((vm, _)) = self.meta.list::<VmMeta>(VMS)?.into_iter().find(|(_, m)| m.owner == owner.name) {
                return Err(ApiError::conflict(format!(
                    "regular user {} already owns VM {vm}: a regular user owns exactly one VM",
                    owner.name
                )));
            }
        }
        self.check_vm_quota(&owner, cpus, memory)?;
        Ok(owner)
    }

    fn check_memory(memory: u64) -> ApiResult<()> {
        if memory < 16 << 20 || !memory.is_multiple_of(1 << 20) {
            return Err(ApiError::bad(format!("memory {memory} must be a whole number of MiB, at least 16M")));
        }
        if let Some(host) = process::host_memory_bytes()
            && memory > host
        {
            return Err(ApiError::bad(format!(
                "the VM asks for {} MiB of memory but this host has {} MiB in all",
                memory >> 20,
                host >> 20
            )));
        }
        Ok(())
    }

    fn check_iso(&self, iso: &str) -> ApiResult<()> {
        if self.meta.get::<IsoMeta>(ISOS, iso)?.is_none() {
            return Err(ApiError::not_found(format!(
                "ISO {iso} not found: `keel iso list` shows the ISO store, `keel iso upload` adds one"
            )));
        }
        Ok(())
    }

    /// `volume` may be attached by `actor` and is not attached to a VM yet.
    fn check_attachable(&self, actor: &User, volume: &str) -> ApiResult<()> {
        self.visible_volume(actor, volume)?;
        let users = self.volume_vms(volume)?;
        if !users.is_empty() {
            return Err(ApiError::conflict(format!(
                "volume {volume} is already attached read-write to VM {}: a volume belongs to one VM at a time; clone it (snapshot, then clone) to use its data elsewhere",
                users.join(", ")
            )));
        }
        Ok(())
    }

    // ----- create and delete -----

    /// Create a VM (stopped).
    pub async fn create_vm(&self, actor: &User, req: CreateVm) -> ApiResult<VmView> {
        forbid_regular(actor, "create VMs")?;
        names::check_new_vm(&req.name).map_err(ApiError::bad)?;
        if req.name.len() > 57 {
            return Err(ApiError::bad("a VM name is at most 57 characters (its disks are named NAME-diskN)"));
        }
        if !(1..=64).contains(&req.cpus) {
            return Err(ApiError::bad(format!("cpus {} must be between 1 and 64", req.cpus)));
        }
        App::check_memory(req.memory_bytes)?;
        let boot = req.boot.clone().unwrap_or_else(|| vec!["disk".into(), "cdrom".into()]);
        for b in &boot {
            boot_device(b)?;
        }
        let nets = req.nics.clone().unwrap_or_else(|| vec![Network::User]);
        for n in &nets {
            check_network(actor, n)?;
        }
        if let Some(k) = &req.kernel {
            if actor.role != Role::Manager {
                return Err(ApiError::forbidden(
                    "only a manager may boot a VM from a kernel file on the host (its files become readable to the guest)",
                ));
            }
            if k.append.len() > 4096 || k.append.contains('\0') {
                return Err(ApiError::bad("the kernel command line takes at most 4096 bytes and no NUL"));
            }
            for f in std::iter::once(&k.kernel).chain(k.initrd.as_ref()) {
                if !f.starts_with('/') || f.len() > 4096 || f.chars().any(char::is_control) {
                    return Err(ApiError::bad(
                        "kernel and initrd are absolute paths of files on the host, without control characters",
                    ));
                }
                if !std::path::Path::new(f).is_file() {
                    return Err(ApiError::bad(format!("{f} is not a file on the host")));
                }
            }
        }
        if req.disks.is_empty()
            && req.blank_disk.is_none()
            && req.iso.is_none()
            && req.kernel.is_none()
            && req.from_appliance.is_none()
        {
            return Err(ApiError::bad(
                "the VM has nothing to boot: give it a disk (--disk, --blank-disk or --from-appliance), an ISO or a kernel",
            ));
        }
        let _g = self.ops.lock().await;
        if self.meta.get::<VmMeta>(VMS, &req.name)?.is_some() {
            return Err(ApiError::conflict(format!("VM {} already exists: pick another name", req.name)));
        }
        let owner = self.vm_owner(actor, req.owner.as_deref(), req.cpus, req.memory_bytes)?;
        if let Some(iso) = &req.iso {
            self.check_iso(iso)?;
        }
        let mut seen = Vec::new();
        for v in &req.disks {
            if seen.contains(v) {
                return Err(ApiError::bad(format!("volume {v} is given twice")));
            }
            seen.push(v.clone());
            self.check_attachable(actor, v)?;
        }
        let mut volumes = Vec::new();
        let mut made: Vec<String> = Vec::new();
        if let Some(size) = req.blank_disk {
            let disk = format!("{}-disk0", req.name);
            crate::model::check_volume_size("blank disk size", size).map_err(ApiError::bad)?;
            self.check_quota(&owner, size)?;
            self.begin_create(&disk, &owner.name, None)?;
            let r = self.pools.create_volume(&disk, size).await;
            self.finish_create(actor, r.map(drop), &disk, &owner.name, None, "volume.create", "blank disk")?;
            volumes.push(disk.clone());
            made.push(disk);
        }
        if let Some(app) = &req.from_appliance {
            let sizes: u64 = self.library.get(app).map(|d| d.disks.iter().map(|m| m.size).sum()).unwrap_or(0);
            let r = match self.check_quota(&owner, sizes) {
                Ok(()) => self.disks_from_appliance(actor, app, &req.name, &owner.name).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(v) => {
                    volumes.extend(v.iter().cloned());
                    made.extend(v);
                }
                Err(e) => {
                    for d in &made {
                        let _ = self.delete_volume_locked(actor, d, true).await;
                    }
                    return Err(e);
                }
            }
        }
        volumes.extend(req.disks.iter().cloned());
        let disks: Vec<VmDiskMeta> =
            volumes.into_iter().enumerate().map(|(i, v)| VmDiskMeta { id: format!("disk{i}"), volume: v }).collect();
        let nics = nets
            .into_iter()
            .enumerate()
            .map(|(i, n)| VmNicMeta { id: format!("nic{i}"), mac: random_mac(), network: n })
            .collect();
        let m = VmMeta {
            name: req.name.clone(),
            owner: owner.name.clone(),
            cpus: req.cpus,
            memory_bytes: req.memory_bytes,
            disks,
            cdrom: req.iso.clone(),
            nics,
            boot,
            kernel: req.kernel.clone(),
            state: VmState::Stopped,
            pid: None,
            error: None,
            created: now(),
            started: None,
            metered_until: None,
            backup_base: None,
        };
        let detail = format!("{} vCPU, {} MiB, owner {}", m.cpus, m.memory_bytes >> 20, m.owner);
        let r = self.meta.write(|w| {
            w.put(VMS, &m.name, &m)?;
            w.event(&event(&actor.name, "vm.create", &m.name, &detail))?;
            Ok::<_, db::Error>(())
        });
        if let Err(e) = r {
            for d in &made {
                let _ = self.delete_volume_locked(actor, d, true).await;
            }
            return Err(e.into());
        }
        Ok(self.vm_view(&m))
    }

    /// Delete a VM; its disks too when `delete_disks`. A running VM is
    /// refused unless `force`, which stops it first.
    pub async fn delete_vm(&self, actor: &User, name: &str, delete_disks: bool, force: bool) -> ApiResult<()> {
        forbid_regular(actor, "delete VMs")?;
        let m = self.visible_vm(actor, name)?;
        if m.state.has_qemu() {
            if !force {
                return Err(ApiError::conflict(format!(
                    "VM {name} is {}: stop it first, or delete with force",
                    m.state.as_str()
                )));
            }
            self.stop_vm(actor, name, true).await?;
        }
        let lock = self.vms.lock(name);
        let _vm = lock.lock().await;
        let _g = self.ops.lock().await;
        let m = self.visible_vm(actor, name)?;
        if m.state.has_qemu() {
            return Err(ApiError::conflict(format!("VM {name} was started again meanwhile")));
        }
        self.meter(name, now())?;
        self.meta.write(|w| {
            w.remove(VMS, name)?;
            w.event(&event(
                &actor.name,
                "vm.delete",
                name,
                if delete_disks { "with its disks" } else { "disks kept" },
            ))?;
            Ok::<_, db::Error>(())
        })?;
        if let Ok(dir) = self.vm_dir(name) {
            let _ = std::fs::remove_dir_all(dir);
        }
        let mut failed = Vec::new();
        if delete_disks {
            for d in &m.disks {
                // QEMU's NBD connections close as it exits; give the server
                // a moment to see them go.
                let deadline = Instant::now() + Duration::from_secs(5);
                while self.nbd.sessions(&d.volume) > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if let Err(e) = self.delete_volume_locked(actor, &d.volume, true).await {
                    failed.push(format!("{}: {}", d.volume, e.message));
                }
            }
        }
        if !failed.is_empty() {
            return Err(ApiError::conflict(format!(
                "VM {name} is deleted, but not all its disks: {}",
                failed.join("; ")
            )));
        }
        Ok(())
    }

    // ----- power -----

    /// The accelerator VMs run with: the setting, or for `auto` the probe's
    /// choice. The probe runs once per host configuration: its answer is
    /// kept in `DATA/accel.json` under a key naming the QEMU binary (and
    /// its modification time), the kernel release and whether `/dev/kvm`
    /// exists, so a restart does not pay it again.
    pub async fn accel(&self) -> Choice {
        self.vms
            .choice
            .get_or_init(|| async {
                let qemu = process::find_qemu(&self.vms.settings.qemu)
                    .unwrap_or_else(|_| PathBuf::from(&self.vms.settings.qemu));
                let setting = self.vms.settings.accel;
                let key = probe_key(&qemu);
                let cache = self.data.join("accel.json");
                if setting == Accel::Auto
                    && let Some(c) = read_probe(&cache, &key)
                {
                    tracing::info!(target: "keel::vm", accel = c.accel.as_str(), "accelerator (probed before): {}", c.reason);
                    return c;
                }
                let c = tokio::task::spawn_blocking(move || keel_vmm_glue::accel::resolve(&qemu, setting))
                    .await
                    .unwrap_or(Choice { accel: Accel::Tcg, reason: "the probe failed to run: TCG".into() });
                tracing::info!(target: "keel::vm", accel = c.accel.as_str(), "accelerator: {}", c.reason);
                if setting == Accel::Auto {
                    let doc = json!({"key": key, "accel": c.accel.as_str(), "reason": c.reason});
                    let _ = std::fs::write(&cache, doc.to_string());
                }
                c
            })
            .await
            .clone()
    }

    /// The QEMU configuration of `m`.
    fn vm_config(&self, m: &VmMeta, accel: Accel) -> ApiResult<VmConfig> {
        Ok(VmConfig {
            name: m.name.clone(),
            cpus: m.cpus,
            memory_mib: m.memory_bytes >> 20,
            accel,
            disks: m
                .disks
                .iter()
                .map(|d| VmDisk {
                    id: d.id.clone(),
                    source: DiskSource::NbdUnix { path: self.nbd_socket.clone(), export: d.volume.clone() },
                    read_only: false,
                })
                .collect(),
            cdrom: m.cdrom.as_deref().map(|i| self.iso_path(i)).transpose()?,
            nics: m.nics.iter().map(nic_config).collect(),
            boot: m.boot.iter().filter_map(|b| boot_device(b).ok()).collect(),
            direct: m.kernel.as_ref().map(|k| DirectBoot {
                kernel: k.kernel.clone().into(),
                initrd: k.initrd.clone().map(Into::into),
                append: k.append.clone(),
            }),
            run_dir: self.vm_dir(&m.name)?,
        })
    }

    /// Start a VM.
    pub async fn start_vm(self: &Arc<Self>, actor: &User, name: &str) -> ApiResult<VmView> {
        self.visible_vm(actor, name)?;
        let lock = self.vms.lock(name);
        let _vm = lock.lock().await;
        self.start_locked(actor, name).await
    }

    async fn start_locked(self: &Arc<Self>, actor: &User, name: &str) -> ApiResult<VmView> {
        let m = self.visible_vm(actor, name)?;
        m.state.next(VmEvent::Start).map_err(|e| ApiError::conflict(format!("cannot start VM {name}: {e}")))?;
        // The message is the operator's to act on, and names only the QEMU
        // binary the operator configured.
        let qemu = process::find_qemu(&self.vms.settings.qemu).map_err(|e| {
            ApiError::internal(format!("starting VM {name}: {}", crate::error::redact_paths(&e.to_string())), e)
        })?;
        App::check_memory(m.memory_bytes)?;
        if let Some(iso) = &m.cdrom {
            self.check_iso(iso)?;
        }
        for d in &m.disks {
            if self.meta.get::<VolumeMeta>(VOLUMES, &d.volume)?.is_none() {
                return Err(ApiError::not_found(format!("VM {name}'s disk volume {} is gone", d.volume)));
            }
        }
        let choice = self.accel().await;
        let cfg = self.vm_config(&m, choice.accel)?;
        self.update_vm(name, None, |m| {
            m.state = VmState::Starting;
            m.error = None;
        })?;
        std::fs::create_dir_all(&cfg.run_dir).map_err(|e| {
            ApiError::internal("making the VM's run directory", format!("{}: {e}", cfg.run_dir.display()))
        })?;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(cfg.console_log()) {
            use std::io::Write;
            let _ = writeln!(f, "\r\n--- keel: {name} starting at {} ({}) ---\r", now(), choice.accel);
        }
        let started = async {
            // QEMU refusing the VM's configuration (a bridge it may not use,
            // a missing tap or kernel file) is the VM's state, not a fault
            // of the appliance: a 409 that says what QEMU said.
            let pid = process::launch(&qemu, &cfg)
                .await
                .map_err(|e| (matches!(e, process::LaunchError::Failed(_)), e.to_string()))?;
            match Qmp::connect(&cfg.qmp_socket(), Duration::from_secs(10)).await {
                Ok(q) => Ok((pid, q)),
                Err(e) => {
                    process::kill_if_ours(pid, &cfg.qmp_socket());
                    Err((false, format!("QEMU started but its QMP socket failed: {e}")))
                }
            }
        }
        .await;
        let (pid, qmp) = match started {
            Ok(x) => x,
            Err((refused, e)) => {
                // QEMU's own words say what to fix, without the host's paths.
                let said = crate::error::redact_paths(&e);
                self.update_vm(name, Some((&actor.name, "vm.start-failed", &said)), |m| {
                    m.state = VmState::Stopped;
                    m.error = Some(said.clone());
                    m.pid = None;
                })?;
                if refused {
                    return Err(ApiError::conflict(format!(
                        "VM {name} did not start: {said}; change what QEMU names (a NIC, a disk, the kernel) and \
                         start it again"
                    )));
                }
                return Err(ApiError::internal(format!("VM {name} did not start: {said}"), e));
            }
        };
        let t = now();
        let m = self.update_vm(name, Some((&actor.name, "vm.start", choice.accel.as_str())), |m| {
            m.state = VmState::Running;
            m.pid = Some(pid);
            m.started = Some(t);
            m.metered_until = Some(t);
        })?;
        self.watch(name, pid, qmp, cfg);
        Ok(self.vm_view(&m))
    }

    /// Track a running QEMU and record its end.
    fn watch(self: &Arc<Self>, name: &str, pid: i32, qmp: Arc<Qmp>, cfg: VmConfig) {
        let (tx, rx) = watch::channel(false);
        let run = Arc::new(Running { qmp, pid, cfg, stopping: AtomicBool::new(false), exited: rx });
        self.vms.running.lock().insert(name.to_string(), run.clone());
        let app = self.clone();
        let name = name.to_string();
        let mut events = run.qmp.events();
        tokio::spawn(async move {
            let mut guest_off = false;
            loop {
                tokio::select! {
                    e = events.recv() => match e {
                        Ok(e) if e.name == "SHUTDOWN" => guest_off |= e.data["guest"] == true,
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => break,
                    },
                    _ = run.qmp.closed() => break,
                }
            }
            while let Ok(e) = events.try_recv() {
                guest_off |= e.name == "SHUTDOWN" && e.data["guest"] == true;
            }
            // QEMU closes QMP as it exits; make sure it is gone.
            if !process::wait_gone(run.pid, &run.cfg.qmp_socket(), Duration::from_secs(5)).await {
                process::kill_if_ours(run.pid, &run.cfg.qmp_socket());
            }
            let asked = run.stopping.load(Ordering::SeqCst);
            app.vms.running.lock().remove(&name);
            app.record_exit(&name, asked || guest_off);
            let _ = tx.send(true);
        });
    }

    /// Record that VM `name`'s QEMU is gone: `clean` when asked to or the
    /// guest powered off.
    fn record_exit(&self, name: &str, clean: bool) {
        let t = now();
        if let Err(e) = self.meter(name, t) {
            tracing::error!("metering VM {name}: {e}");
        }
        let (action, detail) = if clean {
            ("vm.stopped", "")
        } else {
            ("vm.crashed", "QEMU exited unexpectedly (killed or crashed); see `keel vm log`")
        };
        let r = self.update_vm(name, Some(("keel", action, detail)), |m| {
            let ev = if clean { VmEvent::Exited } else { VmEvent::Died };
            m.state = m.state.next(ev).unwrap_or(if clean { VmState::Stopped } else { VmState::Crashed });
            m.pid = None;
            m.started = None;
            m.metered_until = None;
            if !clean {
                m.error = Some(detail.to_string());
            }
        });
        if let Err(e) = r {
            // The VM may have been deleted meanwhile (forced delete).
            tracing::debug!("recording the end of VM {name}: {e}");
        }
    }

    /// Stop a VM: ACPI power button, then forced after the stop timeout;
    /// `force` skips the guest's shutdown.
    pub async fn stop_vm(&self, actor: &User, name: &str, force: bool) -> ApiResult<VmView> {
        let m = self.visible_vm(actor, name)?;
        let lock = self.vms.lock(name);
        let _vm = lock.lock().await;
        m.state.next(VmEvent::Stop).map_err(|e| ApiError::conflict(format!("cannot stop VM {name}: {e}")))?;
        let Some(run) = self.vms.running(name) else {
            // The record says running but no QEMU is tracked.
            self.record_exit(name, true);
            return self.show_vm(actor, name);
        };
        run.stopping.store(true, Ordering::SeqCst);
        self.update_vm(name, Some((&actor.name, "vm.stop", if force { "forced" } else { "ACPI shutdown" })), |m| {
            m.state = VmState::Stopping
        })?;
        let mut done = false;
        if !force {
            match run.qmp.execute_within("system_powerdown", Value::Null, Duration::from_secs(5)).await {
                Ok(_) => done = wait_exit(&run, self.vms.settings.stop_timeout).await,
                Err(e) => tracing::warn!("VM {name}: system_powerdown: {e}"),
            }
        }
        if !done {
            let _ = run.qmp.execute_within("quit", Value::Null, Duration::from_secs(2)).await;
            done = wait_exit(&run, Duration::from_secs(5)).await;
        }
        if !done {
            process::kill_if_ours(run.pid, &run.cfg.qmp_socket());
            wait_exit(&run, Duration::from_secs(10)).await;
        }
        self.show_vm(actor, name)
    }

    /// Reset a running VM (the reset button).
    pub async fn reset_vm(&self, actor: &User, name: &str) -> ApiResult<VmView> {
        let m = self.visible_vm(actor, name)?;
        let run = self.running_vm(&m)?;
        run.qmp
            .execute_within("system_reset", Value::Null, Duration::from_secs(5))
            .await
            .map_err(|e| qmp_err(name, e))?;
        self.log_event(&actor.name, "vm.reset", name, "");
        Ok(self.vm_view(&m))
    }

    fn running_vm(&self, m: &VmMeta) -> ApiResult<Arc<Running>> {
        match self.vms.running(&m.name) {
            Some(r) if m.state == VmState::Running => Ok(r),
            _ => Err(ApiError::conflict(format!("VM {} is {}, not running", m.name, m.state.as_str()))),
        }
    }

    // ----- devices -----

    /// Put ISO `iso` in the CD-ROM (`None` ejects), live when running.
    pub async fn set_cdrom(&self, actor: &User, name: &str, iso: Option<&str>) -> ApiResult<VmView> {
        let m = self.visible_vm(actor, name)?;
        if let Some(i) = iso {
            self.check_iso(i)?;
        }
        let lock = self.vms.lock(name);
        let _vm = lock.lock().await;
        let m = self.visible_vm(actor, &m.name)?;
        if m.state.has_qemu() {
            let run = self.running_vm(&m)?;
            let r = match iso {
                Some(i) => {
                    let file = self.iso_path(i)?;
                    let args =
                        json!({"id": CDROM_DEVICE, "filename": file, "format": "raw", "read-only-mode": "read-only"});
                    run.qmp.execute_within("blockdev-change-medium", args, Duration::from_secs(10)).await
                }
                None => {
                    let args = json!({"id": CDROM_DEVICE, "force": true});
                    run.qmp.execute_within("eject", args, Duration::from_secs(10)).await
                }
            };
            r.map_err(|e| qmp_err(name, e))?;
        }
        let m = self.update_vm(name, Some((&actor.name, "vm.cdrom", iso.unwrap_or("(ejected)"))), |m| {
            m.cdrom = iso.map(Into::into)
        })?;
        Ok(self.vm_view(&m))
    }

    /// The start of a hardware change: the caller's rights, the VM's lock,
    /// and its record as read under the lock.
    async fn hardware_change(&self, actor: &User, name: &str) -> ApiResult<(tokio::sync::OwnedMutexGuard<()>, VmMeta)> {
        forbid_regular(actor, "change VM hardware")?;
        self.visible_vm(actor, name)?;
        let guard = self.vms.lock(name).lock_owned().await;
        let m = self.visible_vm(actor, name)?;
        Ok((guard, m))
    }

    /// Attach volume `volume` as a new disk, hot-plugged when running.
    pub async fn attach_disk(&self, actor: &User, name: &str, volume: &str) -> ApiResult<VmView> {
        let (_vm, _) = self.hardware_change(actor, name).await?;
        let _g = self.ops.lock().await;
        let m = self.visible_vm(actor, name)?;
        self.check_attachable(actor, volume)?;
        let disk = VmDiskMeta { id: next_id("disk", m.disks.iter().map(|d| d.id.as_str())), volume: volume.into() };
        if m.state.has_qemu() {
            let run = self.running_vm(&m)?;
            let d = VmDisk {
                id: disk.id.clone(),
                source: DiskSource::NbdUnix { path: self.nbd_socket.clone(), export: volume.into() },
                read_only: false,
            };
            let limit = Duration::from_secs(10);
            run.qmp.execute_within("blockdev-add", d.blockdev(), limit).await.map_err(|e| qmp_err(name, e))?;
            if let Err(e) = run.qmp.execute_within("device_add", d.device(None), limit).await {
                let _ = run.qmp.execute_within("blockdev-del", json!({"node-name": d.node()}), limit).await;
                return Err(qmp_err(name, e));
            }
        }
        let detail = format!("{volume} as {}", disk.id);
        let m = self.update_vm(name, Some((&actor.name, "vm.disk.attach", &detail)), |m| m.disks.push(disk.clone()))?;
        Ok(self.vm_view(&m))
    }

    /// Detach volume `volume`, hot-unplugged when running (the guest must
    /// release the device).
    pub async fn detach_disk(&self, actor: &User, name: &str, volume: &str) -> ApiResult<VmView> {
        let (_vm, m) = self.hardware_change(actor, name).await?;
        let disk = m
            .disks
            .iter()
            .find(|d| d.volume == volume)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("volume {volume} is not attached to VM {name}")))?;
        if m.state.has_qemu() {
            let run = self.running_vm(&m)?;
            self.unplug(&run, name, &disk.id).await?;
            let node = format!("drive-{}", disk.id);
            run.qmp
                .execute_within("blockdev-del", json!({"node-name": node}), Duration::from_secs(10))
                .await
                .map_err(|e| qmp_err(name, e))?;
        }
        let m = self.update_vm(name, Some((&actor.name, "vm.disk.detach", volume)), |m| {
            m.disks.retain(|d| d.volume != volume)
        })?;
        Ok(self.vm_view(&m))
    }

    /// `device_del` and wait for the guest to let go.
    async fn unplug(&self, run: &Running, name: &str, id: &str) -> ApiResult<()> {
        let mut events = run.qmp.events();
        run.qmp
            .execute_within("device_del", json!({"id": id}), Duration::from_secs(10))
            .await
            .map_err(|e| qmp_err(name, e))?;
        let gone = keel_vmm_glue::qmp::wait_event(&mut events, "DEVICE_DELETED", Duration::from_secs(15), |d| {
            d["device"] == id
        })
        .await;
        if gone.is_none() {
            return Err(ApiError::conflict(format!(
                "VM {name}'s guest did not release device {id} within 15 s (it must support PCI hot-unplug); the device stays attached"
            )));
        }
        Ok(())
    }

    /// Add a NIC, hot-plugged when running.
    pub async fn add_nic(&self, actor: &User, name: &str, network: Network) -> ApiResult<VmView> {
        check_network(actor, &network)?;
        let (_vm, m) = self.hardware_change(actor, name).await?;
        let nic = VmNicMeta { id: next_id("nic", m.nics.iter().map(|n| n.id.as_str())), mac: random_mac(), network };
        if m.state.has_qemu() {
            let run = self.running_vm(&m)?;
            let n = nic_config(&nic);
            let limit = Duration::from_secs(10);
            run.qmp.execute_within("netdev_add", n.netdev(), limit).await.map_err(|e| qmp_err(name, e))?;
            if let Err(e) = run.qmp.execute_within("device_add", n.device(None), limit).await {
                let _ = run.qmp.execute_within("netdev_del", json!({"id": n.netdev_id()}), limit).await;
                return Err(qmp_err(name, e));
            }
        }
        let detail = format!("{} {}", nic.id, nic.mac);
        let m = self.update_vm(name, Some((&actor.name, "vm.nic.add", &detail)), |m| m.nics.push(nic.clone()))?;
        Ok(self.vm_view(&m))
    }

    /// Remove NIC `id`, hot-unplugged when running.
    pub async fn remove_nic(&self, actor: &User, name: &str, id: &str) -> ApiResult<VmView> {
        let (_vm, m) = self.hardware_change(actor, name).await?;
        if !m.nics.iter().any(|n| n.id == id) {
            return Err(ApiError::not_found(format!("VM {name} has no NIC {id}")));
        }
        if m.state.has_qemu() {
            let run = self.running_vm(&m)?;
            self.unplug(&run, name, id).await?;
            let _ =
                run.qmp.execute_within("netdev_del", json!({"id": format!("net-{id}")}), Duration::from_secs(10)).await;
        }
        let m = self.update_vm(name, Some((&actor.name, "vm.nic.remove", id)), |m| m.nics.retain(|n| n.id != id))?;
        Ok(self.vm_view(&m))
    }

    // ----- clones -----

    /// Clone VM `src` as `new`: every disk snapshotted at one instant
    /// (guest file systems frozen when an agent answers; the vCPUs paused
    /// for the snapshots either way), cloned, and `new` started if `src`
    /// runs. `src` keeps running. Returns the new VM and what it took.
    pub async fn clone_vm(
        self: &Arc<Self>,
        actor: &User,
        src: &str,
        new: &str,
        owner: Option<&str>,
    ) -> ApiResult<(VmView, CloneStats)> {
        let t0 = Instant::now();
        forbid_regular(actor, "clone VMs")?;
        names::check_new_vm(new).map_err(ApiError::bad)?;
        if new.len() > 57 {
            return Err(ApiError::bad("a VM name is at most 57 characters (its disks are named NAME-diskN)"));
        }
        let s = self.visible_vm(actor, src)?;
        let src_lock = self.vms.lock(src);
        let _src = src_lock.lock().await;
        let g = self.ops.lock().await;
        let s = self.visible_vm(actor, &s.name)?;
        if self.meta.get::<VmMeta>(VMS, new)?.is_some() {
            return Err(ApiError::conflict(format!("VM {new} already exists: pick another name")));
        }
        let owner = self.vm_owner(actor, owner, s.cpus, s.memory_bytes)?;
        let sizes: u64 = s
            .disks
            .iter()
            .map(|d| self.pools.volume(&d.volume).map(|v| v.size()).unwrap_or(0))
            .fold(0u64, u64::saturating_add);
        self.check_quota(&owner, sizes)?;
        for (i, _) in s.disks.iter().enumerate() {
            let v = format!("{new}-disk{i}");
            if self.meta.get::<VolumeMeta>(VOLUMES, &v)?.is_some() {
                return Err(ApiError::conflict(format!("volume {v} already exists: pick another VM name")));
            }
        }
        // Not the new name: `keel-clone-` and 56 bytes would pass the
        // store's 64-byte limit for a snapshot name.
        let snap = format!("keel-clone-{:016x}", rand::random::<u64>());
        let run = if s.state == VmState::Running { self.vms.running(src) } else { None };
        let mut stats = CloneStats::default();
        let (paused_ms, consistency) = self.snapshot_disks(&s, &snap).await?;
        stats.paused_ms = paused_ms;
        stats.consistency = consistency;
        let snapped: Vec<String> = s.disks.iter().map(|d| d.volume.clone()).collect();
        let mut failure = None;

        // Writable clones of the snapshots, then the snapshots go (the
        // clones do not need them).
        let mut cloned = Vec::new();
        if failure.is_none() {
            for (i, d) in s.disks.iter().enumerate() {
                let v = format!("{new}-disk{i}");
                let full = format!("{}@{snap}", d.volume);
                let r = async {
                    self.begin_create(&v, &owner.name, Some(&full))?;
                    let r = self.pools.clone_snapshot(&full, &v).await;
                    self.finish_create(actor, r.map(drop), &v, &owner.name, Some(&full), "volume.clone", &full)
                }
                .await;
                match r {
                    Ok(_) => cloned.push(v),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
        }
        for vol in &snapped {
            if let Err(e) = self.pools.delete_snapshot(vol, &snap).await {
                tracing::warn!("dropping clone snapshot {vol}@{snap}: {e}");
            }
        }
        if let Some(e) = failure {
            for v in &cloned {
                let _ = self.delete_volume_locked(actor, v, true).await;
            }
            return Err(e);
        }
        let m = VmMeta {
            name: new.into(),
            owner: owner.name.clone(),
            cpus: s.cpus,
            memory_bytes: s.memory_bytes,
            disks: s
                .disks
                .iter()
                .zip(&cloned)
                .map(|(d, v)| VmDiskMeta { id: d.id.clone(), volume: v.clone() })
                .collect(),
            cdrom: s.cdrom.clone(),
            nics: s
                .nics
                .iter()
                .map(|n| VmNicMeta { id: n.id.clone(), mac: random_mac(), network: n.network.clone() })
                .collect(),
            boot: s.boot.clone(),
            kernel: s.kernel.clone(),
            state: VmState::Stopped,
            pid: None,
            error: None,
            created: now(),
            started: None,
            metered_until: None,
            backup_base: None,
        };
        let detail = format!("from {src} ({}, paused {:.1} ms)", stats.consistency, stats.paused_ms);
        self.meta.write(|w| {
            w.put(VMS, new, &m)?;
            w.event(&event(&actor.name, "vm.clone", new, &detail))?;
            Ok::<_, db::Error>(())
        })?;
        drop(g);
        let view = if run.is_some() {
            let lock = self.vms.lock(new);
            let _n = lock.lock().await;
            self.start_locked(actor, new).await?
        } else {
            self.vm_view(&m)
        };
        stats.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok((view, stats))
    }

    /// Snapshot every disk of VM `m` as `snap` at one instant: when it
    /// runs, guest file systems frozen if an agent answers, and the vCPUs
    /// paused (QEMU drains in-flight I/O) for the snapshots. Returns how
    /// long the guest was paused (ms) and `fs-frozen` or `crash-consistent`.
    /// On failure the snapshots made are dropped.
    pub(crate) async fn snapshot_disks(&self, m: &VmMeta, snap: &str) -> ApiResult<(f64, String)> {
        for d in &m.disks {
            self.not_moving(&d.volume)?;
        }
        let name = &m.name;
        let run = if m.state == VmState::Running { self.vms.running(name) } else { None };
        let mut frozen = false;
        let mut paused_ms = 0.0;
        if let Some(r) = &run {
            if keel_vmm_glue::agent::present(&r.qmp).await {
                let sock = r.cfg.agent_socket();
                match keel_vmm_glue::agent::execute(
                    &sock,
                    "guest-fsfreeze-freeze",
                    Value::Null,
                    Duration::from_secs(10),
                )
                .await
                {
                    Ok(_) => frozen = true,
                    Err(e) => tracing::warn!("VM {name}: fs-freeze failed, the snapshot is crash-consistent: {e}"),
                }
            }
            let p = Instant::now();
            let stopped = r.qmp.execute_within("stop", Value::Null, Duration::from_secs(10)).await;
            paused_ms = p.elapsed().as_secs_f64() * 1e3;
            if let Err(e) = stopped {
                self.thaw(r, frozen).await;
                return Err(qmp_err(name, e));
            }
        }
        let p = Instant::now();
        let mut snapped = Vec::new();
        let mut failure = None;
        for d in &m.disks {
            match self.pools.snapshot(&d.volume, snap).await {
                Ok(_) => snapped.push(d.volume.clone()),
                Err(e) => {
                    failure = Some(ApiError::from(e));
                    break;
                }
            }
        }
        if let Some(r) = &run {
            let resumed = r.qmp.execute_within("cont", Value::Null, Duration::from_secs(10)).await;
            paused_ms += p.elapsed().as_secs_f64() * 1e3;
            self.thaw(r, frozen).await;
            if let Err(e) = resumed {
                failure.get_or_insert(qmp_err(name, e));
            }
        }
        if let Some(e) = failure {
            for vol in &snapped {
                let _ = self.pools.delete_snapshot(vol, snap).await;
            }
            return Err(e);
        }
        Ok((paused_ms, if frozen { "fs-frozen" } else { "crash-consistent" }.to_string()))
    }

    async fn thaw(&self, r: &Running, frozen: bool) {
        if frozen {
            let sock = r.cfg.agent_socket();
            if let Err(e) =
                keel_vmm_glue::agent::execute(&sock, "guest-fsfreeze-thaw", Value::Null, Duration::from_secs(10)).await
            {
                tracing::error!("VM {}: fs-thaw failed: {e}", r.cfg.name);
            }
        }
    }

    // ----- restart and metering -----

    /// Find the QEMUs of VMs recorded as running (after a daemon restart):
    /// adopt those whose QMP socket answers, record the others as crashed.
    /// Returns what it did, one line per VM.
    pub async fn adopt_vms(self: &Arc<Self>) -> ApiResult<Vec<String>> {
        let mut said = Vec::new();
        for (name, m) in self.meta.list::<VmMeta>(VMS)? {
            if !m.state.has_qemu() {
                continue;
            }
            // A record whose name or ISO breaks today's rules cannot be
            // adopted (its paths would not be checked): say so and go on.
            let cfg = match self.vm_config(&m, Accel::Tcg) {
                Ok(c) => c,
                Err(e) => {
                    said.push(format!("VM {name} not adopted: {}", e.message));
                    continue;
                }
            };
            let pid = m.pid.or_else(|| process::read_pid(&cfg.pid_file()));
            match Qmp::connect(&cfg.qmp_socket(), Duration::from_secs(3)).await {
                Ok(qmp) => {
                    let pid = pid.unwrap_or(0);
                    self.update_vm(&name, None, |m| {
                        m.state = VmState::Running;
                        m.pid = Some(pid);
                    })?;
                    self.watch(&name, pid, qmp, cfg);
                    said.push(format!("VM {name}: QEMU (pid {pid}) still runs; adopted"));
                }
                Err(e) => {
                    let killed = pid.is_some_and(|p| process::kill_if_ours(p, &cfg.qmp_socket()));
                    let why = if killed {
                        format!("QEMU did not answer on its QMP socket after keel restarted ({e}); it was killed")
                    } else {
                        "QEMU exited while keel was not running".to_string()
                    };
                    // Metered up to the last minute keel saw it run.
                    let until = m.metered_until.unwrap_or(0);
                    self.meter(&name, until)?;
                    self.update_vm(&name, Some(("keel", "vm.crashed", &why)), |m| {
                        m.state = VmState::Crashed;
                        m.pid = None;
                        m.started = None;
                        m.metered_until = None;
                        m.error = Some(why.clone());
                    })?;
                    said.push(format!("VM {name}: {why}; marked crashed"));
                }
            }
        }
        Ok(said)
    }

    /// Record VM `name`'s running time up to `until`.
    pub fn meter(&self, name: &str, until: u64) -> ApiResult<()> {
        self.meta.write(|w| {
            let Some(mut m) = w.get::<VmMeta>(VMS, name)? else { return Ok(()) };
            let Some(from) = m.metered_until else { return Ok(()) };
            if until <= from {
                return Ok(());
            }
            for (hour, secs) in split_hours(from, until) {
                let key = format!("{}/{hour:012}/{}", m.owner, m.name);
                let mut row = w.get::<UsageRow>(USAGE, &key)?.unwrap_or(UsageRow {
                    user: m.owner.clone(),
                    vm: m.name.clone(),
                    hour,
                    seconds: 0,
                });
                row.seconds += secs;
                w.put(USAGE, &key, &row)?;
            }
            m.metered_until = Some(until);
            w.put(VMS, name, &m)?;
            Ok::<_, ApiError>(())
        })
    }

    /// Meter every running VM up to now.
    pub fn meter_all(&self) {
        let t = now();
        let names: Vec<String> = self.vms.running.lock().keys().cloned().collect();
        for n in names {
            if let Err(e) = self.meter(&n, t) {
                tracing::error!("metering VM {n}: {e}");
            }
        }
    }

    /// Start the minute-by-minute metering task.
    pub fn spawn_metering(self: &Arc<Self>) {
        let app = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let Some(app) = app.upgrade() else { return };
                app.meter_all();
            }
        });
    }

    /// Usage rows `actor` may see, optionally of one user.
    pub fn usage(&self, actor: &User, user: Option<&str>) -> ApiResult<Vec<UsageRow>> {
        self.meter_all();
        let users = self.users_by_name()?;
        if let Some(u) = user
            && actor.role != Role::Manager
            && !users.get(u).is_some_and(|t| auth::can_see_user(actor, t))
        {
            return Err(ApiError::not_found(format!("user {u} not found")));
        }
        Ok(self
            .meta
            .list::<UsageRow>(USAGE)?
            .into_iter()
            .map(|(_, r)| r)
            .filter(|r| user.is_none_or(|u| r.user == u))
            .filter(|r| actor.role == Role::Manager || users.get(&r.user).is_some_and(|t| auth::can_see_user(actor, t)))
            .collect())
    }

    /// The serial console from byte `offset`: (bytes, the next offset).
    pub fn console(&self, actor: &User, name: &str, offset: u64, max: usize) -> ApiResult<(Vec<u8>, u64)> {
        let m = self.visible_vm(actor, name)?;
        let path = self.vm_dir(&m.name)?.join("console.log");
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(e) => return Err(ApiError::internal("reading the console log", format!("{}: {e}", path.display()))),
        };
        use std::io::{Read, Seek};
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let from = offset.min(len);
        f.seek(std::io::SeekFrom::Start(from)).map_err(|e| ApiError::internal("reading the console log", e))?;
        let mut buf = Vec::new();
        f.take(max as u64).read_to_end(&mut buf).map_err(|e| ApiError::internal("reading the console log", e))?;
        let next = from + buf.len() as u64;
        Ok((buf, next))
    }
}

/// What a clone took.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CloneStats {
    /// From the request to the new VM's QEMU running (or recorded, when
    /// the source is stopped), milliseconds.
    pub total_ms: f64,
    /// How long the source's vCPUs were paused for the snapshots.
    pub paused_ms: f64,
    /// `fs-frozen` (guest agent) or `crash-consistent`.
    pub consistency: String,
}

/// Wait until the watcher recorded `run`'s exit; false after `limit`.
async fn wait_exit(run: &Running, limit: Duration) -> bool {
    let mut exited = run.exited.clone();
    tokio::time::timeout(limit, exited.wait_for(|e| *e)).await.is_ok()
}

/// What the accelerator probe's answer depends on.
fn probe_key(qemu: &std::path::Path) -> String {
    let mtime = std::fs::metadata(qemu)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kvm = std::path::Path::new("/dev/kvm").exists();
    format!("{}:{mtime}:{}:kvm={kvm}", qemu.display(), release.trim())
}

fn read_probe(path: &std::path::Path, key: &str) -> Option<Choice> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    if v["key"] != key {
        return None;
    }
    Some(Choice { accel: Accel::parse(v["accel"].as_str()?)?, reason: v["reason"].as_str()?.to_string() })
}

fn nic_config(n: &VmNicMeta) -> VmNic {
    VmNic {
        id: n.id.clone(),
        mac: n.mac.clone(),
        backend: match &n.network {
            Network::User => NetBackend::User,
            Network::Tap(i) => NetBackend::Tap { ifname: i.clone() },
            Network::Bridge(b) => NetBackend::Bridge { bridge: b.clone() },
        },
    }
}
