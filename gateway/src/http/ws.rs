//! The WebSocket protocol at `/api/v1/ws`: JSON text frames.
//!
//! One task per connection polls the socket and all of its subscriptions. Deliveries are
//! written in batches — whatever is ready across subscriptions, up to [`MAX_WRITE_BATCH`]
//! frames — with one flush, so a busy connection costs one syscall per batch, not per event.
//! Each event's JSON is encoded once ([`juxta_core::Event::json`]) and shared by every
//! connection. A write that does not finish within `http.write_timeout_secs` means the
//! client stopped reading: it is disconnected, and its memory goes with it.

use std::future::Future as _;
use std::pin::Pin;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{
    CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade,
    rejection::WebSocketUpgradeRejection,
};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::Stream;
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use juxta_core::{
    Delivery, Epoch, Error, ItemId, NodeName, Origin, Payload, Principal, Publish, Resume,
    Subscription,
};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio_stream::StreamMap;

use super::{ApiError, AppState};
use crate::http::extract::StreamAuth;

/// Read buffer per connection. Client frames are small; larger ones grow it on demand.
const READ_BUFFER: usize = 1024;
/// Bytes buffered before a write reaches the socket (batches small frames).
const WRITE_BUFFER: usize = 16 * 1024;
/// Hard cap on buffered outgoing bytes per connection.
const MAX_WRITE_BUFFER: usize = 8 << 20;
/// Deliveries taken from one subscription per wake-up.
const SUB_BATCH: usize = 64;
/// Frames written per flush.
const MAX_WRITE_BATCH: usize = 512;

#[utoipa::path(get, path = "/api/v1/ws", tag = "streams",
    params(("token" = Option<String>, Query, description = "Admin key or JWT, for clients that cannot set the Authorization header")),
    responses((status = 101, description = "WebSocket. Client → server: {op: subscribe|unsubscribe|publish|ping, node, after?, epoch?, id?, payload|xml, ref?}. Server → client: {type: subscribed|event|published|unsubscribed|pong|error}."),
        (status = 401, body = super::problem::Problem)),
    security(("bearer" = [])))]
pub(super) async fn upgrade(
    State(st): State<AppState>,
    StreamAuth(who): StreamAuth,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return ApiError::bad_request(format!("expected a WebSocket upgrade: {e}"))
                .into_response();
        }
    };
    let max = st.http.max_body_bytes;
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| Session::new(st, who, socket).run())
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
    socket: WebSocket,
    subs: StreamMap<NodeName, SubStream>,
    /// When deliveries were last written, for write coalescing.
    last_write: tokio::time::Instant,
}

