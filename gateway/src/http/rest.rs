//! REST: nodes, items, publish (single and batch), retract, purge, and the OpenAPI document
//! generated from these handlers.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::{BufMut, Bytes, BytesMut};
use juxta_core::store::Appended;
use juxta_core::{Epoch, ItemId, NodeConfig, NodeInfo, NodeName, Origin, Payload, Publish};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

use super::extract::{Auth, ItemParams, JsonBody, NodeParam, Params};
use super::{ApiError, AppState};

/// Most items in one batch publish.
const MAX_BATCH_ITEMS: usize = 1000;
/// Default page size of item listings.
const DEFAULT_LIMIT: usize = 100;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/nodes", get(list_nodes))
        .route(
            "/nodes/{node}",
            put(put_node).get(get_node).delete(delete_node),
        )
        .route("/nodes/{node}/items", post(publish).get(list_items))
        .route("/nodes/{node}/items/{id}", get(get_item).delete(retract))
        .route("/nodes/{node}/purge", post(purge))
        .route("/publish", post(publish_batch))
        .route("/openapi.json", get(openapi))
        .route("/overlay", get(overlay))
}

/// This instance in the overlay.
#[derive(Serialize, ToSchema)]
pub(crate) struct OverlayView {
    /// The gateway's peer id.
    peer_id: String,
    /// Listen addresses, each ending in `/p2p/<peer id>` (dial these to bootstrap).
    listen: Vec<String>,
    /// Peer groups carried.
    groups: Vec<String>,
    /// Peers connected now.
    connected_peers: Vec<String>,
}

#[utoipa::path(get, path = "/api/v1/overlay", tag = "meta",
    responses((status = 200, body = OverlayView),
        (status = 404, description = "The overlay is disabled (`p2p.enabled = false`)", body = super::problem::Problem)),
    security(("bearer" = [])))]
async fn overlay(
    State(st): State<AppState>,
    Auth(_who): Auth,
) -> Result<Json<OverlayView>, ApiError> {
    let Some(info) = st.overlay.get() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "overlay_disabled",
            "the overlay is disabled on this gateway (p2p.enabled = false)",
        ));
    };
    let peers = info.overlay.connected_peers().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overlay_stopped",
            e.to_string(),
        )
    })?;
    Ok(Json(OverlayView {
        peer_id: info.overlay.local_peer_id().to_string(),
        listen: info.listening.iter().map(ToString::to_string).collect(),
        groups: info.groups.clone(),
        connected_peers: peers.iter().map(ToString::to_string).collect(),
    }))
}

/// A node: configuration and position.
#[derive(Serialize, ToSchema)]
pub(crate) struct NodeView {
    node: String,
    #[schema(value_type = Object)]
    config: NodeConfig,
    /// The history id; offsets are meaningful only with it.
    epoch: String,
    /// Offset of the newest event (0 before the first).
    last_offset: u64,
    /// Oldest offset still in history.
    first_offset: u64,
    item_count: u64,
    /// Live subscriptions on this instance.
    subscribers: usize,
    created_at: String,
}

