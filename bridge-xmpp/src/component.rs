//! XEP-0114: Jabber Component Protocol, the component's side of the "accept" method: juxta
//! connects out to an existing XMPP server (Prosody, ejabberd, Openfire) that is configured
//! with a component address (e.g. `pubsub.example.org`) and a shared secret. The server then
//! routes every stanza addressed to that domain (and to `node@` and `/resource` forms of it)
//! over the stream, and delivers what the component sends to its own users and beyond.
//!
//! [`Session`] is the protocol without I/O, in the style of [`c2s::Session`](crate::c2s):
//! the driver feeds it what it reads ([`Session::handle_bytes`]) and drains [`Output`]s with
//! [`Session::poll_output`] after every call. [`run`] is the tokio driver: it connects,
//! hands stanzas to a [`StanzaHandler`] and writes what is queued on the stream's [`Link`],
//! and reconnects with capped, jittered exponential backoff whenever the stream ends.
//!
//! # Steps (XEP-0114 §3)
//!
//! 1. **Header**: we open `<stream:stream xmlns='jabber:component:accept'
//!    to='pubsub.example.org'>`. The `to` is the component's name, not the server's. There is
//!    no `version`: the protocol predates RFC 6120's stream features and servers send none.
//! 2. **Handshake**: the server answers with its own header, whose `id` we need; we send
//!    `<handshake>` with the lowercase hex SHA-1 of the stream id followed by the secret
//!    ([`handshake_digest`]). A header without an id cannot be answered: the next frame is
//!    awaited (Prosody sends an empty id right before a stream error), and anything but a
//!    stream error then ends the stream.
//! 3. **Authenticated**: the server answers with an empty `<handshake/>`
//!    ([`Output::Authenticated`]). A stream error instead ends the session with
//!    [`ComponentError::Refused`]: Prosody says `not-authorized` for a wrong secret,
//!    `host-unknown` when no component of that name is configured and `conflict` when one is
//!    already connected.
//! 4. **Ready**: stanzas both ways. Incoming stanzas must be `iq`, `message` or `presence`
//!    (else `unsupported-stanza-type`) in `jabber:component:accept` or `jabber:client` (else
//!    `invalid-namespace`); these end the stream because the server broke the protocol. A
//!    single bad stanza does not: one that cannot be parsed is answered with the stanza error
//!    of RFC 6120 §8.3 (`jid-malformed` for a bad address, `bad-request` otherwise); one not
//!    addressed to the component's domain (or a subdomain of it) is answered with
//!    `service-unavailable` sent from the component's own address (Prosody closes a
//!    component stream that sends from a foreign domain, `invalid-from`); one without `from`
//!    cannot be answered and is dropped. Errors and iq results are never answered (RFC 6120
//!    §8.3.1, §8.2.3). All of these are counted ([`Session::rejected`]). Valid stanzas are
//!    passed out as [`Output::Stanza`]; the stream's `from` check is what makes their `from`
//!    trustworthy (the server stamps it).
//!
//! The improper-addressing of a stanza is only a *stream* error in RFC 6120 (§4.9.3.7);
//! closing the component's stream for one stanza would cut the service off for every user of
//! the server, so the session answers with stanza errors instead.
//!
//! A stream error or `</stream:stream>` from the server, a protocol violation, a timeout or
//! [`Session::shutdown`] ends the session: our closing bytes are returned as [`Output::Send`],
//! then [`Output::Close`] says why.
//!
//! # What the handler must answer
//!
//! The session answers nothing on the component's behalf: XEP-0199 pings and XEP-0030 disco
//! queries to the component's address reach the [`StanzaHandler`] like any other stanza, and
//! the handler (the pubsub service) answers them. This keeps one place that knows what the
//! component is.
//!
//! # Transport
//!
//! Plain TCP, as XEP-0114 defines it: run the component on the same host or a trusted network
//! as the server (Prosody listens on `127.0.0.1:5347` by default); the secret is never sent in
//! clear, but the stanzas are.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::codec::{Decoder, Frame, Limits, StreamHeader};
use crate::element::Element;
use crate::error::{Condition, StreamError};
use crate::jid::Jid;
use crate::link::{Link, LinkQueue, Outbound, StanzaHandler};
use crate::metrics::Metrics;
use crate::ns;
use crate::stanza::{Stanza, StanzaError};
use crate::writer::{STREAM_END, WriteContext, stream_error, stream_header};

/// Default for [`ComponentConfig::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`ComponentConfig::keepalive_interval`].
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// Default for [`ComponentConfig::reconnect_initial`].
pub const DEFAULT_RECONNECT_INITIAL: Duration = Duration::from_secs(1);
/// Default for [`ComponentConfig::reconnect_max`].
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(60);
/// Default for [`ComponentConfig::link_capacity`]: larger than a client's
/// ([`crate::link::DEFAULT_LINK_CAPACITY`]) because one component stream carries the
/// notifications for every user of the server.
pub const DEFAULT_COMPONENT_LINK_CAPACITY: usize = 8192;

