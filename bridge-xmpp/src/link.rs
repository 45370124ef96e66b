//! Links: the bounded outbound queue of one XMPP stream (a c2s session or a component
//! connection), and the [`StanzaHandler`] trait through which services receive stanzas.
//!
//! Whoever produces stanzas for a stream — the pubsub service fanning out a notification,
//! a reply to an iq — queues an [`Outbound`] on the stream's [`Link`]; the stream's driver
//! task drains the queue and writes. The queue is bounded: when a stream does not read
//! fast enough its queue fills, [`Link::send`] returns `false`, and the link is marked
//! overloaded so that its driver closes the stream (a `policy-violation` stream error)
//! instead of letting memory grow.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::element::Element;
use crate::stanza::Stanza;
use crate::writer::{SharedStanza, WriteContext};

/// Default number of stanzas a link queues before its stream counts as overloaded.
pub const DEFAULT_LINK_CAPACITY: usize = 1024;

/// One stanza queued for a stream.
#[derive(Debug)]
pub enum Outbound {
    /// A copy of a stanza serialized once for many recipients; the driver writes it
    /// addressed `to`.
    Shared {
        /// The shared bytes.
        stanza: Arc<SharedStanza>,
        /// The recipient.
        to: Arc<str>,
    },
    /// A stanza already serialized for this stream.
    Bytes(Bytes),
}

/// The sending side of a stream's outbound queue. Cheap to clone.
#[derive(Clone)]
pub struct Link {
    tx: mpsc::Sender<Outbound>,
    content_ns: &'static str,
    overloaded: CancellationToken,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("content_ns", &self.content_ns)
            .field("queued", &(self.tx.max_capacity() - self.tx.capacity()))
            .finish_non_exhaustive()
    }
}

impl Link {
    /// A link for a stream whose stanzas are in `content_ns` (`jabber:client` or
    /// `jabber:component:accept`), queueing at most `capacity`; the driver reads the
    /// receiver.
    pub fn new(capacity: usize, content_ns: &'static str) -> (Self, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Self {
                tx,
                content_ns,
                overloaded: CancellationToken::new(),
            },
            rx,
        )
    }

    /// The content namespace of the stream: stanzas built for it use this namespace, so
    /// that they are written without an `xmlns`.
    pub fn content_ns(&self) -> &'static str {
        self.content_ns
    }

    /// Queues `out`. `false` when the stream is gone or its queue is full; a full queue also
    /// marks the link overloaded (see [`Link::overloaded`]).
    pub fn send(&self, out: Outbound) -> bool {
        match self.tx.try_send(out) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overloaded.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Serializes `stanza` for this stream and queues it. A stanza built in another
    /// content namespace (`jabber:client` on a component stream) is written in this one.
    pub fn send_element(&self, stanza: &Element) -> bool {
        let bytes = if stanza.ns() == self.content_ns {
            stanza.to_bytes(WriteContext::stream(self.content_ns))
        } else {
            let mut renamed = stanza.clone();
            let from = renamed.ns().to_owned();
            renamed.rename_ns(&from, self.content_ns);
            renamed.to_bytes(WriteContext::stream(self.content_ns))
        };
        self.send(Outbound::Bytes(Bytes::from(bytes)))
    }

    /// Cancelled once the queue overflowed; the driver then closes the stream.
    pub fn overloaded(&self) -> &CancellationToken {
        &self.overloaded
    }

    /// Whether the driver has dropped the receiving side.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Whether two handles are the same link.
    pub fn same(&self, other: &Link) -> bool {
        self.tx.same_channel(&other.tx)
    }
}

/// A boxed future, as [`StanzaHandler`] returns.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A service that stanzas are routed to (the pubsub service). Stream drivers call it with
/// every stanza addressed to the service, with the link of the stream it came on; replies
/// and later notifications go out through links.
pub trait StanzaHandler: Send + Sync + 'static {
    /// Handles one stanza. `stanza.from` has been set (c2s) or checked (component) by the
    /// stream, so it can be trusted as the sender's address.
    fn handle<'a>(&'a self, stanza: Stanza, link: &'a Link) -> HandlerFuture<'a>;

    /// A component stream to the server of `domain`'s users came up: stanzas to addresses
    /// outside the local domain can go through `link` from now on.
    fn attached(&self, link: Link);

    /// The component stream went down.
    fn detached(&self, link: &Link);

    /// A local session sent a presence broadcast (RFC 6121 §4.2); `became_available` is
    /// true when it was not available before. Services that deliver by presence use it.
    fn presence_changed<'a>(
        &'a self,
        jid: &'a crate::jid::Jid,
        became_available: bool,
    ) -> HandlerFuture<'a> {
        let _ = (jid, became_available);
        Box::pin(async {})
    }
}
