//! The web UI: server-rendered HTML pages at `/` on the API's address,
//! over the same [`App`] operations as `/api/v1` (the operations check
//! rights; the pages only choose what to show), with a little JavaScript
//! for what HTML cannot do: live job progress and events (server-sent
//! events, [`live`]), the consoles ([`console`]: noVNC and xterm.js over
//! WebSockets the daemon relays), type-the-name confirmation and themes.
//!
//! - **Session**: the login form exchanges a password for an API token
//!   ([`App::login`], throttled like the API's), kept in a `Secure`,
//!   `HttpOnly`, `SameSite=Strict` cookie.
//! - **CSRF**: every change is a POST (or the ISO upload's PUT) that must
//!   carry the session's CSRF token (a hash of the session token under its
//!   own domain, so it is worthless without the cookie and the cookie is
//!   unreadable to scripts), and a foreign `Origin` is refused too.
//! - **Content-Security-Policy**: scripts and styles from this origin only
//!   (no inline script, no `eval`); the serial console page adds a nonce
//!   for the style elements xterm.js makes (see `serial.js`).
//! - Every page works without JavaScript except the consoles and upload.

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use blake2::{Blake2s256, Digest};
use maud::{DOCTYPE, Markup, html};
use serde::de::DeserializeOwned;

use crate::app::App;
use crate::error::ApiError;
use crate::model::{Role, User};

mod actions;
pub mod console;
pub mod live;
mod pages;

/// The session cookie (the API token).
pub const SESSION_COOKIE: &str = "keel_session";
/// The one-shot message cookie (what the last action did, or why not).
const FLASH_COOKIE: &str = "keel_flash";
/// The login form's double-submit cookie (no session yet to bind to).
const PRELOGIN_COOKIE: &str = "keel_prelogin";

/// The front-end files, embedded in the binary: Keel's own and the
/// vendored ones (`ui/vendor/`, with their licences and `SHA256SUMS`).
static STATIC: include_dir::Dir<'static> = include_dir::include_dir!("$CARGO_MANIFEST_DIR/ui");

/// The UI's routes (merged into the API's router).
pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(pages::dashboard))
        .route("/login", get(pages::login_page).post(actions::login))
        .route("/logout", post(actions::logout))
        .route("/nodes", get(pages::nodes))
        .route("/nodes/{name}", get(pages::node))
        .route("/volumes", get(pages::volumes).post(actions::create_volume))
        .route("/volumes/{name}", get(pages::volume))
        .route("/volumes/{name}/{action}", post(actions::volume_action))
        .route("/volumes/{name}/snapshots/{snap}/{action}", post(actions::snapshot_action))
        .route("/vms", get(pages::vms).post(actions::create_vm))
        .route("/vms/new", get(pages::new_vm))
        .route("/vms/{name}", get(pages::vm))
        .route("/vms/{name}/console", get(console::graphical_page))
        .route("/vms/{name}/serial", get(console::serial_page))
        .route("/vms/{name}/{action}", post(actions::vm_action))
        .route("/isos", get(pages::isos))
        .route("/isos/{name}", axum::routing::put(actions::upload_iso))
        .route("/isos/{name}/delete", post(actions::delete_iso))
        .route("/library", get(pages::library))
        .route("/library/{name}", get(pages::appliance))
        .route("/library/{name}/{action}", post(actions::appliance_action))
        .route("/users", get(pages::users).post(actions::create_user))
        .route("/users/{name}", get(pages::user))
        .route("/users/{name}/delete", post(actions::delete_user))
        .route("/usage", get(pages::usage))
        .route("/jobs", get(pages::jobs))
        .route("/jobs/{id}", get(pages::job))
        .route("/events", get(pages::events))
        .route("/ui/live", get(live::stream))
        .route("/ui/tickets", post(console::ticket))
        .route("/ui/ws/{kind}", get(console::websocket))
        .route("/ui/static/{*path}", get(static_file))
        .layer(axum::middleware::from_fn(security_headers))
}

