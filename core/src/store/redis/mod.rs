//! The Redis engine: several gateway instances share nodes, histories, subscriptions and
//! accounts in one Redis (or a Redis Cluster) and fan out to each other.
//!
//! Layout, per node (every key carries the `{node}` hash tag, so one node lives on one
//! shard): `<prefix>:{node}:meta` (hash), `:log:<generation>` (a Stream, one entry per
//! record, id `0-<offset>`, capped at `max_items` by `XADD MAXLEN`), `:items` (sorted set of
//! current item ids by offset, kept up to date lazily), `:subs` and `:affs` (hashes),
//! `:idem:<key>` (idempotency keys with a TTL) and the sharded pub/sub channel `:events`.
//! Globally: `<prefix>:nodes` (set of names), `<prefix>:members` (a Stream of membership
//! changes) and `<prefix>:accounts` (hash). Each change is one Lua script ([`lua`]): it
//! assigns the offset (the Stream's own sequence), appends and `SPUBLISH`es the records on the
//! node's channel, atomically and in offset order. A publish is three commands in Redis (the
//! script call, `XADD`, `SPUBLISH`): the writer names the log by the settings it cached, and
//! the item index is brought up to date by whatever reads it.
//!
//! The [`engine`] subscribes (`SSUBSCRIBE`) to the channels of the nodes this instance has
//! subscribers for, and hands events to the commit sink in offset order, once: gaps (a
//! reconnect, a missed message) are filled from the Stream by offset. While the engine is
//! unreachable the store refuses writes with [`Error::EngineUnavailable`] and reports not
//! ready, so no publish is acknowledged while fan-out is broken.

mod engine;
mod lua;
mod resp;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::RwLock;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Script, ServerErrorKind, Value};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::codec::{decode_record, encode_record};
use super::embedded::{decode_subscription, encode_subscription};
use super::{Append, Appended, CommitSink, ItemsPage, MemberChanges, Op, Page, Store};
use crate::account::{Account, Username};
use crate::error::Error;
use crate::membership::{Affiliation, NodeSubscription};
use crate::metrics::{EngineMetrics, Metrics};
use crate::model::{
    Change, Epoch, Event, Item, ItemId, NodeConfig, NodeMeta, NodeName, Offset, Origin, Record,
};
use crate::time;

pub use engine::Engine;

/// Most appends one script call carries.
const MAX_BATCH: usize = 256;
/// Batches in flight at once. One: appends that arrive while a batch is in Redis wait and go
/// together in the next (group commit), one script call per node for all of them.
const FLIGHTS: usize = 1;
/// How many times (a second apart) a commit the replicas did not confirm in time is asked
/// about again before it is left to the tail checks.
const REPLICA_RETRIES: usize = 60;
/// About how many membership changes the shared log keeps for instances that were away.
const MEMBER_LOG_LEN: usize = 10_000;

/// How to reach Redis.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`; for a cluster, one or more seed nodes.
    pub urls: Vec<String>,
    /// Whether `urls` name a Redis Cluster.
    pub cluster: bool,
    /// Prefix of every key and channel.
    pub prefix: String,
    /// How long an idempotency key is remembered.
    pub idempotency_window: Duration,
    /// How long one command may take before the engine counts as unreachable.
    pub timeout: Duration,
    /// With `rediss://` URLs: PEM CA certificates that verify Redis's certificate; `None` =
    /// the system's roots.
    pub tls_ca_pem: Option<Vec<u8>>,
    /// Replicas that must have a change (`WAIT`) before it is acknowledged and fanned out;
    /// 0 = Redis's own persistence only.
    pub min_replicas: u32,
}

impl RedisConfig {
    /// One standalone Redis at `url`, with defaults: prefix `juxta`, 24 h idempotency window,
    /// 5 s command timeout.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            urls: vec![url.into()],
            cluster: false,
            prefix: "juxta".to_owned(),
            idempotency_window: super::DEFAULT_IDEMPOTENCY_WINDOW,
            timeout: Duration::from_secs(5),
            tls_ca_pem: None,
            min_replicas: 0,
        }
    }
}

/// A command connection: one multiplexed connection that reconnects by itself, or a cluster
/// connection that routes by slot.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

fn tls_certificates(ca_pem: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca_pem.to_vec()),
    }
}

