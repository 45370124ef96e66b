//! Fan-out: committed events to live subscriptions.
//!
//! Each node with live subscribers has one ring of recent events (a tokio `broadcast`
//! channel of `Arc<Event>`): publishing is one push whatever the number of subscribers, each
//! subscriber reads the ring at its own pace, and the ring's capacity is the per-subscriber
//! queue bound. A subscriber that falls further behind than the ring holds does not hold
//! memory: it notices the lag and applies its node's [`OverflowPolicy`] — by default it
//! refills itself from the store by offset ([`Subscription`]). Nodes without subscribers
//! have no ring.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::broadcast;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::model::{Change, Epoch, Event, NodeName, Offset, Origin, OverflowPolicy, Record};
use crate::store::{CommitSink, Store};

/// Default ring size per node: how far one subscriber may fall behind live events before
/// its overflow policy applies.
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;
/// History records read per catch-up page.
const PAGE: usize = 256;

/// Told which nodes have live subscribers on this instance: a shared engine uses it to
/// receive only the events of those nodes from the other instances.
#[async_trait::async_trait]
pub trait Interest: Send + Sync + std::fmt::Debug {
    /// `node` gained its first local subscriber. Returns once every event committed from
    /// now on, on any instance, reaches this instance's commit sink; fails when that cannot
    /// be promised (the engine is down).
    async fn watch(&self, node: &NodeName) -> Result<(), Error>;
    /// `node` lost its last local subscriber.
    fn unwatch(&self, node: &NodeName);
}

/// Routes committed events to the rings of their nodes.
#[derive(Debug)]
pub struct FanOut {
    /// Rings by node. Read-locked per event; write-locked only to add or drop a ring.
    rings: RwLock<HashMap<NodeName, broadcast::Sender<Arc<Event>>>>,
    capacity: usize,
    metrics: Arc<Metrics>,
    interest: std::sync::OnceLock<Arc<dyn Interest>>,
}

impl FanOut {
    /// A fan-out whose rings hold `capacity` events.
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            rings: RwLock::new(HashMap::new()),
            capacity: capacity.max(1),
            metrics,
            interest: std::sync::OnceLock::new(),
        }
    }

    /// Reports nodes gaining and losing local subscribers to `interest` from now on.
    /// Set once; later calls are ignored.
    pub fn set_interest(&self, interest: Arc<dyn Interest>) {
        let _ = self.interest.set(interest);
    }

    /// Waits until events of `node` from every instance reach this one (see [`Interest`]).
    async fn watch(&self, node: &NodeName) -> Result<(), Error> {
        match self.interest.get() {
            Some(i) => i.watch(node).await,
            None => Ok(()),
        }
    }

    /// The metrics handles.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn receiver(&self, node: &NodeName) -> broadcast::Receiver<Arc<Event>> {
        let mut rings = self.rings.write();
        rings
            .entry(node.clone())
            .or_insert_with(|| broadcast::channel(self.capacity).0)
            .subscribe()
    }

    fn release(&self, node: &NodeName) {
        let mut rings = self.rings.write();
        if rings.get(node).is_some_and(|tx| tx.receiver_count() == 0) {
            rings.remove(node);
            if let Some(i) = self.interest.get() {
                i.unwatch(node);
            }
        }
    }

    /// Live subscriptions to `node` on this instance.
    pub fn subscriber_count(&self, node: &NodeName) -> usize {
        self.rings
            .read()
            .get(node)
            .map_or(0, |tx| tx.receiver_count())
    }
}

impl CommitSink for FanOut {
    fn committed(&self, event: Arc<Event>) {
        self.metrics.events.inc();
        let deleted = matches!(event.change, Change::Deleted);
        let node = event.node.clone();
        if let Some(tx) = self.rings.read().get(&node) {
            // An error only means nobody listens right now.
            let _ = tx.send(event);
        }
        if deleted {
            // Dropping the sender ends every subscription once it has read `deleted`.
            if self.rings.write().remove(&node).is_some()
                && let Some(i) = self.interest.get()
            {
                i.unwatch(&node);
            }
        }
    }
}