/// Headers every UI response carries: the CSP (unless the handler set its
/// own), no sniffing, no framing, no referrer to other sites.
async fn security_headers(req: Request, next: axum::middleware::Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    }
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    resp
}

/// The policy of every page: nothing but this origin's own files.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn static_file(Path(path): Path<String>) -> Response {
    // Keel's own files are in `ui/static/`, the vendored ones in `ui/vendor/`.
    let file =
        if path.starts_with("vendor/") { STATIC.get_file(&path) } else { STATIC.get_file(format!("static/{path}")) };
    let Some(f) = file.filter(|_| !path.contains("..")) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let ext = path.rsplit('.').next().unwrap_or("");
    let ty = match ext {
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "txt" | "md" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    };
    ([(header::CONTENT_TYPE, ty), (header::CACHE_CONTROL, "no-cache")], f.contents()).into_response()
}

// ----- sessions -----

/// A logged-in browser: the user, the session token, the CSRF token the
/// forms carry, and the message the last action left.
pub struct Session {
    /// Who.
    pub user: User,
    token: String,
    /// The CSRF token of this session.
    pub csrf: String,
    /// The last action's outcome: (ok, message).
    pub flash: Option<(bool, String)>,
    /// The request's path (for the navigation's current page).
    pub path: String,
}

/// The CSRF token of a session token.
pub(crate) fn csrf_of(token: &str) -> String {
    let mut h = Blake2s256::new();
    h.update(b"keel-ui-csrf\0");
    h.update(token.as_bytes());
    crate::auth::hex(&h.finalize())
}

/// Compare without stopping at the first difference.
fn same(a: &str, b: &str) -> bool {
    crate::access::constant_time_eq(a.as_bytes(), b.as_bytes())
}

pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `Set-Cookie` value for this UI: host-only, whole site, never readable
/// by scripts, never sent with another site's requests.
pub(crate) fn set_cookie(name: &str, value: &str, max_age: Option<u64>) -> HeaderValue {
    let age = max_age.map(|s| format!("; Max-Age={s}")).unwrap_or_default();
    HeaderValue::from_str(&format!("{name}={value}; Path=/; HttpOnly; Secure; SameSite=Strict{age}"))
        .expect("cookie values are URL-safe")
}

fn decode_flash(v: &str) -> Option<(bool, String)> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(v).ok()?;
    let (k, m) = pairs.into_iter().next()?;
    Some((k == "ok", m))
}

/// What the UI answers when a request cannot be served.
pub enum UiError {
    /// No session: to the login page, then back here.
    Login(String),
    /// The operation's refusal, shown as a page.
    Api(ApiError),
}

impl From<ApiError> for UiError {
    fn from(e: ApiError) -> UiError {
        UiError::Api(e)
    }
}

impl From<crate::db::Error> for UiError {
    fn from(e: crate::db::Error) -> UiError {
        UiError::Api(e.into())
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        match self {
            UiError::Login(next) => {
                let q = serde_urlencoded::to_string([("next", next.as_str())]).unwrap_or_default();
                Redirect::to(&format!("/login?{q}")).into_response()
            }
            UiError::Api(e) => {
                let status = e.status;
                let title = match status.as_u16() {
                    403 => "Not allowed",
                    404 => "Not found",
                    _ => "Error",
                };
                let body = html! {
                    (DOCTYPE)
                    html lang="en" {
                        (head(title, html! {}))
                        body {
                            main #main .narrow {
                                h1 { (title) }
                                p .flash .error role="alert" { (e.message) }
                                p { a href="/" { "Back to the start page" } }
                            }
                        }
                    }
                };
                // Also sent from the router's fallback, outside the UI's layer.
                let headers = [
                    (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                    (header::CONTENT_SECURITY_POLICY, CSP),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                    (header::X_FRAME_OPTIONS, "DENY"),
                ];
                (status, headers, body.into_string()).into_response()
            }
        }
    }
}