/// Bytes per socket read.
const READ_CHUNK: usize = 8192;
/// Most bytes gathered from the link's queue into one write; bounds the write buffer.
const MAX_WRITE_BATCH: usize = 256 * 1024;
/// A write buffer larger than this is given back after use.
const RETAINED_WRITE_CAPACITY: usize = 64 * 1024;
/// How long closing may take: writing the last bytes and waiting for the server's
/// `</stream:stream>` (RFC 6120 §4.4).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// A stream that stayed authenticated this long resets the backoff: the next failure is
/// retried after [`ComponentConfig::reconnect_initial`] again.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// The value of `<handshake/>` (XEP-0114 §3): the SHA-1 of the stream id the server sent
/// followed by the shared secret, as lowercase hex.
///
/// ```
/// use juxta_bridge_xmpp::component::handshake_digest;
///
/// // SHA-1 of "3BF96D32sNiglet" (the stream id of XEP-0114's example).
/// assert_eq!(
///     handshake_digest("3BF96D32", "sNiglet"),
///     "1b3555c427a7dd93e689388096404a111c4026e7"
/// );
/// ```
pub fn handshake_digest(stream_id: &str, secret: &str) -> String {
    let mut hasher = Sha1::new();
    hasher.update(stream_id.as_bytes());
    hasher.update(secret.as_bytes());
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why a component stream ended (or never came up).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ComponentError {
    /// The TCP connection to the server could not be made.
    #[error("cannot connect to the XMPP server at {server}: {source}")]
    Connect {
        /// The configured `host:port`.
        server: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading or writing failed, or the server dropped the connection without ending the
    /// stream.
    #[error("the connection to the XMPP server failed: {0}")]
    Io(#[from] io::Error),
    /// The server refused the component before accepting its handshake, with this stream
    /// error (see the [module documentation](self) for what servers send when).
    #[error(
        "the XMPP server refused the component: {condition}{}{}",
        text_suffix(.text.as_deref()),
        refusal_hint(.condition)
    )]
    Refused {
        /// The stream error condition, e.g. `not-authorized`.
        condition: String,
        /// The server's `<text/>`, if any.
        text: Option<String>,
    },
    /// After the handshake, the server ended the stream with this stream error (e.g.
    /// `conflict` when another instance took over, `system-shutdown`).
    #[error(
        "the XMPP server ended the component stream: {condition}{}",
        text_suffix(.text.as_deref())
    )]
    StreamError {
        /// The stream error condition.
        condition: String,
        /// The server's `<text/>`, if any.
        text: Option<String>,
    },
    /// The server ended the stream with `</stream:stream>`.
    #[error("the XMPP server closed the component stream")]
    Closed,
    /// The server broke the protocol; we ended the stream with this stream error.
    #[error("the XMPP server broke the component protocol: {0}")]
    Protocol(StreamError),
    /// Nothing arrived in time; the stream was ended with `connection-timeout`.
    #[error("timed out waiting for {0} from the XMPP server")]
    Timeout(&'static str),
    /// The server read too slowly and the stream's outbound queue overflowed; the stream was
    /// ended with `policy-violation` (see [`Link`]).
    #[error("the XMPP server did not keep up with the component's outbound stanzas")]
    Overloaded,
}

fn text_suffix(text: Option<&str>) -> String {
    text.map(|t| format!(" ({t})")).unwrap_or_default()
}

fn refusal_hint(condition: &str) -> &'static str {
    match condition {
        "not-authorized" => "; check that the component secret matches the server's",
        "host-unknown" => "; check that the server has a component with this JID",
        "conflict" => "; another connection already serves this component",
        _ => "",
    }
}

/// Something the driver must do, drained with [`Session::poll_output`] in order.
#[derive(Debug)]
pub enum Output {
    /// Write these bytes to the connection.
    Send(Vec<u8>),
    /// The server accepted the handshake: stanzas can flow.
    Authenticated,
    /// A stanza for the component, addressed to its domain and with a `from` (boxed: it is
    /// much larger than the other variants).
    Stanza(Box<Stanza>),
    /// Write the bytes already returned and close the connection. `None` after
    /// [`Session::shutdown`], else why the stream ended.
    Close(Option<ComponentError>),
}

/// The step the session is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Our header was sent; waiting for the server's.
    Header,
    /// Waiting for the server's `<handshake/>`; `sent` is false when the server's header had
    /// no id, so no handshake could be sent.
    Handshake { sent: bool },
    /// Authenticated.
    Ready,
    /// The stream is over.
    Closed,
}

/// One component stream, from our header to the close; see the [module documentation](self).
pub struct Session {
    jid: Jid,
    secret: String,
    decoder: Decoder,
    state: State,
    rejected: u64,
    /// Drained by the driver after every input; what one input adds is bounded by that
    /// input's size.
    outputs: VecDeque<Output>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("jid", &self.jid)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session for the component `jid` (a domain JID; only its domainpart is used)
    /// authenticating with `secret`. Our stream header is the first output.
    pub fn new(jid: &Jid, secret: impl Into<String>, limits: Limits) -> Self {
        let jid = jid.bare();
        let header = StreamHeader {
            to: Some(jid.domain().to_owned()),
            ..StreamHeader::new(ns::JABBER_COMPONENT_ACCEPT)
        };
        let mut session = Self {
            jid,
            secret: secret.into(),
            decoder: Decoder::new(limits),
            state: State::Header,
            rejected: 0,
            outputs: VecDeque::new(),
        };
        session.send(stream_header(&header));
        session
    }

    /// The next thing for the driver to do, in order; `None` when there is nothing.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Whether the server accepted the handshake and the stream is still open.
    pub fn is_authenticated(&self) -> bool {
        self.state == State::Ready
    }