fn text(v: serde_json::Value) -> Message {
    Message::Text(Utf8Bytes::from(v.to_string()))
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

fn delivery_msg(node: &NodeName, d: Delivery) -> Option<Message> {
    match d {
        Delivery::Event(ev) => match Utf8Bytes::try_from(ev.json().clone()) {
            Ok(t) => Some(Message::Text(t)),
            Err(_) => {
                tracing::error!(node = %node, offset = ev.offset, "event JSON is not UTF-8; skipped");
                None
            }
        },
        Delivery::Lost { from, to } => Some(text(json!({
            "type": "error", "code": "events_lost", "node": node.as_str(), "from": from, "to": to,
            "message": format!("events {from}..={to} are no longer in history; they were missed"),
        }))),
    }
}

impl Session {
    fn new(st: AppState, who: Principal, socket: WebSocket) -> Self {
        Self {
            st,
            who,
            socket,
            subs: StreamMap::new(),
            last_write: tokio::time::Instant::now(),
        }
    }

    async fn run(mut self) {
        self.st.metrics.ws_sessions.inc();
        let period = Duration::from_secs(self.st.http.keepalive_secs);
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        // Created once: registering with the token on every loop turn would make every
        // session contend on its lock.
        let token = self.st.shutdown.clone();
        let mut shutdown = std::pin::pin!(token.cancelled());
        loop {
            let go_on = tokio::select! {
                biased;
                _ = &mut shutdown => {
                    let bye = Message::Close(Some(CloseFrame { code: 1001, reason: "server shutting down".into() }));
                    let _ = tokio::time::timeout(Duration::from_secs(1), self.socket.send(bye)).await;
                    false
                }
                msg = self.socket.recv() => match msg {
                    Some(Ok(m)) => self.on_message(m).await,
                    // Closed, or a protocol violation (tungstenite already answered it).
                    _ => false,
                },
                Some((node, chunk)) = self.subs.next(), if !self.subs.is_empty() => self.deliver(node, chunk).await,
                _ = keepalive.tick() => self.write(vec![Message::Ping(Bytes::new())]).await,
            };
            if !go_on {
                break;
            }
        }
        self.st.metrics.ws_sessions.dec();
    }

    /// Writes `msgs` with one flush; false when the client is gone or stalled.
    async fn write(&mut self, msgs: Vec<Message>) -> bool {
        let socket = &mut self.socket;
        let mut fut = std::pin::pin!(async {
            for m in msgs {
                socket.feed(m).await?;
            }
            socket.flush().await
        });
        // Most writes finish at once; only one that has to wait gets a timer.
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await;
        let result = match first {
            std::task::Poll::Ready(r) => Ok(r),
            std::task::Poll::Pending => {
                tokio::time::timeout(Duration::from_secs(self.st.http.write_timeout_secs), fut)
                    .await
            }
        };
        match result {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false,
            Err(_) => {
                self.st.metrics.stalled.inc();
                tracing::info!("disconnecting a WebSocket client that stopped reading");
                false
            }
        }
    }

    /// Turns a chunk into frames; returns how many events it held and whether the
    /// connection must close after writing them.
    fn frames(&self, node: &NodeName, chunk: Chunk, msgs: &mut Vec<Message>) -> (u64, bool) {
        match chunk {
            Chunk::Deliveries(batch) => {
                let mut n = 0;
                for d in batch {
                    n += u64::from(matches!(d, Delivery::Event(_)));
                    msgs.extend(delivery_msg(node, d));
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
                msgs.push(text(json!({"type": "error", "code": e.code(), "node": node.as_str(), "message": message})));
                (0, slow)
            }
        }
    }

    async fn deliver(&mut self, node: NodeName, chunk: Chunk) -> bool {
        let mut msgs = Vec::with_capacity(16);
        let (mut delivered, mut close) = self.frames(&node, chunk, &mut msgs);
        // At most one write per coalescing period: the first event after a quiet spell goes
        // out at once, while under load events gather into one write (see the config doc).
        let period = Duration::from_millis(self.st.http.write_coalesce_ms);
        let since = self.last_write.elapsed();
        if since < period && !close {
            tokio::time::sleep(period - since).await;
        }
        // Take whatever else is ready, without waiting. Polling with a no-op waker is fine
        // here: the select! loop polls the streams again with the task's waker before sleeping.
        while msgs.len() < MAX_WRITE_BATCH && !close {
            match self.subs.next().now_or_never() {
                Some(Some((n, c))) => {
                    let (d, c) = self.frames(&n, c, &mut msgs);
                    delivered += d;
                    close |= c;
                }
                _ => break,
            }
        }
        self.st.metrics.ws_deliveries.inc_by(delivered);
        self.last_write = tokio::time::Instant::now();
        if close {
            msgs.push(Message::Close(Some(CloseFrame {
                code: 1013,
                reason: "slow consumer".into(),
            })));
        }
        self.write(msgs).await && !close
    }

    async fn on_message(&mut self, m: Message) -> bool {
        match m {
            Message::Text(t) => {
                let reply = self.on_text(t.as_str()).await;
                match reply {
                    Some(r) => self.write(vec![r]).await,
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
                self.write(vec![e]).await
            }
            Message::Close(_) => false,
            // tungstenite answers pings itself.
            Message::Ping(_) | Message::Pong(_) => true,
        }
    }

    /// Handles one client op; returns the reply to write, if any.
    async fn on_text(&mut self, t: &str) -> Option<Message> {
        let msg: ClientMsg = match serde_json::from_str(t) {
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
        let r = &msg.reference;
        let result = match msg.op.as_deref() {
            Some("subscribe") => self.subscribe(&msg).await,
            Some("unsubscribe") => self.unsubscribe(&msg),
            Some("publish") => self.publish(&msg).await,
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

    async fn publish(&mut self, msg: &ClientMsg) -> Result<serde_json::Value, ApiError> {
        let node = Self::node(msg)?;
        let payload = match (&msg.payload, &msg.xml) {
            (Some(p), None) => Payload::json(Bytes::copy_from_slice(p.get().as_bytes()))?,
            (None, Some(x)) => Payload::xml(Bytes::copy_from_slice(x.as_bytes()))?,
            _ => {
                return Err(ApiError::bad_request(
                    "publish needs exactly one of `payload` or `xml`",
                ));
            }
        };
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