/// The TLS client configuration of the engine's own pub/sub connections: the CA given, or
/// the system's roots.
fn tls_client_config(ca_pem: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, Error> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert =
                    cert.map_err(|e| Error::InvalidConfig(format!("store.tls_ca_file: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::InvalidConfig(format!("store.tls_ca_file: {e}")))?;
            }
            if roots.is_empty() {
                return Err(Error::InvalidConfig(
                    "store.tls_ca_file holds no certificate".into(),
                ));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidConfig(format!("TLS for Redis: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Opens a command connection.
async fn connect(cfg: &RedisConfig) -> Result<Conn, RedisError> {
    if cfg.cluster {
        let client = redis::cluster::ClusterClientBuilder::new(cfg.urls.clone())
            .connection_timeout(cfg.timeout)
            .response_timeout(cfg.timeout)
            .retries(2);
        let client = match &cfg.tls_ca_pem {
            Some(pem) => client.certs(tls_certificates(pem)),
            None => client,
        }
        .build()?;
        return Ok(Conn::Cluster(client.get_async_connection().await?));
    }
    let url = cfg.urls.first().map_or("", String::as_str);
    let client = match &cfg.tls_ca_pem {
        Some(pem) if url.starts_with("rediss://") => {
            redis::Client::build_with_tls(url, tls_certificates(pem))?
        }
        _ => redis::Client::open(url)?,
    };
    let mc = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(cfg.timeout))
        .set_response_timeout(Some(cfg.timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(1));
    let cm = tokio::time::timeout(cfg.timeout, client.get_connection_manager_with_config(mc))
        .await
        .map_err(|_| RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))??;
    Ok(Conn::Single(cm))
}

/// What a Redis failure means to callers: an unreachable or unwilling engine (retry later,
/// nothing acknowledged) or a fault in the stored data.
pub(crate) fn engine_error(e: &RedisError) -> Error {
    let unreachable = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            ErrorKind::AuthenticationFailed
                | ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::ClusterDown
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::BusyLoading
                        | ServerErrorKind::ReadOnly
                )
        );
    let text = e.to_string();
    if text.contains("OOM") {
        return Error::EngineUnavailable(format!("Redis is out of memory (maxmemory): {text}"));
    }
    if text.contains("READONLY") || text.contains("MISCONF") || text.contains("NOAUTH") {
        return Error::EngineUnavailable(text);
    }
    if e.is_timeout() || e.is_connection_dropped() {
        // The command may be in Redis already and be carried out later.
        Error::EngineUnavailable(format!(
            "Redis did not answer ({text}); a write may still take effect: retry it with the \
             same Idempotency-Key"
        ))
    } else if unreachable {
        Error::EngineUnavailable(text)
    } else {
        Error::Storage(format!("Redis: {text}"))
    }
}

/// The keys of one node.
struct Keys {
    meta: String,
    log: String,
    items: String,
    subs: String,
    affs: String,
    chan: String,
    idem: String,
}

impl Keys {
    fn of(prefix: &str, node: &str) -> Self {
        let base = format!("{prefix}:{{{node}}}");
        Self {
            meta: format!("{base}:meta"),
            log: format!("{base}:log"),
            items: format!("{base}:items"),
            subs: format!("{base}:subs"),
            affs: format!("{base}:affs"),
            chan: format!("{base}:events"),
            idem: format!("{base}:idem:"),
        }
    }
}

struct Scripts {
    append: Script,
    meta: Script,
    read: Script,
    items: Script,
    item: Script,
    put_node: Script,
    delete_node: Script,
    set_member: Script,
    members: Script,
    rebase: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            append: Script::new(&lua::append()),
            meta: Script::new(&lua::meta()),
            read: Script::new(&lua::read()),
            items: Script::new(&lua::items()),
            item: Script::new(&lua::item()),
            put_node: Script::new(&lua::put_node()),
            delete_node: Script::new(&lua::delete_node()),
            set_member: Script::new(lua::SET_MEMBER),
            members: Script::new(lua::MEMBERS),
            rebase: Script::new(&lua::rebase()),
        }
    }
}

/// State shared by the store, its writer and its engine.
pub(crate) struct Shared {
    cfg: RedisConfig,
    sink: Arc<dyn CommitSink>,
    metrics: Arc<Metrics>,
    conn: RwLock<Option<Conn>>,
    scripts: Scripts,
    /// What the last append to each node found of its settings: the next append names its
    /// log by them and skips reading them (the script re-reads them when the log is gone).
    known: parking_lot::Mutex<HashMap<NodeName, Known>>,
}

/// A node's settings as an append found them.
#[derive(Clone)]
struct Known {
    generation: String,
    epoch: String,
    persist: bool,
    max_items: u64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("urls", &self.cfg.urls)
            .field("cluster", &self.cfg.cluster)
            .finish_non_exhaustive()
    }
}

/// A node's state as the scripts report it.
pub(crate) struct State {
    pub(crate) meta: NodeMeta,
}

impl Shared {
    fn conn(&self) -> Result<Conn, Error> {
        self.conn
            .read()
            .clone()
            .ok_or_else(|| Error::EngineUnavailable("not connected to Redis".into()))
    }

    fn keys(&self, node: &str) -> Keys {
        Keys::of(&self.cfg.prefix, node)
    }

    fn global(&self, what: &str) -> String {
        format!("{}:{what}", self.cfg.prefix)
    }

    /// Runs a script over a node's first three keys plus `args`; again while it answers that
    /// the node's item index had more to catch up than one call does (see [`lua`]).
    async fn node_script(
        &self,
        script: &Script,
        node: &str,
        args: &[&[u8]],
    ) -> Result<Value, Error> {
        let k = self.keys(node);
        let mut inv = script.key(&k.meta);
        inv.key(&k.log).key(&k.items);
        for a in args {
            inv.arg(*a);
        }
        let mut c = self.conn()?;
        loop {
            let v = inv
                .invoke_async(&mut c)
                .await
                .map_err(|e| engine_error(&e))?;
            if !is_behind(&v) {
                return Ok(v);
            }
        }
    }

    /// The node's state, `None` when it does not exist; with its item count if `count`.
    pub(crate) async fn state(&self, node: &NodeName, count: bool) -> Result<Option<State>, Error> {
        let v = self
            .node_script(&self.scripts.meta, node.as_str(), &[flag(count)])
            .await?;
        parse_state(node, &v)
    }

