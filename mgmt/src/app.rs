//! The appliance's operations, typed and independent of HTTP: the API layer
//! decodes a request into a call here, and every call checks the caller's
//! rights (see [`crate::auth`] for the rule), runs against the block store
//! and the metadata database, and records an event.
//!
//! Store operations that change the catalog are bracketed by an intent
//! record (see [`crate::reconcile`]): intent written, store changed,
//! metadata and intent removal committed in one transaction.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keel_blockstore::DeviceKind;
use keel_nbd_server::CountingExports;
use parking_lot::Mutex;
use serde::Serialize;

use crate::auth;
use crate::db::{self, INTENTS, ISOS, JOBS, JOBS_KEPT, Meta, TOKENS, USERS, VOLUMES};
use crate::error::{ApiError, ApiResult};
use crate::model::{Chap, Event, IQN_PREFIX, Intent, IscsiExport, IsoMeta, Quota, Role, Token, User, VolumeMeta, now};
use crate::names;

/// The NBD exports of the appliance, with per-export session and I/O
/// counters.
pub type NbdExports = CountingExports<crate::pools::PoolsExports>;

/// Where the appliance listens (what its URLs say).
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    /// HTTP API.
    pub api: SocketAddr,
    /// NBD server.
    pub nbd: SocketAddr,
    /// iSCSI portal.
    pub iscsi: SocketAddr,
}

/// Sessions of protocol servers other than NBD (the iSCSI target): each
/// login holds a [`SessionGuard`] on its volume for as long as it lasts, and
/// a volume with sessions is in use.
#[derive(Clone, Default)]
pub struct SessionRegistry {
    open: Arc<Mutex<HashMap<(&'static str, String), u64>>>,
}

/// One open session; closing is dropping it.
pub struct SessionGuard {
    registry: SessionRegistry,
    key: (&'static str, String),
}

impl SessionRegistry {
    /// Count a session of `protocol` (e.g. `"iscsi"`) on `volume`.
    pub fn open(&self, protocol: &'static str, volume: &str) -> SessionGuard {
        let key = (protocol, volume.to_string());
        *self.open.lock().entry(key.clone()).or_default() += 1;
        SessionGuard { registry: self.clone(), key }
    }

    /// Sessions on `volume`, all protocols.
    pub fn on_volume(&self, volume: &str) -> u64 {
        self.open.lock().iter().filter(|((_, v), _)| v == volume).map(|(_, n)| n).sum()
    }

    /// Sessions of `protocol`, all volumes.
    pub fn of_protocol(&self, protocol: &str) -> u64 {
        self.open.lock().iter().filter(|((p, _), _)| *p == protocol).map(|(_, n)| n).sum()
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut open = self.registry.open.lock();
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// How long an API token stays valid unless configured: 30 days.
pub const DEFAULT_TOKEN_TTL: u64 = 30 * 24 * 3600;

/// The running appliance.
pub struct App {
    /// The node's pools (see [`crate::pools`]).
    pub pools: Arc<crate::pools::Pools>,
    /// The metadata database.
    pub meta: Meta,
    /// NBD exports and their counters.
    pub nbd: Arc<NbdExports>,
    /// Listening addresses.
    pub addrs: Addrs,
    /// Data directory.
    pub data: PathBuf,
    /// The VMs' runtime state.
    pub vms: crate::vms::VmRuntime,
    /// Sessions of the iSCSI target (and any other protocol server).
    pub sessions: SessionRegistry,
    /// iSCSI I/O counters per volume (for /metrics).
    pub iscsi_io: Mutex<HashMap<String, Arc<keel_nbd_server::ExportStats>>>,
    /// Catalog changes run one at a time, so quota checks and intents see
    /// a stable state.
    pub(crate) ops: tokio::sync::Mutex<()>,
    /// Long-running operations.
    pub jobs: Jobs,
    /// The appliance library (`DATA/library`).
    pub library: keel_images::Library,
    /// Seconds a new API token stays valid.
    pub token_ttl: u64,
    /// The volumes' data-plane access keys.
    pub access: crate::access::AccessKeys,
    /// The private NBD socket the daemon's own clients (QEMU, qemu-img) use.
    pub nbd_socket: PathBuf,
    /// Failed-login counters (see [`crate::throttle`]).
    pub logins: crate::throttle::LoginThrottle,
    /// The password-checking threads.
    pub hasher: crate::throttle::Hasher,
    /// Volumes being moved between pools (see [`crate::pool_ops`]).
    pub(crate) moving: Mutex<std::collections::HashSet<String>>,
    /// Test hook: abort the process at this named point (`KEEL_CRASH_POINT`).
    crash_point: Option<String>,
}

/// A volume as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct VolumeView {
    /// Name.
    pub name: String,
    /// Owner.
    pub owner: String,
    /// Size.
    pub size_bytes: u64,
    /// Bytes of data blocks mapped.
    pub allocated_bytes: u64,
    /// Unix seconds.
    pub created: u64,
    /// `VOLUME@SNAPSHOT` it was cloned from.
    pub origin: Option<String>,
    /// Snapshot names.
    pub snapshots: Vec<String>,
    /// NBD URL, usable as it is by qemu and libnbd tools.
    pub nbd_url: String,
    /// iSCSI URL (QEMU's form: portal, target, LUN 0).
    pub iscsi_url: String,
    /// iSCSI target name.
    pub iqn: String,
    /// Open NBD connections on the volume and its snapshots.
    pub nbd_sessions: u64,
    /// The pool holding it.
    pub pool: String,
    /// `online`, or `unavailable` when its pool is offline.
    pub state: &'static str,
    /// Why it is unavailable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A snapshot as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotView {
    /// Snapshot name (without the volume).
    pub name: String,
    /// Volume.
    pub volume: String,
    /// Size of the volume when it was taken.
    pub size_bytes: u64,
    /// Bytes mapped.
    pub allocated_bytes: u64,
    /// Unix seconds.
    pub created: u64,
    /// Read-only NBD URL (`VOLUME@SNAPSHOT`).
    pub nbd_url: String,
}

/// An ISO as the API lists it.
#[derive(Clone, Debug, Serialize)]
pub struct IsoView {
    /// Name.
    pub name: String,
    /// Bytes.
    pub size_bytes: u64,
    /// Who uploaded it, when the caller may see that user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Unix seconds.
    pub created: u64,
}

/// A user as the API shows it (no password hash).
#[derive(Clone, Debug, Serialize)]
pub struct UserView {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// The Power User it was created under.
    pub parent: Option<String>,
    /// Quota of a Power User.
    pub quota: Option<Quota>,
    /// Provisioned bytes of the volumes the user's tenant owns (Power Users).
    pub storage_used_bytes: Option<u64>,
    /// Unix seconds.
    pub created: u64,
}

/// A volume's exports as the API shows them.
#[derive(Clone, Debug, Serialize)]
pub struct ExportView {
    /// Volume.
    pub volume: String,
    /// NBD export name.
    pub nbd_name: String,
    /// NBD URL.
    pub nbd_url: String,
    /// Open NBD connections.
    pub nbd_sessions: u64,
    /// iSCSI target name.
    pub iqn: String,
    /// iSCSI URL.
    pub iscsi_url: String,
    /// Allowed initiators (empty: any).
    pub initiators: Vec<String>,
    /// CHAP user, when CHAP is on (the secret is never sent back).
    pub chap_user: Option<String>,
}

/// What the iSCSI target needs to know about one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IscsiTarget {
    /// Target name ([`IQN_PREFIX`] + volume).
    pub iqn: String,
    /// The volume served as LUN 0.
    pub volume: String,
    /// Initiator IQNs allowed to log in (empty: any).
    pub initiators: Vec<String>,
    /// CHAP credentials the initiator must present, if any.
    pub chap: Option<Chap>,
}

/// How the iSCSI server reads its configuration from the appliance: the
/// portal to listen on and the target of every volume.
pub trait IscsiTargets: Send + Sync {
    /// The portal address (`--iscsi`).
    fn portal(&self) -> SocketAddr;
    /// Every target (one per volume).
    fn targets(&self) -> Vec<IscsiTarget>;
    /// One target by IQN.
    fn target(&self, iqn: &str) -> Option<IscsiTarget>;
}

impl IscsiTargets for App {
    fn portal(&self) -> SocketAddr {
        self.addrs.iscsi
    }
    fn targets(&self) -> Vec<IscsiTarget> {
        let vols: Vec<(String, VolumeMeta)> = self.meta.list(VOLUMES).unwrap_or_default();
        vols.into_iter().map(|(_, v)| self.iscsi_target(&v)).collect()
    }
    fn target(&self, iqn: &str) -> Option<IscsiTarget> {
        let name = iqn.strip_prefix(IQN_PREFIX)?;
        let v: VolumeMeta = self.meta.get(VOLUMES, name).ok()??;
        Some(self.iscsi_target(&v))
    }
}

impl App {
    /// A volume's target: its own CHAP secret if it has one, else CHAP with
    /// the volume's access key (unless keys are off).
    fn iscsi_target(&self, v: &VolumeMeta) -> IscsiTarget {
        IscsiTarget {
            iqn: format!("{IQN_PREFIX}{}", v.name),
            volume: v.name.clone(),
            initiators: v.iscsi.initiators.clone(),
            chap: v.iscsi.chap.clone().or_else(|| self.key_chap(v)),
        }
    }
}

/// State of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Running.
    Running,
    /// Finished.
    Done,
    /// Failed (see `error`).
    Failed,
}

/// A long-running operation with progress.
#[derive(Debug)]
pub struct Job {
    /// Id.
    pub id: u64,
    /// What it does, e.g. `iso.upload`.
    pub kind: String,
    /// On what.
    pub target: String,
    /// Who started it.
    pub owner: String,
    /// Work done (bytes).
    pub done: AtomicU64,
    /// Work in total (bytes), 0 when unknown.
    pub total: AtomicU64,
    state: Mutex<(JobState, Option<String>)>,
    result: Mutex<Option<serde_json::Value>>,
    /// Unix seconds.
    pub started: u64,
}

/// A running job's handle (see [`App::start_job`]): derefs to the [`Job`]
/// for progress; ends it when finished or dropped.
pub struct JobRun<'a> {
    app: &'a App,
    job: Option<Arc<Job>>,
}

