//! Extractors that answer with problem+json instead of axum's plain-text rejections.

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use bytes::Bytes;
use juxta_core::{ItemId, NodeName, Principal};
use serde::de::DeserializeOwned;

use super::{ApiError, AppState};

fn bearer(parts: &Parts) -> Option<&str> {
    let h = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = h.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// The caller, from `Authorization: Bearer`.
#[derive(Debug)]
pub struct Auth(pub Principal);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        Ok(Auth(st.auth.authenticate(bearer(parts))?))
    }
}

/// The caller, from `Authorization: Bearer` or a `token` query parameter (for WebSocket and
/// EventSource clients, which cannot set headers).
#[derive(Debug)]
pub struct StreamAuth(pub Principal);

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

impl FromRequestParts<AppState> for StreamAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        if let Some(b) = bearer(parts) {
            return Ok(StreamAuth(st.auth.authenticate(Some(b))?));
        }
        let q: Option<TokenQuery> = parts.uri.query().and_then(token_from_query);
        Ok(StreamAuth(st.auth.authenticate(
            q.as_ref().and_then(|q| q.token.as_deref()),
        )?))
    }
}

fn token_from_query(q: &str) -> Option<TokenQuery> {
    Query::<TokenQuery>::try_from_uri(&format!("/?{q}").parse().ok()?)
        .ok()
        .map(|Query(t)| t)
}

/// The `{node}` path parameter, checked.
#[derive(Debug)]
pub struct NodeParam(pub NodeName);

impl<S: Send + Sync> FromRequestParts<S> for NodeParam {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, ApiError> {
        let Path(node) = Path::<String>::from_request_parts(parts, st)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        Ok(NodeParam(NodeName::new(&node)?))
    }
}

/// The `{node}` and `{id}` path parameters, checked.
#[derive(Debug)]
pub struct ItemParams(pub NodeName, pub ItemId);

impl<S: Send + Sync> FromRequestParts<S> for ItemParams {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, ApiError> {
        let Path((node, id)) = Path::<(String, String)>::from_request_parts(parts, st)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        Ok(ItemParams(NodeName::new(&node)?, ItemId::new(&id)?))
    }
}

/// Query parameters, with problems for bad ones.
#[derive(Debug)]
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, ApiError> {
        let Query(q) = Query::<T>::from_request_parts(parts, st)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        Ok(Params(q))
    }
}

/// A JSON body. Any content type is accepted (so `curl -d` works); size is limited by
/// `http.max_body_bytes`. An empty body reads as `{}` when `T` allows it.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, st: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, st).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "the request body is too large",
                )
            } else {
                ApiError::bad_request(e.body_text())
            }
        })?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::from_json(&e))
    }
}
