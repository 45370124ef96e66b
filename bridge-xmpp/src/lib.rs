//! juxta's XMPP bridge. So far: the sans-IO XML stream codec that the c2s server, the
//! external component (XEP-0114) and XMPP over WebSocket (RFC 7395) will share, and the
//! server side of SASL.
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
//! - [`sasl`]: SCRAM-SHA-256, SCRAM-SHA-1 and PLAIN against stored credentials, no I/O.
//! - `error`: [`StreamError`] and its RFC 6120 [`Condition`].
//!
//! Data moves: connection bytes → [`Decoder::feed`] → [`Decoder::next`] → [`Frame`] →
//! (typed stanza, session logic) → [`Element`] → [`Element::write_to`] → connection bytes.
//! No module does I/O; a driver owns the socket and calls in.
#![warn(missing_docs)]

mod codec;
mod element;
mod error;
pub mod ns;
mod parse;
pub mod sasl;
mod scan;
mod writer;

pub use codec::{
    DEFAULT_MAX_ATTRIBUTES, DEFAULT_MAX_DEPTH, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_STANZA_BYTES,
    Decoder, Frame, Limits, StreamHeader,
};
pub use element::{Attribute, Element, ElementBuilder, Node};
pub use error::{Condition, StreamError};
pub use writer::{
    AddressedStanza, STREAM_END, SharedStanza, WriteContext, stream_error, stream_header,
};