    /// Whether the stream is over ([`Output::Close`] was emitted).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// How many incoming stanzas were refused so far (unparseable, misaddressed, no `from`).
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Bytes read from the connection. Ignored after the stream closed.
    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        if self.is_closed() {
            return;
        }
        self.decoder.feed(bytes);
        while !self.is_closed() {
            match self.decoder.next() {
                Ok(None) => return,
                Ok(Some(frame)) => self.handle_frame(frame),
                Err(error) => {
                    self.fail(error.condition(), ComponentError::Protocol(error));
                    return;
                }
            }
        }
    }

    /// Ends the stream in order (we shut down): `</stream:stream>` and [`Output::Close`]
    /// with no error.
    pub fn shutdown(&mut self) {
        if !self.is_closed() {
            self.send(STREAM_END.to_vec());
            self.close(None);
        }
    }

    /// Ends the stream because the server stayed silent too long during the handshake:
    /// `connection-timeout` and [`ComponentError::Timeout`].
    pub fn timed_out(&mut self) {
        let waiting_for = match self.state {
            State::Header => "the stream header",
            State::Handshake { sent: false } => "a stream id",
            State::Handshake { sent: true } => "the handshake answer",
            State::Ready => "data",
            State::Closed => return,
        };
        self.fail(
            Condition::ConnectionTimeout,
            ComponentError::Timeout(waiting_for),
        );
    }

    /// Ends the stream because its outbound queue overflowed: `policy-violation` and
    /// [`ComponentError::Overloaded`].
    pub fn overloaded(&mut self) {
        if !self.is_closed() {
            self.fail(Condition::PolicyViolation, ComponentError::Overloaded);
        }
    }

    fn handle_frame(&mut self, frame: Frame) {
        match (self.state, frame) {
            (State::Header, Frame::StreamHeader(header)) => self.handle_header(&header),
            (_, Frame::StreamEnd) => {
                self.send(STREAM_END.to_vec());
                self.close(Some(ComponentError::Closed));
            }
            (State::Handshake { .. } | State::Ready, Frame::Stanza(element))
                if element.is("error", ns::STREAM) =>
            {
                let (condition, text) = stream_error_parts(&element);
                let error = if self.state == State::Ready {
                    ComponentError::StreamError { condition, text }
                } else {
                    ComponentError::Refused { condition, text }
                };
                // RFC 6120 §4.9.1.1: the stream is over; we close our side.
                self.send(STREAM_END.to_vec());
                self.close(Some(error));
            }
            (State::Handshake { sent: true }, Frame::Stanza(element))
                if element.is("handshake", ns::JABBER_COMPONENT_ACCEPT) =>
            {
                self.state = State::Ready;
                self.outputs.push_back(Output::Authenticated);
            }
            (State::Handshake { sent: false }, Frame::Stanza(_)) => self.fail(
                Condition::BadFormat,
                ComponentError::Protocol(StreamError::new(
                    Condition::BadFormat,
                    "the server's stream header has no id to compute the handshake from",
                )),
            ),
            (State::Handshake { sent: true }, Frame::Stanza(_)) => self.fail(
                Condition::NotAuthorized,
                ComponentError::Protocol(StreamError::new(
                    Condition::NotAuthorized,
                    "the server sent a stanza before accepting the handshake",
                )),
            ),
            (State::Ready, Frame::Stanza(element)) => self.incoming(element),
            // The decoder reports exactly one header, before any stanza.
            (State::Header, Frame::Stanza(_))
            | (State::Handshake { .. } | State::Ready, Frame::StreamHeader(_))
            | (State::Closed, _) => self.fail(
                Condition::InternalServerError,
                ComponentError::Protocol(StreamError::new(
                    Condition::InternalServerError,
                    "unexpected frame order",
                )),
            ),
        }
    }

    /// Step 2: the server's header gives the stream id the handshake is computed from.
    fn handle_header(&mut self, header: &StreamHeader) {
        if header.default_ns != ns::JABBER_COMPONENT_ACCEPT {
            self.fail(
                Condition::InvalidNamespace,
                ComponentError::Protocol(StreamError::new(
                    Condition::InvalidNamespace,
                    "the server's stream is not in jabber:component:accept",
                )),
            );
            return;
        }
        match header.id.as_deref().filter(|id| !id.is_empty()) {
            Some(id) => {
                let digest = handshake_digest(id, &self.secret);
                let handshake = Element::builder("handshake", ns::JABBER_COMPONENT_ACCEPT)
                    .append(digest)
                    .build();
                self.send_element(&handshake);
                self.state = State::Handshake { sent: true };
            }
            None => self.state = State::Handshake { sent: false },
        }
    }

    /// Step 4: a stanza from the server.
    fn incoming(&mut self, element: Element) {
        if !matches!(element.name(), "iq" | "message" | "presence") {
            self.fail(
                Condition::UnsupportedStanzaType,
                ComponentError::Protocol(StreamError::new(
                    Condition::UnsupportedStanzaType,
                    "the server sent a top-level element that is not a stanza",
                )),
            );
            return;
        }
        if element.ns() != ns::JABBER_COMPONENT_ACCEPT && element.ns() != ns::JABBER_CLIENT {
            self.fail(
                Condition::InvalidNamespace,
                ComponentError::Protocol(StreamError::new(
                    Condition::InvalidNamespace,
                    "the server sent a stanza in an unknown namespace",
                )),
            );
            return;
        }
        let stanza = match Stanza::try_from(&element) {
            Ok(stanza) => stanza,
            Err(error) => {
                self.reject(&element, Some(error.to_stanza_error()));
                return;
            }
        };
        let (from, to) = match &stanza {
            Stanza::Iq(iq) => (&iq.from, &iq.to),
            Stanza::Message(message) => (&message.from, &message.to),
            Stanza::Presence(presence) => (&presence.from, &presence.to),
        };
        if from.is_none() {
            // XEP-0114 §3: the server stamps `from`; without one there is no one to answer.
            self.reject(&element, None);
            return;
        }
        if !to.as_ref().is_some_and(|to| self.is_ours(to)) {
            let error = StanzaError::service_unavailable()
                .with_text(format!("this component serves {} only", self.jid.domain()));
            self.reject(&element, Some(error));
            return;
        }
        self.outputs.push_back(Output::Stanza(Box::new(stanza)));
    }

    /// Whether `to` is the component's domain, a subdomain of it, or a `node@`/`/resource`
    /// of either.
    fn is_ours(&self, to: &Jid) -> bool {
        let ours = self.jid.domain();
        let domain = to.domain();
        domain == ours
            || domain
                .strip_suffix(ours)
                .is_some_and(|rest| rest.ends_with('.'))
    }

    /// Counts a refused stanza and answers it with `error` when it can be answered: it has a
    /// `from`, and is neither an error nor an iq result. The answer comes from the stanza's
    /// `to` if that is ours, else from the component's domain.
    fn reject(&mut self, element: &Element, error: Option<StanzaError>) {
        self.rejected += 1;
        let answerable = element.attr("from").is_some()
            && element.attr("type") != Some("error")
            && !(element.name() == "iq" && element.attr("type") == Some("result"));
        let Some(error) = error.filter(|_| answerable) else {
            return;
        };
        let mut reply = error.reply_to(element);
        let to_is_ours = element
            .attr("to")
            .and_then(|to| to.parse::<Jid>().ok())
            .is_some_and(|to| self.is_ours(&to));
        if !to_is_ours {
            reply.set_attr("from", self.jid.domain());
        }
        self.send_element(&reply);
    }

    fn send_element(&mut self, element: &Element) {
        let mut bytes = Vec::new();
        element.write_to(
            &mut bytes,
            WriteContext::stream(ns::JABBER_COMPONENT_ACCEPT),
        );
        self.send(bytes);
    }

    /// Queues bytes, joined to the previous [`Output::Send`] if it is the last output.
    fn send(&mut self, bytes: Vec<u8>) {
        if let Some(Output::Send(last)) = self.outputs.back_mut() {
            last.extend_from_slice(&bytes);
        } else {
            self.outputs.push_back(Output::Send(bytes));
        }
    }

    /// A stream error, the end of our stream and [`Output::Close`] with `error`.
    fn fail(&mut self, condition: Condition, error: ComponentError) {
        self.send(stream_error(condition, None));
        self.send(STREAM_END.to_vec());
        self.close(Some(error));
    }

    fn close(&mut self, error: Option<ComponentError>) {
        self.state = State::Closed;
        self.outputs.push_back(Output::Close(error));
    }
}