impl From<NodeInfo> for NodeView {
    fn from(i: NodeInfo) -> Self {
        let m = i.meta;
        Self {
            node: m.name.to_string(),
            config: m.config,
            epoch: m.epoch.to_string(),
            last_offset: m.last_offset,
            first_offset: m.first_offset,
            item_count: m.item_count,
            subscribers: i.subscribers,
            created_at: juxta_core::time::rfc3339(m.created_at),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub(crate) struct NodeList {
    nodes: Vec<NodeView>,
}

/// Where a stored change landed.
#[derive(Serialize, ToSchema)]
pub(crate) struct PublishedView {
    node: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    offset: u64,
    epoch: String,
}

impl From<&Appended> for PublishedView {
    fn from(a: &Appended) -> Self {
        Self {
            node: a.node.to_string(),
            id: a.item_id.as_ref().map(ToString::to_string),
            offset: a.offset,
            epoch: a.epoch.to_string(),
        }
    }
}

/// An item to publish: `payload` (any JSON) or `xml` (one XML element), not both.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishBody {
    /// The item id; the service assigns one when absent. An existing id is overwritten.
    id: Option<String>,
    /// Any JSON value.
    #[schema(value_type = Object)]
    payload: Option<Box<RawValue>>,
    /// One XML element, e.g. `<entry xmlns='http://www.w3.org/2005/Atom'/>`.
    xml: Option<String>,
}

/// One item of a batch: a [`PublishBody`] plus its node.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchItem {
    node: String,
    id: Option<String>,
    #[schema(value_type = Object)]
    payload: Option<Box<RawValue>>,
    xml: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchBody {
    items: Vec<BatchItem>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ItemsQuery {
    /// Items with offsets above this one (default 0: from the start of history).
    after: Option<u64>,
    /// Most items to return (default 100, at most 1000).
    limit: Option<usize>,
    /// The epoch `after` belongs to; 409 `epoch_mismatch` when history was reset since.
    epoch: Option<String>,
}

/// The payload of a publish request, from its `payload` (JSON) or `xml` member.
pub(super) fn payload(
    raw: Option<Box<RawValue>>,
    xml: Option<String>,
) -> Result<Payload, ApiError> {
    match (raw, xml) {
        (Some(p), None) => {
            let text: Box<str> = p.into();
            Ok(Payload::json(Bytes::from(text.into_boxed_bytes()))?)
        }
        (None, Some(x)) => Ok(Payload::xml(Bytes::from(x))?),
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "give either `payload` or `xml`, not both",
        )),
        (None, None) => Err(ApiError::bad_request(
            "an item needs `payload` (JSON) or `xml`",
        )),
    }
}

fn item_id(id: Option<String>) -> Result<Option<ItemId>, ApiError> {
    Ok(id.map(|i| ItemId::new(&i)).transpose()?)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.to_owned())).map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_idempotency_key",
                "Idempotency-Key must be visible ASCII",
            )
        }),
    }
}

#[utoipa::path(get, path = "/api/v1/nodes", tag = "nodes",
    responses((status = 200, description = "Nodes the caller may read", body = NodeList)),
    security(("bearer" = [])))]
async fn list_nodes(
    State(st): State<AppState>,
    Auth(who): Auth,
) -> Result<Json<NodeList>, ApiError> {
    let nodes = st.bus.nodes(&who).await?;
    Ok(Json(NodeList {
        nodes: nodes.into_iter().map(NodeView::from).collect(),
    }))
}

#[utoipa::path(put, path = "/api/v1/nodes/{node}", tag = "nodes",
    params(("node" = String, Path, description = "Node name (percent-encode `/`)")),
    request_body(content = Object, description = "Node configuration: group, max_items, persist, access_model, publish_model, overflow (catch_up|drop|disconnect), deliver_payloads, notify_retract, title. An empty body means defaults."),
    responses((status = 201, description = "Created", body = NodeView), (status = 200, description = "Reconfigured", body = NodeView),
        (status = 400, description = "Invalid name or configuration", body = super::problem::Problem)),
    security(("bearer" = [])))]
async fn put_node(
    State(st): State<AppState>,
    Auth(who): Auth,
    NodeParam(node): NodeParam,
    JsonBody(config): JsonBody<NodeConfig>,
) -> Result<Response, ApiError> {
    let (meta, created) = st.bus.put_node(&who, node, config).await?;
    let subscribers = 0;
    let view = NodeView::from(NodeInfo { meta, subscribers });
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

#[utoipa::path(get, path = "/api/v1/nodes/{node}", tag = "nodes",
    params(("node" = String, Path, description = "Node name")),
    responses((status = 200, body = NodeView), (status = 404, description = "No such node", body = super::problem::Problem)),
    security(("bearer" = [])))]
async fn get_node(
    State(st): State<AppState>,
    Auth(who): Auth,
    NodeParam(node): NodeParam,
) -> Result<Json<NodeView>, ApiError> {
    Ok(Json(st.bus.node(&who, &node).await?.into()))
}

#[utoipa::path(delete, path = "/api/v1/nodes/{node}", tag = "nodes",
    params(("node" = String, Path, description = "Node name")),
    responses((status = 204, description = "Deleted; subscribers got a `deleted` event"), (status = 404, body = super::problem::Problem)),
    security(("bearer" = [])))]
