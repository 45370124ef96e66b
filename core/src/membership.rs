//! XEP-0060 §4.1: who is affiliated with a node and who is subscribed to it.
//!
//! These are the XMPP side's records of a node. HTTP and overlay subscribers are live
//! streams with their own resume positions and are not recorded here; an XMPP subscription
//! is state that outlives the session that made it, so the store keeps it with the node and
//! drops it when the node is deleted.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// An entity's affiliation with a node (XEP-0060 §4.1, table 4). Having none is the absence
/// of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Affiliation {
    /// Manages the node: configuration, affiliations, subscriptions, purge, delete.
    Owner,
    /// Publishes and retracts, and subscribes.
    Publisher,
    /// Publishes and retracts its own items, and cannot subscribe.
    PublishOnly,
    /// On the whitelist: may subscribe and retrieve items.
    Member,
    /// Banned: may do nothing with the node.
    Outcast,
}

impl Affiliation {
    /// The XEP-0060 name (`owner`, `publisher`, `publish-only`, `member`, `outcast`).
    pub fn as_str(self) -> &'static str {
        match self {
            Affiliation::Owner => "owner",
            Affiliation::Publisher => "publisher",
            Affiliation::PublishOnly => "publish-only",
            Affiliation::Member => "member",
            Affiliation::Outcast => "outcast",
        }
    }

    /// The affiliation named `s`; `None` for `none` and unknown names.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "owner" => Affiliation::Owner,
            "publisher" => Affiliation::Publisher,
            "publish-only" => Affiliation::PublishOnly,
            "member" => Affiliation::Member,
            "outcast" => Affiliation::Outcast,
            _ => return None,
        })
    }
}

/// Where a subscription stands (XEP-0060 §4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubscriptionState {
    /// Notifications are delivered.
    Subscribed,
    /// Waiting for an owner's approval (access model `authorize`).
    Pending,
}

impl SubscriptionState {
    /// The XEP-0060 name.
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionState::Subscribed => "subscribed",
            SubscriptionState::Pending => "pending",
        }
    }
}

/// One XMPP subscription to a node. A JID may hold several, told apart by `subid`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSubscription {
    /// The subscribed address, bare or full, as the subscriber gave it.
    pub jid: Arc<str>,
    /// The subscription id (XEP-0060 §6.1.6).
    pub subid: Arc<str>,
    /// Subscribed or pending.
    pub state: SubscriptionState,
    /// When it was made (ms since the Unix epoch).
    pub created_at: u64,
}