/// The condition and text of a `<stream:error/>` (RFC 6120 §4.9.2).
fn stream_error_parts(element: &Element) -> (String, Option<String>) {
    let condition = element
        .children()
        .find(|child| child.ns() == ns::STREAMS && child.name() != "text")
        .map_or_else(|| "undefined-condition".to_owned(), |c| c.name().to_owned());
    let text = element
        .get_child("text", ns::STREAMS)
        .map(Element::text)
        .filter(|text| !text.is_empty());
    (condition, text)
}

/// How [`run`] connects and keeps the component stream.
#[derive(Clone)]
pub struct ComponentConfig {
    /// The server's component port as `host:port` (Prosody's default is 5347, usually on
    /// `127.0.0.1`). Resolved again on every connection attempt.
    pub server: String,
    /// The component's address, a domain JID such as `pubsub.example.org`; the server must
    /// have a component of this name.
    pub jid: Jid,
    /// The secret shared with the server (Prosody's `component_secret`). Never logged.
    pub secret: String,
    /// Stanza size, depth and attribute limits on what the server sends.
    pub limits: Limits,
    /// How many stanzas may wait for the socket before the stream counts as overloaded and
    /// is closed (see [`Link`]); bounds the memory one slow server can pin.
    pub link_capacity: usize,
    /// Time allowed from the start of the TCP connect to the server's `<handshake/>`.
    pub handshake_timeout: Duration,
    /// After this long without writing, a single space is sent (RFC 6120 §4.6.1), so that a
    /// dead connection is noticed and idle-closing middleboxes keep it open.
    pub keepalive_interval: Duration,
    /// The wait before the first reconnection attempt; it doubles after each failure.
    pub reconnect_initial: Duration,
    /// The longest wait between reconnection attempts. Each wait is jittered down by up to
    /// half, so that many instances do not reconnect in lockstep.
    pub reconnect_max: Duration,
}

impl fmt::Debug for ComponentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ComponentConfig")
            .field("server", &self.server)
            .field("jid", &self.jid)
            .field("secret", &"<redacted>")
            .field("limits", &self.limits)
            .field("link_capacity", &self.link_capacity)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("reconnect_initial", &self.reconnect_initial)
            .field("reconnect_max", &self.reconnect_max)
            .finish()
    }
}

/// Why a [`ComponentConfig`] cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ComponentConfigError {
    /// `server` is not `host:port`.
    #[error("the component server address must be host:port")]
    InvalidServer,
    /// `jid` has a localpart or a resourcepart.
    #[error("the component JID must be a domain, such as pubsub.example.org")]
    NotADomain,
    /// `secret` is empty.
    #[error("the component secret is empty")]
    EmptySecret,
    /// A capacity or duration is zero, or the backoff's initial wait exceeds its maximum.
    #[error("{0} must be positive")]
    Zero(&'static str),
    /// `reconnect_initial` is longer than `reconnect_max`.
    #[error("reconnect_initial must not exceed reconnect_max")]
    Backoff,
}

