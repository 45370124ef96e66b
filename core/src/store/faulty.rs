//! A store wrapper that fails on demand, for testing what the layers above do when storage
//! breaks: nothing unacknowledged may reach subscribers, and offsets stay contiguous.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;

use super::{Append, Appended, ItemsPage, Page, Store};
use crate::account::{Account, Username};
use crate::error::Error;
use crate::membership::{Affiliation, NodeSubscription};
use crate::model::{Item, ItemId, NodeConfig, NodeMeta, NodeName, Offset, Origin};

/// Wraps a store; the next `n` appends (or reads) fail with [`Error::Storage`] after
/// [`FaultyStore::fail_appends`] (or [`FaultyStore::fail_reads`]).
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    append_faults: AtomicU32,
    read_faults: AtomicU32,
}

impl FaultyStore {
    /// Wraps `inner`, failing nothing yet.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            append_faults: AtomicU32::new(0),
            read_faults: AtomicU32::new(0),
        }
    }

    /// Makes the next `n` append batches fail as a whole, as a failed commit would.
    pub fn fail_appends(&self, n: u32) {
        self.append_faults.store(n, Ordering::SeqCst);
    }

    /// Makes the next `n` history reads fail.
    pub fn fail_reads(&self, n: u32) {
        self.read_faults.store(n, Ordering::SeqCst);
    }

    fn take(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn injected() -> Error {
        Error::Storage("injected fault".into())
    }
}

#[async_trait]
impl Store for FaultyStore {
    async fn put_node(
        &self,
        name: NodeName,
        config: NodeConfig,
    ) -> Result<(NodeMeta, bool), Error> {
        self.inner.put_node(name, config).await
    }
    async fn node(&self, name: &NodeName) -> Result<Option<NodeMeta>, Error> {
        self.inner.node(name).await
    }
    async fn nodes(&self) -> Result<Vec<NodeMeta>, Error> {
        self.inner.nodes().await
    }
    async fn delete_node(&self, name: &NodeName, origin: Origin) -> Result<(), Error> {
        self.inner.delete_node(name, origin).await
    }
    async fn append(&self, batch: Vec<Append>) -> Vec<Result<Appended, Error>> {
        if Self::take(&self.append_faults) {
            return batch.iter().map(|_| Err(Self::injected())).collect();
        }
        self.inner.append(batch).await
    }
    async fn read(&self, node: &NodeName, after: Offset, limit: usize) -> Result<Page, Error> {
        if Self::take(&self.read_faults) {
            return Err(Self::injected());
        }
        self.inner.read(node, after, limit).await
    }
    async fn items(
        &self,
        node: &NodeName,
        after: Offset,
        limit: usize,
    ) -> Result<ItemsPage, Error> {
        self.inner.items(node, after, limit).await
    }
    async fn item(&self, node: &NodeName, id: &ItemId) -> Result<Option<(Offset, Item)>, Error> {
        self.inner.item(node, id).await
    }
    async fn put_account(&self, account: Account) -> Result<bool, Error> {
        self.inner.put_account(account).await
    }
    async fn account(&self, username: &Username) -> Result<Option<Account>, Error> {
        self.inner.account(username).await
    }
    async fn delete_account(&self, username: &Username) -> Result<(), Error> {
        self.inner.delete_account(username).await
    }
    async fn accounts(&self) -> Result<Vec<Username>, Error> {
        self.inner.accounts().await
    }
    async fn set_affiliation(
        &self,
        node: &NodeName,
        jid: &str,
        affiliation: Option<Affiliation>,
    ) -> Result<(), Error> {
        self.inner.set_affiliation(node, jid, affiliation).await
    }
    async fn affiliations(&self, node: &NodeName) -> Result<Vec<(Arc<str>, Affiliation)>, Error> {
        self.inner.affiliations(node).await
    }
    async fn put_subscription(&self, node: &NodeName, sub: NodeSubscription) -> Result<(), Error> {
        self.inner.put_subscription(node, sub).await
    }
    async fn delete_subscription(
        &self,
        node: &NodeName,
        jid: &str,
        subid: &str,
    ) -> Result<bool, Error> {
        self.inner.delete_subscription(node, jid, subid).await
    }
    async fn subscriptions(&self, node: &NodeName) -> Result<Vec<NodeSubscription>, Error> {
        self.inner.subscriptions(node).await
    }
    fn ready(&self) -> Result<(), Error> {
        self.inner.ready()
    }
    async fn close(&self) {
        self.inner.close().await;
    }
}
