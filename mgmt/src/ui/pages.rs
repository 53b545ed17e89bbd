//! The pages (GET): each reads through the same [`App`] calls as the API,
//! with the session's user, so it shows only what that user may see.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::{Session, UiError, button_form, danger_form, form_head, human, page, role_label, when};
use crate::app::{App, JobState, JobView};
use crate::model::{Role, VmState};

type Page = Result<Response, UiError>;

fn state_badge(s: &str) -> Markup {
    html! { span class=(format!("badge s-{s}")) { (s) } }
}

fn vm_state(s: VmState) -> &'static str {
    s.as_str()
}

/// A job's progress: percentage, bytes and time left, updated live by
/// `app.js` from `/ui/live` (the element carries the job's id).
pub(crate) fn progress(j: &JobView) -> Markup {
    let pct = j.progress_percent.unwrap_or(if j.state == JobState::Done { 100.0 } else { 0.0 });
    let state = match j.state {
        JobState::Running => "running",
        JobState::Done => "done",
        JobState::Failed => "failed",
    };
    html! {
        div .job data-job=(j.id) data-started=(j.started) {
            progress max="100" value=(format!("{pct:.1}")) aria-label=(format!("job {} progress", j.id)) {}
            span .pct data-pct { (format!("{pct:.0} %")) }
            " "
            span data-bytes { (human(j.done_bytes)) " of " (if j.total_bytes > 0 { human(j.total_bytes) } else { "?".into() }) }
            " "
            span data-eta { }
            " "
            span data-state { (state_badge(state)) }
            @if let Some(e) = &j.error { p .error data-error { (e) } } @else { p .error data-error hidden {} }
        }
    }
}

fn jobs_table(jobs: &[JobView]) -> Markup {
    html! {
        @if jobs.is_empty() {
            p { "No jobs." }
        } @else {
            table {
                thead { tr { th { "Job" } th { "Kind" } th { "Target" } th { "Owner" } th { "Started" } th { "Progress" } } }
                tbody {
                    @for j in jobs.iter().rev() {
                        tr {
                            td { a href=(format!("/jobs/{}", j.id)) { "#" (j.id) } }
                            td { (j.kind) } td { (j.target) } td { (j.owner) } td { (when(j.started)) }
                            td { (progress(j)) }
                        }
                    }
                }
            }
        }
    }
}

fn events_table(events: &[serde_json::Value]) -> Markup {
    let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("").to_string();
    html! {
        table #events {
            thead { tr { th { "#" } th { "Time" } th { "User" } th { "Action" } th { "Target" } th { "Detail" } } }
            tbody data-events {
                @for e in events.iter().rev() {
                    tr {
                        td { (e["id"].as_u64().unwrap_or(0)) }
                        td { (when(e["time"].as_u64().unwrap_or(0))) }
                        td { (s(e, "user")) } td { (s(e, "action")) } td { (s(e, "target")) } td { (s(e, "detail")) }
                    }
                }
            }
        }
    }
}

/// This machine's name (the cluster's node name to come).
pub(crate) fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "local".into())
}

fn mem_total() -> u64 {
    keel_vmm_glue::process::host_memory_bytes().unwrap_or(0)
}

// ----- login -----

#[derive(Deserialize, Default)]
pub struct LoginQ {
    next: Option<String>,
}

pub async fn login_page(headers: HeaderMap, Query(q): Query<LoginQ>) -> Response {
    let next = q.next.filter(|n| super::local_path(n)).unwrap_or_else(|| "/".into());
    login_form(&headers, &next, None, "")
}

