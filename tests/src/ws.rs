//! A client for the `/api/v1/ws` protocol built on tokio-tungstenite.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::RECV_TIMEOUT;
use crate::api::encode_path_segment;

/// One WebSocket connection to `/api/v1/ws`.
#[derive(Debug)]
pub struct WsClient {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    /// Connects to `ws_url` (`ws://127.0.0.1:PORT/api/v1/ws`) with `?token=`.
    pub async fn connect(ws_url: &str, token: &str) -> Result<Self> {
        match Self::try_connect(ws_url, Some(token), false, None).await? {
            Ok(client) => Ok(client),
            Err(status) => bail!("WebSocket upgrade to {ws_url} refused with HTTP {status}"),
        }
    }

    /// Connects with the token in an `Authorization: Bearer` header instead of the query.
    pub async fn connect_with_header(ws_url: &str, token: &str) -> Result<Self> {
        match Self::try_connect(ws_url, Some(token), true, None).await? {
            Ok(client) => Ok(client),
            Err(status) => bail!("WebSocket upgrade to {ws_url} refused with HTTP {status}"),
        }
    }

    /// Attempts the upgrade: `Ok(Ok(client))` when it was accepted, `Ok(Err(status))` when the
    /// server answered the handshake with a non-101 HTTP status (401, 403, …), `Err` for
    /// transport failures. `config` tunes buffers (the load tool uses small ones).
    pub async fn try_connect(
        ws_url: &str,
        token: Option<&str>,
        as_header: bool,
        config: Option<WebSocketConfig>,
    ) -> Result<std::result::Result<Self, u16>> {
        let url = match token {
            Some(token) if !as_header => {
                format!("{ws_url}?token={}", encode_path_segment(token))
            }
            _ => ws_url.to_owned(),
        };
        let mut request = url
            .as_str()
            .into_client_request()
            .with_context(|| format!("building a WebSocket request for {ws_url}"))?;
        if let (Some(token), true) = (token, as_header) {
            request.headers_mut().insert(
                "authorization",
                format!("Bearer {token}")
                    .parse()
                    .context("token is not a valid header value")?,
            );
        }
        match tokio_tungstenite::connect_async_with_config(request, config, true).await {
            Ok((stream, _response)) => Ok(Ok(Self { stream })),
            Err(tungstenite::Error::Http(response)) => Ok(Err(response.status().as_u16())),
            Err(e) => Err(anyhow!(e).context(format!("connecting to {ws_url}"))),
        }
    }

    /// Sends one JSON object as a text frame.
    pub async fn send_json(&mut self, value: &Value) -> Result<()> {
        self.send_text(&value.to_string()).await
    }

    /// Sends a text frame as is (garbage included).
    pub async fn send_text(&mut self, text: &str) -> Result<()> {
        self.stream
            .send(Message::text(text))
            .await
            .context("sending a text frame")
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.stream
            .send(Message::binary(bytes))
            .await
            .context("sending a binary frame")
    }

    /// The next text frame parsed as JSON, waiting at most [`RECV_TIMEOUT`]. Control frames are
    /// skipped; a close frame, a binary frame or the end of the stream is an error.
    pub async fn recv(&mut self) -> Result<Value> {
        self.recv_within(RECV_TIMEOUT).await
    }

    /// Like [`WsClient::recv`] with an explicit timeout.
    pub async fn recv_within(&mut self, limit: Duration) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let next = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .map_err(|_| anyhow!("no WebSocket message within {limit:?}"))?;
            match next {
                None => bail!("the WebSocket stream ended"),
                Some(Err(e)) => return Err(anyhow!(e).context("reading the WebSocket")),
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(text.as_str())
                        .with_context(|| format!("server sent non-JSON text: {text}"));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    bail!("the server closed the WebSocket: {frame:?}")
                }
                Some(Ok(Message::Binary(bytes))) => {
                    bail!("the server sent a binary frame of {} bytes", bytes.len())
                }
            }
        }
    }

    /// The next message whose `type` is `kind` (e.g. `"event"`), failing on anything else.
    pub async fn recv_type(&mut self, kind: &str) -> Result<Value> {
        let msg = self.recv().await?;
        ensure!(
            msg.get("type").and_then(Value::as_str) == Some(kind),
            "expected a `{kind}` message, got {msg}"
        );
        Ok(msg)
    }

    /// Sends `{"op":"subscribe",...}` and returns the server's answer (`subscribed` or `error`).
    pub async fn subscribe(
        &mut self,
        node: &str,
        after: Option<u64>,
        epoch: Option<&str>,
    ) -> Result<Value> {
        let mut op = json!({ "op": "subscribe", "node": node, "ref": format!("sub-{node}") });
        if let Some(after) = after {
            op["after"] = json!(after);
        }
        if let Some(epoch) = epoch {
            op["epoch"] = json!(epoch);
        }
        self.send_json(&op).await?;
        self.recv().await
    }

    /// [`WsClient::subscribe`] that fails unless the answer is `subscribed`.
    pub async fn subscribed(
        &mut self,
        node: &str,
        after: Option<u64>,
        epoch: Option<&str>,
    ) -> Result<Value> {
        let answer = self.subscribe(node, after, epoch).await?;
        ensure!(
            answer.get("type").and_then(Value::as_str) == Some("subscribed"),
            "subscribe to {node} answered {answer}"
        );
        ensure!(
            answer.get("ref").and_then(Value::as_str) == Some(&format!("sub-{node}")),
            "subscribed without our ref: {answer}"
        );
        Ok(answer)
    }

    /// `{"op":"ping","ref":R}` answered with `{"type":"pong","ref":R}`.
    pub async fn ping(&mut self, reference: &str) -> Result<()> {
        self.send_json(&json!({ "op": "ping", "ref": reference }))
            .await?;
        let pong = self.recv().await?;
        ensure!(
            pong.get("type").and_then(Value::as_str) == Some("pong")
                && pong.get("ref").and_then(Value::as_str) == Some(reference),
            "expected pong {reference}, got {pong}"
        );
        Ok(())
    }

    /// The next `event` message, failing on anything else.
    pub async fn next_event(&mut self) -> Result<Value> {
        self.recv_type("event").await
    }

    /// The next `n` events (failing on any other message).
    pub async fn events(&mut self, n: usize) -> Result<Vec<Value>> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            out.push(
                self.next_event()
                    .await
                    .with_context(|| format!("waiting for event {} of {n}", i + 1))?,
            );
        }
        Ok(out)
    }

    /// Sends a close frame and waits (briefly) for the server's.
    pub async fn close(mut self) -> Result<()> {
        self.stream.close(None).await.context("closing")?;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.stream.next().await {}
        })
        .await;
        Ok(())
    }

    /// The raw stream, for callers that want to drive it themselves (the load tool).
    pub fn into_inner(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.stream
    }
}
