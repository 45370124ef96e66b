//! The bus: every adapter's one way in. Authorize → append to the store (durable when the
//! store is) → acknowledge; the store's commit hands the event to fan-out.

use std::sync::Arc;

use crate::access::Principal;
use crate::error::Error;
use crate::fanout::{FanOut, Resume, Subscription};
use crate::model::{Epoch, Item, ItemId, NodeConfig, NodeMeta, NodeName, Offset, Origin, Payload};
use crate::store::{Append, Appended, ItemsPage, Op, Store};

/// Default largest payload, in bytes.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1 << 20;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;
/// Most items one history read returns.
pub const MAX_PAGE: usize = 1000;

/// Limits the bus enforces on every adapter's behalf.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest payload accepted.
    pub max_payload_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}

/// A publish request.
#[derive(Clone, Debug)]
pub struct Publish {
    /// The node.
    pub node: NodeName,
    /// The item id; the service assigns one when `None`.
    pub id: Option<ItemId>,
    /// The content.
    pub payload: Payload,
    /// Makes retries safe: see [`Append::idempotency_key`].
    pub idempotency_key: Option<String>,
}

/// A node and how many subscribe to it here.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// What the store knows.
    pub meta: NodeMeta,
    /// Live subscriptions on this instance.
    pub subscribers: usize,
}

/// The bus. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Bus {
    store: Arc<dyn Store>,
    fanout: Arc<FanOut>,
    limits: Limits,
}

fn forbidden(what: &str, node: &NodeName) -> Error {
    Error::Forbidden(format!("not allowed to {what} node {node}"))
}

