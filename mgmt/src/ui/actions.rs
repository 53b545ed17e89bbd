//! The actions (POST): decode a form (CSRF checked by [`Posted`]), call
//! the same [`App`] operation as the API, and go back with its outcome.
//! Names and sizes are checked by the API's own rules (`names`,
//! `parse_size`), so a form refuses what the API refuses, with its words.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::{Posted, Session, UiError, outcome, redirect_flash};
use crate::app::{App, CreateUser, CreateVolume};
use crate::error::{ApiError, ApiResult};
use crate::model::{Chap, IscsiExport, Quota, Role, parse_size};
use crate::names::{self, ApplianceName, IsoName, SnapshotName, UserName, VmName, VolumeName};
use crate::vms::CreateVm;

/// A checkbox: present ("true") or absent.
fn checked(v: &Option<String>) -> bool {
    v.as_deref().is_some_and(|v| v == "true" || v == "on")
}

fn opt(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// An optional field holding a name of kind `T`, checked by its rule.
fn opt_name<T: names::Kind + std::fmt::Display>(v: &Option<String>) -> ApiResult<Option<String>> {
    opt(v).map(|n| names::parse::<T>(n).map(|n| n.to_string())).transpose()
}

fn size(v: &str) -> ApiResult<u64> {
    parse_size(v.trim()).map_err(ApiError::bad)
}

/// The typed name must be the object's own.
fn confirmed(confirm: &Option<String>, name: &str) -> ApiResult<()> {
    if confirm.as_deref().map(str::trim) != Some(name) {
        return Err(ApiError::bad(format!("type the name {name} to confirm the deletion")));
    }
    Ok(())
}

// ----- session -----

#[derive(Deserialize)]
pub struct LoginForm {
    user: String,
    password: String,
    #[serde(rename = "_pre", default)]
    pre: String,
    #[serde(default)]
    next: String,
}

pub async fn login(State(app): State<Arc<App>>, req: axum::extract::Request) -> Response {
    let addr = crate::api::client_ip(req.extensions());
    let headers = req.headers().clone();
    let again = |next: &str, msg: &str, user: &str| super::pages::login_form(&headers, next, Some(msg), user);
    let Ok(b) = axum::body::to_bytes(req.into_body(), 64 << 10).await else {
        return again("/", "the login form is over 64 KiB", "");
    };
    let Ok(f) = serde_urlencoded::from_bytes::<LoginForm>(&b) else {
        return again("/", "give a user name and a password", "");
    };
    let next = if super::local_path(&f.next) { f.next.clone() } else { "/".into() };
    let login_again = |next: &str, msg: &str| again(next, msg, &f.user);
    let pre = super::cookie(&headers, super::PRELOGIN_COOKIE).unwrap_or("");
    if !super::same_origin(&headers) || f.pre.is_empty() || !super::same(pre, &f.pre) {
        return (StatusCode::FORBIDDEN, "the login form did not come from this site's login page: reload it")
            .into_response();
    }
    let Ok(name) = names::parse::<UserName>(&f.user) else {
        return login_again(&next, "wrong user name or password");
    };
    match crate::api::login_throttled(&app, &name, f.password.clone(), addr).await {
        Ok((token, _, expires)) => {
            let mut r = Redirect::to(&next).into_response();
            let age = expires.saturating_sub(crate::model::now());
            r.headers_mut().append(header::SET_COOKIE, super::set_cookie(super::SESSION_COOKIE, &token, Some(age)));
            r.headers_mut().append(header::SET_COOKIE, super::set_cookie(super::PRELOGIN_COOKIE, "", Some(0)));
            r
        }
        Err(e) => login_again(&next, &e.message),
    }
}

#[derive(Deserialize)]
pub struct Empty {}

pub async fn logout(State(app): State<Arc<App>>, p: Posted<Empty>) -> Response {
    let _ = app.logout(&p.session.user, &p.session.token);
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().append(header::SET_COOKIE, super::set_cookie(super::SESSION_COOKIE, "", Some(0)));
    r
}

// ----- volumes -----

#[derive(Deserialize)]
pub struct VolumeForm {
    name: String,
    size: String,
    #[serde(default)]
    pool: Option<String>,
}

pub async fn create_volume(State(app): State<Arc<App>>, p: Posted<VolumeForm>) -> Response {
    let f = &p.form;
    let r = async {
        let name = names::parse::<VolumeName>(f.name.trim())?;
        let req = CreateVolume {
            name: name.to_string(),
            size: size(&f.size)?,
            owner: None,
            pool: opt(&f.pool).map(str::to_string),
        };
        app.create_volume(&p.session.user, req).await
    }
    .await;
    outcome(&p.back, r, |v| (format!("/volumes/{}", v.name), format!("volume {} created", v.name)))
}

#[derive(Deserialize)]
pub struct VolumeActionForm {
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    initiators: Option<String>,
    #[serde(default)]
    chap_user: Option<String>,
    #[serde(default)]
    chap_secret: Option<String>,
    #[serde(default)]
    confirm: Option<String>,
    #[serde(default)]
    recursive: Option<String>,
}

pub async fn volume_action(
    State(app): State<Arc<App>>,
    Path((name, action)): Path<(String, String)>,
    p: Posted<VolumeActionForm>,
) -> Response {
    let u = &p.session.user;
    let f = &p.form;
    let here = format!("/volumes/{name}");
    let r: ApiResult<(String, String)> = async {
        let name = names::parse::<VolumeName>(&name)?.to_string();
        match action.as_str() {
            "resize" => {
                let s = size(f.size.as_deref().unwrap_or(""))?;
                let v = app.resize_volume(u, &name, s).await?;
                Ok((here.clone(), format!("volume {name} is now {}", super::human(v.size_bytes))))
            }
            "snapshots" => {
                let snap = names::parse::<SnapshotName>(opt(&f.name).unwrap_or(""))?;
                app.create_snapshot(u, &name, &snap).await?;
                Ok((here.clone(), format!("snapshot {name}@{snap} taken")))
            }
            "export" => {
                let initiators: Vec<String> = f
                    .initiators
                    .as_deref()
                    .unwrap_or("")
                    .split([',', ' ', '\n'])
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
                let chap = match (opt(&f.chap_user), opt(&f.chap_secret)) {
                    (None, _) => None,
                    (Some(user), Some(secret)) => Some(Chap { user: user.into(), secret: secret.into() }),
                    (Some(_), None) => {
                        return Err(ApiError::bad(
                            "give the CHAP secret with the CHAP user (or clear the user to turn CHAP off)",
                        ));
                    }
                };
                app.set_export(u, &name, IscsiExport { initiators, chap }).await?;
                Ok((here.clone(), format!("exports of {name} saved")))
            }
            "key" => {
                app.rotate_access_key(u, &name).await?;
                Ok((here.clone(), format!("the access key of {name} was rotated: its old NBD URL no longer works")))
            }
            "delete" => {
                confirmed(&f.confirm, &name)?;
                app.delete_volume(u, &name, checked(&f.recursive)).await?;
                Ok(("/volumes".into(), format!("volume {name} deleted")))
            }
            _ => Err(ApiError::not_found(format!("no volume action {action}"))),
        }
    }
    .await;
    outcome(&p.back, r, |x| x)
}

#[derive(Deserialize)]
pub struct SnapshotForm {
    #[serde(default)]
    name: Option<String>,
}

pub async fn snapshot_action(
    State(app): State<Arc<App>>,
    Path((name, snap, action)): Path<(String, String, String)>,
    p: Posted<SnapshotForm>,
) -> Response {
    let u = &p.session.user;
    let r: ApiResult<(String, String)> = async {
        let name = names::parse::<VolumeName>(&name)?.to_string();
        let snap = names::parse::<SnapshotName>(&snap)?.to_string();
        match action.as_str() {
            "clone" => {
                let new = names::parse::<VolumeName>(opt(&p.form.name).unwrap_or(""))?;
                let v = app.clone_snapshot(u, &name, &snap, &new, None).await?;
                Ok((format!("/volumes/{}", v.name), format!("clone {} of {name}@{snap} made", v.name)))
            }
            "delete" => {
                app.delete_snapshot(u, &name, &snap).await?;
                Ok((format!("/volumes/{name}"), format!("snapshot {name}@{snap} deleted")))
            }
            _ => Err(ApiError::not_found(format!("no snapshot action {action}"))),
        }
    }
    .await;
    outcome(&p.back, r, |x| x)
}

// ----- VMs -----

#[derive(Deserialize)]
pub struct VmForm {
    name: String,
    #[serde(default)]
    cpus: Option<String>,
    #[serde(default)]
    memory: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    disk: Option<String>,
    #[serde(default)]
    iso: Option<String>,
    #[serde(default)]
    appliance: Option<String>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    start: Option<String>,
}

pub async fn create_vm(State(app): State<Arc<App>>, p: Posted<VmForm>) -> Response {
    let u = &p.session.user;
    let f = &p.form;
    let r: ApiResult<String> = async {
        let name = names::parse::<VmName>(f.name.trim())?.to_string();
        let cpus = match opt(&f.cpus) {
            Some(c) => c.parse::<u32>().map_err(|_| ApiError::bad(format!("vCPUs {c:?} is not a number")))?,
            None => 1,
        };
        let memory = size(opt(&f.memory).unwrap_or("512M"))?;
        let from_appliance =
            if f.source.as_deref() == Some("appliance") { opt_name::<ApplianceName>(&f.appliance)? } else { None };
        if f.source.as_deref() == Some("appliance") && from_appliance.is_none() {
            return Err(ApiError::bad("choose the appliance to make the VM from"));
        }
        let iso = opt_name::<IsoName>(&f.iso)?;
        let blank_disk =
            if from_appliance.is_some() { None } else { opt(&f.disk).map(size).transpose()?.filter(|s| *s > 0) };
        // From an appliance: its boot order; from an ISO onto a blank disk:
        // the CD first (the disk has nothing to boot yet).
        let boot = match &from_appliance {
            Some(n) => app.library.get(n).ok().map(|d| d.boot),
            None if iso.is_some() => Some(vec!["cdrom".to_string(), "disk".to_string()]),
            None => None,
        };
        let owner = opt_name::<UserName>(&f.owner)?;
        let req = CreateVm {
            name: name.clone(),
            cpus,
            memory_bytes: memory,
            blank_disk,
            iso,
            owner,
            from_appliance,
            boot,
            ..Default::default()
        };
        app.create_vm(u, req).await?;
        if checked(&f.start) {
            app.start_vm(u, &name).await?;
        }
        Ok(name)
    }
    .await;
    outcome(&p.back, r, |n| (format!("/vms/{n}"), format!("VM {n} created")))
}

#[derive(Deserialize)]
pub struct VmActionForm {
    #[serde(default)]
    iso: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    appliance: Option<String>,
    #[serde(default)]
    start: Option<String>,
    #[serde(default)]
    confirm: Option<String>,
    #[serde(default)]
    delete_disks: Option<String>,
    #[serde(default)]
    force: Option<String>,
}

pub async fn vm_action(
    State(app): State<Arc<App>>,
    Path((name, action)): Path<(String, String)>,
    p: Posted<VmActionForm>,
) -> Response {
    let u = &p.session.user;
    let f = &p.form;
    let here = format!("/vms/{name}");
    let r: ApiResult<(String, String)> = async {
        let name = names::parse::<VmName>(&name)?.to_string();
        match action.as_str() {
            "start" => {
                app.start_vm(u, &name).await?;
                Ok((here.clone(), format!("VM {name} powered on")))
            }
            "stop" => {
                app.stop_vm(u, &name, false).await?;
                Ok((here.clone(), format!("VM {name} was asked to shut down")))
            }
            "poweroff" => {
                app.stop_vm(u, &name, true).await?;
                Ok((here.clone(), format!("VM {name} powered off")))
            }
            "reset" => {
                app.reset_vm(u, &name).await?;
                Ok((here.clone(), format!("VM {name} reset")))
            }
            "cdrom" => {
                let iso = opt_name::<IsoName>(&f.iso)?;
                app.set_cdrom(u, &name, iso.as_deref()).await?;
                Ok((
                    here.clone(),
                    match iso {
                        Some(i) => format!("CD {i} is in the drive of {name}"),
                        None => format!("the CD drive of {name} is empty"),
                    },
                ))
            }
            "clone" => {
                let new = names::parse::<VmName>(opt(&f.name).unwrap_or(""))?.to_string();
                let (v, stats) = app.clone_vm(u, &name, &new, None).await?;
                if checked(&f.start) && !v.state.has_qemu() {
                    app.start_vm(u, &new).await?;
                }
                Ok((format!("/vms/{new}"), format!("VM {new} cloned from {name} ({})", stats.consistency)))
            }
            "backup" => {
                let a = names::parse::<ApplianceName>(opt(&f.name).unwrap_or(""))?.to_string();
                let job = app.backup_vm(u, &name, &a).await?;
                Ok((format!("/jobs/{}", job.id), format!("backup of {name} into {a} started")))
            }
            "restore" => {
                let a = names::parse::<ApplianceName>(opt(&f.appliance).unwrap_or(""))?.to_string();
                app.restore_vm(u, &name, &a).await?;
                Ok((here.clone(), format!("VM {name} restored from {a}")))
            }
            "delete" => {
                confirmed(&f.confirm, &name)?;
                app.delete_vm(u, &name, checked(&f.delete_disks), checked(&f.force)).await?;
                Ok(("/vms".into(), format!("VM {name} deleted")))
            }
            _ => Err(ApiError::not_found(format!("no VM action {action}"))),
        }
    }
    .await;
    outcome(&p.back, r, |x| x)
}

// ----- ISOs -----

/// The upload from the ISO page's script: a streamed PUT with the CSRF
/// token in `X-CSRF-Token`; the answer is the API's JSON.
pub async fn upload_iso(
    State(app): State<Arc<App>>,
    s: Result<Session, UiError>,
    Path(name): Path<String>,
    headers: HeaderMap,
    b: Body,
) -> Response {
    let r = async {
        let s = s.map_err(|_| ApiError::unauthorized("the session has ended: log in again"))?;
        if !super::header_csrf_ok(&s, &headers) {
            return Err(ApiError::forbidden("the upload's CSRF token is missing or wrong: reload the page"));
        }
        let name = names::parse::<IsoName>(&name)?;
        crate::api::upload_iso_as(&app, &s.user, &name, &headers, b).await
    }
    .await;
    match r {
        Ok(v) => (StatusCode::CREATED, axum::Json(v)).into_response(),
        Err(e) => (e.status, axum::Json(serde_json::json!({"error": e.message}))).into_response(),
    }
}

pub async fn delete_iso(State(app): State<Arc<App>>, Path(name): Path<String>, p: Posted<Empty>) -> Response {
    let r = names::parse::<IsoName>(&name).and_then(|n| app.delete_iso(&p.session.user, &n));
    outcome(&p.back, r, |_| ("/isos".into(), format!("ISO {name} deleted")))
}

// ----- library -----

#[derive(Deserialize)]
pub struct ApplianceForm {
    #[serde(default)]
    vm: Option<String>,
    #[serde(default)]
    confirm: Option<String>,
}

pub async fn appliance_action(
    State(app): State<Arc<App>>,
    Path((name, action)): Path<(String, String)>,
    p: Posted<ApplianceForm>,
) -> Response {
    let u = &p.session.user;
    let here = format!("/library/{name}");
    let r: ApiResult<(String, String)> = async {
        let name = names::parse::<ApplianceName>(&name)?.to_string();
        match action.as_str() {
            "restore" => {
                let vm = names::parse::<VmName>(opt(&p.form.vm).unwrap_or(""))?.to_string();
                app.restore_vm(u, &vm, &name).await?;
                Ok((format!("/vms/{vm}"), format!("VM {vm} restored from {name}")))
            }
            "verify" => {
                let damage = app.verify_appliance(u, &name).await?;
                if damage.is_empty() {
                    Ok((here.clone(), format!("appliance {name}: every chunk verified")))
                } else {
                    Err(ApiError::conflict(format!("appliance {name}: {} damaged chunks", damage.len())))
                }
            }
            "delete" => {
                confirmed(&p.form.confirm, &name)?;
                let gc = app.delete_appliance(u, &name).await?;
                Ok((
                    "/library".into(),
                    format!("appliance {name} deleted ({} chunks, {} freed)", gc.chunks, super::human(gc.bytes)),
                ))
            }
            _ => Err(ApiError::not_found(format!("no appliance action {action}"))),
        }
    }
    .await;
    outcome(&p.back, r, |x| x)
}

// ----- users -----

#[derive(Deserialize)]
pub struct UserForm {
    name: String,
    role: String,
    password: String,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    quota_cpus: Option<String>,
    #[serde(default)]
    quota_memory: Option<String>,
    #[serde(default)]
    quota_storage: Option<String>,
}

pub async fn create_user(State(app): State<Arc<App>>, p: Posted<UserForm>) -> Response {
    let f = &p.form;
    let r = async {
        let name = names::parse::<UserName>(f.name.trim())?.to_string();
        let role = Role::parse(&f.role)
            .ok_or_else(|| ApiError::bad(format!("role {:?} is not one of manager, power, regular", f.role)))?;
        let parent = opt_name::<UserName>(&f.parent)?;
        let quota = match (opt(&f.quota_cpus), opt(&f.quota_memory), opt(&f.quota_storage)) {
            (None, None, None) => None,
            (c, m, s) => Some(Quota {
                cpus: c
                    .map(|c| c.parse::<u32>().map_err(|_| ApiError::bad("the vCPU quota is not a number")))
                    .transpose()?
                    .unwrap_or(0),
                memory_bytes: m.map(size).transpose()?.unwrap_or(0),
                storage_bytes: s.map(size).transpose()?.unwrap_or(0),
            }),
        };
        app.create_user(&p.session.user, CreateUser { name, role, password: f.password.clone(), parent, quota }).await
    }
    .await;
    outcome(&p.back, r, |v| (format!("/users/{}", v.name), format!("user {} created", v.name)))
}

#[derive(Deserialize)]
pub struct ConfirmForm {
    #[serde(default)]
    confirm: Option<String>,
}

pub async fn delete_user(State(app): State<Arc<App>>, Path(name): Path<String>, p: Posted<ConfirmForm>) -> Response {
    let r = async {
        let name = names::parse::<UserName>(&name)?.to_string();
        confirmed(&p.form.confirm, &name)?;
        app.delete_user(&p.session.user, &name).await
    }
    .await;
    match r {
        Ok(()) => redirect_flash("/users", true, &format!("user {name} deleted")),
        Err(e) => redirect_flash(&p.back, false, &e.message),
    }
}