impl JobRun<'_> {
    /// End the job: done, or failed with `error`.
    pub fn finish(mut self, error: Option<String>) {
        if let Some(job) = self.job.take() {
            self.app.finish_job(&job, error);
        }
    }

    /// Hand the job to a task that outlives this borrow; the task takes it
    /// back with [`App::adopt_job`].
    pub fn detach(mut self) -> Arc<Job> {
        self.job.take().expect("a live job")
    }
}

impl std::ops::Deref for JobRun<'_> {
    type Target = Job;
    fn deref(&self) -> &Job {
        self.job.as_ref().expect("a live job")
    }
}

impl Drop for JobRun<'_> {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            self.app.finish_job(&job, Some("abandoned: it stopped before it finished (the client went away?)".into()));
        }
    }
}

impl Job {
    /// Record what the job produced (shown in the job's `result`).
    pub fn set_result(&self, v: serde_json::Value) {
        *self.result.lock() = Some(v);
    }

    /// Mark finished, with an error if it failed.
    fn finish(&self, error: Option<String>) {
        *self.state.lock() = match error {
            None => (JobState::Done, None),
            Some(e) => (JobState::Failed, Some(e)),
        };
    }
}

/// A job as the API shows it (and as its record keeps it).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct JobView {
    /// Id.
    pub id: u64,
    /// What it does.
    pub kind: String,
    /// On what.
    pub target: String,
    /// Who started it.
    pub owner: String,
    /// State.
    pub state: JobState,
    /// Work done (bytes).
    pub done_bytes: u64,
    /// Work in total (bytes), 0 when unknown.
    pub total_bytes: u64,
    /// Percent done, when the total is known.
    pub progress_percent: Option<f64>,
    /// Why it failed.
    pub error: Option<String>,
    /// What it produced, when done.
    pub result: Option<serde_json::Value>,
    /// Unix seconds.
    pub started: u64,
}

/// The running jobs, with their live progress. Every job also has a record
/// in the metadata (`JOBS`), written when it starts and when it ends, so
/// finished jobs outlive the daemon and a job that a stop or crash cut short
/// shows as failed after the next start ([`App::start_job`]).
#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    jobs: Mutex<HashMap<u64, Arc<Job>>>,
}

impl Jobs {
    /// Start tracking a job.
    fn start(&self, kind: &str, target: &str, owner: &str, total: u64) -> Arc<Job> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Job {
            id,
            kind: kind.into(),
            target: target.into(),
            owner: owner.into(),
            done: AtomicU64::new(0),
            total: AtomicU64::new(total),
            state: Mutex::new((JobState::Running, None)),
            result: Mutex::new(None),
            started: now(),
        });
        self.jobs.lock().insert(id, job.clone());
        job
    }

    fn view(j: &Job) -> JobView {
        let (state, error) = j.state.lock().clone();
        let (done, total) = (j.done.load(Ordering::Relaxed), j.total.load(Ordering::Relaxed));
        JobView {
            id: j.id,
            kind: j.kind.clone(),
            target: j.target.clone(),
            owner: j.owner.clone(),
            state,
            done_bytes: done,
            total_bytes: total,
            progress_percent: (total > 0).then(|| (done as f64 * 100.0 / total as f64).min(100.0)),
            error,
            result: j.result.lock().clone(),
            started: j.started,
        }
    }
}

/// Request to create a volume.
#[derive(Debug)]
pub struct CreateVolume {
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Owner (default: the caller).
    pub owner: Option<String>,
    /// Pool (default: the default pool).
    pub pool: Option<String>,
}

/// Request to create a user.
#[derive(Debug)]
pub struct CreateUser {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Password.
    pub password: String,
    /// Power User to create it under (Managers only; a Power User's users
    /// are always under itself).
    pub parent: Option<String>,
    /// Quota (Power Users only).
    pub quota: Option<Quota>,
}

pub(crate) fn forbid_regular(actor: &User, what: &str) -> ApiResult<()> {
    if actor.role == Role::Regular {
        return Err(ApiError::forbidden(format!(
            "a regular user cannot {what}: regular users manage only their own VM; ask your power user or a manager"
        )));
    }
    Ok(())
}

fn vol_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("volume {name} not found: `keel volume list` shows the volumes you can use"))
}

impl App {
    /// Put the appliance together.
    pub fn new(
        pools: Arc<crate::pools::Pools>,
        meta: Meta,
        addrs: Addrs,
        data: PathBuf,
        access: crate::access::AccessKeys,
    ) -> Result<App, keel_images::library::Error> {
        let nbd = Arc::new(CountingExports::new(crate::pools::PoolsExports::new(pools.clone())));
        let library = crate::appliances::open_library(&data)?;
        let nbd_socket = crate::access::nbd_socket_path(&data);
        Ok(App {
            pools,
            meta,
            nbd,
            addrs,
            data,
            vms: crate::vms::VmRuntime::new(crate::vms::VmSettings::default()),
            sessions: SessionRegistry::default(),
            iscsi_io: Mutex::new(HashMap::new()),
            ops: tokio::sync::Mutex::new(()),
            jobs: Jobs::default(),
            library,
            token_ttl: DEFAULT_TOKEN_TTL,
            access,
            nbd_socket,
            logins: crate::throttle::LoginThrottle::new(),
            hasher: crate::throttle::Hasher::start(0),
            moving: Mutex::new(Default::default()),
            crash_point: std::env::var("KEEL_CRASH_POINT").ok().filter(|s| !s.is_empty()),
        })
    }

    /// Wait for the catalog change in flight, if any, and hold off new ones
    /// while the guard lives (shutdown).
    pub async fn quiesce(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.ops.lock().await
    }

