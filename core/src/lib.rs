//! juxta's core: the model, the bus, access policy and storage.
//!
//! # Layout
//!
//! - [`model`]: nodes, items, payloads, offsets, epochs, events, node configuration.
//! - [`access`]: principals and their grants.
//! - [`account`]: XMPP accounts with salted SCRAM credentials.
//! - [`membership`]: XEP-0060 affiliations and XMPP subscriptions of a node.
//! - [`store`]: the [`Store`] trait — the sequencer and history of every node — with the
//!   memory and embedded (redb) backends.
//! - [`fanout`]: per-node rings of committed events and the [`Subscription`] that reads them,
//!   filling gaps from the store.
//! - [`bus`]: the one way in for every adapter.
//!
//! Data moves one way: an adapter calls [`Bus::publish`] → the bus authorizes and calls
//! [`Store::append`] → the store commits (fsync), then hands the [`Event`] to its
//! [`CommitSink`], the [`FanOut`] → the fan-out pushes it into the node's ring → every
//! [`Subscription`] reads it in offset order. The publish call returns after the commit.
#![warn(missing_docs)]

pub mod access;
pub mod account;
pub mod bus;
mod error;
pub mod fanout;
mod json;
pub mod membership;
pub mod metrics;
pub mod model;
pub mod store;
pub mod time;
mod xml;

pub use access::{Grants, Pattern, Principal};
pub use account::{Account, ScramKeys, Username};
pub use bus::{Bus, Limits, NodeInfo, Publish};
pub use error::Error;
pub use fanout::{Delivery, FanOut, NotRecovered, Resume, Subscription};
pub use json::{item as item_json, ws_text_frame};
pub use membership::{Affiliation, NodeSubscription, SubscriptionState};
pub use metrics::Metrics;
pub use model::{
    AccessModel, Change, ContentType, Epoch, Event, EventKind, Item, ItemId, NodeConfig, NodeMeta,
    NodeName, Offset, Origin, OverflowPolicy, Payload, PublishModel, Record, SendLastPublished,
};
pub use store::{
    Append, Appended, CommitSink, EmbeddedConfig, EmbeddedStore, MemberChanges, MemoryStore,
    RedisConfig, RedisStore, Store,
};
