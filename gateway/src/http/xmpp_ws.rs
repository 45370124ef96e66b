//! `GET /xmpp-websocket`: XMPP over WebSocket (RFC 7395, subprotocol `xmpp`), the c2s
//! server's sessions behind the HTTP front; see `juxta_bridge_xmpp::websocket`.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt as _, StreamExt as _};
use hyper_util::rt::TokioIo;
use juxta_bridge_xmpp::websocket::{SUBPROTOCOL, WsMessage, WsTransport, serve_websocket};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::{ApiError, AppState};

/// The c2s settings and SCRAM key the WebSocket sessions share with the TCP listener.
pub struct XmppWebSocket {
    /// The c2s listener's settings.
    pub config: juxta_bridge_xmpp::server::ServerConfig,
    /// The per-server SCRAM key for unknown accounts.
    pub secret: [u8; 32],
}

impl std::fmt::Debug for XmppWebSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XmppWebSocket")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// tungstenite's socket as the session's transport; a send that the client does not take
/// within the HTTP write timeout fails.
struct Transport {
    socket: Socket,
    write_timeout: Duration,
}

impl WsTransport for Transport {
    async fn recv(&mut self) -> Option<WsMessage> {
        loop {
            match self.socket.next().await? {
                Ok(Message::Text(t)) => return Some(WsMessage::Text(t.as_str().to_owned())),
                Ok(Message::Binary(_)) => return Some(WsMessage::Binary),
                // tungstenite answers pings itself.
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Ok(Message::Close(_)) | Err(_) => return None,
            }
        }
    }

    async fn send(&mut self, messages: Vec<String>) -> io::Result<()> {
        let socket = &mut self.socket;
        let write = async {
            for m in messages {
                socket
                    .feed(Message::text(m))
                    .await
                    .map_err(io::Error::other)?;
            }
            socket.flush().await.map_err(io::Error::other)
        };
        tokio::time::timeout(self.write_timeout, write)
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
    }

    async fn close(&mut self) {
        let _ = tokio::time::timeout(self.write_timeout, self.socket.close(None)).await;
    }
}

/// Upgrades to an RFC 7395 session. The client must offer the `xmpp` subprotocol.
pub(super) async fn upgrade(State(st): State<AppState>, mut req: Request) -> Response {
    let Some(xmpp) = st.xmpp_websocket.get() else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "XMPP is disabled on this gateway (xmpp.enabled = false)",
        )
        .into_response();
    };
    let key = match super::ws::handshake_key(req.method(), req.headers()) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let offers_xmpp = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL);
    if !offers_xmpp {
        return ApiError::bad_request(
            "XMPP over WebSocket needs `Sec-WebSocket-Protocol: xmpp` (RFC 7395)",
        )
        .into_response();
    }
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return ApiError::bad_request("this connection cannot be upgraded").into_response();
    };
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.0);
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let max = xmpp.config.limits.max_stanza_bytes;
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let st2 = st.clone();
    tokio::spawn(async move {
        let Some(xmpp) = st2.xmpp_websocket.get() else {
            return;
        };
        match on_upgrade.await {
            Ok(upgraded) => {
                let socket = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(ws_config),
                )
                .await;
                let transport = Transport {
                    socket,
                    write_timeout: Duration::from_secs(st2.http.write_timeout_secs),
                };
                serve_websocket(
                    transport,
                    peer,
                    xmpp.config.clone(),
                    st2.bus.store().clone(),
                    st2.shutdown.child_token(),
                    xmpp.secret,
                )
                .await;
            }
            Err(e) => tracing::debug!(error = %e, "XMPP WebSocket upgrade failed"),
        }
    });
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}