/// Where a new subscription starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resume {
    /// Deliver events after this offset; `None` means live events only.
    pub after: Option<Offset>,
    /// The epoch `after` belongs to, when the client knows it.
    pub epoch: Option<Epoch>,
}

/// What a subscriber receives.
#[derive(Clone, Debug)]
pub enum Delivery {
    /// The next event, in offset order.
    Event(Arc<Event>),
    /// Events `from..=to` can no longer be delivered (history trimmed, or the `drop` policy
    /// skipped them). The subscriber is told instead of silently missing them.
    Lost {
        /// First offset missed.
        from: Offset,
        /// Last offset missed.
        to: Offset,
    },
}

/// Why a subscription could not resume exactly where it was asked to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotRecovered {
    /// The node's epoch changed: its history was reset.
    EpochChanged,
    /// The requested position is older than the node's history.
    HistoryTrimmed,
}

impl NotRecovered {
    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            NotRecovered::EpochChanged => "epoch_changed",
            NotRecovered::HistoryTrimmed => "history_trimmed",
        }
    }
}

/// A live subscription to one node: history from the resume point, then live events, in
/// offset order, without duplicates; gaps are filled from the store or reported as
/// [`Delivery::Lost`].
#[derive(Debug)]
pub struct Subscription {
    node: NodeName,
    epoch: Epoch,
    last_offset: Offset,
    not_recovered: Option<NotRecovered>,
    /// The next offset to deliver.
    next: Offset,
    /// Offsets up to here exist and must come from the store before live events.
    target: Offset,
    /// The ring dropped events this subscription had not read: read the store once to learn
    /// whether any of them are still undelivered. (They may all be older than `next`, already
    /// delivered from history, so a lag alone does not say that `next` exists.)
    refill: bool,
    rx: Option<broadcast::Receiver<Arc<Event>>>,
    /// A live event that arrived ahead of `next`.
    parked: Option<Arc<Event>>,
    backlog: VecDeque<Delivery>,
    lagged: bool,
    skip_gap: bool,
    /// A live event of another epoch arrived: the node's history may have changed epoch
    /// (see [`Error::EpochChanged`]); `next` asks the store.
    foreign: bool,
    done: bool,
    policy: OverflowPolicy,
    store: Arc<dyn Store>,
    fanout: Arc<FanOut>,
}

impl Subscription {
    pub(crate) async fn open(
        store: Arc<dyn Store>,
        fanout: Arc<FanOut>,
        node: NodeName,
        resume: Resume,
    ) -> Result<Self, Error> {
        // Subscribe to the ring before reading the node's state: every event committed after
        // this point is in the ring, every one before it is in the store.
        let rx = fanout.receiver(&node);
        fanout.metrics.subscribers.inc();
        // With a shared engine, events committed elsewhere reach the ring only once the
        // engine watches the node; until then they must be read from the store below.
        let mut sub = Self {
            node: node.clone(),
            epoch: Epoch(0),
            last_offset: 0,
            not_recovered: None,
            next: 1,
            target: 0,
            refill: false,
            rx: Some(rx),
            parked: None,
            backlog: VecDeque::new(),
            lagged: false,
            skip_gap: false,
            foreign: false,
            done: false,
            policy: OverflowPolicy::default(),
            store: store.clone(),
            fanout: fanout.clone(),
        };
        fanout.watch(&node).await?;
        let meta = store
            .node(&node)
            .await?
            .ok_or_else(|| Error::NodeNotFound(node.to_string()))?;
        sub.epoch = meta.epoch;
        sub.last_offset = meta.last_offset;
        sub.policy = meta.config.overflow;
        sub.target = meta.last_offset;
        sub.next = meta.last_offset + 1;
        if let Some(after) = resume.after {
            if resume.epoch.is_some_and(|e| e != meta.epoch) {
                sub.not_recovered = Some(NotRecovered::EpochChanged);
                sub.next = meta.first_offset;
            } else if after > meta.last_offset {
                return Err(Error::OffsetOutOfRange {
                    after,
                    last: meta.last_offset,
                });
            } else if after + 1 < meta.first_offset {
                sub.not_recovered = Some(NotRecovered::HistoryTrimmed);
                sub.next = meta.first_offset;
            } else {
                sub.next = after + 1;
            }
        }
        Ok(sub)
    }

