//! VM consoles in the browser.
//!
//! - **Graphical**: QEMU serves VNC on a Unix socket in the VM's private
//!   directory (`vnc.sock`, never a TCP port); the daemon relays it,
//!   byte for byte, to noVNC over a WebSocket.
//! - **Serial**: QEMU's serial port is a socket (`serial.sock`) whose every
//!   byte QEMU also logs to `console.log`, whether or not anyone is
//!   connected. A viewer gets the log's last [`REPLAY`] bytes (the boot),
//!   then what follows as it is logged; what it types goes to the guest.
//!   Several viewers share one connection to QEMU's socket (a [`Hub`] per
//!   VM, which drains it and passes on input), so they all see the same
//!   console and all may type.
//!
//! A WebSocket is opened with a **ticket**: asked for by a page of a
//! logged-in user (`POST /ui/tickets`, CSRF checked), random, for one VM
//! and one kind of console, valid [`struct@TICKET_TTL`], usable once, and only
//! with the same user's session cookie and this site's `Origin`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Weak};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::html;
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::{Session, UiError, page_with};
use crate::app::App;
use crate::error::ApiError;
use crate::names::{self, VmName};

/// How long a console ticket may wait for its WebSocket: 30 s, or
/// `KEEL_CONSOLE_TICKET_TTL` seconds (the browser tests wait out a short one).
pub static TICKET_TTL: LazyLock<Duration> = LazyLock::new(|| {
    let s = std::env::var("KEEL_CONSOLE_TICKET_TTL").ok().and_then(|v| v.parse::<u64>().ok()).filter(|s| *s > 0);
    Duration::from_secs(s.unwrap_or(30))
});
/// Tickets a user may have waiting at once.
pub const MAX_TICKETS: usize = 16;
/// How much of the serial log a new viewer is sent first.
pub const REPLAY: u64 = 256 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Vnc,
    Serial,
}

struct Ticket {
    user: String,
    vm: String,
    kind: Kind,
    expires: Instant,
}

static TICKETS: LazyLock<Mutex<HashMap<String, Ticket>>> = LazyLock::new(Default::default);

/// The live tickets (expired ones dropped).
fn live_tickets() -> parking_lot::MutexGuard<'static, HashMap<String, Ticket>> {
    let mut all = TICKETS.lock();
    let now = Instant::now();
    all.retain(|_, v| v.expires > now);
    all
}

fn take_ticket(t: &str) -> Option<Ticket> {
    live_tickets().remove(t)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TicketIn {
    vm: String,
    kind: Kind,
}

/// `POST /ui/tickets` `{"vm": NAME, "kind": "vnc"|"serial"}` with the CSRF
/// token in `X-CSRF-Token`: a ticket for one console WebSocket.
pub async fn ticket(
    State(app): State<Arc<App>>,
    s: Result<Session, UiError>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let r = async {
        let s = s.map_err(|_| ApiError::unauthorized("the session has ended: log in again"))?;
        if !super::header_csrf_ok(&s, &headers) {
            return Err(ApiError::forbidden("the ticket request's CSRF token is missing or wrong: reload the page"));
        }
        let b = axum::body::to_bytes(body, 64 << 10).await.map_err(|_| ApiError::bad("the request is over 64 KiB"))?;
        let r: TicketIn =
            serde_json::from_slice(&b).map_err(|e| ApiError::bad(format!("invalid ticket request: {e}")))?;
        let vm = names::parse::<VmName>(&r.vm)?;
        let v = app.show_vm(&s.user, &vm)?;
        if !v.state.has_qemu() {
            return Err(ApiError::conflict(format!("VM {vm} is not running: power it on first")));
        }
        let t = crate::auth::new_token();
        let expires = Instant::now() + *TICKET_TTL;
        let mut all = live_tickets();
        if all.values().filter(|v| v.user == s.user.name).count() >= MAX_TICKETS {
            return Err(ApiError::too_many("too many console tickets waiting: open the consoles already asked for", 5));
        }
        all.insert(t.clone(), Ticket { user: s.user.name.clone(), vm: vm.to_string(), kind: r.kind, expires });
        Ok(t)
    }
    .await;
    match r {
        Ok(t) => {
            let body = serde_json::json!({ "ticket": t, "expires_in": TICKET_TTL.as_secs() });
            (StatusCode::CREATED, axum::Json(body)).into_response()
        }
        Err(e) => (e.status, axum::Json(serde_json::json!({ "error": e.message }))).into_response(),
    }
}

#[derive(Deserialize)]
pub struct WsQ {
    ticket: String,
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, why.to_string()).into_response()
}

