//! The default store: one redb file in the data directory.
//!
//! Writes go through one writer thread that group-commits: it takes every request waiting in
//! its queue (up to [`MAX_BATCH`]), applies them in one write transaction, commits once with
//! `Durability::Immediate` (an fsync), and only then emits the events and answers the
//! callers. Many concurrent publishers therefore share one fsync, and an acknowledged publish
//! survives `kill -9` and power loss. Reads run on tokio's blocking pool against MVCC
//! snapshots and never wait for the writer.
//!
//! Tables: `nodes` (name → meta JSON), `log` ((node, offset) → record), `items`
//! ((node, item id) → offset of the current version), `idempotency` ((node, key) → entry),
//! `accounts` (username → account JSON), `affiliations` ((node, jid) → XEP-0060 name),
//! `subscriptions` ((node, jid, subid) → state and creation time as JSON). Keys are tuples
//! led by the node, so everything of one node is one contiguous range (see `node_range`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::codec::{self, IdemEntry};
use super::log::{self, LogTx};
use super::{Append, Appended, CommitSink, ItemsPage, Op, Page, Store};
use crate::account::{Account, Username};
use crate::error::Error;
use crate::membership::{Affiliation, NodeSubscription, SubscriptionState};
use crate::metrics::Metrics;
use crate::model::{
    Change, Epoch, Event, Item, ItemId, NodeConfig, NodeMeta, NodeName, Offset, Origin, Record,
};
use crate::time;

const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
const LOG: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("log");
const ITEMS: TableDefinition<(&str, &str), u64> = TableDefinition::new("items");
const IDEM: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("idempotency");
const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("accounts");
const AFFILIATIONS: TableDefinition<(&str, &str), &str> = TableDefinition::new("affiliations");
const SUBSCRIPTIONS: TableDefinition<(&str, &str, &str), &[u8]> =
    TableDefinition::new("subscriptions");

/// Most requests one commit takes.
const MAX_BATCH: usize = 1024;
/// Requests that may wait for the writer; past this, callers wait for room (backpressure).
const QUEUE_CAPACITY: usize = 8192;
/// How often expired idempotency keys are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Settings of the file store.
#[derive(Clone, Debug)]
pub struct EmbeddedConfig {
    /// The database file.
    pub path: PathBuf,
    /// redb's page cache, in bytes.
    pub cache_bytes: usize,
    /// How long idempotency keys are remembered.
    pub idempotency_window: Duration,
}

impl EmbeddedConfig {
    /// Defaults for a file at `path`: 64 MiB of cache, a 24 h idempotency window.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            cache_bytes: 64 << 20,
            idempotency_window: super::DEFAULT_IDEMPOTENCY_WINDOW,
        }
    }
}

/// The redb-backed store.
#[derive(Debug)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    tx: mpsc::SyncSender<Cmd>,
    alive: Arc<AtomicBool>,
}

enum Cmd {
    Append(Vec<Append>, oneshot::Sender<Vec<Result<Appended, Error>>>),
    PutNode(
        NodeName,
        NodeConfig,
        oneshot::Sender<Result<(NodeMeta, bool), Error>>,
    ),
    DeleteNode(NodeName, Origin, oneshot::Sender<Result<(), Error>>),
    PutAccount(Box<Account>, oneshot::Sender<Result<bool, Error>>),
    DeleteAccount(Username, oneshot::Sender<Result<(), Error>>),
    SetAffiliation(
        NodeName,
        Arc<str>,
        Option<Affiliation>,
        oneshot::Sender<Result<(), Error>>,
    ),
    PutSubscription(
        NodeName,
        NodeSubscription,
        oneshot::Sender<Result<(), Error>>,
    ),
    DeleteSubscription(
        NodeName,
        Arc<str>,
        Arc<str>,
        oneshot::Sender<Result<bool, Error>>,
    ),
    Close(oneshot::Sender<()>),
}

#[derive(Serialize, Deserialize)]
struct StoredMeta {
    config: NodeConfig,
    epoch: u64,
    last_offset: u64,
    first_offset: u64,
    item_count: u64,
    created_at: u64,
}

fn encode_meta(m: &NodeMeta) -> Vec<u8> {
    // Serializing plain data to a Vec cannot fail.
    serde_json::to_vec(&StoredMeta {
        config: m.config.clone(),
        epoch: m.epoch.0,
        last_offset: m.last_offset,
        first_offset: m.first_offset,
        item_count: m.item_count,
        created_at: m.created_at,
    })
    .unwrap_or_default()
}