    /// Test hook: die by `kill -9` here if `KEEL_CRASH_POINT` names this
    /// point.
    pub(crate) fn crash_point(&self, point: &str) {
        if self.crash_point.as_deref() == Some(point) {
            eprintln!("KEEL_CRASH_POINT {point}: killing myself with SIGKILL");
            // SAFETY: kill(2) with our own pid and a valid signal number has
            // no memory effects; SIGKILL ends the process like `kill -9`.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }

    /// The user a token belongs to.
    pub fn authenticate(&self, token: &str) -> ApiResult<User> {
        let bad = || ApiError::unauthorized("the token is not valid: get one with POST /api/v1/tokens");
        let key = auth::token_key(token);
        let t: Token = self.meta.get(TOKENS, &key)?.ok_or_else(bad)?;
        if t.expires.is_some_and(|e| now() >= e) {
            let _ = self.meta.write(|w| w.remove(TOKENS, &key));
            return Err(ApiError::unauthorized(
                "the token has expired: get a new one with POST /api/v1/tokens (`keel user login`)",
            ));
        }
        self.meta.get(USERS, &t.user)?.ok_or_else(bad)
    }

    /// Exchange a name and password for a new token (valid for the
    /// configured time; the answer says until when).
    pub fn login(&self, name: &str, password: &str) -> ApiResult<(String, User, u64)> {
        let user: Option<User> = self.meta.get(USERS, name)?;
        // An unknown name costs the same argon2 check as a known one, so the
        // answer's timing does not tell which names exist.
        static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let hash = match &user {
            Some(u) => u.password_hash.clone(),
            None => DUMMY.get_or_init(|| auth::hash_password("not a password of anyone")).clone(),
        };
        let ok = auth::verify_password(password, &hash);
        let user = user.filter(|_| ok).ok_or_else(|| ApiError::unauthorized("wrong user name or password"))?;
        let token = auth::new_token();
        let expires = now().saturating_add(self.token_ttl);
        self.meta.write(|w| {
            let t = Token { user: user.name.clone(), created: now(), expires: Some(expires) };
            w.put(TOKENS, &auth::token_key(&token), &t)?;
            w.event(&event(&user.name, "token.create", &user.name, ""))?;
            Ok::<_, ApiError>(())
        })?;
        Ok((token, user, expires))
    }

    /// Revoke a token.
    pub fn logout(&self, actor: &User, token: &str) -> ApiResult<()> {
        self.meta.write(|w| {
            w.remove(TOKENS, &auth::token_key(token))?;
            w.event(&event(&actor.name, "token.revoke", &actor.name, ""))?;
            Ok::<_, db::Error>(())
        })?;
        Ok(())
    }

    /// Who holds a live token (is logged in), among the users `actor` may
    /// see: (user, how many tokens, when the newest was made), by name.
    pub fn logged_in(&self, actor: &User) -> ApiResult<Vec<(String, usize, u64)>> {
        forbid_regular(actor, "see who is logged in")?;
        let users = self.users_by_name()?;
        let t = now();
        let mut by: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
        for (_, tok) in self.meta.list::<Token>(TOKENS)? {
            if tok.expires.is_some_and(|e| t >= e) {
                continue;
            }
            if users.get(&tok.user).is_some_and(|u| auth::can_see_user(actor, u) && tok.created >= u.created) {
                let e = by.entry(tok.user).or_default();
                e.0 += 1;
                e.1 = e.1.max(tok.created);
            }
        }
        Ok(by.into_iter().map(|(u, (n, c))| (u, n, c)).collect())
    }

    pub(crate) fn user(&self, name: &str) -> ApiResult<Option<User>> {
        Ok(self.meta.get(USERS, name)?)
    }

    pub(crate) fn users(&self) -> ApiResult<Vec<User>> {
        Ok(self.meta.list::<User>(USERS)?.into_iter().map(|(_, u)| u).collect())
    }

    /// Every user, by name.
    pub(crate) fn users_by_name(&self) -> ApiResult<HashMap<String, User>> {
        Ok(self.users()?.into_iter().map(|u| (u.name.clone(), u)).collect())
    }

    // ----- volumes -----

    /// Give every volume record from before access keys (salt 0) a key of
    /// its own; returns how many. (A salt-0 key derives from the name
    /// alone, which an earlier volume of the same name shared.)
    pub fn salt_legacy_volumes(&self) -> db::Result<usize> {
        let old: Vec<(String, VolumeMeta)> = self.meta.list(VOLUMES)?;
        let old: Vec<_> = old.into_iter().filter(|(_, m)| m.key_salt == 0).collect();
        self.meta.write(|w| {
            for (name, mut m) in old.iter().cloned() {
                m.key_salt = crate::model::new_key_salt();
                w.put(VOLUMES, &name, &m)?;
            }
            Ok::<_, db::Error>(())
        })?;
        Ok(old.len())
    }

    /// The key salt of volume `name`: `None` when it has no key, that is no
    /// record (internal volumes, one being created) or a record from before
    /// access keys (salt 0).
    pub(crate) fn key_salt(&self, name: &str) -> Option<u64> {
        self.meta.get::<VolumeMeta>(VOLUMES, name).ok().flatten().map(|m| m.key_salt).filter(|&s| s != 0)
    }

    /// The NBD URL of device `device` (a volume or `VOLUME@SNAPSHOT`),
    /// looking its volume's key up.
    pub(crate) fn device_nbd_url(&self, device: &str) -> String {
        let volume = device.split_once('@').map_or(device, |(v, _)| v);
        self.nbd_url_salted(device, self.key_salt(volume).unwrap_or(0))
    }

    fn nbd_url(&self, m: &VolumeMeta, device: &str) -> String {
        self.nbd_url_salted(device, m.key_salt)
    }

    fn nbd_url_salted(&self, device: &str, salt: u64) -> String {
        format!("nbd://{}/{}", self.addrs.nbd, self.access.export_name(device, salt))
    }

    /// The CHAP credentials a volume's target requires when it has none of
    /// its own: user VOLUME, the access key as secret (none with keys off).
    fn key_chap(&self, m: &VolumeMeta) -> Option<Chap> {
        (m.iscsi.chap.is_none() && self.access.required())
            .then(|| Chap { user: m.name.clone(), secret: self.access.key(&m.name, m.key_salt) })
    }

    /// The iSCSI URL of a volume: with the CHAP user and secret in it when
    /// the target uses the volume's access key (no CHAP of its own).
    fn iscsi_url(&self, m: &VolumeMeta) -> String {
        let auth = self.key_chap(m).map(|c| format!("{}%{}@", c.user, c.secret)).unwrap_or_default();
        format!("iscsi://{auth}{}/{IQN_PREFIX}{}/0", self.addrs.iscsi, m.name)
    }

    pub(crate) fn volume_sessions(&self, name: &str) -> u64 {
        sessions_of(&self.nbd.counters(), name)
    }

    fn view(&self, m: &VolumeMeta) -> ApiResult<VolumeView> {
        self.view_in(m, &self.pools.list(), &self.nbd.counters())
    }

    /// The view of `m` given the store's devices and the NBD counters (so a
    /// listing reads them once, not once per volume).
    fn view_in(
        &self,
        m: &VolumeMeta,
        devices: &[keel_blockstore::DeviceInfo],
        nbd: &[keel_nbd_server::ExportCounters],
    ) -> ApiResult<VolumeView> {
        let found = devices.iter().find(|d| d.name == m.name && d.kind == DeviceKind::Volume);
        let offline = match found {
            Some(_) => None,
            None => match self.pools.slot(m.pool()) {
                Some(s) if s.pool.is_none() => {
                    let why = crate::error::redact_paths(s.offline.as_deref().unwrap_or("not open"));
                    Some(format!("its pool {} is offline: {why}", m.pool()))
                }
                Some(_) => return Err(vol_not_found(&m.name)),
                None => Some(format!("its pool {} is not configured on this node", m.pool())),
            },
        };
        let (size, allocated) = found.map_or((0, 0), |d| (d.size, d.allocated_bytes));
        let prefix = format!("{}@", m.name);
        let snapshots = devices.iter().filter_map(|d| d.name.strip_prefix(&prefix).map(str::to_string)).collect();
        Ok(VolumeView {
            pool: m.pool().to_string(),
            state: if offline.is_some() { "unavailable" } else { "online" },
            reason: offline,
            name: m.name.clone(),
            owner: m.owner.clone(),
            size_bytes: size,
            allocated_bytes: allocated,
            created: m.created,
            origin: m.origin.clone(),
            snapshots,
            nbd_url: self.nbd_url(m, &m.name),
            iscsi_url: self.iscsi_url(m),
            iqn: format!("{IQN_PREFIX}{}", m.name),
            nbd_sessions: sessions_of(nbd, &m.name),
        })
    }

    /// The volume `name` if `actor` may see it (else 404; 403 for regular
    /// users, who have no volume rights).
    pub(crate) fn visible_volume(&self, actor: &User, name: &str) -> ApiResult<VolumeMeta> {
        forbid_regular(actor, "use volumes")?;
        let m: VolumeMeta = self.meta.get(VOLUMES, name)?.ok_or_else(|| vol_not_found(name))?;
        if actor.role == Role::Manager {
            return Ok(m);
        }
        let owner = self.user(&m.owner)?;
        match owner {
            Some(o) if auth::can_see_owned(actor, &o) => Ok(m),
            _ => Err(vol_not_found(name)),
        }
    }

    /// Volumes `actor` may see.
    pub fn list_volumes(&self, actor: &User) -> ApiResult<Vec<VolumeView>> {
        forbid_regular(actor, "use volumes")?;
        let users = self.users_by_name()?;
        let (devices, nbd) = (self.pools.list(), self.nbd.counters());
        let mut out = Vec::new();
        for (_, m) in self.meta.list::<VolumeMeta>(VOLUMES)? {
            let ok = users.get(&m.owner).is_some_and(|o| auth::can_see_owned(actor, o));
            if actor.role == Role::Manager || ok {
                // A volume whose store device vanished is reconciled at the
                // next start; skip it rather than fail the listing.
                if let Ok(v) = self.view_in(&m, &devices, &nbd) {
                    out.push(v);
                }
            }
        }
        Ok(out)
    }

    /// One volume.
    pub fn show_volume(&self, actor: &User, name: &str) -> ApiResult<VolumeView> {
        let m = self.visible_volume(actor, name)?;
        self.view(&m)
    }

    /// Resolve the owner of a new volume and check the tenant's quota for
    /// `extra` more provisioned bytes.
    fn owner_for_new(&self, actor: &User, owner: Option<&str>, extra: u64) -> ApiResult<User> {
        let owner = match owner {
            None => actor.clone(),
            Some(o) => {
                let u = self.user(o)?.filter(|u| auth::can_see_user(actor, u));
                u.ok_or_else(|| ApiError::not_found(format!("user {o} not found")))?
            }
        };
        if owner.role == Role::Regular && owner.parent.is_none() && actor.role != Role::Manager {
            return Err(ApiError::forbidden("only a manager may give volumes to users outside a tenant"));
        }
        self.check_quota(&owner, extra)?;
        Ok(owner)
    }

    /// Provisioned bytes of every volume owned in Power User `tenant`'s
    /// tenant.
    /// A tenant's storage: the size of each of its volumes, plus the data
    /// each of their snapshots maps (a snapshot keeps old blocks alive, so
    /// snapshots cannot be used to grow past the quota; blocks a snapshot
    /// still shares with its volume count twice, erring on the safe side).
    fn tenant_usage(&self, tenant: &str) -> ApiResult<u64> {
        let users = self.users_by_name()?;
        let devices = self.pools.list();
        let sizes: HashMap<&str, u64> =
            devices.iter().filter(|d| d.kind == DeviceKind::Volume).map(|d| (d.name.as_str(), d.size)).collect();
        let mut snaps: HashMap<&str, u64> = HashMap::new();
        for d in devices.iter().filter(|d| d.kind == DeviceKind::Snapshot) {
            if let Some((vol, _)) = d.name.split_once('@') {
                *snaps.entry(vol).or_default() += d.allocated_bytes;
            }
        }
        let mut used = 0u64;
        for (_, m) in self.meta.list::<VolumeMeta>(VOLUMES)? {
            if users.get(&m.owner).and_then(auth::tenant_of) == Some(tenant) {
                used = used
                    .saturating_add(sizes.get(m.name.as_str()).copied().unwrap_or(0))
                    .saturating_add(snaps.get(m.name.as_str()).copied().unwrap_or(0));
            }
        }
        // ISOs its members uploaded.
        for (_, iso) in self.meta.list::<IsoMeta>(ISOS)? {
            if users.get(&iso.owner).and_then(auth::tenant_of) == Some(tenant) {
                used = used.saturating_add(iso.size_bytes);
            }
        }
        Ok(used)
    }

    /// How many more bytes `actor`'s tenant may store (`None`: no quota).
    pub fn storage_left(&self, actor: &User) -> ApiResult<Option<u64>> {
        let Some(tenant) = auth::tenant_of(actor) else { return Ok(None) };
        let Some(q) = self.user(tenant)?.and_then(|t| t.quota) else { return Ok(None) };
        Ok(Some(q.storage_bytes.saturating_sub(self.tenant_usage(tenant)?)))
    }

    pub(crate) fn check_quota(&self, owner: &User, extra: u64) -> ApiResult<()> {
        let Some(tenant) = auth::tenant_of(owner) else { return Ok(()) };
        let Some(t) = self.user(tenant)? else { return Ok(()) };
        let Some(q) = t.quota else { return Ok(()) };
        let used = self.tenant_usage(tenant)?;
        if used.saturating_add(extra) > q.storage_bytes {
            return Err(ApiError::no_space(format!(
                "storage quota of {tenant} exceeded: {} provisioned + {} requested > {} allowed; delete or shrink volumes, or ask a manager to raise the quota",
                used, extra, q.storage_bytes
            )));
        }
        Ok(())
    }

    /// Create a thin volume.
    pub async fn create_volume(&self, actor: &User, req: CreateVolume) -> ApiResult<VolumeView> {
        forbid_regular(actor, "create volumes")?;
        names::check_volume(&req.name).map_err(ApiError::bad)?;
        crate::model::check_volume_size("size", req.size).map_err(ApiError::bad)?;
        let _g = self.ops.lock().await;
        let pool = req.pool.as_deref().unwrap_or(crate::pools::DEFAULT_POOL);
        self.usable_pool(pool)?;
        let owner = self.owner_for_new(actor, req.owner.as_deref(), req.size)?;
        self.begin_create(&req.name, &owner.name, None)?;
        let r = self.pools.create_volume_in(pool, &req.name, req.size).await;
        self.finish_create(
            actor,
            r.map(drop),
            &req.name,
            &owner.name,
            None,
            "volume.create",
            &format!("{} bytes", req.size),
        )
    }

    pub(crate) fn begin_create(&self, name: &str, owner: &str, origin: Option<&str>) -> ApiResult<()> {
        if self.meta.get::<VolumeMeta>(VOLUMES, name)?.is_some() {
            return Err(ApiError::conflict(format!("volume {name} already exists: pick another name")));
        }
        let intent = Intent::Create { name: name.into(), owner: owner.into(), origin: origin.map(Into::into) };
        self.meta.put(INTENTS, name, &intent)?;
        self.crash_point("create:after-intent");
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn finish_create(
        &self,
        actor: &User,
        r: keel_blockstore::Result<()>,
        name: &str,
        owner: &str,
        origin: Option<&str>,
        action: &str,
        detail: &str,
    ) -> ApiResult<VolumeView> {
        if let Err(e) = r {
            self.meta.write(|w| w.remove(INTENTS, name))?;
            return Err(e.into());
        }
        self.crash_point("create:after-store");
        let m = VolumeMeta {
            name: name.into(),
            owner: owner.into(),
            created: now(),
            origin: origin.map(Into::into),
            iscsi: IscsiExport::default(),
            key_salt: crate::model::new_key_salt(),
            pool: self.pools.pool_of(name),
        };
        self.meta.write(|w| {
            w.put(VOLUMES, name, &m)?;
            w.remove(INTENTS, name)?;
            w.event(&event(&actor.name, action, name, detail))?;
            Ok::<_, db::Error>(())
        })?;
        self.view(&m)
    }

    /// Grow (or, refused today, shrink) a volume.
    pub async fn resize_volume(&self, actor: &User, name: &str, size: u64) -> ApiResult<VolumeView> {
        let m = self.visible_volume(actor, name)?;
        crate::model::check_volume_size("size", size).map_err(ApiError::bad)?;
        self.volume_online(&m)?;
        let _g = self.ops.lock().await;
        self.not_moving(name)?;
        let old = self.view(&m)?.size_bytes;
        if size < old {
            return Err(ApiError::conflict(format!(
                "shrinking {name} from {old} to {size} bytes would destroy the data past the new end; Keel only grows volumes online"
            )));
        }
        let owner = self.user(&m.owner)?.ok_or_else(|| vol_not_found(name))?;
        self.check_quota(&owner, size - old)?;
        self.pools.resize(name, size, false).await?;
        self.meta.write(|w| w.event(&event(&actor.name, "volume.resize", name, &format!("{old} -> {size} bytes"))))?;
        self.view(&m)
    }

    fn in_use(&self, name: &str, export: &str) -> ApiResult<()> {
        let sessions = if export == name { self.volume_sessions(name) } else { self.nbd.sessions(export) };
        if sessions > 0 {
            return Err(ApiError::conflict(format!(
                "{export} is in use: {sessions} NBD connection(s) are open on it; disconnect the clients first"
            )));
        }
        if export != name {
            // A snapshot is exported only over NBD (read-only); the
            // volume's iSCSI sessions and VMs do not use it.
            return Ok(());
        }
        let others = self.sessions.on_volume(name);
        if others > 0 {
            return Err(ApiError::conflict(format!(
                "{name} is in use: {others} iSCSI session(s) are logged in to it; log the initiators out first"
            )));
        }
        let vms = self.volume_vms(name)?;
        if !vms.is_empty() {
            return Err(ApiError::conflict(format!("{name} is attached to VM(s) {}; detach it first", vms.join(", "))));
        }
        Ok(())
    }

    /// Delete a volume (and its snapshots when `recursive`).
    pub async fn delete_volume(&self, actor: &User, name: &str, recursive: bool) -> ApiResult<()> {
        self.visible_volume(actor, name)?;
        let _g = self.ops.lock().await;
        self.delete_volume_locked(actor, name, recursive).await
    }

    /// [`App::delete_volume`] with the catalog lock held.
    pub(crate) async fn delete_volume_locked(&self, actor: &User, name: &str, recursive: bool) -> ApiResult<()> {
        self.volume_online(&self.visible_volume(actor, name)?)?;
        self.not_moving(name)?;
        self.in_use(name, name)?;
        let snaps = self.view(&self.visible_volume(actor, name)?)?.snapshots;
        if !snaps.is_empty() && !recursive {
            return Err(ApiError::conflict(format!(
                "volume {name} has snapshot(s) {}: delete them first, or delete recursively (?recursive=true, `--recursive`)",
                snaps.join(", ")
            )));
        }
        self.meta.put(INTENTS, name, &Intent::Delete { name: name.into() })?;
        self.crash_point("delete:after-intent");
        match self.pools.delete_volume(name, recursive).await {
            Ok(()) => {}
            Err(e) if e.kind() == keel_blockstore::ErrorKind::NotFound => {}
            Err(e) => {
                self.meta.write(|w| w.remove(INTENTS, name))?;
                return Err(e.into());
            }
        }
        self.crash_point("delete:after-store");
        self.meta.write(|w| {
            w.remove(VOLUMES, name)?;
            w.remove(INTENTS, name)?;
            w.event(&event(&actor.name, "volume.delete", name, ""))?;
            Ok::<_, db::Error>(())
        })?;
        self.nbd.forget(name);
        for s in snaps {
            self.nbd.forget(&format!("{name}@{s}"));
        }
        Ok(())
    }

    /// The snapshots of a volume.
    pub fn list_snapshots(&self, actor: &User, volume: &str) -> ApiResult<Vec<SnapshotView>> {
        let m = self.visible_volume(actor, volume)?;
        let prefix = format!("{volume}@");
        Ok(self
            .pools
            .list()
            .into_iter()
            .filter(|d| d.kind == DeviceKind::Snapshot)
            .filter_map(|d| {
                let snap = d.name.strip_prefix(&prefix)?.to_string();
                Some(SnapshotView {
                    nbd_url: self.nbd_url(&m, &d.name),
                    name: snap,
                    volume: volume.into(),
                    size_bytes: d.size,
                    allocated_bytes: d.allocated_bytes,
                    created: d.created,
                })
            })
            .collect())
    }

    /// Take a snapshot.
    pub async fn create_snapshot(&self, actor: &User, volume: &str, snap: &str) -> ApiResult<SnapshotView> {
        let m = self.visible_volume(actor, volume)?;
        names::check_snapshot(snap).map_err(ApiError::bad)?;
        self.volume_online(&m)?;
        let _g = self.ops.lock().await;
        self.not_moving(volume)?;
        // The snapshot will hold what the volume maps now.
        if let Some(owner) = self.user(&m.owner)? {
            let mapped = self.pools.volume(volume).map(|v| v.allocated_bytes()).unwrap_or(0);
            self.check_quota(&owner, mapped)?;
        }
        self.pools.snapshot(volume, snap).await?;
        self.meta.write(|w| w.event(&event(&actor.name, "snapshot.create", &format!("{volume}@{snap}"), "")))?;
        self.list_snapshots(actor, volume)?
            .into_iter()
            .find(|s| s.name == snap)
            .ok_or_else(|| ApiError::internal("making the snapshot", "the snapshot vanished as it was made"))
    }

    /// Delete a snapshot.
    pub async fn delete_snapshot(&self, actor: &User, volume: &str, snap: &str) -> ApiResult<()> {
        self.visible_volume(actor, volume)?;
        let full = format!("{volume}@{snap}");
        let _g = self.ops.lock().await;
        self.not_moving(volume)?;
        self.in_use(volume, &full)?;
        self.pools.delete_snapshot(volume, snap).await.map_err(|e| match e.kind() {
            keel_blockstore::ErrorKind::NotFound => ApiError::not_found(format!("snapshot {full} not found")),
            _ => e.into(),
        })?;
        self.meta.write(|w| w.event(&event(&actor.name, "snapshot.delete", &full, "")))?;
        self.nbd.forget(&full);
        Ok(())
    }

    /// Make writable volume `name` from snapshot `volume@snap`.
    pub async fn clone_snapshot(
        &self,
        actor: &User,
        volume: &str,
        snap: &str,
        name: &str,
        owner: Option<&str>,
    ) -> ApiResult<VolumeView> {
        self.visible_volume(actor, volume)?;
        names::check_volume(name).map_err(ApiError::bad)?;
        let full = format!("{volume}@{snap}");
        let size = self
            .pools
            .list()
            .into_iter()
            .find(|d| d.name == full)
            .map(|d| d.size)
            .ok_or_else(|| ApiError::not_found(format!("snapshot {full} not found")))?;
        let _g = self.ops.lock().await;
        self.not_moving(volume)?;
        let owner = self.owner_for_new(actor, owner, size)?;
        self.begin_create(name, &owner.name, Some(&full))?;
        let r = self.pools.clone_snapshot(&full, name).await;
        self.finish_create(actor, r.map(drop), name, &owner.name, Some(&full), "volume.clone", &full)
    }

    /// The exports of a volume.
    pub fn export(&self, actor: &User, name: &str) -> ApiResult<ExportView> {
        let m = self.visible_volume(actor, name)?;
        Ok(self.export_view(&m))
    }

    fn export_view(&self, m: &VolumeMeta) -> ExportView {
        ExportView {
            volume: m.name.clone(),
            nbd_name: self.access.export_name(&m.name, m.key_salt),
            nbd_url: self.nbd_url(m, &m.name),
            nbd_sessions: self.volume_sessions(&m.name),
            iqn: format!("{IQN_PREFIX}{}", m.name),
            iscsi_url: self.iscsi_url(m),
            initiators: m.iscsi.initiators.clone(),
            chap_user: m.iscsi.chap.as_ref().map(|c| c.user.clone()),
        }
    }

    /// Set a volume's iSCSI access: initiator ACL and CHAP.
    pub async fn set_export(&self, actor: &User, name: &str, iscsi: IscsiExport) -> ApiResult<ExportView> {
        for i in &iscsi.initiators {
            let ok = (i.starts_with("iqn.") || i.starts_with("eui.") || i.starts_with("naa."))
                && i.len() <= 223
                && !i.chars().any(|c| c.is_whitespace() || c.is_control() || c.is_ascii_uppercase() || c == '=');
            if !ok {
                return Err(ApiError::bad(format!(
                    "initiator {i:?} is not an iSCSI name: use iqn.YYYY-MM.reversed.domain:name (lowercase), eui. or naa."
                )));
            }
        }
        if let Some(c) = &iscsi.chap {
            if c.user.is_empty() || c.user.len() > 255 {
                return Err(ApiError::bad("CHAP user must be 1 to 255 characters"));
            }
            // Both travel as iSCSI text keys (key=value, NUL-separated).
            let printable = |t: &str| t.chars().all(|ch| ch.is_ascii_graphic() && ch != '=');
            if !printable(&c.user) || !printable(&c.secret) {
                return Err(ApiError::bad(
                    "CHAP user and secret must be printable ASCII without spaces or '=' (they travel as iSCSI text keys)",
                ));
            }
            if !(12..=16).contains(&c.secret.len()) {
                return Err(ApiError::bad(
                    "CHAP secret must be 12 to 16 characters (what Linux and Windows initiators accept)",
                ));
            }
        }
        let _g = self.ops.lock().await;
        let mut m = self.visible_volume(actor, name)?;
        m.iscsi = iscsi;
        self.meta.write(|w| {
            w.put(VOLUMES, name, &m)?;
            w.event(&event(&actor.name, "export.set", name, &format!("{} initiator(s)", m.iscsi.initiators.len())))?;
            Ok::<_, db::Error>(())
        })?;
        Ok(self.export_view(&m))
    }

    /// Give a volume a new access key: the NBD export names and iSCSI URLs
    /// handed out before stop admitting new connections. Refused while
    /// clients are connected (they would keep their access until they
    /// disconnect, and a VM's disk could not reconnect).
    pub async fn rotate_access_key(&self, actor: &User, name: &str) -> ApiResult<ExportView> {
        let _g = self.ops.lock().await;
        let mut m = self.visible_volume(actor, name)?;
        let (nbd, iscsi) = (self.volume_sessions(name), self.sessions.on_volume(name));
        if nbd + iscsi > 0 {
            return Err(ApiError::conflict(format!(
                "{name} has {nbd} NBD connection(s) and {iscsi} iSCSI session(s) open (a running VM holds one): \
                 disconnect them first, so none keeps the old key's access"
            )));
        }
        let mut salt = crate::model::new_key_salt();
        while salt == m.key_salt {
            salt = crate::model::new_key_salt();
        }
        m.key_salt = salt;
        self.meta.write(|w| {
            w.put(VOLUMES, name, &m)?;
            w.event(&event(&actor.name, "export.rotate_key", name, ""))?;
            Ok::<_, db::Error>(())
        })?;
        Ok(self.export_view(&m))
    }

    // ----- users -----

    fn user_view(&self, u: &User) -> ApiResult<UserView> {
        let used = if u.role == Role::Power { Some(self.tenant_usage(&u.name)?) } else { None };
        Ok(UserView {
            name: u.name.clone(),
            role: u.role,
            parent: u.parent.clone(),
            quota: u.quota,
            storage_used_bytes: used,
            created: u.created,
        })
    }

    /// Users `actor` may see.
    pub fn list_users(&self, actor: &User) -> ApiResult<Vec<UserView>> {
        self.users()?.iter().filter(|u| auth::can_see_user(actor, u)).map(|u| self.user_view(u)).collect()
    }

    /// One user.
    pub fn show_user(&self, actor: &User, name: &str) -> ApiResult<UserView> {
        let u = self.user(name)?.filter(|u| auth::can_see_user(actor, u));
        self.user_view(&u.ok_or_else(|| ApiError::not_found(format!("user {name} not found")))?)
    }

    /// Create a user.
    pub async fn create_user(&self, actor: &User, req: CreateUser) -> ApiResult<UserView> {
        let parent = match actor.role {
            Role::Regular => return Err(ApiError::forbidden("a regular user cannot create users")),
            Role::Power => {
                if req.role != Role::Regular {
                    return Err(ApiError::forbidden(format!(
                        "a power user can create only regular users, not {} users; ask a manager",
                        req.role.as_str()
                    )));
                }
                if req.parent.as_deref().is_some_and(|p| p != actor.name) {
                    return Err(ApiError::forbidden("a power user creates users only under itself"));
                }
                Some(actor.name.clone())
            }
            Role::Manager => req.parent.clone(),
        };
        names::check_user(&req.name).map_err(ApiError::bad)?;
        if req.password.chars().count() < 8 {
            return Err(ApiError::bad("password must be at least 8 characters"));
        }
        if req.quota.is_some() && req.role != Role::Power {
            return Err(ApiError::bad("only power users have a quota"));
        }
        if req.role == Role::Power && req.quota.is_none() {
            return Err(ApiError::bad(
                "a power user works within a quota: give one, e.g. \"quota\": {\"storage\": \"100G\"} (CLI: --quota-storage 100G)",
            ));
        }
        if let Some(p) = &parent {
            if req.role != Role::Regular {
                return Err(ApiError::bad("only regular users are created under a power user"));
            }
            let pu = self.user(p)?.ok_or_else(|| ApiError::not_found(format!("user {p} not found")))?;
            if pu.role != Role::Power {
                return Err(ApiError::bad(format!(
                    "{p} is not a power user: users are created only under power users"
                )));
            }
        }
        let _g = self.ops.lock().await;
        if self.user(&req.name)?.is_some() {
            return Err(ApiError::conflict(format!("user {} already exists: pick another name", req.name)));
        }
        let u = User {
            name: req.name.clone(),
            role: req.role,
            parent,
            quota: req.quota,
            password_hash: auth::hash_password(&req.password),
            created: now(),
        };
        self.meta.write(|w| {
            w.put(USERS, &u.name, &u)?;
            w.event(&event(&actor.name, "user.create", &u.name, u.role.as_str()))?;
            Ok::<_, db::Error>(())
        })?;
        self.user_view(&u)
    }

    /// Delete a user. Refused while it owns volumes or has users under it.
    pub async fn delete_user(&self, actor: &User, name: &str) -> ApiResult<()> {
        forbid_regular(actor, "delete users")?;
        let u = self.user(name)?.filter(|u| auth::can_see_user(actor, u));
        let u = u.ok_or_else(|| ApiError::not_found(format!("user {name} not found")))?;
        if u.name == actor.name {
            return Err(ApiError::conflict("you cannot delete yourself; ask another manager"));
        }
        if actor.role == Role::Power && u.role == Role::Power {
            return Err(ApiError::forbidden("a power user cannot delete power users"));
        }
        let _g = self.ops.lock().await;
        let owned: Vec<String> = self
            .meta
            .list::<VolumeMeta>(VOLUMES)?
            .into_iter()
            .filter(|(_, v)| v.owner == name)
            .map(|(k, _)| k)
            .collect();
        if !owned.is_empty() {
            return Err(ApiError::conflict(format!(
                "user {name} owns volume(s) {}: delete them first",
                owned.join(", ")
            )));
        }
        let vms: Vec<String> = self
            .meta
            .list::<crate::model::VmMeta>(crate::db::VMS)?
            .into_iter()
            .filter(|(_, v)| v.owner == name)
            .map(|(k, _)| k)
            .collect();
        if !vms.is_empty() {
            return Err(ApiError::conflict(format!("user {name} owns VM(s) {}: delete them first", vms.join(", "))));
        }
        let subs: Vec<String> =
            self.users()?.into_iter().filter(|s| s.parent.as_deref() == Some(name)).map(|s| s.name).collect();
        if !subs.is_empty() {
            return Err(ApiError::conflict(format!(
                "user {name} has users under it ({}): delete them first",
                subs.join(", ")
            )));
        }
        let tokens: Vec<String> =
            self.meta.list::<Token>(TOKENS)?.into_iter().filter(|(_, t)| t.user == name).map(|(k, _)| k).collect();
        self.meta.write(|w| {
            w.remove(USERS, name)?;
            for t in &tokens {
                w.remove(TOKENS, t)?;
            }
            w.event(&event(&actor.name, "user.delete", name, ""))?;
            Ok::<_, db::Error>(())
        })?;
        Ok(())
    }

    // ----- ISOs -----

    /// Directory of the ISO store.
    pub fn iso_dir(&self) -> PathBuf {
        self.data.join("isos")
    }

    /// `DATA/isos/NAME.iso`, for a name that passes [`names::path_safe`].
    pub fn iso_path(&self, name: &str) -> ApiResult<PathBuf> {
        Ok(self.iso_dir().join(format!("{}.iso", names::path_safe(name)?)))
    }

    /// Every ISO (every role may list them: any VM may use any ISO); who
    /// uploaded one is shown only to those who may see that user.
    pub fn list_isos(&self, actor: &User) -> ApiResult<Vec<IsoView>> {
        let users = self.users_by_name()?;
        Ok(self
            .meta
            .list::<IsoMeta>(ISOS)?
            .into_iter()
            .map(|(_, i)| IsoView {
                owner: users.get(&i.owner).filter(|o| auth::can_see_user(actor, o)).map(|o| o.name.clone()),
                name: i.name,
                size_bytes: i.size_bytes,
                created: i.created,
            })
            .collect())
    }

    /// Check that `actor` may upload ISO `name` and that the name is free.
    /// (`declared`: the upload's announced size, 0 when unknown; it is
    /// checked against the tenant's storage quota, which ISOs count in.)
    pub fn check_iso_upload(&self, actor: &User, name: &str, declared: u64) -> ApiResult<()> {
        forbid_regular(actor, "upload ISOs")?;
        names::check_iso(name).map_err(ApiError::bad)?;
        if self.meta.get::<IsoMeta>(ISOS, name)?.is_some() {
            return Err(ApiError::conflict(format!("ISO {name} already exists: ISOs are kept once; delete it first")));
        }
        if let Some(left) = self.storage_left(actor)?
            && declared > left
        {
            return Err(ApiError::no_space(format!(
                "the ISO ({declared} bytes) does not fit in your tenant's storage quota ({left} bytes left); ISOs count in it"
            )));
        }
        Ok(())
    }

    /// Record an uploaded ISO (its file is in place, read-only).
    pub fn record_iso(&self, actor: &User, iso: &IsoMeta) -> ApiResult<()> {
        self.meta.write(|w| {
            if w.get::<IsoMeta>(ISOS, &iso.name)?.is_some() {
                return Err(ApiError::conflict(format!(
                    "ISO {} was uploaded at the same time by someone else",
                    iso.name
                )));
            }
            w.put(ISOS, &iso.name, iso)?;
            w.event(&event(&actor.name, "iso.upload", &iso.name, &format!("{} bytes", iso.size_bytes)))?;
            Ok(())
        })
    }

    /// Delete an ISO: its uploader or a manager, and not while a VM uses it.
    pub fn delete_iso(&self, actor: &User, name: &str) -> ApiResult<()> {
        forbid_regular(actor, "delete ISOs")?;
        let iso: IsoMeta =
            self.meta.get(ISOS, name)?.ok_or_else(|| ApiError::not_found(format!("ISO {name} not found")))?;
        if actor.role != Role::Manager && iso.owner != actor.name {
            return Err(ApiError::forbidden(format!("ISO {name} was uploaded by someone else; ask a manager")));
        }
        let vms = self.iso_vms(name)?;
        if !vms.is_empty() {
            return Err(ApiError::conflict(format!("ISO {name} is in the CD-ROM of VM(s) {}", vms.join(", "))));
        }
        // File first: a crash in between leaves a record without a file,
        // which the next start drops (never a deleted ISO coming back).
        let path = self.iso_path(name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ApiError::internal("removing the ISO file", format!("{}: {e}", path.display()))),
        }
        self.meta.write(|w| {
            w.remove(ISOS, name)?;
            w.event(&event(&actor.name, "iso.delete", name, ""))?;
            Ok::<_, db::Error>(())
        })?;
        Ok(())
    }

    // ----- jobs, events, pools -----

    /// Start a job: tracked in memory for its progress, recorded as running.
    /// The handle ends it: [`JobRun::finish`], or, dropped unfinished (an
    /// early return, a client that went away), as failed.
    pub fn start_job(&self, kind: &str, target: &str, owner: &str, total: u64) -> JobRun<'_> {
        let job = self.jobs.start(kind, target, owner, total);
        self.record_job(&Jobs::view(&job));
        JobRun { app: self, job: Some(job) }
    }

    /// Take back a job handed to a task with [`JobRun::detach`].
    pub fn adopt_job(&self, job: Arc<Job>) -> JobRun<'_> {
        JobRun { app: self, job: Some(job) }
    }