pub(crate) fn session_from(app: &App, parts: &Parts) -> Result<Session, UiError> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let token = cookie(&parts.headers, SESSION_COOKIE).ok_or_else(|| UiError::Login(path.clone()))?;
    let user = app.authenticate(token).map_err(|_| UiError::Login(path.clone()))?;
    Ok(Session {
        user,
        token: token.to_string(),
        csrf: csrf_of(token),
        flash: cookie(&parts.headers, FLASH_COOKIE).and_then(decode_flash),
        path: parts.uri.path().to_string(),
    })
}

impl FromRequestParts<Arc<App>> for Session {
    type Rejection = UiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Session, UiError> {
        session_from(app, parts)
    }
}

/// The request comes from a page of this origin: a browser sends `Origin`
/// with every POST and WebSocket; a different one is another site's.
pub(crate) fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let o = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://")).unwrap_or("");
    !host.is_empty() && o == host
}

/// A change sent from a page: the session, its CSRF token checked, and the
/// form decoded into `T`.
pub struct Posted<T> {
    /// Who sent it.
    pub session: Session,
    /// The form.
    pub form: T,
    /// Where to go back to (the form's `back` field, a path of this site).
    pub back: String,
}

fn refused(m: &str) -> UiError {
    UiError::Api(ApiError::forbidden(m))
}

impl<T: DeserializeOwned + Send> FromRequest<Arc<App>> for Posted<T> {
    type Rejection = UiError;

    async fn from_request(req: Request, app: &Arc<App>) -> Result<Posted<T>, UiError> {
        let (mut parts, body) = req.into_parts();
        let session = Session::from_request_parts(&mut parts, app).await?;
        if !same_origin(&parts.headers) {
            return Err(refused("this form was sent from another site: refused"));
        }
        let b = axum::body::to_bytes(body, 1 << 20)
            .await
            .map_err(|_| UiError::Api(ApiError::bad("the form is over 1 MiB or was cut short")))?;
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&b)
            .map_err(|e| UiError::Api(ApiError::bad(format!("the form does not decode: {e}"))))?;
        let sent = fields.iter().find(|(k, _)| k == "_csrf").map(|(_, v)| v.as_str()).unwrap_or("");
        if !same(sent, &session.csrf) {
            return Err(refused(
                "the form's CSRF token is missing or wrong (the page may be from an earlier session): reload the page \
                 and send it again",
            ));
        }
        let back = fields.iter().find(|(k, _)| k == "back").map(|(_, v)| v.clone()).filter(|b| local_path(b));
        let form = serde_urlencoded::from_bytes::<T>(&b)
            .map_err(|e| UiError::Api(ApiError::bad(format!("the form is not complete: {e}"))))?;
        Ok(Posted { back: back.unwrap_or_else(|| "/".into()), session, form })
    }
}

/// A path of this site (not `//host`, not a scheme).
pub(crate) fn local_path(p: &str) -> bool {
    p.starts_with('/') && !p.starts_with("//") && !p.contains('\\') && !p.chars().any(char::is_control)
}

/// To `to`, with a message shown once there.
pub(crate) fn redirect_flash(to: &str, ok: bool, msg: &str) -> Response {
    let mut r = Redirect::to(to).into_response();
    let v = serde_urlencoded::to_string([(if ok { "ok" } else { "error" }, msg)]).unwrap_or_default();
    // The cookie value is URL-encoded; keep it well within a cookie's size.
    let v: String = v.chars().take(3000).collect();
    r.headers_mut().append(header::SET_COOKIE, set_cookie(FLASH_COOKIE, &v, Some(60)));
    r
}

/// The outcome of an action: on success to `to` with `msg`; on a refusal
/// back to the form's page with the reason.
pub(crate) fn outcome<T>(back: &str, r: Result<T, ApiError>, ok: impl FnOnce(T) -> (String, String)) -> Response {
    match r {
        Ok(v) => {
            let (to, msg) = ok(v);
            redirect_flash(&to, true, &msg)
        }
        Err(e) => redirect_flash(back, false, &e.message),
    }
}