/// The login page: `error` says why the last try failed; `user` is
/// filled in again.
pub(crate) fn login_form(headers: &HeaderMap, next: &str, error: Option<&str>, user: &str) -> Response {
    // Double-submit: the form carries the value of a cookie set here.
    let pre = super::cookie(headers, super::PRELOGIN_COOKIE)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_string)
        .unwrap_or_else(|| crate::auth::new_token().chars().filter(char::is_ascii_hexdigit).take(64).collect());
    let m = html! {
        (maud::DOCTYPE)
        html lang="en" {
            (super::head("Log in", html! { script type="module" src="/ui/static/app.js" {} }))
            body {
                main #main .narrow {
                    h1 { "Keel" }
                    @if let Some(e) = error { p .flash .error role="alert" { (e) } }
                    form method="post" action="/login" .card {
                        input type="hidden" name="_pre" value=(pre);
                        input type="hidden" name="next" value=(next);
                        label for="user" { "User" }
                        input #user name="user" type="text" autocomplete="username" required autofocus[user.is_empty()] value=(user);
                        label for="password" { "Password" }
                        input #password name="password" type="password" autocomplete="current-password" required autofocus[!user.is_empty()];
                        button type="submit" .primary { "Log in" }
                    }
                }
            }
        }
    };
    let status = if error.is_some() { StatusCode::UNAUTHORIZED } else { StatusCode::OK };
    let mut r =
        (status, [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")], m.into_string()).into_response();
    r.headers_mut().append(axum::http::header::SET_COOKIE, super::set_cookie(super::PRELOGIN_COOKIE, &pre, Some(3600)));
    r
}

// ----- dashboard -----

pub async fn dashboard(State(app): State<Arc<App>>, s: Session) -> Page {
    let u = &s.user;
    if u.role == Role::Regular {
        return Ok(Redirect::to("/vms").into_response());
    }
    let vols = app.list_volumes(u)?;
    let vms = app.list_vms(u)?;
    let jobs = app.list_jobs(u)?;
    let running_jobs: Vec<JobView> = jobs.iter().filter(|j| j.state == JobState::Running).cloned().collect();
    let running_vms = vms.iter().filter(|v| v.state == VmState::Running).count();
    let who = app.logged_in(u)?;
    let failed: Vec<&JobView> = jobs.iter().rev().filter(|j| j.state == JobState::Failed).take(5).collect();
    let broken: Vec<_> = vms.iter().filter(|v| v.error.is_some() || v.state == VmState::Crashed).take(5).collect();
    let nodes = if u.role == Role::Manager { 1 } else { 0 };
    let body = html! {
        section .counts aria-label="Summary" {
            @if u.role == Role::Manager { a .count href="/nodes" { strong { (nodes) } span { "nodes" } } }
            a .count href="/volumes" { strong { (vols.len()) } span { "volumes" } }
            a .count href="/vms" { strong { (vms.len()) } span { "VMs (" (running_vms) " running)" } }
            a .count href="/jobs" { strong data-running-jobs { (running_jobs.len()) } span { "running jobs" } }
        }
        div .grid {
            section {
                h2 { "Logged in" }
                @if who.is_empty() { p { "Nobody else." } }
                ul { @for (name, n, since) in &who {
                    li { a href=(format!("/users/{name}")) { (name) } " — " (n) " session" @if *n != 1 { "s" } ", newest " (when(*since)) }
                } }
            }
            section {
                h2 { "Last errors" }
                @if failed.is_empty() && broken.is_empty() { p { "None." } }
                ul .errors {
                    @for j in &failed {
                        li { a href=(format!("/jobs/{}", j.id)) { "Job #" (j.id) " " (j.kind) " " (j.target) } ": " (j.error.clone().unwrap_or_default()) }
                    }
                    @for v in &broken {
                        li { a href=(format!("/vms/{}", v.name)) { "VM " (v.name) } ": " (v.error.clone().unwrap_or_else(|| "crashed".into())) }
                    }
                }
            }
        }
        section {
            h2 { "Running jobs" }
            (jobs_table(&running_jobs))
        }
    };
    Ok(page(&s, "Dashboard", body))
}

// ----- nodes -----

pub async fn nodes(State(app): State<Arc<App>>, s: Session) -> Page {
    if s.user.role != Role::Manager {
        return Err(crate::error::ApiError::forbidden("only managers see the nodes").into());
    }
    let pools = app.list_pools(&s.user)?;
    let total: u64 = pools.iter().map(|p| p.total_bytes).sum();
    let free: u64 = pools.iter().map(|p| p.free_bytes).sum();
    let name = node_name();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let body = html! {
        table {
            thead { tr { th { "Node" } th { "State" } th { "API" } th { "CPUs" } th { "Memory" } th { "Storage" } th { "Free" } } }
            tbody { tr {
                td { a href=(format!("/nodes/{name}")) { (name) } }
                td { (state_badge("up")) }
                td { (app.addrs.api) } td { (cpus) } td { (human(mem_total())) } td { (human(total)) } td { (human(free)) }
            } }
        }
        p .hint { "One node: clustering (several nodes sharing state) is not built yet." }
    };
    Ok(page(&s, "Nodes", body))
}

pub async fn node(State(app): State<Arc<App>>, s: Session, Path(name): Path<String>) -> Page {
    if s.user.role != Role::Manager {
        return Err(crate::error::ApiError::forbidden("only managers see the nodes").into());
    }
    if name != node_name() {
        return Err(crate::error::ApiError::not_found(format!("node {name} not found")).into());
    }
    let pools = app.list_pools(&s.user)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let body = html! {
        dl .kv {
            dt { "State" } dd { (state_badge("up")) }
            dt { "Version" } dd { (env!("CARGO_PKG_VERSION")) }
            dt { "API" } dd { (app.addrs.api) }
            dt { "NBD" } dd { (app.addrs.nbd) }
            dt { "iSCSI portal" } dd { (app.addrs.iscsi) }
            dt { "CPUs" } dd { (cpus) }
            dt { "Memory" } dd { (human(mem_total())) }
        }
        h2 { "Storage groups (pools)" }
        table {
            thead { tr { th { "Pool" } th { "Kind" } th { "Tier" } th { "State" } th { "Total" } th { "Allocated" } th { "Free" } th { "Provisioned" } th { "Volumes" } } }
            tbody { @for p in &pools { tr {
                td { (p.name) } td { (p.kind) } td { (p.tier.clone().unwrap_or_default()) }
                td { (state_badge(p.state)) @if let Some(r) = &p.reason { " " (r) } }
                td { (human(p.total_bytes)) } td { (human(p.allocated_bytes)) } td { (human(p.free_bytes)) }
                td { (human(p.provisioned_bytes)) } td { (p.volumes) }
            } } }
        }
    };
    Ok(page(&s, &format!("Node {name}"), body))
}

// ----- volumes -----

pub async fn volumes(State(app): State<Arc<App>>, s: Session) -> Page {
    let u = &s.user;
    if u.role == Role::Regular {
        return Err(crate::error::ApiError::forbidden("regular users manage only their VM").into());
    }
    let vols = app.list_volumes(u)?;
    let left = app.storage_left(u)?;
    let pools = app.list_pools(u)?;
    let body = html! {
        table {
            thead { tr { th { "Volume" } th { "Owner" } th { "Size" } th { "Allocated" } th { "Pool" } th { "State" } th { "Snapshots" } th { "Origin" } } }
            tbody { @for v in &vols { tr {
                td { a href=(format!("/volumes/{}", v.name)) { (v.name) } }
                td { (v.owner) } td { (human(v.size_bytes)) } td { (human(v.allocated_bytes)) } td { (v.pool) }
                td { (state_badge(v.state)) } td { (v.snapshots.len()) } td { (v.origin.clone().unwrap_or_default()) }
            } } }
        }
        @if vols.is_empty() { p { "No volumes yet." } }
        section .card {
            h2 { "New volume" }
            @if let Some(l) = left { p .quota data-quota-left=(l) { "Your tenant's storage quota has " strong { (human(l)) } " left." } }
            form method="post" action="/volumes" {
                (form_head(&s))
                label for="vname" { "Name" }
                input #vname name="name" type="text" required pattern="[A-Za-z0-9][A-Za-z0-9._\\-]*";
                label for="vsize" { "Size (e.g. 10G)" }
                input #vsize name="size" type="text" required data-size-max=[left];
                @if pools.len() > 1 {
                    label for="vpool" { "Pool" }
                    select #vpool name="pool" { @for p in &pools { option value=(p.name) { (p.name) " (" (human(p.free_bytes)) " free)" } } }
                }
                p .hint data-size-warning hidden {}
                button type="submit" .primary { "Create volume" }
            }
        }
    };
    Ok(page(&s, "Volumes", body))
}

pub async fn volume(State(app): State<Arc<App>>, s: Session, Path(name): Path<String>) -> Page {
    let u = &s.user;
    if u.role == Role::Regular {
        return Err(crate::error::ApiError::forbidden("regular users manage only their VM").into());
    }
    let v = app.show_volume(u, &name)?;
    let snaps = app.list_snapshots(u, &name)?;
    let export = app.export(u, &name)?;
    // The VMs using it, as far as the user may see them (a manager may have
    // attached it to another tenant's VM).
    let all_vms = app.volume_vms(&name)?;
    let users_vms: Vec<String> = all_vms.iter().filter(|n| app.show_vm(u, n).is_ok()).cloned().collect();
    let hidden_vms = all_vms.len() - users_vms.len();
    let clones: Vec<String> = app
        .list_volumes(u)?
        .into_iter()
        .filter(|c| c.origin.as_deref().is_some_and(|o| o.split('@').next() == Some(name.as_str())))
        .map(|c| c.name)
        .collect();
    let mut depends: Vec<String> = users_vms.iter().map(|n| format!("VM {n} (uses it as a disk)")).collect();
    if hidden_vms > 0 {
        depends.push(format!("{hidden_vms} VM(s) you cannot see (use it as a disk)"));
    }
    depends.extend(snaps.iter().map(|sn| format!("snapshot {}@{}", name, sn.name)));
    depends.extend(clones.iter().map(|c| format!("clone {c}")));
    let base = format!("/volumes/{name}");
    let body = html! {
        dl .kv {
            dt { "Owner" } dd { (v.owner) }
            dt { "Size" } dd { (human(v.size_bytes)) }
            dt { "Allocated" } dd { (human(v.allocated_bytes)) }
            dt { "Pool" } dd { (v.pool) }
            dt { "State" } dd { (state_badge(v.state)) @if let Some(r) = &v.reason { " " (r) } }
            dt { "Created" } dd { (when(v.created)) }
            @if let Some(o) = &v.origin { dt { "Cloned from" } dd { (o) } }
            @if !users_vms.is_empty() { dt { "Used by" } dd { @for n in &users_vms { a href=(format!("/vms/{n}")) { (n) } " " } } }
        }
        section {
            h2 { "Exports" }
            dl .kv {
                dt { "NBD URL" } dd { code .copy { (export.nbd_url) } }
                dt { "Open NBD sessions" } dd { (export.nbd_sessions) }
                dt { "iSCSI URL" } dd { code .copy { (export.iscsi_url) } }
                dt { "iSCSI target" } dd { code { (export.iqn) } }
                dt { "Allowed initiators" } dd { @if export.initiators.is_empty() { "any" } @else { (export.initiators.join(", ")) } }
                dt { "CHAP" } dd { @if let Some(c) = &export.chap_user { "user " (c) } @else { "off" } }
            }
            form method="post" action=(format!("{base}/export")) .card {
                (form_head(&s))
                label for="initiators" { "Allowed initiator IQNs (comma separated; empty: any)" }
                input #initiators name="initiators" type="text" value=(export.initiators.join(","));
                label for="chap_user" { "CHAP user (empty: no CHAP)" }
                input #chap_user name="chap_user" type="text" value=(export.chap_user.clone().unwrap_or_default()) autocomplete="off";
                label for="chap_secret" { "CHAP secret (12 to 16 characters)" }
                input #chap_secret name="chap_secret" type="password" autocomplete="new-password";
                button type="submit" { "Save exports" }
            }
            (button_form(&s, &format!("{base}/key"), "Rotate access key (changes the NBD URL)", ""))
        }
        section {
            h2 { "Resize" }
            form method="post" action=(format!("{base}/resize")) .row {
                (form_head(&s))
                label for="rsize" { "New size" }
                input #rsize name="size" type="text" value=(human(v.size_bytes)) required;
                button type="submit" { "Resize" }
            }
        }
        section {
            h2 { "Snapshots" }
            @if snaps.is_empty() { p { "No snapshots." } } @else {
                table {
                    thead { tr { th { "Snapshot" } th { "Size" } th { "Allocated" } th { "Created" } th { "NBD URL (read-only)" } th { "Clone" } th { "" } } }
                    tbody { @for sn in &snaps { tr {
                        td { (sn.name) } td { (human(sn.size_bytes)) } td { (human(sn.allocated_bytes)) } td { (when(sn.created)) }
                        td { code .copy { (sn.nbd_url) } }
                        td {
                            form method="post" action=(format!("{base}/snapshots/{}/clone", sn.name)) .row {
                                (form_head(&s))
                                label .sr for=(format!("clone-{}", sn.name)) { "Name of the clone of " (sn.name) }
                                input id=(format!("clone-{}", sn.name)) name="name" type="text" required placeholder="clone name";
                                button type="submit" { "Clone" }
                            }
                        }
                        td { (button_form(&s, &format!("{base}/snapshots/{}/delete", sn.name), "Delete", "danger")) }
                    } } }
                }
            }
            form method="post" action=(format!("{base}/snapshots")) .row {
                (form_head(&s))
                label for="snapname" { "New snapshot" }
                input #snapname name="name" type="text" required placeholder="snapshot name";
                button type="submit" { "Take snapshot" }
            }
        }
        (danger_form(&s, &format!("{base}/delete"), &name, "volume", &depends, html! {
            @if !snaps.is_empty() {
                label .check { input type="checkbox" name="recursive" value="true"; " also delete its snapshots" }
            }
        }))
    };
    Ok(page(&s, &format!("Volume {name}"), body))
}

// ----- VMs -----

pub async fn vms(State(app): State<Arc<App>>, s: Session) -> Page {
    let u = &s.user;
    let vms = app.list_vms(u)?;
    if u.role == Role::Regular && vms.len() == 1 {
        return Ok(Redirect::to(&format!("/vms/{}", vms[0].name)).into_response());
    }
    let body = html! {
        @if u.role != Role::Regular { p { a .button .primary href="/vms/new" { "New VM" } } }
        @if vms.is_empty() { p { "No VMs." } } @else {
            table {
                thead { tr { th { "VM" } th { "State" } th { "Owner" } th { "vCPUs" } th { "Memory" } th { "Disks" } th { "CD" } th { "MAC" } } }
                tbody { @for v in &vms { tr {
                    td { a href=(format!("/vms/{}", v.name)) { (v.name) } }
                    td data-vm-state=(vm_state(v.state)) data-vm=(v.name) { (state_badge(vm_state(v.state))) } td { (v.owner) } td { (v.cpus) } td { (human(v.memory_bytes)) }
                    td { (v.disks.iter().map(|d| d.volume.as_str()).collect::<Vec<_>>().join(", ")) }
                    td { (v.cdrom.clone().unwrap_or_default()) }
                    td { (v.nics.iter().map(|n| n.mac.as_str()).collect::<Vec<_>>().join(", ")) }
                } } }
            }
        }
    };
    Ok(page(&s, if u.role == Role::Regular { "My VM" } else { "Virtual machines" }, body))
}

pub async fn new_vm(State(app): State<Arc<App>>, s: Session) -> Page {
    let u = &s.user;
    if u.role == Role::Regular {
        return Err(crate::error::ApiError::forbidden("regular users cannot create VMs").into());
    }
    let isos = app.list_isos(u)?;
    let apps = app.list_appliances(u)?;
    let left = app.vm_quota_left(u)?;
    let storage = app.storage_left(u)?;
    let owners: Vec<String> =
        app.list_users(u)?.into_iter().filter(|x| x.role == Role::Regular).map(|x| x.name).collect();
    let body = html! {
        @if let Some((c, m)) = left {
            p .quota { "Your tenant may still give VMs " strong { (c) " vCPUs" } " and " strong { (human(m)) } " of memory"
                @if let Some(st) = storage { ", and has " strong { (human(st)) } " of storage left" } "." }
        }
        form method="post" action="/vms" .card {
            (form_head(&s))
            label for="name" { "Name" }
            input #name name="name" type="text" required pattern="[A-Za-z0-9][A-Za-z0-9._\\-]*";
            label for="cpus" { "vCPUs" }
            input #cpus name="cpus" type="number" min="1" max=[left.map(|l| l.0)] value="1" required;
            label for="memory" { "Memory (e.g. 512M)" }
            input #memory name="memory" type="text" value="256M" required;
            fieldset {
                legend { "Made from" }
                label .check { input type="radio" name="source" value="iso" checked; " a blank disk and an ISO" }
                label .check { input type="radio" name="source" value="appliance"; " an appliance of the library" }
            }
            label for="disk" { "Blank disk size (empty: no disk)" }
            input #disk name="disk" type="text" value="1G";
            label for="iso" { "ISO in the CD drive" }
            select #iso name="iso" {
                option value="" { "(none)" }
                @for i in &isos { option value=(i.name) { (i.name) " (" (human(i.size_bytes)) ")" } }
            }
            label for="appliance" { "Appliance" }
            select #appliance name="appliance" {
                option value="" { "(none)" }
                @for a in &apps { option value=(a.name) { (a.name) " (" (a.cpus) " vCPU, " (human(a.memory_bytes)) ")" } }
            }
            @if !owners.is_empty() {
                label for="owner" { "Owner" }
                select #owner name="owner" {
                    option value="" { "(me)" }
                    @for o in &owners { option value=(o) { (o) } }
                }
            }
            label .check { input type="checkbox" name="start" value="true" checked; " start it now" }
            button type="submit" .primary { "Create VM" }
        }
    };
    Ok(page(&s, "New VM", body))
}