async fn delete_node(
    State(st): State<AppState>,
    Auth(who): Auth,
    NodeParam(node): NodeParam,
) -> Result<StatusCode, ApiError> {
    st.bus.delete_node(&who, &node, Origin::Http).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn stored(a: &Appended) -> Response {
    let status = if a.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let mut resp = (status, Json(PublishedView::from(a))).into_response();
    if a.duplicate {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp
}

#[utoipa::path(post, path = "/api/v1/nodes/{node}/items", tag = "items",
    params(("node" = String, Path, description = "Node name"),
        ("Idempotency-Key" = Option<String>, Header, description = "A retry with the same key returns the first result and publishes nothing")),
    request_body = PublishBody,
    responses((status = 201, description = "Stored durably (and then fanned out)", body = PublishedView),
        (status = 200, description = "A replayed Idempotency-Key: the first result", body = PublishedView),
        (status = 404, body = super::problem::Problem), (status = 413, body = super::problem::Problem)),
    security(("bearer" = [])))]
async fn publish(
    State(st): State<AppState>,
    Auth(who): Auth,
    NodeParam(node): NodeParam,
    headers: HeaderMap,
    JsonBody(body): JsonBody<PublishBody>,
) -> Result<Response, ApiError> {
    let p = Publish {
        node,
        id: item_id(body.id)?,
        payload: payload(body.payload, body.xml)?,
        idempotency_key: idempotency_key(&headers)?,
    };
    let a = st.bus.publish(&who, p, Origin::Http).await?;
    Ok(stored(&a))
}

#[utoipa::path(post, path = "/api/v1/publish", tag = "items",
    request_body = BatchBody,
    responses((status = 200, description = "One result per item, in order: `{node,id,offset,epoch}` or `{error:{code,message}}`. All items that were accepted share one durable commit.", body = Object)),
    security(("bearer" = [])))]
async fn publish_batch(
    State(st): State<AppState>,
    Auth(who): Auth,
    JsonBody(body): JsonBody<BatchBody>,
) -> Result<Response, ApiError> {
    if body.items.len() > MAX_BATCH_ITEMS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_BATCH_ITEMS} items per batch"
        )));
    }
    let mut results: Vec<Option<serde_json::Value>> = Vec::with_capacity(body.items.len());
    let mut batch = Vec::new();
    for it in body.items {
        let parsed = (|| -> Result<Publish, ApiError> {
            Ok(Publish {
                node: NodeName::new(&it.node)?,
                id: item_id(it.id)?,
                payload: payload(it.payload, it.xml)?,
                idempotency_key: None,
            })
        })();
        match parsed {
            Ok(p) => {
                batch.push(p);
                results.push(None);
            }
            Err(e) => results.push(Some(error_json(e.code, &e.detail))),
        }
    }
    let mut stored = st
        .bus
        .publish_batch(&who, batch, Origin::Http)
        .await
        .into_iter();
    let results: Vec<serde_json::Value> = results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| match stored.next() {
                Some(Ok(a)) => serde_json::to_value(PublishedView::from(&a)).unwrap_or_default(),
                Some(Err(e)) => {
                    let e = ApiError::from(e);
                    error_json(e.code, &e.detail)
                }
                None => error_json("storage_error", "missing result"),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "results": results })).into_response())
}

fn error_json(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({ "error": { "code": code, "message": message } })
}

#[utoipa::path(get, path = "/api/v1/nodes/{node}/items", tag = "items",
    params(("node" = String, Path, description = "Node name"), ItemsQuery),
    responses((status = 200, description = "`{node, epoch, last_offset, items:[{id, offset, payload|xml, publisher, published_at}]}` in offset order", body = Object),
        (status = 400, description = "`offset_out_of_range`", body = super::problem::Problem),
        (status = 409, description = "`epoch_mismatch`", body = super::problem::Problem)),
    security(("bearer" = [])))]