    /// Records after `after`, at most `limit`, with the node's state (with its item count if
    /// `count`).
    pub(crate) async fn read_records(
        &self,
        node: &NodeName,
        after: Offset,
        limit: usize,
        count: bool,
    ) -> Result<Option<(State, Vec<Record>)>, Error> {
        let v = self
            .node_script(
                &self.scripts.read,
                node.as_str(),
                &[
                    after.to_string().as_bytes(),
                    limit.to_string().as_bytes(),
                    flag(count),
                ],
            )
            .await?;
        parse_state_and_entries(node, v)
    }

    /// Gives `node` a new epoch if it still has `seen` (see [`lua::rebase`]).
    pub(crate) async fn rebase(&self, node: &NodeName, seen: Epoch) -> Result<(), Error> {
        let new = Epoch::random();
        self.known.lock().remove(node);
        self.node_script(
            &self.scripts.rebase,
            node.as_str(),
            &[
                seen.to_string().as_bytes(),
                new.to_string().as_bytes(),
                generation().as_bytes(),
            ],
        )
        .await
        .map(|_| ())
    }
}

/// A new name for a node's log (see [`lua`]).
fn generation() -> String {
    Epoch::random().to_string()
}

fn flag(on: bool) -> &'static [u8] {
    if on { b"1" } else { b"0" }
}

/// The scripts' answer when a node's item index needs another call to catch up.
fn is_behind(v: &Value) -> bool {
    bytes_of(v) == Some(b"behind")
}

fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::Storage(format!("unexpected reply from Redis: {what}"))
}

fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn int_of(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn str_of(v: &Value) -> Option<&str> {
    std::str::from_utf8(bytes_of(v)?).ok()
}

fn parse_state(node: &NodeName, v: &Value) -> Result<Option<State>, Error> {
    let f = match v {
        Value::Nil => return Ok(None),
        Value::Array(f) if f.len() >= 6 => f,
        other => return Err(corrupt(format!("node state {other:?}"))),
    };
    let config: NodeConfig = serde_json::from_slice(bytes_of(&f[0]).unwrap_or_default())
        .map_err(|e| Error::Storage(format!("node {node}: stored config: {e}")))?;
    let epoch: Epoch = str_of(&f[1])
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt(format!("epoch of {node}")))?;
    let num = |i: usize| int_of(&f[i]).ok_or_else(|| corrupt(format!("field {i} of {node}")));
    Ok(Some(State {
        meta: NodeMeta {
            name: node.clone(),
            config,
            epoch,
            created_at: num(2)?,
            last_offset: num(3)?,
            first_offset: num(4)?,
            item_count: num(5)?,
        },
    }))
}

/// `[id, [field, value, ...]]` → the record.
fn parse_entry(v: &Value) -> Result<Record, Error> {
    let Value::Array(e) = v else {
        return Err(corrupt("stream entry"));
    };
    let id = e
        .first()
        .and_then(str_of)
        .ok_or_else(|| corrupt("entry id"))?;
    let offset: Offset = id
        .strip_prefix("0-")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt(format!("entry id {id}")))?;
    let Some(Value::Array(fields)) = e.get(1) else {
        return Err(corrupt("entry fields"));
    };
    let rec = fields
        .get(1)
        .and_then(bytes_of)
        .ok_or_else(|| corrupt("entry"))?;
    decode_record(offset, rec)
}

fn parse_state_and_entries(
    node: &NodeName,
    v: Value,
) -> Result<Option<(State, Vec<Record>)>, Error> {
    let parts = match v {
        Value::Nil => return Ok(None),
        Value::Array(p) if p.len() == 2 => p,
        other => return Err(corrupt(format!("page {other:?}"))),
    };
    let Some(state) = parse_state(node, &parts[0])? else {
        return Ok(None);
    };
    let records = match &parts[1] {
        Value::Array(entries) => entries
            .iter()
            .map(parse_entry)
            .collect::<Result<Vec<_>, _>>()?,
        _ => Vec::new(),
    };
    Ok(Some((state, records)))
}

fn origin_letter(o: Origin) -> &'static str {
    match o {
        Origin::Http => "h",
        Origin::Xmpp => "x",
        Origin::Overlay => "o",
        Origin::History => "r",
    }
}

pub(crate) fn origin_of(letter: u8) -> Origin {
    match letter {
        b'h' => Origin::Http,
        b'x' => Origin::Xmpp,
        b'o' => Origin::Overlay,
        _ => Origin::History,
    }
}

/// One append waiting for the writer.
struct Job {
    append: Append,
    reply: oneshot::Sender<Result<Appended, Error>>,
}

