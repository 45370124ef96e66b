//! XMPP over WebSocket (RFC 7395): the same c2s [`Session`] behind a WebSocket, as served at
//! the gateway's `GET /xmpp-websocket` (subprotocol `xmpp`).
//!
//! RFC 7395 replaces the one long XML document of a TCP stream with one complete element per
//! WebSocket message: `<open/>` and `<close/>` in the framing namespace stand for the stream
//! header and end, and every other message is a stanza or a negotiation element that
//! declares its own namespaces. [`Framing`] translates between the two shapes — client
//! messages become stream bytes for the session, the session's stream bytes become
//! messages — so negotiation, SASL, binding, routing and pubsub are the c2s server's own.
//! There is no STARTTLS: TLS belongs to the WebSocket's connection, so the stream is
//! treated as unencrypted and PLAIN is not offered; SCRAM is.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use juxta_core::Store;
use tokio_util::sync::CancellationToken;

use crate::c2s::{C2sConfig, Output, Session};
use crate::codec::{Decoder, Frame, Limits, StreamHeader};
use crate::element::Element;
use crate::error::{Condition, StreamError};
use crate::ns;
use crate::parse::parse_fragment;
use crate::server::{Core, ReadBudget, ServerConfig, Timeouts, random_token};
use crate::writer::{STREAM_END, WriteContext, stream_header};

/// The WebSocket subprotocol RFC 7395 registers.
pub const SUBPROTOCOL: &str = "xmpp";

/// Translates between RFC 7395 messages and the stream a [`Session`] reads and writes.
#[derive(Debug)]
pub struct Framing {
    /// Parses what the session writes, to cut it into messages.
    server: Decoder,
}

impl Default for Framing {
    fn default() -> Self {
        Self::new()
    }
}

impl Framing {
    /// A translator for one WebSocket.
    pub fn new() -> Self {
        Self {
            server: Decoder::new(Self::server_limits()),
        }
    }

    /// What the session writes is ours and already bounded; only a stanza must fit.
    fn server_limits() -> Limits {
        Limits {
            max_stanza_bytes: usize::MAX,
            max_depth: usize::MAX,
            max_attributes: usize::MAX,
            ..Limits::default()
        }
    }

    /// One text message from the client, as bytes for [`Session::handle_bytes`]; an error
    /// when it is not one well-formed element (for [`Session::transport_error`]).
    pub fn client_message(&mut self, text: &str) -> Result<Vec<u8>, StreamError> {
        let element = parse_fragment(text.trim_matches(|c: char| c.is_ascii_whitespace()))?;
        if element.is("stream", ns::STREAM) {
            return Err(StreamError::new(
                Condition::UnsupportedStanzaType,
                "RFC 7395 opens streams with <open/>, not <stream:stream>",
            ));
        }
        if element.ns() != ns::FRAMING {
            return Ok(element.to_bytes(WriteContext::stream(ns::JABBER_CLIENT)));
        }
        match element.name() {
            "open" => {
                // A new stream (the first, or a restart after SASL): the session answers
                // with a new header, which starts a new document on our side too.
                self.server = Decoder::new(Self::server_limits());
                let mut header = StreamHeader::new(ns::JABBER_CLIENT);
                header.to = element.attr("to").map(str::to_owned);
                header.from = element.attr("from").map(str::to_owned);
                header.version = element.attr("version").map(str::to_owned);
                header.lang = element.lang().map(str::to_owned);
                Ok(stream_header(&header))
            }
            "close" => Ok(STREAM_END.to_vec()),
            other => Err(StreamError::new(
                Condition::UnsupportedStanzaType,
                format!("<{other}/> is not an RFC 7395 framing element"),
            )),
        }
    }

