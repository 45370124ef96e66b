//! RFC 6120 client-to-server session negotiation, without I/O.
//!
//! A [`Session`] is the server side of one client connection. The driver feeds it what it
//! reads ([`Session::handle_bytes`]), tells it about the TLS handshake
//! ([`Session::handle_tls_established`]) and the result of credential lookups
//! ([`Session::handle_credentials`]), and drains [`Output`]s with [`Session::poll_output`]
//! after every call.
//!
//! # Steps
//!
//! Negotiation is a sequence of consuming steps; each stream restart (after STARTTLS and
//! after SASL, RFC 6120 §5.4.3.3 and §6.4.6) starts the next one with a new header:
//!
//! 1. **Header**: the client opens a stream. `to` must be our domain (`host-unknown`), the
//!    content namespace `jabber:client` (`invalid-namespace`) and the version 1.x
//!    (`unsupported-version`). We answer with our header and the features of the step.
//! 2. **TLS** (only if TLS is available and not yet on): `<starttls/>` is answered with
//!    `<proceed/>` and [`Output::StartTls`]; the driver runs the handshake and calls
//!    [`Session::handle_tls_established`], and the client opens a new stream. When TLS is
//!    required, anything else is a `policy-violation` stream error (RFC 6120 §5.3.1).
//! 3. **SASL**: `<auth/>` with SCRAM-SHA-256, SCRAM-SHA-1 or (over TLS only) PLAIN. The
//!    session asks for the account with [`Output::LookupCredentials`] and waits for
//!    [`Session::handle_credentials`]. Failures are answered with `<failure/>` (RFC 6120
//!    §6.5); SCRAM expects its first message in `<auth/>` (an empty initial response is a
//!    `malformed-request`). After [`C2sConfig::max_auth_failures`] of them the stream is closed with
//!    `policy-violation`. On `<success/>` ([`Output::Authenticated`]) the client restarts.
//! 4. **Bind**: the features offer resource binding (and the obsolete session, optional);
//!    the bind iq is answered with the full JID ([`Output::Bound`]).
//! 5. **Bound**: ping, roster get, session and disco to the server are answered here; other
//!    stanzas get `from` set to the session's full JID (RFC 6120 §8.1.2.1) and are passed
//!    out as [`Output::Stanza`]. IQs addressed to the server with an unknown payload get
//!    `service-unavailable`, so that no request goes unanswered.
//!
//! Any element that is not part of the current step (e.g. a stanza before binding) is a
//! `not-authorized` stream error. An iq without `id` cannot be answered with a stanza error
//! (the reply could not be matched), so it is a `bad-format` stream error. Every stream
//! error is written, followed by `</stream:stream>`, and then [`Output::Close`] is emitted;
//! after that the session ignores its inputs.

use std::collections::VecDeque;
use std::fmt;

use juxta_core::{Account, Username};

use crate::codec::{Decoder, Frame, Limits, StreamHeader};
use crate::element::Element;
use crate::error::{Condition, StreamError};
use crate::jid::Jid;
use crate::ns;
use crate::sasl::{self, SaslError, Scram, ScramHash};
use crate::stanza::{Iq, IqType, Stanza, StanzaError, StanzaParseError};
use crate::writer::{STREAM_END, WriteContext, stream_error, stream_header};

/// Default for [`C2sConfig::max_auth_failures`].
pub const DEFAULT_MAX_AUTH_FAILURES: u32 = 3;

/// The prefix of the publish-subscribe service's address, listed in disco#items.
const PUBSUB_PREFIX: &str = "pubsub.";

/// A SASL mechanism the session can offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// SCRAM-SHA-256 (RFC 7677).
    ScramSha256,
    /// SCRAM-SHA-1 (RFC 5802).
    ScramSha1,
    /// PLAIN (RFC 4616), offered only on encrypted streams.
    Plain,
}

impl Mechanism {
    /// The name used in `<mechanism/>` and `<auth mechanism=…/>`.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::ScramSha256 => ScramHash::Sha256.mechanism(),
            Mechanism::ScramSha1 => ScramHash::Sha1.mechanism(),
            Mechanism::Plain => "PLAIN",
        }
    }
}

/// How a [`Session`] negotiates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct C2sConfig {
    /// The domain we serve; the stream header's `to` must name it.
    pub domain: String,
    /// Whether the driver can run a TLS handshake after STARTTLS.
    pub tls_available: bool,
    /// Whether TLS must be on before SASL (default `true`).
    pub tls_required: bool,
    /// Whether TLS was negotiated before the first byte (direct TLS, XEP-0368).
    pub already_tls: bool,
    /// The mechanisms offered, in order of preference. PLAIN is left out of the features
    /// while the stream is not encrypted.
    pub mechanisms: Vec<Mechanism>,
    /// Bounds on what the client may send.
    pub limits: Limits,
    /// Failed SASL attempts allowed before the stream is closed; bounds how many passwords
    /// one connection can try.
    pub max_auth_failures: u32,
}

impl C2sConfig {
    /// The defaults for `domain`: STARTTLS available and required, SCRAM-SHA-256,
    /// SCRAM-SHA-1 and PLAIN, default limits, [`DEFAULT_MAX_AUTH_FAILURES`].
    pub fn new(domain: impl Into<String>) -> Self {
        Self {
            domain: domain.into(),
            tls_available: true,
            tls_required: true,
            already_tls: false,
            mechanisms: vec![
                Mechanism::ScramSha256,
                Mechanism::ScramSha1,
                Mechanism::Plain,
            ],
            limits: Limits::default(),
            max_auth_failures: DEFAULT_MAX_AUTH_FAILURES,
        }
    }
}

/// Why a [`C2sConfig`] cannot run a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum C2sConfigError {
    /// The domain is not a valid domain JID.
    #[error("the domain is not a valid JID domainpart")]
    InvalidDomain,
    /// TLS is required but neither available nor already on: no client could log in.
    #[error("TLS is required but not available")]
    TlsUnavailable,
    /// No mechanism is configured: no client could log in.
    #[error("no SASL mechanism is configured")]
    NoMechanisms,
}

/// Something the driver must do, drained with [`Session::poll_output`] in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Write these bytes to the connection.
    Send(Vec<u8>),
    /// Stop reading, write the bytes already returned, run the TLS handshake, then call
    /// [`Session::handle_tls_established`]. Emitted after the `<proceed/>`.
    StartTls,
    /// Look up this account and call [`Session::handle_credentials`] with it.
    LookupCredentials(Username),
    /// The client authenticated as this user.
    Authenticated(Username),
    /// The client bound this full JID.
    Bound(Jid),
    /// A stanza from the bound client, with `from` set to its full JID, for the router
    /// (boxed: it is much larger than the other variants).
    Stanza(Box<Stanza>),
    /// Write the bytes already returned and close the connection.
    Close,
}

