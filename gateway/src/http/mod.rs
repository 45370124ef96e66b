//! The HTTP front: REST under `/api/v1`, the WebSocket and SSE streams, OpenAPI, metrics and
//! health.
//!
//! # Layout
//!
//! - [`problem`]: `application/problem+json` errors.
//! - [`extract`]: authentication and request extractors that answer with problems.
//! - `rest`: nodes, items, publish (single and batch), retract, purge, OpenAPI.
//! - `accounts`: XMPP accounts (SCRAM credentials derived here, passwords never stored).
//! - `ws`: the WebSocket protocol; `sse`: Server-Sent Events.
//! - [`xmpp_ws`]: XMPP over WebSocket (RFC 7395) at `/xmpp-websocket`.
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

mod accounts;
pub mod extract;
pub mod listener;
pub mod problem;
mod rest;
mod sse;
mod ws;
pub mod xmpp_ws;

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
    /// Set when XMPP is enabled: what `/xmpp-websocket` sessions share with the c2s
    /// listener.
    pub xmpp_websocket: std::sync::OnceLock<xmpp_ws::XmppWebSocket>,
    /// Set once the overlay is up: what `GET /api/v1/overlay` reports.
    pub overlay: std::sync::OnceLock<OverlayInfo>,
}

/// The running overlay, as `GET /api/v1/overlay` shows it.
#[derive(Clone, Debug)]
pub struct OverlayInfo {
    /// The overlay node.
    pub overlay: juxta_bridge_p2p::node::Overlay,
    /// Full listen addresses (with `/p2p/<peer id>`).
    pub listening: Vec<libp2p::Multiaddr>,
    /// Groups carried.
    pub groups: Vec<String>,
}

/// The state handlers get.
pub type AppState = Arc<Shared>;

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let api = rest::routes()
        .merge(accounts::routes())
        .route("/ws", get(ws::upgrade))
        .route("/nodes/{node}/events", get(sse::events))
        .layer(DefaultBodyLimit::max(state.http.max_body_bytes));
    Router::new()
        .nest("/api/v1", api)
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/xmpp-websocket", get(xmpp_ws::upgrade))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, Config};
    use crate::server::Gateway;
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use tower::ServiceExt as _;

    const KEY: &str = "test-admin-key-0123456789";

    fn app(dir: &tempfile::TempDir) -> Router {
        let mut cfg = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        cfg.store.backend = Backend::Memory;
        cfg.http.max_body_bytes = 4096;
        cfg.auth.admin_keys = vec![KEY.into()];
        let gw = Gateway::build(&cfg, CancellationToken::new()).expect("builds");
        router(gw.shared)
    }

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        body: &str,
        auth: bool,
    ) -> (StatusCode, String, serde_json::Value) {
        let mut req = HttpRequest::builder().method(method).uri(uri);
        if auth {
            req = req.header("authorization", format!("Bearer {KEY}"));
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::from(body.to_owned())).expect("request"))
            .await
            .expect("infallible");
        let status = resp.status();
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("").to_owned())
            .unwrap_or_default();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (
            status,
            ctype,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    #[tokio::test]
    async fn errors_are_problem_json_with_stable_codes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(&dir);
        let (s, ct, v) = call(&app, "GET", "/nope", "", true).await;
        assert_eq!(
            (s, ct.as_str(), v["code"].as_str()),
            (
                StatusCode::NOT_FOUND,
                "application/problem+json",
                Some("not_found")
            )
        );
        let (s, _, v) = call(&app, "GET", "/api/v1/nodes", "", false).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("missing_token"))
        );
        let (s, _, v) = call(&app, "PUT", "/api/v1/nodes/a%20b", "", true).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_node_name"))
        );
        let (s, _, v) = call(
            &app,
            "POST",
            "/api/v1/nodes/missing/items",
            r#"{"payload":1}"#,
            true,
        )
        .await;
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("node_not_found"))
        );
        let big = format!(r#"{{"payload":"{}"}}"#, "x".repeat(5000));
        call(&app, "PUT", "/api/v1/nodes/n", "", true).await;
        let (s, _, v) = call(&app, "POST", "/api/v1/nodes/n/items", &big, true).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large"))
        );
        let (s, _, v) = call(
            &app,
            "PUT",
            "/api/v1/nodes/n",
            r#"{"max_items":"many"}"#,
            true,
        )
        .await;
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request"))
        );
    }

    #[tokio::test]
    async fn nodes_and_items_round_trip_through_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(&dir);
        let (s, _, v) = call(
            &app,
            "PUT",
            "/api/v1/nodes/sensors%2Ftemp-7",
            r#"{"max_items":10}"#,
            true,
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
        assert_eq!(v["node"], "sensors/temp-7");
        let (s, _, _) = call(
            &app,
            "PUT",
            "/api/v1/nodes/sensors%2Ftemp-7",
            r#"{"max_items":10}"#,
            true,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let (s, _, v) = call(
            &app,
            "POST",
            "/api/v1/nodes/sensors%2Ftemp-7/items",
            r#"{"id":"a","payload":{"c":21.5}}"#,
            true,
        )
        .await;
        assert_eq!(
            (s, v["offset"].as_u64(), v["id"].as_str()),
            (StatusCode::CREATED, Some(1), Some("a"))
        );
        let (s, _, v) = call(
            &app,
            "POST",
            "/api/v1/nodes/sensors%2Ftemp-7/items",
            r#"{"xml":"<x xmlns='u'/>"}"#,
            true,
        )
        .await;
        assert_eq!((s, v["offset"].as_u64()), (StatusCode::CREATED, Some(2)));
        let (s, _, v) = call(
            &app,
            "GET",
            "/api/v1/nodes/sensors%2Ftemp-7/items?after=0",
            "",
            true,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["items"][0]["payload"]["c"], 21.5);
        assert_eq!(v["items"][1]["xml"], "<x xmlns='u'/>");
        let (s, _, v) = call(
            &app,
            "GET",
            "/api/v1/nodes/sensors%2Ftemp-7/items?after=9",
            "",
            true,
        )
        .await;
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("offset_out_of_range"))
        );
        let (s, _, v) = call(
            &app,
            "DELETE",
            "/api/v1/nodes/sensors%2Ftemp-7/items/a",
            "",
            true,
        )
        .await;
        assert_eq!((s, v["offset"].as_u64()), (StatusCode::OK, Some(3)));
        let (s, _, v) = call(
            &app,
            "GET",
            "/api/v1/nodes/sensors%2Ftemp-7/items/a",
            "",
            true,
        )
        .await;
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("item_not_found"))
        );
        let (_, _, v) = call(
            &app,
            "POST",
            "/api/v1/publish",
            r#"{"items":[{"node":"sensors/temp-7","payload":1},{"node":"bad name","payload":2}]}"#,
            true,
        )
        .await;
        assert_eq!(v["results"][0]["offset"], 4);
        assert_eq!(v["results"][1]["error"]["code"], "invalid_node_name");
    }

    #[tokio::test]
    async fn the_openapi_document_describes_the_api() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(&dir);
        let (s, _, v) = call(&app, "GET", "/api/v1/openapi.json", "", true).await;
        assert_eq!(s, StatusCode::OK);
        assert!(
            v["openapi"].as_str().is_some_and(|o| o.starts_with("3.1")),
            "{}",
            v["openapi"]
        );
        for path in [
            "/api/v1/nodes/{node}/items",
            "/api/v1/ws",
            "/api/v1/nodes/{node}/events",
            "/api/v1/publish",
        ] {
            assert!(v["paths"].get(path).is_some(), "{path} is documented");
        }
    }
}