// ----- layout -----

/// A page: its title and body inside the common frame.
pub(crate) fn page(s: &Session, title: &str, body: Markup) -> Response {
    page_with(s, title, body, None, &[])
}

/// [`page`] with a page script and, optionally, its own CSP.
pub(crate) fn page_with(s: &Session, title: &str, body: Markup, csp: Option<String>, scripts: &[&str]) -> Response {
    let nav = nav_items(&s.user);
    let current = |href: &str| {
        if href == "/" { s.path == "/" } else { s.path == href || s.path.starts_with(&format!("{href}/")) }
    };
    let m = html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, html! {
                meta name="csrf-token" content=(s.csrf);
                script type="module" src="/ui/static/app.js" {}
                @for sc in scripts {
                    @if sc.ends_with(".css") {
                        link rel="stylesheet" href=(sc);
                    } @else {
                        script type="module" src=(sc) {}
                    }
                }
            }))
            body {
                a .skip href="#main" { "Skip to content" }
                header .top {
                    a .brand href="/" { "Keel" }
                    nav aria-label="Main" {
                        ul {
                            @for (href, label) in &nav {
                                li {
                                    @if current(href) {
                                        a href=(href) aria-current="page" { (label) }
                                    } @else {
                                        a href=(href) { (label) }
                                    }
                                }
                            }
                        }
                    }
                    div .who {
                        span { (s.user.name) " (" (role_label(s.user.role)) ")" }
                        button type="button" .theme data-theme-toggle aria-label="Switch between light and dark theme" { "Theme" }
                        form method="post" action="/logout" .inline {
                            input type="hidden" name="_csrf" value=(s.csrf);
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main #main {
                    @if let Some((ok, msg)) = &s.flash {
                        p .flash .ok[*ok] .error[!*ok] role=(if *ok { "status" } else { "alert" }) { (msg) }
                    }
                    h1 { (title) }
                    (body)
                }
            }
        }
    };
    let mut r = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], m.into_string()).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if s.flash.is_some() {
        h.append(header::SET_COOKIE, set_cookie(FLASH_COOKIE, "", Some(0)));
    }
    if let Some(v) = csp.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    r
}

/// The `<head>` of every page: `title`, the icon and the style sheet, then
/// `extra` (scripts, the CSRF token).
pub(crate) fn head(title: &str, extra: Markup) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Keel" }
            link rel="icon" href="/ui/static/icon.svg" type="image/svg+xml";
            link rel="stylesheet" href="/ui/static/app.css";
            (extra)
        }
    }
}

pub(crate) fn role_label(r: Role) -> &'static str {
    match r {
        Role::Manager => "Manager",
        Role::Power => "Power User",
        Role::Regular => "Regular User",
    }
}

fn nav_items(u: &User) -> Vec<(&'static str, &'static str)> {
    match u.role {
        Role::Manager => vec![
            ("/", "Dashboard"),
            ("/nodes", "Nodes"),
            ("/volumes", "Volumes"),
            ("/vms", "VMs"),
            ("/isos", "ISO store"),
            ("/library", "Library"),
            ("/users", "Users"),
            ("/usage", "Usage"),
            ("/jobs", "Jobs"),
            ("/events", "Events"),
        ],
        Role::Power => vec![
            ("/", "Dashboard"),
            ("/volumes", "Volumes"),
            ("/vms", "VMs"),
            ("/isos", "ISO store"),
            ("/library", "Library"),
            ("/users", "Users"),
            ("/usage", "Usage"),
            ("/jobs", "Jobs"),
            ("/events", "Events"),
        ],
        Role::Regular => vec![("/vms", "My VM")],
    }
}

/// A hidden CSRF field and the page to come back to.
pub(crate) fn form_head(s: &Session) -> Markup {
    html! {
        input type="hidden" name="_csrf" value=(s.csrf);
        input type="hidden" name="back" value=(s.path);
    }
}

