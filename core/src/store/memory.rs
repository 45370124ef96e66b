//! A store that keeps everything in memory: for tests and for throwaway instances.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use super::log::{self, LogTx};
use super::{Append, Appended, CommitSink, ItemsPage, Op, Page, Store};
use crate::account::{Account, Username};
use crate::error::Error;
use crate::membership::{Affiliation, NodeSubscription};
use crate::model::{
    Change, Event, Item, ItemId, NodeConfig, NodeMeta, NodeName, Offset, Origin, Record,
};
use crate::time;

/// In-memory store. Its epochs are new on every start, so clients learn that history is gone.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    sink: Arc<dyn CommitSink>,
    idempotency_window: Duration,
}

#[derive(Debug, Default)]
struct Inner {
    nodes: HashMap<NodeName, MemNode>,
    accounts: BTreeMap<Username, Account>,
}

#[derive(Debug)]
struct MemNode {
    meta: NodeMeta,
    log: BTreeMap<Offset, Record>,
    items: HashMap<ItemId, Offset>,
    /// key → (expires_at, result)
    idem: HashMap<String, (u64, Appended)>,
    /// jid → affiliation; ordered so listings come out sorted by JID.
    affiliations: BTreeMap<Arc<str>, Affiliation>,
    /// (jid, subid) → subscription; ordered so listings come out sorted.
    subscriptions: BTreeMap<(Arc<str>, Arc<str>), NodeSubscription>,
}

struct Tx<'a> {
    log: &'a mut BTreeMap<Offset, Record>,
    items: &'a mut HashMap<ItemId, Offset>,
}

impl LogTx for Tx<'_> {
    fn put_record(&mut self, record: &Record) -> Result<(), Error> {
        self.log.insert(record.offset, record.clone());
        Ok(())
    }
    fn take_record(&mut self, offset: Offset) -> Result<Option<Record>, Error> {
        Ok(self.log.remove(&offset))
    }
    fn item_offset(&mut self, id: &ItemId) -> Result<Option<Offset>, Error> {
        Ok(self.items.get(id).copied())
    }
    fn set_item(&mut self, id: &ItemId, offset: Offset) -> Result<Option<Offset>, Error> {
        Ok(self.items.insert(id.clone(), offset))
    }
    fn remove_item(&mut self, id: &ItemId) -> Result<(), Error> {
        self.items.remove(id);
        Ok(())
    }
}