    /// End a job (with an error if it failed) and record how it ended.
    fn finish_job(&self, job: &Job, error: Option<String>) {
        job.finish(error);
        self.record_job(&Jobs::view(job));
        self.jobs.jobs.lock().remove(&job.id);
    }

    fn record_job(&self, v: &JobView) {
        let r = self.meta.write(|w| {
            w.put(JOBS, &job_key(v.id), v)?;
            // Keep the newest JOBS_KEPT; one still running stays until it ends.
            if v.id > JOBS_KEPT {
                let old = job_key(v.id - JOBS_KEPT);
                if w.get::<JobView>(JOBS, &old)?.is_some_and(|j| j.state != JobState::Running) {
                    w.remove(JOBS, &old)?;
                }
            }
            if v.state != JobState::Running && v.id + JOBS_KEPT <= self.jobs.next.load(Ordering::Relaxed) {
                // It ran so long that newer jobs pushed it out meanwhile.
                w.remove(JOBS, &job_key(v.id))?;
            }
            Ok::<_, db::Error>(())
        });
        if let Err(e) = r {
            tracing::error!("recording job {}: {e}", v.id);
        }
    }

    /// Continue job ids after the recorded ones, and record the jobs that
    /// were running when the daemon last stopped as failed (says which).
    pub fn resume_jobs(&self) -> db::Result<Vec<String>> {
        let recorded: Vec<(String, JobView)> = self.meta.list(JOBS)?;
        let last = recorded.last().map_or(0, |(_, j)| j.id);
        self.jobs.next.store(last, Ordering::Relaxed);
        let mut said = Vec::new();
        for (key, mut j) in recorded.into_iter().filter(|(_, j)| j.state == JobState::Running) {
            j.state = JobState::Failed;
            j.error = Some("interrupted: the daemon stopped while the job ran; start it again".into());
            self.meta.put(JOBS, &key, &j)?;
            said.push(format!("job {} ({} {}) was cut short by the stop; recorded as failed", j.id, j.kind, j.target));
        }
        Ok(said)
    }