    /// Bytes the session wrote, appended to `out` as complete messages: `<open/>` for a
    /// stream header, `<close/>` for its end, and each element standalone.
    pub fn server_bytes(&mut self, bytes: &[u8], out: &mut Vec<String>) {
        self.server.feed(bytes);
        loop {
            let frame = match self.server.next() {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(e) => {
                    // The session's own output always parses; if it ever did not, the
                    // client would get nothing more rather than half an element.
                    tracing::error!(error = %e, "xmpp-websocket: cannot frame the server's output");
                    return;
                }
            };
            let xml = match frame {
                Frame::StreamHeader(h) => {
                    let mut open = Element::builder("open", ns::FRAMING);
                    for (name, value) in [("from", &h.from), ("id", &h.id), ("version", &h.version)]
                    {
                        if let Some(value) = value {
                            open = open.attr(name, value.as_str());
                        }
                    }
                    if let Some(lang) = &h.lang {
                        open = open.attr_ns("lang", ns::XML, lang.as_str());
                    }
                    open.build().to_bytes(WriteContext::standalone())
                }
                Frame::Stanza(element) => element.to_bytes(WriteContext::standalone()),
                Frame::StreamEnd => {
                    Element::new("close", ns::FRAMING).to_bytes(WriteContext::standalone())
                }
            };
            // The writer produces UTF-8 from UTF-8 strings.
            out.push(String::from_utf8_lossy(&xml).into_owned());
        }
    }
}

/// A message the WebSocket delivered.
#[derive(Debug)]
pub enum WsMessage {
    /// A text message: one XML element.
    Text(String),
    /// A binary message, which RFC 7395 does not allow.
    Binary,
}

