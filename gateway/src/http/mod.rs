//! The HTTP front: REST under `/api/v1`, the WebSocket and SSE streams, OpenAPI, metrics and
//! health.
//!
//! # Layout
//!
//! - [`problem`]: `application/problem+json` errors.
//! - [`extract`]: authentication and request extractors that answer with problems.
//! - `rest`: nodes, items, publish (single and batch), retract, purge, OpenAPI.
//! - `ws`: the WebSocket protocol; `sse`: Server-Sent Events.
//! - [`listener`]: the connection limit, taken before `accept`.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use juxta_core::Bus;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::HttpConfig;
use crate::metrics::{HttpMetrics, RequestLabels};

pub mod extract;
pub mod listener;
pub mod problem;
mod rest;
mod sse;
mod ws;

pub use listener::LimitedListener;
pub use problem::ApiError;
pub use rest::ApiDoc;

/// What every handler shares.
#[derive(Debug)]
pub struct Shared {
    /// The bus.
    pub bus: Bus,
    /// Credentials.
    pub auth: Authenticator,
    /// The HTTP front's metrics.
    pub metrics: Arc<HttpMetrics>,
    /// The registry `/metrics` renders.
    pub registry: Arc<Registry>,
    /// Limits and timeouts.
    pub http: HttpConfig,
    /// Cancelled on SIGTERM: streams say goodbye and end.
    pub shutdown: CancellationToken,
}

/// The state handlers get.
pub type AppState = Arc<Shared>;

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let api = rest::routes()
        .route("/ws", get(ws::upgrade))
        .route("/nodes/{node}/events", get(sse::events))
        .layer(DefaultBodyLimit::max(state.http.max_body_bytes));
    Router::new()
        .nest("/api/v1", api)
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed here",
            )
        })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

async fn count_requests(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    st.metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route: route.clone(),
            status,
        })
        .inc();
    tracing::debug!(
        route,
        status,
        took_us = started.elapsed().as_micros() as u64,
        "request"
    );
    resp
}

async fn metrics(State(st): State<AppState>) -> Response {
    let mut out = String::with_capacity(16 * 1024);
    match prometheus_client::encoding::text::encode(&mut out, &st.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn readyz(State(st): State<AppState>) -> Response {
    let store = st.bus.store().ready();
    let shutting_down = st.shutdown.is_cancelled();
    let ok = store.is_ok() && !shutting_down;
    let body = serde_json::json!({
        "status": if ok { "ready" } else { "not_ready" },
        "checks": {
            "store": match &store { Ok(()) => "ok".to_owned(), Err(e) => e.to_string() },
            "http": if shutting_down { "shutting_down" } else { "ok" },
        }
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}