    /// Jobs `actor` may see (its own; a manager sees all), the running ones
    /// with their live progress.
    pub fn list_jobs(&self, actor: &User) -> ApiResult<Vec<JobView>> {
        // Running jobs first, then the records: a job that ends in between
        // shows its final record, not its last running view.
        let running: Vec<JobView> = self.jobs.jobs.lock().values().map(|j| Jobs::view(j)).collect();
        let mut all: std::collections::BTreeMap<u64, JobView> =
            self.meta.list::<JobView>(JOBS)?.into_iter().map(|(_, j)| (j.id, j)).collect();
        for j in running {
            if all.get(&j.id).is_none_or(|r| r.state == JobState::Running) {
                all.insert(j.id, j);
            }
        }
        // A job older than the actor was started by an earlier holder of the
        // name.
        let mine = |j: &JobView| j.owner == actor.name && j.started >= actor.created;
        Ok(all.into_values().filter(|j| actor.role == Role::Manager || mine(j)).collect())
    }

    /// One job.
    pub fn show_job(&self, actor: &User, id: u64) -> ApiResult<JobView> {
        self.list_jobs(actor)?
            .into_iter()
            .find(|j| j.id == id)
            .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))
    }

    /// Events `actor` may see: a manager all, others those done by users
    /// it can see.
    pub fn list_events(&self, actor: &User, after: u64, limit: usize) -> ApiResult<Vec<serde_json::Value>> {
        Ok(self.follow_events(actor, after, limit)?.0)
    }

    /// [`App::list_events`], and the sequence number of the last event it
    /// looked at, visible or not (a follower's next cursor, so it never
    /// looks at the same events twice).
    pub fn follow_events(&self, actor: &User, after: u64, limit: usize) -> ApiResult<(Vec<serde_json::Value>, u64)> {
        let users = self.users_by_name()?;
        let mut out = Vec::new();
        let mut scanned = after;
        for (id, e) in self.meta.events::<Event>(after, if actor.role == Role::Manager { limit } else { 100_000 })? {
            // An event older than its user was done by an earlier holder of
            // the name, someone else.
            let ok = actor.role == Role::Manager
                || users.get(&e.user).is_some_and(|u| auth::can_see_user(actor, u) && e.time >= u.created);
            if ok {
                if after > 0 && out.len() == limit {
                    break;
                }
                let mut v = serde_json::to_value(&e).expect("events serialize");
                v["id"] = id.into();
                out.push(v);
            }
            scanned = scanned.max(id);
        }
        if after > 0 {
            // Following the log: the next `limit` after the cursor.
            return Ok((out, scanned));
        }
        let skip = out.len().saturating_sub(limit);
        Ok((out.split_off(skip), scanned))
    }

    /// The sequence number of the newest event (0: none yet): where a
    /// follower of the log starts.
    pub fn last_event_id(&self) -> ApiResult<u64> {
        Ok(self.meta.events::<serde_json::Value>(0, 1)?.last().map_or(0, |(id, _)| *id))
    }

    /// Record an event done by the daemon itself.
    pub fn log_event(&self, user: &str, action: &str, target: &str, detail: &str) {
        if let Err(e) = self.meta.write(|w| w.event(&event(user, action, target, detail))) {
            tracing::error!("recording event {action} {target}: {e}");
        }
    }
}

