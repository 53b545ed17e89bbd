//! The HTTP API: JSON under `/api/v1`, described by `openapi.json` (served
//! at `/api/v1/openapi.json`), and Prometheus metrics at `/metrics`.
//!
//! Handlers only decode: they pull the caller from the bearer token, parse
//! the body and query into typed requests (every field checked, unknown
//! fields refused), and call [`App`]. Every error is `{"error": "..."}`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use futures::StreamExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::io::AsyncWriteExt;

use crate::app::{App, CreateUser, CreateVolume, ExportView, JobView, SnapshotView, UserView, VolumeView};
use crate::error::{ApiError, ApiResult};
use crate::model::{Chap, IscsiExport, IsoMeta, KernelBoot, Quota, Role, User, now, parse_size};
use crate::names::{self, ApplianceName, IsoName, NicId, PoolName, SnapshotName, UserName, VmName, VolumeName};
use crate::pool_ops::{CreatePool, PoolView};
use crate::vms::{CreateVm, VmView};

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The caller, from `Authorization: Bearer TOKEN`.
pub struct Actor(pub User);

impl FromRequestParts<Arc<App>> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Actor, ApiError> {
        let h = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let token = h.and_then(|h| h.strip_prefix("Bearer ")).ok_or_else(|| {
            ApiError::unauthorized(
                "this endpoint needs `Authorization: Bearer TOKEN`: get a token with POST /api/v1/tokens (the first manager's is in DATA/credentials)",
            )
        })?;
        app.authenticate(token.trim()).map(Actor)
    }
}

/// A name from the URL's path, checked by its kind's rule (a 400 naming the
/// rule otherwise) before the handler sees it.
pub struct N<T>(pub T);

/// Two names from the URL's path (`/volumes/{name}/snapshots/{snap}`).
pub struct N2<A, B>(pub A, pub B);

fn path_error(e: axum::extract::rejection::PathRejection) -> ApiError {
    ApiError::bad(format!("{}: each kind's name rule is in /api/v1/openapi.json", e.body_text()))
}

impl<T: names::Kind + Send> FromRequestParts<Arc<App>> for N<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<N<T>, ApiError> {
        let Path(s) = Path::<String>::from_request_parts(parts, app).await.map_err(path_error)?;
        names::parse(&s).map(N)
    }
}

impl<A, B> FromRequestParts<Arc<App>> for N2<A, B>
where
    A: names::Kind + Send,
    B: names::Kind + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<N2<A, B>, ApiError> {
        let Path((a, b)) = Path::<(String, String)>::from_request_parts(parts, app).await.map_err(path_error)?;
        Ok(N2(names::parse(&a)?, names::parse(&b)?))
    }
}

fn body<T: DeserializeOwned>(b: &Bytes) -> ApiResult<T> {
    if b.is_empty() {
        return Err(ApiError::bad("the request needs a JSON body"));
    }
    serde_json::from_slice(b).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

fn query<T: DeserializeOwned + Default>(q: Option<String>) -> ApiResult<T> {
    match q {
        None => Ok(T::default()),
        Some(q) => {
            // Query strings are flat key=value pairs; decode them through a
            // JSON object so the same field checks apply as for bodies.
            let mut map = serde_json::Map::new();
            for pair in q.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let v = match v {
                    "true" => serde_json::Value::Bool(true),
                    "false" => serde_json::Value::Bool(false),
                    _ => match v.parse::<u64>() {
                        Ok(n) => n.into(),
                        Err(_) => v.into(),
                    },
                };
                map.insert(k.to_string(), v);
            }
            serde_json::from_value(map.into()).map_err(|e| ApiError::bad(format!("invalid query: {e}")))
        }
    }
}

/// A size as a number of bytes or a string with a K/M/G/T suffix.
#[derive(Deserialize)]
#[serde(untagged)]
enum SizeIn {
    Bytes(u64),
    Text(String),
}

impl SizeIn {
    fn bytes(&self) -> ApiResult<u64> {
        match self {
            SizeIn::Bytes(b) => Ok(*b),
            SizeIn::Text(s) => parse_size(s).map_err(ApiError::bad),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginIn {
    user: UserName,
    password: String,
}

/// The TCP peer's address (0.0.0.0 when the router runs without one, as in
/// unit tests). Never a header's claim.
pub(crate) fn client_ip(parts: &axum::http::Extensions) -> std::net::IpAddr {
    parts
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip())
}

async fn login(
    State(app): State<Arc<App>>,
    req: axum::extract::Request,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let addr = client_ip(req.extensions());
    let b = axum::body::to_bytes(req.into_body(), 64 << 10)
        .await
        .map_err(|_| ApiError::bad("the login request's body is over 64 KiB or was cut short"))?;
    let r: LoginIn = body(&b)?;
    let (token, user, expires) = login_throttled(&app, &r.user, r.password, addr).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"token": token, "user": user.name, "role": user.role, "expires": expires})),
    ))
}

