//! The engine: sharded pub/sub between instances, and per watched node a sequencer that hands
//! events to the commit sink in offset order, exactly once.
//!
//! Events reach the sequencer from three sides: this instance's own commits (at once), the
//! node's channel (commits of every instance, in offset order), and the node's Stream (when a
//! gap shows: a reconnect, a message missed while subscribing). Whatever arrives twice is
//! dropped by offset; whatever is missing is read from the Stream before anything after it
//! goes out. One supervisor task owns the connections; it re-connects with backoff,
//! re-subscribes, and then checks each node's tail against its Stream.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::resp::{Auth, Push, SubConn};
use super::{Shared, connect, origin_of};
use crate::error::Error;
use crate::fanout::Interest;
use crate::metrics::EngineMetrics;
use crate::model::{Change, Epoch, Event, NodeName, Offset, Origin, Record};
use crate::store::codec::decode_record;
use crate::time;

/// How often the supervisor looks after connections.
const TICK: Duration = Duration::from_millis(200);
/// How often the command connection is checked.
const PING_EVERY: Duration = Duration::from_secs(1);
/// How often each watched node's tail is compared with its Stream, a safety net: lost
/// notifications come with a lost connection, and a reconnect checks every node at once. The
/// checks are spread over the period, a few nodes per tick, so their cost stays flat however
/// many nodes are watched.
const TAIL_CHECK_EVERY: Duration = Duration::from_secs(60);
/// How long a node stays subscribed after its last local subscriber left.
const LINGER: Duration = Duration::from_secs(30);
/// How long a new local subscriber waits for the engine to confirm.
const WATCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a gap may stay open before it is filled from the Stream.
const GAP_GRACE: Duration = Duration::from_millis(25);
/// Control messages (watch, unwatch, connection results) waiting for the supervisor.
const CONTROL_QUEUE: usize = 1024;
/// Pub/sub pushes waiting for the supervisor.
const EVENT_QUEUE: usize = 8192;
/// Records read per gap-fill page.
const FILL_PAGE: usize = 512;
/// Reads a fill repeats when the node changed history while one was on its way; after that it
/// follows what Redis says.
const MAX_STALE_READS: u32 = 3;

/// Sequencer state of one watched node.
#[derive(Debug, Default)]
struct Seq {
    /// Set once the node's position is known (after the subscription is confirmed).
    init: bool,
    /// The node's epoch; `None` while the node does not exist.
    epoch: Option<Epoch>,
    /// The last offset handed to the sink.
    last: Offset,
    /// Events ahead of `last + 1` (or all, before `init`).
    pending: BTreeMap<Offset, Arc<Event>>,
    filling: bool,
    initializing: bool,
    /// The epoch this node left because Redis lost part of it: late notifications of it are
    /// ignored (their records are read again under the new epoch).
    retired: Option<Epoch>,
    waiters: Vec<(Instant, oneshot::Sender<Result<(), Error>>)>,
}

enum Msg {
    Watch(NodeName, oneshot::Sender<Result<(), Error>>),
    Unwatch(NodeName),
    Connected(Result<super::Conn, String>),
    Pinged(u64, Result<(), String>),
    SubConnected(String, u64, Result<SubConn, String>),
    Slots(Vec<(u16, u16, String)>),
    Close,
}

/// The engine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    shared: Arc<Shared>,
    seqs: Mutex<HashMap<NodeName, Seq>>,
    tx: mpsc::Sender<Msg>,
    cmd_up: AtomicBool,
    subs_up: AtomicBool,
    closed: AtomicBool,
    /// Why Redis was last unreachable, for readiness reports.
    last_error: Mutex<String>,
    metrics: Arc<EngineMetrics>,
}