pub async fn vm(State(app): State<Arc<App>>, s: Session, Path(name): Path<String>) -> Page {
    let u = &s.user;
    let v = app.show_vm(u, &name)?;
    let isos = app.list_isos(u)?;
    let base = format!("/vms/{name}");
    let running = v.state.has_qemu();
    let regular = u.role == Role::Regular;
    let apps = if regular { Vec::new() } else { app.list_appliances(u)? };
    let body = html! {
        div .actions {
            @if !running { (button_form(&s, &format!("{base}/start"), "Power on", "primary")) }
            @if running {
                (button_form(&s, &format!("{base}/stop"), "Shut down", ""))
                (button_form(&s, &format!("{base}/poweroff"), "Power off", "danger"))
                (button_form(&s, &format!("{base}/reset"), "Reset", ""))
                a .button href=(format!("{base}/console")) { "Graphical console" }
                a .button href=(format!("{base}/serial")) { "Serial console" }
            }
        }
        dl .kv {
            dt { "State" } dd data-vm-state=(vm_state(v.state)) data-vm=(v.name) data-vm-page { (state_badge(vm_state(v.state))) }
            @if let Some(e) = &v.error { dt { "Last error" } dd .error { (e) } }
            dt { "Owner" } dd { (v.owner) }
            dt { "vCPUs" } dd { (v.cpus) }
            dt { "Memory" } dd { (human(v.memory_bytes)) }
            dt { "Boot order" } dd { (v.boot.join(", ")) }
            @if let Some(t) = v.started { dt { "Running since" } dd { (when(t)) } }
            dt { "Disks" } dd {
                @if v.disks.is_empty() { "none" }
                @for d in &v.disks {
                    @if regular { (d.volume) " " } @else { a href=(format!("/volumes/{}", d.volume)) { (d.volume) } " " }
                }
            }
            dt { "NICs" } dd { @for n in &v.nics { (n.id) ": " code { (n.mac) } " " } }
        }
        section {
            h2 { "CD drive" }
            form method="post" action=(format!("{base}/cdrom")) .row {
                (form_head(&s))
                label for="cd" { "ISO" }
                select #cd name="iso" {
                    option value="" selected[v.cdrom.is_none()] { "(empty)" }
                    @for i in &isos { option value=(i.name) selected[v.cdrom.as_deref() == Some(i.name.as_str())] { (i.name) } }
                }
                button type="submit" { "Change CD" }
            }
        }
        @if !regular {
            section {
                h2 { "Clone" }
                form method="post" action=(format!("{base}/clone")) .row {
                    (form_head(&s))
                    label for="clone" { "Name of the clone" }
                    input #clone name="name" type="text" required;
                    label .check { input type="checkbox" name="start" value="true" checked; " start it" }
                    button type="submit" { "Clone VM" }
                }
            }
            section {
                h2 { "Backup and restore" }
                form method="post" action=(format!("{base}/backup")) .row {
                    (form_head(&s))
                    label for="bname" { "Back up into the library as" }
                    input #bname name="name" type="text" required;
                    button type="submit" { "Back up" }
                }
                @if !apps.is_empty() {
                    form method="post" action=(format!("{base}/restore")) .row {
                        (form_head(&s))
                        label for="rname" { "Restore its disks from" }
                        select #rname name="appliance" { @for a in &apps { option value=(a.name) { (a.name) } } }
                        button type="submit" { "Restore (VM must be stopped)" }
                    }
                }
            }
            (danger_form(&s, &format!("{base}/delete"), &name, "VM",
                &v.disks.iter().map(|d| format!("disk volume {} (kept unless chosen below)", d.volume)).collect::<Vec<_>>(),
                html! {
                    label .check { input type="checkbox" name="delete_disks" value="true"; " also delete its disk volumes" }
                    @if running { label .check { input type="checkbox" name="force" value="true"; " it is running: power it off first" } }
                }))
        }
    };
    Ok(page(&s, &format!("VM {name}"), body))
}

