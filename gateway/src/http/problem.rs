//! `application/problem+json` errors (RFC 9457) with a stable `code` member.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::AuthError;

/// An error as the HTTP API reports it. Client errors say what was wrong; server errors say
/// little and the cause is logged.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// What went wrong, for humans.
    pub detail: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Problem<'a> {
    /// `urn:juxta:problem:<code>`.
    #[serde(rename = "type")]
    pub(crate) kind: String,
    /// The status's reason phrase.
    pub(crate) title: &'a str,
    /// The HTTP status.
    pub(crate) status: u16,
    /// What went wrong.
    pub(crate) detail: &'a str,
    /// Stable machine-readable code.
    pub(crate) code: &'a str,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
        }
    }

    /// 400 `invalid_request`.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", detail)
    }

    /// 404 `not_found`.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
    }

    /// A JSON body that did not parse.
    pub fn from_json(e: &serde_json::Error) -> Self {
        match e.classify() {
            serde_json::error::Category::Data => Self::bad_request(e.to_string()),
            _ => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("invalid JSON: {e}"),
            ),
        }
    }
}

impl From<juxta_core::Error> for ApiError {
    fn from(e: juxta_core::Error) -> Self {
        use juxta_core::Error as E;
        let status = match &e {
            E::NodeNotFound(_) | E::ItemNotFound(_) | E::AccountNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            E::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            E::EpochMismatch { .. } | E::SlowConsumer | E::EpochChanged { .. } => {
                StatusCode::CONFLICT
            }
            E::Forbidden(_) => StatusCode::FORBIDDEN,
            E::Unavailable(_) | E::EngineUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        let detail =
            if e.is_client_error() || matches!(e, E::Unavailable(_) | E::EngineUnavailable(_)) {
                e.to_string()
            } else {
                tracing::error!(error = %e, "request failed");
                "internal error; see the server log".to_owned()
            };
        Self::new(status, e.code(), detail)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, e.code(), e.message())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Problem {
            kind: format!("urn:juxta:problem:{}", self.code),
            title: self.status.canonical_reason().unwrap_or("Error"),
            status: self.status.as_u16(),
            detail: &self.detail,
            code: self.code,
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"juxta\""),
            );
        }
        resp
    }
}