/// The WebSocket under an RFC 7395 session, as the HTTP front provides it.
pub trait WsTransport: Send {
    /// The next data message; `None` once the client closed or the connection failed.
    /// Must be cancel-safe: it is raced against the session's other work.
    fn recv(&mut self) -> impl Future<Output = Option<WsMessage>> + Send;
    /// Sends text messages, in order.
    fn send(&mut self, messages: Vec<String>) -> impl Future<Output = io::Result<()>> + Send;
    /// Closes the WebSocket.
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

/// Runs one RFC 7395 session over `ws` until either side ends it. `secret` is the
/// per-server key SCRAM uses for accounts that do not exist (keep it for the process's
/// life, as the TCP listener does).
pub async fn serve_websocket<T: WsTransport>(
    mut ws: T,
    peer: SocketAddr,
    config: ServerConfig,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    secret: [u8; 32],
) {
    let sessions = config.metrics.sessions.clone();
    sessions.inc();
    let mut c2s = C2sConfig::new(config.domain.clone());
    c2s.tls_available = false;
    c2s.tls_required = false;
    c2s.limits = config.limits;
    let mut session = match Session::new(c2s, Box::new(random_token), secret) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "xmpp-websocket: cannot start a session");
            sessions.dec();
            return;
        }
    };
    let mut framing = Framing::new();
    let mut core = Core {
        config: &config,
        store: &store,
        peer,
        bound: None,
    };
    let mut budget = ReadBudget::new(config.max_bytes_per_sec, tokio::time::Instant::now());
    let mut timeouts = Timeouts::new(&config);
    let timer = tokio::time::sleep_until(timeouts.handshake_deadline());
    tokio::pin!(timer);
    let shutdown = shutdown.cancelled_owned();
    tokio::pin!(shutdown);
    let mut shutting_down = false;
    let mut out: Vec<String> = Vec::new();
    loop {
        let mut close = false;
        while let Some(output) = session.poll_output() {
            match output {
                Output::Send(bytes) => {
                    config.metrics.bytes_out.inc_by(bytes.len() as u64);
                    framing.server_bytes(&bytes, &mut out);
                }
                // Never offered: the session knows TLS is not available here.
                Output::StartTls => close = true,
                Output::Close => close = true,
                other => Box::pin(core.handle(&mut session, other)).await,
            }
        }
        if !out.is_empty() && ws.send(std::mem::take(&mut out)).await.is_err() {
            break;
        }
        if close {
            ws.close().await;
            break;
        }
        let is_bound = core.bound.is_some();
        tokio::select! {
            _ = &mut shutdown, if !shutting_down => {
                shutting_down = true;
                session.shutdown();
            }
            q = core.queued() => match q {
                Some(first) => {
                    let mut bytes = Vec::with_capacity(4096);
                    core.gather(first, &mut bytes);
                    framing.server_bytes(&bytes, &mut out);
                }
                None => core.overloaded(&mut session),
            },
            m = ws.recv() => match m {
                None => break,
                Some(WsMessage::Binary) => session.transport_error(&StreamError::new(
                    Condition::UnsupportedStanzaType,
                    "RFC 7395 streams use text messages only",
                )),
                Some(WsMessage::Text(text)) => {
                    config.metrics.bytes_in.inc_by(text.len() as u64);
                    let now = tokio::time::Instant::now();
                    timeouts.read(now);
                    let wait = budget.spend(text.len(), now);
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    let failures = session.auth_failures();
                    match framing.client_message(&text) {
                        Ok(bytes) => session.handle_bytes(&bytes),
                        Err(e) => session.transport_error(&e),
                    }
                    config
                        .metrics
                        .auth_failures
                        .inc_by(u64::from(session.auth_failures() - failures));
                }
            },
            () = &mut timer, if !timeouts.expired() => {
                match timeouts.check(tokio::time::Instant::now(), is_bound) {
                    Some(deadline) => timer.as_mut().reset(deadline),
                    None => {
                        tracing::debug!(%peer, bound = is_bound, "xmpp-websocket: timed out");
                        session.timed_out();
                    }
                }
            }
        }
    }
    core.unregister();
    sessions.dec();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(framing: &mut Framing, text: &str) -> String {
        String::from_utf8(framing.client_message(text).expect("well-formed")).expect("utf-8")
    }

    #[test]
    fn open_and_close_become_the_stream_header_and_end() {
        let mut f = Framing::new();
        let header = client(
            &mut f,
            "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0' xml:lang='en'/>",
        );
        assert!(header.contains("<stream:stream"), "{header}");
        assert!(header.contains("xmlns='jabber:client'"), "{header}");
        assert!(header.contains("to='localhost'"), "{header}");
        assert!(header.contains("version='1.0'"), "{header}");
        assert!(header.contains("xml:lang='en'"), "{header}");
        assert_eq!(
            client(
                &mut f,
                "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>"
            ),
            "</stream:stream>"
        );
    }

    #[test]
    fn a_stanza_declaring_jabber_client_is_written_for_the_stream() {
        let mut f = Framing::new();
        assert_eq!(
            client(
                &mut f,
                " <iq xmlns='jabber:client' type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>\n"
            ),
            "<iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>"
        );
    }

    #[test]
    fn bad_messages_are_stream_errors() {
        let mut f = Framing::new();
        for (text, condition) in [
            ("<iq xmlns='jabber:client'", Condition::NotWellFormed),
            ("<a/><b/>", Condition::NotWellFormed),
            (
                "<stream xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>",
                Condition::UnsupportedStanzaType,
            ),
            (
                "<stream:stream xmlns:stream='http://etherx.jabber.org/streams'/>",
                Condition::UnsupportedStanzaType,
            ),
        ] {
            let got = f.client_message(text).map_err(|e| e.condition());
            assert_eq!(got, Err(condition), "{text}");
        }
    }

    #[test]
    fn server_output_is_cut_into_standalone_messages_however_it_is_split() {
        let stream = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
             xmlns:stream='http://etherx.jabber.org/streams' id='s1' from='localhost' \
             version='1.0' xml:lang='en'><stream:features><mechanisms \
             xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-1</mechanism>\
             </mechanisms></stream:features><message to='a@localhost'><body>hi &amp; bye</body>\
             </message></stream:stream>";
        let expected = vec![
            "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' from='localhost' id='s1' \
             version='1.0' xml:lang='en'/>"
                .to_owned(),
            "<stream:features xmlns:stream='http://etherx.jabber.org/streams'><mechanisms \
             xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-1</mechanism>\
             </mechanisms></stream:features>"
                .to_owned(),
            "<message xmlns='jabber:client' to='a@localhost'><body>hi &amp; bye</body></message>"
                .to_owned(),
            "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>".to_owned(),
        ];
        for split in [1, 7, 64, stream.len()] {
            let mut f = Framing::new();
            let mut out = Vec::new();
            for chunk in stream.as_bytes().chunks(split) {
                f.server_bytes(chunk, &mut out);
            }
            assert_eq!(out, expected, "split every {split} bytes");
        }
    }
}