/// `GET /ui/ws/{vnc|serial}?ticket=T`: the console's WebSocket.
pub async fn websocket(
    State(app): State<Arc<App>>,
    Path(kind): Path<String>,
    Query(q): Query<WsQ>,
    req: axum::extract::Request,
) -> Response {
    let (mut parts, _) = req.into_parts();
    // Browsers always send Origin with a WebSocket: it must be this site.
    if parts.headers.get(axum::http::header::ORIGIN).is_none() || !super::same_origin(&parts.headers) {
        return refuse(StatusCode::FORBIDDEN, "console WebSocket from another origin: refused");
    }
    let Some(t) = take_ticket(&q.ticket) else {
        return refuse(StatusCode::FORBIDDEN, "console ticket unknown, used or expired: open the console again");
    };
    let want = match kind.as_str() {
        "vnc" => Kind::Vnc,
        "serial" => Kind::Serial,
        _ => return refuse(StatusCode::NOT_FOUND, "no such console"),
    };
    if t.kind != want {
        return refuse(StatusCode::FORBIDDEN, "the ticket is for another console");
    }
    let Ok(s) = super::session_from(&app, &parts) else {
        return refuse(StatusCode::UNAUTHORIZED, "log in first");
    };
    if s.user.name != t.user {
        return refuse(StatusCode::FORBIDDEN, "the ticket was issued to another user");
    }
    // Still the user's and still running.
    let dir = match app.show_vm(&s.user, &t.vm).and_then(|v| {
        if v.state.has_qemu() { app.vm_dir(&t.vm) } else { Err(ApiError::conflict("the VM is not running")) }
    }) {
        Ok(d) => d,
        Err(e) => return refuse(e.status, &e.message),
    };
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &app).await {
        Ok(w) => w.max_message_size(MAX_MESSAGE).max_frame_size(MAX_MESSAGE),
        Err(e) => return e.into_response(),
    };
    let started = app.show_vm(&s.user, &t.vm).ok().and_then(|v| v.started);
    let check = Check { app: app.clone(), token: s.token.clone(), vm: t.vm.clone(), started };
    let vm = t.vm.clone();
    match want {
        Kind::Vnc => ws.on_upgrade(move |socket| relay_vnc(socket, dir.join("vnc.sock"), check)),
        Kind::Serial => ws.on_upgrade(move |socket| serial_viewer(socket, vm, dir, check)),
    }
}

/// How often an open console checks that its user still may use it (the
/// session, the VM's visibility, the VM running).
const RECHECK: Duration = Duration::from_secs(1);

/// The console's user may still use it: logged in, the VM visible to it
/// and running, and the same VM (its run directory was not made anew).
fn still_allowed(app: &App, token: &str, vm: &str, started: Option<u64>) -> bool {
    let Ok(user) = app.authenticate(token) else { return false };
    app.show_vm(&user, vm).is_ok_and(|v| v.state.has_qemu() && v.started == started)
}

async fn relay_vnc(ws: WebSocket, path: PathBuf, check: Check) {
    use futures::{SinkExt, StreamExt};
    let Ok(unix) = UnixStream::connect(&path).await else { return };
    let (mut rd, mut wr) = unix.into_split();
    let (mut sink, mut stream) = ws.split();
    // Each direction on its own, so a slow one never stalls the other.
    let down = async {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.close().await;
    };
    let up = async {
        while let Some(Ok(m)) = stream.next().await {
            let ok = match m {
                Message::Binary(b) => wr.write_all(&b).await.is_ok(),
                Message::Text(t) => wr.write_all(t.as_bytes()).await.is_ok(),
                Message::Ping(_) | Message::Pong(_) => true,
                Message::Close(_) => false,
            };
            if !ok {
                break;
            }
        }
    };
    tokio::select! {
        _ = down => {}
        _ = up => {}
        _ = check.lost() => {}
    }
}

/// The rights of an open console, checked every [`RECHECK`].
struct Check {
    app: Arc<App>,
    token: String,
    vm: String,
    started: Option<u64>,
}

impl Check {
    /// Resolves once the console's user may no longer use it.
    async fn lost(&self) {
        loop {
            tokio::time::sleep(RECHECK).await;
            if !still_allowed(&self.app, &self.token, &self.vm, self.started) {
                return;
            }
        }
    }
}

/// One connection to a VM's serial socket, shared by its viewers: the
/// input they type, and a counter of output bytes (the log holds them)
/// that wakes them. The connection closes when the last viewer goes; the
/// counter's sender goes when QEMU closes it.
struct Hub {
    input: tokio::sync::mpsc::Sender<Vec<u8>>,
    output: tokio::sync::watch::Receiver<u64>,
}

static HUBS: LazyLock<Mutex<HashMap<String, Weak<Hub>>>> = LazyLock::new(Default::default);

fn hub(vm: &str, socket: PathBuf) -> Arc<Hub> {
    let mut hubs = HUBS.lock();
    hubs.retain(|_, h| h.strong_count() > 0);
    // A hub whose connection ended (QEMU restarted) is not reused.
    if let Some(h) =
        hubs.get(vm).and_then(Weak::upgrade).filter(|h| !h.input.is_closed() && h.output.has_changed().is_ok())
    {
        return h;
    }
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let (out_tx, out_rx) = tokio::sync::watch::channel(0u64);
    let h = Arc::new(Hub { input: in_tx, output: out_rx });
    hubs.insert(vm.to_string(), Arc::downgrade(&h));
    tokio::spawn(async move {
        let Ok(unix) = UnixStream::connect(&socket).await else { return };
        let (mut rd, mut wr) = unix.into_split();
        // What the guest writes is in the log already; reading it here
        // keeps QEMU from blocking, and tells viewers to look.
        let reader = async {
            let mut buf = vec![0u8; 16 << 10];
            let mut total = 0u64;
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        total += n as u64;
                        let _ = out_tx.send(total);
                    }
                }
            }
        };
        // Input, until every viewer is gone.
        let writer = async {
            while let Some(b) = in_rx.recv().await {
                if wr.write_all(&b).await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            _ = reader => {}
            _ = writer => {}
        }
    });
    h
}