impl MemoryStore {
    /// An empty store that reports commits to `sink`.
    pub fn new(sink: Arc<dyn CommitSink>) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            sink,
            idempotency_window: super::DEFAULT_IDEMPOTENCY_WINDOW,
        }
    }

    fn append_one(&self, inner: &mut Inner, a: Append, now: u64) -> Result<Appended, Error> {
        let n = inner
            .nodes
            .get_mut(&a.node)
            .ok_or_else(|| Error::NodeNotFound(a.node.to_string()))?;
        if let Some(key) = &a.idempotency_key
            && let Some((expires, first)) = n.idem.get(key)
            && *expires > now
        {
            return Ok(Appended {
                duplicate: true,
                ..first.clone()
            });
        }
        let item_id = match &a.op {
            Op::Publish { id, .. } | Op::Retract(id) => Some(id.clone()),
            Op::Purge => None,
        };
        let mut meta = n.meta.clone();
        let record = log::apply(
            &mut meta,
            a.op,
            now,
            &mut Tx {
                log: &mut n.log,
                items: &mut n.items,
            },
        )?;
        n.meta = meta;
        let appended = Appended {
            node: a.node.clone(),
            offset: record.offset,
            epoch: n.meta.epoch,
            item_id,
            duplicate: false,
        };
        if let Some(key) = a.idempotency_key {
            let expires = now + self.idempotency_window.as_millis() as u64;
            n.idem.retain(|_, (e, _)| *e > now);
            n.idem.insert(key, (expires, appended.clone()));
        }
        self.sink
            .committed(Arc::new(Event::new(a.node, n.meta.epoch, record, a.origin)));
        Ok(appended)
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn put_node(
        &self,
        name: NodeName,
        config: NodeConfig,
    ) -> Result<(NodeMeta, bool), Error> {
        config.validate()?;
        let mut inner = self.inner.lock();
        if let Some(n) = inner.nodes.get_mut(&name) {
            n.meta.config = config;
            let mut meta = n.meta.clone();
            log::trim(
                &mut meta,
                &mut Tx {
                    log: &mut n.log,
                    items: &mut n.items,
                },
            )?;
            n.meta = meta.clone();
            return Ok((meta, false));
        }
        let meta = NodeMeta::new(name.clone(), config);
        inner.nodes.insert(
            name,
            MemNode {
                meta: meta.clone(),
                log: BTreeMap::new(),
                items: HashMap::new(),
                idem: HashMap::new(),
                affiliations: BTreeMap::new(),
                subscriptions: BTreeMap::new(),
            },
        );
        Ok((meta, true))
    }

    async fn node(&self, name: &NodeName) -> Result<Option<NodeMeta>, Error> {
        Ok(self.inner.lock().nodes.get(name).map(|n| n.meta.clone()))
    }

    async fn nodes(&self) -> Result<Vec<NodeMeta>, Error> {
        let mut v: Vec<_> = self
            .inner
            .lock()
            .nodes
            .values()
            .map(|n| n.meta.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    async fn delete_node(&self, name: &NodeName, origin: Origin) -> Result<(), Error> {
        let mut inner = self.inner.lock();
        let n = inner
            .nodes
            .remove(name)
            .ok_or_else(|| Error::NodeNotFound(name.to_string()))?;
        let record = Record {
            offset: n.meta.last_offset + 1,
            change: Change::Deleted,
            at: time::now_ms(),
        };
        self.sink.committed(Arc::new(Event::new(
            name.clone(),
            n.meta.epoch,
            record,
            origin,
        )));
        Ok(())
    }

    async fn append(&self, batch: Vec<Append>) -> Vec<Result<Appended, Error>> {
        let now = time::now_ms();
        let mut inner = self.inner.lock();
        batch
            .into_iter()
            .map(|a| self.append_one(&mut inner, a, now))
            .collect()
    }

    async fn read(&self, node: &NodeName, after: Offset, limit: usize) -> Result<Page, Error> {
        let inner = self.inner.lock();
        let n = inner
            .nodes
            .get(node)
            .ok_or_else(|| Error::NodeNotFound(node.to_string()))?;
        let records = n
            .log
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(_, r)| r.clone())
            .collect();
        Ok(Page {
            meta: n.meta.clone(),
            records,
        })
    }

    async fn items(
        &self,
        node: &NodeName,
        after: Offset,
        limit: usize,
    ) -> Result<ItemsPage, Error> {
        let inner = self.inner.lock();
        let n = inner
            .nodes
            .get(node)
            .ok_or_else(|| Error::NodeNotFound(node.to_string()))?;
        let items = n
            .log
            .range(after.saturating_add(1)..)
            .filter_map(|(o, r)| match &r.change {
                Change::Published(item) if n.items.get(&item.id) == Some(o) => {
                    Some((*o, item.clone()))
                }
                _ => None,
            })
            .take(limit)
            .collect();
        Ok(ItemsPage {
            meta: n.meta.clone(),
            items,
        })
    }

    async fn item(&self, node: &NodeName, id: &ItemId) -> Result<Option<(Offset, Item)>, Error> {
        let inner = self.inner.lock();
        let n = inner
            .nodes
            .get(node)
            .ok_or_else(|| Error::NodeNotFound(node.to_string()))?;
        Ok(n.items.get(id).and_then(|o| match n.log.get(o) {
            Some(Record {
                change: Change::Published(item),
                ..
            }) => Some((*o, item.clone())),
            _ => None,
        }))
    }

    async fn put_account(&self, account: Account) -> Result<bool, Error> {
        let mut inner = self.inner.lock();
        Ok(inner
            .accounts
            .insert(account.username.clone(), account)
            .is_none())
    }

    async fn account(&self, username: &Username) -> Result<Option<Account>, Error> {
        Ok(self.inner.lock().accounts.get(username).cloned())
    }

    async fn delete_account(&self, username: &Username) -> Result<(), Error> {
        match self.inner.lock().accounts.remove(username) {
            Some(_) => Ok(()),
            None => Err(Error::AccountNotFound(username.to_string())),
        }
    }

    async fn accounts(&self) -> Result<Vec<Username>, Error> {
        Ok(self.inner.lock().accounts.keys().cloned().collect())
    }

    async fn set_affiliation(
        &self,
        node: &NodeName,
        jid: &str,
        affiliation: Option<Affiliation>,
    ) -> Result<(), Error> {
        let mut inner = self.inner.lock();
        let n = inner
            .nodes
            .get_mut(node)
            .ok_or_else(|| Error::NodeNotFound(node.to_string()))?;
        match affiliation {
            Some(a) => {
                n.affiliations.insert(Arc::from(jid), a);
            }
            None => {
                n.affiliations.remove(jid);
            }
        }
        Ok(())
    }

    async fn affiliations(&self, node: &NodeName) -> Result<Vec<(Arc<str>, Affiliation)>, Error> {
        let inner = self.inner.lock();
        let n = inner
            .nodes
            .get(node)
            .ok_or_else(|| Error::NodeNotFound(node.to_string()))?;
        Ok(n.affiliations
            .iter()
            .map(|(jid, a)| (jid.clone(), *a))
            .collect())
    }

    async fn put_subscription(&self, node: &NodeName, sub: NodeSubscription) -> Result<(), Error> {
        let mut inner = self.inner.lock();
        let n = inner
            .nodes
            .get_mut(node)
            .ok_or_else(|| Error::NodeNotFound(node.to_string()))?;
        n.subscriptions
            .insert((sub.jid.clone(), sub.subid.clone()), sub);
        Ok(())
    }

    async fn delete_subscription(
        &self,
        node: &NodeName,
        jid: &str,
        subid: &str,
    ) -> Result<bool, Error> {
        let mut inner = self.inner.lock();
        let Some(n) = inner.nodes.get_mut(node) else {
            return Ok(false);
        };
        Ok(n.subscriptions
            .remove(&(Arc::from(jid), Arc::from(subid)))
            .is_some())
    }

    async fn subscriptions(&self, node: &NodeName) -> Result<Vec<NodeSubscription>, Error> {
        let inner = self.inner.lock();
        let n = inner
            .nodes
            .get(node)
            .ok_or_else(|| Error::NodeNotFound(node.to_string()))?;
        Ok(n.subscriptions.values().cloned().collect())
    }

    fn ready(&self) -> Result<(), Error> {
        Ok(())
    }

    async fn close(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[tokio::test]
    async fn memory_store_passes_the_store_conformance_suite() {
        conformance::run(
            |sink| async move { Ok(Arc::new(MemoryStore::new(sink)) as Arc<dyn Store>) },
        )
        .await;
    }
}