/// The Redis store. See the module documentation.
#[derive(Debug)]
pub struct RedisStore {
    shared: Arc<Shared>,
    engine: Arc<Engine>,
    writer: mpsc::Sender<Job>,
    tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl RedisStore {
    /// Starts the store. It connects in the background: until Redis answers, it reports not
    /// ready and refuses writes. Fails only on a configuration that can never work.
    pub fn start(
        cfg: RedisConfig,
        sink: Arc<dyn CommitSink>,
        metrics: Arc<Metrics>,
        engine_metrics: Arc<EngineMetrics>,
    ) -> Result<Self, Error> {
        if cfg.urls.is_empty() {
            return Err(Error::InvalidConfig("store.url names no Redis".into()));
        }
        let mut auth = resp::Auth::default();
        let mut addrs = Vec::new();
        let mut tls = Vec::new();
        for u in &cfg.urls {
            let info = redis::IntoConnectionInfo::into_connection_info(u.as_str())
                .map_err(|e| Error::InvalidConfig(format!("store.url {u:?}: {e}")))?;
            match info.addr() {
                redis::ConnectionAddr::Tcp(host, port) => {
                    addrs.push(format!("{host}:{port}"));
                    tls.push(false);
                }
                redis::ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: false,
                    ..
                } => {
                    addrs.push(format!("{host}:{port}"));
                    tls.push(true);
                }
                redis::ConnectionAddr::TcpTls { .. } => {
                    return Err(Error::InvalidConfig(format!(
                        "store.url {u:?}: Redis's certificate is always verified; give its CA \
                         in store.tls_ca_file instead of #insecure"
                    )));
                }
                _ => {
                    return Err(Error::InvalidConfig(format!(
                        "store.url {u:?}: only redis:// or rediss:// over TCP is supported"
                    )));
                }
            }
            auth.username = info.redis_settings().username().map(str::to_owned);
            auth.password = info.redis_settings().password().map(str::to_owned);
        }
        if tls.iter().any(|t| *t) {
            if !tls.iter().all(|t| *t) {
                return Err(Error::InvalidConfig(
                    "store.url: use rediss:// for every URL or for none".into(),
                ));
            }
            auth.tls = Some(tls_client_config(cfg.tls_ca_pem.as_deref())?);
        }
        let shared = Arc::new(Shared {
            cfg,
            sink,
            metrics,
            conn: RwLock::new(None),
            scripts: Scripts::new(),
            known: parking_lot::Mutex::default(),
        });
        let (engine, engine_task) = Engine::start(shared.clone(), addrs, auth, engine_metrics);
        let (writer, rx) = mpsc::channel(4096);
        let writer_task = tokio::spawn(write_loop(shared.clone(), engine.clone(), rx));
        Ok(Self {
            shared,
            engine,
            writer,
            tasks: parking_lot::Mutex::new(vec![engine_task, writer_task]),
        })
    }

    /// The engine, to be told which nodes have local subscribers
    /// ([`crate::FanOut::set_interest`]).
    pub fn engine(&self) -> Arc<Engine> {
        self.engine.clone()
    }