async fn list_items(
    State(st): State<AppState>,
    Auth(who): Auth,
    NodeParam(node): NodeParam,
    Params(q): Params<ItemsQuery>,
) -> Result<Response, ApiError> {
    let epoch = q.epoch.map(|e| e.parse::<Epoch>()).transpose()?;
    let page = st
        .bus
        .items(
            &who,
            &node,
            q.after.unwrap_or(0),
            q.limit.unwrap_or(DEFAULT_LIMIT),
            epoch,
        )
        .await?;
    let mut body = BytesMut::with_capacity(
        256 + page
            .items
            .iter()
            .map(|(_, i)| i.payload.len() + 160)
            .sum::<usize>(),
    );
    body.put_slice(b"{\"node\":");
    body.put_slice(&serde_json::to_vec(node.as_str()).unwrap_or_default());
    body.put_slice(
        format!(
            ",\"epoch\":\"{}\",\"last_offset\":{},\"items\":[",
            page.meta.epoch, page.meta.last_offset
        )
        .as_bytes(),
    );
    for (i, (offset, item)) in page.items.iter().enumerate() {
        if i > 0 {
            body.put_u8(b',');
        }
        body.put_slice(&juxta_core::item_json(item, *offset));
    }
    body.put_slice(b"]}");
    Ok(([(header::CONTENT_TYPE, "application/json")], body.freeze()).into_response())
}

#[utoipa::path(get, path = "/api/v1/nodes/{node}/items/{id}", tag = "items",
    params(("node" = String, Path, description = "Node name"), ("id" = String, Path, description = "Item id")),
    responses((status = 200, description = "`{id, offset, payload|xml, publisher, published_at}`", body = Object), (status = 404, body = super::problem::Problem)),
    security(("bearer" = [])))]
async fn get_item(
    State(st): State<AppState>,
    Auth(who): Auth,
    ItemParams(node, id): ItemParams,
) -> Result<Response, ApiError> {
    let (offset, item) = st.bus.item(&who, &node, &id).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        juxta_core::item_json(&item, offset),
    )
        .into_response())
}

#[utoipa::path(delete, path = "/api/v1/nodes/{node}/items/{id}", tag = "items",
    params(("node" = String, Path, description = "Node name"), ("id" = String, Path, description = "Item id")),
    responses((status = 200, description = "Retracted; subscribers got a `retracted` event at this offset", body = PublishedView), (status = 404, body = super::problem::Problem)),
    security(("bearer" = [])))]
async fn retract(
    State(st): State<AppState>,
    Auth(who): Auth,
    ItemParams(node, id): ItemParams,
) -> Result<Json<PublishedView>, ApiError> {
    let a = st.bus.retract(&who, &node, id, Origin::Http).await?;
    Ok(Json(PublishedView::from(&a)))
}

#[utoipa::path(post, path = "/api/v1/nodes/{node}/purge", tag = "items",
    params(("node" = String, Path, description = "Node name")),
    responses((status = 200, description = "Purged; subscribers got a `purged` event at this offset", body = PublishedView), (status = 404, body = super::problem::Problem)),
    security(("bearer" = [])))]
async fn purge(
    State(st): State<AppState>,
    Auth(who): Auth,
    NodeParam(node): NodeParam,
) -> Result<Json<PublishedView>, ApiError> {
    let a = st.bus.purge(&who, &node, Origin::Http).await?;
    Ok(Json(PublishedView::from(&a)))
}

#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "This document")), security(("bearer" = [])))]
async fn openapi(Auth(_who): Auth) -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An admin key or a JWT whose `juxta` claim grants publish/subscribe patterns"))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document of the HTTP API.
#[derive(OpenApi)]
#[openapi(
    info(title = "juxta", description = "REST, WebSocket and SSE API of the juxta messaging gateway. \
        WebSocket: GET /api/v1/ws (subprotocol-free, JSON text frames; ops subscribe, unsubscribe, publish, ping). \
        SSE: GET /api/v1/nodes/{node}/events (Last-Event-ID `<epoch>:<offset>` or ?after= resumes)."),
    paths(list_nodes, put_node, get_node, delete_node, publish, publish_batch, list_items, get_item, retract, purge, openapi, overlay,
        super::ws::upgrade, super::sse::events,
        super::accounts::put_account, super::accounts::delete_account, super::accounts::list_accounts),
    components(schemas(NodeView, NodeList, OverlayView, PublishedView, PublishBody, BatchBody, BatchItem, super::problem::Problem,
        super::accounts::PasswordBody, super::accounts::AccountView, super::accounts::AccountList)),
    modifiers(&Security),
    tags((name = "nodes"), (name = "items"), (name = "streams"), (name = "accounts"), (name = "meta"))
)]
#[derive(Debug)]
pub struct ApiDoc;