// ----- ISOs -----

pub async fn isos(State(app): State<Arc<App>>, s: Session) -> Page {
    let u = &s.user;
    let isos = app.list_isos(u)?;
    let left = app.storage_left(u)?;
    let body = html! {
        table {
            thead { tr { th { "ISO" } th { "Size" } th { "Uploaded by" } th { "Uploaded" } th { "" } } }
            tbody { @for i in &isos { tr {
                td { (i.name) } td { (human(i.size_bytes)) } td { (i.owner.clone().unwrap_or_else(|| "—".into())) } td { (when(i.created)) }
                td { @if u.role == Role::Manager || i.owner.as_deref() == Some(u.name.as_str()) {
                    (button_form(&s, &format!("/isos/{}/delete", i.name), "Delete", "danger"))
                } }
            } } }
        }
        @if isos.is_empty() { p { "The ISO store is empty." } }
        @if u.role != Role::Regular {
            section .card {
                h2 { "Upload an ISO" }
                @if let Some(l) = left { p .quota { "Storage quota left: " strong { (human(l)) } } }
                form #iso-upload data-upload-max=[left] {
                    label for="isoname" { "Name" }
                    input #isoname name="name" type="text" required pattern="[A-Za-z0-9][A-Za-z0-9._\\-]*";
                    label for="isofile" { "File" }
                    input #isofile name="file" type="file" accept=".iso" required;
                    button type="submit" .primary { "Upload" }
                    p data-upload-status role="status" {}
                }
            }
        }
    };
    Ok(page(&s, "ISO store", body))
}