/// The key of job `id`'s record: zero-padded, so key order is id order.
fn job_key(id: u64) -> String {
    format!("{id:020}")
}

/// Open NBD sessions on volume `name` and its snapshots.
fn sessions_of(counters: &[keel_nbd_server::ExportCounters], name: &str) -> u64 {
    let prefix = format!("{name}@");
    counters.iter().filter(|c| c.name == name || c.name.starts_with(&prefix)).map(|c| c.sessions).sum()
}

pub(crate) fn event(user: &str, action: &str, target: &str, detail: &str) -> Event {
    tracing::info!(target: "keel::event", user, action, object = target, detail, "event");
    Event { time: now(), user: user.into(), action: action.into(), target: target.into(), detail: detail.into() }
}

#[cfg(test)]
mod tests {
    use keel_blockstore::backend::MemBackend;
    use keel_blockstore::{AnyBackend, Pool, PoolOptions};
    use keel_nbd_server::Exports;

    use super::*;

    async fn app(dir: &std::path::Path) -> App {
        let pool = Pool::create(AnyBackend::Mem(MemBackend::new(64 << 20)), PoolOptions::default()).await.unwrap();
        let (meta, _) = Meta::open(&dir.join("m.redb")).unwrap();
        let addrs = Addrs {
            api: "127.0.0.1:7450".parse().unwrap(),
            nbd: "127.0.0.1:10809".parse().unwrap(),
            iscsi: "127.0.0.1:3260".parse().unwrap(),
        };
        let access = crate::access::AccessKeys::load(dir, true).unwrap();
        App::new(Arc::new(crate::pools::Pools::single(pool)), meta, addrs, dir.to_path_buf(), access).unwrap()
    }

