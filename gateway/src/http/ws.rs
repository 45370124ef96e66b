//! The WebSocket protocol at `/api/v1/ws`: JSON text frames.
//!
//! One task per connection polls the socket and all of its subscriptions. Deliveries are
//! written in batches — whatever is ready across subscriptions, up to [`MAX_WRITE_BATCH`]
//! frames — with one flush, so a busy connection costs one syscall per batch, not per event.
//! Each event's JSON is encoded once ([`juxta_core::Event::json`]) and shared by every
//! connection. A write that does not finish within `http.write_timeout_secs` means the
//! client stopped reading: it is disconnected, and its memory goes with it.

use std::pin::Pin;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::Stream;
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use hyper_util::rt::TokioIo;
use juxta_core::{
    Delivery, Epoch, Error, ItemId, NodeName, Origin, Principal, Publish, Resume, Subscription,
};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt as _;
use tokio_stream::StreamMap;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::{ApiError, AppState};
use crate::http::extract::StreamAuth;

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Read buffer per connection. Client frames are small; larger ones grow it on demand.
const READ_BUFFER: usize = 1024;
/// Hard cap on bytes tungstenite may buffer for replies (deliveries bypass it).
const MAX_WRITE_BUFFER: usize = 1 << 20;
/// A delivery buffer larger than this is released after its write instead of kept, so that
/// one burst does not pin memory on an idle connection.
const KEEP_OUT_BUFFER: usize = 16 * 1024;
/// Deliveries taken from one subscription per wake-up.
const SUB_BATCH: usize = 64;
/// Subscription chunks (each up to [`SUB_BATCH`] events) gathered into one write.
const MAX_WRITE_BATCH: usize = 64;

#[utoipa::path(get, path = "/api/v1/ws", tag = "streams",
    params(("token" = Option<String>, Query, description = "Admin key or JWT, for clients that cannot set the Authorization header")),
    responses((status = 101, description = "WebSocket. Client → server: {op: subscribe|unsubscribe|publish|ping, node, after?, epoch?, id?, payload|xml, ref?}. Server → client: {type: subscribed|event|published|unsubscribed|pong|error}."),
        (status = 401, body = super::problem::Problem)),
    security(("bearer" = [])))]
pub(super) async fn upgrade(
    State(st): State<AppState>,
    StreamAuth(who): StreamAuth,
    mut req: Request,
) -> Response {
    let key = match handshake_key(req.method(), req.headers()) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return ApiError::bad_request("this connection cannot be upgraded").into_response();
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let max = st.http.max_body_bytes;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let socket = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                Session::new(st, who, socket).run().await;
            }
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
        }
    });
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

/// Checks an RFC 6455 §4.2.1 opening handshake; returns `Sec-WebSocket-Key`.
pub(super) fn handshake_key(
    method: &axum::http::Method,
    headers: &HeaderMap,
) -> Result<String, ApiError> {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let bad = |why: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("expected a WebSocket upgrade: {why}"),
        )
    };
    if method != axum::http::Method::GET {
        return Err(bad("use GET"));
    }
    if !has(header::CONNECTION, "upgrade") || !has(header::UPGRADE, "websocket") {
        return Err(bad(
            "missing `Connection: upgrade` and `Upgrade: websocket`",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return Err(bad("`Sec-WebSocket-Version` must be 13"));
    }
    match headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
    {
        Some(k) if !k.is_empty() => Ok(k.to_owned()),
        _ => Err(bad("missing `Sec-WebSocket-Key`")),
    }
}

/// What a subscription's stream yields.
enum Chunk {
    Deliveries(Vec<Delivery>),
    Failed(Error),
}

type SubStream = Pin<Box<dyn Stream<Item = Chunk> + Send>>;

/// A subscription as a stream of batches: one awaited delivery plus whatever else is ready.
fn sub_stream(sub: Subscription) -> SubStream {
    Box::pin(futures_util::stream::unfold(
        Some(sub),
        |state| async move {
            let mut sub = state?;
            match sub.next().await {
                None => None,
                Some(Err(e)) => Some((Chunk::Failed(e), None)),
                Some(Ok(d)) => {
                    let mut batch = Vec::with_capacity(4);
                    batch.push(d);
                    while batch.len() < SUB_BATCH {
                        match sub.try_next() {
                            Some(d) => batch.push(d),
                            None => break,
                        }
                    }
                    Some((Chunk::Deliveries(batch), Some(sub)))
                }
            }
        },
    ))
}

/// A client message. Flat rather than tagged so that `payload` stays raw JSON.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientMsg {
    op: Option<String>,
    node: Option<String>,
    after: Option<u64>,
    epoch: Option<String>,
    id: Option<String>,
    payload: Option<Box<RawValue>>,
    xml: Option<String>,
    #[serde(rename = "ref")]
    reference: Option<Box<RawValue>>,
}