// ----- library -----

pub async fn library(State(app): State<Arc<App>>, s: Session) -> Page {
    let u = &s.user;
    let apps = app.list_appliances(u)?;
    let body = html! {
        @if apps.is_empty() { p { "The library is empty: back up a VM from its page." } } @else {
            table {
                thead { tr { th { "Appliance" } th { "Owner" } th { "From VM" } th { "Made" } th { "vCPUs" } th { "Memory" } th { "Disks" } th { "Stored" } th { "Unique" } } }
                tbody { @for a in &apps { tr {
                    td { a href=(format!("/library/{}", a.name)) { (a.name) } }
                    td { (a.owner) } td { (a.source_vm.clone().unwrap_or_default()) } td { (when(a.created)) }
                    td { (a.cpus) } td { (human(a.memory_bytes)) } td { (a.disks.len()) " (" (human(a.logical_bytes)) ")" }
                    td { (human(a.stored_bytes)) } td { (human(a.unique_bytes)) }
                } } }
            }
        }
    };
    Ok(page(&s, "Appliance library", body))
}

pub async fn appliance(State(app): State<Arc<App>>, s: Session, Path(name): Path<String>) -> Page {
    let u = &s.user;
    let a = app.show_appliance(u, &name)?;
    let vms = app.list_vms(u)?;
    let base = format!("/library/{name}");
    let body = html! {
        dl .kv {
            dt { "Owner" } dd { (a.owner) }
            dt { "From VM" } dd { (a.source_vm.clone().unwrap_or_default()) }
            dt { "Made" } dd { (when(a.created)) }
            dt { "vCPUs" } dd { (a.cpus) }
            dt { "Memory" } dd { (human(a.memory_bytes)) }
            dt { "Disks" } dd { (a.disks.len()) ", " (human(a.logical_bytes)) " in all" }
            dt { "Stored (compressed)" } dd { (human(a.stored_bytes)) ", " (human(a.unique_bytes)) " its own" }
        }
        @if u.role != Role::Regular {
            section {
                h2 { "New VM from it" }
                form method="post" action="/vms" .row {
                    (form_head(&s))
                    input type="hidden" name="source" value="appliance";
                    input type="hidden" name="appliance" value=(name);
                    input type="hidden" name="cpus" value=(a.cpus);
                    input type="hidden" name="memory" value=(a.memory_bytes);
                    label for="vmname" { "VM name" }
                    input #vmname name="name" type="text" required;
                    label .check { input type="checkbox" name="start" value="true"; " start it" }
                    button type="submit" .primary { "Create VM" }
                }
            }
            section {
                h2 { "Restore into a VM" }
                form method="post" action=(format!("{base}/restore")) .row {
                    (form_head(&s))
                    label for="rvm" { "VM (stopped)" }
                    select #rvm name="vm" { @for v in &vms { option value=(v.name) { (v.name) " (" (vm_state(v.state)) ")" } } }
                    button type="submit" { "Restore" }
                }
            }
            (button_form(&s, &format!("{base}/verify"), "Verify every chunk", ""))
            (danger_form(&s, &format!("{base}/delete"), &name, "appliance", &[], html! {}))
        }
    };
    Ok(page(&s, &format!("Appliance {name}"), body))
}