    /// Waits until the engine is connected and ready, at most `limit`.
    pub async fn wait_ready(&self, limit: Duration) -> Result<(), Error> {
        let until = Instant::now() + limit;
        loop {
            match self.ready() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= until => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

async fn write_loop(shared: Arc<Shared>, engine: Arc<Engine>, mut rx: mpsc::Receiver<Job>) {
    let flights = Arc::new(Semaphore::new(FLIGHTS));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = flights.clone().acquire_owned().await else {
            return;
        };
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let (shared, engine) = (shared.clone(), engine.clone());
        tokio::spawn(async move {
            flight(&shared, &engine, jobs).await;
            drop(permit);
        });
    }
}

/// Commits one batch: one script call per node, all nodes concurrently.
async fn flight(shared: &Arc<Shared>, engine: &Arc<Engine>, jobs: Vec<Job>) {
    let started = Instant::now();
    let ops = jobs.len();
    let mut by_node: HashMap<NodeName, Vec<Job>> = HashMap::new();
    for j in jobs {
        by_node.entry(j.append.node.clone()).or_default().push(j);
    }
    let calls = by_node
        .into_iter()
        .map(|(node, jobs)| append_node(shared, engine, node, jobs));
    futures_util::future::join_all(calls).await;
    shared.metrics.observe_commit(started.elapsed(), ops);
}

async fn append_node(shared: &Arc<Shared>, engine: &Arc<Engine>, node: NodeName, jobs: Vec<Job>) {
    let now = time::now_ms();
    let k = shared.keys(node.as_str());
    let ttl = shared.cfg.idempotency_window.as_millis().max(1).to_string();
    let mut changes = Vec::with_capacity(jobs.len());
    let mut inv = shared.scripts.append.key(&k.meta);
    inv.key(&k.log).key(&k.items).key(&k.chan);
    let replicated = shared.cfg.min_replicas > 0;
    inv.arg(now)
        .arg(&ttl)
        .arg(jobs.len())
        .arg(flag(!replicated));
    let known = shared.known.lock().get(&node).cloned();
    match &known {
        Some(k) => inv
            .arg(&k.generation)
            .arg(&k.epoch)
            .arg(flag(k.persist))
            .arg(k.max_items),
        None => inv.arg("").arg("").arg("").arg(""),
    };
    // Retracts and purges need the item index; publishes alone leave it to readers.
    let indexed = jobs
        .iter()
        .any(|j| !matches!(j.append.op, Op::Publish { .. }));
    inv.arg(flag(indexed));
    let mut idem_keys = 0usize;
    for j in &jobs {
        let a = &j.append;
        let (kind, id, change) = match &a.op {
            Op::Publish {
                id,
                payload,
                publisher,
            } => (
                "p",
                Some(id.clone()),
                Change::Published(Item {
                    id: id.clone(),
                    payload: payload.clone(),
                    publisher: publisher.clone(),
                    published_at: now,
                }),
            ),
            Op::Retract(id) => ("r", Some(id.clone()), Change::Retracted(id.clone())),
            Op::Purge => ("x", None, Change::Purged),
        };
        let rec = encode_record(&Record {
            offset: 0,
            change: change.clone(),
            at: now,
        });
        let ik = match &a.idempotency_key {
            Some(key) => {
                inv.key(format!("{}{key}", k.idem));
                idem_keys += 1;
                4 + idem_keys
            }
            None => 0,
        };
        inv.arg(kind)
            .arg(id.as_ref().map_or("", ItemId::as_str))
            .arg(rec)
            .arg(ik)
            .arg(origin_letter(a.origin));
        changes.push((change, id));
    }
    let mut conn = shared.conn();
    let mut rounds = 0;
    let result = loop {
        let result: Result<Value, Error> = match &mut conn {
            Ok(c) => inv.invoke_async(c).await.map_err(|e| engine_error(&e)),
            Err(e) => Err(clone_error(e)),
        };
        match &result {
            // The index is far behind (a retract after many publishes nobody read): bring it
            // up to date, then try again.
            Ok(v) if is_behind(v) && rounds < 100 => {
                rounds += 1;
                if let Err(e) = shared.state(&node, true).await {
                    break Err(e);
                }
            }
            _ => break result,
        }
    };
    let fail = |jobs: Vec<Job>, e: Error| {
        if !matches!(e, Error::NodeNotFound(_)) {
            shared.metrics.store_errors.inc();
        }
        for j in jobs {
            let _ = j.reply.send(Err(clone_error(&e)));
        }
    };
    let parts = match result {
        Ok(Value::Nil) => {
            shared.known.lock().remove(&node);
            return fail(jobs, Error::NodeNotFound(node.to_string()));
        }
        Ok(Value::Array(p)) if p.len() == 6 => p,
        Ok(other) => return fail(jobs, corrupt(format!("append {other:?}"))),
        Err(e) => return fail(jobs, e),
    };
    let Some(epoch) = str_of(&parts[0]).and_then(|s| s.parse::<Epoch>().ok()) else {
        return fail(jobs, corrupt("append epoch"));
    };
    if let (Some(generation), Some(max_items)) = (str_of(&parts[2]), int_of(&parts[4])) {
        let found = Known {
            generation: generation.to_owned(),
            epoch: epoch.to_string(),
            persist: bytes_of(&parts[3]) == Some(b"1"),
            max_items,
        };
        shared.known.lock().insert(node.clone(), found);
    }
    let Value::Array(results) = &parts[1] else {
        return fail(jobs, corrupt("append results"));
    };
    let mut events = Vec::new();
    let mut replies = Vec::with_capacity(jobs.len());
    for ((j, (change, id)), r) in jobs.into_iter().zip(changes).zip(results) {
        let Value::Array(r) = r else {
            replies.push((j.reply, Err(corrupt("append result"))));
            continue;
        };
        let code = r.first().and_then(int_of).unwrap_or(0);
        let offset = r.get(1).and_then(int_of).unwrap_or(0);
        let res = match code {
            1 => {
                events.push(Arc::new(Event::new(
                    node.clone(),
                    epoch,
                    Record {
                        offset,
                        change,
                        at: now,
                    },
                    j.append.origin,
                )));
                Ok(Appended {
                    node: node.clone(),
                    offset,
                    epoch,
                    item_id: id,
                    duplicate: false,
                })
            }
            2 => Ok(Appended {
                node: node.clone(),
                offset,
                epoch,
                item_id: r
                    .get(2)
                    .and_then(str_of)
                    .filter(|s| !s.is_empty())
                    .and_then(|s| ItemId::new(s).ok()),
                duplicate: true,
            }),
            3 => Err(Error::ItemNotFound(
                id.as_ref().map_or("", ItemId::as_str).to_owned(),
            )),
            _ => Err(corrupt("append result code")),
        };
        replies.push((j.reply, res));
    }
    if replicated {
        // Acknowledged and fanned out only once the replicas have it (WAIT on the connection
        // that wrote it), so that a failover to one of them cannot lose it.
        let Ok(c) = &mut conn else {
            return fail_replies(replies, Error::EngineUnavailable("no connection".into()));
        };
        let msg = parts.get(5).and_then(bytes_of).map(<[u8]>::to_vec);
        if let Err(e) = wait_replicas(shared, c, &k.chan).await {
            // Stored on the primary, not known to be on replicas: the outcome is unknown (a
            // retry with the same Idempotency-Key does not store it twice). It is fanned out
            // if and when the replicas confirm it.
            shared.metrics.store_errors.inc();
            fail_replies(replies, e);
            let (shared, engine, mut c) = (shared.clone(), engine.clone(), c.clone());
            tokio::spawn(async move {
                for _ in 0..REPLICA_RETRIES {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if wait_replicas(&shared, &mut c, &k.chan).await.is_ok() {
                        announce(&mut c, &k.chan, msg.as_deref()).await;
                        engine.deliver(&node, epoch, events);
                        return;
                    }
                }
                tracing::warn!(node = %node, "engine: a commit was never confirmed by replicas");
            });
            return;
        }
        announce(c, &k.chan, msg.as_deref()).await;
    }
    engine.deliver(&node, epoch, events);
    for (reply, res) in replies {
        let _ = reply.send(res);
    }
}

/// Publishes a commit's message on its node's channel (other instances' fan-out); a failure
/// leaves it to their gap fill.
async fn announce(c: &mut Conn, chan: &str, msg: Option<&[u8]>) {
    let Some(msg) = msg else { return };
    let sent: Result<Value, _> = redis::cmd("SPUBLISH")
        .arg(chan)
        .arg(msg)
        .query_async(c)
        .await;
    if let Err(e) = sent {
        tracing::debug!(%chan, error = %e, "announcing a replicated commit");
    }
}

type Replies = Vec<(
    oneshot::Sender<Result<Appended, Error>>,
    Result<Appended, Error>,
)>;

fn fail_replies(replies: Replies, e: Error) {
    for (reply, _) in replies {
        let _ = reply.send(Err(clone_error(&e)));
    }
}

/// `WAIT min_replicas timeout` where `chan`'s node lives (in a cluster, its shard's primary).
async fn wait_replicas(shared: &Shared, c: &mut Conn, chan: &str) -> Result<(), Error> {
    let want = shared.cfg.min_replicas;
    let mut cmd = redis::cmd("WAIT");
    // Redis answers well before the connection's own response timeout fires.
    cmd.arg(want)
        .arg((shared.cfg.timeout.as_millis() as u64 / 2).max(1));
    let got = match c {
        Conn::Single(m) => cmd.query_async::<i64>(m).await,
        Conn::Cluster(cl) => {
            use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
            let route = Route::new(engine::slot_of(chan.as_bytes()), SlotAddr::Master);
            cl.route_command(
                cmd,
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
            )
            .await
            .map(|v| match v {
                Value::Int(n) => n,
                _ => -1,
            })
        }
    }
    .map_err(|e| engine_error(&e))?;
    if got < i64::from(want) {
        return Err(Error::EngineUnavailable(format!(
            "only {got} of store.min_replicas = {want} Redis replicas confirmed the write in \
             time; it may still take effect: retry it with the same Idempotency-Key"
        )));
    }
    Ok(())
}

/// Errors are not `Clone`; a failed script call fails each of its appends the same way.
fn clone_error(e: &Error) -> Error {
    match e {
        Error::NodeNotFound(n) => Error::NodeNotFound(n.clone()),
        Error::EngineUnavailable(s) => Error::EngineUnavailable(s.clone()),
        other => Error::Storage(other.to_string()),
    }
}

fn member_key(jid: &str, subid: &str) -> String {
    format!("{jid}\u{0}{subid}")
}

impl RedisStore {
    async fn set_member(
        &self,
        node: &NodeName,
        hash: String,
        field: &str,
        value: &[u8],
    ) -> Result<bool, Error> {
        let k = self.shared.keys(node.as_str());
        let mut c = self.shared.conn()?;
        let had: i64 = self
            .shared
            .scripts
            .set_member
            .key(&k.meta)
            .key(hash)
            .arg(field)
            .arg(value)
            .invoke_async(&mut c)
            .await
            .map_err(|e| engine_error(&e))?;
        if had < 0 {
            return Err(Error::NodeNotFound(node.to_string()));
        }
        // Other instances follow memberships through this log (a global key: in a cluster it
        // cannot be part of the node's script). Should this fail, their periodic full reread
        // still brings the change.
        let logged: Result<Value, _> = redis::cmd("XADD")
            .arg(self.shared.global("members"))
            .arg("MAXLEN")
            .arg("~")
            .arg(MEMBER_LOG_LEN)
            .arg("0-*")
            .arg("n")
            .arg(node.as_str())
            .query_async(&mut c)
            .await;
        if let Err(e) = logged {
            tracing::debug!(node = %node, error = %e, "logging a membership change");
        }
        Ok(had == 1)
    }

    async fn members(
        &self,
        node: &NodeName,
        hash: String,
    ) -> Result<Vec<(String, Vec<u8>)>, Error> {
        let k = self.shared.keys(node.as_str());
        let mut c = self.shared.conn()?;
        let v: Value = self
            .shared
            .scripts
            .members
            .key(&k.meta)
            .key(hash)
            .invoke_async(&mut c)
            .await
            .map_err(|e| engine_error(&e))?;
        let flat = match v {
            Value::Nil => return Err(Error::NodeNotFound(node.to_string())),
            Value::Array(a) => a,
            Value::Map(m) => m.into_iter().flat_map(|(a, b)| [a, b]).collect(),
            other => return Err(corrupt(format!("members {other:?}"))),
        };
        let mut out = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks(2) {
            if let [f, v] = pair {
                let f = str_of(f).ok_or_else(|| corrupt("member field"))?;
                let v = bytes_of(v).ok_or_else(|| corrupt("member value"))?;
                out.push((f.to_owned(), v.to_vec()));
            }
        }
        out.sort();
        Ok(out)
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn put_node(
        &self,
        name: NodeName,
        config: NodeConfig,
    ) -> Result<(NodeMeta, bool), Error> {
        config.validate()?;
        let json = serde_json::to_vec(&config).map_err(|e| Error::Storage(e.to_string()))?;
        let mut c = self.shared.conn()?;
        redis::cmd("SADD")
            .arg(self.shared.global("nodes"))
            .arg(name.as_str())
            .exec_async(&mut c)
            .await
            .map_err(|e| engine_error(&e))?;
        let epoch = Epoch::random().to_string();
        let now = time::now_ms().to_string();
        self.shared.known.lock().remove(&name);
        let v = self
            .shared
            .node_script(
                &self.shared.scripts.put_node,
                name.as_str(),
                &[
                    &json,
                    flag(config.persist),
                    config.max_items.to_string().as_bytes(),
                    epoch.as_bytes(),
                    now.as_bytes(),
                    generation().as_bytes(),
                ],
            )
            .await?;
        let Value::Array(parts) = v else {
            return Err(corrupt("put_node"));
        };
        let created = parts.first().and_then(int_of) == Some(1);
        let state = parts
            .get(1)
            .map(|s| parse_state(&name, s))
            .transpose()?
            .flatten()
            .ok_or_else(|| corrupt("put_node state"))?;
        // With its item count (the script left the index as it was).
        let meta = match self.shared.state(&name, true).await? {
            Some(s) if s.meta.epoch == state.meta.epoch => s.meta,
            _ => state.meta,
        };
        Ok((meta, created))
    }

    async fn node(&self, name: &NodeName) -> Result<Option<NodeMeta>, Error> {
        Ok(self.shared.state(name, true).await?.map(|s| s.meta))
    }

    async fn nodes(&self) -> Result<Vec<NodeMeta>, Error> {
        let names = self.node_names().await?;
        let states =
            futures_util::future::join_all(names.iter().map(|n| self.shared.state(n, true))).await;
        let mut out = Vec::with_capacity(names.len());
        for s in states {
            if let Some(s) = s? {
                out.push(s.meta);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn node_names(&self) -> Result<Vec<NodeName>, Error> {
        let mut c = self.shared.conn()?;
        let names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.shared.global("nodes"))
            .query_async(&mut c)
            .await
            .map_err(|e| engine_error(&e))?;
        let mut names: Vec<NodeName> = names.iter().filter_map(|n| NodeName::new(n).ok()).collect();
        names.sort();
        Ok(names)
    }

    async fn member_changes(&self, cursor: Option<u64>) -> Result<MemberChanges, Error> {
        let key = self.shared.global("members");
        let mut c = self.shared.conn()?;
        let seq = |id: &str| id.strip_prefix("0-").and_then(|s| s.parse::<u64>().ok());
        type Entries = Vec<(String, HashMap<String, String>)>;
        let (first, last): (Entries, Entries) = redis::pipe()
            .cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("XREVRANGE")
            .arg(&key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut c)
            .await
            .map_err(|e| engine_error(&e))?;
        let last = last.first().and_then(|(id, _)| seq(id)).unwrap_or(0);
        let Some(after) = cursor else {
            return Ok(MemberChanges {
                cursor: last,
                nodes: Vec::new(),
                complete: true,
            });
        };
        let first = first
            .first()
            .and_then(|(id, _)| seq(id))
            .unwrap_or(last + 1);
        // The log went back (Redis lost it) or was trimmed past the cursor.
        if last < after || (first > after + 1 && last > after) {
            return Ok(MemberChanges {
                cursor: last,
                nodes: Vec::new(),
                complete: false,
            });
        }
        let entries: Entries = redis::cmd("XRANGE")
            .arg(&key)
            .arg(format!("(0-{after}"))
            .arg("+")
            .arg("COUNT")
            .arg(MEMBER_LOG_LEN)
            .query_async(&mut c)
            .await
            .map_err(|e| engine_error(&e))?;
        let mut out = MemberChanges {
            cursor: after,
            nodes: Vec::with_capacity(entries.len()),
            complete: true,
        };
        for (id, fields) in entries {
            out.cursor = out.cursor.max(seq(&id).unwrap_or(out.cursor));
            if let Some(n) = fields.get("n").and_then(|n| NodeName::new(n).ok()) {
                out.nodes.push(n);
            }
        }
        out.nodes.sort();
        out.nodes.dedup();
        Ok(out)
    }

    async fn delete_node(&self, name: &NodeName, origin: Origin) -> Result<(), Error> {
        let k = self.shared.keys(name.as_str());
        let mut c = self.shared.conn()?;
        self.shared.known.lock().remove(name);
        let v: Value = self
            .shared
            .scripts
            .delete_node
            .key(&k.meta)
            .key(&k.log)
            .key(&k.items)
            .key(&k.subs)
            .key(&k.affs)
            .key(&k.chan)
            .invoke_async(&mut c)
            .await
            .map_err(|e| engine_error(&e))?;
        let parts = match v {
            Value::Nil => return Err(Error::NodeNotFound(name.to_string())),
            Value::Array(p) if p.len() == 2 => p,
            other => return Err(corrupt(format!("delete {other:?}"))),
        };
        let epoch: Epoch = str_of(&parts[0])
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("delete epoch"))?;
        let offset = int_of(&parts[1]).ok_or_else(|| corrupt("delete offset"))?;
        redis::cmd("SREM")
            .arg(self.shared.global("nodes"))
            .arg(name.as_str())
            .exec_async(&mut c)
            .await
            .map_err(|e| engine_error(&e))?;
        let event = engine::deleted_event(name, epoch, offset, origin);
        self.engine.deliver(name, epoch, vec![event]);
        Ok(())
    }

    async fn append(&self, batch: Vec<Append>) -> Vec<Result<Appended, Error>> {
        if let Err(e) = self.ready() {
            return batch.iter().map(|_| Err(clone_error(&e))).collect();
        }
        let mut waits = Vec::with_capacity(batch.len());
        for append in batch {
            let (reply, rx) = oneshot::channel();
            if self.writer.send(Job { append, reply }).await.is_err() {
                waits.push(None);
            } else {
                waits.push(Some(rx));
            }
        }
        let mut out = Vec::with_capacity(waits.len());
        for w in waits {
            out.push(match w {
                Some(rx) => rx
                    .await
                    .unwrap_or_else(|_| Err(Error::Unavailable("store closed".into()))),
                None => Err(Error::Unavailable("store closed".into())),
            });
        }
        out
    }

    async fn read(&self, node: &NodeName, after: Offset, limit: usize) -> Result<Page, Error> {
        let (state, records) = self
            .shared
            .read_records(node, after, limit, true)
            .await?
            .ok_or_else(|| Error::NodeNotFound(node.to_string()))?;
        Ok(Page {
            meta: state.meta,
            records,
        })
    }

    async fn items(
        &self,
        node: &NodeName,
        after: Offset,
        limit: usize,
    ) -> Result<ItemsPage, Error> {
        let v = self
            .shared
            .node_script(
                &self.shared.scripts.items,
                node.as_str(),
                &[after.to_string().as_bytes(), limit.to_string().as_bytes()],
            )
            .await?;
        let (state, records) = parse_state_and_entries(node, v)?
            .ok_or_else(|| Error::NodeNotFound(node.to_string()))?;
        let items = records
            .into_iter()
            .filter_map(|r| match r.change {
                Change::Published(item) => Some((r.offset, item)),
                _ => None,
            })
            .collect();
        Ok(ItemsPage {
            meta: state.meta,
            items,
        })
    }

    async fn item(&self, node: &NodeName, id: &ItemId) -> Result<Option<(Offset, Item)>, Error> {
        let v = self
            .shared
            .node_script(
                &self.shared.scripts.item,
                node.as_str(),
                &[id.as_str().as_bytes()],
            )
            .await?;
        match v {
            Value::Nil => Err(Error::NodeNotFound(node.to_string())),
            Value::Array(_) => match parse_entry(&v)? {
                Record {
                    offset,
                    change: Change::Published(item),
                    ..
                } => Ok(Some((offset, item))),
                _ => Ok(None),
            },
            _ => Ok(None),
        }
    }

    async fn put_account(&self, account: Account) -> Result<bool, Error> {
        let json = serde_json::to_vec(&account).map_err(|e| Error::Storage(e.to_string()))?;
        let mut c = self.shared.conn()?;
        let added: i64 = redis::cmd("HSET")
            .arg(self.shared.global("accounts"))
            .arg(account.username.as_str())
            .arg(json)
            .query_async(&mut c)
            .await
            .map_err(|e| engine_error(&e))?;
        Ok(added == 1)
    }

    async fn account(&self, username: &Username) -> Result<Option<Account>, Error> {
        let mut c = self.shared.conn()?;
        let v: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(self.shared.global("accounts"))
            .arg(username.as_str())
            .query_async(&mut c)
            .await
            .map_err(|e| engine_error(&e))?;
        v.map(|b| {
            serde_json::from_slice(&b)
                .map_err(|e| Error::Storage(format!("account {username}: {e}")))
        })
        .transpose()
    }

    async fn delete_account(&self, username: &Username) -> Result<(), Error> {
        let mut c = self.shared.conn()?;
        let n: i64 = redis::cmd("HDEL")
            .arg(self.shared.global("accounts"))
            .arg(username.as_str())
            .query_async(&mut c)
            .await
            .map_err(|e| engine_error(&e))?;
        if n == 0 {
            return Err(Error::AccountNotFound(username.to_string()));
        }
        Ok(())
    }

    async fn accounts(&self) -> Result<Vec<Username>, Error> {
        let mut c = self.shared.conn()?;
        let names: Vec<String> = redis::cmd("HKEYS")
            .arg(self.shared.global("accounts"))
            .query_async(&mut c)
            .await
            .map_err(|e| engine_error(&e))?;
        let mut out: Vec<Username> = names.iter().filter_map(|n| Username::new(n).ok()).collect();
        out.sort();
        Ok(out)
    }

    async fn set_affiliation(
        &self,
        node: &NodeName,
        jid: &str,
        affiliation: Option<Affiliation>,
    ) -> Result<(), Error> {
        let affs = self.shared.keys(node.as_str()).affs;
        let value = affiliation.map_or("", Affiliation::as_str);
        self.set_member(node, affs, jid, value.as_bytes()).await?;
        Ok(())
    }

    async fn affiliations(&self, node: &NodeName) -> Result<Vec<(Arc<str>, Affiliation)>, Error> {
        let affs = self.shared.keys(node.as_str()).affs;
        self.members(node, affs)
            .await?
            .into_iter()
            .map(|(jid, v)| {
                let a = std::str::from_utf8(&v)
                    .ok()
                    .and_then(Affiliation::parse)
                    .ok_or_else(|| corrupt(format!("affiliation of {jid}")))?;
                Ok((Arc::from(jid.as_str()), a))
            })
            .collect()
    }

    async fn put_subscription(&self, node: &NodeName, sub: NodeSubscription) -> Result<(), Error> {
        let subs = self.shared.keys(node.as_str()).subs;
        let value = encode_subscription(&sub);
        self.set_member(node, subs, &member_key(&sub.jid, &sub.subid), &value)
            .await?;
        Ok(())
    }

    async fn delete_subscription(
        &self,
        node: &NodeName,
        jid: &str,
        subid: &str,
    ) -> Result<bool, Error> {
        let subs = self.shared.keys(node.as_str()).subs;
        match self
            .set_member(node, subs, &member_key(jid, subid), b"")
            .await
        {
            Ok(had) => Ok(had),
            Err(Error::NodeNotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn subscriptions(&self, node: &NodeName) -> Result<Vec<NodeSubscription>, Error> {
        let subs = self.shared.keys(node.as_str()).subs;
        self.members(node, subs)
            .await?
            .into_iter()
            .map(|(key, v)| {
                let (jid, subid) = key.split_once('\u{0}').unwrap_or((key.as_str(), ""));
                decode_subscription(node.as_str(), jid, subid, &v)
            })
            .collect()
    }

    fn ready(&self) -> Result<(), Error> {
        self.engine.ready()
    }

    async fn close(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        self.engine.close();
    }
}

#[cfg(test)]
mod tests;
