//! The catch-up protocol: the reliable side of a propagate pipe.
//!
//! Gossipsub delivery is best-effort. A peer that sees a gap in a pipe's offsets, or that
//! (re)joins it, asks a gateway for the items after the last offset it has, a bounded page at
//! a time, over request-response (`/juxta/catch-up/1`, CBOR). Items come back as encoded
//! [`Envelope`](crate::envelope::Envelope)s, exactly as the pipe carries them, so a peer
//! handles both the same way and ends with every item, in order, once.

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/juxta/catch-up/1");
/// Most items one page holds.
pub const MAX_PAGE_ITEMS: u32 = 256;
/// Most envelope bytes one page holds (a page stops early rather than exceed it; one item
/// always fits).
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Largest request accepted (a request is small: names, an offset and a credential).
pub const MAX_REQUEST_BYTES: u64 = 16 * 1024;
/// Largest response accepted: a full page and its framing.
pub const MAX_RESPONSE_BYTES: u64 =
    (MAX_PAGE_BYTES + crate::envelope::MAX_ENVELOPE_BYTES) as u64 + 64 * 1024;

/// "Send me what follows `after` in `node`."
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatchUpRequest {
    /// The node's group.
    pub group: String,
    /// The node.
    pub node: String,
    /// The last offset the peer has (0: from the start).
    pub after: u64,
    /// Most items wanted; the server caps it at [`MAX_PAGE_ITEMS`].
    pub limit: u32,
    /// The peer's membership credential, for protected groups
    /// ([`Credential::to_bytes`](crate::group::Credential::to_bytes)).
    #[serde(default, with = "serde_bytes")]
    pub credential: Option<Vec<u8>>,
}

/// The answer to a [`CatchUpRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CatchUpResponse {
    /// A page of history.
    Page(Page),
    /// The request was refused; `code` is stable (`not_member`, `node_not_found`,
    /// `bad_request`, `unavailable`).
    Refused {
        /// Stable reason code.
        code: String,
        /// For people.
        message: String,
    },
}

/// Items after the requested offset, in offset order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// The node's history id; a different one than the peer knew means the history was
    /// reset and the peer starts over.
    pub epoch: u64,
    /// The oldest offset history still holds: a peer asking from before it missed the
    /// offsets in between (they are reported, never silently skipped).
    pub first_offset: u64,
    /// The newest offset: the peer is caught up when it has this one.
    pub last_offset: u64,
    /// Encoded envelopes.
    pub items: Vec<serde_bytes::ByteBuf>,
}

impl CatchUpResponse {
    /// A refusal.
    pub fn refused(code: &str, message: impl Into<String>) -> Self {
        Self::Refused {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}