// ----- users -----

pub async fn users(State(app): State<Arc<App>>, s: Session) -> Page {
    let u = &s.user;
    if u.role == Role::Regular {
        return Err(crate::error::ApiError::forbidden("regular users cannot manage users").into());
    }
    let users = app.list_users(u)?;
    let body = html! {
        table {
            thead { tr { th { "User" } th { "Role" } th { "Tenant of" } th { "Quota" } th { "Storage used" } th { "Created" } } }
            tbody { @for x in &users { tr {
                td { a href=(format!("/users/{}", x.name)) { (x.name) } }
                td { (role_label(x.role)) } td { (x.parent.clone().unwrap_or_default()) }
                td { @if let Some(q) = &x.quota { (q.cpus) " vCPUs, " (human(q.memory_bytes)) " memory, " (human(q.storage_bytes)) " storage" } }
                td { @if let Some(b) = x.storage_used_bytes { (human(b)) } }
                td { (when(x.created)) }
            } } }
        }
        section .card {
            h2 { "New user" }
            form method="post" action="/users" {
                (form_head(&s))
                label for="uname" { "Name" }
                input #uname name="name" type="text" required autocomplete="off";
                label for="urole" { "Role" }
                select #urole name="role" {
                    @if u.role == Role::Manager { option value="manager" { "Manager" } option value="power" { "Power User" } }
                    option value="regular" { "Regular User" }
                }
                label for="upass" { "Password (at least 8 characters)" }
                input #upass name="password" type="password" required autocomplete="new-password" minlength="8";
                @if u.role == Role::Manager {
                    label for="uparent" { "Power User it belongs to (Regular Users)" }
                    input #uparent name="parent" type="text";
                    fieldset {
                        legend { "Quota (Power Users)" }
                        label for="qcpus" { "vCPUs" } input #qcpus name="quota_cpus" type="number" min="0";
                        label for="qmem" { "Memory (e.g. 8G)" } input #qmem name="quota_memory" type="text";
                        label for="qsto" { "Storage (e.g. 100G)" } input #qsto name="quota_storage" type="text";
                    }
                }
                button type="submit" .primary { "Create user" }
            }
        }
    };
    Ok(page(&s, "Users and tenants", body))
}