    /// The node.
    pub fn node(&self) -> &NodeName {
        &self.node
    }

    /// The node's epoch at subscription time.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The node's last offset at subscription time.
    pub fn last_offset(&self) -> Offset {
        self.last_offset
    }

    /// `None` when the subscription resumed exactly where asked (or no position was given);
    /// otherwise why not. Either way, what history still holds is delivered.
    pub fn not_recovered(&self) -> Option<NotRecovered> {
        self.not_recovered
    }

    /// The offset of the next event this subscription will deliver.
    pub fn position(&self) -> Offset {
        self.next
    }

    fn accept(&mut self, ev: Arc<Event>) -> Delivery {
        self.next = ev.offset + 1;
        if matches!(ev.change, Change::Deleted) {
            self.done = true;
        }
        Delivery::Event(ev)
    }

    /// The next delivery if one is ready without waiting or reading the store — for
    /// batching writes to a socket. `None` does not mean the subscription ended.
    pub fn try_next(&mut self) -> Option<Delivery> {
        if let Some(d) = self.backlog.pop_front() {
            if let Delivery::Event(ev) = &d {
                self.next = self.next.max(ev.offset + 1);
            }
            return Some(d);
        }
        if self.done
            || self.lagged
            || self.refill
            || self.foreign
            || self.parked.is_some()
            || self.next <= self.target
        {
            return None;
        }
        let rx = self.rx.as_mut()?;
        loop {
            match rx.try_recv() {
                Ok(ev) if ev.epoch != self.epoch => {
                    self.foreign = true;
                    return None;
                }
                Ok(ev) if ev.offset < self.next => continue,
                Ok(ev) if ev.offset == self.next => return Some(self.accept(ev)),
                Ok(ev) => {
                    self.parked = Some(ev);
                    return None;
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    self.lagged = true;
                    return None;
                }
                Err(_) => return None,
            }
        }
    }