impl ComponentConfig {
    /// A component `jid` at `server` (`host:port`) with `secret`, and the defaults:
    /// [`Limits::default`], [`DEFAULT_COMPONENT_LINK_CAPACITY`],
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`], [`DEFAULT_KEEPALIVE_INTERVAL`],
    /// [`DEFAULT_RECONNECT_INITIAL`] and [`DEFAULT_RECONNECT_MAX`].
    pub fn new(server: impl Into<String>, jid: Jid, secret: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            jid,
            secret: secret.into(),
            limits: Limits::default(),
            link_capacity: DEFAULT_COMPONENT_LINK_CAPACITY,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            reconnect_initial: DEFAULT_RECONNECT_INITIAL,
            reconnect_max: DEFAULT_RECONNECT_MAX,
        }
    }

    /// Checks what [`run`] needs; call it when building from configuration, so that a
    /// mistake stops the start instead of a log line later.
    pub fn validate(&self) -> Result<(), ComponentConfigError> {
        let port_ok = self
            .server
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(ComponentConfigError::InvalidServer);
        }
        if self.jid.local().is_some() || self.jid.resource().is_some() {
            return Err(ComponentConfigError::NotADomain);
        }
        if self.secret.is_empty() {
            return Err(ComponentConfigError::EmptySecret);
        }
        let positive = [
            ("link_capacity", self.link_capacity > 0),
            ("handshake_timeout", !self.handshake_timeout.is_zero()),
            ("keepalive_interval", !self.keepalive_interval.is_zero()),
            ("reconnect_initial", !self.reconnect_initial.is_zero()),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, ok)| !ok) {
            return Err(ComponentConfigError::Zero(name));
        }
        if self.reconnect_initial > self.reconnect_max {
            return Err(ComponentConfigError::Backoff);
        }
        Ok(())
    }
}

/// Exponential backoff with a cap and "equal jitter": each wait is a random duration between
/// half and all of `min(initial · 2^failures, max)`.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            failures: 0,
        }
    }

    /// The wait before the next attempt; `random` is uniform in `[0, 1)`.
    fn next_delay(&mut self, random: f64) -> Duration {
        let factor = 1u32 << self.failures.min(20);
        let base = self.initial.saturating_mul(factor).min(self.max);
        self.failures = self.failures.saturating_add(1);
        base.mul_f64(0.5 + random.clamp(0.0, 1.0) / 2.0)
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Keeps the component stream of `config` up until `shutdown` is cancelled: connects,
/// authenticates, calls [`StanzaHandler::attached`] with the stream's [`Link`], passes every
/// incoming stanza to [`StanzaHandler::handle`] (one at a time, in order: a slow handler
/// slows reading, not memory), writes what is queued on the link, and calls
/// [`StanzaHandler::detached`] when the stream ends. Then it waits (capped, jittered
/// exponential backoff, see [`ComponentConfig`]) and connects again; failures are logged and
/// counted in `metrics`, never fatal. On shutdown the stream is ended with
/// `</stream:stream>` before this returns.
///
/// An invalid `config` ([`ComponentConfig::validate`]) is logged and returns at once.
pub async fn run(
    config: ComponentConfig,
    handler: Arc<dyn StanzaHandler>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    if let Err(error) = config.validate() {
        tracing::error!(%error, "xmpp component: invalid configuration; not connecting");
        return;
    }
    let mut backoff = Backoff::new(config.reconnect_initial, config.reconnect_max);
    loop {
        match connect_once(&config, &handler, &metrics, &shutdown).await {
            Attempt::Shutdown => return,
            Attempt::Failed { error, up_for } => {
                if up_for.is_some_and(|up| up >= STABLE_AFTER) {
                    backoff.reset();
                }
                let delay = backoff.next_delay(rand::random());
                tracing::warn!(
                    server = %config.server,
                    jid = %config.jid,
                    %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "xmpp component stream ended"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// How one connection ended.
enum Attempt {
    /// `shutdown` was cancelled; the stream was closed in order.
    Shutdown,
    /// The stream failed or never came up; `up_for` is how long it was authenticated.
    Failed {
        error: ComponentError,
        up_for: Option<Duration>,
    },
}

impl Attempt {
    fn failed(error: impl Into<ComponentError>) -> Self {
        Self::Failed {
            error: error.into(),
            up_for: None,
        }
    }
}

/// One connection: the handshake, then the authenticated stream.
async fn connect_once(
    config: &ComponentConfig,
    handler: &Arc<dyn StanzaHandler>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Attempt {
    let deadline = Instant::now() + config.handshake_timeout;
    let connect = tokio::time::timeout_at(deadline, TcpStream::connect(&config.server));
    let tcp = tokio::select! {
        _ = shutdown.cancelled() => return Attempt::Shutdown,
        result = connect => match result {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(source)) => {
                metrics.component_connect_failures.inc();
                return Attempt::failed(ComponentError::Connect {
                    server: config.server.clone(),
                    source,
                });
            }
            Err(_) => {
                metrics.component_connect_failures.inc();
                return Attempt::failed(ComponentError::Connect {
                    server: config.server.clone(),
                    source: io::ErrorKind::TimedOut.into(),
                });
            }
        },
    };
    let _ = tcp.set_nodelay(true);
    let (mut reader, mut writer) = tcp.into_split();
    let mut session = Session::new(&config.jid, config.secret.clone(), config.limits);
    let mut buf = vec![0u8; READ_CHUNK];

    // Steps 1–3, one task: nothing else writes yet.
    let handshake = async {
        loop {
            while let Some(output) = session.poll_output() {
                match output {
                    Output::Send(bytes) => {
                        let write = writer.write_all(&bytes);
                        match tokio::time::timeout_at(deadline, write).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => return Err(Some(ComponentError::Io(e))),
                            Err(_) => return Err(Some(ComponentError::Timeout("a write"))),
                        }
                    }
                    Output::Authenticated => return Ok(()),
                    // Only emitted once authenticated.
                    Output::Stanza(_) => {}
                    Output::Close(error) => return Err(error),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => session.shutdown(),
                read = tokio::time::timeout_at(deadline, reader.read(&mut buf)) => match read {
                    Ok(Ok(0)) => return Err(Some(eof())),
                    Ok(Ok(n)) => session.handle_bytes(&buf[..n]),
                    Ok(Err(e)) => return Err(Some(ComponentError::Io(e))),
                    Err(_) => session.timed_out(),
                },
            }
        }
    };
    match handshake.await {
        Ok(()) => {}
        Err(None) => {
            close_quietly(writer, &[]).await;
            return Attempt::Shutdown;
        }
        Err(Some(error)) => {
            metrics.component_handshake_failures.inc();
            close_quietly(writer, &[]).await;
            return Attempt::failed(error);
        }
    }

    // Step 4: the writer task owns the write half; this task reads and runs the handler.
    let up_since = Instant::now();
    metrics.component_connects.inc();
    metrics.component_up.set(1);
    tracing::info!(server = %config.server, jid = %config.jid, "xmpp component attached");
    let (link, queue) = Link::new(config.link_capacity, ns::JABBER_COMPONENT_ACCEPT);
    let (close_tx, close_rx) = oneshot::channel();
    let mut write_task = tokio::spawn(write_loop(
        writer,
        queue,
        close_rx,
        config.keepalive_interval,
    ));
    handler.attached(link.clone());

    let mut rejected = session.rejected();
    let mut pending: Vec<u8> = Vec::new();
    let mut writer_done = false;
    let outcome: Option<ComponentError> = 'stream: loop {
        while let Some(output) = session.poll_output() {
            match output {
                Output::Send(bytes) => pending.extend_from_slice(&bytes),
                Output::Authenticated => {}
                Output::Stanza(stanza) => {
                    flush_pending(&link, &mut pending);
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => session.shutdown(),
                        _ = handler.handle(*stanza, &link) => {}
                    }
                }
                Output::Close(error) => break 'stream error,
            }
        }
        flush_pending(&link, &mut pending);
        if session.rejected() > rejected {
            metrics
                .component_rejected
                .inc_by(session.rejected() - rejected);
            tracing::debug!(jid = %config.jid, "xmpp component: refused a misaddressed or invalid stanza");
            rejected = session.rejected();
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => session.shutdown(),
            () = link.overloaded() => session.overloaded(),
            result = &mut write_task => {
                let error = match result {
                    Ok(Ok(())) => io::Error::other("the writer stopped"),
                    Ok(Err(e)) => e,
                    Err(e) => io::Error::other(e.to_string()),
                };
                writer_done = true;
                break 'stream Some(ComponentError::Io(error));
            }
            read = reader.read(&mut buf) => match read {
                Ok(0) => break 'stream Some(eof()),
                Ok(n) => session.handle_bytes(&buf[..n]),
                Err(e) => break 'stream Some(ComponentError::Io(e)),
            },
        }
    };

    handler.detached(&link);
    drop(link);
    metrics.component_up.set(0);
    if !writer_done {
        // The last bytes (a stream error, `</stream:stream>`) go after what is queued.
        let _ = close_tx.send(pending);
        if tokio::time::timeout(CLOSE_TIMEOUT, &mut write_task)
            .await
            .is_err()
        {
            write_task.abort();
        }
    }
    match outcome {
        Some(error) => Attempt::Failed {
            error,
            up_for: Some(up_since.elapsed()),
        },
        None => {
            // RFC 6120 §4.4: wait (briefly) for the server to close its side too.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                while matches!(reader.read(&mut buf).await, Ok(n) if n > 0) {}
            })
            .await;
            tracing::info!(jid = %config.jid, "xmpp component detached on shutdown");
            Attempt::Shutdown
        }
    }
}

fn eof() -> ComponentError {
    ComponentError::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the server closed the connection",
    ))
}

/// Queues bytes the session produced (error replies) on the link, in order with the
/// handler's stanzas. If the queue is full the link becomes overloaded and the stream closes.
fn flush_pending(link: &Link, pending: &mut Vec<u8>) {
    if !pending.is_empty() {
        link.send(Outbound::Bytes(Bytes::from(std::mem::take(pending))));
    }
}

/// Writes `last` and shuts the connection down, within [`CLOSE_TIMEOUT`].
async fn close_quietly(mut writer: OwnedWriteHalf, last: &[u8]) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if !last.is_empty() {
            writer.write_all(last).await?;
        }
        writer.shutdown().await
    })
    .await;
}

fn append(buf: &mut Vec<u8>, out: Outbound) {
    match out {
        Outbound::Bytes(bytes) => buf.extend_from_slice(&bytes),
        Outbound::Shared { stanza, to } => {
            for chunk in stanza.addressed_to(&to).chunks() {
                buf.extend_from_slice(chunk);
            }
        }
    }
}

/// The writer task: drains the link's queue into one buffer per write, sends a space
/// after `keepalive` without writing, and on `close` writes what is still queued, the
/// closing bytes, and shuts the connection down.
async fn write_loop(
    mut writer: OwnedWriteHalf,
    mut queue: LinkQueue,
    mut close: oneshot::Receiver<Vec<u8>>,
    keepalive: Duration,
) -> io::Result<()> {
    let mut buf = Vec::new();
    let mut ticker = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut wrote = false;
    loop {
        tokio::select! {
            biased;
            last = &mut close => {
                while let Ok(out) = queue.try_recv() {
                    append(&mut buf, out);
                }
                buf.extend_from_slice(&last.unwrap_or_default());
                writer.write_all(&buf).await?;
                return writer.shutdown().await;
            }
            out = queue.recv() => {
                let Some(out) = out else {
                    // Every link handle is gone: only the close can follow.
                    let last = (&mut close).await.unwrap_or_default();
                    writer.write_all(&last).await?;
                    return writer.shutdown().await;
                };
                append(&mut buf, out);
                while buf.len() < MAX_WRITE_BATCH {
                    let Ok(out) = queue.try_recv() else { break };
                    append(&mut buf, out);
                }
                writer.write_all(&buf).await?;
                buf.clear();
                if buf.capacity() > RETAINED_WRITE_CAPACITY {
                    buf = Vec::new();
                }
                wrote = true;
            }
            _ = ticker.tick() => {
                if !wrote {
                    writer.write_all(b" ").await?;
                }
                wrote = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JID: &str = "pubsub.example.org";
    const SECRET: &str = "s3cr3t";
    /// What Prosody sends (single quotes, an `id`, no version).
    const SERVER_HEADER: &str = "<?xml version='1.0'?><stream:stream \
        xmlns:stream='http://etherx.jabber.org/streams' xml:lang='en' \
        xmlns='jabber:component:accept' id='3BF96D32' from='pubsub.example.org'>";

    fn jid(s: &str) -> Jid {
        s.parse().expect("valid JID")
    }

    fn session() -> Session {
        Session::new(&jid(JID), SECRET, Limits::default())
    }

    /// Everything the session wants done: the bytes sent, joined, and the other outputs.
    fn drain(session: &mut Session) -> (String, Vec<Output>) {
        let mut sent = Vec::new();
        let mut others = Vec::new();
        while let Some(output) = session.poll_output() {
            match output {
                Output::Send(bytes) => sent.extend_from_slice(&bytes),
                other => others.push(other),
            }
        }
        (String::from_utf8(sent).expect("utf-8 output"), others)
    }

    fn feed(session: &mut Session, input: &str) -> (String, Vec<Output>) {
        session.handle_bytes(input.as_bytes());
        drain(session)
    }

    fn authenticated() -> Session {
        let mut s = session();
        drain(&mut s);
        feed(&mut s, SERVER_HEADER);
        let (sent, others) = feed(&mut s, "<handshake/>");
        assert_eq!(sent, "");
        assert!(matches!(others[..], [Output::Authenticated]), "{others:?}");
        s
    }

    #[test]
    fn the_handshake_is_the_lowercase_hex_sha1_of_stream_id_and_secret() {
        // XEP-0114 §3 shows stream id 3BF96D32 but not the secret behind its example digest,
        // so the expected values here come from `printf %s "$id$secret" | sha1sum`.
        assert_eq!(
            handshake_digest("3BF96D32", "sNiglet"),
            "1b3555c427a7dd93e689388096404a111c4026e7"
        );
        assert_eq!(
            handshake_digest("3BF96D32", "secret"),
            "b09ea9b3b7f586be8a08d0a3dd7466f110aeb136"
        );
    }

    #[test]
    fn given_a_server_header_when_it_accepts_the_handshake_then_the_session_is_authenticated() {
        let mut s = session();
        let (sent, others) = drain(&mut s);
        assert_eq!(
            sent,
            "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' \
             xmlns:stream='http://etherx.jabber.org/streams' to='pubsub.example.org'>"
        );
        assert!(others.is_empty());

        // The header split anywhere still gives one handshake.
        let (first, second) = SERVER_HEADER.split_at(40);
        assert_eq!(feed(&mut s, first).0, "");
        let (sent, others) = feed(&mut s, second);
        assert_eq!(
            sent,
            format!(
                "<handshake>{}</handshake>",
                handshake_digest("3BF96D32", SECRET)
            )
        );
        assert!(others.is_empty());
        assert!(!s.is_authenticated());

        let (sent, others) = feed(&mut s, " <handshake/>");
        assert_eq!(sent, "");
        assert!(matches!(others[..], [Output::Authenticated]), "{others:?}");
        assert!(s.is_authenticated());
    }

    #[test]
    fn given_a_wrong_secret_when_the_server_says_not_authorized_then_the_session_is_refused() {
        let mut s = session();
        drain(&mut s);
        feed(&mut s, SERVER_HEADER);
        // Prosody's answer to a wrong digest.
        let (sent, others) = feed(
            &mut s,
            "<stream:error><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>Given token does not match \
             calculated token</text></stream:error></stream:stream>",
        );
        assert_eq!(sent, "</stream:stream>");
        let [Output::Close(Some(error))] = &others[..] else {
            panic!("{others:?}")
        };
        assert!(
            matches!(error, ComponentError::Refused { condition, text }
                if condition == "not-authorized"
                    && text.as_deref() == Some("Given token does not match calculated token")),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("not-authorized"), "{message}");
        assert!(message.contains("secret"), "{message}");
        assert!(s.is_closed());
        assert!(!s.is_authenticated());
        // Nothing more happens after the close.
        assert_eq!(feed(&mut s, "<handshake/>").0, "");
    }

    #[test]
    fn given_an_unknown_component_when_the_header_has_no_id_then_the_following_error_is_reported() {
        let mut s = session();
        drain(&mut s);
        // Prosody's refusal of an unconfigured component: an empty id, then the error.
        let (sent, others) = feed(
            &mut s,
            "<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' \
             xmlns='jabber:component:accept' version='1.0' id=''>",
        );
        assert_eq!(sent, "", "no handshake without a stream id");
        assert!(others.is_empty());
        let (_, others) = feed(
            &mut s,
            "<stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             </stream:error>",
        );
        assert!(
            matches!(&others[..], [Output::Close(Some(ComponentError::Refused { condition, .. }))]
                if condition == "host-unknown"),
            "{others:?}"
        );
    }

    #[test]
    fn given_a_server_that_answers_the_handshake_with_a_stanza_then_the_stream_fails() {
        let mut s = session();
        drain(&mut s);
        feed(&mut s, SERVER_HEADER);
        let (sent, others) = feed(&mut s, "<message from='a@b' to='pubsub.example.org'/>");
        assert!(
            sent.contains("<not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"),
            "{sent}"
        );
        assert!(sent.ends_with("</stream:stream>"), "{sent}");
        assert!(
            matches!(
                &others[..],
                [Output::Close(Some(ComponentError::Protocol(_)))]
            ),
            "{others:?}"
        );
    }

    #[test]
    fn given_a_client_stream_namespace_then_the_server_is_refused_with_invalid_namespace() {
        let mut s = session();
        drain(&mut s);
        let (sent, others) = feed(
            &mut s,
            "<stream:stream xmlns:stream='http://etherx.jabber.org/streams' \
             xmlns='jabber:client' id='x'>",
        );
        assert!(sent.contains("<invalid-namespace "), "{sent}");
        assert!(
            matches!(
                &others[..],
                [Output::Close(Some(ComponentError::Protocol(_)))]
            ),
            "{others:?}"
        );
    }

    #[test]
    fn given_an_authenticated_stream_when_a_stanza_to_the_component_arrives_then_it_is_passed_on() {
        let mut s = authenticated();
        let (sent, others) = feed(
            &mut s,
            "<iq type='get' id='d1' from='alice@example.org/phone' to='pubsub.example.org'>\
             <query xmlns='http://jabber.org/protocol/disco#info'/></iq>\
             <message from='alice@example.org/phone' to='node1@pubsub.example.org'>\
             <body>hi</body></message>\
             <presence from='alice@example.org/phone' to='x.pubsub.example.org'/>",
        );
        assert_eq!(sent, "");
        let [
            Output::Stanza(iq),
            Output::Stanza(message),
            Output::Stanza(presence),
        ] = &others[..]
        else {
            panic!("{others:?}")
        };
        let Stanza::Iq(iq) = iq.as_ref() else {
            panic!("{iq:?}")
        };
        assert_eq!(iq.from, Some(jid("alice@example.org/phone")));
        assert!(
            iq.payload
                .as_ref()
                .is_some_and(|p| p.is("query", ns::DISCO_INFO))
        );
        assert!(
            matches!(message.as_ref(), Stanza::Message(m) if m.body().as_deref() == Some("hi"))
        );
        assert!(matches!(presence.as_ref(), Stanza::Presence(_)));
        assert_eq!(s.rejected(), 0);
    }

    #[test]
    fn given_a_stanza_to_another_address_then_it_gets_service_unavailable_from_the_component() {
        let mut s = authenticated();
        let (sent, others) = feed(
            &mut s,
            "<iq type='get' id='w1' from='alice@example.org/phone' to='example.org'>\
             <ping xmlns='urn:xmpp:ping'/></iq>",
        );
        assert!(others.is_empty(), "{others:?}");
        assert!(
            sent.starts_with(
                "<iq id='w1' type='error' from='pubsub.example.org' to='alice@example.org/phone'>"
            ),
            "{sent}"
        );
        assert!(
            sent.contains("<service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"),
            "{sent}"
        );
        // `pubsub.example.org.evil` is not a subdomain.
        let (sent, _) = feed(
            &mut s,
            "<message id='m1' from='alice@example.org' to='pubsub.example.org.evil'/>",
        );
        assert!(sent.contains("from='pubsub.example.org'"), "{sent}");
        assert!(sent.contains("service-unavailable"), "{sent}");
        assert_eq!(s.rejected(), 2);
        assert!(
            s.is_authenticated(),
            "one bad stanza does not end the stream"
        );
    }

    #[test]
    fn given_a_malformed_address_then_it_gets_jid_malformed_and_the_stream_goes_on() {
        let mut s = authenticated();
        let (sent, others) = feed(
            &mut s,
            "<iq type='get' id='j1' from='alice@example.org/phone' to='a@@pubsub.example.org'>\
             <ping xmlns='urn:xmpp:ping'/></iq>",
        );
        assert!(others.is_empty(), "{others:?}");
        assert!(sent.contains("type='error'"), "{sent}");
        assert!(sent.contains("from='pubsub.example.org'"), "{sent}");
        assert!(
            sent.contains("<jid-malformed xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"),
            "{sent}"
        );
        assert!(s.is_authenticated());
    }

    #[test]
    fn given_stanzas_that_cannot_be_answered_then_they_are_dropped_and_counted() {
        let mut s = authenticated();
        let (sent, others) = feed(
            &mut s,
            // No `from`; an error; a result to someone else.
            "<iq type='get' id='n1' to='pubsub.example.org'><ping xmlns='urn:xmpp:ping'/></iq>\
             <message type='error' from='a@example.org' to='example.org'/>\
             <iq type='result' id='r1' from='a@example.org' to='example.org'/>",
        );
        assert_eq!(sent, "");
        assert!(others.is_empty(), "{others:?}");
        assert_eq!(s.rejected(), 3);
    }

    #[test]
    fn given_a_stream_error_after_the_handshake_then_it_is_reported_with_its_condition() {
        let mut s = authenticated();
        let (sent, others) = feed(
            &mut s,
            "<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             </stream:error>",
        );
        assert_eq!(sent, "</stream:stream>");
        assert!(
            matches!(&others[..], [Output::Close(Some(ComponentError::StreamError { condition, .. }))]
                if condition == "conflict"),
            "{others:?}"
        );
    }

    #[test]
    fn given_a_non_stanza_element_then_the_stream_ends_with_unsupported_stanza_type() {
        let mut s = authenticated();
        let (sent, others) = feed(&mut s, "<foo/>");
        assert!(sent.contains("<unsupported-stanza-type "), "{sent}");
        assert!(
            matches!(&others[..], [Output::Close(Some(_))]),
            "{others:?}"
        );
    }

    #[test]
    fn shutdown_ends_the_stream_without_an_error() {
        let mut s = authenticated();
        s.shutdown();
        let (sent, others) = drain(&mut s);
        assert_eq!(sent, "</stream:stream>");
        assert!(matches!(&others[..], [Output::Close(None)]), "{others:?}");
        s.shutdown();
        assert!(drain(&mut s).1.is_empty(), "a second shutdown does nothing");
    }

    #[test]
    fn overload_and_timeouts_end_the_stream_with_their_conditions() {
        let mut s = authenticated();
        s.overloaded();
        let (sent, others) = drain(&mut s);
        assert!(sent.contains("<policy-violation "), "{sent}");
        assert!(matches!(
            &others[..],
            [Output::Close(Some(ComponentError::Overloaded))]
        ));

        let mut s = session();
        drain(&mut s);
        s.timed_out();
        let (sent, others) = drain(&mut s);
        assert!(sent.contains("<connection-timeout "), "{sent}");
        assert!(matches!(
            &others[..],
            [Output::Close(Some(ComponentError::Timeout(
                "the stream header"
            )))]
        ));
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap_and_jitters_down_by_at_most_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let top: Vec<_> = (0..6).map(|_| b.next_delay(0.999_999)).collect();
        let expected = [100, 200, 400, 800, 1000, 1000];
        for (got, want) in top.iter().zip(expected) {
            let want = Duration::from_millis(want);
            assert!(
                *got <= want && *got > want.mul_f64(0.99),
                "{got:?} vs {want:?}"
            );
        }
        assert_eq!(
            b.next_delay(0.0),
            Duration::from_millis(500),
            "half of the cap"
        );
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
        let mut huge = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..100 {
            assert!(huge.next_delay(0.5) <= Duration::from_secs(60));
        }
    }

    #[test]
    fn a_config_is_validated_before_it_runs() {
        let ok = ComponentConfig::new("127.0.0.1:5347", jid(JID), SECRET);
        assert_eq!(ok.validate(), Ok(()));
        assert!(
            !format!("{ok:?}").contains(SECRET),
            "the secret is not logged"
        );
        let cases = [
            (
                ComponentConfig::new("localhost", jid(JID), SECRET),
                ComponentConfigError::InvalidServer,
            ),
            (
                ComponentConfig::new("localhost:5347", jid("a@pubsub.example.org"), SECRET),
                ComponentConfigError::NotADomain,
            ),
            (
                ComponentConfig::new("localhost:5347", jid(JID), ""),
                ComponentConfigError::EmptySecret,
            ),
            (
                ComponentConfig {
                    link_capacity: 0,
                    ..ok.clone()
                },
                ComponentConfigError::Zero("link_capacity"),
            ),
            (
                ComponentConfig {
                    reconnect_initial: Duration::from_secs(120),
                    ..ok.clone()
                },
                ComponentConfigError::Backoff,
            ),
        ];
        for (config, error) in cases {
            assert_eq!(config.validate(), Err(error));
        }
    }

    /// A scripted XEP-0114 server on a real socket: accepts, checks the handshake and echoes
    /// a disco query to the component; the driver hands it to the handler, whose answer
    /// comes back through the link.
    #[tokio::test]
    async fn the_driver_authenticates_routes_stanzas_both_ways_and_closes_on_shutdown() {
        use tokio::net::TcpListener;

        struct Echo {
            attached: parking_lot::Mutex<u32>,
            detached: parking_lot::Mutex<u32>,
        }
        impl StanzaHandler for Echo {
            fn handle<'a>(
                &'a self,
                stanza: Stanza,
                link: &'a Link,
            ) -> crate::link::HandlerFuture<'a> {
                Box::pin(async move {
                    if let Stanza::Iq(iq) = stanza {
                        link.send_element(&Element::from(iq.result()));
                    }
                })
            }
            fn attached(&self, _link: Link) {
                *self.attached.lock() += 1;
            }
            fn detached(&self, _link: &Link) {
                *self.detached.lock() += 1;
            }
        }

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            let mut read_until = async |tcp: &mut TcpStream, marker: &str| {
                while !String::from_utf8_lossy(&got).contains(marker) {
                    let n = tcp.read(&mut buf).await.expect("read");
                    assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
                    got.extend_from_slice(&buf[..n]);
                }
                String::from_utf8_lossy(&got).into_owned()
            };
            read_until(&mut tcp, "to='pubsub.example.org'>").await;
            tcp.write_all(SERVER_HEADER.as_bytes())
                .await
                .expect("write");
            let digest = handshake_digest("3BF96D32", SECRET);
            read_until(&mut tcp, &format!("<handshake>{digest}</handshake>")).await;
            tcp.write_all(
                b"<handshake/><iq type='get' id='q1' from='alice@example.org/a' \
                  to='pubsub.example.org'><ping xmlns='urn:xmpp:ping'/></iq>",
            )
            .await
            .expect("write");
            let seen = read_until(&mut tcp, "id='q1'").await;
            tcp.write_all(b"</stream:stream>").await.expect("write");
            let seen_end = read_until(&mut tcp, "</stream:stream>").await;
            (seen, seen_end)
        });

        let handler = Arc::new(Echo {
            attached: parking_lot::Mutex::new(0),
            detached: parking_lot::Mutex::new(0),
        });
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let config = ComponentConfig {
            reconnect_initial: Duration::from_secs(30),
            reconnect_max: Duration::from_secs(30),
            ..ComponentConfig::new(addr.to_string(), jid(JID), SECRET)
        };
        let driver = tokio::spawn(run(
            config,
            handler.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        let (seen, _) = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the scripted server finished")
            .expect("no panic");
        assert!(
            seen.contains(
                "<iq id='q1' type='result' from='pubsub.example.org' to='alice@example.org/a'/>"
            ),
            "{seen}"
        );
        // The server closed the stream: the handler was detached, and the driver waits to
        // reconnect until shut down.
        tokio::time::timeout(Duration::from_secs(10), async {
            while *handler.detached.lock() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("detached");
        assert_eq!(*handler.attached.lock(), 1);
        assert_eq!(metrics.component_connects.get(), 1);
        assert_eq!(metrics.component_up.get(), 0);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), driver)
            .await
            .expect("run returns on shutdown")
            .expect("no panic");
    }
}