struct Session {
    st: AppState,
    who: Principal,
    socket: Socket,
    subs: StreamMap<NodeName, SubStream>,
    /// Encoded frames of the deliveries being written; released after a large burst.
    out: Vec<u8>,
    /// When deliveries were last written, for write coalescing.
    last_write: tokio::time::Instant,
}

fn text(v: serde_json::Value) -> Message {
    Message::text(v.to_string())
}

fn with_ref(mut v: serde_json::Value, r: &Option<Box<RawValue>>) -> serde_json::Value {
    if let (Some(r), Some(obj)) = (r, v.as_object_mut())
        && let Ok(val) = serde_json::from_str::<serde_json::Value>(r.get())
    {
        obj.insert("ref".into(), val);
    }
    v
}

fn error_msg(code: &str, message: impl std::fmt::Display, r: &Option<Box<RawValue>>) -> Message {
    text(with_ref(
        json!({"type": "error", "code": code, "message": message.to_string()}),
        r,
    ))
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

impl Session {
    fn new(st: AppState, who: Principal, socket: Socket) -> Self {
        Self {
            st,
            who,
            socket,
            subs: StreamMap::new(),
            out: Vec::new(),
            last_write: tokio::time::Instant::now(),
        }
    }

    async fn run(mut self) {
        self.st.metrics.ws_sessions.inc();
        let period = Duration::from_secs(self.st.http.keepalive_secs);
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        // A child token per session, created once: polling the shared token from every
        // session on every loop turn would make them all contend on its lock.
        let token = self.st.shutdown.child_token();
        let mut shutdown = std::pin::pin!(token.cancelled());
        loop {
            let go_on = tokio::select! {
                biased;
                _ = &mut shutdown => {
                    let bye = close(1001, "server shutting down");
                    let _ = tokio::time::timeout(Duration::from_secs(1), self.socket.send(bye)).await;
                    false
                }
                msg = self.socket.next() => match msg {
                    Some(Ok(m)) => self.on_message(m).await,
                    // Closed, or a protocol violation (tungstenite already answered it).
                    _ => false,
                },
                Some((node, chunk)) = self.subs.next(), if !self.subs.is_empty() => self.deliver(node, chunk).await,
                _ = keepalive.tick() => self.send(vec![Message::Ping(Bytes::new())]).await,
            };
            if !go_on {
                break;
            }
        }
        self.st.metrics.ws_sessions.dec();
    }

    /// Runs a write with the write timeout; only a write that cannot finish at once gets a
    /// timer. False when the client is gone or stalled.
    async fn timed<F>(
        metrics_stalled: &prometheus_client::metrics::counter::Counter,
        secs: u64,
        fut: F,
    ) -> bool
    where
        F: std::future::Future<Output = Result<(), ()>>,
    {
        let mut fut = std::pin::pin!(fut);
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await;
        let result = match first {
            std::task::Poll::Ready(r) => Ok(r),
            std::task::Poll::Pending => tokio::time::timeout(Duration::from_secs(secs), fut).await,
        };
        match result {
            Ok(Ok(())) => true,
            Ok(Err(())) => false,
            Err(_) => {
                metrics_stalled.inc();
                tracing::info!("disconnecting a WebSocket client that stopped reading");
                false
            }
        }
    }

    /// Sends protocol messages (replies, pings, close) through tungstenite.
    async fn send(&mut self, msgs: Vec<Message>) -> bool {
        let socket = &mut self.socket;
        let fut = async {
            for m in msgs {
                socket.feed(m).await.map_err(|_| ())?;
            }
            socket.flush().await.map_err(|_| ())
        };
        Self::timed(
            &self.st.metrics.stalled,
            self.st.http.write_timeout_secs,
            fut,
        )
        .await
    }

    /// Writes the encoded deliveries in `self.out` straight to the socket: each event's frame
    /// was encoded once for all subscribers, so a delivery is a copy, not a serialization.
    /// tungstenite's own buffer is flushed first, so frames never interleave.
    async fn write_out(&mut self) -> bool {
        let (socket, out) = (&mut self.socket, &self.out);
        let fut = async {
            socket.flush().await.map_err(|_| ())?;
            let io = socket.get_mut();
            io.write_all(out).await.map_err(|_| ())?;
            io.flush().await.map_err(|_| ())
        };
        let ok = Self::timed(
            &self.st.metrics.stalled,
            self.st.http.write_timeout_secs,
            fut,
        )
        .await;
        if self.out.capacity() > KEEP_OUT_BUFFER {
            self.out = Vec::new();
        } else {
            self.out.clear();
        }
        ok
    }

    /// Appends a chunk's frames to `self.out`; returns how many events it held and whether
    /// the connection must close after writing them.
    fn encode(&mut self, node: &NodeName, chunk: Chunk) -> (u64, bool) {
        match chunk {
            Chunk::Deliveries(batch) => {
                let mut n = 0;
                for d in batch {
                    match d {
                        Delivery::Event(ev) => {
                            n += 1;
                            self.out.extend_from_slice(ev.ws_frame());
                        }
                        Delivery::Lost { from, to } => {
                            let v = json!({
                                "type": "error", "code": "events_lost", "node": node.as_str(), "from": from, "to": to,
                                "message": format!("events {from}..={to} are no longer in history; they were missed"),
                            });
                            self.out.extend_from_slice(&juxta_core::ws_text_frame(
                                v.to_string().as_bytes(),
                            ));
                        }
                    }
                }
                (n, false)
            }
            Chunk::Failed(e) => {
                self.st.metrics.client_error(e.code());
                let slow = matches!(e, Error::SlowConsumer);
                let message = if slow {
                    "fell too far behind; reconnect and resubscribe with your last offset"
                        .to_owned()
                } else {
                    e.to_string()
                };
                let v = json!({"type": "error", "code": e.code(), "node": node.as_str(), "message": message});
                self.out
                    .extend_from_slice(&juxta_core::ws_text_frame(v.to_string().as_bytes()));
                (0, slow)
            }
        }
    }

    async fn deliver(&mut self, node: NodeName, chunk: Chunk) -> bool {
        let (mut delivered, mut close_after) = self.encode(&node, chunk);
        // At most one write per coalescing period: the first event after a quiet spell goes
        // out at once, while under load events gather into one write (see the config doc).
        let period = Duration::from_millis(self.st.http.write_coalesce_ms);
        let since = self.last_write.elapsed();
        if since < period && !close_after {
            tokio::time::sleep(period - since).await;
        }
        // Take whatever else is ready, without waiting. Polling with a no-op waker is fine
        // here: the select! loop polls the streams again with the task's waker before sleeping.
        let mut chunks = 1;
        while chunks < MAX_WRITE_BATCH && !close_after {
            match self.subs.next().now_or_never() {
                Some(Some((n, c))) => {
                    let (d, c) = self.encode(&n, c);
                    delivered += d;
                    close_after |= c;
                    chunks += 1;
                }
                _ => break,
            }
        }
        self.st.metrics.ws_deliveries.inc_by(delivered);
        self.last_write = tokio::time::Instant::now();
        let ok = self.write_out().await;
        if close_after {
            self.send(vec![close(1013, "slow consumer")]).await;
            return false;
        }
        ok
    }

    async fn on_message(&mut self, m: Message) -> bool {
        match m {
            Message::Text(t) => {
                let reply = self.on_text(t.as_str()).await;
                match reply {
                    Some(r) => self.send(vec![r]).await,
                    None => true,
                }
            }
            Message::Binary(_) => {
                self.st.metrics.client_error("unsupported_frame");
                let e = error_msg(
                    "unsupported_frame",
                    "binary frames are not supported; send JSON text frames",
                    &None,
                );
                self.send(vec![e]).await
            }
            Message::Close(_) => false,
            // tungstenite answers pings itself.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => true,
        }
    }

    /// Handles one client op; returns the reply to write, if any.
    async fn on_text(&mut self, t: &str) -> Option<Message> {
        let mut msg: ClientMsg = match serde_json::from_str(t) {
            Ok(m) => m,
            Err(e) => {
                let code = match e.classify() {
                    serde_json::error::Category::Data => "invalid_request",
                    _ => "invalid_json",
                };
                self.st.metrics.client_error(code);
                return Some(error_msg(code, e, &None));
            }
        };
        let reference = msg.reference.take();
        let r = &reference;
        let result = match msg.op.as_deref() {
            Some("subscribe") => self.subscribe(&msg).await,
            Some("unsubscribe") => self.unsubscribe(&msg),
            Some("publish") => self.publish(&mut msg).await,
            Some("ping") => Ok(json!({"type": "pong"})),
            Some(other) => Err(ApiError::bad_request(format!(
                "unknown op {other:?}; use subscribe, unsubscribe, publish or ping"
            ))),
            None => Err(ApiError::bad_request("missing `op`")),
        };
        Some(match result {
            Ok(v) => text(with_ref(v, r)),
            Err(e) => {
                self.st.metrics.client_error(e.code);
                let mut v = json!({"type": "error", "code": e.code, "message": e.detail});
                if let Some(n) = &msg.node {
                    v["node"] = json!(n);
                }
                text(with_ref(v, r))
            }
        })
    }

    fn node(msg: &ClientMsg) -> Result<NodeName, ApiError> {
        let n = msg
            .node
            .as_deref()
            .ok_or_else(|| ApiError::bad_request("missing `node`"))?;
        Ok(NodeName::new(n)?)
    }

    async fn subscribe(&mut self, msg: &ClientMsg) -> Result<serde_json::Value, ApiError> {
        let node = Self::node(msg)?;
        if self.subs.contains_key(&node) {
            return Err(ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "already_subscribed",
                format!("already subscribed to {node}"),
            ));
        }
        if self.subs.len() >= self.st.http.max_subscriptions_per_connection {
            return Err(ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "too_many_subscriptions",
                "this connection holds the most subscriptions allowed",
            ));
        }
        let epoch = msg.epoch.as_deref().map(str::parse::<Epoch>).transpose()?;
        let resume = Resume {
            after: msg.after,
            epoch,
        };
        let sub = self.st.bus.subscribe(&self.who, &node, resume).await?;
        let mut v = json!({
            "type": "subscribed", "node": node.as_str(), "epoch": sub.epoch().to_string(),
            "last_offset": sub.last_offset(), "recovered": sub.not_recovered().is_none(),
        });
        if let Some(why) = sub.not_recovered() {
            v["reason"] = json!(why.code());
        }
        self.subs.insert(node, sub_stream(sub));
        Ok(v)
    }

    fn unsubscribe(&mut self, msg: &ClientMsg) -> Result<serde_json::Value, ApiError> {
        let node = Self::node(msg)?;
        match self.subs.remove(&node) {
            Some(_) => Ok(json!({"type": "unsubscribed", "node": node.as_str()})),
            None => Err(ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_subscribed",
                format!("not subscribed to {node}"),
            )),
        }
    }

    async fn publish(&mut self, msg: &mut ClientMsg) -> Result<serde_json::Value, ApiError> {
        let node = Self::node(msg)?;
        let payload = super::rest::payload(msg.payload.take(), msg.xml.take())?;
        let p = Publish {
            node,
            id: msg.id.as_deref().map(ItemId::new).transpose()?,
            payload,
            idempotency_key: None,
        };
        let a = self.st.bus.publish(&self.who, p, Origin::Http).await?;
        Ok(json!({
            "type": "published", "node": a.node.as_str(), "offset": a.offset, "epoch": a.epoch.to_string(),
            "id": a.item_id.as_ref().map(ItemId::as_str),
        }))
    }
}