    /// The next delivery, waiting for one. `None` when the subscription has ended (the node
    /// was deleted, after its `deleted` event, or the gateway is shutting down);
    /// `Some(Err(_))` when it failed ([`Error::EpochChanged`] when the node's history changed
    /// epoch under it, [`Error::SlowConsumer`] under the `disconnect`
    /// policy, or a store error) — it is over then too.
    pub async fn next(&mut self) -> Option<Result<Delivery, Error>> {
        loop {
            if let Some(d) = self.try_next() {
                return Some(Ok(d));
            }
            if self.done {
                return None;
            }
            if self.lagged {
                self.lagged = false;
                match self.policy {
                    OverflowPolicy::Disconnect => {
                        self.fanout.metrics.overflow("disconnected");
                        self.done = true;
                        return Some(Err(Error::SlowConsumer));
                    }
                    OverflowPolicy::Drop => self.skip_gap = true,
                    OverflowPolicy::CatchUp => {
                        self.fanout.metrics.overflow("catch_up");
                        self.refill = true;
                    }
                }
            }
            if std::mem::take(&mut self.foreign) {
                match self.store.node(&self.node).await {
                    // A late event of an earlier epoch: nothing changed for this one.
                    Ok(Some(meta)) if meta.epoch == self.epoch => {}
                    Ok(Some(meta)) => {
                        self.done = true;
                        return Some(Err(Error::EpochChanged {
                            old: self.epoch.to_string(),
                            new: meta.epoch.to_string(),
                        }));
                    }
                    Ok(None) => {
                        let deleted = Record {
                            offset: self.next,
                            change: Change::Deleted,
                            at: crate::time::now_ms(),
                        };
                        let ev =
                            Event::new(self.node.clone(), self.epoch, deleted, Origin::History);
                        return Some(Ok(self.accept(Arc::new(ev))));
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            }
            if let Some(p) = self.parked.take() {
                if p.offset < self.next {
                    continue;
                }
                if p.offset == self.next || matches!(p.change, Change::Deleted) {
                    return Some(Ok(self.accept(p)));
                }
                if self.skip_gap {
                    self.skip_gap = false;
                    self.fanout.metrics.overflow("lost");
                    let lost = Delivery::Lost {
                        from: self.next,
                        to: p.offset - 1,
                    };
                    self.next = p.offset;
                    self.parked = Some(p);
                    self.target = 0;
                    return Some(Ok(lost));
                }
                self.target = self.target.max(p.offset - 1);
                self.parked = Some(p);
            }
            if self.next <= self.target || std::mem::take(&mut self.refill) {
                if let Err(e) = self.fill().await {
                    self.done = true;
                    return Some(Err(e));
                }
                continue;
            }
            let rx = self.rx.as_mut()?;
            match rx.recv().await {
                Ok(ev) if ev.epoch != self.epoch => self.foreign = true,
                Ok(ev) if ev.offset < self.next => {}
                Ok(ev) if ev.offset == self.next => return Some(Ok(self.accept(ev))),
                Ok(ev) => self.parked = Some(ev),
                Err(broadcast::error::RecvError::Lagged(_)) => self.lagged = true,
                Err(broadcast::error::RecvError::Closed) => {
                    self.done = true;
                    return None;
                }
            }
        }
    }

    /// Reads one page of history from `next` into the backlog.
    async fn fill(&mut self) -> Result<(), Error> {
        self.fanout.metrics.history_reads.inc();
        let page = match self.store.read(&self.node, self.next - 1, PAGE).await {
            Ok(p) => p,
            // Deleted meanwhile: its `deleted` event is on the way.
            Err(Error::NodeNotFound(_)) => {
                self.target = 0;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if page.meta.epoch != self.epoch {
            // Deleted and created again: this subscription's history is gone.
            self.target = 0;
            self.backlog.push_back(Delivery::Lost {
                from: self.next,
                to: page.meta.last_offset.max(self.next),
            });
            self.done = true;
            return Ok(());
        }
        self.target = self.target.max(page.meta.last_offset);
        let first = page.records.first().map(|r| r.offset);
        let gap_end = match first {
            Some(f) if f > self.next => Some(f - 1),
            // Nothing at or after `next`: a gap only if offsets known to exist are missing.
            None if self.target >= self.next => Some(self.target),
            _ => None,
        };
        if let Some(to) = gap_end {
            let reset_by_purge = matches!(
                page.records.first().map(|r| &r.change),
                Some(Change::Purged)
            );
            if to >= self.next && !reset_by_purge {
                self.fanout.metrics.overflow("lost");
                self.backlog.push_back(Delivery::Lost {
                    from: self.next,
                    to,
                });
            }
            self.next = to + 1;
        }
        for r in page.records {
            let ev = Arc::new(Event::new(
                self.node.clone(),
                self.epoch,
                r,
                Origin::History,
            ));
            self.backlog.push_back(Delivery::Event(ev));
        }
        Ok(())
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.fanout.metrics.subscribers.dec();
        drop(self.rx.take());
        self.fanout.release(&self.node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Principal;
    use crate::bus::{Bus, Limits, Publish};
    use crate::model::{NodeConfig, Payload};
    use crate::store::MemoryStore;
    use std::time::Duration;

    fn bus(capacity: usize) -> Bus {
        let fanout = Arc::new(FanOut::new(capacity, Arc::new(Metrics::default())));
        let store = Arc::new(MemoryStore::new(fanout.clone()));
        Bus::new(store, fanout, Limits::default())
    }

    async fn node(bus: &Bus, name: &str, max_items: u64, overflow: OverflowPolicy) -> NodeName {
        let n = NodeName::new(name).expect("name");
        let config = NodeConfig {
            max_items,
            overflow,
            ..NodeConfig::default()
        };
        bus.put_node(&Principal::Admin, n.clone(), config)
            .await
            .expect("create");
        n
    }

    async fn publish(bus: &Bus, n: &NodeName, count: usize) {
        for i in 0..count {
            let p = Publish {
                node: n.clone(),
                id: None,
                payload: Payload::json(format!("{i}")).expect("json"),
                idempotency_key: None,
            };
            bus.publish(&Principal::Admin, p, Origin::Http)
                .await
                .expect("publish");
        }
    }

    async fn take(sub: &mut Subscription, count: usize) -> Vec<Delivery> {
        let mut out = Vec::new();
        while out.len() < count {
            let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .expect("a delivery in time")
                .expect("subscription open")
                .expect("no error");
            out.push(d);
        }
        out
    }

    fn offsets(ds: &[Delivery]) -> Vec<u64> {
        ds.iter()
            .filter_map(|d| match d {
                Delivery::Event(e) => Some(e.offset),
                Delivery::Lost { .. } => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn given_a_live_subscriber_when_items_are_published_then_it_gets_them_in_order() {
        let bus = bus(1024);
        let n = node(&bus, "n", 100, OverflowPolicy::CatchUp).await;
        let mut sub = bus
            .subscribe(&Principal::Admin, &n, Resume::default())
            .await
            .expect("subscribe");
        publish(&bus, &n, 5).await;
        assert_eq!(offsets(&take(&mut sub, 5).await), vec![1, 2, 3, 4, 5]);
        assert!(sub.try_next().is_none());
    }

    #[tokio::test]
    async fn given_a_resume_offset_then_exactly_the_missed_events_come_before_live_ones() {
        let bus = bus(1024);
        let n = node(&bus, "n", 100, OverflowPolicy::CatchUp).await;
        publish(&bus, &n, 6).await;
        let resume = Resume {
            after: Some(3),
            epoch: None,
        };
        let mut sub = bus
            .subscribe(&Principal::Admin, &n, resume)
            .await
            .expect("subscribe");
        assert_eq!(sub.not_recovered(), None);
        publish(&bus, &n, 2).await;
        assert_eq!(offsets(&take(&mut sub, 5).await), vec![4, 5, 6, 7, 8]);
    }

    #[tokio::test]
    async fn given_a_subscriber_that_lags_behind_its_queue_then_it_catches_up_from_history() {
        let bus = bus(4);
        let n = node(&bus, "n", 1000, OverflowPolicy::CatchUp).await;
        let mut sub = bus
            .subscribe(&Principal::Admin, &n, Resume::default())
            .await
            .expect("subscribe");
        publish(&bus, &n, 100).await;
        let got = take(&mut sub, 100).await;
        assert_eq!(offsets(&got), (1..=100).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn given_a_lag_noticed_after_history_already_delivered_the_missed_events_then_nothing_is_reported_lost()
     {
        // The ring wraps twice before the subscriber reads it: the first lag makes it catch up
        // from history, which by then holds more than the ring did, so when it notices the
        // second lag every event the ring dropped was already delivered.
        let bus = bus(4);
        let n = node(&bus, "n", 1000, OverflowPolicy::CatchUp).await;
        let mut sub = bus
            .subscribe(&Principal::Admin, &n, Resume::default())
            .await
            .expect("subscribe");
        publish(&bus, &n, 10).await;
        assert!(
            sub.try_next().is_none(),
            "the first lag is noticed, not delivered"
        );
        publish(&bus, &n, 5).await;
        let got = take(&mut sub, 15).await;
        assert_eq!(offsets(&got), (1..=15).collect::<Vec<_>>(), "{got:?}");
        let early = tokio::time::timeout(Duration::from_millis(100), sub.next()).await;
        assert!(
            early.is_err(),
            "nothing was published after offset 15, yet got {early:?}"
        );
        publish(&bus, &n, 1).await;
        let got = take(&mut sub, 1).await;
        assert_eq!(offsets(&got), vec![16], "{got:?}");
    }

    #[tokio::test]
    async fn given_history_shorter_than_the_lag_then_the_subscriber_is_told_what_it_lost() {
        let bus = bus(4);
        let n = node(&bus, "n", 10, OverflowPolicy::CatchUp).await;
        let mut sub = bus
            .subscribe(&Principal::Admin, &n, Resume::default())
            .await
            .expect("subscribe");
        publish(&bus, &n, 100).await;
        let got = take(&mut sub, 11).await;
        assert!(
            matches!(got[0], Delivery::Lost { from: 1, to: 90 }),
            "{got:?}"
        );
        assert_eq!(offsets(&got), (91..=100).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn given_the_drop_policy_then_a_lag_is_reported_and_live_events_continue() {
        let bus = bus(4);
        let n = node(&bus, "n", 1000, OverflowPolicy::Drop).await;
        let mut sub = bus
            .subscribe(&Principal::Admin, &n, Resume::default())
            .await
            .expect("subscribe");
        publish(&bus, &n, 20).await;
        let first = take(&mut sub, 1).await;
        assert!(
            matches!(first[0], Delivery::Lost { from: 1, to: 16 }),
            "{first:?}"
        );
        assert_eq!(offsets(&take(&mut sub, 4).await), vec![17, 18, 19, 20]);
    }

    #[tokio::test]
    async fn given_the_disconnect_policy_then_a_lagging_subscriber_ends_with_slow_consumer() {
        let bus = bus(4);
        let n = node(&bus, "n", 1000, OverflowPolicy::Disconnect).await;
        let mut sub = bus
            .subscribe(&Principal::Admin, &n, Resume::default())
            .await
            .expect("subscribe");
        publish(&bus, &n, 20).await;
        assert!(matches!(sub.next().await, Some(Err(Error::SlowConsumer))));
    }

    #[tokio::test]
    async fn given_a_stale_epoch_or_trimmed_offset_then_the_subscription_says_it_did_not_recover() {
        let bus = bus(64);
        let n = node(&bus, "n", 5, OverflowPolicy::CatchUp).await;
        publish(&bus, &n, 10).await;
        let stale = Resume {
            after: Some(2),
            epoch: Some(Epoch(1)),
        };
        let mut sub = bus
            .subscribe(&Principal::Admin, &n, stale)
            .await
            .expect("subscribe");
        assert_eq!(sub.not_recovered(), Some(NotRecovered::EpochChanged));
        assert_eq!(offsets(&take(&mut sub, 5).await), vec![6, 7, 8, 9, 10]);
        let old = Resume {
            after: Some(2),
            epoch: None,
        };
        let sub = bus
            .subscribe(&Principal::Admin, &n, old)
            .await
            .expect("subscribe");
        assert_eq!(sub.not_recovered(), Some(NotRecovered::HistoryTrimmed));
        let beyond = Resume {
            after: Some(11),
            epoch: None,
        };
        assert!(matches!(
            bus.subscribe(&Principal::Admin, &n, beyond).await,
            Err(Error::OffsetOutOfRange {
                after: 11,
                last: 10
            })
        ));
    }

    #[tokio::test]
    async fn given_a_deleted_node_then_subscribers_get_deleted_and_the_subscription_ends() {
        let bus = bus(64);
        let n = node(&bus, "n", 5, OverflowPolicy::CatchUp).await;
        let mut sub = bus
            .subscribe(&Principal::Admin, &n, Resume::default())
            .await
            .expect("subscribe");
        bus.delete_node(&Principal::Admin, &n, Origin::Http)
            .await
            .expect("delete");
        let d = take(&mut sub, 1).await;
        assert!(
            matches!(&d[0], Delivery::Event(e) if e.kind() == crate::model::EventKind::Deleted)
        );
        assert!(sub.next().await.is_none());
    }

    #[tokio::test]
    async fn given_a_late_live_event_of_another_epoch_while_the_node_keeps_its_epoch_then_it_is_ignored()
     {
        let fanout = Arc::new(FanOut::new(64, Arc::new(Metrics::default())));
        let store = Arc::new(MemoryStore::new(fanout.clone()));
        let bus = Bus::new(store, fanout.clone(), Limits::default());
        let n = node(&bus, "n", 100, OverflowPolicy::CatchUp).await;
        let mut sub = bus
            .subscribe(&Principal::Admin, &n, Resume::default())
            .await
            .expect("subscribe");
        let other = Epoch(sub.epoch().0.wrapping_add(1));
        let stale = Record {
            offset: 7,
            change: Change::Purged,
            at: 0,
        };
        fanout.committed(Arc::new(Event::new(
            n.clone(),
            other,
            stale,
            Origin::History,
        )));
        // The subscription asks the store, finds its own epoch, and goes on.
        publish(&bus, &n, 2).await;
        assert_eq!(offsets(&take(&mut sub, 2).await), vec![1, 2]);
    }

    #[tokio::test]
    async fn given_a_failed_commit_then_nothing_reaches_subscribers_and_offsets_stay_contiguous() {
        let fanout = Arc::new(FanOut::new(64, Arc::new(Metrics::default())));
        let faulty = Arc::new(crate::store::FaultyStore::new(Arc::new(MemoryStore::new(
            fanout.clone(),
        ))));
        let bus = Bus::new(faulty.clone(), fanout, Limits::default());
        let n = node(&bus, "n", 100, OverflowPolicy::CatchUp).await;
        let mut sub = bus
            .subscribe(&Principal::Admin, &n, Resume::default())
            .await
            .expect("subscribe");
        publish(&bus, &n, 1).await;
        faulty.fail_appends(1);
        let p = Publish {
            node: n.clone(),
            id: None,
            payload: Payload::json("2").expect("json"),
            idempotency_key: None,
        };
        assert!(matches!(
            bus.publish(&Principal::Admin, p, Origin::Http).await,
            Err(Error::Storage(_))
        ));
        publish(&bus, &n, 1).await;
        assert_eq!(offsets(&take(&mut sub, 2).await), vec![1, 2]);
        assert!(
            sub.try_next().is_none(),
            "the failed publish was never delivered"
        );
    }

    #[tokio::test]
    async fn given_a_failing_history_read_then_a_resuming_subscriber_ends_with_the_error() {
        let fanout = Arc::new(FanOut::new(64, Arc::new(Metrics::default())));
        let faulty = Arc::new(crate::store::FaultyStore::new(Arc::new(MemoryStore::new(
            fanout.clone(),
        ))));
        let bus = Bus::new(faulty.clone(), fanout, Limits::default());
        let n = node(&bus, "n", 100, OverflowPolicy::CatchUp).await;
        publish(&bus, &n, 3).await;
        let resume = Resume {
            after: Some(0),
            epoch: None,
        };
        let mut sub = bus
            .subscribe(&Principal::Admin, &n, resume)
            .await
            .expect("subscribe");
        faulty.fail_reads(1);
        assert!(matches!(sub.next().await, Some(Err(Error::Storage(_)))));
        assert!(
            sub.next().await.is_none(),
            "the subscription is over, not silently skipping"
        );
    }

    #[tokio::test]
    async fn given_no_subscribers_left_then_the_ring_is_released() {
        let bus = bus(64);
        let n = node(&bus, "n", 5, OverflowPolicy::CatchUp).await;
        let sub = bus
            .subscribe(&Principal::Admin, &n, Resume::default())
            .await
            .expect("subscribe");
        assert_eq!(
            bus.node(&Principal::Admin, &n)
                .await
                .expect("info")
                .subscribers,
            1
        );
        drop(sub);
        assert_eq!(
            bus.node(&Principal::Admin, &n)
                .await
                .expect("info")
                .subscribers,
            0
        );
    }
}