impl Engine {
    pub(super) fn start(
        shared: Arc<Shared>,
        addrs: Vec<String>,
        auth: Auth,
        metrics: Arc<EngineMetrics>,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
        let engine = Arc::new(Self {
            shared,
            seqs: Mutex::new(HashMap::new()),
            tx,
            cmd_up: AtomicBool::new(false),
            subs_up: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            last_error: Mutex::new("not connected yet".to_owned()),
            metrics,
        });
        // Full: the connections stop reading, Redis buffers, and past its output limit for
        // pub/sub clients it drops the connection; the reconnect reads the gap from the Streams.
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let sup = Supervisor {
            engine: engine.clone(),
            addrs,
            auth,
            conns: HashMap::new(),
            connecting: HashMap::new(),
            next_id: 1,
            events_tx,
            watched: HashMap::new(),
            channels: HashMap::new(),
            slots: Vec::new(),
            cmd_connecting: false,
            pinging: false,
            last_ping: Instant::now() - PING_EVERY,
            last_tail_check: Instant::now(),
            tail_queue: Vec::new(),
            tail_batch: 1,
            backoff: Backoff::default(),
            was_down: false,
            generation: 0,
        };
        let task = tokio::spawn(sup.run(rx, events_rx));
        (engine, task)
    }

    /// Whether writes may be acknowledged: Redis answers and every subscription is up.
    pub fn ready(&self) -> Result<(), Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Unavailable("store closed".into()));
        }
        if !self.cmd_up.load(Ordering::Acquire) {
            let why = self.last_error.lock();
            let refused = ["WRONGPASS", "NOAUTH", "NOPERM", "uthentication"]
                .iter()
                .any(|w| why.contains(w));
            return Err(Error::EngineUnavailable(if refused {
                format!("Redis refuses our credentials (store.url): {why}")
            } else {
                format!("Redis is unreachable: {why}")
            }));
        }
        if !self.subs_up.load(Ordering::Acquire) {
            return Err(Error::EngineUnavailable(format!(
                "the engine's pub/sub subscriptions are down: {}",
                self.last_error.lock()
            )));
        }
        Ok(())
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _ = self.tx.try_send(Msg::Close);
    }

    /// Hands committed events of one node to the sink, in offset order, once.
    pub(super) fn deliver(
        self: &Arc<Self>,
        node: &NodeName,
        epoch: Epoch,
        events: Vec<Arc<Event>>,
    ) {
        if events.is_empty() {
            return;
        }
        let mut seqs = self.seqs.lock();
        let Some(seq) = seqs.get_mut(node) else {
            drop(seqs);
            // Nobody here subscribes to the node: order does not matter to anyone.
            for e in events {
                self.shared.sink.committed(e);
            }
            return;
        };
        if !seq.init {
            for e in events {
                seq.pending.insert(e.offset, e);
            }
            return;
        }
        if seq.retired == Some(epoch) {
            return;
        }
        match seq.epoch {
            None => {
                seq.epoch = Some(epoch);
                seq.last = 0;
            }
            Some(e) if e != epoch => {
                // A new history (the node was deleted and created again meanwhile, or given a
                // new epoch after Redis lost events): follow it. The old history's
                // subscriptions see its events' epoch, ask the store, and end.
                seq.retired = Some(e);
                seq.epoch = Some(epoch);
                seq.last = 0;
                seq.pending.clear();
            }
            Some(_) => {}
        }
        for e in events {
            if e.offset > seq.last {
                seq.pending.insert(e.offset, e);
            }
        }
        self.drain(seq);
        self.fill_if_gap(node, seq);
    }

    fn emit_deleted(&self, node: &NodeName, epoch: Epoch, offset: Offset) {
        self.shared
            .sink
            .committed(deleted_event(node, epoch, offset, Origin::History));
    }

    /// Emits pending events that follow `last` without a gap.
    fn drain(&self, seq: &mut Seq) {
        while let Some(entry) = seq.pending.first_entry() {
            let off = *entry.key();
            if off <= seq.last {
                entry.remove();
                continue;
            }
            if off != seq.last + 1 {
                break;
            }
            let ev = entry.remove();
            seq.last = off;
            let deleted = matches!(ev.change, Change::Deleted);
            self.shared.sink.committed(ev);
            if deleted {
                seq.epoch = None;
                seq.last = 0;
                seq.pending.clear();
                break;
            }
        }
    }

    fn fill_if_gap(self: &Arc<Self>, node: &NodeName, seq: &mut Seq) {
        if !seq.pending.is_empty() && !seq.filling {
            seq.filling = true;
            tokio::spawn(self.clone().fill(node.clone(), true));
        }
    }

    /// Compares the node's tail with its Stream and delivers what is missing.
    fn check_tail(self: &Arc<Self>, node: &NodeName) {
        let mut seqs = self.seqs.lock();
        if let Some(seq) = seqs.get_mut(node)
            && seq.init
            && !seq.filling
        {
            seq.filling = true;
            tokio::spawn(self.clone().fill(node.clone(), false));
        }
    }

    /// Reads the Stream after `last` until the gap is closed (or known unfillable). With
    /// `grace`, first waits a moment: concurrent commits of this instance and the channel
    /// usually close a gap by themselves, without a read.
    async fn fill(self: Arc<Self>, node: NodeName, grace: bool) {
        if grace {
            tokio::time::sleep(GAP_GRACE).await;
            let mut seqs = self.seqs.lock();
            let Some(seq) = seqs.get_mut(&node) else {
                return;
            };
            if seq.pending.is_empty() {
                seq.filling = false;
                return;
            }
        }
        let mut stale_reads = 0;
        'read: loop {
            let (after, read_epoch) = match self.seqs.lock().get(&node) {
                Some(s) => (s.last, s.epoch),
                None => return,
            };
            let page = self
                .shared
                .read_records(&node, after, FILL_PAGE, false)
                .await;
            let mut rebase = None;
            'locked: {
                let mut seqs = self.seqs.lock();
                let Some(seq) = seqs.get_mut(&node) else {
                    return;
                };
                match page {
                    // The engine is in trouble: the reconnect's tail check tries again.
                    Err(_) => {
                        seq.filling = false;
                        return;
                    }
                    Ok(None) => {
                        // The node is gone. Deliver what we hold, then its end.
                        if let Some(&first) = seq.pending.keys().next() {
                            seq.last = seq.last.max(first - 1);
                            self.drain(seq);
                        }
                        if let Some(e) = seq.epoch.take() {
                            self.emit_deleted(&node, e, seq.last + 1);
                            seq.last = 0;
                            seq.pending.clear();
                        }
                        seq.filling = false;
                        return;
                    }
                    Ok(Some((state, records))) => {
                        let epoch = state.meta.epoch;
                        if (seq.epoch != read_epoch || seq.retired == Some(epoch))
                            && stale_reads < MAX_STALE_READS
                        {
                            // This instance followed the node into a new history while the
                            // read was on its way (the new history's events arrived
                            // meanwhile): the page and `after` belong to the old one.
                            stale_reads += 1;
                            continue 'read;
                        }
                        if seq.epoch != Some(epoch) {
                            // A new history: follow it from its start (see `deliver`).
                            seq.retired = seq.epoch;
                            seq.epoch = Some(epoch);
                            seq.last = 0;
                            seq.pending.retain(|_, e| e.epoch == epoch);
                            continue 'read;
                        }
                        if Some(epoch) == read_epoch && state.meta.last_offset < after {
                            // Redis has less than this instance had delivered when it sent the
                            // read: it lost acknowledged events (a failover to a replica that
                            // lagged, a restart from an older snapshot), and would give their
                            // offsets to new items. A new epoch tells every subscriber instead
                            // of letting them skip those. (Not `seq.last`: events committed
                            // after the read ran may have been delivered while it was on its
                            // way back; they are no sign of loss.)
                            rebase = Some((epoch, after, state.meta.last_offset));
                            break 'locked;
                        }
                        let n = records.len();
                        // What history no longer holds (trimmed, or never kept) is skipped; the
                        // subscriptions report it as lost when they read the store.
                        let skip_to = match (records.first(), seq.pending.keys().next()) {
                            (Some(r), Some(&p)) => Some(r.offset.min(p)),
                            (Some(r), None) => Some(r.offset),
                            (None, Some(&p)) => Some(p),
                            (None, None) => None,
                        };
                        if let Some(to) = skip_to
                            && to > seq.last + 1
                        {
                            seq.last = to - 1;
                        }
                        let mut added = 0u64;
                        for r in records {
                            if r.offset > seq.last && !seq.pending.contains_key(&r.offset) {
                                added += 1;
                                seq.pending.insert(
                                    r.offset,
                                    Arc::new(Event::new(node.clone(), epoch, r, Origin::History)),
                                );
                            }
                        }
                        self.metrics.gap_fills.inc_by(added);
                        self.drain(seq);
                        let more = n > 0 && seq.last < state.meta.last_offset;
                        let gap = !seq.pending.is_empty();
                        if !more && !gap {
                            seq.filling = false;
                            return;
                        }
                        if !more && n == 0 {
                            // A gap the Stream cannot fill: step over it.
                            if let Some(&first) = seq.pending.keys().next() {
                                seq.last = first - 1;
                                self.drain(seq);
                            }
                            if seq.pending.is_empty() {
                                seq.filling = false;
                                return;
                            }
                        }
                    }
                }
            }
            if let Some((epoch, seen, stored)) = rebase {
                tracing::warn!(
                    node = %node,
                    %epoch,
                    delivered = seen,
                    stored,
                    "engine: Redis lost acknowledged events; the node gets a new epoch"
                );
                if let Err(e) = self.shared.rebase(&node, epoch).await {
                    tracing::warn!(node = %node, error = %e, "engine: new epoch failed");
                    if let Some(seq) = self.seqs.lock().get_mut(&node) {
                        seq.filling = false;
                    }
                    return;
                }
                self.metrics.epoch_changes.inc();
            }
        }
    }

    /// Learns the node's position once its subscription is confirmed, then releases waiters.
    async fn initialize(self: Arc<Self>, node: NodeName) {
        let state = self.shared.state(&node, false).await;
        let mut seqs = self.seqs.lock();
        let Some(seq) = seqs.get_mut(&node) else {
            return;
        };
        seq.initializing = false;
        match state {
            Ok(s) => {
                seq.init = true;
                match s {
                    Some(s) => {
                        seq.epoch = Some(s.meta.epoch);
                        seq.last = s.meta.last_offset;
                        seq.pending.retain(|_, e| e.epoch == s.meta.epoch);
                    }
                    None => {
                        seq.epoch = None;
                        seq.last = 0;
                        seq.pending.clear();
                    }
                }
                self.drain(seq);
                self.fill_if_gap(&node, seq);
                for (_, w) in seq.waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
            }
            Err(e) => {
                for (_, w) in seq.waiters.drain(..) {
                    let _ = w.send(Err(super::clone_error(&e)));
                }
            }
        }
    }
}

