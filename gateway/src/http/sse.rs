//! Server-Sent Events at `/api/v1/nodes/{node}/events`.
//!
//! Frames are `id: <epoch>:<offset>`, `event: <kind>`, `data: <event JSON>`, encoded once per
//! event and shared ([`juxta_core::Event::sse_frame`]). A browser's EventSource resumes with
//! `Last-Event-ID` by itself; other clients may pass `?after=OFFSET&epoch=E`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use juxta_core::{Delivery, Epoch, Resume, Subscription};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::extract::{NodeParam, Params, StreamAuth};
use super::{ApiError, AppState};
use crate::metrics::HttpMetrics;

/// Deliveries taken per wake-up.
const BATCH: usize = 64;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct EventsQuery {
    /// Resume after this offset (ignored when `Last-Event-ID` is sent).
    after: Option<u64>,
    /// The epoch `after` belongs to.
    epoch: Option<String>,
    /// Admin key or JWT, for EventSource, which cannot set headers.
    #[allow(dead_code)]
    token: Option<String>,
}

fn parse_last_event_id(v: &str) -> Result<Resume, ApiError> {
    let bad = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_last_event_id",
            format!("Last-Event-ID must be <epoch>:<offset>, got {v:?}"),
        )
    };
    let (e, o) = v.trim().split_once(':').ok_or_else(bad)?;
    let epoch = e.parse::<Epoch>().map_err(|_| bad())?;
    let after = o.parse::<u64>().map_err(|_| bad())?;
    Ok(Resume {
        after: Some(after),
        epoch: Some(epoch),
    })
}

#[utoipa::path(get, path = "/api/v1/nodes/{node}/events", tag = "streams",
    params(("node" = String, Path, description = "Node name"), EventsQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "`<epoch>:<offset>` of the last event seen")),
    responses((status = 200, description = "text/event-stream: first `event: subscribed`, then events with `id: <epoch>:<offset>`; `event: error` with code `events_lost` when history no longer covers a gap", content_type = "text/event-stream"),
        (status = 400, body = super::problem::Problem), (status = 401, body = super::problem::Problem), (status = 404, body = super::problem::Problem)),
    security(("bearer" = [])))]
pub(super) async fn events(
    State(st): State<AppState>,
    StreamAuth(who): StreamAuth,
    NodeParam(node): NodeParam,
    Params(q): Params<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let resume = match headers.get("last-event-id") {
        Some(v) => parse_last_event_id(
            v.to_str()
                .map_err(|_| ApiError::bad_request("Last-Event-ID is not ASCII"))?,
        )?,
        None => Resume {
            after: q.after,
            epoch: q.epoch.as_deref().map(str::parse::<Epoch>).transpose()?,
        },
    };
    let sub = st.bus.subscribe(&who, &node, resume).await?;
    let mut hello = json!({
        "type": "subscribed", "node": node.as_str(), "epoch": sub.epoch().to_string(),
        "last_offset": sub.last_offset(), "recovered": sub.not_recovered().is_none(),
    });
    if let Some(why) = sub.not_recovered() {
        hello["reason"] = json!(why.code());
    }
    st.metrics.sse_streams.inc();
    let period = Duration::from_secs(st.http.keepalive_secs);
    let state = StreamState {
        sub,
        pending: VecDeque::from([Bytes::from(format!(
            "retry: 2000\nevent: subscribed\ndata: {hello}\n\n"
        ))]),
        keepalive: tokio::time::interval_at(tokio::time::Instant::now() + period, period),
        shutdown: Box::pin(st.shutdown.child_token().cancelled_owned()),
        metrics: st.metrics.clone(),
        coalesce: Duration::from_millis(st.http.write_coalesce_ms),
        last_batch: tokio::time::Instant::now(),
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        let next = s.next().await?;
        Some((Ok::<_, Infallible>(next), s))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

struct StreamState {
    sub: Subscription,
    pending: VecDeque<Bytes>,
    keepalive: tokio::time::Interval,
    /// Created once per stream, not per poll, so streams do not contend on the token.
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    metrics: Arc<HttpMetrics>,
    coalesce: Duration,
    last_batch: tokio::time::Instant,
    done: bool,
}

impl Drop for StreamState {
    fn drop(&mut self) {
        self.metrics.sse_streams.dec();
    }
}

fn frame(node: &str, d: Delivery) -> Bytes {
    match d {
        Delivery::Event(ev) => ev.sse_frame().clone(),
        Delivery::Lost { from, to } => {
            let v = json!({"type": "error", "code": "events_lost", "node": node, "from": from, "to": to,
                "message": format!("events {from}..={to} are no longer in history; they were missed")});
            Bytes::from(format!("event: error\ndata: {v}\n\n"))
        }
    }
}

impl StreamState {
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Some(b);
            }
            if self.done {
                return None;
            }
            tokio::select! {
                biased;
                _ = self.shutdown.as_mut() => return None,
                d = self.sub.next() => match d {
                    None => return None,
                    Some(Err(e)) => {
                        self.done = true;
                        let v = json!({"type": "error", "code": e.code(), "node": self.sub.node().as_str(), "message": e.to_string()});
                        self.pending.push_back(Bytes::from(format!("event: error\ndata: {v}\n\n")));
                    }
                    Some(Ok(d)) => {
                        let node = self.sub.node().clone();
                        let mut n = u64::from(matches!(d, Delivery::Event(_)));
                        self.pending.push_back(frame(node.as_str(), d));
                        // At most one batch per coalescing period (see the config doc).
                        let since = self.last_batch.elapsed();
                        if since < self.coalesce {
                            tokio::time::sleep(self.coalesce - since).await;
                        }
                        self.last_batch = tokio::time::Instant::now();
                        while self.pending.len() < BATCH {
                            let Some(d) = self.sub.try_next() else { break };
                            n += u64::from(matches!(d, Delivery::Event(_)));
                            self.pending.push_back(frame(node.as_str(), d));
                        }
                        self.metrics.sse_deliveries.inc_by(n);
                    }
                },
                _ = self.keepalive.tick() => return Some(Bytes::from_static(b": ping\n\n")),
            }
        }
    }
}