/// A subscription's value; its JID and subid are the key.
#[derive(Serialize, Deserialize)]
struct StoredSubscription {
    state: SubscriptionState,
    created_at: u64,
}

pub(super) fn encode_subscription(s: &NodeSubscription) -> Vec<u8> {
    // Serializing plain data to a Vec cannot fail.
    serde_json::to_vec(&StoredSubscription {
        state: s.state,
        created_at: s.created_at,
    })
    .unwrap_or_default()
}

pub(super) fn decode_subscription(
    node: &str,
    jid: &str,
    subid: &str,
    b: &[u8],
) -> Result<NodeSubscription, Error> {
    let s: StoredSubscription = serde_json::from_slice(b)
        .map_err(|e| Error::Storage(format!("subscription {node}/{jid}/{subid}: {e}")))?;
    Ok(NodeSubscription {
        jid: Arc::from(jid),
        subid: Arc::from(subid),
        state: s.state,
        created_at: s.created_at,
    })
}

/// The first key of `node`'s range, and the first key past it: `node` followed by NUL is the
/// least string greater than `node`, so no other node's keys fall in between, whatever the
/// JIDs and subids (which have no length limit that a sentinel upper bound could rely on).
fn node_range(node: &str) -> (&str, String) {
    (node, format!("{node}\u{0}"))
}

fn decode_meta(name: &str, b: &[u8]) -> Result<NodeMeta, Error> {
    let s: StoredMeta =
        serde_json::from_slice(b).map_err(|e| Error::Storage(format!("node {name}: {e}")))?;
    Ok(NodeMeta {
        name: NodeName::new(name)?,
        config: s.config,
        epoch: Epoch(s.epoch),
        last_offset: s.last_offset,
        first_offset: s.first_offset,
        item_count: s.item_count,
        created_at: s.created_at,
    })
}

impl EmbeddedStore {
    /// Opens (or creates) the database and starts the writer thread.
    pub fn open(
        cfg: EmbeddedConfig,
        sink: Arc<dyn CommitSink>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Error> {
        if let Some(dir) = cfg.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Storage(format!("{}: {e}", dir.display())))?;
        }
        let db = Database::builder()
            .set_cache_size(cfg.cache_bytes)
            .create(&cfg.path)
            .map_err(|e| Error::Storage(format!("{}: {e}", cfg.path.display())))?;
        let db = Arc::new(db);
        let metas = {
            let w = db.begin_write()?;
            w.open_table(LOG)?;
            w.open_table(ITEMS)?;
            w.open_table(IDEM)?;
            w.open_table(ACCOUNTS)?;
            w.open_table(AFFILIATIONS)?;
            w.open_table(SUBSCRIPTIONS)?;
            let mut metas = HashMap::new();
            {
                let t = w.open_table(NODES)?;
                for entry in t.iter()? {
                    let (k, v) = entry?;
                    let m = decode_meta(k.value(), v.value())?;
                    metas.insert(m.name.clone(), m);
                }
            }
            w.commit()?;
            metas
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE_CAPACITY);
        let alive = Arc::new(AtomicBool::new(true));
        let writer = Writer {
            db: db.clone(),
            metas,
            sink,
            metrics,
            window_ms: cfg.idempotency_window.as_millis() as u64,
            last_sweep: Instant::now(),
        };
        let alive2 = alive.clone();
        std::thread::Builder::new()
            .name("juxta-store-writer".into())
            .spawn(move || {
                writer.run(rx);
                alive2.store(false, Ordering::SeqCst);
            })
            .map_err(|e| Error::Storage(format!("writer thread: {e}")))?;
        Ok(Self { db, tx, alive })
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        let cmd = make(reply);
        let gone = || Error::Unavailable("the store is closed".into());
        match self.tx.try_send(cmd) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(cmd)) => {
                // The queue is full: wait for room off the async threads.
                let tx = self.tx.clone();
                tokio::task::spawn_blocking(move || tx.send(cmd))
                    .await
                    .map_err(|_| gone())?
                    .map_err(|_| gone())?;
            }
            Err(mpsc::TrySendError::Disconnected(_)) => return Err(gone()),
        }
        rx.await.map_err(|_| gone())
    }

    async fn read_with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let r = db.begin_read()?;
            f(&r)
        })
        .await
        .map_err(|e| Error::Storage(format!("read task: {e}")))?
    }
}

fn decode_account(b: &[u8]) -> Result<Account, Error> {
    serde_json::from_slice(b).map_err(|e| Error::Storage(format!("account record: {e}")))
}