#[async_trait]
impl Interest for Engine {
    async fn watch(&self, node: &NodeName) -> Result<(), Error> {
        self.ready()?;
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Watch(node.clone(), tx))
            .await
            .map_err(|_| Error::Unavailable("store closed".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(Error::Unavailable("store closed".into())))
    }

    fn unwatch(&self, node: &NodeName) {
        // Full: the node stays subscribed until a later unwatch gets through (harmless).
        let _ = self.tx.try_send(Msg::Unwatch(node.clone()));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SubState {
    Unsent,
    Sent,
    Confirmed,
}

#[derive(Debug)]
struct Watched {
    channel: Vec<u8>,
    addr: Option<String>,
    state: SubState,
    active: bool,
    idle_since: Instant,
}

#[derive(Debug)]
struct Backoff {
    delay: Duration,
    next: Instant,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(100),
            next: Instant::now(),
        }
    }
}

impl Backoff {
    fn due(&self) -> bool {
        Instant::now() >= self.next
    }
    fn failed(&mut self) {
        self.next = Instant::now() + self.delay;
        self.delay = (self.delay * 2).min(Duration::from_secs(2));
    }
    fn reset(&mut self) {
        *self = Self::default();
    }
}

struct Supervisor {
    engine: Arc<Engine>,
    /// Seed addresses (`host:port`).
    addrs: Vec<String>,
    auth: Auth,
    /// Pub/sub connections by address, with their ids.
    conns: HashMap<String, (u64, SubConn)>,
    connecting: HashMap<String, u64>,
    next_id: u64,
    events_tx: mpsc::Sender<(u64, Push)>,
    watched: HashMap<NodeName, Watched>,
    channels: HashMap<Vec<u8>, NodeName>,
    /// Cluster slot ranges and their masters.
    slots: Vec<(u16, u16, String)>,
    cmd_connecting: bool,
    pinging: bool,
    last_ping: Instant,
    last_tail_check: Instant,
    /// Watched nodes whose tail check is due in this period, and how many to check per tick.
    tail_queue: Vec<NodeName>,
    tail_batch: usize,
    backoff: Backoff,
    was_down: bool,
    /// Counts pub/sub connection losses, to tell stale PING answers from fresh ones.
    generation: u64,
}