/// A source of fresh random strings (stream ids, SCRAM server nonces, resources). Each call
/// must return a new unguessable value of printable ASCII without `,`.
pub type RandomSource = Box<dyn FnMut() -> String + Send>;

/// The SASL exchange in progress.
enum Sasl {
    /// Waiting for `<auth/>`.
    Idle,
    /// SCRAM: waiting for the driver's credentials.
    ScramLookup(Scram, ScramHash),
    /// SCRAM: the challenge was sent; waiting for `<response/>`.
    ScramChallenged(Scram),
    /// PLAIN: waiting for the driver's credentials.
    PlainLookup(Username, String),
}

/// The step the session is in.
enum State {
    /// Waiting for a stream header; the next step follows from `tls` and `user`.
    Header,
    /// Features sent; STARTTLS and SASL negotiation.
    Negotiating(Sasl),
    /// `<proceed/>` was sent; waiting for [`Session::handle_tls_established`].
    AwaitingTls,
    /// Authenticated; features with bind were sent.
    Binding(Username),
    /// Resource bound.
    Bound(Jid),
    /// The stream is over.
    Closed,
}

/// One client-to-server session; see the [module documentation](self).
pub struct Session {
    config: C2sConfig,
    domain: Jid,
    decoder: Decoder,
    state: State,
    /// Whether the stream is encrypted.
    tls: bool,
    /// The authenticated user, once SASL succeeded.
    user: Option<Username>,
    /// Whether our header of the current stream was written (a stream error needs one).
    header_sent: bool,
    failures: u32,
    random: RandomSource,
    /// Keys fake SCRAM salts for unknown users.
    secret: [u8; 32],
    /// Drained by the driver after every input; what one input adds is bounded by that
    /// input's size.
    outputs: VecDeque<Output>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("domain", &self.domain)
            .field("tls", &self.tls)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session expecting the client's first stream header. `random` supplies stream ids,
    /// SCRAM nonces and generated resources; `secret` is the per-server key of
    /// [`Scram::new`].
    pub fn new(
        config: C2sConfig,
        random: RandomSource,
        secret: [u8; 32],
    ) -> Result<Self, C2sConfigError> {
        let domain = Jid::domain_jid(&config.domain).map_err(|_| C2sConfigError::InvalidDomain)?;
        if config.tls_required && !config.tls_available && !config.already_tls {
            return Err(C2sConfigError::TlsUnavailable);
        }
        if config.mechanisms.is_empty() {
            return Err(C2sConfigError::NoMechanisms);
        }
        Ok(Self {
            decoder: Decoder::new(config.limits),
            tls: config.already_tls,
            config,
            domain,
            state: State::Header,
            user: None,
            header_sent: false,
            failures: 0,
            random,
            secret,
            outputs: VecDeque::new(),
        })
    }

    /// The next thing for the driver to do, in order; `None` when there is nothing.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The next output, left in place.
    pub fn peek_output(&self) -> Option<&Output> {
        self.outputs.front()
    }