impl Bus {
    /// A bus over `store`, whose commit sink must be `fanout`.
    pub fn new(store: Arc<dyn Store>, fanout: Arc<FanOut>, limits: Limits) -> Self {
        Self {
            store,
            fanout,
            limits,
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Creates or reconfigures a node (admins only); `true` when created.
    pub async fn put_node(
        &self,
        who: &Principal,
        name: NodeName,
        config: NodeConfig,
    ) -> Result<(NodeMeta, bool), Error> {
        if !who.is_admin() {
            return Err(forbidden("configure", &name));
        }
        config.validate()?;
        self.store.put_node(name, config).await
    }

    /// Deletes a node (admins only).
    pub async fn delete_node(
        &self,
        who: &Principal,
        name: &NodeName,
        origin: Origin,
    ) -> Result<(), Error> {
        if !who.is_admin() {
            return Err(forbidden("delete", name));
        }
        self.store.delete_node(name, origin).await
    }

    /// One node, for those who may read it.
    pub async fn node(&self, who: &Principal, name: &NodeName) -> Result<NodeInfo, Error> {
        if !who.can_subscribe(name.as_str()) {
            return Err(forbidden("read", name));
        }
        let meta = self
            .store
            .node(name)
            .await?
            .ok_or_else(|| Error::NodeNotFound(name.to_string()))?;
        Ok(self.info(meta))
    }

    fn info(&self, meta: NodeMeta) -> NodeInfo {
        let subscribers = self.fanout.subscriber_count(&meta.name);
        NodeInfo { meta, subscribers }
    }

    /// The nodes `who` may read.
    pub async fn nodes(&self, who: &Principal) -> Result<Vec<NodeInfo>, Error> {
        let all = self.store.nodes().await?;
        Ok(all
            .into_iter()
            .filter(|m| who.can_subscribe(m.name.as_str()))
            .map(|m| self.info(m))
            .collect())
    }

    fn check_publish(&self, who: &Principal, p: &Publish) -> Result<(), Error> {
        if !who.can_publish(p.node.as_str()) {
            return Err(forbidden("publish to", &p.node));
        }
        if p.payload.len() > self.limits.max_payload_bytes {
            return Err(Error::PayloadTooLarge {
                size: p.payload.len(),
                limit: self.limits.max_payload_bytes,
            });
        }
        if let Some(k) = &p.idempotency_key
            && (k.is_empty()
                || k.len() > MAX_IDEMPOTENCY_KEY_BYTES
                || k.chars().any(char::is_control))
        {
            return Err(Error::InvalidIdempotencyKey(
                "must be 1 to 255 bytes without control characters".into(),
            ));
        }
        Ok(())
    }

    fn to_append(who: &Principal, p: Publish, origin: Origin) -> Append {
        Append {
            node: p.node,
            op: Op::Publish {
                id: p.id.unwrap_or_else(ItemId::generate),
                payload: p.payload,
                publisher: who.name(),
            },
            idempotency_key: p.idempotency_key,
            origin,
        }
    }

    /// Publishes one item. Returns once the item is stored; subscribers get it after.
    pub async fn publish(
        &self,
        who: &Principal,
        p: Publish,
        origin: Origin,
    ) -> Result<Appended, Error> {
        self.check_publish(who, &p)?;
        let mut r = self
            .store
            .append(vec![Self::to_append(who, p, origin)])
            .await;
        r.pop()
            .unwrap_or_else(|| Err(Error::Storage("empty append result".into())))
    }

    /// Publishes several items, to one or more nodes, in one commit; one result each, in order.
    pub async fn publish_batch(
        &self,
        who: &Principal,
        batch: Vec<Publish>,
        origin: Origin,
    ) -> Vec<Result<Appended, Error>> {
        let mut results: Vec<Option<Result<Appended, Error>>> = Vec::with_capacity(batch.len());
        let mut appends = Vec::new();
        for p in batch {
            match self.check_publish(who, &p) {
                Ok(()) => {
                    appends.push(Self::to_append(who, p, origin));
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let mut stored = self.store.append(appends).await.into_iter();
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    stored
                        .next()
                        .unwrap_or_else(|| Err(Error::Storage("missing append result".into())))
                })
            })
            .collect()
    }

    /// Retracts an item (publishers of the node).
    pub async fn retract(
        &self,
        who: &Principal,
        node: &NodeName,
        id: ItemId,
        origin: Origin,
    ) -> Result<Appended, Error> {
        if !who.can_publish(node.as_str()) {
            return Err(forbidden("retract from", node));
        }
        let a = Append {
            node: node.clone(),
            op: Op::Retract(id),
            idempotency_key: None,
            origin,
        };
        let mut r = self.store.append(vec![a]).await;
        r.pop()
            .unwrap_or_else(|| Err(Error::Storage("empty append result".into())))
    }

    /// Removes every item (admins only).
    pub async fn purge(
        &self,
        who: &Principal,
        node: &NodeName,
        origin: Origin,
    ) -> Result<Appended, Error> {
        if !who.is_admin() {
            return Err(forbidden("purge", node));
        }
        let a = Append {
            node: node.clone(),
            op: Op::Purge,
            idempotency_key: None,
            origin,
        };
        let mut r = self.store.append(vec![a]).await;
        r.pop()
            .unwrap_or_else(|| Err(Error::Storage("empty append result".into())))
    }

    /// Current items after `after`, at most `limit` (capped at [`MAX_PAGE`]). With `epoch`,
    /// fails with [`Error::EpochMismatch`] when the node's history was reset since.
    pub async fn items(
        &self,
        who: &Principal,
        node: &NodeName,
        after: Offset,
        limit: usize,
        epoch: Option<Epoch>,
    ) -> Result<ItemsPage, Error> {
        if !who.can_subscribe(node.as_str()) {
            return Err(forbidden("read", node));
        }
        let page = self
            .store
            .items(node, after, limit.clamp(1, MAX_PAGE))
            .await?;
        if let Some(e) = epoch
            && e != page.meta.epoch
        {
            return Err(Error::EpochMismatch {
                given: e.to_string(),
                current: page.meta.epoch.to_string(),
            });
        }
        if after > page.meta.last_offset {
            return Err(Error::OffsetOutOfRange {
                after,
                last: page.meta.last_offset,
            });
        }
        Ok(page)
    }

    /// One current item.
    pub async fn item(
        &self,
        who: &Principal,
        node: &NodeName,
        id: &ItemId,
    ) -> Result<(Offset, Item), Error> {
        if !who.can_subscribe(node.as_str()) {
            return Err(forbidden("read", node));
        }
        self.store
            .item(node, id)
            .await?
            .ok_or_else(|| Error::ItemNotFound(id.to_string()))
    }

    /// Subscribes to a node from a resume point.
    pub async fn subscribe(
        &self,
        who: &Principal,
        node: &NodeName,
        resume: Resume,
    ) -> Result<Subscription, Error> {
        if !who.can_subscribe(node.as_str()) {
            return Err(forbidden("subscribe to", node));
        }
        Subscription::open(
            self.store.clone(),
            self.fanout.clone(),
            node.clone(),
            resume,
        )
        .await
    }
}
