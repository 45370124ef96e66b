//! juxta's XMPP bridge. So far: the sans-IO XML stream codec that the c2s server, the
//! external component (XEP-0114) and XMPP over WebSocket (RFC 7395) will share, the
//! server side of SASL and the client-to-server session negotiation.
//!
//! # Layout
//!
//! - [`ns`]: the namespace names, one constant each.
//! - `element`: [`Element`], the owned tree with resolved namespaces that typed stanzas
//!   will convert from; it does not leave the bridge.
//! - `codec`: the [`Decoder`]: bytes in, [`Frame`]s out (stream header, stanza, stream
//!   end), under [`Limits`]. Internally `scan` finds where a stanza ends (resumable, refusing
//!   restricted XML and enforcing size and depth while the stanza is incomplete) and
//!   `parse` turns the complete stanza into an [`Element`] with quick-xml.
//! - `writer`: serialization: [`Element::write_to`], [`stream_header`], [`stream_error`],
//!   and [`SharedStanza`], which writes a notification once and addresses copies to many
//!   recipients.
//! - [`link`]: [`Link`], the bounded outbound queue of a stream, and [`StanzaHandler`], how
//!   streams hand stanzas to a service.
//! - [`metrics`]: sessions, auth failures, stanzas and bytes, for the gateway's registry.
//! - [`server`]: the c2s listener, the thin tokio driver that runs a [`c2s::Session`] per
//!   connection (STARTTLS, account lookups, per-IP limit, handshake and idle timeouts).
//! - [`pubsub`]: the XEP-0060 service at `pubsub.<domain>` on the core bus: requests in,
//!   replies and notifications out through links.
//! - [`router`]: the registry of bound local sessions and their presence.
//! - [`tls`]: the rustls server configuration for STARTTLS and direct TLS (XEP-0368), from
//!   PEM files or a self-signed development certificate.
//! - [`sasl`]: SCRAM-SHA-256, SCRAM-SHA-1 and PLAIN against stored credentials, no I/O.
//! - `error`: [`StreamError`] and its RFC 6120 [`Condition`].
//! - `jid`: [`Jid`], an RFC 7622 address (parsed, validated, ASCII-lowercased).
//! - `stanza`: typed RFC 6120 §8 stanzas, [`Iq`], [`Message`], [`Presence`] (and
//!   [`Stanza`], any of them), converted from an [`Element`] with `TryFrom` (failing with a
//!   [`StanzaParseError`]) and back with `From`; and [`StanzaError`], the `<error/>` of a
//!   stanza with its [`DefinedCondition`].
//! - [`c2s`]: the client-to-server [`c2s::Session`]: stream headers, STARTTLS, SASL and
//!   resource binding as steps, then the stanzas of the bound client; bytes and lookups in,
//!   [`c2s::Output`]s out.
//! - [`component`]: the external component (XEP-0114): [`component::Session`], the
//!   handshake and the checks on incoming stanzas without I/O, and [`component::run`], the
//!   driver that connects out to an XMPP server, hands stanzas to a [`StanzaHandler`] and
//!   reconnects with backoff.
//!
//! Data moves: connection bytes → [`Decoder::feed`] → [`Decoder::next`] → [`Frame`] →
//! (typed stanza, session logic) → [`Element`] → [`Element::write_to`] → connection bytes.
//! No module does I/O; a driver owns the socket and calls in.
#![warn(missing_docs)]

pub mod c2s;
mod codec;
pub mod component;
mod element;
mod error;
mod jid;
pub mod link;
pub mod metrics;
pub mod ns;
mod parse;
pub mod pubsub;
pub mod router;
pub mod sasl;
mod scan;
pub mod server;
mod stanza;
pub mod tls;
pub mod websocket;
mod writer;

pub use codec::{
    DEFAULT_MAX_ATTRIBUTES, DEFAULT_MAX_DEPTH, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_STANZA_BYTES,
    Decoder, Frame, Limits, StreamHeader,
};
pub use element::{Attribute, Element, ElementBuilder, Node};
pub use error::{Condition, StreamError};
pub use jid::{Jid, JidError, JidPart, MAX_JID_PART_BYTES};
pub use link::{Link, LinkQueue, Next, Outbound, StanzaHandler};
pub use stanza::{
    DefinedCondition, ErrorType, Iq, IqType, Message, MessageType, Presence, PresenceType, Show,
    Stanza, StanzaError, StanzaParseError, UnknownValue,
};
pub use writer::{
    AddressedStanza, STREAM_END, SharedStanza, WriteContext, stream_error, stream_header,
};