/// A login from `addr`, throttled: the API's and the web UI's both come
/// here. Returns the new token, the user and when the token expires.
pub(crate) async fn login_throttled(
    app: &Arc<App>,
    user: &str,
    password: String,
    addr: std::net::IpAddr,
) -> ApiResult<(String, User, u64)> {
    // Locked keys are refused before any password is checked.
    app.logins.check(user, addr)?;
    // argon2 is deliberately slow and takes ~19 MiB per check: it runs on
    // the hashing threads (low priority, bounded queue), never on the
    // async workers that serve NBD and iSCSI.
    let app2 = app.clone();
    let name = user.to_string();
    let result = app.hasher.run(move || app2.login(&name, &password)).await?;
    match &result {
        Ok((_, u, _)) => app.logins.succeeded(&u.name, addr),
        Err(e) if e.status == StatusCode::UNAUTHORIZED => app.logins.failed(user, addr),
        Err(_) => {}
    }
    result
}

async fn logout(State(app): State<Arc<App>>, Actor(a): Actor, headers: HeaderMap) -> ApiResult<StatusCode> {
    let h = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let token = h.strip_prefix("Bearer ").unwrap_or_default().trim();
    app.logout(&a, token)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn whoami(State(app): State<Arc<App>>, Actor(a): Actor) -> ApiResult<Json<UserView>> {
    Ok(Json(app.show_user(&a, &a.name)?))
}

async fn pools(State(app): State<Arc<App>>, Actor(a): Actor) -> ApiResult<Json<Vec<PoolView>>> {
    Ok(Json(app.list_pools(&a)?))
}

async fn pool(State(app): State<Arc<App>>, Actor(a): Actor, N(name): N<PoolName>) -> ApiResult<Json<PoolView>> {
    Ok(Json(app.show_pool(&a, &name)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreatePoolIn {
    name: PoolName,
    file: Option<String>,
    device: Option<String>,
    lvm: Option<String>,
    size: Option<SizeIn>,
    tier: Option<String>,
    force: Option<bool>,
}

async fn create_pool(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    b: Bytes,
) -> ApiResult<(StatusCode, Json<PoolView>)> {
    let r: CreatePoolIn = body(&b)?;
    let req = CreatePool {
        name: r.name.into(),
        file: r.file,
        device: r.device,
        lvm: r.lvm,
        size: r.size.map(|s| s.bytes()).transpose()?,
        tier: r.tier,
        force: r.force.unwrap_or(false),
    };
    Ok((StatusCode::CREATED, Json(app.create_pool(&a, req).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrowPoolIn {
    size: Option<SizeIn>,
}

async fn grow_pool(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<PoolName>,
    b: Bytes,
) -> ApiResult<Json<PoolView>> {
    let r: GrowPoolIn = if b.is_empty() { GrowPoolIn { size: None } } else { body(&b)? };
    let size = r.size.map(|s| s.bytes()).transpose()?;
    Ok(Json(app.grow_pool(&a, &name, size).await?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ForceQuery {
    force: Option<bool>,
}

async fn remove_pool(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<PoolName>,
    RawQuery(q): RawQuery,
) -> ApiResult<StatusCode> {
    let q: ForceQuery = query(q)?;
    app.remove_pool(&a, &name, q.force.unwrap_or(false)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveVolumeIn {
    pool: PoolName,
}

async fn move_volume(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VolumeName>,
    b: Bytes,
) -> ApiResult<Json<VolumeView>> {
    let r: MoveVolumeIn = body(&b)?;
    Ok(Json(app.move_volume(&a, &name, &r.pool).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVolumeIn {
    name: VolumeName,
    size: SizeIn,
    owner: Option<UserName>,
    pool: Option<PoolName>,
}

async fn list_volumes(State(app): State<Arc<App>>, Actor(a): Actor) -> ApiResult<Json<Vec<VolumeView>>> {
    Ok(Json(app.list_volumes(&a)?))
}

async fn create_volume(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    b: Bytes,
) -> ApiResult<(StatusCode, Json<VolumeView>)> {
    let r: CreateVolumeIn = body(&b)?;
    let req = CreateVolume {
        name: r.name.into(),
        size: r.size.bytes()?,
        owner: r.owner.map(Into::into),
        pool: r.pool.map(Into::into),
    };
    Ok((StatusCode::CREATED, Json(app.create_volume(&a, req).await?)))
}

async fn show_volume(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VolumeName>,
) -> ApiResult<Json<VolumeView>> {
    Ok(Json(app.show_volume(&a, &name)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeIn {
    size: SizeIn,
}

async fn resize_volume(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VolumeName>,
    b: Bytes,
) -> ApiResult<Json<VolumeView>> {
    let r: ResizeIn = body(&b)?;
    Ok(Json(app.resize_volume(&a, &name, r.size.bytes()?).await?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeleteQ {
    recursive: Option<bool>,
}

async fn delete_volume(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VolumeName>,
    RawQuery(q): RawQuery,
) -> ApiResult<StatusCode> {
    let q: DeleteQ = query(q)?;
    app.delete_volume(&a, &name, q.recursive.unwrap_or(false)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotIn {
    name: SnapshotName,
    /// Refused with a reason (a snapshot has its volume's owner).
    #[serde(default)]
    owner: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloneIn {
    name: VolumeName,
    #[serde(default)]
    owner: Option<UserName>,
}

async fn list_snapshots(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VolumeName>,
) -> ApiResult<Json<Vec<SnapshotView>>> {
    Ok(Json(app.list_snapshots(&a, &name)?))
}

async fn create_snapshot(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VolumeName>,
    b: Bytes,
) -> ApiResult<(StatusCode, Json<SnapshotView>)> {
    let r: SnapshotIn = body(&b)?;
    if r.owner.is_some() {
        return Err(ApiError::bad("a snapshot belongs to its volume's owner: drop the owner field"));
    }
    Ok((StatusCode::CREATED, Json(app.create_snapshot(&a, &name, &r.name).await?)))
}

async fn delete_snapshot(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N2(name, snap): N2<VolumeName, SnapshotName>,
) -> ApiResult<StatusCode> {
    app.delete_snapshot(&a, &name, &snap).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn clone_snapshot(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N2(name, snap): N2<VolumeName, SnapshotName>,
    b: Bytes,
) -> ApiResult<(StatusCode, Json<VolumeView>)> {
    let r: CloneIn = body(&b)?;
    Ok((StatusCode::CREATED, Json(app.clone_snapshot(&a, &name, &snap, &r.name, r.owner.as_deref()).await?)))
}

async fn show_export(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VolumeName>,
) -> ApiResult<Json<ExportView>> {
    Ok(Json(app.export(&a, &name)?))
}

async fn rotate_key(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VolumeName>,
) -> ApiResult<Json<ExportView>> {
    Ok(Json(app.rotate_access_key(&a, &name).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportIn {
    #[serde(default)]
    initiators: Vec<String>,
    #[serde(default)]
    chap_user: Option<String>,
    #[serde(default)]
    chap_secret: Option<String>,
}

async fn set_export(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VolumeName>,
    b: Bytes,
) -> ApiResult<Json<ExportView>> {
    let r: ExportIn = body(&b)?;
    let chap = match (r.chap_user, r.chap_secret) {
        (None, None) => None,
        (Some(user), Some(secret)) => Some(Chap { user, secret }),
        _ => {
            return Err(ApiError::bad("chap_user and chap_secret go together: give both, or neither to turn CHAP off"));
        }
    };
    Ok(Json(app.set_export(&a, &name, IscsiExport { initiators: r.initiators, chap }).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateUserIn {
    name: UserName,
    role: String,
    password: String,
    #[serde(default)]
    parent: Option<UserName>,
    #[serde(default)]
    quota: Option<QuotaIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaIn {
    #[serde(default)]
    cpus: u32,
    #[serde(default)]
    memory: Option<SizeIn>,
    storage: SizeIn,
}

async fn list_users(State(app): State<Arc<App>>, Actor(a): Actor) -> ApiResult<Json<Vec<UserView>>> {
    Ok(Json(app.list_users(&a)?))
}

async fn create_user(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    b: Bytes,
) -> ApiResult<(StatusCode, Json<UserView>)> {
    let r: CreateUserIn = body(&b)?;
    let role = Role::parse(&r.role)
        .ok_or_else(|| ApiError::bad(format!("role {:?} is not one of manager, power, regular", r.role)))?;
    let quota = match r.quota {
        None => None,
        Some(q) => Some(Quota {
            cpus: q.cpus,
            memory_bytes: q.memory.map(|m| m.bytes()).transpose()?.unwrap_or(0),
            storage_bytes: q.storage.bytes()?,
        }),
    };
    let req = CreateUser { name: r.name.into(), role, password: r.password, parent: r.parent.map(Into::into), quota };
    Ok((StatusCode::CREATED, Json(app.create_user(&a, req).await?)))
}

async fn show_user(State(app): State<Arc<App>>, Actor(a): Actor, N(name): N<UserName>) -> ApiResult<Json<UserView>> {
    Ok(Json(app.show_user(&a, &name)?))
}

async fn delete_user(State(app): State<Arc<App>>, Actor(a): Actor, N(name): N<UserName>) -> ApiResult<StatusCode> {
    app.delete_user(&a, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_isos(State(app): State<Arc<App>>, Actor(a): Actor) -> ApiResult<Json<Vec<crate::app::IsoView>>> {
    Ok(Json(app.list_isos(&a)?))
}

/// Read and drop what is left of a refused upload (up to 64 MiB, for at
/// most 10 s), so a client that sends its whole body before reading the
/// answer gets the answer instead of a broken pipe.
async fn drain(stream: &mut axum::body::BodyDataStream) {
    let mut left: i64 = 64 << 20;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while left > 0 {
            match stream.next().await {
                Some(Ok(c)) => left -= c.len() as i64,
                _ => break,
            }
        }
    })
    .await;
}

/// Stream the request body to `DATA/isos/.NAME.upload-RANDOM`, make it
/// read-only and link it to `NAME.iso` (refusing to replace one). Memory
/// use is one body chunk, whatever the size.
async fn store_iso(app: &App, name: &str, body: Body, job: &crate::app::Job, limit: Option<u64>) -> ApiResult<u64> {
    let dir = app.iso_dir();
    let io = |what: &str, e: std::io::Error| {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            ApiError::no_space(format!("the data directory's disk is full while {what}: free space and retry"))
        } else {
            ApiError::internal(format!("storing the ISO ({what})"), e)
        }
    };
    tokio::fs::create_dir_all(&dir).await.map_err(|e| io("creating the ISO directory", e))?;
    let tmp = dir.join(format!(".{name}.upload-{:016x}", rand::random::<u64>()));
    let result = async {
        let mut f = tokio::fs::File::create(&tmp).await.map_err(|e| io("creating the upload file", e))?;
        let mut stream = body.into_data_stream();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ApiError::bad(format!("the upload was interrupted: {e}")))?;
            f.write_all(&chunk).await.map_err(|e| io("writing the upload", e))?;
            n += chunk.len() as u64;
            if let Some(l) = limit
                && n > l
            {
                drain(&mut stream).await;
                return Err(ApiError::no_space(format!(
                    "the ISO outgrew your tenant's storage quota ({l} bytes left); ISOs count in it"
                )));
            }
            job.done.store(n, Ordering::Relaxed);
        }
        if n == 0 {
            return Err(ApiError::bad("the upload is empty: send the ISO as the request body"));
        }
        f.sync_all().await.map_err(|e| io("syncing the upload", e))?;
        drop(f);
        use std::os::unix::fs::PermissionsExt;
        tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444))
            .await
            .map_err(|e| io("making the ISO read-only", e))?;
        let dest = dir.join(format!("{name}.iso"));
        match tokio::fs::hard_link(&tmp, &dest).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ApiError::conflict(format!("ISO {name} already exists")));
            }
            Err(e) => return Err(io("storing the ISO", e)),
        }
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(n)
    }
    .await;
    let _ = tokio::fs::remove_file(&tmp).await;
    result
}

async fn upload_iso(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<IsoName>,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    Ok((StatusCode::CREATED, Json(upload_iso_as(&app, &a, &name, &headers, b).await?)))
}

/// Store the ISO streamed in `b` as `name`, for `a`, as a job (`iso.upload`);
/// the API and the web UI's upload both come here. Returns the ISO's record
/// with the job's id.
pub(crate) async fn upload_iso_as(
    app: &Arc<App>,
    a: &User,
    name: &str,
    headers: &HeaderMap,
    b: Body,
) -> ApiResult<serde_json::Value> {
    let total = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if let Err(e) = app.check_iso_upload(a, name, total) {
        drain(&mut b.into_data_stream()).await;
        return Err(e);
    }
    let limit = app.storage_left(a)?;
    let job = app.start_job("iso.upload", name, &a.name, total);
    let r = store_iso(app, name, b, &job, limit).await;
    let r = match r {
        Ok(size) => {
            let iso = IsoMeta { name: name.to_string(), size_bytes: size, owner: a.name.clone(), created: now() };
            match app.record_iso(a, &iso) {
                Ok(()) => Ok(iso),
                Err(e) => {
                    if let Ok(p) = app.iso_path(name) {
                        let _ = std::fs::remove_file(p);
                    }
                    Err(e)
                }
            }
        }
        Err(e) => Err(e),
    };
    let id = job.id;
    job.finish(r.as_ref().err().map(|e| e.message.clone()));
    let iso = r?;
    let mut v = serde_json::to_value(&iso).expect("ISO records serialize");
    v["job"] = id.into();
    Ok(v)
}

async fn delete_iso(State(app): State<Arc<App>>, Actor(a): Actor, N(name): N<IsoName>) -> ApiResult<StatusCode> {
    app.delete_iso(&a, &name)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_jobs(State(app): State<Arc<App>>, Actor(a): Actor) -> ApiResult<Json<Vec<JobView>>> {
    Ok(Json(app.list_jobs(&a)?))
}

async fn show_job(State(app): State<Arc<App>>, Actor(a): Actor, Path(id): Path<String>) -> ApiResult<Json<JobView>> {
    let id: u64 = id.parse().map_err(|_| ApiError::bad(format!("job id {id:?} is not a number")))?;
    Ok(Json(app.show_job(&a, id)?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EventsQ {
    after: Option<u64>,
    limit: Option<usize>,
}

async fn events(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Vec<serde_json::Value>>> {
    let q: EventsQ = query(q)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 10_000 {
        return Err(ApiError::bad("limit must be 1 to 10000"));
    }
    Ok(Json(app.list_events(&a, q.after.unwrap_or(0), limit)?))
}

// ----- VMs -----

/// A NIC's network: `"user"`, `{"tap": "IF"}` or `{"bridge": "BR"}`.
type NetworkIn = crate::model::Network;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVmIn {
    name: VmName,
    #[serde(default)]
    cpus: Option<u32>,
    #[serde(default)]
    memory: Option<SizeIn>,
    #[serde(default)]
    disks: Vec<VolumeName>,
    #[serde(default)]
    blank_disk: Option<SizeIn>,
    #[serde(default)]
    iso: Option<IsoName>,
    #[serde(default)]
    nics: Option<Vec<NetworkIn>>,
    #[serde(default)]
    boot: Option<Vec<String>>,
    #[serde(default)]
    kernel: Option<KernelIn>,
    #[serde(default)]
    owner: Option<UserName>,
    #[serde(default)]
    start: bool,
    #[serde(default)]
    from_appliance: Option<ApplianceName>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KernelIn {
    kernel: String,
    #[serde(default)]
    initrd: Option<String>,
    #[serde(default)]
    append: String,
}

async fn list_vms(State(app): State<Arc<App>>, Actor(a): Actor) -> ApiResult<Json<Vec<VmView>>> {
    Ok(Json(app.list_vms(&a)?))
}

async fn create_vm(State(app): State<Arc<App>>, Actor(a): Actor, b: Bytes) -> ApiResult<(StatusCode, Json<VmView>)> {
    let r: CreateVmIn = body(&b)?;
    // A VM from an appliance takes the appliance's shape unless told.
    let shape =
        r.from_appliance.as_ref().and_then(|n| app.library.get(n).ok()).map(|d| (d.cpus, d.memory_bytes, d.boot));
    let req = CreateVm {
        name: r.name.to_string(),
        cpus: r.cpus.or(shape.as_ref().map(|s| s.0)).unwrap_or(1),
        memory_bytes: match r.memory {
            Some(m) => m.bytes()?,
            None => shape.as_ref().map_or(512 << 20, |s| s.1),
        },
        disks: r.disks.into_iter().map(Into::into).collect(),
        blank_disk: r.blank_disk.map(|s| s.bytes()).transpose()?,
        iso: r.iso.map(Into::into),
        nics: r.nics,
        boot: r.boot,
        kernel: r.kernel.map(|k| KernelBoot { kernel: k.kernel, initrd: k.initrd, append: k.append }),
        owner: r.owner.map(Into::into),
        from_appliance: r.from_appliance.map(Into::into),
    };
    let req = CreateVm { boot: req.boot.clone().or(shape.map(|s| s.2)), ..req };
    let v = app.create_vm(&a, req).await?;
    if r.start {
        return Ok((StatusCode::CREATED, Json(app.start_vm(&a, &r.name).await?)));
    }
    Ok((StatusCode::CREATED, Json(v)))
}

async fn show_vm(State(app): State<Arc<App>>, Actor(a): Actor, N(name): N<VmName>) -> ApiResult<Json<VmView>> {
    Ok(Json(app.show_vm(&a, &name)?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeleteVmQ {
    disks: Option<String>,
    #[serde(default)]
    force: bool,
}

async fn delete_vm(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VmName>,
    RawQuery(q): RawQuery,
) -> ApiResult<StatusCode> {
    let q: DeleteVmQ = query(q)?;
    let delete_disks = match q.disks.as_deref() {
        Some("delete") => true,
        Some("keep") => false,
        _ => {
            return Err(ApiError::bad(
                "say what happens to the VM's disks: ?disks=delete or ?disks=keep (`keel vm delete --disks` / `--keep-disks`)",
            ));
        }
    };
    app.delete_vm(&a, &name, delete_disks, q.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn start_vm(State(app): State<Arc<App>>, Actor(a): Actor, N(name): N<VmName>) -> ApiResult<Json<VmView>> {
    Ok(Json(app.start_vm(&a, &name).await?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StopQ {
    #[serde(default)]
    force: bool,
}

async fn stop_vm(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VmName>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<VmView>> {
    let q: StopQ = query(q)?;
    Ok(Json(app.stop_vm(&a, &name, q.force).await?))
}

async fn reset_vm(State(app): State<Arc<App>>, Actor(a): Actor, N(name): N<VmName>) -> ApiResult<Json<VmView>> {
    Ok(Json(app.reset_vm(&a, &name).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CdromIn {
    /// Required, `null` to eject.
    iso: serde_json::Value,
}

async fn set_cdrom(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VmName>,
    b: Bytes,
) -> ApiResult<Json<VmView>> {
    let r: CdromIn = body(&b)?;
    let iso = match &r.iso {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(IsoName::parse(s)?),
        _ => return Err(ApiError::bad("iso must be an ISO name, or null to eject")),
    };
    Ok(Json(app.set_cdrom(&a, &name, iso.as_deref()).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskIn {
    volume: VolumeName,
}

async fn attach_disk(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VmName>,
    b: Bytes,
) -> ApiResult<Json<VmView>> {
    let r: DiskIn = body(&b)?;
    Ok(Json(app.attach_disk(&a, &name, &r.volume).await?))
}

async fn detach_disk(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N2(name, volume): N2<VmName, VolumeName>,
) -> ApiResult<Json<VmView>> {
    Ok(Json(app.detach_disk(&a, &name, &volume).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NicIn {
    #[serde(default)]
    network: Option<NetworkIn>,
}

async fn add_nic(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VmName>,
    b: Bytes,
) -> ApiResult<Json<VmView>> {
    let r: NicIn = if b.is_empty() { NicIn { network: None } } else { body(&b)? };
    Ok(Json(app.add_nic(&a, &name, r.network.unwrap_or(NetworkIn::User)).await?))
}

async fn remove_nic(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N2(name, id): N2<VmName, NicId>,
) -> ApiResult<Json<VmView>> {
    Ok(Json(app.remove_nic(&a, &name, &id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloneVmIn {
    name: VmName,
    #[serde(default)]
    owner: Option<UserName>,
}

async fn clone_vm(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VmName>,
    b: Bytes,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let r: CloneVmIn = body(&b)?;
    let (vm, stats) = app.clone_vm(&a, &name, &r.name, r.owner.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "vm": vm, "stats": stats }))))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConsoleQ {
    #[serde(default)]
    offset: u64,
}

async fn console(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VmName>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<serde_json::Value>> {
    let q: ConsoleQ = query(q)?;
    let (bytes, next) = app.console(&a, &name, q.offset, 1 << 20)?;
    Ok(Json(serde_json::json!({ "offset": next, "text": String::from_utf8_lossy(&bytes) })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct UsageQ {
    #[serde(default)]
    user: Option<UserName>,
}

async fn usage(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Vec<crate::model::UsageRow>>> {
    let q: UsageQ = query(q)?;
    Ok(Json(app.usage(&a, q.user.as_deref())?))
}

// ----- appliances -----

async fn list_appliances(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
) -> ApiResult<Json<Vec<crate::appliances::ApplianceView>>> {
    Ok(Json(app.list_appliances(&a)?))
}

async fn show_appliance(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<ApplianceName>,
) -> ApiResult<Json<crate::appliances::ApplianceView>> {
    Ok(Json(app.show_appliance(&a, &name)?))
}

async fn delete_appliance(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<ApplianceName>,
) -> ApiResult<Json<keel_images::GcReport>> {
    Ok(Json(app.delete_appliance(&a, &name).await?))
}

async fn verify_appliance(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<ApplianceName>,
) -> ApiResult<Json<serde_json::Value>> {
    let damage = app.verify_appliance(&a, &name).await?;
    Ok(Json(serde_json::json!({ "appliance": name, "ok": damage.is_empty(), "damage": damage })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CopyBackIn {
    name: ApplianceName,
    vm: VmName,
}

/// Copy-back: an appliance from a VM (a backup under another name).
async fn create_appliance(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    b: Bytes,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let r: CopyBackIn = body(&b)?;
    Ok((StatusCode::ACCEPTED, Json(app.backup_vm(&a, &r.vm, &r.name).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupIn {
    appliance: ApplianceName,
}

async fn backup_vm(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VmName>,
    b: Bytes,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let r: BackupIn = body(&b)?;
    Ok((StatusCode::ACCEPTED, Json(app.backup_vm(&a, &name, &r.appliance).await?)))
}

async fn restore_vm(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<VmName>,
    b: Bytes,
) -> ApiResult<Json<VmView>> {
    let r: BackupIn = body(&b)?;
    Ok(Json(app.restore_vm(&a, &name, &r.appliance).await?))
}

/// Download an appliance as an OVA.
async fn export_ova(State(app): State<Arc<App>>, Actor(a): Actor, N(name): N<ApplianceName>) -> ApiResult<Response> {
    let path = app.export_ova(&a, &name).await?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::internal("opening the OVA", format!("{}: {e}", path.display())))?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    // The open file stays readable; the scratch directory can go now.
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    let stream = futures::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 20];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{name}.ova\"")),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Upload an OVA as appliance NAME.
async fn import_ova(
    State(app): State<Arc<App>>,
    Actor(a): Actor,
    N(name): N<ApplianceName>,
    b: Body,
) -> ApiResult<(StatusCode, Json<crate::appliances::ApplianceView>)> {
    let refused = if a.role == Role::Regular {
        Some(ApiError::forbidden("a regular user cannot import appliances"))
    } else if app.library.exists(&name) {
        Some(ApiError::conflict(format!("appliance {name} already exists: pick another name")))
    } else {
        None
    };
    if let Some(e) = refused {
        drain(&mut b.into_data_stream()).await;
        return Err(e);
    }
    let dir = app.data.join("tmp").join(format!("import-{:016x}", rand::random::<u64>()));
    let r = async {
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| ApiError::internal("receiving the OVA", format!("{}: {e}", dir.display())))?;
        let ova = dir.join("upload.ova");
        let mut f = tokio::fs::File::create(&ova).await.map_err(|e| ApiError::internal("receiving the OVA", e))?;
        let mut stream = b.into_data_stream();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ApiError::bad(format!("the upload was interrupted: {e}")))?;
            f.write_all(&chunk).await.map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    ApiError::no_space("the data directory's disk is full while receiving the OVA")
                } else {
                    ApiError::internal("receiving the OVA", e)
                }
            })?;
            n += chunk.len() as u64;
        }
        if n == 0 {
            return Err(ApiError::bad("the upload is empty: send the OVA as the request body"));
        }
        f.sync_all().await.map_err(|e| ApiError::internal("receiving the OVA", e))?;
        drop(f);
        app.import_ova(&a, Some(&name), &ova).await
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    Ok((StatusCode::CREATED, Json(r?)))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(app): State<Arc<App>>, Actor(a): Actor) -> ApiResult<Response> {
    // Volume and export names are tenants' data: managers only (Prometheus
    // sends the token with `authorization: {credentials: ...}`).
    if a.role != Role::Manager {
        return Err(ApiError::forbidden("/metrics is for managers: scrape it with a manager's token"));
    }
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, samples: Vec<(String, u64)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in samples {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    let per_pool: Vec<(String, Option<keel_blockstore::PoolStats>)> = app
        .pools
        .slots()
        .iter()
        .map(|p| (format!("{{pool=\"{}\"}}", p.name()), p.pool.as_ref().map(|x| x.stats())))
        .collect();
    let each = |f: fn(&keel_blockstore::PoolStats) -> u64| -> Vec<(String, u64)> {
        per_pool.iter().filter_map(|(l, s)| s.as_ref().map(|s| (l.clone(), f(s)))).collect()
    };
    gauge("keel_pool_total_bytes", "Bytes of the pool's data area.", "gauge", each(|s| s.total_bytes));
    gauge("keel_pool_allocated_bytes", "Bytes in use in the pool.", "gauge", each(|s| s.allocated_bytes));
    gauge("keel_pool_free_bytes", "Free bytes in the pool.", "gauge", each(|s| s.free_bytes));
    gauge("keel_pool_provisioned_bytes", "Sum of volume sizes.", "gauge", each(|s| s.provisioned_bytes));
    gauge(
        "keel_pool_online",
        "1 when the pool is open, 0 when offline.",
        "gauge",
        per_pool.iter().map(|(l, s)| (l.clone(), s.is_some() as u64)).collect(),
    );
    let s = app.pools.default_pool().stats();
    let dc = s.data_cache;
    for (name, help, kind, v) in [
        ("keel_data_cache_bytes", "Bytes the data cache may hold.", "gauge", dc.capacity_bytes),
        ("keel_data_cache_used_bytes", "Bytes the data cache holds.", "gauge", dc.used_bytes),
        ("keel_data_cache_resident_bytes", "Bytes of memory the data cache has touched.", "gauge", dc.resident_bytes),
        ("keel_data_cache_hits_total", "Blocks of reads answered from the data cache.", "counter", dc.hits),
        (
            "keel_data_cache_staged_bytes",
            "Written bytes held for write-back, not on disk yet.",
            "gauge",
            dc.staged_bytes,
        ),
        (
            "keel_data_cache_misses_total",
            "Blocks of reads that missed the data cache and went to disk.",
            "counter",
            dc.misses,
        ),
        (
            "keel_data_cache_stale_total",
            "Data cache lookups that found a block with another checksum (0 unless a bug).",
            "counter",
            dc.stale,
        ),
    ] {
        gauge(name, help, kind, vec![(String::new(), v)]);
    }
    let devices = app.pools.list();
    let vols: Vec<_> = devices.iter().filter(|d| d.kind == keel_blockstore::DeviceKind::Volume).collect();
    gauge("keel_volumes", "Volumes in the pool.", "gauge", vec![(String::new(), vols.len() as u64)]);
    let label = |k: &str, v: &str| format!("{{{k}=\"{}\"}}", v.replace('\\', "\\\\").replace('"', "\\\""));
    gauge(
        "keel_volume_size_bytes",
        "Size of each volume.",
        "gauge",
        vols.iter().map(|d| (label("volume", &d.name), d.size)).collect(),
    );
    gauge(
        "keel_volume_allocated_bytes",
        "Mapped bytes of each volume.",
        "gauge",
        vols.iter().map(|d| (label("volume", &d.name), d.allocated_bytes)).collect(),
    );
    let c = app.nbd.counters();
    gauge("keel_nbd_sessions", "Open NBD connections.", "gauge", vec![(String::new(), app.nbd.total_sessions())]);
    gauge(
        "keel_iscsi_sessions",
        "Logged-in iSCSI sessions.",
        "gauge",
        vec![(String::new(), app.sessions.of_protocol("iscsi"))],
    );
    gauge(
        "keel_nbd_export_sessions",
        "Open NBD connections per export.",
        "gauge",
        c.iter().map(|c| (label("export", &c.name), c.sessions)).collect(),
    );
    gauge(
        "keel_nbd_read_bytes_total",
        "Bytes read over NBD per export.",
        "counter",
        c.iter().map(|c| (label("export", &c.name), c.read_bytes)).collect(),
    );
    gauge(
        "keel_nbd_written_bytes_total",
        "Bytes written over NBD per export.",
        "counter",
        c.iter().map(|c| (label("export", &c.name), c.write_bytes)).collect(),
    );
    gauge(
        "keel_nbd_read_ops_total",
        "NBD read requests per export.",
        "counter",
        c.iter().map(|c| (label("export", &c.name), c.read_ops)).collect(),
    );
    gauge(
        "keel_nbd_write_ops_total",
        "NBD write requests per export.",
        "counter",
        c.iter().map(|c| (label("export", &c.name), c.write_ops)).collect(),
    );
    let io: Vec<(String, [u64; 4])> = {
        let m = app.iscsi_io.lock();
        let mut v: Vec<_> = m
            .iter()
            .map(|(name, s)| {
                let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                (name.clone(), [g(&s.read_bytes), g(&s.write_bytes), g(&s.read_ops), g(&s.write_ops)])
            })
            .collect();
        v.sort();
        v
    };
    for (i, (metric, help)) in [
        ("keel_iscsi_read_bytes_total", "Bytes read over iSCSI per volume."),
        ("keel_iscsi_written_bytes_total", "Bytes written over iSCSI per volume."),
        ("keel_iscsi_read_ops_total", "iSCSI reads per volume."),
        ("keel_iscsi_write_ops_total", "iSCSI writes per volume."),
    ]
    .into_iter()
    .enumerate()
    {
        gauge(metric, help, "counter", io.iter().map(|(n, c)| (label("volume", n), c[i])).collect());
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

async fn not_found(uri: axum::http::Uri) -> Response {
    if !uri.path().starts_with("/api/") && uri.path() != "/metrics" {
        // A page of the web UI that does not exist.
        return crate::ui::UiError::Api(ApiError::not_found(format!("there is no page {}", uri.path())))
            .into_response();
    }
    ApiError::not_found("no such endpoint: the API is described at /api/v1/openapi.json").into_response()
}

async fn method_not_allowed() -> Response {
    let body = serde_json::json!({
        "error": "method not allowed on this endpoint: see /api/v1/openapi.json",
        "request_id": crate::error::request_id(),
    });
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

/// Every request gets an id (the `x-request-id` header of its answer, the
/// `request_id` of an error, and every log line about it), runs with it in
/// [`crate::error::REQUEST_ID`], and is logged: errors at info, the rest at
/// debug. A handler that panics answers a 500 with the id instead of a
/// dropped connection.
async fn log_request(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use futures::FutureExt;
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let id = crate::error::new_request_id();
    let started = std::time::Instant::now();
    let run = std::panic::AssertUnwindSafe(next.run(req)).catch_unwind();
    let resp = crate::error::REQUEST_ID
        .scope(id.clone(), async {
            let resp = match run.await {
                Ok(r) => r,
                Err(p) => {
                    let what = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    ApiError::internal(format!("{method} {path}"), format!("the handler panicked: {what}"))
                        .into_response()
                }
            };
            // The web UI's pages answer in HTML; the API always in JSON.
            if path.starts_with("/api/") || path == "/metrics" { json_error(resp).await } else { resp }
        })
        .await;
    let mut resp = resp;
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let status = resp.status().as_u16();
    let ms = started.elapsed().as_millis() as u64;
    // The path is the client's: log it escaped and cut short.
    let path: String = path.chars().take(200).collect();
    if status >= 400 {
        tracing::info!(target: "keel::http", request_id = %id, %method, ?path, status, ms, "request");
    } else {
        tracing::debug!(target: "keel::http", request_id = %id, %method, ?path, status, ms, "request");
    }
    resp
}

/// Errors that axum's extractors answer themselves (a body over the size
/// limit, a path that is not UTF-8, ...) come as plain text; give them the
/// API's JSON shape, so every error a client sees is `{"error": "...",
/// "request_id": "..."}`.
async fn json_error(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || is_json {
        return resp;
    }
    let text = match axum::body::to_bytes(resp.into_body(), 64 << 10).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "request body too large ({}): JSON requests take at most 2 MiB; ISO and OVA uploads are streamed \
             with PUT",
            if text.is_empty() { reason } else { text }
        ),
        _ if text.is_empty() => reason,
        _ => text,
    };
    let body = serde_json::json!({ "error": message, "request_id": crate::error::request_id() });
    (status, Json(body)).into_response()
}

/// The API's router.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/tokens", post(login))
        .route("/api/v1/tokens/current", axum::routing::delete(logout))
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/pools", get(pools).post(create_pool))
        .route("/api/v1/pools/{name}", get(pool).delete(remove_pool))
        .route("/api/v1/pools/{name}/grow", post(grow_pool))
        .route("/api/v1/volumes/{name}/move", post(move_volume))
        .route("/api/v1/volumes", get(list_volumes).post(create_volume))
        .route("/api/v1/volumes/{name}", get(show_volume).patch(resize_volume).delete(delete_volume))
        .route("/api/v1/volumes/{name}/snapshots", get(list_snapshots).post(create_snapshot))
        .route("/api/v1/volumes/{name}/snapshots/{snap}", axum::routing::delete(delete_snapshot))
        .route("/api/v1/volumes/{name}/snapshots/{snap}/clones", post(clone_snapshot))
        .route("/api/v1/volumes/{name}/export", get(show_export).put(set_export))
        .route("/api/v1/volumes/{name}/export/key", post(rotate_key))
        .route("/api/v1/isos", get(list_isos))
        .route("/api/v1/isos/{name}", put(upload_iso).delete(delete_iso))
        .route("/api/v1/users", get(list_users).post(create_user))
        .route("/api/v1/users/{name}", get(show_user).delete(delete_user))
        .route("/api/v1/jobs", get(list_jobs))
        .route("/api/v1/jobs/{id}", get(show_job))
        .route("/api/v1/events", get(events))
        .route("/api/v1/vms", get(list_vms).post(create_vm))
        .route("/api/v1/vms/{name}", get(show_vm).delete(delete_vm))
        .route("/api/v1/vms/{name}/start", post(start_vm))
        .route("/api/v1/vms/{name}/stop", post(stop_vm))
        .route("/api/v1/vms/{name}/reset", post(reset_vm))
        .route("/api/v1/vms/{name}/cdrom", put(set_cdrom))
        .route("/api/v1/vms/{name}/disks", post(attach_disk))
        .route("/api/v1/vms/{name}/disks/{volume}", axum::routing::delete(detach_disk))
        .route("/api/v1/vms/{name}/nics", post(add_nic))
        .route("/api/v1/vms/{name}/nics/{id}", axum::routing::delete(remove_nic))
        .route("/api/v1/vms/{name}/clones", post(clone_vm))
        .route("/api/v1/vms/{name}/console", get(console))
        .route("/api/v1/usage", get(usage))
        .route("/api/v1/vms/{name}/backups", post(backup_vm))
        .route("/api/v1/vms/{name}/restore", post(restore_vm))
        .route("/api/v1/appliances", get(list_appliances).post(create_appliance))
        .route("/api/v1/appliances/{name}", get(show_appliance).delete(delete_appliance))
        .route("/api/v1/appliances/{name}/verify", post(verify_appliance))
        .route("/api/v1/appliances/{name}/ova", get(export_ova).put(import_ova))
        .route("/metrics", get(metrics))
        .merge(crate::ui::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(log_request))
        .with_state(app)
}