/// A one-button form posting to `action`.
pub(crate) fn button_form(s: &Session, action: &str, label: &str, class: &str) -> Markup {
    html! {
        form method="post" action=(action) .inline {
            (form_head(s))
            button type="submit" class=(class) { (label) }
        }
    }
}

/// A destructive action: the button stays disabled until the object's name
/// is typed; what depends on it is listed above.
pub(crate) fn danger_form(
    s: &Session,
    action: &str,
    name: &str,
    what: &str,
    depends: &[String],
    extra: Markup,
) -> Markup {
    let id = format!("confirm-{}", name.replace(|c: char| !c.is_ascii_alphanumeric(), "-"));
    html! {
        section .danger aria-labelledby=(format!("{id}-h")) {
            h2 id=(format!("{id}-h")) { "Delete " (what) }
            @if depends.is_empty() {
                p { "Nothing else depends on it." }
            } @else {
                p { "These depend on it:" }
                ul { @for d in depends { li { (d) } } }
            }
            form method="post" action=(action) data-confirm=(name) {
                (form_head(s))
                (extra)
                label for=(id) { "Type " strong { (name) } " to confirm" }
                input id=(id) name="confirm" type="text" autocomplete="off" required;
                button type="submit" .danger disabled { "Delete " (what) }
            }
        }
    }
}

/// Bytes for people.
pub(crate) fn human(b: u64) -> String {
    crate::model::human(b)
}

/// A Unix time as UTC.
pub(crate) fn when(t: u64) -> String {
    if t == 0 {
        return "—".into();
    }
    let days = t / 86400;
    let secs = t % 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

/// The CSRF token of a request that is not a form (the ISO upload and the
/// console tickets send it as `X-CSRF-Token`), and its origin.
pub(crate) fn header_csrf_ok(s: &Session, headers: &HeaderMap) -> bool {
    let sent = headers.get("x-csrf-token").and_then(|v| v.to_str().ok()).unwrap_or("");
    same(sent, &s.csrf) && same_origin(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(when(0), "—");
        assert_eq!(when(1), "1970-01-01 00:00:01 UTC");
        assert_eq!(when(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(when(1_796_601_600), "2026-12-07 00:00:00 UTC");
    }

    #[test]
    fn only_local_paths_are_followed_back() {
        assert!(local_path("/vms/web"));
        assert!(!local_path("//evil.example/x"));
        assert!(!local_path("https://evil.example/"));
        assert!(!local_path("/\\evil"));
        assert!(!local_path("vms"));
    }

    #[test]
    fn the_csrf_token_is_bound_to_the_session() {
        assert_ne!(csrf_of("a"), csrf_of("b"));
        assert_eq!(csrf_of("a"), csrf_of("a"));
        assert_ne!(csrf_of("a"), crate::auth::token_key("a"), "not the token's database key");
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }

    #[test]
    fn every_vendored_file_matches_its_checksum() {
        use sha2::Sha256;
        let sums = STATIC.get_file("vendor/SHA256SUMS").expect("ui/vendor/SHA256SUMS").contents_utf8().unwrap();
        let mut n = 0;
        for line in sums.lines().filter(|l| !l.trim().is_empty()) {
            let (sum, path) = line.split_once("  ").expect("sha256sum's format");
            let f = STATIC.get_file(format!("vendor/{path}")).unwrap_or_else(|| panic!("vendor/{path} is listed"));
            let got = crate::auth::hex(&Sha256::digest(f.contents()));
            assert_eq!(got, sum, "vendor/{path} differs from its recorded checksum");
            n += 1;
        }
        // Every vendored file is listed.
        fn count(d: &include_dir::Dir<'_>) -> usize {
            d.files().count() + d.dirs().map(count).sum::<usize>()
        }
        let vendor = STATIC.get_dir("vendor").unwrap();
        let unlisted = count(vendor) - 2; // SHA256SUMS and README.md
        assert_eq!(n, unlisted, "every vendored file has a checksum");
    }
}