/// Largest message a console WebSocket takes from a browser (a keystroke,
/// a paste, an RFB message).
pub const MAX_MESSAGE: usize = 64 << 10;

async fn serial_viewer(ws: WebSocket, vm: String, dir: PathBuf, check: Check) {
    use futures::{SinkExt, StreamExt};
    let h = hub(&vm, dir.join("serial.sock"));
    let mut news = h.output.clone();
    let input = h.input.clone();
    let log = dir.join("console.log");
    let (mut sink, mut stream) = ws.split();
    let down = async {
        let mut offset = match tokio::fs::metadata(&log).await {
            Ok(m) => m.len().saturating_sub(REPLAY),
            Err(_) => 0,
        };
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            // Send what the log has past our offset.
            match read_from(&log, offset).await {
                Ok(b) if !b.is_empty() => {
                    offset += b.len() as u64;
                    if sink.send(Message::Binary(b.into())).await.is_err() {
                        break;
                    }
                    continue;
                }
                _ => {}
            }
            tokio::select! {
                r = news.changed() => if r.is_err() {
                    // QEMU closed the console (the VM stopped): send the
                    // last of the log, and close.
                    if let Ok(b) = read_from(&log, offset).await
                        && !b.is_empty()
                    {
                        let _ = sink.send(Message::Binary(b.into())).await;
                    }
                    break;
                },
                _ = tick.tick() => {}
            }
        }
        let _ = sink.close().await;
    };
    let up = async {
        while let Some(Ok(m)) = stream.next().await {
            let b = match m {
                Message::Binary(b) => b.to_vec(),
                Message::Text(t) => t.as_bytes().to_vec(),
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Close(_) => break,
            };
            if input.send(b).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = down => {}
        _ = up => {}
        _ = check.lost() => {}
    }
}

async fn read_from(log: &std::path::Path, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut f = tokio::fs::File::open(log).await?;
    let len = f.metadata().await?.len();
    if len <= offset {
        return Ok(Vec::new());
    }
    f.seek(std::io::SeekFrom::Start(offset)).await?;
    let want = (len - offset).min(64 << 10) as usize;
    let mut buf = vec![0u8; want];
    f.read_exact(&mut buf).await?;
    Ok(buf)
}

// ----- pages -----

pub async fn graphical_page(
    State(app): State<Arc<App>>,
    s: Session,
    Path(name): Path<String>,
) -> Result<Response, UiError> {
    let v = app.show_vm(&s.user, &name)?;
    let body = html! {
        p { a href=(format!("/vms/{name}")) { "Back to VM " (name) } " · " a href=(format!("/vms/{name}/serial")) { "Serial console" } }
        div .console-bar {
            span #vnc-status role="status" { "Connecting…" }
            button type="button" #vnc-cad { "Send Ctrl-Alt-Del" }
        }
        div #vnc-screen .screen data-vm=(v.name) role="application" aria-label=(format!("Graphical console of {name}")) {}
    };
    let csp = super::CSP.replace("img-src 'self' data:", "img-src 'self' data: blob:");
    Ok(page_with(&s, &format!("Console of {name}"), body, Some(csp), &["/ui/static/vnc.js"]))
}

pub async fn serial_page(
    State(app): State<Arc<App>>,
    s: Session,
    Path(name): Path<String>,
) -> Result<Response, UiError> {
    let v = app.show_vm(&s.user, &name)?;
    // xterm.js makes <style> elements for its layout: they carry this
    // response's nonce (serial.js sets it), and no other inline style runs.
    let nonce = crate::auth::new_token();
    let nonce: String = nonce.chars().filter(char::is_ascii_alphanumeric).take(32).collect();
    let body = html! {
        p { a href=(format!("/vms/{name}")) { "Back to VM " (name) } " · " a href=(format!("/vms/{name}/console")) { "Graphical console" } }
        div .console-bar { span #serial-status role="status" { "Connecting…" } }
        div #serial-term .term data-vm=(v.name) data-style-nonce=(nonce) role="application" aria-label=(format!("Serial console of {name}")) {}
    };
    let csp = super::CSP.replace("style-src 'self'", &format!("style-src 'self' 'nonce-{nonce}'"));
    Ok(page_with(
        &s,
        &format!("Serial console of {name}"),
        body,
        Some(csp),
        &["/ui/static/vendor/xterm/xterm.css", "/ui/static/serial.js"],
    ))
}