fn read_meta(r: &redb::ReadTransaction, node: &NodeName) -> Result<NodeMeta, Error> {
    let t = r.open_table(NODES)?;
    let v = t
        .get(node.as_str())?
        .ok_or_else(|| Error::NodeNotFound(node.to_string()))?;
    decode_meta(node.as_str(), v.value())
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn put_node(
        &self,
        name: NodeName,
        config: NodeConfig,
    ) -> Result<(NodeMeta, bool), Error> {
        config.validate()?;
        self.call(|r| Cmd::PutNode(name, config, r)).await?
    }

    async fn node(&self, name: &NodeName) -> Result<Option<NodeMeta>, Error> {
        let name = name.clone();
        self.read_with(move |r| match read_meta(r, &name) {
            Ok(m) => Ok(Some(m)),
            Err(Error::NodeNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    async fn nodes(&self) -> Result<Vec<NodeMeta>, Error> {
        self.read_with(|r| {
            let t = r.open_table(NODES)?;
            let mut out = Vec::new();
            for entry in t.iter()? {
                let (k, v) = entry?;
                out.push(decode_meta(k.value(), v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn delete_node(&self, name: &NodeName, origin: Origin) -> Result<(), Error> {
        let name = name.clone();
        self.call(|r| Cmd::DeleteNode(name, origin, r)).await?
    }

    async fn append(&self, batch: Vec<Append>) -> Vec<Result<Appended, Error>> {
        let n = batch.len();
        match self.call(|r| Cmd::Append(batch, r)).await {
            Ok(results) => results,
            Err(e) => (0..n)
                .map(|_| Err(Error::Unavailable(e.to_string())))
                .collect(),
        }
    }

    async fn read(&self, node: &NodeName, after: Offset, limit: usize) -> Result<Page, Error> {
        let node = node.clone();
        self.read_with(move |r| {
            let meta = read_meta(r, &node)?;
            let t = r.open_table(LOG)?;
            let mut records = Vec::new();
            let start = after.saturating_add(1);
            for entry in t.range((node.as_str(), start)..=(node.as_str(), u64::MAX))? {
                if records.len() >= limit {
                    break;
                }
                let (k, v) = entry?;
                records.push(codec::decode_record(k.value().1, v.value())?);
            }
            Ok(Page { meta, records })
        })
        .await
    }

    async fn items(
        &self,
        node: &NodeName,
        after: Offset,
        limit: usize,
    ) -> Result<ItemsPage, Error> {
        let node = node.clone();
        self.read_with(move |r| {
            let meta = read_meta(r, &node)?;
            let log_t = r.open_table(LOG)?;
            let items_t = r.open_table(ITEMS)?;
            let mut items = Vec::new();
            let start = after.saturating_add(1);
            for entry in log_t.range((node.as_str(), start)..=(node.as_str(), u64::MAX))? {
                if items.len() >= limit {
                    break;
                }
                let (k, v) = entry?;
                let rec = codec::decode_record(k.value().1, v.value())?;
                if let Change::Published(item) = rec.change {
                    let current = items_t
                        .get((node.as_str(), item.id.as_str()))?
                        .map(|g| g.value());
                    if current == Some(rec.offset) {
                        items.push((rec.offset, item));
                    }
                }
            }
            Ok(ItemsPage { meta, items })
        })
        .await
    }

    async fn item(&self, node: &NodeName, id: &ItemId) -> Result<Option<(Offset, Item)>, Error> {
        let (node, id) = (node.clone(), id.clone());
        self.read_with(move |r| {
            read_meta(r, &node)?;
            let items_t = r.open_table(ITEMS)?;
            let Some(offset) = items_t
                .get((node.as_str(), id.as_str()))?
                .map(|g| g.value())
            else {
                return Ok(None);
            };
            let log_t = r.open_table(LOG)?;
            let Some(v) = log_t.get((node.as_str(), offset))? else {
                return Ok(None);
            };
            match codec::decode_record(offset, v.value())?.change {
                Change::Published(item) => Ok(Some((offset, item))),
                _ => Ok(None),
            }
        })
        .await
    }

    async fn put_account(&self, account: Account) -> Result<bool, Error> {
        self.call(|r| Cmd::PutAccount(Box::new(account), r)).await?
    }

    async fn account(&self, username: &Username) -> Result<Option<Account>, Error> {
        let username = username.clone();
        self.read_with(move |r| {
            let t = r.open_table(ACCOUNTS)?;
            match t.get(username.as_str())? {
                Some(v) => Ok(Some(decode_account(v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn delete_account(&self, username: &Username) -> Result<(), Error> {
        let username = username.clone();
        self.call(|r| Cmd::DeleteAccount(username, r)).await?
    }

    async fn accounts(&self) -> Result<Vec<Username>, Error> {
        self.read_with(|r| {
            let t = r.open_table(ACCOUNTS)?;
            let mut out = Vec::new();
            for entry in t.iter()? {
                out.push(Username::new(entry?.0.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn set_affiliation(
        &self,
        node: &NodeName,
        jid: &str,
        affiliation: Option<Affiliation>,
    ) -> Result<(), Error> {
        let (node, jid) = (node.clone(), Arc::from(jid));
        self.call(|r| Cmd::SetAffiliation(node, jid, affiliation, r))
            .await?
    }

    async fn affiliations(&self, node: &NodeName) -> Result<Vec<(Arc<str>, Affiliation)>, Error> {
        let node = node.clone();
        self.read_with(move |r| {
            read_meta(r, &node)?;
            let t = r.open_table(AFFILIATIONS)?;
            let (lo, hi) = node_range(node.as_str());
            let mut out = Vec::new();
            for entry in t.range((lo, "")..(hi.as_str(), ""))? {
                let (k, v) = entry?;
                let (_, jid) = k.value();
                let a = Affiliation::parse(v.value()).ok_or_else(|| {
                    Error::Storage(format!("affiliation {node}/{jid}: {:?}", v.value()))
                })?;
                out.push((Arc::from(jid), a));
            }
            Ok(out)
        })
        .await
    }

    async fn put_subscription(&self, node: &NodeName, sub: NodeSubscription) -> Result<(), Error> {
        let node = node.clone();
        self.call(|r| Cmd::PutSubscription(node, sub, r)).await?
    }

    async fn delete_subscription(
        &self,
        node: &NodeName,
        jid: &str,
        subid: &str,
    ) -> Result<bool, Error> {
        let (node, jid, subid) = (node.clone(), Arc::from(jid), Arc::from(subid));
        self.call(|r| Cmd::DeleteSubscription(node, jid, subid, r))
            .await?
    }

    async fn subscriptions(&self, node: &NodeName) -> Result<Vec<NodeSubscription>, Error> {
        let node = node.clone();
        self.read_with(move |r| {
            read_meta(r, &node)?;
            let t = r.open_table(SUBSCRIPTIONS)?;
            let (lo, hi) = node_range(node.as_str());
            let mut out = Vec::new();
            for entry in t.range((lo, "", "")..(hi.as_str(), "", ""))? {
                let (k, v) = entry?;
                let (n, jid, subid) = k.value();
                out.push(decode_subscription(n, jid, subid, v.value())?);
            }
            Ok(out)
        })
        .await
    }

    fn ready(&self) -> Result<(), Error> {
        if self.alive.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Error::Unavailable("the store's writer has stopped".into()))
        }
    }

    async fn close(&self) {
        let _ = self.call(Cmd::Close).await;
    }
}

/// The writer thread's state.
struct Writer {
    db: Arc<Database>,
    /// Committed node metadata; the writer is the only one who changes it.
    metas: HashMap<NodeName, NodeMeta>,
    sink: Arc<dyn CommitSink>,
    metrics: Arc<Metrics>,
    window_ms: u64,
    last_sweep: Instant,
}

/// What one command will answer once the batch is committed.
enum Outcome {
    Append(
        Vec<Result<Appended, Error>>,
        oneshot::Sender<Vec<Result<Appended, Error>>>,
    ),
    PutNode(
        Result<(NodeMeta, bool), Error>,
        oneshot::Sender<Result<(NodeMeta, bool), Error>>,
    ),
    DeleteNode(Result<(), Error>, oneshot::Sender<Result<(), Error>>),
    PutAccount(bool, oneshot::Sender<Result<bool, Error>>),
    DeleteAccount(Result<(), Error>, oneshot::Sender<Result<(), Error>>),
    SetAffiliation(Result<(), Error>, oneshot::Sender<Result<(), Error>>),
    PutSubscription(Result<(), Error>, oneshot::Sender<Result<(), Error>>),
    DeleteSubscription(bool, oneshot::Sender<Result<bool, Error>>),
}

struct Tables<'t> {
    nodes: Table<'t, &'static str, &'static [u8]>,
    log: Table<'t, (&'static str, u64), &'static [u8]>,
    items: Table<'t, (&'static str, &'static str), u64>,
    idem: Table<'t, (&'static str, &'static str), &'static [u8]>,
    accounts: Table<'t, &'static str, &'static [u8]>,
    affiliations: Table<'t, (&'static str, &'static str), &'static str>,
    subscriptions: Table<'t, (&'static str, &'static str, &'static str), &'static [u8]>,
}

struct NodeTx<'a, 't> {
    node: &'a str,
    t: &'a mut Tables<'t>,
}

impl LogTx for NodeTx<'_, '_> {
    fn put_record(&mut self, record: &Record) -> Result<(), Error> {
        self.t.log.insert(
            (self.node, record.offset),
            codec::encode_record(record).as_slice(),
        )?;
        Ok(())
    }
    fn take_record(&mut self, offset: Offset) -> Result<Option<Record>, Error> {
        match self.t.log.remove((self.node, offset))? {
            Some(g) => Ok(Some(codec::decode_record(offset, g.value())?)),
            None => Ok(None),
        }
    }
    fn item_offset(&mut self, id: &ItemId) -> Result<Option<Offset>, Error> {
        Ok(self
            .t
            .items
            .get((self.node, id.as_str()))?
            .map(|g| g.value()))
    }
    fn set_item(&mut self, id: &ItemId, offset: Offset) -> Result<Option<Offset>, Error> {
        Ok(self
            .t
            .items
            .insert((self.node, id.as_str()), offset)?
            .map(|g| g.value()))
    }
    fn remove_item(&mut self, id: &ItemId) -> Result<(), Error> {
        self.t.items.remove((self.node, id.as_str()))?;
        Ok(())
    }
}

/// Sorts after every idempotency key (keys are at most 255 bytes).
fn key_upper_bound() -> String {
    "\u{10FFFF}".repeat(64)
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        loop {
            let first = match rx.recv_timeout(SWEEP_EVERY) {
                Ok(c) => c,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.sweep();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut cmds = vec![first];
            while cmds.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
            let (close, cmds): (Vec<Cmd>, Vec<Cmd>) =
                cmds.into_iter().partition(|c| matches!(c, Cmd::Close(_)));
            if !cmds.is_empty() {
                self.commit_batch(cmds);
            }
            if !close.is_empty() {
                // Release the database before answering, so that once `close` returns and
                // the store is dropped, the file can be opened again at once.
                drop(self);
                for c in close {
                    if let Cmd::Close(r) = c {
                        let _ = r.send(());
                    }
                }
                return;
            }
            if self.last_sweep.elapsed() >= SWEEP_EVERY {
                self.sweep();
            }
        }
    }

    fn commit_batch(&mut self, cmds: Vec<Cmd>) {
        let started = Instant::now();
        let ops: usize = cmds
            .iter()
            .map(|c| match c {
                Cmd::Append(b, _) => b.len(),
                _ => 1,
            })
            .sum();
        let mut work: HashMap<NodeName, Option<NodeMeta>> = HashMap::new();
        let mut events: Vec<Arc<Event>> = Vec::new();
        let mut outcomes = Vec::with_capacity(cmds.len());
        let result = (|| -> Result<(), Error> {
            let txn = self.db.begin_write()?;
            {
                let mut t = Tables {
                    nodes: txn.open_table(NODES)?,
                    log: txn.open_table(LOG)?,
                    items: txn.open_table(ITEMS)?,
                    idem: txn.open_table(IDEM)?,
                    accounts: txn.open_table(ACCOUNTS)?,
                    affiliations: txn.open_table(AFFILIATIONS)?,
                    subscriptions: txn.open_table(SUBSCRIPTIONS)?,
                };
                let now = time::now_ms();
                for cmd in cmds {
                    match cmd {
                        Cmd::Append(batch, reply) => {
                            let mut results = Vec::with_capacity(batch.len());
                            for a in batch {
                                results.push(self.append_one(
                                    &mut t,
                                    &mut work,
                                    &mut events,
                                    a,
                                    now,
                                )?);
                            }
                            outcomes.push(Outcome::Append(results, reply));
                        }
                        Cmd::PutNode(name, config, reply) => {
                            let r = self.put_node(&mut t, &mut work, name, config)?;
                            outcomes.push(Outcome::PutNode(Ok(r), reply));
                        }
                        Cmd::DeleteNode(name, origin, reply) => {
                            let r = self.delete_node(
                                &mut t,
                                &mut work,
                                &mut events,
                                name,
                                origin,
                                now,
                            )?;
                            outcomes.push(Outcome::DeleteNode(r, reply));
                        }
                        Cmd::PutAccount(account, reply) => {
                            let bytes = serde_json::to_vec(&account)
                                .map_err(|e| Error::Storage(format!("account record: {e}")))?;
                            let created = t
                                .accounts
                                .insert(account.username.as_str(), bytes.as_slice())?
                                .is_none();
                            outcomes.push(Outcome::PutAccount(created, reply));
                        }
                        Cmd::DeleteAccount(username, reply) => {
                            let r = match t.accounts.remove(username.as_str())? {
                                Some(_) => Ok(()),
                                None => Err(Error::AccountNotFound(username.to_string())),
                            };
                            outcomes.push(Outcome::DeleteAccount(r, reply));
                        }
                        Cmd::SetAffiliation(node, jid, affiliation, reply) => {
                            let r =
                                self.set_affiliation(&mut t, &work, &node, &jid, affiliation)?;
                            outcomes.push(Outcome::SetAffiliation(r, reply));
                        }
                        Cmd::PutSubscription(node, sub, reply) => {
                            let r = self.put_subscription(&mut t, &work, &node, &sub)?;
                            outcomes.push(Outcome::PutSubscription(r, reply));
                        }
                        Cmd::DeleteSubscription(node, jid, subid, reply) => {
                            // No node, no subscriptions: `delete_node` removed them with it.
                            let existed = t
                                .subscriptions
                                .remove((node.as_str(), &*jid, &*subid))?
                                .is_some();
                            outcomes.push(Outcome::DeleteSubscription(existed, reply));
                        }
                        Cmd::Close(_) => {}
                    }
                }
                for (name, meta) in &work {
                    match meta {
                        Some(m) => {
                            t.nodes.insert(name.as_str(), encode_meta(m).as_slice())?;
                        }
                        None => {
                            t.nodes.remove(name.as_str())?;
                        }
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })();
        self.metrics.observe_commit(started.elapsed(), ops);
        match result {
            Ok(()) => {
                for (name, meta) in work {
                    match meta {
                        Some(m) => self.metas.insert(name, m),
                        None => self.metas.remove(&name),
                    };
                }
                for ev in events {
                    self.sink.committed(ev);
                }
                for o in outcomes {
                    match o {
                        Outcome::Append(r, reply) => drop(reply.send(r)),
                        Outcome::PutNode(r, reply) => drop(reply.send(r)),
                        Outcome::DeleteNode(r, reply) => drop(reply.send(r)),
                        Outcome::PutAccount(r, reply) => drop(reply.send(Ok(r))),
                        Outcome::DeleteAccount(r, reply) => drop(reply.send(r)),
                        Outcome::SetAffiliation(r, reply) => drop(reply.send(r)),
                        Outcome::PutSubscription(r, reply) => drop(reply.send(r)),
                        Outcome::DeleteSubscription(r, reply) => drop(reply.send(Ok(r))),
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed");
                self.metrics.store_errors.inc();
                let msg = e.to_string();
                let fail = || Error::Storage(msg.clone());
                for o in outcomes {
                    match o {
                        Outcome::Append(r, reply) => {
                            drop(reply.send(r.iter().map(|_| Err(fail())).collect()))
                        }
                        Outcome::PutNode(_, reply) => drop(reply.send(Err(fail()))),
                        Outcome::DeleteNode(_, reply) => drop(reply.send(Err(fail()))),
                        Outcome::PutAccount(_, reply) => drop(reply.send(Err(fail()))),
                        Outcome::DeleteAccount(_, reply) => drop(reply.send(Err(fail()))),
                        Outcome::SetAffiliation(_, reply) => drop(reply.send(Err(fail()))),
                        Outcome::PutSubscription(_, reply) => drop(reply.send(Err(fail()))),
                        Outcome::DeleteSubscription(_, reply) => drop(reply.send(Err(fail()))),
                    }
                }
                // Commands that never got an outcome are dropped: their callers see `Unavailable`.
            }
        }
    }

    fn current(
        &self,
        work: &HashMap<NodeName, Option<NodeMeta>>,
        name: &NodeName,
    ) -> Option<NodeMeta> {
        match work.get(name) {
            Some(m) => m.clone(),
            None => self.metas.get(name).cloned(),
        }
    }

    /// Returns `Err` only for storage failures, which abort the whole batch; refusals are
    /// the inner `Result`.
    fn append_one(
        &self,
        t: &mut Tables<'_>,
        work: &mut HashMap<NodeName, Option<NodeMeta>>,
        events: &mut Vec<Arc<Event>>,
        a: Append,
        now: u64,
    ) -> Result<Result<Appended, Error>, Error> {
        let Some(mut meta) = self.current(work, &a.node) else {
            return Ok(Err(Error::NodeNotFound(a.node.to_string())));
        };
        if let Some(key) = &a.idempotency_key
            && let Some(g) = t.idem.get((a.node.as_str(), key.as_str()))?
        {
            let e = codec::decode_idem(g.value())?;
            if e.expires_at > now && e.epoch == meta.epoch {
                return Ok(Ok(Appended {
                    node: a.node,
                    offset: e.offset,
                    epoch: e.epoch,
                    item_id: e.item_id,
                    duplicate: true,
                }));
            }
        }
        let item_id = match &a.op {
            Op::Publish { id, .. } | Op::Retract(id) => Some(id.clone()),
            Op::Purge => None,
        };
        let record = match log::apply(
            &mut meta,
            a.op,
            now,
            &mut NodeTx {
                node: a.node.as_str(),
                t,
            },
        ) {
            Ok(r) => r,
            Err(e @ Error::Storage(_)) => return Err(e),
            Err(e) => return Ok(Err(e)),
        };
        if let Some(key) = &a.idempotency_key {
            let entry = IdemEntry {
                expires_at: now + self.window_ms,
                offset: record.offset,
                epoch: meta.epoch,
                item_id: item_id.clone(),
            };
            t.idem.insert(
                (a.node.as_str(), key.as_str()),
                codec::encode_idem(&entry).as_slice(),
            )?;
        }
        let appended = Appended {
            node: a.node.clone(),
            offset: record.offset,
            epoch: meta.epoch,
            item_id,
            duplicate: false,
        };
        events.push(Arc::new(Event::new(
            a.node.clone(),
            meta.epoch,
            record,
            a.origin,
        )));
        work.insert(a.node, Some(meta));
        Ok(Ok(appended))
    }

    fn put_node(
        &self,
        t: &mut Tables<'_>,
        work: &mut HashMap<NodeName, Option<NodeMeta>>,
        name: NodeName,
        config: NodeConfig,
    ) -> Result<(NodeMeta, bool), Error> {
        let (meta, created) = match self.current(work, &name) {
            Some(mut m) => {
                m.config = config;
                log::trim(
                    &mut m,
                    &mut NodeTx {
                        node: name.as_str(),
                        t,
                    },
                )?;
                (m, false)
            }
            None => (NodeMeta::new(name.clone(), config), true),
        };
        work.insert(name, Some(meta.clone()));
        Ok((meta, created))
    }

    fn delete_node(
        &self,
        t: &mut Tables<'_>,
        work: &mut HashMap<NodeName, Option<NodeMeta>>,
        events: &mut Vec<Arc<Event>>,
        name: NodeName,
        origin: Origin,
        now: u64,
    ) -> Result<Result<(), Error>, Error> {
        let Some(mut meta) = self.current(work, &name) else {
            return Ok(Err(Error::NodeNotFound(name.to_string())));
        };
        log::clear(
            &mut meta,
            &mut NodeTx {
                node: name.as_str(),
                t,
            },
        )?;
        let upper = key_upper_bound();
        t.idem.retain_in(
            (name.as_str(), "")..=(name.as_str(), upper.as_str()),
            |_, _| false,
        )?;
        let (lo, hi) = node_range(name.as_str());
        t.affiliations
            .retain_in((lo, "")..(hi.as_str(), ""), |_, _| false)?;
        t.subscriptions
            .retain_in((lo, "", "")..(hi.as_str(), "", ""), |_, _| false)?;
        let record = Record {
            offset: meta.last_offset + 1,
            change: Change::Deleted,
            at: now,
        };
        events.push(Arc::new(Event::new(
            name.clone(),
            meta.epoch,
            record,
            origin,
        )));
        work.insert(name, None);
        Ok(Ok(()))
    }

    /// Returns `Err` only for storage failures; a missing node is the inner `Result`.
    fn set_affiliation(
        &self,
        t: &mut Tables<'_>,
        work: &HashMap<NodeName, Option<NodeMeta>>,
        node: &NodeName,
        jid: &str,
        affiliation: Option<Affiliation>,
    ) -> Result<Result<(), Error>, Error> {
        if self.current(work, node).is_none() {
            return Ok(Err(Error::NodeNotFound(node.to_string())));
        }
        match affiliation {
            Some(a) => {
                t.affiliations.insert((node.as_str(), jid), a.as_str())?;
            }
            None => {
                t.affiliations.remove((node.as_str(), jid))?;
            }
        }
        Ok(Ok(()))
    }

    /// Returns `Err` only for storage failures; a missing node is the inner `Result`.
    fn put_subscription(
        &self,
        t: &mut Tables<'_>,
        work: &HashMap<NodeName, Option<NodeMeta>>,
        node: &NodeName,
        sub: &NodeSubscription,
    ) -> Result<Result<(), Error>, Error> {
        if self.current(work, node).is_none() {
            return Ok(Err(Error::NodeNotFound(node.to_string())));
        }
        t.subscriptions.insert(
            (node.as_str(), &*sub.jid, &*sub.subid),
            encode_subscription(sub).as_slice(),
        )?;
        Ok(Ok(()))
    }

    fn sweep(&mut self) {
        self.last_sweep = Instant::now();
        let now = time::now_ms();
        let r = (|| -> Result<(), Error> {
            let txn = self.db.begin_write()?;
            {
                let mut idem = txn.open_table(IDEM)?;
                idem.retain(|_, v| {
                    codec::decode_idem(v)
                        .map(|e| e.expires_at > now)
                        .unwrap_or(false)
                })?;
            }
            txn.commit()?;
            Ok(())
        })();
        if let Err(e) = r {
            tracing::warn!(error = %e, "sweeping idempotency keys failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[tokio::test]
    async fn embedded_store_passes_the_store_conformance_suite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("juxta.redb");
        conformance::run(move |sink| {
            let path = path.clone();
            async move {
                let _ = std::fs::remove_file(&path);
                Ok(Arc::new(EmbeddedStore::open(
                    EmbeddedConfig::new(path),
                    sink,
                    Arc::new(Metrics::default()),
                )?) as Arc<dyn Store>)
            }
        })
        .await;
    }

    #[tokio::test]
    async fn given_a_reopened_database_then_nodes_items_offsets_and_keys_survive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("juxta.redb");
        let sink = conformance::Collect::new();
        let node = NodeName::new("n").expect("name");
        {
            let s = EmbeddedStore::open(
                EmbeddedConfig::new(&path),
                sink.clone(),
                Arc::new(Metrics::default()),
            )
            .expect("open");
            s.put_node(node.clone(), NodeConfig::default())
                .await
                .expect("create");
            let mut a = conformance::publish(&node, "a", "1");
            a.idempotency_key = Some("k".into());
            let r = s
                .append(vec![a, conformance::publish(&node, "b", "2")])
                .await;
            assert_eq!(r[1].as_ref().expect("ok").offset, 2);
            s.close().await;
        }
        let s = EmbeddedStore::open(
            EmbeddedConfig::new(&path),
            sink,
            Arc::new(Metrics::default()),
        )
        .expect("reopen");
        let meta = s.node(&node).await.expect("read").expect("exists");
        assert_eq!((meta.last_offset, meta.item_count), (2, 2));
        let mut again = conformance::publish(&node, "a", "changed");
        again.idempotency_key = Some("k".into());
        let r = s.append(vec![again]).await.remove(0).expect("ok");
        assert!(r.duplicate);
        assert_eq!(r.offset, 1);
        let page = s.items(&node, 0, 10).await.expect("items");
        assert_eq!(page.items.len(), 2);
    }

    #[tokio::test]
    async fn given_a_reopened_database_then_affiliations_and_subscriptions_survive() {
        use crate::membership::SubscriptionState;

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("juxta.redb");
        let node = NodeName::new("n").expect("name");
        let subs = vec![
            conformance::subscription("a@x", "1", SubscriptionState::Subscribed, 10),
            conformance::subscription("a@x", "2", SubscriptionState::Pending, 11),
            conformance::subscription("b@x/r", "1", SubscriptionState::Subscribed, 12),
        ];
        {
            let s = EmbeddedStore::open(
                EmbeddedConfig::new(&path),
                conformance::Collect::new(),
                Arc::new(Metrics::default()),
            )
            .expect("open");
            s.put_node(node.clone(), NodeConfig::default())
                .await
                .expect("create");
            s.set_affiliation(&node, "owner@x", Some(Affiliation::Owner))
                .await
                .expect("set");
            s.set_affiliation(&node, "bad@x", Some(Affiliation::Outcast))
                .await
                .expect("set");
            for sub in subs.iter().rev() {
                s.put_subscription(&node, sub.clone()).await.expect("put");
            }
            s.close().await;
        }
        let s = EmbeddedStore::open(
            EmbeddedConfig::new(&path),
            conformance::Collect::new(),
            Arc::new(Metrics::default()),
        )
        .expect("reopen");
        assert_eq!(
            s.affiliations(&node).await.expect("list"),
            vec![
                (Arc::from("bad@x"), Affiliation::Outcast),
                (Arc::from("owner@x"), Affiliation::Owner),
            ]
        );
        assert_eq!(s.subscriptions(&node).await.expect("list"), subs);
    }
}