pub async fn user(State(app): State<Arc<App>>, s: Session, Path(name): Path<String>) -> Page {
    let u = &s.user;
    if u.role == Role::Regular {
        return Err(crate::error::ApiError::forbidden("regular users cannot manage users").into());
    }
    let x = app.show_user(u, &name)?;
    let owned_vms: Vec<String> = app.list_vms(u)?.into_iter().filter(|v| v.owner == name).map(|v| v.name).collect();
    let owned_vols: Vec<String> =
        app.list_volumes(u)?.into_iter().filter(|v| v.owner == name).map(|v| v.name).collect();
    let members: Vec<String> =
        app.list_users(u)?.into_iter().filter(|m| m.parent.as_deref() == Some(&name)).map(|m| m.name).collect();
    let mut depends: Vec<String> = owned_vms.iter().map(|v| format!("VM {v}")).collect();
    depends.extend(owned_vols.iter().map(|v| format!("volume {v}")));
    depends.extend(members.iter().map(|m| format!("user {m} of its tenant")));
    let body = html! {
        dl .kv {
            dt { "Role" } dd { (role_label(x.role)) }
            @if let Some(p) = &x.parent { dt { "Tenant of" } dd { a href=(format!("/users/{p}")) { (p) } } }
            @if let Some(q) = &x.quota {
                dt { "Quota" } dd { (q.cpus) " vCPUs, " (human(q.memory_bytes)) " memory, " (human(q.storage_bytes)) " storage" }
            }
            @if let Some(b) = x.storage_used_bytes { dt { "Storage used" } dd { (human(b)) } }
            dt { "Created" } dd { (when(x.created)) }
        }
        @if name != u.name {
            (danger_form(&s, &format!("/users/{name}/delete"), &name, "user", &depends, html! {}))
        }
    };
    Ok(page(&s, &format!("User {name}"), body))
}

