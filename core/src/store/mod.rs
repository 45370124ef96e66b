//! Storage: the [`Store`] trait and its backends.
//!
//! A store is the sequencer of every node: it assigns offsets, keeps history, applies
//! retention, remembers idempotency keys, and — once a change is durable — hands the resulting
//! [`Event`] to its [`CommitSink`] in offset order. The bus fans out only what a store has
//! committed, so "acknowledged" always means "stored, then delivered", never the other way.
//!
//! Backends: [`MemoryStore`] (tests, nothing kept), [`EmbeddedStore`] (a redb file, the
//! default; fsync before acknowledgement, group commit), [`RedisStore`] (the shared engine of
//! several instances), and [`FaultyStore`], a wrapper that
//! fails on demand for tests. The log rules every backend shares
//! live in the private `log` module.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::account::{Account, Username};
use crate::error::Error;
use crate::membership::{Affiliation, NodeSubscription};
use crate::model::{
    Epoch, Event, Item, ItemId, NodeConfig, NodeMeta, NodeName, Offset, Origin, Payload, Record,
};

mod codec;
mod embedded;
mod faulty;
mod log;
mod memory;
mod redis;

pub use embedded::{EmbeddedConfig, EmbeddedStore};
pub use faulty::FaultyStore;
pub use memory::MemoryStore;
pub use redis::{Engine, RedisConfig, RedisStore};

/// How long an idempotency key is remembered by default.
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Receives every committed event, in offset order per node, exactly once.
pub trait CommitSink: Send + Sync + Debug {
    /// Called after the change behind `event` is durable.
    fn committed(&self, event: Arc<Event>);
}

/// A change to append to a node's history.
#[derive(Clone, Debug)]
pub enum Op {
    /// Publish (or overwrite) an item.
    Publish {
        /// Its id.
        id: ItemId,
        /// Its content.
        payload: Payload,
        /// Who publishes.
        publisher: Arc<str>,
    },
    /// Retract an item; fails with [`Error::ItemNotFound`] if it is not there.
    Retract(ItemId),
    /// Remove every item.
    Purge,
}

/// One append request.
#[derive(Clone, Debug)]
pub struct Append {
    /// The node.
    pub node: NodeName,
    /// The change.
    pub op: Op,
    /// A client-chosen key: a second append with the same key on the same node within the
    /// window returns the first result and changes nothing.
    pub idempotency_key: Option<String>,
    /// Who produced it.
    pub origin: Origin,
}

/// The result of a successful append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The node.
    pub node: NodeName,
    /// The offset given to the change.
    pub offset: Offset,
    /// The node's epoch.
    pub epoch: Epoch,
    /// The item's id, for publishes and retractions.
    pub item_id: Option<ItemId>,
    /// True when this answered a repeated idempotency key and nothing was appended.
    pub duplicate: bool,
}

/// A slice of a node's history.
#[derive(Clone, Debug)]
pub struct Page {
    /// The node as it was when the page was read.
    pub meta: NodeMeta,
    /// Records in offset order.
    pub records: Vec<Record>,
}

/// Current items of a node, in offset order.
#[derive(Clone, Debug)]
pub struct ItemsPage {
    /// The node as it was when the page was read.
    pub meta: NodeMeta,
    /// `(offset, item)` pairs.
    pub items: Vec<(Offset, Item)>,
}

/// What [`Store::member_changes`] found.
#[derive(Clone, Debug, Default)]
pub struct MemberChanges {
    /// Where the next call goes on from.
    pub cursor: u64,
    /// Nodes whose affiliations or subscriptions changed after the cursor given (repeats
    /// possible).
    pub nodes: Vec<NodeName>,
    /// `false` when the changes since the cursor given are no longer all known (the log was
    /// trimmed past it, or lost): read every node's memberships again.
    pub complete: bool,
}

