//! The error every API operation returns: an HTTP status and a message a
//! person can act on, sent as `{"error": "...", "request_id": "..."}`.
//!
//! What a client reads says what failed and what to do; it never carries a
//! host path, a file's content or the text of an internal error. Those go to
//! the daemon's log as the error's *detail*, under the request id that the
//! answer carries (and the `x-request-id` header), so an administrator can
//! find them. An unexpected failure is a 500 whose message is only what was
//! being done and that id.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keel_blockstore::ErrorKind;

tokio::task_local! {
    /// The id of the request being answered (set by the API's logging
    /// layer for the whole of a request).
    pub static REQUEST_ID: String;
}

/// The current request's id, or `-` outside a request.
pub fn request_id() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_else(|_| "-".to_string())
}

/// A new request id: 16 hex digits.
pub fn new_request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// An API error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What failed and what to do: what the client reads.
    pub message: String,
    /// Seconds after which a retry may succeed (`Retry-After`).
    pub retry_after: Option<u64>,
    /// What went wrong inside, for the daemon's log only.
    detail: Option<String>,
}

/// Result alias of the service layer.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), retry_after: None, detail: None }
    }
    /// 400: the request is malformed or a field is invalid.
    pub fn bad(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, m)
    }
    /// 401: no or unknown credentials.
    pub fn unauthorized(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, m)
    }
    /// 403: the caller's role may not do this.
    pub fn forbidden(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, m)
    }
    /// 404: no such thing (or not in the caller's tenant).
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, m)
    }
    /// 409: conflicts with the current state.
    pub fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, m)
    }
    /// 429: too many attempts; retry after `secs` seconds.
    pub fn too_many(m: impl Into<String>, secs: u64) -> ApiError {
        ApiError { retry_after: Some(secs.max(1)), ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, m) }
    }
    /// 503: the appliance is too busy to take this now; retry after `secs`.
    pub fn busy(m: impl Into<String>, secs: u64) -> ApiError {
        ApiError { retry_after: Some(secs.max(1)), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m) }
    }
    /// 503: something it needs is unavailable (an offline pool).
    pub fn unavailable(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m)
    }
    /// 507: out of space (pool, disk or quota).
    pub fn no_space(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INSUFFICIENT_STORAGE, m)
    }
    /// 500: the appliance failed while doing `what` (shown to the client);
    /// `detail` (the internal error, paths and all) goes to the log only.
    pub fn internal(what: impl Into<String>, detail: impl std::fmt::Display) -> ApiError {
        ApiError { detail: Some(detail.to_string()), ..ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, what) }
    }
    /// This error with `detail` for the log (the client's message unchanged).
    pub fn with_detail(self, detail: impl std::fmt::Display) -> ApiError {
        ApiError { detail: Some(detail.to_string()), ..self }
    }
    /// The detail for the log, if any.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status.as_u16())
    }
}

impl From<keel_blockstore::Error> for ApiError {
    fn from(e: keel_blockstore::Error) -> ApiError {
        let status = match e.kind() {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::AlreadyExists | ErrorKind::ReadOnly | ErrorKind::Refused => StatusCode::CONFLICT,
            ErrorKind::Invalid | ErrorKind::OutOfRange => StatusCode::BAD_REQUEST,
            ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
            ErrorKind::Corrupt | ErrorKind::Format | ErrorKind::Io => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            return ApiError::internal("the block store failed", e);
        }
        ApiError::new(status, e.to_string())
    }
}

impl From<crate::db::Error> for ApiError {
    fn from(e: crate::db::Error) -> ApiError {
        match e {
            // etcd away: nothing was changed, and it is worth a retry.
            crate::db::Error::Unavailable(_) => ApiError::unavailable(format!("{e}: nothing was changed")),
            crate::db::Error::Contended(_) => ApiError::busy(e.to_string(), 1),
            _ => ApiError::internal("the metadata database failed", e),
        }
    }
}

/// Replace every absolute path in `text` (a word starting with `/`) by
/// `<path>`: for messages of outside programs (QEMU, qemu-img) that are
/// worth showing a client but name files of the host.
pub fn redact_paths(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_path = false;
    let mut prev = ' ';
    for c in text.chars() {
        if in_path {
            if c.is_whitespace() || "'\"`,;()[]{}".contains(c) {
                in_path = false;
                out.push(c);
            }
        } else if c == '/' && (prev.is_whitespace() || "'\"`=:,([{".contains(prev)) {
            in_path = true;
            out.push_str("<path>");
        } else {
            out.push(c);
        }
        prev = c;
    }
    out
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let id = request_id();
        let message = if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(request_id = %id, "{}: {}", self.message, self.detail.as_deref().unwrap_or("no detail"));
            format!(
                "{}: an internal error; the daemon's log has its detail under request id {id} (retry, or report \
                 it with that id)",
                self.message
            )
        } else {
            if let Some(d) = &self.detail {
                tracing::info!(request_id = %id, status = self.status.as_u16(), "{}: {d}", self.message);
            }
            self.message
        };
        let mut r =
            (self.status, axum::Json(serde_json::json!({ "error": message, "request_id": id }))).into_response();
        let h = r.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        if let Some(s) = self.retry_after {
            h.insert(axum::http::header::RETRY_AFTER, s.into());
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_statuses() {
        let s = |e: keel_blockstore::Error| ApiError::from(e).status.as_u16();
        assert_eq!(s(keel_blockstore::Error::NotFound("v".into())), 404);
        assert_eq!(s(keel_blockstore::Error::AlreadyExists("v".into())), 409);
        assert_eq!(s(keel_blockstore::Error::Invalid("x".into())), 400);
        assert_eq!(s(keel_blockstore::Error::Refused("x".into())), 409);
        assert_eq!(s(keel_blockstore::Error::NoSpace { free_blocks: 0, total_blocks: 1 }), 507);
        assert_eq!(s(keel_blockstore::Error::Corrupt { what: "x", block: 1 }), 500);
    }

    #[test]
    fn internal_errors_keep_their_detail_out_of_the_message() {
        let e = ApiError::internal("starting VM web", "/var/lib/keel/vms/web: Permission denied");
        assert_eq!(e.message, "starting VM web");
        assert!(e.detail().unwrap().contains("/var/lib/keel"));
    }

    #[test]
    fn paths_are_redacted() {
        assert_eq!(
            redact_paths("qemu: -drive file=/var/lib/keel/isos/x.iso,format=raw: Could not open '/dev/net/tun': No"),
            "qemu: -drive file=<path>,format=raw: Could not open '<path>': No"
        );
        assert_eq!(redact_paths("a/b and 1/2"), "a/b and 1/2");
    }
}