impl Supervisor {
    fn cluster(&self) -> bool {
        self.engine.shared.cfg.cluster
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, mut events: mpsc::Receiver<(u64, Push)>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(Msg::Close) | None => return,
                    Some(m) => self.on_msg(m),
                },
                Some((id, p)) = events.recv() => self.on_push(id, p),
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    fn spawn_msg<F>(&self, f: F)
    where
        F: std::future::Future<Output = Msg> + Send + 'static,
    {
        let tx = self.engine.tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(f.await).await;
        });
    }

    fn on_msg(&mut self, m: Msg) {
        match m {
            Msg::Watch(node, reply) => self.watch(node, reply),
            Msg::Unwatch(node) => {
                if let Some(w) = self.watched.get_mut(&node) {
                    w.active = false;
                    w.idle_since = Instant::now();
                }
            }
            Msg::Connected(r) => {
                self.cmd_connecting = false;
                match r {
                    Ok(c) => {
                        *self.engine.shared.conn.write() = Some(c);
                        self.last_ping = Instant::now() - PING_EVERY;
                        if self.cluster() {
                            self.refresh_slots();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "engine: cannot connect to Redis");
                        *self.engine.last_error.lock() = e;
                        self.backoff.failed();
                    }
                }
            }
            Msg::Pinged(generation, r) => {
                self.pinging = false;
                // A PING sent before the last connection loss proves nothing.
                if generation != self.generation && r.is_ok() {
                    return;
                }
                self.engine.cmd_up.store(r.is_ok(), Ordering::Release);
                if let Err(e) = r {
                    *self.engine.last_error.lock() = e;
                    self.was_down = true;
                }
            }
            Msg::SubConnected(addr, id, r) => {
                self.connecting.remove(&addr);
                match r {
                    Ok(c) => {
                        if self.was_down || self.conns.contains_key(&addr) {
                            self.engine.metrics.reconnects.inc();
                        }
                        self.conns.insert(addr.clone(), (id, c));
                        self.backoff.reset();
                        self.send_subscriptions();
                    }
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "engine: pub/sub connection failed");
                        *self.engine.last_error.lock() = e;
                        self.backoff.failed();
                    }
                }
            }
            Msg::Slots(slots) => {
                if !slots.is_empty() {
                    self.slots = slots;
                    self.send_subscriptions();
                }
            }
            Msg::Close => {}
        }
    }

    fn watch(&mut self, node: NodeName, reply: oneshot::Sender<Result<(), Error>>) {
        let channel = format!("{}:{{{node}}}:events", self.engine.shared.cfg.prefix).into_bytes();
        let w = self.watched.entry(node.clone()).or_insert_with(|| Watched {
            channel: channel.clone(),
            addr: None,
            state: SubState::Unsent,
            active: true,
            idle_since: Instant::now(),
        });
        w.active = true;
        let confirmed = w.state == SubState::Confirmed;
        self.channels.insert(channel, node.clone());
        let spawn_init = {
            let mut seqs = self.engine.seqs.lock();
            let seq = seqs.entry(node.clone()).or_default();
            if confirmed && seq.init {
                let _ = reply.send(Ok(()));
                return;
            }
            seq.waiters.push((Instant::now(), reply));
            if confirmed && !seq.initializing {
                seq.initializing = true;
                true
            } else {
                false
            }
        };
        if spawn_init {
            tokio::spawn(self.engine.clone().initialize(node));
        }
        self.send_subscriptions();
    }

    fn on_push(&mut self, id: u64, p: Push) {
        match p {
            Push::Message { channel, payload } => {
                let Some(node) = self.channels.get(&channel).cloned() else {
                    return;
                };
                match parse_message(&node, &payload) {
                    Some((epoch, events)) => self.engine.deliver(&node, epoch, events),
                    None => {
                        tracing::warn!(%node, "engine: undecodable message; checking the tail");
                        self.engine.check_tail(&node);
                    }
                }
            }
            Push::Subscribed(channel) => {
                let Some(node) = self.channels.get(&channel).cloned() else {
                    return;
                };
                if let Some(w) = self.watched.get_mut(&node) {
                    w.state = SubState::Confirmed;
                }
                let init = {
                    let mut seqs = self.engine.seqs.lock();
                    let seq = seqs.entry(node.clone()).or_default();
                    if seq.init {
                        false
                    } else if !seq.initializing {
                        seq.initializing = true;
                        true
                    } else {
                        false
                    }
                };
                if init {
                    tokio::spawn(self.engine.clone().initialize(node));
                } else {
                    // Re-subscribed after a disconnect: whatever was committed meanwhile is in
                    // the Stream.
                    self.engine.check_tail(&node);
                }
                self.update_up();
            }
            Push::Unsubscribed(channel) => {
                if let Some(node) = self.channels.get(&channel).cloned()
                    && let Some(w) = self.watched.get_mut(&node)
                    && w.state == SubState::Confirmed
                {
                    // The server ended it (the slot moved): subscribe again where it lives now.
                    w.state = SubState::Unsent;
                    w.addr = None;
                    if self.cluster() {
                        self.refresh_slots();
                    }
                }
            }
            Push::Refused(e) => {
                tracing::debug!(error = %e, "engine: pub/sub command refused");
                let addr = self
                    .conns
                    .iter()
                    .find(|(_, (cid, _))| *cid == id)
                    .map(|(a, _)| a.clone());
                for w in self.watched.values_mut() {
                    if w.state == SubState::Sent && w.addr == addr {
                        w.state = SubState::Unsent;
                        w.addr = None;
                    }
                }
                if self.cluster() {
                    self.refresh_slots();
                }
            }
            Push::Down(why) => {
                let Some(addr) = self
                    .conns
                    .iter()
                    .find(|(_, (cid, _))| *cid == id)
                    .map(|(a, _)| a.clone())
                else {
                    return;
                };
                tracing::warn!(%addr, error = %why, "engine: pub/sub connection lost");
                *self.engine.last_error.lock() = why;
                self.conns.remove(&addr);
                self.was_down = true;
                for w in self.watched.values_mut() {
                    if w.addr.as_deref() == Some(addr.as_str()) {
                        w.state = SubState::Unsent;
                        w.addr = None;
                    }
                }
                self.engine.subs_up.store(false, Ordering::Release);
                // The command connection very likely broke too: until a PING has gone through
                // (and so made it reconnect), no request should be the one that finds out.
                self.engine.cmd_up.store(false, Ordering::Release);
                self.generation += 1;
                self.last_ping = Instant::now() - PING_EVERY;
                self.engine.metrics.up.set(0);
                if self.cluster() {
                    self.refresh_slots();
                }
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let has_conn = self.engine.shared.conn.read().is_some();
        if !has_conn && !self.cmd_connecting && self.backoff.due() {
            self.cmd_connecting = true;
            let cfg = self.engine.shared.cfg.clone();
            self.spawn_msg(async move {
                Msg::Connected(connect(&cfg).await.map_err(|e| e.to_string()))
            });
        }
        if has_conn && !self.pinging && now.duration_since(self.last_ping) >= PING_EVERY {
            self.pinging = true;
            self.last_ping = now;
            let shared = self.engine.shared.clone();
            let generation = self.generation;
            self.spawn_msg(async move {
                let r = match shared.conn() {
                    Ok(mut c) => redis::cmd("PING")
                        .query_async::<String>(&mut c)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                Msg::Pinged(generation, r)
            });
        }
        // Pub/sub connections: the standalone server always (so that an outage shows even
        // with nothing watched), cluster masters as watched nodes need them.
        let mut needed: Vec<String> = if self.cluster() {
            self.watched
                .values()
                .filter_map(|w| w.addr.clone())
                .collect()
        } else {
            self.addrs.first().cloned().into_iter().collect()
        };
        if self.cluster() {
            for w in self.watched.values() {
                if w.addr.is_none()
                    && let Some(a) = self.route(&w.channel)
                {
                    needed.push(a);
                }
            }
        }
        needed.sort();
        needed.dedup();
        if self.engine.cmd_up.load(Ordering::Acquire) && self.backoff.due() {
            for addr in needed {
                if self.conns.contains_key(&addr) || self.connecting.contains_key(&addr) {
                    continue;
                }
                let id = self.next_id;
                self.next_id += 1;
                self.connecting.insert(addr.clone(), id);
                let (auth, timeout, events) = (
                    self.auth.clone(),
                    self.engine.shared.cfg.timeout,
                    self.events_tx.clone(),
                );
                self.spawn_msg(async move {
                    let r = SubConn::connect(&addr, &auth, timeout, id, events)
                        .await
                        .map_err(|e| e.to_string());
                    Msg::SubConnected(addr, id, r)
                });
            }
        }
        self.send_subscriptions();
        // Nodes nobody here subscribes to any more.
        let idle: Vec<NodeName> = self
            .watched
            .iter()
            .filter(|(_, w)| !w.active && now.duration_since(w.idle_since) >= LINGER)
            .map(|(n, _)| n.clone())
            .collect();
        for node in idle {
            let mut seqs = self.engine.seqs.lock();
            if seqs.get(&node).is_some_and(|s| !s.waiters.is_empty()) {
                continue;
            }
            seqs.remove(&node);
            drop(seqs);
            if let Some(w) = self.watched.remove(&node) {
                self.channels.remove(&w.channel);
                if let Some((_, c)) = w.addr.as_ref().and_then(|a| self.conns.get(a)) {
                    c.send(vec![b"SUNSUBSCRIBE".to_vec(), w.channel]);
                }
            }
        }
        // Subscribers that waited too long for a confirmation.
        {
            let mut seqs = self.engine.seqs.lock();
            for seq in seqs.values_mut() {
                let (late, keep): (Vec<_>, Vec<_>) = seq
                    .waiters
                    .drain(..)
                    .partition(|(t, _)| now.duration_since(*t) >= WATCH_TIMEOUT);
                seq.waiters = keep;
                for (_, w) in late {
                    let _ = w.send(Err(Error::EngineUnavailable(
                        "the engine did not confirm the subscription in time".into(),
                    )));
                }
            }
        }
        if self.tail_queue.is_empty()
            && now.duration_since(self.last_tail_check) >= TAIL_CHECK_EVERY
        {
            self.last_tail_check = now;
            self.tail_queue = self
                .watched
                .iter()
                .filter(|(_, w)| w.state == SubState::Confirmed)
                .map(|(n, _)| n.clone())
                .collect();
            let ticks = (TAIL_CHECK_EVERY.as_millis() / TICK.as_millis()).max(1) as usize;
            self.tail_batch = self.tail_queue.len().div_ceil(ticks).max(1);
        }
        for _ in 0..self.tail_batch {
            let Some(n) = self.tail_queue.pop() else {
                break;
            };
            if self.watched.contains_key(&n) {
                self.engine.check_tail(&n);
            }
        }
        self.update_up();
    }

    fn update_up(&mut self) {
        let subs = if self.cluster() {
            self.watched
                .values()
                .filter(|w| w.active)
                .all(|w| w.state == SubState::Confirmed)
        } else {
            let conn = self
                .addrs
                .first()
                .is_some_and(|a| self.conns.contains_key(a));
            conn && self
                .watched
                .values()
                .filter(|w| w.active)
                .all(|w| w.state == SubState::Confirmed)
        };
        let cmd = self.engine.cmd_up.load(Ordering::Acquire);
        if subs && cmd && self.was_down {
            self.was_down = false;
            tracing::info!("engine: Redis reachable, subscriptions restored");
        }
        self.engine.subs_up.store(subs, Ordering::Release);
        self.engine.metrics.up.set(i64::from(subs && cmd));
    }

    /// Where a channel lives: the standalone server, or its slot's master.
    fn route(&self, channel: &[u8]) -> Option<String> {
        if !self.cluster() {
            return self.addrs.first().cloned();
        }
        let slot = slot_of(channel);
        self.slots
            .iter()
            .find(|(lo, hi, _)| (*lo..=*hi).contains(&slot))
            .map(|(_, _, a)| a.clone())
    }

    /// Sends `SSUBSCRIBE` for every watched channel not yet sent, where a connection exists.
    fn send_subscriptions(&mut self) {
        let routes: Vec<(NodeName, Option<String>)> = self
            .watched
            .iter()
            .filter(|(_, w)| w.state == SubState::Unsent)
            .map(|(n, w)| (n.clone(), self.route(&w.channel)))
            .collect();
        for (node, addr) in routes {
            let Some(addr) = addr else { continue };
            let Some((_, conn)) = self.conns.get(&addr) else {
                continue;
            };
            if let Some(w) = self.watched.get_mut(&node)
                && conn.send(vec![b"SSUBSCRIBE".to_vec(), w.channel.clone()])
            {
                w.state = SubState::Sent;
                w.addr = Some(addr);
            }
        }
    }

    fn refresh_slots(&self) {
        let shared = self.engine.shared.clone();
        self.spawn_msg(async move {
            let Ok(mut c) = shared.conn() else {
                return Msg::Slots(Vec::new());
            };
            let v: Result<redis::Value, _> =
                redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut c).await;
            Msg::Slots(v.map(|v| parse_slots(&v)).unwrap_or_default())
        });
    }
}

/// `CLUSTER SLOTS` → `(first, last, master "host:port")`.
fn parse_slots(v: &redis::Value) -> Vec<(u16, u16, String)> {
    let redis::Value::Array(ranges) = v else {
        return Vec::new();
    };
    ranges
        .iter()
        .filter_map(|r| {
            let redis::Value::Array(r) = r else {
                return None;
            };
            let lo = u16::try_from(super::int_of(r.first()?)?).ok()?;
            let hi = u16::try_from(super::int_of(r.get(1)?)?).ok()?;
            let redis::Value::Array(master) = r.get(2)? else {
                return None;
            };
            let host = super::str_of(master.first()?)?;
            let port = super::int_of(master.get(1)?)?;
            let host = if host.is_empty() { "127.0.0.1" } else { host };
            Some((lo, hi, format!("{host}:{port}")))
        })
        .collect()
}

/// The cluster slot of a key or channel (CRC16/XMODEM of its hash tag, mod 16384).
pub(super) fn slot_of(key: &[u8]) -> u16 {
    let tag = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    let mut crc: u16 = 0;
    for &b in tag {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// The end of a node's history: its `deleted` event at `offset`.
pub(super) fn deleted_event(
    node: &NodeName,
    epoch: Epoch,
    offset: Offset,
    origin: Origin,
) -> Arc<Event> {
    Arc::new(Event::new(
        node.clone(),
        epoch,
        Record {
            offset,
            change: Change::Deleted,
            at: time::now_ms(),
        },
        origin,
    ))
}

/// Decodes a channel message: `P<epoch>\n` + records, or `D<epoch>\n<offset>`.
fn parse_message(node: &NodeName, b: &[u8]) -> Option<(Epoch, Vec<Arc<Event>>)> {
    let (&kind, rest) = b.split_first()?;
    let nl = rest.iter().position(|&c| c == b'\n')?;
    let epoch: Epoch = std::str::from_utf8(&rest[..nl]).ok()?.parse().ok()?;
    let mut rest = &rest[nl + 1..];
    let mut out = Vec::new();
    match kind {
        b'D' => {
            let offset: Offset = std::str::from_utf8(rest).ok()?.parse().ok()?;
            out.push(deleted_event(node, epoch, offset, Origin::History));
        }
        b'P' => {
            while !rest.is_empty() {
                let nl = rest.iter().position(|&c| c == b'\n')?;
                let head = std::str::from_utf8(&rest[..nl]).ok()?;
                let mut f = head.split(' ');
                let offset: Offset = f.next()?.parse().ok()?;
                let len: usize = f.next()?.parse().ok()?;
                let origin = origin_of(f.next()?.bytes().next()?);
                let body = rest.get(nl + 1..nl + 1 + len)?;
                rest = &rest[nl + 1 + len..];
                let record = decode_record(offset, body).ok()?;
                out.push(Arc::new(Event::new(node.clone(), epoch, record, origin)));
            }
        }
        _ => return None,
    }
    Some((epoch, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_hash_tag() {
        // Known values from the Redis Cluster specification's CRC16 test vector and
        // `CLUSTER KEYSLOT`.
        assert_eq!(slot_of(b"123456789"), 0x31C3);
        assert_eq!(slot_of(b"juxta:{n}:meta"), slot_of(b"juxta:{n}:events"));
        assert_eq!(slot_of(b"juxta:{n}:meta"), slot_of(b"n"));
    }

    #[test]
    fn bad_messages_are_refused_not_panics() {
        let n = NodeName::new("n").expect("name");
        for b in [
            &b""[..],
            b"P",
            b"Pzz\n",
            b"P0000000000000001\n5 99 h\nabc",
            b"D0000000000000001\nx",
            b"X0000000000000001\n",
        ] {
            assert!(parse_message(&n, b).is_none(), "{b:?}");
        }
        assert!(parse_message(&n, b"P0000000000000001\n").is_some());
    }
}
