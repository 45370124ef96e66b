//! Links: the bounded outbound queue of one XMPP stream (a c2s session or a component
//! connection), and the [`StanzaHandler`] trait through which services receive stanzas.
//!
//! Whoever produces stanzas for a stream — the pubsub service fanning out a notification,
//! a reply to an iq — queues an [`Outbound`] on the stream's [`Link`]; the stream's driver
//! task drains the queue and writes. The queue is bounded: when a stream does not read
//! fast enough its queue fills, [`Link::send`] returns `false`, and the link is marked
//! overloaded so that its driver closes the stream (a `policy-violation` stream error)
//! instead of letting memory grow.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

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

/// What a link and its queue share. An idle stream holds only this (no slots are
/// allocated until something is queued, and they are given back once drained): there may
/// be tens of thousands of idle streams.
struct Shared {
    queue: Mutex<VecDeque<Outbound>>,
    capacity: usize,
    /// Wakes the queue's reader: something was queued, the link overflowed, or the last
    /// link handle went away.
    wake: Notify,
    /// Wakes whoever waits in [`Link::overloaded`].
    overload: Notify,
    overloaded: AtomicBool,
    /// Link handles alive; the queue reports the end once none is and it is empty.
    links: AtomicUsize,
    /// Whether the queue (the driver) is still there.
    open: AtomicBool,
}

impl Shared {
    fn pop(&self) -> Option<Outbound> {
        let mut queue = self.queue.lock();
        let out = queue.pop_front()?;
        if queue.is_empty() && queue.capacity() > 0 {
            // Drained: give the slots back.
            *queue = VecDeque::new();
        }
        Some(out)
    }
}

/// The sending side of a stream's outbound queue. Cheap to clone.
pub struct Link {
    shared: Arc<Shared>,
    content_ns: &'static str,
}

impl Clone for Link {
    fn clone(&self) -> Self {
        self.shared.links.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
            content_ns: self.content_ns,
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if self.shared.links.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.wake.notify_one();
        }
    }
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("content_ns", &self.content_ns)
            .field("queued", &self.shared.queue.lock().len())
            .finish_non_exhaustive()
    }
}

impl Link {
    /// A link for a stream whose stanzas are in `content_ns` (`jabber:client` or
    /// `jabber:component:accept`), queueing at most `capacity`; the driver reads the
    /// [`LinkQueue`].
    pub fn new(capacity: usize, content_ns: &'static str) -> (Self, LinkQueue) {
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            wake: Notify::new(),
            overload: Notify::new(),
            overloaded: AtomicBool::new(false),
            links: AtomicUsize::new(1),
            open: AtomicBool::new(true),
        });
        (
            Self {
                shared: shared.clone(),
                content_ns,
            },
            LinkQueue { shared },
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
        let shared = &*self.shared;
        if !shared.open.load(Ordering::Acquire) {
            return false;
        }
        {
            let mut queue = shared.queue.lock();
            if queue.len() >= shared.capacity {
                drop(queue);
                if !shared.overloaded.swap(true, Ordering::AcqRel) {
                    shared.overload.notify_waiters();
                    shared.wake.notify_one();
                }
                return false;
            }
            queue.push_back(out);
        }
        shared.wake.notify_one();
        true
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

    /// Completes once the queue has overflowed; the driver then closes the stream.
    pub async fn overloaded(&self) {
        let notified = self.shared.overload.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_overloaded() {
            return;
        }
        notified.await;
    }

    /// Whether the queue has overflowed.
    pub fn is_overloaded(&self) -> bool {
        self.shared.overloaded.load(Ordering::Acquire)
    }

    /// Whether the driver has dropped the receiving side.
    pub fn is_closed(&self) -> bool {
        !self.shared.open.load(Ordering::Acquire)
    }

    /// Whether two handles are the same link.
    pub fn same(&self, other: &Link) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

/// The receiving side of a link, read by the stream's driver.
pub struct LinkQueue {
    shared: Arc<Shared>,
}

impl fmt::Debug for LinkQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkQueue")
            .field("queued", &self.shared.queue.lock().len())
            .finish_non_exhaustive()
    }
}

/// [`LinkQueue::try_recv`] found nothing queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Empty;

/// What [`LinkQueue::next`] found.
#[derive(Debug)]
pub enum Next {
    /// A queued stanza.
    Stanza(Outbound),
    /// The queue overflowed (reported until the driver stops asking).
    Overloaded,
    /// Every link handle is gone and nothing is queued.
    Closed,
}