    /// Whether the stream is over ([`Output::Close`] was emitted).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Bytes read from the connection. Ignored after the stream closed or while the driver
    /// runs the TLS handshake.
    ///
    /// While a credential lookup is pending, frames are not read, so input accumulates in
    /// the decoder; more than [`Limits::max_stanza_bytes`] of it is a `policy-violation`
    /// (a client has no reason to send anything before it gets the answer to `<auth/>`).
    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        if matches!(self.state, State::Closed | State::AwaitingTls) {
            return;
        }
        self.decoder.feed(bytes);
        let waiting = matches!(
            self.state,
            State::Negotiating(Sasl::ScramLookup(..) | Sasl::PlainLookup(..))
        );
        if waiting && self.decoder.buffered_len() > self.config.limits.max_stanza_bytes {
            self.fail(
                Condition::PolicyViolation,
                Some("too much data during authentication"),
            );
            return;
        }
        self.pump();
    }

    /// The TLS handshake after `<proceed/>` succeeded: the client opens a new stream.
    pub fn handle_tls_established(&mut self) {
        if !matches!(self.state, State::AwaitingTls) {
            return;
        }
        self.tls = true;
        self.decoder.reset();
        self.state = State::Header;
        self.header_sent = false;
        self.pump();
    }

    /// The account for the last [`Output::LookupCredentials`] (`None` if there is none).
    /// Ignored when no lookup is pending.
    pub fn handle_credentials(&mut self, account: Option<Account>) {
        let state = std::mem::replace(&mut self.state, State::Closed);
        match state {
            State::Negotiating(Sasl::ScramLookup(mut scram, hash)) => {
                let keys = account.map(|a| match hash {
                    ScramHash::Sha256 => a.scram_sha256,
                    ScramHash::Sha1 => a.scram_sha1,
                });
                match scram.server_first(keys) {
                    Ok(challenge) => {
                        self.send_sasl("challenge", Some(&challenge));
                        self.state = State::Negotiating(Sasl::ScramChallenged(scram));
                    }
                    Err(error) => self.sasl_failure(error.condition()),
                }
            }
            State::Negotiating(Sasl::PlainLookup(username, password)) => {
                let ok = account.is_some_and(|a| {
                    a.username == username
                        && sasl::verify_password(ScramHash::Sha256, &a.scram_sha256, &password)
                });
                if ok {
                    self.sasl_success(username, None);
                } else {
                    self.sasl_failure(SaslError::NotAuthorized.condition());
                }
            }
            other => {
                self.state = other;
                return;
            }
        }
        self.pump();
    }

    /// Sends a server-originated stanza (e.g. a pubsub notification) to the bound client,
    /// in the `jabber:client` context. Returns `false`, sending nothing, when no resource is
    /// bound (yet or any more).
    pub fn send_stanza(&mut self, element: &Element) -> bool {
        if !matches!(self.state, State::Bound(_)) {
            return false;
        }
        self.send_element(element);
        true
    }

    /// Ends the stream because the server shuts down: `system-shutdown`, the stream end
    /// and [`Output::Close`].
    pub fn shutdown(&mut self) {
        if !self.is_closed() {
            self.fail(Condition::SystemShutdown, None);
        }
    }

    /// Ends the stream because the client does not read what is queued for it: a
    /// `policy-violation` stream error (the queue is bounded; see [`crate::Link`]).
    pub fn overloaded(&mut self) {
        if !self.is_closed() {
            self.fail(
                Condition::PolicyViolation,
                Some("too slow: the client does not read its stanzas"),
            );
        }
    }

    /// Ends the stream because the transport carried bad input the session never saw (an
    /// RFC 7395 WebSocket message that is not one well-formed element, say): the stream
    /// error for `error`, the stream end and [`Output::Close`].
    pub fn transport_error(&mut self, error: &StreamError) {
        if !self.is_closed() {
            self.fail_with(error);
        }
    }

    /// How many SASL attempts have failed on this stream so far.
    pub fn auth_failures(&self) -> u32 {
        self.failures
    }

    /// Ends the stream because the client stayed silent too long: `connection-timeout`
    /// (RFC 6120 §4.9.3.4), the stream end and [`Output::Close`].
    pub fn timed_out(&mut self) {
        if !self.is_closed() {
            self.fail(Condition::ConnectionTimeout, None);
        }
    }

    /// Reads frames until more input is needed or the session waits for the driver.
    fn pump(&mut self) {
        while matches!(
            self.state,
            State::Header
                | State::Negotiating(Sasl::Idle | Sasl::ScramChallenged(_))
                | State::Binding(_)
                | State::Bound(_)
        ) {
            match self.decoder.next() {
                Ok(None) => return,
                Ok(Some(frame)) => self.handle_frame(frame),
                Err(error) => {
                    self.fail_with(&error);
                    return;
                }
            }
        }
    }

    fn handle_frame(&mut self, frame: Frame) {
        match frame {
            Frame::StreamHeader(header) => self.handle_header(&header),
            Frame::StreamEnd => {
                if !self.header_sent {
                    self.send_header(None);
                }
                self.send(STREAM_END.to_vec());
                self.close();
            }
            Frame::Stanza(element) => {
                let state = std::mem::replace(&mut self.state, State::Closed);
                match state {
                    State::Negotiating(sasl) => self.negotiate(sasl, element),
                    State::Binding(username) => self.bind(username, &element),
                    State::Bound(jid) => {
                        self.state = State::Bound(jid.clone());
                        self.bound(&jid, element);
                    }
                    // The decoder reports a header before any stanza of a stream.
                    State::Header | State::AwaitingTls | State::Closed => {
                        self.fail(Condition::InternalServerError, None);
                    }
                }
            }
        }
    }

    /// Step 1: checks the header, answers it and offers the features of the next step.
    fn handle_header(&mut self, header: &StreamHeader) {
        if !matches!(self.state, State::Header) {
            self.fail(Condition::InternalServerError, None);
            return;
        }
        self.send_header(header.lang.as_deref());
        let to = header
            .to
            .as_deref()
            .map(|to| to.trim_end_matches('.').to_ascii_lowercase());
        if to.as_deref() != Some(self.domain.domain()) {
            self.fail(Condition::HostUnknown, None);
            return;
        }
        if header.default_ns != ns::JABBER_CLIENT {
            self.fail(Condition::InvalidNamespace, None);
            return;
        }
        // RFC 6120 §4.7.5: a major version of 1 is what we speak.
        let major = header
            .version
            .as_deref()
            .and_then(|v| v.split_once('.'))
            .map(|(major, _)| major);
        if major != Some("1") {
            self.fail(Condition::UnsupportedVersion, None);
            return;
        }
        let mut features = Element::new("features", ns::STREAM);
        if let Some(user) = self.user.clone() {
            features.append_child(Element::new("bind", ns::BIND));
            features
                .append_child(Element::new("session", ns::SESSION))
                .append_child(Element::new("optional", ns::SESSION));
            self.state = State::Binding(user);
        } else {
            if self.config.tls_available && !self.tls {
                let starttls = features.append_child(Element::new("starttls", ns::TLS));
                if self.config.tls_required {
                    starttls.append_child(Element::new("required", ns::TLS));
                }
            }
            if self.tls || !self.config.tls_required {
                let mut mechanisms = Element::new("mechanisms", ns::SASL);
                for mechanism in self.offered() {
                    mechanisms
                        .append_child(Element::new("mechanism", ns::SASL))
                        .append_text(mechanism.name());
                }
                features.append_child(mechanisms);
            }
            self.state = State::Negotiating(Sasl::Idle);
        }
        self.send_element(&features);
    }

    /// The mechanisms offered on this stream: PLAIN only when it is encrypted.
    fn offered(&self) -> impl Iterator<Item = Mechanism> + '_ {
        self.config
            .mechanisms
            .iter()
            .copied()
            .filter(|m| *m != Mechanism::Plain || self.tls)
    }

    /// Steps 2 and 3: STARTTLS and SASL.
    fn negotiate(&mut self, sasl: Sasl, element: Element) {
        let tls_pending = self.config.tls_available && !self.tls;
        if element.is("starttls", ns::TLS) && tls_pending && matches!(sasl, Sasl::Idle) {
            // RFC 6120 §5.4.3.3: bytes pipelined after <starttls/> came in plaintext; reading
            // them later as if they came through TLS would allow command injection.
            if !self.decoder.take_buffered().is_empty() {
                self.fail(
                    Condition::PolicyViolation,
                    Some("data was sent after <starttls/>"),
                );
                return;
            }
            self.send_element(&Element::new("proceed", ns::TLS));
            self.outputs.push_back(Output::StartTls);
            self.state = State::AwaitingTls;
            return;
        }
        if tls_pending && self.config.tls_required {
            // RFC 6120 §5.3.1: a client that does not start TLS when it is required.
            self.fail(Condition::PolicyViolation, Some("STARTTLS is required"));
            return;
        }
        if element.is("auth", ns::SASL) {
            self.auth(&element);
        } else if element.is("response", ns::SASL) {
            let Sasl::ScramChallenged(mut scram) = sasl else {
                self.sasl_failure(SaslError::MalformedRequest.condition());
                return;
            };
            let result = sasl::decode_b64(&element.text())
                .and_then(|message| scram.handle_client_final(&message));
            match result {
                Ok((username, server_final)) => self.sasl_success(username, Some(&server_final)),
                Err(error) => self.sasl_failure(error.condition()),
            }
        } else if element.is("abort", ns::SASL) {
            self.sasl_failure("aborted");
        } else {
            self.fail(Condition::NotAuthorized, None);
        }
    }

    /// Starts an exchange (RFC 6120 §6.4.2).
    fn auth(&mut self, element: &Element) {
        let name = element.attr("mechanism").unwrap_or_default();
        let Some(mechanism) = self.offered().find(|m| m.name() == name) else {
            let plain_configured = self.config.mechanisms.contains(&Mechanism::Plain);
            let condition = if name == Mechanism::Plain.name() && plain_configured {
                "encryption-required"
            } else {
                SaslError::InvalidMechanism.condition()
            };
            self.sasl_failure(condition);
            return;
        };
        let message = match sasl::decode_b64(&element.text()) {
            Ok(message) => message,
            Err(error) => {
                self.sasl_failure(error.condition());
                return;
            }
        };
        let hash = match mechanism {
            Mechanism::ScramSha256 => ScramHash::Sha256,
            Mechanism::ScramSha1 => ScramHash::Sha1,
            Mechanism::Plain => {
                match sasl::parse_plain(&message) {
                    Ok((username, password)) => {
                        self.outputs
                            .push_back(Output::LookupCredentials(username.clone()));
                        self.state = State::Negotiating(Sasl::PlainLookup(username, password));
                    }
                    Err(error) => self.sasl_failure(error.condition()),
                }
                return;
            }
        };
        let mut scram = Scram::new(hash, (self.random)(), self.secret);
        match scram.handle_client_first(&message) {
            Ok(username) => {
                self.outputs.push_back(Output::LookupCredentials(username));
                self.state = State::Negotiating(Sasl::ScramLookup(scram, hash));
            }
            Err(error) => self.sasl_failure(error.condition()),
        }
    }

    /// `<failure/>` with `condition`; closes the stream after too many.
    fn sasl_failure(&mut self, condition: &str) {
        let failure = Element::builder("failure", ns::SASL)
            .append(Element::new(condition, ns::SASL))
            .build();
        self.send_element(&failure);
        self.failures += 1;
        if self.failures >= self.config.max_auth_failures {
            self.fail(
                Condition::PolicyViolation,
                Some("too many authentication failures"),
            );
        } else {
            self.state = State::Negotiating(Sasl::Idle);
        }
    }

    /// `<success/>` and the restart of RFC 6120 §6.4.6.
    fn sasl_success(&mut self, username: Username, additional: Option<&[u8]>) {
        self.send_sasl("success", additional);
        self.outputs
            .push_back(Output::Authenticated(username.clone()));
        self.user = Some(username);
        self.decoder.reset();
        self.header_sent = false;
        self.state = State::Header;
    }

    /// `<name xmlns=sasl>base64</name>`, `=` standing for an empty payload.
    fn send_sasl(&mut self, name: &str, payload: Option<&[u8]>) {
        let mut element = Element::new(name, ns::SASL);
        if let Some(payload) = payload {
            if payload.is_empty() {
                element.append_text("=");
            } else {
                element.append_text(&sasl::encode_b64(payload));
            }
        }
        self.send_element(&element);
    }

    /// Step 4: resource binding (RFC 6120 §7).
    fn bind(&mut self, username: Username, element: &Element) {
        let iq = match self.parse_iq(element) {
            Some(Ok(iq)) => iq,
            Some(Err(error)) => {
                self.state = State::Binding(username);
                self.reply_parse_error(element, &error);
                return;
            }
            None => return,
        };
        let request = iq
            .payload
            .as_ref()
            .filter(|p| iq.kind == IqType::Set && p.is("bind", ns::BIND));
        let Some(request) = request else {
            self.fail(Condition::NotAuthorized, Some("bind a resource first"));
            return;
        };
        let resource = request
            .get_child("resource", ns::BIND)
            .map(|r| r.text().trim().to_owned())
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| (self.random)());
        let jid = Jid::new(
            Some(username.as_str()),
            self.domain.domain(),
            Some(&resource),
        );
        let jid = match jid {
            Ok(jid) => jid,
            Err(_) => {
                // RFC 6120 §7.7.2.1: a resourcepart that cannot be processed.
                let reply = iq.error_reply(StanzaError::bad_request());
                self.state = State::Binding(username);
                self.send_element(&Element::from(reply));
                return;
            }
        };
        let mut result = iq.result();
        result.payload = Some(
            Element::builder("bind", ns::BIND)
                .append(Element::builder("jid", ns::BIND).append(jid.to_string()))
                .build(),
        );
        self.send_element(&Element::from(result));
        self.outputs.push_back(Output::Bound(jid.clone()));
        self.state = State::Bound(jid);
    }

    /// Step 5: a stanza from the bound client.
    fn bound(&mut self, jid: &Jid, mut element: Element) {
        let is_stanza = matches!(element.name(), "iq" | "message" | "presence");
        if !is_stanza {
            self.fail(Condition::UnsupportedStanzaType, None);
            return;
        }
        if element.ns() != ns::JABBER_CLIENT {
            self.fail(Condition::InvalidNamespace, None);
            return;
        }
        // RFC 6120 §8.1.2.1: the server stamps the sender; the client's `from` is not trusted.
        element.set_attr("from", jid.to_string());
        let stanza = match Stanza::try_from(&element) {
            Ok(stanza) => stanza,
            Err(StanzaParseError::MissingAttribute { attr: "id" }) if element.name() == "iq" => {
                self.fail(Condition::BadFormat, Some("an iq needs an id"));
                return;
            }
            Err(error) => {
                self.reply_parse_error(&element, &error);
                return;
            }
        };
        match stanza {
            Stanza::Iq(iq) if self.is_for_server(jid, iq.to.as_ref()) => self.local_iq(jid, iq),
            other => self.outputs.push_back(Output::Stanza(Box::new(other))),
        }
    }

    /// Whether an iq to `to` is answered by the server itself: no `to`, our domain or the
    /// user's bare JID (RFC 6120 §10.3.3, §10.5.3).
    fn is_for_server(&self, jid: &Jid, to: Option<&Jid>) -> bool {
        to.is_none_or(|to| *to == self.domain || *to == jid.bare())
    }

    /// Answers an iq addressed to the server or the account.
    fn local_iq(&mut self, jid: &Jid, iq: Iq) {
        if matches!(iq.kind, IqType::Result | IqType::Error) {
            // Answers to requests we never send; nothing to do.
            return;
        }
        let to_domain = iq.to.as_ref().is_none_or(|to| *to == self.domain);
        let get = iq.kind == IqType::Get;
        let set = iq.kind == IqType::Set;
        let payload = iq.payload.as_ref();
        let is = |name: &str, ns: &str| payload.is_some_and(|p| p.is(name, ns));
        let mut reply = iq.result();
        if reply.from.is_none() {
            reply.from = Some(self.domain.clone());
        }
        reply.to = Some(jid.clone());
        if get && is("ping", ns::PING) || set && is("session", ns::SESSION) {
            // XEP-0199 §4.2 and RFC 3921 §3: an empty result is the whole answer.
        } else if get && is("query", ns::ROSTER) {
            // No contacts are kept: an empty roster (RFC 6121 §2.1.3).
            reply.payload = Some(Element::new("query", ns::ROSTER));
        } else if get && to_domain && is("query", ns::DISCO_INFO) {
            reply.payload = Some(self.disco_info());
        } else if get && to_domain && is("query", ns::DISCO_ITEMS) {
            reply.payload = Some(self.disco_items());
        } else {
            reply = Iq {
                kind: IqType::Error,
                error: Some(StanzaError::service_unavailable()),
                ..reply
            };
        }
        self.send_element(&Element::from(reply));
    }

    fn disco_info(&self) -> Element {
        let mut query = Element::new("query", ns::DISCO_INFO);
        let identity = query.append_child(Element::new("identity", ns::DISCO_INFO));
        identity.set_attr("category", "server");
        identity.set_attr("type", "im");
        for feature in [ns::DISCO_INFO, ns::DISCO_ITEMS, ns::PING, ns::ROSTER] {
            query
                .append_child(Element::new("feature", ns::DISCO_INFO))
                .set_attr("var", feature);
        }
        query
    }

    fn disco_items(&self) -> Element {
        let mut query = Element::new("query", ns::DISCO_ITEMS);
        query
            .append_child(Element::new("item", ns::DISCO_ITEMS))
            .set_attr("jid", format!("{PUBSUB_PREFIX}{}", self.domain.domain()));
        query
    }

    /// Parses an iq; `None` after a stream error (no `id`, or not an iq at all).
    fn parse_iq(&mut self, element: &Element) -> Option<Result<Iq, StanzaParseError>> {
        if !element.is("iq", ns::JABBER_CLIENT) {
            self.fail(Condition::NotAuthorized, Some("bind a resource first"));
            return None;
        }
        match Iq::try_from(element) {
            Err(StanzaParseError::MissingAttribute { attr: "id" }) => {
                self.fail(Condition::BadFormat, Some("an iq needs an id"));
                None
            }
            other => Some(other),
        }
    }

    /// Answers an invalid stanza with the stanza error of RFC 6120 §8.3, unless it is an
    /// error itself (§8.3.1).
    fn reply_parse_error(&mut self, element: &Element, error: &StanzaParseError) {
        if element.attr("type") == Some("error") {
            return;
        }
        let mut request = element.clone();
        request.remove_attr("from");
        let reply = error.to_stanza_error().reply_to(&request);
        self.send_element(&reply);
    }

    fn send_header(&mut self, lang: Option<&str>) {
        let header = StreamHeader {
            id: Some((self.random)()),
            from: Some(self.domain.to_string()),
            version: Some("1.0".to_owned()),
            lang: Some(lang.unwrap_or("en").to_owned()),
            ..StreamHeader::new(ns::JABBER_CLIENT)
        };
        self.send(stream_header(&header));
        self.header_sent = true;
    }

    fn send_element(&mut self, element: &Element) {
        let mut bytes = Vec::new();
        element.write_to(&mut bytes, WriteContext::stream(ns::JABBER_CLIENT));
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

    fn fail_with(&mut self, error: &StreamError) {
        self.fail(error.condition(), None);
    }

    /// A stream error (preceded by our header if none was sent, RFC 6120 §4.9.1.1), the end
    /// of the stream and [`Output::Close`].
    fn fail(&mut self, condition: Condition, text: Option<&str>) {
        if !self.header_sent {
            self.send_header(None);
        }
        self.send(stream_error(condition, text));
        self.send(STREAM_END.to_vec());
        self.close();
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.outputs.push_back(Output::Close);
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};

    use super::*;

    const DOMAIN: &str = "example.org";
    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0'>";
    const PASSWORD: &str = "r0m30myr0m30";

    fn account(name: &str, password: &str) -> Account {
        let salt = b"QSXCR+Q6sek8bf92";
        Account {
            username: Username::new(name).expect("valid username"),
            scram_sha1: sasl::derive_keys(ScramHash::Sha1, password, salt, 512),
            scram_sha256: sasl::derive_keys(ScramHash::Sha256, password, salt, 512),
            updated_at: 0,
        }
    }

    fn session(config: C2sConfig) -> Session {
        let mut counter = 0u32;
        let random: RandomSource = Box::new(move || {
            counter += 1;
            format!("rnd{counter}")
        });
        Session::new(config, random, [7; 32]).expect("valid config")
    }

    fn direct_tls() -> C2sConfig {
        C2sConfig {
            already_tls: true,
            ..C2sConfig::new(DOMAIN)
        }
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

    fn assert_contains(sent: &str, expected: &str) {
        assert!(sent.contains(expected), "{expected:?} not in {sent:?}");
    }

    /// Asserts that the session ended with `condition` as a stream error.
    fn assert_stream_error(sent: &str, others: &[Output], condition: &str) {
        assert_contains(
            sent,
            &format!("<stream:error><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"),
        );
        assert!(sent.ends_with("</stream:stream>"), "{sent}");
        assert_eq!(others.last(), Some(&Output::Close));
    }

    fn text_of(sent: &str, name: &str) -> String {
        let start = sent.find(&format!("<{name} ")).expect("element sent");
        let rest = &sent[start..];
        let open = rest.find('>').expect("start tag") + 1;
        let close = rest.find(&format!("</{name}>")).expect("end tag");
        rest[open..close].to_owned()
    }

    fn auth(mechanism: &str, payload: &[u8]) -> String {
        format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{mechanism}'>{}</auth>",
            B64.encode(payload)
        )
    }

    fn plain(user: &str, password: &str) -> String {
        auth("PLAIN", format!("\0{user}\0{password}").as_bytes())
    }

    fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
        let mut mac = <Hmac<Sha256>>::new_from_slice(key).expect("any key length");
        mac.update(data);
        mac.finalize().into_bytes().to_vec()
    }

    /// The client side of SCRAM-SHA-256 (RFC 5802 §3, RFC 7677).
    struct ScramClient {
        client_first_bare: String,
        server_signature: Vec<u8>,
    }

    impl ScramClient {
        fn new(user: &str) -> Self {
            Self {
                client_first_bare: format!("n={user},r=fyko+d2lbbFgONRv9qkxdawL"),
                server_signature: Vec::new(),
            }
        }

        fn first(&self) -> String {
            format!("n,,{}", self.client_first_bare)
        }

        fn final_message(&mut self, server_first: &str, password: &str) -> String {
            let mut nonce = "";
            let mut salt = Vec::new();
            let mut iterations = 0u32;
            for attr in server_first.split(',') {
                match attr.split_at(2) {
                    ("r=", v) => nonce = v,
                    ("s=", v) => salt = B64.decode(v).expect("salt"),
                    ("i=", v) => iterations = v.parse().expect("iterations"),
                    _ => {}
                }
            }
            // Hi(): PBKDF2-HMAC-SHA-256 with one block.
            let mut block = salt.clone();
            block.extend_from_slice(&1u32.to_be_bytes());
            let mut u = hmac(password.as_bytes(), &block);
            let mut salted = u.clone();
            for _ in 1..iterations {
                u = hmac(password.as_bytes(), &u);
                salted.iter_mut().zip(&u).for_each(|(s, x)| *s ^= x);
            }
            let client_key = hmac(&salted, b"Client Key");
            let stored_key = Sha256::digest(&client_key).to_vec();
            let without_proof = format!("c=biws,r={nonce}");
            let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
            let signature = hmac(&stored_key, auth_message.as_bytes());
            let proof: Vec<u8> = client_key
                .iter()
                .zip(&signature)
                .map(|(k, s)| k ^ s)
                .collect();
            let server_key = hmac(&salted, b"Server Key");
            self.server_signature = hmac(&server_key, auth_message.as_bytes());
            format!("{without_proof},p={}", B64.encode(proof))
        }
    }

    /// Opens the stream over direct TLS and authenticates with PLAIN.
    fn authenticated() -> Session {
        let mut s = session(direct_tls());
        feed(&mut s, HEADER);
        let (_, others) = feed(&mut s, &plain("juliet", PASSWORD));
        assert_eq!(
            others,
            [Output::LookupCredentials(
                Username::new("juliet").expect("valid")
            )]
        );
        s.handle_credentials(Some(account("juliet", PASSWORD)));
        let (sent, _) = drain(&mut s);
        assert_contains(&sent, "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>");
        s
    }

    /// Authenticates, restarts and binds `balcony`.
    fn bound() -> Session {
        let mut s = authenticated();
        feed(&mut s, HEADER);
        let (_, others) = feed(
            &mut s,
            "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
             <resource>balcony</resource></bind></iq>",
        );
        assert!(matches!(others.as_slice(), [Output::Bound(_)]));
        s
    }

    #[test]
    fn a_client_negotiates_starttls_scram_sha_256_and_binding_then_uses_ping_roster_and_disco() {
        let mut s = session(C2sConfig::new(DOMAIN));
        let (sent, others) = feed(&mut s, HEADER);
        assert!(others.is_empty());
        assert_contains(&sent, "<stream:stream xmlns='jabber:client'");
        assert_contains(&sent, "from='example.org'");
        assert_contains(
            &sent,
            "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>\
             </starttls></stream:features>",
        );

        let (sent, others) = feed(
            &mut s,
            "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
        );
        assert_eq!(sent, "<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
        assert_eq!(others, [Output::StartTls]);
        s.handle_tls_established();
        assert_eq!(drain(&mut s), (String::new(), vec![]));

        let (sent, _) = feed(&mut s, HEADER);
        assert_contains(
            &sent,
            "<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>\
             <mechanism>SCRAM-SHA-256</mechanism><mechanism>SCRAM-SHA-1</mechanism>\
             <mechanism>PLAIN</mechanism></mechanisms></stream:features>",
        );
        assert!(!sent.contains("starttls"));

        let mut client = ScramClient::new("juliet");
        let (sent, others) = feed(&mut s, &auth("SCRAM-SHA-256", client.first().as_bytes()));
        assert_eq!(sent, "");
        let juliet = Username::new("juliet").expect("valid");
        assert_eq!(others, [Output::LookupCredentials(juliet.clone())]);
        s.handle_credentials(Some(account("juliet", PASSWORD)));
        let (sent, _) = drain(&mut s);
        let server_first =
            String::from_utf8(B64.decode(text_of(&sent, "challenge")).expect("base64"))
                .expect("utf-8");
        assert!(server_first.starts_with("r=fyko+d2lbbFgONRv9qkxdawLrnd"));
        let client_final = client.final_message(&server_first, PASSWORD);
        let (sent, others) = feed(
            &mut s,
            &format!(
                "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
                B64.encode(client_final)
            ),
        );
        let server_final = B64.decode(text_of(&sent, "success")).expect("base64");
        let expected = format!("v={}", B64.encode(&client.server_signature));
        assert_eq!(server_final, expected.as_bytes());
        assert_eq!(others, [Output::Authenticated(juliet)]);

        let (sent, _) = feed(&mut s, HEADER);
        assert_contains(
            &sent,
            "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>\
             <session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session>\
             </stream:features>",
        );
        let (sent, others) = feed(
            &mut s,
            "<iq type='set' id='bind_1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
             <resource>balcony</resource></bind></iq>",
        );
        let full: Jid = "juliet@example.org/balcony".parse().expect("valid JID");
        assert_eq!(others, [Output::Bound(full)]);
        assert_contains(&sent, "id='bind_1' type='result'");
        assert_contains(
            &sent,
            "<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
             <jid>juliet@example.org/balcony</jid></bind>",
        );

        let (sent, others) = feed(
            &mut s,
            "<iq type='get' id='p1' to='example.org'><ping xmlns='urn:xmpp:ping'/></iq>",
        );
        assert!(others.is_empty());
        assert_contains(&sent, "id='p1' type='result' from='example.org'");
        assert_contains(&sent, "to='juliet@example.org/balcony'");

        let (sent, _) = feed(
            &mut s,
            "<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>",
        );
        assert_contains(&sent, "id='r1' type='result'");
        assert_contains(&sent, "<query xmlns='jabber:iq:roster'/>");

        let (sent, _) = feed(
            &mut s,
            "<iq type='set' id='s1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>",
        );
        assert_contains(&sent, "id='s1' type='result'");

        let (sent, _) = feed(
            &mut s,
            "<iq type='get' id='d1' to='example.org'>\
             <query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
        );
        assert_contains(&sent, "<identity category='server' type='im'/>");
        for feature in [ns::DISCO_INFO, ns::DISCO_ITEMS, ns::PING, ns::ROSTER] {
            assert_contains(&sent, &format!("<feature var='{feature}'/>"));
        }
        let (sent, _) = feed(
            &mut s,
            "<iq type='get' id='d2'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>",
        );
        assert_contains(&sent, "<item jid='pubsub.example.org'/>");

        let notification = Element::builder("message", ns::JABBER_CLIENT)
            .attr("from", "pubsub.example.org")
            .build();
        assert!(s.send_stanza(&notification));
        let (sent, _) = drain(&mut s);
        assert_eq!(sent, "<message from='pubsub.example.org'/>");
    }

    #[test]
    fn plain_over_direct_tls_is_offered_and_accepted_and_a_resource_is_generated() {
        let mut s = session(direct_tls());
        let (sent, _) = feed(&mut s, HEADER);
        assert!(!sent.contains("starttls"));
        assert_contains(&sent, "<mechanism>PLAIN</mechanism>");
        let (_, others) = feed(&mut s, &plain("Juliet", PASSWORD));
        let juliet = Username::new("juliet").expect("valid");
        assert_eq!(others, [Output::LookupCredentials(juliet.clone())]);
        s.handle_credentials(Some(account("juliet", PASSWORD)));
        let (sent, others) = drain(&mut s);
        assert_eq!(sent, "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>");
        assert_eq!(others, [Output::Authenticated(juliet)]);
        feed(&mut s, HEADER);
        let (sent, others) = feed(
            &mut s,
            "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>",
        );
        let [Output::Bound(jid)] = others.as_slice() else {
            panic!("not bound: {others:?}");
        };
        assert_eq!(jid.bare().to_string(), "juliet@example.org");
        assert!(jid.resource().is_some_and(|r| r.starts_with("rnd")));
        assert_contains(&sent, &format!("<jid>{jid}</jid>"));
    }

    #[test]
    fn a_header_to_another_domain_is_host_unknown() {
        let mut s = session(C2sConfig::new(DOMAIN));
        let (sent, others) = feed(&mut s, &HEADER.replace("example.org", "example.net"));
        assert_contains(&sent, "<stream:stream");
        assert_stream_error(&sent, &others, "host-unknown");
        assert!(s.is_closed());
        assert_eq!(feed(&mut s, HEADER), (String::new(), vec![]));
    }

    #[test]
    fn a_header_with_another_content_namespace_is_invalid_namespace() {
        let mut s = session(C2sConfig::new(DOMAIN));
        let (sent, others) = feed(&mut s, &HEADER.replace("jabber:client", "jabber:server"));
        assert_stream_error(&sent, &others, "invalid-namespace");
    }

    #[test]
    fn a_header_without_version_one_is_unsupported_version() {
        let mut s = session(C2sConfig::new(DOMAIN));
        let (sent, others) = feed(
            &mut s,
            &HEADER.replace("to='example.org' version='1.0'", "to='example.org'"),
        );
        assert_stream_error(&sent, &others, "unsupported-version");
        let mut s = session(C2sConfig::new(DOMAIN));
        let (sent, others) = feed(&mut s, &HEADER.replace("version='1.0'>", "version='2.0'>"));
        assert_stream_error(&sent, &others, "unsupported-version");
    }

    #[test]
    fn auth_before_starttls_when_tls_is_required_is_a_policy_violation() {
        let mut s = session(C2sConfig::new(DOMAIN));
        feed(&mut s, HEADER);
        let (sent, others) = feed(&mut s, &plain("juliet", PASSWORD));
        assert_stream_error(&sent, &others, "policy-violation");
        assert!(
            !others
                .iter()
                .any(|o| matches!(o, Output::LookupCredentials(_)))
        );
    }

    #[test]
    fn data_pipelined_after_starttls_is_refused_rather_than_read_as_encrypted() {
        let mut s = session(C2sConfig::new(DOMAIN));
        feed(&mut s, HEADER);
        let (sent, others) = feed(
            &mut s,
            "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><iq type='get' id='x'/>",
        );
        assert!(!sent.contains("proceed"));
        assert!(!others.contains(&Output::StartTls));
        assert_stream_error(&sent, &others, "policy-violation");
    }

    #[test]
    fn plain_on_an_unencrypted_stream_is_refused_with_encryption_required() {
        let config = C2sConfig {
            tls_required: false,
            ..C2sConfig::new(DOMAIN)
        };
        let mut s = session(config);
        let (sent, _) = feed(&mut s, HEADER);
        assert_contains(
            &sent,
            "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><mechanisms",
        );
        assert!(!sent.contains("PLAIN"));
        let (sent, others) = feed(&mut s, &plain("juliet", PASSWORD));
        assert_eq!(
            sent,
            "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><encryption-required/></failure>"
        );
        assert!(others.is_empty());
    }

    #[test]
    fn a_wrong_password_fails_with_not_authorized_and_a_retry_succeeds() {
        let mut s = session(direct_tls());
        feed(&mut s, HEADER);
        feed(&mut s, &plain("juliet", "wrong"));
        s.handle_credentials(Some(account("juliet", PASSWORD)));
        let (sent, others) = drain(&mut s);
        assert_eq!(
            sent,
            "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>"
        );
        assert!(others.is_empty());
        feed(&mut s, &plain("juliet", PASSWORD));
        s.handle_credentials(Some(account("juliet", PASSWORD)));
        let (sent, others) = drain(&mut s);
        assert_contains(&sent, "<success");
        assert!(matches!(others.as_slice(), [Output::Authenticated(_)]));
    }

    #[test]
    fn input_pipelined_during_a_lookup_is_read_after_it_and_bounded_while_waiting() {
        let mut s = session(direct_tls());
        feed(&mut s, HEADER);
        let pipelined = format!("{}{HEADER}", plain("juliet", PASSWORD));
        let (_, others) = feed(&mut s, &pipelined);
        assert_eq!(others.len(), 1);
        s.handle_credentials(Some(account("juliet", PASSWORD)));
        let (sent, _) = drain(&mut s);
        assert_contains(&sent, "<success");
        assert_contains(&sent, "<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>");

        let mut s = session(direct_tls());
        feed(&mut s, HEADER);
        feed(&mut s, &plain("juliet", PASSWORD));
        let flood = " ".repeat(Limits::default().max_stanza_bytes + 1);
        let (sent, others) = feed(&mut s, &flood);
        assert_stream_error(&sent, &others, "policy-violation");
        s.handle_credentials(Some(account("juliet", PASSWORD)));
        assert_eq!(drain(&mut s), (String::new(), vec![]));
    }

    #[test]
    fn an_unknown_user_fails_with_not_authorized() {
        let mut s = session(direct_tls());
        feed(&mut s, HEADER);
        feed(&mut s, &plain("romeo", PASSWORD));
        s.handle_credentials(None);
        let (sent, _) = drain(&mut s);
        assert_contains(&sent, "<not-authorized/>");
    }

    #[test]
    fn a_wrong_scram_proof_fails_with_not_authorized() {
        let mut s = session(direct_tls());
        feed(&mut s, HEADER);
        let mut client = ScramClient::new("juliet");
        feed(&mut s, &auth("SCRAM-SHA-256", client.first().as_bytes()));
        s.handle_credentials(Some(account("juliet", PASSWORD)));
        let (sent, _) = drain(&mut s);
        let server_first =
            String::from_utf8(B64.decode(text_of(&sent, "challenge")).expect("base64"))
                .expect("utf-8");
        let client_final = client.final_message(&server_first, "not the password");
        let (sent, others) = feed(
            &mut s,
            &format!(
                "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
                B64.encode(client_final)
            ),
        );
        assert_contains(&sent, "<not-authorized/>");
        assert!(others.is_empty());
    }

    #[test]
    fn the_third_failed_attempt_closes_the_stream_with_a_policy_violation() {
        let mut s = session(direct_tls());
        feed(&mut s, HEADER);
        for attempt in 1..=3 {
            feed(&mut s, &plain("juliet", "wrong"));
            s.handle_credentials(Some(account("juliet", PASSWORD)));
            let (sent, others) = drain(&mut s);
            assert_contains(&sent, "<not-authorized/>");
            if attempt < 3 {
                assert!(others.is_empty());
            } else {
                assert_stream_error(&sent, &others, "policy-violation");
            }
        }
        assert!(s.is_closed());
    }

    #[test]
    fn an_unknown_mechanism_is_an_invalid_mechanism_failure() {
        let mut s = session(direct_tls());
        feed(&mut s, HEADER);
        let (sent, others) = feed(&mut s, &auth("DIGEST-MD5", b""));
        assert_eq!(
            sent,
            "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><invalid-mechanism/></failure>"
        );
        assert!(others.is_empty());
    }

    #[test]
    fn bad_base64_is_an_incorrect_encoding_failure() {
        let mut s = session(direct_tls());
        feed(&mut s, HEADER);
        let (sent, _) = feed(
            &mut s,
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>!!not b64</auth>",
        );
        assert_contains(&sent, "<incorrect-encoding/>");
    }

    #[test]
    fn abort_is_answered_with_an_aborted_failure() {
        let mut s = session(direct_tls());
        feed(&mut s, HEADER);
        feed(
            &mut s,
            &auth(
                "SCRAM-SHA-256",
                ScramClient::new("juliet").first().as_bytes(),
            ),
        );
        s.handle_credentials(Some(account("juliet", PASSWORD)));
        drain(&mut s);
        let (sent, _) = feed(&mut s, "<abort xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>");
        assert_contains(&sent, "<aborted/>");
    }

    #[test]
    fn an_iq_before_authentication_is_not_authorized() {
        let mut s = session(direct_tls());
        feed(&mut s, HEADER);
        let (sent, others) = feed(
            &mut s,
            "<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>",
        );
        assert_stream_error(&sent, &others, "not-authorized");
    }

    #[test]
    fn an_iq_other_than_bind_before_binding_is_not_authorized() {
        let mut s = authenticated();
        feed(&mut s, HEADER);
        let (sent, others) = feed(
            &mut s,
            "<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>",
        );
        assert_stream_error(&sent, &others, "not-authorized");
    }

    #[test]
    fn an_iq_to_the_server_with_an_unknown_namespace_is_service_unavailable() {
        let mut s = bound();
        let (sent, others) = feed(
            &mut s,
            "<iq type='get' id='v1' to='example.org'><query xmlns='jabber:iq:version'/></iq>",
        );
        assert!(others.is_empty());
        assert_contains(&sent, "id='v1' type='error'");
        assert_contains(
            &sent,
            "<service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>",
        );
    }

    #[test]
    fn an_iq_without_id_is_a_bad_format_stream_error() {
        let mut s = bound();
        let (sent, others) = feed(&mut s, "<iq type='get'><ping xmlns='urn:xmpp:ping'/></iq>");
        assert_stream_error(&sent, &others, "bad-format");
    }

    #[test]
    fn an_iq_with_two_payloads_gets_a_bad_request_error() {
        let mut s = bound();
        let (sent, others) = feed(
            &mut s,
            "<iq type='get' id='x' from='mallory@evil.example'><a xmlns='urn:a'/><b xmlns='urn:b'/></iq>",
        );
        assert!(others.is_empty());
        assert_contains(&sent, "id='x' type='error'");
        assert_contains(
            &sent,
            "<bad-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>",
        );
        assert!(!sent.contains("mallory"));
    }

    #[test]
    fn a_spoofed_from_is_replaced_by_the_sessions_full_jid() {
        let mut s = bound();
        let full: Jid = "juliet@example.org/balcony".parse().expect("valid JID");
        let (sent, others) = feed(
            &mut s,
            "<message to='romeo@example.net' from='romeo@example.net/x' type='chat'>\
             <body>hi</body></message>",
        );
        assert_eq!(sent, "");
        let [Output::Stanza(stanza)] = others.as_slice() else {
            panic!("not passed out: {others:?}");
        };
        let Stanza::Message(message) = &**stanza else {
            panic!("not passed out: {others:?}");
        };
        assert_eq!(message.from.as_ref(), Some(&full));
        assert_eq!(message.body().as_deref(), Some("hi"));

        let (_, others) = feed(
            &mut s,
            "<iq type='set' id='pub' to='pubsub.example.org' from='admin@example.org/x'>\
             <pubsub xmlns='http://jabber.org/protocol/pubsub'/></iq>",
        );
        let [Output::Stanza(stanza)] = others.as_slice() else {
            panic!("not passed out: {others:?}");
        };
        let Stanza::Iq(iq) = &**stanza else {
            panic!("not passed out: {others:?}");
        };
        assert_eq!(iq.from.as_ref(), Some(&full));
        assert_eq!(iq.to.as_ref().map(Jid::domain), Some("pubsub.example.org"));

        let (_, others) = feed(&mut s, "<presence/>");
        let [Output::Stanza(stanza)] = others.as_slice() else {
            panic!("not passed out: {others:?}");
        };
        let Stanza::Presence(presence) = &**stanza else {
            panic!("not passed out: {others:?}");
        };
        assert_eq!(presence.from.as_ref(), Some(&full));
    }

    #[test]
    fn a_closing_stream_tag_is_answered_with_one_and_close() {
        let mut s = bound();
        let (sent, others) = feed(&mut s, "</stream:stream>");
        assert_eq!(sent, "</stream:stream>");
        assert_eq!(others, [Output::Close]);
        assert!(s.is_closed());
    }

    #[test]
    fn a_doctype_is_a_restricted_xml_stream_error_and_close() {
        let mut s = session(C2sConfig::new(DOMAIN));
        feed(&mut s, HEADER);
        let (sent, others) = feed(&mut s, "<!DOCTYPE foo>");
        assert_stream_error(&sent, &others, "restricted-xml");
    }

    #[test]
    fn shutdown_sends_system_shutdown_and_close() {
        let mut s = bound();
        s.shutdown();
        let (sent, others) = drain(&mut s);
        assert_stream_error(&sent, &others, "system-shutdown");
        assert!(!s.send_stanza(&Element::new("message", ns::JABBER_CLIENT)));
        s.shutdown();
        assert_eq!(drain(&mut s), (String::new(), vec![]));
    }

    #[test]
    fn a_config_requiring_unavailable_tls_is_refused() {
        let config = C2sConfig {
            tls_available: false,
            ..C2sConfig::new(DOMAIN)
        };
        let result = Session::new(config, Box::new(String::new), [0; 32]);
        assert_eq!(result.err(), Some(C2sConfigError::TlsUnavailable));
    }
}