    fn admin() -> User {
        User {
            name: "admin".into(),
            role: Role::Manager,
            parent: None,
            quota: None,
            password_hash: String::new(),
            created: 0,
        }
    }

    #[tokio::test]
    async fn iscsi_targets_read_the_export_settings() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path()).await;
        let a = admin();
        app.meta.put(USERS, "admin", &a).unwrap();
        let v = app
            .create_volume(&a, CreateVolume { name: "web".into(), size: 1 << 20, owner: None, pool: None })
            .await
            .unwrap();
        // Without CHAP of its own, the target takes the volume's access key
        // as CHAP secret, and the URLs carry the key.
        let key = app.access.key("web", app.key_salt("web").unwrap());
        assert_eq!(v.iscsi_url, format!("iscsi://web%{key}@127.0.0.1:3260/iqn.2026-11.io.keel:web/0"));
        assert_eq!(v.nbd_url, format!("nbd://127.0.0.1:10809/web:{key}"));
        let t = app.target("iqn.2026-11.io.keel:web").unwrap();
        assert_eq!(t.chap, Some(Chap { user: "web".into(), secret: key }));
        let chap = Chap { user: "host".into(), secret: "0123456789abcd".into() };
        let iscsi = IscsiExport { initiators: vec!["iqn.1993-08.org.debian:01:a".into()], chap: Some(chap.clone()) };
        let e = app.set_export(&a, "web", iscsi).await.unwrap();
        assert_eq!(e.chap_user.as_deref(), Some("host"));
        let t = app.target("iqn.2026-11.io.keel:web").unwrap();
        assert_eq!(t.volume, "web");
        assert_eq!(t.chap, Some(chap));
        assert_eq!(t.initiators, ["iqn.1993-08.org.debian:01:a"]);
        assert_eq!(app.targets().len(), 1);
        assert_eq!(app.portal().port(), 3260);
        assert!(app.target("iqn.2026-11.io.keel:nope").is_none());
        assert!(app.target("iqn.other:web").is_none());
        let bad = IscsiExport { initiators: vec!["IQN.UPPER".into()], chap: None };
        assert_eq!(app.set_export(&a, "web", bad).await.unwrap_err().status.as_u16(), 400);
    }

    #[tokio::test]
    async fn an_open_nbd_session_blocks_delete_until_closed() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path()).await;
        let a = admin();
        app.meta.put(USERS, "admin", &a).unwrap();
        app.create_volume(&a, CreateVolume { name: "v".into(), size: 1 << 20, owner: None, pool: None }).await.unwrap();
        app.create_snapshot(&a, "v", "s").await.unwrap();
        let session = app.nbd.open("v@s").unwrap();
        assert_eq!(app.show_volume(&a, "v").unwrap().nbd_sessions, 1);
        assert_eq!(app.delete_snapshot(&a, "v", "s").await.unwrap_err().status.as_u16(), 409);
        assert_eq!(app.delete_volume(&a, "v", true).await.unwrap_err().status.as_u16(), 409);
        drop(session);
        let iscsi = app.sessions.open("iscsi", "v");
        assert_eq!(app.sessions.of_protocol("iscsi"), 1);
        assert_eq!(app.delete_volume(&a, "v", true).await.unwrap_err().status.as_u16(), 409);
        drop(iscsi);
        assert_eq!(app.sessions.on_volume("v"), 0);
        app.delete_volume(&a, "v", true).await.unwrap();
        assert_eq!(app.show_volume(&a, "v").unwrap_err().status.as_u16(), 404);
        assert!(app.meta.list::<Intent>(INTENTS).unwrap().is_empty(), "no intent is left behind");
    }

    #[tokio::test]
    async fn what_a_vm_uses_cannot_be_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path()).await;
        let a = admin();
        app.meta.put(USERS, "admin", &a).unwrap();
        app.create_volume(&a, CreateVolume { name: "boot".into(), size: 1 << 20, owner: None, pool: None })
            .await
            .unwrap();
        std::fs::create_dir_all(app.iso_dir()).unwrap();
        std::fs::write(app.iso_dir().join("installer.iso"), b"x").unwrap();
        let iso = IsoMeta { name: "installer".into(), size_bytes: 1, owner: "admin".into(), created: 0 };
        app.record_iso(&a, &iso).unwrap();
        let req = crate::vms::CreateVm {
            name: "vm1".into(),
            cpus: 1,
            memory_bytes: 64 << 20,
            disks: vec!["boot".into()],
            iso: Some("installer".into()),
            ..Default::default()
        };
        app.create_vm(&a, req).await.unwrap();
        let e = app.delete_volume(&a, "boot", false).await.unwrap_err();
        assert_eq!(e.status.as_u16(), 409);
        assert!(e.message.contains("vm1"), "{}", e.message);
        assert_eq!(app.delete_iso(&a, "installer").unwrap_err().status.as_u16(), 409);
        assert!(app.iso_dir().join("installer.iso").exists());
    }

    #[tokio::test]
    async fn reconcile_finishes_and_undoes_intents() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path()).await;
        app.meta.put(USERS, "admin", &admin()).unwrap();
        // A create that reached the store, one that did not, a delete that
        // did not, a record whose volume is gone, a store volume with no record.
        app.pools.create_volume("made", 1 << 20).await.unwrap();
        app.pools.create_volume("doomed", 1 << 20).await.unwrap();
        app.pools.create_volume("stray", 1 << 20).await.unwrap();
        let create = |n: &str| Intent::Create { name: n.into(), owner: "admin".into(), origin: None };
        app.meta.put(INTENTS, "made", &create("made")).unwrap();
        app.meta.put(INTENTS, "never", &create("never")).unwrap();
        app.meta.put(INTENTS, "doomed", &Intent::Delete { name: "doomed".into() }).unwrap();
        let ghost = VolumeMeta {
            name: "ghost".into(),
            owner: "admin".into(),
            created: 0,
            origin: None,
            iscsi: IscsiExport::default(),
            key_salt: crate::model::new_key_salt(),
            pool: None,
        };
        app.meta.put(VOLUMES, "ghost", &ghost).unwrap();
        let said = crate::reconcile::reconcile(&app.pools, &app.meta).await.unwrap();
        assert_eq!(said.len(), 5, "{said:?}");
        let mut recorded: Vec<String> =
            app.meta.list::<VolumeMeta>(VOLUMES).unwrap().into_iter().map(|(k, _)| k).collect();
        recorded.sort();
        assert_eq!(recorded, ["made", "stray"]);
        let mut stored: Vec<String> = app.pools.list().into_iter().map(|d| d.name).collect();
        stored.sort();
        assert_eq!(stored, ["made", "stray"]);
        assert!(app.meta.list::<Intent>(INTENTS).unwrap().is_empty());
        // A second pass finds nothing to do.
        assert!(crate::reconcile::reconcile(&app.pools, &app.meta).await.unwrap().is_empty());
    }
}