impl LinkQueue {
    /// The next queued stanza without waiting.
    pub fn try_recv(&mut self) -> Result<Outbound, Empty> {
        self.shared.pop().ok_or(Empty)
    }

    /// The next queued stanza, waiting for one; `None` once every link handle is gone and
    /// nothing is queued.
    pub async fn recv(&mut self) -> Option<Outbound> {
        loop {
            match self.next_ignoring_overload().await {
                Next::Stanza(out) => return Some(out),
                Next::Closed => return None,
                Next::Overloaded => {}
            }
        }
    }

    async fn next_ignoring_overload(&mut self) -> Next {
        loop {
            let notified = self.shared.wake.notified();
            if let Some(out) = self.shared.pop() {
                return Next::Stanza(out);
            }
            if self.shared.links.load(Ordering::Acquire) == 0 {
                return Next::Closed;
            }
            notified.await;
        }
    }

    /// The next queued stanza, or [`Next::Overloaded`] as soon as the queue overflowed.
    pub async fn next(&mut self) -> Next {
        loop {
            let notified = self.shared.wake.notified();
            if self.shared.overloaded.load(Ordering::Acquire) {
                return Next::Overloaded;
            }
            if let Some(out) = self.shared.pop() {
                return Next::Stanza(out);
            }
            if self.shared.links.load(Ordering::Acquire) == 0 {
                return Next::Closed;
            }
            notified.await;
        }
    }
}

impl Drop for LinkQueue {
    fn drop(&mut self) {
        self.shared.open.store(false, Ordering::Release);
        self.shared.queue.lock().clear();
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

    /// Handles stanzas that arrived together on one stream, in order, as if each had been
    /// given to [`StanzaHandler::handle`] in turn; a service may commit them together.
    fn handle_batch<'a>(&'a self, stanzas: Vec<Stanza>, link: &'a Link) -> HandlerFuture<'a> {
        Box::pin(async move {
            for stanza in stanzas {
                self.handle(stanza, link).await;
            }
        })
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn bytes(n: u8) -> Outbound {
        Outbound::Bytes(Bytes::from(vec![n]))
    }

    fn byte(out: Outbound) -> u8 {
        match out {
            Outbound::Bytes(b) => b[0],
            Outbound::Shared { .. } => panic!("bytes expected"),
        }
    }

    #[tokio::test]
    async fn stanzas_come_out_in_order_and_a_full_queue_overloads_once() {
        let (link, mut queue) = Link::new(3, crate::ns::JABBER_CLIENT);
        for n in 0..3 {
            assert!(link.send(bytes(n)));
        }
        assert!(!link.is_overloaded());
        assert!(!link.send(bytes(3)), "the fourth does not fit");
        assert!(link.is_overloaded());
        tokio::time::timeout(Duration::from_secs(1), link.overloaded())
            .await
            .expect("overloaded completes once the queue overflowed");
        assert!(matches!(queue.next().await, Next::Overloaded));
        let got: Vec<u8> = std::iter::from_fn(|| queue.try_recv().ok())
            .map(byte)
            .collect();
        assert_eq!(got, vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn a_waiting_reader_wakes_for_a_stanza_and_ends_when_every_link_is_gone() {
        let (link, mut queue) = Link::new(8, crate::ns::JABBER_CLIENT);
        let copy = link.clone();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(out) = queue.recv().await {
                got.push(byte(out));
            }
            got
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(link.send(bytes(7)));
        drop(link);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(copy.send(bytes(8)));
        drop(copy);
        let got = tokio::time::timeout(Duration::from_secs(1), reader)
            .await
            .expect("the reader ends once no link is left")
            .expect("no panic");
        assert_eq!(got, vec![7, 8]);
    }

    #[tokio::test]
    async fn a_drained_queue_holds_no_slots_and_a_dropped_one_refuses_stanzas() {
        let (link, mut queue) = Link::new(64, crate::ns::JABBER_CLIENT);
        for n in 0..10 {
            assert!(link.send(bytes(n)));
        }
        while queue.try_recv().is_ok() {}
        assert_eq!(link.shared.queue.lock().capacity(), 0);
        assert_eq!(queue.try_recv().err(), Some(Empty));
        drop(queue);
        assert!(link.is_closed());
        assert!(!link.send(bytes(1)));
    }
}
