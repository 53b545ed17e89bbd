//! The error every API operation returns: an HTTP status and a message a
//! person can act on, sent as `{"error": "..."}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keel_blockstore::ErrorKind;

/// An API error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What failed and what to do.
    pub message: String,
}

/// Result alias of the service layer.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
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
    /// 507: out of space (pool, disk or quota).
    pub fn no_space(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INSUFFICIENT_STORAGE, m)
    }
    /// 500: the appliance failed.
    pub fn internal(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m)
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
            tracing::error!("block store: {e}");
        }
        ApiError::new(status, e.to_string())
    }
}

impl From<crate::db::Error> for ApiError {
    fn from(e: crate::db::Error) -> ApiError {
        tracing::error!("{e}");
        ApiError::internal(format!("{e}; see the daemon's log"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(serde_json::json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
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
}