// ----- usage, jobs, events -----

pub async fn usage(State(app): State<Arc<App>>, s: Session) -> Page {
    let rows = app.usage(&s.user, None)?;
    let mut by: std::collections::BTreeMap<(String, String), u64> = Default::default();
    for r in &rows {
        *by.entry((r.user.clone(), r.vm.clone())).or_default() += r.seconds;
    }
    let body = html! {
        @if by.is_empty() { p { "No VM has run yet." } } @else {
            table {
                thead { tr { th { "User" } th { "VM" } th { "Hours run" } } }
                tbody { @for ((user, vm), secs) in &by { tr {
                    td { (user) } td { (vm) } td { (format!("{:.2}", *secs as f64 / 3600.0)) }
                } } }
            }
        }
    };
    Ok(page(&s, "Usage", body))
}

pub async fn jobs(State(app): State<Arc<App>>, s: Session) -> Page {
    let jobs = app.list_jobs(&s.user)?;
    Ok(page(&s, "Jobs", html! { div data-jobs-table { (jobs_table(&jobs)) } }))
}

pub async fn job(State(app): State<Arc<App>>, s: Session, Path(id): Path<String>) -> Page {
    let id: u64 = id.parse().map_err(|_| crate::error::ApiError::not_found(format!("job {id} not found")))?;
    let j = app.show_job(&s.user, id)?;
    let link = match j.kind.split('.').next() {
        Some("vm") => Some(format!("/vms/{}", j.target)),
        Some("volume") => Some(format!("/volumes/{}", j.target)),
        Some("iso") => Some("/isos".to_string()),
        _ => None,
    };
    let body = html! {
        dl .kv {
            dt { "Kind" } dd { (j.kind) }
            dt { "Target" } dd { @if let Some(l) = &link { a href=(l) { (j.target) } } @else { (j.target) } }
            dt { "Owner" } dd { (j.owner) }
            dt { "Started" } dd { (when(j.started)) }
        }
        (progress(&j))
        @if let Some(r) = &j.result { h2 { "Result" } pre { (serde_json::to_string_pretty(r).unwrap_or_default()) } }
    };
    Ok(page(&s, &format!("Job #{id}"), body))
}

pub async fn events(State(app): State<Arc<App>>, s: Session) -> Page {
    let ev = app.list_events(&s.user, 0, 200)?;
    let last = ev.last().and_then(|e| e["id"].as_u64()).unwrap_or(0);
    let body = html! {
        p .hint { "New events appear as they happen." }
        div data-events-from=(last) { (events_table(&ev)) }
    };
    Ok(page(&s, "Event log", body))
}