/// Where nodes and their histories live.
#[async_trait]
pub trait Store: Send + Sync + Debug + 'static {
    /// Creates `name` or replaces its configuration; `true` when it was created.
    async fn put_node(&self, name: NodeName, config: NodeConfig)
    -> Result<(NodeMeta, bool), Error>;

    /// One node.
    async fn node(&self, name: &NodeName) -> Result<Option<NodeMeta>, Error>;

    /// Every node, by name.
    async fn nodes(&self) -> Result<Vec<NodeMeta>, Error>;

    /// Deletes a node and its history; its subscribers get a `deleted` event.
    async fn delete_node(&self, name: &NodeName, origin: Origin) -> Result<(), Error>;

    /// Appends changes, group-committed; results come back in request order.
    async fn append(&self, batch: Vec<Append>) -> Vec<Result<Appended, Error>>;

    /// History records with offsets above `after`, at most `limit`.
    async fn read(&self, node: &NodeName, after: Offset, limit: usize) -> Result<Page, Error>;

    /// Current items with offsets above `after`, at most `limit`.
    async fn items(&self, node: &NodeName, after: Offset, limit: usize)
    -> Result<ItemsPage, Error>;

    /// One current item.
    async fn item(&self, node: &NodeName, id: &ItemId) -> Result<Option<(Offset, Item)>, Error>;

    /// Creates or replaces an account; `true` when it was created.
    async fn put_account(&self, account: Account) -> Result<bool, Error>;

    /// One account.
    async fn account(&self, username: &Username) -> Result<Option<Account>, Error>;

    /// Deletes an account; [`Error::AccountNotFound`] if there is none.
    async fn delete_account(&self, username: &Username) -> Result<(), Error>;

    /// Every username, sorted.
    async fn accounts(&self) -> Result<Vec<Username>, Error>;

    /// Sets `jid`'s affiliation with `node`, or removes it with `None`;
    /// [`Error::NodeNotFound`] if there is no such node.
    async fn set_affiliation(
        &self,
        node: &NodeName,
        jid: &str,
        affiliation: Option<Affiliation>,
    ) -> Result<(), Error>;

    /// The affiliations of `node`, sorted by JID; [`Error::NodeNotFound`] if there is none.
    async fn affiliations(&self, node: &NodeName) -> Result<Vec<(Arc<str>, Affiliation)>, Error>;

    /// Adds a subscription, or replaces the one with the same JID and subid;
    /// [`Error::NodeNotFound`] if there is no such node.
    async fn put_subscription(&self, node: &NodeName, sub: NodeSubscription) -> Result<(), Error>;

    /// Removes a subscription; `true` if it existed. Unknown nodes have none.
    async fn delete_subscription(
        &self,
        node: &NodeName,
        jid: &str,
        subid: &str,
    ) -> Result<bool, Error>;

    /// The subscriptions of `node`, sorted by JID, then subid; [`Error::NodeNotFound`] if
    /// there is no such node.
    async fn subscriptions(&self, node: &NodeName) -> Result<Vec<NodeSubscription>, Error>;

    /// Every node's name, sorted; cheaper than [`Store::nodes`] where names are kept apart.
    async fn node_names(&self) -> Result<Vec<NodeName>, Error> {
        Ok(self.nodes().await?.into_iter().map(|m| m.name).collect())
    }

    /// For instances sharing this store: which nodes' affiliations or subscriptions changed
    /// after `cursor` (`None`: only the cursor of now). A store only one instance uses keeps
    /// no such log and answers "incomplete", i.e. read them all.
    async fn member_changes(&self, cursor: Option<u64>) -> Result<MemberChanges, Error> {
        let _ = cursor;
        Ok(MemberChanges::default())
    }

    /// Whether the store can take writes now (readiness).
    fn ready(&self) -> Result<(), Error>;

    /// Finishes pending writes and releases resources.
    async fn close(&self);
}

#[cfg(test)]
pub(crate) mod conformance;
