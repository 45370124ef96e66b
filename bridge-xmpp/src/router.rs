//! The local session registry: which resources of which accounts are bound on this
//! instance, their presence, and the [`Link`] that reaches each.
//!
//! The c2s driver registers a session once it is bound and unregisters it when the stream
//! ends; its presence broadcasts (presence without `to`) update availability. The pubsub
//! service asks the router to deliver notifications and replies to local addresses.
//! RFC 6121 §8.5 decides where a stanza to a bare JID goes: here, to every available
//! resource with a non-negative priority; when the caller does not require presence and
//! no resource is available, to every bound resource.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::jid::Jid;
use crate::link::{Link, Outbound};
use crate::writer::SharedStanza;

/// One bound resource.
#[derive(Debug, Clone)]
struct Resource {
    resource: Arc<str>,
    full: Arc<str>,
    link: Link,
    /// Sent an available presence (RFC 6121 §4.2) and not since an unavailable one.
    available: bool,
    priority: i8,
}

/// Where local addresses are reached.
#[derive(Debug, Default)]
pub struct Router {
    /// Bare JID → its bound resources (few per account: a short vector).
    sessions: RwLock<HashMap<Arc<str>, Vec<Resource>>>,
}

/// How a delivery to a bare JID picks resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Available resources; every bound one if none is available.
    Bound,
    /// Available resources only (XEP-0060 `pubsub#presence_based_delivery`).
    Available,
}

impl Router {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a bound session `jid` (a full JID) reached through `link`; a session with
    /// the same full JID is replaced (its stream is about to be closed by its driver).
    pub fn register(&self, jid: &Jid, link: Link) {
        let Some(resource) = jid.resource() else {
            return;
        };
        let bare: Arc<str> = jid.bare().to_string().into();
        let entry = Resource {
            resource: resource.into(),
            full: jid.to_string().into(),
            link,
            available: false,
            priority: 0,
        };
        let mut sessions = self.sessions.write();
        let list = sessions.entry(bare).or_default();
        list.retain(|r| &*r.resource != resource);
        list.push(entry);
    }

    /// Unregisters the session `jid` if it is still reached through `link`.
    pub fn unregister(&self, jid: &Jid, link: &Link) {
        let bare = jid.bare().to_string();
        let mut sessions = self.sessions.write();
        if let Some(list) = sessions.get_mut(bare.as_str()) {
            list.retain(|r| !(Some(&*r.resource) == jid.resource() && r.link.same(link)));
            if list.is_empty() {
                sessions.remove(bare.as_str());
            }
        }
    }

    /// Records a presence broadcast of the session `jid`; returns `true` when it became
    /// available (it was not before).
    pub fn set_presence(&self, jid: &Jid, available: bool, priority: i8) -> bool {
        let bare = jid.bare().to_string();
        let mut sessions = self.sessions.write();
        let Some(r) = sessions.get_mut(bare.as_str()).and_then(|list| {
            list.iter_mut()
                .find(|r| Some(&*r.resource) == jid.resource())
        }) else {
            return false;
        };
        let became = available && !r.available;
        r.available = available;
        r.priority = priority;
        became
    }

    /// Whether any resource of the bare JID `bare` is available.
    pub fn is_available(&self, bare: &str) -> bool {
        self.sessions
            .read()
            .get(bare)
            .is_some_and(|list| list.iter().any(|r| r.available && r.priority >= 0))
    }

    /// Number of bound sessions.
    pub fn len(&self) -> usize {
        self.sessions.read().values().map(Vec::len).sum()
    }

    /// Whether no session is bound.
    pub fn is_empty(&self) -> bool {
        self.sessions.read().is_empty()
    }

    /// Calls `f` with the link and full JID of every resource `to` reaches: the one
    /// resource of a full JID, or the resources [`Reach`] picks for a bare JID. Returns
    /// how many were reached.
    pub fn for_each(&self, to: &str, reach: Reach, mut f: impl FnMut(&Link, &Arc<str>)) -> usize {
        let (bare, resource) = match to.split_once('/') {
            Some((bare, resource)) => (bare, Some(resource)),
            None => (to, None),
        };
        let sessions = self.sessions.read();
        let Some(list) = sessions.get(bare) else {
            return 0;
        };
        if let Some(resource) = resource {
            return list
                .iter()
                .filter(|r| &*r.resource == resource)
                .map(|r| f(&r.link, &r.full))
                .count();
        }
        let available = list.iter().filter(|r| r.available && r.priority >= 0);
        let n = available.clone().count();
        if n > 0 {
            available.for_each(|r| f(&r.link, &r.full));
            n
        } else if reach == Reach::Bound {
            list.iter().for_each(|r| f(&r.link, &r.full));
            list.len()
        } else {
            0
        }
    }

    /// Queues a copy of `stanza` addressed `to` (bare or full) on every resource it
    /// reaches. Returns `(delivered, refused)`: refused copies hit a full queue.
    pub fn deliver(
        &self,
        to: &Arc<str>,
        stanza: &Arc<SharedStanza>,
        reach: Reach,
    ) -> (usize, usize) {
        let mut refused = 0;
        let reached = self.for_each(to, reach, |link, _| {
            let ok = link.send(Outbound::Shared {
                stanza: stanza.clone(),
                to: to.clone(),
            });
            refused += usize::from(!ok);
        });
        (reached - refused, refused)
    }
}
